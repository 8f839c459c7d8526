"""Task-neutral records: the teacher's task info is a discriminated union (one task's record never reads as
another's), parity says what it compared, gates carry the task's metric; a run written before these shapes is
reused where it can be (a classification teacher) and refused in one line asking for --force where not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import invoke
from pydantic import ValidationError

from kdpipe.artifacts.manifest import Manifest, write_json_atomic
from kdpipe.artifacts.records import (
    ClassificationInfo,
    EmbeddingInfo,
    Gate,
    Parity,
    TeacherRecord,
    TranslationInfo,
    record,
)
from kdpipe.errors import ArtifactError

SHARED: dict[str, Any] = {
    "label_names": [],
    "max_length": 16,
    "split_sizes": {"train": 4},
    "data_source": "d.tsv",
    "data_sha256": "0" * 64,
    "model_source": "m",
    "finetuned": True,
    "trained_params": "all",
}
TRANSLATION = {"source_column": "en", "target_column": "de", "max_new_tokens": 8, "label_smoothing": 0.1,
               "from_scratch": True}  # fmt: skip


def _manifest(rec: dict[str, Any]) -> Manifest:
    return Manifest("teacher", "x", {}, "h", [], [], {}, record=rec, dir=Path("/nowhere"))


def test_the_info_is_told_apart_by_its_task_tag() -> None:
    rec = TeacherRecord(**SHARED, info=TranslationInfo(**TRANSLATION))
    back = record(_manifest(rec.model_dump(mode="json")), TeacherRecord)
    assert back.task == "translation" and back.info_as(TranslationInfo).max_new_tokens == 8
    # translation's fields under an embedding tag: refused, not half-read as an embedding teacher
    bad = {**SHARED, "info": {**TRANSLATION, "task": "embedding"}}
    with pytest.raises(ArtifactError, match="does not fit TeacherRecord"):
        record(_manifest(bad), TeacherRecord)
    with pytest.raises(ArtifactError, match="does not fit TeacherRecord"):
        record(_manifest({**SHARED, "info": {"task": "speech"}}), TeacherRecord)


def test_a_task_reading_another_tasks_teacher_gets_one_line() -> None:
    rec = TeacherRecord(**SHARED, info=TranslationInfo(**TRANSLATION))
    with pytest.raises(ArtifactError, match="a translation teacher, not a embedding one"):
        rec.info_as(EmbeddingInfo)
    assert isinstance(TeacherRecord(**SHARED).info, ClassificationInfo)


def test_a_classification_teacher_from_before_info_is_reused() -> None:
    old = {**SHARED, "task": "classification", "translation": None, "embedding": None}
    back = record(_manifest(old), TeacherRecord)
    assert back.task == "classification" and back.label_names == []
    assert record(_manifest(dict(SHARED)), TeacherRecord).task == "classification"  # before the `task` field too


def test_an_old_translation_teacher_asks_for_force() -> None:
    old = {**SHARED, "task": "translation", "translation": TRANSLATION, "embedding": None}
    with pytest.raises(ArtifactError) as e:
        record(_manifest(old), TeacherRecord)
    assert "--force" in (e.value.hint)


def test_parity_and_gate_must_say_what_they_measured() -> None:
    parity = {"max_abs_diff": 0.0, "atol": 1e-4, "agreement": 1.0, "examples": 2, "shapes": [], "nonfinite_outputs": 0,
              "ok": True}  # fmt: skip
    with pytest.raises(ValidationError, match="kind"):
        Parity.model_validate(parity)
    with pytest.raises(ValidationError, match="kind"):
        Parity.model_validate({**parity, "kind": "accuracy"})
    assert Parity.model_validate({**parity, "kind": "cosine"}).kind == "cosine"
    gate = {"examples": 2, "value": 0.5, "reference": 0.5, "budget": 0.49, "agreement": 1.0, "max_abs_diff": 0.0,
            "atol": None, "nonfinite_outputs": 0, "ok": True}  # fmt: skip
    with pytest.raises(ValidationError, match="metric"):
        Gate.model_validate(gate)
    old = {**gate, "metric": "accuracy", "accuracy": 0.5, "reference_accuracy": 0.5}
    del old["value"], old["reference"]
    with pytest.raises(ValidationError):
        Gate.model_validate(old)


def _rewrite(path: Path, edit: Any) -> None:
    m = json.loads(path.read_text())
    edit(m["record"])
    write_json_atomic(path, json.dumps(m))


def test_old_run_directories_profile_or_ask_for_force(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)

    def pre_info(rec: dict[str, Any]) -> None:  # the teacher record as the last release wrote it
        rec.pop("info")
        rec.update(task="classification", translation=None, embedding=None)

    _rewrite(copy / "teacher" / "manifest.json", pre_info)
    code, out = invoke("profile", "-r", recipe, "-o", copy, "--force")
    assert code == 0, out  # the existing teacher is reused, not retrained

    def pre_gate(rec: dict[str, Any]) -> None:  # an export record from before the task-neutral gate
        gate = rec["models"]["student"]["gate"]
        gate["accuracy"], gate["reference_accuracy"] = gate.pop("value"), gate.pop("reference")

    _rewrite(copy / "export" / "manifest.json", pre_gate)
    code, out = invoke("profile", "-r", recipe, "-o", copy, "--force")
    assert code != 0 and "Traceback" not in out, out
    assert "export manifest's record does not fit ExportRecord" in out and "--force" in out, out
