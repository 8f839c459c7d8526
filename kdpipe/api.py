"""kdpipe from Python: the CLI's commands as functions that return the typed records the CLI prints and raise
kdpipe's own errors (kdpipe.errors.KdpipeError: ConfigError, DataError, ArtifactError, BudgetError ...).

    import kdpipe
    result = kdpipe.run("edge", overrides={"distill.epochs": 1}, out="runs/edge")
    result.profile.deploy, result["distill"].metrics["test_accuracy"].value, result.report

The CLI (kdpipe.cli) is a thin layer over these functions: it turns options into overrides, prints, and maps the
errors to exit codes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import BudgetError, ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from kdpipe.artifacts.manifest import Manifest, Metric
    from kdpipe.artifacts.records import BudgetCheck, ProfileRecord, Record

Overrides = Mapping[str, Any] | Sequence[str] | None


@dataclass(frozen=True)
class StageResult:
    """One finished stage: its directory, its typed record (TeacherRecord, StudentRecord, DistillRecord,
    ExportRecord or ProfileRecord), its metrics and the manifest they were read from."""

    stage: str
    dir: Path
    record: Record
    metrics: dict[str, Metric]
    manifest: Manifest


@dataclass(frozen=True)
class RunResult:
    """A whole chain (`kdpipe run`): each stage's result by name, the report, and the budgets the deployed
    variant missed (empty when it met every one)."""

    out: Path
    stages: dict[str, StageResult]
    report: Path
    misses: list[BudgetCheck] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)  # against `compare`, when given

    def __getitem__(self, stage: str) -> StageResult:
        return self.stages[stage]

    @property
    def profile(self) -> ProfileRecord:
        from kdpipe.artifacts.records import ProfileRecord

        rec = self.stages["profile"].record
        assert isinstance(rec, ProfileRecord)
        return rec


def override(key: str, value: Any, origin: str | None = None) -> str:
    """`key=value` as a recipe override (kdpipe.config.Override: errors name `origin`, e.g. a CLI option). A str is
    quoted (a path like `data #1.csv` stays a string); lists, dicts, numbers, bools and None are YAML values."""
    from kdpipe.config import Override

    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else {"inf": ".inf", "-inf": "-.inf"}.get(str(value), ".nan")
    elif isinstance(value, Path):
        text = json.dumps(str(value))
    elif isinstance(value, str | int | list | tuple | dict):
        text = json.dumps(value, default=str)
    else:
        raise ConfigError(
            f"overrides[{key!r}]: a {type(value).__name__} is not a recipe value",
            "give str, int, float, bool, None, a list or a dict",
        )
    return Override(f"{key}={text}", origin or f"overrides[{key!r}]={_short(text)}")


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:50] + "..."


def overrides_list(overrides: Overrides) -> list[str]:
    """A dict {"distill.epochs": 3} or a list of `key=value` strings (as --set takes them) as override strings."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError("overrides: a str, not a dict or list", 'give {"distill.epochs": 3} or ["distill.epochs=3"]')
    if isinstance(overrides, Mapping):
        return [override(str(k), v) for k, v in overrides.items()]
    return [item if isinstance(item, str) else str(item) for item in overrides]  # an Override keeps its origin


