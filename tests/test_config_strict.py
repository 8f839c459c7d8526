"""Recipes, --set, CLI options and profiles: every bad value gets one clear error, none "unexpected"."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, invoke, write_profile

import kdpipe.config as config
import kdpipe.pipeline.runner
from kdpipe.config import DistillConfig, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def no_unexpected(output: str) -> None:
    assert "unexpected" not in output, output
    assert "[bold" not in output, output


def test_binary_recipe_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_bytes(b"out: runs/x\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    code, out = invoke("validate", p)
    assert_one_line_error(code, out, "r.yaml", "line 2", "not UTF-8")
    no_unexpected(out)


def test_utf16_recipe_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("out: runs/x\nseed: 1\n", encoding="utf-16")
    code, out = invoke("validate", p)
    assert_one_line_error(code, out, "r.yaml", "UTF-16", "save the file as UTF-8")
    no_unexpected(out)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("seed=-1", "seed"),
        (f"seed={2**32}", "seed"),
        ("distill.epochs=.inf", "finite"),
        ("distill.lr=.nan", "finite"),
        ("distill.lr=2e15", "less than or equal"),
        ("teacher.data.train_size=1e30", "integer"),
        ("distill.batch_size=true", "integer"),
        ("teacher.batch_size=2.5", "integer"),
        ("distill.losses=[{name: hinton, temperature: 1e-300}]", "temperature"),
    ],
)
def test_absurd_values_are_refused_and_blamed_on_the_set(override: str, needle: str) -> None:
    code, out = invoke("validate", ROOT / "stages" / "default.yaml")
    assert code == 0, out
    with pytest.raises(Exception) as e:
        load_recipe("default", [override])
    msg = getattr(e.value, "message", str(e.value))
    assert f"--set {override}" in msg, msg  # the --set is named, not stages/default.yaml
    assert "default.yaml" not in msg, msg
    assert needle in msg, msg
    code, out = invoke("student", "--set", override, "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, f"--set {override}")
    no_unexpected(out)


@pytest.mark.parametrize(
    "doc",
    [
        {"seed": -1},
        {"seed": 2**32},
        {"distill": {"epochs": float("inf")}},
        {"distill": {"batch_size": True}},
        {"distill": {"lr": 2e15}},
        {"teacher": {"data": {"train_size": 1e30}}},
    ],
)
def test_validate_refuses_what_it_used_to_accept(tmp_path: Path, doc: dict) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    code, out = invoke("validate", p)
    assert_one_line_error(code, out, "r.yaml")
    no_unexpected(out)


@pytest.mark.parametrize("bad", ["distill.epochs", "=3", "distill..epochs=3", "distill.epochs=[1, 2", "a.b=: :"])
def test_malformed_set_is_a_clear_error(bad: str) -> None:
    code, out = invoke("student", "--set", bad, "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, "--set")
    no_unexpected(out)


def test_set_on_a_value_and_below_it_is_a_clear_error() -> None:
    code, out = invoke("student", "--set", "distill=3", "--set", "distill.epochs=2", "-o", "/nonexistent")
    assert_one_line_error(code, out, "--set")
    no_unexpected(out)


@pytest.mark.parametrize("layers", ["0,,2", "0,a", "1,-2", ","])
def test_malformed_layers_is_a_clear_error(layers: str) -> None:
    code, out = invoke("student", "--layers", layers, "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, "--layers")
    no_unexpected(out)


@pytest.mark.parametrize("command", ["teacher", "student", "run"])
def test_out_pointing_at_a_file_is_refused(tmp_path: Path, tiny_recipe: Path, command: str) -> None:
    f = tmp_path / "a-file"
    f.write_text("x")
    args = [command, tiny_recipe] if command == "run" else [command, "-r", tiny_recipe]
    code, out = invoke(*args, "-o", f)
    assert_one_line_error(code, out, "--out", "is a file")
    no_unexpected(out)
    assert f.read_text() == "x"


def test_validate_checks_every_file(tmp_path: Path) -> None:
    bad1, bad2 = tmp_path / "bad1.yaml", tmp_path / "bad2.yaml"
    bad1.write_text("seed: -1\n")
    bad2.write_text("nonsense_field: 1\n")
    good = ROOT / "stages" / "hinton.yaml"
    code, out = invoke("validate", bad1, good, bad2, tmp_path / "missing.yaml")
    assert code == 1, out
    assert "bad1.yaml: seed" in out and "bad2.yaml: nonsense_field" in out, out
    assert f"ok: {good}" in out and "missing.yaml: no such file" in out, out
    assert "3 of 4 file(s) failed validation" in out, out


def test_unexpected_error_line_has_no_literal_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdpipe.config

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("a [planted] bug")

    monkeypatch.setattr(kdpipe.config, "load_recipe", boom)
    code, out = invoke("student", "-o", "/nonexistent")
    assert code == 1
    assert out.splitlines()[0] == "error: unexpected RuntimeError: a [planted] bug", out


def test_error_text_with_brackets_is_printed_as_is(tmp_path: Path) -> None:
    # a label list like ['a', 'b'] or a field [bold] in a message must not be eaten as rich markup
    p = tmp_path / "r.yaml"
    p.write_text("student: {layers: [bold]}\n")
    code, out = invoke("validate", p)
    assert code == 1 and "[bold]" not in out.replace("'[bold]'", "")  # the value is quoted, never styled
    no_unexpected(out)


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize(
    ("providers", "needle"),
    [(["MadeUpExecutionProvider"], "unknown execution provider"), ([], "at least 1"), (["CPU"], "unknown")],
)
def test_bad_execution_providers_are_refused(tmp_path: Path, providers: list[str], needle: str) -> None:
    (tmp_path / "profiles").mkdir()
    p = write_profile(tmp_path / "profiles" / "x.yaml", execution_providers=providers)
    code, out = invoke("validate", p)
    assert_one_line_error(code, out, needle)
    no_unexpected(out)


def test_profile_without_shapes_validates_by_location_or_kind(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    by_dir = tmp_path / "profiles" / "lean.yaml"
    by_dir.write_text(yaml.safe_dump({"name": "lean", "warmup": 2}))
    by_kind = tmp_path / "elsewhere.yaml"
    by_kind.write_text(yaml.safe_dump({"kind": "profile", "name": "lean", "min_runs": 3}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "recipe", "seed": 3}))
    code, out = invoke("validate", by_dir, by_kind, recipe)
    assert code == 0, out
    assert f"ok: {by_dir} (profile)" in out and f"ok: {by_kind} (profile)" in out and f"ok: {recipe} (recipe)" in out


# --------------------------------------------------------------------------- -T and cross-checks
def test_temperature_option_keeps_every_term(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[DistillConfig] = []

    def fake_execute(stage: object, cfg: DistillConfig, *a: object, **k: object) -> None:
        seen.append(cfg)  # the distill stage sees its own section of the recipe
        raise SystemExit(0)

    monkeypatch.setattr(kdpipe.pipeline.runner, "execute", fake_execute)
    invoke("distill", "-r", ROOT / "stages" / "tinybert.yaml", "-T", "3", "-o", "/nonexistent")
    assert seen, "distill did not reach the stage"
    original, _ = load_recipe(ROOT / "stages" / "tinybert.yaml")
    assert [t.name for t in seen[0].losses] == [t.name for t in original.distill.losses]
    assert len(original.distill.losses) >= 2
    for term in seen[0].losses:
        if hasattr(term, "temperature"):
            assert term.temperature == 3.0


def test_temperature_needs_a_term_that_has_one() -> None:
    recipe, _ = load_recipe(ROOT / "stages" / "no-kd.yaml")
    with pytest.raises(Exception, match="no loss term of this recipe has a temperature"):
        config.with_temperature(recipe, 2.0)
    with pytest.raises(Exception, match="temperature"):
        config.with_temperature(load_recipe("default")[0], 1e-300)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"distill__transfer": "/no/such/transfer.txt"}, "distill.transfer"),
        ({"distill__extra_teachers": ["/no/such/teacher"]}, "distill.extra_teachers"),
        ({"student__pretrained": "/no/such/student"}, "student.pretrained"),
        ({"student__layers": [0, 0, 7]}, "layer"),
    ],
)
def test_cross_checks_run_before_the_teacher_trains(
    tmp_path: Path, tiny_dir: Path, tiny_csv: Path, over: dict, needle: str
) -> None:
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, tiny_csv, tmp_path / "runs", **over)
    code, out = invoke("validate", recipe)
    assert_one_line_error(code, out, needle)
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, needle)
    no_unexpected(out)
    assert not (tmp_path / "runs" / "teacher").exists(), "the teacher trained before the recipe was checked"


def test_cuda_device_without_cuda_is_caught_at_load(tmp_path: Path, tiny_dir: Path, tiny_csv: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check is for machines without it")
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, tiny_csv, tmp_path / "runs", distill__device="cuda")
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, "distill.device", "no CUDA")
    assert not (tmp_path / "runs" / "teacher").exists()


def test_validate_notes_a_provider_this_machine_lacks(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the note is for machines without it")
    p = write_profile(tmp_path / "gpu.yaml", kind="profile", execution_providers=["CUDAExecutionProvider"])
    code, out = invoke("validate", p)
    assert code == 0, out
    assert "CUDAExecutionProvider not available on this machine" in " ".join(out.split()), out


# --------------------------------------------------------------------------- CLI options are named as typed
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "--opset", "99"], "--opset 99: export.opset: Input should be less than or equal to 21"),
        (["export", "--atol", "5"], "--atol 5.0: export.atol:"),
        (["teacher", "--epochs", "-1"], "--epochs -1.0: teacher.epochs:"),
        (["teacher", "--epochs", "inf"], "--epochs inf: teacher.epochs: Input should be a finite number"),
        (["teacher", "--encoding", "no-such-codec"], "--encoding no-such-codec: teacher.data.encoding:"),
        (["student", "-k", "0"], "-k 0: student.k:"),
        (["student", "--init", "bogus"], "--init bogus: student.init:"),
        (["distill", "--device", "tpu"], "--device tpu: distill.device:"),
        (["distill", "--epochs", "0"], "--epochs 0.0: distill.epochs:"),
    ],
)
def test_an_option_error_names_the_option_typed(args: list[str], needle: str) -> None:
    code, out = invoke(*args, "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, needle)
    assert "--set" not in out, out  # the user never typed a --set
    no_unexpected(out)


def test_a_set_still_wins_over_the_option_and_is_named() -> None:
    code, out = invoke("export", "--opset", "18", "--set", "export.opset=99", "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, "--set export.opset=99: export.opset")
    assert "--opset" not in out, out


@pytest.mark.parametrize("name", ["a #1.csv", "on: 2.csv", "[x].csv", "null", "2024"])
def test_an_option_value_is_a_string_not_yaml(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--data 'a #1.csv'` used to read the file 'a' (YAML drops the comment), `--data null` the default data
    monkeypatch.chdir(tmp_path)
    code, out = invoke("teacher", "--data", name, "-o", tmp_path / "runs")
    assert_one_line_error(code, out, f"{name}: no such data file")
    no_unexpected(out)
