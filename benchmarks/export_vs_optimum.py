"""kdpipe's CPU variants against the plain optimum-onnx route, on the same distilled student, in one run.

The optimum route is what an optimum user does with the student's PyTorch directory (in a temporary directory):
`ORTModelForSequenceClassification.from_pretrained(student, export=True)`, then `ORTOptimizer` at
`OptimizationConfig(optimization_level=2)`, then `ORTQuantizer` dynamic int8 with the `AutoQuantizationConfig`
preset that fits this CPU (avx512_vnni / avx512 / avx2, read from /proc/cpuinfo). When the quantizer fails on the
O2 graph (a known failure with onnxruntime 1.32: "Unable to find data type for weight_name=..."), the error is
reported verbatim and the fallback optimum users take (quantize the unoptimised export) is measured too.

Every model is timed in a fresh process by kdpipe's worker (`kdpipe.profiling.timing.interleaved`), all of them
interleaved over `--rounds` rounds so that machine noise hits all alike; accuracy is measured on the run's whole test
split, agreement against kdpipe's fp32 PyTorch student. The script prints (and writes as JSON and Markdown) size, test
accuracy, agreement, p50 / p90 / CoV per shape, and the ratio optimum_best_p50 / kdpipe_best_p50 per shape
(> 1: kdpipe is faster). "Best" is the fastest (geometric mean of p50 over the shapes) variant that passed
kdpipe's gate; for optimum, the fastest that reaches the same accuracy budget.

    .venv/bin/python benchmarks/export_vs_optimum.py --run runs/default [--threads 2] [--shape 1x128,8x64]
        [--rounds 3] [--out benchmarks/results/export_vs_optimum.json]

Quick check on a tiny run: add `--rounds 1 --min-runs 10 --min-seconds 0.2` and shapes within its positions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SHAPES = "1x128,8x64"
EVAL_BATCH = 64
TIE = 0.03  # ratios within 3% of 1 are called even
SKIP_VARIANTS = ("fp16",)  # a GPU variant: not a CPU contender


@dataclass
class Row:
    """One model of the comparison; `path` is None when the route failed to produce it (`error`)."""

    label: str
    route: str  # "kdpipe" | "optimum"
    path: Path | None
    file: str = ""  # where the model is: relative to the run (kdpipe), or to the temp dir of the optimum route
    gated: bool = False  # passed kdpipe's gate (kdpipe rows) / reached kdpipe's accuracy budget (optimum rows)
    note: str = ""
    error: str | None = None
    size_mib: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    gate_accuracy: float | None = None  # what kdpipe's gate measured (a cross-check of this script's accuracy)


@dataclass(frozen=True)
class RunInfo:
    student_dir: Path
    test_path: Path
    max_length: int
    budget: float  # the accuracy kdpipe's gates asked for (accuracy_budget x the PyTorch student's accuracy)
    rows: list[Row]


# ---------------------------------------------------------------- arguments


def parse_shapes(values: list[str] | None) -> list[list[int]]:
    """`--shape` values ('BxT', repeatable or comma separated) as [[batch, seq], ...]."""
    shapes = []
    for part in ",".join(values or [DEFAULT_SHAPES]).split(","):
        if not part.strip():
            continue
        try:
            b, t = (int(x) for x in part.lower().strip().split("x"))
        except ValueError:
            raise SystemExit(f"--shape {part!r}: expected BATCHxSEQ, e.g. 1x128") from None
        if b < 1 or t < 1:
            raise SystemExit(f"--shape {part!r}: batch and seq must be >= 1")
        shapes.append([b, t])
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished kdpipe run root (teacher/, distill/, export/)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (timing and evaluation)")
    ap.add_argument("--shape", action="append", help=f"BATCHxSEQ, repeatable or comma list (default {DEFAULT_SHAPES})")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (each model in its own process)")
    ap.add_argument("--min-runs", type=int, default=60, help="timed runs per model and shape, over all rounds")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per model and shape, all rounds")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per shape in each worker")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export_vs_optimum.json"))
    args = ap.parse_args(argv)
    args.shapes = parse_shapes(args.shape)
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be >= 1")
    return args


def cpuinfo(key: str) -> str:
    """The first `key` line of /proc/cpuinfo ('' when there is none, e.g. not Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return ""


def cpu_preset() -> tuple[str, str]:
    """The AutoQuantizationConfig preset for this CPU and why: avx512_vnni, avx512 (avx512f) or avx2."""
    flags = set(cpuinfo("flags").split())
    if "avx512_vnni" in flags:
        return "avx512_vnni", "cpu flag avx512_vnni"
    if "avx512f" in flags:
        return "avx512", "cpu flag avx512f (no avx512_vnni)"
    return "avx2", "no avx512f in /proc/cpuinfo flags" if flags else "no /proc/cpuinfo flags: assumed avx2"


# ---------------------------------------------------------------- the kdpipe side


def kdpipe_rows(run: Path) -> RunInfo:
    """The run's student directory, test split, and one row per student ONNX variant kdpipe exported."""
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.artifacts.records import ExportRecord, TeacherRecord, record
    from kdpipe.compress.quantize import VARIANTS

    teacher = read_manifest(run / "teacher", "teacher")
    student_dir = read_manifest(run / "distill", "distill").path("model/config.json").parent
    export = read_manifest(run / "export", "export")
    models = record(export, ExportRecord).models
    rows, budgets = [], []
    mine = [n for n, m in models.items() if (n == "student" or m.of == "student") and m.variant not in SKIP_VARIANTS]
    for name in sorted(mine, key=lambda n: VARIANTS.index(models[n].variant)):
        m = models[name]
        ok = m.gate.ok if m.gate is not None else m.parity.ok
        label = "kdpipe fp32" if m.variant == "fp32" else f"kdpipe {m.variant}"
        note = f"{name}: gate {'ok' if ok else 'FAILED'}"
        gate_acc = m.gate.value if m.gate is not None else None
        row = Row(label, "kdpipe", export.path(m.onnx), f"export/{m.onnx}", ok, note, gate_accuracy=gate_acc)
        rows.append(row)
        budgets += [m.gate.budget] if m.gate is not None else []
    if not rows:
        raise SystemExit(f"{run / 'export'}: the export record has no student variants")
    tr = record(teacher, TeacherRecord)
    return RunInfo(student_dir, teacher.path("data/test.jsonl"), tr.max_length, max(budgets, default=0.0), rows)


# ---------------------------------------------------------------- the optimum route


def _verbatim(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _onnx_in(directory: Path) -> Path:
    """The one .onnx file a save directory holds."""
    found = sorted(directory.glob("*.onnx"))
    if len(found) != 1:
        raise RuntimeError(f"{directory}: expected one .onnx file, found {[p.name for p in found]}")
    return found[0]


def _quantize(src: Path, dst: Path, preset: str) -> Path:
    """ORTQuantizer's dynamic int8 (per-tensor) of the one model in `src` with this CPU's preset."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qconfig = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
    ORTQuantizer.from_pretrained(src, file_name=_onnx_in(src).name).quantize(qconfig, dst)
    return _onnx_in(dst)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Run in `path` (onnxruntime's quantizer leaves temporary files in the working directory when it fails)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _step(label: str, make: Callable[[], Path], note: str) -> Row:
    """A row for one step of the optimum route: its model, or its error verbatim (not fatal: the comparison
    is about what the route gives)."""
    try:
        path = make()
        return Row(label, "optimum", path, f"{path.parent.name}/{path.name}", note=note)
    except Exception as e:
        return Row(label, "optimum", None, error=_verbatim(e))


def _optimize_o2(src: Path, dst: Path) -> Path:
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    ORTOptimizer.from_pretrained(src).optimize(OptimizationConfig(optimization_level=2), dst)
    return _onnx_in(dst)


def optimum_route(student_dir: Path, work: Path, preset: str) -> list[Row]:
    """Export, O2, O2 + int8 and (when that fails) int8 of the unoptimised export, each in `work`."""
    from optimum.onnxruntime import ORTModelForSequenceClassification

    with _cwd(work), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript tracer's constant warnings
        ORTModelForSequenceClassification.from_pretrained(student_dir, export=True).save_pretrained(work / "export")
        rows = [_step("optimum O2", lambda: _optimize_o2(work / "export", work / "o2"), "ORTOptimizer O2")]
        q_note = f"ORTQuantizer dynamic int8, {preset} preset, per-tensor, of the "
        if rows[0].path is not None:
            quantized = partial(_quantize, work / "o2", work / "o2-int8", preset)
            rows.append(_step("optimum O2+int8", quantized, q_note + "O2 graph"))
        if rows[-1].path is None:
            fb = _step(
                "optimum int8 (fallback: unoptimised export)",
                lambda: _quantize(work / "export", work / "int8", preset),
                q_note + "plain export",
            )
            rows.append(fb)
    return rows


# ---------------------------------------------------------------- accuracy


def onnx_predictions(path: Path, enc: Any, threads: int) -> np.ndarray:
    """Argmax classes of an ONNX classifier on every example, in batches of EVAL_BATCH (zeros for any
    token_type_ids the graph asks for)."""
    import onnxruntime as ort

    from kdpipe.data.tables import batches

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    preds = []
    for batch in batches(enc, EVAL_BATCH, shuffle=False):
        ids = batch["input_ids"].numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": batch["attention_mask"].numpy().astype(np.int64)}
        feed = {i.name: feed.get(i.name, np.zeros_like(ids)) for i in session.get_inputs()}
        preds.append(session.run(None, feed)[0].argmax(-1))
    return np.concatenate(preds)


def torch_predictions(student_dir: Path, enc: Any, threads: int) -> np.ndarray:
    """Argmax classes of kdpipe's fp32 PyTorch student (the reference of kdpipe's gates)."""
    import torch

    from kdpipe.data.tables import batches
    from kdpipe.models.loading import load_classifier

    torch.set_num_threads(threads)
    model = load_classifier(student_dir).eval()
    preds = []
    with torch.inference_mode():
        for batch in batches(enc, EVAL_BATCH, shuffle=False):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            preds.append(out.logits.argmax(-1).numpy())
    return np.concatenate(preds)


def evaluate(rows: list[Row], info: RunInfo, threads: int) -> float:
    """Size, test accuracy and agreement with the PyTorch student of each row; returns the student's accuracy."""
    from kdpipe.data.tables import encode, read_split
    from kdpipe.models.loading import load_tokenizer, quiet_transformers

    quiet_transformers()
    split = read_split(info.test_path)
    enc = encode(load_tokenizer(info.student_dir), split, info.max_length)
    labels = np.asarray(split.labels)
    reference = torch_predictions(info.student_dir, enc, threads)
    for row in rows:
        if row.path is None:
            continue
        preds = onnx_predictions(row.path, enc, threads)
        row.size_mib = sum(p.stat().st_size for p in row.path.parent.glob(row.path.name + "*")) / 2**20
        row.accuracy = float((preds == labels).mean())
        row.agreement = float((preds == reference).mean())
        if row.route == "optimum":
            row.gated = row.accuracy >= info.budget
        elif row.gate_accuracy is not None and abs(row.gate_accuracy - row.accuracy) > 1e-9:
            row.note += f" (its gate measured accuracy {row.gate_accuracy:.4f})"
    return float((reference == labels).mean())


# ---------------------------------------------------------------- timing


def time_rows(rows: list[Row], args: argparse.Namespace, vocab_size: int) -> None:
    """p50 / p90 / CoV per shape of every row that has a model, each in its own worker, interleaved."""
    from kdpipe.profiling.timing import interleaved

    base = {
        "engine": "onnxruntime",
        "intra_op_threads": args.threads,
        "inter_op_threads": 1,
        "graph_optimization_level": "all",
        "providers": ["CPUExecutionProvider"],
        "shapes": args.shapes,
        "vocab_size": vocab_size,
        "warmup": args.warmup,
        "min_runs": args.min_runs,
        "min_seconds": args.min_seconds,
        "profile_ops": False,
    }
    jobs = {r.label: {**base, "model": str(r.path)} for r in rows if r.path is not None}
    results = interleaved(jobs, args.rounds)
    for row in rows:
        if row.label in results:
            row.latency = results[row.label]["shapes"]


def geomean_p50(row: Row) -> float:
    return math.exp(sum(math.log(s["p50_ms"]) for s in row.latency.values()) / len(row.latency))


def best(rows: list[Row], route: str) -> Row | None:
    """The fastest row of `route` that passed its gate (geometric mean of p50 over the shapes)."""
    fit = [r for r in rows if r.route == route and r.gated and r.latency]
    return min(fit, key=geomean_p50) if fit else None


# ---------------------------------------------------------------- the report


def ratios(k: Row | None, o: Row | None, keys: list[str]) -> dict[str, float]:
    """optimum_best_p50 / kdpipe_best_p50 per shape (> 1: kdpipe is faster)."""
    if k is None or o is None:
        return {}
    return {key: o.latency[key]["p50_ms"] / k.latency[key]["p50_ms"] for key in keys}


def verdict(k: Row | None, o: Row | None, ratio: dict[str, float]) -> str:
    """One honest line: which route's best was faster, per shape when it differs."""
    if k is None or o is None:
        return f"no verdict: {'kdpipe' if k is None else 'optimum'} has no timed model that passed the gate"
    faster = {key: "kdpipe" if r > 1 + TIE else "optimum" if r < 1 - TIE else "even" for key, r in ratio.items()}
    spans = ", ".join(f"{key} {r:.2f}x" for key, r in ratio.items())
    who = set(faster.values())
    cov = max(s["cov"] for r in (k, o) for s in r.latency.values())
    tail = f" (optimum/kdpipe p50: {spans}; max CoV of the two {cov:.0%})"
    if who == {"kdpipe"}:
        return f"kdpipe ({k.label}) is faster than the optimum route ({o.label}) at every shape" + tail
    if who == {"optimum"}:
        return f"the optimum route ({o.label}) is faster than kdpipe ({k.label}) at every shape" + tail
    if who == {"even"}:
        return f"kdpipe ({k.label}) and the optimum route ({o.label}) are even within {TIE:.0%}" + tail
    per = "; ".join(f"{key}: {w}" for key, w in faster.items())
    return f"mixed, {k.label} vs {o.label}: {per} (within {TIE:.0%} = even)" + tail


def _cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[Row], keys: list[str], ratio: dict[str, float], k: Row | None, o: Row | None) -> list[str]:
    """The Markdown table: one line per row, then the ratio line."""
    head = ["model", "file", "size MiB", "test acc", "agreement", *(f"p50 {s} ms (p90, CoV)" for s in keys), "note"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 3) + ["---"]) + "|",
    ]
    for r in rows:
        mark = " **(best)**" if r is k or r is o else ""
        lat = []
        for s in keys:
            st = r.latency.get(s)
            lat.append(f"{st['p50_ms']:.3f} ({st['p90_ms']:.3f}, {st['cov']:.0%})" if st else "-")
        short = r.route == "optimum" and r.accuracy is not None and not r.gated
        note = f"FAILED: {r.error}" if r.error else r.note + (", below kdpipe's accuracy budget" if short else "")
        cells = [
            r.label + mark,
            f"`{r.file}`" if r.file else "-",
            _cell(r.size_mib, ".2f"),
            _cell(r.accuracy, ".4f"),
            _cell(r.agreement, ".2%"),
        ]
        lines.append("| " + " | ".join([*cells, *lat, " ".join(note.replace("|", "/").split())]) + " |")
    rline = [f"**{ratio[s]:.2f}x**" if s in ratio else "-" for s in keys]
    lines.append(
        "| " + " | ".join(["optimum best / kdpipe best p50", "", "", "", "", *rline, "> 1: kdpipe faster"]) + " |"
    )
    return lines


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("onnxruntime", "optimum", "optimum-onnx", "transformers", "torch")}


