"""`kdpipe profile --compare OLD`: what got slower, bigger or less accurate than in an older run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.errors import ArtifactError
from kdpipe.reporting.figures import SCHEMA

SLOWER = 1.10  # p50 more than 10% above the old run's: machine noise is about +-10% run to run
BIGGER = 1.02
LESS_ACCURATE = 0.005  # half an accuracy point


def load_figures(path: Path) -> dict[str, Any]:
    """report.json of a run root (`<root>/profile/report.json`), of a profile directory, or the file itself.

    Anything else is an error, never an empty comparison: a comparison against nothing would print "no
    regression" for every run."""
    candidates = [path / "profile" / "report.json", path / "report.json"] if path.is_dir() else [path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = f"neither {candidates[0]} nor {candidates[1]}" if path.is_dir() else "no such file"
        raise ArtifactError(f"--compare {path}: no report.json ({where})", _HINT)
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"--compare {found}: not a kdpipe report.json ({type(e).__name__}: {e})", _HINT) from None
    problem = _shape_problem(data)
    if problem:
        raise ArtifactError(f"--compare {found}: not a kdpipe report.json ({problem})", _HINT)
    figures: dict[str, Any] = data
    return figures


_HINT = "give a run directory (or its profile directory, or its profile/report.json) written by kdpipe profile"


def _shape_problem(data: Any) -> str | None:
    """Why `data` is not report.json's figures (kdpipe.reporting.figures), or None: the keys the comparison reads."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    if data.get("schema") != SCHEMA:
        return f"schema {data.get('schema')!r}, expected {SCHEMA}" if "schema" in data else "no 'schema' field"
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        return "no models"
    for name, m in models.items():
        if not isinstance(m, dict) or not isinstance(m.get("latency"), dict):
            return f"model {name!r} has no latency table"
        for shape, st in m["latency"].items():
            if not isinstance(st, dict) or not isinstance(st.get("p50_ms"), int | float):
                return f"model {name!r} has no p50_ms at {shape}"
        for key in ("bytes", "accuracy"):
            if m.get(key) is not None and not isinstance(m[key], int | float):
                return f"model {name!r}: {key} is {m[key]!r}, not a number"
    return None


def regressions(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per regression of a model both runs have: p50 per shape, size on disk, test accuracy."""
    found = []
    for name, m in new["models"].items():
        before = old.get("models", {}).get(name)
        if before is None:
            continue
        for shape, st in m["latency"].items():
            was = before.get("latency", {}).get(shape, {}).get("p50_ms")
            if was and not st["p50_ms"] <= SLOWER * was:
                found.append(f"{name} {shape}: p50 {was:.2f} -> {st['p50_ms']:.2f} ms ({st['p50_ms'] / was - 1:+.0%})")
        if before.get("bytes") and m["bytes"] and not m["bytes"] <= BIGGER * before["bytes"]:
            found.append(f"{name}: size {before['bytes'] / 2**20:.1f} -> {m['bytes'] / 2**20:.1f} MiB")
        if before.get("accuracy") is not None and not (m["accuracy"] or 0) >= before["accuracy"] - LESS_ACCURATE:
            found.append(f"{name}: test accuracy {before['accuracy']:.4f} -> {m['accuracy']}")
    return found


def compare_runs(old: Path, new_profile_dir: Path) -> list[str]:
    """The lines `--compare` prints: a header, then each regression (or that there is none)."""
    if not (new_profile_dir / "report.json").is_file():
        raise ArtifactError(
            f"--compare: this run's profile stage wrote no report.json ({new_profile_dir}), so there is nothing to "
            "compare",
            "re-run the profile stage with this kdpipe (--force), or drop --compare",
        )
    before, after = load_figures(old), load_figures(new_profile_dir)
    shared = sorted(set(before["models"]) & set(after["models"]))
    if not shared:
        raise ArtifactError(
            f"--compare {old}: it has no model of this run ({', '.join(sorted(before['models']))} vs "
            f"{', '.join(sorted(after['models']))}), so there is nothing to compare",
            "compare runs of the same recipe (their export stages name the same models)",
        )
    found = regressions(before, after)
    head = f"compared with {old} ({len(shared)} model(s): {', '.join(shared)}):"
    if not found:
        return [
            f"{head} no regression (p50 within {SLOWER - 1:.0%}, size within {BIGGER - 1:.0%}, accuracy within "
            f"{100 * LESS_ACCURATE:.1f} points)"
        ]
    return [head, *(f"  regression: {line}" for line in found)]
