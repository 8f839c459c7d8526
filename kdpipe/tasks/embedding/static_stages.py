"""The static student (`student.arch: static`) through the stages; build.py, distill.py and export.py hand over.

- student: model2vec's distillation of the teacher stage's folder into `student/model/` (a folder
  model2vec.StaticModel and sentence-transformers' StaticEmbedding load), on the CPU; deterministic (PCA with the
  full SVD, no sampling). With student.static.sif_frequencies: corpus the SIF weights come from the token counts
  of the teacher stage's transfer sentences, and with finetune_epochs > 0 the table is then trained on the
  teacher's embeddings of them (kdpipe.tasks.embedding.static.finetune_static; the run's seed picks the validation
  split and the batch order; without training a seed changes nothing).
- distill: static: no training. The student's folder is passed through unchanged and scored like the transformer
  student (Lee Spearman / Pearson, retention, recall@10 and the cosine figure; mean cosine to the teacher is
  undefined when pca_dims differs from the teacher's width: the spaces differ, and is recorded as null).
- export: the static graph (kdpipe.tasks.embedding.static_onnx) with cosine parity against StaticModel.encode at
  three shapes (fail closed), the teacher's graph as for the transformer students. No variants: the graph is a
  Gather and a mean, with no MatMul for int8, no attention to fuse, and an fp32 table that is the model itself;
  check_recipe refuses export.variants for it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    DistillRecord,
    EmbeddingInfo,
    ExportedModel,
    ExportRecord,
    ModelSource,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    record,
)
from kdpipe.config import DistillConfig, ExportConfig, StaticStudentConfig, StudentConfig
from kdpipe.tasks.embedding import data
from kdpipe.tasks.embedding.build import MODEL_DIR

NO_TRAINING = "static: no training (model2vec's distillation is the student stage); the student is passed through"
NO_VARIANTS = (
    "a static student has no variants: its graph is a Gather and a masked mean (no MatMul for int8, nothing to fuse)"
)


def run_static_student(cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.tasks.embedding.static import distill_static

    settings = cfg.static or StaticStudentConfig()
    t_info = record(upstream, TeacherRecord).info_as(EmbeddingInfo)
    assert t_info is not None
    transfer = data.read_sentences(upstream.path(t_info.transfer))
    frequencies = transfer if settings.sif_frequencies == "corpus" else None  # token counts for the SIF weights
    start = time.perf_counter()
    train_on = None
    if settings.finetune_epochs > 0:  # the teacher's embeddings of the transfer sentences, the table's targets
        from kdpipe.tasks.embedding.build import load
        from kdpipe.tasks.embedding.encoder import encode

        teacher, t_tok = load(upstream.directory(MODEL_DIR))
        train_on = (transfer, encode(teacher, t_tok, transfer))
        del teacher
    student = distill_static(
        upstream.directory(MODEL_DIR), work / MODEL_DIR, pca_dims=settings.pca_dims,
        sif_coefficient=settings.sif_coefficient, device="cpu", frequencies=frequencies, train_on=train_on,
        epochs=settings.finetune_epochs, seed=ctx.seed,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    params = student.vocab_size * student.dim
    t_params = upstream.metric("params")
    ctx.console.print(
        f"static student: {student.method}: {student.vocab_size} tokens x {student.dim}-d ({params / 1e6:.1f}M "
        f"values), {student.pooling} pooling of each token through the teacher, in {seconds:.1f} s"
    )
    rec = StudentRecord(kept_layers=[], layer_map={}, init="model2vec", arch="static")
    metrics = {
        "params": Metric(params, "parameters"),
        "layers": Metric(0, "layers"),
        "teacher_layers": Metric(t_info.layers if t_info else None, "layers"),
        "compression": Metric(round(t_params / params, 3) if isinstance(t_params, int) else None, "x"),
        "dim": Metric(student.dim, "dimensions"),
        "vocab_size": Metric(student.vocab_size, "tokens"),
        "distill_seconds": Metric(round(seconds, 1), "s"),
    }
    return StageOutput(record=rec, metrics=metrics)


def run_static_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.tasks.embedding.build import load
    from kdpipe.tasks.embedding.distill import RECALL_K, _output, evaluate_embedders
    from kdpipe.tasks.embedding.encoder import embedder
    from kdpipe.tasks.embedding.static import static_embedder

    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    ctx.console.print(NO_TRAINING)
    teacher, t_tok = load(t_manifest.directory(info.model_dir))
    held_out = data.read_sentences(t_manifest.path(info.held_out))
    start = time.perf_counter()
    scores = evaluate_embedders(static_embedder(upstream.directory(MODEL_DIR)), embedder(teacher, t_tok), held_out,
                                work)  # fmt: skip
    shutil.copytree(upstream.directory(MODEL_DIR), work / MODEL_DIR)
    history = [{"epoch": 0, "step": 0, "train_loss": float("nan"), "seconds": 0.0}]
    out = _output(cfg, t_manifest, scores, history, "cpu", 0, ctx)
    assert isinstance(out.record, DistillRecord)
    rec = out.record.model_copy(update={"history": [], "losses": [], "warnings": [NO_TRAINING]})
    metrics = {k: v for k, v in out.metrics.items() if k not in ("steps", "final_loss", "train_seconds")}
    metrics["eval_seconds"] = Metric(round(time.perf_counter() - start, 1), "s")
    metrics["steps"] = Metric(0, "steps")
    assert f"recall_at_{RECALL_K}" in metrics
    return StageOutput(record=rec, metrics=metrics)


def is_static(student: Manifest) -> bool:
    """Whether the student stage's manifest holds a static student (StudentRecord.arch)."""
    return record(student, StudentRecord).arch == "static"


