"""The classification distill stage: train the student on the recipe's weighted loss terms (through the teacher-output
cache when it applies), and a no-KD baseline."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    DistillRecord,
    RunContext,
    StageOutput,
)
from kdpipe.config import DistillConfig
from kdpipe.data.tables import Encoded, Split, batches, encode, read_split, read_transfer, subset
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses.objective import Objective, build_objective
from kdpipe.losses.terms import CELoss, LossConfig
from kdpipe.methods.augment import augment
from kdpipe.methods.bayesinit import PriorPenalty
from kdpipe.methods.datafree import EmbeddedSet, load_stats, synthesize
from kdpipe.models.loading import forward_kd, load_classifier
from kdpipe.reporting.plots import plot_training
from kdpipe.tasks.classification.checks import schedule_warning
from kdpipe.tasks.classification.cka import write_cka
from kdpipe.tasks.classification.pair import Pair, load_pair
from kdpipe.train import cache as tcache
from kdpipe.train import distributed
from kdpipe.train.loop import Device, Evaluation, TrainPlan, TrainResult, evaluate, pick_device, train


def _transfer_set(
    cfg: DistillConfig, pair: Pair, device: Device, work: Path, ctx: RunContext
) -> tuple[Encoded | EmbeddedSet, dict[str, Any] | None]:
    """What the student is distilled on: the train split (first `train_limit`), a transfer file, either
    with augmented copies (written to augmented.jsonl), or inputs reconstructed data-free."""
    if cfg.data_free:
        stats = load_stats(pair.teacher_manifest)
        synthetic, report = synthesize(
            pair.teachers[0], stats, cfg.data_free, ctx.seed, device.torch_device, ctx.console
        )
        np.save(work / "data_free_inputs.npy", synthetic.embeds.numpy(), allow_pickle=False)
        return synthetic, report
    if not (cfg.transfer or cfg.augment):
        return subset(pair.splits["train"], cfg.train_limit), None
    t_manifest = pair.teacher_manifest
    base = read_transfer(Path(cfg.transfer)) if cfg.transfer else read_split(t_manifest.path("data/train.jsonl"))
    n = cfg.train_limit or len(base)
    base = Split(texts=base.texts[:n], labels=None if base.labels is None else base.labels[:n])
    if cfg.augment:
        emb = pair.teachers[0].get_input_embeddings().weight.detach().float().numpy()
        copies = augment(base, pair.teacher_tokenizer, emb, cfg.augment, ctx.seed)
        with open(work / "augmented.jsonl", "w", encoding="utf-8") as f:
            for text in copies.texts:
                f.write(json.dumps({"text": text, "label": -1}, ensure_ascii=False) + "\n")
        base = Split(
            texts=base.texts + copies.texts,
            labels=(base.labels or [-1] * len(base.texts)) + [-1] * len(copies.texts),
        )
    return encode(pair.train_tokenizer, base, pair.teacher_record.max_length), None


def _train_student(
    description: str,
    losses: list[LossConfig],
    cfg: DistillConfig,
    pair: Pair,
    data: Encoded | EmbeddedSet,
    device: Device,
    ctx: RunContext,
    name: str,
    cache: Any = None,
) -> tuple[Any, TrainResult, Evaluation]:
    """A fresh copy of the student trained on `losses`; its test evaluation must be finite. `name`: its
    checkpoint's; `cache`: the teacher's outputs on `data` (kdpipe.train.cache), read instead of running the teacher."""
    model = load_classifier(pair.student_dir, attn=pair.attn)
    loss_ctx = pair.loss_ctx
    if pair.prior_file is not None and any(c.name == "prior" for c in losses):
        loss_ctx = replace(loss_ctx, prior=PriorPenalty(pair.prior_file, model))
    objective = build_objective(losses, loss_ctx, cfg.schedule)
    plan = TrainPlan(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every,
        keep_best=cfg.keep == "best",
        seed=ctx.seed,
        description=description,
        lr_setting="distill.lr",
        checkpoint=ctx.checkpoint(name),
        checkpoint_every=cfg.checkpoint_every,
        resume=ctx.resume,
        accumulate=cfg.accumulate,
        compile=cfg.compile,
        teacher_device="cpu" if cfg.teacher_device == "cpu" else None,
    )
    val = pair.splits["val"]
    # the teacher runs for the terms that read it, and to label unlabeled examples (a transfer file, augmented
    # copies, data-free inputs) even when no term does; with the cache it is not even on the device
    teachers = pair.teachers if (objective.needs_teacher or _unlabeled(data)) and cache is None else []
    result = train(
        model,
        objective,
        data,
        plan,
        device,
        teachers=teachers,
        val_data=val if len(val) else None,
        console=ctx.console,
        student_ids=pair.student_ids,
        cache=cache,
    )
    test = evaluate(model, pair.splits["test"], device)
    _require_finite(test.logits, description)
    return model, result, test


def _unlabeled(data: Encoded | EmbeddedSet) -> bool:
    return data.labels is None or any(y < 0 for y in data.labels)


def run_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """Distil the teacher into the student (and train the no-KD baseline); test metrics against the teacher's."""
    import torch

    pair = load_pair(cfg, upstream)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, cfg.precision)
    w = distributed.join(device.torch_device)  # before the cache: rank 0 builds it, the others wait for it
    teacher_memory = _place_teacher(cfg, pair, device, w)
    transfer, df_report = _transfer_set(cfg, pair, device, work, ctx)
    _announce(cfg, pair, device, len(transfer), ctx)
    objective = build_objective(list(cfg.losses), pair.loss_ctx, cfg.schedule)
    warnings = []
    if warning := schedule_warning(objective, cfg, len(transfer)):
        ctx.console.print(f"[yellow]{warning}[/]")
        warnings.append(warning.removeprefix("warning: "))
    cache, cache_info = _teacher_cache(cfg, pair, transfer, objective, device, work, ctx)
    if warning := _topk_warning(cfg, cache):
        ctx.console.print(f"[yellow]warning: {warning}[/]")
        warnings.append(warning)
    model, result, test = _train_student(
        "distill (KD)", list(cfg.losses), cfg, pair, transfer, device, ctx, "kd", cache
    )
    model.to("cpu").save_pretrained(work / "model", safe_serialization=True)
    pair.student_tokenizer.save_pretrained(work / "model")
    np.save(work / "test_logits.npy", test.logits, allow_pickle=False)
    teacher_preds = np.load(pair.teacher_manifest.path("test_logits.npy"), allow_pickle=False).argmax(-1)
    t_acc = float(pair.teacher_manifest.metric("test_accuracy"))
    metrics = _kd_metrics(test, result, teacher_preds, t_acc, cfg.batch_size, len(transfer))
    ctx.console.print(
        f"KD student test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f} (teacher {t_acc:.4f})"
    )
    cka_diagonal = write_cka(cfg, pair, model, device, work)
    baseline_history = _baseline(cfg, pair, device, teacher_preds, metrics, ctx) if cfg.baseline else None
    rec = DistillRecord(
        device=device.torch_device,
        precision=device.precision,
        history=_thin(result.history),
        baseline_history=baseline_history,
        losses=[c.model_dump() for c in cfg.losses],
        schedule_kind=cfg.schedule.kind,
        schedule_events=result.schedule_events,
        train_examples=len(transfer),
        data_free=df_report,
        warnings=warnings,
        # attention terms read softmax probabilities: the student's attention dropout was off for them
        attention_dropout_off=result.attention_dropout_off,
        cka_diagonal=cka_diagonal,
        teacher_cache=cache_info,
        resumed_from=result.resumed_from,
        processes=w.size,
        accumulate=cfg.accumulate,
        teacher_memory=teacher_memory,
        attention=pair.attn,
    )
    plot_training(rec.history, rec.baseline_history, work / "training.png")
    return StageOutput(record=rec, metrics=metrics)


