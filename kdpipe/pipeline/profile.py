"""The profile stage: the execution providers of the target profile, then its task times the exported models
(onnxruntime, PyTorch eager for reference) and writes the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import RunContext, StageOutput, StageSpec
from kdpipe.config import TargetProfile
from kdpipe.errors import ConfigError
from kdpipe.tasks.registry import task_of


def resolve_providers(prof: TargetProfile) -> tuple[list[str], list[str]]:
    """(providers to use, requested ones this onnxruntime does not have). A missing one fails unless the
    profile allows the fallback: onnxruntime would otherwise fall back to the CPU with a banner on stdout
    and the timings would be reported as the requested device's."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in prof.execution_providers if p not in have]
    if missing and not prof.allow_fallback:
        raise ConfigError(
            f"profile {prof.name}: execution provider(s) {', '.join(missing)} not available here "
            f"(this onnxruntime has: {', '.join(have)})",
            "use a profile for this machine, or set allow_fallback: true in the profile to time on the "
            "available providers (the report then says which ran)",
        )
    use = [p for p in prof.execution_providers if p in have] or ["CPUExecutionProvider"]
    return use, missing


def run_profile(prof: TargetProfile, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    assert upstream is not None  # STAGE names an export upstream; the runner reads and verifies it
    providers, missing = resolve_providers(prof)
    return task_of(upstream).run_profile(prof, upstream, work, ctx, providers, missing)


def _identity(prof: TargetProfile, ctx: RunContext) -> dict[str, Any]:
    return {"profile": prof.model_dump(mode="json")}


STAGE = StageSpec(
    name="profile",
    upstream="export",
    section=lambda recipe, ctx: ctx.profile,
    run=run_profile,
    summary="latency (onnxruntime; PyTorch eager beside it) and the report",
    identity=_identity,
)
