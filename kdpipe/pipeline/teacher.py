"""The teacher stage: its task trains (or loads) and evaluates the teacher; the stage owns its run id and inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput, StageSpec, seeded
from kdpipe.config import TeacherConfig
from kdpipe.tasks.registry import task_for


def inputs(cfg: TeacherConfig, _: Manifest | None) -> list[FileRecord]:
    """The files the task's teacher reads (the model directory's files and the data file): a change re-runs it."""
    return task_for(cfg).teacher_inputs(cfg)


def run_teacher(cfg: TeacherConfig, _: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    return task_for(cfg).run_teacher(cfg, work, ctx)


def identity(cfg: TeacherConfig, ctx: RunContext) -> dict[str, Any]:
    """`seeded`, without the task fields for a classification teacher and without an unset posterior: its run id
    is what it was before them."""
    ident = seeded(cfg, ctx)
    ident.pop("checkpoint_every", None)  # how often a resume point is written does not change the teacher
    if ident.get("posterior") is None:  # no posterior: the run id of a teacher from before the field
        ident.pop("posterior", None)
    if cfg.task == "classification":
        ident.pop("task", None)
        ident.pop("translation", None)
    return ident


STAGE = StageSpec(
    name="teacher",
    upstream=None,
    section=lambda recipe, ctx: recipe.teacher,
    run=run_teacher,
    summary="fine-tune / evaluate the teacher",
    identity=identity,
    inputs=inputs,
)
