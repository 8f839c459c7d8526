"""The embedding bar, measured side by side in one run: a finished sentence-embedding run's student against its teacher.

    HF_HUB_OFFLINE=1 python benchmarks/embedding.py --run /tmp/emb-run

Four engines, each timed in a fresh process of its own per round, the rounds interleaved in rotating order
(kdpipe.profiling.timing.rotation) so that drifting machine noise hits all of them alike: the teacher in PyTorch
eager (kdpipe.tasks.embedding.encoder.load_encoder on the teacher stage's model folder: the sentence-transformers
computation, backbone -> mean pooling -> L2 normalisation, torch.set_num_threads), the teacher's ONNX, and the
student's ONNX fp32 and int8 (the export stage's files, found through its manifest), all with the same number of
threads. The inputs are real held-out sentences of the run (the teacher stage's data/held_out.jsonl), tokenized by
each model's own tokenizer and padded / truncated to the sequence length; the timed calls cycle through several
such batches. Medians (p50) of every timed call of all rounds; the quality figures are the ones the run's
manifests recorded. Writes benchmarks/results/embedding.md and .json (every per-call time).

kdpipe.profiling.timing's own worker does not fit (it feeds synthetic ids, and for engine torch loads a classifier
head rather than the sentence encoder), so this script has its own worker, which reuses timing's time_runs,
latency_stats, rotation and peak_rss_mib. `--worker` is the per-process timing side: it reads one JSON job on
stdin and writes its result to the job's `out` file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
TARGET = {"speedup": 10.0, "retention": 97.0, "shape": "1x128", "model": "student-int8"}
ENGINES = ("teacher:torch-eager", "teacher:onnx", "student:onnx-fp32", "student:onnx-int8")
BATCHES = 8  # distinct batches per shape the timed calls cycle through


# ---------------------------------------------------------------- the worker (one engine, one fresh process)


def _cycle(calls: list[Any]) -> Any:
    state = {"i": 0}

    def step() -> Any:
        fn = calls[state["i"] % len(calls)]
        state["i"] += 1
        return fn()

    return step


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Load one engine, then per shape: `warmup` untimed calls and >= `min_runs` timed calls (and >= `min_seconds`)
    over the job's token batches; per-call wall times in seconds, and the first batch's embeddings for a cross-check.
    """
    from kdpipe.profiling.timing import peak_rss_mib, time_runs

    threads = int(job["threads"])
    feeds = np.load(job["feeds"])
    t0 = time.perf_counter()
    if job["engine"] == "torch":
        import torch

        from kdpipe.tasks.embedding.encoder import load_encoder

        torch.set_num_threads(threads)
        import_ms = (time.perf_counter() - t0) * 1e3
        rss_before = peak_rss_mib()
        t0 = time.perf_counter()
        encoder, _ = load_encoder(Path(job["model"]))
        init_ms = (time.perf_counter() - t0) * 1e3
        takes_types = encoder.takes_token_type_ids

        def make(arrays: dict[str, np.ndarray]) -> Any:
            batch = {k: torch.from_numpy(v) for k, v in arrays.items()}

            def call() -> np.ndarray:
                with torch.inference_mode():
                    return encoder(
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["token_type_ids"] if takes_types and "token_type_ids" in batch else None,
                    ).numpy()

            return call

        info = {
            "threads": torch.get_num_threads(),
            "attn_implementation": getattr(encoder.backbone.config, "_attn_implementation", None),
            "torch": torch.__version__,
        }
    else:
        import onnxruntime as ort

        import_ms = (time.perf_counter() - t0) * 1e3
        ort.set_default_logger_severity(3)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        rss_before = peak_rss_mib()
        t0 = time.perf_counter()
        session = ort.InferenceSession(job["model"], opts, providers=["CPUExecutionProvider"])
        init_ms = (time.perf_counter() - t0) * 1e3
        names = [i.name for i in session.get_inputs()]
        output = session.get_outputs()[0].name

        def make(arrays: dict[str, np.ndarray]) -> Any:
            feed = {k: v for k, v in arrays.items() if k in names}
            return lambda: session.run([output], feed)[0]

        info = {
            "threads": threads,
            "providers": session.get_providers(),
            "inputs": names,
            "onnxruntime": ort.__version__,
        }

    times: dict[str, list[float]] = {}
    first: dict[str, list[list[float]]] = {}
    first_run_ms = None
    for shape in job["shapes"]:
        n = int(feeds[f"{shape}/input_ids"].shape[0])
        calls = [make({k: feeds[f"{shape}/{k}"][i] for k in ("input_ids", "attention_mask", "token_type_ids")})
                 for i in range(n)]  # fmt: skip
        t0 = time.perf_counter()
        out = calls[0]()
        if first_run_ms is None:
            first_run_ms = (time.perf_counter() - t0) * 1e3
        first[shape] = np.asarray(out, dtype=np.float32)[:4].tolist()
        times[shape] = time_runs(_cycle(calls), int(job["warmup"]), int(job["min_runs"]), float(job["min_seconds"]))
    return {
        "engine": job["engine"],
        "model": job["model"],
        "import_ms": import_ms,
        "init_ms": init_ms,
        "first_run_ms": first_run_ms,
        "rss_before_model_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "times_s": times,
        "first_rows": first,
        **info,
    }