def _place_teacher(cfg: DistillConfig, pair: Pair, device: Device, w: distributed.World) -> dict[str, int] | None:
    """distill.teacher_device / teacher_shard: keep the teacher in host memory, or split its weights across the
    torchrun processes (FSDP2); returns the weight bytes in all and per process when sharded."""
    if cfg.teacher_shard:
        if not w.distributed:
            raise ConfigError(
                "distill.teacher_shard splits the teacher across torchrun processes, but this is one process",
                "launch it with `kdpipe distill --nproc N` (or torchrun), or set distill.teacher_shard: false",
            )
        target = "cpu" if cfg.teacher_device == "cpu" else device.torch_device
        memory = {}
        for t in pair.teachers:
            t.to(target)
            memory = distributed.shard_teacher(t)
        return memory
    return None


def _teacher_cache(
    cfg: DistillConfig,
    pair: Pair,
    data: Encoded | EmbeddedSet,
    objective: Objective,
    device: Device,
    work: Path,
    ctx: RunContext,
) -> tuple[Any, dict[str, Any]]:
    """The teacher's outputs on the transfer set, from <out>/cache/teacher-outputs/ (a hit), computed once into it
    (a miss), or not cached at all (bypassed, and why): what the manifest records."""
    import os
    import time

    reason = _bypass(cfg, pair, data, objective, ctx)
    if reason is not None:
        return None, {"status": "bypassed", "reason": reason}
    assert isinstance(data, Encoded) and ctx.cache_root is not None
    teacher = pair.teachers[0]
    hidden, attentions = _traced_reads(objective, pair, data)
    t_device = Device("cpu", None) if cfg.teacher_device == "cpu" else device
    spec = tcache.plan(cfg.cache, int(teacher.config.num_labels), hidden, attentions, t_device.precision)
    key = tcache.cache_key(pair.teacher_manifest.run_id, tcache.data_sha256(data), spec)
    estimate = tcache.estimate_bytes(data, spec, teacher.config)
    if estimate > cfg.cache.max_gb * 1e9:
        why = f"it would take {estimate / 1e9:.1f} GB, over distill.cache.max_gb = {cfg.cache.max_gb:g}"
        ctx.console.print(f"[yellow]teacher cache bypassed[/]: {why} (online KD)")
        return None, {"status": "bypassed", "reason": why}
    root = ctx.cache_root / "teacher-outputs"
    w = distributed.world()
    found = tcache.open_cache(root, key) if w.main else None
    status, seconds, rebuilt = "hit", 0.0, None
    if w.main and found is None:
        rebuilt = _rebuild_reason(root, key, work, ctx)
        start = time.perf_counter()
        found = tcache.build_cache(root, key, teacher.to(t_device.torch_device), data, spec, t_device, ctx.console)
        status, seconds = "miss", time.perf_counter() - start
    distributed.barrier()  # the other processes read what rank 0 found or built
    if not w.main:
        found = tcache.open_cache(root, key)
        assert found is not None, "rank 0 built the teacher cache"
    assert found is not None
    ctx.console.print(
        f"teacher outputs: cache {status} ({found.bytes_per_example:,.0f} bytes/example, {found.n} examples)"
        + (f", built in {seconds:.1f} s" if seconds else "")
    )
    return found, {
        "status": status,
        "key": key,
        "dir": os.path.relpath(found.dir.resolve(), work.resolve()),
        "examples": found.n,
        "bytes": found.bytes,
        "bytes_per_example": round(found.bytes_per_example, 1),
        "contents": spec.as_dict(),
        "build_seconds": round(seconds, 2),
        **({"rebuilt_because": rebuilt} if rebuilt else {}),
        "tail_mass": None if found.tail_mass is None else [round(float(v), 6) for v in found.tail_mass],
    }


