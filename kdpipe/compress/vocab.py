"""Vocabulary pruning: shrink a student's word-embedding table to the tokens its corpus uses.

A BERT-style student keeps the teacher's full word-embedding table (30,522 x 384 for MiniLM, most
of its parameters) although a task corpus uses a few thousand word pieces. Pruning keeps the special
tokens and the used pieces, renumbers them 0..K-1 in their old order, and writes a tokenizer and an
embedding table of K rows that agree with each other:

    counts = token_counts(tok, train_texts, max_length)
    plan = plan_vocab(tok, counts)                       # kept old ids, ascending
    new_tok = prune_tokenizer(tok, plan, out_dir)        # text -> new ids (0..K-1)
    model = prune_embeddings(model, plan)                # embedding rows in new-id order

The contract: on every text the plan was counted from, `new_tok` gives `[plan.old_to_new[i] for i in
old_ids]` exactly (same max_length), so the pruned model computes what the original computed. On
other text a pruned piece cannot be produced; WordPiece then either splits the word differently
from the kept pieces or, when it cannot split it at all, makes the whole word one `[UNK]`.
Only WordPiece tokenizers (BERT, MiniLM, DistilBERT) are supported.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.errors import ConfigError, ModelError

# config attributes that hold token ids and must follow the renumbering
_CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")


@dataclass(frozen=True)
class VocabPlan:
    """Which old token ids survive pruning.

    kept: the kept old ids, strictly ascending; the new id of kept[j] is j, so new ids keep the old order.
    old_size: the original vocabulary size (len(tokenizer)); every kept id is below it."""

    kept: list[int]
    old_size: int

    def __post_init__(self) -> None:
        if any(b <= a for a, b in zip(self.kept, self.kept[1:], strict=False)):
            raise ModelError("VocabPlan.kept must be strictly ascending old ids", "build plans with plan_vocab()")
        if self.kept and not (self.kept[0] >= 0 and self.kept[-1] < self.old_size):
            raise ModelError(
                f"VocabPlan.kept has ids outside 0..{self.old_size - 1}", "count tokens with the same tokenizer"
            )

    @property
    def size(self) -> int:
        """K, the pruned vocabulary size."""
        return len(self.kept)

    @property
    def old_to_new(self) -> dict[int, int]:
        """Old id -> new id for every kept id (K entries; pruned ids are absent)."""
        return {old: new for new, old in enumerate(self.kept)}


def _boundary_extras(full_ids: list[int], words: list[int | None], start: int, end: int) -> list[int]:
    """The ids of full_ids outside [start, end) that belong to a word cut by that window.

    full_ids, words: one text's untruncated content ids and their word indices (same length L)."""
    cut = set()
    if 0 < start < len(words) and words[start] is not None and words[start - 1] == words[start]:
        cut.add(words[start])
    if 0 < end < len(words) and words[end - 1] is not None and words[end] == words[end - 1]:
        cut.add(words[end - 1])
    return [i for j, i in enumerate(full_ids) if words[j] in cut and not start <= j < end]


def token_counts(tokenizer: Any, texts: list[str], max_length: int) -> collections.Counter[int]:
    """How often each token id occurs in `texts` tokenised as the model sees them.

    Each text is encoded with special tokens and truncation at max_length (no padding). A word that the
    truncation cuts in two also has its cut-off pieces counted: without them the pruned WordPiece could
    not split that word the same way and would turn the visible part into [UNK] as well.
    Returns old token id -> count."""
    counts: collections.Counter[int] = collections.Counter()
    if not texts:
        return counts
    seen = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    full = tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    for row, ids in enumerate(seen["input_ids"]):
        counts.update(ids)
        content = sum(w is not None for w in seen.word_ids(row))
        full_ids, words = full["input_ids"][row], full.word_ids(row)
        if content < len(full_ids):
            start = len(full_ids) - content if left else 0
            counts.update(_boundary_extras(full_ids, words, start, start + content))
    return counts


