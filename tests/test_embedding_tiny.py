"""Tiny sentence encoders built in code (no hub download), shared by the tests/test_embedding_*.py files, and the
check that what they build is what sentence-transformers itself builds and loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_VOCABULARY = """
the a is was this that my your very so not and of to in on with
cat dog bird fish car road city street house tree river sea sun rain snow
good great happy nice bad sad awful terrible love hate run walk drive swim eat sleep
today tomorrow yesterday morning night fast slow big small old new red blue green
"""
WORDS = _VOCABULARY.split()
SUFFIXES = ["##s", "##ed", "##ing", "##ly", "##er"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

SENTENCES = [
    "the cat sleeps on the road",
    "a dog runs in the city",
    "my car was very fast today",
    "the sun is big and the sea is blue",
    "i love the rain in the morning",
    "this is a terrible awful night",
    "the old bird swims in the river",
    "your new house is small and red",
    "we walked to the green tree yesterday",
    "snow falls slowly on the street tomorrow",
    "fish eat and sleep in the sea",
    "that was not a good drive",
]


def make_tokenizer() -> Any:
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], lower-casing) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)) + SUFFIXES)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def make_bert(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0, init: float = 0.2) -> Any:
    """A randomly initialised 2-layer BERT (hidden 64) in eval mode. Weights of std `init` = 0.2 make the pooling
    modes give clearly different vectors; a smaller std keeps the model closer to a bag of tokens (which is what a
    static student can imitate)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        initializer_range=init,
    )
    return BertModel(config).eval()


def make_st_dir(
    out: Path,
    pooling: str = "mean",
    normalize: bool = True,
    dense_out: int | None = None,
    seed: int = 0,
    init: float = 0.2,
) -> Path:
    """Save a tiny sentence-transformers model the way sentence-transformers does: Transformer, Pooling,
    [Dense (no activation)], [Normalize], then `SentenceTransformer(modules=...).save(out)`."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    tokenizer = make_tokenizer()
    hf = out.parent / f"{out.name}-hf"
    make_bert(len(tokenizer), seed=seed, init=init).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=48)
    modules: list[Any] = [transformer, models.Pooling(64, pooling_mode=pooling)]
    if dense_out is not None:
        torch.manual_seed(seed + 1)
        modules.append(models.Dense(64, dense_out, activation_function=torch.nn.Identity()))
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out), create_model_card=False)
    return out


def test_tiny_st_dir_loads_in_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    d = make_st_dir(tmp_path / "st", pooling="mean", normalize=True)
    assert (d / "modules.json").is_file() and (d / "1_Pooling" / "config.json").is_file()
    vectors = SentenceTransformer(str(d), device="cpu").encode(SENTENCES[:3])
    assert vectors.shape == (3, 64)
