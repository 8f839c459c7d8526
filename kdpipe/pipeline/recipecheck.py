"""The layers each student keeps, checked against the stacks of the model it is built from, before anything trains.

The student stage checks the same thing once the teacher exists (kdpipe.tasks.classification.student.select_layers for
one-stack classifiers, kdpipe.compress.surgery.parse_keep for translation's encoder + decoder); here the stacks come
from the recipe (teacher.translation.layers from scratch) or the model's config.json, so a layer list that cannot be
built fails in a second instead of after the teacher's training. Torch-free: it reads JSON only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.compress.surgery import ARCHS
from kdpipe.config import Recipe, StudentConfig, TeacherConfig
from kdpipe.errors import ConfigError, ModelError, did_you_mean
from kdpipe.models.loading import resolve_model_dir

Problem = tuple[str, str]  # (message, hint)
# the stack names kdpipe uses anywhere, for a model whose own stacks are not known here
ANY_STACK = ("encoder", "decoder")


@dataclass(frozen=True)
class Stacks:
    """The stacks a student is cut from: name -> number of blocks (None: not known on this machine)."""

    sizes: dict[str, int | None]
    of: str  # whose layers, for messages: "the teacher's" / "the assistant's"


def check_layers(recipe: Recipe) -> None:
    """ConfigError listing every layer selection (student, assistant) and every stack the recipe gets wrong."""
    problems = layer_problems(recipe)
    if problems:
        hints = list(dict.fromkeys(h for _, h in problems))
        raise ConfigError("\n".join(m for m, _ in problems), "; ".join(hints))


def layer_problems(recipe: Recipe) -> list[Problem]:
    """(message, hint) per problem; with an assistant, the student is cut from the assistant's layers."""
    if recipe.teacher.task == "translation":
        stacks, problems = _translation_stacks(recipe.teacher)
        return problems + _per_stack(recipe.student.layers, stacks, "student.layers")
    teacher = _config(_model_dir(recipe.teacher.model))
    stacks = _one_stack(teacher, "the teacher's")
    assistant = recipe.assistant
    if assistant is None:
        return _student(recipe.student, stacks, "student")
    problems = _student(assistant, stacks, "assistant")
    if problems or assistant.arch == "bilstm":  # a BiLSTM assistant has no layers to cut a student from
        return problems
    if assistant.pretrained is not None:
        inner = _one_stack(_config(_model_dir(assistant.pretrained)), "the assistant's")
    else:  # the assistant is the teacher's architecture with its kept layers
        n = next(iter(stacks.sizes.values()))
        inner = Stacks({s: _kept(assistant, n) for s in stacks.sizes}, "the assistant's")
    return _student(recipe.student, inner, "student")


# --------------------------------------------------------------------------- the stacks
def _model_dir(model: str) -> Path | None:
    try:
        return resolve_model_dir(model)
    except ModelError:
        return None  # not on this machine yet: the stage that needs it says so


def _config(model_dir: Path | None) -> dict[str, Any] | None:
    if model_dir is None:
        return None
    try:
        conf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the model loader reports a broken config.json in its own words
    return conf if isinstance(conf, dict) else None


