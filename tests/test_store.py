"""The stage store: a finished stage of one output root is reused by another with the same run id."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, invoke, write_recipe
from rich.console import Console

from kdpipe.artifacts import store
from kdpipe.artifacts.manifest import MANIFEST, Manifest, read_manifest, verify_outputs
from kdpipe.config import Recipe, load_recipe
from kdpipe.pipeline import runner


@pytest.fixture(autouse=True)
def stage_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This file's tests use a store of their own (conftest turns it off for every other test)."""
    root = tmp_path / "store"
    monkeypatch.setenv("KDPIPE_STORE", str(root))
    monkeypatch.setattr(store, "_warned", [])
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny_csv: Path) -> tuple[Path, Path]:
    """(recipe, root): a teacher and a student of a quick recipe, finished once with the store off."""
    d = tmp_path_factory.mktemp("store-base")
    recipe = write_recipe(d / "recipe.yaml", tiny_dir, tiny_csv, d / "runs", teacher__epochs=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPIPE_STORE", "off")
        r = _recipe(recipe)
        runner.run_stage("teacher", r, d / "runs", None, False, _console())
        runner.run_stage("student", r, d / "runs", None, False, _console())
    return recipe, d / "runs"


def _recipe(path: Path) -> Recipe:
    return load_recipe(path)[0]


def _console() -> Console:
    return Console(file=io.StringIO(), width=240, highlight=False)


def _said(console: Console) -> str:
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def _copy(base: tuple[Path, Path], into: Path) -> Path:
    """A copy of the base run (its own inodes: changing it never touches the module's run)."""
    shutil.copytree(base[1], into)
    return into


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many times each stage's run function ran."""
    counts: dict[str, int] = {}
    for name in ("teacher", "student"):
        spec = runner.STAGES[name]

        def counted(*args: Any, _run: Any = spec.run, _name: str = name) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _run(*args)

        monkeypatch.setitem(runner.STAGES, name, replace(spec, run=counted))
    yield counts


def _no_training(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def boom(*_: Any) -> Any:
        raise AssertionError("the stage ran: it should have been reused from the store")

    for name in names:
        monkeypatch.setitem(runner.STAGES, name, replace(runner.STAGES[name], run=boom))


def _stage(name: str, recipe: Path, root: Path) -> tuple[Any, str]:
    console = _console()
    manifest = runner.run_stage(name, _recipe(recipe), root, None, False, console)
    return manifest, _said(console)


def test_store_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for off in ("off", "OFF", "0", ""):
        monkeypatch.setenv("KDPIPE_STORE", off)
        assert store.store_root() is None
    monkeypatch.setenv("KDPIPE_STORE", str(tmp_path / "s"))
    assert store.store_root() == tmp_path / "s"
    monkeypatch.delenv("KDPIPE_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.store_root() == tmp_path / "xdg" / "kdpipe" / "stages"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert store.store_root() == Path.home() / ".cache" / "kdpipe" / "stages"


def test_a_second_root_reuses_the_teacher_and_the_student(
    base: tuple[Path, Path], tmp_path: Path, stage_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = base[0]
    first = _copy(base, tmp_path / "default")
    teacher, said = _stage("teacher", recipe, first)  # up to date there: skipped, and published
    assert "skipped" in said
    _stage("student", recipe, first)
    assert (stage_store / "teacher" / teacher.run_id / MANIFEST).is_file()

    _no_training(monkeypatch, "teacher", "student")
    second = tmp_path / "edge"
    reused, said = _stage("teacher", recipe, second)
    assert f"reused teacher: from the stage store (run_id {teacher.run_id})" in said
    assert reused.dir == second / "teacher" and reused.run_id == teacher.run_id
    assert read_manifest(second / "teacher", "teacher").run_id == teacher.run_id
    # (d) one file system: hard links, not copies (the first root, the store and the second root)
    weights = max((second / "teacher").rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    assert weights.stat().st_nlink >= 3
    assert os.path.samefile(weights, first / "teacher" / weights.relative_to(second / "teacher"))

    # (g) the reused student's lineage is the new root's teacher, as a relative path
    student, said = _stage("student", recipe, second)
    assert "reused student" in said
    data = json.loads((second / "student" / MANIFEST).read_text())
    assert data["lineage"] == {"teacher": "../teacher"}
    assert student.upstream("teacher").dir.resolve() == (second / "teacher").resolve()
    assert not any(Path(v).is_absolute() for v in data["lineage"].values())


def test_a_corrupted_stored_file_is_not_reused(
    base: tuple[Path, Path], tmp_path: Path, stage_store: Path, runs: dict[str, int]
) -> None:
    recipe = base[0]
    first = _copy(base, tmp_path / "default")
    teacher, _ = _stage("teacher", recipe, first)
    entry = stage_store / "teacher" / teacher.run_id
    victim = max((entry / r.path for r in teacher.outputs), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:  # same size, different bytes
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert victim.stat().st_size == size

    again, said = _stage("teacher", recipe, tmp_path / "edge")
    assert "reused" not in said and "dropped" in said
    assert runs.get("teacher") == 1  # it trained again
    assert read_manifest(again.dir, "teacher").run_id == teacher.run_id
    # the damaged entry was removed; the new run published an intact one in its place
    assert not verify_outputs(Manifest.from_file(entry / MANIFEST))


def test_the_store_off_runs_every_stage(
    base: tuple[Path, Path], tmp_path: Path, stage_store: Path, monkeypatch: pytest.MonkeyPatch, runs: dict[str, int]
) -> None:
    monkeypatch.setenv("KDPIPE_STORE", "off")
    first = _copy(base, tmp_path / "default")
    _stage("teacher", base[0], first)
    assert not stage_store.exists()
    _, said = _stage("teacher", base[0], tmp_path / "edge")
    assert "reused" not in said and runs.get("teacher") == 1


def test_force_and_the_profile_stage_never_use_the_store(
    base: tuple[Path, Path], tmp_path: Path, runs: dict[str, int]
) -> None:
    first = _copy(base, tmp_path / "default")
    _stage("teacher", base[0], first)
    console = _console()
    runner.run_stage("teacher", _recipe(base[0]), tmp_path / "edge", None, True, console)
    assert "reused" not in _said(console) and runs.get("teacher") == 1
    assert "profile" in runner.UNSTORED


def test_an_unwritable_store_warns_and_the_run_goes_on(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's parent should be\n")
    monkeypatch.setenv("KDPIPE_STORE", str(blocker / "stages"))
    teacher, said = _stage("teacher", base[0], tmp_path / "edge")
    assert teacher.dir == tmp_path / "edge" / "teacher"
    assert read_manifest(teacher.dir, "teacher").run_id == teacher.run_id
    assert "warning" in said and "stage store" in said
    # warned once: a second failure in this process says nothing more
    _, said = _stage("student", base[0], tmp_path / "edge")
    assert "stage store" not in said


def test_publish_twice_and_a_lost_race_keep_one_entry(base: tuple[Path, Path], tmp_path: Path) -> None:
    first = _copy(base, tmp_path / "default")
    m = read_manifest(first / "teacher", "teacher")
    store.publish(m, first / "teacher")
    store.publish(m, first / "teacher")
    assert [(e.stage, e.run_id) for e in store.entries()] == [("teacher", m.run_id)]
    assert not [p for p in (store.store_root() or tmp_path).rglob(".*tmp-*")]


def test_cache_ls_and_prune(base: tuple[Path, Path], tmp_path: Path, stage_store: Path) -> None:
    first = _copy(base, tmp_path / "default")
    teacher, _ = _stage("teacher", base[0], first)
    student, _ = _stage("student", base[0], first)

    code, out = invoke("cache", "ls")
    assert code == 0, out
    assert teacher.run_id in out and student.run_id in out and "teacher" in out
    assert str(stage_store) in out.replace("\n", "")

    code, out = invoke("cache", "prune", "--keep", "1", "--dry-run")
    assert code == 0 and "would remove" in out, out
    assert len(store.entries()) == 2
    code, out = invoke("cache", "prune", "--all")
    assert code == 0, out
    assert "removed teacher" in out and "removed student" in out and "freed" in out
    assert store.entries() == []
    assert read_manifest(first / "teacher", "teacher")  # the output root keeps its own links

    assert_one_line_error(*invoke("cache", "prune"), "--all")
    assert_one_line_error(*invoke("cache", "prune", "--all", "--keep", "2"), "--all")


def test_cache_ls_with_the_store_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDPIPE_STORE", "off")
    assert_one_line_error(*invoke("cache", "ls"), "off")


def test_prune_older_than(base: tuple[Path, Path], tmp_path: Path) -> None:
    first = _copy(base, tmp_path / "default")
    _stage("teacher", base[0], first)
    (entry,) = store.entries()
    old = entry.last_used - 10 * 86400
    os.utime(entry.path / store.LAST_USED, (old, old))
    assert store.prune(30, None) == []
    assert [e.run_id for e in store.prune(5, None)] == [entry.run_id]
    assert store.entries() == []
