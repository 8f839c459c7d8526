"""The embedding task's export stage: ONNX with pooling and normalisation in the graph, fail-closed cosine parity,
the sentence-transformers ONNX layout, and the student's variants gated on the Lee Spearman.

- `<name>/model.onnx` (student, and the teacher unless export.teacher is false): token ids -> unit sentence
  embedding (kdpipe.tasks.embedding.onnx.export_onnx); parity: min row cosine with PyTorch >= 0.9999 on real
  held-out sentences at three batch x length shapes, else ExportToleranceError and nothing is written.
- `student/st/`: the distilled student's sentence-transformers folder with `onnx/model.onnx` (the backbone graph
  sentence-transformers' ONNX backend reads), checked with SentenceTransformer(dir, backend="onnx"), and with
  int8-dynamic among the variants `onnx/model_qint8.onnx` beside it (gated on the Lee Spearman as below). Not for
  a BiLSTM student (that backend reads a Transformer module only): its spec records why.
- a student or teacher with a NaN or inf weight is refused before anything is exported.
- variants (export.variants, kdpipe.compress.quantize.make_variant) beside the student's model.onnx: each is gated
  on the Lee set: Spearman >= ref - (1 - export.accuracy_budget) |ref|, ref the fp32 PyTorch student's (NaN fails). A
  variant that misses is removed and recorded as such (gate.ok false); the Gate record (metric "lee_spearman") holds
  Lee Spearman values and `agreement` the min cosine to the fp32 PyTorch student on the held-out sentences.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    EmbeddingInfo,
    ExportedModel,
    ExportRecord,
    Gate,
    ModelSource,
    Parity,
    RunContext,
    StageOutput,
    TeacherRecord,
    record,
)
from kdpipe.config import ExportConfig
from kdpipe.errors import ModelError
from kdpipe.tasks.embedding import data
from kdpipe.tasks.embedding.build import MODEL_DIR, load

PARITY_KIND = "cosine"


def onnx_embed(path: Path, tok: Any, max_length: int | None, batch_size: int = 16) -> Any:
    """texts -> (N, D) embeddings from an export_onnx graph run by onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def embed(texts: Any) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="np")  # fmt: skip
            feed = {k: v.astype("int64") for k, v in enc.items() if k in wanted}
            out.append(session.run(None, feed)[0])
        return np.concatenate(out).astype(np.float32)

    return embed


def _parity_record(p: Any, examples: int) -> Parity:
    # Parity's fields are the classifier's: max_abs_diff holds 1 - min cosine, atol 1 - the threshold
    distance = 1.0 - p.min_cosine if math.isfinite(p.min_cosine) else float("nan")
    return Parity(
        kind=PARITY_KIND, max_abs_diff=distance, atol=1.0 - p.threshold, agreement=1.0 if p.passed else 0.0,
        examples=examples,
        shapes=[[b, t] for b, t, _ in p.per_shape], nonfinite_outputs=0 if math.isfinite(p.min_cosine) else 1,
        ok=p.passed,
    )  # fmt: skip


def _export_one(name: str, folder: Path, work: Path, sentences: list[str], opset: int, ctx: RunContext) -> Any:
    from kdpipe.tasks.embedding.onnx import PARITY_SHAPES, export_onnx, onnx_parity

    encoder, tok = load(folder)
    _require_finite(name, encoder)
    exported = export_onnx(encoder, work / name / "model.onnx", opset=opset)
    parity = onnx_parity(encoder, tok, exported.path, sentences)  # raises below 0.9999: fail closed
    size = exported.path.stat().st_size
    ctx.console.print(
        f"{name}: ONNX {exported.path.name} ({size / 2**20:.1f} MiB, pooling + normalize in the graph), parity on "
        f"real held-out sentences at {len(PARITY_SHAPES)} shapes: min cosine {parity.min_cosine:.7f}"
    )
    spec = {"inputs": list(exported.inputs), "output": exported.output, "dim": exported.dim, "opset": exported.opset,
            "parity": {"kind": PARITY_KIND, "min_cosine": parity.min_cosine, "threshold": parity.threshold,
                       "per_shape": [list(s) for s in parity.per_shape]}}  # fmt: skip
    return encoder, tok, spec, _parity_record(parity, len(sentences))


