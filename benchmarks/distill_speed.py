"""What a distillation epoch costs, side by side on the default teacher and student: one epoch of

  (a) plain student training on hard labels (no teacher),
  (b) online KD: the teacher runs forward on every batch,
  (c) KD from the teacher-output cache (built once before; its build time is printed apart),
  (d) (c) on 2 DDP processes (torchrun, gloo) at the same global batch, 1 thread each, against (c) in 1 process
      with every core.

Each mode runs in its own process through the distill stage's own code
(kdpipe.tasks.classification.distill._train_student), timing every optimiser step; the ratios are of the median step
times (the machine is noisy; medians travel), with the whole-epoch wall times beside them. Prints a Markdown table and
writes it, with the command, to benchmarks/results/distill-speed.md (and .json).

    python benchmarks/distill_speed.py --base runs/default

`--base` is a run root holding the teacher and student stages of the recipe (`kdpipe run` or `kdpipe teacher` +
`kdpipe student` make them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "a": "plain student training (hard labels, no teacher)",
    "b": "online KD (the teacher runs on every batch)",
    "c": "KD from the teacher-output cache",
    "ddp": "KD from the cache, 2 DDP processes",
}


def worker(args: argparse.Namespace) -> None:
    """One mode, in this process (or in each torchrun process for `ddp`)."""
    import torch
    from rich.console import Console

    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.artifacts.records import RunContext
    from kdpipe.config import load_profile, load_recipe
    from kdpipe.data.tables import subset
    from kdpipe.losses.objective import build_objective
    from kdpipe.losses.terms import CELoss
    from kdpipe.tasks.classification import distill
    from kdpipe.tasks.classification.pair import load_pair
    from kdpipe.train import distributed
    from kdpipe.train import loop as train_mod
    from kdpipe.train.loop import pick_device

    mode = args.worker
    sets = ["distill.epochs=1", "distill.baseline=false", "distill.cka_samples=0"]
    sets.append(f"distill.cache.use={'false' if mode == 'b' else 'true'}")
    recipe, _ = load_recipe(args.recipe, sets)
    cfg = recipe.distill
    threads = args.threads or cfg.threads
    if threads:
        torch.set_num_threads(int(threads))
    device = pick_device(cfg.device, cfg.precision)
    w = distributed.join(device.torch_device)
    console = Console(stderr=True, quiet=not w.main)
    ctx = RunContext(recipe.seed, console, load_profile(recipe.profile), cache_root=Path(args.cache_root))
    pair = load_pair(cfg, read_manifest(Path(args.base) / "student", "student"))
    data = subset(pair.splits["train"], args.examples)
    losses: list[Any] = [CELoss()] if mode == "a" else list(cfg.losses)
    objective = build_objective(losses, pair.loss_ctx, cfg.schedule)
    cache, info = None, None
    if mode in ("c", "ddp"):
        cache, info = distill._teacher_cache(cfg, pair, data, objective, device, Path(args.cache_root), ctx)
    times: list[float] = []
    real = train_mod._step

    def timed(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = real(*a, **kw)
        times.append(time.perf_counter() - start)
        return out

    train_mod._step = timed
    _, result, test = distill._train_student(MODES[mode], losses, cfg, pair, data, device, ctx, f"bench-{mode}", cache)
    if w.main:
        out = {
            "mode": mode,
            "processes": w.size,
            "threads": torch.get_num_threads(),
            "steps": result.steps,
            "examples": len(data),
            "step_seconds": times,
            "epoch_seconds": result.seconds,
            "samples_per_second": result.samples_per_second,
            "final_loss": result.final_loss,
            "test_accuracy": test.accuracy,
            "cache": info,
        }
        Path(args.json).write_text(json.dumps(out))


def run_mode(mode: str, args: argparse.Namespace, cache_root: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{mode}.json"
    common = ["--worker", mode, "--base", args.base, "--recipe", args.recipe, "--json", str(out)]
    common += ["--cache-root", str(cache_root), "--examples", str(args.examples)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if mode == "ddp":
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        cmd += [*common, "--threads", "1"]
    else:
        cmd = [sys.executable, __file__, *common]
    print(f"  {mode}: {MODES[mode]} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _pooled(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds: every step time pooled, the median round's wall time and throughput, the last round's
    loss and accuracy (the same in every round: same seed, same data)."""
    out = dict(rs[-1])
    out["step_seconds"] = [t for r in rs for t in r["step_seconds"]]
    out["epoch_seconds"] = statistics.median(r["epoch_seconds"] for r in rs)
    out["samples_per_second"] = statistics.median(r["samples_per_second"] for r in rs)
    out["rounds"] = len(rs)
    return out


