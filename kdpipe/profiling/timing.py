"""Latency of one model variant per fresh process, interleaved over rounds.

onnxruntime's spinning intra-op threads (and torch's thread pools) distort whatever else runs in the same
process, so each variant is timed by a worker process of its own: `python -m kdpipe.profiling.timing` reads one JSON
job on stdin and writes one JSON result on stdout. `run_job` runs one worker; `interleaved` runs every
variant `rounds` times in rotating order, so slow drifts of the machine hit all of them alike, and pools the
per-run times of all rounds.

Job (all times in seconds unless the key says `_ms`)::

    {"model": path (an .onnx file, or a model directory for engine "torch"),
     "engine": "onnxruntime" | "torch", "intra_op_threads": int, "inter_op_threads": int,
     "graph_optimization_level": "disable" | "basic" | "extended" | "all", "providers": [str, ...],
     "shapes": [[batch, seq], ...], "vocab_size": int, "warmup": int, "min_runs": int,
     "min_seconds": float, "profile_ops": bool,
     "loader": null | "package.module:function", "inputs": null | path of an .npz, "check_finite": bool}

Engine "torch" loads a HF sequence classifier from the directory, unless `loader` names a function
`f(model_dir: str) -> torch.nn.Module` (eval mode, called with the input arrays as keyword tensors): the worker
imports it by name, so it stays free of any task's code (the embedding task passes its sentence-encoder loader).
Inputs are synthetic (seeded random ids, full attention mask: `synthetic_feed`) unless `inputs` is an .npz of real
ones, arrays named "BxT/<input name>" of shape (batch, seq) for every timed shape (`inputs_key`); a graph takes
the arrays it names. With `check_finite` the first output at each shape must be finite (a model with NaN weights
is an error, never a latency).

Result of one worker::

    {"model", "engine", "started_at_s" (Unix time), "import_ms", "rss_before_model_mib",
     "session_init_ms", "first_run_ms", "providers", "threads", "times_s": {"BxT": [s, ...]},
     "peak_rss_mib", "top_ops": [{"op", "total_ms", "count", "share"}, ...]}

or `{"error": "..."}` with exit status 1. This module imports nothing from kdpipe but `kdpipe.errors`
(kdpipe.tasks.classification.profile imports it), and onnxruntime / torch / transformers only inside the worker.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import ConfigError, KdpipeError, ModelError

ENGINES = ("onnxruntime", "torch")
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
DEFAULTS: dict[str, Any] = {
    "engine": "onnxruntime",
    "intra_op_threads": 1,
    "inter_op_threads": 1,
    "graph_optimization_level": "all",
    "providers": ["CPUExecutionProvider"],
    "warmup": 5,
    "min_runs": 50,
    "min_seconds": 1.0,
    "profile_ops": False,
    "loader": None,
    "inputs": None,
    "check_finite": False,
}
PROFILE_RUNS = 5  # runs of the first shape in the separate op-profiling session
TOP_OPS = 10
MIN_RUNS_PER_ROUND = 5


# ---------------------------------------------- pure helpers (shared with kdpipe.tasks.classification.profile)


def latency_stats(times_s: list[float], batch: int) -> dict[str, float]:
    """p50/p90/p99/mean/std in ms, CoV, and throughput in samples/s from per-run wall times (seconds).

    The one definition of kdpipe's latency statistics (the profile stage's torch eager figures use it too)."""
    ms = np.asarray(times_s) * 1e3
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    return {
        "runs": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": mean,
        "std_ms": std,
        "cov": std / mean if mean else 0.0,
        "throughput_per_s": batch / (statistics.median(times_s)) if times_s else 0.0,
    }


def time_runs(fn: Callable[[], Any], warmup: int, min_runs: int, min_seconds: float) -> list[float]:
    """`warmup` untimed calls, then wall time (seconds) of each call until both `min_runs` calls and
    `min_seconds` seconds are done."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def synthetic_feed(batch: int, seq: int, vocab_size: int, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """int64 inputs of shape (batch, seq) for the input `names` a graph asks for: seeded random real-token
    ids (seeded), an all-ones attention mask, zero token types."""
    rng = np.random.RandomState(seed)
    low = 1000 if vocab_size > 2000 else 1
    ids = rng.randint(low, vocab_size, size=(batch, seq)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feed.items() if k in names}


def shape_key(shape: list[int]) -> str:
    """'BxT' for a [batch, seq] shape."""
    return f"{shape[0]}x{shape[1]}"


def inputs_key(shape: list[int], name: str) -> str:
    """The array name of input `name` at `shape` in a job's `inputs` .npz: 'BxT/name'."""
    return f"{shape_key(shape)}/{name}"


