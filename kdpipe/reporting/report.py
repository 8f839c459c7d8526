"""The Markdown report of a run: quality, size, parity and latency, from the stages' typed records."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import ExportRecord, ProfileRecord, TeacherRecord, record
from kdpipe.compress.quantize import VARIANTS
from kdpipe.data.tables import rows_summary
from kdpipe.env import int8_kernels, machine, machine_line
from kdpipe.errors import ArtifactError
from kdpipe.reporting.figures import Run, figures
from kdpipe.reporting.plots import plot_pareto


@dataclass
class Report:
    path: Path
    summary: Table


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


def data_lines(rec: TeacherRecord, tcfg: dict[str, Any]) -> list[str]:
    """The report's data bullets: source and splits, and the rows read and dropped."""
    split = rec.split_sizes
    subset = tcfg["data"]["source"] == "default" and tcfg["data"]["train_size"]
    if rec.data_splits and not all(v.startswith("drawn from") for v in rec.data_splits.values()):
        lines = [f"- data: `{rec.data_source}`; max length {rec.max_length} tokens."]
        order = [name for name in ("train", "val", "test") if name in rec.data_splits]
        lines += [f"  - {name}: {rec.data_splits[name]}." for name in order]
    else:
        lines = [
            f"- data: `{rec.data_source}`; seeded splits (seed {tcfg['seed']}): "
            f"train {split['train']}, validation {split['val']}, test {split['test']} examples; max length "
            f"{rec.max_length} tokens."
            + (" A subset of the rows is used to keep the default run short." if subset else "")
        ]
    if rec.data_rows:
        lines.append(f"- Data: {rows_summary(rec.data_rows)}.")
    return lines + leakage_lines(rec)


def leakage_lines(rec: TeacherRecord, labels: dict[str, str] | None = None, against: str = "train split") -> list[str]:
    """The report's leakage bullets: per held-out split, its texts also in `against` after normalisation. `labels`:
    what a split's texts are called (default "<split> texts")."""
    labels = labels or {}
    return [
        f"- Leakage: {leak.overlap:,} of the {leak.of:,} {labels.get(name, f'{name} texts')} "
        f"({leak.percent}) also occur in the {against} (after case / whitespace normalisation)."
        for name, leak in rec.leakage.items()
    ]


def _training_lines(run: Run) -> list[str]:
    t, d, dcfg, tcfg = run.teacher, run.distill, run.distill.config, run.teacher.config
    losses = " + ".join(
        f"{c['weight']:g} x {c['name']}"
        + (f" (T={c['temperature']:g}, alpha={c['alpha']:g})" if c["name"] == "hinton" else "")
        for c in run.distill_rec.losses
    )
    teacher_how = (
        f"fine-tuned {tcfg['epochs']:g} epoch(s), {run.teacher_rec.trained_params} parameters, batch "
        f"{tcfg['batch_size']}, {t.metric('train_seconds')} s"
        if tcfg["finetune"]
        else "used as given (no fine-tuning)"
    )
    return [
        "## Data and budget",
        "",
        *data_lines(run.teacher_rec, tcfg),
        f"- teacher: {teacher_how}; validation accuracy {_pct(t.metric('val_accuracy'))}.",
        f"- distillation: loss = {losses}; {run.distill_rec.train_examples} examples x "
        f"{dcfg['epochs']:g} epoch(s), batch {dcfg['batch_size']}, lr {dcfg['lr']:g}, "
        f"on {run.distill_rec.device} ({run.distill_rec.precision}), {d.metric('train_seconds')} s "
        f"({d.metric('train_samples_per_second')} samples/s)"
        + (f" on {run.distill_rec.processes} DDP processes" if run.distill_rec.processes > 1 else "")
        + (f", resumed from step {run.distill_rec.resumed_from}" if run.distill_rec.resumed_from else "")
        + ".",
        *_cache_line(run.distill_rec.teacher_cache),
        "",
    ]