def plan_vocab(
    tokenizer: Any, counts: collections.Counter[int], min_count: int = 1, max_size: int | None = None
) -> VocabPlan:
    """The ids to keep: every special token id, plus the ids counted at least min_count times.

    max_size caps K, the TOTAL kept size including the special tokens (K is the embedding rows): the
    specials always stay and the remaining max_size - n_special slots go to the most frequent ids (ties:
    lower old id first). counts: old id -> count, e.g. from token_counts()."""
    if min_count < 1:
        raise ConfigError(f"min_count={min_count} must be at least 1", "use min_count=1 to keep every used token")
    old_size = len(tokenizer)
    bad = sorted(i for i in counts if not 0 <= i < old_size)
    if bad:
        raise ModelError(
            f"token counts hold ids {bad[:5]} outside this tokenizer's vocabulary 0..{old_size - 1}",
            "count tokens with the tokenizer you prune",
        )
    special = set(tokenizer.all_special_ids)
    used = [i for i, c in counts.items() if c >= min_count and i not in special]
    ranked = sorted(used, key=lambda i: (-counts[i], i))
    if max_size is not None:
        if max_size < len(special):
            raise ConfigError(
                f"max_size={max_size} is below the {len(special)} special tokens, which are always kept",
                f"use max_size >= {len(special)}",
            )
        ranked = ranked[: max_size - len(special)]
    return VocabPlan(kept=sorted(special | set(ranked)), old_size=old_size)


def coverage(plan: VocabPlan, tokenizer: Any, texts: list[str], max_length: int) -> float:
    """The share of the tokens of `texts` (original tokenizer, special tokens included, truncated at
    max_length, no padding) whose id the plan keeps; 1.0 for no tokens.

    An upper bound on what the pruned tokenizer preserves: a word with one pruned piece becomes one
    [UNK] (or a different split), so it loses all its pieces, not just the pruned one."""
    if not texts:
        return 1.0
    kept = set(plan.kept)
    ids = [i for row in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] for i in row]
    return sum(i in kept for i in ids) / len(ids) if ids else 1.0


def _remap_post_processor(node: Any, old_to_new: dict[int, int]) -> None:
    """Renumber, in place, the token ids inside a post_processor JSON node (TemplateProcessing's
    special_tokens ids, BertProcessing/RobertaProcessing's cls/sep pairs, Sequence's processors)."""
    if not isinstance(node, dict):
        return
    for spec in (node.get("special_tokens") or {}).values():
        spec["ids"] = [_new_id(i, spec.get("id", "?"), old_to_new) for i in spec["ids"]]
    for key in ("cls", "sep"):
        if isinstance(node.get(key), list) and len(node[key]) == 2:
            node[key] = [node[key][0], _new_id(node[key][1], node[key][0], old_to_new)]
    for child in node.get("processors") or []:
        _remap_post_processor(child, old_to_new)


def _new_id(old: int, token: str, old_to_new: dict[int, int]) -> int:
    """old_to_new[old], or a ModelError naming the token when the plan dropped it."""
    if old not in old_to_new:
        raise ModelError(
            f"the tokenizer's post-processor adds token {token!r} (id {old}) that the plan prunes",
            "keep it: plan_vocab() keeps every tokenizer.all_special_ids",
        )
    return old_to_new[old]


def _pruned_json(tokenizer: Any, plan: VocabPlan) -> str:
    """The fast tokenizer's JSON with the WordPiece vocab cut to the kept tokens, renumbered 0..K-1."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            f"{type(tokenizer).__name__} is not a fast tokenizer", "load it with AutoTokenizer(..., use_fast=True)"
        )
    doc = json.loads(backend.to_str())
    kind = doc["model"].get("type")
    if kind != "WordPiece":
        raise ModelError(
            f"vocabulary pruning supports WordPiece tokenizers only; this tokenizer's model is {kind}",
            "use a BERT/MiniLM/DistilBERT-style (WordPiece) tokenizer, or skip vocabulary pruning",
        )
    tokens = tokenizer.convert_ids_to_tokens(plan.kept)
    if None in tokens:
        raise ModelError("the plan keeps ids with no token in this tokenizer", "build the plan from this tokenizer")
    old_to_new = plan.old_to_new
    vocab = {tok: new for new, tok in enumerate(tokens)}
    unk = doc["model"].get("unk_token")
    if unk not in vocab:
        raise ModelError(f"the plan prunes the unknown token {unk!r}", "keep every tokenizer.all_special_ids")
    doc["model"]["vocab"] = vocab
    doc["added_tokens"] = [
        {**t, "id": old_to_new[t["id"]]} for t in doc.get("added_tokens") or [] if t["id"] in old_to_new
    ]
    _remap_post_processor(doc.get("post_processor"), old_to_new)
    # transformers sets truncation and padding per call; stale ones would carry the old pad id
    doc["truncation"] = doc["padding"] = None
    return json.dumps(doc, ensure_ascii=False)


def prune_tokenizer(tokenizer: Any, plan: VocabPlan, out_dir: Path) -> Any:
    """A tokenizer whose vocabulary is exactly the kept tokens, new id j for old id plan.kept[j]; saved to out_dir.

    On a text whose pieces are all kept it gives old_to_new of the original ids (WordPiece is greedy
    longest-match and the kept pieces include every piece of the original split). A pruned piece is
    never produced: such a word is split from the kept pieces or, when it cannot be, is one [UNK].
    Added tokens whose id is pruned are dropped. Returns a transformers.PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_pruned_json(tokenizer, plan))
    new = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        model_input_names=list(tokenizer.model_input_names),
        clean_up_tokenization_spaces=getattr(tokenizer, "clean_up_tokenization_spaces", False),
        **tokenizer.special_tokens_map,
    )
    if len(new) != plan.size:
        raise ModelError(f"the pruned tokenizer has {len(new)} tokens, expected {plan.size}", "report this as a bug")
    new.save_pretrained(out_dir)
    return new


