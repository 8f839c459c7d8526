"""`kdpipe search`: the teacher once, every architecture's cost before training, then an Optuna study over the
survivors (TPE on which candidate to train next, successive halving on the distillation budget), in an RDB
storage (SQLite under <out>/search/ by default) so that a search killed at any point resumes where it was.

Layout of <out>: teacher/ (shared, the runner's own stage), search/{study.db, costs.json, cost/<arch>/,
trials/<candidate>/, report.md, report.json, pareto.png}, best -> search/trials/<best candidate>.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from kdpipe.artifacts.manifest import locked
from kdpipe.config import Recipe, TargetProfile, load_profile, load_recipe
from kdpipe.errors import BudgetError, ConfigError, KdpipeError
from kdpipe.search.costs import CostCache, over_budget, profile_hash, survivors
from kdpipe.search.space import Candidate, SearchSpace, candidates, fidelities
from kdpipe.search.trial import Setting, finish, measure_cost, teacher_layers, train_rung

SEARCH = "search"


@dataclass(frozen=True)
class Options:
    """The command line of `kdpipe search` (None: the recipe's `search:` section or its default)."""

    trials: int | None = None
    hours: float | None = None
    workers: int = 1
    storage: str | None = None
    strict: bool = False


@dataclass(frozen=True)
class Plan:
    """Everything a worker process needs to search one study (picklable: no console, no storage object)."""

    recipe: str
    sets: tuple[str, ...]
    root: str
    url: str
    study: str
    space: dict[str, Any]
    keep: tuple[str, ...]
    deadline: float
    teacher_dir: str
    teacher_layers: int
    profile: dict[str, Any]


def storage_url(root: Path, given: str | None) -> str:
    """The study's RDB URL: `given`, or SQLite in <out>/search/study.db."""
    return given or f"sqlite:///{(root / SEARCH / 'study.db').resolve()}"


def open_storage(url: str, flag: str = "--storage") -> Any:
    """An Optuna RDB storage for `url`, or one ConfigError line naming it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # sqlalchemy's errors for a bad URL, a missing driver, an unreachable server
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"{flag} {url}: cannot be opened ({first})",
            "give an SQLAlchemy URL that exists, e.g. sqlite:///runs/search.db or postgresql://user@host/db",
        ) from None


def _study_name(cfg: Recipe, space: SearchSpace, prof: TargetProfile) -> str:
    """The same inputs name the same study (so a second search resumes it); any change starts a new one."""
    import hashlib

    data = {
        "recipe": {k: getattr(cfg, k).model_dump(mode="json") for k in ("teacher", "student", "distill", "export")},
        "space": space.model_dump(mode="json", exclude={"trials"}),
        "profile": [prof.name, profile_hash(prof), prof.budgets.model_dump(mode="json")],
        "seed": cfg.seed,
    }
    return "kdpipe-" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _check_workers(workers: int) -> None:
    cores = os.cpu_count() or 1
    if not 1 <= workers <= cores:
        raise ConfigError(
            f"--workers {workers}: this machine has {cores} CPU cores",
            f"give --workers from 1 to {cores} (each worker trains one candidate at a time)",
        )


def prepare(recipe: str, sets: list[str], root: Path, opts: Options) -> tuple[Recipe, SearchSpace, TargetProfile, str]:
    """Every check that needs no model: the recipe and its `search:`, the profile and its budgets, --workers,
    --trials / --hours and the storage URL. Returns (recipe, space, profile, storage url)."""
    cfg, _ = load_recipe(recipe, sets)
    space = cfg.search_space()
    if opts.trials is not None:
        space = space.model_copy(update={"trials": opts.trials})
    prof = load_profile(cfg.profile)
    b = prof.budgets
    if all(getattr(b, n, None) is None for n in ("p50_ms", "p99_ms", "model_mib", "peak_rss_mib")):
        raise ConfigError(
            f"profile {prof.name}: sets no latency or size budget, so a search has nothing to meet",
            "use a profile with budgets (e.g. --profile edge) or add budgets: {p50_ms: 5, model_mib: 12} to it",
        )
    if opts.hours is not None and not (math.isfinite(opts.hours) and opts.hours > 0):
        raise ConfigError(f"--hours {opts.hours}: not a positive number of hours", "give e.g. --hours 2")
    _check_workers(opts.workers)
    url = storage_url(root, opts.storage)
    if opts.storage is None:
        (root / SEARCH).mkdir(parents=True, exist_ok=True)
    open_storage(url)
    return cfg, space, prof, url


def _teacher(cfg: Recipe, root: Path, console: Console) -> Any:
    from kdpipe.pipeline.runner import STAGES, context, execute
    from kdpipe.pipeline.validate import check_recipe

    check_recipe(cfg)
    manifest, _ = execute(STAGES["teacher"], cfg.teacher, context(cfg, console), root)
    return manifest


def _costs(
    setting: Setting, cands: list[Candidate], root: Path, prof: TargetProfile
) -> tuple[list[Candidate], list[tuple[Candidate, list[str]]], dict[str, dict[str, float]]]:
    """The survivors of the cost filter, the dropped candidates with their misses, and every measurement."""
    cache = CostCache(root / SEARCH / "costs.json", prof)
    measured: dict[str, dict[str, float]] = {}

    def measure(c: Candidate) -> dict[str, float]:
        setting.console.print(f"[bold]cost[/] {_label(c)}: untrained, exported and timed")
        return measure_cost(setting, c, root / SEARCH / "cost" / c.arch_key())

    kept, dropped = survivors(cands, measure, prof.budgets, cache)
    for c in cands:
        measured[c.arch_key()] = cache.get(c.arch_key()) or {}
    return kept, dropped, measured


def _label(c: Candidate) -> str:
    return f"{c.layers} layers, heads -{100 * c.heads:g}%, FFN -{100 * c.ffn:g}%, {c.precision}, {c.epochs:g} epochs"


def run_search(recipe: str, sets: list[str], root: Path, opts: Options, console: Console) -> dict[str, Any]:
    """The whole search (see the module); returns the report's data. --strict: BudgetError when no candidate
    meets every budget, naming the closest."""
    from kdpipe.search.report import write_report

    cfg, space, prof, url = prepare(recipe, sets, root, opts)
    started = time.time()
    with locked(root / SEARCH):  # one search per output root; a RUNNING trial found now was killed
        teacher = _teacher(cfg, root, console)
        layers = teacher_layers(teacher)
        cands = candidates(space, layers, note=lambda t: console.print(f"[yellow]note[/] {t}"))
        setting = Setting(recipe, tuple(sets), teacher.dir, layers, prof, console)
        kept, dropped, measured = _costs(setting, cands, root, prof)
        for c, misses in dropped:
            console.print(f"[yellow]over budget before training[/] {_label(c)}: {'; '.join(misses)}")
        if not kept:
            raise BudgetError(*_nothing_fits(cands, measured, prof))
        plan = Plan(
            recipe=recipe,
            sets=tuple(sets),
            root=str(root),
            url=url,
            study=_study_name(cfg, space, prof),
            space=space.model_dump(mode="json"),
            keep=tuple(c.key() for c in kept),
            deadline=started + opts.hours * 3600 if opts.hours else math.inf,
            teacher_dir=str(teacher.dir),
            teacher_layers=layers,
            profile=prof.model_dump(mode="json"),
        )
        _recover(plan)
        _run_workers(plan, opts.workers, console)
        data = write_report(
            root, plan, cands, measured, dropped, teacher, time.time() - started, finished(_study(plan))
        )
    if opts.strict and data["best"] is None:
        raise BudgetError(
            f"no searched candidate meets every budget of profile {prof.name}; closest: {data['closest']}",
            "widen the search space (search: in the recipe), raise --trials, or relax the profile's budgets",
        )
    return data


def _nothing_fits(
    cands: list[Candidate], measured: dict[str, dict[str, float]], prof: TargetProfile
) -> tuple[str, str]:
    from kdpipe.search.pareto import Point, closest

    points = [Point(c.key(), math.nan, math.nan, False, figures=measured.get(c.arch_key(), {})) for c in cands]
    near = closest(points, prof.budgets)
    assert near is not None  # `cands` is never empty (kdpipe.search.space.candidates)
    by_key = {c.key(): c for c in cands}
    what = f"{_label(by_key[near.key])}: {'; '.join(over_budget(measured[by_key[near.key].arch_key()], prof.budgets))}"
    return (
        f"every candidate of the search space misses a cost budget of profile {prof.name} before training; "
        f"closest: {what}",
        "add smaller students to search: (fewer layers, more heads / FFN removed, int8), or relax the budgets",
    )


def _study(plan: Plan) -> Any:
    import optuna

    space = SearchSpace.model_validate(plan.space)
    return optuna.create_study(
        study_name=plan.study,
        storage=open_storage(plan.url),
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=space.seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=space.reduction),
    )


def _recover(plan: Plan) -> None:
    """Trials left RUNNING by a search that was killed (we hold the search lock, so none is alive) are marked
    FAIL and their candidate queued again: its finished stages are skipped and its training resumes from its
    checkpoints. When the budget allows every survivor, the untried ones are queued too (no repeats)."""
    from optuna.trial import TrialState

    study = _study(plan)
    queued: list[str] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (the search was killed)")  # noqa: SLF001
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)  # noqa: SLF001
        key = candidate_of(t)
        if key is not None:  # None: killed before it was given a candidate; nothing of it to resume
            queued.append(key)
    space = SearchSpace.model_validate(plan.space)
    tried = {candidate_of(t) for t in study.get_trials(deepcopy=False)} - set(queued)
    waiting = {candidate_of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    if space.trials >= len(plan.keep):
        queued += [k for k in plan.keep if k not in tried and k not in queued]
    for key in queued:
        if key not in waiting:
            study.enqueue_trial({"candidate": key})


def candidate_of(trial: Any) -> str | None:
    """A trial's candidate key: its parameter once suggested, else the one it was enqueued with (a WAITING trial,
    or one killed between leaving the queue and its first suggest), else None."""
    key = trial.params.get("candidate") or trial.system_attrs.get("fixed_params", {}).get("candidate")
    return None if key is None else str(key)


def finished(study: Any) -> dict[str, Any]:
    """Candidate key -> its finished trial (complete, pruned or failed and not interrupted); the latest wins."""
    from optuna.trial import TrialState

    out: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        ended = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        failed = t.state == TrialState.FAIL and "interrupted" not in str(t.user_attrs.get("error", ""))
        if (ended or failed) and "candidate" in t.params and not t.user_attrs.get("duplicate"):
            out[t.params["candidate"]] = t
    return out


def _run_workers(plan: Plan, workers: int, console: Console) -> None:
    if workers == 1:
        search_worker(plan, console)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=search_worker, args=(plan,)) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if bad := [p.exitcode for p in procs if p.exitcode]:
        console.print(f"[yellow]{len(bad)} search worker(s) exited with {bad}[/]; the report has what finished")


def search_worker(plan: Plan, console: Console | None = None) -> None:
    """Train candidates until the study holds `trials` finished ones, every survivor is done or time is up."""
    console = console or Console(stderr=True)
    space = SearchSpace.model_validate(plan.space)
    study = _study(plan)
    for _ in range(4 * space.trials + len(plan.keep)):  # duplicates the sampler proposes are bounded too
        done = finished(study)
        if len(done) >= min(space.trials, len(plan.keep)) or time.time() > plan.deadline:
            return
        study.optimize(_objective(plan, console), n_trials=1, catch=(KdpipeError,))


def _objective(plan: Plan, console: Console) -> Any:
    import optuna

    space = SearchSpace.model_validate(plan.space)
    prof = TargetProfile.model_validate(plan.profile)
    setting = Setting(plan.recipe, plan.sets, Path(plan.teacher_dir), plan.teacher_layers, prof, console)
    by_key = {c.key(): c for c in candidates(space, plan.teacher_layers, note=lambda _: None)}

    def objective(trial: optuna.Trial) -> float:
        key = trial.suggest_categorical("candidate", list(plan.keep))
        if key in finished(trial.study):
            trial.set_user_attr("duplicate", True)
            raise optuna.TrialPruned("already trained")
        c = by_key[key]
        root = Path(plan.root) / SEARCH / "trials" / key
        trial.set_user_attr("root", os.path.relpath(root, Path(plan.root)))
        try:
            return _train(trial, setting, c, space, root)
        except KdpipeError as e:
            trial.set_user_attr("error", e.message.splitlines()[0])
            console.print(f"[red]failed[/] {_label(c)}: {e.message.splitlines()[0]}")
            raise

    return objective


def _train(trial: Any, setting: Setting, c: Candidate, space: SearchSpace, root: Path) -> float:
    import optuna

    rungs = fidelities(c, space)
    accuracies: list[float] = []
    for r, epochs in enumerate(rungs):
        setting.console.print(f"[bold]train[/] {_label(c)}: rung {r + 1}/{len(rungs)} ({epochs:.3g} epochs)")
        accuracies.append(train_rung(setting, c, epochs, root))
        trial.set_user_attr("rungs", [[e, a] for e, a in zip(rungs, accuracies, strict=False)])
        trial.report(accuracies[-1], step=space.reduction**r)
        if r < len(rungs) - 1 and trial.should_prune():
            setting.console.print(f"[yellow]pruned[/] {_label(c)} after {epochs:.3g} epochs ({accuracies[-1]:.4f})")
            raise optuna.TrialPruned(f"accuracy {accuracies[-1]:.4f} after {epochs:.3g} epochs")
    figs, misses = finish(setting, c, root)
    trial.set_user_attr("figures", figs)
    trial.set_user_attr("misses", misses)
    return float(figs.get("accuracy", math.nan))
