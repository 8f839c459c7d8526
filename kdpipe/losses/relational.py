"""Relational and information-theoretic distillation, docs/methods.md §3 (plus CRD from §2.5, and RKD's
distance and angle terms, which the embedding task uses: §8).

Features are per-example vectors (B, D) unless stated otherwise: pool token states first (e.g.
`kdpipe.losses.masks.mean_pool` or the [CLS] vector). Everything is computed in float32 and the
teacher's tensors are detached here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.losses.masks import masked_mean


def _pkt_probs(f: Tensor, eps: float) -> Tensor:
    """(B, D) -> (B, B) row-conditional probabilities from the cosine kernel (cos + 1) / 2."""
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    k = (f @ f.T + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt(fs: Tensor, ft: Tensor, symmetric: bool = False, eps: float = 1e-7) -> Tensor:
    """docs/methods.md §3.1 (Passalis & Tefas 2018, probabilistic knowledge transfer).

    Each feature space (fs (B, D_s), ft (B, D_t); widths may differ) gives a (B, B) kernel
    K = (cos + 1) / 2, normalised per row into conditional probabilities P[i, j] = K[i, j] / sum_j K[i, j].
    Convention of the reference code (passalis/probabilistic_kt, `cosine_similarity_loss`), kept on
    purpose so values are comparable with it:
    - the diagonal (self-similarity, K[i, i] = 1) is NOT removed: the reference keeps it;
    - loss = mean over all B*B entries of P_t log((P_t + eps) / (P_s + eps)), i.e. the row-wise
      KL(P_t || P_s) averaged over rows and further divided by B.
    symmetric=True (the seed's "Proposed" variant): KL(P_t || P_s) + KL(P_s || P_t), same convention."""
    if fs.dim() != 2 or ft.dim() != 2 or fs.shape[0] != ft.shape[0]:
        raise ValueError(f"pkt needs features (B, D) with the same B, got {tuple(fs.shape)} and {tuple(ft.shape)}")
    p_s, p_t = _pkt_probs(fs.float(), eps), _pkt_probs(ft.detach().float(), eps)
    loss = torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))
    if symmetric:
        loss = loss + torch.mean(p_s * torch.log((p_s + eps) / (p_t + eps)))
    return loss


class VIDHead(nn.Module):
    """docs/methods.md §3.2 (Ahn et al. 2019, variational information distillation) for one feature pair.

    q(t | s) = N(mu(s), diag(sigma^2)): mu is nn.Linear(d_s, d_t) when hidden is None, otherwise an
    MLP Linear(d_s, hidden) -> ReLU -> Linear(hidden, d_t) (the reference uses 1x1 convolutions with
    ReLUs, i.e. the same thing per position). sigma_c^2 = softplus(alpha_c) + eps per teacher channel,
    alpha initialised so that sigma_c^2 = init_var at the start (the reference's 5.0)."""

    def __init__(self, d_s: int, d_t: int, hidden: int | None = None, init_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if init_var <= eps:
            raise ValueError(f"VIDHead: init_var ({init_var}) must exceed eps ({eps})")
        self.mu: nn.Module = (
            nn.Linear(d_s, d_t)
            if hidden is None
            else nn.Sequential(nn.Linear(d_s, hidden), nn.ReLU(), nn.Linear(hidden, d_t))
        )
        self.eps = eps
        # inverse softplus: softplus(log(expm1(x))) = x
        self.alpha = nn.Parameter(torch.full((d_t,), math.log(math.expm1(init_var - eps))))

    def variance(self) -> Tensor:
        """sigma_c^2, (d_t,)."""
        return F.softplus(self.alpha) + self.eps

    def forward(self, fs: Tensor, ft: Tensor, mask: Tensor | None = None) -> Tensor:
        """-log q(t | s) up to its constant: sum_c [log sigma_c + (t_c - mu_c(s))^2 / (2 sigma_c^2)] / D.

        Normalisation: divided by the channel count D = d_t (a mean over channels, as the reference),
        then mean over the batch — and over tokens for (B, T, D) inputs, where `mask` (B, T), when
        given, keeps only real tokens. fs (..., d_s), ft (..., d_t) with the same leading shape."""
        var = self.variance()
        t = ft.detach().float()
        per_chan = 0.5 * var.log() + (t - self.mu(fs.float())) ** 2 / (2 * var)  # log sigma = 0.5 log sigma^2
        per_pos = per_chan.mean(-1)
        return masked_mean(per_pos, None if per_pos.dim() == 1 else mask)


def crd_in_batch(
    fs: Tensor,
    ft: Tensor,
    labels: Tensor | None,
    proj_s: nn.Module,
    proj_t: nn.Module,
    temperature: float = 0.1,
) -> Tensor:
    """docs/methods.md §2.5 (CRD), memory-light: in-batch negatives instead of CRD's memory bank.

    s = normalise(proj_s(fs)), t = normalise(proj_t(ft)) (ft detached, so proj_t still learns but the
    teacher does not); logits[i, j] = s_i . t_j / tau, (B, B). The positive of row i is column i (same
    input). With labels, off-diagonal columns of the SAME label are removed from row i's negatives
    (docs/methods.md §2.5: negatives are inputs from different classes); without labels every other column is a
    negative. InfoNCE = cross-entropy of each row onto its diagonal, mean over rows; one direction
    only (student anchors, teacher candidates)."""
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"crd_in_batch: batch sizes differ (student {fs.shape[0]}, teacher {ft.shape[0]})")
    s = F.normalize(proj_s(fs.float()), dim=-1)
    t = F.normalize(proj_t(ft.detach().float()), dim=-1)
    logits = s @ t.T / temperature
    b = logits.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        # -inf drops a column from the softmax's denominator; the diagonal is always kept
        logits = logits.masked_fill(same & ~eye, -math.inf)
    return F.cross_entropy(logits, torch.arange(b, device=logits.device))


