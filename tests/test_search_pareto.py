"""kdpipe.search.pareto on hand-made points: a dominated point is left off the front, equal points both stay, NaN
points are never on the front nor the best, a single point and no points, the best among those that meet the
budgets, and the closest when none does (by how much, per budget)."""

from __future__ import annotations

import math
import random

import pytest

from kdpipe.config import Budgets
from kdpipe.search.pareto import Point, best, closest, front


def P(key: str, quality: float, cost: float, meets: bool = True, measured: bool = True, **figures: float) -> Point:
    return Point(key=key, quality=quality, cost=cost, meets=meets, measured=measured, figures=figures)


def keys(points: list[Point]) -> list[str]:
    return [p.key for p in points]


def test_dominated_point_is_left_off() -> None:
    pts = [P("fast", 0.80, 2.0), P("slow-worse", 0.78, 5.0), P("slow-better", 0.90, 6.0), P("mid", 0.85, 4.0)]
    assert keys(front(pts)) == ["fast", "mid", "slow-better"]  # sorted by cost
    # dominated in one objective only by a tie in the other: same quality, higher cost
    assert keys(front([P("a", 0.8, 2.0), P("b", 0.8, 3.0)])) == ["a"]
    assert keys(front([P("a", 0.8, 2.0), P("b", 0.7, 2.0)])) == ["a"]


def test_equal_points_both_stay_in_a_stable_order() -> None:
    pts = [P("z", 0.8, 2.0), P("a", 0.8, 2.0), P("worse", 0.7, 3.0)]
    assert keys(front(pts)) == ["a", "z"]
    for _ in range(5):
        random.shuffle(pts)
        assert keys(front(pts)) == ["a", "z"]  # the same answer in any input order


def test_single_and_empty() -> None:
    assert keys(front([P("only", 0.5, 1.0)])) == ["only"]
    assert front([]) == [] and best([]) is None and closest([], Budgets(p50_ms=1.0)) is None


def test_nan_and_inf_points_are_never_on_the_front_nor_best() -> None:
    nan_q, nan_c, inf_c = P("nan-q", math.nan, 0.1), P("nan-c", 0.99, math.nan), P("inf-c", 0.99, math.inf)
    pts = [nan_q, nan_c, inf_c, P("ok", 0.5, 3.0)]
    assert keys(front(pts)) == ["ok"]
    assert best(pts) == pts[-1]
    assert front([nan_q, nan_c]) == [] and best([nan_q, nan_c, inf_c]) is None


def test_senses_can_flip() -> None:
    pts = [P("low", 0.2, 1.0), P("high", 0.9, 5.0), P("mid", 0.5, 3.0)]
    assert keys(front(pts)) == ["low", "mid", "high"]  # a trade-off: all stay
    assert keys(front(pts, maximize_quality=False)) == ["low"]  # lower quality and lower cost: low dominates
    assert keys(front(pts, minimize_cost=False)) == ["high"]


def test_best_is_the_most_accurate_that_meets_every_budget() -> None:
    pts = [P("accurate-but-slow", 0.95, 9.0, meets=False), P("ok", 0.88, 4.0), P("ok-cheaper", 0.88, 3.0)]
    pts.append(P("worse", 0.80, 1.0))
    chosen = best(pts)
    assert chosen is not None and chosen.key == "ok-cheaper"  # a tie on quality goes to the cheaper
    assert best([P("miss", 0.9, 1.0, meets=False)]) is None
    estimated = [P("est", 0.95, 1.0, measured=False), P("measured", 0.9, 1.0)]
    assert keys([p for p in (best(estimated), best(estimated, measured_only=True)) if p]) == ["est", "measured"]


def test_closest_names_the_nearest_and_by_how_much() -> None:
    budgets = Budgets(p50_ms=5.0, model_mib=12.0, retention=0.97)
    pts = [
        P("far", 0.9, 10.0, meets=False, p50_ms=10.0, model_mib=11.0, retention=0.99),  # 100 % over on latency
        P("near", 0.9, 6.0, meets=False, p50_ms=6.0, model_mib=13.2, retention=0.98),  # 20 % and 10 % over
        P("unmeasured", 0.99, 1.0, meets=False, p50_ms=1.0),  # no size / retention: infinitely far
    ]
    c = closest(pts, budgets)
    assert c is not None and c.key == "near"
    assert c.excess == {"p50_ms": pytest.approx(0.2), "model_mib": pytest.approx(0.1), "retention": 0.0}
    assert c.worst == pytest.approx(0.2)
    assert c.describe() == "candidate near: p50_ms +20.0%, model_mib +10.0%, retention met"
    # an at-least budget: 3 % short of the retention
    short = closest([P("s", 0.9, 1.0, meets=False, p50_ms=1.0, model_mib=1.0, retention=0.9409)], budgets)
    assert short is not None and short.excess["retention"] == pytest.approx(0.03)
    # NaN figures are as far as missing ones; among two infinitely far, fewer missing figures wins
    two = Budgets(p50_ms=5.0, model_mib=1.0)
    nan = closest([P("a-none", 0.9, 1.0), P("z-nan", 0.9, 1.0, p50_ms=math.nan, model_mib=0.5)], two)
    assert nan is not None and nan.key == "z-nan" and math.isinf(nan.worst)
    assert "not measured" in nan.describe()
