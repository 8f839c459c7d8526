"""The translation pieces: the shipped ru->en pairs, pair files, the shared tokenizer, a tiny pre-LN mBART that
trains (with and without a teacher), translation, BLEU, and ONNX export with its parity check."""

from __future__ import annotations

import copy
import gzip
import re
from pathlib import Path
from typing import Any

import pytest

from kdpipe.data import pairs as parallel
from kdpipe.errors import DataError
from kdpipe.tasks.translation import seq2seq

SOURCES = Path(parallel.__file__).resolve().parents[1] / "_data" / "ru_en" / "SOURCES.md"


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return parallel.read_pairs(parallel.default_pairs_path())


@pytest.fixture(scope="module")
def small(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """~150 short real pairs (300 sentences) for the tiny models."""
    short = [p for p in pairs if len(p[1].split()) <= 8]
    return short[:: max(1, len(short) // 150)][:150]


@pytest.fixture(scope="module")
def tok(small: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("tok")
    return parallel.train_tokenizer([s for p in small for s in p], vocab_size=400, out_dir=out)


def tiny_model(tok: Any, decoder_layers: int = 2, seed: int = 0) -> Any:
    import torch
    from transformers import MBartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = seq2seq.small_config(
        len(tok), d_model=32, encoder_layers=2, decoder_layers=decoder_layers, ffn_dim=64, heads=2, max_position=64
    )
    return MBartForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def trained(tok: Any, small: list[tuple[str, str]]) -> tuple[Any, list[dict[str, float]], dict[str, Any]]:
    model = tiny_model(tok)
    enc = parallel.encode_pairs(tok, small[:64], max_length=32)
    history = seq2seq.train_seq2seq(
        model, lambda e: parallel.pair_batches(enc, 16, shuffle=True, seed=e), epochs=8, lr=3e-3, warmup_steps=4
    )
    return model, history, enc


# --------------------------------------------------------------------------- the shipped data
def test_shipped_pairs_are_many_clean_and_nonempty(pairs: list[tuple[str, str]]) -> None:
    assert len(pairs) >= 15_000
    assert len(set(pairs)) == len(pairs)
    bad = re.compile(r"[%{}$<>\\`\t]")
    for ru, en in pairs:
        assert ru and en and ru != en
        assert not bad.search(ru) and not bad.search(en), (ru, en)
        assert len(en.split()) >= 4
    assert sum(bool(re.search("[а-яА-ЯёЁ]", ru)) for ru, _ in pairs) > 0.95 * len(pairs)


def test_sources_name_every_package_in_the_file() -> None:
    import csv
    import io

    text = gzip.decompress(parallel.default_pairs_path().read_bytes()).decode("utf-8")
    packages = {row["package"] for row in csv.DictReader(io.StringIO(text), delimiter="\t")}
    sources = SOURCES.read_text(encoding="utf-8")
    rows = [line for line in sources.splitlines() if line.startswith("| ") and "---" not in line]
    listed = {line.split("|")[1].strip() for line in rows}
    assert packages and packages <= listed
    assert "python scripts/build_ru_en_pairs.py" in sources and "licence" in sources


# --------------------------------------------------------------------------- read_pairs
@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".tsv.gz"])
def test_read_pairs_reads_every_format(tmp_path: Path, suffix: str) -> None:
    rows = [("Привет, мир", 'Hello, "world"'), ("Да", "Yes")]
    if ".jsonl" in suffix:
        import json

        text = "".join(json.dumps({"ru": r, "en": e}, ensure_ascii=False) + "\n" for r, e in rows)
    else:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n")
        writer.writerows([("ru", "en"), *rows])
        text = buf.getvalue()
    data = text.encode("utf-8")
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert parallel.read_pairs(path) == rows


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"ru\ten\n", "no pairs"),
        (b"", "empty"),
        (b"ru\tde\n\xd0\x94\xd0\xb0\tJa\n", r"line 1 \(header\): no column 'en'"),
        (b"ru\ten\na\tb\n\tYes\n", r"line 3: the 'ru' side is empty"),
        (b"ru\ten\na\tb\nc\td\n\xff\xfe\tx\n", r"line 4: byte 0xff"),
    ],
)
def test_read_pairs_names_the_file_and_line(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        parallel.read_pairs(path)
    assert str(path) in info.value.message and info.value.hint


def test_split_pairs_is_deterministic_and_disjoint(small: list[tuple[str, str]]) -> None:
    train, val, test = parallel.split_pairs(small, test_size=20, val_size=0.1, seed=3)
    assert (len(val), len(test)) == (15, 20) and len(train) + 35 == len(small)
    assert parallel.split_pairs(small, 20, 0.1, seed=3) == (train, val, test)
    assert sorted(train + val + test) == sorted(small)


# --------------------------------------------------------------------------- tokenizer and batches
def test_tokenizer_specials_and_round_trip(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id] == [0, 1, 2, 3]
    ids = tok("Файл не найден").input_ids
    assert ids[-1] == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again("Файл не найден").input_ids == ids
    assert again.decode(ids, skip_special_tokens=True) == "Файл не найден"


def test_encode_pairs_pads_labels_with_minus_100(tok: Any, small: list[tuple[str, str]]) -> None:
    enc = parallel.encode_pairs(tok, small[:10], max_length=12)
    labels, mask = enc["labels"], enc["attention_mask"]
    assert labels.shape[1] <= 12 and enc["input_ids"].shape == mask.shape
    for row in labels:
        real = row[row != -100]
        assert int(real[-1]) == tok.eos_token_id and bool((row[len(real) :] == -100).all())
    batches = list(parallel.pair_batches(enc, 4, shuffle=True, seed=1))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert all(int(b["attention_mask"][:, -1].max()) == 1 for b in batches)  # trimmed to the longest


# --------------------------------------------------------------------------- training
def test_tiny_mbart_trains_and_the_loss_drops(trained: tuple[Any, list[dict[str, float]], dict[str, Any]]) -> None:
    _, history, _ = trained
    assert len(history) == 8 and history[-1]["step"] == 32
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.5
    assert {"epoch", "step", "train_loss", "seconds", "lr"} <= set(history[0])


def test_kd_leaves_the_teacher_untouched(trained: tuple[Any, list[dict[str, float]], dict[str, Any]], tok: Any) -> None:
    import torch

    teacher, _, enc = trained
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_model(tok, decoder_layers=1, seed=1)
    kd = seq2seq.Seq2SeqKD(method="hinton", decoder_hidden_weight=1.0, encoder_hidden_weight=0.5)
    batch = next(parallel.pair_batches(enc, 16, shuffle=False))
    for method in ("hinton", "reverse_kl"):
        loss, terms = seq2seq.seq2seq_loss(student, batch, teacher, seq2seq.Seq2SeqKD(method=method))  # type: ignore[arg-type]
        assert torch.isfinite(loss) and method in terms
    seen: list[int] = []
    history = seq2seq.train_seq2seq(
        student,
        lambda e: parallel.pair_batches(enc, 16, shuffle=True, seed=e),
        epochs=1,
        lr=1e-3,
        warmup_steps=1,
        teacher=teacher,
        kd=kd,
        regulariser=lambda m: 1e-4 * sum(p.pow(2).sum() for p in m.parameters()),
        on_epoch_end=lambda epoch, record: seen.append(epoch),
        val=seq2seq.ValSet(list(parallel.pair_batches(enc, 32, shuffle=False))),
    )
    assert seen == [1] and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert "val_loss" in history[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_translate_and_bleu(trained: tuple[Any, list[dict[str, float]], dict[str, Any]], tok: Any) -> None:
    model, _, _ = trained
    out = seq2seq.translate(model, tok, ["Файл не найден", "Да", "Нет такого файла или каталога"], max_new_tokens=8)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    refs = ["the file was not found", "cannot open the directory"]
    assert seq2seq.bleu(refs, refs) == pytest.approx(100.0)
    assert seq2seq.bleu(["purple monkeys dance wildly", "seven green apples"], refs) < 5


# --------------------------------------------------------------------------- ONNX
def test_onnx_export_parity_and_a_planted_failure(
    trained: tuple[Any, list[dict[str, float]], dict[str, Any]], tok: Any, small: list[tuple[str, str]], tmp_path: Path
) -> None:
    import torch

    model, _, _ = trained
    model_dir = seq2seq.save_seq2seq(model, tok, tmp_path / "model")
    spec = seq2seq.export_seq2seq_onnx(model_dir, tmp_path / "onnx")
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"} <= set(spec["files"])
    sentences = [ru for ru, _ in small[64:71]]
    check = seq2seq.seq2seq_parity(model_dir, tmp_path / "onnx", sentences, max_new_tokens=12)
    assert check.ok, check.why
    assert check.same_generations == len(sentences)
    # planted: the torch weights change after the export
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seq2seq.save_seq2seq(other, tok, tmp_path / "other")
    bad = seq2seq.seq2seq_parity(tmp_path / "other", tmp_path / "onnx", sentences, max_new_tokens=12)
    assert not bad.ok and "logits differ" in bad.why


def test_bucketed_batches_cover_every_pair_once(tok: Any, small: list[tuple[str, str]]) -> None:
    import torch

    enc = parallel.encode_pairs(tok, small[:40], max_length=16)
    batches = list(parallel.pair_batches(enc, 8, shuffle=True, seed=2, bucket=True))
    assert sum(len(b["input_ids"]) for b in batches) == 40
    again = list(parallel.pair_batches(enc, 8, shuffle=True, seed=2, bucket=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    padded = sum(b["input_ids"].numel() for b in batches)
    assert padded <= sum(b["input_ids"].numel() for b in parallel.pair_batches(enc, 8, shuffle=True, seed=2))
