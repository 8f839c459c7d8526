"""What a term reads from the normalised KDOutputs: the teacher's outputs, the labels, sentence features.

Labels are never guessed here: the training loop fills `KDOutputs.labels` (gold labels, or the
teacher's argmax on unlabeled rows), and a term that needs them fails clearly when they are missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import Tensor

from kdpipe.losses.masks import mean_pool

if TYPE_CHECKING:
    from kdpipe.models.loading import KDOutputs


def teacher(t: KDOutputs | None, term: str) -> KDOutputs:
    """The teacher's outputs, which every term but 'ce' needs."""
    if t is None:
        raise ValueError(f"the {term!r} loss term needs the teacher's outputs")
    return t


def labels(s: KDOutputs, term: str) -> Tensor:
    """s.labels (B,), which the training loop sets; ValueError when they are missing."""
    if s.labels is None:
        raise ValueError(
            f"the {term!r} loss term needs labels: the training loop sets KDOutputs.labels "
            "(the gold labels, or the teacher's argmax on unlabeled rows)"
        )
    return s.labels


def hidden(out: KDOutputs, term: str) -> tuple[Tensor, ...]:
    """The hidden states, embeddings first, each (B, T, H)."""
    if out.hidden_states is None:
        raise ValueError(f"the {term!r} loss term needs hidden states from both models")
    return out.hidden_states


def sentence_feature(h: Tensor, mask: Tensor | None, kind: Literal["cls", "mean"]) -> Tensor:
    """(B, T, H) -> (B, H): the [CLS] vector (position 0) or the mean over real tokens."""
    return h[:, 0] if kind == "cls" else mean_pool(h, mask)


def last_features(
    s: KDOutputs, t: KDOutputs, lm: dict[int, int], kind: Literal["cls", "mean"], term: str
) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's sentence features (B, H_s), (B, H_t) of the one mapped pair in
    `lm` (not detached: the relational losses detach the teacher's)."""
    ((m, n),) = lm.items()
    return (
        sentence_feature(hidden(s, term)[m], s.attention_mask, kind),
        sentence_feature(hidden(t, term)[n], t.attention_mask, kind),
    )
