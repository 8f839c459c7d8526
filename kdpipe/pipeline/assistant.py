"""Teaching assistant (docs/methods.md §5): teacher -> assistant -> student.

`kdpipe run` builds a student of the recipe's `assistant` size from the teacher (`<out>/assistant-student`) and
distils it with the recipe's terms (`<out>/assistant-distill`); this stage then promotes that distilled model
to a teacher-kind artifact, `<out>/assistant/` (model, the teacher's data splits, test logits, logit
statistics), which the student stage takes as its teacher. The lineage keeps the original teacher behind it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    AssistantInfo,
    RunContext,
    StageOutput,
    StageSpec,
    StudentRecord,
    TeacherRecord,
    record,
    seeded,
)
from kdpipe.config import Recipe, StudentConfig
from kdpipe.data.tables import SPLITS, encode, read_split
from kdpipe.errors import ConfigError
from kdpipe.methods.datafree import write_logit_stats
from kdpipe.models.loading import load_classifier, load_tokenizer
from kdpipe.train.loop import evaluate, pick_device


def run_assistant(cfg: StudentConfig, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    assert upstream is not None  # STAGE names a distill upstream: the assistant's own distillation
    built, teacher = upstream.upstream("student"), upstream.upstream("teacher")
    t_rec = record(teacher, TeacherRecord)
    shutil.copytree(upstream.directory("model"), work / "model")
    shutil.copyfile(upstream.path("test_logits.npy"), work / "test_logits.npy")
    (work / "data").mkdir()
    for split in SPLITS:
        os.link(teacher.path(f"data/{split}.jsonl"), work / "data" / f"{split}.jsonl")
    if t_rec.split_sizes.get("val"):
        _write_logit_stats(work, t_rec)
    t_acc = teacher.metric("test_accuracy")
    ctx.console.print(
        f"assistant: {built.metric('layers')} layers, test accuracy {upstream.metric('test_accuracy'):.4f} "
        f"(teacher {t_acc:.4f})"
    )
    info = AssistantInfo(
        kept_layers=record(built, StudentRecord).kept_layers,
        of=t_rec.model_source,
        teacher_layers=int(teacher.metric("layers")),
    )
    metrics = {
        "test_accuracy": upstream.metrics["test_accuracy"],
        "test_macro_f1": upstream.metrics["test_macro_f1"],
        "params": built.metrics["params"],
        "layers": built.metrics["layers"],
        "train_seconds": upstream.metrics["train_seconds"],
        "teacher_test_accuracy": Metric(t_acc, "fraction"),
    }
    return StageOutput(record=t_rec.model_copy(update={"trained_params": "all", "assistant": info}), metrics=metrics)


def _write_logit_stats(work: Path, teacher: TeacherRecord) -> None:
    """The assistant stands in as the student's teacher, so data-free distillation from it needs its
    own per-class logit statistics on the validation split (as the teacher stage writes them)."""
    model = load_classifier(work / "model")
    val = encode(load_tokenizer(work / "model"), read_split(work / "data" / "val.jsonl"), teacher.max_length)
    logits = evaluate(model, val, pick_device("cpu")).logits
    write_logit_stats(logits, val.labels or [], teacher.label_names, work / "logit_stats.json")


def _section(recipe: Recipe, ctx: RunContext) -> StudentConfig:
    assistant = recipe.assistant
    if assistant is None:
        raise ConfigError(
            "the assistant stage needs `assistant:` in the recipe",
            "e.g. assistant: {layers: [0, 1, 3, 5]} (a size between the teacher's and the student's)",
        )
    return assistant


STAGE = StageSpec(
    name="assistant",
    upstream="distill",
    section=_section,
    run=run_assistant,
    summary="promote the distilled teaching assistant to the student's teacher",
    identity=seeded,
    kind="teacher",
)