def worker_main() -> int:
    job = json.loads(sys.stdin.read())
    Path(job["out"]).write_text(json.dumps(worker(job)) + "\n")
    return 0


# ---------------------------------------------------------------- the parent


def cpu() -> dict[str, Any]:
    """lscpu's model name and which of FLAGS it lists."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                name = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"model": name, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def feeds(model_dir: Path, sentences: list[str], shapes: list[list[int]], path: Path) -> dict[str, Any]:
    """Tokenize held-out sentences with `model_dir`'s tokenizer (as load_encoder sets it up) into BATCHES batches per
    shape, padded / truncated to the shape's length; saved to `path` (npz, arrays (BATCHES, B, T) int64)."""
    from kdpipe.tasks.embedding.encoder import load_encoder

    _, tokenizer = load_encoder(model_dir)
    arrays: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    for b, t in shapes:
        need = BATCHES * b
        if len(sentences) < need:
            raise SystemExit(
                f"{need} held-out sentences needed for {BATCHES} batches of {b}, the run has {len(sentences)}"
            )
        enc = tokenizer(sentences[:need], padding="max_length", truncation=True, max_length=t, return_tensors="np")
        full = tokenizer(sentences[:need], truncation=False)["input_ids"]
        key = f"{b}x{t}"
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            if name in enc:
                arrays[f"{key}/{name}"] = enc[name].astype(np.int64).reshape(BATCHES, b, t)
        if f"{key}/token_type_ids" not in arrays:
            arrays[f"{key}/token_type_ids"] = np.zeros((BATCHES, b, t), dtype=np.int64)
        lengths = [len(x) for x in full]
        stats[key] = {
            "sentences": need,
            "median_tokens": float(statistics.median(lengths)),
            "max_tokens": max(lengths),
            "truncated": sum(n > t for n in lengths),
        }
    np.savez(path, **arrays)
    return {"stats": stats, "ids_sha": {k: hash(v.tobytes()) for k, v in arrays.items() if k.endswith("input_ids")}}


def busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_idle(busy: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) until the machine's busy CPU over one second is at most `busy` cores; the last
    sample."""
    deadline = time.time() + max_wait
    while True:
        b0, t0 = busy_s(), time.time()
        time.sleep(1.0)
        b1 = busy_s()
        if b0 is None or b1 is None:
            return 0.0
        cores = (b1 - b0) / (time.time() - t0)
        if cores <= busy or time.time() >= deadline:
            return cores
        print(f"waiting for an idle machine ({cores:.2f} cores busy)", flush=True)


def run_worker(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One worker process; its result plus its wall time and the CPU cores the rest of the machine kept busy
    meanwhile (machine busy time minus this process tree's, per wall second: ~0 on an otherwise idle machine)."""
    busy0, own0, t0 = busy_s(), os.times(), time.time()
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(job["threads"])
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0 or not Path(job["out"]).is_file():
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"worker for {job['model']} failed (status {proc.returncode}): {tail}")
    busy1, own1, wall = busy_s(), os.times(), time.time() - t0
    own = sum(own1[:4]) - sum(own0[:4])  # this process and its finished children, user + system
    res = json.loads(Path(job["out"]).read_text())
    res["wall_s"] = wall
    res["others_cores"] = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - own) / wall)
    return res