def write_outputs(args: argparse.Namespace, rows: list[Row], summary: dict[str, Any], lines: list[str]) -> None:
    """The JSON results at --out and the Markdown table beside it (.md), the command line at the top of both."""
    command = shlex.join(sys.orig_argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, **summary, "rows": [{k: v for k, v in asdict(r).items() if k != "path"} for r in rows]}
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = [f"`{command}`", "", *summary["context"], "", *lines, "", f"Verdict: {summary['verdict']}", ""]
    args.out.with_suffix(".md").write_text("\n".join(md))


def context(args: argparse.Namespace, preset: tuple[str, str], student_acc: float, info: RunInfo) -> list[str]:
    libs = ", ".join(f"{p} {x}" for p, x in versions().items())
    host = cpuinfo("model name") or platform.processor() or platform.machine()
    return [
        f"Run `{args.run}`, student `{info.student_dir}`; {args.threads} intra-op thread(s), {args.rounds} "
        f"interleaved round(s), >= {args.min_runs} runs and {args.min_seconds:g} s per model and shape.",
        f"Host {host}; quantization preset {preset[0]} ({preset[1]}); {libs}.",
        f"fp32 PyTorch student test accuracy {student_acc:.4f}; accuracy budget of kdpipe's gates {info.budget:.4f} "
        "(optimum rows are held to it too); agreement = same class as the PyTorch student.",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from kdpipe.models.loading import load_config

    info = kdpipe_rows(args.run)
    cfg = load_config(info.student_dir)
    too_long = [s for s in args.shapes if s[1] > getattr(cfg, "max_position_embeddings", s[1])]
    if too_long:
        raise SystemExit(f"--shape {too_long}: longer than the student's {cfg.max_position_embeddings} positions")
    preset = cpu_preset()
    print(f"quantization preset: {preset[0]} ({preset[1]})", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdpipe-vs-optimum-") as tmp:
        print("optimum route: export, O2, int8 ...", flush=True)
        rows = info.rows + optimum_route(info.student_dir, Path(tmp), preset[0])
        for r in rows:
            if r.error:
                print(f"{r.label} FAILED: {r.error}", flush=True)
        print(f"accuracy on {info.test_path} ...", flush=True)
        student_acc = evaluate(rows, info, args.threads)
        print(f"timing {sum(r.path is not None for r in rows)} models x {args.rounds} round(s) ...", flush=True)
        time_rows(rows, args, int(cfg.vocab_size))
    keys = [f"{b}x{t}" for b, t in args.shapes]
    k, o = best(rows, "kdpipe"), best(rows, "optimum")
    ratio = ratios(k, o, keys)
    summary = {
        "context": context(args, preset, student_acc, info),
        "preset": preset[0],
        "best": {"kdpipe": k and k.label, "optimum": o and o.label},
        "ratio_optimum_over_kdpipe_p50": ratio,
        "verdict": verdict(k, o, ratio),
    }
    lines = table(rows, keys, ratio, k, o)
    print("\n".join(["", *summary["context"], "", *lines, "", f"Verdict: {summary['verdict']}"]))
    write_outputs(args, rows, summary, lines)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


def cli() -> None:
    """main(), with a kdpipe error (a missing stage, a failed timing worker) as one line and its hint."""
    from kdpipe.errors import KdpipeError

    try:
        main()
    except KdpipeError as e:
        raise SystemExit(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else "")) from None


if __name__ == "__main__":
    cli()
