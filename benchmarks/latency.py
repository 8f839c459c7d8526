"""Student vs teacher and onnxruntime vs PyTorch eager, measured side by side in one process.

Runs alternate between teacher and student in blocks, one engine at a time (onnxruntime's spinning
worker threads would otherwise slow whatever runs next), so that drifting machine noise hits both
alike. The script prints median latencies and their ratios, which travel between machines where
absolute times do not.

    python benchmarks/latency.py runs/default [--threads 2] [--runs 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a kdpipe output root with export/ (e.g. runs/default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="interleaved runs per engine and shape")
    ap.add_argument("--block", type=int, default=10, help="runs of one model before switching to the other")
    ap.add_argument("--shapes", default="1x32,1x128,8x64", help="batch x seq, comma separated")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.artifacts.records import ExportRecord, record
    from kdpipe.models.loading import load_classifier
    from kdpipe.tasks.classification.profile import model_source

    export = read_manifest(args.run_dir / "export", "export")
    torch.set_num_threads(args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    engines = {}
    for name, info in record(export, ExportRecord).models.items():
        sess = ort.InferenceSession(str(export.path(info.onnx)), opts, providers=["CPUExecutionProvider"])
        model = load_classifier(model_source(export, info)).eval()
        engines[name] = (sess, model)

    rng = np.random.RandomState(0)
    results = {}
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        ids = rng.randint(1000, 30000, size=(b, t)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        tfeed = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(b, t, dtype=torch.long)}
        calls = {}
        for name, (sess, model) in engines.items():
            names = {i.name for i in sess.get_inputs()}
            f = {k: v for k, v in feed.items() if k in names}
            calls[f"{name}/onnxruntime"] = lambda s=sess, f=f: s.run(None, f)
            calls[f"{name}/torch"] = lambda m=model, tf=tfeed: m(**tf)
        times: dict[str, list[float]] = {k: [] for k in calls}
        # one engine at a time (onnxruntime's spinning workers and torch's would slow each other), teacher
        # and student alternating in blocks within it so that drifting machine noise hits both alike
        for engine in ("onnxruntime", "torch"):
            phase = {k: fn for k, fn in calls.items() if k.endswith(engine)}
            with torch.inference_mode():
                for _ in range(10):
                    for fn in phase.values():
                        fn()
                for _ in range(max(1, args.runs // args.block)):
                    for key, fn in phase.items():
                        for _ in range(3):  # untimed: the other model's idle (spinning) workers go to sleep
                            fn()
                        for _ in range(args.block):
                            t0 = time.perf_counter()
                            fn()
                            times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        results[shape] = {
            "median_ms": med,
            "student_speedup_onnxruntime": med["teacher/onnxruntime"] / med["student/onnxruntime"],
            "student_speedup_torch": med["teacher/torch"] / med["student/torch"],
            "onnxruntime_vs_torch_student": med["student/torch"] / med["student/onnxruntime"],
            "onnxruntime_vs_torch_teacher": med["teacher/torch"] / med["teacher/onnxruntime"],
        }

    print(
        f"# latency medians, {args.runs} interleaved runs each, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        "| batch x seq | teacher ORT ms | student ORT ms | student speed-up (ORT) | student speed-up (torch) "
        "| ORT vs torch (student) | ORT vs torch (teacher) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape, r in results.items():
        m = r["median_ms"]
        print(
            f"| {shape} | {m['teacher/onnxruntime']:.2f} | {m['student/onnxruntime']:.2f} | "
            f"{r['student_speedup_onnxruntime']:.2f}x | {r['student_speedup_torch']:.2f}x | "
            f"{r['onnxruntime_vs_torch_student']:.2f}x | {r['onnxruntime_vs_torch_teacher']:.2f}x |"
        )
    if args.out:
        args.out.write_text(json.dumps({"args": sys.argv[1:], "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
