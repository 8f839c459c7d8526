"""Hostile and mistaken recipes (issue 16): each gets one clear error naming the file or option, the field and
what is wrong, before any model loads -- never an "unexpected" error, never a failure after the teacher trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_one_line_error, invoke

from kdpipe.config import load_recipe, parse_overrides, read_yaml, resolve
from kdpipe.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kdpipe run` must refuse before any stage starts; if a check regresses, fail now, not after a teacher trains."""
    import kdpipe.pipeline.runner

    def started(*a: object, **k: object) -> None:
        raise AssertionError("a stage started: the recipe was not refused up front")

    monkeypatch.setattr(kdpipe.pipeline.runner, "execute", started)


def no_unexpected(output: str) -> None:
    assert "unexpected" not in output and "Traceback" not in output, output


def recipe_from(tmp_path: Path, base: str, name: str = "r.yaml", **fields: Any) -> Path:
    """stages/<base>.yaml with `a__b=value` fields replaced, written to tmp_path/name."""
    doc = yaml.safe_load((ROOT / "stages" / f"{base}.yaml").read_text())
    for key, value in fields.items():
        node = doc
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


# --------------------------------------------------------------------------- 1. layers the student stage refuses
@pytest.mark.parametrize(
    ("layers", "needles"),
    [
        ({"encoder": "all", "decoder": [0, 5]}, ["student.layers.decoder", "[5]", "0..2"]),
        ({"encoder": "all", "decoder": [-1]}, ["student.layers.decoder", "[-1]"]),
        ({"encoder": "all", "decoder": []}, ["student.layers.decoder", "keeps no layer"]),
        ({"encoder": "all", "decoder": [2, 0]}, ["student.layers.decoder", "increasing"]),
        ({"encoder": "all", "decoder": [1, 1]}, ["student.layers.decoder", "without repeats"]),
        ({"encoder": [0, 1, 2, 3], "decoder": [0]}, ["student.layers.encoder", "[3]"]),
        ({"decodr": [0, 2]}, ["student.layers.decodr", "no stack 'decodr'", "did you mean 'decoder'"]),
        ([0, 2], ["student.layers", "ambiguous", "encoder, decoder"]),
    ],
)
def test_translation_layers_are_checked_before_the_teacher_trains(
    tmp_path: Path, layers: Any, needles: list[str], no_stage: None
) -> None:
    path = recipe_from(tmp_path, "translation", student__layers=layers)
    code, out = invoke("validate", path)
    assert_one_line_error(code, out, "r.yaml: student.layers", *needles)
    no_unexpected(out)
    code, out = invoke("run", path, "-o", tmp_path / "runs")
    assert_one_line_error(code, out, *needles)
    no_unexpected(out)


def test_translation_depth_is_the_recipes_from_scratch(tmp_path: Path) -> None:
    six = {"encoder": "all", "decoder": [0, 5]}
    ok = recipe_from(tmp_path, "translation", "ok.yaml", teacher__translation__layers=6, student__layers=six)
    assert invoke("validate", ok)[0] == 0
    bad = recipe_from(tmp_path, "translation", teacher__translation__layers=1)
    assert_one_line_error(*invoke("validate", bad), "student.layers.decoder", "[2]", "0..0")


def _seq2seq_dir(path: Path, config: dict[str, Any]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("config", "layers", "needle"),
    [
        ({"model_type": "bart", "encoder_layers": 2, "decoder_layers": 4}, {"decoder": [0, 4]}, "0..3"),
        ({"model_type": "bart", "encoder_layers": 2, "decoder_layers": 4}, {"encoder": [2]}, "0..1"),
        ({"model_type": "t5", "num_layers": 3}, {"decoder": [3]}, "0..2"),  # T5: decoder depth = num_layers
        ({"model_type": "t5", "num_layers": 6, "num_decoder_layers": 2}, {"decoder": [0, 2]}, "0..1"),
        ({"model_type": "pegasus_x", "encoder_layers": 2}, {"decoder": [0]}, "no known layer stacks"),
    ],
)
def test_fine_tuned_translation_teacher_depth_comes_from_its_config(
    tmp_path: Path, config: dict[str, Any], layers: Any, needle: str
) -> None:
    model = _seq2seq_dir(tmp_path / "m", config)
    path = recipe_from(
        tmp_path, "translation", teacher__model=str(model), teacher__translation__from_scratch=False,
        student__layers=layers,
    )  # fmt: skip
    assert_one_line_error(*invoke("validate", path), "r.yaml:", needle)


