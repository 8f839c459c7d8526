"""The STAGES table and the runner that skips, re-runs and writes stages atomically.

A stage is a plain function in its own module, `run_<stage>(cfg, upstream, out, ctx) -> StageOutput`, declared
there as a `StageSpec`; this module lists them and owns run ids, skips, lineage and the manifest. Stages never
import this module.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from kdpipe.artifacts import store
from kdpipe.artifacts.manifest import (
    MANIFEST,
    Manifest,
    atomic_dir,
    describe_changes,
    list_outputs,
    locked,
    now,
    read_manifest,
    run_id,
    verify_outputs,
    write_json_atomic,
)
from kdpipe.artifacts.records import RunContext, StageSpec
from kdpipe.config import Recipe, config_hash, load_profile
from kdpipe.env import environment
from kdpipe.errors import ArtifactError, ConfigError
from kdpipe.pipeline import assistant, distill, export, profile, student, teacher
from kdpipe.pipeline.validate import check_recipe
from kdpipe.reporting.card import write_cards
from kdpipe.tasks.registry import task_of
from kdpipe.train import distributed

STAGES: dict[str, StageSpec[Any]] = {
    s.name: s for s in (teacher.STAGE, assistant.STAGE, student.STAGE, distill.STAGE, export.STAGE, profile.STAGE)
}
CHAIN = ("teacher", "student", "distill", "export", "profile")  # what `kdpipe run` runs, in order


def context(recipe: Recipe, console: Console | None = None, resume: bool = False) -> RunContext:
    """The recipe's seed and target profile, resolved once for every stage of a command."""
    if not distributed.world().main:
        console = Console(stderr=True, quiet=True)  # under torchrun, rank 0 speaks for every process
    return RunContext(
        seed=recipe.seed, console=console or Console(stderr=True), profile=load_profile(recipe.profile), resume=resume
    )


def _lineage(upstream: Manifest | None, final: Path, own: str) -> dict[str, str]:
    """Stage kind -> directory relative to `final`: the upstream and, behind it, its own lineage (the nearest
    artifact of a kind wins: behind a teaching assistant, "teacher" is the assistant)."""
    if upstream is None:
        return {}
    dirs = {upstream.stage: upstream.dir.resolve()}
    for stage_name, rel in upstream.lineage.items():
        dirs.setdefault(stage_name, (upstream.dir / rel).resolve())
    dirs.pop(own, None)  # a stage is not in its own lineage (the assistant chain's student is not this student)
    return {s: os.path.relpath(d, final.resolve()) for s, d in dirs.items()}


def execute(
    spec: StageSpec[Any],
    cfg: Any,
    ctx: RunContext,
    out_root: Path,
    upstream_dir: Path | None = None,
    force: bool = False,
    dir_name: str | None = None,
) -> tuple[Manifest, bool]:
    """Run one stage into `<out_root>/<dir_name or spec.name>` unless an identical run is already there.
    Returns (manifest, ran). Under torchrun only rank 0 writes; the other processes run the stage alongside it
    (their training is the same DDP run) into a scratch directory, then read rank 0's manifest."""
    if not distributed.world().main:
        return _follow(spec, cfg, ctx, out_root, upstream_dir, force, dir_name)
    with locked(out_root):
        upstream = None
        if spec.upstream is not None:
            upstream = read_manifest(upstream_dir or out_root / spec.upstream, spec.upstream)
        final = out_root / (dir_name or spec.name)
        identity = spec.identity(cfg, ctx)
        chash = config_hash(identity)
        inputs = spec.inputs(cfg, upstream)
        rid = run_id(spec.name, chash, inputs, [upstream.run_id] if upstream else [])
        old = _reuse(spec, final, rid, identity, upstream, force, ctx)
        if old is not None:
            return old, False
        ctx.console.rule(f"[bold]{final.name}[/]: {spec.summary}")
        checkpoints = _checkpoint_dir(out_root, final, rid, ctx)
        ctx = replace(ctx, checkpoints=checkpoints, cache_root=out_root / "cache")
        distributed.barrier()  # the followers start once the checkpoint directory is settled
        with atomic_dir(final) as work:
            out = spec.run(cfg, upstream, work, ctx)
            manifest = Manifest(
                stage=spec.kind or spec.name,
                run_id=rid,
                config=identity,
                config_hash=chash,
                inputs=sorted(inputs, key=lambda r: r.path),
                outputs=[],
                environment=environment(),
                metrics=out.metrics,
                lineage=_lineage(upstream, final, spec.name),
                record=out.record.model_dump(mode="json"),
                created_at=now(),
            )
            _write_cards(manifest, work, final.name)  # before the outputs are listed: each card is a hashed output
            manifest.outputs = list_outputs(work)
            write_json_atomic(work / MANIFEST, manifest.to_json())  # last: it marks the stage finished
        manifest.dir = final
        if spec.name not in UNSTORED:
            store.publish(manifest, final, ctx.console)  # for every output root with this very run
        shutil.rmtree(checkpoints, ignore_errors=True)  # finished: nothing left to resume
        distributed.barrier()  # the followers read the manifest once it is in place
        ctx.console.print(f"[green]done[/] {final.name} -> {final}")
        return manifest, True


