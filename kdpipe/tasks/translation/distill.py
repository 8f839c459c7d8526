"""Translation distillation: the recipe's terms mapped onto Seq2SeqKD (hinton, reverse_kl), plain CE and the prior."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    DistillRecord,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    TranslationInfo,
    record,
)
from kdpipe.config import DistillConfig
from kdpipe.errors import ConfigError
from kdpipe.tasks.translation import seq2seq
from kdpipe.tasks.translation.checks import KDPlan, kd_plan
from kdpipe.tasks.translation.common import MODEL_DIR, Pairs, Plan, fit, pick_device, read_splits, test_bleu


def _distil(
    s_dir: Path, teacher: Any, plan: Plan, data: Pairs, kd: KDPlan, prior: Path | None, device: str, ctx: RunContext
) -> tuple[Any, Any, list[dict[str, float]]]:
    """A fresh copy of the student trained with `kd` (teacher None: plain CE) and the prior term."""
    from kdpipe.methods.bayesinit import PriorPenalty

    student, tok = seq2seq.load_seq2seq(s_dir)
    student.to(device)
    regulariser = None
    if kd.prior_weight and prior is not None:
        penalty, weight = PriorPenalty(prior, student), kd.prior_weight
        regulariser = lambda _m: weight * penalty()  # noqa: E731
    history = fit(student, tok, data, plan, ctx, teacher=teacher if kd.kd else None, kd=kd.kd, regulariser=regulariser)
    return student, tok, history


def run_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    plan_kd = kd_plan(cfg)
    t_manifest = upstream.upstream("teacher")
    t_rec, s_rec = record(t_manifest, TeacherRecord), record(upstream, StudentRecord)
    info = t_rec.info_as(TranslationInfo)
    assert info is not None
    if plan_kd.prior_weight and s_rec.prior is None:
        raise ConfigError(
            f"distill.losses: the 'prior' term needs a student built with student.init: bayes (this one: {s_rec.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    data = read_splits(t_manifest)
    if cfg.train_limit:
        data = replace(data, train=data.train[: cfg.train_limit])
    teacher, _ = seq2seq.load_seq2seq(t_manifest.directory(MODEL_DIR))
    s_dir = upstream.directory(MODEL_DIR)
    prior = upstream.path(s_rec.prior.file) if s_rec.prior is not None else None
    terms = ", ".join(f"{c.weight:g} x {c.name}" for c in cfg.losses)
    kd = plan_kd.kd
    how = f"{kd.method} (alpha {kd.alpha:g}, T {kd.temperature:g})" if kd else "plain CE"
    how += f" + {plan_kd.prior_weight:g} x prior" if plan_kd.prior_weight else ""
    ctx.console.print(f"distilling (translation) on {device}: {terms} -> {how}; "
                      f"{len(data.train)} pairs x {cfg.epochs:g} epochs")  # fmt: skip
    plan = Plan(cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_ratio, info.label_smoothing, t_rec.max_length,
                info.max_new_tokens, "distill (KD)", cfg.weight_decay, cfg.grad_clip)  # fmt: skip
    student, tok, history = _distil(s_dir, teacher, plan, data, plan_kd, prior, device, ctx)
    seq2seq.save_seq2seq(student, tok, work / MODEL_DIR)
    bleu = test_bleu(student, tok, data.test, info.max_new_tokens, t_rec.max_length)
    t_bleu = float(t_manifest.metric("test_bleu"))
    ctx.console.print(f"KD student test BLEU {bleu:.2f} (teacher {t_bleu:.2f})")
    metrics = {
        "test_bleu": Metric(bleu, "BLEU"),
        "teacher_test_bleu": Metric(t_bleu, "BLEU"),
        "retention": Metric(round(100 * bleu / t_bleu, 2) if t_bleu else None, "% of teacher BLEU"),
        "train_seconds": Metric(round(sum(h["seconds"] for h in history), 1), "s"),
        "steps": Metric(int(history[-1]["step"]), "steps"),
        "final_loss": Metric(round(float(history[-1]["train_loss"]), 4), "loss"),
    }
    baseline = None
    if cfg.baseline:
        base_plan = replace(plan, description="baseline (plain CE)")
        b_model, _, baseline = _distil(s_dir, None, base_plan, data, KDPlan(None, 0.0), None, device, ctx)
        b_bleu = test_bleu(b_model, tok, data.test, info.max_new_tokens, t_rec.max_length)
        ctx.console.print(f"no-KD student test BLEU {b_bleu:.2f}")
        metrics["baseline_test_bleu"] = Metric(b_bleu, "BLEU")
    rec = DistillRecord(
        device=device, precision="fp32", history=history, baseline_history=baseline,
        losses=[c.model_dump() for c in cfg.losses], schedule_kind="all", schedule_events=[],
        train_examples=len(data.train),
    )  # fmt: skip
    return StageOutput(record=rec, metrics=metrics)
