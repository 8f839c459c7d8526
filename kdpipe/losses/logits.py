"""Output (logit) distillation, METHODS.md section 1. Shapes: logits (B, C), labels (B,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy(z: Tensor, y: Tensor | None) -> Tensor:
    """Hard-label CE at T = 1."""
    if y is None:
        raise ValueError("the 'ce' loss needs labels")
    return F.cross_entropy(z.float(), y)


def soft_kl(v: Tensor, z: Tensor, temperature: float) -> Tensor:
    """KL(SM(v/T) || SM(z/T)), summed over classes, mean over rows: (B, C) -> ()."""
    log_p = F.log_softmax(v.float() / temperature, dim=-1)
    log_q = F.log_softmax(z.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def hinton(z: Tensor, v: Tensor, y: Tensor | None, temperature: float, alpha: float) -> Tensor:
    """METHODS.md 1.1: (1 - a) CE(y, SM(z)) + a T^2 KL(SM(v/T) || SM(z/T)).

    The T^2 factor keeps the soft term's gradient scale independent of T. Without labels only the
    soft term remains (weight 1)."""
    soft = temperature**2 * soft_kl(v.detach(), z, temperature)
    if y is None:
        return soft
    return (1 - alpha) * cross_entropy(z, y) + alpha * soft


def logit_mse(z: Tensor, v: Tensor) -> Tensor:
    """METHODS.md 1.2: ||v - z||^2 / C, mean over rows."""
    return torch.mean((z.float() - v.detach().float()) ** 2)
