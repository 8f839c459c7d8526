"""The stage contract: the STAGES table, typed hand-over records, and stage signatures without `Any`."""

from __future__ import annotations

import json
import os
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from conftest import invoke, make_model_dir, write_recipe

from kdpipe.artifacts.manifest import Manifest, read_manifest, run_id
from kdpipe.artifacts.records import DistillRecord, ExportRecord, StudentRecord, TeacherRecord, record
from kdpipe.config import config_hash, load_recipe
from kdpipe.errors import ArtifactError
from kdpipe.pipeline.runner import CHAIN, STAGES, context


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


def _rid(name: str, recipe_path: Path, upstream_dir: Path) -> str:
    recipe, _ = load_recipe(recipe_path)
    spec, ctx = STAGES[name], context(recipe)
    upstream = read_manifest(upstream_dir, spec.upstream)
    cfg = spec.section(recipe, ctx)
    return run_id(spec.name, config_hash(spec.identity(cfg, ctx)), spec.inputs(cfg, upstream), [upstream.run_id])


def test_transfer_file_is_hashed_by_content(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    transfer = tmp_path / "transfer.txt"
    transfer.write_text("good day\nbad day\n")
    data = yaml.safe_load(recipe.read_text())
    data["distill"]["transfer"] = str(transfer)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(data))
    before = _rid("distill", r, runs / "student")
    transfer.write_text("good day\nterrible day\n")  # same path, other content
    assert _rid("distill", r, runs / "student") != before


def test_pretrained_student_and_extra_teachers_are_hashed_by_content(
    finished: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    recipe, runs = finished
    other = make_model_dir(tmp_path / "other", layers=1)
    data = yaml.safe_load(recipe.read_text())
    data["student"]["pretrained"] = str(other)
    data["distill"]["extra_teachers"] = [str(other)]
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(data))
    s_before, d_before = _rid("student", r, runs / "teacher"), _rid("distill", r, runs / "student")
    make_model_dir(other, layers=1, seed=1)  # same directory, other weights
    assert _rid("student", r, runs / "teacher") != s_before
    assert _rid("distill", r, runs / "student") != d_before


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny_csv: Path) -> Path:
    """A full run written with paths relative to its working directory (as a user types them)."""
    base = tmp_path_factory.mktemp("reloc")
    shutil.copytree(tiny_dir, base / "teacher-model")
    shutil.copyfile(tiny_csv, base / "tiny.csv")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        write_recipe(base / "recipe.yaml", Path("teacher-model"), Path("tiny.csv"), Path("runs"))
        code, out = invoke("run", "recipe.yaml", "-o", base / "runs")  # an absolute --out, as scripts give it
        assert code == 0, out
    finally:
        os.chdir(cwd)
    return base


def _absolute_paths(root: Path, needle: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and (p.name == "manifest.json" or p.suffix in (".md", ".json")):
            text = p.read_text(encoding="utf-8")
            if needle in text or "site-packages" in text:
                hits.append(str(p.relative_to(root)))
    return hits


def test_no_absolute_path_in_any_manifest_or_report(relative_run: Path) -> None:
    assert _absolute_paths(relative_run / "runs", str(relative_run)) == []
    assert _absolute_paths(relative_run / "runs", "/tmp/") == []


def test_moved_run_profiles_and_reports(relative_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved = tmp_path / "elsewhere" / "moved-runs"
    moved.parent.mkdir()
    shutil.copytree(relative_run, tmp_path / "copy")
    shutil.move(str(tmp_path / "copy" / "runs"), moved)  # `mv runs elsewhere/moved-runs`
    monkeypatch.chdir(tmp_path / "copy")
    code, out = invoke("profile", "-r", "recipe.yaml", "-o", moved, "--force")
    assert code == 0, out
    report = (moved / "profile" / "report.md").read_text()
    assert "## Latency" in report and str(tmp_path) not in report
    assert _absolute_paths(moved, str(tmp_path)) == []


def test_copied_run_profiles_its_own_models(
    relative_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy must not reach back into the original: hide the original's models, profile the copy."""
    monkeypatch.chdir(relative_run)
    shutil.copytree(relative_run / "runs", tmp_path / "b")
    hidden = [
        (relative_run / "runs" / d / "model", relative_run / "runs" / d / "hidden") for d in ("teacher", "distill")
    ]
    for src, dst in hidden:
        src.rename(dst)
    try:
        code, out = invoke("profile", "-r", relative_run / "recipe.yaml", "-o", tmp_path / "b", "--force")
    finally:
        for src, dst in hidden:
            dst.rename(src)
    assert code == 0, out


def test_data_free_through_a_teaching_assistant(tiny_dir: Path, tiny_csv: Path, tmp_path: Path) -> None:
    teacher3 = make_model_dir(tmp_path / "t3", layers=3)
    recipe = write_recipe(tmp_path / "r.yaml", teacher3, tiny_csv, tmp_path / "runs")
    data = yaml.safe_load(recipe.read_text())
    data["assistant"] = {"layers": [0, 2]}
    data["distill"].update(
        {
            "losses": [{"name": "hinton", "temperature": 2.0}],
            "epochs": 1,
            "baseline": False,
            "cka_samples": 0,
            "data_free": {"samples_per_class": 4, "seq_len": 6, "steps": 2},
        }
    )
    data["export"]["teacher"] = False
    recipe.write_text(yaml.safe_dump(data))
    code, out = invoke("run", recipe)
    assert code == 0, out
    runs = tmp_path / "runs"
    assistant = read_manifest(runs / "assistant", "teacher")
    assert "logit_stats.json" in {r.path for r in assistant.outputs}
    from test_cards import front_matter  # the promoted assistant's model card, a hashed output like its model

    assert "model/README.md" in {r.path for r in assistant.outputs}
    assert front_matter((runs / "assistant" / "model" / "README.md").read_text())["tags"][:3] == [
        "kdpipe",
        "distillation",
        "teacher",
    ]
    assert read_manifest(runs / "distill", "distill").record["data_free"]["inputs"] == 12
