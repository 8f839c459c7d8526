"""kdpipe from Python: the README's example, run as it stands on a tiny model with a user's own train / dev files
(GLUE-style TSVs, numeric labels named), reports accuracy on the given dev file; errors are kdpipe's own."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_recipe
from test_data_splits import NAMES, glue

import kdpipe
from kdpipe.artifacts.records import DistillRecord, ProfileRecord, TeacherRecord
from kdpipe.errors import ConfigError, DataError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The python block of the README's "From Python" section."""
    text = README.read_text()
    section = text[text.index("### From Python") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    return block.group(1)


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("api")
    train, dev = glue(base / "train.tsv", 150, 0), glue(base / "dev.tsv", 45, 1, start=1000)
    files = {"train": str(train), "validation": str(dev)}
    recipe = write_recipe(
        base / "recipe.yaml",
        tiny_dir,
        train,
        base / "runs",
        teacher__data__source="default",
        teacher__data__files=files,
        teacher__data__label_names=NAMES,
        teacher__epochs=10,
        distill__epochs=2,
    )
    code = readme_example()
    line = 'recipe, out = "default", "runs/default"'
    assert line in code, "the README example's first line changed: update this test"
    code = code.replace(line, f"recipe, out = {str(recipe)!r}, {str(base / 'runs')!r}")
    scope: dict[str, Any] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md (From Python)", "exec"), scope)
    return {"result": scope["result"], "printed": printed.getvalue(), "dev": dev, "recipe": recipe, "base": base}


def test_the_readme_example_runs_and_prints_the_records(glue_run: dict[str, Any]) -> None:
    result = glue_run["result"]
    assert isinstance(result, kdpipe.RunResult)
    assert isinstance(result["teacher"].record, TeacherRecord)
    assert isinstance(result["distill"].record, DistillRecord)
    assert isinstance(result.profile, ProfileRecord) and result.report.is_file()
    assert f"deployed {result.profile.deploy}" in glue_run["printed"] and str(NAMES) in glue_run["printed"]


def test_a_run_on_given_train_and_dev_files_reports_accuracy_on_the_dev_file(glue_run: dict[str, Any]) -> None:
    result, dev = glue_run["result"], glue_run["dev"]
    rec = result["teacher"].record
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    assert rec.split_sizes["test"] == len(rows) == 45
    assert "dev.tsv" in rec.data_splits["test"] and "no test split was given" in rec.data_splits["test"]
    assert rec.label_names == NAMES
    tdir = result["teacher"].dir
    id2label = json.loads((tdir / "model" / "config.json").read_text())["id2label"]
    assert id2label == {str(i): n for i, n in enumerate(NAMES)}
    # the test split the teacher measured is the dev file, row for row, with the dev file's labels
    test = [json.loads(line) for line in (tdir / "data" / "test.jsonl").read_text().splitlines()]
    assert sorted((t["text"], t["label"]) for t in test) == sorted((r[0], int(r[1])) for r in rows)
    logits = np.load(tdir / "test_logits.npy")
    accuracy = float(np.mean(logits.argmax(1) == np.array([t["label"] for t in test])))
    assert result["teacher"].metrics["test_accuracy"].value == pytest.approx(accuracy, abs=1e-5)
    report = result.report.read_text()
    assert "dev.tsv" in report and "no test split was given" in report
    assert "- Leakage: 0 of the 45 test texts (0.0%)" in report


def test_a_stage_call_returns_its_record_and_skips_an_identical_run(glue_run: dict[str, Any]) -> None:
    done = kdpipe.teacher(glue_run["recipe"], out=glue_run["base"] / "runs", quiet=True)
    assert done.dir == glue_run["result"]["teacher"].dir and isinstance(done.record, TeacherRecord)
    assert done.manifest.run_id == glue_run["result"]["teacher"].manifest.run_id


def test_errors_are_kdpipes_own_not_exits(glue_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distill.epochs"):
        kdpipe.run(glue_run["recipe"], overrides={"distill.epochs": -1}, out=tmp_path / "runs", quiet=True)
    with pytest.raises(DataError, match="also the train split"):
        given = {"train": str(glue_run["dev"]), "test": str(glue_run["dev"])}
        kdpipe.run(glue_run["recipe"], overrides={"teacher.data.files": given}, out=tmp_path / "r2", quiet=True)
    with pytest.raises(ConfigError, match="not a recipe value"):
        kdpipe.run(glue_run["recipe"], overrides={"seed": object()}, quiet=True)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r2").exists()
