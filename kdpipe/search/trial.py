"""One candidate of a search as a normal run: its recipe (the user's, with the candidate's `--set` overrides) and
its stages, executed by the runner into its own output root beside the shared teacher.

- `measure_cost` builds the candidate untrained (copy init from the teacher, one optimiser step so that the
  distill stage hands over a model), exports it in its precision with the accuracy gate opened (an untrained
  model's accuracy means nothing) and times it with the profiler (its own process, the profile's threads, the
  budget's shape): latency, size and peak RSS do not depend on the weights.
- `train_rung` distils it for one fidelity's epochs; `finish` exports and profiles the full-budget one.
Every stage is the runner's, so a finished one is skipped when a search resumes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import ProfileRecord, record
from kdpipe.config import Recipe, TargetProfile, load_recipe
from kdpipe.search.space import Candidate, deploy_profile, student_overrides

# the budget phrases of kdpipe.profiling.budgets.check_budgets -> the figure names of kdpipe.search.costs.SENSE
_FIGURES = (
    (re.compile(r"^p50 latency"), "p50_ms"),
    (re.compile(r"^p99 latency"), "p99_ms"),
    (re.compile(r"^model size$"), "model_mib"),
    (re.compile(r"^peak RSS$"), "peak_rss_mib"),
    (re.compile(r"^retention$"), "retention"),
)
OPEN_GATE = 1e-9  # an accuracy limit every model meets: the check then reports the value, and judges nothing
UNTRAINED_EPOCHS = 1e-6  # one optimiser step: the runner's distill stage hands over a model


@dataclass(frozen=True)
class Setting:
    """What every candidate of one search shares: the recipe it was started from (name or path) with the
    user's overrides, the finished teacher stage, the target profile and where progress goes."""

    recipe: str
    sets: tuple[str, ...]
    teacher_dir: Path
    teacher_layers: int
    profile: TargetProfile
    console: Console


def profile_file(s: Setting, c: Candidate, root: Path) -> Path:
    """The candidate's deploy profile (`_measuring`) written as YAML into its output root, so that the root is
    a normal run whose recipe names it (`kdpipe profile` there times what the search timed)."""
    import yaml

    path = root / f"profile-{c.precision}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(_measuring(s.profile, c).model_dump(mode="json", exclude_none=True), sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def candidate_recipe(s: Setting, c: Candidate, root: Path, *extra: str) -> Recipe:
    """The user's recipe with the candidate's overrides (and `extra` ones) on top, profiled on its deploy
    profile; no export of the teacher (the search's teacher is exported once, if at all) and no no-KD baseline
    or CKA (a search compares candidates, not methods)."""
    sets = [
        *s.sets,
        *student_overrides(c, s.teacher_layers),
        f"profile={json.dumps(str(profile_file(s, c, root)))}",
        "export.teacher=false",
        "distill.baseline=false",
        "distill.cka_samples=0",
        *extra,
    ]
    cfg, _ = load_recipe(s.recipe, sets)
    return cfg


def _chain(s: Setting, cfg: Recipe, root: Path, upto: str) -> dict[str, Manifest]:
    """The candidate's stages from `student` through `upto` into `root` (skipped where up to date)."""
    from kdpipe.pipeline.runner import CHAIN, STAGES, context, execute
    from kdpipe.pipeline.validate import check_recipe

    check_recipe(cfg)
    _share_cache(root, s.teacher_dir.parent / "cache")
    ctx = context(cfg, s.console)
    done: dict[str, Manifest] = {}
    upstream: Path | None = s.teacher_dir
    for name in CHAIN[1 : CHAIN.index(upto) + 1]:
        spec = STAGES[name]
        done[name], _ = execute(spec, spec.section(cfg, ctx), ctx, root, upstream)
        upstream = None  # the later stages read their upstream from `root`
    return done


def _share_cache(root: Path, shared: Path) -> None:
    """<root>/cache -> the search's shared <out>/cache (relative link): the teacher-output cache is keyed by its
    content (kdpipe.train.cache), so every candidate that reads the same teacher outputs builds them once."""
    import os

    link = root / "cache"
    if link.is_symlink() or link.exists():
        return
    shared.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(shared, root), target_is_directory=True)


def figures(prof_manifest: Manifest) -> dict[str, float]:
    """The deployed variant's measured figures (p50_ms, model_mib, peak_rss_mib, retention, ...) from a profile
    stage's budget checks; a missing or NaN one is left out (and so never meets a budget)."""
    rec = record(prof_manifest, ProfileRecord)
    out: dict[str, float] = {}
    for check in rec.budgets:
        name = next((n for pattern, n in _FIGURES if pattern.search(check.budget)), "accuracy")
        if check.value is not None and math.isfinite(check.value):
            out[name] = float(check.value)
    return out


def _measuring(prof: TargetProfile, c: Candidate) -> TargetProfile:
    """The candidate's deploy profile, with an accuracy budget so that the budget checks carry the quality."""
    p = deploy_profile(prof, c)
    if p.budgets.accuracy is None:
        p = p.model_copy(update={"budgets": p.budgets.model_copy(update={"accuracy": OPEN_GATE})})
    return p


def measure_cost(s: Setting, c: Candidate, root: Path) -> dict[str, float]:
    """The untrained candidate's latency, size and peak RSS on this machine under the profile (see the module)."""
    cfg = candidate_recipe(s, c, root, f"distill.epochs={UNTRAINED_EPOCHS!r}", f"export.accuracy_budget={OPEN_GATE!r}")
    done = _chain(s, cfg, root, "profile")
    got = figures(done["profile"])
    return {k: v for k, v in got.items() if k not in ("accuracy", "retention")}


def train_rung(s: Setting, c: Candidate, epochs: float, root: Path) -> float:
    """The candidate distilled for `epochs`; its test accuracy (NaN when the task reports none)."""
    cfg = candidate_recipe(s, c, root, f"distill.epochs={epochs!r}")
    done = _chain(s, cfg, root, "distill")
    value = done["distill"].metric("test_accuracy")
    return float(value) if isinstance(value, int | float) else math.nan


def finish(s: Setting, c: Candidate, root: Path) -> tuple[dict[str, float], list[str]]:
    """The full-budget candidate exported in its precision (gated as usual) and profiled: its figures (the
    deployed variant's test accuracy included) and the budgets it misses, by name."""
    cfg = candidate_recipe(s, c, root)
    done = _chain(s, cfg, root, "profile")
    rec = record(done["profile"], ProfileRecord)
    misses = [f"{b.budget} {b.value} {b.unit} (budget {b.limit:g})" for b in rec.misses if b.limit != OPEN_GATE]
    return figures(done["profile"]), misses


def teacher_layers(teacher: Manifest) -> int:
    """The number of transformer layers of a finished teacher stage (its saved config)."""
    from transformers import AutoConfig

    model = next(p for p in (teacher.dir / "model", teacher.dir) if (p / "config.json").is_file())
    conf: Any = AutoConfig.from_pretrained(model)
    for name in ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers"):
        if isinstance(getattr(conf, name, None), int):
            return int(getattr(conf, name))
    raise ValueError(f"{model}/config.json: no layer count")
