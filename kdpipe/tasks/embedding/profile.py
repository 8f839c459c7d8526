"""The embedding task's profile stage: latency of the teacher and the student in PyTorch eager and of their exported
graphs in onnxruntime (fp32 and the variants the profile lists that passed their gate), each in fresh processes
(kdpipe.profiling.timing, interleaved over the profile's rounds), at the profile's shapes plus batch 32 at its first
length (sentences/s); the profile's budgets (kdpipe.profiling.budgets: `accuracy` and `retention` read the Lee Spearman
of the deployed variant's gate); report.json (kdpipe.reporting.figures: what `kdpipe profile --compare` reads) and
report.md with the quality table, the cosine-distribution figure and the distill stage's CKA figure when it has one.

Every model is timed on REAL inputs: the held-out sentences of the teacher stage, tokenised outside the graph and
outside the timing by the model's own tokenizer (the teacher's for the teacher, the student folder's for the student
and its variants, model2vec's for a static student), padded (or truncated) to each shape's length with their real
attention mask, written as one .npz per tokenizer under `inputs/` (synthetic full-mask ids overstated onnxruntime's
latency by 20-30%). PyTorch eager (profile `torch_eager`) times the sentence-transformers folder each ONNX graph was
exported from, as one SentenceEncoder with eager attention (kdpipe.tasks.embedding.timing_loader); a static student has
no PyTorch model and is timed in onnxruntime only. A model whose output is not finite is an error, never a latency.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    EmbeddingInfo,
    ExportedModel,
    ExportRecord,
    ProfileRecord,
    RunContext,
    StageOutput,
    TeacherRecord,
    record,
)
from kdpipe.config import TargetProfile
from kdpipe.env import cpu_model
from kdpipe.errors import DataError
from kdpipe.profiling import timing
from kdpipe.profiling.budgets import check_budgets, deployed_name
from kdpipe.reporting.report import deployed_machine_line, leakage_lines
from kdpipe.tasks.embedding import data
from kdpipe.tasks.embedding.distill import FIGURE, RECALL_K
from kdpipe.tasks.embedding.timing_loader import LOADER

THROUGHPUT_BATCH = 32
CKA_FIGURE = "cka.png"  # the distill stage's linear-CKA figure, when it wrote one
INPUTS_DIR = "inputs"
EAGER = "PyTorch eager"
ORT = "onnxruntime"
Feed = Callable[[list[str], int], dict[str, np.ndarray]]


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


def _source_dir(upstream: Manifest, m: ExportedModel) -> Path:
    """The sentence-transformers (or model2vec) folder an ONNX graph was exported from, through the run's lineage."""
    return upstream.upstream(m.source.stage).directory(m.source.dir)


def _is_static(export: ExportRecord, m: ExportedModel) -> bool:
    base = export.models.get(m.of) if m.of else m
    return base is not None and base.spec.get("arch") == "static"


def _eager_names(prof: TargetProfile, export: ExportRecord, names: list[str]) -> list[str]:
    """The models timed in PyTorch eager as well: the teacher and the fp32 student (not a static one)."""
    if not prof.torch_eager:
        return []
    return [n for n in ("teacher", "student") if n in names and not _is_static(export, export.models[n])]


def _feed(folder: Path, static: bool) -> Feed:
    """(texts, length) -> int64 inputs (N, length) as the model in `folder` tokenises them, padded to `length`."""
    if static:
        from kdpipe.tasks.embedding.static import load_static, static_feed

        model = load_static(folder)
        return lambda texts, length: static_feed(model, texts, length)
    from kdpipe.tasks.embedding.encoder import load_encoder

    _, tok = load_encoder(folder)

    def feed(texts: list[str], length: int) -> dict[str, np.ndarray]:
        enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}

    return feed


def real_inputs(feed: Feed, sentences: list[str], shapes: list[list[int]]) -> tuple[dict[str, Any], dict[str, float]]:
    """The timing worker's `inputs` arrays ("BxT/<name>"): at batch B the first B sentences (repeated when there are
    fewer), tokenised and padded or truncated to T; and per shape the share of real (unmasked) tokens."""
    arrays: dict[str, Any] = {}
    fill: dict[str, float] = {}
    for batch, seq in shapes:
        inputs = feed([sentences[i % len(sentences)] for i in range(batch)], seq)
        for name, value in inputs.items():
            arrays[timing.inputs_key([batch, seq], name)] = value
        fill[timing.shape_key([batch, seq])] = float(np.mean(inputs["attention_mask"]))
    return arrays, fill


