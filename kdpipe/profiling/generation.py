"""Greedy-generation latency of seq2seq models, one fresh process per model and round.

The generation workload of kdpipe.profiling.timing: the same worker protocol (`python -m kdpipe.profiling.generation`
reads one JSON job on stdin and writes one JSON result on stdout, through `timing.main`), the same parent side
(`timing.run_job`: worker environment, timeout, error messages), the same interleaved rounds (`timing.rotation`),
the same statistics (`timing.time_runs`, `timing.latency_stats`) and peak RSS (`timing.peak_rss_mib`). One run is
the greedy translation of one sentence, cycling through the job's real sentences.

Job::

    {"model": a directory (engine "onnxruntime": encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx,
     the configs and the tokenizer, as optimum's exporter writes them; engine "torch": a HF seq2seq directory),
     "engine": "onnxruntime" | "torch", "sentences": [str, ...], "max_new_tokens": int,
     "intra_op_threads", "inter_op_threads", "graph_optimization_level", "providers", "warmup", "min_runs",
     "min_seconds" (as timing's jobs)}

Result of one worker::

    {"model", "engine", "pid", "started_at_s", "import_ms", "rss_before_model_mib", "session_init_ms",
     "first_run_ms", "providers", "threads", "times_s": {"generate": [s, ...]}, "tokens": [int, ...],
     "peak_rss_mib"}
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kdpipe.errors import ConfigError, ModelError
from kdpipe.profiling import timing

KEY = "generate"  # the latency table's one "shape": greedy generation of one real sentence
ENGINES = ("onnxruntime", "torch")
MODULE = "kdpipe.profiling.generation"


def normalize_generation_job(job: dict[str, Any]) -> dict[str, Any]:
    """The job with timing's defaults filled in and checked; raises ConfigError naming the bad key."""
    missing = [k for k in ("model", "sentences", "max_new_tokens") if k not in job]
    if missing:
        raise ConfigError(
            f"generation timing job is missing {', '.join(missing)}", "give model, sentences, max_new_tokens"
        )
    out = {**timing.DEFAULTS, **job, "model": str(job["model"])}
    if out["engine"] not in ENGINES:
        raise ConfigError(
            f"generation timing job for {out['model']}: unknown engine {out['engine']!r}", f"one of {ENGINES}"
        )
    if out["graph_optimization_level"] not in timing.LEVELS:
        raise ConfigError(
            f"generation timing job for {out['model']}: unknown graph_optimization_level "
            f"{out['graph_optimization_level']!r}",
            f"one of {', '.join(timing.LEVELS)}",
        )
    sentences = [str(s) for s in out["sentences"]]
    if not sentences:
        raise ConfigError(f"generation timing job for {out['model']}: no sentences", "give real source sentences")
    out["sentences"] = sentences
    for key in ("intra_op_threads", "inter_op_threads", "warmup", "min_runs", "max_new_tokens"):
        out[key] = int(out[key])
    out["min_seconds"] = float(out["min_seconds"])
    out["providers"] = [str(p) for p in out["providers"]]
    return out


# ---------------------------------------------------------------- the worker (runs in its own process)


def _session_options(job: dict[str, Any]) -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = job["intra_op_threads"]
    opts.inter_op_num_threads = job["inter_op_threads"]
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, timing.LEVELS[job["graph_optimization_level"]])
    return opts


def _load(job: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, providers that ran) of the job's directory."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model"], local_files_only=True)
    if job["engine"] == "torch":
        model = AutoModelForSeq2SeqLM.from_pretrained(job["model"], local_files_only=True).eval()
        return model, tok, ["torch:cpu"]
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    model = ORTModelForSeq2SeqLM.from_pretrained(
        job["model"],
        use_cache=True,
        use_merged=False,
        providers=job["providers"],
        session_options=_session_options(job),
    )
    return model, tok, list(model.providers)


def run_generation_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Time one generation job in THIS process (what `python -m kdpipe.profiling.generation` does)."""
    started = time.time()
    job = normalize_generation_job(job)
    if not Path(job["model"]).exists():
        raise ModelError(f"{job['model']} does not exist")
    t0 = time.perf_counter()
    import torch

    if job["engine"] == "onnxruntime":
        import optimum.onnxruntime  # noqa: F401
    import_ms = (time.perf_counter() - t0) * 1e3
    torch.set_num_threads(job["intra_op_threads"])  # generate's own tensor work (and the torch engine)
    rss_before = timing.peak_rss_mib()
    t0 = time.perf_counter()
    model, tok, providers = _load(job)
    init_ms = (time.perf_counter() - t0) * 1e3
    enc = [tok([s], return_tensors="pt") for s in job["sentences"]]
    gen = {"max_new_tokens": job["max_new_tokens"], "num_beams": 1, "do_sample": False}
    order, tokens = itertools.count(), []

    def step() -> None:
        with torch.inference_mode():
            out = model.generate(**enc[next(order) % len(enc)], **gen)
        tokens.append(int(out.shape[-1]))

    t0 = time.perf_counter()
    step()
    first_run_ms = (time.perf_counter() - t0) * 1e3
    times = timing.time_runs(step, job["warmup"], job["min_runs"], job["min_seconds"])
    return {
        "model": job["model"], "engine": job["engine"], "pid": os.getpid(), "started_at_s": started,
        "import_ms": import_ms, "rss_before_model_mib": rss_before, "session_init_ms": init_ms,
        "first_run_ms": first_run_ms, "providers": providers, "threads": job["intra_op_threads"],
        "times_s": {KEY: times}, "tokens": tokens[-len(times):], "peak_rss_mib": timing.peak_rss_mib(),
    }  # fmt: skip


# ---------------------------------------------------------------- the parent side


def run_generation_job(job: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    """One generation job in a fresh process (timing.run_job with this module's worker)."""
    return timing.run_job(job, timeout_s, module=MODULE, normalize=normalize_generation_job)


def merge_generation_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's rounds pooled as timing.merge_rounds pools them (latency_stats over every run of every round,
    median init / first-run times, max peak and model RSS), plus the mean output length and the workers' PIDs."""
    times = [x for r in results for x in r["times_s"][KEY]]
    return {
        **timing.pooled(results),
        "shapes": {KEY: timing.latency_stats(times, 1)},
        "mean_tokens": statistics.mean(t for r in results for t in r["tokens"]),
        "top_ops": [],
        "pids": [r["pid"] for r in results],
    }


def interleaved_generation(
    jobs: dict[str, dict[str, Any]], rounds: int, timeout_s: float = 600
) -> dict[str, dict[str, Any]]:
    """Each job `rounds` times, each in a fresh process, round r in timing.rotation's order; per name the pooled
    figures of `merge_generation_rounds`. A round runs min_runs / rounds runs (at least timing.MIN_RUNS_PER_ROUND)
    for min_seconds / rounds seconds, as timing.interleaved's rounds do."""
    if rounds < 1:
        raise ConfigError(f"interleaved timing needs rounds >= 1, got {rounds}", "use rounds: 1 or more")
    names = list(jobs)
    per_name: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in timing.rotation(names, r):
            job = normalize_generation_job(jobs[name])
            runs = max(timing.MIN_RUNS_PER_ROUND, math.ceil(job["min_runs"] / rounds))
            job |= {"min_runs": runs, "min_seconds": job["min_seconds"] / rounds}
            per_name[name].append(run_generation_job(job, timeout_s))
    return {name: merge_generation_rounds(per_name[name]) for name in names}


if __name__ == "__main__":
    sys.exit(timing.main(run_generation_worker))
