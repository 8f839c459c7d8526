"""Feature (intermediate) distillation, METHODS.md section 2."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def hidden_cosine(
    hs: tuple[Tensor, ...] | None, ht: tuple[Tensor, ...] | None, mask: Tensor | None, layer_map: dict[int, int]
) -> Tensor:
    """METHODS.md 2.2 (DistilBERT): mean over mapped layers of 1 - cos(h_s, h_t) per real token.

    hs / ht: hidden states, embeddings first, each (B, T, H) (same width: the student keeps the
    teacher's); layer_map: student hidden-state index -> teacher hidden-state index;
    mask: (B, T), padding never contributes."""
    if hs is None or ht is None:
        raise ValueError("hidden_cosine needs hidden states from both models")
    total = hs[0].new_zeros((), dtype=hs[0].dtype).float()
    for s_idx, t_idx in layer_map.items():
        cos = F.cosine_similarity(hs[s_idx].float(), ht[t_idx].detach().float(), dim=-1)  # (B, T)
        if mask is None:
            total = total + (1 - cos).mean()
        else:
            m = mask.to(cos.dtype)
            total = total + ((1 - cos) * m).sum() / m.sum().clamp_min(1)
    return total / max(len(layer_map), 1)
