"""The teacher stage: its task trains (or loads) and evaluates the teacher; the stage owns its run id and inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput, StageSpec, seeded
from kdpipe.config import TeacherConfig
from kdpipe.tasks.registry import task_for


def inputs(cfg: TeacherConfig, _: Manifest | None) -> list[FileRecord]:
    """The files the task's teacher reads (the model directory's files and the data file): a change re-runs it."""
    return task_for(cfg).teacher_inputs(cfg)


def run_teacher(cfg: TeacherConfig, _: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    return task_for(cfg).run_teacher(cfg, work, ctx)


# teacher.task's values; a task may have a teacher section of its name (unset for a teacher of another task)
TASK_NAMES: tuple[str, ...] = get_args(TeacherConfig.model_fields["task"].annotation)
FIRST_TASK = TeacherConfig.model_fields["task"].default  # the task of every teacher from before `task`


def identity(cfg: TeacherConfig, ctx: RunContext) -> dict[str, Any]:
    """`seeded`, without an unset posterior, and for a teacher of the first task (teacher.task's default) without
    `task` and the unset task sections: its run id is what it was before those fields. A teacher of a later task
    keeps both, as its runs recorded them (an unset section as None where the config's dump keeps it)."""
    ident = seeded(cfg, ctx)
    ident.pop("checkpoint_every", None)  # how often a resume point is written does not change the teacher
    if ident.get("posterior") is None:  # no posterior: the run id of a teacher from before the field
        ident.pop("posterior", None)
    if cfg.task == FIRST_TASK:
        ident.pop("task", None)
        for section in TASK_NAMES:
            if section in ident and ident[section] is None:
                ident.pop(section)
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