def _cache_line(info: dict[str, Any] | None) -> list[str]:
    """What the teacher-output cache did for the distillation, in one line."""
    if not info:
        return []
    if info["status"] == "bypassed":
        return [f"- teacher outputs: not cached ({info['reason']})."]
    what = "full logits" if info["contents"]["top_k"] is None else f"top-{info['contents']['top_k']} logits"
    if info["contents"]["hidden"]:
        what += f", hidden states {info['contents']['hidden']}"
    if info["contents"]["attentions"]:
        what += f", attention maps {info['contents']['attentions']}"
    how = "computed now" if info["status"] == "miss" else "reused from an earlier run (cache hit)"
    where = info["dir"].removeprefix("../")  # recorded relative to the distill stage, shown relative to the run
    return [
        f"- teacher outputs: {how}, `{where}` ({what}; {info['bytes_per_example']:,.0f} bytes/example over "
        f"{info['examples']} examples)."
    ]


def _verdict(s_acc: float, b_acc: float, s_f1: float, b_f1: float) -> str:
    gap = 100 * (s_acc - b_acc)
    if abs(gap) < 1e-9:
        verdict = "KD and the no-KD baseline tied on test accuracy."
    elif gap > 0:
        verdict = f"KD won: +{gap:.2f} accuracy points over the same student trained on hard labels only."
    else:
        verdict = f"The no-KD baseline won: {-gap:.2f} accuracy points better than KD on this run."
    f1_gap = 100 * (s_f1 - b_f1)
    return verdict + f" Macro-F1: KD {'+' if f1_gap >= 0 else ''}{f1_gap:.2f} points vs no KD."


def _retention(acc: float | None, t_acc: float | None) -> str:
    """Student accuracy / teacher accuracy; undefined (said, not divided) for a teacher that scored 0 or NaN."""
    if acc is None or t_acc is None or not math.isfinite(t_acc) or not math.isfinite(acc):
        return "n/a"
    if t_acc <= 0:
        return "undefined (teacher accuracy 0)"
    return f"{100 * acc / t_acc:.1f}%"


def _quality_lines(run: Run) -> list[str]:
    t, d = run.teacher, run.distill
    t_acc, t_layers, t_params = t.metric("test_accuracy"), t.metric("layers"), t.metric("params")
    s_layers, s_params = run.student.metric("layers"), run.student.metric("params")
    s_acc, b_acc = d.metric("test_accuracy"), d.metric("baseline_test_accuracy")

    def row(name: str, layers: Any, params: Any, acc: Any, f1: Any, agreement: str) -> str:
        retention = "100%" if name == "teacher" else _retention(acc, t_acc)
        return f"| {name} | {layers} | {params:,} | {_pct(acc)} | {_pct(f1)} | {retention} | {agreement} |"

    lines = [
        "## Quality (test split)",
        "",
        "| model | layers | parameters | accuracy | macro-F1 | retention (acc.) | agreement with teacher |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("teacher", t_layers, t_params, t_acc, t.metric("test_macro_f1"), "100%"),
    ]
    if (a := run.assistant) is not None:
        lines.append(
            row(
                "teaching assistant",
                a.metric("layers"),
                a.metric("params"),
                a.metric("test_accuracy"),
                a.metric("test_macro_f1"),
                "n/a",
            )
        )
    lines.append(
        row("student, KD", s_layers, s_params, s_acc, d.metric("test_macro_f1"), _pct(d.metric("teacher_agreement")))
    )
    verdict = ""
    if b_acc is not None:
        agreement = _pct(d.metric("baseline_teacher_agreement"))
        lines.append(
            row(
                "student, no KD (hard labels only)",
                s_layers,
                s_params,
                b_acc,
                d.metric("baseline_test_macro_f1"),
                agreement,
            )
        )
        verdict = _verdict(s_acc, b_acc, d.metric("test_macro_f1"), d.metric("baseline_test_macro_f1"))
    return [
        *lines,
        "",
        f"Student is {t_params / s_params:.2f}x smaller in parameters"
        + (f" and {t_layers / s_layers:.1f}x smaller in layers" if s_layers else " (a BiLSTM: no transformer layers)")
        + " than the teacher. "
        + verdict,
        "",
        "![training loss](training.png)",
        "",
    ]


