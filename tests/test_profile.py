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
    from kdpipe.profiling.timing import latency_stats

    st = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010], batch=4)
    assert st["runs"] == 5 and st["p50_ms"] == pytest.approx(3.0) and st["mean_ms"] == pytest.approx(4.0)
    assert st["p99_ms"] == pytest.approx(9.76) and st["throughput_per_s"] == pytest.approx(4 / 0.003)
    assert st["cov"] == pytest.approx(st["std_ms"] / 4.0) and st["std_ms"] > 0


def test_missing_provider_is_refused_without_fallback() -> None:
    from kdpipe.config import TargetProfile
    from kdpipe.errors import ConfigError
    from kdpipe.pipeline.profile import resolve_providers

    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        resolve_providers(TargetProfile(name="gpu", execution_providers=asked))
    use, missing = resolve_providers(TargetProfile(name="gpu", execution_providers=asked, allow_fallback=True))
    assert use == ["CPUExecutionProvider"] and missing == ["CUDAExecutionProvider"]


# ----------------------------------------------------------------------------- budgets, report.json, compare
def _profile_copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    recipe, runs = finished
    run = tmp_path / "run"
    shutil.copytree(runs, run)
    return recipe, run


def _tiny_profile(path: Path, **over: object) -> Path:
    doc = {
        "kind": "profile",
        "name": "t",
        "description": "test.",
        "intra_op_threads": 1,
        "shapes": [{"batch": 1, "seq": 16}],
        "warmup": 1,
        "min_runs": 3,
        "min_seconds": 0.0,
        "torch_eager": False,
        "rounds": 1,
        "gemm_seconds": 0.2,
        **over,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_missed_budget_fails_only_with_strict(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _profile_copy(finished, tmp_path)
    tight = _tiny_profile(tmp_path / "tight.yaml", budgets={"model_mib": 0.001, "retention": 0.5})
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", tight)
    assert code == 0 and "budget missed: model size" in out, out  # flagged, not failed
    report = (run / "profile" / "report.md").read_text()
    assert "**MISSED**" in report and "1 budget(s) missed" in report
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", tight, "--strict")
    assert_one_line_error(code, out, "1 budget(s) of profile t missed by student-int8-dynamic (--strict)")
    assert (run / "profile" / "report.md").is_file()  # the report is kept for CI either way
    loose = _tiny_profile(tmp_path / "loose.yaml", budgets={"model_mib": 100, "p50_ms": 1000, "accuracy": 0.5})
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", loose, "--strict")
    assert code == 0, out
    assert "Every budget is met." in (run / "profile" / "report.md").read_text()


def test_a_nan_figure_never_meets_a_budget() -> None:
    from kdpipe.profiling.budgets import _check

    for value in (float("nan"), float("inf"), None):
        check = _check("p50", 5.0, value, "ms", at_most=True)
        assert check is not None and not check.ok
    assert _check("p50", 5.0, 4.9, "ms", at_most=True).ok  # type: ignore[union-attr]
    assert not _check("accuracy", 0.9, 0.89, "fraction", at_most=False).ok  # type: ignore[union-attr]


def test_report_json_is_the_source_of_the_figures(finished) -> None:  # type: ignore[no-untyped-def]
    import json

    _, runs = finished
    data = json.loads((runs / "profile" / "report.json").read_text())
    assert {"student", "student-optimized", "student-int8-dynamic", "teacher", "teacher-eager"} <= set(data["models"])
    int8 = data["models"]["student-int8-dynamic"]
    assert int8["accuracy"] > 0.5 and int8["bytes"] > 0 and int8["latency"]["1x16"]["p50_ms"] > 0
    assert int8["peak_rss_mib"] > int8["model_rss_mib"] > 0 and int8["top_ops"]
    roof = int8["roofline"]["1x16"]
    assert roof["flops"] > 0 and 0 < roof["percent_of_roofline"] < 100 and roof["int_flops"] > 0
    assert data["host_peaks"]["peak_gflops_fp32"] > 0 and data["deploy"] == "student-int8-dynamic"
    assert (runs / "profile" / "pareto.png").stat().st_size > 10_000
    report = (runs / "profile" / "report.md").read_text()
    assert "![accuracy vs latency and size](pareto.png)" in report and "% of roofline" in report


def test_compare_names_what_regressed() -> None:
    from kdpipe.profiling.compare import regressions

    def figs(p50: float, size: int, acc: float) -> dict:  # type: ignore[type-arg]
        return {"models": {"student": {"latency": {"1x128": {"p50_ms": p50}}, "bytes": size, "accuracy": acc}}}

    assert regressions(figs(10.0, 1000, 0.80), figs(10.5, 1000, 0.799)) == []  # inside the noise
    found = regressions(figs(10.0, 1000, 0.80), figs(12.0, 2000, 0.70))
    assert len(found) == 3 and "student 1x128: p50 10.00 -> 12.00 ms (+20%)" in found
    assert regressions(figs(10.0, 1000, 0.80), figs(float("nan"), 1000, 0.8))  # NaN is a regression


def test_a_variant_the_export_did_not_write_is_a_clear_error(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _profile_copy(finished, tmp_path)
    p = _tiny_profile(tmp_path / "fp16.yaml", variants=["fp32", "fp16"], deploy="fp16")
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", p)
    assert_one_line_error(code, out, "times variants ['fp16']", "did not write")


def test_mobile_profile_writes_the_ort_model_and_usability_findings(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _profile_copy(finished, tmp_path)
    p = _tiny_profile(
        tmp_path / "mobile.yaml",
        emulated=True,
        ort_format=True,
        variants=["fp32", "int8-dynamic"],
        device={"name": "a phone core, nominal", "peak_gflops_fp32": 45, "peak_gflops_int8": 180, "mem_gbps": 20},
    )
    code, out = invoke("profile", "-r", recipe, "-o", run, "--profile", p)
    assert code == 0, out
    assert (run / "profile" / "mobile" / "model.ort").is_file()
    assert "MatMulInteger" in (run / "profile" / "mobile" / "required_operators.config").read_text()
    report = (run / "profile" / "report.md").read_text()
    assert "> **Mobile usability:** Recommendation:" in report and "(emulated on this host)" in report
    assert "**Estimates for a phone core, nominal**" in report and "NOT measurements" in report
