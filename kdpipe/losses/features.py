"""Feature (intermediate) distillation, docs/methods.md §2.

Hidden states come as a tuple, embeddings first, then one (B, T, H) per layer (so hidden-state
index = layer number); attentions as a tuple of (B, heads, T, T), one per layer, 0-based. mask is
(B, T) with 1 on real tokens: padding never contributes. Everything is computed in float32 and the
teacher's tensors are detached here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.losses.masks import masked_mean, masked_sum


def hidden_cosine(
    hs: tuple[Tensor, ...] | None, ht: tuple[Tensor, ...] | None, mask: Tensor | None, layer_map: dict[int, int]
) -> Tensor:
    """docs/methods.md §2.2 (DistilBERT): mean over mapped layers of 1 - cos(h_s, h_t) per real token.

    hs / ht: hidden states, embeddings first, each (B, T, H) (same width: the student keeps the
    teacher's); layer_map: student hidden-state index -> teacher hidden-state index;
    mask: (B, T), padding never contributes (selected out: even NaN / inf there cannot leak in)."""
    if hs is None or ht is None:
        raise ValueError("hidden_cosine needs hidden states from both models")
    total = hs[0].new_zeros((), dtype=hs[0].dtype).float()
    for s_idx, t_idx in layer_map.items():
        cos = F.cosine_similarity(hs[s_idx].float(), ht[t_idx].detach().float(), dim=-1)  # (B, T)
        total = total + masked_mean(1 - cos, mask)
    return total / max(len(layer_map), 1)


def _need(states: Sequence[Tensor] | None, what: str, fn: str) -> Sequence[Tensor]:
    if states is None:
        raise ValueError(f"{fn} needs {what} from both models")
    return states


def _cls_pair(hs: Sequence[Tensor], ht: Sequence[Tensor], s_idx: int, t_idx: int, fn: str) -> tuple[Tensor, Tensor]:
    """The [CLS] vectors (position 0), (B, H) each; widths must match (no projection here)."""
    s, t = hs[s_idx][:, 0].float(), ht[t_idx][:, 0].detach().float()
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"{fn}: student hidden width {s.shape[-1]} (index {s_idx}) differs from the teacher's "
            f"{t.shape[-1]} (index {t_idx})"
        )
    return s, t


def cls_mse_normalised(
    hs: Sequence[Tensor] | None, ht: Sequence[Tensor] | None, pairs: Sequence[tuple[int, int]]
) -> Tensor:
    """docs/methods.md §2.1 (Patient KD) L_PT: for each (student index, teacher index) in `pairs`,
    || h_s/||h_s|| - h_t/||h_t|| ||^2 on the [CLS] vectors, summed over the hidden dim, mean over the
    batch, SUMMED over pairs (as the formula; so the value grows with the number of pairs).

    hs / ht: hidden states, embeddings first, each (B, T, H); pairs from `pkd_pairs`."""
    hs, ht = _need(hs, "hidden states", "cls_mse_normalised"), _need(ht, "hidden states", "cls_mse_normalised")
    total = torch.zeros((), device=hs[0].device)
    for s_idx, t_idx in pairs:
        s, t = _cls_pair(hs, ht, s_idx, t_idx, "cls_mse_normalised")
        total = total + ((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2).sum(-1).mean()
    return total


def pkd_pairs(n_student: int, n_teacher: int, variant: Literal["skip", "last"]) -> list[tuple[int, int]]:
    """docs/methods.md §2.1: (student, teacher) hidden-state index pairs for student layers 1..M-1 (every
    layer except the last, whose output is distilled through the logits). Index = layer number,
    since hidden-state index 0 is the embeddings.

    skip: student layer j -> teacher layer floor(j N / M) (every (N/M)-th layer; for 12 -> 6:
    2, 4, 6, 8, 10; when M does not divide N the floor keeps the map strictly increasing).
    last: student layer j -> teacher layer N - M + j (the top M-1 below the last; 12 -> 6: 7..11).
    Raises ValueError when no map exists: fewer than 2 student layers, or a student deeper than
    its teacher."""
    if n_student < 2:
        raise ValueError(f"PKD needs a student with at least 2 layers (got {n_student}): only the last would be left")
    if n_teacher < n_student:
        raise ValueError(f"PKD maps student layers into teacher layers: student {n_student} > teacher {n_teacher}")
    js = range(1, n_student)
    if variant == "skip":
        return [(j, j * n_teacher // n_student) for j in js]
    if variant == "last":
        return [(j, n_teacher - n_student + j) for j in js]
    raise ValueError(f"unknown PKD variant {variant!r}: use 'skip' or 'last'")


class Projection(nn.Module):
    """A learned linear map d_in -> d_out applied to the last dim (..., d_in) -> (..., d_out):
    TinyBERT's W_e / W_h and FitNets' regressor. Always a real Linear, even when d_in == d_out
    (whether to project at all is the caller's choice); no bias by default, as TinyBERT's W."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def maybe_projection(d_in: int, d_out: int, always: bool = False) -> nn.Module:
    """A learned `Projection` d_in -> d_out when the widths differ (or `always`), otherwise the identity."""
    return Projection(d_in, d_out) if always or d_in != d_out else nn.Identity()


def _masked_token_mse(s: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over the hidden dim and the real tokens: (B, T, H) x2 -> ()."""
    if s.shape != t.shape:
        raise ValueError(
            f"student states {tuple(s.shape)} and teacher states {tuple(t.shape)} differ "
            "(give a projection when the widths differ)"
        )
    per_tok = ((s - t) ** 2).mean(-1)  # (B, T)
    return masked_mean(per_tok, mask)


def hidden_mse(
    hs: Sequence[Tensor] | None,
    ht: Sequence[Tensor] | None,
    layer_map: dict[int, int],
    mask: Tensor | None,
    proj: nn.Module | None = None,
) -> Tensor:
    """docs/methods.md §2.3 (TinyBERT) L_embd (index 0) / L_hidn: MSE(H_s W, H_t) per mapped pair,
    averaged over real tokens and the hidden dim, mean over pairs.

    layer_map: student hidden-state index -> teacher hidden-state index; proj (e.g. `Projection`)
    is applied to the student states when given (one shared W for every pair; call once per pair
    with its own proj for per-layer W)."""
    hs, ht = _need(hs, "hidden states", "hidden_mse"), _need(ht, "hidden states", "hidden_mse")
    total = torch.zeros((), device=hs[0].device)
    for s_idx, t_idx in layer_map.items():
        s = hs[s_idx].float()
        if proj is not None:
            s = proj(s)
        total = total + _masked_token_mse(s, ht[t_idx].detach().float(), mask)
    return total / max(len(layer_map), 1)


def _check_heads(a_s: Tensor, a_t: Tensor, fn: str) -> None:
    if a_s.dim() != 4 or a_t.dim() != 4:
        raise ValueError(f"{fn}: attentions must be (B, heads, T, T), got {tuple(a_s.shape)} and {tuple(a_t.shape)}")
    if a_s.shape[1] != a_t.shape[1]:
        raise ValueError(
            f"{fn}: student has {a_s.shape[1]} attention heads and teacher has {a_t.shape[1]}; "
            "head-by-head matching needs equal head counts"
        )
    if a_s.shape != a_t.shape:
        raise ValueError(f"{fn}: student attention {tuple(a_s.shape)} and teacher {tuple(a_t.shape)} differ")


def _real_rows_cols(mask: Tensor | None, a: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean (B, 1, T, 1) real query rows and (B, 1, 1, T) real key columns."""
    real = torch.ones(a.shape[0], a.shape[-1], dtype=torch.bool, device=a.device) if mask is None else mask.bool()
    return real[:, None, :, None], real[:, None, None, :]


def attention_mse(
    as_: Sequence[Tensor] | None, at: Sequence[Tensor] | None, layer_map: dict[int, int], mask: Tensor | None
) -> Tensor:
    """docs/methods.md §2.3 (TinyBERT) L_attn = (1/h) sum_heads MSE(A_s, A_t), mean over mapped pairs.

    as_ / at: attentions, one (B, heads, T, T) per layer. layer_map is over ATTENTION indices,
    0-based: student layer m (hidden-state index m) has attention as_[m - 1], so a hidden-state map
    {m: n} becomes {m - 1: n - 1} here. Only entries whose query row AND key column are real tokens
    count; each head's MSE pools those entries over the batch. Head counts must be equal."""
    as_, at = _need(as_, "attentions", "attention_mse"), _need(at, "attentions", "attention_mse")
    total = torch.zeros((), device=as_[0].device)
    for s_idx, t_idx in layer_map.items():
        a_s, a_t = as_[s_idx].float(), at[t_idx].detach().float()
        _check_heads(a_s, a_t, "attention_mse")
        rows, cols = _real_rows_cols(mask, a_s)
        # every head has the same valid entries, so (1/h) sum_h mean_valid = one mean over all of them
        total = total + masked_mean((a_s - a_t) ** 2, rows & cols)
    return total / max(len(layer_map), 1)


def attention_kl(
    as_: Sequence[Tensor] | None,
    at: Sequence[Tensor] | None,
    layer_map: dict[int, int],
    mask: Tensor | None,
    eps: float = 1e-10,
) -> Tensor:
    """docs/methods.md §2.4 (Aguilar et al.): per matched layer and head, the mean over real query rows i
    of KL(A_t[i] || A_s[i]); mean over heads and pairs.

    layer_map over ATTENTION indices, 0-based (see `attention_mse`). The KL sums over real key
    columns only (masked keys contribute 0; the rows are not renormalised, since a model that masks
    its padding puts ~0 there anyway). Probabilities are clamped at eps before the log because
    attention can be exactly 0; row means pool the real rows of the whole batch."""
    as_, at = _need(as_, "attentions", "attention_kl"), _need(at, "attentions", "attention_kl")
    total = torch.zeros((), device=as_[0].device)
    for s_idx, t_idx in layer_map.items():
        a_s, a_t = as_[s_idx].float(), at[t_idx].detach().float()
        _check_heads(a_s, a_t, "attention_kl")
        rows, cols = _real_rows_cols(mask, a_s)
        terms = a_t * (a_t.clamp_min(eps).log() - a_s.clamp_min(eps).log())
        kl_rows = masked_sum(terms, cols, dim=-1)  # (B, h, T)
        # each head has the same real rows: mean over (batch rows, heads) = mean over heads of row means
        total = total + masked_mean(kl_rows, rows[..., 0])
    return total / max(len(layer_map), 1)


def cls_cosine(hs: Sequence[Tensor] | None, ht: Sequence[Tensor] | None, pairs: Sequence[tuple[int, int]]) -> Tensor:
    """docs/methods.md §2.4: 1 - cos(h_s[:, 0], h_t[:, 0]) on the [CLS] vectors, mean over the batch and
    over (student index, teacher index) pairs (hidden-state indices, embeddings first)."""
    hs, ht = _need(hs, "hidden states", "cls_cosine"), _need(ht, "hidden states", "cls_cosine")
    total = torch.zeros((), device=hs[0].device)
    for s_idx, t_idx in pairs:
        s, t = _cls_pair(hs, ht, s_idx, t_idx, "cls_cosine")
        total = total + (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return total / max(len(pairs), 1)


def hint(
    hs: Sequence[Tensor] | None,
    ht: Sequence[Tensor] | None,
    s_idx: int,
    t_idx: int,
    regressor: nn.Module,
    mask: Tensor | None,
) -> Tensor:
    """docs/methods.md §2.5 (FitNets hint): MSE(regressor(h_s[s_idx]), h_t[t_idx]) averaged over the hidden
    dim and the real tokens. regressor maps the student width to the teacher's (e.g. `Projection`)."""
    hs, ht = _need(hs, "hidden states", "hint"), _need(ht, "hidden states", "hint")
    return _masked_token_mse(regressor(hs[s_idx].float()), ht[t_idx].detach().float(), mask)
