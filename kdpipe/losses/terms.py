"""The recipe catalogue: one pydantic model per loss term, a discriminated union on `name`.

Torch-free at import time (loading and validating a recipe must not import torch): each model's
`build(ctx)` imports the torch-side formulas (kdpipe.losses.logits / features / relational) only when
it is called, and returns the kdpipe.losses.objective.Term that computes it. The class's ClassVars
say what kind of term it is: `on_logits` (acts on the logits only; the PID/SID schedules run it in the
classifier phase), `soft` (a soft-label loss, which keep_soft keeps on during the layer phase) and
`needs_teacher`; the built Term carries them, so nothing downstream lists loss names.

Adding a loss: one class here with its `build`, added to `LossConfig` below (a formula function in a
family module only when the formula is new), plus its test.

Every model forbids unknown keys; a misspelt `name` fails validation listing the valid ones. Layer
indices in recipes are 1-based layer numbers (0 = the embeddings), as in docs/methods.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from kdpipe.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from kdpipe.losses.objective import LogitFn, LossContext, ProgressFn, Term, TermFn
    from kdpipe.models.loading import KDOutputs

TEMP_MIN, TEMP_MAX = 1e-3, 1e3  # a temperature of 1e-300 turns the softmax into NaN
LayerMap = Literal["kept", "uniform"] | list[int]
MAP_HELP = (
    "Student layer m -> teacher layer g(m): 'kept' (the teacher layer each student layer was copied from), "
    "'uniform' (g(m) = m N / M, TinyBERT's default) or an explicit list [g(1), ..., g(M)] of 1-based teacher layers."
)


class _Loss(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    on_logits: ClassVar[bool] = False  # acts on the logits only (no layers)
    soft: ClassVar[bool] = False  # a soft-label loss on the logits
    needs_teacher: ClassVar[bool] = True
    weight: float = Field(1.0, ge=0, le=1e6, description="Weight of this term in the total loss.")
    name: str

    def build(self, ctx: LossContext) -> Term:
        """The torch Term computing this loss for a pair of models described by `ctx`."""
        raise NotImplementedError

    def _term(
        self,
        fn: TermFn,
        layer_map: dict[int, int] | None = None,
        *,
        hidden: bool = False,
        attentions: bool = False,
        modules: dict[str, nn.Module] | None = None,
        logit_fn: LogitFn | None = None,
        progress: ProgressFn | None = None,
    ) -> Term:
        """A Term named and weighted as this config, carrying the class's flags."""
        from kdpipe.losses.objective import Term

        return Term(
            self.name,
            self.weight,
            fn,
            layer_map,
            needs_teacher=self.needs_teacher,
            hidden=hidden,
            attentions=attentions,
            modules=modules,
            logit_fn=logit_fn,
            progress=progress,
            on_logits=self.on_logits,
            soft=self.soft,
        )


def _equal_widths(ctx: LossContext, what: str) -> None:
    """Terms that compare raw hidden vectors need one width (a ValueError mid-training otherwise)."""
    if ctx.d_student and ctx.d_teacher and ctx.d_student != ctx.d_teacher:
        raise ConfigError(
            f"{what} compares hidden vectors of equal width, but the student's is {ctx.d_student} and the "
            f"teacher's {ctx.d_teacher}",
            "use tinybert or hint, which learn a projection",
        )


