"""Artifacts that lie (issue 16): a comparison against something that is not a report, a manifest whose outputs
list was edited, a manifest that is JSON but not an object, a teacher that scored 0, a full disk, a damaged
teacher-output cache. Each test plants the fault and checks it is refused (or said), never reported as success."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke

from kdpipe.artifacts.manifest import write_json_atomic


def _copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    recipe, runs = finished
    run = tmp_path / "run"
    shutil.copytree(runs, run)
    return recipe, run


# ----------------------------------------------------------------------------- --compare against a non-report
def _report(run: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run / "profile" / "report.json").read_text())


def test_compare_against_a_manifest_or_junk_is_an_error_not_a_pass(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kdpipe.errors import ArtifactError
    from kdpipe.profiling.compare import compare_runs

    _, run = _copy(finished, tmp_path)
    new = run / "profile"
    good = _report(run)
    junk = {
        "manifest.json": (run / "distill" / "manifest.json").read_text(),  # valid JSON, a stage's manifest
        "list.json": "[]",
        "null.json": "null",
        "text.json": "not json at all {",
        "binary.json": "\x00\x01\x02",
        "empty-models.json": json.dumps({**good, "models": {}}),
        "old-schema.json": json.dumps({**good, "schema": 0}),
        "no-p50.json": json.dumps({**good, "models": {"student": {"latency": {"1x16": {}}}}}),
        "str-bytes.json": json.dumps({**good, "models": {"student": {**good["models"]["student"], "bytes": "1 MB"}}}),
    }
    for name, text in junk.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ArtifactError, match="not a kdpipe report.json") as e:
            compare_runs(path, new)
        assert "no regression" not in e.value.message
    for empty in (tmp_path / "nothing-here", tmp_path / "missing.json"):
        (tmp_path / "nothing-here").mkdir(exist_ok=True)
        with pytest.raises(ArtifactError, match="no report.json"):
            compare_runs(empty, new)
    other = tmp_path / "other.json"  # a real report of other models: nothing in common, nothing compared
    other.write_text(json.dumps({**good, "models": {"bilstm": good["models"]["student"]}}))
    with pytest.raises(ArtifactError, match="nothing to compare"):
        compare_runs(other, new)
    # the same run against itself: a real comparison, of every model, and no regression
    lines = compare_runs(run, new)
    assert len(lines) == 1 and "no regression" in lines[0] and "student-int8-dynamic" in lines[0]


def test_kdpipe_profile_compare_with_a_manifest_exits_1(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _copy(finished, tmp_path)
    code, out = invoke("profile", "-r", recipe, "-o", run, "--compare", run / "distill" / "manifest.json")
    assert_one_line_error(code, out, "not a kdpipe report.json", "distill/manifest.json")
    assert "no regression" not in out
    code, out = invoke("profile", "-r", recipe, "-o", run, "--compare", run)
    assert code == 0 and "no regression" in out, out


# ----------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("text", ["[]", "null", "1", '"manifest"', "\udcff"])
def test_a_manifest_that_is_not_an_object_is_one_clear_error(finished, tmp_path, text) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _copy(finished, tmp_path)
    target = run / "export" / "manifest.json"
    if text == "\udcff":
        target.write_bytes(b"\xff\xfe{")  # not UTF-8 at all
    else:
        target.write_text(text)
    code, out = invoke("profile", "-r", recipe, "-o", run, "--force")
    assert_one_line_error(code, out, "export/manifest.json: not a valid kdpipe manifest")
    assert "unexpected" not in out


def test_a_file_the_manifest_does_not_list_is_never_loaded(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Dropping model.safetensors from the distill manifest's outputs must not let export use the file unverified
    (the file is still there, and read_manifest only checks the files the manifest lists)."""
    recipe, run = _copy(finished, tmp_path)
    mpath = run / "distill" / "manifest.json"
    m = json.loads(mpath.read_text())
    before = len(m["outputs"])
    m["outputs"] = [r for r in m["outputs"] if r["path"] != "model/model.safetensors"]
    assert len(m["outputs"]) == before - 1
    write_json_atomic(mpath, json.dumps(m))
    code, out = invoke("export", "-r", recipe, "-o", run, "--force")
    assert_one_line_error(code, out, "model.safetensors: not among the distill manifest's outputs")
    # a file added beside the listed ones (e.g. a swapped-in pytorch_model.bin) is refused the same way
    recipe, run = _copy(finished, tmp_path / "second")
    (run / "distill" / "model" / "pytorch_model.bin").write_bytes(b"\x00" * 64)
    code, out = invoke("export", "-r", recipe, "-o", run, "--force")
    assert_one_line_error(code, out, "pytorch_model.bin: not among the distill manifest's outputs")


def test_manifest_directory_lists_and_refuses() -> None:
    from kdpipe.artifacts.manifest import FileRecord, Manifest
    from kdpipe.errors import ArtifactError

    m = Manifest("distill", "r", {}, "h", [], [FileRecord("model/config.json", "0", 1)], {})
    with pytest.raises(ArtifactError, match="lists no directory 'onnx'"):
        m.directory("onnx")


