"""The translation recipe checks, made before any model loads (`kdpipe validate`, `kdpipe run`), and the
teacher's input files. Torch-free to import (seq2seq is imported where a KD plan is built): the layer checks
(layer_problems) read JSON only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.artifacts.manifest import FileRecord, input_records
from kdpipe.compress.layercheck import (
    ANY_STACK,
    Problem,
    Stacks,
    config_size,
    indices,
    model_config,
    raise_problems,
    unknown_stacks,
)
from kdpipe.compress.surgery import ARCHS
from kdpipe.config import DistillConfig, Recipe, StudentConfig, TeacherConfig, TranslationConfig
from kdpipe.data import pairs as parallel
from kdpipe.data.tables import check_file
from kdpipe.errors import ConfigError, DataError

if TYPE_CHECKING:
    from kdpipe.tasks.translation import seq2seq

KD_TERMS = ("hinton", "reverse_kl", "ce", "prior")


@dataclass(frozen=True)
class KDPlan:
    """The distill terms as train_seq2seq takes them: Seq2SeqKD (None: plain CE, no teacher) and a prior weight."""

    kd: seq2seq.Seq2SeqKD | None
    prior_weight: float


def kd_plan(cfg: DistillConfig) -> KDPlan:
    """hinton -> Seq2SeqKD(hinton, its alpha and temperature); reverse_kl -> Seq2SeqKD(reverse_kl), alpha its share
    of the weights next to a `ce` term (1 without one); ce alone -> plain CE; prior -> the PriorPenalty weight."""
    from kdpipe.tasks.translation import seq2seq

    by_name = {t.name: t for t in cfg.losses}
    for term in cfg.losses:
        if term.name not in KD_TERMS:
            raise ConfigError(
                f"distill.losses: {term.name} is not available for translation; use hinton, reverse_kl, ce, prior",
                "translation distils token-level logits only (kdpipe.tasks.translation.seq2seq.Seq2SeqKD)",
            )
    if len(by_name) != len(cfg.losses):
        raise ConfigError("distill.losses: a term is listed twice", "give each term once")
    if "hinton" in by_name and ("reverse_kl" in by_name or "ce" in by_name):
        raise ConfigError(
            "distill.losses: hinton already holds its CE share (1 - alpha); it does not combine with "
            f"{' or '.join(n for n in ('reverse_kl', 'ce') if n in by_name)} for translation",
            "use hinton alone (with alpha), or reverse_kl with ce",
        )
    prior = by_name.get("prior")
    weight = float(prior.weight) if prior is not None else 0.0
    hinton, rkl = by_name.get("hinton"), by_name.get("reverse_kl")
    if hinton is not None:
        kd = seq2seq.Seq2SeqKD(
            "hinton", alpha=term_field(hinton, "alpha"), temperature=term_field(hinton, "temperature")
        )
        return KDPlan(kd, weight)
    if rkl is not None:
        ce_w = float(by_name["ce"].weight) if "ce" in by_name else 0.0
        alpha = float(rkl.weight) / (float(rkl.weight) + ce_w) if rkl.weight + ce_w > 0 else 0.0
        kd = seq2seq.Seq2SeqKD("reverse_kl", alpha=alpha, temperature=term_field(rkl, "temperature"))
        return KDPlan(kd, weight)
    return KDPlan(None, weight)


def term_field(term: Any, name: str) -> float:
    return float(getattr(term, name))


def check_student(cfg: StudentConfig) -> None:
    """What a translation student supports: the teacher's architecture, layers per stack, init copy/random/bayes."""
    clash = [f for f in ("pretrained", "width", "vocab") if getattr(cfg, f) is not None]
    if cfg.arch != "teacher":
        clash.append(f"arch: {cfg.arch}")
    if clash:
        raise ConfigError(
            f"student: {', '.join(clash)} is not available for translation", "drop it (translation keeps layers only)"
        )
    if isinstance(cfg.layers, str):
        raise ConfigError(
            f"student.layers: '{cfg.layers}' is not available for translation; name the layers per stack",
            "e.g. student.layers: {encoder: all, decoder: [0, 2]}",
        )


