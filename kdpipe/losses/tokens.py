"""Token-level distillation losses for causal language models (issue 18), masked and weighted by tokens.

Shapes: student logits s and teacher logits t (B, T, V); mask (B, T), true / nonzero on the positions whose
next-token distribution counts (response tokens; padding and prompt positions false). `logit_mask(labels)`
gives that mask from data labels with the same shift `token_ce` uses, so the KD terms and CE count the same
tokens. Everything runs in float32; teacher tensors are detached here.

Notation, per counted position n: p = SM(t_n / tau) the teacher, q = SM(s_n / tau) the student, sums over
the vocabulary v, and KL(a || b) = sum_v a_v (log a_v - log b_v) with a term 0 where a_v = 0 (never log 0).

- forward_kl   tau^2 * KL(p || q)                                  (mode-covering; Hinton's soft term)
- reverse_kl   tau^2 * KL(q || p)                                  (MiniLLM's token-level form, METHODS.md 1.3)
- gkd_jsd      tau^2 * JSD_beta / (beta (1 - beta)), JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),
               m = beta p + (1 - beta) q; beta = 0 is forward_kl, beta = 1 is reverse_kl (see gkd_jsd)
- tvd          0.5 * sum_v |p_v - q_v|                             (at tau, NOT scaled by tau^2)
- token_ce     -log SM(s[:, i])[labels[:, i + 1]], the data's next-token CE at T = 1
- topk_forward_kl  forward_kl with the teacher as the cache's top-k logits + tail (k + 1 buckets)
- topk_reverse_kl, topk_gkd_jsd, topk_tvd  reverse_kl, gkd_jsd, tvd on the same k + 1 buckets (the student's
               distribution collapsed onto the teacher's top-k indices + one tail bucket, its mass outside them)

The tau^2 factor on the KL terms (forward, reverse, JSD, top-k) is Hinton's: it keeps the soft terms'
gradient scale independent of tau. TVD and CE are not scaled.

Weighting by tokens: every loss is the mean over ALL counted positions of the batch, sum_n loss_n / N, so a
long response weighs more than a short one (not a mean of per-sequence means). A batch with no counted
position raises ValueError (a 0 there would be a silent no-op step). Masked positions are selected out
before any arithmetic, so their logits never matter (not even inf / NaN there); a NaN logit on a counted
position makes the loss NaN (the "a_v = 0" test is `a_v == 0`, false for NaN), never a silent 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- helpers
def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):  # NaN fails both
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _counted(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The boolean (B, T) mask of counted positions; ValueError when the shape is wrong or none counts."""
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have the logits' (B, T) shape {shape}, got {tuple(mask.shape)}")
    keep = mask.bool()
    if not bool(keep.any()):
        raise ValueError("no unmasked token in the batch: every position is padding or prompt")
    return keep


def _select(s: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, V) student and teacher logits -> (N, V) float32 rows of the N counted positions (teacher detached)."""
    if s.dim() != 3 or s.shape != t.shape:
        raise ValueError(f"student and teacher logits must both be (B, T, V), got {tuple(s.shape)} / {tuple(t.shape)}")
    keep = _counted(mask, tuple(s.shape[:2]))
    return s[keep].float(), t.detach()[keep].float()


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """(N, V) log-probabilities -> (N,) sum_v a_v (log a_v - log b_v), the term 0 where a_v == 0 exactly."""
    a = log_a.exp()
    terms = torch.where(a == 0, torch.zeros_like(a), a * (log_a - log_b))
    return terms.sum(-1)


def logit_mask(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, T) data labels -> the (B, T) bool mask of the logit positions that predict a counted label:
    m[:, i] = labels[:, i + 1] != ignore_index, m[:, T - 1] = False (the shift `token_ce` applies)."""
    m = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    m[:, :-1] = labels[:, 1:] != ignore_index
    return m