def _write_cards(manifest: Manifest, work: Path, name: str) -> None:
    """A model card (README.md) in every model directory the stage wrote, from its task's card hints."""
    manifest.dir = work  # a sibling of the final directory, so its lineage's relative paths hold from here
    write_cards(manifest, name, task_of(manifest).card_hints())


UNSTORED = frozenset({"profile"})  # a measurement of this machine at this moment: never shared nor reused


def _reuse(
    spec: StageSpec[Any],
    final: Path,
    rid: str,
    identity: dict[str, Any],
    upstream: Manifest | None,
    force: bool,
    ctx: RunContext,
) -> Manifest | None:
    """This very run, finished: the one on disk (published to the stage store when it is not there yet), or the
    store's copy materialised at `final`; None when the stage must run. `--force`, the profile stage and a torchrun
    run (its followers decide from `final` alone) never reuse from the store."""
    shared = spec.name not in UNSTORED
    old = _up_to_date(final, rid, identity, force, ctx.console)
    if old is not None:
        if shared:
            store.publish(old, final, ctx.console)
        return old
    if force or not shared or distributed.world().distributed:
        return None
    got = store.fetch(spec.kind or spec.name, rid, final, _lineage(upstream, final, spec.name), ctx.console)
    if got is not None:
        ctx.console.print(f"[green]reused[/] {final.name}: from the stage store (run_id {rid})")
    return got


def _follow(
    spec: StageSpec[Any],
    cfg: Any,
    ctx: RunContext,
    out_root: Path,
    upstream_dir: Path | None,
    force: bool,
    dir_name: str | None,
) -> tuple[Manifest, bool]:
    """A torchrun process other than rank 0: the same decision as rank 0 (skip or run, read-only), the stage run
    into a scratch directory that is thrown away, then rank 0's manifest."""
    upstream = None
    if spec.upstream is not None:
        upstream = read_manifest(upstream_dir or out_root / spec.upstream, spec.upstream)
    final = out_root / (dir_name or spec.name)
    identity = spec.identity(cfg, ctx)
    inputs = spec.inputs(cfg, upstream)
    rid = run_id(spec.name, config_hash(identity), inputs, [upstream.run_id] if upstream else [])
    old = _up_to_date(final, rid, identity, force, ctx.console)
    if old is not None:
        return old, False
    distributed.barrier()
    ctx = replace(ctx, checkpoints=out_root / CHECKPOINTS / final.name, cache_root=out_root / "cache")
    scratch = Path(distributed.scratch())
    try:
        spec.run(cfg, upstream, scratch, ctx)
    finally:
        distributed.remove(str(scratch))
    distributed.barrier()
    return read_manifest(final, spec.kind or spec.name), True


CHECKPOINTS = ".checkpoints"


