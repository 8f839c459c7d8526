"""The causal-LM profile as library functions the stage hook calls: time to first token and decode tokens/s at
prompt lengths 32 / 128 / 512 with 64 new tokens, batch 1, greedy, for each model (teacher and student in PyTorch
eager, the student's ONNX fp32 / int8-dynamic / int4 in onnxruntime), each in its own processes
(kdpipe.profiling.generation's causal_lm workload, rounds interleaved); peak RSS of each worker; size on disk; the
profile's budgets on the deployed variant (kdpipe.profiling.budgets, plus TTFT and decode tokens/s when the
profile's Budgets has `ttft_ms` / `decode_tokens_per_s`); the report.md section.

Latency table keys are "1xL" (batch 1, prompt length L). Each holds timing.latency_stats of the TTFT runs (so a
profile's `p50_ms` / `p99_ms` budgets at `shape: 1x128` read the TTFT at 128 prompt tokens), plus `ttft_ms`,
`decode_tokens_per_s` and `decode_ms_per_token` (kdpipe.profiling.generation.causal_stats). The results dict has
the layout kdpipe.reporting.figures reads ({"profile", "providers", "onnxruntime": {name: ...}, "torch_eager":
{name: ...}}, each model with "model_bytes").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdpipe.artifacts.records import BudgetCheck, ExportRecord
from kdpipe.config import TargetProfile
from kdpipe.errors import ConfigError
from kdpipe.profiling.budgets import check_budgets, deployed_name
from kdpipe.tasks.causal_lm.export import GATE_METRIC, onnx_bytes

PROMPT_LENGTHS = (32, 128, 512)
NEW_TOKENS = 64
ENGINES = {"onnxruntime": "onnxruntime", "torch_eager": "torch"}
QUALITY_METRIC = f"held-out {GATE_METRIC}"  # what Budgets.accuracy / retention read for a causal LM
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def model_bytes(directory: str | Path) -> int:
    """Bytes on disk of a model directory's graphs (ONNX) or weights (PyTorch: safetensors / bin)."""
    d = Path(directory)
    graphs = onnx_bytes(d)
    return graphs or sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def lm_job(
    model_dir: str | Path,
    engine: str,
    prof: TargetProfile,
    sentences: Sequence[str],
    providers: Sequence[str] | None = None,
    prompt_lengths: Sequence[int] = PROMPT_LENGTHS,
    max_new_tokens: int = NEW_TOKENS,
) -> dict[str, Any]:
    """kdpipe.profiling.generation's causal_lm job for one model directory under `prof` (threads, optimisation
    level, warm-up, runs, seconds), engine "onnxruntime" or "torch", prompts cut from the real `sentences`."""
    return {
        "model": str(model_dir), "engine": engine, "workload": "causal_lm", "sentences": list(sentences),
        "prompt_lengths": list(prompt_lengths), "max_new_tokens": max_new_tokens, "check_finite": True,
        "intra_op_threads": prof.intra_op_threads, "inter_op_threads": prof.inter_op_threads,
        "graph_optimization_level": prof.graph_optimization_level,
        "providers": list(providers or prof.execution_providers), "warmup": prof.warmup, "min_runs": prof.min_runs,
        "min_seconds": prof.min_seconds,
    }  # fmt: skip


