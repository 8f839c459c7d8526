"""The classification task's entry in kdpipe.tasks.registry.TASKS: the stage hooks of kdpipe.tasks.base.Task."""

from __future__ import annotations

from pathlib import Path

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput
from kdpipe.config import DistillConfig, ExportConfig, Recipe, StudentConfig, TargetProfile, TeacherConfig
from kdpipe.reporting.cardcode import CardHints
from kdpipe.tasks.classification import checks, distill, export, profile, student, teacher

# what its model cards say of it (kdpipe.reporting.card)
CARD = CardHints(
    pipeline_tag="text-classification",
    pipeline_task="text-classification",
    auto_class="AutoModelForSequenceClassification",
    ort_class="ORTModelForSequenceClassification",
    example="this was a great drive",
    quality={"test_accuracy": "accuracy", "test_macro_f1": "f1"},
)


class ClassificationTask:
    """A HF encoder with a classification head: the teacher fine-tuned on a labelled table, accuracy and macro-F1."""

    name = "classification"

    def check_recipe(self, recipe: Recipe) -> None:
        checks.check_recipe(recipe)

    def teacher_inputs(self, cfg: TeacherConfig) -> list[FileRecord]:
        return teacher.teacher_inputs(cfg)

    def run_teacher(self, cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
        return teacher.run_teacher(cfg, work, ctx)

    def run_student(self, cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return student.run_student(cfg, upstream, work, ctx)

    def run_distill(self, cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return distill.run_distill(cfg, upstream, work, ctx)

    def run_export(self, cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return export.run_export(cfg, upstream, work, ctx)

    def run_profile(
        self,
        prof: TargetProfile,
        upstream: Manifest,
        work: Path,
        ctx: RunContext,
        providers: list[str],
        missing: list[str],
    ) -> StageOutput:
        return profile.run_profile(prof, upstream, work, ctx, providers, missing)

    def card_hints(self) -> CardHints:
        return CARD


CLASSIFICATION = ClassificationTask()
