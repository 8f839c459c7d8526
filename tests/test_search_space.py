"""kdpipe.search.space: the `search:` section refuses empty / repeated / out-of-range values in one line each, the
grid drops depths above the teacher's (and refuses a space with none left), candidate keys are stable and ignore
what does not change the architecture, and a candidate's `--set` strings build the recipe they describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdpipe.config import Recipe, TargetProfile, format_validation_error, load_recipe, parse_overrides
from kdpipe.errors import ConfigError
from kdpipe.search.space import (
    Candidate,
    SearchSpace,
    candidates,
    deploy_profile,
    spaced_layers,
    student_overrides,
)


def _problems(**fields: object) -> list[str]:
    with pytest.raises(ValidationError) as e:
        SearchSpace.model_validate(fields)
    return format_validation_error("search", e.value).message.splitlines()


def test_defaults_are_a_valid_space() -> None:
    s = SearchSpace()
    assert s.layers == [2, 3, 4] and s.heads == [0.0] and s.ffn == [0.0, 0.5]
    assert s.precision == ["int8-dynamic"] and s.epochs == [1.0] and s.trials >= 1 and s.seed == 0


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"layers": []}, "search: layers: Value error, is empty"),
        ({"heads": []}, "heads: Value error, is empty"),
        ({"precision": []}, "precision: Value error, is empty"),
        ({"epochs": []}, "epochs: Value error, is empty"),
        ({"layers": [2, 3, 2]}, "2 listed twice"),
        ({"heads": [0, 0.0]}, "0.0 listed twice"),  # 0 and 0.0 are the same fraction
        ({"precision": ["int4", "int4"]}, "int4 listed twice"),
        ({"layers": [0]}, "depth 0 is below 1"),
        ({"layers": [65]}, "depth 65 is above 64"),
        ({"ffn": [1.0]}, "1.0 is not a fraction in [0, 1)"),
        ({"heads": [-0.1]}, "-0.1 is not a fraction in [0, 1)"),
        ({"heads": [float("nan")]}, "finite number"),
        ({"epochs": [0.0]}, "0.0 epochs is not in (0, 1000]"),
        ({"precision": ["fp16"]}, "precision.0"),
        ({"trials": 0}, "trials"),
        ({"layer": [2]}, "layer: unknown field"),
        ({"layers": [True]}, "layers.0"),  # strict: a bool is not a depth
    ],
)
def test_each_bad_value_is_one_line(fields: dict[str, object], needle: str) -> None:
    lines = _problems(**fields)
    assert len(lines) == 1 and needle in lines[0], lines


def test_several_problems_of_one_list_share_its_line_and_other_fields_get_theirs() -> None:
    lines = _problems(layers=[0, 3, 3], ffn=[])
    assert len(lines) == 2
    assert "depth 0 is below 1" in lines[0] and "3 listed twice" in lines[0]
    assert "ffn" in lines[1] and "is empty" in lines[1]


def test_grid_order_and_size() -> None:
    s = SearchSpace(layers=[2, 3], heads=[0.0], ffn=[0.0, 0.5], precision=["fp32", "int8-dynamic"], epochs=[1.0, 2.0])
    grid = candidates(s, teacher_layers=6)
    assert len(grid) == 2 * 1 * 2 * 2 * 2 and len({c.key() for c in grid}) == len(grid)
    assert grid[0] == Candidate(2, 0.0, 0.0, "fp32", 1.0) and grid[-1] == Candidate(3, 0.0, 0.5, "int8-dynamic", 2.0)
    assert len({c.arch_key() for c in grid}) == len(grid) // 2  # the two epochs share each architecture


def test_depths_above_the_teacher_are_dropped_with_a_note() -> None:
    notes: list[str] = []
    grid = candidates(SearchSpace(layers=[2, 6, 8, 12]), teacher_layers=6, note=notes.append)
    assert sorted({c.layers for c in grid}) == [2, 6]
    assert len(notes) == 1 and "8, 12" in notes[0] and "teacher's 6 layers" in notes[0]
    with pytest.warns(UserWarning, match="exceed"):
        candidates(SearchSpace(layers=[2, 8]), teacher_layers=6)


def test_no_depth_left_is_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as e:
        candidates(SearchSpace(layers=[8, 12]), teacher_layers=6)
    assert e.value.message == "every depth in search.layers (8, 12) exceeds the teacher's 6 layers"
    assert "\n" not in e.value.message and e.value.hint
    with pytest.raises(ConfigError):
        candidates(SearchSpace(), teacher_layers=0)


def test_keys_are_stable_and_normalised() -> None:
    a = Candidate(3, 0, 0.5, "int8-dynamic", 1)
    b = Candidate(layers=3, heads=0.0, ffn=0.5, precision="int8-dynamic", epochs=1.0)
    assert a == b and a.key() == b.key() and hash(a) == hash(b)
    # golden values: sha256 of the canonical JSON; a change here renames every cached measurement
    assert a.arch_key() == "aee603cbb7e54fa3"
    assert a.key() == "ce8661ad5c3ed8a4"
    assert len(a.key()) == 16 and all(ch in "0123456789abcdef" for ch in a.key())
    longer = Candidate(3, 0.0, 0.5, "int8-dynamic", 2.0)
    assert longer.arch_key() == a.arch_key() and longer.key() != a.key()  # epochs do not change latency
    for other in (Candidate(4, 0, 0.5, "int8-dynamic", 1), Candidate(3, 0.25, 0.5, "int8-dynamic", 1)):
        assert other.arch_key() != a.arch_key()
    assert Candidate(3, 0, 0.5, "int4", 1).arch_key() != a.arch_key()


def test_keys_are_the_same_in_another_process() -> None:
    code = "from kdpipe.search.space import Candidate as C; print(C(3, 0, 0.5, 'int8-dynamic', 1).key())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == Candidate(3, 0, 0.5, "int8-dynamic", 1).key()


@pytest.mark.parametrize(
    ("depth", "n", "kept"),
    [(3, 6, [0, 2, 4]), (6, 12, [0, 2, 4, 6, 8, 10]), (4, 12, [0, 3, 6, 9]), (1, 6, [0]), (6, 6, list(range(6)))],
)
def test_spaced_layers_by_hand(depth: int, n: int, kept: list[int]) -> None:
    assert spaced_layers(depth, n) == kept


def test_spaced_layers_rule_for_every_depth() -> None:
    for n in range(1, 25):
        for depth in range(1, n + 1):
            kept = spaced_layers(depth, n)
            assert len(kept) == depth and kept[0] == 0 and kept[-1] < n
            assert all(b > a for a, b in zip(kept, kept[1:], strict=False))
        # ceil(n / 2) layers is exactly every-other (kdpipe's default, DistilBERT's init)
        assert spaced_layers(-(-n // 2), n) == list(range(0, n, 2))
    with pytest.raises(ConfigError):
        spaced_layers(7, 6)
    with pytest.raises(ConfigError):
        spaced_layers(0, 6)


def test_overrides_build_the_recipe_they_describe() -> None:
    c = Candidate(3, 0.25, 0.5, "int8-static", 1.5)
    sets = student_overrides(c, teacher_layers=6)
    assert sets == [
        "student.layers=[0,2,4]",
        "student.width={heads: 0.25, ffn: 0.5}",
        "export.variants=[int8-static]",
        "distill.epochs=1.5",
    ]
    recipe = Recipe.model_validate(parse_overrides(sets))
    assert recipe.student.layers == [0, 2, 4]
    assert recipe.student.width is not None
    assert (recipe.student.width.heads, recipe.student.width.ffn) == (0.25, 0.5)
    assert recipe.export.variants == ["int8-static"] and recipe.distill.epochs == 1.5


def test_overrides_without_width_or_variant(tmp_path: Path) -> None:
    # nothing removed: width is reset, so a width in the recipe does not leak into the candidate; fp32: no variant
    sets = student_overrides(Candidate(2, 0.0, 0.0, "fp32", 1.0), teacher_layers=4)
    assert "student.width=null" in sets and "export.variants=[]" in sets
    path = tmp_path / "recipe.yaml"
    path.write_text("student:\n  width: {heads: 0.5}\nexport:\n  variants: [optimized]\n")
    recipe, _ = load_recipe(path, sets)  # the recipe on disk plus the candidate's --set strings, as a run loads it
    assert recipe.student.layers == [0, 2] and recipe.student.width is None and recipe.export.variants == []
    # heads alone still writes both fractions
    assert "student.width={heads: 0.5, ffn: 0.0}" in student_overrides(Candidate(2, 0.5, 0, "fp32", 1), 4)


def test_deploy_profile_times_and_ships_the_candidates_precision() -> None:
    prof = TargetProfile(name="edge")
    for c in (Candidate(2, 0, 0, "fp32", 1), Candidate(2, 0, 0, "int4", 1)):
        p = deploy_profile(prof, c)
        assert p.deploy == c.precision and p.variants == [c.precision] and p.name == "edge"
    assert prof.deploy == "int8-dynamic"  # the original is unchanged


def test_import_is_cheap() -> None:
    code = "import sys, kdpipe.search.space; print(any(m in sys.modules for m in ('torch', 'optuna', 'onnxruntime')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