def _remap_config_ids(config: Any, old_to_new: dict[int, int]) -> None:
    """Renumber the token ids the config names (pad_token_id, ...); refuse one the plan prunes."""
    for name in _CONFIG_TOKEN_IDS:
        old = getattr(config, name, None)
        if isinstance(old, int):
            if old not in old_to_new:
                raise ModelError(f"the model's config.{name}={old} is pruned by the plan", "keep that token id")
            setattr(config, name, old_to_new[old])


def prune_embeddings(model: Any, plan: VocabPlan) -> Any:
    """The model with its word-embedding table cut to the kept rows: [V, H] -> [K, H], row j = old row kept[j].

    Sets config.vocab_size = K and renumbers config.pad_token_id (the embedding's padding_idx) and the
    other token ids the config names. Refuses a model with output embeddings (an MLM/LM head tied to
    the table), whose decoder would need the same cut. Modifies and returns `model`."""
    import torch

    if model.get_output_embeddings() is not None:
        raise ModelError(
            f"{type(model).__name__} has output embeddings (a language-model head); pruning supports classifiers",
            "prune a *ForSequenceClassification model",
        )
    old = model.get_input_embeddings()
    rows = old.weight.shape[0]
    if rows < plan.old_size:
        raise ModelError(
            f"the model has {rows} embedding rows but the tokenizer {plan.old_size} tokens",
            "prune the model with the tokenizer it was trained with",
        )
    old_to_new = plan.old_to_new
    pad = old.padding_idx
    if pad is not None and pad not in old_to_new:
        raise ModelError(f"the embedding's padding_idx {pad} is pruned by the plan", "keep the pad token")
    _remap_config_ids(model.config, old_to_new)
    index = torch.tensor(plan.kept, dtype=torch.long, device=old.weight.device)
    new = torch.nn.Embedding(
        plan.size,
        old.embedding_dim,
        padding_idx=None if pad is None else old_to_new[pad],
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.index_select(0, index))
    model.set_input_embeddings(new)
    model.config.vocab_size = plan.size
    return model


def prune(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    out_dir: Path,
    min_count: int = 1,
    max_size: int | None = None,
) -> tuple[Any, Any, VocabPlan]:
    """Count `texts`, plan, prune the tokenizer (saved to out_dir) and the model's embeddings (in place).

    Returns (model, pruned tokenizer, plan). The model is not saved: model.save_pretrained(out_dir)
    completes out_dir as a model directory."""
    plan = plan_vocab(tokenizer, token_counts(tokenizer, texts, max_length), min_count, max_size)
    new_tokenizer = prune_tokenizer(tokenizer, plan, out_dir)
    return prune_embeddings(model, plan), new_tokenizer, plan


def embedding_params(plan: VocabPlan, hidden: int) -> tuple[int, int]:
    """(before, after) word-embedding parameter counts for a hidden size: old_size*hidden, K*hidden."""
    return plan.old_size * hidden, plan.size * hidden


__all__ = [
    "VocabPlan",
    "coverage",
    "embedding_params",
    "plan_vocab",
    "prune",
    "prune_embeddings",
    "prune_tokenizer",
    "token_counts",
]
