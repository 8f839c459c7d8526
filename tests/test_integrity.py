"""Nothing wrong reported as success: locks, content-hashed inputs, relocatable runs, NaN gates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_model_dir, write_recipe
from conftest import assert_one_line_error, invoke

from kdpipe.artifacts import LOCK, atomic_dir, list_outputs, locked, read_manifest, run_id, write_json_atomic
from kdpipe.config import load_recipe
from kdpipe.errors import ArtifactError
from kdpipe.config import config_hash
from kdpipe.pipeline import STAGES, context


@pytest.fixture
def live_pid() -> int:
    """The PID of a process that is alive for the duration of the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(root: Path, pid: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": "t"}))


# ----------------------------------------------------------------------------- the output lock
def test_second_command_on_a_locked_out_is_refused(tiny_recipe: Path, tmp_path: Path, live_pid: int) -> None:
    _write_lock(tmp_path / "runs", live_pid)
    code, out = invoke("teacher", "-r", tiny_recipe, "-o", tmp_path / "runs")
    assert_one_line_error(code, out, "in use by another kdpipe", f"PID {live_pid}", LOCK)
    assert not (tmp_path / "runs" / "teacher").exists()
    assert json.loads((tmp_path / "runs" / LOCK).read_text())["pid"] == live_pid  # the holder's lock is kept


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_recipe: Path, tmp_path: Path) -> None:
    _write_lock(tmp_path / "runs", dead_pid())
    code, out = invoke("teacher", "-r", tiny_recipe, "-o", tmp_path / "runs")
    assert code == 0, out
    assert read_manifest(tmp_path / "runs" / "teacher", "teacher").stage == "teacher"
    assert not (tmp_path / "runs" / LOCK).exists()  # released at the end


def test_lock_is_reentrant_and_exclusive(tmp_path: Path, live_pid: int) -> None:
    with locked(tmp_path), locked(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()
    _write_lock(tmp_path, live_pid)
    with pytest.raises(ArtifactError, match="in use"), locked(tmp_path):
        pass


def test_temporary_dir_of_a_live_process_is_never_cleared(tmp_path: Path, live_pid: int) -> None:
    live = tmp_path / f".teacher.tmp-{live_pid}"
    dead = tmp_path / f".teacher.tmp-{dead_pid()}"
    for d in (live, dead):
        d.mkdir()
        (d / "train.jsonl").write_text("{}")
    with atomic_dir(tmp_path / "teacher") as work:
        (work / "x").write_text("x")
    assert (live / "train.jsonl").is_file()  # another kdpipe's stage in progress survives
    assert not dead.exists()  # a killed run's leftovers are cleared


# ----------------------------------------------------------------------------- inputs by content
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


# ----------------------------------------------------------------------------- relocatable runs
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


# ----------------------------------------------------------------------------- NaN never passes a gate
def _poison(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    for k in state:
        if k.endswith("classifier.weight"):
            state[k] = state[k] * float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


def test_nan_student_fails_the_parity_gate(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    shutil.rmtree(copy / "export")
    shutil.rmtree(copy / "profile")
    _poison(copy / "distill" / "model")
    # re-record the distill outputs, as a stage that wrote NaN weights itself would have
    m = json.loads((copy / "distill" / "manifest.json").read_text())
    m["outputs"] = [r.__dict__ for r in list_outputs(copy / "distill")]
    write_json_atomic(copy / "distill" / "manifest.json", json.dumps(m))
    code, out = invoke("export", "-r", recipe, "-o", copy)
    assert_one_line_error(code, out, "ONNX parity check failed", "student", "NaN/inf")
    assert not (copy / "export").exists()


def test_parity_treats_nan_as_failure(tiny_dir: Path, tmp_path: Path) -> None:
    from kdpipe.export import export_onnx, parity

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, model)
    _poison(model)
    export_onnx(model, tmp_path / "onnx", 18)
    check = parity(model, tmp_path / "onnx" / "model.onnx", ["good day", "bad day"] * 5, 16, 1e-4)
    assert check.ok is False and check.nonfinite_outputs > 0
    assert not check.max_abs_diff <= 1e-4  # NaN or inf: never "within tolerance"


# ----------------------------------------------------------------------------- teaching assistant + data-free
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
    assert read_manifest(runs / "distill", "distill").record["data_free"]["inputs"] == 12


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