def job_feed(job: dict[str, Any], shape: list[int], names: list[str] | None) -> dict[str, np.ndarray]:
    """The int64 inputs of one shape: the job's real `inputs` (.npz) when it has them, else `synthetic_feed`.
    `names`: the inputs a graph asks for (None: every input the .npz holds at that shape, or ids and mask)."""
    batch, seq = shape
    if not job.get("inputs"):
        return synthetic_feed(batch, seq, job["vocab_size"], names or ["input_ids", "attention_mask"])
    prefix = shape_key(shape) + "/"
    with np.load(job["inputs"]) as npz:
        arrays = {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix)}
    wanted = names if names is not None else sorted(arrays)
    missing = [n for n in wanted if n not in arrays] or ([] if wanted else ["input_ids"])
    if missing:
        raise ModelError(f"{job['inputs']} has no {', '.join(missing)} at {shape_key(shape)}")
    feed = {n: np.ascontiguousarray(arrays[n], dtype=np.int64) for n in wanted}
    if any(v.shape != (batch, seq) for v in feed.values()):
        got = {n: list(v.shape) for n, v in feed.items()}
        raise ModelError(f"inputs at {shape_key(shape)} are not ({batch}, {seq}): {got}")
    return feed


def all_finite(out: Any) -> bool:
    """Whether every float in a model's output (arrays, tensors, and lists / tuples / dicts of them) is finite."""
    if isinstance(out, dict):
        return all(all_finite(v) for v in out.values())
    if isinstance(out, list | tuple):
        return all(all_finite(v) for v in out)
    if hasattr(out, "detach"):  # a torch tensor; torch is imported by the worker that made it
        out = out.detach().float().cpu().numpy()
    arr = np.asarray(out)
    return arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all())


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is VmHWM of /proc/self/status: ru_maxrss (KiB there) survives fork + exec, so a worker
    started by a big parent (pytest with torch loaded, the pipeline) would report the parent's peak as its
    own. Elsewhere ru_maxrss (bytes on macOS, KiB on the BSDs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def top_operators(events: list[dict[str, Any]], k: int = TOP_OPS) -> list[dict[str, Any]]:
    """The `k` operator types with the most kernel time in an onnxruntime profiling trace: total time (ms),
    number of kernel calls, and share of all node time (0..1)."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        name = str(e.get("name", ""))
        op = (e.get("args") or {}).get("op_name")
        if e.get("cat") != "Node" or not op or name.endswith(("_fence_before", "_fence_after")):
            continue
        totals[op] = totals.get(op, 0.0) + float(e.get("dur", 0))  # µs
        counts[op] = counts.get(op, 0) + 1
    whole = sum(totals.values())
    ranked = sorted(totals, key=lambda o: -totals[o])[:k]
    return [
        {"op": o, "total_ms": totals[o] / 1e3, "count": counts[o], "share": totals[o] / whole if whole else 0.0}
        for o in ranked
    ]


# ---------------------------------------------------------------- job validation


def normalize_job(job: dict[str, Any]) -> dict[str, Any]:
    """The job with defaults filled in and checked; raises ConfigError naming the bad key."""
    out = {**DEFAULTS, **job}
    missing = [k for k in ("model", "shapes", "vocab_size") if k not in job]
    if missing:
        raise ConfigError(f"timing job is missing {', '.join(missing)}", "give model, shapes and vocab_size")
    out["model"] = str(out["model"])
    if out["engine"] not in ENGINES:
        raise ConfigError(f"timing job for {out['model']}: unknown engine {out['engine']!r}", f"one of {ENGINES}")
    if out["graph_optimization_level"] not in LEVELS:
        raise ConfigError(
            f"timing job for {out['model']}: unknown graph_optimization_level {out['graph_optimization_level']!r}",
            f"one of {', '.join(LEVELS)}",
        )
    shapes = [[int(b), int(t)] for b, t in out["shapes"]]
    if not shapes or any(b < 1 or t < 1 for b, t in shapes):
        raise ConfigError(f"timing job for {out['model']}: shapes must be [batch, seq] >= 1", f"got {out['shapes']}")
    out["shapes"] = shapes
    for key in ("intra_op_threads", "inter_op_threads", "warmup", "min_runs", "vocab_size"):
        out[key] = int(out[key])
    out["min_seconds"] = float(out["min_seconds"])
    out["profile_ops"] = bool(out["profile_ops"])
    out["check_finite"] = bool(out["check_finite"])
    loader = out["loader"]
    if loader is not None and (not isinstance(loader, str) or not all(loader.partition(":")[::2])):
        raise ConfigError(f"timing job for {out['model']}: loader {loader!r} is not 'module:function'", "")
    if loader is not None and out["engine"] != "torch":
        raise ConfigError(f"timing job for {out['model']}: a loader is for engine torch", "drop it or use torch")
    out["inputs"] = None if out["inputs"] is None else str(out["inputs"])
    out["providers"] = [str(p) for p in out["providers"]]
    return out


# ---------------------------------------------------------------- the worker (runs in its own process)


def _ort_session(job: dict[str, Any], profile_dir: str | None = None) -> Any:
    """An onnxruntime session with the job's threads, optimisation level and providers; with profiling
    into `profile_dir` when given."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # no fallback banners; get_providers() records what ran
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = job["intra_op_threads"]
    opts.inter_op_num_threads = job["inter_op_threads"]
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[job["graph_optimization_level"]])
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort")
    return ort.InferenceSession(job["model"], opts, providers=job["providers"])


