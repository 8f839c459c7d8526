"""Representation analysis (not losses): docs/methods.md §3.3, linear CKA between teacher and student layers.

Features are pooled per example first, e.g. with `kdpipe.losses.masks.mean_pool`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _as_float64(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = x.detach().cpu().double() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    if t.dim() != 2:
        raise ValueError(f"linear_cka: {name} must be (n examples, features), got shape {tuple(t.shape)}")
    return t


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Centred linear CKA (Kornblith et al. 2019) between X (n, p) and Y (n, q); p and q may differ.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, L = Y Y^T,
    HSIC(K, L) = tr(K H L H) / (n - 1)^2, H = I - 11^T / n. Computed in float64 through the
    equivalent feature form tr(K H L H) = ||(HX)^T (HY)||_F^2 (H is idempotent), which avoids the
    n x n Gram matrices. 1 for identical features; invariant to orthogonal transforms and isotropic
    scaling of either side. Returns NaN when one side has zero variance (CKA is undefined there)."""
    xs, ys = _as_float64(x, "x"), _as_float64(y, "y")
    n = xs.shape[0]
    if ys.shape[0] != n:
        raise ValueError(f"linear_cka: x has {n} examples, y has {ys.shape[0]}")
    if n < 2:
        raise ValueError("linear_cka needs at least 2 examples")
    xc, yc = xs - xs.mean(0, keepdim=True), ys - ys.mean(0, keepdim=True)  # H X, H Y
    scale = (n - 1) ** 2

    def hsic(a: Tensor, b: Tensor) -> float:
        return float((a.T @ b).pow(2).sum()) / scale

    denom = math.sqrt(hsic(xc, xc) * hsic(yc, yc))
    return hsic(xc, yc) / denom if denom > 0 else math.nan


def cka_matrix(teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> np.ndarray:
    """Layer-by-layer linear CKA heat map: (n_teacher, n_student), entry [i, j] = CKA(teacher i, student j).

    Each feature is (n examples, width) over the same examples, e.g. `kdpipe.losses.masks.mean_pool`
    of a hidden state."""
    out = np.empty((len(teacher_feats), len(student_feats)), dtype=np.float64)
    for i, tf in enumerate(teacher_feats):
        for j, sf in enumerate(student_feats):
            out[i, j] = linear_cka(tf, sf)
    return out


def cka_document(matrix: np.ndarray, examples: int) -> dict[str, object]:
    """What cka.json holds: the axes' meaning, the example count and the (teacher, student) matrix rounded to 5
    decimals (rows: teacher hidden states, columns: student hidden states, 0 = embeddings)."""
    return {
        "rows": "teacher hidden states (0 = embeddings)",
        "cols": "student hidden states (0 = embeddings)",
        "examples": examples,
        "matrix": np.round(matrix, 5).tolist(),
    }
