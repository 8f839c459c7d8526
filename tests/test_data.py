from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kdpipe.config import DataConfig
from kdpipe.data.tables import collate, default_data_path, make_splits, read_table
from kdpipe.errors import DataError


def test_default_dataset_ships_offline() -> None:
    path = default_data_path()
    df = read_table(path, "text", "sentiment")
    assert len(df) > 30000 and set(df.label) == {"negative", "neutral", "positive"}


def test_splits_are_deterministic_and_disjoint(tiny_csv: Path) -> None:
    df = read_table(tiny_csv, "sentence", "label")
    cfg = DataConfig(train_size=100, val_size=20, test_size=50)
    a, names = make_splits(df, cfg, seed=3)
    b, _ = make_splits(df, cfg, seed=3)
    c, _ = make_splits(df, cfg, seed=4)
    assert names == ["negative", "neutral", "positive"]
    assert {k: len(v) for k, v in a.items()} == {"train": 100, "val": 20, "test": 50}
    assert all(a[k].index.equals(b[k].index) for k in a)
    assert not a["test"].index.equals(c["test"].index)
    assert not set(a["train"].index) & set(a["test"].index)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_other_formats(tmp_path: Path, tiny_csv: Path, suffix: str) -> None:
    df = pd.read_csv(tiny_csv)
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_json(path, orient="records", lines=suffix == ".jsonl")
    out = read_table(path, "sentence", "label")
    assert len(out) == len(df) and list(out.columns) == ["text", "label"]


def test_too_few_rows(tiny_csv: Path) -> None:
    df = read_table(tiny_csv, "sentence", "label")
    with pytest.raises(DataError, match="usable rows"):
        make_splits(df, DataConfig(test_size=1000), seed=0)


def test_collate_pads_and_masks() -> None:
    b = collate([[5, 6, 7], [8]], pad_id=0, labels=[1, 2])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 2]
