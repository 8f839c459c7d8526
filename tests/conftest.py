"""Tiny models and data built in code: fully offline, seconds on two cores."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "positive": ["good", "great", "love", "happy", "excellent", "nice"],
    "negative": ["bad", "awful", "hate", "sad", "terrible", "crash"],
    "neutral": ["car", "road", "today", "drive", "city", "street"],
}
FILLER = ["the", "a", "is", "this", "my", "was", "very", "so"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_style(tok, vocab: dict[str, int]):  # type: ignore[no-untyped-def]
    """[CLS] text [SEP] around a `tokenizers.Tokenizer`, wrapped as a transformers fast tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
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


def make_tokenizer(extra_words: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = SPECIAL + sorted({w for ws in WORDS.values() for w in ws} | set(FILLER) | set(extra_words or []))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _bert_style(tok, vocab)


def make_wordpiece_tokenizer(unused: int = 20):
    """A BERT-style WordPiece tokenizer over the test words, with `unused` pieces no text uses (what vocabulary
    pruning removes)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = sorted({w for ws in WORDS.values() for w in ws} | set(FILLER))
    pieces = SPECIAL + words + [f"##{c}" for c in "sdey"] + [f"unused{i}" for i in range(unused)]
    vocab = {w: i for i, w in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return _bert_style(tok, vocab)


def make_model_dir(
    path: Path,
    layers: int = 2,
    hidden: int = 32,
    extra_words: list[str] | None = None,
    seed: int = 0,
    wordpiece: bool = False,
    heads: int = 2,
) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = make_wordpiece_tokenizer() if wordpiece else make_tokenizer(extra_words)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_csv(path: Path, rows: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["label,score,sentence"]
    for i in range(rows):
        label = ["positive", "negative", "neutral"][i % 3]
        words = [rng.choice(WORDS[label]) for _ in range(rng.randint(1, 3))] + rng.sample(FILLER, 3)
        rng.shuffle(words)
        lines.append(f"{label},{rng.random():.3f},{' '.join(words)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv(tmp_path_factory.mktemp("data") / "tiny.csv")


def write_recipe(path: Path, teacher_dir: Path, csv: Path, out: Path, **over: object) -> Path:
    """A recipe that runs every stage on the tiny model in seconds."""
    profile = path.parent / "tiny-profile.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "description": "test profile.",
                "intra_op_threads": 1,
                "shapes": [{"batch": 1, "seq": 16}, {"batch": 4, "seq": 24}],
                "warmup": 1,
                "min_runs": 3,
                "min_seconds": 0.0,
                "torch_eager": True,
                "rounds": 1,
                "gemm_seconds": 0.2,
            }
        )
    )
    recipe: dict = {
        "out": str(out),
        "seed": 0,
        "teacher": {
            "model": str(teacher_dir),
            "data": {
                "source": str(csv),
                "text_column": "sentence",
                "label_column": "label",
                "train_size": None,
                "val_size": 20,
                "test_size": 60,
                "max_length": 16,
            },
            "epochs": 30,
            "batch_size": 16,
            "lr": 1e-3,
            "head_lr": 1e-2,
        },
        "student": {"layers": "every-other"},
        "distill": {
            "losses": [{"name": "hinton", "temperature": 2.0, "alpha": 0.5}, {"name": "hidden_cosine", "weight": 0.1}],
            "epochs": 10,
            "batch_size": 16,
            "lr": 1e-3,
            "threads": 1,
        },
        "export": {"parity_samples": 20},
        "profile": str(profile),
    }
    for key, value in over.items():
        node = recipe
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_dir: Path, tiny_csv: Path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_dir, tiny_csv, tmp_path / "runs")


def invoke(*args: object) -> tuple[int, str]:
    """`kdpipe ARGS...` in this process; (exit code, output)."""
    from typer.testing import CliRunner

    from kdpipe.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny_csv: Path) -> tuple[Path, Path]:
    """The suite's one complete run of every stage through `kdpipe run`; tests copy it before changing it."""
    base = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(base / "recipe.yaml", tiny_dir, tiny_csv, base / "runs")
    code, out = invoke("run", recipe)
    assert code == 0, out
    return recipe, base / "runs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    hints = [line for line in output.splitlines() if line.startswith("hint:")]
    assert errors and hints, output
    for needle in needles:
        assert needle in output, output


def write_profile(path: Path, **over: object) -> Path:
    doc = {"name": "p", "description": "d", "shapes": [{"batch": 1, "seq": 8}], **over}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(autouse=True)
def _no_stage_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs every stage and leaves ~/.cache alone: the stage store is off (tests/test_store.py turns it
    on, in a temporary directory, with a fixture of its own)."""
    monkeypatch.setenv("KDPIPE_STORE", "off")


# and for the session fixtures too (`finished` runs before any function-scoped fixture is set up)
os.environ["KDPIPE_STORE"] = "off"