def out_root(out: str | Path | None, recipe_out: str) -> Path:
    """The output root (`out`, else the recipe's), checked to be a directory that can be made."""
    what = "--out" if out is not None else "out (the recipe's output directory)"
    root = Path(out) if out is not None else Path(recipe_out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{what} {root}: is a file, not a directory", "give a directory (it is created if missing)")
    # the nearest existing ancestor decides whether the directory can be made (before any model loads)
    above = next((a for a in root.absolute().parents if a.exists()), None)
    if not root.exists() and above is not None and (not above.is_dir() or not os.access(above, os.W_OK | os.X_OK)):
        why = "is not a directory" if not above.is_dir() else "is not writable"
        raise ConfigError(f"{what} {root}: cannot be created: {above} {why}", "give a directory you can write to")
    return root


def _console(console: Console | None, quiet: bool) -> Console:
    from rich.console import Console

    return console if console is not None else Console(stderr=True, quiet=quiet)


def result_of(manifest: Manifest) -> StageResult:
    """A manifest as a StageResult, its record validated as the stage's record type."""
    from kdpipe.artifacts import records as r

    kinds: dict[str, type[Record]] = {
        "teacher": r.TeacherRecord,
        "student": r.StudentRecord,
        "distill": r.DistillRecord,
        "export": r.ExportRecord,
        "profile": r.ProfileRecord,
    }
    return StageResult(
        stage=manifest.stage,
        dir=manifest.dir,
        record=r.record(manifest, kinds[manifest.stage]),
        metrics=dict(manifest.metrics),
        manifest=manifest,
    )


def run(
    recipe: str | Path = "default",
    overrides: Overrides = None,
    out: str | Path | None = None,
    *,
    profile: str | None = None,
    force: bool = False,
    resume: bool = True,
    strict: bool = False,
    compare: str | Path | None = None,
    console: Console | None = None,
    quiet: bool = False,
) -> RunResult:
    """The whole chain teacher -> student -> distill -> export -> profile (`kdpipe run`). Stages whose config and
    inputs did not change are skipped. `strict`: raise BudgetError when the deployed variant misses a budget (the
    report is written first); `compare`: an older run to list regressions against."""
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.config import load_recipe
    from kdpipe.data.splits import check_source

    sets = overrides_list(overrides)
    if profile is not None:
        sets = [override("profile", profile, f"profile={profile}"), *sets]
    cfg, path = load_recipe(recipe, sets)
    check_source(cfg.teacher.data, finetune=cfg.teacher.finetune)  # data errors first, before torch loads
    root = out_root(out, cfg.out)
    from kdpipe.pipeline.runner import CHAIN, run_all  # imports torch: after the checks that need none

    con = _console(console, quiet)
    con.print(f"recipe {path} -> {root}")
    last = run_all(cfg, root, force=force, console=con, resume=resume)
    stages = {name: result_of(read_manifest(root / name, name)) for name in CHAIN[:-1]}
    stages["profile"] = result_of(last)
    return _finish(root, stages, last.dir, strict, compare)


def _finish(
    root: Path, stages: dict[str, StageResult], profile_dir: Path, strict: bool, compare: str | Path | None
) -> RunResult:
    from kdpipe.artifacts.records import ProfileRecord

    rec = stages["profile"].record
    assert isinstance(rec, ProfileRecord)
    regressions: list[str] = []
    if compare is not None:
        from kdpipe.profiling.compare import compare_runs

        regressions = compare_runs(Path(compare), profile_dir)
    result = RunResult(root, stages, profile_dir / "report.md", list(rec.misses), regressions)
    if strict:
        check_budgets(rec, profile_dir)
    return result


def check_budgets(rec: ProfileRecord, profile_dir: Path) -> None:
    """BudgetError when the deployed variant missed a budget of the profile (what --strict fails on)."""
    if rec.misses:
        raise BudgetError(
            f"{len(rec.misses)} budget(s) of profile {rec.profile} missed by {rec.deploy} (--strict)",
            f"see {profile_dir / 'report.md'}; change the recipe, or the profile's budgets",
        )


def stage(
    name: str,
    recipe: str | Path = "default",
    overrides: Overrides = None,
    out: str | Path | None = None,
    *,
    upstream: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    temperature: float | None = None,
    console: Console | None = None,
    quiet: bool = False,
) -> StageResult:
    """One stage (`kdpipe <name>`): teacher, student, distill, export or profile, from `upstream` (default
    <out>/<the stage before>). `temperature`: that of every loss term that has one (`kdpipe distill -T`)."""
    from kdpipe.config import load_recipe, with_temperature
    from kdpipe.data.splits import check_source

    cfg, _ = load_recipe(recipe, overrides_list(overrides))
    if temperature is not None:
        cfg = with_temperature(cfg, temperature)
    if name == "teacher":  # a bad data file fails in a second, before torch is imported or a model hashed
        check_source(cfg.teacher.data, finetune=cfg.teacher.finetune)
    root = out_root(out, cfg.out)
    from kdpipe.pipeline.runner import run_stage  # imports torch: after the checks that need none

    up = Path(upstream) if upstream is not None else None
    return result_of(run_stage(name, cfg, root, up, force, _console(console, quiet), resume))


def teacher(
    recipe: str | Path = "default", overrides: Overrides = None, out: str | Path | None = None, **kw: Any
) -> StageResult:
    """`kdpipe teacher`: read and split the data, fine-tune (or evaluate) the teacher. Keywords as `stage`."""
    return stage("teacher", recipe, overrides, out, **kw)


def student(
    recipe: str | Path = "default", overrides: Overrides = None, out: str | Path | None = None, **kw: Any
) -> StageResult:
    """`kdpipe student`: build the student from the teacher (keywords as `stage`; upstream: a teacher dir)."""
    return stage("student", recipe, overrides, out, **kw)


def distill(
    recipe: str | Path = "default", overrides: Overrides = None, out: str | Path | None = None, **kw: Any
) -> StageResult:
    """`kdpipe distill`: distil the teacher into the student (keywords as `stage`; upstream: a student dir)."""
    return stage("distill", recipe, overrides, out, **kw)


def export(
    recipe: str | Path = "default", overrides: Overrides = None, out: str | Path | None = None, **kw: Any
) -> StageResult:
    """`kdpipe export`: ONNX (and int8) with parity checks (keywords as `stage`; upstream: a distill dir)."""
    return stage("export", recipe, overrides, out, **kw)


def profile(
    recipe: str | Path = "default",
    overrides: Overrides = None,
    out: str | Path | None = None,
    *,
    target: str | None = None,
    strict: bool = False,
    compare: str | Path | None = None,
    **kw: Any,
) -> StageResult:
    """`kdpipe profile`: time every variant on the target profile (`target`, else the recipe's), check its budgets,
    write report.md / report.json. `strict` raises BudgetError on a missed budget (after the report is written)."""
    return profile_run(recipe, overrides, out, target=target, strict=strict, compare=compare, **kw)["profile"]


def profile_run(
    recipe: str | Path = "default",
    overrides: Overrides = None,
    out: str | Path | None = None,
    *,
    target: str | None = None,
    strict: bool = False,
    compare: str | Path | None = None,
    **kw: Any,
) -> RunResult:
    """`profile`, as a RunResult holding the profile stage alone (with its misses and regressions)."""
    sets = overrides_list(overrides)
    if target is not None:
        sets = [override("profile", target, f"profile={target}"), *sets]
    done = stage("profile", recipe, sets, out, **kw)
    return _finish(done.dir.parent, {"profile": done}, done.dir, strict, compare)
