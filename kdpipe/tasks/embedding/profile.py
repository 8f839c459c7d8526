"""The embedding task's profile stage: onnxruntime latency of the teacher and the student's exported graphs (fp32
and the variants the profile lists that passed their gate), each in fresh processes (kdpipe.profiling.timing,
interleaved over the profile's rounds), at the profile's shapes plus batch 32 at its first length (sentences/s); the
profile's budgets (kdpipe.profiling.budgets: `accuracy` and `retention` read the Lee Spearman of the deployed
variant's gate); and report.md with the quality table and the cosine-distribution figure.

PyTorch eager is not timed for embeddings (the timing worker loads a classifier head for engine torch). For every
model the tokenizer runs outside the ONNX graph and outside the timing (synthetic token ids), the transformers' and
the static student's alike (a static student's spec carries its own vocab_size for those ids).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import ExportRecord, ProfileRecord, RunContext, StageOutput, record
from kdpipe.config import TargetProfile
from kdpipe.profiling import timing
from kdpipe.profiling.budgets import check_budgets, deployed_name
from kdpipe.tasks.embedding.distill import FIGURE, RECALL_K

THROUGHPUT_BATCH = 32


def _timed(prof: TargetProfile, export: ExportRecord) -> list[str]:
    """The export record's names to time: teacher, student, and student-<variant> for the profile's variants that
    were written and passed their gate."""
    names: list[str] = [n for n in ("teacher", "student") if n in export.models]
    for variant in prof.variants:
        name = "student" if variant == "fp32" else f"student-{variant}"
        m = export.models.get(name)
        if name not in names and m is not None and (m.gate is None or m.gate.ok):
            names.append(name)
    return names


def throughput_shape(prof: TargetProfile) -> list[int]:
    """Batch 32 at the profile's first sequence length: what sentences/s is measured at."""
    return [THROUGHPUT_BATCH, prof.shapes[0].seq]


def _shapes(prof: TargetProfile) -> list[list[int]]:
    shapes = [[s.batch, s.seq] for s in prof.shapes]
    extra = throughput_shape(prof)
    return shapes if extra in shapes else [*shapes, extra]


def _jobs(
    prof: TargetProfile, upstream: Manifest, names: list[str], providers: list[str], vocab: int
) -> dict[str, Any]:
    export = record(upstream, ExportRecord)
    return {
        name: {
            "model": str(upstream.path(export.models[name].onnx)), "engine": "onnxruntime",
            "intra_op_threads": prof.intra_op_threads, "inter_op_threads": prof.inter_op_threads,
            "graph_optimization_level": prof.graph_optimization_level, "providers": providers,
            "shapes": _shapes(prof), "vocab_size": int(export.models[name].spec.get("vocab_size", vocab)),
            "warmup": prof.warmup, "min_runs": prof.min_runs,
            "min_seconds": prof.min_seconds, "profile_ops": False,
        }
        for name in names
    }  # fmt: skip


def _vocab(upstream: Manifest) -> int:
    teacher = upstream.upstream("teacher")
    config = json.loads(teacher.path("model/config.json").read_text(encoding="utf-8"))
    return int(config["vocab_size"])


