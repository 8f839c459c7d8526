"""Markdown report and PNG plots joining quality, size, parity and latency."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from kdpipe.artifacts import Manifest
from kdpipe.data import rows_summary


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(extra: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("history", "KD student (recipe loss)"), ("baseline_history", "no-KD student (hard CE)")):
        hist = extra.get(key)
        if hist:
            ax.plot([r["step"] for r in hist], [r["loss"] for r in hist], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Distillation: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(results: dict[str, Any], path: Path) -> None:
    plt = _plt()
    ort_res = results["onnxruntime"]
    shapes = list(next(iter(ort_res.values()))["shapes"])
    series = [(f"{m} ORT", ort_res[m]["shapes"]) for m in ort_res]
    series += [(f"{m} torch", r["shapes"]) for m, r in results.get("torch_eager", {}).items()]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(series)
    for i, (label, data) in enumerate(series):
        xs = [j + i * width for j in range(len(shapes))]
        p50 = [data[s]["p50_ms"] for s in shapes]
        err = [[0] * len(shapes), [data[s]["p90_ms"] - data[s]["p50_ms"] for s in shapes]]
        ax.bar(xs, p50, width, yerr=err, capsize=3, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"batch x seq {s}" for s in shapes])
    ax.set_ylabel("latency p50 (ms), whisker to p90")
    ax.set_title(f"Latency on profile '{results['profile']['name']}'")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Report:
    path: Path
    summary: Table


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


def _warnings(*manifests: Manifest | None) -> list[str]:
    """What the stages flagged (a teacher that predicts one class, a schedule that outlasts the budget,
    ...), once each, in stage order: a figure next to a warning is not a result to quote."""
    seen: list[str] = []
    for m in manifests:
        for w in (m.extra.get("warnings") or []) if m is not None else []:
            if w not in seen:
                seen.append(str(w))
    return seen


def data_lines(extra: dict[str, Any], tcfg: dict[str, Any]) -> list[str]:
    """The report's data bullets from the teacher manifest's extra and config: source and splits, and
    the rows read and dropped (manifests written before kdpipe counted them have no `data_rows`)."""
    split = extra["split_sizes"]
    lines = [
        f"- data: `{extra['data_source']}`; seeded splits (seed {tcfg['seed']}): "
        f"train {split['train']}, validation {split['val']}, test {split['test']} examples; max length "
        f"{extra['max_length']} tokens."
        + (
            " A subset of the rows is used to keep the default run short."
            if tcfg["data"]["source"] == "default" and tcfg["data"]["train_size"]
            else ""
        )
    ]
    if extra.get("data_rows"):
        lines.append(f"- Data: {rows_summary(extra['data_rows'])}.")
    return lines


def write_report(export: Manifest, results: dict[str, Any], work: Path) -> Report:
    distill = export.upstream("distill")
    student = export.upstream("student")
    teacher = export.upstream("teacher")
    assistant = None
    if "assistant" in teacher.extra:  # a teaching-assistant chain: the direct teacher is the assistant
        assistant, teacher = teacher, teacher.upstream("teacher")
    prof = results["profile"]
    t_acc, t_f1 = teacher.metric("test_accuracy"), teacher.metric("test_macro_f1")
    s_acc, s_f1 = distill.metric("test_accuracy"), distill.metric("test_macro_f1")
    b_acc, b_f1 = distill.metric("baseline_test_accuracy"), distill.metric("baseline_test_macro_f1")
    t_params, s_params = teacher.metric("params"), student.metric("params")
    t_layers, s_layers = teacher.metric("layers"), student.metric("layers")
    split = teacher.extra["split_sizes"]
    dcfg, tcfg = distill.config, teacher.config
    losses = " + ".join(
        f"{c['weight']:g} x {c['name']}"
        + (f" (T={c['temperature']:g}, alpha={c['alpha']:g})" if c["name"] == "hinton" else "")
        for c in dcfg["losses"]
    )
    teacher_how = (
        f"fine-tuned {tcfg['epochs']:g} epoch(s), {teacher.extra['trained_params']} parameters, batch "
        f"{tcfg['batch_size']}, {teacher.metric('train_seconds')} s"
        if tcfg["finetune"]
        else "used as given (no fine-tuning)"
    )
    lines = [
        "# kdpipe report",
        "",
        f"Teacher `{teacher.extra['model_source']}` -> student with {s_layers} of {t_layers} layers "
        f"(teacher layers {student.extra['kept_layers']}, init `{student.extra['init']}`), "
        f"profile `{prof['name']}`{' (emulated on this host)' if prof['emulated'] else ''}.",
        "",
        *[f"> **Warning:** {w}\n" for w in _warnings(teacher, assistant, distill, export)],
        "## Data and budget",
        "",
        *data_lines(teacher.extra, tcfg),
        f"- teacher: {teacher_how}; validation accuracy {_pct(teacher.metric('val_accuracy'))}.",
        f"- distillation: loss = {losses}; {distill.extra.get('train_examples', split['train'])} examples x "
        f"{dcfg['epochs']:g} epoch(s), batch {dcfg['batch_size']}, lr {dcfg['lr']:g}, "
        f"on {distill.extra['device']} ({distill.extra['precision']}), {distill.metric('train_seconds')} s "
        f"({distill.metric('train_samples_per_second')} samples/s).",
        "",
        "## Quality (test split)",
        "",
        "| model | layers | parameters | accuracy | macro-F1 | retention (acc.) | agreement with teacher |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {t_layers} | {t_params:,} | {_pct(t_acc)} | {_pct(t_f1)} | 100% | 100% |",
        *(
            [
                f"| teaching assistant | {assistant.metric('layers')} | {assistant.metric('params'):,} | "
                f"{_pct(assistant.metric('test_accuracy'))} | {_pct(assistant.metric('test_macro_f1'))} | "
                f"{100 * assistant.metric('test_accuracy') / t_acc:.1f}% | n/a |"
            ]
            if assistant is not None
            else []
        ),
        f"| student, KD | {s_layers} | {s_params:,} | {_pct(s_acc)} | {_pct(s_f1)} | "
        f"{100 * s_acc / t_acc:.1f}% | {_pct(distill.metric('teacher_agreement'))} |",
    ]
    verdict = ""
    if b_acc is not None:
        lines.append(
            f"| student, no KD (hard labels only) | {s_layers} | {s_params:,} | {_pct(b_acc)} | {_pct(b_f1)} | "
            f"{100 * b_acc / t_acc:.1f}% | {_pct(distill.metric('baseline_teacher_agreement'))} |"
        )
        gap = 100 * (s_acc - b_acc)
        if abs(gap) < 1e-9:
            verdict = "KD and the no-KD baseline tied on test accuracy."
        elif gap > 0:
            verdict = f"KD won: +{gap:.2f} accuracy points over the same student trained on hard labels only."
        else:
            verdict = f"The no-KD baseline won: {-gap:.2f} accuracy points better than KD on this run."
        f1_gap = 100 * (s_f1 - b_f1)
        verdict += f" Macro-F1: KD {'+' if f1_gap >= 0 else ''}{f1_gap:.2f} points vs no KD."
    lines += [
        "",
        f"Student is {t_params / s_params:.2f}x smaller in parameters and {t_layers / s_layers:.1f}x "
        "smaller in layers than the teacher. " + verdict,
        "",
        "![training loss](training.png)",
        "",
    ]

    if (distill.dir / "cka.png").is_file():
        lines += [
            "Linear CKA between every teacher and student layer on test inputs (what was transferred; METHODS.md 3.3):",
            "",
            "![CKA](cka.png)",
            "",
        ]
    if distill.extra.get("schedule_events"):
        moves = ", ".join(
            f"layer {e['layer']} done at step {e['step']} ({e['reason']})" for e in distill.extra["schedule_events"]
        )
        lines += [f"Layer schedule `{dcfg['schedule']['kind']}`: {moves}.", ""]
    if assistant is not None:
        lines += [
            "The student was distilled from the teaching assistant (teacher layers "
            f"{assistant.extra['assistant']['kept_layers']}), itself distilled from the teacher; agreement, "
            "export and latency below compare the student with the assistant, its direct teacher.",
            "",
        ]
    lines += [
        "## ONNX export and parity",
        "",
        "Parity is checked on real test-split texts at shapes other than the export's; a miss fails the export stage.",
        "",
        "| model | ONNX size | max abs diff | tolerance | class agreement | examples | shapes (batch x seq) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, info in export.extra["models"].items():
        par = info["parity"]
        size = export.metric(f"{name}_onnx_bytes")
        shapes = ", ".join(f"{b}x{t}" for b, t in par["shapes"])
        lines.append(
            f"| {name} | {size / 2**20:.1f} MiB | {par['max_abs_diff']:.2e} | {par['atol']:g} | "
            f"{_pct(par['class_agreement'])} | {par['examples']} | {shapes} |"
        )

    ort_res, eager = results["onnxruntime"], results.get("torch_eager", {})
    lines += [
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
    summary = Table(title="kdpipe summary")
    for col in ("", "teacher", "student (KD)", "student (no KD)"):
        summary.add_column(col, justify="right")
    summary.add_row("layers", str(t_layers), str(s_layers), str(s_layers))
    summary.add_row("parameters", f"{t_params / 1e6:.1f}M", f"{s_params / 1e6:.1f}M", f"{s_params / 1e6:.1f}M")
    summary.add_row("test accuracy", _pct(t_acc), _pct(s_acc), _pct(b_acc))
    summary.add_row("test macro-F1", _pct(t_f1), _pct(s_f1), _pct(b_f1))
    if "teacher" in ort_res:
        for shape in ort_res["student"]["shapes"]:
            t = ort_res["teacher"]["shapes"][shape]["p50_ms"]
            s = ort_res["student"]["shapes"][shape]["p50_ms"]
            lines.append(
                f"- speed-up at {shape} (onnxruntime p50, teacher / student): **{t / s:.2f}x** "
                f"({t:.2f} ms -> {s:.2f} ms)"
            )
            summary.add_row(f"ORT p50 {shape}", f"{t:.2f} ms", f"{s:.2f} ms ({t / s:.2f}x)", "")
        for name in ort_res:
            lines.append(
                f"- {name}: session init {ort_res[name]['session_init_ms']:.0f} ms, model "
                f"{ort_res[name]['model_bytes'] / 2**20:.1f} MiB"
            )
    lines += [
        "",
        "![latency](latency.png)",
        "",
        f"Environment: {distill.environment['device']}, torch {distill.environment['packages']['torch']}, "
        f"onnxruntime {export.environment['packages']['onnxruntime']}, kdpipe {export.kdpipe_version} "
        f"(git {str(export.environment.get('git_sha'))[:10]}).",
        "",
    ]
    for png in ("training.png", "cka.png"):
        if (distill.dir / png).is_file():
            shutil.copyfile(distill.dir / png, work / png)
    path = work / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return Report(path=path, summary=summary)


def plot_cka(matrix: Any, path: Path) -> None:
    """Teacher layer x student layer linear CKA heat map (METHODS.md 3.3)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * matrix.shape[1], 1.0 + 0.5 * matrix.shape[0]))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                f"{matrix[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] < 0.6 else "black",
            )
    ax.set_xlabel("student hidden state (0 = embeddings)")
    ax.set_ylabel("teacher hidden state")
    ax.set_title("linear CKA, teacher x student")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