# ----------------------------------------------------------------------------- 1. logits
class HintonLoss(_Loss):
    """docs/methods.md §1.1: (1 - alpha) CE(y, SM(z)) + alpha T^2 KL(SM(v/T) || SM(z/T))."""

    on_logits: ClassVar[bool] = True
    soft: ClassVar[bool] = True
    name: Literal["hinton"] = "hinton"
    temperature: float = Field(4.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature T of the soft term.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft term; 1 - alpha on hard CE.")
    ensemble: Literal["arithmetic", "geometric"] = Field(
        "arithmetic",
        description="How the soft targets of several teachers (distill.extra_teachers) are averaged.",
    )

    def build(self, ctx: LossContext) -> Term:
        """On (B, C) logits; with an ensemble (t.ensemble_logits) the soft targets are the members'
        averaged probabilities. The training loop always sets s.labels; called with None, only the soft
        term remains."""
        from kdpipe.losses import inputs
        from kdpipe.losses import logits as lg

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            if t.ensemble_logits:
                p = lg.ensemble_probs([t.logits, *t.ensemble_logits], self.temperature, self.ensemble)
                return lg.hinton_from_probs(s.logits, p, s.labels, self.temperature, self.alpha)
            return lg.hinton(s.logits, t.logits, s.labels, self.temperature, self.alpha)

        return self._term(fn)


class CELoss(_Loss):
    """Hard-label cross-entropy at T = 1 (the no-KD baseline); teacher argmax on unlabeled data."""

    on_logits: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    name: Literal["ce"] = "ce"

    def build(self, ctx: LossContext) -> Term:
        """CE of the student's (B, C) logits against s.labels (B,), which must be set."""
        from kdpipe.losses import inputs
        from kdpipe.losses import logits as lg

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            return lg.cross_entropy(s.logits, inputs.labels(s, self.name))

        return self._term(fn)


class LogitMSELoss(_Loss):
    """docs/methods.md §1.2 (Tang et al.): alpha CE(t, SM(z)) + (1 - alpha) ||v - z||^2 / C, t = y or argmax v."""

    on_logits: ClassVar[bool] = True
    soft: ClassVar[bool] = True
    name: Literal["logit_mse"] = "logit_mse"
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of the hard CE term (0: pure logit regression).")

    def build(self, ctx: LossContext) -> Term:
        """On (B, C) logits; alpha > 0 needs s.labels (the loop's gold labels or the teacher's argmax)."""
        from kdpipe.losses import inputs
        from kdpipe.losses import logits as lg

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            if self.alpha:
                return lg.logit_mse_with_labels(s.logits, t.logits, inputs.labels(s, self.name), self.alpha)
            return lg.logit_mse(s.logits, t.logits)

        return self._term(fn)


class ReverseKLLoss(_Loss):
    """docs/methods.md §1.3 (MiniLLM's objective, token-level on sequence outputs): T^2 KL(SM(z/T) || SM(v/T))."""

    on_logits: ClassVar[bool] = True
    soft: ClassVar[bool] = True
    name: Literal["reverse_kl"] = "reverse_kl"
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature.")

    def build(self, ctx: LossContext) -> Term:
        """On (B, C) logits, or (B, T, V) averaged over the real tokens of s.attention_mask."""
        from kdpipe.losses import inputs
        from kdpipe.losses import logits as lg

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            return lg.reverse_kl(s.logits, t.logits, self.temperature, s.attention_mask)

        return self._term(fn)


class JSDLoss(_Loss):
    """Generalised Jensen-Shannon: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""

    on_logits: ClassVar[bool] = True
    soft: ClassVar[bool] = True
    name: Literal["jsd"] = "jsd"
    beta: float = Field(0.5, gt=0, lt=1, description="Mixing weight between forward-like and reverse-like.")
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature.")

    def build(self, ctx: LossContext) -> Term:
        """On (B, C) logits, or (B, T, V) averaged over the real tokens of s.attention_mask."""
        from kdpipe.losses import inputs
        from kdpipe.losses import logits as lg

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            return lg.generalized_jsd(s.logits, t.logits, self.beta, self.temperature, s.attention_mask)

        return self._term(fn)


class OFALoss(_Loss):
    """docs/methods.md §1.4: -(1 + p_t[c])^gamma log q[c] - sum_{k != c} p_t[k] log q[k]."""

    on_logits: ClassVar[bool] = True
    soft: ClassVar[bool] = True
    name: Literal["ofa"] = "ofa"
    gamma: float = Field(
        1.5, ge=1, le=100, description="Modulates the target-class term; 1 = KD with labels folded in."
    )
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature of p_t and q.")

    def build(self, ctx: LossContext) -> Term:
        """On (B, C) logits; the target class c is s.labels (B,), which must be set."""
        from kdpipe.losses import inputs
        from kdpipe.losses import logits as lg

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            return lg.ofa(s.logits, t.logits, inputs.labels(s, self.name), self.gamma, self.temperature)

        return self._term(fn)


# ----------------------------------------------------------------------------- 2. features
class PKDLoss(_Loss):
    """docs/methods.md §2.1 (Patient KD): sum over layers of the normalised [CLS] MSE (add a hinton term for L_DS)."""

    name: Literal["pkd"] = "pkd"
    variant: Literal["skip", "last"] = Field("skip", description="PKD-Skip (every k-th) or PKD-Last teacher layers.")

    def build(self, ctx: LossContext) -> Term:
        """On the [CLS] vectors (B, H) of student layers 1..M-1 and their `variant` teacher layers."""
        from kdpipe.losses import features as feat
        from kdpipe.losses import inputs, progress

        try:
            pairs = dict(feat.pkd_pairs(ctx.n_student, ctx.n_teacher, self.variant))
        except ValueError as e:
            raise ConfigError(
                f"pkd: {e}", "PKD needs a student with >= 2 layers and no more than the teacher's"
            ) from None
        _equal_widths(ctx, "pkd")

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            ht = inputs.teacher(t, self.name).hidden_states
            return feat.cls_mse_normalised(s.hidden_states, ht, list(lm.items()))

        return self._term(fn, pairs, hidden=True, progress=progress.plain_progress(ctx))


class HiddenCosineLoss(_Loss):
    """docs/methods.md §2.2 (DistilBERT): 1 - cos(h_s, h_t) on mapped hidden states, real tokens only."""

    name: Literal["hidden_cosine"] = "hidden_cosine"
    map: LayerMap = Field("kept", description=MAP_HELP)

    def build(self, ctx: LossContext) -> Term:
        """On the (B, T, H) hidden states of the embeddings (index 0) and every mapped layer."""
        from kdpipe.losses import features as feat
        from kdpipe.losses import inputs, progress
        from kdpipe.losses.objective import resolve_map

        gmap = {0: 0, **resolve_map(self.map, ctx, "hidden_cosine.map")}

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            ht = inputs.teacher(t, self.name).hidden_states
            return feat.hidden_cosine(s.hidden_states, ht, s.attention_mask, lm)

        return self._term(fn, gmap, hidden=True, progress=progress.plain_progress(ctx))


class TinyBERTLoss(_Loss):
    """docs/methods.md §2.3: embedding MSE (m = 0) + hidden MSE and attention MSE (0 < m <= M) + prediction
    soft CE (m = M + 1), each with its own weight; learned W_e, W_h when widths differ."""

    name: Literal["tinybert"] = "tinybert"
    map: LayerMap = Field("uniform", description=MAP_HELP)
    embedding: float = Field(1.0, ge=0, le=1e6, description="Weight of L_embd.")
    hidden: float = Field(1.0, ge=0, le=1e6, description="Weight of L_hidn.")
    attention: float = Field(1.0, ge=0, le=1e6, description="Weight of L_attn.")
    prediction: float = Field(1.0, ge=0, le=1e6, description="Weight of L_pred (soft CE at `temperature`).")
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="t of L_pred; 1 worked best in the paper.")
    project: Literal["auto", "always"] = Field(
        "auto", description="'auto': learned W only when widths differ; 'always': learn W even at equal widths."
    )

    def _layers(self, term: Term, s: KDOutputs, t: KDOutputs, lm: dict[int, int]) -> Tensor:
        """() `embedding` x L_embd (m = 0) + sum over the active 0 < m <= M of `hidden` x L_hidn(m) +
        `attention` x L_attn(m); hidden states (B, T, H), attentions (B, heads, T, T)."""
        import torch

        from kdpipe.losses import features as feat

        total = torch.zeros((), device=s.logits.device)
        for m, n in sorted(lm.items()):
            if m == 0:
                if self.embedding:
                    w_e = term.learned["w_e"]
                    loss = feat.hidden_mse(s.hidden_states, t.hidden_states, {0: 0}, s.attention_mask, w_e)
                    total = total + self.embedding * loss
                continue
            if self.hidden:
                w_h = term.learned["w_h"]
                loss = feat.hidden_mse(s.hidden_states, t.hidden_states, {m: n}, s.attention_mask, w_h)
                total = total + self.hidden * loss
            if self.attention:
                loss = feat.attention_mse(s.attentions, t.attentions, {m - 1: n - 1}, s.attention_mask)
                total = total + self.attention * loss
        return total

    def build(self, ctx: LossContext) -> Term:
        """Sum over the mapped layers m of lambda_m L_layer(m) (`_layers`) + `prediction` x L_pred.

        L_hidn / L_attn are per layer (each a mean over real tokens / entries and heads) and SUMMED
        over layers, as the spec's total; L_attn compares attention PROBABILITIES (softmax outputs, no
        dropout). L_pred = soft CE(SM(v/t), SM(z/t)) on (B, C) logits with the teacher's v detached; it
        is the term's `logit_fn`, so under PID/SID it runs when the logit terms do (after the layer
        phase), not during it."""
        import torch

        from kdpipe.losses import features as feat
        from kdpipe.losses import inputs, progress
        from kdpipe.losses.objective import resolve_map

        gmap = resolve_map(self.map, ctx, "tinybert.map")
        always = self.project == "always"
        mods = {k: feat.maybe_projection(ctx.d_student, ctx.d_teacher, always) for k in ("w_e", "w_h")}
        term: Term

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            return self._layers(term, s, inputs.teacher(t, self.name), lm)

        def prediction(s: KDOutputs, t: KDOutputs | None) -> Tensor:
            p = torch.softmax(inputs.teacher(t, self.name).logits.detach().float() / self.temperature, -1)
            soft_ce = -(p * torch.log_softmax(s.logits.float() / self.temperature, -1)).sum(-1).mean()
            return self.prediction * soft_ce

        def measure(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
            return progress.cls_loss(s, t, m, n, term.learned["w_e" if m == 0 else "w_h"])

        lmap = {**({0: 0} if self.embedding else {}), **(gmap if self.hidden or self.attention else {})}
        logit_fn = prediction if self.prediction else None
        attentions = bool(self.attention)
        term = self._term(
            fn, lmap, hidden=True, attentions=attentions, modules=mods, logit_fn=logit_fn, progress=measure
        )
        return term


class AttentionKLLoss(_Loss):
    """docs/methods.md §2.4 (Aguilar et al.): KL between teacher and student self-attention rows, per head,
    plus `cls_weight` x [CLS] cosine on the same layers."""

    name: Literal["attention_kl"] = "attention_kl"
    map: LayerMap = Field("kept", description=MAP_HELP)
    cls_weight: float = Field(1.0, ge=0, le=1e6, description="Weight of the [CLS] cosine term on the matched layers.")

    def build(self, ctx: LossContext) -> Term:
        """On the active mapped layers, KL(A_t || A_s) of the attention PROBABILITY rows (B, heads, T, T)
        (softmax outputs, no dropout; mean over real rows, heads and layers) + `cls_weight` x the [CLS]
        cosine loss on the same layers (mean over layers). Its progress (the PID/SID threshold) is that
        [CLS] cosine loss on the current layer alone."""
        from kdpipe.losses import features as feat
        from kdpipe.losses import inputs
        from kdpipe.losses.objective import resolve_map

        gmap = resolve_map(self.map, ctx, "attention_kl.map")
        if self.cls_weight:
            _equal_widths(ctx, "attention_kl (its [CLS] cosine, cls_weight > 0)")

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            att_map = {m - 1: n - 1 for m, n in lm.items()}
            loss = feat.attention_kl(s.attentions, t.attentions, att_map, s.attention_mask)
            if self.cls_weight:
                loss = loss + self.cls_weight * feat.cls_cosine(s.hidden_states, t.hidden_states, list(lm.items()))
            return loss

        def measure(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
            return feat.cls_cosine(s.hidden_states, t.hidden_states, [(m, n)])

        measurable = ctx.d_student == ctx.d_teacher
        return self._term(fn, gmap, hidden=True, attentions=True, progress=measure if measurable else None)


class HintLoss(_Loss):
    """docs/methods.md §2.5 (FitNets): MSE between a learned regressor of a student layer and a teacher layer."""

    name: Literal["hint"] = "hint"
    student_layer: int | None = Field(None, ge=0, le=1000, description="Student layer (default: the middle one).")
    teacher_layer: int | None = Field(
        None, ge=0, le=1000, description="Teacher layer (default: g(student_layer), 'kept')."
    )

    def _pair(self, ctx: LossContext) -> tuple[int, int]:
        """(student hidden-state index, teacher hidden-state index), checked against the two depths."""
        s_layer = self.student_layer if self.student_layer is not None else max(1, ctx.n_student // 2)
        if s_layer > ctx.n_student:
            raise ConfigError(
                f"hint.student_layer {s_layer} exceeds the student's {ctx.n_student} layers",
                f"use 0..{ctx.n_student}",
            )
        t_layer = self.teacher_layer if self.teacher_layer is not None else ctx.layer_map[s_layer]
        if t_layer > ctx.n_teacher:
            raise ConfigError(
                f"hint.teacher_layer {t_layer} exceeds the teacher's {ctx.n_teacher} layers",
                f"use 0..{ctx.n_teacher}",
            )
        return s_layer, t_layer

    def build(self, ctx: LossContext) -> Term:
        """MSE(regressor(h_s[m]), h_t[n]) over the (B, T, H) states' real tokens; the regressor is the
        term's own Projection d_student -> d_teacher, and also projects its progress measure."""
        import torch

        from kdpipe.losses import features as feat
        from kdpipe.losses import inputs, progress

        s_layer, t_layer = self._pair(ctx)
        term: Term

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            if not lm:
                return torch.zeros((), device=s.logits.device)
            regressor = term.learned["regressor"]
            return feat.hint(s.hidden_states, t.hidden_states, s_layer, t_layer, regressor, s.attention_mask)

        def measure(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
            return progress.cls_loss(s, t, m, n, term.learned["regressor"])

        mods: dict[str, nn.Module] = {"regressor": feat.Projection(ctx.d_student, ctx.d_teacher)}
        term = self._term(fn, {s_layer: t_layer}, hidden=True, modules=mods, progress=measure)
        return term


class CRDLoss(_Loss):
    """docs/methods.md §2.5 (CRD), in-batch: InfoNCE between projected student and teacher sentence features;
    same-class inputs are not negatives."""

    name: Literal["crd"] = "crd"
    temperature: float = Field(0.1, ge=TEMP_MIN, le=TEMP_MAX, description="InfoNCE temperature tau.")
    dim: int = Field(128, gt=0, le=65536, description="Width of the shared embedding space of the two projections.")
    feature: Literal["cls", "mean"] = Field("mean", description="Sentence feature: [CLS] or mean over real tokens.")

    def build(self, ctx: LossContext) -> Term:
        """On the last layers' sentence features (B, H); same-class rows per s.labels (B,), which must be
        set, are not negatives. Owns the projections proj_s, proj_t into `dim`."""
        import torch

        from kdpipe.losses import features as feat
        from kdpipe.losses import inputs, progress
        from kdpipe.losses import relational as rel

        term: Term

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            if not lm:
                return torch.zeros((), device=s.logits.device)
            fs, ft = inputs.last_features(s, t, lm, self.feature, self.name)
            y = inputs.labels(s, self.name)
            return rel.crd_in_batch(fs, ft, y, term.learned["proj_s"], term.learned["proj_t"], self.temperature)

        def measure(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
            return progress.cls_loss(s, t, m, n, term.learned["proj_s"], term.learned["proj_t"])

        mods: dict[str, nn.Module] = {
            "proj_s": feat.Projection(ctx.d_student, self.dim),
            "proj_t": feat.Projection(ctx.d_teacher, self.dim),
        }
        term = self._term(fn, {ctx.n_student: ctx.n_teacher}, hidden=True, modules=mods, progress=measure)
        return term


# ----------------------------------------------------------------------------- 3. relational
class PKTLoss(_Loss):
    """docs/methods.md §3.1: KL between cosine-kernel conditional probabilities of the last layers' features."""

    name: Literal["pkt"] = "pkt"
    symmetric: bool = Field(False, description="The seed's 'Proposed' variant: KL(a||b) + KL(b||a).")
    feature: Literal["cls", "mean"] = Field("mean", description="Sentence feature: [CLS] or mean over real tokens.")

    def build(self, ctx: LossContext) -> Term:
        """On the last layers' sentence features (B, H_s), (B, H_t); the widths may differ."""
        import torch

        from kdpipe.losses import inputs, progress
        from kdpipe.losses import relational as rel

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            t = inputs.teacher(t, self.name)
            if not lm:
                return torch.zeros((), device=s.logits.device)
            fs, ft = inputs.last_features(s, t, lm, self.feature, self.name)
            return rel.pkt(fs, ft, symmetric=self.symmetric)

        lmap = {ctx.n_student: ctx.n_teacher}
        return self._term(fn, lmap, hidden=True, progress=progress.plain_progress(ctx))


class VIDLoss(_Loss):
    """docs/methods.md §3.2: -log q(t | s) with a learned mean regressor and per-channel softplus variance,
    on every mapped layer."""

    name: Literal["vid"] = "vid"
    map: LayerMap = Field("kept", description=MAP_HELP)
    init_var: float = Field(5.0, gt=0, le=1e6, description="Initial per-channel variance sigma_c^2.")

    def build(self, ctx: LossContext) -> Term:
        """docs/methods.md §3.2 on every mapped layer's (B, T, H) states, one VIDHead each; the layers'
        -log q(t | s) are AVERAGED (so the term's scale does not grow with depth; the paper's
        sum_k lambda_k equals this with lambda_k = weight / K). A head's mean regressor also projects
        its layer's progress measure."""
        import torch

        from kdpipe.losses import inputs, progress
        from kdpipe.losses import relational as rel
        from kdpipe.losses.objective import resolve_map

        gmap = resolve_map(self.map, ctx, "vid.map")
        heads: dict[str, nn.Module] = {
            str(m): rel.VIDHead(ctx.d_student, ctx.d_teacher, init_var=self.init_var) for m in gmap
        }
        term: Term

        def fn(s: KDOutputs, t: KDOutputs | None, lm: dict[int, int]) -> Tensor:
            hs, ht = inputs.hidden(s, self.name), inputs.hidden(inputs.teacher(t, self.name), self.name)
            total = torch.zeros((), device=s.logits.device)
            for m, n in lm.items():  # VIDHead detaches the teacher's states
                total = total + term.learned[str(m)](hs[m], ht[n], s.attention_mask)
            return total / max(len(lm), 1)

        def measure(s: KDOutputs, t: KDOutputs, m: int, n: int) -> Tensor:
            head = term.learned[str(m)]
            assert isinstance(head, rel.VIDHead)
            return progress.cls_loss(s, t, m, n, head.mu)

        term = self._term(fn, gmap, hidden=True, modules=heads, progress=measure)
        return term


# ----------------------------------------------------------------------------- 4. Bayesian
class PriorLoss(_Loss):
    """docs/methods.md §4: (1 / N) 1/2 (w - mu)^T Xi^{-1} (w - mu), the student prior of Bayesian distillation
    (the teacher's posterior conditioned on the removed blocks' output projections at 0) as a penalty; N is
    the number of examples the teacher's posterior was fitted on. Needs a student built with init: bayes."""

    on_logits: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    name: Literal["prior"] = "prior"

    def build(self, ctx: LossContext) -> Term:
        """Reads the student's weights through ctx.prior (set by the distill stage), not the outputs."""

        def fn(s: KDOutputs, t: KDOutputs | None, _: dict[int, int]) -> Tensor:
            if ctx.prior is None:
                raise ConfigError(
                    "distill.losses: the 'prior' term needs a student built with student.init: bayes",
                    "set student.init: bayes (and teacher.posterior), or drop the prior term",
                )
            return ctx.prior()

        return self._term(fn)


LossConfig = Annotated[
    HintonLoss
    | CELoss
    | LogitMSELoss
    | ReverseKLLoss
    | JSDLoss
    | OFALoss
    | PKDLoss
    | HiddenCosineLoss
    | TinyBERTLoss
    | AttentionKLLoss
    | HintLoss
    | CRDLoss
    | PKTLoss
    | VIDLoss
    | PriorLoss,
    Field(discriminator="name"),
]


def _by_name() -> dict[str, type[_Loss]]:
    union = get_args(LossConfig)[0]
    return {cls.model_fields["name"].default: cls for cls in get_args(union)}


LOSS_TYPES: dict[str, type[_Loss]] = _by_name()
"""Every recipe term's config class by its `name`, in the order of the `LossConfig` union."""