def quality(run: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Path], dict[str, Path]]:
    """Per engine: the quality figures the manifests recorded; the model each engine times; each engine's
    tokenizer folder."""
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.artifacts.records import ExportRecord, record

    teacher = read_manifest(run / "teacher", "teacher")
    distill = read_manifest(run / "distill", "distill")
    export = read_manifest(run / "export", "export")
    models = record(export, ExportRecord).models
    int8 = next(n for n, m in models.items() if m.variant == "int8-dynamic" and m.of == "student")
    t_dir = teacher.path("model/config.json").parent
    s_dir = distill.path("model/config.json").parent
    t_rho = teacher.metric("lee_spearman")
    t_gate_cos = export.metric("teacher_min_cosine")
    s_gate = models[int8].gate
    q = {
        "teacher:torch-eager": {"lee_spearman": t_rho, "retention": 100.0, "mean_cosine": 1.0, "recall_at_10": 1.0,
                                "source": "teacher manifest"},
        "teacher:onnx": {"lee_spearman": t_rho, "retention": 100.0, "mean_cosine": 1.0, "recall_at_10": 1.0,
                         "parity_min_cosine": t_gate_cos, "source": "teacher manifest (PyTorch)"},
        "student:onnx-fp32": {"lee_spearman": export.metric("student_onnx_lee_spearman"),
                              "retention": distill.metric("retention"), "mean_cosine": distill.metric("mean_cosine"),
                              "recall_at_10": distill.metric("recall_at_10"),
                              "source": "export manifest (ONNX Lee Spearman); distill manifest (retention, mean "
                                        "cosine, recall@10, PyTorch student)"},
        "student:onnx-int8": {"lee_spearman": s_gate.value if s_gate else None,
                              "retention": 100 * s_gate.value / t_rho if s_gate and t_rho else None,
                              "mean_cosine": None, "recall_at_10": None,
                              "min_cosine_vs_fp32": s_gate.agreement if s_gate else None,
                              "source": f"export manifest ({int8} gate: Lee Spearman; min cosine vs the fp32 student "
                                        "on 64 held-out sentences); mean cosine / recall@10 not recorded for int8"},
    }  # fmt: skip
    paths = {
        "teacher:torch-eager": t_dir,
        "teacher:onnx": export.path(models["teacher"].onnx),
        "student:onnx-fp32": export.path(models["student"].onnx),
        "student:onnx-int8": export.path(models[int8].onnx),
    }
    for name, p in paths.items():
        q[name]["file"] = str(p)
        q[name]["mib"] = p.stat().st_size / 2**20 if p.is_file() else None
    tok = {"teacher:torch-eager": t_dir, "teacher:onnx": t_dir, "student:onnx-fp32": s_dir, "student:onnx-int8": s_dir}
    return q, paths, tok