def _compression_lines(run: Run) -> list[str]:
    """What the student stage removed besides layers: heads and FFN neurons, and the vocabulary."""
    width, vocab, lines = run.student_rec.width, run.student_rec.vocab, []
    if width is not None:
        removed = sum(len(v) for v in width.heads_removed.values())
        lines.append(
            f"- width: {removed} attention heads removed by importance, {width.ffn_kept} of {width.ffn_total} FFN "
            f"neurons kept per layer ({width.params_before / 1e6:.1f}M -> {width.params_after / 1e6:.1f}M parameters)."
        )
    if vocab is not None:
        lines.append(
            f"- vocabulary: {vocab.kept:,} of {vocab.old_size:,} word pieces kept (those of the train split); they "
            f"cover {vocab.coverage:.2%} of the test split's tokens, the rest read as [UNK] by the student."
        )
    return ["Student compression:", "", *lines, ""] if lines else []


def _method_lines(run: Run) -> list[str]:
    """CKA, the layer schedule's moves, and the teaching-assistant chain, where the run had them."""
    lines: list[str] = _compression_lines(run)
    if run.distill.has("cka.png"):
        lines += [
            "Linear CKA between every teacher and student layer on test inputs (what was transferred; "
            "docs/methods.md §3.3):",
            "",
            "![CKA](cka.png)",
            "",
        ]
    if run.distill_rec.schedule_events:
        moves = ", ".join(
            f"layer {e['layer']} done at step {e['step']} ({e['reason']})" for e in run.distill_rec.schedule_events
        )
        lines += [f"Layer schedule `{run.distill_rec.schedule_kind}`: {moves}.", ""]
    if run.assistant is not None:
        info = record(run.assistant, TeacherRecord).assistant
        assert info is not None
        lines += [
            f"The student was distilled from the teaching assistant (teacher layers {info.kept_layers}), itself "
            "distilled from the teacher; agreement, export and latency below compare the student with the "
            "assistant, its direct teacher.",
            "",
        ]
    return lines


