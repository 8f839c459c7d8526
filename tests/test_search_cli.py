"""`kdpipe search` end to end on tiny models: the cost filter (an over-budget candidate never trains), the report
and <out>/best, a second search that trains nothing, kill -9 in the middle and resume, the pruner, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_one_line_error, invoke, make_csv, make_model_dir, write_recipe

KDPIPE = [sys.executable, "-m", "kdpipe.cli"]
# int8 ONNX of the tiny 4-layer teacher's students: ~0.027 MiB at 1 layer, ~0.044 MiB at 2 (measured here)
ONE_LAYER_FITS = 0.035


def _search_recipe(tmp: Path, space: dict[str, Any], budgets: dict[str, Any], **over: Any) -> Path:
    teacher = make_model_dir(tmp / "teacher", layers=4)
    csv = make_csv(tmp / "tiny.csv")
    recipe = write_recipe(tmp / "recipe.yaml", teacher, csv, tmp / "runs", distill__epochs=4, **over)
    doc = yaml.safe_load(recipe.read_text())
    doc["search"] = space
    recipe.write_text(yaml.safe_dump(doc))
    prof_path = tmp / "tiny-profile.yaml"
    prof = yaml.safe_load(prof_path.read_text())
    prof["budgets"] = {"shape": "1x16", **budgets}
    prof_path.write_text(yaml.safe_dump(prof))
    return recipe


def _report(runs: Path) -> dict[str, Any]:
    return json.loads((runs / "search" / "report.json").read_text())


def test_search_filters_by_cost_trains_the_rest_reports_and_a_second_search_trains_nothing(tmp_path: Path) -> None:
    space = {"layers": [1, 2], "ffn": [0.0, 0.5], "epochs": [2.0], "trials": 4}
    recipe = _search_recipe(tmp_path, space, {"p50_ms": 1000, "model_mib": ONE_LAYER_FITS})
    runs = tmp_path / "runs"
    code, out = invoke("search", recipe)
    assert code == 0, out
    data = _report(runs)
    rows = {r["key"]: r for r in data["candidates"]}
    assert len(rows) == 4
    for r in rows.values():
        assert r["cost"]["model_mib"] > 0 and r["cost"]["p50_ms"] > 0  # every architecture measured untrained
        trained = (runs / "search" / "trials" / r["key"]).exists()
        if r["layers"] == 2:  # over the size budget before training: never trained, not even a student built
            assert r["state"] == "over budget before training" and r["cost_misses"], r
            assert not trained
        else:
            assert r["state"] == "complete" and trained, r
            shared = runs / "search" / "trials" / r["key"] / "cache"  # one teacher-output cache for all
            assert shared.is_symlink() and shared.resolve() == (runs / "cache").resolve()
            assert 0 <= r["figures"]["accuracy"] <= 1 and r["figures"]["model_mib"] <= ONE_LAYER_FITS
            assert [e for e, _ in r["rungs"]] == pytest.approx([2 / 3, 2.0])  # two fidelities, eta 3
    assert data["best"] in rows and rows[data["best"]]["meets"]
    best = runs / "best"
    assert best.is_symlink() and not os.path.isabs(os.readlink(best))
    assert (best / "profile" / "manifest.json").is_file() and (best / "export" / "manifest.json").is_file()
    assert (runs / "search" / "pareto.png").stat().st_size > 1000
    md = (runs / "search" / "report.md").read_text()
    assert data["best"] in md and "over budget before training" in md
    assert data["front_p50"] and set(data["front_p50"]) <= set(rows)
    # every path in the report is relative to the run
    assert all(r["root"] is None or not os.path.isabs(r["root"]) for r in data["candidates"])
    assert not os.path.isabs(data["teacher"]["dir"])

    code, out = invoke("search", recipe)
    assert code == 0, out
    assert "train " not in out and "cost " not in out, out  # every cost cached, every trial finished
    assert _report(runs)["best"] == data["best"]


def test_every_candidate_over_budget_fails_before_any_training(tmp_path: Path) -> None:
    space = {"layers": [1, 2], "ffn": [0.0], "epochs": [1.0], "trials": 2}
    recipe = _search_recipe(tmp_path, space, {"model_mib": 0.001})
    code, out = invoke("search", recipe)
    assert_one_line_error(code, out, "every candidate", "closest", "model_mib")
    assert not (tmp_path / "runs" / "search" / "trials").exists()


def test_strict_fails_naming_the_closest_when_no_trained_candidate_meets_the_budgets(tmp_path: Path) -> None:
    space = {"layers": [1], "ffn": [0.0], "epochs": [0.001], "trials": 1, "rungs": 1}  # one step: near chance
    # a randomly initialised student after one step cannot get all 60 test examples right
    recipe = _search_recipe(tmp_path, space, {"model_mib": 1.0, "accuracy": 1.0}, student__init="random")
    code, out = invoke("search", recipe, "--strict")
    assert_one_line_error(code, out, "no searched candidate meets every budget", "closest", "accuracy")
    assert not (tmp_path / "runs" / "best").exists()


def _trained(runs: Path) -> dict[str, float]:
    """Candidate key -> mtime of its finished distill manifest."""
    out = {}
    for m in (runs / "search" / "trials").glob("*/distill/manifest.json"):
        out[m.parent.parent.name] = m.stat().st_mtime
    return out


def test_kill_9_in_the_middle_then_the_same_command_resumes(tmp_path: Path) -> None:
    space = {"layers": [1, 2], "ffn": [0.0], "epochs": [6.0], "trials": 2, "rungs": 1}
    recipe = _search_recipe(tmp_path, space, {"model_mib": 10.0})
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([*KDPIPE, "search", str(recipe)], env=env, stdout=log, stderr=log)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((runs / "search" / "trials").glob("*/profile/manifest.json")):
            break  # the first candidate finished: the next one is training or about to
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    before = _trained(runs)
    finished_before = [k for k in before if (runs / "search" / "trials" / k / "profile" / "manifest.json").is_file()]
    assert finished_before

    done = subprocess.run([*KDPIPE, "search", str(recipe)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    data = _report(runs)
    assert [r["state"] for r in data["candidates"]] == ["complete"] * 2
    after = _trained(runs)
    for key in finished_before:  # what had finished was not trained again
        assert after[key] == before[key]
    assert data["best"] is not None
    import optuna

    trials = optuna.load_study(study_name=data["study"], storage=f"sqlite:///{runs / 'search' / 'study.db'}").trials
    killed = [t for t in trials if t.state.name == "FAIL"]
    assert all("interrupted" in t.user_attrs["error"] for t in killed)  # the one the kill cut short, if any


def test_the_pruner_stops_a_candidate_before_its_full_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from rich.console import Console

    from kdpipe.config import TargetProfile
    from kdpipe.search import study
    from kdpipe.search.space import Candidate, SearchSpace
    from kdpipe.search.trial import Setting

    ran: list[float] = []
    monkeypatch.setattr(study, "train_rung", lambda s, c, epochs, root: ran.append(epochs) or 0.1)

    def never(*a: object) -> None:
        raise AssertionError("a pruned candidate was exported")

    monkeypatch.setattr(study, "finish", never)

    class Trial:
        user_attrs: dict[str, Any] = {}
        reports: list[tuple[float, int]] = []

        def set_user_attr(self, k: str, v: Any) -> None:
            self.user_attrs[k] = v

        def report(self, value: float, step: int) -> None:
            self.reports.append((value, step))

        def should_prune(self) -> bool:
            return True

    prof = TargetProfile.model_validate({"name": "p", "description": "d", "shapes": [{"batch": 1, "seq": 8}]})
    setting = Setting("r", (), Path("."), 4, prof, Console(quiet=True))
    space = SearchSpace(rungs=3, reduction=2)
    t = Trial()
    with pytest.raises(optuna.TrialPruned):
        study._train(t, setting, Candidate(2, 0, 0, "int8-dynamic", 4.0), space, Path("."))
    assert ran == [1.0]  # the first fidelity, 4 / 2**2 epochs, then pruned
    assert t.reports == [(0.1, 1)]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "search.bogus=1"], ["search.bogus", "unknown key"]),
        (["--set", "search.layers=[]"], ["search.layers", "empty"]),
        (["--storage", "sqlite:////nonexistent-dir/sub/x.db"], ["--storage", "cannot be opened"]),
        (["--storage", "nosuchdb://x"], ["--storage", "cannot be opened"]),
        (["--workers", "999"], ["--workers 999", "CPU cores"]),
        (["--hours", "-1"], ["--hours"]),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    recipe = _search_recipe(tmp_path, {"layers": [1]}, {"model_mib": 1.0})
    code, out = invoke("search", recipe, *args)
    assert_one_line_error(code, out, *needles)
    assert not (tmp_path / "runs" / "teacher").exists()  # refused before the teacher ran


def test_a_profile_without_cost_budgets_is_refused(tmp_path: Path) -> None:
    recipe = _search_recipe(tmp_path, {"layers": [1]}, {"retention": 0.5})
    code, out = invoke("search", recipe)
    assert_one_line_error(code, out, "no latency or size budget")


def test_a_search_killed_before_a_trial_had_its_candidate_resumes(tmp_path: Path) -> None:
    """Planted: a RUNNING trial that left the queue but was killed before its first suggest (no params), and a
    WAITING one (its candidate only in the queue's fixed params): recovery must neither crash nor queue twice."""
    import optuna
    from optuna.trial import TrialState

    from kdpipe.search import study as st

    url = f"sqlite:///{tmp_path / 'study.db'}"
    plan = st.Plan("r", (), str(tmp_path), url, "s", {"layers": [1, 2]}, ("a", "b"), 0.0, "t", 2, {})
    s = st._study(plan)
    s.enqueue_trial({"candidate": "a"})
    s.enqueue_trial({"candidate": "b"})
    s.ask()  # left the queue (RUNNING, candidate 'a' in its fixed params) and was killed there
    (running,) = s.get_trials(states=(TrialState.RUNNING,))
    assert running.params == {} and st.candidate_of(running) == "a"
    s.ask()  # 'b' left the queue too; planted below: a RUNNING trial with no candidate at all
    s.ask()
    st._recover(plan)
    trials = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
    waiting = [st.candidate_of(t) for t in trials if t.state == TrialState.WAITING]
    assert sorted(waiting) == ["a", "b"]  # each queued again once, nothing for the blank one
    assert all(t.state != TrialState.RUNNING for t in trials)
