"""Greedy-generation latency of seq2seq and decoder-only models, one fresh process per model and round.

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

A decoder-only job (`"workload": "causal_lm"`) times time to first token and decode tokens/s instead: per prompt
length in "prompt_lengths" (default 32 / 128 / 512), batch 1, one run is a prompt pass (the first token: TTFT) and
max_new_tokens - 1 one-token steps fed the KV cache (decode), greedy, no stop at EOS, on prompts cut from the real
sentences' tokens. Engine "torch" is a HF causal-LM directory (eager attention), engine "onnxruntime" a directory
with optimum's text-generation-with-past `model.onnx` driven by `OrtCausalLM` (present -> past by hand). Its times
are keyed "1xL/ttft" and "1xL/decode"; `merge_causal_rounds` pools them.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import ConfigError, ModelError
from kdpipe.profiling import timing

KEY = "generate"  # the latency table's one "shape": greedy generation of one real sentence
ENGINES = ("onnxruntime", "torch")
MODULE = "kdpipe.profiling.generation"
WORKLOADS = ("seq2seq", "causal_lm")
PROMPT_LENGTHS = (32, 128, 512)
ONNX_FILE = "model.onnx"  # optimum's text-generation-with-past export (one graph, past may be empty)


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
    return _normalize_workload(out)


def _normalize_workload(out: dict[str, Any]) -> dict[str, Any]:
    """The job's workload (default seq2seq) and, for causal_lm, its prompt lengths, checked."""
    out["workload"] = str(out.get("workload", "seq2seq"))
    if out["workload"] not in WORKLOADS:
        raise ConfigError(
            f"generation timing job for {out['model']}: unknown workload {out['workload']!r}", f"one of {WORKLOADS}"
        )
    if out["workload"] == "causal_lm":
        lengths = [int(n) for n in out.get("prompt_lengths", PROMPT_LENGTHS)]
        if not lengths or min(lengths) < 1 or out["max_new_tokens"] < 1:
            raise ConfigError(
                f"generation timing job for {out['model']}: prompt_lengths {lengths} / max_new_tokens "
                f"{out['max_new_tokens']}", "give prompt lengths >= 1 and max_new_tokens >= 1",
            )  # fmt: skip
        out["prompt_lengths"] = lengths
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
    if job["workload"] == "causal_lm":
        return {"started_at_s": started, **run_causal_worker(job)}
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


# ---------------------------------------------------------------- decoder-only models (KV cache, greedy)


