"""The stage contract: the STAGES table, typed hand-over records, and stage signatures without `Any`."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from kdpipe.artifacts import Manifest, read_manifest
from kdpipe.errors import ArtifactError
from kdpipe.pipeline import CHAIN, STAGES
from kdpipe.records import DistillRecord, ExportRecord, StudentRecord, TeacherRecord, record


def test_the_chain_is_in_the_table_and_each_stage_names_its_upstream() -> None:
    assert set(CHAIN) <= set(STAGES)
    for before, after in zip(CHAIN, CHAIN[1:], strict=False):
        assert STAGES[after].upstream == before
    assert STAGES["teacher"].upstream is None
    assert STAGES["assistant"].kind == "teacher" and STAGES["assistant"].upstream == "distill"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_signatures_are_typed_without_any(name: str) -> None:
    """run_<stage>(cfg: <Stage>Config, upstream: Manifest | None, out: Path, ctx: RunContext) -> StageOutput."""
    run = STAGES[name].run
    hints = typing.get_type_hints(run)
    assert run.__name__ == f"run_{name}"
    assert list(hints) == [*list(hints)[:4], "return"] and len(hints) == 5
    assert typing.Any not in hints.values(), hints
    assert hints["return"].__name__ == "StageOutput"
    assert hints[list(hints)[2]] is Path


def test_records_read_back_as_their_types(finished: tuple[Path, Path]) -> None:
    _, runs = finished
    teacher = record(read_manifest(runs / "teacher", "teacher"), TeacherRecord)
    assert teacher.label_names == ["negative", "neutral", "positive"] and teacher.split_sizes["test"] == 60
    student = record(read_manifest(runs / "student", "student"), StudentRecord)
    # JSON has string keys; the record gives the layer map back with int keys
    assert student.layer_map == {0: 0, 1: 1} and all(isinstance(k, int) for k in student.layer_map)
    distill = record(read_manifest(runs / "distill", "distill"), DistillRecord)
    assert distill.schedule_kind == "all" and distill.history
    export = record(read_manifest(runs / "export", "export"), ExportRecord)
    assert export.models["student"].parity.ok and export.models["student"].source.stage == "distill"


def test_a_record_of_another_shape_is_refused(finished: tuple[Path, Path], tmp_path: Path) -> None:
    _, runs = finished
    m = Manifest.from_file(runs / "student" / "manifest.json")
    data = json.loads(m.to_json())
    data["record"]["layer_map"] = "every-other"  # not a mapping
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    broken = Manifest.from_file(tmp_path / "manifest.json")
    with pytest.raises(ArtifactError, match="layer_map"):
        record(broken, StudentRecord)
    with pytest.raises(ArtifactError, match="TeacherRecord"):
        record(m, TeacherRecord)  # a student's record is not a teacher's


def test_a_manifest_of_the_old_schema_is_refused(finished: tuple[Path, Path], tmp_path: Path) -> None:
    _, runs = finished
    data = json.loads((runs / "teacher" / "manifest.json").read_text())
    data["schema_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema_version 1"):
        Manifest.from_file(tmp_path / "manifest.json")
