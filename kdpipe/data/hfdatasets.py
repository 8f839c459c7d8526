"""A Hugging Face `datasets` directory (what `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write), read with
the `datasets` package into the same two-column table the file readers give. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.errors import DataError
from kdpipe.files import shown

DICT_MARKER = "dataset_dict.json"  # a DatasetDict's directory
TABLE_MARKER = "state.json"  # one Dataset's directory
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}


def is_datasets_dir(path: Path) -> bool:
    """A directory written by save_to_disk: a DatasetDict (dataset_dict.json) or one Dataset (state.json)."""
    return path.is_dir() and ((path / DICT_MARKER).is_file() or (path / TABLE_MARKER).is_file())


def is_dataset_dict(path: Path) -> bool:
    return path.is_dir() and (path / DICT_MARKER).is_file()


def _load(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{shown(path)}: a `datasets` directory needs the PyPI package 'datasets', which is not installed",
            "install kdpipe with its dependencies (make install), or export the split to parquet / JSONL",
        ) from None
    datasets.disable_progress_bars()
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # the package raises FileNotFoundError, ValueError, ArrowInvalid ... for a broken save
        raise DataError(
            f"{shown(path)}: not a readable `datasets` directory ({type(e).__name__}: {str(e)[:160]})",
            "write it again with Dataset.save_to_disk / DatasetDict.save_to_disk, or give a data file",
        ) from None


def dict_splits(path: Path) -> dict[str, Path]:
    """A DatasetDict directory's splits as kdpipe names them (train / validation / test) -> their directories.
    A split of another name (e.g. 'unsupervised') is left out; two names for one split are an error."""
    import json

    try:
        names = json.loads((path / DICT_MARKER).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{shown(path / DICT_MARKER)}: unreadable ({e})", "write the DatasetDict again with save_to_disk"
        ) from None
    found: dict[str, Path] = {}
    for name in names:
        ours = SPLIT_NAMES.get(str(name).lower())
        if ours is None:
            continue
        if ours in found:
            raise DataError(
                f"{shown(path)}: splits {found[ours].name!r} and {name!r} are both a {ours} split",
                "keep one of them in the DatasetDict, or give the splits as teacher.data.files",
            )
        found[ours] = path / str(name)
    if "train" not in found:
        raise DataError(
            f"{shown(path)}: a DatasetDict without a train split (splits: {', '.join(map(str, names))})",
            "name the training split 'train', or give the splits as teacher.data.files",
        )
    return found


def load_split(path: Path, instead: str = "give ") -> Any:
    """One Dataset's directory, loaded; a DatasetDict is refused naming its splits (`instead`: what the hint offers
    before "one split's directory")."""
    ds = _load(path)
    if type(ds).__name__ == "DatasetDict":
        raise DataError(
            f"{shown(path)}: a DatasetDict (splits {', '.join(ds.keys())}), not one split",
            f"{instead}one split's directory, e.g. {shown(path / next(iter(ds.keys())))}",
        )
    return ds


def read_dataset(path: Path, columns: tuple[str, str]) -> tuple[Any, list[str] | None]:
    """One Dataset as a pandas frame of its `columns` (text, label), and the label's ClassLabel names (or None)."""
    ds = load_split(path, "give it as teacher.data.source (its splits are used as given), or ")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{shown(path)}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)})",
            "set teacher.data.text_column / label_column (--text-column / --label-column) to the dataset's columns",
        )
    feature = ds.features[columns[1]]
    names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    return ds.select_columns(list(columns)).to_pandas(), names
