"""The stage table and the runner that skips, re-runs and writes stages atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from kdpipe.artifacts import (
    MANIFEST,
    FileRecord,
    Manifest,
    Metric,
    atomic_dir,
    describe_changes,
    input_records,
    list_outputs,
    locked,
    now,
    read_manifest,
    run_id,
    verify_outputs,
    write_json_atomic,
)
from kdpipe.config import Recipe, check_recipe, config_hash
from kdpipe.env import environment
from kdpipe.errors import ArtifactError


@dataclass
class StageOutput:
    metrics: dict[str, Metric] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: str | None
    config: Callable[[Recipe], dict[str, Any]]
    inputs: Callable[[Recipe, Manifest | None], list[FileRecord]]
    run: Callable[[Recipe, Manifest | None, Path, Console], StageOutput]
    summary: str
    kind: str | None = None  # the artifact kind its manifest records (default: its name)


def upstream_inputs(_: Recipe, upstream: Manifest | None) -> list[FileRecord]:
    """A downstream stage's inputs: the upstream's recorded (and just verified) outputs."""
    if upstream is None:
        return []
    return [FileRecord(f"{upstream.stage}/{r.path}", r.sha256, r.bytes) for r in upstream.outputs]


def student_inputs(recipe: Recipe, upstream: Manifest | None) -> list[FileRecord]:
    """The teacher artifact, and the files of `student.pretrained` by content."""
    records = upstream_inputs(recipe, upstream)
    if recipe.student.pretrained is not None:
        from kdpipe.models import resolve_model_dir

        pretrained = resolve_model_dir(recipe.student.pretrained, "student.pretrained")
        records += input_records(pretrained, "pretrained")
    return records


def distill_inputs(recipe: Recipe, upstream: Manifest | None) -> list[FileRecord]:
    """The student artifact, the transfer file and every extra teacher's files, by content."""
    from kdpipe.data import read_transfer
    from kdpipe.models import resolve_model_dir

    records = upstream_inputs(recipe, upstream)
    cfg = recipe.distill
    if cfg.transfer is not None:
        read_transfer(Path(cfg.transfer))  # a missing or empty file: one clear error, before hashing
        records += input_records(Path(cfg.transfer), "transfer")
    for i, member in enumerate(cfg.extra_teachers):
        records += input_records(resolve_model_dir(member, f"distill.extra_teachers[{i}]"), f"extra_teacher_{i}")
    return records


def assistant_inputs(recipe: Recipe, upstream: Manifest | None) -> list[FileRecord]:
    """What the assistant's own student and distill stages read."""
    records = distill_inputs(recipe, upstream)
    if recipe.assistant is not None and recipe.assistant.pretrained is not None:
        from kdpipe.models import resolve_model_dir

        pretrained = resolve_model_dir(recipe.assistant.pretrained, "assistant.pretrained")
        records += input_records(pretrained, "pretrained")
    return records


def _lineage(upstream: Manifest | None, final: Path) -> dict[str, str]:
    if upstream is None:
        return {}
    dirs = {upstream.stage: upstream.dir.resolve()}
    for stage, rel in upstream.lineage.items():
        # the nearest artifact of a kind wins: behind a teaching assistant, "teacher" is the assistant
        dirs.setdefault(stage, (upstream.dir / rel).resolve())
    return {s: os.path.relpath(d, final.resolve()) for s, d in dirs.items()}


def execute(
    spec: StageSpec,
    recipe: Recipe,
    out_root: Path,
    upstream_dir: Path | None = None,
    force: bool = False,
    console: Console | None = None,
) -> tuple[Manifest, bool]:
    """Run one stage unless an identical run is already on disk. Returns (manifest, ran)."""
    console = console or Console(stderr=True)
    with locked(out_root):
        return _execute(spec, recipe, out_root, upstream_dir, force, console)


