"""Masked means: the one place where padding is taken out of a loss or a pooled feature.

A mask is 1 / True on real tokens, 0 / False on padding. Padding is SELECTED out with torch.where,
never multiplied by 0, so its values never matter, not even inf or NaN there (0 * NaN is NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, real: Tensor | None, dim: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `real` is true.

    values: any shape, e.g. (B, T) per-token losses or (B, h, T, T) attention entries; real: a mask
    broadcastable to values' shape (e.g. (B, T), or (B, 1, T, T)); None means every position counts.
    dim=None -> () the mean over every real entry; dim=d -> values.shape without d, the mean over
    the real entries along d. With no real entry the mean is 0 (the count is clamped at 1)."""
    if real is None:
        return values.mean() if dim is None else values.mean(dim)
    keep = real.bool().expand_as(values)
    selected = torch.where(keep, values, torch.zeros_like(values))
    if dim is None:
        return selected.sum() / keep.sum().clamp_min(1)
    return selected.sum(dim) / keep.sum(dim).clamp_min(1)


def masked_sum(values: Tensor, real: Tensor, dim: int) -> Tensor:
    """Sum of `values` along `dim` over the positions where `real` (broadcastable to values) is true."""
    keep = real.bool().expand_as(values)
    return torch.where(keep, values, torch.zeros_like(values)).sum(dim)


def mean_pool(h: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, H) -> (B, H): the average over each row's real tokens (mask (B, T), 1 = real), float32.

    A row without real tokens gives zeros. Differentiable (not detached), so it pools features for
    a loss (CRD, PKT) as well as for the CKA analysis."""
    h = h.float()
    return masked_mean(h, None if mask is None else mask[..., None], dim=1)