def cosine(a: list[list[float]], b: list[list[float]]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    c = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(c.min())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.profiling.timing import latency_stats, rotation
    from kdpipe.tasks.embedding.data import read_sentences

    shapes = [[int(x) for x in s.split("x")] for s in args.shapes.split(",")]
    keys = [f"{b}x{t}" for b, t in shapes]
    q, paths, tok = quality(args.run)
    teacher = read_manifest(args.run / "teacher", "teacher")
    held = teacher.path(teacher.record["info"]["held_out"])
    sentences = read_sentences(held)
    load = {"before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kdpipe-embbench-") as tmp:
        feed_files: dict[Path, Path] = {}
        feed_info: dict[str, Any] = {}
        for d in dict.fromkeys(tok.values()):
            feed_files[d] = Path(tmp) / f"feeds{len(feed_files)}.npz"
            feed_info[str(d)] = feeds(d, sentences, shapes, feed_files[d])
        same_ids = len({json.dumps(v["ids_sha"]) for v in feed_info.values()}) == 1
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in ENGINES}
        order: list[list[str]] = []
        for r in range(args.rounds):
            names = rotation(list(ENGINES), r)
            order.append(names)
            load[f"round{r}"] = os.getloadavg()
            for name in names:
                job = {
                    "engine": "torch" if name.endswith("torch-eager") else "onnxruntime",
                    "model": str(paths[name]),
                    "threads": args.threads,
                    "feeds": str(feed_files[tok[name]]),
                    "shapes": keys,
                    "warmup": args.warmup,
                    "min_runs": args.min_runs,
                    "min_seconds": args.min_seconds,
                    "out": str(Path(tmp) / f"{name.replace(':', '_')}-{r}.json"),
                }
                discarded = []
                while True:
                    wait_idle(args.busy, args.max_wait)
                    res = run_worker(job, args.timeout)
                    if (res["others_cores"] or 0.0) <= args.busy or len(discarded) >= args.retries:
                        break
                    discarded.append({k: v for k, v in res.items() if k != "first_rows"})
                    print(f"round {r + 1}/{args.rounds} {name}: other processes kept {res['others_cores']:.2f} cores "
                          "busy; timing it again", flush=True)  # fmt: skip
                res["discarded_attempts"] = discarded
                per[name].append(res)
                done = ", ".join(
                    f"{k} p50 {1e3 * statistics.median(res['times_s'][k]):.2f} ms ({len(res['times_s'][k])} calls)"
                    for k in keys
                )
                others = res["others_cores"] or 0.0
                print(f"round {r + 1}/{args.rounds} {name}: {done} [{res['wall_s']:.0f} s, others {others:.2f} cores]")
    load["after"] = os.getloadavg()
    stats = {
        n: {k: latency_stats([x for r in rs for x in r["times_s"][k]], int(k.split("x")[0])) for k in keys}
        for n, rs in per.items()
    }
    round_p50 = {n: {k: [1e3 * statistics.median(r["times_s"][k]) for r in rs] for k in keys} for n, rs in per.items()}
    checks = {
        "teacher torch vs onnx": {k: cosine(per[ENGINES[0]][0]["first_rows"][k], per[ENGINES[1]][0]["first_rows"][k])
                                  for k in keys},
        "student fp32 vs int8": {k: cosine(per[ENGINES[2]][0]["first_rows"][k], per[ENGINES[3]][0]["first_rows"][k])
                                 for k in keys},
    }  # fmt: skip
    return {
        "command": args.command,
        "run": str(args.run),
        "cpu": cpu(),
        "threads": args.threads,
        "rounds": args.rounds,
        "order": order,
        "warmup": args.warmup,
        "min_runs_per_process": args.min_runs,
        "min_seconds_per_process": args.min_seconds,
        "load_average": load,
        "busy": args.busy,
        "retries": args.retries,
        "max_wait": args.max_wait,
        "inputs": {"held_out": str(held), "held_out_sentences": len(sentences), "batches_per_shape": BATCHES,
                   "same_ids_teacher_student": same_ids, "tokens": next(iter(feed_info.values()))["stats"]},
        "quality": q,
        "stats": stats,
        "round_p50_ms": round_p50,
        "cross_check_min_cosine": checks,
        "engines": {n: {k: v for k, v in rs[0].items() if k not in ("times_s", "first_rows")} for n, rs in per.items()},
        "processes": {n: [{k: v for k, v in r.items() if k != "first_rows"} for r in rs] for n, rs in per.items()},
        "python": platform.python_version(),
    }  # fmt: skip