# --------------------------------------------------------------------------- full-vocabulary losses
def forward_kl(s: Tensor, t: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """tau^2 * (1/N) sum_n KL(p_n || q_n), p = SM(t / tau), q = SM(s / tau): (B, T, V) x2, (B, T) -> ()."""
    _check_temperature(temperature)
    zs, zt = _select(s, t, mask)
    log_q = F.log_softmax(zs / temperature, dim=-1)
    log_p = F.log_softmax(zt / temperature, dim=-1)
    return temperature**2 * _kl_rows(log_p, log_q).mean()


def reverse_kl(s: Tensor, t: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """tau^2 * (1/N) sum_n KL(q_n || p_n), q = SM(s / tau) the student, p = SM(t / tau): MiniLLM's token-level
    reverse KL (mode-seeking), the per-token sum over the vocabulary; (B, T, V) x2, (B, T) -> ()."""
    _check_temperature(temperature)
    zs, zt = _select(s, t, mask)
    log_q = F.log_softmax(zs / temperature, dim=-1)
    log_p = F.log_softmax(zt / temperature, dim=-1)
    return temperature**2 * _kl_rows(log_q, log_p).mean()


def gkd_jsd(
    s: Tensor, t: Tensor, mask: Tensor, beta: float = 0.5, temperature: float = 1.0, scaled: bool = True
) -> Tensor:
    """GKD's generalised JSD (Agarwal et al. 2024, Eq. 1), p = SM(t / tau) the teacher, q = SM(s / tau):

        JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (log m by logsumexp)

    This is TRL's GKDTrainer.generalized_jsd_loss term for term (its `beta` is ours). As beta -> 0,
    JSD_beta = beta KL(p || q) + O(beta^2) -> 0, and as beta -> 1, JSD_beta = (1 - beta) KL(q || p) + O(.) -> 0;
    TRL's special cases beta = 0 -> KL(p || q), beta = 1 -> KL(q || p) are therefore jumps, not limits.

    scaled=True (default) returns tau^2 * JSD_beta / (beta (1 - beta)), whose limits ARE the KL cases: it is
    continuous on [0, 1] with value tau^2 KL(p || q) (forward) at beta = 0 and tau^2 KL(q || p) (reverse) at
    beta = 1, which are computed as those KLs exactly; at beta = 0.5 it is 4 tau^2 JSD (the symmetric JSD,
    (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2, times 4). scaled=False returns tau^2 * TRL's value:
    tau^2 JSD_beta for 0 < beta < 1 and TRL's KL special cases at 0 and 1. Near the endpoints (beta < ~1e-4)
    the scaled form loses float32 precision (a difference of nearly equal logs): use beta = 0 or 1 there.
    Mean over counted tokens; (B, T, V) x2, (B, T) -> ()."""
    if not 0 <= beta <= 1:  # NaN fails
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return forward_kl(s, t, mask, temperature)
    if beta == 1:
        return reverse_kl(s, t, mask, temperature)
    _check_temperature(temperature)
    zs, zt = _select(s, t, mask)
    log_q = F.log_softmax(zs / temperature, dim=-1)
    log_p = F.log_softmax(zt / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    jsd = beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)
    scale = 1 / (beta * (1 - beta)) if scaled else 1.0
    return temperature**2 * scale * jsd.mean()


def tvd(s: Tensor, t: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """(1/N) sum_n 0.5 sum_v |p_n,v - q_n,v|, p = SM(t / tau), q = SM(s / tau), in [0, 1]; not scaled by tau^2.
    (B, T, V) x2, (B, T) -> ()."""
    _check_temperature(temperature)
    zs, zt = _select(s, t, mask)
    q = F.softmax(zs / temperature, dim=-1)
    p = F.softmax(zt / temperature, dim=-1)
    return 0.5 * (p - q).abs().sum(-1).mean()


def token_ce(s: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The data's next-token CE at T = 1: position i predicts labels[:, i + 1];
    (1/N) sum over the N pairs with labels[:, i + 1] != ignore_index of -log SM(s[:, i])[labels[:, i + 1]].
    s (B, T, V), labels (B, T) (input ids with ignore_index on prompt / padding) -> (); ValueError when
    nothing counts. Ignored rows are selected out first, so their logits never matter."""
    if s.dim() != 3 or tuple(labels.shape) != tuple(s.shape[:2]):
        raise ValueError(
            f"token_ce needs logits (B, T, V) and labels (B, T), got {tuple(s.shape)} / {tuple(labels.shape)}"
        )
    keep = _counted(logit_mask(labels, ignore_index), tuple(labels.shape))
    z = s[keep].float()  # (N, V): the positions i whose label i + 1 counts
    y = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(z, y.long(), reduction="mean")


# --------------------------------------------------------------------------- sparse (top-k) teacher
def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(..., V) -> the cache's sparse form (kdpipe/train/cache.py topk_compress, the same three tensors):
    the k largest logits (..., k) float32, their indices (..., k) and lse_rest (...) = log-sum-exp of the
    other V - k logits (-inf when k = V), all at T = 1."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= V = {logits.shape[-1]}, got {k}")
    z = logits.detach().float()
    values, indices = torch.topk(z, k, dim=-1)
    lse_rest = torch.logsumexp(z.scatter(-1, indices, float("-inf")), dim=-1)
    return values, indices, lse_rest


def _teacher_buckets(values: Tensor, lse_rest: Tensor, vocab: int, temperature: float) -> Tensor:
    """(N, k) top-k logits + (N,) lse_rest -> (N, k + 1) teacher log-probabilities at tau on the top-k and one
    tail bucket (k < V). The tail's logit at tau is the cache's uniform-tail reconstruction
    (reconstruct_logits: every tail logit rho - log(V - k)) divided by tau and summed:
    log(V - k) + (rho - log(V - k)) / tau, exact at tau = 1."""
    rest = vocab - values.shape[-1]
    tail = math.log(rest) + (lse_rest - math.log(rest)) / temperature
    return F.log_softmax(torch.cat([values / temperature, tail[:, None]], dim=-1), dim=-1)


def _topk_rows(
    s: Tensor, values: Tensor, indices: Tensor, lse_rest: Tensor, mask: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """The (N, k + 1) teacher and student log-probabilities at tau on the buckets of the N counted positions: the
    top-k tokens A (the teacher's indices) and one tail bucket, the teacher's from `_teacher_buckets`, the student's
    log q_tail = log sum_{v not in A} q_v; (N, k) with no tail bucket when k = V (its logsumexp over nothing would
    give a NaN gradient). Shapes as in topk_forward_kl; ValueError when they do not fit."""
    _check_temperature(temperature)
    vocab, k = s.shape[-1], values.shape[-1]
    if s.dim() != 3 or tuple(values.shape[:2]) != tuple(s.shape[:2]) or indices.shape != values.shape:
        raise ValueError(f"top-k teacher (B, T, k) does not fit the logits {tuple(s.shape)}: {tuple(values.shape)}")
    if tuple(lse_rest.shape) != tuple(s.shape[:2]) or not 1 <= k <= vocab:
        raise ValueError(f"lse_rest must be (B, T) and 1 <= k <= V, got {tuple(lse_rest.shape)}, k={k}, V={vocab}")
    keep = _counted(mask, tuple(s.shape[:2]))
    log_q = F.log_softmax(s[keep].float() / temperature, dim=-1)  # (N, V)
    idx = indices.detach()[keep].long()
    log_q_a = log_q.gather(-1, idx)
    v_a = values.detach()[keep].float()
    if k == vocab:
        return F.log_softmax(v_a / temperature, dim=-1), log_q_a
    log_q_tail = torch.logsumexp(log_q.scatter(-1, idx, float("-inf")), dim=-1)
    log_p = _teacher_buckets(v_a, lse_rest.detach()[keep].float(), vocab, temperature)
    return log_p, torch.cat([log_q_a, log_q_tail[:, None]], dim=-1)


def topk_forward_kl(
    s: Tensor, values: Tensor, indices: Tensor, lse_rest: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Forward KL against a top-k teacher (the cache's representation, `topk_compress`), on k + 1 buckets:
    the top-k tokens A and one tail bucket holding the rest of the vocabulary,

        tau^2 * (1/N) sum_n [ sum_{a in A} p_a (log p_a - log q_a) + p_tail (log p_tail - log q_tail) ]

    with q = SM(s / tau) the student, q_tail = sum_{v not in A} q_v (a log-sum-exp), p the teacher buckets of
    `_teacher_buckets`. With k = V there is no tail and this equals forward_kl. At tau = 1, grouping the tail
    (the chain rule of KL) gives forward_kl - topk_forward_kl = r KL(p(. | tail) || q(. | tail)) >= 0, r the
    teacher's tail mass, and the gradient w.r.t. s differs from the full one by at most 2 r in L1 norm per
    token (the cache's bound). s (B, T, V); values, indices (B, T, k); lse_rest, mask (B, T) -> ()."""
    log_p, log_q = _topk_rows(s, values, indices, lse_rest, mask, temperature)
    return temperature**2 * _kl_rows(log_p, log_q).mean()


def topk_reverse_kl(
    s: Tensor, values: Tensor, indices: Tensor, lse_rest: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """reverse_kl on the k + 1 buckets of topk_forward_kl: tau^2 * (1/N) sum_n KL(q_b || p_b), q_b the student's
    distribution collapsed onto the teacher's top-k tokens and the tail (q_tail = its mass outside them). The
    dense form minus this one is q_tail KL(q(. | tail) || p(. | tail)) >= 0 (the chain rule): the top-k form does
    not see how the student spreads its tail mass, only how much there is. Equal to reverse_kl when k = V or
    k = V - 1 (a one-token tail), and when both tails are ~0. Shapes as in topk_forward_kl -> ()."""
    log_p, log_q = _topk_rows(s, values, indices, lse_rest, mask, temperature)
    return temperature**2 * _kl_rows(log_q, log_p).mean()


def topk_gkd_jsd(
    s: Tensor, values: Tensor, indices: Tensor, lse_rest: Tensor, mask: Tensor, beta: float = 0.5,
    temperature: float = 1.0, scaled: bool = True,
) -> Tensor:  # fmt: skip
    """gkd_jsd on the k + 1 buckets of topk_forward_kl (the same beta, scaling and endpoints: beta = 0 is
    topk_forward_kl, beta = 1 is topk_reverse_kl, computed as those exactly). Shapes as in topk_forward_kl -> ()."""
    if not 0 <= beta <= 1:  # NaN fails
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return topk_forward_kl(s, values, indices, lse_rest, mask, temperature)
    if beta == 1:
        return topk_reverse_kl(s, values, indices, lse_rest, mask, temperature)
    log_p, log_q = _topk_rows(s, values, indices, lse_rest, mask, temperature)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    jsd = beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)
    scale = 1 / (beta * (1 - beta)) if scaled else 1.0
    return temperature**2 * scale * jsd.mean()


def topk_tvd(
    s: Tensor, values: Tensor, indices: Tensor, lse_rest: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """tvd on the k + 1 buckets of topk_forward_kl: (1/N) sum_n 0.5 sum_b |p_b - q_b|, not scaled by tau^2. At most
    the dense tvd (merging buckets never increases an L1 distance), equal to it when k >= V - 1 or when the
    teacher's tail is ~0. Shapes as in topk_forward_kl -> ()."""
    log_p, log_q = _topk_rows(s, values, indices, lse_rest, mask, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean()
