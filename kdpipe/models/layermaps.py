"""Layer maps between a student and its teacher, torch-free.

Hidden-state indices count the embeddings as 0, so hidden-state index = layer number (1-based);
`kept` lists 0-based teacher layers, one per student layer (docs/methods.md §2.3).
"""

from __future__ import annotations


def uniform_layers(m: int, n: int) -> list[int]:
    """0-based teacher layers for an m-layer student under the uniform map g(k) = k n / m (TinyBERT)."""
    return [max(1, round((i + 1) * n / m)) - 1 for i in range(m)]


def layer_map(kept: list[int]) -> dict[int, int]:
    """Student hidden-state index -> teacher hidden-state index (0 is the embeddings in both)."""
    return {0: 0, **{i + 1: t + 1 for i, t in enumerate(kept)}}
