"""The profile stage: onnxruntime latency per target profile, PyTorch eager for reference, the report."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts import Manifest, Metric
from kdpipe.config import Shape, TargetProfile
from kdpipe.errors import ConfigError
from kdpipe.models import load_classifier
from kdpipe.plots import plot_latency
from kdpipe.records import ExportedModel, ExportRecord, ProfileRecord, RunContext, StageOutput, StageSpec, record
from kdpipe.report import write_report

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def latency_stats(times_s: list[float], batch: int) -> dict[str, float]:
    """p50/p90/p99/mean/std in ms, CoV, and throughput in samples/s from per-run wall times."""
    ms = np.asarray(times_s) * 1e3
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    return {
        "runs": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "cov": std / mean if mean else 0.0,
        "throughput_per_s": batch / (statistics.median(times_s)) if times_s else 0.0,
    }


def time_fn(fn: Callable[[], Any], warmup: int, min_runs: int, min_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def synthetic_batch(shape: Shape, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids of the given shape (latency does not depend on their values), all real tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1000 if vocab_size > 2000 else 1, vocab_size, size=(shape.batch, shape.seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


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


def profile_onnx(path: Path, prof: TargetProfile, vocab_size: int, providers: list[str]) -> dict[str, Any]:
    """onnxruntime session init and per-shape latency of one model on `providers` (resolve_providers)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # no fallback banners on stdout; what ran is recorded below
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = prof.intra_op_threads
    opts.inter_op_num_threads = prof.inter_op_threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[prof.graph_optimization_level])
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), opts, providers=providers)
    init_s = time.perf_counter() - t0
    names = [i.name for i in session.get_inputs()]
    shapes = {}
    for shape in prof.shapes:
        feed = {k: v for k, v in synthetic_batch(shape, vocab_size).items() if k in names}

        def step(feed: dict[str, np.ndarray] = feed) -> None:
            session.run(None, feed)

        times = time_fn(step, prof.warmup, prof.min_runs, prof.min_seconds)
        shapes[f"{shape.batch}x{shape.seq}"] = latency_stats(times, shape.batch)
    # asking for a provider that is not built in silently falls back to CPU: record what ran
    return {
        "session_init_ms": init_s * 1e3,
        "providers": session.get_providers(),
        "shapes": shapes,
        "model_bytes": path.stat().st_size,
    }


def profile_torch(model_dir: Path, prof: TargetProfile, vocab_size: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(prof.intra_op_threads)
    model = load_classifier(model_dir).eval()
    shapes = {}
    for shape in prof.shapes:
        batch = {k: torch.from_numpy(v) for k, v in synthetic_batch(shape, vocab_size).items() if k != "token_type_ids"}

        def step(batch: dict[str, Any] = batch) -> None:
            with torch.inference_mode():
                model(**batch)

        times = time_fn(step, prof.warmup, prof.min_runs, prof.min_seconds)
        shapes[f"{shape.batch}x{shape.seq}"] = latency_stats(times, shape.batch)
    return {"shapes": shapes, "threads": torch.get_num_threads()}


def model_source(export: Manifest, info: ExportedModel) -> Path:
    """The PyTorch model an ONNX file was exported from, found through the run's lineage (relative
    paths), so a moved or copied run profiles its own models."""
    return export.upstream(info.source.stage).path(f"{info.source.dir}/config.json").parent


def run_profile(prof: TargetProfile, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    assert upstream is not None  # STAGE names an export upstream; the runner reads and verifies it
    label = f"{prof.name} (emulated on this host)" if prof.emulated else prof.name
    providers, missing = resolve_providers(prof)
    if missing:
        ctx.console.print(
            f"[yellow]warning:[/] {', '.join(missing)} not available here; timing on {', '.join(providers)} "
            "(allow_fallback)"
        )
    results: dict[str, Any] = {
        "profile": prof.model_dump(mode="json"),
        "providers": {"requested": prof.execution_providers, "missing": missing, "used": providers},
        "onnxruntime": {},
        "torch_eager": {},
    }
    for name, info in record(upstream, ExportRecord).models.items():
        src = model_source(upstream, info)
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        ctx.console.print(f"profiling {name} on {label}: onnxruntime ...")
        results["onnxruntime"][name] = profile_onnx(upstream.path(info.onnx), prof, vocab, providers)
        if prof.torch_eager and info.variant == "fp32":  # a variant's PyTorch model is the fp32 student
            ctx.console.print(f"profiling {name} on {label}: torch eager ...")
            results["torch_eager"][name] = profile_torch(src, prof, vocab)
    (work / "latency.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plot_latency(results, work / "latency.png")
    report = write_report(upstream, results, work)
    ctx.console.print(report.summary)
    return StageOutput(record=ProfileRecord(report="report.md", profile=prof.name), metrics=_metrics(results))


def _metrics(results: dict[str, Any]) -> dict[str, Metric]:
    """Student (and teacher) onnxruntime p50 per shape, and the speed-up."""
    metrics: dict[str, Metric] = {}
    ort_res = results["onnxruntime"]
    for shape in ort_res["student"]["shapes"]:
        s = ort_res["student"]["shapes"][shape]["p50_ms"]
        metrics[f"student_p50_ms_{shape}"] = Metric(round(s, 3), "ms")
        if "teacher" in ort_res:
            t = ort_res["teacher"]["shapes"][shape]["p50_ms"]
            metrics[f"teacher_p50_ms_{shape}"] = Metric(round(t, 3), "ms")
            metrics[f"speedup_{shape}"] = Metric(round(t / s, 3), "x (teacher p50 / student p50)")
    return metrics


def _identity(prof: TargetProfile, ctx: RunContext) -> dict[str, Any]:
    return {"profile": prof.model_dump(mode="json")}


STAGE = StageSpec(
    name="profile",
    upstream="export",
    section=lambda recipe, ctx: ctx.profile,
    run=run_profile,
    summary="onnxruntime latency and the report",
    identity=_identity,
)
