"""The embedding task's distill stage: the student learns the teacher's pooled sentence embeddings.

The teacher's embeddings of the transfer sentences are computed once (inference mode, N x D in memory); the student
is trained on distill.embedding's weighted terms (MSE as sentence-transformers' MSELoss distillation, 1 - cosine,
in-batch InfoNCE against the teacher's embeddings) with AdamW, linear warm-up and decay, gradient clipping and a
finite-loss check every step (a NaN or inf is a TrainingDivergedError naming the step; nothing is written). Then
the student is scored: Lee Spearman / Pearson, and on the held-out sentences mean cosine to the teacher and
recall@10 of the teacher's neighbours; the cosine-distribution figure of both is written as cosines.png.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import DistillRecord, EmbeddingInfo, RunContext, StageOutput, TeacherRecord, record
from kdpipe.config import DistillConfig, EmbeddingDistillConfig
from kdpipe.data.tables import read_transfer
from kdpipe.errors import ModelError, TrainingDivergedError
from kdpipe.tasks.embedding import data
from kdpipe.tasks.embedding.build import MODEL_DIR, load

if TYPE_CHECKING:
    from torch import Tensor

FIGURE = "cosines.png"
RECALL_K = 10


@dataclass(frozen=True)
class Batches:
    texts: list[str]
    targets: np.ndarray  # (N, D) teacher embeddings
    batch_size: int


def terms(cfg: DistillConfig) -> EmbeddingDistillConfig:
    """distill.embedding, or MSE alone (sentence-transformers' distillation) when it is not given."""
    return cfg.embedding or EmbeddingDistillConfig()


def loss(s: Tensor, t: Tensor, w: EmbeddingDistillConfig) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of the terms on (B, D) student and teacher embeddings, and each term's value."""
    import torch
    import torch.nn.functional as F

    parts: dict[str, Tensor] = {}
    if w.mse:
        parts["mse"] = F.mse_loss(s, t)
    if w.cosine:
        parts["cosine"] = (1 - F.cosine_similarity(s, t, dim=1)).mean()
    if w.contrastive:
        logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / w.temperature
        parts["contrastive"] = F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))
    total = sum((getattr(w, k) * v for k, v in parts.items()), torch.zeros((), device=s.device))
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _texts(cfg: DistillConfig, teacher: Manifest) -> list[str]:
    info = record(teacher, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    texts = (
        read_transfer(Path(cfg.transfer)).texts if cfg.transfer else data.read_sentences(teacher.path(info.transfer))
    )
    return texts[: cfg.train_limit] if cfg.train_limit else texts


def _schedule(opt: Any, total: int, warmup_ratio: float) -> Any:
    import torch

    warm = round(warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )


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
    targets = torch.from_numpy(b.targets)
    student.train()
    with _progress(ctx.console) as progress:
        task = progress.add_task("distill (embedding)", total=total, loss=0.0, speed=0.0)
        for epoch in range(math.ceil(total / per_epoch)):
            order = np.random.RandomState(ctx.seed * 1000 + epoch).permutation(len(b.texts))
            start, losses = time.perf_counter(), list[float]()
            for i in range(0, len(order), b.batch_size):
                if step >= total:
                    break
                rows = order[i : i + b.batch_size]
                value = _step(student, tok, [b.texts[r] for r in rows], targets[rows], w, opt, cfg.grad_clip)
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


def _step(
    student: Any, tok: Any, texts: list[str], t: Tensor, w: EmbeddingDistillConfig, opt: Any, clip: float
) -> float:
    import torch

    batch = tok(texts, padding=True, truncation=True, max_length=student.max_seq_length, return_tensors="pt")
    s = student(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    total, _ = loss(s, t.to(s.dtype), w)
    value = float(total.detach())
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    opt.step()
    return value


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


def run_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    from kdpipe.tasks.embedding.encoder import encode, save_sentence_transformers
    from kdpipe.train.loop import pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(ctx.seed)
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    teacher, t_tok = load(t_manifest.directory(info.model_dir))
    student, s_tok = load(upstream.directory(MODEL_DIR))
    device = pick_device(cfg.device, "fp32").torch_device
    teacher.to(device)
    student.to(device)
    texts = _texts(cfg, t_manifest)
    w = terms(cfg)
    ctx.console.print(
        f"distilling (embedding) on {device}: {w.mse:g} x mse + {w.cosine:g} x cosine + {w.contrastive:g} x "
        f"contrastive (T {w.temperature:g}); {len(texts)} transfer sentences x {cfg.epochs:g} epochs"
    )
    start = time.perf_counter()
    targets = encode(teacher, t_tok, texts, batch_size=64)  # once, in inference mode
    ctx.console.print(f"teacher embeddings of the transfer set: {targets.shape} in {time.perf_counter() - start:.1f} s")
    history = fit(student, s_tok, Batches(texts, targets, cfg.batch_size), cfg, ctx)
    student.cpu()
    teacher.cpu()
    _require_finite(student)
    held_out = data.read_sentences(t_manifest.path(info.held_out))
    scores = evaluate(student, s_tok, teacher, t_tok, held_out, work)
    save_sentence_transformers(student, s_tok, work / MODEL_DIR)
    return _output(cfg, t_manifest, scores, history, device, len(texts), ctx)


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
    examples: int, ctx: RunContext,
) -> StageOutput:  # fmt: skip
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
    rec = DistillRecord(
        device=device, precision="fp32", history=history, losses=[terms(cfg).model_dump(mode="json")],
        schedule_kind="all", schedule_events=[], train_examples=examples,
        warnings=["distill.baseline is ignored for embedding (no labels to train a no-KD baseline on)"]
        if cfg.baseline else [],
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
