"""Distillation losses: one KDLoss per recipe term, all over normalised KDOutputs.

LOSSES maps a recipe's `name` to a builder `(config, context) -> KDLoss`. The total loss is the
weighted sum of the terms (one visible line in the training loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kdpipe.losses.features import hidden_cosine
from kdpipe.losses.logits import cross_entropy, hinton, logit_mse

if TYPE_CHECKING:
    from torch import Tensor

    from kdpipe.models import KDOutputs


class KDLoss(Protocol):
    def __call__(self, student: KDOutputs, teacher: KDOutputs | None) -> Tensor: ...


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to know about the pair of models."""

    layer_map: dict[int, int]  # student layer (1-based, 0 = embeddings) -> teacher hidden-state index


@dataclass(frozen=True)
class LossSpec:
    build: Callable[[Any, LossContext], KDLoss]
    needs_teacher: bool
    needs_hidden: bool = False


LOSSES: dict[str, LossSpec] = {
    "hinton": LossSpec(lambda c, _: lambda s, t: hinton(s.logits, t.logits, s.labels, c.temperature, c.alpha), True),
    "ce": LossSpec(lambda c, _: lambda s, t: cross_entropy(s.logits, s.labels), False),
    "logit_mse": LossSpec(lambda c, _: lambda s, t: logit_mse(s.logits, t.logits), True),
    "hidden_cosine": LossSpec(
        lambda c, ctx: lambda s, t: hidden_cosine(s.hidden_states, t.hidden_states, s.attention_mask, ctx.layer_map),
        True,
        needs_hidden=True,
    ),
}


@dataclass(frozen=True)
class Objective:
    """The recipe's weighted terms, built once; `terms` returns each term's value for logging."""

    names: list[str]
    weights: list[float]
    fns: list[KDLoss]
    needs_teacher: bool
    needs_hidden: bool

    def terms(self, student: KDOutputs, teacher: KDOutputs | None) -> list[Tensor]:
        return [fn(student, teacher) for fn in self.fns]


def build_objective(configs: list[Any], ctx: LossContext) -> Objective:
    specs = [LOSSES[c.name] for c in configs]
    return Objective(
        names=[c.name for c in configs],
        weights=[c.weight for c in configs],
        fns=[s.build(c, ctx) for s, c in zip(specs, configs, strict=True)],
        needs_teacher=any(s.needs_teacher for s in specs),
        needs_hidden=any(s.needs_hidden for s in specs),
    )