def profile_lm(
    onnx: dict[str, str | Path],
    eager: dict[str, str | Path],
    prof: TargetProfile,
    sentences: Sequence[str],
    *,
    providers: Sequence[str] | None = None,
    prompt_lengths: Sequence[int] = PROMPT_LENGTHS,
    max_new_tokens: int = NEW_TOKENS,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """Time every model, each in fresh processes, `prof.rounds` rounds interleaved per engine: `onnx` {name:
    directory with model.onnx} in onnxruntime (e.g. "student", "student-int8-dynamic", "student-int4": the export
    record's names), `eager` {name: HF causal-LM directory} in PyTorch eager (e.g. "teacher", "student"). Returns
    the results dict of the module docstring."""
    from kdpipe.profiling.generation import interleaved_generation

    if not sentences:
        raise ConfigError("causal-LM profile: no sentences to cut prompts from", "give real held-out texts")
    used = list(providers or prof.execution_providers)
    results: dict[str, Any] = {
        "profile": prof.model_dump(mode="json"), "providers": {"requested": prof.execution_providers, "used": used},
        "prompt_lengths": list(prompt_lengths), "max_new_tokens": max_new_tokens, "sentences": len(sentences),
    }  # fmt: skip
    for key, models in (("onnxruntime", onnx), ("torch_eager", eager)):
        dirs = {n: Path(d) for n, d in models.items()}
        engine = ENGINES[key]
        jobs = {n: lm_job(d, engine, prof, sentences, used, prompt_lengths, max_new_tokens) for n, d in dirs.items()}
        timed = interleaved_generation(jobs, prof.rounds, timeout_s) if jobs else {}
        results[key] = {n: {**timed[n], "model_bytes": model_bytes(d)} for n, d in dirs.items()}
    return results


def _at_least(budget: str, limit: float | None, value: float | None, unit: str) -> BudgetCheck | None:
    if limit is None:
        return None
    ok = value is not None and math.isfinite(value) and value >= limit  # missing or NaN never meets a budget
    return BudgetCheck(budget=budget, limit=limit, value=value, unit=unit, ok=ok)


def _at_most(budget: str, limit: float | None, value: float | None, unit: str) -> BudgetCheck | None:
    if limit is None:
        return None
    ok = value is not None and math.isfinite(value) and value <= limit
    return BudgetCheck(budget=budget, limit=limit, value=value, unit=unit, ok=ok)


def check_lm_budgets(
    prof: TargetProfile, results: dict[str, Any], export: ExportRecord, teacher_perplexity: float | None
) -> list[BudgetCheck]:
    """The profile's budgets on its deployed variant: kdpipe.profiling.budgets.check_budgets (p50 / p99 latency =
    TTFT at `budgets.shape`, default 1x128 or the first timed length; size; peak RSS; `accuracy` / `retention`
    on the gate's 1/perplexity, retention against 1 / the teacher's perplexity), and, when the profile's Budgets
    has them, `ttft_ms` (at most) and `decode_tokens_per_s` (at least) at that shape. A missing figure misses."""
    b, name = prof.budgets, deployed_name(prof)
    timed = results.get("onnxruntime", {}).get(name, {})
    lengths = list(timed.get("shapes", {}))
    shape = b.shape or ("1x128" if "1x128" in lengths else lengths[0] if lengths else "1x128")
    sizes = {n: int(r["model_bytes"]) for n, r in results.get("onnxruntime", {}).items()}
    reference = 1 / teacher_perplexity if teacher_perplexity and math.isfinite(teacher_perplexity) else 0.0
    checks = check_budgets(prof, results, export, sizes, reference, metric=QUALITY_METRIC, latency_key=shape)
    stats = timed.get("shapes", {}).get(shape, {})
    extra = [
        _at_most(f"TTFT at {shape}", getattr(b, "ttft_ms", None), stats.get("ttft_ms"), "ms"),
        _at_least(f"decode at {shape}", getattr(b, "decode_tokens_per_s", None), stats.get("decode_tokens_per_s"),
                  "tokens/s"),
    ]  # fmt: skip
    return checks + [c for c in extra if c is not None]


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def report_lines(results: dict[str, Any], checks: Sequence[BudgetCheck], deploy: str) -> list[str]:
    """The report.md section: TTFT / decode tokens/s per model and prompt length, peak RSS, size; the budgets."""
    lines = [
        "## Generation latency",
        "",
        f"Greedy, batch 1, {results['max_new_tokens']} new tokens, prompts cut from {results['sentences']} real "
        f"held-out texts; profile {results['profile']['name']} ({results['profile']['intra_op_threads']} threads), "
        "each model in its own processes. TTFT = prompt pass + first token; decode = the other tokens, KV cache.",
        "",
        "| model | engine | prompt tokens | TTFT p50 ms | TTFT p90 ms | decode tokens/s | peak RSS MiB | size MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine in ENGINES:
        for name, r in results.get(engine, {}).items():
            for key, s in r["shapes"].items():
                lines.append(
                    f"| {name} | {engine} | {key.split('x')[1]} | {_fmt(s['ttft_ms'], '.1f')} | "
                    f"{_fmt(s['p90_ms'], '.1f')} | {_fmt(s['decode_tokens_per_s'], '.1f')} | "
                    f"{r['peak_rss_mib']:.0f} | {r['model_bytes'] / 2**20:.2f} |"
                )
    lines += ["", f"Budgets of {deploy}:" if checks else "No budgets in this profile."]
    for c in checks:
        value = "missing" if c.value is None else f"{c.value:.4g}"
        lines.append(f"- {c.budget}: {value} vs {c.limit:g} {c.unit}: {'ok' if c.ok else 'MISSED'}")
    return lines
