"""The distill stage: its task trains the student on the recipe's weighted loss terms (and a no-KD baseline); the
stage owns the run id and the files it reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import FileRecord, Manifest, input_records
from kdpipe.artifacts.records import RunContext, StageOutput, StageSpec, seeded, upstream_inputs
from kdpipe.config import DistillConfig
from kdpipe.data.tables import read_transfer
from kdpipe.models.loading import resolve_model_dir
from kdpipe.tasks.registry import task_of


def run_distill(cfg: DistillConfig, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    assert upstream is not None  # STAGE names a student upstream; the runner reads and verifies it
    return task_of(upstream).run_distill(cfg, upstream, work, ctx)


def inputs(cfg: DistillConfig, upstream: Manifest | None) -> list[FileRecord]:
    """The student artifact, the transfer file and every extra teacher's files, by content."""
    records = upstream_inputs(upstream)
    if cfg.transfer is not None:
        read_transfer(Path(cfg.transfer))  # a missing or empty file: one clear error, before hashing
        records += input_records(Path(cfg.transfer), "transfer")
    for i, member in enumerate(cfg.extra_teachers):
        records += input_records(resolve_model_dir(member, f"distill.extra_teachers[{i}]"), f"extra_teacher_{i}")
    return records


def identity(cfg: DistillConfig, ctx: RunContext) -> dict[str, Any]:
    """`seeded`, without how often resume points are written (that changes no result)."""
    ident = seeded(cfg, ctx)
    ident.pop("checkpoint_every", None)
    return ident


STAGE = StageSpec(
    name="distill",
    upstream="student",
    section=lambda recipe, ctx: recipe.distill,
    run=run_distill,
    summary="distil the teacher into the student",
    identity=identity,
    inputs=inputs,
)