def run_profile(
    prof: TargetProfile, upstream: Manifest, work: Path, ctx: RunContext, providers: list[str], missing: list[str]
) -> StageOutput:
    export = record(upstream, ExportRecord)
    names = _timed(prof, export)
    ctx.console.print(f"profiling (embedding) {', '.join(names)} at {_shapes(prof)} on {prof.name} ...")
    results = timing.interleaved(_jobs(prof, upstream, names, providers, _vocab(upstream)), prof.rounds)
    sizes = {n: upstream.path(export.models[n].onnx).stat().st_size for n in names}
    t_spearman = upstream.upstream("teacher").metric("lee_spearman")
    budgets = check_budgets(prof, {"onnxruntime": results}, export, sizes, t_spearman or 0.0, metric="Lee Spearman")
    doc = {"profile": prof.name, "providers": providers, "missing_providers": missing, "onnxruntime": results,
           "sizes": sizes, "cpu": cpu_model()}  # fmt: skip
    (work / "latency.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    distill = upstream.upstream("distill")
    if distill.has(FIGURE):
        shutil.copyfile(distill.path(FIGURE), work / FIGURE)
    lines = report_lines(upstream, prof, results, sizes, budgets, missing, (work / FIGURE).is_file())
    (work / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = _metrics(results, names, timing.shape_key(throughput_shape(prof)))
    for check in budgets:
        ctx.console.print(f"budget {check.budget}: {check.value} vs {check.limit} {check.unit}: "
                          f"{'ok' if check.ok else 'MISSED'}")  # fmt: skip
    rec = ProfileRecord(report="report.md", profile=prof.name, deploy=deployed_name(prof), budgets=budgets)
    return StageOutput(record=rec, metrics=metrics)


def _metrics(results: dict[str, Any], names: list[str], key: str) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}
    for name in names:
        for shape, stats in results[name]["shapes"].items():
            metrics[f"{name}_p50_ms_{shape}"] = Metric(round(stats["p50_ms"], 3), "ms")
        metrics[f"{name}_sentences_per_s_{key}"] = Metric(round(results[name]["shapes"][key]["throughput_per_s"], 1),
                                                          "sentences/s")  # fmt: skip
    return metrics


def cpu_model() -> dict[str, Any]:
    """The CPU's model name and the SIMD flags that matter for int8 (avx2, avx512_vnni, amx)."""
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return {"model": name, "flags": [f for f in wanted if f in flags]}


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "n/a"


def _quality_rows(upstream: Manifest, sizes: dict[str, int]) -> list[str]:
    teacher, distill, export = (
        upstream.upstream("teacher"),
        upstream.upstream("distill"),
        record(upstream, ExportRecord),
    )
    student = upstream.upstream("student")
    retention = distill.metric("retention")
    kept = "undefined" if retention is None else f"{retention:.2f}%"
    rows = [
        "| model | layers | params | Lee Spearman | Lee Pearson | retention | mean cosine | recall@10 | ONNX MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {teacher.metric('layers')} | {teacher.metric('params')} | {_fmt(teacher.metric('lee_spearman'))} "
        f"| {_fmt(teacher.metric('lee_pearson'))} | 100% | 1 | 1 | {_mib(sizes.get('teacher'))} |",
        f"| student | {student.metric('layers')} | {student.metric('params')} "
        f"| {_fmt(distill.metric('lee_spearman'))} | {_fmt(distill.metric('lee_pearson'))} | {kept} "
        f"| {_fmt(distill.metric('mean_cosine'))} | {_fmt(distill.metric(f'recall_at_{RECALL_K}'))} "
        f"| {_mib(sizes.get('student'))} |",
    ]
    for name, m in export.models.items():
        if m.gate is None:
            continue
        status = "" if m.gate.ok else " (missed its gate, removed)"
        rows.append(f"| {name}{status} | | | {_fmt(m.gate.value)} | | {_ratio(m.gate.value, teacher)} | "
                    f"{_fmt(m.gate.agreement, 5)} (min, vs fp32) | | {_mib(sizes.get(name))} |")  # fmt: skip
    return rows


def _ratio(value: float, teacher: Manifest) -> str:
    t = teacher.metric("lee_spearman")
    if not isinstance(t, int | float) or not math.isfinite(t) or t == 0 or not math.isfinite(value):
        return "undefined"
    return f"{100 * value / t:.2f}%"


def _mib(size: int | None) -> str:
    return "" if size is None else f"{size / 2**20:.1f}"


def _latency_rows(results: dict[str, Any], key: str) -> list[str]:
    shapes = list(next(iter(results.values()))["shapes"]) if results else []
    teacher = results.get("teacher", {}).get("shapes", {})
    rows = ["| model | " + " | ".join(f"p50 ms {s} (speed-up)" for s in shapes) + f" | sentences/s at {key} |",
            "|---|" + "---:|" * (len(shapes) + 1)]  # fmt: skip
    for name, r in results.items():
        cells = []
        for s in shapes:
            p50 = r["shapes"][s]["p50_ms"]
            t50 = teacher.get(s, {}).get("p50_ms")
            cells.append(f"{p50:.2f} ({t50 / p50:.2f}x)" if t50 and p50 else f"{p50:.2f}")
        tput = r["shapes"][key]["throughput_per_s"]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {tput:.1f} |")
    return rows


def report_lines(
    upstream: Manifest, prof: TargetProfile, results: dict[str, Any], sizes: dict[str, int], budgets: list[Any],
    missing: list[str], figure: bool,
) -> list[str]:  # fmt: skip
    """report.md of an embedding run."""
    teacher = upstream.upstream("teacher")
    cpu = cpu_model()
    lines = ["# kdpipe embedding report", "", f"Teacher: {teacher.record.get('model_source')}; quality on the Lee et "
             "al. similarity set (1,225 document pairs, gensim's test data) and on the held-out sentences "
             "(mean cosine to the teacher, recall@10 of the teacher's neighbours). Retention = student / teacher Lee "
             "Spearman.", "", *_quality_rows(upstream, sizes), ""]  # fmt: skip
    if upstream.upstream("student").record.get("arch") == "static":
        lines += ["The student is static (model2vec's distillation of the teacher's tokens, student.arch: static; "
                  "static: no training in the distill stage). Its mean cosine to the teacher is n/a when its width "
                  "(PCA) differs from the teacher's: the two live in different spaces.", ""]  # fmt: skip
    if figure:
        lines += [f"![cosine distributions of similar vs dissimilar Lee pairs]({FIGURE})", ""]
    lines += [f"onnxruntime latency, profile {prof.name} ({prof.intra_op_threads} threads, {prof.rounds} rounds of "
              f"fresh processes; CPU {cpu['model']}, flags {', '.join(cpu['flags']) or 'none of avx2/avx512/amx'}); "
              "synthetic token ids, full attention mask (tokenisation is outside the graph and the timing for every "
              "model); speed-up vs the fp32 teacher:", "",
              *_latency_rows(results, timing.shape_key(throughput_shape(prof))), ""]  # fmt: skip
    if missing:
        lines += [f"Providers {', '.join(missing)} are not in this onnxruntime; timed on the available ones.", ""]
    for b in budgets:
        lines.append(f"- budget {b.budget}: {b.value} (limit {b.limit} {b.unit}): {'ok' if b.ok else 'MISSED'}")
    return lines
