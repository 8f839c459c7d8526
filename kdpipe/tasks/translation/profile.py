"""The translation profile: greedy-generation latency of every exported model in its own processes, budgets,
latency.json, report.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    ExportedModel,
    ExportRecord,
    ProfileRecord,
    RunContext,
    StageOutput,
    TeacherRecord,
    TranslationInfo,
    record,
)
from kdpipe.config import TargetProfile
from kdpipe.errors import ConfigError
from kdpipe.profiling.budgets import check_budgets, deployed_name
from kdpipe.reporting.report import deployed_machine_line
from kdpipe.tasks.translation.common import read_splits
from kdpipe.tasks.translation.export import INT8, VARIANT_DIRS, onnx_bytes

PROFILE_SENTENCES = 8  # real test sentences each timed run cycles through
BLEU_METRIC = "test BLEU / 100"  # Budgets.accuracy / retention read translation's BLEU as a fraction


def timed_models(prof: TargetProfile, export: ExportRecord, ctx: RunContext) -> dict[str, ExportedModel]:
    """The student variants the profile times that translation writes (fp32, int8-dynamic), and the teacher. A
    variant translation never writes (optimized, int4, ...) is skipped with a note; one it could have written but the
    export did not, or a deployed one it cannot write, is an error (as for classification)."""
    students = {m.variant: n for n, m in export.models.items() if n.startswith("student")}
    if prof.deploy not in VARIANT_DIRS:
        raise ConfigError(
            f"profile {prof.name}: deploys {prof.deploy}, which translation does not export "
            f"(it writes {', '.join(VARIANT_DIRS)})",
            f"use a profile with deploy: {INT8} or fp32 for translation",
        )
    wanted = [v for v in prof.variants if v in VARIANT_DIRS]
    if skipped := [v for v in prof.variants if v not in VARIANT_DIRS]:
        ctx.console.print(f"translation: profile variants {skipped} skipped (translation writes fp32 and {INT8})")
    if missing := [v for v in wanted if v not in students]:
        raise ConfigError(
            f"profile {prof.name}: times variants {missing}, which the export stage did not write "
            f"(it wrote {sorted(students)})",
            f"re-run the export with {INT8} in export.variants (kdpipe export --force for an export made before "
            "translation had variants), or use a profile for what was exported",
        )
    names = [students[v] for v in wanted] + [n for n in export.models if not n.startswith("student")]
    return {n: export.models[n] for n in names}


def _generation_job(model: Path, engine: str, prof: TargetProfile, sentences: list[str], providers: list[str],
                    max_new_tokens: int) -> dict[str, Any]:  # fmt: skip
    """kdpipe.profiling.generation's job for one model directory under this profile."""
    return {
        "model": str(model), "engine": engine, "sentences": sentences, "max_new_tokens": max_new_tokens,
        "intra_op_threads": prof.intra_op_threads, "inter_op_threads": prof.inter_op_threads,
        "graph_optimization_level": prof.graph_optimization_level, "providers": providers, "warmup": prof.warmup,
        "min_runs": prof.min_runs, "min_seconds": prof.min_seconds,
    }  # fmt: skip


