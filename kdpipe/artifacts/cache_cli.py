"""`kdpipe cache ls | prune`: look into and trim the stage store (kdpipe.artifacts.store). Torch-free."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdpipe.artifacts import store
from kdpipe.errors import ConfigError, KdpipeError

cache_app = typer.Typer(
    help="The stage store: finished stages shared by every output root, so that a stage with the run id of one "
    "already finished elsewhere (a fine-tuned teacher) is reused, not run again. KDPIPE_STORE picks its directory "
    "(off: no store); the default is ~/.cache/kdpipe/stages.",
    no_args_is_help=True,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
MIB = 1 << 20


@contextmanager
def _guard() -> Iterator[None]:
    """One `error:` + `hint:` line pair and exit 1, as every kdpipe command."""
    try:
        yield
    except KdpipeError as e:
        err.print(Text.assemble(("error:", "bold red"), f" {e.message}"), soft_wrap=True)
        if e.hint:
            err.print(Text.assemble(("hint:", "bold"), f" {e.hint}"), soft_wrap=True)
        raise typer.Exit(1) from None


def _root() -> Path:
    root = store.store_root()
    if root is None:
        raise ConfigError(
            f"the stage store is off ({store.ENV}={os.environ.get(store.ENV, '')!r})",
            f"unset {store.ENV} for the default store, or set it to a directory",
        )
    return root


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


@cache_app.command("ls")
def ls() -> None:
    """List the stored stages, most recently used first."""
    with _guard():
        root = _root()
        found = store.entries(root)
        table = Table("stage", "run id", "size MiB", "created", "last used")
        for e in found:
            table.add_row(e.stage, e.run_id, _mib(e.bytes), e.created_at or "?", e.last_used_at)
        out.print(table)
        total = sum(e.bytes for e in found)
        out.print(f"{len(found)} stored stage(s), {_mib(total)} MiB in {root}", soft_wrap=True)


@cache_app.command("prune")
def prune(
    older_than: float | None = typer.Option(None, "--older-than", help="Remove stages last used over DAYS ago."),
    keep: int | None = typer.Option(None, "--keep", help="Keep the N most recently used stages, remove the rest."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    everything: bool = typer.Option(False, "--all", help="Remove every stored stage."),
) -> None:
    """Remove stored stages (given both --older-than and --keep: those that match both)."""
    with _guard():
        if everything and (older_than is not None or keep is not None):
            raise ConfigError("--all removes every stored stage", "give --all alone, or --older-than / --keep")
        if not everything and older_than is None and keep is None:
            raise ConfigError("kdpipe cache prune: say what to remove", "give --older-than DAYS, --keep N or --all")
        if (older_than is not None and older_than < 0) or (keep is not None and keep < 0):
            raise ConfigError("--older-than and --keep take a number >= 0", "e.g. --older-than 30 or --keep 5")
        root = _root()
        removed = store.prune(None if everything else older_than, 0 if everything else keep, dry_run, root)
        verb = "would remove" if dry_run else "removed"
        for e in removed:
            out.print(f"{verb} {e.stage} {e.run_id} ({_mib(e.bytes)} MiB)", soft_wrap=True)
        freed = sum(e.bytes for e in removed)
        what = "would be freed" if dry_run else "freed"
        out.print(f"{len(removed)} stored stage(s), {freed} bytes ({_mib(freed)} MiB) {what} in {root}", soft_wrap=True)
