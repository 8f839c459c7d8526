"""The edge bar, measured side by side in one run: the deployed student of an edge run against the teacher.

    python benchmarks/edge.py --run runs/edge --baseline runs/default --threads 2 --rounds 3 \
        --out benchmarks/results/edge.json

Every model is timed in its own fresh processes (kdpipe.profiling.timing), interleaved over rounds so that machine noise
hits all of them alike: the teacher in PyTorch fp32 eager and as fp32 ONNX, and every gated student variant of
the edge run (and of the --baseline run, a depth-only student, for the ablation). Sizes are the files on disk;
accuracies are each variant's export gate on the whole test split. Prints the three ratios of the bar (speed-up
at the shape, size ratio, retention) and the ablation: depth -> graph fusions -> int8 -> width + vocabulary.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import read_manifest
from kdpipe.artifacts.records import ExportRecord, StudentRecord, record
from kdpipe.profiling.timing import interleaved

BAR = {"speedup": 10.0, "smaller": 8.0, "retention": 0.97}


def _models(run: Path, tag: str) -> dict[str, dict[str, Any]]:
    """Every gated model of a run's export: its ONNX path, size, test accuracy, vocab size, and what it is."""
    export = read_manifest(run / "export", "export")
    student = record(read_manifest(run / "student", "student"), StudentRecord)
    distill_dir = read_manifest(run / "distill", "distill").path("model/config.json").parent
    vocab = json.loads((distill_dir / "config.json").read_text())["vocab_size"]
    out = {}
    for name, m in record(export, ExportRecord).models.items():
        if m.gate is None:
            continue
        path = export.path(m.onnx)
        out[f"{tag}:{name}"] = {
            "onnx": path,
            "bytes": path.stat().st_size,
            "accuracy": m.gate.value,
            "vocab": vocab,
            "layers": len(student.kept_layers),
            "width": student.width is not None,
            "pruned_vocab": student.vocab is not None,
            "variant": m.variant,
        }
    return out


def _job(model: Path, engine: str, threads: int, shape: list[int], vocab: int, args: argparse.Namespace) -> dict:
    return {
        "model": str(model),
        "engine": engine,
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "graph_optimization_level": "all",
        "providers": ["CPUExecutionProvider"],
        "shapes": [shape],
        "vocab_size": vocab,
        "warmup": 10,
        "min_runs": args.min_runs,
        "min_seconds": args.min_seconds,
        "profile_ops": False,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    teacher = read_manifest(args.run / "teacher", "teacher")
    t_export = read_manifest(args.run / "export", "export")
    t_rec = record(t_export, ExportRecord).models["teacher"]
    t_dir = teacher.path("model/config.json").parent
    t_vocab = json.loads((t_dir / "config.json").read_text())["vocab_size"]
    shape = [int(x) for x in args.shape.split("x")]
    students = _models(args.run, "edge")
    if args.baseline is not None:
        students.update(_models(args.baseline, "baseline"))
    jobs = {
        "teacher:torch-eager": _job(t_dir, "torch", args.threads, shape, t_vocab, args),
        "teacher:onnx-fp32": _job(t_export.path(t_rec.onnx), "onnxruntime", args.threads, shape, t_vocab, args),
        **{n: _job(m["onnx"], "onnxruntime", args.threads, shape, m["vocab"], args) for n, m in students.items()},
    }
    timed = interleaved(jobs, args.rounds)
    key = f"{shape[0]}x{shape[1]}"
    return {
        "shape": key,
        "threads": args.threads,
        "rounds": args.rounds,
        "teacher_accuracy": teacher.metric("test_accuracy"),
        "teacher_onnx_bytes": t_export.path(t_rec.onnx).stat().st_size,
        "p50_ms": {n: r["shapes"][key]["p50_ms"] for n, r in timed.items()},
        "cov": {n: r["shapes"][key]["cov"] for n, r in timed.items()},
        "students": {n: {k: v for k, v in m.items() if k != "onnx"} for n, m in students.items()},
        "deployed": f"edge:{args.deploy}",
        "python": platform.python_version(),
    }


def verdict(res: dict[str, Any]) -> list[str]:
    """The bar's three ratios for the deployed student, each against its target."""
    dep = res["students"][res["deployed"]]
    speedup = res["p50_ms"]["teacher:torch-eager"] / res["p50_ms"][res["deployed"]]
    smaller = res["teacher_onnx_bytes"] / dep["bytes"]
    retention = dep["accuracy"] / res["teacher_accuracy"]
    got = {"speedup": speedup, "smaller": smaller, "retention": retention}
    lines = []
    for what, value in got.items():
        ok = value >= BAR[what]
        shown = f"{100 * value:.1f}%" if what == "retention" else f"{value:.2f}x"
        target = f"{100 * BAR[what]:.0f}%" if what == "retention" else f"{BAR[what]:g}x"
        lines.append(f"- {what}: **{shown}** (target >= {target}): {'met' if ok else 'NOT met'}")
    res["bar"] = {k: round(v, 4) for k, v in got.items()}
    return lines


def table(res: dict[str, Any]) -> list[str]:
    shape, t_eager = res["shape"], res["p50_ms"]["teacher:torch-eager"]
    lines = [
        f"| model | layers | width pruned | vocab pruned | size MiB | test accuracy | p50 {shape} ms | CoV | "
        "speed-up vs teacher eager |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("teacher:torch-eager", "teacher:onnx-fp32"):
        size = res["teacher_onnx_bytes"] / 2**20 if "onnx" in name else float("nan")
        lines.append(
            f"| {name} | | | | {size:.1f} | {100 * res['teacher_accuracy']:.2f}% | {res['p50_ms'][name]:.2f} | "
            f"{res['cov'][name]:.3f} | {t_eager / res['p50_ms'][name]:.2f}x |"
        )
    for name, m in sorted(res["students"].items(), key=lambda kv: -res["p50_ms"][kv[0]]):
        lines.append(
            f"| {name} | {m['layers']} | {'yes' if m['width'] else 'no'} | {'yes' if m['pruned_vocab'] else 'no'} | "
            f"{m['bytes'] / 2**20:.1f} | {100 * m['accuracy']:.2f}% | {res['p50_ms'][name]:.2f} | "
            f"{res['cov'][name]:.3f} | {t_eager / res['p50_ms'][name]:.2f}x |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the edge run (e.g. runs/edge)")
    ap.add_argument("--baseline", type=Path, help="a depth-only run for the ablation (e.g. runs/default)")
    ap.add_argument("--deploy", default="student-int8-dynamic", help="the deployed variant of the edge run")
    ap.add_argument("--shape", default="1x128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-runs", type=int, default=60)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/edge.json"))
    args = ap.parse_args()
    res = measure(args)
    lines = [
        "# The edge bar, measured side by side",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Each model timed in its own processes, {args.rounds} interleaved rounds, {args.threads} threads, batch x seq "
        f"{res['shape']}; medians (p50). Accuracy: each variant's export gate on the whole test split.",
        "",
        *table(res),
        "",
        f"Deployed: `{res['deployed']}`.",
        "",
        *verdict(res),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
