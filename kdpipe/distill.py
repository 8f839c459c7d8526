"""The distill stage: train the student on the recipe's weighted loss terms, and a no-KD baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from kdpipe.artifacts import Manifest, Metric
from kdpipe.config import CELoss, DistillConfig, Recipe
from kdpipe.data import Encoded, Split, encode, read_split, read_transfer, subset
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses import LossContext, build_objective
from kdpipe.models import load_classifier, load_tokenizer, vocab_mismatch
from kdpipe.pipeline import StageOutput


def loss_context(
    teacher_config: dict[str, Any], student_config: dict[str, Any], layer_map: dict[int, int]
) -> LossContext:
    """From the two config.json dicts: enough to build (and so validate) every term without weights."""
    return LossContext(
        layer_map=layer_map,
        n_student=int(student_config["num_hidden_layers"]),
        n_teacher=int(teacher_config["num_hidden_layers"]),
        d_student=int(student_config["hidden_size"]),
        d_teacher=int(teacher_config["hidden_size"]),
    )


def check_objective(cfg: DistillConfig, ctx: LossContext) -> Any:
    """Build the objective once on the configs alone: a layer map that does not fit fails here,
    before any model loads."""
    objective = build_objective(list(cfg.losses), ctx, cfg.schedule)
    if cfg.baseline and all(c.name == "ce" for c in cfg.losses):
        raise ConfigError(
            "distill.baseline: the recipe's loss is already hard CE only",
            "set distill.baseline: false, or add a distillation term",
        )
    return objective


def schedule_warning(objective: Any, cfg: DistillConfig, examples: int) -> str | None:
    """PID/SID with the classifier last: say so when the layer phase can outlast the whole budget."""
    sched = objective.schedule
    if sched.kind == "all" or not cfg.schedule.classifier_last:
        return None
    total = math.ceil(cfg.epochs * math.ceil(examples / cfg.batch_size))
    layer_steps = len(sched.order) * cfg.schedule.cap_steps
    if layer_steps < total:
        return None
    unless = " unless a layer's [CLS] cosine loss falls below the threshold" if cfg.schedule.threshold else ""
    return (
        f"warning: schedule {sched.kind}: {len(sched.order)} layers x cap_steps {cfg.schedule.cap_steps} = "
        f"{layer_steps} steps >= the {total} training steps, so the classifier terms may never run{unless}; "
        "lower distill.schedule.cap_steps or train longer"
    )


def _train_student(
    name: str,
    losses: list[Any],
    cfg: DistillConfig,
    student_dir: Path,
    teachers: list[Any],
    train_data: Encoded,
    val_data: Encoded,
    ctx: LossContext,
    seed: int,
    device: Any,
    console: Console,
) -> tuple[Any, Any]:
    from kdpipe.train import train

    model = load_classifier(student_dir)
    objective = build_objective(losses, ctx, cfg.schedule)
    result = train(
        model,
        objective,
        train_data,
        teacher=teachers[0] if objective.needs_teacher else None,
        extra_teachers=teachers[1:] if objective.needs_teacher else [],
        val_data=val_data if len(val_data) else None,
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
        lr_setting="distill.lr",
    )
    return model, result


def _check_pair(teacher: Any, student: Any, t_tok: Any, s_tok: Any, cfg: DistillConfig, where: Path) -> None:
    why = vocab_mismatch(t_tok, s_tok)
    if why:
        raise ModelError(
            f"{where}: the tokenizer does not match the teacher's ({why})",
            "the losses feed the same token ids to both models: use models that share the tokenizer",
        )
    if teacher.config.num_labels != student.config.num_labels:
        raise ModelError(
            f"{where}: has {student.config.num_labels} classes, the teacher {teacher.config.num_labels}",
            "use models trained for the same labels",
        )
    if any(c.name == "hidden_cosine" for c in cfg.losses) and teacher.config.hidden_size != student.config.hidden_size:
        raise ConfigError(
            f"distill.losses: hidden_cosine needs equal widths (student {student.config.hidden_size}, "
            f"teacher {teacher.config.hidden_size})",
            "use tinybert or hint, which learn a projection",
        )


def _cka(teacher: Any, student: Any, data: Encoded, n: int, device: Any, work: Path) -> dict[str, Any]:
    """METHODS.md 3.3: linear CKA of every teacher layer x every student layer (mean-pooled hidden
    states over real tokens, on `n` test examples)."""
    import torch

    from kdpipe.analysis import cka_matrix, mean_pool
    from kdpipe.data import batches
    from kdpipe.models import forward_kd
    from kdpipe.report import plot_cka

    feats: dict[str, list[list[torch.Tensor]]] = {"teacher": [], "student": []}
    with torch.no_grad():
        for batch in batches(subset(data, n), 64, shuffle=False):
            batch = {k: v.to(device.torch_device) for k, v in batch.items() if k != "labels"}
            for key, model in (("teacher", teacher), ("student", student)):
                out = forward_kd(model.eval(), batch, hidden=True)
                assert out.hidden_states is not None
                feats[key].append([mean_pool(h.float(), batch["attention_mask"]).cpu() for h in out.hidden_states])
    per_layer = {k: [torch.cat([b[i] for b in v]) for i in range(len(v[0]))] for k, v in feats.items()}
    matrix = cka_matrix(per_layer["teacher"], per_layer["student"])
    result = {
        "rows": "teacher hidden states (0 = embeddings)",
        "cols": "student hidden states (0 = embeddings)",
        "examples": int(per_layer["teacher"][0].shape[0]),
        "matrix": np.round(matrix, 5).tolist(),
    }
    (work / "cka.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_cka(matrix, work / "cka.png")
    return result


def run_distill(recipe: Recipe, upstream: Manifest | None, work: Path, console: Console) -> StageOutput:
    import torch

    from kdpipe.train import evaluate, pick_device

    assert upstream is not None  # the stage table gives distill a student upstream
    cfg = recipe.distill
    t_manifest = upstream.upstream("teacher")
    t_dir, s_dir = t_manifest.dir / "model", upstream.dir / "model"
    t_conf = json.loads((t_dir / "config.json").read_text())
    ctx = loss_context(
        t_conf,
        json.loads((s_dir / "config.json").read_text()),
        {int(k): v for k, v in upstream.extra["layer_map"].items()},
    )
    objective = check_objective(cfg, ctx)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher = load_classifier(t_dir)
    student0 = load_classifier(s_dir)
    t_tok, s_tok = load_tokenizer(t_dir), load_tokenizer(s_dir)
    _check_pair(teacher, student0, t_tok, s_tok, cfg, s_dir)
    teachers = [teacher]
    for member_path in cfg.extra_teachers:
        from kdpipe.models import resolve_model_dir

        e_dir = resolve_model_dir(member_path, "distill.extra_teachers")
        member = load_classifier(e_dir)
        _check_pair(teacher, member, t_tok, load_tokenizer(e_dir), cfg, e_dir)
        teachers.append(member)
    del student0
    max_length = int(t_manifest.extra["max_length"])
    data = {
        n: encode(s_tok, read_split(t_manifest.path(f"data/{n}.jsonl")), max_length) for n in ("train", "val", "test")
    }
    device = pick_device(cfg.device, cfg.precision)
    labeled = subset(data["train"], cfg.train_limit)
    transfer = labeled
    if cfg.transfer or cfg.augment:
        base = read_transfer(Path(cfg.transfer)) if cfg.transfer else read_split(t_manifest.path("data/train.jsonl"))
        n = cfg.train_limit or len(base)
        base = Split(texts=base.texts[:n], labels=None if base.labels is None else base.labels[:n])
        if cfg.augment:
            from kdpipe.augment import augment

            emb = teacher.get_input_embeddings().weight.detach().float().numpy()
            extra_split = augment(base, t_tok, emb, cfg.augment, recipe.seed)
            with open(work / "augmented.jsonl", "w", encoding="utf-8") as f:
                for text in extra_split.texts:
                    f.write(json.dumps({"text": text, "label": -1}, ensure_ascii=False) + "\n")
            base = Split(
                texts=base.texts + extra_split.texts,
                labels=(base.labels or [-1] * len(base.texts)) + [-1] * len(extra_split.texts),
            )
        transfer = encode(s_tok, base, max_length)
    df_report = None
    if cfg.data_free:
        from kdpipe.datafree import load_stats, synthesize

        stats = load_stats(t_manifest.dir / "logit_stats.json")
        synthetic, df_report = synthesize(teacher, stats, cfg.data_free, recipe.seed, device.torch_device, console)
        np.save(work / "data_free_inputs.npy", synthetic.embeds.numpy(), allow_pickle=False)
        transfer = synthetic  # type: ignore[assignment]  # batches() takes either kind
    teacher_logits = np.load(t_manifest.path("test_logits.npy"), allow_pickle=False)
    teacher_preds = teacher_logits.argmax(-1)
    terms = ", ".join(f"{c.weight:g} x {c.name}" for c in cfg.losses)
    console.print(
        f"distilling on {device.torch_device} ({device.precision}), {torch.get_num_threads()} threads: "
        f"loss = {terms}; schedule {cfg.schedule.kind}; {len(transfer)} "
        f"{'unlabeled ' if cfg.transfer else 'data-free ' if cfg.data_free else ''}examples"
        + (f" (incl. {cfg.augment.n_iter} augmented copies of each)" if cfg.augment else "")
        + f" x {cfg.epochs:g} epochs"
        + (f"; ensemble of {len(teachers)} teachers" if len(teachers) > 1 else "")
    )

    warnings = []
    if warning := schedule_warning(objective, cfg, len(transfer)):
        console.print(f"[yellow]{warning}[/]")
        warnings.append(warning.removeprefix("warning: "))
    model, result = _train_student(
        "distill (KD)", list(cfg.losses), cfg, s_dir, teachers, transfer, data["val"], ctx, recipe.seed, device, console
    )
    test = evaluate(model, data["test"], device)
    _require_finite(test.logits, "the KD student")
    model.to("cpu").save_pretrained(work / "model", safe_serialization=True)
    s_tok.save_pretrained(work / "model")
    np.save(work / "test_logits.npy", test.logits, allow_pickle=False)

    t_acc = float(t_manifest.metric("test_accuracy"))
    epochs_done = result.steps * cfg.batch_size / max(1, len(transfer))
    metrics = {
        "test_accuracy": Metric(round(test.accuracy, 5), "fraction"),
        "test_macro_f1": Metric(round(test.macro_f1, 5), "fraction"),
        "teacher_agreement": Metric(round(float((test.logits.argmax(-1) == teacher_preds).mean()), 5), "fraction"),
        "retention": Metric(round(100 * test.accuracy / t_acc, 2) if t_acc else None, "% of teacher accuracy"),
        "train_seconds": Metric(round(result.seconds, 1), "s"),
        "seconds_per_epoch": Metric(round(result.seconds / max(epochs_done, 1e-9), 1), "s/epoch"),
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
        "schedule_events": result.schedule_events,
        "train_examples": len(transfer),
        "data_free": df_report,
        "warnings": warnings,
        # attention terms read softmax probabilities: the student's attention dropout was off for them
        "attention_dropout_off": result.attention_dropout_off,
    }
    if cfg.cka_samples:
        cka = _cka(teacher, model.to(device.torch_device), data["test"], cfg.cka_samples, device, work)
        extra["cka_diagonal"] = [cka["matrix"][t][s] for s, t in sorted(ctx.layer_map.items())]
    if cfg.baseline:
        base, b_result = _train_student(
            "baseline (no KD)",
            [CELoss()],
            cfg,
            s_dir,
            [],
            labeled,  # gold labels only: no transfer file, no augmented copies
            data["val"],
            ctx,
            recipe.seed,
            device,
            console,
        )
        b_test = evaluate(base, data["test"], device)
        _require_finite(b_test.logits, "the no-KD baseline")
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


def _require_finite(logits: np.ndarray, who: str) -> None:
    """A gate: NaN/inf logits mean a broken model, whatever accuracy argmax would give them."""
    bad = int((~np.isfinite(logits)).any(-1).sum())
    if bad:
        raise ModelError(
            f"{who} gives NaN/inf logits on {bad} of {len(logits)} test examples: training diverged",
            "lower distill.lr or raise the loss temperatures; nothing was written",
        )


def _thin(history: list[dict[str, float]], points: int = 200) -> list[dict[str, float]]:
    """At most `points` records of the loss curve, each the mean of its window."""
    if len(history) <= points:
        return history
    step = len(history) / points
    out = []
    for i in range(points):
        window = history[int(i * step) : int((i + 1) * step)]
        keys = {k for r in window for k in r if k != "step"}
        rec = {k: float(np.mean([r[k] for r in window if k in r])) for k in keys}
        out.append({"step": window[-1]["step"], **rec})
    return out


def check_recipe_losses(recipe: Recipe) -> None:
    """`kdpipe validate`: build the distill objective from the teacher's config.json and the student
    spec alone, so that a layer map that does not fit fails before any model loads. Skipped when the
    teacher is not on this machine yet."""
    from kdpipe.models import resolve_model_dir
    from kdpipe.student import layer_map, select_layers, uniform_layers

    try:
        t_dir = resolve_model_dir(recipe.teacher.model)
    except ModelError:
        return
    t_conf = json.loads((t_dir / "config.json").read_text())
    if recipe.student.pretrained is not None:
        s_conf = json.loads(
            (resolve_model_dir(recipe.student.pretrained, "student.pretrained") / "config.json").read_text()
        )
        kept = uniform_layers(int(s_conf["num_hidden_layers"]), int(t_conf["num_hidden_layers"]))
    else:
        kept = select_layers(recipe.student, int(t_conf["num_hidden_layers"]))
        s_conf = {**t_conf, "num_hidden_layers": len(kept)}
    check_objective(recipe.distill, loss_context(t_conf, s_conf, layer_map(kept)))
