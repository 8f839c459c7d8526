"""Data the way users hold it: given train / validation / test files (and `datasets` directories), label names for
numeric labels, the leakage count, and every bad input planted: one clear line, before any model loads."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke, make_csv, write_recipe

from kdpipe.config import DataConfig, load_recipe
from kdpipe.data.splits import check_source, overlap, read_source, source_files, split_source
from kdpipe.errors import DataError

NAMES = ["negative", "neutral", "positive"]


def glue(path: Path, rows: int, seed: int, start: int = 0) -> Path:
    """A GLUE-style TSV (sentence, numeric label) from the tiny sentiment rows; `start` makes its texts distinct."""
    src = make_csv(path.with_suffix(".src.csv"), rows=rows, seed=seed)
    with src.open() as f:
        items = list(csv.DictReader(f))
    lines = ["sentence\tlabel"] + [
        f"{r['sentence']} n{start + i}\t{NAMES.index(r['label'])}" for i, r in enumerate(items)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg(**kw: object) -> DataConfig:
    base: dict[str, object] = {"text_column": "sentence", "label_column": "label"}
    return DataConfig.model_validate({**base, **kw})


def error(**kw: object) -> DataError:
    with pytest.raises(DataError) as e:
        check_source(cfg(**kw))
    return e.value


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": glue(tmp_path / "train.tsv", 90, 0),
        "dev": glue(tmp_path / "dev.tsv", 30, 1, start=1000),
        "test": glue(tmp_path / "test.tsv", 24, 2, start=2000),
    }


def test_a_train_and_dev_pair_measures_on_the_dev_file(files: dict[str, Path]) -> None:
    c = cfg(files={"train": str(files["train"]), "validation": str(files["dev"])}, label_names=NAMES, val_size=10)
    splits = split_source(read_source(c), c, seed=0)
    dev = [line.split("\t")[0] for line in files["dev"].read_text().splitlines()[1:]]
    assert sorted(splits.frames["test"].text) == sorted(dev)  # every dev row, none drawn, none lost
    assert len(splits.frames["val"]) == 10 and len(splits.frames["train"]) == 80  # val drawn from train
    assert not set(splits.frames["val"].text) & set(splits.frames["train"].text)
    assert "dev.tsv" in splits.origin["test"] and "no test split was given" in splits.origin["test"]
    assert "drawn from the train split" in splits.origin["val"]
    assert splits.names == NAMES


def test_three_given_splits_are_used_as_they_are(files: dict[str, Path]) -> None:
    c = cfg(files={k if k != "dev" else "validation": str(p) for k, p in files.items()})
    splits = split_source(read_source(c), c, seed=0)
    assert {k: len(v) for k, v in splits.frames.items()} == {"train": 90, "val": 30, "test": 24}
    assert splits.names == ["0", "1", "2"]  # no label_names: numeric labels are their own names


def test_a_size_set_in_the_recipe_subsamples_a_given_split_seeded(files: dict[str, Path]) -> None:
    c = cfg(files={"train": str(files["train"]), "test": str(files["test"])}, test_size=7, val_size=5)
    a, b = (split_source(read_source(c), c, seed=3) for _ in range(2))
    assert len(a.frames["test"]) == 7 and list(a.frames["test"].text) == list(b.frames["test"].text)
    other = split_source(read_source(c), c, seed=4)
    assert list(other.frames["test"].text) != list(a.frames["test"].text)


def test_label_names_name_numeric_labels_by_position(tmp_path: Path) -> None:
    train = tmp_path / "t.csv"
    train.write_text("sentence,label\n" + "".join(f"text number {i},{i % 2}\n" for i in range(40)))
    c = cfg(source=str(train), label_names=["bad", "good"], test_size=10, val_size=4)
    splits = split_source(read_source(c), c, seed=0)
    test = splits.frames["test"]
    for text, label in zip(test.text, test.label, strict=True):
        assert splits.names[label] == ["bad", "good"][int(text.split()[-1]) % 2]


def test_leakage_is_counted_after_case_and_whitespace_normalisation(files: dict[str, Path], tmp_path: Path) -> None:
    train_texts = [line.split("\t")[0] for line in files["train"].read_text().splitlines()[1:]]
    dev = tmp_path / "leaky.tsv"
    leaked = [f"  {t.upper()}  " for t in train_texts[:3]]
    rows = [*leaked, *(f"fresh words {i}" for i in range(27))]
    dev.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 3}\n" for i, t in enumerate(rows)))
    given = {"train": str(files["train"]), "validation": str(files["dev"]), "test": str(dev)}
    c = cfg(files=given)  # train whole: no row of it is drawn into val
    splits = split_source(read_source(c), c, seed=0)
    assert splits.leakage == {"test": (3, 30), "val": (0, 30)}
    from kdpipe.data.splits import leakage_warnings

    warnings = leakage_warnings(splits, c)
    assert len(warnings) == 1 and "3 of the 30 test texts (10.0%)" in warnings[0]
    quiet = cfg(files=given, leakage_warn=0.2)
    assert leakage_warnings(split_source(read_source(quiet), quiet, seed=0), quiet) == []


def test_the_embedded_default_has_the_leak_the_issue_names() -> None:
    recipe, _ = load_recipe("default")
    d = recipe.teacher.data
    splits = split_source(read_source(d), d, recipe.seed)
    assert splits.leakage["test"] == (37, 2000)
    from kdpipe.artifacts.records import LeakageCount
    from kdpipe.data.splits import leakage_warnings

    # the warning and the report round the share the same way (1.85% is 1.9%, not 1.8% from a float's 1.8499...)
    assert "37 of the 2,000 test texts (1.9%)" in leakage_warnings(splits, d)[0]
    assert LeakageCount(overlap=37, of=2000).percent == "1.9%"
    assert overlap(["A  b"], ["a b", "ab"]) == (1, 2)


def test_new_fields_leave_the_run_id_of_a_teacher_that_does_not_use_them() -> None:
    dumped = DataConfig().model_dump(mode="json")
    assert not {"files", "label_names", "leakage_warn"} & set(dumped)


def test_a_given_file_is_hashed_by_content(files: dict[str, Path]) -> None:
    c = cfg(files={"train": str(files["train"]), "validation": str(files["dev"])})
    from kdpipe.artifacts.manifest import FileRecord

    before = {n: FileRecord.of(p, n).sha256 for n, p in source_files(c)}
    assert set(before) == {"data/train/train.tsv", "data/validation/dev.tsv"}
    files["dev"].write_text(files["dev"].read_text().replace("n1000", "n1000 changed"))
    after = {n: FileRecord.of(p, n).sha256 for n, p in source_files(c)}
    assert after["data/validation/dev.tsv"] != before["data/validation/dev.tsv"]
    assert after["data/train/train.tsv"] == before["data/train/train.tsv"]


# --------------------------------------------------------------------------- a `datasets` directory
def _dataset_dict(path: Path, classlabel: bool = True) -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    label = ClassLabel(names=["neg", "pos"]) if classlabel else Value("int64")
    feats = Features({"sentence": Value("string"), "label": label})

    def part(n: int, start: int) -> Dataset:
        texts = [f"sample text {start + i}" for i in range(n)]
        return Dataset.from_dict({"sentence": texts, "label": [i % 2 for i in range(n)]}, features=feats)

    DatasetDict({"train": part(40, 0), "validation": part(12, 100)}).save_to_disk(str(path))
    return path


def test_a_dataset_dict_gives_its_splits_and_classlabel_names(tmp_path: Path) -> None:
    d = _dataset_dict(tmp_path / "ds")
    c = cfg(source=str(d), val_size=6)
    splits = split_source(read_source(c), c, seed=0)
    assert splits.names == ["neg", "pos"]
    assert len(splits.frames["test"]) == 12 and "validation" in splits.origin["test"]
    assert {n.split("/")[1] for n, _ in source_files(c)} == {"train", "validation"}


def test_a_dataset_split_directory_is_a_given_file(tmp_path: Path) -> None:
    d = _dataset_dict(tmp_path / "ds")
    c = cfg(files={"train": str(d / "train"), "validation": str(d / "validation")}, val_size=6)
    assert split_source(read_source(c), c, seed=0).names == ["neg", "pos"]


def test_a_dataset_without_the_named_column_is_one_line(tmp_path: Path) -> None:
    d = _dataset_dict(tmp_path / "ds")
    e = error(source=str(d), label_column="sentiment")
    assert "no column 'sentiment'" in e.message and "sentence, label" in e.message and "label_column" in e.hint


def test_a_dataset_dict_given_as_one_split_is_refused(tmp_path: Path) -> None:
    d = _dataset_dict(tmp_path / "ds")
    e = error(files={"train": str(d)})
    assert "a DatasetDict (splits train, validation), not one split" in e.message


def test_a_broken_dataset_directory_is_one_line(tmp_path: Path) -> None:
    d = _dataset_dict(tmp_path / "ds")
    for arrow in (d / "train").glob("*.arrow"):
        arrow.write_bytes(b"not arrow at all")
    e = error(source=str(d))
    assert "not a readable `datasets` directory" in e.message and "save_to_disk" in e.hint


# --------------------------------------------------------------------------- bad input, planted
def test_the_same_file_for_two_splits_is_refused(files: dict[str, Path]) -> None:
    e = error(files={"train": str(files["train"]), "test": str(files["train"])})
    assert "teacher.data.files.test" in e.message and "also the train split" in e.message


def test_a_held_out_split_inside_train_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.tsv"
    copy.write_text(files["train"].read_text())
    e = error(files={"train": str(files["train"]), "validation": str(copy)})
    assert "every one of its 90 texts also occurs in the train split" in e.message


def test_an_empty_given_split_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    e = error(files={"train": str(files["train"]), "test": str(empty)})
    assert e.message.startswith("teacher.data.files.test:") and "has no rows" in e.message


def test_a_split_in_another_schema_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\tidx\n" + "".join(f"words {i}\t{i % 3}\t{i}\n" for i in range(10)))
    e = error(files={"train": str(files["train"]), "test": str(other)})
    assert "has columns [sentence, label, idx]" in e.message and "[sentence, label]" in e.message


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d"]])
def test_label_names_of_the_wrong_length_are_refused(files: dict[str, Path], names: list[str]) -> None:
    e = error(files={"train": str(files["train"])}, label_names=names, val_size=5, test_size=5)
    assert e.message.startswith("teacher.data.label_names:") and f"{len(names)} names for labels 0..2" in e.message


def test_label_names_on_text_labels_are_refused(tiny_csv: Path) -> None:
    e = error(source=str(tiny_csv), label_names=NAMES, test_size=20, val_size=5)
    assert "names numeric labels" in e.message and "drop teacher.data.label_names" in e.hint


def test_source_and_files_together_are_a_config_error(tmp_path: Path, tiny_dir: Path, files: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, files["train"], tmp_path / "runs")
    code, out = invoke("teacher", "--recipe", recipe, "--set", f"teacher.data.files={{train: {files['train']}}}")
    assert_one_line_error(code, out, "both source", "files")


def test_bad_splits_fail_on_the_command_line_before_any_model_loads(tmp_path: Path, files: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "no-such-model", files["train"], tmp_path / "runs")
    given = f"{{train: {files['train']}, test: {files['train']}}}"
    code, out = invoke(
        "teacher", "--recipe", recipe, "--set", "teacher.data.source=default", "--set", f"teacher.data.files={given}"
    )
    assert_one_line_error(code, out, "also the train split")  # the data's error, not the missing model's
    assert not (tmp_path / "runs" / "teacher").exists()


def test_the_split_options_of_kdpipe_teacher_reach_the_recipe(tmp_path: Path, files: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "no-such-model", files["train"], tmp_path / "runs")
    base = ["teacher", "--recipe", recipe, "--set", "teacher.data.source=default"]
    code, out = invoke(*base, "--train", files["train"], "--validation", files["dev"], "--label-names", "a,b")
    assert_one_line_error(code, out, "teacher.data.label_names: 2 names for labels 0..2")
    code, out = invoke(*base, "--train", files["train"], "--test", files["train"])
    assert_one_line_error(code, out, "teacher.data.files.test", "also the train split")
