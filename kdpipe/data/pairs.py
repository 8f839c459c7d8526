"""Parallel (translation) data: the shipped ru->en pairs, pair files, splits, a shared subword tokenizer,
and padded seq2seq batches.

The shipped pairs (kdpipe/_data/ru_en/pairs.tsv.gz, ~17k Russian -> English messages from the Debian
gettext catalogues, see SOURCES.md there) are built by scripts/build_ru_en_pairs.py.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdpipe.data.tables import decode_bytes
from kdpipe.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIALS = (PAD, EOS, UNK, BOS)  # ids 0, 1, 2, 3 in every tokenizer `train_tokenizer` makes
_FORMATS = ".tsv, .csv or .jsonl (optionally .gz)"


def default_pairs_path() -> Path:
    """The shipped Russian -> English pairs (columns ru, en, package)."""
    path = Path(__file__).resolve().parents[1] / "_data" / "ru_en" / "pairs.tsv.gz"
    if not path.is_file():
        raise DataError(
            f"{path}: the shipped ru->en pairs are missing", "reinstall kdpipe (or run scripts/build_ru_en_pairs.py)"
        )
    return path


# --------------------------------------------------------------------------- reading
def _format(path: Path) -> tuple[str, bool]:
    """('tsv' | 'csv' | 'jsonl', gzipped)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    kind = (suffixes[-2] if gz and len(suffixes) > 1 else suffixes[-1] if suffixes else "").lstrip(".")
    if kind not in ("tsv", "csv", "jsonl"):
        raise DataError(f"{path}: unsupported pair file format", f"use a {_FORMATS} file")
    return kind, gz


