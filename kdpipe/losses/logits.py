"""Output (logit) distillation, docs/methods.md §1.

Shapes: logits (B, C) for classification, or (B, T, V) for token-level (sequence) outputs;
labels (B,); mask (B, T) with 1 on real tokens. Everything is computed in float32 and teacher
tensors are detached here, so a caller cannot leak gradient into the teacher by accident.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdpipe.losses.masks import masked_mean


def cross_entropy(z: Tensor, y: Tensor | None) -> Tensor:
    """Hard-label CE at T = 1: z (B, C), y (B,) -> (); raises ValueError without labels."""
    if y is None:
        raise ValueError("the 'ce' loss needs labels")
    return F.cross_entropy(z.float(), y)


def soft_kl(v: Tensor, z: Tensor, temperature: float) -> Tensor:
    """KL(SM(v/T) || SM(z/T)), summed over classes, mean over rows: (B, C) -> ()."""
    log_p = F.log_softmax(v.float() / temperature, dim=-1)
    log_q = F.log_softmax(z.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def hinton(z: Tensor, v: Tensor, y: Tensor | None, temperature: float, alpha: float) -> Tensor:
    """docs/methods.md §1.1: (1 - a) CE(y, SM(z)) + a T^2 KL(SM(v/T) || SM(z/T)).

    The T^2 factor keeps the soft term's gradient scale independent of T. Without labels only the
    soft term remains (weight 1)."""
    soft = temperature**2 * soft_kl(v.detach(), z, temperature)
    if y is None:
        return soft
    return (1 - alpha) * cross_entropy(z, y) + alpha * soft


def logit_mse(z: Tensor, v: Tensor) -> Tensor:
    """docs/methods.md §1.2: ||v - z||^2 / C, mean over rows: (B, C) x2 -> ()."""
    return torch.mean((z.float() - v.detach().float()) ** 2)


def ensemble_probs(
    teacher_logits: list[Tensor], temperature: float, mode: Literal["arithmetic", "geometric"]
) -> Tensor:
    """docs/methods.md §1.1 ensemble teacher: soft targets from several teachers, (..., C) each -> (..., C).

    arithmetic: mean_i SM(v_i / T); geometric: the normalised geometric mean
    prod_i SM(v_i / T)^(1/n) / Z = SM(mean_i log SM(v_i / T)) (computed in log space, so it stays
    exact when a member is very confident). Returns probabilities (rows sum to 1), detached."""
    if not teacher_logits:
        raise ValueError("ensemble_probs needs at least one teacher's logits")
    shapes = {tuple(v.shape) for v in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members' logits must have the same shape, got {sorted(shapes)}")
    log_ps = torch.stack([F.log_softmax(v.detach().float() / temperature, dim=-1) for v in teacher_logits])
    if mode == "arithmetic":
        return log_ps.exp().mean(0)
    if mode == "geometric":
        return F.softmax(log_ps.mean(0), dim=-1)
    raise ValueError(f"unknown ensemble mode {mode!r}: use 'arithmetic' or 'geometric'")


def hinton_from_probs(z: Tensor, p: Tensor, y: Tensor | None, temperature: float, alpha: float) -> Tensor:
    """docs/methods.md §1.1 with the soft targets given as probabilities p (B, C), e.g. from ensemble_probs:
    (1 - a) CE(y, SM(z)) + a T^2 KL(p || SM(z/T)); without labels only the soft term (weight 1),
    the same convention as `hinton`. KL summed over classes, mean over rows."""
    p = p.detach().float()
    log_q = F.log_softmax(z.float() / temperature, dim=-1)
    # xlogy: a member distribution may put exactly 0 on a class, and 0 log 0 must be 0, not NaN
    soft = temperature**2 * (torch.xlogy(p, p) - p * log_q).sum(-1).mean()
    if y is None:
        return soft
    return (1 - alpha) * cross_entropy(z, y) + alpha * soft


def logit_mse_with_labels(z: Tensor, v: Tensor, y: Tensor | None, alpha: float) -> Tensor:
    """docs/methods.md §1.2 (Tang et al.): a CE(y, SM(z)) + (1 - a) ||v - z||^2 / C (mean over rows).

    z, v: (B, C); y: (B,), the gold labels or, on unlabeled data, the teacher's argmax (the training
    loop fills those in; this function does not guess them). The squared error is normalised by the
    class count like `logit_mse`, i.e. a mean over every logit."""
    if y is None:
        raise ValueError("logit_mse with alpha > 0 needs labels (the training loop gives the teacher's argmax)")
    v = v.detach().float()
    return alpha * F.cross_entropy(z.float(), y) + (1 - alpha) * torch.mean((v - z.float()) ** 2)


def _position_mean(per_pos: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a per-position value: (B,) -> mean over rows; (B, T) -> mean over REAL tokens.

    Token-level losses are averaged per real token (sum over real tokens / their count), not per
    row: a row with 3 real tokens weighs 3 times a row with 1. Padding is selected out
    (`masks.masked_mean`), so even inf/NaN at padded positions cannot leak in."""
    if per_pos.dim() == 1 or mask is None:
        return per_pos.mean()
    if mask.shape != per_pos.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token grid {tuple(per_pos.shape)}")
    return masked_mean(per_pos, mask)