def _rebuild_reason(root: Path, key: str, work: Path, ctx: RunContext) -> str | None:
    """Why an existing cache for `key` cannot be used (said on the console; for the manifest with its path relative
    to the stage), or None when there is none to rebuild (a plain miss)."""
    import os

    here = root / key[:16]
    if not here.exists():
        return None
    why = tcache.cache_problem(root, key) or f"{here}: unreadable"
    ctx.console.print(f"[yellow]teacher cache rebuilt[/]: {why}")
    return why.replace(str(here), os.path.relpath(here.resolve(), work.resolve()))


def _topk_warning(cfg: DistillConfig, cache: Any) -> str | None:
    if cache is None or cache.spec.top_k is None or not any(c.name == "logit_mse" for c in cfg.losses):
        return None
    return (
        f"logit_mse regresses onto the cached top-{cache.spec.top_k} logits and a flat tail (the cache keeps "
        "the teacher's distribution, not its tail's raw logits); set distill.cache.use: false for exact targets"
    )


def _bypass(
    cfg: DistillConfig, pair: Pair, data: Encoded | EmbeddedSet, objective: Objective, ctx: RunContext
) -> str | None:
    """Why the teacher's outputs are not cached (None: they are)."""
    if not (objective.needs_teacher or _unlabeled(data)):
        return "no loss term reads the teacher"
    if not cfg.cache.use:
        return "distill.cache.use is false (online KD)"
    if cfg.augment is not None:
        return "augmented copies (distill.augment): online KD"
    if cfg.data_free is not None or not isinstance(data, Encoded):
        return "data-free inputs (distill.data_free): online KD"
    if len(pair.teachers) > 1:
        return "an ensemble of teachers (distill.extra_teachers): online KD"
    if ctx.cache_root is None:
        return "no output root to keep it in"
    return None