def _f(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def report(res: dict[str, Any]) -> list[str]:
    keys = list(next(iter(res["stats"].values())))
    p50 = {n: {k: s[k]["p50_ms"] for k in keys} for n, s in res["stats"].items()}
    eager, onnx = p50["teacher:torch-eager"], p50["teacher:onnx"]
    c, load, inp = res["cpu"], res["load_average"], res["inputs"]
    head = "| model | engine | MiB | Lee Spearman | retention | mean cosine | recall@10 |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    for k in keys:
        head += f" p50 ms {k} | vs teacher eager | vs teacher ONNX |"
        rule += "---:|---:|---:|"
    last = keys[-1]
    head += f" sentences/s {last} |"
    rule += "---:|"
    rows = [head, rule]
    for n in ENGINES:
        q = res["quality"][n]
        model, engine = n.split(":")
        cos = _f(q["mean_cosine"], ".4f") if q["mean_cosine"] is not None else (
            f"n/a ({q['min_cosine_vs_fp32']:.4f} min vs fp32)" if q.get("min_cosine_vs_fp32") else "n/a")  # fmt: skip
        mib = _f(q["mib"], ".1f") if engine != "torch-eager" else "n/a"
        row = (f"| {model} | {engine} | {mib} | {_f(q['lee_spearman'], '.4f')} | {_f(q['retention'], '.2f')}% | "
               f"{cos} | {_f(q['recall_at_10'], '.4f')} |")  # fmt: skip
        for k in keys:
            row += f" {p50[n][k]:.2f} | {eager[k] / p50[n][k]:.2f}x | {onnx[k] / p50[n][k]:.2f}x |"
        row += f" {res['stats'][n][last]['throughput_per_s']:.1f} |"
        rows.append(row)
    s = TARGET["shape"]
    speed = eager[s] / p50["student:onnx-int8"][s]
    kept = res["quality"]["student:onnx-int8"]["retention"] or float("nan")
    ok_speed, ok_kept = speed >= TARGET["speedup"], kept >= TARGET["retention"]
    spread = [
        f"| {n} | " + " | ".join(
            f"{min(res['round_p50_ms'][n][k]):.2f} - {max(res['round_p50_ms'][n][k]):.2f} "
            f"(CoV {res['stats'][n][k]['cov']:.3f}, {res['stats'][n][k]['runs']} calls)" for k in keys) + " |"
        for n in ENGINES
    ]  # fmt: skip
    eng = res["engines"]
    tok = inp["tokens"]
    procs = [(n, i, r.get("others_cores")) for n, rs in res["processes"].items() for i, r in enumerate(rs)]
    others = [c for _, _, c in procs if c is not None] or [float("nan")]
    top = max((p for p in procs if p[2] is not None), key=lambda p: p[2], default=None)
    busiest = "n/a" if top is None else f"during {top[0]} round {top[1] + 1}"
    rounds_load = ", ".join("/".join(f"{x:.2f}" for x in v) for k, v in load.items() if k.startswith("round"))
    lines = [
        "# The embedding bar, measured side by side",
        "",
        f"Command: `{res['command']}`",
        "",
        f"CPU: {c['model']} ({c['cores']} cores), flags {', '.join(c['flags']) or 'none'} (of "
        f"{', '.join(FLAGS)}; lscpu). Python {res['python']}, torch {eng['teacher:torch-eager'].get('torch')}, "
        f"onnxruntime {eng['teacher:onnx'].get('onnxruntime')}. Load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load['before'])}, after {'/'.join(f'{x:.2f}' for x in load['after'])}"
        f" (at the start of each round: {rounds_load}); these count the benchmark's own 2-thread workers. CPU kept "
        f"busy by other processes while each worker ran (machine busy time from /proc/stat minus the worker's own, "
        f"in cores): median {statistics.median(others):.2f}, max {max(others):.2f} ({busiest}); a worker is started "
        f"after a second with <= {res['busy']:g} cores busy (waiting up to {res['max_wait']:g} s) and timed again "
        f"(up to {res['retries']} times) when others kept more than {res['busy']:g} cores busy during it: "
        f"{sum(len(r.get('discarded_attempts', [])) for rs in res['processes'].values() for r in rs)} such attempts "
        "discarded (kept in the JSON).",
        "",
        f"Run: `{res['run']}`. Each engine timed in a fresh process of its own per round, {res['rounds']} rounds in "
        f"rotating order, {res['threads']} threads everywhere (torch.set_num_threads / OMP_NUM_THREADS; onnxruntime "
        f"intra-op {res['threads']}, inter-op 1, all graph optimisations, CPUExecutionProvider); per process "
        f"{res['warmup']} warm-up calls then >= {res['min_runs_per_process']} timed calls (and >= "
        f"{res['min_seconds_per_process']:g} s) per shape; p50 = median of every timed call of all rounds. Teacher "
        f"eager: kdpipe.tasks.embedding.encoder.load_encoder on the teacher stage's model folder (backbone -> mean "
        f"pooling -> L2 normalise, what SentenceTransformer computes; attention "
        f"`{eng['teacher:torch-eager'].get('attn_implementation')}`, torch.inference_mode). Inputs: the run's held-out "
        f"sentences ({inp['held_out_sentences']} in `{Path(inp['held_out']).name}`), {inp['batches_per_shape']} "
        f"distinct batches per shape cycled, tokenized by each model's tokenizer and padded / truncated to the length "
        f"(at {last}: median {tok[last]['median_tokens']:g} real tokens, max {tok[last]['max_tokens']}, "
        f"{tok[keys[-1]]['truncated']} of {tok[keys[-1]]['sentences']} truncated at {last}; teacher and student ids "
        f"{'identical' if inp['same_ids_teacher_student'] else 'DIFFERENT'}).",
        "",
        *rows,
        "",
        "Quality: the figures the run's manifests recorded (Lee Spearman on the Lee et al. 1,225 pairs; retention = "
        "Lee Spearman / the teacher's; mean cosine to the teacher and recall@10 of the teacher's neighbours on the "
        "held-out sentences). The teacher ONNX row repeats the teacher's figures (ONNX parity min cosine "
        f"{res['quality']['teacher:onnx']['parity_min_cosine']:.10f}); the student fp32 row's Lee Spearman is the "
        "ONNX graph's, its mean cosine / recall@10 the PyTorch student's (parity min cosine "
        "1.0); the int8 row's Lee Spearman is its export gate's, and the run recorded no mean cosine / recall@10 for "
        "it (its min cosine to the fp32 student on 64 held-out sentences instead).",
        "",
        "Cross-check on the first timed batch (min row cosine): "
        + "; ".join(
            f"{what} {', '.join(f'{k} {v:.6f}' for k, v in d.items())}"
            for what, d in res["cross_check_min_cosine"].items()
        )
        + ".",  # fmt: skip
        "",
        "Per-round p50 ms (min - max over rounds):",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
        *spread,
        "",
        "## The issue's target: \"a transformer student >= 10x faster than the teacher in PyTorch eager at 1x128 "
        "(int8), keeping >= 97% of the teacher's Lee Spearman\"",
        "",
        f"- speed: student int8 ONNX {p50['student:onnx-int8'][s]:.2f} ms vs teacher PyTorch eager {eager[s]:.2f} ms "
        f"at {s}: **{speed:.2f}x** (target >= {TARGET['speedup']:g}x): {'reached' if ok_speed else 'NOT reached'}"
        f" (vs the teacher's ONNX {onnx[s]:.2f} ms: {onnx[s] / p50['student:onnx-int8'][s]:.2f}x)",
        f"- quality: Lee Spearman {res['quality']['student:onnx-int8']['lee_spearman']:.4f} vs the teacher's "
        f"{res['quality']['teacher:torch-eager']['lee_spearman']:.4f}: **{kept:.2f}%** (target >= "
        f"{TARGET['retention']:g}%): {'reached' if ok_kept else 'NOT reached'}",
        f"- the target as a whole: **{'reached' if ok_speed and ok_kept else 'NOT reached'}**",
        "",
    ]
    res["target"] = {"speedup": speed, "retention": kept, "speedup_ok": ok_speed, "retention_ok": ok_kept}
    return lines


def main() -> None:
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished embedding run (kdpipe run embedding --out DIR)")
    ap.add_argument("--shapes", default="1x128,32x128", help="batch x seq, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-runs", type=int, default=30, help="timed calls per shape in every process")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="and at least this long per shape and process")
    ap.add_argument("--busy", type=float, default=0.25, help="cores other processes may keep busy during a worker")
    ap.add_argument("--retries", type=int, default=2, help="times a worker is re-run when others were busier")
    ap.add_argument("--max-wait", type=float, default=60, help="seconds to wait for an idle machine before a worker")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one worker process may take")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embedding.json")
    args = ap.parse_args()
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") else ""
    exe = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else "python"
    args.command = env + shlex.join([exe, *sys.argv])
    res = measure(args)
    lines = report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