def _depth(conf: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    value = next((conf[k] for k in keys if conf.get(k) is not None), None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _one_stack(conf: dict[str, Any] | None, of: str) -> Stacks:
    """A classifier's one stack: its name per kdpipe.compress.surgery (any of ANY_STACK when unknown) and depth."""
    if conf is None:
        return Stacks(dict.fromkeys(ANY_STACK), of)
    arch = ARCHS.get(str(conf.get("model_type", "")))
    if arch is None or len(arch.stacks) != 1:
        # kdpipe.tasks.classification.student maps `layer.<i>` keys for these, with num_hidden_layers blocks
        return Stacks(dict.fromkeys(ANY_STACK, _depth(conf, ("num_hidden_layers",))), of)
    ((name, (_, keys)),) = arch.stacks.items()
    return Stacks({name: _depth(conf, (*keys, "num_hidden_layers"))}, of)


def _translation_stacks(t: TeacherConfig) -> tuple[Stacks, list[Problem]]:
    """Encoder and decoder depth of a translation teacher: teacher.translation.layers each from scratch (the
    mBART of kdpipe.tasks.translation.seq2seq.small_config), else from teacher.model's config.json."""
    assert t.translation is not None  # the config's validator requires it
    if t.translation.from_scratch:
        return Stacks({"encoder": t.translation.layers, "decoder": t.translation.layers}, "the teacher's"), []
    conf = _config(Path(t.model))
    if conf is None:  # kdpipe.tasks.translation.checks.check_recipe refuses the directory
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
        sizes[name] = _depth(conf, (*keys, "num_layers") if model_type == "t5" else keys)
    return Stacks(sizes, "the teacher's"), []


def _kept(cfg: StudentConfig, n: int | None) -> int | None:
    """How many layers a valid selection keeps (None when that needs a depth not known here)."""
    spec: Any = cfg.layers
    if isinstance(spec, dict):
        (spec,) = spec.values()
        if spec == "all":
            return n
    if spec == "every-other":
        return None if n is None else math.ceil(n / 2)
    if spec in ("last-k", "first-k"):
        return cfg.k
    return len(spec)


# --------------------------------------------------------------------------- the selections
def _student(cfg: StudentConfig, stacks: Stacks, name: str) -> list[Problem]:
    """kdpipe.tasks.classification.student.select_layers on a one-stack model, and the stack name of {stack: layers}
    (which it takes on trust): what `student.arch: teacher` without `pretrained` builds (a BiLSTM or pretrained student
    keeps no teacher layers)."""
    if cfg.arch != "teacher" or cfg.pretrained is not None:
        return []
    field, spec, n = f"{name}.layers", cfg.layers, next(iter(stacks.sizes.values()))
    if isinstance(spec, dict):
        problems = _unknown_stacks(spec, stacks, field)
        if len(spec) != 1:
            problems.append(
                (
                    f"{field}: names {len(spec)} stacks ({', '.join(map(str, spec))}), but {stacks.of} model has one "
                    "stack of layers",
                    "give a list of 0-based layers, or {encoder: [...]} for an encoder",
                )
            )
        if problems:
            return problems
        ((stack, value),) = spec.items()
        return [] if value == "all" else _indices(value, n, f"{field}.{stack}", stacks.of)
    if spec in ("last-k", "first-k"):
        if cfg.k is None:
            return [(f"{name}.k is required with {field}: {spec}", f"e.g. --set {name}.k=3")]
        if n is not None and cfg.k > n:
            return [(f"{name}.k={cfg.k} exceeds {stacks.of} {n} layers", f"use k <= {n}")]
        return []
    return [] if isinstance(spec, str) else _indices(spec, n, field, stacks.of, per_stack=False)


def _per_stack(spec: Any, stacks: Stacks, field: str) -> list[Problem]:
    """kdpipe.tasks.translation.checks.check_student and kdpipe.compress.surgery.parse_keep: {stack: 'all' |
    [indices]}, a plain list only for a one-stack model."""
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
        return _indices(spec, n, field, stacks.of, per_stack=False)
    problems = _unknown_stacks(spec, stacks, field)
    for stack, value in spec.items():
        if stack in stacks.sizes and value != "all":
            problems += _indices(value, stacks.sizes[stack], f"{field}.{stack}", stacks.of)
    return problems


def _unknown_stacks(spec: dict[str, Any], stacks: Stacks, field: str) -> list[Problem]:
    names = list(stacks.sizes)
    return [
        (f"{field}.{s}: {stacks.of} model has no stack '{s}'", did_you_mean(str(s), names))
        for s in spec
        if s not in stacks.sizes
    ]


def _indices(layers: list[int], n: int | None, field: str, of: str, per_stack: bool = True) -> list[Problem]:
    """kdpipe.compress.surgery._indices (and select_layers): a non-empty increasing list within 0..n-1; without n (the
    model is not on this machine) only what no depth allows."""
    span = f"0..{n - 1}" if n is not None else "0, 1, ..."
    if not layers:
        return [
            (f"{field}: keeps no layer", f"list at least one of {span}" + (", or write 'all'" if per_stack else ""))
        ]
    problems = []
    bad = [i for i in layers if i < 0 or (n is not None and i >= n)]
    if bad:
        problems.append(
            (f"{field}: indices {bad} outside {of} layers {span}", f"list 0-based layers of {of} model: {span}")
        )
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        problems.append((f"{field}: {layers} must be increasing without repeats", "e.g. [0, 2, 3]"))
    return problems
