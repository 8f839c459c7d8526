"""`kdpipe search` against the edge bar, measured side by side in one run.

    python benchmarks/search.py --recipe edge --out runs/edge --hours 0.55 \
        --results benchmarks/results/search.json

Runs `kdpipe search RECIPE --profile edge --out OUT` (skipped with --report-only: the last search's report is
read), then times in fresh processes, interleaved over rounds (kdpipe.profiling.timing, as benchmarks/edge.py
does): the teacher in PyTorch fp32 eager and as fp32 ONNX (exported here with kdpipe's exporter), the searched
best (or, when none meets the budgets, the most accurate trained candidate) and the hand-tuned `stages/edge.yaml`
point when the search trained it (3 layers, heads -50%, FFN -75%, 3 epochs). Prints the bar's three ratios
(>= 10x faster than teacher eager at 1x128 on 2 threads, >= 8x smaller than its fp32 ONNX, >= 97% of its test
accuracy) for each, and where the search's time went.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from edge import BAR, _job  # noqa: E402  (benchmarks/ is not a package)

from kdpipe.artifacts.manifest import read_manifest  # noqa: E402
from kdpipe.artifacts.records import ExportRecord, record  # noqa: E402
from kdpipe.env import cpu_model  # noqa: E402
from kdpipe.profiling.timing import interleaved  # noqa: E402

HAND = {"layers": 3, "heads_removed": 0.5, "ffn_removed": 0.75, "epochs": 3.0}  # stages/edge.yaml's own point


def _search(args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "kdpipe.cli", "search", args.recipe, "--profile", args.profile, "--out", str(args.out)]
    if args.hours:
        cmd += ["--hours", str(args.hours)]
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def _deployed(root: Path, precision: str) -> tuple[Path, int, float, int]:
    """(onnx path, bytes, gate accuracy, vocab size) of a trained candidate's deployed variant."""
    export = read_manifest(root / "export", "export")
    name = "student" if precision == "fp32" else f"student-{precision}"
    m = record(export, ExportRecord).models[name]
    path = export.path(m.onnx)
    distill = read_manifest(root / "distill", "distill")
    vocab = json.loads(distill.path("model/config.json").read_text())["vocab_size"]
    acc = m.gate.value if m.gate is not None else distill.metric("test_accuracy")
    return path, path.stat().st_size, float(acc), int(vocab)


def _picks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    done = [r for r in report["candidates"] if r["state"] == "complete"]
    picks: dict[str, dict[str, Any]] = {}
    if report["best"]:
        picks["search:best"] = next(r for r in done if r["key"] == report["best"])
    elif done:
        picks["search:most-accurate"] = max(done, key=lambda r: r["figures"].get("accuracy", -1))
    hand = [r for r in done if all(r[k] == v for k, v in HAND.items())]
    if hand:
        picks["hand:stages/edge.yaml"] = hand[0]
    return picks


def measure(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    from kdpipe.tasks.classification.export import export_onnx

    teacher = read_manifest(args.out / "teacher", "teacher")
    t_dir = teacher.path("model/config.json").parent
    t_vocab = json.loads((t_dir / "config.json").read_text())["vocab_size"]
    t_onnx = args.out / "search" / "bench" / "teacher"
    if not (t_onnx / "model.onnx").is_file():
        export_onnx(t_dir, t_onnx, 18)
    shape = [int(x) for x in args.shape.split("x")]
    jobs = {
        "teacher:torch-eager": _job(t_dir, "torch", args.threads, shape, t_vocab, args),
        "teacher:onnx-fp32": _job(t_onnx / "model.onnx", "onnxruntime", args.threads, shape, t_vocab, args),
    }
    students = {}
    for name, row in _picks(report).items():
        path, size, acc, vocab = _deployed(args.out / row["root"], row["precision"])
        jobs[name] = _job(path, "onnxruntime", args.threads, shape, vocab, args)
        students[name] = {"key": row["key"], "bytes": size, "accuracy": acc, **{k: row[k] for k in HAND}}
    timed = interleaved(jobs, args.rounds)
    key = f"{shape[0]}x{shape[1]}"
    return {
        "shape": key,
        "threads": args.threads,
        "rounds": args.rounds,
        "teacher_accuracy": teacher.metric("test_accuracy"),
        "teacher_onnx_bytes": (t_onnx / "model.onnx").stat().st_size,
        "p50_ms": {n: r["shapes"][key]["p50_ms"] for n, r in timed.items()},
        "cov": {n: r["shapes"][key]["cov"] for n, r in timed.items()},
        "students": students,
    }


def lines(res: dict[str, Any], report: dict[str, Any]) -> list[str]:
    eager = res["p50_ms"]["teacher:torch-eager"]
    out = [
        "| model | layers | heads -% | FFN -% | epochs | size MiB | test accuracy | p50 ms | CoV | vs eager | smaller "
        "| retention | bar |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in ("teacher:torch-eager", "teacher:onnx-fp32"):
        size = f"{res['teacher_onnx_bytes'] / 2**20:.1f}" if "onnx" in n else ""
        out.append(
            f"| {n} | 6 | | | | {size} | {100 * res['teacher_accuracy']:.2f}% | {res['p50_ms'][n]:.2f} "
            f"| {res['cov'][n]:.3f} | {eager / res['p50_ms'][n]:.2f}x | | | |"
        )
    for n, s in res["students"].items():
        speed, smaller = eager / res["p50_ms"][n], res["teacher_onnx_bytes"] / s["bytes"]
        ret = s["accuracy"] / res["teacher_accuracy"]
        ok = speed >= BAR["speedup"] and smaller >= BAR["smaller"] and ret >= BAR["retention"]
        out.append(
            f"| {n} (`{s['key']}`) | {s['layers']} | {s['heads_removed']:.0%} | {s['ffn_removed']:.1%} | "
            f"{s['epochs']:g} | {s['bytes'] / 2**20:.1f} | {100 * s['accuracy']:.2f}% | {res['p50_ms'][n]:.2f} | "
            f"{res['cov'][n]:.3f} | {speed:.2f}x | {smaller:.2f}x | {100 * ret:.1f}% | {'met' if ok else 'NOT met'} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="edge")
    ap.add_argument("--profile", default="edge")
    ap.add_argument("--out", type=Path, default=Path("runs/edge"))
    ap.add_argument("--hours", type=float, default=None)
    ap.add_argument("--report-only", action="store_true", help="do not search: read the last search's report")
    ap.add_argument("--shape", default="1x128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-runs", type=int, default=60)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/search.json"))
    args = ap.parse_args()
    seconds = None if args.report_only else _search(args)
    report = json.loads((args.out / "search" / "report.json").read_text())
    res = measure(args, report)
    res.update(search_seconds=seconds or report["seconds"], cpu=cpu_model(), report=report)
    cpu = res["cpu"]
    text = [
        "# `kdpipe search` against the edge bar, measured side by side",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"CPU: {cpu['model']}, flags {', '.join(cpu['flags']) or 'none of the int8 ones'}. Each model timed in its "
        f"own processes, {args.rounds} interleaved rounds, {args.threads} threads, {res['shape']}; medians. The "
        f"search took {res['search_seconds'] / 60:.1f} min (`{args.out}/search/report.md` has every candidate).",
        "",
        *lines(res, report),
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    args.results.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