def _require_finite(name: str, encoder: Any) -> None:
    """A NaN or inf weight is refused before anything is exported (its graph would give NaN vectors)."""
    import torch

    bad = next((n for n, p in encoder.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ModelError(
            f"{name}: weight {bad} holds NaN or inf; not exported",
            "re-run distill (a lower distill.lr) or rebuild the student",
        )


def _is_bilstm(encoder: Any) -> bool:
    return getattr(encoder.backbone, "token_width", None) is not None  # kdpipe.models.bilstm.BiLSTMEncoderModel


# sentence-transformers' ONNX backend (optimum's ORTModelForFeatureExtraction) reads a Transformer module's graph
NO_ST_ONNX = "a BiLSTM student has no Transformer module, which sentence-transformers' ONNX backend needs"


def _st_layout(
    encoder: Any, tok: Any, folder: Path, work: Path, sentences: list[str], ctx: RunContext
) -> dict[str, Any]:
    from kdpipe.tasks.embedding.onnx import st_backend_parity, write_st_onnx

    if _is_bilstm(encoder):
        ctx.console.print(f"student/st: skipped ({NO_ST_ONNX}); the deployable graph is student/model.onnx")
        return {"dir": None, "skipped": NO_ST_ONNX}

    st_dir = work / "student" / "st"
    shutil.copytree(folder, st_dir)
    write_st_onnx(encoder, st_dir)
    parity = st_backend_parity(st_dir, encoder, tok, sentences)
    ctx.console.print(f"student/st: sentence-transformers ONNX layout (onnx/model.onnx), backend min cosine "
                      f"{parity.min_cosine:.7f}")  # fmt: skip
    return {"dir": "student/st", "onnx": "student/st/onnx/model.onnx", "min_cosine": parity.min_cosine}


def _gate(path: Path, tok: Any, encoder: Any, ref: float, sentences: list[str], budget: float) -> Gate:
    from kdpipe.tasks.embedding.encoder import encode
    from kdpipe.tasks.embedding.quality import lee_score

    embed = onnx_embed(path, tok, encoder.max_seq_length)
    try:
        spearman = lee_score(embed, name=path.name).spearman
        got, want = embed(sentences), encode(encoder, tok, sentences)
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        agreement, nonfinite = float(cos.min()), int((~np.isfinite(got)).any(axis=1).sum())
    except ModelError:  # a NaN embedding or metric (kdpipe.tasks.embedding.quality): the gate fails
        spearman, agreement, nonfinite = float("nan"), float("nan"), 1
    # budget x ref for a positive reference; ref - (1 - budget) |ref| in general, so a negative one is not inverted
    need = ref - (1.0 - budget) * abs(ref)
    ok = math.isfinite(spearman) and spearman >= need and nonfinite == 0
    return Gate(
        examples=len(sentences), value=spearman, reference=ref, budget=need, agreement=agreement,
        max_abs_diff=1.0 - agreement if math.isfinite(agreement) else float("nan"), atol=None,
        nonfinite_outputs=nonfinite, ok=ok, metric="lee_spearman",
    )  # fmt: skip


def _variants(cfg: ExportConfig, encoder: Any, tok: Any, fp32: Path, ref: float, sentences: list[str],
              ctx: RunContext) -> tuple[dict[str, ExportedModel], dict[str, Metric]]:  # fmt: skip
    from kdpipe.compress.quantize import make_variant

    models: dict[str, ExportedModel] = {}
    metrics: dict[str, Metric] = {}
    config = encoder.backbone.config
    # a BiLSTM has no heads, and a width-pruned student has fewer in some layers than config.num_attention_heads:
    # 0 and 0 let onnxruntime's optimizer read each attention's heads from its graph (or skip attention fusion)
    heads = 0 if config.pruned_heads or _is_bilstm(encoder) else int(config.num_attention_heads)
    hidden = int(config.hidden_size) if heads else 0
    for variant in cfg.variants:
        done = make_variant(variant, fp32, heads, hidden,
                            calibration=_calibration(tok, sentences, encoder.max_seq_length))  # fmt: skip
        path = fp32.with_name(done["file"])
        gate = _gate(path, tok, encoder, ref, sentences, cfg.accuracy_budget)
        verdict = "kept" if gate.ok else "REMOVED (missed the budget)"
        ctx.console.print(f"student {variant}: Lee Spearman {gate.value:.4f} vs fp32 {ref:.4f} (budget "
                          f"{gate.budget:.4f}), min cosine to fp32 {gate.agreement:.5f}: {verdict}")  # fmt: skip
        if not gate.ok:
            path.unlink(missing_ok=True)
        models[f"student-{variant}"] = ExportedModel(
            onnx=f"student/{done['file']}", spec={"parity": {"kind": PARITY_KIND}}, parity=_gate_parity(gate),
            source=ModelSource(stage="distill", dir=MODEL_DIR), variant=variant, of="student", gate=gate,
            transforms={k: v for k, v in done.items() if k != "file"},
        )  # fmt: skip
        metrics[f"student-{variant}_lee_spearman"] = Metric(_finite(gate.value), "Spearman rho")
        if gate.ok:
            metrics[f"student-{variant}_onnx_bytes"] = Metric(path.stat().st_size, "bytes")
    optimized = fp32.with_name("model.opt.onnx")
    if "optimized" not in cfg.variants:
        optimized.unlink(missing_ok=True)  # the int8 variants start from it; not asked for itself
    return models, metrics


ST_INT8 = "model_qint8.onnx"


def _st_int8(st_dir: Path, ref: float, budget: float, ctx: RunContext) -> dict[str, Any]:
    """Dynamic int8 of the sentence-transformers layout's graph, `onnx/model_qint8.onnx` (load it with
    model_kwargs={"file_name": "model_qint8.onnx"}), gated like the pooled variants on the Lee Spearman of
    SentenceTransformer(st_dir, backend="onnx"); removed when it misses."""
    from sentence_transformers import SentenceTransformer

    from kdpipe.compress.quantize import quantize_int8
    from kdpipe.tasks.embedding.quality import lee_score

    path = st_dir / "onnx" / ST_INT8
    quantize_int8(st_dir / "onnx" / "model.onnx", path)
    model = SentenceTransformer(str(st_dir), backend="onnx", device="cpu", model_kwargs={"file_name": ST_INT8})
    try:
        spearman = lee_score(lambda texts: model.encode(list(texts), convert_to_numpy=True), name=ST_INT8).spearman
    except ModelError:
        spearman = float("nan")
    need = ref - (1.0 - budget) * abs(ref)
    ok = math.isfinite(spearman) and spearman >= need
    if not ok:
        path.unlink(missing_ok=True)
    ctx.console.print(f"student/st/onnx/{ST_INT8}: Lee Spearman {spearman:.4f} (budget {need:.4f}): "
                      f"{'kept' if ok else 'REMOVED'}")  # fmt: skip
    return {"file": f"student/st/onnx/{ST_INT8}", "lee_spearman": _finite(spearman), "budget": need, "ok": ok}


def _gate_parity(gate: Gate) -> Parity:
    return Parity(kind=PARITY_KIND, max_abs_diff=gate.max_abs_diff, atol=1.0, agreement=_finite(gate.agreement) or 0.0,
                  examples=gate.examples, shapes=[], nonfinite_outputs=gate.nonfinite_outputs, ok=gate.ok)  # fmt: skip


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _calibration(tok: Any, sentences: list[str], max_length: int | None) -> list[dict[str, np.ndarray]]:
    """Feeds of real held-out sentences (8 per batch) for int8-static's calibration."""
    feeds = []
    for i in range(0, min(len(sentences), 64), 8):
        enc = tok(sentences[i : i + 8], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({k: v.astype("int64") for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return feeds


def run_export(cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.tasks.embedding.quality import lee_score

    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    sentences = data.read_sentences(t_manifest.path(info.held_out))[: cfg.parity_samples]
    s_folder = upstream.directory(MODEL_DIR)
    models: dict[str, ExportedModel] = {}
    metrics: dict[str, Metric] = {}
    sources = {"student": (s_folder, ModelSource(stage="distill", dir=MODEL_DIR))}
    if cfg.teacher:
        sources["teacher"] = (t_manifest.directory(info.model_dir), ModelSource(stage="teacher", dir=info.model_dir))
    for name, (folder, source) in sources.items():
        encoder, tok, spec, parity = _export_one(name, folder, work, sentences, cfg.opset, ctx)
        if name == "student":
            spec["sentence_transformers"] = _st_layout(encoder, tok, folder, work, sentences, ctx)
            student = (encoder, tok)
        models[name] = ExportedModel(onnx=f"{name}/model.onnx", spec=spec, parity=parity, source=source)
        metrics[f"{name}_min_cosine"] = Metric(spec["parity"]["min_cosine"], "cosine")
        metrics[f"{name}_onnx_bytes"] = Metric((work / name / "model.onnx").stat().st_size, "bytes")
    encoder, tok = student
    ref = lee_score(onnx_embed(work / "student" / "model.onnx", tok, encoder.max_seq_length), name="student").spearman
    metrics["student_onnx_lee_spearman"] = Metric(round(ref, 5), "Spearman rho")
    if "int8-dynamic" in cfg.variants and not _is_bilstm(encoder):
        spec = models["student"].spec["sentence_transformers"]
        spec["int8"] = _st_int8(work / "student" / "st", upstream.metric("lee_spearman"), cfg.accuracy_budget, ctx)
    extra, extra_metrics = _variants(cfg, encoder, tok, work / "student" / "model.onnx", upstream.metric(
        "lee_spearman"), sentences, ctx)  # fmt: skip
    return StageOutput(record=ExportRecord(models={**models, **extra}), metrics={**metrics, **extra_metrics})
