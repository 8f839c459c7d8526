"""Seeded mutations of every shipped recipe and profile through `kdpipe validate`: each is either
accepted (and then passes the dry check a run would do first, and the structural checks the stages make once
the teacher has trained) or refused with a user error, never an "unexpected" one."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdpipe.compress import surgery
from kdpipe.config import Recipe, TargetProfile, load_profile
from kdpipe.errors import KdpipeError, ModelError
from kdpipe.methods import bayes
from kdpipe.models.loading import resolve_model_dir
from kdpipe.pipeline.profile import resolve_providers
from kdpipe.pipeline.validate import file_kind, validate_file
from kdpipe.tasks.classification.student import select_layers
from kdpipe.tasks.translation import checks as translation

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "stages").glob("*.yaml")) + sorted((ROOT / "profiles").glob("*.yaml"))
MUTATIONS = 300

VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 7, 2**32, 2**63, -(2**40), 0.5, -0.5, 1e-300, 1e30, 2e15,
    float("inf"), float("-inf"), float("nan"), "", "x", "every-other", "last-k", "kept", "uniform",
    "pid", "cuda", "hinton", "CPUExecutionProvider", "MadeUpExecutionProvider", [], [0], [0, 0], [99],
    [-1, 2], [1, "a"], {}, {"a": 1}, {"name": "hinton"}, {"name": "nope"}, {"batch": 0, "seq": 8},
    {"encoder": "all", "decoder": [0, 5]}, {"decodr": [0]}, {"bogus": [0, 2]}, {"decoder": [2, 0]}, "first-k",
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


@functools.cache
def _seq2seq(layers: int) -> Any:
    """A stand-in translation teacher: the from-scratch architecture (kdpipe.tasks.translation.seq2seq.small_config),
    tiny."""
    from transformers import MBartForConditionalGeneration

    from kdpipe.tasks.translation.seq2seq import small_config

    config = small_config(16, d_model=8, encoder_layers=layers, decoder_layers=layers, ffn_dim=8, heads=1)
    return MBartForConditionalGeneration(config)


def later_checks(recipe: Recipe) -> None:
    """The structural checks the stages make once the teacher has trained, by the stages' own code: SWAG's iterate count
    (kdpipe.methods.bayes), the translation student's stacks (kdpipe.compress.surgery.parse_keep on a teacher of the
    recipe's shape), the classifier student's layers (kdpipe.tasks.classification.student.select_layers, from the
    assistant's when there is one). A teacher that is not on this machine fails at its own stage: nothing to check."""
    post = recipe.teacher.posterior
    if post is not None and post.kind == "swag":
        bayes._check_swag(post.lr, post.steps, post.rank, post.collect_every, n_data=1)
    t = recipe.teacher.translation
    if t is not None:
        if t.from_scratch:
            translation.check_student(recipe.student)
            surgery.parse_keep(recipe.student.layers, surgery.stacks(_seq2seq(t.layers)))
        return
    try:
        n = json.loads((resolve_model_dir(recipe.teacher.model) / "config.json").read_text())["num_hidden_layers"]
    except ModelError:
        return
    for cfg in (recipe.assistant, recipe.student):
        if cfg is not None:
            if cfg.arch != "teacher" or cfg.pretrained is not None:
                return
            n = len(select_layers(cfg, n))


def dry_check(path: Path, kind: str) -> None:
    """What an accepted file must survive: the recipe loads with its profile and passes the later structural
    checks; a profile's providers resolve."""
    data = yaml.safe_load(path.read_text())
    if kind == "recipe":
        recipe = Recipe.model_validate(data)
        assert math.isfinite(recipe.distill.lr) and 0 <= recipe.seed < 2**32
        load_profile(recipe.profile)
        later_checks(recipe)
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


STRUCTURAL = ["translation.yaml", "bayes.yaml", "teaching-assistant.yaml", "default.yaml"]


def _layers(rng: random.Random) -> Any:
    """A layer selection of any shape: named, a list of indices (sometimes valid), or per stack."""

    def indices() -> list[int]:
        raw = [rng.randint(-1, 6) for _ in range(rng.randint(0, 4))]
        return sorted({i for i in raw if i >= 0}) if rng.random() < 0.5 else raw

    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(["every-other", "last-k", "first-k"])
    if kind == 1:
        return indices()
    keys = rng.sample(["encoder", "decoder", "decoder", "encoder", "decodr", "bogus"], rng.randint(1, 2))
    return {k: rng.choice(["all", indices()]) for k in keys}


def structural_mutation(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The fields the stages check against the teacher's shape: layers, k, the stack depth, SWAG's counts."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice([1, 2, 3])):
        field = rng.choice(["student.layers", "student.layers", "student.k", "assistant.layers", "posterior", "depth"])
        if field == "posterior":
            post = doc.setdefault("teacher", {}).setdefault("posterior", {"kind": "swag"})
            post[rng.choice(["steps", "collect_every", "rank"])] = rng.choice([2, 3, 5, 8, 10, 20, 40, 80, 200])
            post["kind"] = rng.choice(["swag", "swag", "diagonal"])
        elif field == "depth":
            if "translation" in doc.get("teacher", {}):
                doc["teacher"]["translation"]["layers"] = rng.randint(1, 5)
        elif field == "assistant.layers":
            if "assistant" in doc:
                doc["assistant"]["layers"] = _layers(rng)
        else:
            section, key = field.split(".")
            doc.setdefault(section, {})[key] = _layers(rng) if key == "layers" else rng.randint(1, 7)
    return doc


def test_what_validate_accepts_the_stages_build(tmp_path: Path) -> None:
    """Accepted => the stages' own structural checks pass; refused => they fail too, except for a stack name a
    classifier's student stage takes on trust ({bogus: [0, 2]} builds today; validate refuses it on purpose)."""
    rng = random.Random(16)
    (tmp_path / "stages").mkdir()
    counts = {"accepted": 0, "refused": 0}
    for i in range(240):
        src = ROOT / "stages" / STRUCTURAL[i % len(STRUCTURAL)]
        doc = structural_mutation(yaml.safe_load(src.read_text()), rng)
        path = tmp_path / "stages" / f"s{i}-{src.name}"
        path.write_text(yaml.safe_dump(doc))
        try:
            validate_file(path)
            refusal = None
        except KdpipeError as e:
            refusal = e.message
        try:
            recipe = Recipe.model_validate(doc)
        except Exception:  # noqa: BLE001 - a schema error: no stage would start, nothing more to compare
            assert refusal is not None, doc
            continue
        try:
            later_checks(recipe)
            later = None
        except KdpipeError as e:
            later = e.message
        counts["accepted" if refusal is None else "refused"] += 1
        assert refusal is not None or later is None, f"{src.name}: validate accepted {doc!r}; later: {later}"
        if refusal is not None and later is None:
            assert "has no stack" in refusal and recipe.teacher.task == "classification", (doc, refusal)
    assert counts["accepted"] > 40 and counts["refused"] > 40, counts
