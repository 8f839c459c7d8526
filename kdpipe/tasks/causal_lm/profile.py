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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    BudgetCheck,
    CausalLMInfo,
    ExportRecord,
    ProfileRecord,
    RunContext,
    StageOutput,
    TeacherRecord,
    record,
)
from kdpipe.config import TargetProfile
from kdpipe.errors import ConfigError
from kdpipe.profiling.budgets import check_budgets, deployed_name
from kdpipe.reporting.report import deployed_machine_line, leakage_lines
from kdpipe.tasks.causal_lm.data import read_jsonl
from kdpipe.tasks.causal_lm.distill import SAMPLES
from kdpipe.tasks.causal_lm.export import GATE_METRIC, gate_line, onnx_bytes

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
    onnx: Mapping[str, str | Path],
    eager: Mapping[str, str | Path],
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
        _at_most(f"TTFT at {shape}", b.ttft_ms, stats.get("ttft_ms"), "ms"),
        _at_least(f"decode at {shape}", b.decode_tokens_per_s, stats.get("decode_tokens_per_s"), "tokens/s"),
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


# --------------------------------------------------------------------------- the stage
def prompt_lengths(prof: TargetProfile, context: int | None, new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt lengths to time, those dropped): the profile's shapes' `seq` when the profile sets `shapes`, else
    PROMPT_LENGTHS; a length whose prompt and `new_tokens` do not fit the model's context is dropped, and none
    fitting is one ConfigError."""
    wanted = sorted({s.seq for s in prof.shapes}) if "shapes" in prof.model_fields_set else list(PROMPT_LENGTHS)
    fit = [n for n in wanted if context is None or n + new_tokens <= context]
    if not fit:
        raise ConfigError(
            f"profile {prof.name}: no prompt length of {wanted} fits the model's context of {context} tokens with "
            f"{new_tokens} new tokens",
            f"give the profile shapes with seq at most {(context or 0) - new_tokens}",
        )
    return fit, [n for n in wanted if n not in fit]


def _context(model_dir: Path) -> int | None:
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    limit = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    return int(limit) if isinstance(limit, int) else None


def timed_models(
    prof: TargetProfile, upstream: Manifest, export: ExportRecord, ctx: RunContext
) -> tuple[dict[str, Path], dict[str, Path]]:
    """({name: ONNX folder}: the fp32 student and the profile's variants that the export wrote and that passed
    their gate; {name: PyTorch folder}: teacher and student when the profile times PyTorch eager)."""
    onnx: dict[str, Path] = {}
    for variant in dict.fromkeys(["fp32", *prof.variants]):
        name = "student" if variant == "fp32" else f"student-{variant}"
        m = export.models.get(name)
        if m is None or (m.gate is not None and not m.gate.ok):
            ctx.console.print(f"causal_lm: profile variant {variant} not timed (the export has no passing {name})")
            continue
        onnx[name] = upstream.directory(Path(m.onnx).parent.as_posix())
    eager: dict[str, Path] = {}
    if prof.torch_eager:
        t_manifest = upstream.upstream("teacher")
        info = record(t_manifest, TeacherRecord).info_as(CausalLMInfo)
        assert info is not None
        eager["teacher"] = t_manifest.directory(info.model_dir)
        source = export.models["student"].source
        eager["student"] = upstream.upstream(source.stage).directory(source.dir)
    return onnx, eager


def _inverted(report: dict[str, Any]) -> dict[str, Any]:
    """figures() read with quality "perplexity" holds perplexities where the gates hold 1/perplexity: make the
    teacher's, the students' and the eager models' `accuracy` 1/perplexity too (higher is better, as --compare
    reads it)."""

    def inv(x: Any) -> float | None:
        return 1 / x if isinstance(x, int | float) and x > 0 and math.isfinite(x) else None

    for key in ("teacher", "student"):
        report[key]["accuracy"] = inv(report[key]["accuracy"])
    report["student"]["baseline_accuracy"] = inv(report["student"]["baseline_accuracy"])
    for m in report["models"].values():
        if m["engine"] == "torch eager":
            m["accuracy"] = inv(m["accuracy"])
    report["quality"] = QUALITY_METRIC
    return report


def run_profile(
    prof: TargetProfile, upstream: Manifest, work: Path, ctx: RunContext, providers: list[str], missing: list[str]
) -> StageOutput:
    """TTFT and decode tokens/s of the ONNX student and its passed variants (and PyTorch eager teacher and
    student when prof.torch_eager) at the profile's prompt lengths (`prompt_lengths`), the teacher's
    max_new_tokens new tokens (at most NEW_TOKENS), prompts cut from the held-out texts; the budgets on the
    deployed variant (`check_lm_budgets`); latency.json, report.json (kdpipe.reporting.figures, 1/perplexity as
    its accuracy) and report.md."""
    import json

    from kdpipe.reporting.figures import Run, figures

    export = record(upstream, ExportRecord)
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(CausalLMInfo)
    assert info is not None
    if missing:
        ctx.console.print(f"[yellow]warning:[/] {', '.join(missing)} not available here; timing on "
                          f"{', '.join(providers)} (allow_fallback)")  # fmt: skip
    onnx, eager = timed_models(prof, upstream, export, ctx)
    new_tokens = min(NEW_TOKENS, info.max_new_tokens)
    lengths, dropped = prompt_lengths(prof, _context(onnx["student"]), new_tokens)
    if dropped:
        ctx.console.print(f"causal_lm: prompt lengths {dropped} skipped (with {new_tokens} new tokens they exceed "
                          "the model's context)")  # fmt: skip
    sentences = [str(r["text"]) for r in read_jsonl(t_manifest.path(info.held_out_texts))]
    ctx.console.print(f"profiling generation (causal_lm) of {', '.join([*onnx, *(f'{n}-eager' for n in eager)])} at "
                      f"prompt lengths {lengths}, {new_tokens} new tokens, on {prof.name}, each in its own "
                      f"process, {prof.rounds} round(s) ...")  # fmt: skip
    results = profile_lm(onnx, eager, prof, sentences, providers=providers, prompt_lengths=lengths,
                         max_new_tokens=new_tokens)  # fmt: skip
    results["providers"]["missing"] = missing
    checks = check_lm_budgets(prof, results, export, t_manifest.metric("perplexity"))
    rec = ProfileRecord(report="report.md", profile=prof.name, deploy=deployed_name(prof), budgets=checks)
    (work / "latency.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    report = _inverted(figures(Run.of(upstream), results, rec, quality="perplexity"))
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    lines = quality_lines(upstream, export) + data_lines(record(t_manifest, TeacherRecord))
    lines += report_lines(results, checks, rec.deploy) + sample_lines(upstream)
    lines += ["", deployed_machine_line(upstream, rec.deploy)]
    (work / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for c in checks:
        value = "missing" if c.value is None else f"{c.value:.4g}"
        ctx.console.print(f"budget {c.budget}: {value} vs {c.limit:g} {c.unit}: {'ok' if c.ok else 'MISSED'}")
    return StageOutput(record=rec, metrics=_metrics(results))


def _metrics(results: dict[str, Any]) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}
    for engine, tag in (("onnxruntime", ""), ("torch_eager", "_eager")):
        for name, r in results.get(engine, {}).items():
            for shape, s in r["shapes"].items():
                ttft, rate = s.get("ttft_ms"), s.get("decode_tokens_per_s")
                metrics[f"{name}{tag}_ttft_ms_{shape}"] = Metric(_rounded(ttft, 3), "ms")
                metrics[f"{name}{tag}_decode_tokens_per_s_{shape}"] = Metric(_rounded(rate, 2), "tokens/s")
    return metrics


def _rounded(x: Any, digits: int) -> float | None:
    return round(float(x), digits) if isinstance(x, int | float) and math.isfinite(x) else None


def quality_lines(upstream: Manifest, export: ExportRecord) -> list[str]:
    """The report's head: teacher / student / no-KD baseline on the held-out split (the distill manifest's
    perplexity, next-token top-1 agreement with the teacher, Rouge-L of greedy generations against the teacher's),
    then each export's parity or gate."""
    teacher, student, distill = (upstream.upstream(s) for s in ("teacher", "student", "distill"))
    lines = [
        "# kdpipe causal-LM report",
        "",
        "| model | layers | params | held-out perplexity | top-1 agreement with the teacher | Rouge-L vs the teacher |",
        "|---|---|---|---|---|---|",
        f"| teacher | {teacher.metric('layers')} | {teacher.metric('params')} | {teacher.metric('perplexity')} "
        "| - | - |",
        f"| student, KD | {student.metric('layers')} | {student.metric('params')} | {distill.metric('perplexity')} | "
        f"{distill.metric('top1_agreement')} | {distill.metric('rouge_l')} |",
    ]
    if distill.metric("baseline_perplexity") is not None:
        lines.append(f"| student, no KD (ce) | {student.metric('layers')} | {student.metric('params')} | "
                     f"{distill.metric('baseline_perplexity')} | {distill.metric('baseline_top1_agreement')} | "
                     f"{distill.metric('baseline_rouge_l')} |")  # fmt: skip
    lines += ["", "ONNX exports (KV cache; gates against the fp32 PyTorch student on the held-out split):", ""]
    for name, m in export.models.items():
        lines.append(f"- {gate_line(name, m.gate)}" if m.gate is not None else f"- {name}: parity ok {m.parity.ok}")
    if "teacher" not in export.models:
        lines.append(f"- teacher: {export.models['student'].spec.get('teacher', 'not exported')}")
    return [*lines, ""]


def data_lines(rec: TeacherRecord) -> list[str]:
    """Where the rows came from (the data file or the embedded corpora, or the given files; each split's origin) and
    the leakage of the held-out texts / prompts into the train rows."""
    labels = {"held_out_texts": "held-out texts", "held_out_prompts": "held-out prompts"}
    lines = [f"- data: {rec.data_source}."] + [f"  - {s}: {where}." for s, where in rec.data_splits.items()]
    return [*lines, *leakage_lines(rec, labels, "train rows"), ""]


def sample_lines(upstream: Manifest) -> list[str]:
    """Side-by-side greedy answers of the distill stage's samples.json (teacher, student, no-KD baseline)."""
    import json

    distill = upstream.upstream("distill")
    if not distill.has(SAMPLES):
        return []
    rows = json.loads(distill.path(SAMPLES).read_text(encoding="utf-8"))
    lines = ["", "## Side by side (held-out prompts, greedy)", ""]
    for i, row in enumerate(rows, 1):
        lines.append(f"{i}. **prompt**: {_one_line(row['prompt'])}")
        for key in ("teacher", "student", "baseline"):
            if key in row:
                lines.append(f"   - **{key}**: {_one_line(row[key])}")
    return lines


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) or "(empty)"
