"""The distillation objective: the recipe's weighted Terms over normalised KDOutputs, under a Schedule.

A Term is an nn.Module so that projections and regressors a loss owns (TinyBERT's W, FitNets'
regressor, VID's heads, CRD's projections) train with the student; they are never part of the
exported model. `layers` of a Term are the student hidden-state indices it reads (0 = embeddings);
the PID/SID schedules switch those on one at a time. A layer term's `logit_fn` (TinyBERT's prediction
term) acts on the logits and follows the schedule like a soft logit term; its `progress` is the [CLS]
cosine loss of one layer, which the PID/SID threshold compares.

Per step, the training loop calls

    step_loss = objective(s, t)                           # StepLoss: .total, .values, .layer_loss
    step_loss.total.backward(); ...
    objective.after_step(step, step_loss.layer_loss)      # the schedule moves on

and nothing is carried between the two calls inside the Objective.

Labels: terms read `s.labels` as given. The training loop fills them (gold labels, or the teacher's
argmax on unlabeled rows); a term that needs labels raises ValueError when they are None.

Attention maps: every attention term reads the maps `output_attentions` returns, i.e. the softmax
PROBABILITIES (rows sum to 1; padded keys ~0), never the raw scores. The training loop turns the
student's attention-probability dropout off while such a term is in the recipe (kdpipe.models.loading.
attention_dropout_off), so the student's maps are not dropout-corrupted in train mode.

The recipe catalogue (one config class per loss, each with its `build`) is kdpipe.losses.terms; this
module never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from kdpipe.errors import ConfigError
from kdpipe.losses.schedule import Schedule
from kdpipe.models.layermaps import uniform_layers

if TYPE_CHECKING:
    from kdpipe.models.loading import KDOutputs

# (student, teacher, active layer map {student index: teacher index}) -> () loss
TermFn = Callable[["KDOutputs", "KDOutputs | None", dict[int, int]], Tensor]
# (student, teacher) -> () loss on the logits
LogitFn = Callable[["KDOutputs", "KDOutputs | None"], Tensor]
# (student, teacher, student layer m, teacher layer n) -> 1 - cos of the two [CLS] vectors, batch mean
ProgressFn = Callable[["KDOutputs", "KDOutputs", int, int], Tensor]


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to know about the pair of models."""

    layer_map: dict[int, int]  # 'kept': student hidden-state index -> teacher hidden-state index
    n_student: int = 0  # layers
    n_teacher: int = 0
    d_student: int = 0  # hidden widths
    d_teacher: int = 0
    prior: Callable[[], Tensor] | None = None  # the 'prior' term's penalty of the student being trained (init: bayes)


class Term(nn.Module):
    """One weighted recipe term: `fn(student, teacher, active_map)`; owns its learned modules.

    logit_fn: the part of a layer term that acts on the logits (TinyBERT's L_pred, a soft-label
    loss); the Objective runs it when the schedule lets soft logit terms run. progress: the [CLS]
    cosine loss of one mapped layer, for the PID/SID threshold (None when this term cannot compare
    the two widths). on_logits: the whole term acts on the logits (no layers; the schedule runs it in
    the classifier phase); soft: it is a soft-label loss (keep_soft keeps it on in the layer phase)."""

    def __init__(
        self,
        name: str,
        weight: float,
        fn: TermFn,
        layer_map: dict[int, int] | None = None,
        needs_teacher: bool = True,
        hidden: bool = False,
        attentions: bool = False,
        modules: dict[str, nn.Module] | None = None,
        logit_fn: LogitFn | None = None,
        progress: ProgressFn | None = None,
        on_logits: bool = False,
        soft: bool = False,
    ) -> None:
        super().__init__()
        self.name, self.weight, self.fn = name, weight, fn
        self.layer_map = layer_map or {}
        self.needs_teacher, self.hidden, self.attentions = needs_teacher, hidden, attentions
        self.learned = nn.ModuleDict(modules or {})
        self.logit_fn, self.progress = logit_fn, progress
        self.on_logits, self.soft = on_logits, soft

    @property
    def layers(self) -> set[int]:
        return set(self.layer_map)

    def forward(self, s: KDOutputs, t: KDOutputs | None, active: set[int] | None = None) -> Tensor:
        """() the term's unweighted value on the layers of `active` (None: all of its layers)."""
        lm = self.layer_map if active is None else {k: v for k, v in self.layer_map.items() if k in active}
        return self.fn(s, t, lm)


