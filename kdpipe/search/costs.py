"""Cost before training: a candidate's latency, size and memory do not depend on its weights, so each
architecture is measured once (untrained, exported, timed by the profiler: the caller's `measure_fn`) and every
candidate over a budget is dropped before any distillation.

The measurements live in a JSON cache keyed by the architecture, the profile (its name and a hash of the settings
that change a timing) and the CPU (model name and int8 flags, kdpipe.env.cpu_model): a different profile or
machine never reuses an entry. The file is replaced atomically; a corrupt one is ignored with a warning and
rebuilt, never a crash. A missing or NaN figure never meets a budget (as kdpipe.profiling.budgets).
Pure logic; no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdpipe.config import Budgets, TargetProfile
from kdpipe.search.space import Candidate

CACHE_VERSION = 1
Measure = dict[str, float]

# budget field -> (unit, at_most): the figures a measurement (or a trained candidate's report) may carry
SENSE: dict[str, tuple[str, bool]] = {
    "p50_ms": ("ms", True),
    "p99_ms": ("ms", True),
    "model_mib": ("MiB", True),
    "peak_rss_mib": ("MiB", True),
    "ttft_ms": ("ms", True),
    "decode_tokens_per_s": ("tokens/s", False),
    "accuracy": ("fraction", False),
    "retention": ("of the teacher's", False),
}
# what an untrained candidate's measurement can settle; accuracy and retention need training
COST_BUDGETS = ("p50_ms", "p99_ms", "model_mib", "peak_rss_mib", "ttft_ms", "decode_tokens_per_s")
# profile fields that do not change a measurement: the name is keyed on its own, the search sets variants and
# deploy per candidate (the precision is in the arch key), and budgets only judge (except their shape, kept)
_NOT_TIMING = ("kind", "name", "description", "variants", "deploy", "budgets")


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def relative_excess(
    figures: Mapping[str, Any], budgets: Budgets, only: Sequence[str] | None = None
) -> dict[str, float]:
    """Per budget set (among `only`, default all): by how much `figures` misses it, relative to the limit — 0.0
    when met, (value - limit) / limit over an at-most budget, (limit - value) / limit under an at-least one,
    inf when the figure is missing, NaN or not a number."""
    out: dict[str, float] = {}
    for name in only if only is not None else tuple(SENSE):
        limit = getattr(budgets, name, None)
        if limit is None:
            continue
        at_most = SENSE[name][1]
        value = _finite(figures.get(name))
        if value is None:
            out[name] = math.inf
        else:
            gap = value - limit if at_most else limit - value
            out[name] = max(0.0, gap / limit)
    return out


def over_budget(measure: Mapping[str, Any], budgets: Budgets) -> list[str]:
    """The cost budgets (p50 / p99 latency, model size, peak RSS, and the causal LM's TTFT / decode speed) the
    measured candidate misses, each as one phrase starting with the budget's field name; [] when it meets them
    all. Missing or NaN is a miss."""
    misses = []
    for name, excess in relative_excess(measure, budgets, COST_BUDGETS).items():
        if excess == 0.0:
            continue
        unit, at_most = SENSE[name]
        limit = getattr(budgets, name)
        value = _finite(measure.get(name))
        if value is None:
            misses.append(f"{name}: not measured ({measure.get(name)!r}), budget {limit:g} {unit}")
        else:
            word = "above" if at_most else "below"
            misses.append(f"{name}: {value:.4g} {unit} {word} the budget {limit:g} {unit} ({excess:+.1%})")
    return misses


def profile_hash(prof: TargetProfile) -> str:
    """16 hex digits over the profile settings a measurement depends on (threads, providers, shapes, runs, the
    budget's shape, ...), not its name, description, variants / deploy or budget limits."""
    data = prof.model_dump(mode="json")
    for name in _NOT_TIMING:
        data.pop(name, None)
    data["budget_shape"] = prof.budgets.shape
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clean(measure: Mapping[str, Any]) -> Measure | None:
    """The finite numeric figures of a measurement, or None when it is empty or has a non-finite or non-number
    figure (such a measurement is not cached: the next search measures that architecture again)."""
    if not measure:
        return None
    out: Measure = {}
    for name, value in measure.items():
        v = _finite(value)
        if not isinstance(name, str) or v is None:
            return None
        out[name] = v
    return out


class CostCache:
    """Measurements by architecture, for one profile on one CPU, in a JSON file shared by every search.

    `get(arch_key)` is the stored measurement or None; `put(arch_key, measure)` stores it and rewrites the file
    atomically (a temporary file in the same directory, then os.replace). Entries of other profiles or CPUs
    stay in the file untouched. A file that is not this cache (garbage, truncated JSON, another shape) is
    ignored with a RuntimeWarning and replaced on the next `put`."""

    def __init__(self, path: Path, prof: TargetProfile, cpu: Mapping[str, Any] | None = None) -> None:
        from kdpipe.env import cpu_model

        self.path = Path(path)
        self.profile = prof.name
        self.profile_hash = profile_hash(prof)
        self.cpu = dict(cpu) if cpu is not None else cpu_model()
        self._entries = self._load()

    def entry_key(self, arch_key: str) -> str:
        """The file's key of an architecture under this profile and CPU."""
        ident = {"arch": arch_key, "profile": self.profile, "profile_hash": self.profile_hash, "cpu": self.cpu}
        text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warnings.warn(f"cost cache {self.path} unreadable ({e.strerror}); measuring again", RuntimeWarning, 3)
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                raise ValueError("not a kdpipe cost cache of this version")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not a mapping")
        except (ValueError, KeyError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            warnings.warn(
                f"cost cache {self.path} is corrupt ({type(e).__name__}); ignored, it is rebuilt as candidates "
                "are measured",
                RuntimeWarning,
                3,
            )
            return {}
        # a bad entry alone is dropped; the others are kept
        return {k: v for k, v in entries.items() if isinstance(v, dict) and _measure_of(v) is not None}

    def get(self, arch_key: str) -> Measure | None:
        entry = self._entries.get(self.entry_key(arch_key))
        return None if entry is None else _measure_of(entry)

    def put(self, arch_key: str, measure: Mapping[str, Any]) -> bool:
        """Store a measurement; False (and nothing stored) when a figure is missing a number or not finite."""
        clean = _clean(measure)
        if clean is None:
            return False
        self._entries[self.entry_key(arch_key)] = {
            "arch": arch_key,
            "profile": self.profile,
            "profile_hash": self.profile_hash,
            "cpu": self.cpu,
            "measure": clean,
        }
        self._write()
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "entries": self._entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # a reader sees the old file or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _measure_of(entry: Mapping[str, Any]) -> Measure | None:
    measure = entry.get("measure")
    return _clean(measure) if isinstance(measure, dict) else None


def survivors(
    cands: Sequence[Candidate],
    measure_fn: Callable[[Candidate], Mapping[str, Any]],
    budgets: Budgets,
    cache: CostCache | None = None,
) -> tuple[list[Candidate], list[tuple[Candidate, list[str]]]]:
    """The candidates whose architecture meets every cost budget, in their order, and the dropped ones with
    the budgets each misses (over_budget). Each architecture is measured once: `measure_fn` runs only for the
    first candidate of an arch_key the cache does not hold; the others (other epochs) reuse it."""
    seen: dict[str, Measure | Mapping[str, Any]] = {}
    kept: list[Candidate] = []
    dropped: list[tuple[Candidate, list[str]]] = []
    for c in cands:
        arch = c.arch_key()
        if arch not in seen:
            hit = cache.get(arch) if cache is not None else None
            if hit is None:
                measured = dict(measure_fn(c))
                if cache is not None:
                    cache.put(arch, measured)
                seen[arch] = measured
            else:
                seen[arch] = hit
        misses = over_budget(seen[arch], budgets)
        if misses:
            dropped.append((c, misses))
        else:
            kept.append(c)
    return kept, dropped