def _log_probs(z: Tensor, v: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log q student, log p teacher) at temperature T; log_softmax, never log(softmax), so both stay
    finite at low T where softmax underflows to exact zeros (0 * log 0 = NaN gradients otherwise)."""
    if z.shape != v.shape:
        raise ValueError(f"student logits {tuple(z.shape)} and teacher logits {tuple(v.shape)} differ in shape")
    if z.dim() not in (2, 3):
        raise ValueError(f"expected logits (B, C) or (B, T, V), got {tuple(z.shape)}")
    return F.log_softmax(z.float() / temperature, dim=-1), F.log_softmax(v.detach().float() / temperature, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim from log-probabilities: (..., C) -> (...)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def reverse_kl(z: Tensor, v: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """docs/methods.md §1.3 (MiniLLM's token-level objective, without its policy-gradient machinery):
    T^2 KL(q || p), q = SM(z/T) student, p = SM(v/T) teacher (mode-seeking).

    z, v: (B, C) -> mean over rows (mask, a token mask, does not apply and is ignored), or
    (B, T, V) -> per-token KL averaged over real tokens of `mask` (all tokens when mask is None)."""
    log_q, log_p = _log_probs(z, v, temperature)
    return temperature**2 * _position_mean(_kl(log_q, log_p), mask)


def generalized_jsd(z: Tensor, v: Tensor, beta: float, temperature: float, mask: Tensor | None = None) -> Tensor:
    """Generalised Jensen-Shannon divergence, T^2 scaled, same shapes/masking as `reverse_kl`:

        m = beta p + (1 - beta) q,   JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),

    p = SM(v/T) teacher, q = SM(z/T) student. beta = 0.5 is the usual JSD (bounded by log 2).

    Limits, honestly: JSD_beta is NOT forward KL at beta = 0 nor reverse KL at beta = 1. At both ends
    m collapses onto one distribution and the loss is identically 0 (no gradient). Near the ends it
    vanishes linearly: JSD_beta / beta -> KL(p || q) as beta -> 0 and JSD_beta / (1 - beta) ->
    KL(q || p) as beta -> 1. Some tools special-case the endpoints to forward/reverse KL; this one
    does not: use `reverse_kl` (or `soft_kl` / `hinton` for the forward direction) for those."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    log_q, log_p = _log_probs(z, v, temperature)
    # log m = logsumexp(log p + log beta, log q + log(1 - beta)): stable, and a zero weight is an
    # exact -inf that logsumexp ignores
    log_wp = math.log(beta) if beta > 0 else -math.inf
    log_wq = math.log1p(-beta) if beta < 1 else -math.inf
    log_m = torch.logsumexp(torch.stack([log_p + log_wp, log_q + log_wq]), dim=0)
    per_pos = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return temperature**2 * _position_mean(per_pos, mask)


def ofa(z: Tensor, v: Tensor, y: Tensor | None, gamma: float, temperature: float = 1.0) -> Tensor:
    """docs/methods.md §1.4 (One-for-All): L = -(1 + p[c])^g log q[c] - sum_{k != c} p[k] log q[k],
    p = SM(v/T) teacher, q = SM(z/T) student, c = y; mean over rows. No T^2 factor (the reference
    uses T = 1). g = 1 gives CE(y, q) + soft CE(p, q), i.e. standard KD with the label folded in;
    g > 1 weighs the target class more.

    Note: the authors' code computes ((p + onehot)^g - onehot) as the weights, which differs from the
    formula by -log q[c] on the target and raises non-target weights to the power g; this follows
    the formula in docs/methods.md §1.4."""
    if y is None:
        raise ValueError("the OFA loss needs labels (the target class c)")
    log_q = F.log_softmax(z.float() / temperature, dim=-1)
    p = F.softmax(v.detach().float() / temperature, dim=-1)
    onehot = F.one_hot(y, num_classes=z.shape[-1]).to(p.dtype)
    # target column gets (1 + p_c)^g, the others keep p_k
    weights = onehot * (1 + p) ** gamma + (1 - onehot) * p
    return -(weights * log_q).sum(-1).mean()