def test_fine_tuned_translation_teacher_within_its_depth_validates(tmp_path: Path) -> None:
    model = _seq2seq_dir(tmp_path / "m", {"model_type": "bart", "encoder_layers": 2, "decoder_layers": 4})
    path = recipe_from(
        tmp_path, "translation", teacher__model=str(model), teacher__translation__from_scratch=False,
        student__layers={"encoder": [1], "decoder": [0, 3]},
    )  # fmt: skip
    code, out = invoke("validate", path)
    assert code == 0, out


@pytest.mark.parametrize(
    ("student", "needles"),
    [
        ({"layers": {"bogus": [0, 2]}}, ["student.layers.bogus", "no stack 'bogus'", "valid: encoder"]),
        ({"layers": {"encoder": "all", "decoder": [1]}}, ["student.layers.decoder", "no stack 'decoder'"]),
        ({"layers": [0, 6]}, ["student.layers", "[6]", "0..5"]),
        ({"layers": [-1, 2]}, ["student.layers", "[-1]"]),
        ({"layers": []}, ["student.layers", "keeps no layer"]),
        ({"layers": [4, 2]}, ["student.layers", "increasing"]),
        ({"layers": [2, 2]}, ["student.layers", "repeats"]),
        ({"layers": "last-k", "k": 7}, ["student.k=7", "6 layers"]),
        ({"layers": "first-k"}, ["student.k is required"]),
    ],
)
def test_encoder_only_layers_against_the_default_teachers_config(
    tmp_path: Path, student: dict[str, Any], needles: list[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"student": student}))
    code, out = invoke("validate", path)
    assert_one_line_error(code, out, "r.yaml: student.", *needles)
    no_unexpected(out)


def test_a_stack_named_for_an_encoder_only_teacher_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"student": {"layers": {"encoder": [0, 2, 4]}}}))
    code, out = invoke("validate", path)
    assert code == 0, out


def test_embedding_student_layers_are_checked_against_the_teachers_config(tmp_path: Path) -> None:
    path = recipe_from(tmp_path, "embedding", student__layers=[0, 9])  # the embedded MiniLM has 6 layers
    assert_one_line_error(*invoke("validate", path), "r.yaml: student.layers", "[9]", "0..5")
    k = recipe_from(tmp_path, "embedding", "k.yaml", student__layers="last-k", student__k=7)
    assert_one_line_error(*invoke("validate", k), "k.yaml: student", "7")


@pytest.mark.parametrize("layers", [[-1], [], [3, 1], [0, 0]])
def test_layers_no_teacher_could_have_are_refused_without_its_config(tmp_path: Path, layers: list[int]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": str(tmp_path / "elsewhere")}, "student": {"layers": layers}}))
    assert_one_line_error(*invoke("validate", path), "r.yaml: student.layers")


def test_student_layers_are_checked_against_the_assistants(tmp_path: Path) -> None:
    path = recipe_from(tmp_path, "teaching-assistant", student__layers=[0, 2, 5])  # the assistant keeps 5 layers
    assert_one_line_error(*invoke("validate", path), "r.yaml: student.layers", "[5]", "the assistant's", "0..4")
    ok = recipe_from(tmp_path, "teaching-assistant", "ok.yaml", student__layers=[0, 2, 4])
    assert invoke("validate", ok)[0] == 0


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"assistant": {"layers": [0, 9]}, "student": {"layers": [3, 1]}}))
    with pytest.raises(ConfigError) as e:
        from kdpipe.pipeline.validate import validate_file

        validate_file(path)
    assert "assistant.layers: indices [9]" in e.value.message, e.value.message


@pytest.mark.parametrize(
    ("posterior", "refused"),
    [
        ({"steps": 50, "collect_every": 10, "rank": 8}, True),  # 5 iterates for a rank-8 factor
        ({"steps": 5, "collect_every": 10, "rank": 2}, True),  # collect_every > steps: none
        ({"steps": 21, "collect_every": 10, "rank": 3}, True),
        ({"steps": 80, "collect_every": 10, "rank": 8}, False),  # exactly rank iterates
        ({"steps": 20, "collect_every": 10, "rank": 2}, False),
        ({"kind": "diagonal", "steps": 2, "collect_every": 10, "rank": 8}, False),  # diagonal runs no SGD
    ],
)
def test_swag_collects_enough_iterates(tmp_path: Path, posterior: dict[str, Any], refused: bool) -> None:
    from kdpipe.methods.bayes import _check_swag

    post = {"kind": "swag", **posterior}
    path = recipe_from(tmp_path, "bayes", teacher__posterior=post)
    code, out = invoke("validate", path)
    if refused:
        assert_one_line_error(code, out, "r.yaml: teacher.posterior", "iterates")
        if post["kind"] == "swag":  # the check kdpipe.methods.bayes makes after the teacher trained agrees
            with pytest.raises(ConfigError):
                _check_swag(1e-3, post["steps"], post["rank"], post["collect_every"], n_data=1)
    else:
        assert code == 0, out
        if post["kind"] == "swag":
            _check_swag(1e-3, post["steps"], post["rank"], post["collect_every"], n_data=1)


