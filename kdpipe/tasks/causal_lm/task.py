"""Causal-LM distillation through the stages (`teacher.task: causal_lm`), kdpipe.tasks.registry's TASKS["causal_lm"]:
the hooks of kdpipe.tasks.base.Task, each handing its stage to a module of this package (build: teacher and
student; distill; export; profile). `check_recipe` refuses, before any model loads, what a causal-LM run cannot do:
classification loss terms (distill.losses; the LM terms are distill.lm), classification-only student and distill
options, on-policy batches without a KD term, listed export.variants it has no export for, a student.pretrained
with another tokenizer, student layers outside the teacher's, and a prompt file with a missing column or no rows.
"""

from __future__ import annotations

from pathlib import Path

from kdpipe.artifacts.manifest import FileRecord, Manifest
from kdpipe.artifacts.records import RunContext, StageOutput
from kdpipe.config import DistillConfig, ExportConfig, Recipe, StudentConfig, TargetProfile, TeacherConfig
from kdpipe.errors import ConfigError, ModelError
from kdpipe.reporting.cardcode import CardHints
from kdpipe.tasks.causal_lm import build, data


def _check_distill(d: DistillConfig) -> None:
    if "losses" in d.model_fields_set:
        names = ", ".join(t.name for t in d.losses)
        raise ConfigError(
            f"distill.losses: {names} are classification terms (on class logits / hidden states); a causal_lm recipe "
            "distils next-token distributions",
            "drop distill.losses and set distill.lm: {forward_kl: 1.0} (or reverse_kl / jsd / tvd / ce)",
        )
    refused = [f for f in ("augment", "data_free", "transfer") if getattr(d, f) is not None]
    refused += ["extra_teachers"] if d.extra_teachers else []
    refused += [f"schedule.kind: {d.schedule.kind}"] if d.schedule.kind != "all" else []
    refused += [f"accumulate: {d.accumulate}"] if d.accumulate != 1 else []
    refused += ["compile"] if d.compile else []
    refused += ["teacher_shard"] if d.teacher_shard else []
    refused += [f"device: {d.device} (it trains on the CPU today)"] if d.device == "cuda" else []
    refused += [f"precision: {d.precision} (fp32 today)"] if d.precision not in ("auto", "fp32") else []
    if refused:
        raise ConfigError(f"distill: {', '.join(refused)} is not available for causal_lm", "drop it")
    lm = d.lm
    if (
        lm is not None
        and lm.on_policy > 0
        and not any(getattr(lm, k) for k in ("forward_kl", "reverse_kl", "jsd", "tvd"))
    ):
        raise ConfigError(
            f"distill.lm.on_policy: {lm.on_policy}: on-policy batches are the student's own samples scored by the "
            "teacher, but distill.lm has no KD term (ce alone would train on the student's own samples)",
            "give forward_kl / reverse_kl / jsd / tvd a positive weight, or set distill.lm.on_policy: 0",
        )


def _check_student(s: StudentConfig) -> None:
    clash = ["vocab"] if s.vocab is not None else []
    clash += ["width with student.pretrained"] if s.width is not None and s.pretrained is not None else []
    clash += [f"init: {s.init}"] if s.init != "copy" else []
    clash += [f"arch: {s.arch}"] if s.arch != "teacher" else []
    clash += ["layers per stack"] if isinstance(s.layers, dict) else []
    if clash:
        raise ConfigError(
            f"student: {', '.join(clash)} is not available for causal_lm",
            "a causal-LM student keeps teacher decoder layers (student.layers, init: copy; student.width prunes "
            "them) or is student.pretrained",
        )


LM_VARIANTS = ("int8-dynamic", "int4")  # kdpipe.tasks.causal_lm.export.VARIANTS (export.py loads onnx: not here)


