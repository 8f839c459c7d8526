"""Recipe terms of the distill stage: one pydantic model per loss, a discriminated union on `name`.

Kept apart from config.py (which it feeds) so that the catalogue of methods reads in one place. Every
model forbids unknown keys; a misspelt `name` fails validation listing the valid ones.
Layer indices in recipes are 1-based layer numbers (0 = the embeddings), as in METHODS.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

TEMP_MIN, TEMP_MAX = 1e-3, 1e3  # a temperature of 1e-300 turns the softmax into NaN
LayerMap = Literal["kept", "uniform"] | list[int]
MAP_HELP = (
    "Student layer m -> teacher layer g(m): 'kept' (the teacher layer each student layer was copied from), "
    "'uniform' (g(m) = m N / M, TinyBERT's default) or an explicit list [g(1), ..., g(M)] of 1-based teacher layers."
)


class _Loss(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, le=1e6, description="Weight of this term in the total loss.")


# ----------------------------------------------------------------------------- 1. logits
class HintonLoss(_Loss):
    """METHODS.md 1.1: (1 - alpha) CE(y, SM(z)) + alpha T^2 KL(SM(v/T) || SM(z/T))."""

    name: Literal["hinton"] = "hinton"
    temperature: float = Field(4.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature T of the soft term.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft term; 1 - alpha on hard CE.")
    ensemble: Literal["arithmetic", "geometric"] = Field(
        "arithmetic",
        description="How the soft targets of several teachers (distill.extra_teachers) are averaged.",
    )


class CELoss(_Loss):
    """Hard-label cross-entropy at T = 1 (the no-KD baseline); teacher argmax on unlabeled data."""

    name: Literal["ce"] = "ce"


class LogitMSELoss(_Loss):
    """METHODS.md 1.2 (Tang et al.): alpha CE(t, SM(z)) + (1 - alpha) ||v - z||^2 / C, t = y or argmax v."""

    name: Literal["logit_mse"] = "logit_mse"
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of the hard CE term (0: pure logit regression).")


class ReverseKLLoss(_Loss):
    """METHODS.md 1.3 (MiniLLM's objective, token-level on sequence outputs): T^2 KL(SM(z/T) || SM(v/T))."""

    name: Literal["reverse_kl"] = "reverse_kl"
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature.")


class JSDLoss(_Loss):
    """Generalised Jensen-Shannon: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""

    name: Literal["jsd"] = "jsd"
    beta: float = Field(0.5, gt=0, lt=1, description="Mixing weight between forward-like and reverse-like.")
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature.")


class OFALoss(_Loss):
    """METHODS.md 1.4: -(1 + p_t[c])^gamma log q[c] - sum_{k != c} p_t[k] log q[k]."""

    name: Literal["ofa"] = "ofa"
    gamma: float = Field(
        1.5, ge=1, le=100, description="Modulates the target-class term; 1 = KD with labels folded in."
    )
    temperature: float = Field(1.0, ge=TEMP_MIN, le=TEMP_MAX, description="Softmax temperature of p_t and q.")


# ----------------------------------------------------------------------------- 2. features
class PKDLoss(_Loss):
    """METHODS.md 2.1 (Patient KD): sum over layers of the normalised [CLS] MSE (add a hinton term for L_DS)."""

    name: Literal["pkd"] = "pkd"
    variant: Literal["skip", "last"] = Field("skip", description="PKD-Skip (every k-th) or PKD-Last teacher layers.")


class HiddenCosineLoss(_Loss):
    """METHODS.md 2.2 (DistilBERT): 1 - cos(h_s, h_t) on mapped hidden states, real tokens only."""

    name: Literal["hidden_cosine"] = "hidden_cosine"
    map: LayerMap = Field("kept", description=MAP_HELP)


class TinyBERTLoss(_Loss):
    """METHODS.md 2.3: embedding MSE (m = 0) + hidden MSE and attention MSE (0 < m <= M) + prediction
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


class AttentionKLLoss(_Loss):
    """METHODS.md 2.4 (Aguilar et al.): KL between teacher and student self-attention rows, per head,
    plus `cls_weight` x [CLS] cosine on the same layers."""

    name: Literal["attention_kl"] = "attention_kl"
    map: LayerMap = Field("kept", description=MAP_HELP)
    cls_weight: float = Field(1.0, ge=0, le=1e6, description="Weight of the [CLS] cosine term on the matched layers.")


class HintLoss(_Loss):
    """METHODS.md 2.5 (FitNets): MSE between a learned regressor of a student layer and a teacher layer."""

    name: Literal["hint"] = "hint"
    student_layer: int | None = Field(None, ge=0, le=1000, description="Student layer (default: the middle one).")
    teacher_layer: int | None = Field(
        None, ge=0, le=1000, description="Teacher layer (default: g(student_layer), 'kept')."
    )


class CRDLoss(_Loss):
    """METHODS.md 2.5 (CRD), in-batch: InfoNCE between projected student and teacher sentence features;
    same-class inputs are not negatives."""

    name: Literal["crd"] = "crd"
    temperature: float = Field(0.1, ge=TEMP_MIN, le=TEMP_MAX, description="InfoNCE temperature tau.")
    dim: int = Field(128, gt=0, le=65536, description="Width of the shared embedding space of the two projections.")
    feature: Literal["cls", "mean"] = Field("mean", description="Sentence feature: [CLS] or mean over real tokens.")


# ----------------------------------------------------------------------------- 3. relational
class PKTLoss(_Loss):
    """METHODS.md 3.1: KL between cosine-kernel conditional probabilities of the last layers' features."""

    name: Literal["pkt"] = "pkt"
    symmetric: bool = Field(False, description="The seed's 'Proposed' variant: KL(a||b) + KL(b||a).")
    feature: Literal["cls", "mean"] = Field("mean", description="Sentence feature: [CLS] or mean over real tokens.")


class VIDLoss(_Loss):
    """METHODS.md 3.2: -log q(t | s) with a learned mean regressor and per-channel softplus variance,
    on every mapped layer."""

    name: Literal["vid"] = "vid"
    map: LayerMap = Field("kept", description=MAP_HELP)
    init_var: float = Field(5.0, gt=0, le=1e6, description="Initial per-channel variance sigma_c^2.")


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
    | VIDLoss,
    Field(discriminator="name"),
]

# terms that act on the student's logits; the rest act on intermediate layers (schedules move these)
LOGIT_TERMS = frozenset({"hinton", "ce", "logit_mse", "reverse_kl", "jsd", "ofa"})
SOFT_TERMS = frozenset({"hinton", "logit_mse", "reverse_kl", "jsd", "ofa"})