class TermConfig(Protocol):
    """A recipe term's config (kdpipe.losses.terms): it builds its own Term."""

    def build(self, ctx: LossContext) -> Term: ...


class ScheduleConfig(Protocol):
    """distill.schedule of a recipe (kdpipe.config), as far as build_objective reads it."""

    @property
    def kind(self) -> str: ...
    @property
    def cap_steps(self) -> int: ...
    @property
    def threshold(self) -> float: ...
    @property
    def classifier_last(self) -> bool: ...
    @property
    def keep_soft(self) -> bool: ...


# ----------------------------------------------------------------------------- layer maps
def resolve_map(spec: str | Sequence[int], ctx: LossContext, field_name: str) -> dict[int, int]:
    """'kept' | 'uniform' | [g(1), ..., g(M)] -> {student layer m: teacher layer g(m)}, m = 1..M."""
    m_count, n_count = ctx.n_student, ctx.n_teacher
    if isinstance(spec, str):
        if spec == "kept":
            return {m: ctx.layer_map[m] for m in range(1, m_count + 1)}
        if spec == "uniform":
            return {m: g + 1 for m, g in enumerate(uniform_layers(m_count, n_count), start=1)}
        raise ConfigError(f"{field_name}: unknown layer map {spec!r}", "use 'kept', 'uniform' or a list of layers")
    values = list(spec)
    if len(values) != m_count or any(not 1 <= g <= n_count for g in values):
        raise ConfigError(
            f"{field_name}: layer map {values} does not fit a {m_count}-layer student and a {n_count}-layer teacher",
            f"give {m_count} teacher layer numbers between 1 and {n_count}, or 'kept' / 'uniform'",
        )
    return {m + 1: g for m, g in enumerate(values)}


# ----------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class StepLoss:
    """One step of the objective.

    total: () the weighted sum of the terms that ran (carries the gradient); values: each term's
    unweighted value (name -> float); layer_loss: the current layer's [CLS] cosine loss under PID/SID
    (no gradient), to hand to `Objective.after_step`; None outside a layer phase or when no term can
    measure that layer."""

    total: Tensor
    values: dict[str, float]
    layer_loss: float | None