def _traced_reads(objective: Objective, pair: Pair, data: Encoded) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The teacher hidden states / attention maps the recipe's terms read, found by running them on one batch."""
    import torch

    if not (objective.needs_hidden or objective.needs_attentions):
        return (), ()
    # on the CPU, where both models were loaded: tracing needs the indices read, not speed (and a teacher kept off
    # the GPU stays off it)
    batch = next(batches(subset(data, 8), 8, shuffle=False))
    student = load_classifier(pair.student_dir).eval()
    teacher = pair.teachers[0].to("cpu").eval()
    hidden, attentions = objective.needs_hidden, objective.needs_attentions
    with torch.no_grad():
        t_out = forward_kd(teacher, batch, hidden, attentions)
        s_batch = batch if pair.student_ids is None else {**batch, "input_ids": pair.student_ids[batch["input_ids"]]}
        s_out = forward_kd(student, s_batch, hidden, attentions)
    return tcache.teacher_reads(copy.deepcopy(objective).to("cpu"), s_out, t_out)


def _announce(cfg: DistillConfig, pair: Pair, device: Device, examples: int, ctx: RunContext) -> None:
    import torch

    terms = ", ".join(f"{c.weight:g} x {c.name}" for c in cfg.losses)
    kind = "unlabeled " if cfg.transfer else "data-free " if cfg.data_free else ""
    ctx.console.print(
        f"distilling on {device.torch_device} ({device.precision}), {torch.get_num_threads()} threads: "
        f"loss = {terms}; schedule {cfg.schedule.kind}; {examples} {kind}examples"
        + (f" (incl. {cfg.augment.n_iter} augmented copies of each)" if cfg.augment else "")
        + f" x {cfg.epochs:g} epochs"
        + (f"; ensemble of {len(pair.teachers)} teachers" if len(pair.teachers) > 1 else "")
    )


def _kd_metrics(
    test: Evaluation, result: TrainResult, teacher_preds: np.ndarray, t_acc: float, batch_size: int, examples: int
) -> dict[str, Metric]:
    epochs_done = result.steps * batch_size / max(1, examples)
    return {
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


def _baseline(
    cfg: DistillConfig,
    pair: Pair,
    device: Device,
    teacher_preds: np.ndarray,
    metrics: dict[str, Metric],
    ctx: RunContext,
) -> list[dict[str, float]]:
    """The same student trained on gold labels only (no transfer file, no augmented copies), same budget;
    its metrics are added to `metrics`, its loss curve returned."""
    labeled = subset(pair.splits["train"], cfg.train_limit)
    _, result, test = _train_student("baseline (no KD)", [CELoss()], cfg, pair, labeled, device, ctx, "baseline")
    ctx.console.print(f"no-KD student test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}")
    agreement = float((test.logits.argmax(-1) == teacher_preds).mean())
    metrics.update(
        {
            "baseline_test_accuracy": Metric(round(test.accuracy, 5), "fraction"),
            "baseline_test_macro_f1": Metric(round(test.macro_f1, 5), "fraction"),
            "baseline_teacher_agreement": Metric(round(agreement, 5), "fraction"),
            "baseline_train_seconds": Metric(round(result.seconds, 1), "s"),
        }
    )
    return _thin(result.history)


def _require_finite(logits: np.ndarray, who: str) -> None:
    """A gate: NaN/inf logits mean a broken model, whatever accuracy argmax would give them."""
    bad = int((~np.isfinite(logits)).any(-1).sum())
    if bad:
        raise ModelError(
            f"{who}: the trained student gives NaN/inf logits on {bad} of {len(logits)} test examples: "
            "training diverged",
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