def _export_lines(run: Run) -> list[str]:
    lines = [
        "## ONNX export and parity",
        "",
        "Parity is checked on real test-split texts at shapes other than the export's; a miss fails the export stage.",
        "",
        "| model | ONNX size | max abs diff | tolerance | class agreement | examples | shapes (batch x seq) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, info in run.export_rec.models.items():
        if info.variant != "fp32":
            continue  # a variant's graph has the fp32 export's inputs; it is gated on the whole test split below
        par = info.parity
        size = run.export.metric(f"{name}_onnx_bytes")
        shapes = ", ".join(f"{b}x{t}" for b, t in par.shapes)
        lines.append(
            f"| {name} | {size / 2**20:.1f} MiB | {par.max_abs_diff:.2e} | {par.atol:g} | "
            f"{_pct(par.agreement)} | {par.examples} | {shapes} |"
        )
    return lines


def _variant_lines(run: Run, results: dict[str, Any]) -> list[str]:
    """Every gated student variant: size, test-split figures against the fp32 PyTorch student, p50 and the
    speed-up over the teacher (onnxruntime fp32, and PyTorch eager where it was timed)."""
    order: list[str] = list(VARIANTS)
    found = sorted(
        (m for m in run.export_rec.models.items() if m[1].gate is not None), key=lambda m: order.index(m[1].variant)
    )
    gated = dict(found)
    if not gated:
        return []
    shapes = list(next(iter(results["onnxruntime"].values()))["shapes"])
    eager = "teacher" in results.get("torch_eager", {})
    lines = [
        "",
        "## Student variants (gated on the whole test split)",
        "",
        f"Each variant is compared with the fp32 PyTorch student on every test example and must keep "
        f"{run.export.config['accuracy_budget']:.0%} of its accuracy; fp32 and optimized variants must also stay "
        "within the logit tolerance. Speed-up: teacher onnxruntime fp32 p50 / variant p50"
        + (" (in brackets: teacher PyTorch eager p50 / variant p50)." if eager else "."),
        "",
        "| variant | size | vs teacher ONNX | test accuracy | agreement | max abs diff | gate |"
        + "".join(f" p50 {s} | speed-up {s} |" for s in shapes),
        "|---|---:|---:|---:|---:|---:|---|" + "---:|---:|" * len(shapes),
    ]
    t_bytes = run.export.metric("teacher_onnx_bytes")
    for name, info in gated.items():
        g, size = info.gate, run.export.metric(f"{name}_onnx_bytes")
        assert g is not None
        ratio = f"{t_bytes / size:.1f}x smaller" if t_bytes else "n/a"
        row = f"| {name} | {size / 2**20:.1f} MiB | {ratio} | {_pct(g.value)} | {_pct(g.agreement)} | "
        row += f"{g.max_abs_diff:.2e} | {'pass' if g.ok else 'FAIL'} |"
        lines.append(row + "".join(_speed_cells(results, name, s) for s in shapes))
    fused = {k: v for m in gated.values() for k, v in m.transforms.get("fusions", {}).items() if v}
    if fused:
        done = ", ".join(f"{k} x{v}" for k, v in fused.items())
        lines += ["", f"Fusions applied by onnxruntime's transformer optimizer: {done}."]
    return lines


def _speed_cells(results: dict[str, Any], name: str, shape: str) -> str:
    """` p50 | speed-up |` of one model at one shape, against the teacher's onnxruntime (and eager) p50."""
    ort_res, eager = results["onnxruntime"], results.get("torch_eager", {})
    p50 = ort_res.get(name, {}).get("shapes", {}).get(shape, {}).get("p50_ms")
    if p50 is None:
        return " n/a | n/a |"
    up = f"{ort_res['teacher']['shapes'][shape]['p50_ms'] / p50:.2f}x" if "teacher" in ort_res else "n/a"
    if "teacher" in eager:
        up += f" ({eager['teacher']['shapes'][shape]['p50_ms'] / p50:.2f}x)"
    return f" {p50:.2f} ms | {up} |"


def _latency_lines(results: dict[str, Any]) -> list[str]:
    prof, ort_res, eager = results["profile"], results["onnxruntime"], results.get("torch_eager", {})
    lines = [
        "",
        f"## Latency: profile `{prof['name']}`",
        "",
        f"{prof['description']} onnxruntime with {prof['intra_op_threads']} intra-op thread(s), graph "
        f"optimisation `{prof['graph_optimization_level']}`, providers that ran: "
        f"{', '.join(next(iter(ort_res.values()))['providers'])}; {prof['warmup']} warm-up runs, then at least "
        f"{prof['min_runs']} runs and {prof['min_seconds']:g} s per shape. Medians are what to compare; "
        "absolute times vary with the machine.",
        *_fallback_lines(results),
        "",
        "| engine | model | batch x seq | p50 ms | p90 ms | p99 ms | mean ms | CoV | throughput /s | runs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, res in (("onnxruntime", ort_res), ("torch eager", eager)):
        for name, r in res.items():
            for shape, st in r["shapes"].items():
                lines.append(
                    f"| {engine} | {name} | {shape} | {st['p50_ms']:.2f} | {st['p90_ms']:.2f} | "
                    f"{st['p99_ms']:.2f} | {st['mean_ms']:.2f} | {st['cov']:.3f} | "
                    f"{st['throughput_per_s']:.1f} | {st['runs']} |"
                )
    lines.append("")
    if "teacher" in ort_res:
        for shape in ort_res["student"]["shapes"]:
            t, s = ort_res["teacher"]["shapes"][shape]["p50_ms"], ort_res["student"]["shapes"][shape]["p50_ms"]
            lines.append(
                f"- speed-up at {shape} (onnxruntime p50, teacher / student): **{t / s:.2f}x** "
                f"({t:.2f} ms -> {s:.2f} ms)"
            )
    return lines


def _summary(run: Run, results: dict[str, Any]) -> Table:
    """The table printed at the end of a run."""
    t, d = run.teacher, run.distill
    t_params, s_params = t.metric("params"), run.student.metric("params")
    summary = Table(title="kdpipe summary")
    for col in ("", "teacher", "student (KD)", "student (no KD)"):
        summary.add_column(col, justify="right")
    s_layers = str(run.student.metric("layers"))
    summary.add_row("layers", str(t.metric("layers")), s_layers, s_layers)
    summary.add_row("parameters", f"{t_params / 1e6:.1f}M", f"{s_params / 1e6:.1f}M", f"{s_params / 1e6:.1f}M")
    for what, key in (("test accuracy", "test_accuracy"), ("test macro-F1", "test_macro_f1")):
        summary.add_row(what, _pct(t.metric(key)), _pct(d.metric(key)), _pct(d.metric(f"baseline_{key}")))
    ort_res = results["onnxruntime"]
    if "teacher" in ort_res:
        for shape in ort_res["student"]["shapes"]:
            tm, sm = ort_res["teacher"]["shapes"][shape]["p50_ms"], ort_res["student"]["shapes"][shape]["p50_ms"]
            summary.add_row(f"ORT p50 {shape}", f"{tm:.2f} ms", f"{sm:.2f} ms ({tm / sm:.2f}x)", "")
    return summary


def write_report(export: Manifest, results: dict[str, Any], profiled: ProfileRecord, work: Path) -> Report:
    """`<work>/report.json` (the figures), `report.md` with the Pareto chart (and the distill stage's plots
    copied beside it), and the summary table."""
    run = Run.of(export)
    prof, rec = results["profile"], run.student_rec
    data = figures(run, results, profiled)
    (work / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plot_pareto(data, work / "pareto.png")
    lines = [
        "# kdpipe report",
        "",
        f"Teacher `{run.teacher_rec.model_source}` -> student with {run.student.metric('layers')} of "
        f"{run.teacher.metric('layers')} layers (teacher layers {rec.kept_layers}, init `{rec.init}`), "
        f"profile `{prof['name']}`{' (emulated on this host)' if prof['emulated'] else ''}.",
        "",
        *[f"> **Warning:** {w}\n" for w in run.warnings()],
        *_target_lines(data),
        *_training_lines(run),
        *_quality_lines(run),
        *_method_lines(run),
        *_export_lines(run),
        *_variant_lines(run, results),
        *_latency_lines(results),
        *_detail_lines(data),
        "",
        "![latency](latency.png)",
        "",
        f"Environment: {run.distill.environment['device']}, torch {run.distill.environment['packages']['torch']}, "
        f"onnxruntime {export.environment['packages']['onnxruntime']}, kdpipe {export.kdpipe_version} "
        f"(git {str(export.environment.get('git_sha'))[:10]}).",
        "",
        deployed_machine_line(export, profiled.deploy),
        "",
    ]
    for png in ("training.png", "cka.png"):
        if run.distill.has(png):
            shutil.copyfile(run.distill.path(png), work / png)
    path = work / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return Report(path=path, summary=_summary(run, results))


def deployed_machine_line(export: Manifest, deploy: str) -> str:
    """kdpipe.env.machine_line of this host (where the profile times the models) with the integer operators of
    the deployed model's graph (kdpipe.env.int8_kernels), read through the export record; a graph that cannot be
    read leaves them out. Every task's report.md carries it."""
    from google.protobuf.message import DecodeError

    models = record(export, ExportRecord).models
    try:
        kernels = int8_kernels(export.path(models[deploy].onnx)) if deploy in models else None
    except (ArtifactError, OSError, ValueError, DecodeError):
        kernels = None
    return machine_line(machine(), kernels, deploy if kernels is not None else None)


def _target_lines(data: dict[str, Any]) -> list[str]:
    """The deployed variant against the profile's budgets, and the Pareto chart: what an edge engineer reads first."""
    lines = ["## Target", ""]
    budgets = data["budgets"]
    if budgets:
        lines += [
            f"Deployed variant `{data['deploy']}` against the budgets of profile `{data['profile']['name']}`:",
            "",
            "| budget | limit | measured | |",
            "|---|---:|---:|---|",
        ]
        for b in budgets:
            value = "missing" if b["value"] is None else f"{b['value']:.4g}"
            lines.append(
                f"| {b['budget']} | {b['limit']:g} {b['unit']} | {value} | {'ok' if b['ok'] else '**MISSED**'} |"
            )
        missed = [b for b in budgets if not b["ok"]]
        lines += [
            "",
            f"**{len(missed)} budget(s) missed** (`--strict` fails)." if missed else "Every budget is met.",
            "",
        ]
    else:
        lines += [f"Deployed variant `{data['deploy']}`; profile `{data['profile']['name']}` sets no budgets.", ""]
    return [*lines, "![accuracy vs latency and size](pareto.png)", ""]


def _detail_lines(data: dict[str, Any]) -> list[str]:
    """Per model timed by onnxruntime: session init, first run, peak RSS of its process, FLOPs and % of the
    roofline at the first shape, the top operators."""
    shape, peaks = (data["shapes"] or ["?"])[0], data.get("host_peaks") or {}
    lines = [
        "",
        f"Each model in its own processes. Roofline at {shape}: FLOPs and weights counted on the graph, floor = FLOPs "
        f"at this host's peak GEMM measured with onnxruntime ({peaks.get('peak_gflops_fp32', float('nan')):.0f} "
        f"GFLOP/s fp32, {peaks.get('peak_gflops_int8', float('nan')):.0f} int8, {peaks.get('threads', '?')} "
        "thread(s)); % of roofline = floor / measured p50.",
        "",
        "| model | session init ms | first run ms | peak RSS MiB (model) | GFLOP | % of roofline | top operators |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    nan = float("nan")
    for name, m in data["models"].items():
        if m["engine"] != "onnxruntime":
            continue
        ops = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in (m.get("top_ops") or [])[:4]) or "n/a"
        rss = f"{m.get('peak_rss_mib', nan):.0f} ({m.get('model_rss_mib', nan):.0f})"
        roof = (m.get("roofline") or {}).get(shape, {})
        lines.append(
            f"| {name} | {m.get('session_init_ms', nan):.0f} | {m.get('first_run_ms', nan):.1f} | {rss} | "
            f"{roof.get('flops', nan) / 1e9:.3f}{'*' if roof.get('flops_from_fp32_graph') else ''} | "
            f"{roof.get('percent_of_roofline', nan):.0f}% | {ops} |"
        )
    if any((m.get("roofline") or {}).get(shape, {}).get("flops_from_fp32_graph") for m in data["models"].values()):
        lines += [
            "",
            "\\* FLOPs of the fp32 graph the variant was made from (its quantised graph defeats shape inference).",
        ]
    return lines + _estimate_lines(data) + _mobile_lines(data)


def _estimate_lines(data: dict[str, Any]) -> list[str]:
    if not data.get("estimates_for"):
        return []
    lines = [
        "",
        f"**Estimates for {data['estimates_for']}** (the profile's device; this host is not it): roofline floors from "
        "the device's stated peaks, NOT measurements; a real device is slower than its floor.",
        "",
        "| model | " + " | ".join(f"estimated floor {s} (ms)" for s in data["shapes"]) + " |",
        "|---|" + "---:|" * len(data["shapes"]),
    ]
    for name, m in data["models"].items():
        est = m.get("estimate_ms") or {}
        if est:
            lines.append(f"| {name} | " + " | ".join(f"{est.get(s, float('nan')):.3g}" for s in data["shapes"]) + " |")
    return lines


def _mobile_lines(data: dict[str, Any]) -> list[str]:
    mobile = data.get("mobile")
    if not mobile:
        return []
    contrib = ", ".join(mobile["contrib_ops"]) or "none"
    return [
        "",
        f"**Mobile package**: `{mobile['ort']}` ({mobile['bytes'] / 2**20:.1f} MiB, ORT format, checked against the "
        f".onnx at two shapes) and `{mobile['required_operators']}` for a reduced-operator onnxruntime build; "
        f"contrib operators needed: {contrib}.",
        "",
        *[f"> **Mobile usability:** {f}\n" for f in mobile["findings"]],
    ]


def _fallback_lines(results: dict[str, Any]) -> list[str]:
    """A profile with allow_fallback that did not get every provider it asked for says so."""
    prov = results.get("providers") or {}
    if not prov.get("missing"):
        return []
    return [
        "",
        f"> **Warning:** the profile asked for {', '.join(prov['requested'])}; "
        f"{', '.join(prov['missing'])} is not available here, so these timings ran on "
        f"{', '.join(prov['used'])} (`allow_fallback: true`).",
    ]
