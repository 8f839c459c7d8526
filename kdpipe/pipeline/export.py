"""The export stage: its task writes the ONNX models, checks their parity on real inputs and gates the student's
optimised and quantised variants (kdpipe.compress.quantize)."""

from __future__ import annotations

from pathlib import Path

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import RunContext, StageOutput, StageSpec, unseeded
from kdpipe.config import ExportConfig
from kdpipe.tasks.registry import task_of


def run_export(cfg: ExportConfig, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    assert upstream is not None  # STAGE names a distill upstream; the runner reads and verifies it
    return task_of(upstream).run_export(cfg, upstream, work, ctx)


STAGE = StageSpec(
    name="export",
    upstream="distill",
    section=lambda recipe, ctx: recipe.export,
    run=run_export,
    summary="export to ONNX and check parity",
    identity=unseeded,
)
