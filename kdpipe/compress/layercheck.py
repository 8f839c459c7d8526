"""The layers a student keeps, checked against the stacks of the model it is cut from, before anything trains.

Task-neutral and torch-free (it reads config.json only): the stacks (name -> depth), the config.json depth, the
checks of a layer selection, and the whole check for a one-stack model (a teacher from teacher.model's config.json,
an optional assistant, the student). A task runs them from its `check_recipe` (kdpipe.tasks.base.Task) and collects
every problem into one ConfigError (raise_problems); a task with other stacks (translation's encoder + decoder) builds
its Stacks itself and checks its selections with the helpers here. The student stage checks the same thing once the
teacher exists (kdpipe.tasks.classification.student.select_layers for one-stack models, kdpipe.compress.surgery
.parse_keep per stack), so a layer list that cannot be built fails in a second instead of after the teacher trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.compress.surgery import ARCHS
from kdpipe.config import Recipe, StudentConfig
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


SCORED = ("importance", "block")  # kdpipe.compress.layerscore.CRITERIA, scored by causal_lm (torch-free here)


def raise_problems(problems: list[Problem]) -> None:
    """One ConfigError listing every problem (a line each), with their distinct hints; nothing when there is none."""
    if problems:
        hints = list(dict.fromkeys(h for _, h in problems))
        raise ConfigError("\n".join(m for m, _ in problems), "; ".join(hints))


def one_stack_problems(recipe: Recipe) -> list[Problem]:
    """(message, hint) per problem for a teacher with one stack (teacher.model's config.json); with an assistant,
    the student is cut from the assistant's layers."""
    teacher = model_config(model_dir(recipe.teacher.model))
    stacks = one_stack(teacher, "the teacher's")
    assistant = recipe.assistant
    if assistant is None:
        return selection_problems(recipe.student, stacks, "student")
    problems = selection_problems(assistant, stacks, "assistant")
    if problems or assistant.arch == "bilstm":  # a BiLSTM assistant has no layers to cut a student from
        return problems
    if assistant.pretrained is not None:
        inner = one_stack(model_config(model_dir(assistant.pretrained)), "the assistant's")
    else:  # the assistant is the teacher's architecture with its kept layers
        n = next(iter(stacks.sizes.values()))
        inner = Stacks({s: kept(assistant, n) for s in stacks.sizes}, "the assistant's")
    return selection_problems(recipe.student, inner, "student")


# --------------------------------------------------------------------------- the stacks
def model_dir(model: str) -> Path | None:
    """The model's local directory; None when it is not on this machine yet (the stage that needs it says so)."""
    try:
        return resolve_model_dir(model)
    except ModelError:
        return None


def model_config(path: Path | None) -> dict[str, Any] | None:
    """The directory's config.json as a dict; None when there is none or it is not a JSON object."""
    if path is None:
        return None
    try:
        conf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the model loader reports a broken config.json in its own words
    return conf if isinstance(conf, dict) else None


def config_size(conf: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """A depth or width from config.json: the first of `keys` that is set decides; None unless a positive int."""
    value = next((conf[k] for k in keys if conf.get(k) is not None), None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def one_stack(conf: dict[str, Any] | None, of: str) -> Stacks:
    """A one-stack model's stack: its name per kdpipe.compress.surgery (any of ANY_STACK when unknown) and depth."""
    if conf is None:
        return Stacks(dict.fromkeys(ANY_STACK), of)
    arch = ARCHS.get(str(conf.get("model_type", "")))
    if arch is None or len(arch.stacks) != 1:
        # kdpipe.tasks.classification.student maps `layer.<i>` keys for these, with num_hidden_layers blocks
        return Stacks(dict.fromkeys(ANY_STACK, config_size(conf, ("num_hidden_layers",))), of)
    ((name, (_, keys)),) = arch.stacks.items()
    return Stacks({name: config_size(conf, (*keys, "num_hidden_layers"))}, of)


def kept(cfg: StudentConfig, n: int | None) -> int | None:
    """How many layers a valid selection keeps (None when that needs a depth not known here)."""
    spec: Any = cfg.layers
    if isinstance(spec, dict):
        (spec,) = spec.values()
        if spec == "all":
            return n
    if spec == "every-other":
        return None if n is None else math.ceil(n / 2)
    if spec in ("last-k", "first-k", *SCORED):
        return cfg.k
    return len(spec)


# --------------------------------------------------------------------------- the selections


def selection_problems(cfg: StudentConfig, stacks: Stacks, name: str, scored: bool = False) -> list[Problem]:
    """kdpipe.tasks.classification.student.select_layers on a one-stack model, and the stack name of {stack: layers}
    (which it takes on trust): what `student.arch: teacher` without `pretrained` builds (a BiLSTM or pretrained student
    keeps no teacher layers)."""
    if cfg.arch != "teacher" or cfg.pretrained is not None:
        return []
    field, spec, n = f"{name}.layers", cfg.layers, next(iter(stacks.sizes.values()))
    if isinstance(spec, dict):
        problems = unknown_stacks(spec, stacks, field)
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
        return [] if value == "all" else indices(value, n, f"{field}.{stack}", stacks.of)
    if spec in SCORED and not scored:
        return [
            (
                f"{field}: {spec} scores decoder layers on the teacher's hidden states, which teacher.task: "
                "causal_lm does (kdpipe.compress.layerscore)",
                "use every-other, last-k, first-k or a list of layers",
            )
        ]
    if spec in ("last-k", "first-k", *SCORED):
        if cfg.k is None:
            return [(f"{name}.k is required with {field}: {spec}", f"e.g. --set {name}.k=3")]
        if n is not None and cfg.k > n:
            return [(f"{name}.k={cfg.k} exceeds {stacks.of} {n} layers", f"use k <= {n}")]
        return []
    return [] if isinstance(spec, str) else indices(spec, n, field, stacks.of, per_stack=False)


def unknown_stacks(spec: dict[str, Any], stacks: Stacks, field: str) -> list[Problem]:
    names = list(stacks.sizes)
    return [
        (f"{field}.{s}: {stacks.of} model has no stack '{s}'", did_you_mean(str(s), names))
        for s in spec
        if s not in stacks.sizes
    ]


def indices(layers: list[int], n: int | None, field: str, of: str, per_stack: bool = True) -> list[Problem]:
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
