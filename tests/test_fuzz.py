"""Seeded mutations of every shipped recipe and profile through `kdpipe validate`: each is either
accepted (and then passes the dry check a run would do first) or refused with a user error, never an
"unexpected" one."""

from __future__ import annotations

import contextlib
import copy
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdpipe.config import Recipe, TargetProfile, load_profile
from kdpipe.errors import KdpipeError
from kdpipe.profile import resolve_providers
from kdpipe.validate import file_kind, validate_file

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "stages").glob("*.yaml")) + sorted((ROOT / "profiles").glob("*.yaml"))
MUTATIONS = 300

VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 7, 2**32, 2**63, -(2**40), 0.5, -0.5, 1e-300, 1e30, 2e15,
    float("inf"), float("-inf"), float("nan"), "", "x", "every-other", "last-k", "kept", "uniform",
    "pid", "cuda", "hinton", "CPUExecutionProvider", "MadeUpExecutionProvider", [], [0], [0, 0], [99],
    [-1, 2], [1, "a"], {}, {"a": 1}, {"name": "hinton"}, {"name": "nope"}, {"batch": 0, "seq": 8},
]  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def mutate(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = _paths(doc)
        if not paths:
            doc[rng.choice(["seed", "out", "name", "x"])] = rng.choice(VALUES)
            continue
        path = rng.choice(paths)
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        op = rng.choice(["set", "set", "set", "delete", "rename", "wrap", "add"])
        if op == "set":
            parent[key] = copy.deepcopy(rng.choice(VALUES))
        elif op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[f"{key}_"] = parent.pop(key)
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):
            parent[rng.choice(["kind", "seed", "threshold", "allow_fallback", "map"])] = rng.choice(VALUES)
        else:
            parent.append(copy.deepcopy(rng.choice(VALUES)))
    return doc


def dry_check(path: Path, kind: str) -> None:
    """What an accepted file must survive: the recipe loads with its profile; a profile's providers resolve."""
    data = yaml.safe_load(path.read_text())
    if kind == "recipe":
        recipe = Recipe.model_validate(data)
        assert math.isfinite(recipe.distill.lr) and 0 <= recipe.seed < 2**32
        load_profile(recipe.profile)
    else:
        prof = TargetProfile.model_validate(data)
        # a provider this machine lacks: a clear refusal at profile time is the right answer
        with contextlib.suppress(KdpipeError):
            resolve_providers(prof)


def test_mutated_recipes_and_profiles_never_fail_unexpectedly(tmp_path: Path) -> None:
    rng = random.Random(6)
    (tmp_path / "stages").mkdir()
    (tmp_path / "profiles").mkdir()
    unexpected: list[str] = []
    accepted = refused = 0
    for i in range(MUTATIONS):
        src = SOURCES[i % len(SOURCES)]
        doc = mutate(yaml.safe_load(src.read_text()), rng)
        path = tmp_path / src.parent.name / f"m{i}-{src.name}"
        path.write_text(yaml.safe_dump(doc))
        try:
            kind = validate_file(path)
        except KdpipeError as e:
            refused += 1
            assert e.message and e.hint, f"{path}: an error without a message or hint"
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            unexpected.append(f"{src.name} -> {doc!r}: {type(e).__name__}: {e}")
            continue
        assert kind == file_kind(path, doc)
        dry_check(path, kind)
        accepted += 1
    assert not unexpected, f"{len(unexpected)} unexpected errors:\n" + "\n".join(unexpected[:10])
    assert accepted > 10 and refused > 100, (accepted, refused)  # both sides exercised


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_every_shipped_file_validates(src: Path) -> None:
    assert validate_file(src) == ("profile" if src.parent.name == "profiles" else "recipe")
