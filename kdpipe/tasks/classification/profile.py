"""The classification profile: onnxruntime latency of the exported models (each in its own timing process), PyTorch
eager for reference, rooflines, budgets, the mobile package and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    ExportedModel,
    ExportRecord,
    MobileInfo,
    ProfileRecord,
    RunContext,
    StageOutput,
    record,
)
from kdpipe.config import TargetProfile
from kdpipe.errors import ConfigError
from kdpipe.models.loading import load_classifier
from kdpipe.profiling.budgets import check_budgets, deployed_name
from kdpipe.profiling.timing import interleaved, latency_stats, synthetic_feed, time_runs
from kdpipe.reporting.plots import plot_latency
from kdpipe.reporting.report import write_report


def profile_torch(model_dir: Path, prof: TargetProfile, vocab_size: int) -> dict[str, Any]:
    """PyTorch eager (fp32, inference_mode) per shape, in this process: the reference onnxruntime is compared
    with. onnxruntime never runs in this process (its workers do), so its threads cannot distort this."""
    import torch

    torch.set_num_threads(prof.intra_op_threads)
    model = load_classifier(model_dir).eval()
    shapes = {}
    for shape in prof.shapes:
        feed = synthetic_feed(shape.batch, shape.seq, vocab_size, ["input_ids", "attention_mask"])
        batch = {k: torch.from_numpy(v) for k, v in feed.items()}

        def step(batch: dict[str, Any] = batch) -> None:
            with torch.inference_mode():
                model(**batch)

        times = time_runs(step, prof.warmup, prof.min_runs, prof.min_seconds)
        shapes[f"{shape.batch}x{shape.seq}"] = latency_stats(times, shape.batch)
    return {"shapes": shapes, "threads": torch.get_num_threads()}


def model_source(export: Manifest, info: ExportedModel) -> Path:
    """The PyTorch model an ONNX file was exported from, found through the run's lineage (relative
    paths), so a moved or copied run profiles its own models."""
    return export.upstream(info.source.stage).directory(info.source.dir)


def run_profile(
    prof: TargetProfile, upstream: Manifest, work: Path, ctx: RunContext, providers: list[str], missing: list[str]
) -> StageOutput:
    """Time the exported models on `providers` (the profile's, less the `missing` ones it allows to fall back)."""
    label = f"{prof.name} (emulated on this host)" if prof.emulated else prof.name
    if missing:
        ctx.console.print(
            f"[yellow]warning:[/] {', '.join(missing)} not available here; timing on {', '.join(providers)} "
            "(allow_fallback)"
        )
    export = record(upstream, ExportRecord)
    models = _timed_models(prof, export)
    results: dict[str, Any] = {
        "profile": prof.model_dump(mode="json"),
        "providers": {"requested": prof.execution_providers, "missing": missing, "used": providers},
        "onnxruntime": {},
        "torch_eager": {},
    }
    vocab = {n: _vocab_size(model_source(upstream, m)) for n, m in models.items()}
    paths = {n: upstream.path(m.onnx) for n, m in models.items()}
    sizes = {n: path.stat().st_size for n, path in paths.items()}
    jobs = {n: _job(paths[n], prof, vocab[n], providers) for n in models}
    ctx.console.print(
        f"profiling {', '.join(jobs)} on {label}: onnxruntime, each in its own process, {prof.rounds} "
        "interleaved round(s) ..."
    )
    results["onnxruntime"] = interleaved(jobs, prof.rounds)
    for name, m in models.items():
        results["onnxruntime"][name]["model_bytes"] = sizes[name]
        if prof.torch_eager and m.variant == "fp32":  # a variant's PyTorch model is the fp32 student
            ctx.console.print(f"profiling {name} on {label}: torch eager ...")
            results["torch_eager"][name] = profile_torch(model_source(upstream, m), prof, vocab[name])
    fp32 = {n: upstream.path(export.models[m.of].onnx) for n, m in models.items() if m.of in export.models}
    results["roofline"] = _rooflines(prof, paths, fp32, results, ctx)
    t_acc = float(upstream.upstream("teacher").metric("test_accuracy"))
    checks = check_budgets(prof, results, export, sizes, t_acc)
    (work / "latency.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plot_latency(results, work / "latency.png")
    mobile = _mobile(paths[deployed_name(prof)], work, ctx) if prof.ort_format else None
    rec = ProfileRecord(
        report="report.md", profile=prof.name, deploy=deployed_name(prof), budgets=checks, mobile=mobile
    )
    report = write_report(upstream, results, rec, work)
    ctx.console.print(report.summary)
    return StageOutput(record=rec, metrics=_metrics(results, deployed_name(prof)))


def _cost(path: Path, fp32: Path | None, batch: int, seq: int) -> tuple[Any, bool]:
    """The graph's cost; when shapes inside a quantised graph cannot be inferred (QEmbedLayerNormalization
    defeats onnx's shape inference), the FLOPs of the fp32 graph it was made from, counted as integer work
    (quantisation changes the kernels, not the FLOPs) with the variant's own weight bytes. Returns (cost, borrowed)."""
    from dataclasses import replace

    from kdpipe.profiling.roofline import onnx_cost

    cost = onnx_cost(path, batch, seq)
    if not cost.unknown_ops or fp32 is None:
        return cost, False
    base = onnx_cost(fp32, batch, seq)
    int_flops = base.flops if cost.int_flops else 0
    return replace(
        base, int_flops=int_flops, weight_bytes=cost.weight_bytes, weight_bytes_by_dtype=cost.weight_bytes_by_dtype
    ), True


def _rooflines(
    prof: TargetProfile, paths: dict[str, Path], fp32: dict[str, Path], results: dict[str, Any], ctx: RunContext
) -> dict[str, Any]:
    """FLOPs and weight bytes of each timed graph per shape, this host's peak GEMM throughput measured with
    onnxruntime at the profile's threads (fp32 and int8), and each p50 as a share of its roofline floor. A
    profile that describes another device (`device:`) also gets latency ESTIMATES for it from the same costs."""
    from kdpipe.profiling.roofline import estimate_latency_ms, peak_gemm, roofline

    threads = prof.intra_op_threads
    ctx.console.print(f"roofline: peak GEMM on this host ({threads} thread(s), onnxruntime) ...")
    host = {
        "threads": threads,
        "peak_gflops_fp32": peak_gemm(threads, "fp32", seconds=prof.gemm_seconds),
        "peak_gflops_int8": peak_gemm(threads, "int8", seconds=prof.gemm_seconds),
    }
    out: dict[str, Any] = {"host": host, "models": {}, "estimates": None}
    device = prof.device
    if device is not None:
        out["estimates"] = {"device": device.name, "models": {}}
    for name, path in paths.items():
        out["models"][name] = {}
        for key, stats in results["onnxruntime"][name]["shapes"].items():
            batch, seq = (int(x) for x in key.split("x"))
            cost, borrowed = _cost(path, fp32.get(name), batch, seq)
            roof = roofline(cost, stats["p50_ms"], host["peak_gflops_fp32"], host["peak_gflops_int8"])
            out["models"][name][key] = {**roof, "flops_from_fp32_graph": borrowed}
            if device is not None:
                est = estimate_latency_ms(cost, device.peak_gflops_fp32, device.peak_gflops_int8, device.mem_gbps)
                out["estimates"]["models"].setdefault(name, {})[key] = est
    return out


def _mobile(onnx_path: Path, work: Path, ctx: RunContext) -> MobileInfo:
    """The deployed variant converted to ORT format (+ required_operators.config for a reduced-operator build),
    checked against the .onnx at two shapes, and onnxruntime's mobile usability findings."""
    from kdpipe.profiling.mobile import to_ort_format, usability

    pkg = to_ort_format(onnx_path, work / "mobile")
    findings = usability(onnx_path)
    ctx.console.print(f"mobile: {pkg.ort.name} {pkg.bytes / 2**20:.1f} MiB; {findings[0] if findings else ''}")
    return MobileInfo(
        ort="mobile/model.ort",
        required_operators="mobile/required_operators.config",
        bytes=pkg.bytes,
        contrib_ops=sorted(pkg.contrib_ops),
        findings=findings,
    )


def _timed_models(prof: TargetProfile, export: ExportRecord) -> dict[str, ExportedModel]:
    """The teacher and the student variants the profile times; a variant the export did not write is an error."""
    students = {m.variant: n for n, m in export.models.items() if n.startswith("student")}
    if missing := [v for v in prof.variants if v not in students]:
        raise ConfigError(
            f"profile {prof.name}: times variants {missing}, which the export stage did not write "
            f"(it wrote {sorted(students)})",
            "re-run the export with them in export.variants, or use a profile for what was exported",
        )
    names = [students[v] for v in prof.variants] + [n for n in export.models if not n.startswith("student")]
    return {n: export.models[n] for n in names}


def _job(path: Path, prof: TargetProfile, vocab_size: int, providers: list[str]) -> dict[str, Any]:
    """The timing worker's job (kdpipe.profiling.timing) for one ONNX file under this profile."""
    return {
        "model": str(path),
        "engine": "onnxruntime",
        "intra_op_threads": prof.intra_op_threads,
        "inter_op_threads": prof.inter_op_threads,
        "graph_optimization_level": prof.graph_optimization_level,
        "providers": providers,
        "shapes": [[s.batch, s.seq] for s in prof.shapes],
        "vocab_size": vocab_size,
        "warmup": prof.warmup,
        "min_runs": prof.min_runs,
        "min_seconds": prof.min_seconds,
        "profile_ops": prof.profile_ops,
    }


def _vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def _metrics(results: dict[str, Any], deployed: str = "student") -> dict[str, Metric]:
    """Student (and teacher) onnxruntime p50 per shape, and the speed-up: of the fp32 student when it was timed,
    else of the deployed variant (a profile may time that alone, as `kdpipe search` does)."""
    metrics: dict[str, Metric] = {}
    ort_res = results["onnxruntime"]
    name = "student" if "student" in ort_res else deployed
    for shape in ort_res.get(name, {}).get("shapes", {}):
        s = ort_res[name]["shapes"][shape]["p50_ms"]
        metrics[f"student_p50_ms_{shape}"] = Metric(round(s, 3), "ms")
        if "teacher" in ort_res:
            t = ort_res["teacher"]["shapes"][shape]["p50_ms"]
            metrics[f"teacher_p50_ms_{shape}"] = Metric(round(t, 3), "ms")
            metrics[f"speedup_{shape}"] = Metric(round(t / s, 3), "x (teacher p50 / student p50)")
    return metrics
