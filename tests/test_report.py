"""The report: what it says from the stages' records (warnings, data, verdicts, the assistant chain)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import invoke

from kdpipe.artifacts.manifest import read_manifest, write_json_atomic


def test_stage_warnings_reach_the_report(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    m = json.loads((copy / "teacher" / "manifest.json").read_text())
    m["record"]["warnings"] = ["the teacher predicts one class on the test split"]
    write_json_atomic(copy / "teacher" / "manifest.json", json.dumps(m))
    code, out = invoke("profile", "-r", recipe, "-o", copy, "--force")
    assert code == 0, out
    report = (copy / "profile" / "report.md").read_text()
    assert "> **Warning:** the teacher predicts one class on the test split" in report


def test_subset_sentence_only_for_the_embedded_default() -> None:
    from kdpipe.artifacts.records import TeacherRecord
    from kdpipe.reporting.report import data_lines

    extra = TeacherRecord(
        label_names=["a", "b"],
        max_length=16,
        split_sizes={"train": 10, "val": 2, "test": 5},
        data_source="mine.csv",
        data_sha256="0" * 64,
        data_rows={"read": 20, "dropped_empty_text": 3, "dropped_missing_label": 0},
        model_source="m",
        finetuned=True,
        trained_params="all",
    )
    tcfg = {"seed": 0, "data": {"source": "mine.csv", "train_size": 10}}
    mine = "\n".join(data_lines(extra, tcfg))
    assert "subset of the rows" not in mine
    assert "- Data: 20 rows read, 3 dropped (3 with an empty text, 0 with a missing label)." in mine
    default = "\n".join(data_lines(extra, {"seed": 0, "data": {"source": "default", "train_size": 6000}}))
    assert "subset of the rows is used to keep the default run short" in default


def test_verdict_names_the_winner_and_the_f1_gap() -> None:
    from kdpipe.reporting.report import _verdict

    assert _verdict(0.80, 0.78, 0.70, 0.71).startswith("KD won: +2.00 accuracy points")
    assert "Macro-F1: KD -1.00 points" in _verdict(0.80, 0.78, 0.70, 0.71)
    assert _verdict(0.70, 0.75, 0.6, 0.6).startswith("The no-KD baseline won: 5.00")
    assert _verdict(0.7, 0.7, 0.6, 0.6).startswith("KD and the no-KD baseline tied")


def test_report_reads_the_run_through_its_records(finished: tuple[Path, Path]) -> None:
    from kdpipe.reporting.report import Run

    _, runs = finished
    run = Run.of(read_manifest(runs / "export", "export"))
    assert run.assistant is None and run.student_rec.kept_layers == [0]
    report = (runs / "profile" / "report.md").read_text()
    assert f"teacher layers {run.student_rec.kept_layers}" in report
    assert "| student, KD | 1 |" in report and "| student, no KD (hard labels only) | 1 |" in report
    assert "## ONNX export and parity" in report and "## Latency: profile `tiny`" in report
