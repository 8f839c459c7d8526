"""kdpipe.profiling.timing: one fresh worker process per model variant, interleaved rounds, pooled statistics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import make_model_dir

from kdpipe.errors import ConfigError, KdpipeError, ModelError
from kdpipe.profiling import timing

SHAPES = [[1, 8], [2, 16]]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(tiny BERT classifier dir, its ONNX export, vocab size)."""
    import json

    from kdpipe.tasks.classification.export import export_onnx

    base = tmp_path_factory.mktemp("timing")
    model_dir = make_model_dir(base / "model")
    export_onnx(model_dir, base / "onnx", 18)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return model_dir, base / "onnx" / "model.onnx", vocab


def job(model: Path, vocab: int, **over: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "engine": "onnxruntime",
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        "graph_optimization_level": "all",
        "providers": ["CPUExecutionProvider"],
        "shapes": SHAPES,
        "vocab_size": vocab,
        "warmup": 1,
        "min_runs": 4,
        "min_seconds": 0.0,
        "profile_ops": False,
        **over,
    }


def test_top_operators_ranks_kernel_time_by_type() -> None:
    def node(op: str, dur: int, suffix: str = "_kernel_time") -> dict[str, Any]:
        return {"cat": "Node", "name": f"n{dur}{suffix}", "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "dur": 10_000, "args": {}},
        node("MatMul", 300),
        node("MatMul", 200),
        node("Add", 400),
        node("Gelu", 100),
        node("MatMul", 9_999, "_fence_before"),
    ]
    ops = timing.top_operators(events, k=2)
    assert [o["op"] for o in ops] == ["MatMul", "Add"]
    assert ops[0]["count"] == 2 and ops[0]["total_ms"] == pytest.approx(0.5) and ops[0]["share"] == pytest.approx(0.5)
    assert ops[1]["share"] == pytest.approx(0.4)


def test_run_job_times_the_onnx_model_in_a_fresh_process(models: tuple[Path, Path, int]) -> None:
    _, onnx, vocab = models
    res = timing.run_job(job(onnx, vocab, profile_ops=True), timeout_s=120)
    assert res["providers"] == ["CPUExecutionProvider"] and res["engine"] == "onnxruntime"
    for key in ("1x8", "2x16"):
        st = timing.latency_stats(res["times_s"][key], int(key.split("x")[0]))
        assert st["runs"] >= 4 and math.isfinite(st["p50_ms"]) and st["p50_ms"] > 0
    assert res["session_init_ms"] > 0 and res["first_run_ms"] > 0
    assert res["peak_rss_mib"] > res["rss_before_model_mib"] > 0
    ops = res["top_ops"]
    assert 0 < len(ops) <= 10
    assert sum(o["share"] for o in ops) <= 1 + 1e-9 and all(o["share"] > 0 for o in ops)
    assert any("MatMul" in o["op"] or o["op"] in ("Gemm", "Attention") for o in ops), ops


def test_run_job_times_torch_eager(models: tuple[Path, Path, int]) -> None:
    model_dir, _, vocab = models
    res = timing.run_job(job(model_dir, vocab, engine="torch", shapes=[[1, 8]], min_runs=3), timeout_s=180)
    assert res["engine"] == "torch" and res["threads"] == 1
    assert len(res["times_s"]["1x8"]) >= 3 and all(t > 0 for t in res["times_s"]["1x8"])
    assert res["session_init_ms"] > 0 and res["first_run_ms"] > 0
    assert res["peak_rss_mib"] > res["rss_before_model_mib"] > 0


def test_interleaved_rotates_fresh_processes_and_pools_the_runs(models: tuple[Path, Path, int]) -> None:
    _, onnx, vocab = models
    jobs = {"fp32": job(onnx, vocab, min_runs=6), "again": job(onnx, vocab, min_runs=6)}
    out = timing.interleaved(jobs, rounds=2, timeout_s=120)
    assert set(out) == {"fp32", "again"}
    a, b = out["fp32"]["started_at_s"], out["again"]["started_at_s"]
    assert a[0] < b[0] < b[1] < a[1]  # round 0: fp32 first; round 1: again first
    for res in out.values():
        assert res["rounds"] == 2 and res["providers"] == ["CPUExecutionProvider"]
        assert res["shapes"]["1x8"]["runs"] == 2 * 5  # ceil(6 / 2) = 3 -> the floor of 5 per round, pooled
        assert res["shapes"]["2x16"]["p50_ms"] > 0 and res["first_run_ms"] > 0
        assert res["peak_rss_mib"] > res["model_rss_mib"] > 0


def test_interleaved_order_round_jobs_and_pooling(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    per_run = {"a": 0.001, "b": 0.002, "c": 0.003}

    def fake(j: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
        calls.append((Path(j["model"]).name, j))
        t = per_run[Path(j["model"]).name] * len(calls)  # a different time per call
        return {
            "session_init_ms": float(len(calls)),
            "first_run_ms": 1.0,
            "peak_rss_mib": 100.0 + len(calls),
            "rss_before_model_mib": 50.0,
            "providers": ["CPUExecutionProvider"],
            "times_s": {"1x8": [t] * j["min_runs"], "2x16": [2 * t] * j["min_runs"]},
            "top_ops": [{"op": "MatMul", "share": 1.0}] if j["profile_ops"] else [],
        }

    monkeypatch.setattr(timing, "run_job", fake)
    jobs = {n: job(Path(n), 31, min_runs=40, min_seconds=3.0, profile_ops=True) for n in "abc"}
    out = timing.interleaved(jobs, rounds=4)
    assert [n for n, _ in calls] == list("abcbcacababc")
    assert all(j["min_runs"] == 10 and j["min_seconds"] == pytest.approx(0.75) for _, j in calls)
    assert [j["profile_ops"] for _, j in calls] == [True] * 3 + [False] * 9
    pooled = [per_run["b"] * (i + 1) for i, (n, _) in enumerate(calls) if n == "b" for _ in range(10)]
    assert out["b"]["shapes"]["1x8"] == timing.latency_stats(pooled, 1)
    assert out["b"]["shapes"]["1x8"]["runs"] == 40 and out["b"]["rounds"] == 4
    assert out["a"]["session_init_ms"] == pytest.approx((4 + 10) / 2)  # a ran as calls 1, 4, 9, 10
    assert out["a"]["peak_rss_mib"] == 110.0 and out["a"]["model_rss_mib"] == 60.0
    assert out["c"]["top_ops"] == [{"op": "MatMul", "share": 1.0}]
    with pytest.raises(ConfigError, match="rounds"):
        timing.interleaved(jobs, rounds=0)


def test_a_failing_worker_is_a_kdpipe_error_naming_the_model(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelError, match="nope.onnx"):
        timing.run_job(job(missing, 31))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="corrupt.onnx") as info:
        timing.run_job(job(corrupt, 31), timeout_s=60)
    assert "failed" in info.value.message and "Traceback" not in info.value.message
    assert isinstance(info.value, KdpipeError) and info.value.hint
    with pytest.raises(ConfigError, match="engine"):
        timing.run_job(job(corrupt, 31, engine="tensorrt"))
    with pytest.raises(ConfigError, match="graph_optimization_level"):
        timing.run_job(job(corrupt, 31, graph_optimization_level="max"))


def test_a_worker_past_its_timeout_is_killed(models: tuple[Path, Path, int]) -> None:
    _, onnx, vocab = models
    with pytest.raises(ModelError, match="past 2 s"):
        timing.run_job(job(onnx, vocab, min_seconds=120.0), timeout_s=2)
