"""The distill stage: train the student on the recipe's weighted loss terms, and a no-KD baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from kdpipe.artifacts import Manifest, Metric
from kdpipe.config import CELoss, DistillConfig, Recipe
from kdpipe.data import encode, read_split
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses import LossContext, build_objective
from kdpipe.models import load_classifier, load_tokenizer, vocab_mismatch
from kdpipe.pipeline import StageOutput


def _train_student(
    name: str,
    losses: list[Any],
    cfg: DistillConfig,
    student_dir: Path,
    teacher: Any,
    data: dict[str, Any],
    ctx: LossContext,
    seed: int,
    device: Any,
    console: Console,
) -> tuple[Any, Any]:
    from kdpipe.train import train

    model = load_classifier(student_dir)
    objective = build_objective(losses, ctx)
    result = train(
        model,
        objective,
        data["train"],
        teacher=teacher if objective.needs_teacher else None,
        val_data=data["val"] if len(data["val"]) else None,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        param_groups=[{"params": list(model.parameters()), "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every,
        keep_best=cfg.keep == "best",
        seed=seed,
        device=device,
        description=name,
        console=console,
    )
    return model, result


def _check_pair(teacher: Any, student: Any, t_tok: Any, s_tok: Any, cfg: DistillConfig, student_dir: Path) -> None:
    why = vocab_mismatch(t_tok, s_tok)
    if why:
        raise ModelError(
            f"{student_dir}: the student's tokenizer does not match the teacher's ({why})",
            "the losses feed the same token ids to both models: rebuild the student from the teacher",
        )
    if teacher.config.num_labels != student.config.num_labels:
        raise ModelError(
            f"{student_dir}: student has {student.config.num_labels} classes, teacher {teacher.config.num_labels}",
            "rebuild the student with `kdpipe student`",
        )
    if any(c.name == "hidden_cosine" for c in cfg.losses) and teacher.config.hidden_size != student.config.hidden_size:
        raise ConfigError(
            f"distill.losses: hidden_cosine needs equal widths (student {student.config.hidden_size}, "
            f"teacher {teacher.config.hidden_size})",
            "drop the hidden_cosine term",
        )


def run_distill(recipe: Recipe, upstream: Manifest | None, work: Path, console: Console) -> StageOutput:
    import torch

    from kdpipe.train import evaluate, pick_device

    assert upstream is not None  # the stage table gives distill a student upstream
    cfg = recipe.distill
    t_manifest = upstream.upstream("teacher")
    t_dir, s_dir = t_manifest.dir / "model", upstream.dir / "model"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher = load_classifier(t_dir)
    student0 = load_classifier(s_dir)
    t_tok, s_tok = load_tokenizer(t_dir), load_tokenizer(s_dir)
    _check_pair(teacher, student0, t_tok, s_tok, cfg, s_dir)
    del student0
    max_length = int(t_manifest.extra["max_length"])
    data = {
        n: encode(s_tok, read_split(t_manifest.path(f"data/{n}.jsonl")), max_length) for n in ("train", "val", "test")
    }
    ctx = LossContext(layer_map={int(k): v for k, v in upstream.extra["layer_map"].items()})
    device = pick_device(cfg.device, cfg.precision)
    teacher_logits = np.load(t_manifest.path("test_logits.npy"), allow_pickle=False)
    teacher_preds = teacher_logits.argmax(-1)
    terms = ", ".join(f"{c.weight:g} x {c.name}" for c in cfg.losses)
    console.print(
        f"distilling on {device.torch_device} ({device.precision}), {torch.get_num_threads()} threads: "
        f"loss = {terms}; {len(data['train'])} examples x {cfg.epochs:g} epochs"
    )

    model, result = _train_student(
        "distill (KD)", list(cfg.losses), cfg, s_dir, teacher, data, ctx, recipe.seed, device, console
    )
    test = evaluate(model, data["test"], device)
    model.to("cpu").save_pretrained(work / "model", safe_serialization=True)
    s_tok.save_pretrained(work / "model")
    np.save(work / "test_logits.npy", test.logits, allow_pickle=False)

    t_acc = float(t_manifest.metric("test_accuracy"))
    metrics = {
        "test_accuracy": Metric(round(test.accuracy, 5), "fraction"),
        "test_macro_f1": Metric(round(test.macro_f1, 5), "fraction"),
        "teacher_agreement": Metric(round(float((test.logits.argmax(-1) == teacher_preds).mean()), 5), "fraction"),
        "retention": Metric(round(100 * test.accuracy / t_acc, 2) if t_acc else None, "% of teacher accuracy"),
        "train_seconds": Metric(round(result.seconds, 1), "s"),
        "train_samples_per_second": Metric(round(result.samples_per_second, 1), "samples/s"),
        "steps": Metric(result.steps, "steps"),
        "final_loss": Metric(round(result.final_loss, 4), "loss"),
    }
    console.print(f"KD student test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f} (teacher {t_acc:.4f})")
    extra: dict[str, Any] = {
        "device": device.torch_device,
        "precision": device.precision,
        "history": _thin(result.history),
        "losses": [c.model_dump() for c in cfg.losses],
    }
    if cfg.baseline:
        base, b_result = _train_student(
            "baseline (no KD)", [CELoss()], cfg, s_dir, None, data, ctx, recipe.seed, device, console
        )
        b_test = evaluate(base, data["test"], device)
        console.print(f"no-KD student test accuracy {b_test.accuracy:.4f}, macro-F1 {b_test.macro_f1:.4f}")
        metrics.update(
            {
                "baseline_test_accuracy": Metric(round(b_test.accuracy, 5), "fraction"),
                "baseline_test_macro_f1": Metric(round(b_test.macro_f1, 5), "fraction"),
                "baseline_teacher_agreement": Metric(
                    round(float((b_test.logits.argmax(-1) == teacher_preds).mean()), 5), "fraction"
                ),
                "baseline_train_seconds": Metric(round(b_result.seconds, 1), "s"),
            }
        )
        extra["baseline_history"] = _thin(b_result.history)
    from kdpipe.report import plot_training

    plot_training(extra, work / "training.png")
    return StageOutput(metrics=metrics, extra=extra)


def _thin(history: list[dict[str, float]], points: int = 200) -> list[dict[str, float]]:
    """At most `points` records of the loss curve, each the mean loss of its window."""
    if len(history) <= points:
        return history
    step = len(history) / points
    out = []
    for i in range(points):
        window = history[int(i * step) : int((i + 1) * step)]
        out.append({"step": window[-1]["step"], "loss": float(np.mean([r["loss"] for r in window]))})
    return out
