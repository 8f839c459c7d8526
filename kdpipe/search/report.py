"""The search's report: every candidate (its cost before training, its trial), the Pareto fronts (quality vs
p50 latency, quality vs size) as a table and a PNG, the best candidate that meets every budget (linked as
<out>/best) or the closest one and by how much. report.json holds the same data; every path is relative to <out>.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, write_json_atomic
from kdpipe.config import TargetProfile
from kdpipe.search.pareto import Point, best, closest, front
from kdpipe.search.space import Candidate, SearchSpace

SEARCH = "search"
COSTS = ("p50_ms", "p99_ms", "model_mib", "peak_rss_mib")  # the first the profile budgets ranks ties


def _row(
    c: Candidate, measured: dict[str, dict[str, float]], cost_misses: dict[str, list[str]], trial: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": c.key(),
        "layers": c.layers,
        "heads_removed": c.heads,
        "ffn_removed": c.ffn,
        "precision": c.precision,
        "epochs": c.epochs,
        "cost": measured.get(c.arch_key(), {}),
        "cost_misses": cost_misses.get(c.key(), []),
        "state": "over budget before training" if c.key() in cost_misses else "not trained",
        "figures": {},
        "misses": [],
        "rungs": [],
        "root": None,
        "error": None,
    }
    if trial is not None:
        a = trial.user_attrs
        row.update(
            state=trial.state.name.lower(),
            figures=a.get("figures", {}),
            misses=a.get("misses", []),
            rungs=a.get("rungs", []),
            root=a.get("root"),
            error=a.get("error"),
            trial=trial.number,
        )
    row["meets"] = row["state"] == "complete" and not row["misses"] and bool(row["figures"])
    return row


def _points(rows: list[dict[str, Any]], cost: str) -> list[Point]:
    out = []
    for r in rows:
        if r["state"] != "complete":
            continue
        f = r["figures"]
        out.append(Point(r["key"], f.get("accuracy", math.nan), f.get(cost, math.nan), r["meets"], figures=f))
    return out


def write_report(
    root: Path,
    plan: Any,
    cands: list[Candidate],
    measured: dict[str, dict[str, float]],
    dropped: list[tuple[Candidate, list[str]]],
    teacher: Manifest,
    seconds: float,
    trials: dict[str, Any],
) -> dict[str, Any]:
    """report.json, report.md and pareto.png under <out>/search, and <out>/best; returns the report's data.
    `trials`: candidate key -> its finished Optuna trial (kdpipe.search.study.finished)."""
    from kdpipe.env import cpu_model

    prof = TargetProfile.model_validate(plan.profile)
    cost_misses = {c.key(): m for c, m in dropped}
    rows = [_row(c, measured, cost_misses, trials.get(c.key())) for c in cands]
    primary = next((n for n in COSTS if getattr(prof.budgets, n, None) is not None), "model_mib")
    top = best(_points(rows, primary))
    near = closest(_points(rows, primary), prof.budgets) if top is None else None
    data = {
        "profile": prof.name,
        "budgets": prof.budgets.model_dump(mode="json", exclude_none=True),
        "space": SearchSpace.model_validate(plan.space).model_dump(mode="json"),
        "study": plan.study,
        "teacher": {"dir": os.path.relpath(teacher.dir, root), "test_accuracy": teacher.metric("test_accuracy")},
        "cpu": cpu_model(),
        "seconds": round(seconds, 1),
        "estimated": [],  # every figure here was measured on this machine (no roofline estimate)
        "candidates": rows,
        "front_p50": [p.key for p in front(_points(rows, "p50_ms"))],
        "front_size": [p.key for p in front(_points(rows, "model_mib"))],
        "best": None if top is None else top.key,
        "closest": None if near is None else near.describe(),
    }
    out = root / SEARCH
    write_json_atomic(out / "report.json", json.dumps(data, indent=1, sort_keys=True, allow_nan=False, default=str))
    _plot(rows, data, out / "pareto.png")
    (out / "report.md").write_text(markdown(data), encoding="utf-8")
    _link_best(root, rows, data["best"])
    return data


def _link_best(root: Path, rows: list[dict[str, Any]], key: str | None) -> None:
    """<out>/best -> search/trials/<key> (relative), replaced atomically; removed when nothing meets the budgets."""
    link = root / "best"
    if key is None:
        if link.is_symlink():
            link.unlink()
        return
    target = next(r["root"] for r in rows if r["key"] == key)
    tmp = root / ".best.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(data: dict[str, Any]) -> str:
    b = data["budgets"]
    lines = [
        f"# kdpipe search: profile `{data['profile']}`",
        "",
        f"Budgets: {', '.join(f'{k} {v}' for k, v in b.items())}. Teacher test accuracy "
        f"{_fmt(data['teacher']['test_accuracy'])}. CPU: {data['cpu'].get('model', '?')} "
        f"(flags: {', '.join(data['cpu'].get('flags', [])) or 'none of the int8 ones'}). "
        f"{len(data['candidates'])} candidates, {data['seconds'] / 60:.1f} min. Every figure is measured on this "
        "machine (none estimated); cost = the untrained candidate exported and timed before any training.",
        "",
        "| candidate | layers | heads -% | FFN -% | precision | epochs | cost p50 ms | cost MiB | state | rungs "
        "(epochs: acc) | accuracy | p50 ms | MiB | meets |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for r in data["candidates"]:
        f, c = r["figures"], r["cost"]
        rungs = "; ".join(f"{e:.3g}: {_fmt(a)}" for e, a in r["rungs"])
        state = r["state"] + (f" ({r['error']})" if r["error"] else "")
        lines.append(
            f"| `{r['key']}` | {r['layers']} | {r['heads_removed']:.0%} | {r['ffn_removed']:.0%} | {r['precision']} "
            f"| {r['epochs']:g} | {_fmt(c.get('p50_ms'))} | {_fmt(c.get('model_mib'))} | {state} | {rungs} "
            f"| {_fmt(f.get('accuracy'))} | {_fmt(f.get('p50_ms'))} | {_fmt(f.get('model_mib'))} "
            f"| {'yes' if r['meets'] else 'no'} |"
        )
    lines += ["", f"Pareto front, accuracy vs p50: {', '.join(f'`{k}`' for k in data['front_p50']) or 'none'}."]
    lines += [f"Pareto front, accuracy vs size: {', '.join(f'`{k}`' for k in data['front_size']) or 'none'}.", ""]
    if data["best"]:
        lines.append(f"**Best**: `{data['best']}`, linked as `best/` (a normal run: export / profile it as any).")
    else:
        lines.append(f"**No candidate meets every budget.** Closest: {data['closest'] or 'none trained'}.")
    lines += ["", "![Pareto fronts](pareto.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label, keys in (
        (axes[0], "p50_ms", "p50 latency (ms)", data["front_p50"]),
        (axes[1], "model_mib", "model size (MiB)", data["front_size"]),
    ):
        pts = [(r["figures"].get(cost), r["figures"].get("accuracy"), r) for r in rows if r["state"] == "complete"]
        pts = [(x, y, r) for x, y, r in pts if x is not None and y is not None]
        ax.scatter(
            [x for x, _, r in pts if not r["meets"]],
            [y for _, y, r in pts if not r["meets"]],
            c="grey",
            label="misses a budget",
        )
        ax.scatter(
            [x for x, _, r in pts if r["meets"]],
            [y for _, y, r in pts if r["meets"]],
            c="tab:green",
            label="meets every budget",
        )
        on = sorted((x, y) for x, y, r in pts if r["key"] in keys)
        if on:
            ax.step([x for x, _ in on], [y for _, y in on], where="post", c="tab:blue", label="Pareto front")
        if (limit := data["budgets"].get(cost)) is not None:
            ax.axvline(limit, ls="--", c="tab:red", label=f"budget {limit:g}")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (deployed variant)")
        ax.legend(fontsize=8)
    fig.suptitle(f"kdpipe search, profile {data['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