def _time_shapes(job: dict[str, Any], make_step: Callable[[list[int]], Callable[[], Any]]) -> dict[str, Any]:
    """First-run time (ms, the first call of the first shape, before any warm-up) and per-shape per-run wall
    times (seconds) of the steps `make_step(shape)` builds. With check_finite, a step whose first output is not
    finite is a ModelError (checked on an untimed call of each shape)."""
    first = make_step(job["shapes"][0])
    t0 = time.perf_counter()
    out = first()
    first_run_ms = (time.perf_counter() - t0) * 1e3
    times: dict[str, list[float]] = {}
    for s in job["shapes"]:
        step = first if s == job["shapes"][0] else make_step(s)
        if job["check_finite"] and not all_finite(out if step is first else step()):
            raise ModelError(
                f"its output at {shape_key(s)} is not finite (NaN or inf), so its latency "
                "is not a result", "check the model's weights (a diverged or corrupted model)",
            )  # fmt: skip
        times[shape_key(s)] = time_runs(step, job["warmup"], job["min_runs"], job["min_seconds"])
    return {"first_run_ms": first_run_ms, "times_s": times}


def _ort_top_ops(job: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Top operator types of a separate, profiling session over a few runs of the first shape."""
    feed = job_feed(job, job["shapes"][0], names)
    with tempfile.TemporaryDirectory(prefix="kdpipe-ortprof-") as tmp:
        session = _ort_session(job, tmp)
        for _ in range(PROFILE_RUNS + 1):  # the first run included: its kernels are the same ops
            session.run(None, feed)
        trace = session.end_profiling()
        events = json.loads(Path(trace).read_text())
    return top_operators(events if isinstance(events, list) else events.get("traceEvents", []))


def _ort_timed(job: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Session init (ms), first run, per-shape times, providers and peak RSS of one timed session, and the
    graph's input names; the session is released on return."""
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    session = _ort_session(job)
    init_ms = (time.perf_counter() - t0) * 1e3
    names = [i.name for i in session.get_inputs()]

    def make_step(shape: list[int]) -> Callable[[], Any]:
        feed = job_feed(job, shape, names)
        return lambda: session.run(None, feed)

    out = {"rss_before_model_mib": rss_before, "session_init_ms": init_ms, **_time_shapes(job, make_step)}
    out |= {"providers": session.get_providers(), "threads": job["intra_op_threads"], "peak_rss_mib": peak_rss_mib()}
    return out, names


def _run_onnxruntime(job: dict[str, Any]) -> dict[str, Any]:
    """One ONNX model: `_ort_timed`, then (profile_ops) the top operators of a separate profiling session;
    peak RSS is taken before that session exists, so it is the timed session's alone."""
    t0 = time.perf_counter()
    import onnxruntime  # noqa: F401

    import_ms = (time.perf_counter() - t0) * 1e3
    out, names = _ort_timed(job)
    top_ops = _ort_top_ops(job, names) if job["profile_ops"] else []
    return {"import_ms": import_ms, **out, "top_ops": top_ops}


def _load_torch(job: dict[str, Any]) -> Any:
    """The job's PyTorch model in eval mode: its `loader`'s (imported by name), else a HF sequence classifier with
    eager attention."""
    if job["loader"] is None:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(job["model"], attn_implementation="eager").eval()
    import importlib

    module, _, attr = job["loader"].partition(":")
    try:
        load = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"timing job for {job['model']}: loader {job['loader']} cannot be imported ({e})", "") from e
    return load(job["model"]).eval()