def _write_inputs(
    upstream: Manifest, export: ExportRecord, names: list[str], shapes: list[list[int]], work: Path
) -> tuple[dict[str, str], dict[str, Any]]:
    """Per timed name the .npz of its real inputs (one per tokenizer: the teacher's, the student's), and what they
    are (the sentence file, how many, the share of real tokens per tokenizer and shape)."""
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None  # an embedding run's teacher stage records it
    sentences = data.read_sentences(t_manifest.path(info.held_out))
    if not sentences:
        raise DataError(f"{info.held_out} of the teacher stage holds no sentence to time on", "re-run the teacher")
    (work / INPUTS_DIR).mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    files: dict[str, Path] = {}
    fill: dict[str, dict[str, float]] = {}
    for name in names:
        m = export.models[name]
        tokenizer = m.source.stage  # "teacher" or "distill" (the student's folder)
        if tokenizer not in files:
            arrays, fill[tokenizer] = real_inputs(_feed(_source_dir(upstream, m), _is_static(export, m)), sentences,
                                                  shapes)  # fmt: skip
            files[tokenizer] = work / INPUTS_DIR / f"{tokenizer}.npz"
            np.savez(files[tokenizer], **arrays)
        paths[name] = str(files[tokenizer])
    described = {"kind": "real held-out sentences", "file": f"teacher/{info.held_out}", "sentences": len(sentences),
                 "padding": "max_length (truncated beyond)", "real_token_share": fill}  # fmt: skip
    return paths, described


