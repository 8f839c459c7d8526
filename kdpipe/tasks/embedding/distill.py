"""The embedding task's distill stage: the student learns the teacher's pooled sentence embeddings.

The teacher's embeddings of the transfer sentences (N x D) are computed once in inference mode and kept in the
teacher-output cache (kdpipe.tasks.embedding.cache; read back on a later run), unless distill.embedding.hidden > 0:
then the teacher runs on every batch (no_grad) for its hidden states. The student is trained on distill.embedding's
weighted terms (MSE as sentence-transformers' MSELoss distillation, 1 - cosine, in-batch InfoNCE against the
teacher's embeddings, PKT and RKD distance / angle on the batch's embeddings, and the hidden-state MSE at the layers
the student was copied from) with AdamW, linear warm-up and decay, gradient clipping and a finite-loss check every
step (a NaN or inf is a TrainingDivergedError naming the step; nothing is written). Then the student is scored: Lee
Spearman / Pearson, and on the held-out sentences mean cosine to the teacher and recall@10 of the teacher's
neighbours; the cosine-distribution figure of both is written as cosines.png, and the teacher x student layer linear
CKA of the mean-pooled hidden states on the held-out sentences as cka.json and cka.png.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    DistillRecord,
    EmbeddingInfo,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    record,
)
from kdpipe.config import DistillConfig, EmbeddingDistillConfig, Recipe
from kdpipe.data.tables import read_transfer
from kdpipe.errors import ConfigError, ModelError, TrainingDivergedError
from kdpipe.tasks.embedding import data
from kdpipe.tasks.embedding.build import MODEL_DIR, load

if TYPE_CHECKING:
    from torch import Tensor

FIGURE = "cosines.png"
CKA_FIGURE = "cka.png"
CKA_JSON = "cka.json"
RECALL_K = 10
POOLED = ("mse", "cosine", "contrastive")  # the terms that compare the two embeddings entry by entry


@dataclass(frozen=True)
class Batches:
    """The transfer sentences and what the student learns from: the teacher's (N, D) embeddings, or (targets
    None, distill.embedding.hidden > 0) the teacher itself, run on every batch, and the student -> teacher
    hidden-state index map of the hidden term."""

    texts: list[str]
    targets: np.ndarray | None
    batch_size: int
    teacher: Any = None
    layer_map: dict[int, int] | None = None


def terms(cfg: DistillConfig) -> EmbeddingDistillConfig:
    """distill.embedding, or MSE alone (sentence-transformers' distillation) when it is not given."""
    return cfg.embedding or EmbeddingDistillConfig()


def loss(s: Tensor, t: Tensor, w: EmbeddingDistillConfig) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of the terms on (B, D_s) student and (B, D_t) teacher embeddings, and each term's value.
    mse, cosine and contrastive need D_s = D_t; pkt, rkd_distance and rkd_angle do not (kdpipe.losses.relational).
    The hidden term is not here (it reads hidden states): `_step` adds it."""
    import torch
    import torch.nn.functional as F

    from kdpipe.losses import relational

    parts: dict[str, Tensor] = {}
    if w.mse:
        parts["mse"] = F.mse_loss(s, t)
    if w.cosine:
        parts["cosine"] = (1 - F.cosine_similarity(s, t, dim=1)).mean()
    if w.contrastive:
        logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / w.temperature
        parts["contrastive"] = F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))
    if w.pkt:
        parts["pkt"] = relational.pkt(s, t)
    if w.rkd_distance:
        parts["rkd_distance"] = relational.rkd_distance(s, t)
    if w.rkd_angle:
        parts["rkd_angle"] = relational.rkd_angle(s, t)
    total = sum((getattr(w, k) * v for k, v in parts.items()), torch.zeros((), device=s.device))
    return total, {k: float(v.detach()) for k, v in parts.items()}


def layer_map(student: StudentRecord) -> dict[int, int]:
    """Student hidden-state index -> teacher hidden-state index for a layer-subset student: the student's layer
    i (0-based, hidden-state index i + 1) -> the teacher layer it was copied from, kept_layers[i] + 1. The
    embeddings (index 0) are not mapped."""
    return {i + 1: t + 1 for i, t in enumerate(student.kept_layers)}


def check_terms(w: EmbeddingDistillConfig, student: Any, teacher: Any, s_rec: StudentRecord) -> None:
    """Refuse, in one line each, the terms the two encoders cannot be compared on: mse / cosine / contrastive when
    the embedding widths differ, and hidden unless the student is a layer subset (init copy) of the teacher with
    its hidden width."""
    pooled = [k for k in POOLED if getattr(w, k)]
    if pooled and student.dim != teacher.dim:
        raise ConfigError(
            f"distill.embedding.{pooled[0]}: the student's embeddings are {student.dim}-d, the teacher's "
            f"{teacher.dim}-d",
            "set distill.embedding: {mse: 0, cosine: 0, contrastive: 0} and use pkt / rkd_distance / rkd_angle",
        )
    if not w.hidden:
        return
    if s_rec.init != "copy" or s_rec.arch != "teacher":
        why = f"the student is {'static' if s_rec.arch == 'static' else s_rec.init}, not teacher layers"
    elif student.hidden_size != teacher.hidden_size:
        why = f"the student's hidden width {student.hidden_size} differs from the teacher's {teacher.hidden_size}"
    else:
        return
    raise ConfigError(f"distill.embedding.hidden: {why} (no hidden states to match)", "set distill.embedding.hidden: 0")


def check_recipe_terms(recipe: Recipe) -> None:
    """The recipe-level part of `check_terms`, before any model loads: hidden > 0 needs a layer-subset student
    (not student.pretrained, not student.arch: static or bilstm)."""
    w, s = recipe.distill.embedding, recipe.student
    if w is None or not w.hidden:
        return
    what = f"student.arch: {s.arch}" if s.arch != "teacher" else "student.pretrained" if s.pretrained else None
    if what is not None:
        raise ConfigError(
            f"distill.embedding.hidden: {what} has no teacher layers to match hidden states with",
            "set distill.embedding.hidden: 0",
        )


@contextmanager
def hidden_states(encoder: Any) -> Iterator[list[tuple[Tensor, ...]]]:
    """While open, every forward of `encoder`'s backbone runs with output_hidden_states=True and its hidden states
    (embeddings first, then one (B, T, H) per layer) are appended to the yielded list; the forward is unchanged."""
    seen: list[tuple[Tensor, ...]] = []
    backbone = encoder.backbone
    pre = backbone.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "output_hidden_states": True}), with_kwargs=True
    )
    post = backbone.register_forward_hook(lambda m, args, out: seen.append(tuple(out.hidden_states)))
    try:
        yield seen
    finally:
        pre.remove()
        post.remove()


def _texts(cfg: DistillConfig, teacher: Manifest) -> list[str]:
    info = record(teacher, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    texts = (
        read_transfer(Path(cfg.transfer)).texts if cfg.transfer else data.read_sentences(teacher.path(info.transfer))
    )
    return texts[: cfg.train_limit] if cfg.train_limit else texts


def _schedule(opt: Any, total: int, warmup_ratio: float) -> Any:
    from kdpipe.train.loop import linear_schedule

    return linear_schedule(opt, total, round(warmup_ratio * total))


def _diverged(step: int, epoch: int, value: float, lr: float) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"distill (embedding): training diverged at step {step}, epoch {epoch}: the loss is {value}",
        f"lower distill.lr (it is {lr:g}); nothing was written",
    )


def fit(student: Any, tok: Any, b: Batches, cfg: DistillConfig, ctx: RunContext) -> list[dict[str, float]]:
    """Train `student` (in place) on `b`; one history row per epoch."""
    import torch

    from kdpipe.train.loop import _progress

    w = terms(cfg)
    per_epoch = math.ceil(len(b.texts) / b.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched, history, step = _schedule(opt, total, cfg.warmup_ratio), [], 0
    student.train()
    with _progress(ctx.console) as progress:
        task = progress.add_task("distill (embedding)", total=total, loss=0.0, speed=0.0)
        for epoch in range(math.ceil(total / per_epoch)):
            order = np.random.RandomState(ctx.seed * 1000 + epoch).permutation(len(b.texts))
            start, losses = time.perf_counter(), list[float]()
            for i in range(0, len(order), b.batch_size):
                if step >= total:
                    break
                value = _step(student, tok, b, order[i : i + b.batch_size], w, opt, cfg.grad_clip)
                if not math.isfinite(value):
                    raise _diverged(step + 1, epoch, value, cfg.lr)
                sched.step()
                step, losses = step + 1, [*losses, value]
                speed = len(losses) * b.batch_size / max(1e-9, time.perf_counter() - start)
                progress.update(task, advance=1, loss=value, speed=speed)
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)), "seconds": seconds})
    student.eval()
    return history


def _objective(
    student: Any, batch: dict[str, Tensor], b: Batches, rows: np.ndarray, w: EmbeddingDistillConfig
) -> Tensor:
    """The batch's weighted loss: `loss` on the student's embeddings against the cached teacher rows, or against
    the teacher run now (no_grad, eval mode) plus hidden x the hidden-state MSE at `b.layer_map`."""
    import torch

    from kdpipe.losses.features import hidden_mse

    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    if b.targets is not None:
        s = student(ids, mask, types)
        return loss(s, torch.from_numpy(b.targets[rows]).to(s.device, s.dtype), w)[0]
    assert b.teacher is not None and b.layer_map is not None
    with hidden_states(student) as hs:
        s = student(ids, mask, types)
    with torch.no_grad(), hidden_states(b.teacher) as ht:
        t = b.teacher(ids, mask, types)
    return loss(s, t.to(s.dtype), w)[0] + w.hidden * hidden_mse(hs[-1], ht[-1], b.layer_map, mask)


def _step(
    student: Any, tok: Any, b: Batches, rows: np.ndarray, w: EmbeddingDistillConfig, opt: Any, clip: float
) -> float:
    from kdpipe.train.loop import optimizer_step

    texts = [b.texts[r] for r in rows]
    batch = tok(texts, padding=True, truncation=True, max_length=student.max_seq_length, return_tensors="pt")
    device = next(student.parameters()).device
    total = _objective(student, {k: v.to(device) for k, v in batch.items()}, b, rows, w)
    return optimizer_step(total, opt, student.parameters(), clip)


def evaluate(student: Any, s_tok: Any, teacher: Any, t_tok: Any, held_out: list[str], work: Path) -> dict[str, float]:
    """Lee Spearman / Pearson of the student, mean cosine and recall@10 against the teacher on the held-out
    sentences, and the cosine-distribution figure of both (work/cosines.png)."""
    from kdpipe.tasks.embedding.encoder import embedder

    return evaluate_embedders(embedder(student, s_tok), embedder(teacher, t_tok), held_out, work)


def evaluate_embedders(s_embed: Any, t_embed: Any, held_out: list[str], work: Path) -> dict[str, float]:
    """`evaluate` on any two texts -> (N, D) functions (the static student is not a SentenceEncoder); mean cosine
    is NaN when the widths differ (different spaces)."""
    from kdpipe.tasks.embedding import quality

    lee = quality.load_lee()
    score = quality.lee_score(s_embed, lee, name="student")
    s_vec, t_vec = s_embed(held_out), t_embed(held_out)
    out = {"lee_spearman": score.spearman, "lee_pearson": score.pearson}
    out["mean_cosine"] = quality.mean_cosine(s_vec, t_vec) if s_vec.shape[1] == t_vec.shape[1] else float("nan")
    out[f"recall_at_{RECALL_K}"] = quality.recall_at_k(s_vec, t_vec, RECALL_K)
    t_dist = quality.cosine_distributions(t_embed, lee, "teacher")
    s_dist = quality.cosine_distributions(s_embed, lee, "student")
    quality.plot_distributions(work / FIGURE, t_dist, s_dist)
    out["separation"], out["teacher_separation"] = s_dist.separation, t_dist.separation
    return out


def pooled_hidden_states(encoder: Any, tok: Any, texts: list[str], batch_size: int = 64) -> list[Tensor]:
    """One (N, H) float32 tensor per hidden state of `encoder` (embeddings first): each sentence's hidden states
    mean-pooled over its real tokens (kdpipe.losses.masks.mean_pool), in eval mode without gradients."""
    import torch

    from kdpipe.losses.masks import mean_pool

    device = next(encoder.parameters()).device
    chunks: list[list[Tensor]] = []
    encoder.eval()
    for start in range(0, len(texts), batch_size):
        batch = tok(texts[start : start + batch_size], padding=True, truncation=True,
                    max_length=encoder.max_seq_length, return_tensors="pt")  # fmt: skip
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), hidden_states(encoder) as seen:
            encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        chunks.append([mean_pool(h, batch["attention_mask"]).cpu() for h in seen[-1]])
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def write_cka(
    student: Any, s_tok: Any, teacher: Any, t_tok: Any, texts: list[str], mapping: dict[int, int] | None, work: Path
) -> list[float] | None:
    """docs/methods.md §3.3 on sentence encoders: the teacher x student layer linear CKA of the mean-pooled hidden
    states of `texts` (widths may differ), written as work/cka.json and the heat map work/cka.png; returns its
    entries along `mapping` (student index -> teacher index; None: no diagonal). Non-finite hidden states are a
    ModelError (no plot of NaN)."""
    import torch

    from kdpipe.reporting.analysis import cka_document, cka_matrix
    from kdpipe.reporting.plots import plot_cka

    t_feats = pooled_hidden_states(teacher, t_tok, texts)
    s_feats = pooled_hidden_states(student, s_tok, texts)
    if not all(bool(torch.isfinite(f).all()) for f in (*t_feats, *s_feats)):
        raise ModelError("distill (embedding): the hidden states for the CKA hold NaN or inf", "nothing was written")
    matrix = cka_matrix(t_feats, s_feats)
    doc = {**cka_document(matrix, len(texts)), "layer_map": {str(k): v for k, v in (mapping or {}).items()}}
    (work / CKA_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    plot_cka(matrix, work / CKA_FIGURE)
    return None if mapping is None else [float(round(matrix[t][s], 5)) for s, t in sorted(mapping.items())]


def _announce(w: EmbeddingDistillConfig, device: str, texts: list[str], cfg: DistillConfig, ctx: RunContext) -> None:
    weighted = " + ".join(f"{getattr(w, k):g} x {k}" for k in w.TERMS if getattr(w, k) or k in POOLED)
    how = (
        "the teacher runs on every batch (no_grad) for its hidden states"
        if w.hidden
        else "the teacher's embeddings are computed once (or read from the cache)"
    )
    ctx.console.print(
        f"distilling (embedding) on {device}: {weighted} (T {w.temperature:g}); {len(texts)} transfer sentences x "
        f"{cfg.epochs:g} epochs; {how}"
    )


def _targets(
    cfg: DistillConfig, t_manifest: Manifest, teacher: Any, t_tok: Any, texts: list[str], work: Path, ctx: RunContext
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The teacher's (N, D) embeddings of the transfer sentences through the teacher-output cache, and its record;
    None (the teacher runs per batch; the cache is bypassed) when distill.embedding.hidden > 0."""
    from kdpipe.tasks.embedding import cache
    from kdpipe.tasks.embedding.encoder import encode

    if terms(cfg).hidden:
        return None, {"status": "bypassed", "reason": cache.bypass_reason(cfg, ctx, (len(texts), teacher.dim))}
    return cache.teacher_embeddings(
        cfg, t_manifest, texts, lambda: encode(teacher, t_tok, texts, batch_size=cache.BATCH_SIZE),
        (len(texts), teacher.dim), teacher.max_seq_length, work, ctx,
    )  # fmt: skip


def run_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """Train the upstream student on the teacher (check_terms first), score it, write cka.json / cka.png (at least
    2 of the first distill.cka_samples held-out sentences) and the student's sentence-transformers folder."""
    import torch

    from kdpipe.tasks.embedding.encoder import save_sentence_transformers
    from kdpipe.train.loop import pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(ctx.seed)
    t_manifest, s_rec, w = upstream.upstream("teacher"), record(upstream, StudentRecord), terms(cfg)
    info = record(t_manifest, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    teacher, t_tok = load(t_manifest.directory(info.model_dir))
    student, s_tok = load(upstream.directory(MODEL_DIR))
    check_terms(w, student, teacher, s_rec)
    device = pick_device(cfg.device, "fp32").torch_device
    teacher.to(device)
    student.to(device)
    texts = _texts(cfg, t_manifest)
    _announce(w, device, texts, cfg, ctx)
    mapping = layer_map(s_rec) if s_rec.init == "copy" else None
    targets, cache_info = _targets(cfg, t_manifest, teacher, t_tok, texts, work, ctx)
    batches = Batches(texts, targets, cfg.batch_size, teacher.eval(), mapping)
    history = fit(student, s_tok, batches, cfg, ctx)
    student.cpu()
    teacher.cpu()
    _require_finite(student)
    held_out = data.read_sentences(t_manifest.path(info.held_out))
    scores = evaluate(student, s_tok, teacher, t_tok, held_out, work)
    cka_texts = held_out[: cfg.cka_samples]
    diagonal = write_cka(student, s_tok, teacher, t_tok, cka_texts, mapping, work) if len(cka_texts) >= 2 else None
    save_sentence_transformers(student, s_tok, work / MODEL_DIR)
    return _output(cfg, t_manifest, scores, history, device, len(texts), ctx, teacher_cache=cache_info, cka=diagonal)


def _require_finite(student: Any) -> None:
    import torch

    bad = [n for n, p in student.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDivergedError(
            f"distill (embedding): the student's weights hold NaN or inf after training ({bad[0]})",
            "lower distill.lr; nothing was written",
        )


def _output(
    cfg: DistillConfig, teacher: Manifest, scores: dict[str, float], history: list[dict[str, float]], device: str,
    examples: int, ctx: RunContext, teacher_cache: dict[str, Any] | None = None, cka: list[float] | None = None,
) -> StageOutput:  # fmt: skip
    """The stage's metrics and DistillRecord (with the teacher-output cache's record and the CKA diagonal)."""
    t_spearman = teacher.metric("lee_spearman")
    retention = _retention(scores["lee_spearman"], t_spearman)
    kept = "undefined (the teacher's Spearman is 0 or not finite)" if retention is None else f"{retention:.2f}%"
    ctx.console.print(
        f"student Lee Spearman {scores['lee_spearman']:.4f} (teacher {t_spearman}; retention {kept}), Pearson "
        f"{scores['lee_pearson']:.4f}; held out: mean cosine {scores['mean_cosine']:.4f}, recall@{RECALL_K} "
        f"{scores[f'recall_at_{RECALL_K}']:.4f}"
    )
    metrics = {
        "lee_spearman": Metric(round(scores["lee_spearman"], 5), "Spearman rho"),
        "lee_pearson": Metric(round(scores["lee_pearson"], 5), "Pearson r"),
        "teacher_lee_spearman": Metric(t_spearman, "Spearman rho"),
        "retention": Metric(retention, "% of the teacher's Lee Spearman"),
        "mean_cosine": Metric(_rounded(scores["mean_cosine"]), "cosine"),
        f"recall_at_{RECALL_K}": Metric(round(scores[f"recall_at_{RECALL_K}"], 5), "fraction"),
        "separation": Metric(round(scores["separation"], 5), "cosine (similar - dissimilar)"),
        "teacher_separation": Metric(round(scores["teacher_separation"], 5), "cosine (similar - dissimilar)"),
        "train_seconds": Metric(round(sum(h["seconds"] for h in history), 1), "s"),
        "steps": Metric(int(history[-1]["step"]), "steps"),
        "final_loss": Metric(round(float(history[-1]["train_loss"]), 6), "loss"),
    }
    if cka:
        metrics["cka_diagonal_mean"] = Metric(_rounded(float(np.mean(cka))), "linear CKA (mapped layers)")
    rec = DistillRecord(
        device=device, precision="fp32", history=history, losses=[terms(cfg).model_dump(mode="json")],
        schedule_kind="all", schedule_events=[], train_examples=examples,
        warnings=["distill.baseline is ignored for embedding (no labels to train a no-KD baseline on)"]
        if cfg.baseline else [], teacher_cache=teacher_cache, cka_diagonal=cka,
    )  # fmt: skip
    return StageOutput(record=rec, metrics=metrics)


def _rounded(value: float) -> float | None:
    return round(value, 5) if math.isfinite(value) else None


def _retention(student: float, teacher: Any) -> float | None:
    """100 x student / teacher; None (undefined) for a zero, missing or non-finite teacher, never divided."""
    if not isinstance(teacher, int | float) or not math.isfinite(teacher) or teacher == 0:
        return None
    if not math.isfinite(student):
        raise ModelError(f"student Lee Spearman is {student}", "the student is broken; nothing was written")
    return round(100 * student / teacher, 2)
