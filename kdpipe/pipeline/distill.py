"""The distill stage: train the student on the recipe's weighted loss terms, and a no-KD baseline."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import FileRecord, Manifest, Metric, input_records
from kdpipe.artifacts.records import (
    DistillRecord,
    RunContext,
    StageOutput,
    StageSpec,
    StudentRecord,
    TeacherRecord,
    record,
    seeded,
    upstream_inputs,
)
from kdpipe.config import DistillConfig, Recipe
from kdpipe.data.tables import SPLITS, Encoded, Split, batches, encode, read_split, read_transfer, subset
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses.masks import mean_pool
from kdpipe.losses.objective import LossContext, Objective, build_objective
from kdpipe.losses.terms import CELoss, LossConfig
from kdpipe.methods.augment import augment
from kdpipe.methods.bayesinit import PriorPenalty
from kdpipe.methods.datafree import EmbeddedSet, load_stats, synthesize
from kdpipe.models.layermaps import layer_map, uniform_layers
from kdpipe.models.loading import forward_kd, load_classifier, load_tokenizer, require_same_tokenizer, resolve_model_dir
from kdpipe.pipeline.student import select_layers
from kdpipe.reporting.analysis import cka_matrix
from kdpipe.reporting.plots import plot_cka, plot_training
from kdpipe.tasks import translation
from kdpipe.train import cache as tcache
from kdpipe.train import distributed
from kdpipe.train.loop import Device, Evaluation, TrainPlan, TrainResult, evaluate, pick_device, train


def loss_context(
    teacher_config: dict[str, Any], student_config: dict[str, Any], layer_map: dict[int, int]
) -> LossContext:
    """From the two config.json dicts: enough to build (and so validate) every term without weights."""
    return LossContext(
        layer_map=layer_map,
        n_student=int(student_config.get("num_hidden_layers", 0)),  # a BiLSTM student has no layers to map
        n_teacher=int(teacher_config["num_hidden_layers"]),
        d_student=int(student_config["hidden_size"]),
        d_teacher=int(teacher_config["hidden_size"]),
    )


def check_objective(cfg: DistillConfig, ctx: LossContext) -> Objective:
    """Build the objective once on the configs alone: a layer map that does not fit fails here,
    before any model loads."""
    objective = build_objective(list(cfg.losses), ctx, cfg.schedule)
    if cfg.baseline and all(c.name == "ce" for c in cfg.losses):
        raise ConfigError(
            "distill.baseline: the recipe's loss is already hard CE only",
            "set distill.baseline: false, or add a distillation term",
        )
    return objective


def check_losses(recipe: Recipe) -> None:
    """`kdpipe validate` / `kdpipe run` before the teacher trains: build the distill objective from the teacher's
    config.json and the student spec alone, so that a layer map that does not fit fails before any model
    loads. Skipped when the teacher is not on this machine yet."""
    if recipe.teacher.task == "translation":
        return translation.check_recipe(recipe)
    _check_bayes(recipe)
    if recipe.student.arch == "bilstm":
        feature = [c.name for c in recipe.distill.losses if not c.on_logits]
        if feature:
            raise ConfigError(
                f"distill.losses: {', '.join(feature)} compare hidden states, which a BiLSTM student (student.arch: "
                "bilstm) does not have",
                "use logit terms only (hinton, logit_mse, ce, reverse_kl, jsd, ofa)",
            )
        return
    try:
        t_dir = resolve_model_dir(recipe.teacher.model)
    except ModelError:
        return
    t_conf = _sizes(json.loads((t_dir / "config.json").read_text()))
    if t_conf is None:  # an architecture whose config names its sizes otherwise: the student stage checks it
        return
    if recipe.student.pretrained is not None:
        s_conf = _sizes(
            json.loads((resolve_model_dir(recipe.student.pretrained, "student.pretrained") / "config.json").read_text())
        )
        if s_conf is None:
            return
        kept = uniform_layers(int(s_conf["num_hidden_layers"]), int(t_conf["num_hidden_layers"]))
    else:
        kept = select_layers(recipe.student, int(t_conf["num_hidden_layers"]))
        s_conf = {**t_conf, "num_hidden_layers": len(kept)}
    check_objective(recipe.distill, loss_context(t_conf, s_conf, layer_map(kept)))


_SIZE_ALIASES = {"num_hidden_layers": ("n_layer", "num_layers", "encoder_layers"), "hidden_size": ("n_embd", "d_model")}


def _sizes(conf: Any) -> dict[str, Any] | None:
    """A config.json dict with `num_hidden_layers` and `hidden_size` under those names (GPT-2 says n_layer / n_embd,
    BART encoder_layers / d_model), or None when it names neither."""
    if not isinstance(conf, dict):
        return None
    out = dict(conf)
    for key, aliases in _SIZE_ALIASES.items():
        value = next((conf[k] for k in (key, *aliases) if isinstance(conf.get(k), int)), None)
        if value is None:
            return None
        out[key] = value
    return out


def _check_bayes(recipe: Recipe) -> None:
    """The prior term needs a bayes student, and a bayes student needs the teacher's posterior."""
    if any(c.name == "prior" for c in recipe.distill.losses) and recipe.student.init != "bayes":
        raise ConfigError(
            f"distill.losses: the 'prior' term needs student.init: bayes (it is {recipe.student.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    if recipe.student.init == "bayes" and recipe.teacher.posterior is None:
        raise ConfigError(
            "student.init: bayes starts from the teacher's posterior, but teacher.posterior is not set",
            "add teacher.posterior: {kind: swag} (or kind: diagonal) to the recipe",
        )


def schedule_warning(objective: Objective, cfg: DistillConfig, examples: int) -> str | None:
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


@dataclass
class Pair:
    """What the distill stage reads: the teacher (and ensemble members), the student's directory, the
    encoded splits, and the loss context of the two architectures."""

    teachers: list[Any]
    teacher_tokenizer: Any
    student_dir: Path
    student_tokenizer: Any
    teacher_record: TeacherRecord
    teacher_manifest: Manifest
    splits: dict[str, Encoded]  # train: what both models read (teacher ids); val / test: the student's own ids
    loss_ctx: LossContext
    student_ids: Any = None  # (V_teacher,) int64 tensor: teacher id -> student id, for a pruned vocabulary
    prior_file: Path | None = None  # init: bayes: the student's prior N(mu, Xi), for the 'prior' term
    attn: str = "eager"  # the attention implementation both models load with ("sdpa" on the GPU path)

    @property
    def train_tokenizer(self) -> Any:
        """The tokenizer of the data both models read: the teacher's when the student's vocabulary is pruned."""
        return self.teacher_tokenizer if self.student_ids is not None else self.student_tokenizer


def _load_pair(cfg: DistillConfig, upstream: Manifest) -> Pair:
    t_manifest = upstream.upstream("teacher")
    t_dir, s_dir = t_manifest.directory("model"), upstream.directory("model")
    s_rec, t_rec = record(upstream, StudentRecord), record(t_manifest, TeacherRecord)
    t_conf, s_conf = json.loads((t_dir / "config.json").read_text()), json.loads((s_dir / "config.json").read_text())
    ctx = loss_context(t_conf, s_conf, s_rec.layer_map)
    if check_objective(cfg, ctx).needs_attentions and any(s_conf.get("pruned_heads", {}).values()):
        raise ConfigError(
            "distill.losses: an attention term compares the attention maps head by head, but the student's heads "
            "were pruned (student.width.heads)",
            "drop the attention terms (attention_kl, tinybert's attention), or set student.width.heads: 0",
        )
    attn = _attention_implementation(cfg, check_objective(cfg, ctx).needs_attentions, s_conf)
    prior_file = upstream.path(s_rec.prior.file) if s_rec.prior is not None else None
    if prior_file is None and any(c.name == "prior" for c in cfg.losses):
        raise ConfigError(
            f"distill.losses: the 'prior' term needs a student built with student.init: bayes (this one: {s_rec.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    teacher = load_classifier(t_dir, attn=attn)
    t_tok, s_tok = load_tokenizer(t_dir), load_tokenizer(s_dir)
    student_ids = _student_ids(upstream, s_rec, t_tok, s_tok, s_dir)
    _check_member(teacher, load_classifier(s_dir), t_tok, s_tok, cfg, s_dir, same_vocab=student_ids is None)
    teachers = [teacher]
    for i, member_path in enumerate(cfg.extra_teachers):
        e_dir = resolve_model_dir(member_path, f"distill.extra_teachers[{i}]")
        member = load_classifier(e_dir)
        _check_member(teacher, member, t_tok, load_tokenizer(e_dir), cfg, e_dir)
        teachers.append(member)
    train_tok = t_tok if student_ids is not None else s_tok
    splits = {
        n: encode(
            train_tok if n == "train" else s_tok, read_split(t_manifest.path(f"data/{n}.jsonl")), t_rec.max_length
        )
        for n in SPLITS
    }
    return Pair(teachers, t_tok, s_dir, s_tok, t_rec, t_manifest, splits, ctx, student_ids, prior_file, attn)


def _attention_implementation(cfg: DistillConfig, needs_attentions: bool, s_conf: dict[str, Any]) -> str:
    """SDPA (torch's fused attention kernels) on CUDA unless a term reads attention maps, which only the eager
    implementation returns; eager on the CPU, where every figure in the docs was measured with it."""
    import torch

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    bilstm = s_conf.get("model_type") == "kdpipe-bilstm"
    # an architecture without SDPA falls back to eager as it loads (kdpipe.models.loading.load_classifier_with_head)
    return "sdpa" if cuda and not needs_attentions and not bilstm else "eager"


def _student_ids(upstream: Manifest, s_rec: StudentRecord, t_tok: Any, s_tok: Any, s_dir: Path) -> Any:
    """A pruned-vocabulary student's teacher-id -> student-id map (None: the student reads the teacher's ids)."""
    import torch

    if s_rec.vocab is None:
        return None
    lut = np.load(upstream.path(s_rec.vocab.map), allow_pickle=False)
    if len(lut) != len(t_tok) or int(lut.max()) >= len(s_tok):
        raise ModelError(
            f"{s_dir}: its vocabulary map covers {len(lut)} teacher tokens and ids up to {int(lut.max())}, but the "
            f"teacher has {len(t_tok)} tokens and the student {len(s_tok)}",
            "re-run `kdpipe student --force`",
        )
    return torch.from_numpy(lut)


def _check_member(
    teacher: Any, other: Any, t_tok: Any, o_tok: Any, cfg: DistillConfig, where: Path, same_vocab: bool = True
) -> None:
    """The student (or an ensemble member) against the teacher: same tokenizer (unless the student's vocabulary
    was pruned and maps the teacher's ids), labels and, for hidden_cosine, width."""
    if same_vocab:
        require_same_tokenizer(t_tok, o_tok, where)
    if teacher.config.num_labels != other.config.num_labels:
        raise ModelError(
            f"{where}: has {other.config.num_labels} classes, the teacher {teacher.config.num_labels}",
            "use models trained for the same labels",
        )
    if any(c.name == "hidden_cosine" for c in cfg.losses) and teacher.config.hidden_size != other.config.hidden_size:
        raise ConfigError(
            f"distill.losses: hidden_cosine needs equal widths (student {other.config.hidden_size}, "
            f"teacher {teacher.config.hidden_size})",
            "use tinybert or hint, which learn a projection",
        )


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


def run_distill(cfg: DistillConfig, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    assert upstream is not None  # STAGE names a student upstream; the runner reads and verifies it
    if translation.is_translation(upstream):
        return translation.run_distill(cfg, upstream, work, ctx)
    pair = _load_pair(cfg, upstream)
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
    cka_diagonal = _cka(cfg, pair, model, device, work)
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


def _cka(cfg: DistillConfig, pair: Pair, model: Any, device: Device, work: Path) -> list[float] | None:
    """The teacher x student layer CKA on test examples (cka.json, cka.png); its diagonal along the layer map."""
    if not cfg.cka_samples or not getattr(model, "supports_feature_losses", True):  # a BiLSTM has no layers
        return None
    test_part = subset(pair.splits["test"], cfg.cka_samples)
    if pair.student_ids is not None:  # both read the teacher's ids; the student through its map
        texts = read_split(pair.teacher_manifest.path("data/test.jsonl"))
        test_part = subset(encode(pair.teacher_tokenizer, texts, pair.teacher_record.max_length), cfg.cka_samples)
    matrix = _layer_cka(pair.teachers[0], model.to(device.torch_device), test_part, device, pair.student_ids)
    (work / "cka.json").write_text(json.dumps(_cka_json(matrix, len(test_part)), indent=2) + "\n")
    plot_cka(matrix, work / "cka.png")
    return [float(round(matrix[t][s], 5)) for s, t in sorted(pair.loss_ctx.layer_map.items())]


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


def _layer_cka(teacher: Any, student: Any, data: Encoded, device: Device, student_ids: Any = None) -> np.ndarray:
    """docs/methods.md §3.3: linear CKA of every teacher layer x every student layer, on mean-pooled hidden
    states over real tokens; (teacher hidden states, student hidden states), 0 = embeddings."""
    import torch

    feats: dict[str, list[list[torch.Tensor]]] = {"teacher": [], "student": []}
    with torch.no_grad():
        for batch in batches(data, 64, shuffle=False):
            batch = {k: v.to(device.torch_device) for k, v in batch.items() if k != "labels"}
            for key, model in (("teacher", teacher), ("student", student)):
                mapped = key == "student" and student_ids is not None
                b = {**batch, "input_ids": student_ids.to(device.torch_device)[batch["input_ids"]]} if mapped else batch
                dev = next(model.parameters()).device  # a cached or host-kept teacher may be off the device
                out = forward_kd(model.eval(), {k: v.to(dev) for k, v in b.items()}, hidden=True)
                assert out.hidden_states is not None
                mask = batch["attention_mask"].to(dev)
                feats[key].append([mean_pool(h.float(), mask).cpu() for h in out.hidden_states])
    per_layer = {k: [torch.cat([b[i] for b in v]) for i in range(len(v[0]))] for k, v in feats.items()}
    return cka_matrix(per_layer["teacher"], per_layer["student"])


def _cka_json(matrix: np.ndarray, examples: int) -> dict[str, Any]:
    return {
        "rows": "teacher hidden states (0 = embeddings)",
        "cols": "student hidden states (0 = embeddings)",
        "examples": examples,
        "matrix": np.round(matrix, 5).tolist(),
    }


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


def inputs(cfg: DistillConfig, upstream: Manifest | None) -> list[FileRecord]:
    """The student artifact, the transfer file and every extra teacher's files, by content."""
    records = upstream_inputs(upstream)
    if cfg.transfer is not None:
        read_transfer(Path(cfg.transfer))  # a missing or empty file: one clear error, before hashing
        records += input_records(Path(cfg.transfer), "transfer")
    for i, member in enumerate(cfg.extra_teachers):
        records += input_records(resolve_model_dir(member, f"distill.extra_teachers[{i}]"), f"extra_teacher_{i}")
    return records


def identity(cfg: DistillConfig, ctx: RunContext) -> dict[str, Any]:
    """`seeded`, without how often resume points are written (that changes no result)."""
    ident = seeded(cfg, ctx)
    ident.pop("checkpoint_every", None)
    return ident


STAGE = StageSpec(
    name="distill",
    upstream="student",
    section=lambda recipe, ctx: recipe.distill,
    run=run_distill,
    summary="distil the teacher into the student",
    identity=identity,
    inputs=inputs,
)
