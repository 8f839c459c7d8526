"""Vocabulary pruning on a tiny WordPiece tokenizer and a tiny BERT classifier, built in code."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kdpipe.compress.vocab import (
    VocabPlan,
    coverage,
    embedding_params,
    plan_vocab,
    prune,
    prune_embeddings,
    prune_tokenizer,
    token_counts,
)
from kdpipe.errors import ConfigError, ModelError

# "zzz" sits before the specials and is never used, so pruning it renumbers every special token
VOCAB = ["zzz", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "the", "a", "is", "cat", "dog", "good", "bad", "play", "##ing", "##ed", "##s",
    "sing", "playing", "un", "##happy", "happy", "fast", "slow",
]  # fmt: skip
IDS = {t: i for i, t in enumerate(VOCAB)}
CORPUS = ["the cat is singing", "a good dog plays", "the dog is happy", "the cat plays"]
SPECIAL_IDS = [IDS[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
USED = ["the", "cat", "is", "sing", "##ing", "a", "good", "dog", "play", "##s", "happy"]
MAX_LEN = 16


def wordpiece_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(IDS, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", IDS["[CLS]"]), ("[SEP]", IDS["[SEP]"])],
    )
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", model_max_length=64, **specials)


def classifier(seed: int = 0) -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=IDS["[PAD]"],
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def tok() -> Any:
    return wordpiece_tokenizer()


@pytest.fixture(scope="module")
def plan(tok: Any) -> VocabPlan:
    return plan_vocab(tok, token_counts(tok, CORPUS, MAX_LEN))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pruned")


@pytest.fixture(scope="module")
def new_tok(tok: Any, plan: VocabPlan, pruned_dir: Path) -> Any:
    return prune_tokenizer(tok, plan, pruned_dir)


def old_ids(tok: Any, text: str, max_length: int = MAX_LEN) -> list[int]:
    return list(tok(text, truncation=True, max_length=max_length)["input_ids"])


def test_module_imports_without_torch() -> None:
    code = "import sys, kdpipe.compress.vocab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_counts_are_the_tokens_the_model_sees(tok: Any) -> None:
    counts = token_counts(tok, CORPUS, MAX_LEN)
    assert counts[IDS["[CLS]"]] == counts[IDS["[SEP]"]] == len(CORPUS)
    assert counts[IDS["the"]] == 3 and counts[IDS["play"]] == 2 and counts[IDS["##s"]] == 2
    assert sum(counts.values()) == sum(len(old_ids(tok, t)) for t in CORPUS)
    assert IDS["playing"] not in counts and IDS["[PAD]"] not in counts


def test_plan_keeps_every_special_token_and_exactly_the_used_ids(tok: Any, plan: VocabPlan) -> None:
    assert plan.old_size == len(VOCAB)
    assert plan.kept == sorted(SPECIAL_IDS + [IDS[t] for t in USED])
    assert plan.size == 5 + len(USED) == len(plan.old_to_new)
    assert plan.old_to_new[IDS["[PAD]"]] == 0 and plan.old_to_new[IDS["the"]] == 5  # old order kept
    assert IDS["zzz"] not in plan.old_to_new and IDS["playing"] not in plan.old_to_new


def test_min_count_and_max_size(tok: Any) -> None:
    counts = token_counts(tok, CORPUS, MAX_LEN)
    frequent = plan_vocab(tok, counts, min_count=2)
    assert frequent.kept == sorted(SPECIAL_IDS + [IDS[t] for t in ("the", "cat", "is", "dog", "play", "##s")])
    # max_size counts the specials: 5 specials + the 2 most frequent ("the": 3; then the 2s, lowest old id first)
    capped = plan_vocab(tok, counts, max_size=7)
    assert capped.kept == sorted(SPECIAL_IDS + [IDS["the"], IDS["is"]])
    assert plan_vocab(tok, counts, max_size=5).kept == sorted(SPECIAL_IDS)
    with pytest.raises(ConfigError, match="special tokens"):
        plan_vocab(tok, counts, max_size=4)
    with pytest.raises(ConfigError, match="min_count"):
        plan_vocab(tok, counts, min_count=0)
    with pytest.raises(ModelError, match="outside"):
        plan_vocab(tok, counts + collections.Counter({len(VOCAB): 1}))


def test_plan_rejects_unsorted_or_out_of_range_ids() -> None:
    with pytest.raises(ModelError, match="ascending"):
        VocabPlan(kept=[3, 1], old_size=5)
    with pytest.raises(ModelError, match="outside"):
        VocabPlan(kept=[1, 5], old_size=5)


def test_coverage_is_one_on_the_corpus_and_hand_computed_on_unseen_words(tok: Any, plan: VocabPlan) -> None:
    assert coverage(plan, tok, CORPUS, MAX_LEN) == 1.0
    # [CLS] the bad cat play ##ed [SEP]: "bad" and "##ed" are pruned -> 5 of 7
    assert old_ids(tok, "the bad cat played") == [
        IDS[t] for t in ("[CLS]", "the", "bad", "cat", "play", "##ed", "[SEP]")
    ]
    assert coverage(plan, tok, ["the bad cat played"], MAX_LEN) == pytest.approx(5 / 7)
    # two texts pool their tokens: 5 + 5 kept of 7 + 5
    assert coverage(plan, tok, ["the bad cat played", "the good cat"], MAX_LEN) == pytest.approx(10 / 12)


def test_pruned_tokenizer_gives_the_remapped_ids_on_the_corpus(tok: Any, plan: VocabPlan, new_tok: Any) -> None:
    remap = plan.old_to_new
    assert len(new_tok) == plan.size
    for text in CORPUS:
        assert new_tok(text)["input_ids"] == [remap[i] for i in old_ids(tok, text)], text
    pair_old = tok("the cat", "a dog")
    pair_new = new_tok("the cat", "a dog")
    assert pair_new["input_ids"] == [remap[i] for i in pair_old["input_ids"]]
    assert pair_new["token_type_ids"] == pair_old["token_type_ids"]


def test_pruned_tokenizer_maps_pruned_pieces_to_unk(tok: Any, plan: VocabPlan, new_tok: Any) -> None:
    remap = plan.old_to_new
    unk = new_tok.unk_token_id
    assert unk == remap[IDS["[UNK]"]] and new_tok.pad_token_id == remap[IDS["[PAD]"]] == 0
    new = new_tok("the bad cat played")["input_ids"]
    # "bad" is pruned; "played" cannot be split without "##ed": WordPiece makes the whole word [UNK]
    assert new == [remap[IDS[t]] for t in ("[CLS]", "the")] + [unk, remap[IDS["cat"]], unk, remap[IDS["[SEP]"]]]
    # "playing" was one piece; pruned, it is split from the kept pieces (documented behaviour)
    assert old_ids(tok, "playing")[1:-1] == [IDS["playing"]]
    assert new_tok("playing")["input_ids"][1:-1] == [remap[IDS["play"]], remap[IDS["##ing"]]]
    assert new_tok.convert_ids_to_tokens(new_tok("zzz unhappy")["input_ids"]) == ["[CLS]", "[UNK]", "[UNK]", "[SEP]"]


def test_saved_tokenizer_reloads_and_behaves_the_same(new_tok: Any, pruned_dir: Path) -> None:
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(pruned_dir)
    texts = [*CORPUS, "the bad cat played", "playing unhappy"]
    assert again(texts, padding=True)["input_ids"] == new_tok(texts, padding=True)["input_ids"]
    padded = again(["the cat", "the cat is singing"], padding=True)
    assert padded["input_ids"][0][-1] == again.pad_token_id == 0
    assert again.special_tokens_map == new_tok.special_tokens_map and len(again) == len(new_tok)


def test_truncation_that_cuts_a_word_keeps_its_split(tok: Any, tmp_path: Path) -> None:
    """With max_length=4 "singing" is cut after "sing": "##ing" must still be kept, or the pruned
    tokenizer would make the visible "sing" an [UNK]."""
    text = "a singing"
    assert old_ids(tok, text, 4) == [IDS[t] for t in ("[CLS]", "a", "sing", "[SEP]")]
    plan = plan_vocab(tok, token_counts(tok, [text], 4))
    assert IDS["##ing"] in plan.kept
    new = prune_tokenizer(tok, plan, tmp_path)
    assert new(text, truncation=True, max_length=4)["input_ids"] == [plan.old_to_new[i] for i in old_ids(tok, text, 4)]


def _logits(model: Any, batch: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(**batch).logits


def test_pruned_model_computes_the_original_logits(tok: Any, plan: VocabPlan, new_tok: Any) -> None:
    import torch

    original, pruned = classifier(), prune_embeddings(classifier(), plan)
    old_batch = tok(CORPUS, padding=True, return_tensors="pt")
    new_batch = new_tok(CORPUS, padding=True, return_tensors="pt")
    remap = plan.old_to_new
    assert new_batch["input_ids"].tolist() == [[remap[i] for i in row] for row in old_batch["input_ids"].tolist()]
    assert pruned.get_input_embeddings().weight.shape == (plan.size, 32)
    assert pruned.config.vocab_size == plan.size and pruned.config.pad_token_id == 0
    assert pruned.get_input_embeddings().padding_idx == 0
    torch.testing.assert_close(_logits(pruned, new_batch), _logits(original, old_batch))


def test_a_wrong_plan_changes_the_logits(tok: Any, plan: VocabPlan, new_tok: Any) -> None:
    """Shift one used id to its unused neighbour: the slice takes the wrong row and the logits move."""
    import torch

    kept = list(plan.kept)
    j = kept.index(IDS["good"])
    assert IDS["bad"] == IDS["good"] + 1 and IDS["bad"] not in kept
    kept[j] = IDS["bad"]
    wrong = prune_embeddings(classifier(), VocabPlan(kept=kept, old_size=plan.old_size))
    old_batch = tok(CORPUS, padding=True, return_tensors="pt")
    new_batch = new_tok(CORPUS, padding=True, return_tensors="pt")
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_logits(wrong, new_batch), _logits(classifier(), old_batch))


def test_pruned_model_round_trips_through_save_pretrained(plan: VocabPlan, new_tok: Any, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    pruned = prune_embeddings(classifier(), plan)
    pruned.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert again.config.vocab_size == plan.size
    assert again.get_input_embeddings().weight.shape[0] == plan.size
    batch = new_tok(CORPUS, padding=True, return_tensors="pt")
    torch.testing.assert_close(_logits(again, batch), _logits(pruned, batch))


def test_prune_in_one_call(tok: Any, tmp_path: Path) -> None:
    import torch

    model, new, plan = prune(classifier(), tok, CORPUS, MAX_LEN, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and len(new) == plan.size == model.config.vocab_size
    old_batch = tok(CORPUS, padding=True, return_tensors="pt")
    torch.testing.assert_close(
        _logits(model, new(CORPUS, padding=True, return_tensors="pt")), _logits(classifier(), old_batch)
    )
    assert embedding_params(plan, 32) == (len(VOCAB) * 32, plan.size * 32)


def test_non_wordpiece_tokenizers_are_refused(plan: VocabPlan, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import make_tokenizer

    word_level = make_tokenizer()
    with pytest.raises(ModelError, match="WordPiece tokenizers only.*WordLevel"):
        prune_tokenizer(word_level, plan_vocab(word_level, token_counts(word_level, ["good car"], 8)), tmp_path)
    bpe_backend = Tokenizer(models.BPE({"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="[UNK]"))
    bpe_backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe = PreTrainedTokenizerFast(tokenizer_object=bpe_backend, unk_token="[UNK]")
    with pytest.raises(ModelError, match="WordPiece tokenizers only.*BPE"):
        prune_tokenizer(bpe, plan_vocab(bpe, token_counts(bpe, ["ab"], 8)), tmp_path)


def test_a_model_with_a_language_model_head_is_refused(plan: VocabPlan) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    with pytest.raises(ModelError, match="output embeddings"):
        prune_embeddings(BertForMaskedLM(config), plan)
