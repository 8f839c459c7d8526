from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.config import Recipe, available, config_hash, load_profile, load_recipe, parse_overrides
from kdpipe.errors import ConfigError


def test_defaults_live_in_the_models() -> None:
    r = Recipe()
    assert r.student.layers == "every-other" and r.distill.losses[0].name == "hinton"
    assert r.distill.losses[0].temperature == 4.0 and r.distill.losses[0].alpha == 0.5


def test_default_recipe_and_profiles_load() -> None:
    recipe, path = load_recipe("default")
    assert path.name == "default.yaml" and recipe.profile == "cpu"
    assert load_profile("cpu").intra_op_threads == 2
    assert "default" in available("stages") and {"cpu", "mobile-arm64"} <= set(available("profiles"))


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    assert parse_overrides(["distill.epochs=3", "student.layers=[0, 5]", "teacher.data.source=x.csv"]) == {
        "distill": {"epochs": 3},
        "student": {"layers": [0, 5]},
        "teacher": {"data": {"source": "x.csv"}},
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["distill.epochs"])


def test_override_of_unknown_field_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"student\.layerz: unknown field"):
        load_recipe("default", ["student.layerz=2"])


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("distill: {epochs: -1, batch_size: x}\nseed: 0\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    assert "distill.epochs" in e.value.message and "distill.batch_size" in e.value.message


def test_config_hash_is_stable_and_sensitive() -> None:
    a, b = Recipe(), Recipe()
    assert config_hash(a.distill) == config_hash(b.distill)
    c, _ = load_recipe("default", ["distill.lr=0.5"])
    assert config_hash(c.distill) != config_hash(a.distill)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(bad)
