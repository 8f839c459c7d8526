"""One reader of text tables for every task: a .txt file (one item per non-empty line, column "text"), a CSV / TSV /
JSON / JSONL / parquet table or a Hugging Face `datasets` directory (save_to_disk), read strictly into records of
str (kdpipe.data.tables' decoding and format checks, kdpipe.data.hfdatasets for a directory); and what given splits
of texts share: the file checks, the same file given twice, the inputs they are hashed as, the leakage warning.

Torch-free: every check here runs before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.artifacts.records import percent
from kdpipe.data.hfdatasets import is_datasets_dir
from kdpipe.data.tables import (
    _COMPRESSED,
    _FORMATS,
    _SUFFIXES,
    _csv_separator,
    _format_error,
    _read_csv,
    _read_json,
    _text,
    check_file,
    decode_bytes,
    read_file_bytes,
)
from kdpipe.errors import DataError
from kdpipe.files import shown
from kdpipe.textcodec import printable

TEXT_SUFFIXES = (".txt", *_SUFFIXES)
TEXT_FORMATS = f"TXT/{_FORMATS}"
Records = tuple[list[dict[str, str]], list[str]]


def check_text_path(path: Path, what: str, where: str) -> None:
    """A DataError unless `path` is a readable file of a TEXT_SUFFIXES format or a `datasets` directory. `what`:
    what the file is (e.g. "prompt file"), `where`: its recipe field."""
    if is_datasets_dir(path):
        return
    hint = f"set {where} to a {TEXT_FORMATS} file or a `datasets` directory"
    directory = "a file or a `datasets` directory (save_to_disk) is expected; this directory is neither"
    check_file(path, f"{what} ({where})", hint, directory)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        compressed = "decompress it first (e.g. `gzip -dk FILE`); " if path.suffix.lower() in _COMPRESSED else ""
        raise DataError(
            f"{shown(path)}: unsupported {what} format '{printable(path.suffix)}' ({where})",
            f"{compressed}use .txt (one text per line), {', '.join(_SUFFIXES)} or a `datasets` directory",
        )


def read_records(path: Path, encoding: str = "auto", fix: str = "", columns: tuple[str, ...] = ()) -> Records:
    """Every row of a text file, table or `datasets` directory as {column: str} (a missing cell is ""), and the
    columns. A .txt file: one record {"text": line} per non-empty line (stripped), nothing for an empty one. `fix`:
    how to name an encoding for this file in a decoding error's hint; `columns`: the ones the caller reads (a CSV
    header naming one of them twice is refused)."""
    if is_datasets_dir(path):
        return _read_dataset(path)
    data = read_file_bytes(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _frame_records(_read_parquet(data, path))
    if suffix == ".txt":
        return [{"text": line} for line in _lines(decode_bytes(data, path, encoding, fix))], ["text"]
    text = decode_bytes(data, path, encoding, fix)
    if not text.strip():
        what = "the file is empty" if not text else "the file holds only blank lines / whitespace"
        raise DataError(f"{shown(path)}: {what}", f"give a {_FORMATS} file with a header and rows")
    try:
        if suffix in (".json", ".jsonl"):
            return _frame_records(_read_json(text, path, suffix == ".jsonl"))
        named = columns or ("text",)
        return _frame_records(_read_csv(text, path, _csv_separator(text, suffix), (named[0], named[-1])))
    except (ValueError, OSError) as e:
        raise _format_error(path, suffix, e) from None


def read_lines(path: Path, encoding: str = "auto", fix: str = "") -> list[str]:
    """A text file's non-empty lines, stripped, whatever its name (the one reader's .txt format)."""
    return _lines(decode_bytes(read_file_bytes(path), path, encoding, fix))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_parquet(data: bytes, path: Path) -> Any:
    import io

    import pandas as pd

    try:
        return pd.read_parquet(io.BytesIO(data))
    except (ValueError, OSError) as e:
        raise _format_error(path, ".parquet", e) from None


def _frame_records(df: Any) -> Records:
    columns = [str(c) for c in df.columns]
    rows = [
        {c: _text(v) for c, v in zip(columns, values, strict=True)} for values in df.itertuples(index=False, name=None)
    ]
    return rows, columns


def _read_dataset(path: Path) -> Records:
    from kdpipe.data.hfdatasets import load_split

    return _frame_records(load_split(path).to_pandas())


def missing_column(path: Path, name: str, columns: list[str], field: str) -> DataError:
    """The error for a column `name` (recipe field `field`) that the file does not have."""
    names = printable(", ".join(columns), 300) or "none"
    return DataError(
        f"{shown(path)}: no column '{name}' ({field}; columns: {names})", f"set {field} to one of the file's columns"
    )


def check_distinct(paths: dict[str, Path]) -> None:
    """A DataError naming both recipe fields when one file is given for two of them (recipe field -> path)."""
    seen: dict[Path, str] = {}
    for where, path in paths.items():
        key = path.resolve()
        if key in seen:
            raise DataError(
                f"{where}: {shown(path)} is also {seen[key]}",
                "give each split its own file; leave a held-out split out to draw it from the train texts",
            )
        seen[key] = where


def inside_error(where: str, of: int, train: str) -> DataError:
    """A given held-out split whose every text is also in the train texts (`train`: where they come from)."""
    return DataError(
        f"{where}: every one of its {of:,} texts also occurs in {train}",
        "the splits overlap: give held-out texts that are not in train (or leave the split out to draw it from "
        "the train texts)",
    )


def input_files(prefix: str, path: Path) -> list[tuple[str, Path]]:
    """(name in the manifest, file) of a data file or directory: `<prefix>/<file>`, a directory's files one by one
    (`<prefix>/<relative path>`). prefix: `data` for a corpus, `data/<split>` for a given split."""
    if path.is_dir():
        return [(f"{prefix}/{p.relative_to(path).as_posix()}", p) for p in sorted(path.rglob("*")) if p.is_file()]
    return [(f"{prefix}/{path.name}", path)]


def split_origin(rows: int, of: int, unit: str, source: str, seed: int, drawn: bool) -> str:
    """Where a split came from, for the record's `data_splits`: drawn from `source` (seeded), or a given file used
    whole or subsampled (seeded). `source`: the file's name and recipe field, e.g. "held.txt (teacher...held_out)"."""
    if drawn:
        return f"{rows:,} {unit} drawn from {source} (seed {seed})"
    if rows == of:
        return f"{rows:,} {unit} of {source}"
    return f"{rows:,} of the {of:,} {unit} of {source}, subsampled (seed {seed})"


def data_digest(files: list[tuple[str, Path]]) -> str:
    """A single data file's SHA-256; for given splits (or a directory), one digest over every file's."""
    import hashlib

    from kdpipe.artifacts.manifest import sha256_file

    if len(files) == 1:
        return sha256_file(files[0][1])
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(f"{name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def leakage_warning(what: str, n: int, of: int, train: str, threshold: float) -> str | None:
    """The warning for a held-out split (`what`: its items, e.g. "held-out sentences") whose share also in `train`
    is above `threshold` (teacher.data.leakage_warn), else None."""
    if not of or n / of <= threshold:
        return None
    return (
        f"{n:,} of the {of:,} {what} ({percent(n, of)}) also occur in the {train} after case / whitespace "
        f"normalisation (above teacher.data.leakage_warn {threshold:g}): its metrics overstate quality on unseen "
        "text; de-duplicate the splits"
    )