def run_static_export(cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """The static graph, and the teacher's by export.py's `_export_one` as for the transformer students."""
    from kdpipe.tasks.embedding.export import _export_one as export_transformer
    from kdpipe.tasks.embedding.quality import lee_score
    from kdpipe.tasks.embedding.static import load_static

    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    sentences = data.read_sentences(t_manifest.path(info.held_out))[: cfg.parity_samples]
    model = load_static(upstream.directory(MODEL_DIR))
    student, metrics = _export_student(model, work, sentences, cfg.opset, ctx)
    models = {"student": student}
    if cfg.teacher:
        _, _, t_spec, t_parity = export_transformer("teacher", t_manifest.directory(info.model_dir), work, sentences,
                                                   cfg.opset, ctx)  # fmt: skip
        models["teacher"] = ExportedModel(onnx="teacher/model.onnx", spec=t_spec, parity=t_parity,
                                          source=ModelSource(stage="teacher", dir=info.model_dir))  # fmt: skip
        metrics["teacher_min_cosine"] = Metric(t_spec["parity"]["min_cosine"], "cosine")
        metrics["teacher_onnx_bytes"] = Metric((work / "teacher" / "model.onnx").stat().st_size, "bytes")
    ref = lee_score(_onnx_static_embed(work / student.onnx, model), name="student").spearman
    metrics["student_onnx_lee_spearman"] = Metric(round(ref, 5), "Spearman rho")
    return StageOutput(record=ExportRecord(models=models), metrics=metrics)


def _export_student(
    model: Any, work: Path, sentences: list[str], opset: int, ctx: RunContext
) -> tuple[ExportedModel, dict[str, Metric]]:
    from kdpipe.tasks.embedding.export import PARITY_KIND, _parity_record
    from kdpipe.tasks.embedding.onnx import PARITY_SHAPES
    from kdpipe.tasks.embedding.static_onnx import INPUTS, export_static_onnx, static_parity

    exported = export_static_onnx(model, work / "student" / "model.onnx", opset=opset)
    parity = static_parity(model, exported.path, sentences)  # raises below 0.9999: fail closed, nothing written
    size = exported.path.stat().st_size
    ctx.console.print(
        f"student (static): ONNX model.onnx ({size / 2**20:.1f} MiB, gather + mean"
        f"{' + normalize' if exported.normalize else ''} in the graph), parity with StaticModel.encode on real "
        f"held-out sentences at {len(PARITY_SHAPES)} shapes: min cosine {parity.min_cosine:.7f}"
    )
    spec = {"inputs": list(INPUTS), "output": "sentence_embedding", "dim": exported.dim, "opset": opset,
            "vocab_size": exported.vocab_size, "arch": "static", "normalize": exported.normalize,
            "tokenizer": "model/tokenizer.json, outside the graph (model2vec: no special tokens, unknown dropped)",
            "parity": {"kind": PARITY_KIND, "min_cosine": parity.min_cosine, "threshold": parity.threshold,
                       "reference": "model2vec StaticModel.encode",
                       "per_shape": [list(s) for s in parity.per_shape]}}  # fmt: skip
    student = ExportedModel(onnx="student/model.onnx", spec=spec, parity=_parity_record(parity, len(sentences)),
                            source=ModelSource(stage="distill", dir=MODEL_DIR))  # fmt: skip
    return student, {"student_min_cosine": Metric(parity.min_cosine, "cosine"),
                     "student_onnx_bytes": Metric(size, "bytes")}  # fmt: skip


def _onnx_static_embed(path: Path, model: Any, length: int = 512, batch_size: int = 64) -> Any:
    """texts -> (N, D) from the static graph (onnxruntime, CPU), tokenised as StaticModel.encode does."""
    import numpy as np
    import onnxruntime as ort

    from kdpipe.tasks.embedding.static import static_feed

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def embed(texts: Any) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i : i + batch_size])
            longest = max(1, max(len(r) for r in model.tokenize(chunk, max_length=length)))
            out.append(session.run(None, static_feed(model, chunk, min(longest, length)))[0])
        return np.concatenate(out).astype(np.float32)

    return embed