def test_swag_shortfall_names_the_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--set teacher\.posterior\.steps=30: teacher\.posterior"):
        load_recipe("bayes", ["teacher.posterior.steps=30"])


# --------------------------------------------------------------------------- 2. empty files, duplicate keys
@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "\ufeff"])
def test_empty_file_is_refused(tmp_path: Path, text: str, no_stage: None) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, out = invoke("validate", path)
    assert_one_line_error(code, out, "r.yaml: empty; a recipe needs at least")
    code, out = invoke("run", path, "-o", tmp_path / "runs")
    assert_one_line_error(code, out, "r.yaml: empty")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("seed: 1\nout: runs/x\nseed: 2\n", ["line 3: duplicate key 'seed' (first at line 1)"]),
        ("teacher:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n", ["line 4: duplicate key 'epochs' (first at line 2)"]),
        (
            "distill:\n  losses:\n    - {name: hinton,\n       name: jsd}\n",
            ["line 4: duplicate key 'name' (first at line 3)"],
        ),
        (
            "seed: 1\nteacher: {epochs: 1, epochs: 2}\nseed: 3\n",
            ["line 3: duplicate key 'seed' (first at line 1)", "line 2: duplicate key 'epochs' (first at line 2)"],
        ),
    ],
)
def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, out = invoke("validate", path)
    assert_one_line_error(code, out, *needles)
    for needle in needles:
        assert f"r.yaml: {needle}" in out, out


def test_duplicate_keys_in_a_profile_and_a_set(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    prof = tmp_path / "profiles" / "p.yaml"
    prof.write_text("name: a\nwarmup: 1\nname: b\n")
    assert_one_line_error(*invoke("validate", prof), "p.yaml: line 3: duplicate key 'name' (first at line 1)")
    with pytest.raises(ConfigError, match=r"--set distill=\{epochs: 1, epochs: 2\}: line 1: duplicate key 'epochs'"):
        parse_overrides(["distill={epochs: 1, epochs: 2}"])


def test_a_key_next_to_a_merge_is_not_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "teacher: &t {epochs: 1.0, lr: 0.001}\nassistant: null\ndistill:\n  <<: {epochs: 3.0}\n  epochs: 2.0\n"
    )
    assert read_yaml(path)["distill"] == {"epochs": 2.0}


# --------------------------------------------------------------------------- 3. nesting and aliases
@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 10000,
        "a: " + "[" * 10000 + "]" * 10000,
        "a: " + "{a: " * 10000,
        "\n".join(" " * i + "a:" for i in range(500)) + " 1\n",
        "\n".join("  " * i + "-" for i in range(500)) + " 1\n",
    ],
    ids=["unclosed-lists", "closed-lists", "flow-mappings", "block-mappings", "block-lists"],
)
def test_deep_nesting_is_one_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, out = invoke("validate", path)
    assert_one_line_error(code, out, "r.yaml: line", "nested too deeply")
    no_unexpected(out)


