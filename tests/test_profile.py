"""The profile stage: providers, fallback, latency statistics."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, invoke, write_profile


def test_unavailable_provider_fails_unless_fallback_is_allowed(
    finished: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    recipe, runs = finished
    run = tmp_path / "run"
    shutil.copytree(runs, run)
    cuda = write_profile(tmp_path / "cuda.yaml", execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", cuda, "--force")
    assert_one_line_error(code, out, "CUDAExecutionProvider", "not available", "allow_fallback")
    fallback = write_profile(
        tmp_path / "fb.yaml",
        execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        allow_fallback=True,
        warmup=0,
        min_runs=2,
        min_seconds=0.0,
        torch_eager=False,
    )
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", fallback, "--force")
    assert code == 0, out
    assert "EP Error" not in out and "Falling back" not in out, out  # onnxruntime's banner is silenced
    latency = yaml.safe_load((run / "profile" / "latency.json").read_text())
    assert latency["providers"]["missing"] == ["CUDAExecutionProvider"]
    assert latency["onnxruntime"]["student"]["providers"] == ["CPUExecutionProvider"]
    report = (run / "profile" / "report.md").read_text()
    assert "CUDAExecutionProvider is not available here" in report and "allow_fallback" in report


def test_latency_statistics_are_what_they_say() -> None:
    from kdpipe.profile import latency_stats

    st = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010], batch=4)
    assert st["runs"] == 5 and st["p50_ms"] == pytest.approx(3.0) and st["mean_ms"] == pytest.approx(4.0)
    assert st["p99_ms"] == pytest.approx(9.76) and st["throughput_per_s"] == pytest.approx(4 / 0.003)
    assert st["cov"] == pytest.approx(st["std_ms"] / 4.0) and st["std_ms"] > 0


def test_missing_provider_is_refused_without_fallback() -> None:
    from kdpipe.config import TargetProfile
    from kdpipe.errors import ConfigError
    from kdpipe.profile import resolve_providers

    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        resolve_providers(TargetProfile(name="gpu", execution_providers=asked))
    use, missing = resolve_providers(TargetProfile(name="gpu", execution_providers=asked, allow_fallback=True))
    assert use == ["CPUExecutionProvider"] and missing == ["CUDAExecutionProvider"]
