"""Distillation objectives: the recipe's weighted terms over normalised KDOutputs, plus layer schedules.

`LOSSES` maps a recipe term's `name` to a builder `(config, LossContext) -> Term`. A Term is an
nn.Module so that projections and regressors a loss owns (TinyBERT's W, FitNets' regressor, VID's
heads, CRD's projections) train with the student; they are never part of the exported model.
`layers` of a Term are the student hidden-state indices it reads (0 = embeddings); the PID/SID
schedules switch those on one at a time. A layer term's `logit_fn` (TinyBERT's prediction term) acts on
the logits and follows the schedule like a logit term; its `progress` is the [CLS] cosine loss of one
layer, which the PID/SID threshold compares.

Attention maps: every attention term reads the maps `output_attentions` returns, i.e. the softmax
PROBABILITIES (rows sum to 1; padded keys ~0), never the raw scores. The training loop turns the
student's attention-probability dropout off while such a term is in the recipe (kdpipe.models.
attention_dropout_off), so the student's maps are not dropout-corrupted in train mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.errors import ConfigError
from kdpipe.lossconfig import LOGIT_TERMS, SOFT_TERMS
from kdpipe.losses import features as feat
from kdpipe.losses import logits as lg
from kdpipe.losses import relational as rel

if TYPE_CHECKING:
    from kdpipe.models import KDOutputs

TermFn = Callable[["KDOutputs", "KDOutputs | None", dict[int, int]], Tensor]
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


class Term(nn.Module):
    """One weighted recipe term: `fn(student, teacher, active_map)`; owns its learned modules.

    logit_fn: the part of a layer term that acts on the logits (TinyBERT's L_pred); the Objective
    runs it when the schedule lets logit terms run. progress: the [CLS] cosine loss of one mapped
    layer, for the PID/SID threshold (None when this term cannot compare the two widths)."""

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
    ) -> None:
        super().__init__()
        self.name, self.weight, self.fn = name, weight, fn
        self.layer_map = layer_map or {}
        self.needs_teacher, self.hidden, self.attentions = needs_teacher, hidden, attentions
        self.learned = nn.ModuleDict(modules or {})
        self.logit_fn, self.progress = logit_fn, progress

    @property
    def layers(self) -> set[int]:
        return set(self.layer_map)

    def forward(self, s: KDOutputs, t: KDOutputs | None, active: set[int] | None = None) -> Tensor:
        lm = self.layer_map if active is None else {k: v for k, v in self.layer_map.items() if k in active}
        return self.fn(s, t, lm)


# ----------------------------------------------------------------------------- layer maps
def resolve_map(spec: Any, ctx: LossContext, field_name: str) -> dict[int, int]:
    """'kept' | 'uniform' | [g(1), ..., g(M)] -> {student layer m: teacher layer g(m)}, m = 1..M."""
    m_count, n_count = ctx.n_student, ctx.n_teacher
    if spec == "kept":
        return {m: ctx.layer_map[m] for m in range(1, m_count + 1)}
    if spec == "uniform":
        from kdpipe.student import uniform_layers

        return {m: g + 1 for m, g in enumerate(uniform_layers(m_count, n_count), start=1)}
    values = list(spec)
    if len(values) != m_count or any(not 1 <= g <= n_count for g in values):
        raise ConfigError(
            f"{field_name}: layer map {values} does not fit a {m_count}-layer student and a {n_count}-layer teacher",
            f"give {m_count} teacher layer numbers between 1 and {n_count}, or 'kept' / 'uniform'",
        )
    return {m + 1: g for m, g in enumerate(values)}


def _t(t: KDOutputs | None) -> KDOutputs:
    if t is None:
        raise ValueError("this loss term needs the teacher's outputs")
    return t


def _labels(s: KDOutputs, t: KDOutputs | None) -> Tensor | None:
    return s.labels if s.labels is not None or t is None else t.logits.argmax(-1)


def _feature(h: Tensor, mask: Tensor | None, kind: str) -> Tensor:
    from kdpipe.analysis import mean_pool

    return h[:, 0] if kind == "cls" else mean_pool(h, mask)


def _proj(d_in: int, d_out: int, always: bool = False) -> nn.Module:
    return feat.Projection(d_in, d_out) if always or d_in != d_out else nn.Identity()


def _cls_loss(
    s: KDOutputs, t: KDOutputs, m: int, n: int, proj_s: nn.Module | None = None, proj_t: nn.Module | None = None
) -> Tensor:
    """1 - cos(proj_s(h_s[m][:, 0]), proj_t(h_t[n][:, 0])), mean over the batch: a layer's [CLS] cosine
    loss, through the term's own projections when the widths differ."""
    assert s.hidden_states is not None and t.hidden_states is not None
    a, b = s.hidden_states[m][:, 0].float(), t.hidden_states[n][:, 0].detach().float()
    if proj_s is not None:
        a = proj_s(a)
    if proj_t is not None:
        b = proj_t(b)
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def _equal_widths(ctx: LossContext, what: str) -> None:
    """Terms that compare raw hidden vectors need one width (a ValueError mid-training otherwise)."""
    if ctx.d_student and ctx.d_teacher and ctx.d_student != ctx.d_teacher:
        raise ConfigError(
            f"{what} compares hidden vectors of equal width, but the student's is {ctx.d_student} and the "
            f"teacher's {ctx.d_teacher}",
            "use tinybert or hint, which learn a projection",
        )


def _plain_progress(ctx: LossContext) -> ProgressFn | None:
    """The [CLS] cosine without a projection: only when the two widths are equal."""
    if ctx.d_student != ctx.d_teacher:
        return None
    return lambda s, t, m, n: _cls_loss(s, t, m, n)


# ----------------------------------------------------------------------------- builders
def _hinton(c: Any, ctx: LossContext) -> Term:
    def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
        assert t is not None
        if t.ensemble_logits:
            p = lg.ensemble_probs([t.logits, *t.ensemble_logits], c.temperature, c.ensemble)
            return lg.hinton_from_probs(s.logits, p, s.labels, c.temperature, c.alpha)
        return lg.hinton(s.logits, t.logits, s.labels, c.temperature, c.alpha)

    return Term("hinton", c.weight, fn)


def _tinybert(c: Any, ctx: LossContext) -> Term:
    """METHODS.md 2.3: sum over the mapped layers m of lambda_m L_layer(m): `embedding` x L_embd (m = 0)
    + sum over 0 < m <= M of (`hidden` x L_hidn(m) + `attention` x L_attn(m)) + `prediction` x L_pred.

    L_hidn / L_attn are per layer (each a mean over real tokens / entries and heads) and SUMMED over
    layers, as the spec's total; L_attn compares attention PROBABILITIES (softmax outputs, no dropout).
    L_pred = soft CE(SM(v/t), SM(z/t)) with the teacher's logits v detached; it is the term's `logit_fn`,
    so under PID/SID it runs when the logit terms do (after the layer phase), not during it."""
    gmap = resolve_map(c.map, ctx, "tinybert.map")
    always = c.project == "always"
    mods = {"w_e": _proj(ctx.d_student, ctx.d_teacher, always), "w_h": _proj(ctx.d_student, ctx.d_teacher, always)}
    term: Term

    def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
        t = _t(t)
        total = torch.zeros((), device=s.logits.device)
        for m, n in sorted(lm.items()):
            if m == 0:
                if c.embedding:
                    total = total + c.embedding * feat.hidden_mse(
                        s.hidden_states, t.hidden_states, {0: 0}, s.attention_mask, term.learned["w_e"]
                    )
                continue
            if c.hidden:
                total = total + c.hidden * feat.hidden_mse(
                    s.hidden_states, t.hidden_states, {m: n}, s.attention_mask, term.learned["w_h"]
                )
            if c.attention:
                total = total + c.attention * feat.attention_mse(
                    s.attentions, t.attentions, {m - 1: n - 1}, s.attention_mask
                )
        return total

    def prediction(s: KDOutputs, t: KDOutputs | None) -> Tensor:
        p = torch.softmax(_t(t).logits.detach().float() / c.temperature, -1)
        soft_ce = -(p * torch.log_softmax(s.logits.float() / c.temperature, -1)).sum(-1).mean()
        return c.prediction * soft_ce

    def progress(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
        return _cls_loss(s, t, m, n, term.learned["w_e" if m == 0 else "w_h"])

    lmap = {**({0: 0} if c.embedding else {}), **(gmap if c.hidden or c.attention else {})}
    term = Term(
        "tinybert",
        c.weight,
        fn,
        lmap,
        hidden=True,
        attentions=bool(c.attention),
        modules=mods,
        logit_fn=prediction if c.prediction else None,
        progress=progress,
    )
    return term


def _attention_kl(c: Any, ctx: LossContext) -> Term:
    """METHODS.md 2.4: on the active mapped layers, KL(A_t || A_s) of the attention PROBABILITY rows
    (softmax outputs, no dropout; mean over real rows, heads and layers) + `cls_weight` x the [CLS]
    cosine loss on the same layers (mean over layers). Its progress (the PID/SID threshold) is that
    [CLS] cosine loss on the current layer alone."""
    gmap = resolve_map(c.map, ctx, "attention_kl.map")
    if c.cls_weight:
        _equal_widths(ctx, "attention_kl (its [CLS] cosine, cls_weight > 0)")

    def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
        t = _t(t)
        loss = feat.attention_kl(s.attentions, t.attentions, {m - 1: n - 1 for m, n in lm.items()}, s.attention_mask)
        if c.cls_weight:
            loss = loss + c.cls_weight * feat.cls_cosine(s.hidden_states, t.hidden_states, list(lm.items()))
        return loss

    def progress(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
        return feat.cls_cosine(s.hidden_states, t.hidden_states, [(m, n)])

    return Term(
        "attention_kl",
        c.weight,
        fn,
        gmap,
        hidden=True,
        attentions=True,
        progress=progress if ctx.d_student == ctx.d_teacher else None,
    )


def _pkd(c: Any, ctx: LossContext) -> Term:
    try:
        pairs = dict(feat.pkd_pairs(ctx.n_student, ctx.n_teacher, c.variant))
    except ValueError as e:
        raise ConfigError(f"pkd: {e}", "PKD needs a student with >= 2 layers and no more than the teacher's") from None
    _equal_widths(ctx, "pkd")
    return Term(
        "pkd",
        c.weight,
        lambda s, t, lm: feat.cls_mse_normalised(s.hidden_states, _t(t).hidden_states, list(lm.items())),
        pairs,
        hidden=True,
        progress=_plain_progress(ctx),
    )


def _hint(c: Any, ctx: LossContext) -> Term:
    s_layer = c.student_layer if c.student_layer is not None else max(1, ctx.n_student // 2)
    if s_layer > ctx.n_student:
        raise ConfigError(
            f"hint.student_layer {s_layer} exceeds the student's {ctx.n_student} layers", f"use 0..{ctx.n_student}"
        )
    t_layer = c.teacher_layer if c.teacher_layer is not None else ctx.layer_map[s_layer]
    if t_layer > ctx.n_teacher:
        raise ConfigError(
            f"hint.teacher_layer {t_layer} exceeds the teacher's {ctx.n_teacher} layers", f"use 0..{ctx.n_teacher}"
        )
    term: Term

    def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
        assert t is not None
        if not lm:
            return torch.zeros((), device=s.logits.device)
        return feat.hint(
            s.hidden_states, t.hidden_states, s_layer, t_layer, term.learned["regressor"], s.attention_mask
        )

    term = Term(
        "hint",
        c.weight,
        fn,
        {s_layer: t_layer},
        hidden=True,
        modules={"regressor": feat.Projection(ctx.d_student, ctx.d_teacher)},
        progress=lambda s, t, m, n: _cls_loss(s, t, m, n, term.learned["regressor"]),
    )
    return term


def _last_features(s: KDOutputs, t: KDOutputs, lm: dict[int, int], kind: str) -> tuple[Tensor, Tensor]:
    ((m, n),) = lm.items()
    assert s.hidden_states is not None and t.hidden_states is not None
    return (
        _feature(s.hidden_states[m], s.attention_mask, kind),
        _feature(t.hidden_states[n], t.attention_mask, kind),  # crd_in_batch / pkt detach the teacher's
    )


def _crd(c: Any, ctx: LossContext) -> Term:
    term: Term

    def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
        assert t is not None
        if not lm:
            return torch.zeros((), device=s.logits.device)
        fs, ft = _last_features(s, t, lm, c.feature)
        return rel.crd_in_batch(fs, ft, _labels(s, t), term.learned["proj_s"], term.learned["proj_t"], c.temperature)

    term = Term(
        "crd",
        c.weight,
        fn,
        {ctx.n_student: ctx.n_teacher},
        hidden=True,
        modules={"proj_s": feat.Projection(ctx.d_student, c.dim), "proj_t": feat.Projection(ctx.d_teacher, c.dim)},
        progress=lambda s, t, m, n: _cls_loss(s, t, m, n, term.learned["proj_s"], term.learned["proj_t"]),
    )
    return term


def _pkt(c: Any, ctx: LossContext) -> Term:
    def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
        assert t is not None
        if not lm:
            return torch.zeros((), device=s.logits.device)
        fs, ft = _last_features(s, t, lm, c.feature)
        return rel.pkt(fs, ft, symmetric=c.symmetric)

    return Term("pkt", c.weight, fn, {ctx.n_student: ctx.n_teacher}, hidden=True, progress=_plain_progress(ctx))


def _vid_mu(head: nn.Module) -> nn.Module:
    assert isinstance(head, rel.VIDHead)
    return head.mu


def _vid(c: Any, ctx: LossContext) -> Term:
    """METHODS.md 3.2 on every mapped layer, one VIDHead each; the layers' -log q(t | s) are AVERAGED
    (so the term's scale does not grow with depth; the paper's sum_k lambda_k equals this with
    lambda_k = weight / K)."""
    gmap = resolve_map(c.map, ctx, "vid.map")
    heads: dict[str, nn.Module] = {str(m): rel.VIDHead(ctx.d_student, ctx.d_teacher, init_var=c.init_var) for m in gmap}
    term: Term

    def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
        assert t is not None and s.hidden_states is not None and t.hidden_states is not None
        total = torch.zeros((), device=s.logits.device)
        for m, n in lm.items():
            # VIDHead detaches the teacher's states
            total = total + term.learned[str(m)](s.hidden_states[m], t.hidden_states[n], s.attention_mask)
        return total / max(len(lm), 1)

    term = Term(
        "vid",
        c.weight,
        fn,
        gmap,
        hidden=True,
        modules=heads,
        progress=lambda s, t, m, n: _cls_loss(s, t, m, n, _vid_mu(term.learned[str(m)])),
    )
    return term


def _hidden_cosine(c: Any, ctx: LossContext) -> Term:
    gmap = {0: 0, **resolve_map(c.map, ctx, "hidden_cosine.map")}
    return Term(
        "hidden_cosine",
        c.weight,
        lambda s, t, lm: feat.hidden_cosine(s.hidden_states, _t(t).hidden_states, s.attention_mask, lm),
        gmap,
        hidden=True,
        progress=_plain_progress(ctx),
    )


def _logit_term(name: str, f: Callable[[Any, KDOutputs, KDOutputs], Tensor]) -> Callable[[Any, LossContext], Term]:
    def build(c: Any, _: LossContext) -> Term:
        def fn(s: KDOutputs, t: KDOutputs | None, __: dict[int, int]) -> Tensor:
            assert t is not None
            return f(c, s, t)

        return Term(name, c.weight, fn)

    return build


def _ce(c: Any, _: LossContext) -> Term:
    def fn(s: KDOutputs, t: KDOutputs | None, __: dict[int, int]) -> Tensor:
        return lg.cross_entropy(s.logits, _labels(s, t))

    return Term("ce", c.weight, fn, needs_teacher=False)


LOSSES: dict[str, Callable[[Any, LossContext], Term]] = {
    "hinton": _hinton,
    "ce": _ce,
    "logit_mse": _logit_term(
        "logit_mse",
        lambda c, s, t: (
            lg.logit_mse_with_labels(s.logits, t.logits, _labels(s, t), c.alpha)
            if c.alpha
            else lg.logit_mse(s.logits, t.logits)
        ),
    ),
    "reverse_kl": _logit_term(
        "reverse_kl", lambda c, s, t: lg.reverse_kl(s.logits, t.logits, c.temperature, s.attention_mask)
    ),
    "jsd": _logit_term(
        "jsd", lambda c, s, t: lg.generalized_jsd(s.logits, t.logits, c.beta, c.temperature, s.attention_mask)
    ),
    "ofa": _logit_term("ofa", lambda c, s, t: lg.ofa(s.logits, t.logits, _labels(s, t), c.gamma, c.temperature)),
    "pkd": _pkd,
    "hidden_cosine": _hidden_cosine,
    "tinybert": _tinybert,
    "attention_kl": _attention_kl,
    "hint": _hint,
    "crd": _crd,
    "pkt": _pkt,
    "vid": _vid,
}


# ----------------------------------------------------------------------------- objective + schedule
@dataclass
class Schedule:
    """PID / SID (METHODS.md 2.4): one matched student layer at a time, bottom-up; move on after
    `cap_steps` or once the CURRENT layer's [CLS] cosine loss (not the sum of the active terms) is
    below `threshold`, whichever first. After the last layer, the logit terms (and the logit parts of
    layer terms, e.g. TinyBERT's prediction term) take over (classifier last); SID keeps every
    layer's loss on."""

    kind: str = "all"
    order: list[int] = field(default_factory=list)  # student layers, bottom-up
    cap_steps: int = 100
    threshold: float = 0.0
    classifier_last: bool = True
    keep_soft: bool = False
    stage: int = 0
    steps_in_stage: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layer_phase(self) -> bool:
        return self.kind != "all" and self.stage < len(self.order)

    def active_layers(self) -> set[int] | None:
        if self.kind == "all":
            return None
        if self.stage >= len(self.order):
            return set(self.order) if self.kind == "sid" else set()
        return {self.order[self.stage]} if self.kind == "pid" else set(self.order[: self.stage + 1])

    @property
    def current_layer(self) -> int | None:
        return self.order[self.stage] if self.layer_phase else None

    def logit_term_on(self, name: str, soft: bool | None = None) -> bool:
        """Whether a term on the logits runs now; `soft` (default: name in SOFT_TERMS) says whether
        it is a soft-label loss, which keep_soft keeps on during the layer phase."""
        if not self.layer_phase or not self.classifier_last:
            return True
        return self.keep_soft and (name in SOFT_TERMS if soft is None else soft)

    def advance(self, step: int, layer_loss: float | None) -> None:
        """layer_loss: the current layer's [CLS] cosine loss on this step's batch (None: unknown)."""
        if not self.layer_phase:
            return
        self.steps_in_stage += 1
        below = layer_loss is not None and self.threshold > 0 and layer_loss < self.threshold
        if self.steps_in_stage >= self.cap_steps or below:
            self.events.append(
                {
                    "step": step,
                    "layer": self.order[self.stage],
                    "reason": "threshold" if below else "cap",
                    "loss": layer_loss,
                }
            )
            self.stage += 1
            self.steps_in_stage = 0


class Objective(nn.Module):
    """The recipe's weighted terms. `forward` returns (total, {name: value}) under the schedule."""

    def __init__(self, terms: list[Term], schedule: Schedule) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.schedule = schedule

    def _all(self) -> list[Term]:
        return list(self.terms)  # type: ignore[arg-type]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._all()]

    @property
    def weights(self) -> list[float]:
        return [t.weight for t in self._all()]

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self._all())

    @property
    def needs_hidden(self) -> bool:
        return any(t.hidden for t in self._all())

    @property
    def needs_attentions(self) -> bool:
        return any(t.attentions for t in self._all())

    def forward(self, s: KDOutputs, t: KDOutputs | None) -> tuple[Tensor, dict[str, float]]:
        active = self.schedule.active_layers()
        total = torch.zeros((), device=s.logits.device)
        values: dict[str, float] = {}
        for term in self._all():
            if term.name in LOGIT_TERMS:
                if not self.schedule.logit_term_on(term.name):
                    continue
                value = term(s, t)
            else:
                layers_on = bool(term.layers) and (active is None or bool(term.layers & active))
                # a layer term's part on the logits (TinyBERT's L_pred, a soft-label loss) follows the
                # schedule like a logit term
                logits_on = term.logit_fn is not None and self.schedule.logit_term_on(term.name, soft=True)
                if not layers_on and not logits_on:
                    continue
                value = term(s, t, active) if layers_on else torch.zeros((), device=s.logits.device)
                if logits_on:
                    assert term.logit_fn is not None
                    value = value + term.logit_fn(s, t)
            # the recipe's mixture: a weighted sum of its terms
            total = total + term.weight * value
            values[term.name] = float(value.detach())
        self._last_layer_loss = self.layer_progress(s, t)
        return total, values

    def progress_term(self, layer: int) -> Term | None:
        """The term whose [CLS] cosine loss measures student layer `layer`: the first layer term that
        maps it and can compare the widths."""
        for term in self._all():
            if term.name not in LOGIT_TERMS and layer in term.layer_map and term.progress is not None:
                return term
        return None

    def layer_progress(self, s: KDOutputs, t: KDOutputs | None) -> float | None:
        """METHODS.md 2.4's move-on criterion: the current layer's [CLS] cosine loss (no gradient)."""
        layer = self.schedule.current_layer
        if layer is None or t is None or s.hidden_states is None or t.hidden_states is None:
            return None
        term = self.progress_term(layer)
        if term is None or term.progress is None:
            return None
        with torch.no_grad():
            return float(term.progress(s, t, layer, term.layer_map[layer]))

    def after_step(self, step: int) -> None:
        self.schedule.advance(step, getattr(self, "_last_layer_loss", None))


def build_objective(configs: list[Any], ctx: LossContext, schedule: Any | None = None) -> Objective:
    terms = [LOSSES[c.name](c, ctx) for c in configs]
    sched = Schedule()
    if schedule is not None and schedule.kind != "all":
        order = sorted(set().union(*(t.layers for t in terms if t.name not in LOGIT_TERMS)))
        if not order:
            raise ConfigError(
                f"distill.schedule.kind={schedule.kind} needs at least one layer term",
                "add hidden_cosine, tinybert, attention_kl, pkd, hint, vid, crd or pkt to distill.losses",
            )
        if schedule.threshold > 0:
            blind = [
                m
                for m in order
                if not any(t.progress is not None and m in t.layer_map for t in terms if t.name not in LOGIT_TERMS)
            ]
            if blind:
                raise ConfigError(
                    f"distill.schedule.threshold compares a layer's [CLS] cosine loss, which no term can "
                    f"measure for student layers {blind} (student width {ctx.d_student}, teacher {ctx.d_teacher}, "
                    "no projection)",
                    "set distill.schedule.threshold: 0 (cap_steps only), or add a term with a projection "
                    "(tinybert, hint, vid, crd)",
                )
        sched = Schedule(
            kind=schedule.kind,
            order=order,
            cap_steps=schedule.cap_steps,
            threshold=schedule.threshold,
            classifier_last=schedule.classifier_last,
            keep_soft=schedule.keep_soft,
        )
    return Objective(terms, sched)