def _run_torch(job: dict[str, Any]) -> dict[str, Any]:
    """Load time (ms, as session_init_ms), first run and per-shape times of a model directory in PyTorch
    eager mode (inference_mode; `_load_torch`), fed input_ids and attention_mask (synthetic, as
    kdpipe.tasks.classification.profile feeds them) or the job's real inputs."""
    t0 = time.perf_counter()
    import torch

    import_ms = (time.perf_counter() - t0) * 1e3
    if job["intra_op_threads"] > 0:
        torch.set_num_threads(job["intra_op_threads"])
    if job["inter_op_threads"] > 0:
        torch.set_num_interop_threads(job["inter_op_threads"])
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    model = _load_torch(job)
    init_ms = (time.perf_counter() - t0) * 1e3

    def make_step(shape: list[int]) -> Callable[[], Any]:
        feed = job_feed(job, shape, None if job["inputs"] else ["input_ids", "attention_mask"])
        batch = {k: torch.from_numpy(v) for k, v in feed.items()}

        def step() -> Any:
            with torch.inference_mode():
                return model(**batch)

        return step

    timed = _time_shapes(job, make_step)
    out = {"import_ms": import_ms, "rss_before_model_mib": rss_before, "session_init_ms": init_ms, **timed}
    return out | {"providers": ["torch:cpu"], "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Time one job in THIS process (what `python -m kdpipe.profiling.timing` does); see the module docstring."""
    started = time.time()
    job = normalize_job(job)
    if not Path(job["model"]).exists():
        raise ModelError(f"{job['model']} does not exist")
    if job["inputs"] is not None and not Path(job["inputs"]).is_file():
        raise ModelError(f"its inputs {job['inputs']} do not exist")
    result = _run_torch(job) if job["engine"] == "torch" else _run_onnxruntime(job)
    return {"model": job["model"], "engine": job["engine"], "started_at_s": started, **result}


def main(worker: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> int:
    """Read one JSON job on stdin, write one JSON result (or {"error": ...}) on stdout; 0 on success, 1 not.
    `worker` runs the job (default run_worker; kdpipe.profiling.generation passes its generation worker).

    Anything a library prints while timing goes to stderr, so stdout carries only the result."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        result, code = (worker or run_worker)(json.loads(sys.stdin.read())), 0
    except KdpipeError as e:
        result, code = {"error": e.message}, 1
    except Exception as e:  # the worker reports any failure as JSON; run_job raises it as a kdpipe error
        result, code = {"error": f"{type(e).__name__}: {e}".strip()}, 1
    sys.stdout.flush()
    with os.fdopen(out_fd, "w") as out:
        out.write(json.dumps(result) + "\n")
    return code


# ---------------------------------------------------------------- the parent side


def _worker_env(job: dict[str, Any]) -> dict[str, str]:
    """This environment, with OMP_NUM_THREADS = the intra-op threads and this kdpipe first on PYTHONPATH.

    Time on an otherwise idle machine: on a loaded 2-core machine a 2-thread PyTorch forward whose OpenMP
    threads spin-wait was measured 10-200x slower than on an idle one (1.5 ms -> 15-400 ms)."""
    env = dict(os.environ)
    if int(job.get("intra_op_threads", DEFAULTS["intra_op_threads"])) > 0:
        env["OMP_NUM_THREADS"] = str(job.get("intra_op_threads", DEFAULTS["intra_op_threads"]))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _worker_message(proc: subprocess.CompletedProcess[str]) -> str:
    """The worker's own error message, or the tail of its stderr when it died without one."""
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return f"worker exited with status {proc.returncode} and no result" + (f": {tail}" if tail else "")


def run_job(
    job: dict[str, Any],
    timeout_s: float = 600,
    module: str = "kdpipe.profiling.timing",
    normalize: Callable[[dict[str, Any]], dict[str, Any]] = normalize_job,
) -> dict[str, Any]:
    """Time one job in a fresh `python -m <module>` process (default this one); the worker's result (module
    docstring). `module` / `normalize`: another workload's worker and job check (kdpipe.profiling.generation).

    Raises ConfigError for an invalid job, ModelError (naming the model) when the model is missing, the
    worker fails, or it runs past `timeout_s` seconds (it is killed)."""
    job = normalize(job)
    model = job["model"]
    if not Path(model).exists():
        raise ModelError(f"timing {model}: no such file or directory", "export the model first, or fix the path")
    cmd = [sys.executable, "-m", module]
    try:
        proc = subprocess.run(
            cmd, input=json.dumps(job), capture_output=True, text=True, timeout=timeout_s, env=_worker_env(job)
        )
    except subprocess.TimeoutExpired as e:
        raise ModelError(
            f"timing {model}: the worker ran past {timeout_s:g} s and was killed",
            "lower min_runs / min_seconds or the shapes, or raise the timeout",
        ) from e
    if proc.returncode != 0:
        raise ModelError(f"timing {model} failed: {_worker_message(proc)}", "check that the model loads and runs")
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise ModelError(f"timing {model}: the worker wrote no JSON result", proc.stderr[-500:]) from e
    return result


def rotation(names: list[str], r: int) -> list[str]:
    """Round r's order: the names starting at index r mod n."""
    if not names:
        return []
    k = r % len(names)
    return names[k:] + names[:k]


def _round_job(job: dict[str, Any], rounds: int, first: bool) -> dict[str, Any]:
    """The job one round runs: min_runs / rounds runs (at least 5), min_seconds / rounds seconds, and
    operator profiling only in the first round."""
    job = normalize_job(job)
    runs = max(MIN_RUNS_PER_ROUND, math.ceil(job["min_runs"] / rounds))
    return {
        **job,
        "min_runs": runs,
        "min_seconds": job["min_seconds"] / rounds,
        "profile_ops": job["profile_ops"] and first,
    }


def merge_rounds(job: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """One name's rounds pooled: latency_stats over all rounds' per-run times per shape, median init and
    first-run times (ms), max peak RSS and max model RSS (peak minus before-model, MiB)."""
    shapes: dict[str, dict[str, float]] = {}
    for b, t in normalize_job(job)["shapes"]:
        key = shape_key([b, t])
        shapes[key] = latency_stats([x for r in results for x in r["times_s"][key]], b)
    return {
        **pooled(results),
        "shapes": shapes,
        "top_ops": next((r["top_ops"] for r in results if r.get("top_ops")), []),
    }


def pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What every workload's rounds pool alike: median init and first-run times (ms), max peak RSS and max model RSS
    (peak minus before-model, MiB), the providers, the round count and each round's start."""
    return {
        "session_init_ms": statistics.median(r["session_init_ms"] for r in results),
        "first_run_ms": statistics.median(r["first_run_ms"] for r in results),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
        "model_rss_mib": max(r["peak_rss_mib"] - r["rss_before_model_mib"] for r in results),
        "providers": results[0]["providers"],
        "rounds": len(results),
        "started_at_s": [r.get("started_at_s") for r in results],
    }


def interleaved(jobs: dict[str, dict[str, Any]], rounds: int, timeout_s: float = 600) -> dict[str, dict[str, Any]]:
    """Each job `rounds` times, each run in a fresh process, round r in the order starting at name r mod n;
    per name the pooled statistics of `merge_rounds` (keys: session_init_ms, first_run_ms, peak_rss_mib,
    model_rss_mib, providers, shapes {"BxT": latency_stats}, top_ops, rounds, started_at_s)."""
    if rounds < 1:
        raise ConfigError(f"interleaved timing needs rounds >= 1, got {rounds}", "use rounds: 1 or more")
    names = list(jobs)
    per_name: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotation(names, r):
            per_name[name].append(run_job(_round_job(jobs[name], rounds, r == 0), timeout_s))
    return {name: merge_rounds(jobs[name], per_name[name]) for name in names}


if __name__ == "__main__":
    sys.exit(main())