def _time_models(
    prof: TargetProfile, upstream: Manifest, models: dict[str, ExportedModel], sentences: list[str],
    providers: list[str], max_new_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """onnxruntime (every timed model) and PyTorch eager (the fp32 ones), each model in its own processes, rounds
    interleaved (kdpipe.profiling.generation)."""
    from kdpipe.profiling.generation import interleaved_generation

    dirs = {n: upstream.directory(Path(m.onnx).parent.as_posix()) for n, m in models.items()}
    jobs = {n: _generation_job(d, "onnxruntime", prof, sentences, providers, max_new_tokens) for n, d in dirs.items()}
    onnx = interleaved_generation(jobs, prof.rounds)
    for name, d in dirs.items():
        onnx[name]["model_bytes"] = onnx_bytes(d)
    eager: dict[str, Any] = {}
    if prof.torch_eager:
        fp32 = {n: upstream.upstream(m.source.stage).directory(m.source.dir) for n, m in models.items()
                if m.variant == "fp32"}  # fmt: skip
        jobs = {n: _generation_job(d, "torch", prof, sentences, providers, max_new_tokens) for n, d in fp32.items()}
        eager = interleaved_generation(jobs, prof.rounds)
    return {"onnxruntime": onnx, "torch_eager": eager}


def run_profile(
    prof: TargetProfile, upstream: Manifest, work: Path, ctx: RunContext, providers: list[str], missing: list[str]
) -> StageOutput:
    """Greedy-generation latency of the teacher and the student variants (each in its own processes), the profile's
    budgets on the deployed variant (BLEU / 100 for accuracy and retention, latency of one greedy translation),
    latency.json, report.json (kdpipe.reporting.figures) and report.md."""
    from kdpipe.profiling.generation import KEY
    from kdpipe.reporting.figures import Run, figures

    export = record(upstream, ExportRecord)
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(TranslationInfo)
    assert info is not None
    if missing:
        ctx.console.print(f"[yellow]warning:[/] {', '.join(missing)} not available here; timing on "
                          f"{', '.join(providers)} (allow_fallback)")  # fmt: skip
    models = timed_models(prof, export, ctx)
    sentences = [s for s, _ in read_splits(t_manifest).test[:PROFILE_SENTENCES]]
    ctx.console.print(f"profiling greedy generation of {len(sentences)} real test sentences on {prof.name}: "
                      f"{', '.join(models)}, each in its own process, {prof.rounds} round(s) ...")  # fmt: skip
    results: dict[str, Any] = {
        "profile": prof.model_dump(mode="json"), "sentences": len(sentences), "max_new_tokens": info.max_new_tokens,
        "providers": {"requested": prof.execution_providers, "missing": missing, "used": providers},
        **_time_models(prof, upstream, models, sentences, providers, info.max_new_tokens),
    }  # fmt: skip
    sizes = {n: int(r["model_bytes"]) for n, r in results["onnxruntime"].items()}
    t_bleu = float(t_manifest.metric("test_bleu"))
    checks = check_budgets(prof, results, export, sizes, t_bleu / 100, metric=BLEU_METRIC, latency_key=KEY)
    rec = ProfileRecord(report="report.md", profile=prof.name, deploy=deployed_name(prof), budgets=checks)
    (work / "latency.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    report = figures(Run.of(upstream), results, rec, quality="test_bleu", scale=0.01)
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (work / "report.md").write_text("\n".join(report_lines(upstream, results, rec)) + "\n")
    ctx.console.print(
        " ".join(f"{n}: {s['shapes'][KEY]['p50_ms']:.1f} ms p50" for n, s in results["onnxruntime"].items())
    )
    return StageOutput(record=rec, metrics=_profile_metrics(results))


def _profile_metrics(results: dict[str, Any]) -> dict[str, Metric]:
    from kdpipe.profiling.generation import KEY

    metrics = {}
    for engine, key in (("onnxruntime", ""), ("torch_eager", "torch_")):
        for name, stats in results[engine].items():
            metrics[f"{name}_{key}p50_ms_generate"] = Metric(round(stats["shapes"][KEY]["p50_ms"], 3), "ms")
    ort_res = results["onnxruntime"]
    if "teacher" in ort_res and "student" in ort_res:
        speedup = ort_res["teacher"]["shapes"][KEY]["p50_ms"] / ort_res["student"]["shapes"][KEY]["p50_ms"]
        metrics["speedup_generate"] = Metric(round(speedup, 3), "x (teacher p50 / student p50)")
    return metrics


def report_lines(export: Manifest, results: dict[str, Any], rec: ProfileRecord) -> list[str]:
    """The Markdown report of a translation run: BLEU, size, parity and gates, generation latency, budgets."""
    from kdpipe.profiling.generation import KEY

    distill, teacher = export.upstream("distill"), export.upstream("teacher")
    student = export.upstream("student")
    models = record(export, ExportRecord).models
    lines = [
        "# kdpipe translation report",
        "",
        "| model | layers | params | test BLEU |",
        "|---|---|---|---|",
        f"| teacher | {teacher.metric('layers')} | {teacher.metric('params')} | {teacher.metric('test_bleu')} |",
        f"| student, KD | {student.metric('layers')} | {student.metric('params')} | {distill.metric('test_bleu')} |",
    ]
    if distill.metric("baseline_test_bleu") is not None:
        lines.append(f"| student, plain CE | {student.metric('layers')} | {student.metric('params')} | "
                     f"{distill.metric('baseline_test_bleu')} |")  # fmt: skip
    retention = distill.metric("retention")
    kept = "n/a (the teacher's BLEU is 0)" if retention is None else f"{retention}% of the teacher's BLEU"
    lines += ["", f"Retention: {kept} (greedy decoding, sacreBLEU on the test split).", ""]
    for name, m in models.items():
        lines.append(_model_line(name, m))
    lines += ["", f"Greedy generation, one sentence per run ({results['sentences']} real test sentences, "
              f"at most {results['max_new_tokens']} new tokens), profile {results['profile']['name']}, each model "
              "in its own processes:", "",
              "| model | engine | p50 ms | p90 ms | p99 ms | mean output tokens | peak RSS MiB |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for engine in ("onnxruntime", "torch_eager"):
        for name, r in results[engine].items():
            s = r["shapes"][KEY]
            lines.append(f"| {name} | {engine} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | "
                         f"{r['mean_tokens']:.1f} | {r['peak_rss_mib']:.0f} |")  # fmt: skip
    lines += ["", deployed_machine_line(export, rec.deploy)]
    lines += ["", f"Budgets of {rec.deploy}:" if rec.budgets else "No budgets in this profile."]
    for b in rec.budgets:
        value = "missing" if b.value is None else f"{b.value:.4g}"
        lines.append(f"- {b.budget}: {value} vs {b.limit:g} {b.unit}: {'ok' if b.ok else 'MISSED'}")
    return lines


def _model_line(name: str, m: ExportedModel) -> str:
    """One exported model: its parity (fp32) or its gate against the fp32 PyTorch student (a variant)."""
    graphs = "encoder + decoder + decoder with past"
    if m.of is None:
        line = (f"- ONNX {name} ({m.variant}; {graphs}): first-step max |diff| {m.parity.max_abs_diff:.2e}, identical "
                f"greedy generations {m.parity.agreement:.0%} of {m.parity.examples} test sentences, "
                f"ok: {m.parity.ok}")  # fmt: skip
    else:
        line = f"- ONNX {name} ({m.variant} of {m.of}; {graphs})"
    g = m.gate
    if g is not None:
        line += (
            f"; gate on {g.examples} test sentences: BLEU {100 * g.value:.2f} (needs {100 * g.budget:.2f}), "
            f"identical generations {g.agreement:.0%}, first-step max |diff| {g.max_abs_diff:.2e}, ok: {g.ok}"
        )
    return line
