"""The translation export: fp32 ONNX (encoder, decoder, decoder with past) of the student and teacher, parity on
real sentences, and the student's int8-dynamic variant, each student export gated on the test split's BLEU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    ExportedModel,
    ExportRecord,
    Gate,
    ModelSource,
    Parity,
    RunContext,
    StageOutput,
    TeacherRecord,
    TranslationInfo,
    record,
)
from kdpipe.config import ExportConfig
from kdpipe.errors import ExportToleranceError
from kdpipe.tasks.translation import seq2seq
from kdpipe.tasks.translation.common import MODEL_DIR, read_splits

INT8 = "int8-dynamic"  # the one student variant translation writes besides fp32
VARIANT_DIRS = {"fp32": "student", INT8: f"student-{INT8}"}


def _export_fp32(
    name: str, src: Path, work: Path, sentences: list[str], info: TranslationInfo, cfg: ExportConfig, ctx: RunContext
) -> tuple[dict[str, Any], Parity, str | None]:
    """One model's ONNX (encoder + decoder + decoder with past) and its parity on real sentences: (spec, parity,
    the failure line or None)."""
    spec = seq2seq.export_seq2seq_onnx(src, work / name, cfg.opset)
    check = seq2seq.seq2seq_parity(src, work / name, sentences, info.max_new_tokens, cfg.atol)
    size = onnx_bytes(work / name)
    ctx.console.print(
        f"{name}: ONNX {', '.join(spec['files'])} ({size / 2**20:.1f} MiB), parity on {check.examples} real test "
        f"sentences: first-step max |diff| {check.max_abs_diff:.2e} (atol {cfg.atol:g}), identical greedy "
        f"generations {check.same_generations}/{check.examples}"
    )
    parity = Parity(
        kind="generations", max_abs_diff=check.max_abs_diff, atol=cfg.atol,
        agreement=check.same_generations / check.examples,
        examples=check.examples, shapes=[], nonfinite_outputs=0 if math.isfinite(check.max_abs_diff) else 1,
        refused=None, ok=check.ok,
    )  # fmt: skip
    spec["parity"] = {"same_generations": check.same_generations, "why": check.why, "agreement": "generations"}
    return spec, parity, None if check.ok else f"{name}: {check.why}"


def onnx_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.onnx"))


def run_export(cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """fp32 ONNX of the student (and teacher), parity-checked on real sentences; then the student's fp32 export and
    its int8-dynamic variant, each gated on the whole test split's BLEU (`gate_variants`). Fails closed."""
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(TranslationInfo)
    assert info is not None
    sentences = [s for s, _ in read_splits(t_manifest).test[: cfg.parity_samples]]
    sources = {"student": (upstream, ModelSource(stage="distill", dir=MODEL_DIR))}
    if cfg.teacher:
        sources["teacher"] = (t_manifest, ModelSource(stage="teacher", dir=MODEL_DIR))
    models: dict[str, ExportedModel] = {}
    metrics: dict[str, Metric] = {}
    failures = []
    for name, (manifest, source) in sources.items():
        spec, parity, failure = _export_fp32(name, manifest.directory(source.dir), work, sentences, info, cfg, ctx)
        models[name] = ExportedModel(onnx=f"{name}/encoder_model.onnx", spec=spec, parity=parity, source=source)
        metrics[f"{name}_max_abs_diff"] = Metric(parity.max_abs_diff, "logit units")
        metrics[f"{name}_same_generations"] = Metric(round(parity.agreement, 5), "fraction")
        metrics[f"{name}onnx_bytes"] = Metric(onnx_bytes(work / name), "bytes")
        failures += [failure] if failure else []
    if failures:
        raise ExportToleranceError(
            "ONNX parity check failed: " + "; ".join(failures),
            "nothing was written; raise export.atol only if the difference is expected, otherwise report the model",
        )
    skipped = [v for v in cfg.variants if v != INT8]
    if skipped:
        ctx.console.print(f"translation: export.variants {skipped} skipped (translation writes fp32 and {INT8})")
    variants = ["fp32", *([INT8] if INT8 in cfg.variants else [])]
    models |= gate_variants(cfg, upstream, models["student"], variants, work, ctx, metrics)
    return StageOutput(record=ExportRecord(models=models), metrics=metrics)