def _pairwise_distances(f: Tensor, eps: float) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances, squared distances clamped at eps before the root, diagonal 0."""
    sq = f.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * f @ f.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(f.shape[0], device=f.device, dtype=d.dtype))


def _check_pair(fs: Tensor, ft: Tensor, fn: str) -> None:
    if fs.dim() != 2 or ft.dim() != 2 or fs.shape[0] != ft.shape[0]:
        raise ValueError(f"{fn} needs features (B, D) with the same B, got {tuple(fs.shape)} and {tuple(ft.shape)}")


def rkd_distance(fs: Tensor, ft: Tensor, eps: float = 1e-12) -> Tensor:
    """Relational KD, distance-wise term (Park et al. 2019), on fs (B, D_s) and ft (B, D_t); widths may differ.

    d[i, j] = ||f_i - f_j||_2 on each side, divided by that side's mean over the pairs with d > 0 (the diagonal
    is 0); loss = mean over all B*B entries of Huber(d_s, d_t) (F.smooth_l1_loss, beta 1), as the reference code
    (lenscloth/RKD, `RkdDistance`)."""
    _check_pair(fs, ft, "rkd_distance")
    with torch.no_grad():
        d_t = _pairwise_distances(ft.detach().float(), eps)
        d_t = d_t / d_t[d_t > 0].mean()
    d_s = _pairwise_distances(fs.float(), eps)
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def _angles(f: Tensor) -> Tensor:
    """(B, D) -> (B * B * B,): cos of the angle at vertex j between i and k, <e_ij, e_kj>, e = unit difference."""
    e = F.normalize(f[None, :, :] - f[:, None, :], p=2, dim=2)  # e[j, i] = (f_i - f_j) / ||f_i - f_j||
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)


def rkd_angle(fs: Tensor, ft: Tensor) -> Tensor:
    """Relational KD, angle-wise term (Park et al. 2019), on fs (B, D_s) and ft (B, D_t); widths may differ.

    For every triplet (i, j, k), cos angle_ijk = <e_ij, e_kj> with e_ij = (f_i - f_j) / ||f_i - f_j||
    (0 when i = j); loss = mean over all B^3 triplets of Huber(cos_s, cos_t) (F.smooth_l1_loss, beta 1), as the
    reference code (lenscloth/RKD, `RKdAngle`). Memory grows as B^2 D."""
    _check_pair(fs, ft, "rkd_angle")
    with torch.no_grad():
        a_t = _angles(ft.detach().float())
    return F.smooth_l1_loss(_angles(fs.float()), a_t)