def test_deep_nesting_in_a_set_is_one_clear_error() -> None:
    code, out = invoke("export", "--set", "a=" + "[" * 10000, "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, "--set a=[[[", "nested too deeply")
    no_unexpected(out)
    assert len(out.splitlines()[0]) < 300, "the --set is shortened, not printed 10000 characters long"


def test_alias_bombs_and_self_references_are_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 10**9 values once expanded
    assert_one_line_error(*invoke("validate", bomb), "bomb.yaml: its aliases", "expand")
    selfref = tmp_path / "self.yaml"
    selfref.write_text("student: &s\n  layers: [0]\n  x: *s\n")
    assert_one_line_error(*invoke("validate", selfref), "self.yaml: line", "refers to the list or mapping")


def test_an_integer_too_long_to_convert_is_a_yaml_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("seed: 1\nteacher: {epochs: " + "9" * 5000 + "}\n")  # int() refuses over 4300 digits
    assert_one_line_error(*invoke("validate", path), "r.yaml: line 2: not valid YAML", "thousands of digits")
    code, out = invoke("export", "--set", "export.opset=" + "9" * 5000, "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, "--set export.opset=999", "thousands of digits")
    no_unexpected(out)


def test_a_nul_byte_in_out_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text('out: "runs/a\\x00b"\n')
    assert_one_line_error(*invoke("validate", path), "r.yaml: out: Value error, must be a directory path")


# --------------------------------------------------------------------------- 4. paths that are not readable files
def test_directory_symlink_loop_and_dangling_link_have_true_messages(tmp_path: Path, no_stage: None) -> None:
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    (tmp_path / "dangling.yaml").symlink_to("nowhere.yaml")
    for name, needle in (
        ("dir.yaml", "dir.yaml: is a directory"),
        ("loop.yaml", "loop.yaml: symlink loop"),
        ("dangling.yaml", "dangling.yaml: a symlink to nowhere.yaml, which does not exist"),
    ):
        assert_one_line_error(*invoke("validate", tmp_path / name), needle)
        assert_one_line_error(*invoke("run", tmp_path / name), needle)
        with pytest.raises(ConfigError, match=needle.split(": ", 1)[1]):
            resolve("stages", tmp_path / name)


def test_a_recipe_directory_is_a_directory(no_stage: None) -> None:
    code, out = invoke("validate", ROOT / "stages")
    assert_one_line_error(code, out, "stages: is a directory", "give one of its files", "bayes.yaml")
    code, out = invoke("run", ROOT / "stages")
    assert_one_line_error(code, out, "stages: is a directory")
    code, out = invoke("student", "--set", f"profile={ROOT / 'profiles'}", "-o", "/nonexistent-never-created")
    assert_one_line_error(code, out, "profiles: is a directory")


def test_a_directory_named_like_a_recipe_does_not_hide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hinton").mkdir()
    assert resolve("stages", "hinton") == ROOT / "stages" / "hinton.yaml"


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)  # reading it would block
    assert_one_line_error(*invoke("validate", fifo), "r.yaml: is a named pipe (FIFO), not a regular file")


def test_permission_denied_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("seed: 1\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, out = invoke("validate", path)
    assert_one_line_error(code, out, "r.yaml: permission denied: check the file's permissions")
    no_unexpected(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file: the monkeypatched test covers it")
def test_permission_denied_on_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("seed: 1\n")
    path.chmod(0)
    try:
        assert_one_line_error(*invoke("validate", path), "permission denied")
    finally:
        path.chmod(0o644)


def test_a_name_too_long_for_the_file_system_is_not_unexpected(no_stage: None) -> None:
    for args in (("validate", "a" * 5000 + ".yaml"), ("run", "a" * 5000)):
        code, out = invoke(*args)
        assert_one_line_error(code, out)
        no_unexpected(out)


# --------------------------------------------------------------------------- torch-free
def test_the_checks_need_no_torch(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 10000)
    (tmp_path / "dup.yaml").write_text("seed: 1\nseed: 2\n")
    recipe = recipe_from(tmp_path, "translation", student__layers={"decodr": [0]})
    code = f"""
import sys
from pathlib import Path
from kdpipe.config import load_recipe, read_yaml
from kdpipe.errors import ConfigError
from kdpipe.compress.layercheck import one_stack_problems, raise_problems
from kdpipe.tasks.translation.checks import layer_problems
for name in ("deep.yaml", "dup.yaml"):
    try:
        read_yaml(Path({str(tmp_path)!r}) / name)
    except ConfigError:
        pass
recipe, _ = load_recipe({str(recipe)!r})
try:
    raise_problems(layer_problems(recipe))
except ConfigError as e:
    print(e.message)
assert one_stack_problems(load_recipe("default")[0]) == []
try:
    load_recipe("bayes", ["teacher.posterior.steps=5"])
except ConfigError:
    pass
assert "torch" not in sys.modules, "torch was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no stack 'decodr'" in done.stdout


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_a_classifier_whose_config_names_sizes_otherwise_is_checked_not_crashed(tmp_path: Path, arch: str) -> None:
    """GPT-2's config.json says n_layer / n_embd, BART's encoder_layers / d_model: no `num_hidden_layers` KeyError."""
    from transformers import BartConfig, BartForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    model_dir = tmp_path / arch
    if arch == "gpt2":
        config = GPT2Config(n_layer=4, n_embd=32, n_head=2, num_labels=3, vocab_size=100, n_positions=64)
        GPT2ForSequenceClassification(config).save_pretrained(model_dir)
    else:
        config = BartConfig(encoder_layers=4, decoder_layers=4, d_model=32, num_labels=3, vocab_size=100)
        config.update({"encoder_attention_heads": 2, "decoder_attention_heads": 2, "max_position_embeddings": 64})
        config.update({"encoder_ffn_dim": 64, "decoder_ffn_dim": 64})
        BartForSequenceClassification(config).save_pretrained(model_dir)
    good = recipe_from(tmp_path, "default", "good.yaml", teacher__model=str(model_dir), student__layers=[0, 2])
    code, out = invoke("validate", good)
    no_unexpected(out)
    if arch == "gpt2":  # one stack: a list is checked against its depth
        assert code == 0, out
        bad = recipe_from(tmp_path, "default", "bad.yaml", teacher__model=str(model_dir), student__layers=[0, 7])
        assert_one_line_error(*invoke("validate", bad), "bad.yaml: student.layers: indices [7] outside")
