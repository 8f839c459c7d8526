"""The CLI end to end on the tiny model, the skip/re-run logic, and every bad input's one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, invoke, make_model_dir, write_recipe


def test_run_writes_every_stage_and_report(finished: tuple[Path, Path]) -> None:
    recipe, runs = finished
    for stage in ("teacher", "student", "distill", "export", "profile"):
        m = json.loads((runs / stage / "manifest.json").read_text())
        assert m["stage"] == stage and m["schema_version"] == 2
        assert m["outputs"] == sorted(m["outputs"], key=lambda r: r["path"])
        assert all(len(r["sha256"]) == 64 for r in m["outputs"])
        assert not list(runs.glob(f".{stage}.tmp-*"))
    teacher = json.loads((runs / "teacher" / "manifest.json").read_text())
    assert teacher["metrics"]["test_accuracy"]["value"] > 0.6  # the tiny task is learnable
    assert teacher["record"]["split_sizes"] == {"train": 160, "val": 20, "test": 60}
    distill = json.loads((runs / "distill" / "manifest.json").read_text())
    assert {"test_accuracy", "baseline_test_accuracy", "teacher_agreement"} <= set(distill["metrics"])
    latency = json.loads((runs / "profile" / "latency.json").read_text())
    for model in ("student", "teacher"):
        st = latency["onnxruntime"][model]["shapes"]["4x24"]
        assert st["runs"] >= 3 and st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"]
    report = (runs / "profile" / "report.md").read_text()
    for needle in ("teacher", "student, KD", "no KD", "max abs diff", "p50", "speed-up", "parameters", "macro-F1"):
        assert needle in report
    assert (runs / "profile" / "latency.png").stat().st_size > 1000
    assert (runs / "profile" / "training.png").stat().st_size > 1000


def test_rerun_skips_every_stage(finished: tuple[Path, Path]) -> None:
    recipe, runs = finished
    code, out = invoke("run", recipe)
    assert code == 0, out
    for stage in ("teacher", "student", "distill", "export", "profile"):
        assert f"skipped {stage}" in out


def test_changed_field_reruns_that_stage_and_later(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    code, out = invoke("run", recipe, "--out", copy, "--set", "export.atol=0.001")
    assert code == 0, out
    for stage in ("teacher", "student", "distill"):
        assert f"skipped {stage}" in out
    assert "re-running export: atol: 0.0001 -> 0.001" in out
    assert "done profile" in out


def test_stage_commands_chain(tiny_dir: Path, tiny_csv: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_dir, tiny_csv, tmp_path / "runs", distill__baseline=False, distill__epochs=1
    )
    out = tmp_path / "runs"
    assert invoke("teacher", "-r", recipe, "--epochs", "1")[0] == 0
    code, text = invoke("student", "-r", recipe, "--teacher", out / "teacher", "--layers", "1", "--init", "random")
    assert code == 0, text
    student = json.loads((out / "student" / "manifest.json").read_text())
    assert student["record"]["kept_layers"] == [1] and student["record"]["init"] == "random"
    assert student["lineage"] == {"teacher": "../teacher"}
    for cmd, up in (("distill", "--student"), ("export", "--distill"), ("profile", "--export")):
        code, text = invoke(
            cmd, "-r", recipe, up, out / {"distill": "student", "export": "distill", "profile": "export"}[cmd]
        )
        assert code == 0, text
    assert (out / "profile" / "report.md").is_file()


@pytest.mark.parametrize(
    "cmd",
    [
        "--help",
        "run --help",
        "teacher --help",
        "student --help",
        "distill --help",
        "export --help",
        "profile --help",
        "validate --help",
    ],
)
def test_help(cmd: str) -> None:
    code, out = invoke(*cmd.split())
    assert code == 0 and "Usage" in out


def test_validate_every_shipped_recipe_and_profile() -> None:
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "stages").glob("*.yaml")) + sorted((root / "profiles").glob("*.yaml"))
    assert len(files) >= 3
    code, out = invoke("validate", *files)
    assert code == 0, out
    assert out.count("ok:") == len(files)


# ----------------------------------------------------------------------------- bad input
def test_missing_teacher_dir(tiny_recipe: Path, tmp_path: Path) -> None:
    assert_one_line_error(
        *invoke("teacher", "-r", tiny_recipe, "--model", tmp_path / "nope"), "no such model directory"
    )


def test_dir_that_is_not_a_hf_model(tiny_recipe: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        *invoke("teacher", "-r", tiny_recipe, "--model", tmp_path / "empty"), "not a Hugging Face model directory"
    )


def test_unknown_key_in_recipe(tiny_recipe: Path) -> None:
    data = yaml.safe_load(tiny_recipe.read_text())
    data["distill"]["epochz"] = 3
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert_one_line_error(*invoke("run", tiny_recipe), "distill.epochz: unknown field")


def test_wrongly_typed_value_in_recipe(tiny_recipe: Path) -> None:
    assert_one_line_error(*invoke("run", tiny_recipe, "--set", "distill.epochs=lots"), "distill.epochs", "number")


def test_misspelt_loss_name_lists_valid_ones(tiny_recipe: Path) -> None:
    code, out = invoke("validate", tiny_recipe)
    assert code == 0
    data = yaml.safe_load(tiny_recipe.read_text())
    data["distill"]["losses"][0]["name"] = "hintn"
    tiny_recipe.write_text(yaml.safe_dump(data))
    assert_one_line_error(*invoke("validate", tiny_recipe), "distill.losses.0", "'hinton'", "'ce'")


def test_wrongly_typed_value_in_profile(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nintra_op_threads: two\nshapes: [{batch: 1, seq: 8}]\n")
    assert_one_line_error(*invoke("validate", bad), "intra_op_threads", "integer")


def test_unknown_recipe_name_lists_valid_ones() -> None:
    assert_one_line_error(*invoke("run", "defualt"), "unknown recipe 'defualt'", "did you mean 'default'")


def test_unknown_profile_name_lists_valid_ones(tiny_recipe: Path) -> None:
    assert_one_line_error(*invoke("run", tiny_recipe, "--profile", "cpux"), "unknown profile 'cpux'", "cpu")


def test_export_without_distill_manifest(tiny_recipe: Path, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    assert_one_line_error(
        *invoke("export", "-r", tiny_recipe, "--distill", tmp_path / "half"), "no manifest.json", "kdpipe distill"
    )


def test_export_pointed_at_wrong_stage(finished: tuple[Path, Path]) -> None:
    recipe, runs = finished
    assert_one_line_error(
        *invoke("export", "-r", recipe, "--distill", runs / "student", "-o", runs.parent / "x"),
        "is a 'student' stage, expected a 'distill' stage",
    )


def test_tampered_artifact_is_refused(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    with open(copy / "distill" / "model" / "config.json", "a") as f:
        f.write(" ")
    assert_one_line_error(
        *invoke("export", "-r", recipe, "-o", copy, "--force"), "config.json changed since the distill stage wrote it"
    )


def test_csv_without_named_columns(tiny_recipe: Path) -> None:
    assert_one_line_error(
        *invoke("teacher", "-r", tiny_recipe, "--label-column", "mood"),
        "no column 'mood'",
        "columns: label, score, sentence",
    )


def test_student_with_other_vocabulary(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    other = make_model_dir(tmp_path / "other", layers=1, extra_words=["extra", "words", "here"])
    code, out = invoke(
        "student", "-r", recipe, "--teacher", runs / "teacher", "--pretrained", other, "-o", tmp_path / "o"
    )
    assert_one_line_error(code, out, "tokenizer does not match", "student 34 tokens", "teacher 31 tokens")


def test_ctrl_c_during_distill_leaves_no_finished_stage(
    finished: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    shutil.rmtree(copy / "distill")
    import kdpipe.tasks.classification.distill

    calls = {"n": 0}

    def interrupt(*args, **kwargs):  # Ctrl-C arrives after training, while the stage writes its payload
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(kdpipe.tasks.classification.distill, "evaluate", interrupt)
    code, out = invoke("distill", "-r", recipe, "-o", copy)
    monkeypatch.undo()
    assert code == 130 and "interrupted" in out and calls["n"] == 1
    assert not (copy / "distill").exists()
    assert not [p for p in copy.iterdir() if p.name.startswith(".distill")]
    assert_one_line_error(*invoke("export", "-r", recipe, "-o", copy), "no such directory", "kdpipe distill")
