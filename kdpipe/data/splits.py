"""The classification data as the user holds it: one table split here (seeded), or given splits
(`teacher.data.files`, or a `datasets` DatasetDict as `teacher.data.source`); numeric labels named by
`teacher.data.label_names` (or a ClassLabel); and the leakage count (test / validation texts also in train).

Pandas (and `datasets` for a directory) only, no torch: every check here runs before any model loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.config import DataConfig
from kdpipe.data.hfdatasets import dict_splits, is_dataset_dict, is_datasets_dir
from kdpipe.data.tables import (
    _FORMATS,
    Labeled,
    check_file,
    load_labeled,
    make_splits,
    read_labeled,
    source_path,
)
from kdpipe.data.texts import input_files, inside_error, leakage_warning
from kdpipe.errors import DataError
from kdpipe.files import shown

if TYPE_CHECKING:
    import pandas as pd

GIVEN = ("train", "validation", "test")


@dataclass(frozen=True)
class Table:
    """One given split: where it came from (the recipe field and path) and what was read."""

    split: str  # train / validation / test
    where: str  # the recipe field: teacher.data.files.test, or teacher.data.source
    path: Path
    read: Labeled


@dataclass(frozen=True)
class Source:
    """teacher.data, read and checked: the given splits, or the one table (split "all") to split here."""

    tables: dict[str, Table]
    names: list[str] | None  # label_names, or a ClassLabel's names; None: the labels are their own names

    @property
    def given(self) -> bool:
        return "all" not in self.tables


@dataclass(frozen=True)
class Splits:
    """train / val / test frames (labels as int ids), the label names, where each split came from, and the
    leakage count per held-out split: (texts also in train after normalisation, texts)."""

    frames: dict[str, pd.DataFrame]
    names: list[str]
    origin: dict[str, str]
    leakage: dict[str, tuple[int, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def given_paths(cfg: DataConfig) -> dict[str, tuple[str, Path]] | None:
    """split -> (recipe field, path) of the given splits; None in the single-table mode."""
    if cfg.files is not None:
        out = {}
        for split in GIVEN:
            value = getattr(cfg.files, split)
            if value is not None:
                out[split] = (f"teacher.data.files.{split}", Path(value))
        return out
    if cfg.source != "default" and is_dataset_dict(Path(cfg.source)):
        return {s: ("teacher.data.source", p) for s, p in dict_splits(Path(cfg.source)).items()}
    return None


def read_source(cfg: DataConfig, finetune: bool = True) -> Source:
    """Every given split read and checked (empty, the same file twice, another schema, label names), or the one
    table (kdpipe.data.tables.load_labeled's checks)."""
    paths = given_paths(cfg)
    if paths is None:
        path, read = load_labeled(cfg, finetune)
        table = Table("all", "teacher.data.source", path, read)
        names = _label_names(cfg, [table])
        return Source({"all": _named(table, names)}, names)
    tables = {s: _read_given(s, where, p, cfg) for s, (where, p) in paths.items()}
    _check_given(tables, cfg)
    names = _label_names(cfg, list(tables.values()))
    tables = {s: _named(t, names) for s, t in tables.items()}
    if finetune:
        labels = set().union(*(set(t.read.frame.label) for t in tables.values()))
        if len(labels) < 2:
            raise DataError(
                f"{shown(tables['train'].path)}: the label column '{cfg.label_column}' has {len(labels)} distinct "
                "value(s) in the given splits; classification needs >= 2",
                "check --label-column (teacher.data.label_column)",
            )
    return Source(tables, names)


def _read_given(split: str, where: str, path: Path, cfg: DataConfig) -> Table:
    if not is_datasets_dir(path):
        check_file(
            path,
            f"{split} file ({where})",
            f"set {where} to a {_FORMATS} file or a `datasets` directory",
            "a file or a `datasets` directory (save_to_disk) is expected; this directory is neither",
        )
    read = read_labeled(path, cfg.text_column, cfg.label_column, cfg.encoding)
    if read.frame.empty:
        why = "has no rows" if read.counts.read == 0 else f"has no usable rows ({read.counts.summary()})"
        raise DataError(f"{where}: {shown(path)} {why}", f"give a {split} split with labelled rows, or leave it out")
    return Table(split, where, path, read)


def _check_given(tables: dict[str, Table], cfg: DataConfig) -> None:
    """The same file given for two splits, and a split in another schema than the train split."""
    seen: dict[Path, Table] = {}
    for t in tables.values():
        key = t.path.resolve()
        if key in seen:
            raise DataError(
                f"{t.where}: {shown(t.path)} is also the {seen[key].split} split ({seen[key].where})",
                "give each split its own file; leave validation / test out to draw it from train",
            )
        seen[key] = t
    train = tables["train"]
    for t in tables.values():
        if t.read.columns and train.read.columns and set(t.read.columns) != set(train.read.columns):
            raise DataError(
                f"{t.where}: {shown(t.path)} has columns [{', '.join(t.read.columns)}], the train split "
                f"({shown(train.path)}) [{', '.join(train.read.columns)}]",
                "give every split in one schema (the same columns)",
            )
        if t.read.names and train.read.names and t.read.names != train.read.names:
            raise DataError(
                f"{t.where}: {shown(t.path)} names its labels {t.read.names}, the train split {train.read.names}",
                "give every split with the same ClassLabel names",
            )
        if t is not train:
            n, of = overlap(train.read.frame.text, t.read.frame.text)
            if n == of:
                raise inside_error(t.where, of, f"the train split ({shown(train.path)})")


def check_source(cfg: DataConfig, finetune: bool = True) -> None:
    """Every data check (`read_source`) for its errors only: what the CLI runs before any model or torch import."""
    read_source(cfg, finetune)


# --------------------------------------------------------------------------- label names
def _label_names(cfg: DataConfig, tables: list[Table]) -> list[str] | None:
    """label_names, else a ClassLabel's names; checked against the numeric labels of every table."""
    names = cfg.label_names or next((t.read.names for t in tables if t.read.names), None)
    if names is None:
        return None
    where = "teacher.data.label_names" if cfg.label_names else f"the ClassLabel of {shown(tables[0].path)}"
    top = -1
    for t in tables:
        for label in t.read.frame.label:
            if not str(label).isdigit():
                raise DataError(
                    f"{where}: names numeric labels, but {shown(t.path)} has the label {str(label)[:40]!r}",
                    "drop teacher.data.label_names: text labels are their own names",
                )
            top = max(top, int(label))
    if top + 1 != len(names):
        raise DataError(
            f"{where}: {len(names)} names for labels 0..{top} ({top + 1} classes) in the data",
            f"give one name per label, label i first at position i (e.g. {top + 1} names)",
        )
    return list(names)


def _named(table: Table, names: list[str] | None) -> Table:
    if names is None:
        return table
    frame = table.read.frame.assign(label=[names[int(x)] for x in table.read.frame.label])
    read = Labeled(frame, table.read.counts, table.read.columns, table.read.names)
    return Table(table.split, table.where, table.path, read)


# --------------------------------------------------------------------------- splitting
def split_source(src: Source, cfg: DataConfig, seed: int, model_names: list[str] | None = None) -> Splits:
    """train / val / test: the one table split seeded (kdpipe.data.tables.make_splits), or the given splits used as
    they are (a size set in the recipe subsamples them, seeded; a missing split is drawn from train). `model_names`:
    the labels of a teacher that is not fine-tuned (its id2label)."""
    names = model_names or src.names
    if not src.given:
        table = src.tables["all"]
        frames, names = make_splits(table.read.frame, cfg, seed, names)
        drawn = f"drawn from {shown(table.path.name)} (seed {seed})"
        origin = {s: drawn for s in ("train", "val", "test")}
    else:
        frames, names, origin = _split_given(src.tables, cfg, seed, names)
    return Splits(frames, names, origin, _leakage(frames))


def _split_given(
    tables: dict[str, Table], cfg: DataConfig, seed: int, names: list[str] | None
) -> tuple[dict[str, pd.DataFrame], list[str], dict[str, str]]:
    rng = np.random.RandomState(seed)
    names = names or sorted(set().union(*(set(t.read.frame.label) for t in tables.values())))
    train = tables["train"]
    frame = _ids(train, names, rng)
    held = {"test": tables.get("test") or tables.get("validation")}
    held["val"] = tables.get("validation") if "test" in tables else None
    frames: dict[str, pd.DataFrame] = {}
    origin: dict[str, str] = {}
    drawn = 0
    for split, size_field in (("test", "test_size"), ("val", "val_size")):
        given = held[split]
        size = getattr(cfg, size_field)
        if given is not None:
            cap = size if size_field in cfg.model_fields_set else None
            frames[split] = _cap(_ids(given, names, rng), cap)
            origin[split] = _given(given, split, len(frames[split]))
        else:
            frames[split] = frame.iloc[drawn : drawn + size]
            origin[split] = f"{size} rows drawn from the train split {shown(train.path.name)} (seed {seed})"
            drawn += size
    if len(frame) < drawn + 2:
        raise DataError(
            f"{train.where}: {shown(train.path)} has {len(frame)} usable rows; drawing {drawn} held-out rows "
            "from it needs at least that + 2",
            "give more rows or the held-out splits as files, or lower teacher.data.test_size / val_size",
        )
    rest = frame.iloc[drawn:]
    frames["train"] = _cap(rest, cfg.train_size if "train_size" in cfg.model_fields_set else None)
    origin["train"] = _given(train, "train", len(frames["train"]))
    return frames, names, origin


def _given(t: Table, split: str, rows: int) -> str:
    what = f"{rows} rows of {shown(t.path.name)} ({t.where})"
    if split == "test" and t.split == "validation":
        what += ", the given validation split: no test split was given"
    return what


def _ids(t: Table, names: list[str], rng: np.random.RandomState) -> pd.DataFrame:
    """The table shuffled (seeded), its labels as ids of `names`."""
    unknown = sorted(set(t.read.frame.label) - set(names))
    if unknown:
        raise DataError(
            f"{t.where}: {shown(t.path)} has labels {unknown[:5]} that are not among the labels {names}",
            "give splits with the same labels (or the teacher's own, for a teacher that is not fine-tuned)",
        )
    ids = {n: i for i, n in enumerate(names)}
    df = t.read.frame.iloc[rng.permutation(len(t.read.frame))]
    return df.assign(label=df.label.map(ids).astype(int)).reset_index(drop=True)


def _cap(df: pd.DataFrame, n: int | None) -> pd.DataFrame:
    return df if n is None or n >= len(df) else df.iloc[:n]


# --------------------------------------------------------------------------- leakage
def normalised(text: str) -> str:
    """A text as the leakage check compares it: case-folded, whitespace runs as one space, stripped."""
    return " ".join(str(text).casefold().split())


def overlap(train: Iterable[str], held: Iterable[str]) -> tuple[int, int]:
    """(texts of `held` whose normalised form is a normalised train text, texts of `held`)."""
    seen = {normalised(t) for t in train}
    items = [normalised(t) for t in held]
    return sum(t in seen for t in items), len(items)


def _leakage(frames: dict[str, pd.DataFrame]) -> dict[str, tuple[int, int]]:
    train = frames["train"].text.tolist()
    return {s: overlap(train, frames[s].text.tolist()) for s in ("test", "val") if len(frames[s])}


def leakage_warnings(splits: Splits, cfg: DataConfig) -> list[str]:
    """A warning per held-out split whose share of texts also in train is above teacher.data.leakage_warn."""
    found = (
        leakage_warning(f"{s} texts", n, of, "train split", cfg.leakage_warn) for s, (n, of) in splits.leakage.items()
    )
    return [w for w in found if w is not None]


def describe(src: Source, cfg: DataConfig) -> str:
    """What manifests and reports call the data: the single-table mode's description, or the given files."""
    from kdpipe.data.tables import describe_source

    if not src.given:
        return describe_source(cfg)
    return ", ".join(f"{t.split}: {shown(t.path)}" for t in src.tables.values())


def data_files(src: Source) -> list[tuple[str, Path]]:
    """(name in the manifest, file) for every file the data was read from: a directory's files one by one."""
    return _files({t.split: t.path for t in src.tables.values()}, src.given)


def source_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """`data_files` from the recipe alone (no table is read): what the teacher's run id hashes by content."""
    paths = given_paths(cfg)
    if paths is None:
        return _files({"all": source_path(cfg)}, False)
    return _files({s: p for s, (_, p) in paths.items()}, True)


def _files(paths: dict[str, Path], given: bool) -> list[tuple[str, Path]]:
    return [f for split, path in paths.items() for f in input_files(f"data/{split}" if given else "data", path)]


def as_record(splits: Splits) -> dict[str, Any]:
    """The record's fields: where each split came from, and the leakage counts."""
    return {
        "data_splits": dict(splits.origin),
        "leakage": {s: {"overlap": n, "of": of} for s, (n, of) in splits.leakage.items()},
    }