def quantize_graphs(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 of every graph of an optimum export (encoder, decoder, decoder with past), each through
    kdpipe.compress.quantize.quantize_int8 (QInt8 weights, per-channel scales, run from a temporary directory),
    written under the same names into `dst` with the configs and tokenizer copied, so that
    ORTModelForSeq2SeqLM.from_pretrained(dst) loads it as it loads the fp32 export. Returns what was done."""
    import shutil

    from kdpipe.compress import quantize

    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix != ".onnx":
            shutil.copy2(f, dst / f.name)
    done: dict[str, Any] = {"quantizer": "onnxruntime quantize_dynamic (QInt8, per-channel)", "graphs": {}}
    for f in sorted(src.glob("*.onnx")):
        quantize.quantize_int8(f, dst / f.name)
        before, after = quantize.op_counts(f), quantize.op_counts(dst / f.name)
        done["graphs"][f.name] = {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}
    return done


@dataclass(frozen=True)
class Judged:
    """A model's greedy translations of the test sources and its first decoder step's logits (N, vocab)."""

    hyps: list[str]
    logits: Any


def judge(model: Any, tok: Any, sources: list[str], start_id: int, max_new_tokens: int, max_length: int) -> Judged:
    """Greedy generations (batches of 64, in order) and first-step logits of a PyTorch model or an
    ORTModelForSeq2SeqLM: the same calls for both, so the gate compares like with like."""
    import numpy as np
    import torch

    hyps: list[str] = []
    logits = []
    with torch.inference_mode():
        for i in range(0, len(sources), 64):
            chunk = sources[i : i + 64]
            enc = tok(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            start = torch.full((len(chunk), 1), start_id, dtype=torch.long)
            logits.append(model(**enc, decoder_input_ids=start).logits[:, -1].float().numpy())
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            hyps += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return Judged(hyps, np.concatenate(logits).astype(np.float64))


def bleu_gate(got: Judged, ref: Judged, refs: list[str], budget: float, atol: float | None) -> Gate:
    """A variant against the fp32 PyTorch student on the whole test split: sacreBLEU / 100 of both (a fraction, as
    the Budgets and classification's gates use), budget x the reference's, identical generations, first-step max
    |diff|. NaN fails: a non-finite logit fails outright and `nan >= x` is False."""
    import numpy as np

    nonfinite = int((~np.isfinite(got.logits)).any(-1).sum())
    diff = np.abs(got.logits - ref.logits)
    worst = float(diff.max()) if np.isfinite(diff).all() else math.inf
    value, reference = seq2seq.bleu(got.hyps, refs) / 100, seq2seq.bleu(ref.hyps, refs) / 100
    need = budget * reference
    ok = nonfinite == 0 and math.isfinite(value) and value >= need and (atol is None or worst <= atol)
    same = sum(a == b for a, b in zip(got.hyps, ref.hyps, strict=True))
    return Gate(
        examples=len(refs), value=value, reference=reference, budget=need, agreement=same / len(refs),
        max_abs_diff=worst, atol=atol, nonfinite_outputs=nonfinite, ok=bool(ok), metric="bleu/100",
    )  # fmt: skip


def gate_variants(
    cfg: ExportConfig,
    upstream: Manifest,
    base: ExportedModel,
    variants: list[str],
    work: Path,
    ctx: RunContext,
    metrics: dict[str, Metric],
) -> dict[str, ExportedModel]:
    """The fp32 student export and its int8-dynamic variant, each gated on the test split's BLEU against the fp32
    PyTorch student (export.accuracy_budget x its BLEU; fp32 also within export.atol); a miss fails the stage."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    t_manifest = upstream.upstream("teacher")
    t_rec = record(t_manifest, TeacherRecord)
    assert isinstance(t_rec.info, TranslationInfo)
    test = read_splits(t_manifest).test
    sources, refs = [s for s, _ in test], [t for _, t in test]
    model, tok = seq2seq.load_seq2seq(upstream.directory(base.source.dir))
    args = (
        sources,
        int(model.config.decoder_start_token_id),
        t_rec.info_as(TranslationInfo).max_new_tokens,
        t_rec.max_length,
    )
    ref = judge(model, tok, *args)
    out, failures = {}, []
    for variant in variants:
        name, made = VARIANT_DIRS[variant], {}
        if variant != "fp32":
            made = quantize_graphs(work / "student", work / name)
        onnx = ORTModelForSeq2SeqLM.from_pretrained(str(work / name), use_cache=True, use_merged=False)
        atol = cfg.atol if variant == "fp32" else None  # quantised: no logit bound, the BLEU budget judges it
        check = bleu_gate(judge(onnx, tok, *args), ref, refs, cfg.accuracy_budget, atol)
        update: dict[str, Any] = {"gate": check}
        if variant != "fp32":  # the variant keeps the fp32 export's spec and parity (same graph inputs / outputs)
            update |= {"onnx": f"{name}/encoder_model.onnx", "variant": variant, "of": "student", "transforms": made}
        out[name] = base.model_copy(update=update)
        size = onnx_bytes(work / name)
        metrics[f"{name}_test_bleu"] = Metric(round(100 * check.value, 2), "BLEU")
        metrics[f"{name}_agreement"] = Metric(round(check.agreement, 5), "fraction")
        metrics[f"{name}onnx_bytes"] = Metric(size, "bytes")
        ctx.console.print(_gate_line(name, check, size))
        failures += [] if check.ok else [_gate_failure(name, check)]
    if failures:
        raise ExportToleranceError(
            "variant gate failed on the test split: " + "; ".join(failures),
            "nothing was written; drop the variant (export.variants) or lower export.accuracy_budget if the loss "
            "is acceptable",
        )
    return out


def _gate_line(name: str, g: Gate, size: int) -> str:
    diff = f"max |diff| {g.max_abs_diff:.2e}" + (f" (atol {g.atol:g})" if g.atol is not None else "")
    return (
        f"{name}: {size / 2**20:.1f} MiB, test BLEU {100 * g.value:.2f} on {g.examples} sentences (fp32 PyTorch "
        f"{100 * g.reference:.2f}, needs {100 * g.budget:.2f}), identical generations {g.agreement:.0%}, "
        f"{diff}: " + ("ok" if g.ok else "FAILED")
    )


def _gate_failure(name: str, g: Gate) -> str:
    why = []
    if g.nonfinite_outputs:
        why.append(f"{g.nonfinite_outputs} sentences with NaN/inf logits (a broken model)")
    if not g.value >= g.budget:
        why.append(
            f"test BLEU {100 * g.value:.2f} is {100 * (g.budget - g.value):.2f} short of the budget "
            f"{100 * g.budget:.2f} ({g.budget / g.reference:.0%} of the fp32 student's "
            f"{100 * g.reference:.2f})"
        )
    if g.atol is not None and not g.max_abs_diff <= g.atol:
        why.append(f"max |diff| {g.max_abs_diff:.3e} vs atol {g.atol:g}")
    return f"{name}: " + (", ".join(why) or "failed")
