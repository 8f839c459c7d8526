"""kdpipe.search.costs: an architecture planted over budget is dropped before it reaches the train callback, each
architecture is measured once (the cache answers the second search), a corrupt cache file is ignored and rebuilt,
NaN / missing figures are misses, and a different profile or CPU does not reuse an entry. No model: fake
measure and train functions count their calls."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kdpipe.config import Budgets, Shape, TargetProfile
from kdpipe.search.costs import CostCache, over_budget, profile_hash, relative_excess, survivors
from kdpipe.search.space import Candidate, SearchSpace, candidates

CPU = {"model": "Test CPU", "flags": ["avx2"]}
EDGE = TargetProfile(name="edge", budgets=Budgets(p50_ms=5.0, model_mib=12.0))


class FakeMeasure:
    """p50 = 1 ms per layer, size = 3 MiB per layer: depth 6 (6 ms) is over a 5 ms budget."""

    def __init__(self) -> None:
        self.calls: list[Candidate] = []

    def __call__(self, c: Candidate) -> Mapping[str, Any]:
        self.calls.append(c)
        return {"p50_ms": 1.0 * c.layers, "model_mib": 3.0 * c.layers * (1 - c.ffn / 2), "peak_rss_mib": 80.0}


def _grid() -> list[Candidate]:
    return candidates(SearchSpace(layers=[2, 3, 6], ffn=[0.0], epochs=[1.0, 2.0]), teacher_layers=6)


def test_over_budget_candidate_never_trains(tmp_path: Path) -> None:
    measure, trained = FakeMeasure(), list[Candidate]()
    kept, dropped = survivors(_grid(), measure, EDGE.budgets, CostCache(tmp_path / "costs.json", EDGE, CPU))
    for c in kept:  # the search's train step: only survivors get here
        trained.append(c)
    assert {c.layers for c in kept} == {2, 3} and len(kept) == 4
    assert [c.layers for c, _ in dropped] == [6, 6]  # both epochs of the depth-6 architecture
    assert all(c.layers != 6 for c in trained)
    reasons = dropped[0][1]
    assert len(reasons) == 2 and reasons[0].startswith("p50_ms: 6 ms above the budget 5 ms (+20.0%)")
    assert reasons[1].startswith("model_mib: 18 MiB above the budget 12 MiB")


def test_each_architecture_is_measured_once_and_the_cache_answers_next_time(tmp_path: Path) -> None:
    path, measure = tmp_path / "costs.json", FakeMeasure()
    first = survivors(_grid(), measure, EDGE.budgets, CostCache(path, EDGE, CPU))
    assert sorted(c.layers for c in measure.calls) == [2, 3, 6]  # 6 candidates, 3 architectures
    again = survivors(_grid(), measure, EDGE.budgets, CostCache(path, EDGE, CPU))  # a new search, same file
    assert len(measure.calls) == 3 and again == first
    # without a cache it still measures each architecture once per call
    survivors(_grid(), measure, EDGE.budgets)
    assert len(measure.calls) == 6
    data = json.loads(path.read_text())
    assert data["version"] == 1 and len(data["entries"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "costs.json"]  # no temporary file left


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage \x80",
        b'{"version": 1, "entries": {"ab',
        b"[1, 2, 3]",
        b'{"version": 99, "entries": {}}',
        b"",
    ],
    ids=["bytes", "truncated", "not-a-mapping", "other-version", "empty"],
)
def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, garbage: bytes) -> None:
    path, measure = tmp_path / "costs.json", FakeMeasure()
    path.write_bytes(garbage)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        cache = CostCache(path, EDGE, CPU)
    assert len(cache) == 0
    survivors(_grid(), measure, EDGE.budgets, cache)
    assert len(measure.calls) == 3
    rebuilt = CostCache(path, EDGE, CPU)  # no warning now: a valid file
    assert len(rebuilt) == 3 and rebuilt.get(_grid()[0].arch_key()) == {
        "p50_ms": 2.0,
        "model_mib": 6.0,
        "peak_rss_mib": 80.0,
    }


def test_a_bad_entry_is_dropped_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    cache = CostCache(path, EDGE, CPU)
    a, b = _grid()[0], _grid()[2]
    cache.put(a.arch_key(), {"p50_ms": 1.0})
    cache.put(b.arch_key(), {"p50_ms": 2.0})
    data = json.loads(path.read_text())
    data["entries"][cache.entry_key(b.arch_key())]["measure"] = {"p50_ms": "fast"}
    path.write_text(json.dumps(data))
    again = CostCache(path, EDGE, CPU)
    assert again.get(a.arch_key()) == {"p50_ms": 1.0} and again.get(b.arch_key()) is None


def test_nan_and_missing_figures_are_over_budget(tmp_path: Path) -> None:
    budgets = Budgets(p50_ms=5.0, model_mib=12.0, peak_rss_mib=100.0)
    assert over_budget({"p50_ms": 1.0, "model_mib": 1.0, "peak_rss_mib": 1.0}, budgets) == []
    misses = over_budget({"p50_ms": math.nan, "model_mib": 1.0}, budgets)
    assert [m.split(":")[0] for m in misses] == ["p50_ms", "peak_rss_mib"]
    assert "not measured" in misses[0] and "not measured" in misses[1]
    assert over_budget({"p50_ms": math.inf, "model_mib": "1", "peak_rss_mib": True}, budgets) != []
    assert len(over_budget({"p50_ms": math.inf, "model_mib": "1", "peak_rss_mib": True}, budgets)) == 3
    # an exact hit meets an at-most budget; accuracy budgets are not a cost (they need training)
    assert over_budget({"p50_ms": 5.0}, Budgets(p50_ms=5.0, accuracy=0.9)) == []
    assert over_budget({}, Budgets()) == []  # no budget set: nothing to miss
    # a NaN measurement drops the candidate and is not cached: the next search measures it again
    measure = FakeMeasure()
    cache = CostCache(tmp_path / "costs.json", EDGE, CPU)
    nan_grid = _grid()[:2]  # depth 2, both epochs: one architecture
    kept, dropped = survivors(nan_grid, lambda c: {"p50_ms": math.nan, "model_mib": 1.0}, EDGE.budgets, cache)
    assert kept == [] and len(dropped) == 2 and len(cache) == 0
    assert cache.put(nan_grid[0].arch_key(), {}) is False and len(cache) == 0  # nothing measured: not cached
    survivors(nan_grid, measure, EDGE.budgets, cache)
    assert len(measure.calls) == 1


def test_relative_excess() -> None:
    b = Budgets(p50_ms=4.0, model_mib=10.0, accuracy=0.8, retention=0.97)
    e = relative_excess({"p50_ms": 5.0, "model_mib": 10.0, "accuracy": 0.6}, b)
    assert e == {"p50_ms": 0.25, "model_mib": 0.0, "accuracy": pytest.approx(0.25), "retention": math.inf}


def test_another_profile_or_cpu_does_not_reuse_entries(tmp_path: Path) -> None:
    path, measure = tmp_path / "costs.json", FakeMeasure()
    survivors(_grid(), measure, EDGE.budgets, CostCache(path, EDGE, CPU))
    assert len(measure.calls) == 3
    two_threads = EDGE.model_copy(update={"intra_op_threads": 4})
    other_shape = EDGE.model_copy(update={"shapes": [Shape(batch=1, seq=64)]})
    renamed = EDGE.model_copy(update={"name": "edge2"})
    for prof, cpu in ((two_threads, CPU), (other_shape, CPU), (renamed, CPU), (EDGE, {**CPU, "flags": []})):
        survivors(_grid(), measure, EDGE.budgets, CostCache(path, prof, cpu))
    assert len(measure.calls) == 3 * 5
    # budget limits and the deployed variant do not change a timing: same hash, entries reused
    tighter = EDGE.model_copy(update={"budgets": Budgets(p50_ms=1.0), "deploy": "fp32", "variants": ["fp32"]})
    assert profile_hash(tighter) == profile_hash(EDGE)
    assert profile_hash(EDGE.model_copy(update={"budgets": Budgets(shape="1x64")})) != profile_hash(EDGE)
    kept, _ = survivors(_grid(), measure, tighter.budgets, CostCache(path, tighter, CPU))
    assert len(measure.calls) == 15 and kept == []
    assert len(json.loads(path.read_text())["entries"]) == 3 * 5  # every profile's entries kept side by side


def test_the_file_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "costs.json"
    cache = CostCache(path, EDGE, CPU)
    cache.put("a" * 16, {"p50_ms": 1.0})
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        cache.put("b" * 16, {"p50_ms": 2.0})
    assert path.read_bytes() == before  # the old file is whole; the temporary one is gone
    assert [p.name for p in tmp_path.iterdir()] == ["costs.json"]


def test_default_cpu_is_this_machines(tmp_path: Path) -> None:
    from kdpipe.env import cpu_model

    assert CostCache(tmp_path / "c.json", EDGE).cpu == cpu_model()