def _check_export(e: ExportConfig) -> None:
    """Listed export.variants that a causal LM has no export for (the default list's `optimized` is skipped by the
    export stage, with a note: a recipe that never named variants is not refused for it)."""
    if "variants" not in e.model_fields_set:
        return
    refused = [v for v in e.variants if v not in LM_VARIANTS]
    if refused:
        raise ConfigError(
            f"export.variants: {', '.join(refused)} is not available for causal_lm (it exports fp32, "
            f"{' and '.join(LM_VARIANTS)})",
            f"list only {' / '.join(LM_VARIANTS)} in export.variants",
        )


def _teacher_folder(t: TeacherConfig) -> Path | None:
    """The teacher's local folder when it is on this machine (the default: once materialized), else None."""
    if t.model == "default":
        path = build.default_dir()
        return path if (path / "config.json").is_file() else None
    return build.teacher_dir(t)  # a missing or non-HF folder: one ModelError


def _check_layers(recipe: Recipe, folder: Path | None) -> None:
    """The student's teacher layers against the teacher's depth (its config.json; SmolLM2's 30 before it is
    materialized)."""
    from kdpipe.compress import layercheck

    s = recipe.student
    if s.pretrained is not None:
        return
    conf = layercheck.model_config(folder) if folder is not None else None
    if conf is None and recipe.teacher.model == "default":
        conf = {"model_type": "llama", "num_hidden_layers": build.DEFAULT_LAYERS}
    stacks = layercheck.one_stack(conf, "the teacher's")
    layercheck.raise_problems(layercheck.selection_problems(s, stacks, "student", scored=True))


def check_recipe(recipe: Recipe) -> None:
    """`kdpipe validate` / `kdpipe run` for task: causal_lm, before any model loads."""
    if recipe.assistant is not None:
        raise ConfigError("assistant: a teaching assistant is not available for causal_lm", "drop assistant")
    _check_distill(recipe.distill)
    _check_student(recipe.student)
    _check_export(recipe.export)
    folder = _teacher_folder(recipe.teacher)
    _check_layers(recipe, folder)
    pretrained = recipe.student.pretrained
    if pretrained is not None:
        if not (Path(pretrained) / "config.json").is_file():
            raise ModelError(f"student.pretrained: {pretrained}: no config.json", "give a local causal-LM directory")
        if folder is not None:
            build.check_vocab(folder, Path(pretrained))
    data.read_rows(recipe.teacher)  # a missing column, an empty corpus: one line


# what its model cards say of it (kdpipe.reporting.card)
CARD = CardHints(
    pipeline_tag="text-generation",
    pipeline_task="text-generation",
    auto_class="AutoModelForCausalLM",
    ort_class="ORTModelForCausalLM",
    example="The capital of France is",
    quality={"perplexity": "perplexity"},
    generates=True,
)


class CausalLMTask:
    """Decoder-only language models (kdpipe.tasks.registry.TASKS["causal_lm"])."""

    name = "causal_lm"

    def check_recipe(self, recipe: Recipe) -> None:
        check_recipe(recipe)

    def teacher_inputs(self, cfg: TeacherConfig) -> list[FileRecord]:
        return build.teacher_inputs(cfg)

    def run_teacher(self, cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
        return build.run_teacher(cfg, work, ctx)

    def run_student(self, cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return build.run_student(cfg, upstream, work, ctx)

    def run_distill(self, cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        from kdpipe.tasks.causal_lm.distill import run_distill

        return run_distill(cfg, upstream, work, ctx)

    def run_export(self, cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        from kdpipe.tasks.causal_lm.export import run_export  # type: ignore[import-not-found, attr-defined, unused-ignore]

        result: StageOutput = run_export(cfg, upstream, work, ctx)
        return result

    def run_profile(
        self,
        prof: TargetProfile,
        upstream: Manifest,
        work: Path,
        ctx: RunContext,
        providers: list[str],
        missing: list[str],
    ) -> StageOutput:
        from kdpipe.tasks.causal_lm.profile import run_profile  # type: ignore[import-not-found, attr-defined, unused-ignore]

        result: StageOutput = run_profile(prof, upstream, work, ctx, providers, missing)
        return result

    def card_hints(self) -> CardHints:
        return CARD


CAUSAL_LM = CausalLMTask()
