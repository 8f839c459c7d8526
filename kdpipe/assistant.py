"""Teaching assistant (METHODS.md 5): teacher -> assistant -> student.

The assistant stage builds a student of the recipe's `assistant` size from the teacher, distils it
with the recipe's distill terms, and writes a teacher-kind artifact (model, the teacher's data
splits, test logits and metrics) to `<out>/assistant/`. The student stage then takes it as its
teacher; the lineage keeps the original teacher behind it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from kdpipe.artifacts import Manifest, Metric
from kdpipe.config import Recipe
from kdpipe.errors import ConfigError
from kdpipe.pipeline import StageOutput


def stage_config(recipe: Recipe) -> dict[str, Any]:
    if recipe.assistant is None:
        raise ConfigError(
            "the assistant stage needs `assistant:` in the recipe",
            "e.g. assistant: {layers: [0, 1, 3, 5]} (a size between the teacher's and the student's)",
        )
    return {
        "seed": recipe.seed,
        "assistant": recipe.assistant.model_dump(mode="json"),
        "distill": recipe.distill.model_dump(mode="json"),
    }


def run_assistant(recipe: Recipe, upstream: Manifest | None, work: Path, console: Console) -> StageOutput:
    from kdpipe.pipeline import execute, stage

    assert upstream is not None and recipe.assistant is not None  # the stage table gives it a teacher upstream
    # the assistant is "a student of the teacher": run those two stages into a scratch root inside work/
    sub = recipe.model_copy(
        update={"student": recipe.assistant, "distill": recipe.distill.model_copy(update={"baseline": False})}
    )
    scratch = work / "_chain"
    execute(stage("student"), sub, scratch, upstream_dir=upstream.dir, console=console)
    distilled, _ = execute(stage("distill"), sub, scratch, console=console)
    built = Manifest.from_file(scratch / "student" / "manifest.json")
    shutil.copytree(distilled.dir / "model", work / "model")
    shutil.copyfile(distilled.dir / "test_logits.npy", work / "test_logits.npy")
    (work / "data").mkdir()
    for split in ("train", "val", "test"):
        os.link(upstream.path(f"data/{split}.jsonl"), work / "data" / f"{split}.jsonl")
    if upstream.extra.get("split_sizes", {}).get("val"):
        _write_logit_stats(work, upstream)
    shutil.rmtree(scratch)
    t_acc = upstream.metric("test_accuracy")
    console.print(
        f"assistant: {built.metric('layers')} layers, test accuracy {distilled.metric('test_accuracy'):.4f} "
        f"(teacher {t_acc:.4f})"
    )
    metrics = {
        "test_accuracy": distilled.metrics["test_accuracy"],
        "test_macro_f1": distilled.metrics["test_macro_f1"],
        "params": built.metrics["params"],
        "layers": built.metrics["layers"],
        "train_seconds": distilled.metrics["train_seconds"],
        "teacher_test_accuracy": Metric(t_acc, "fraction"),
    }
    extra = {
        **upstream.extra,
        "trained_params": "all",
        "assistant": {
            "kept_layers": built.extra["kept_layers"],
            "of": upstream.extra.get("model_source"),
            "teacher_layers": upstream.metric("layers"),
        },
    }
    return StageOutput(metrics=metrics, extra=extra)


def _write_logit_stats(work: Path, teacher: Manifest) -> None:
    """The assistant stands in as the student's teacher, so data-free distillation from it needs its
    own per-class logit statistics on the validation split (as the teacher stage writes them)."""
    from kdpipe.data import encode, read_split
    from kdpipe.models import load_classifier, load_tokenizer
    from kdpipe.teacher import write_logit_stats
    from kdpipe.train import evaluate, pick_device

    model = load_classifier(work / "model")
    val = encode(
        load_tokenizer(work / "model"), read_split(work / "data" / "val.jsonl"), int(teacher.extra["max_length"])
    )
    logits = evaluate(model, val, pick_device("cpu")).logits
    write_logit_stats(logits, val.labels or [], list(teacher.extra["label_names"]), work / "logit_stats.json")
