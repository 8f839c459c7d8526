"""The student stage: its task builds a smaller model from the teacher (layers kept, width, vocabulary, init)."""

from __future__ import annotations

from pathlib import Path

from kdpipe.artifacts.manifest import FileRecord, Manifest, input_records
from kdpipe.artifacts.records import RunContext, StageOutput, StageSpec, seeded, upstream_inputs
from kdpipe.config import StudentConfig
from kdpipe.models.loading import resolve_model_dir
from kdpipe.tasks.registry import task_of


def run_student(cfg: StudentConfig, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    """The student stage: a smaller model from the teacher's layers (or a pretrained one)."""
    assert upstream is not None  # STAGE names a teacher upstream; the runner reads and verifies it
    return task_of(upstream).run_student(cfg, upstream, work, ctx)


def inputs(cfg: StudentConfig, upstream: Manifest | None) -> list[FileRecord]:
    """The teacher artifact, and the files of `student.pretrained` by content."""
    records = upstream_inputs(upstream)
    if cfg.pretrained is not None:
        records += input_records(resolve_model_dir(cfg.pretrained, "student.pretrained"), "pretrained")
    return records


STAGE = StageSpec(
    name="student",
    upstream="teacher",
    section=lambda recipe, ctx: recipe.student,
    run=run_student,
    summary="build the student from the teacher",
    identity=seeded,
    inputs=inputs,
)
