"""`kdpipe profile --compare OLD`: what got slower, bigger or less accurate than in an older run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.errors import ArtifactError

SLOWER = 1.10  # p50 more than 10% above the old run's: machine noise is about +-10% run to run
BIGGER = 1.02
LESS_ACCURATE = 0.005  # half an accuracy point


def load_figures(path: Path) -> dict[str, Any]:
    """report.json of a run root (`<root>/profile/report.json`) or of a profile directory."""
    for candidate in (path / "profile" / "report.json", path / "report.json", path):
        if candidate.is_file():
            data: dict[str, Any] = json.loads(candidate.read_text(encoding="utf-8"))
            return data
    raise ArtifactError(
        f"{path}: no report.json (neither {path / 'profile' / 'report.json'} nor {path / 'report.json'})",
        "give a run directory (or its profile directory) written by this kdpipe version",
    )


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
    found = regressions(load_figures(old), load_figures(new_profile_dir))
    head = f"compared with {old}:"
    if not found:
        return [
            f"{head} no regression (p50 within {SLOWER - 1:.0%}, size within {BIGGER - 1:.0%}, accuracy within "
            f"{100 * LESS_ACCURATE:.1f} points)"
        ]
    return [head, *(f"  regression: {line}" for line in found)]