def _read_text(path: Path, gz: bool, encoding: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such pair file", f"give a {_FORMATS} file")
    data = path.read_bytes()
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(
                f"{path}: not a valid gzip file ({e})", "re-compress it with gzip, or drop the .gz"
            ) from None
    return decode_bytes(
        data, path, encoding, fix="re-save it as UTF-8 (e.g. `iconv -f {enc} -t utf-8`) or pass encoding='{enc}'"
    )


def _rows(path: Path, kind: str, text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(1-based line of the row, its fields) for every record after the header."""
    if kind == "jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno})", "write one JSON object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {n}: not a JSON object", "write one JSON object per line")
            yield n, {str(k): "" if v is None else str(v) for k, v in record.items()}
        return
    reader = csv.reader(io.StringIO(text), delimiter="\t" if kind == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        return
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        yield reader.line_num, {name: (row[i] if i < len(row) else "") for i, name in enumerate(header)}


def read_pairs(
    path: str | Path, source_column: str = "ru", target_column: str = "en", encoding: str = "utf-8"
) -> list[tuple[str, str]]:
    """(source, target) pairs of a .tsv / .csv / .jsonl file (optionally .gz), in file order, stripped.

    A DataError names the file (and line) for: an unsupported format, an undecodable byte, an empty
    file, a missing column, a row whose source or target is empty."""
    path = Path(path)
    kind, gz = _format(path)
    text = _read_text(path, gz, encoding)
    if not text.strip():
        raise DataError(
            f"{path}: the file is empty", f"give a header line with '{source_column}' and '{target_column}' and rows"
        )
    pairs: list[tuple[str, str]] = []
    for line, row in _rows(path, kind, text):
        missing = [c for c in (source_column, target_column) if c not in row]
        if missing:
            where = "line 1 (header)" if kind != "jsonl" else f"line {line}"
            raise DataError(
                f"{path}: {where}: no column {', '.join(map(repr, missing))} (columns: {', '.join(row)})",
                "name the columns with source_column= / target_column=",
            )
        src, tgt = row[source_column].strip(), row[target_column].strip()
        if not src or not tgt:
            side = source_column if not src else target_column
            raise DataError(f"{path}: line {line}: the '{side}' side is empty", "fill it in or delete the row")
        pairs.append((src, tgt))
    if not pairs:
        raise DataError(f"{path}: no pairs (only a header)", "add rows")
    return pairs


def split_pairs(
    pairs: Sequence[tuple[str, str]], test_size: int | float, val_size: int | float, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val, test) after one seeded shuffle; a size < 1 is a fraction of the pairs, >= 1 a count."""

    def count(size: int | float) -> int:
        return int(round(size * len(pairs))) if 0 < size < 1 else int(size)

    n_test, n_val = count(test_size), count(val_size)
    if n_test < 0 or n_val < 0 or n_test + n_val >= len(pairs):
        raise ConfigError(
            f"split_pairs: test {n_test} + val {n_val} pairs leave no training pair of {len(pairs)}",
            "lower test_size / val_size",
        )
    order = np.random.RandomState(seed).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    return shuffled[n_test + n_val :], shuffled[n_test : n_test + n_val], shuffled[:n_test]


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(
    texts: Sequence[str], vocab_size: int, out_dir: str | Path | None = None, lowercase: bool = False
) -> PreTrainedTokenizerFast:
    """One shared ru+en Unigram tokenizer (NFKC, Metaspace), specials <pad>=0 </s>=1 <unk>=2 <s>=3, and
    </s> appended to every encoding. Deterministic for the same texts. Saved with save_pretrained to
    out_dir when given (AutoTokenizer.from_pretrained(out_dir) reloads it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise DataError("train_tokenizer: no texts", "give the training pairs' sources and targets")
    tok = Tokenizer(models.Unigram())
    norms = [normalizers.NFKC(), *([normalizers.Lowercase()] if lowercase else [])]
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), unk_token=UNK, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    eos = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        model_input_names=["input_ids", "attention_mask"],
    )
    if [fast.convert_tokens_to_ids(s) for s in SPECIALS] != [0, 1, 2, 3]:
        raise AssertionError("the tokenizer's special tokens are not <pad>=0 </s>=1 <unk>=2 <s>=3")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# --------------------------------------------------------------------------- batches
def encode_pairs(
    tok: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], max_length: int
) -> dict[str, torch.Tensor]:
    """Padded tensors for (source, target) pairs: input_ids, attention_mask (N, S) and labels (N, L) with
    padding -100. Both sides truncated to max_length tokens, each ending with </s>."""
    import torch

    if not pairs:
        raise DataError("encode_pairs: no pairs", "give at least one (source, target) pair")
    src = tok([s for s, _ in pairs], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    tgt = tok([t for _, t in pairs], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    return {
        "input_ids": src["input_ids"].to(torch.long),
        "attention_mask": src["attention_mask"].to(torch.long),
        "labels": labels.to(torch.long),
    }


def _bucketed(enc: dict[str, torch.Tensor], order: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Batches of similar length: windows of 50 batches of `order` sorted by source + target length, the
    batches then in a seeded random order."""
    lengths = (enc["attention_mask"].sum(1) + (enc["labels"] != -100).sum(1)).numpy()
    window = batch_size * 50
    out: list[np.ndarray] = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [out[i] for i in np.random.RandomState(seed + 1).permutation(len(out))]


def pair_batches(
    enc: dict[str, torch.Tensor], batch_size: int, shuffle: bool = True, seed: int = 0, bucket: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `encode_pairs` output (seeded order when shuffled), each trimmed to its longest source and
    target, so a batch of short pairs does not carry the whole set's padding. `bucket`: group pairs of
    similar length (much less padding: the shipped pairs' median is ~12 tokens, a random batch's longest ~40)."""
    n = len(enc["input_ids"])
    order = np.random.RandomState(seed).permutation(n) if shuffle else np.arange(n)
    if bucket:
        groups = _bucketed(enc, order, batch_size, seed)
    else:
        groups = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    for idx in groups:
        mask, labels = enc["attention_mask"][idx], enc["labels"][idx]
        s_len = max(1, int(mask.sum(1).max()))
        t_len = max(1, int((labels != -100).sum(1).max()))
        yield {
            "input_ids": enc["input_ids"][idx, :s_len],
            "attention_mask": mask[:, :s_len],
            "labels": labels[:, :t_len],
        }