class Objective(nn.Module):
    """The recipe's weighted terms. `forward(s, t)` returns a StepLoss under the schedule;
    `after_step(step, layer_loss)` moves the schedule on. The Objective itself keeps no per-step state."""

    def __init__(self, terms: list[Term], schedule: Schedule) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.schedule = schedule

    def _all(self) -> list[Term]:
        return list(self.terms)  # type: ignore[arg-type]

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self._all())

    @property
    def needs_hidden(self) -> bool:
        return any(t.hidden for t in self._all())

    @property
    def needs_attentions(self) -> bool:
        return any(t.attentions for t in self._all())

    def _run(self, term: Term, s: KDOutputs, t: KDOutputs | None, active: set[int] | None) -> Tensor | None:
        """() the term's unweighted value under the schedule, or None when it does not run this step."""
        if term.on_logits:
            return term(s, t) if self.schedule.logit_term_on(soft=term.soft) else None
        layers_on = bool(term.layers) and (active is None or bool(term.layers & active))
        # a layer term's part on the logits (TinyBERT's L_pred, a soft-label loss) follows the
        # schedule like a soft logit term
        logits_on = term.logit_fn is not None and self.schedule.logit_term_on(soft=True)
        if not layers_on and not logits_on:
            return None
        value = term(s, t, active) if layers_on else torch.zeros((), device=s.logits.device)
        if logits_on:
            assert term.logit_fn is not None
            value = value + term.logit_fn(s, t)
        return value

    def forward(self, s: KDOutputs, t: KDOutputs | None) -> StepLoss:
        active = self.schedule.active_layers()
        total = torch.zeros((), device=s.logits.device)
        values: dict[str, float] = {}
        for term in self._all():
            value = self._run(term, s, t, active)
            if value is None:
                continue
            # the recipe's mixture: a weighted sum of its terms
            total = total + term.weight * value
            values[term.name] = float(value.detach())
        return StepLoss(total, values, self.layer_progress(s, t))

    def progress_term(self, layer: int) -> Term | None:
        """The term whose [CLS] cosine loss measures student layer `layer`: the first layer term that
        maps it and can compare the widths."""
        for term in self._all():
            if not term.on_logits and layer in term.layer_map and term.progress is not None:
                return term
        return None

    def layer_progress(self, s: KDOutputs, t: KDOutputs | None) -> float | None:
        """docs/methods.md §2.4's move-on criterion: the current layer's [CLS] cosine loss (no gradient)."""
        layer = self.schedule.current_layer
        if layer is None or t is None or s.hidden_states is None or t.hidden_states is None:
            return None
        term = self.progress_term(layer)
        if term is None or term.progress is None:
            return None
        with torch.no_grad():
            return float(term.progress(s, t, layer, term.layer_map[layer]))

    def after_step(self, step: int, layer_loss: float | None) -> None:
        """After optimizer step `step` (1-based): `layer_loss` is that step's StepLoss.layer_loss."""
        self.schedule.advance(step, layer_loss)


def _check_measurable(order: list[int], layer_terms: list[Term], ctx: LossContext) -> None:
    """A threshold needs, for every scheduled layer, a term that can measure its [CLS] cosine loss."""
    blind = [m for m in order if not any(t.progress is not None and m in t.layer_map for t in layer_terms)]
    if blind:
        raise ConfigError(
            f"distill.schedule.threshold compares a layer's [CLS] cosine loss, which no term can "
            f"measure for student layers {blind} (student width {ctx.d_student}, teacher {ctx.d_teacher}, "
            "no projection)",
            "set distill.schedule.threshold: 0 (cap_steps only), or add a term with a projection "
            "(tinybert, hint, vid, crd)",
        )


def build_objective(
    configs: Sequence[TermConfig], ctx: LossContext, schedule_cfg: ScheduleConfig | None = None
) -> Objective:
    """Build every recipe term for this pair of models and the schedule over their layers.

    Raises ConfigError when a term does not fit the models (layer maps, widths) or the schedule has
    no layer to schedule / a threshold no term can measure."""
    terms = [c.build(ctx) for c in configs]
    if schedule_cfg is None or schedule_cfg.kind == "all":
        return Objective(terms, Schedule())
    layer_terms = [t for t in terms if not t.on_logits]
    order = sorted(set().union(*(t.layers for t in layer_terms)))
    if not order:
        raise ConfigError(
            f"distill.schedule.kind={schedule_cfg.kind} needs at least one layer term",
            "add hidden_cosine, tinybert, attention_kl, pkd, hint, vid, crd or pkt to distill.losses",
        )
    if schedule_cfg.threshold > 0:
        _check_measurable(order, layer_terms, ctx)
    schedule = Schedule(
        kind=schedule_cfg.kind,
        order=order,
        cap_steps=schedule_cfg.cap_steps,
        threshold=schedule_cfg.threshold,
        classifier_last=schedule_cfg.classifier_last,
        keep_soft=schedule_cfg.keep_soft,
    )
    return Objective(terms, schedule)