def _jobs(
    prof: TargetProfile, upstream: Manifest, names: list[str], providers: list[str], inputs: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The timing jobs (onnxruntime per timed name, PyTorch eager as "<name> eager") and eager job -> model name."""
    export = record(upstream, ExportRecord)
    vocab = _vocab(upstream)
    base = {"intra_op_threads": prof.intra_op_threads, "inter_op_threads": prof.inter_op_threads,
            "graph_optimization_level": prof.graph_optimization_level, "providers": providers,
            "shapes": _shapes(prof), "warmup": prof.warmup, "min_runs": prof.min_runs,
            "min_seconds": prof.min_seconds, "profile_ops": False, "check_finite": True}  # fmt: skip
    jobs: dict[str, Any] = {}
    for name in names:
        m = export.models[name]
        jobs[name] = {**base, "model": str(upstream.path(m.onnx)), "engine": "onnxruntime", "inputs": inputs[name],
                      "vocab_size": int(m.spec.get("vocab_size", vocab))}  # fmt: skip
    eager: dict[str, str] = {}
    for name in _eager_names(prof, export, names):
        eager[f"{name} eager"] = name
        jobs[f"{name} eager"] = {**base, "model": str(_source_dir(upstream, export.models[name])), "engine": "torch",
                                 "loader": LOADER, "inputs": inputs[name], "vocab_size": vocab}  # fmt: skip
    return jobs, eager


def _vocab(upstream: Manifest) -> int:
    teacher = upstream.upstream("teacher")
    config = json.loads(teacher.path("model/config.json").read_text(encoding="utf-8"))
    return int(config["vocab_size"])


def _copy_figures(upstream: Manifest, work: Path) -> list[str]:
    """The distill stage's figures (cosine distributions, CKA) copied beside report.md; the names copied."""
    distill = upstream.upstream("distill")
    copied = []
    for name in (FIGURE, CKA_FIGURE):
        if distill.has(name):
            shutil.copyfile(distill.path(name), work / name)
            copied.append(name)
    return copied


def run_profile(
    prof: TargetProfile, upstream: Manifest, work: Path, ctx: RunContext, providers: list[str], missing: list[str]
) -> StageOutput:
    export = record(upstream, ExportRecord)
    names = _timed(prof, export)
    inputs, described = _write_inputs(upstream, export, names, _shapes(prof), work)
    jobs, eager_of = _jobs(prof, upstream, names, providers, inputs)
    ctx.console.print(f"profiling (embedding) {', '.join(jobs)} at {_shapes(prof)} on {prof.name}, on real held-out "
                      f"sentences, each in its own process, {prof.rounds} interleaved round(s) ...")  # fmt: skip
    timed = timing.interleaved(jobs, prof.rounds)
    sizes = {n: upstream.path(export.models[n].onnx).stat().st_size for n in names}
    results = {n: {**timed[n], "model_bytes": sizes[n]} for n in names}
    eager = {name: timed[job] for job, name in eager_of.items()}
    t_spearman = upstream.upstream("teacher").metric("lee_spearman")
    budgets = check_budgets(prof, {"onnxruntime": results}, export, sizes, t_spearman or 0.0, metric="Lee Spearman")
    doc = {"profile": prof.name, "providers": providers, "missing_providers": missing, "onnxruntime": results,
           "torch_eager": eager, "inputs": described, "sizes": sizes, "cpu": cpu_model()}  # fmt: skip
    (work / "latency.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    rec = ProfileRecord(report="report.md", profile=prof.name, deploy=deployed_name(prof), budgets=budgets)
    _write_report_json(upstream, prof, {"onnxruntime": results, "torch_eager": eager}, rec, work, providers, missing)
    figures = _copy_figures(upstream, work)
    lines = report_lines(upstream, prof, results, sizes, budgets, missing, figures, eager, described)
    lines += ["", deployed_machine_line(upstream, rec.deploy)]
    (work / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for check in budgets:
        ctx.console.print(f"budget {check.budget}: {check.value} vs {check.limit} {check.unit}: "
                          f"{'ok' if check.ok else 'MISSED'}")  # fmt: skip
    return StageOutput(record=rec, metrics=_metrics(results, eager, names, timing.shape_key(throughput_shape(prof))))


def _write_report_json(
    upstream: Manifest, prof: TargetProfile, timed: dict[str, Any], rec: ProfileRecord, work: Path,
    providers: list[str], missing: list[str],
) -> None:  # fmt: skip
    """report.json: kdpipe.reporting.figures' schema (what `--compare` reads), "accuracy" the Lee Spearman (of the
    teacher, of each gated variant), eager models as "<name>-eager"."""
    from kdpipe.reporting.figures import Run, figures

    results = {"profile": prof.model_dump(mode="json"), **timed,
               "providers": {"requested": prof.execution_providers, "missing": missing, "used": providers}}  # fmt: skip
    report = figures(Run.of(upstream), results, rec, quality="lee_spearman")
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def speedup(ref: dict[str, Any] | None, timed: dict[str, Any], shape: str) -> float | None:
    """ref's p50 / timed's p50 at `shape` (how many times faster), None when either is missing, zero or not finite."""
    if ref is None:
        return None
    a = ref.get("shapes", {}).get(shape, {}).get("p50_ms")
    b = timed.get("shapes", {}).get(shape, {}).get("p50_ms")
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return None
    return a / b if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 else None


def _metrics(results: dict[str, Any], eager: dict[str, Any], names: list[str], key: str) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}
    ref = eager.get("teacher")
    for name in names:
        for shape, stats in results[name]["shapes"].items():
            metrics[f"{name}_p50_ms_{shape}"] = Metric(round(stats["p50_ms"], 3), "ms")
        metrics[f"{name}_sentences_per_s_{key}"] = Metric(round(results[name]["shapes"][key]["throughput_per_s"], 1),
                                                          "sentences/s")  # fmt: skip
    for name, r in eager.items():
        for shape, stats in r["shapes"].items():
            metrics[f"{name}_eager_p50_ms_{shape}"] = Metric(round(stats["p50_ms"], 3), "ms")
    labelled = [*((f"{n}_eager", eager[n]) for n in eager if n != "teacher"), *((n, results[n]) for n in names)]
    for label, r in labelled if ref is not None else []:
        for shape in r["shapes"]:
            x = speedup(ref, r, shape)
            metrics[f"{label}_speedup_vs_teacher_eager_{shape}"] = Metric(None if x is None else round(x, 3),
                                                                          "x (teacher eager p50 / p50)")  # fmt: skip
    return metrics


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


def _cell(ref: dict[str, Any] | None, r: dict[str, Any], shape: str) -> str:
    x = speedup(ref, r, shape)
    return "-" if ref is None else ("n/a" if x is None else f"{x:.2f}x")


def _latency_rows(results: dict[str, Any], eager: dict[str, Any], key: str) -> list[str]:
    """PyTorch eager and onnxruntime side by side: p50 per shape with the speed-up vs the teacher's PyTorch eager
    and vs the teacher's onnxruntime graph, and sentences/s at the throughput shape."""
    shapes = list(next(iter(results.values()))["shapes"]) if results else []
    ref_eager, ref_ort = eager.get("teacher"), results.get("teacher")
    rows = ["| model | engine | " + " | ".join(f"p50 ms {s} | vs teacher eager | vs teacher ORT" for s in shapes)
            + f" | sentences/s at {key} |", "|---|---|" + "---:|" * (3 * len(shapes) + 1)]  # fmt: skip
    entries = []
    for name, r in results.items():
        if name in eager:
            entries.append((name, EAGER, eager[name]))
        entries.append((name, ORT, r))
    for name, engine, r in entries:
        cells = [f"{_fmt(r['shapes'][s]['p50_ms'], 2)} | {_cell(ref_eager, r, s)} | {_cell(ref_ort, r, s)}"
                 for s in shapes]  # fmt: skip
        rows.append(
            f"| {name} | {engine} | " + " | ".join(cells) + f" | {_fmt(r['shapes'][key]['throughput_per_s'], 1)} |"
        )
    return rows


def _headline(results: dict[str, Any], eager: dict[str, Any], prof: TargetProfile) -> list[str]:
    """The issue's figure: how many times faster than the teacher in PyTorch eager the student is at the first shape."""
    shape = timing.shape_key([prof.shapes[0].batch, prof.shapes[0].seq])
    ref = eager.get("teacher")
    if ref is None:
        return [f"PyTorch eager was not timed (profile torch_eager: {str(prof.torch_eager).lower()}, or no PyTorch "
                "teacher), so there is no speed-up vs the teacher's PyTorch eager.", ""]  # fmt: skip
    parts = []
    if "student" in eager:
        parts.append(f"the student in PyTorch eager {_cell(ref, eager['student'], shape)}")
    deploy = deployed_name(prof)
    if deploy in results:
        parts.append(f"{deploy} (deployed) in onnxruntime {_cell(ref, results[deploy], shape)}")
    if not parts:
        return []
    return [f"Speed-up vs the teacher in PyTorch eager at {shape}: {'; '.join(parts)}.", ""]


def _inputs_line(described: dict[str, Any]) -> str:
    share = "; ".join(f"{'teacher' if tok == 'teacher' else 'student'}'s tokenizer "
                      + ", ".join(f"{s} {100 * v:.0f}%" for s, v in fill.items())
                      for tok, fill in described["real_token_share"].items())  # fmt: skip
    return (f"Inputs timed: real held-out sentences ({described['file']}, {described['sentences']} sentences; the "
            "first B at batch B, repeated when B is larger), tokenised by each model's own tokenizer outside the graph "
            "and outside the timing, padded (or truncated) to each shape's length with their real attention mask "
            f"(share of real tokens: {share}).")  # fmt: skip


def _data_lines(rec: TeacherRecord) -> list[str]:
    """Where the sentences came from (the corpus or the given files, each split's origin) and their leakage."""
    lines = [f"- data: `{rec.data_source}`."] + [f"  - {s}: {where}." for s, where in rec.data_splits.items()]
    return [*lines, *leakage_lines(rec, {"held_out": "held-out sentences"}, "transfer set"), ""]


def report_lines(
    upstream: Manifest, prof: TargetProfile, results: dict[str, Any], sizes: dict[str, int], budgets: list[Any],
    missing: list[str], figures: list[str], eager: dict[str, Any], described: dict[str, Any],
) -> list[str]:  # fmt: skip
    """report.md of an embedding run."""
    teacher = upstream.upstream("teacher")
    cpu = cpu_model()
    lines = ["# kdpipe embedding report", "", f"Teacher: {teacher.record.get('model_source')}; quality on the Lee et "
             "al. similarity set (1,225 document pairs, gensim's test data) and on the held-out sentences "
             "(mean cosine to the teacher, recall@10 of the teacher's neighbours). Retention = student / teacher Lee "
             "Spearman.", "", *_quality_rows(upstream, sizes), ""]  # fmt: skip
    lines += _data_lines(record(teacher, TeacherRecord))
    static = upstream.upstream("student").record.get("arch") == "static"
    if static:
        lines += ["The student is static (model2vec's distillation of the teacher's tokens, student.arch: static; "
                  "static: no training in the distill stage). Its mean cosine to the teacher is n/a when its width "
                  "(PCA) differs from the teacher's: the two live in different spaces. It has no PyTorch model, so it "
                  "is timed in onnxruntime only.", ""]  # fmt: skip
    if FIGURE in figures:
        lines += [f"![cosine distributions of similar vs dissimilar Lee pairs]({FIGURE})", ""]
    if CKA_FIGURE in figures:
        lines += [f"![linear CKA between the teacher's and the student's layers (distill stage)]({CKA_FIGURE})", ""]
    lines += [f"Latency, profile {prof.name} ({prof.intra_op_threads} threads, {prof.rounds} rounds of fresh processes "
              f"per model and engine; CPU {cpu['model']}, flags {', '.join(cpu['flags']) or 'none of avx2/avx512/amx'})"
              "; PyTorch eager: the sentence-transformers folder as one module (eager attention, inference_mode), "
              "onnxruntime: the exported graph. " + _inputs_line(described), "",
              *_headline(results, eager, prof),
              *_latency_rows(results, eager, timing.shape_key(throughput_shape(prof))), ""]  # fmt: skip
    if missing:
        lines += [f"Providers {', '.join(missing)} are not in this onnxruntime; timed on the available ones.", ""]
    for b in budgets:
        lines.append(f"- budget {b.budget}: {b.value} (limit {b.limit} {b.unit}): {'ok' if b.ok else 'MISSED'}")
    return lines