def check_recipe(recipe: Recipe) -> None:
    """`kdpipe validate` / `kdpipe run` for task: translation, before anything trains."""
    t, s, d = recipe.teacher, recipe.student, recipe.distill
    assert t.translation is not None  # the config's validator requires it
    raise_problems(layer_problems(recipe))
    if recipe.assistant is not None:
        raise ConfigError("assistant: a teaching assistant is not available for translation", "drop assistant")
    check_student(s)
    plan = kd_plan(d)
    refused = [f for f in ("transfer", "augment", "data_free") if getattr(d, f) is not None]
    refused += ["extra_teachers"] if d.extra_teachers else []
    refused += [f"schedule.kind: {d.schedule.kind}"] if d.schedule.kind != "all" else []
    if refused:
        raise ConfigError(f"distill: {', '.join(refused)} is not available for translation", "drop it")
    if d.baseline and plan.kd is None:
        raise ConfigError(
            "distill.baseline: the recipe's loss is already plain CE", "set distill.baseline: false, or add hinton"
        )
    if plan.prior_weight and s.init != "bayes":
        raise ConfigError(
            f"distill.losses: the 'prior' term needs student.init: bayes (it is {s.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    if s.init == "bayes" and t.posterior is None:
        raise ConfigError(
            "student.init: bayes starts from the teacher's posterior, but teacher.posterior is not set",
            "add teacher.posterior: {kind: swag} (or kind: diagonal) to the recipe",
        )
    pairs_path(t.translation)
    if not t.translation.from_scratch:
        teacher_dir(t)


# --------------------------------------------------------------------------- the layers per stack
def layer_problems(recipe: Recipe) -> list[Problem]:
    """(message, hint) per problem of student.layers against the teacher's encoder and decoder (a teaching
    assistant is refused by check_recipe)."""
    stacks, problems = teacher_stacks(recipe.teacher)
    return problems + per_stack(recipe.student.layers, stacks, "student.layers")


def teacher_stacks(t: TeacherConfig) -> tuple[Stacks, list[Problem]]:
    """Encoder and decoder depth of a translation teacher: teacher.translation.layers each from scratch (the
    mBART of kdpipe.tasks.translation.seq2seq.small_config), else from teacher.model's config.json."""
    assert t.translation is not None  # the config's validator requires it
    if t.translation.from_scratch:
        return Stacks({"encoder": t.translation.layers, "decoder": t.translation.layers}, "the teacher's"), []
    conf = model_config(Path(t.model))
    if conf is None:  # check_recipe refuses the directory (teacher_dir)
        return Stacks(dict.fromkeys(ANY_STACK), "the teacher's"), []
    model_type = str(conf.get("model_type", ""))
    arch = ARCHS.get(model_type)
    if arch is None:
        return Stacks(dict.fromkeys(ANY_STACK), "the teacher's"), [
            (
                f"teacher.model: {t.model}: model_type '{model_type}' has no known layer stacks, so the student "
                "stage cannot remove its layers",
                f"supported model types: {', '.join(sorted(ARCHS))}",
            )
        ]
    sizes: dict[str, int | None] = {}
    for name, (_, keys) in arch.stacks.items():
        # T5Config: num_decoder_layers defaults to num_layers
        sizes[name] = config_size(conf, (*keys, "num_layers") if model_type == "t5" else keys)
    return Stacks(sizes, "the teacher's"), []


def per_stack(spec: Any, stacks: Stacks, field: str) -> list[Problem]:
    """check_student and kdpipe.compress.surgery.parse_keep: {stack: 'all' | [indices]}, a plain list only for a
    one-stack model."""
    if isinstance(spec, str):
        return [
            (
                f"{field}: '{spec}' is not available for translation; name the layers per stack",
                "e.g. student.layers: {encoder: all, decoder: [0, 2]}",
            )
        ]
    if isinstance(spec, list):
        if len(stacks.sizes) != 1:
            example = ", ".join(f"{s}: all" for s in stacks.sizes)
            return [
                (
                    f"{field}: a list of layers is ambiguous for a model with stacks {', '.join(stacks.sizes)}",
                    f"name the stack, e.g. {field}: {{{example}}} with a list for the one to shrink",
                )
            ]
        ((stack, n),) = stacks.sizes.items()
        return indices(spec, n, field, stacks.of, per_stack=False)
    problems = unknown_stacks(spec, stacks, field)
    for stack, value in spec.items():
        if stack in stacks.sizes and value != "all":
            problems += indices(value, stacks.sizes[stack], f"{field}.{stack}", stacks.of)
    return problems


# --------------------------------------------------------------------------- the files
def pairs_path(t: TranslationConfig) -> Path:
    """The pair file: the shipped ru->en pairs for 'default'."""
    if t.source == "default":
        return parallel.default_pairs_path()
    if not t.source.strip():  # Path("") is ".", which would be reported as a missing file named "."
        raise DataError(
            "teacher.translation.source is empty; give a pair file path or 'default'",
            "give a .tsv, .csv or .jsonl (optionally .gz)",
        )
    path = Path(t.source)
    # data.check_file: a directory, a symlink loop or an unreadable file each said as such, not "no such file"
    check_file(path, "pair file (teacher.translation.source)", "give a .tsv, .csv or .jsonl (optionally .gz)")
    return path


def teacher_dir(cfg: TeacherConfig) -> Path:
    path = Path(cfg.model)
    if cfg.model == "default" or not (path / "config.json").is_file():
        raise ConfigError(
            f"teacher.model: {cfg.model}: translation.from_scratch is false, so it must be a local seq2seq HF "
            "directory (config.json, weights, tokenizer)",
            "give such a directory, or set teacher.translation.from_scratch: true",
        )
    return path


def teacher_inputs(cfg: TeacherConfig) -> list[FileRecord]:
    """The pair file and, when fine-tuning, the model directory: a change to either re-runs the teacher."""
    assert cfg.translation is not None
    path = pairs_path(cfg.translation)
    records = [FileRecord.of(path, f"data/{path.name}")]
    if not cfg.translation.from_scratch:
        records += input_records(teacher_dir(cfg), "model")
    return records