class OrtCausalLM:
    """An optimum text-generation-with-past graph (`model.onnx`: input_ids, attention_mask, position_ids where it
    asks for them, past_key_values.<i>.key/value (batch, kv heads, past, head dim) -> logits, present.<i>.*) in
    onnxruntime: `prefill` runs a prompt with an empty past, `decode` one token fed the previous step's presents."""

    def __init__(self, path: str | Path, session_options: Any = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        dtype = np.float16 if self.past_names and "float16" in self.inputs[self.past_names[0]].type else np.float32
        out = {}
        for name in self.past_names:
            dims = self.inputs[name].shape
            if not all(isinstance(d, int) for d in (dims[1], dims[3])):
                raise ModelError(f"{name}: heads / head size {dims[1]} / {dims[3]} are not fixed in the graph")
            out[name] = np.zeros((batch, dims[1], 0, dims[3]), dtype=dtype)
        return out

    def _run(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict[str, Any]]:
        batch, length = ids.shape
        feed: dict[str, np.ndarray] = {"input_ids": ids, **past}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((batch, past_len + length), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, past_len + length, dtype=np.int64)[None].repeat(batch, 0)
        values = dict(zip(self.outputs, self.session.run(None, feed), strict=True))
        present = {n: values[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return values["logits"].astype(np.float32), {"past": present, "len": past_len + length}

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits (batch, T, vocab) at every position of a (batch, T) int64 sequence, empty past (perplexity)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._run(ids, self._empty_past(ids.shape[0]), 0)[0]

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Last-position logits (batch, vocab) of a (batch, T) int64 prompt, and the state `decode` continues."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        logits, state = self._run(ids, self._empty_past(ids.shape[0]), 0)
        return logits[:, -1], state

    def decode(self, token: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Logits after one more token per row ((batch,) int64), the cache fed from `state`."""
        logits, state = self._run(np.asarray(token, dtype=np.int64).reshape(-1, 1), state["past"], state["len"])
        return logits[:, -1], state


class TorchCausalLM:
    """A HF causal LM with the same prefill / decode interface (its own KV cache, inference mode, float32 logits)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits (batch, T, vocab) at every position, no cache (perplexity)."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64)), use_cache=False)
        return out.logits.float().numpy()

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64)), use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values

    def decode(self, token: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        import torch

        ids = torch.as_tensor(np.asarray(token, dtype=np.int64).reshape(-1, 1))
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=state, use_cache=True)
        return out.logits[:, -1].float().numpy(), out.past_key_values


def greedy(runner: Any, ids: np.ndarray, max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of one (1, T) prompt for exactly `max_new_tokens` tokens (no stop at EOS) by a runner with
    prefill / decode (OrtCausalLM, TorchCausalLM): {"tokens", "first_logits" (vocab,), "ttft_s" (prompt pass and
    the first token), "decode_s" (the other tokens), "finite" (every step's logits)}."""
    t0 = time.perf_counter()
    logits, state = runner.prefill(ids)
    token = logits.argmax(-1)
    ttft = time.perf_counter() - t0
    first, tokens, finite = logits[0], [int(token[0])], bool(np.isfinite(logits).all())
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        logits, state = runner.decode(token, state)
        token = logits.argmax(-1)
        tokens.append(int(token[0]))
        finite = finite and bool(np.isfinite(logits).all())
    return {"tokens": tokens, "first_logits": first, "ttft_s": ttft, "decode_s": time.perf_counter() - t0,
            "finite": finite}  # fmt: skip


def real_prompts(encode: Callable[[str], list[int]], sentences: list[str], length: int, count: int) -> list[np.ndarray]:
    """`count` (1, length) int64 prompts cut at different offsets from the real sentences' tokens (`encode`: text ->
    ids without special tokens; the sentences joined by spaces, repeated when they hold fewer than `length` tokens)."""
    stream = list(encode(" ".join(sentences)))
    if not stream:
        raise ConfigError("generation timing: the sentences tokenise to nothing", "give real sentences")
    need = length + count
    stream = (stream * (need // len(stream) + 1))[:need] if len(stream) < need else stream
    step = max(1, (len(stream) - length) // max(1, count))
    return [np.asarray([stream[i * step : i * step + length]], dtype=np.int64) for i in range(count)]


def _context_limit(model_dir: Path) -> int | None:
    """The model's context (max_position_embeddings / n_positions of its config.json), or None."""
    import json

    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    limit = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    return int(limit) if isinstance(limit, int) else None


def _causal_runner(job: dict[str, Any]) -> tuple[Any, Callable[[str], list[int]], list[str]]:
    """(runner, text -> token ids, providers that ran) of a causal-LM job's directory. The onnxruntime engine reads
    tokenizer.json with `tokenizers` alone, so its worker never imports torch (its peak RSS is the graph's)."""
    model_dir = Path(job["model"])
    if job["engine"] == "torch":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True)
        return TorchCausalLM(model.eval()), lambda t: list(tok(t, add_special_tokens=False)["input_ids"]), ["torch:cpu"]
    from tokenizers import Tokenizer

    if not (model_dir / ONNX_FILE).is_file() or not (model_dir / "tokenizer.json").is_file():
        raise ModelError(
            f"{model_dir} has no {ONNX_FILE} or tokenizer.json", "export it with text-generation-with-past"
        )
    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    runner = OrtCausalLM(model_dir / ONNX_FILE, _session_options(job), job["providers"])
    return runner, lambda t: list(fast.encode(t, add_special_tokens=False).ids), list(runner.session.get_providers())


def _time_prompts(runner: Any, prompts: list[np.ndarray], job: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(TTFT, decode) seconds of the timed runs (warm-up dropped), cycling through `prompts`."""
    order, ttft, decode = itertools.count(), [], []

    def step() -> None:
        res = greedy(runner, prompts[next(order) % len(prompts)], job["max_new_tokens"])
        if job.get("check_finite", True) and not res["finite"]:
            raise ModelError(f"{job['model']}: non-finite logits (NaN or inf), so its latency is not a result")
        ttft.append(res["ttft_s"])
        decode.append(res["decode_s"])

    times = timing.time_runs(step, job["warmup"], job["min_runs"], job["min_seconds"])
    return ttft[-len(times) :], decode[-len(times) :]


def run_causal_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Time a causal_lm job in THIS process: per prompt length TTFT and decode times (module docstring)."""
    t0 = time.perf_counter()
    if job["engine"] == "torch":
        import torch

        torch.set_num_threads(job["intra_op_threads"])
    else:
        import onnxruntime  # noqa: F401
    import_ms = (time.perf_counter() - t0) * 1e3
    limit = _context_limit(Path(job["model"]))
    if limit is not None and max(job["prompt_lengths"]) + job["max_new_tokens"] > limit:
        raise ConfigError(
            f"{job['model']}: prompt length {max(job['prompt_lengths'])} + {job['max_new_tokens']} new tokens "
            f"exceeds the model's context of {limit} tokens", "use shorter prompt_lengths or fewer new tokens",
        )  # fmt: skip
    rss_before = timing.peak_rss_mib()
    t0 = time.perf_counter()
    runner, encode, providers = _causal_runner(job)
    init_ms = (time.perf_counter() - t0) * 1e3
    times: dict[str, list[float]] = {}
    first_run_ms = math.nan
    for length in job["prompt_lengths"]:
        prompts = real_prompts(encode, job["sentences"], length, max(1, len(job["sentences"])))
        if math.isnan(first_run_ms):
            t0 = time.perf_counter()
            greedy(runner, prompts[0], job["max_new_tokens"])
            first_run_ms = (time.perf_counter() - t0) * 1e3
        key = timing.shape_key([1, length])
        times[f"{key}/ttft"], times[f"{key}/decode"] = _time_prompts(runner, prompts, job)
    return {
        "model": job["model"], "engine": job["engine"], "workload": "causal_lm", "pid": os.getpid(),
        "import_ms": import_ms, "rss_before_model_mib": rss_before, "session_init_ms": init_ms,
        "first_run_ms": first_run_ms, "providers": providers, "threads": job["intra_op_threads"], "times_s": times,
        "max_new_tokens": job["max_new_tokens"], "peak_rss_mib": timing.peak_rss_mib(),
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


def causal_stats(ttft_s: list[float], decode_s: list[float], max_new_tokens: int) -> dict[str, float]:
    """One prompt length's figures: timing.latency_stats of the TTFT runs (so p50_ms is the median TTFT and the
    p50 / p99 latency budgets read TTFT), plus ttft_ms (median), decode_tokens_per_s ((max_new_tokens - 1) /
    median decode time; NaN with a single new token) and decode_ms_per_token."""
    stats = timing.latency_stats(ttft_s, 1)
    decode = statistics.median(decode_s) if decode_s else math.nan
    steps = max_new_tokens - 1
    per_s = steps / decode if steps and decode > 0 else math.nan
    return {**stats, "ttft_ms": stats["p50_ms"], "decode_tokens_per_s": per_s,
            "decode_ms_per_token": 1e3 * decode / steps if steps else math.nan}  # fmt: skip


def merge_causal_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One decoder-only model's rounds pooled (timing.pooled), per prompt length "1xL": `causal_stats` over
    every run of every round."""
    lengths = sorted({k.split("/")[0] for r in results for k in r["times_s"]}, key=lambda k: int(k.split("x")[1]))
    n = int(results[0]["max_new_tokens"])
    shapes = {
        key: causal_stats(
            [x for r in results for x in r["times_s"][f"{key}/ttft"]],
            [x for r in results for x in r["times_s"][f"{key}/decode"]],
            n,
        )
        for key in lengths
    }
    return {**timing.pooled(results), "shapes": shapes, "max_new_tokens": n, "top_ops": [],
            "pids": [r["pid"] for r in results]}  # fmt: skip


def interleaved_generation(
    jobs: dict[str, dict[str, Any]], rounds: int, timeout_s: float = 600
) -> dict[str, dict[str, Any]]:
    """Each job `rounds` times, each in a fresh process, round r in timing.rotation's order; per name the pooled
    figures of `merge_generation_rounds` (`merge_causal_rounds` for a causal_lm job). A round runs min_runs / rounds
    runs (at least timing.MIN_RUNS_PER_ROUND) for min_seconds / rounds seconds, as timing.interleaved's rounds do."""
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
    merge = {n: merge_causal_rounds if normalize_generation_job(jobs[n])["workload"] == "causal_lm"
             else merge_generation_rounds for n in names}  # fmt: skip
    return {name: merge[name](per_name[name]) for name in names}


if __name__ == "__main__":
    sys.exit(timing.main(run_generation_worker))
