"""How much of the teacher each process holds when `distill.teacher_shard` splits it with FSDP2, and that the
sharded teacher still gives the unsharded outputs. Runs itself under torchrun with N processes on the CPU (gloo)
and writes benchmarks/results/teacher-memory.md.

    python benchmarks/teacher_memory.py --teacher runs/default/teacher/model --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    import torch

    from kdpipe.models.loading import forward_kd, load_classifier, load_tokenizer
    from kdpipe.train import distributed

    w = distributed.join("cpu")
    teacher = load_classifier(Path(args.teacher)).eval()
    tok = load_tokenizer(Path(args.teacher))
    texts = ["the road is long today", "I love this great city", "what an awful crash", "so sad"] * 4
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        ref = forward_kd(teacher, batch, hidden=True)
    memory = distributed.shard_teacher(teacher)
    with torch.no_grad():
        out = forward_kd(teacher, batch, hidden=True)
    diff = max(
        float((out.logits - ref.logits).abs().max()),
        *(float((a - b).abs().max()) for a, b in zip(out.hidden_states or (), ref.hidden_states or (), strict=True)),
    )
    rows = distributed.gather({"rank": w.rank, **memory, "max_abs_diff": diff})
    if w.main:
        Path(args.json).write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/default/teacher/model")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher-memory.md"))
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    out_json = Path(args.out).with_suffix(".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += [__file__, "--worker", "--teacher", args.teacher, "--json", str(out_json)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit("failed")
    rows = json.loads(out_json.read_text())
    full = rows[0]["teacher_weight_bytes"]
    lines = [
        "# Teacher sharding (distill.teacher_shard, FSDP2 fully_shard) on the CPU",
        "",
        f"Command: `python benchmarks/teacher_memory.py {' '.join(sys.argv[1:])}` ({os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}); teacher `{args.teacher}`, {args.nproc} processes (gloo).",
        "",
        "| process | teacher weights held | share of the teacher | max abs diff vs unsharded (logits, hidden states) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        held = r["teacher_weight_bytes_per_process"]
        lines.append(f"| {r['rank']} | {held / 2**20:.1f} MiB | {100 * held / full:.1f}% | {r['max_abs_diff']:.2e} |")
    lines += ["", f"Unsharded, every process would hold all {full / 2**20:.1f} MiB."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