def _checkpoint_dir(out_root: Path, final: Path, rid: str, ctx: RunContext) -> Path:
    """<out>/.checkpoints/<stage>/: kept for this very run when resuming, cleared otherwise (saying so)."""
    d = out_root / CHECKPOINTS / final.name
    marker = d / "run_id"
    for p in (d.parent, d):
        if p.is_symlink() or (p.exists() and not p.is_dir()):  # not ours as it stands: never follow or resume it
            ctx.console.print(f"[yellow]removed[/] {p}: not a checkpoint directory")
            p.unlink()
    if d.exists():
        same = _marker(marker) == rid
        found = sorted(p.stem for p in d.glob("*.pt"))
        if same and ctx.resume and found:
            ctx.console.print(f"[yellow]resuming[/] {final.name} from its checkpoints ({', '.join(found)})")
            return d
        if found:
            why = "pass --resume to continue from them" if same else "they belong to another configuration"
            ctx.console.print(f"[yellow]starting {final.name} over[/]: an interrupted run left checkpoints ({why})")
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    marker.write_text(rid + "\n", encoding="utf-8")
    return d


def _marker(path: Path) -> str | None:
    """The run id a checkpoint directory records; None when it is missing or not a run id (damaged: start over)."""
    try:
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _up_to_date(final: Path, rid: str, identity: dict[str, Any], force: bool, console: Console) -> Manifest | None:
    """The manifest on disk when it is this very run with its files intact; otherwise None, saying why."""
    if not (final / MANIFEST).is_file():
        return None
    try:
        old = Manifest.from_file(final / MANIFEST)
    except ArtifactError:
        return None
    if force:
        return None
    if old.run_id == rid:
        problems = verify_outputs(old)
        if not problems:
            console.print(f"[green]skipped[/] {final.name}: up to date (run_id {rid}) in {final}")
            return old
        console.print(f"[yellow]re-running[/] {final.name}: {problems[0]}")
        return None
    changes = describe_changes(old.config, identity)
    console.print(f"[yellow]re-running[/] {final.name}: {'; '.join(changes[:4]) if changes else 'its inputs changed'}")
    return None


def run_stage(
    name: str,
    recipe: Recipe,
    out_root: Path,
    upstream_dir: Path | None,
    force: bool,
    console: Console,
    resume: bool = False,
) -> Manifest:
    """One stage of the chain from a recipe (what `kdpipe <stage>` runs)."""
    spec = STAGES[name]
    ctx = context(recipe, console, resume)
    manifest, _ = execute(spec, spec.section(recipe, ctx), ctx, out_root, upstream_dir, force)
    return manifest


def run_all(
    recipe: Recipe, out_root: Path, force: bool = False, console: Console | None = None, resume: bool = True
) -> Manifest:
    """The whole chain; with a teaching assistant: teacher -> assistant (student, distill, promote) -> student ...
    An interrupted stage continues from its checkpoints unless `resume` is False."""
    check_recipe(recipe)  # every cross-check that needs no model, before the teacher trains (or out is made)
    if distributed.world().distributed:
        raise ConfigError(
            "kdpipe run: the whole chain runs in one process",
            "run the chain once, then distil on N processes with `kdpipe distill --nproc N` (or under torchrun)",
        )
    with locked(out_root):
        ctx = context(recipe, console, resume)
        manifest, _ = execute(STAGES["teacher"], recipe.teacher, ctx, out_root, force=force)
        if recipe.assistant is not None:
            manifest = _assistant_chain(recipe, ctx, out_root, manifest.dir, force)
        for name in CHAIN[1:]:
            spec = STAGES[name]
            upstream = manifest.dir if name == "student" else None
            manifest, _ = execute(spec, spec.section(recipe, ctx), ctx, out_root, upstream, force)
        return manifest


def _assistant_chain(recipe: Recipe, ctx: RunContext, out_root: Path, teacher_dir: Path, force: bool) -> Manifest:
    """A student of the assistant's size, distilled from the teacher with the recipe's terms (no baseline), then
    promoted to a teacher-kind artifact `<out>/assistant` that the student stage takes as its teacher."""
    assert recipe.assistant is not None
    built, _ = execute(
        STAGES["student"], recipe.assistant, ctx, out_root, teacher_dir, force, dir_name="assistant-student"
    )
    cfg = recipe.distill.model_copy(update={"baseline": False})
    distilled, _ = execute(STAGES["distill"], cfg, ctx, out_root, built.dir, force, dir_name="assistant-distill")
    promoted, _ = execute(STAGES["assistant"], recipe.assistant, ctx, out_root, distilled.dir, force)
    return promoted