def table(results: dict[str, dict[str, Any]], build: dict[str, Any] | None) -> str:
    med = {m: statistics.median(r["step_seconds"]) for m, r in results.items()}
    lines = [
        "| mode | processes x threads | median step (ms) | wall s per pass | samples/s | vs (a), median step | "
        "final loss | test accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in results.items():
        lines.append(
            f"| ({m}) {MODES[m]} | {r['processes']} x {r['threads']} | {1000 * med[m]:.1f} | {r['epoch_seconds']:.1f} "
            f"| {r['samples_per_second']:.1f} | {med[m] / med['a']:.2f} | {r['final_loss']:.4f} "
            f"| {100 * r['test_accuracy']:.2f}% |"
        )
    lines.append("")
    if "b" in med:
        lines.append(f"- **b/a = {med['b'] / med['a']:.2f}** (online KD over plain training, median step)")
    if "c" in med:
        c_a = med["c"] / med["a"]
        verdict = "reached" if c_a <= 1.2 else "NOT reached"
        lines.append(f"- **c/a = {c_a:.2f}** (KD from the cache over plain training; target <= 1.2: {verdict})")
        if build is not None:
            whole = results["c"]["epoch_seconds"] + build["build_seconds"]
            lines.append(
                f"- the cache's one teacher pass took {build['build_seconds']:.1f} s "
                f"({build['bytes_per_example']:.0f} bytes/example, {build['examples']} examples); counted into a "
                f"single epoch, (c + build)/a = {whole / results['a']['epoch_seconds']:.2f} by epoch wall time; "
                "every later epoch and every other student of this teacher reads it for free"
            )
    if "ddp" in med and "c" in med:
        lines.append(
            f"- **DDP speed-up = {med['c'] / med['ddp']:.2f}x** ((c) on 1 process x {results['c']['threads']} threads "
            f"over 2 processes x 1 thread, same global batch, median step)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/default", help="run root with the teacher and student stages")
    ap.add_argument("--recipe", default="default", help="recipe whose distill settings are timed")
    ap.add_argument("--examples", type=int, default=None, help="first N train examples (default: the whole split)")
    ap.add_argument("--modes", default="a,b,c,ddp", help="comma-separated subset of a,b,c,ddp")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode this many times, interleaved")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill-speed.md"))
    ap.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--cache-root", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.examples is None and not args.worker:
        args.examples = 10**9
    if args.worker:
        return worker(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="kdpipe-speed-") as tmp:
        cache_root = Path(tmp) / "cache"  # a fresh cache: the first (c) builds it (timed apart), the rest read it
        for r in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every mode alike
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for mode in modes:
                rounds[mode].append(run_mode(mode, args, cache_root, Path(tmp)))
    results = {m: _pooled(rs) for m, rs in rounds.items()}
    build = rounds["c"][0]["cache"] if "c" in rounds else None
    text = table(results, build)
    command = "python benchmarks/distill_speed.py " + " ".join(sys.argv[1:])
    header = (
        "# Distillation speed: plain training vs online KD vs KD from the teacher-output cache vs DDP\n\n"
        f"Command: `{command}` ({platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}). Every mode in its own process, through the distill stage's code, "
        f"{args.rounds} interleaved round(s) of one pass over {results[modes[0]]['examples']} examples each; ratios "
        "of the median step times over all rounds, wall time and samples/s the median round's.\n\n"
    )
    Path(args.out).write_text(header + text + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    print(header + text)


if __name__ == "__main__":
    main()
