"""Which decoder layers a shallower student keeps, scored on the teacher's hidden states over calibration text.

Two published criteria, both from one teacher forward pass with output_hidden_states (h_0 = the embeddings,
h_{i+1} = the output of layer i, 0-based), over real tokens only (attention_mask == 1):

- 'importance': ShortGPT's Block Influence (Men et al. 2024), BI_i = 1 - E_t[cos(h_{i,t}, h_{i+1,t})] for layer i:
  a layer that barely turns the residual stream matters least. The student keeps the k layers of highest BI.
- 'block': the angular distance of Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"),
  d(l, n) = E_t[arccos(cos(h_{l,t}, h_{l+n,t}))] / pi: the student drops the contiguous block of n = L - k layers
  l..l+n-1 whose input and output are most alike (smallest d), and keeps the rest.

Measured on SmolLM2-135M-Instruct (30 layers; 48 embedded-corpus texts; held-out perplexity before any training,
teacher 292): 15 kept layers: every-other 4.5e6, block 3.8e4, importance 7.9e3; 10 kept: every-other 6.3e6, block
4.6e4, importance 9.2e4 (DistilBERT's every-other init, which works for BERT, ruins a small decoder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdpipe.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch import Tensor

CRITERIA = ("importance", "block")


@dataclass(frozen=True)
class LayerScores:
    """The kept layers and what chose them: `scores[i]` is layer i's Block Influence ('importance'), or the angular
    distance of the block starting at layer i ('block')."""

    criterion: str
    kept: list[int]
    scores: list[float]
    tokens: int


def _real(hidden: Sequence[Tensor], mask: Tensor) -> list[Tensor]:
    """Each hidden state's real-token rows, (tokens, width) in float64."""
    keep = mask.bool()
    return [h[keep].double() for h in hidden]


def block_influence(hidden: Sequence[Tensor], mask: Tensor) -> list[float]:
    """BI of each layer: 1 - the mean cosine of its input and output over real tokens (len(hidden) - 1 values)."""
    import torch.nn.functional as F

    h = _real(hidden, mask)
    return [1.0 - float(F.cosine_similarity(h[i], h[i + 1], dim=-1).mean()) for i in range(len(h) - 1)]


def angular_distances(hidden: Sequence[Tensor], mask: Tensor, n: int) -> list[float]:
    """d(l, n) for every block start l in 0..L-n: mean arccos of the cosine of h_l and h_{l+n}, over pi."""
    import torch
    import torch.nn.functional as F

    h = _real(hidden, mask)
    out = []
    for start in range(len(h) - n):
        cos = F.cosine_similarity(h[start], h[start + n], dim=-1).clamp(-1.0, 1.0)
        out.append(float(torch.arccos(cos).mean()) / math.pi)
    return out


def choose(criterion: str, hidden: Sequence[Tensor], mask: Tensor, k: int) -> LayerScores:
    """The k layers (0-based, increasing) the criterion keeps, from one forward pass's hidden states (embeddings
    first, then each layer's output: len(hidden) = layers + 1) and its attention mask."""
    layers = len(hidden) - 1
    if criterion not in CRITERIA:
        raise ConfigError(f"student.layers: {criterion} is not a scored selection", f"use one of {', '.join(CRITERIA)}")
    if not 1 <= k <= layers:
        raise ConfigError(
            f"student.layers: {criterion} needs student.k in 1..{layers}", f"e.g. student.k: {layers // 2}"
        )
    tokens = int(mask.bool().sum())
    if tokens == 0:
        raise DataError("student.layers: no calibration token to score the layers on", "give non-empty train texts")
    if criterion == "importance":
        scores = block_influence(hidden, mask)
        if not all(math.isfinite(s) for s in scores):  # NaN fails: a broken teacher is not ranked
            raise DataError(f"student.layers: importance: a layer's Block Influence is not finite ({scores})",
                            "the teacher's hidden states hold NaN or inf; check the teacher")  # fmt: skip
        top = sorted(range(layers), key=lambda i: (-scores[i], i))[:k]
        return LayerScores(criterion, sorted(top), scores, tokens)
    n = layers - k
    if n == 0:
        return LayerScores(criterion, list(range(layers)), [], tokens)
    scores = angular_distances(hidden, mask, n)
    if not all(math.isfinite(s) for s in scores):
        raise DataError(f"student.layers: block: an angular distance is not finite ({scores})",
                        "the teacher's hidden states hold NaN or inf; check the teacher")  # fmt: skip
    start = min(range(len(scores)), key=lambda s: (scores[s], s))
    return LayerScores(criterion, [i for i in range(layers) if not start <= i < start + n], scores, tokens)