def _execute(
    spec: StageSpec, recipe: Recipe, out_root: Path, upstream_dir: Path | None, force: bool, console: Console
) -> tuple[Manifest, bool]:
    upstream = None
    if spec.upstream is not None:
        upstream = read_manifest(upstream_dir or out_root / spec.upstream, spec.upstream)
    cfg = spec.config(recipe)
    chash = config_hash(cfg)
    inputs = spec.inputs(recipe, upstream)
    up_ids = [upstream.run_id] if upstream else []
    rid = run_id(spec.name, chash, inputs, up_ids)
    final = out_root / spec.name

    if (final / MANIFEST).is_file():
        try:
            old = Manifest.from_file(final / MANIFEST)
        except ArtifactError:
            old = None
        if old is not None and old.run_id == rid and not force:
            problems = verify_outputs(old)
            if not problems:
                console.print(f"[green]skipped[/] {spec.name}: up to date (run_id {rid}) in {final}")
                return old, False
            console.print(f"[yellow]re-running[/] {spec.name}: {problems[0]}")
        elif old is not None and not force:
            changes = describe_changes(old.config, cfg)
            why = "; ".join(changes[:4]) if changes else "its inputs changed"
            console.print(f"[yellow]re-running[/] {spec.name}: {why}")
    console.rule(f"[bold]{spec.name}[/]: {spec.summary}")

    with atomic_dir(final) as work:
        out = spec.run(recipe, upstream, work, console)
        manifest = Manifest(
            stage=spec.kind or spec.name,
            run_id=rid,
            config=cfg,
            config_hash=chash,
            inputs=sorted(inputs, key=lambda r: r.path),
            outputs=list_outputs(work),
            environment=environment(),
            metrics=out.metrics,
            lineage=_lineage(upstream, final),
            extra=out.extra,
            created_at=now(),
        )
        write_json_atomic(work / MANIFEST, manifest.to_json())  # last: it marks the stage finished
    manifest.dir = final
    console.print(f"[green]done[/] {spec.name} -> {final}")
    return manifest, True


def _stages() -> dict[str, StageSpec]:
    from kdpipe import assistant, distill, export, profile, student, teacher

    specs = [
        StageSpec(
            "assistant",
            "teacher",
            assistant.stage_config,
            assistant_inputs,
            assistant.run_assistant,
            "distil a teaching assistant from the teacher",
            kind="teacher",
        ),
        StageSpec(
            "teacher",
            None,
            teacher.stage_config,
            teacher.inputs,
            teacher.run_teacher,
            "fine-tune / evaluate the teacher",
        ),
        StageSpec(
            "student",
            "teacher",
            lambda r: {"seed": r.seed, **r.student.model_dump(mode="json")},
            student_inputs,
            student.run_student,
            "build the student from the teacher",
        ),
        StageSpec(
            "distill",
            "student",
            lambda r: {"seed": r.seed, **r.distill.model_dump(mode="json")},
            distill_inputs,
            distill.run_distill,
            "distil the teacher into the student",
        ),
        StageSpec(
            "export",
            "distill",
            lambda r: r.export.model_dump(mode="json"),
            upstream_inputs,
            export.run_export,
            "export to ONNX and check parity",
        ),
        StageSpec(
            "profile",
            "export",
            profile.stage_config,
            upstream_inputs,
            profile.run_profile,
            "onnxruntime latency and the report",
        ),
    ]
    return {s.name: s for s in specs}


STAGE_NAMES = ("teacher", "student", "distill", "export", "profile")


def stage(name: str) -> StageSpec:
    return _stages()[name]


def run_all(recipe: Recipe, out_root: Path, force: bool = False, console: Console | None = None) -> Manifest:
    """The whole chain; with a teaching assistant: teacher -> assistant -> student -> ..."""
    with locked(out_root):
        return _run_all(recipe, out_root, force, console)


def _run_all(recipe: Recipe, out_root: Path, force: bool, console: Console | None) -> Manifest:
    check_recipe(recipe)  # every cross-check that needs no model, before the teacher trains
    manifest, _ = execute(stage("teacher"), recipe, out_root, force=force, console=console)
    names = list(STAGE_NAMES[1:])
    if recipe.assistant is not None:
        execute(stage("assistant"), recipe, out_root, force=force, console=console)
    for name in names:
        upstream_dir = out_root / "assistant" if name == "student" and recipe.assistant is not None else None
        manifest, _ = execute(stage(name), recipe, out_root, upstream_dir=upstream_dir, force=force, console=console)
    return manifest
