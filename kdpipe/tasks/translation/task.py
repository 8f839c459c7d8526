"""Translation (seq2seq) through the stages, for `teacher.task: translation`: its Task.

The stages reach it through kdpipe.tasks.registry (TRANSLATION, below); everything translation-specific lives in this
package, one module per stage (checks, teacher, student, distill, export, profile; common: what they share), built
from the library: kdpipe.data.pairs (pairs, splits, tokenizer, batches), seq2seq (here: the small pre-LN mBART
config, the KD training loop, greedy translation, BLEU, ONNX export and parity), kdpipe.compress.surgery (per-stack
layer removal), kdpipe.methods.bayesinit / kdpipe.methods.bayes (posterior, bayes init, the prior term).

- teacher: read the pairs, split them (seeded), train a tokenizer and a model from scratch (or fine-tune a local
  seq2seq directory), validation BLEU per epoch, test BLEU (greedy); the splits go to data/{train,val,test}.jsonl
  ({"source", "target"} per line) so that every later stage reads the same pairs.
- student: keep blocks per stack ({encoder: all, decoder: [0, 2]}), init copy / random / bayes.
- distill: the recipe's terms mapped onto Seq2SeqKD (hinton, reverse_kl), plain CE (ce) and the prior term.
- export: encoder + decoder (+ with past) ONNX of the student (and teacher), gated by seq2seq_parity; then the
  student's fp32 export and its int8-dynamic variant (every graph quantised), each gated on the whole test split's
  BLEU against the fp32 PyTorch student (export.accuracy_budget x its BLEU); a miss fails the stage.
- profile: greedy-generation latency of the ONNX models (and PyTorch eager) on real test sentences, each model in
  its own processes (kdpipe.profiling.generation), the profile's budgets (kdpipe.profiling.budgets: accuracy and
  retention read test BLEU / 100, p50 / p99 one greedy translation), report.json and report.md.
"""

from __future__ import annotations

from pathlib import Path

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput
from kdpipe.config import DistillConfig, ExportConfig, Recipe, StudentConfig, TargetProfile, TeacherConfig
from kdpipe.reporting.cardcode import CardHints
from kdpipe.tasks.translation.checks import check_recipe, teacher_inputs
from kdpipe.tasks.translation.distill import run_distill
from kdpipe.tasks.translation.export import run_export
from kdpipe.tasks.translation.profile import run_profile
from kdpipe.tasks.translation.student import run_student
from kdpipe.tasks.translation.teacher import run_teacher

# what its model cards say of it (kdpipe.reporting.card)
CARD = CardHints(
    pipeline_tag="translation",
    pipeline_task="translation",
    auto_class="AutoModelForSeq2SeqLM",
    ort_class="ORTModelForSeq2SeqLM",
    example="открыть файл",
    quality={"test_bleu": "bleu"},
    generates=True,
)


class TranslationTask:
    """Seq2seq translation (kdpipe.tasks.registry.TASKS["translation"]): the stage hooks of kdpipe.tasks.base.Task."""

    name = "translation"

    def check_recipe(self, recipe: Recipe) -> None:
        check_recipe(recipe)

    def teacher_inputs(self, cfg: TeacherConfig) -> list[FileRecord]:
        return teacher_inputs(cfg)

    def run_teacher(self, cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
        return run_teacher(cfg, work, ctx)

    def run_student(self, cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return run_student(cfg, upstream, work, ctx)

    def run_distill(self, cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return run_distill(cfg, upstream, work, ctx)

    def run_export(self, cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return run_export(cfg, upstream, work, ctx)

    def run_profile(
        self,
        prof: TargetProfile,
        upstream: Manifest,
        work: Path,
        ctx: RunContext,
        providers: list[str],
        missing: list[str],
    ) -> StageOutput:
        return run_profile(prof, upstream, work, ctx, providers, missing)

    def card_hints(self) -> CardHints:
        return CARD


TRANSLATION = TranslationTask()
