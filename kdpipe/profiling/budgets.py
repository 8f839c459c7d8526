"""A target profile's budgets against the deployed variant: what `kdpipe profile --strict` fails on."""

from __future__ import annotations

import math
from typing import Any

from kdpipe.artifacts.records import BudgetCheck, ExportRecord
from kdpipe.config import TargetProfile


def deployed_name(prof: TargetProfile) -> str:
    """The export record's name of the variant a profile ships ('student' is the fp32 one)."""
    return "student" if prof.deploy == "fp32" else f"student-{prof.deploy}"


def _check(budget: str, limit: float | None, value: float | None, unit: str, at_most: bool) -> BudgetCheck | None:
    if limit is None:
        return None
    # a figure that is missing or NaN never meets a budget
    ok = value is not None and math.isfinite(value) and (value <= limit if at_most else value >= limit)
    return BudgetCheck(budget=budget, limit=limit, value=value, unit=unit, ok=ok)


def check_budgets(
    prof: TargetProfile,
    results: dict[str, Any],
    export: ExportRecord,
    sizes: dict[str, int],
    teacher_accuracy: float,
    *,
    metric: str = "test accuracy",
    latency_key: str | None = None,
) -> list[BudgetCheck]:
    """Every budget the profile sets, measured on its deployed variant: latency at the budget shape (onnxruntime,
    this host), file size, peak RSS of the timing process, and the test-split accuracy from the export gate.
    A missing figure is a miss, never a pass.

    Another task names its own quality and latency: `metric` is what the gate's `accuracy` (a fraction) measures
    (translation: "test BLEU / 100", so `accuracy: 0.3` asks for BLEU 30 and `retention` compares BLEUs), and
    `latency_key` the key of the latency table the p50 / p99 budgets read (translation: "generate", one greedy
    translation); the default is the budget's `shape` (or the profile's first)."""
    b, name = prof.budgets, deployed_name(prof)
    shape = latency_key or b.shape or f"{prof.shapes[0].batch}x{prof.shapes[0].seq}"
    timed = results.get("onnxruntime", {}).get(name, {})
    stats = timed.get("shapes", {}).get(shape, {})
    gate = export.models[name].gate if name in export.models else None
    accuracy = gate.value if gate is not None else None
    size = sizes.get(name)
    checks = [
        _check(f"p50 latency at {shape}", b.p50_ms, stats.get("p50_ms"), "ms", at_most=True),
        _check(f"p99 latency at {shape}", b.p99_ms, stats.get("p99_ms"), "ms", at_most=True),
        _check("model size", b.model_mib, None if size is None else size / 2**20, "MiB", at_most=True),
        _check("peak RSS", b.peak_rss_mib, timed.get("peak_rss_mib"), "MiB", at_most=True),
        _check(metric, b.accuracy, accuracy, "fraction", at_most=False),
        _check(
            "retention",
            b.retention,
            None if accuracy is None or not teacher_accuracy else accuracy / teacher_accuracy,
            "of the teacher's accuracy" if metric == "test accuracy" else f"of the teacher's {metric}",
            at_most=False,
        ),
    ]
    return [c for c in checks if c is not None]