# ----------------------------------------------------------------------------- a teacher that scored 0
def test_a_teacher_with_zero_accuracy_gets_a_report_not_a_zero_division(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _copy(finished, tmp_path)
    mpath = run / "teacher" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["metrics"]["test_accuracy"]["value"] = 0.0
    write_json_atomic(mpath, json.dumps(m))
    code, out = invoke("profile", "-r", recipe, "-o", run, "--force")
    assert code == 0, out
    report = (run / "profile" / "report.md").read_text()
    assert "undefined (teacher accuracy 0)" in report


def test_retention_is_never_a_division_by_zero_or_nan() -> None:
    from kdpipe.reporting.report import _retention

    assert _retention(0.78, 0.80) == "97.5%"
    assert _retention(0.5, 0.0) == "undefined (teacher accuracy 0)"
    assert _retention(0.5, float("nan")) == "n/a" and _retention(None, 0.8) == "n/a"


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_while_saving_a_model_is_one_line_and_leaves_no_temp(finished, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """safetensors reports ENOSPC as a SafetensorError; the stage's temp directory must go and the error name the
    directory."""
    import safetensors
    import transformers.modeling_utils

    recipe, run = _copy(finished, tmp_path)

    def full(*args: object, **kwargs: object) -> None:
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # what save_pretrained calls
    code, out = invoke("student", "-r", recipe, "-o", run, "--force")
    assert_one_line_error(code, out, f"no space left on {run}")
    assert "unexpected" not in out
    assert not list(run.glob(".student.tmp-*")) and (run / "student" / "manifest.json").is_file()  # old one kept


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_during_a_stage(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The real thing: a tmpfs just big enough for the teacher stage, so the student's weights do not fit."""
    recipe, runs = finished
    mnt = tmp_path / "small"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in (runs / "teacher").rglob("*") if p.is_file())
    size_kib = used // 1024 + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("this machine does not let root mount a tmpfs (a container without CAP_SYS_ADMIN)")
    try:
        shutil.copytree(runs / "teacher", mnt / "teacher")
        code, out = invoke("student", "-r", recipe, "-o", mnt)
        assert_one_line_error(code, out, f"no space left on {mnt}")
        assert not [p for p in mnt.iterdir() if p.name.startswith(".student")], list(mnt.iterdir())
        assert not (mnt / "student").exists()
    finally:
        # lazy: the teacher's weights may still be memory-mapped by this process; the mount goes once they are not
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------- the teacher-output cache
def test_a_rebuilt_teacher_cache_says_why(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _copy(finished, tmp_path)
    caches = list((run / "cache" / "teacher-outputs").iterdir())
    assert len(caches) == 1
    logits = caches[0] / "logits.npy"
    raw = bytearray(logits.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])  # flip the last logit's bytes
    logits.write_bytes(bytes(raw))
    code, out = invoke("distill", "-r", recipe, "-o", run, "--force", "--no-baseline")
    assert code == 0, out
    assert "teacher cache rebuilt" in out and "logits.npy: changed since it was written" in out, out
    rec = json.loads((run / "distill" / "manifest.json").read_text())["record"]["teacher_cache"]
    assert rec["status"] == "miss" and "logits.npy: changed since it was written" in rec["rebuilt_because"]
    assert str(run) not in rec["rebuilt_because"]  # paths in a manifest are relative to the run


# ----------------------------------------------------------------------------- output roots that cannot be made
def test_an_out_root_below_a_file_is_one_line(tiny_recipe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, out = invoke("student", "-r", tiny_recipe, "-o", blocker / "runs")
    assert_one_line_error(code, out, "cannot be created", "a-file is not a directory")


def test_an_out_root_the_os_refuses_is_one_line(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kdpipe.artifacts.manifest import locked
    from kdpipe.errors import ArtifactError

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    refused = pytest.raises(ArtifactError, match="cannot create the output directory \\(Permission denied\\)")
    with refused, locked(tmp_path / "runs"):
        pass


def test_compare_on_a_run_without_report_json_says_so(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kdpipe.errors import ArtifactError
    from kdpipe.profiling.compare import compare_runs

    _, run = _copy(finished, tmp_path)
    (run / "profile" / "report.json").unlink()  # as a translation run's profile writes none
    with pytest.raises(ArtifactError, match="wrote no report.json"):
        compare_runs(run, run / "profile")


@pytest.mark.parametrize("bad", ["../teacher/model/model.safetensors", "/etc/passwd", "", "model/../../x", "a\\b"])
def test_a_manifest_output_outside_its_stage_is_refused(finished, tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.errors import ArtifactError

    _, run = _copy(finished, tmp_path)
    mpath = run / "distill" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["outputs"][0]["path"] = bad
    write_json_atomic(mpath, json.dumps(m))
    with pytest.raises(ArtifactError, match="is not a path inside the stage directory"):
        read_manifest(run / "distill", "distill")


# ----------------------------------------------------------------------------- checkpoint directories
@pytest.mark.parametrize("plant", ["binary-run-id", "run-id-dir", "dir-is-a-file"])
def test_a_damaged_checkpoint_directory_starts_the_stage_over(finished, tmp_path, plant) -> None:  # type: ignore[no-untyped-def]
    recipe, run = _copy(finished, tmp_path)
    d = run / ".checkpoints" / "distill"
    if plant == "dir-is-a-file":
        d.parent.mkdir(exist_ok=True)
        d.write_bytes(b"\x00junk")
    else:
        d.mkdir(parents=True)
        (d / "kd.pt").write_bytes(b"\x00" * 32)
        if plant == "binary-run-id":
            (d / "run_id").write_bytes(b"\xff\xfe\x00\x01")
        else:
            (d / "run_id").mkdir()
    code, out = invoke("distill", "-r", recipe, "-o", run, "--force", "--resume", "--no-baseline")
    assert code == 0, out
    assert "unexpected" not in out and "resuming" not in out
    assert ("starting distill over" in out) or ("not a checkpoint directory" in out), out
    assert not (run / ".checkpoints" / "distill").exists()  # deleted once the stage finished
