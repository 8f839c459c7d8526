"""The Pareto front of a search (quality against one cost: p50, size, ...), the best candidate that meets every
budget, and, when none does, the one closest to meeting them and by how much.

A point with a NaN (or infinite) quality or cost is never on the front and never the best: a missing figure is
never a pass (kdpipe.profiling.budgets). Ties are broken by cost, then quality, then key, so every answer is
the same for the same points in any order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kdpipe.config import Budgets
from kdpipe.search.costs import SENSE, relative_excess


@dataclass(frozen=True)
class Point:
    """One trained (or estimated) candidate. `meets`: it meets every budget of the profile; `measured`: its
    figures were measured here (False: estimated, e.g. the roofline for another device). `figures` (budget field
    -> value, as kdpipe.search.costs.SENSE names them) is what `closest` reads."""

    key: str
    quality: float
    cost: float
    meets: bool
    measured: bool = True
    figures: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.quality) and math.isfinite(self.cost)


def _order(p: Point) -> tuple[float, float, str]:
    return (p.cost, -p.quality, p.key)


def front(points: Iterable[Point], maximize_quality: bool = True, minimize_cost: bool = True) -> list[Point]:
    """The non-dominated points, sorted by cost (ascending), then quality (best first), then key. A point is
    dominated when another is at least as good in both quality and cost and better in one; equal points do not
    dominate each other, so both stay. Points with a non-finite quality or cost are left out."""
    q = 1.0 if maximize_quality else -1.0
    c = 1.0 if minimize_cost else -1.0
    pts = sorted((p for p in points if p.finite), key=_order)

    def dominates(a: Point, b: Point) -> bool:
        no_worse = q * a.quality >= q * b.quality and c * a.cost <= c * b.cost
        better = q * a.quality > q * b.quality or c * a.cost < c * b.cost
        return no_worse and better

    return [p for p in pts if not any(dominates(o, p) for o in pts)]  # O(n^2): a search has hundreds at most


def best(points: Iterable[Point], measured_only: bool = False) -> Point | None:
    """The highest quality among the points that meet every budget (and, with `measured_only`, were measured,
    not estimated); lower cost, then key, breaks a tie. None when no point qualifies."""
    ok = [p for p in points if p.meets and p.finite and (p.measured or not measured_only)]
    return min(ok, key=lambda p: (-p.quality, p.cost, p.key), default=None)


@dataclass(frozen=True)
class Closest:
    """The point nearest to meeting the budgets: `excess` is, per budget set, how far it is off relative to the
    limit (0.0 met, 0.25 means 25 % over an at-most budget or under an at-least one, inf not measured);
    `worst` the largest of them."""

    key: str
    excess: dict[str, float]
    worst: float

    def describe(self) -> str:
        """One line: 'candidate K: p50_ms +25.0%, model_mib met'."""
        parts = []
        for name, e in self.excess.items():
            text = "met" if e == 0 else "not measured" if math.isinf(e) else f"+{e:.1%}"
            parts.append(f"{name} {text}")
        return f"candidate {self.key}: {', '.join(parts) or 'no budget set'}"


def closest(points: Sequence[Point], budgets: Budgets) -> Closest | None:
    """The point whose worst relative excess over the budgets is smallest (the sum of its excesses, then its
    key, breaks a tie), read from each point's `figures`; None for no points. A figure a point lacks counts
    as infinitely far, so a point with every figure beats one that was never measured."""
    if not points:
        return None
    scored = []
    for p in points:
        excess = relative_excess(p.figures, budgets, tuple(SENSE))
        worst = max(excess.values(), default=0.0)
        total = sum(e for e in excess.values() if math.isfinite(e))
        missing = sum(1 for e in excess.values() if math.isinf(e))
        scored.append(((worst, missing, total, p.key), Closest(key=p.key, excess=excess, worst=worst)))
    return min(scored, key=lambda s: s[0])[1]
