"""The Task protocol: what a task (classification, translation, ...) gives the stages, which own everything shared.

Structural typing: a task is any object with these members (kdpipe.tasks.registry.TASKS is checked against it by
mypy); nothing is inherited. Each hook sees only its stage's config section, its upstream artifact and the stage
directory it writes into, as the stage's own `run_<stage>` does (CONTRIBUTING.md, "Add a task").
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput
from kdpipe.config import DistillConfig, ExportConfig, Recipe, StudentConfig, TargetProfile, TeacherConfig
from kdpipe.reporting.cardcode import CardHints


class Task(Protocol):
    """One task's side of every stage; `upstream` is the stage's verified upstream artifact."""

    name: str  # its `teacher.task` value and its key in TASKS

    def check_recipe(self, recipe: Recipe) -> None:
        """The recipe cross-checks that need no model (`kdpipe validate`, and `kdpipe run` before the teacher)."""
        ...

    def teacher_inputs(self, cfg: TeacherConfig) -> list[FileRecord]:
        """The files the teacher stage reads (the run id's `inputs`): a change to one re-runs it."""
        ...

    def run_teacher(self, cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput: ...

    def run_student(self, cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput: ...

    def run_distill(self, cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput: ...

    def run_export(self, cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput: ...

    def run_profile(
        self,
        prof: TargetProfile,
        upstream: Manifest,
        work: Path,
        ctx: RunContext,
        providers: list[str],
        missing: list[str],
    ) -> StageOutput:
        """`providers`: the execution providers to time on; `missing`: the profile's that this onnxruntime lacks
        (allow_fallback), for the task to say so."""
        ...

    def card_hints(self) -> CardHints:
        """What the model cards of its artifacts say of it (kdpipe.reporting.card): Hugging Face pipeline tag, the
        transformers / optimum classes that load its models, a sample input, its quality metrics."""
        ...
