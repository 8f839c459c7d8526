"""Transfer-set augmentation for text (docs/methods.md §1.2, Tang et al. 2019).

Per word: with probability p_mask it becomes the mask token; otherwise with probability p_replace it
is replaced by one of its nearest neighbours in the teacher's input-embedding space (standing in for
the paper's same-part-of-speech replacement: no POS tagger ships offline). Then, with probability
p_ngram, only a random n-gram (n in 1..ngram_max) of the example is kept. Each example yields n_iter
augmented copies. The teacher labels them (they carry no gold label: -1).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from kdpipe.data.tables import Split


class Neighbours:
    """Top-k cosine neighbours of whole-word vocabulary entries in an embedding matrix (V, H)."""

    def __init__(self, tokenizer: Any, embeddings: np.ndarray, k: int) -> None:
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens)
        self.words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        keep = np.array([w.isalpha() and w not in special and not w.startswith("##") for w in self.words])
        self.candidates = np.flatnonzero(keep)
        e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-8)
        self.cand_emb = e[self.candidates]
        self.emb, self.vocab, self.k = e, vocab, k
        self.cache: dict[str, list[str]] = {}

    def of(self, word: str) -> list[str]:
        if word not in self.cache:
            idx = self.vocab.get(word.lower())
            if idx is None:
                self.cache[word] = []
            else:
                sims = self.cand_emb @ self.emb[idx]
                top = np.argsort(-sims)[: self.k + 1]
                self.cache[word] = [self.words[self.candidates[i]] for i in top if self.candidates[i] != idx][: self.k]
        return self.cache[word]


def augment(split: Split, tokenizer: Any, embeddings: np.ndarray, cfg: Any, seed: int) -> Split:
    """The augmented copies only (n_iter per example), unlabeled (-1)."""
    rng = random.Random(seed)
    neighbours = Neighbours(tokenizer, embeddings, cfg.neighbours)
    mask = tokenizer.mask_token or tokenizer.unk_token
    out: list[str] = []
    for text in split.texts:
        words = text.split()
        for _ in range(cfg.n_iter):
            new = []
            for w in words:
                u = rng.random()
                if u < cfg.p_mask:
                    new.append(mask)
                elif u < cfg.p_mask + cfg.p_replace and (cands := neighbours.of(w)):
                    new.append(rng.choice(cands))
                else:
                    new.append(w)
            if rng.random() < cfg.p_ngram and len(new) > 1:
                n = rng.randint(1, min(cfg.ngram_max, len(new)))
                start = rng.randint(0, len(new) - n)
                new = new[start : start + n]
            out.append(" ".join(new))
    return Split(texts=out, labels=[-1] * len(out))
