"""The stage store: finished stages shared by every output root, addressed by their stage kind and run id.

A run id is content-addressed (the stage's config, its input files, its upstream run ids), so a stage of one output
root with the run id of a stage already finished elsewhere is that very stage. After a stage finishes, the runner
publishes a copy of it to `<store>/<kind>/<run id>/` (hard links where the file system allows, copies otherwise);
before a stage runs, it asks the store for its run id and, when the stored copy verifies, materialises it in the
output root instead of running it (a fine-tuned teacher is reused, not trained again).

The store is an optimisation: every failure of it (a full disk, a directory that is not writable) is one warning,
never an error, and a stored copy whose bytes changed is removed and never reused. `KDPIPE_STORE` picks it (a
directory; "off", "0" or "" turn it off); the default is `$XDG_CACHE_HOME/kdpipe/stages` (~/.cache/kdpipe/stages).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.artifacts.manifest import MANIFEST, Manifest, atomic_dir, verify_outputs, write_json_atomic
from kdpipe.errors import KdpipeError
from kdpipe.files import pid_alive

if TYPE_CHECKING:
    from rich.console import Console

ENV = "KDPIPE_STORE"
OFF = ("", "off", "0")
LAST_USED = ".last_used"  # its mtime: when a run last reused the entry
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a stage kind or a run id: never a path


class StoreWarning(UserWarning):
    """The stage store could not be used; the run goes on without it."""


@dataclass(frozen=True)
class Entry:
    """One stored stage."""

    stage: str
    run_id: str
    path: Path
    bytes: int
    created_at: str  # when the stage finished (its manifest's created_at)
    last_used: float  # epoch seconds: the last reuse, or when it was stored

    @property
    def last_used_at(self) -> str:
        return _dt.datetime.fromtimestamp(self.last_used, _dt.timezone.utc).isoformat(timespec="seconds")


def store_root() -> Path | None:
    """The store's directory; None when `KDPIPE_STORE` turns it off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "kdpipe" / "stages"


_warned: list[str] = []  # the first warning of this process (the store speaks once)


def _warn(what: str, e: BaseException, console: Console | None) -> None:
    if _warned:
        return
    why = e.strerror if isinstance(e, OSError) and e.strerror else (getattr(e, "message", None) or str(e))
    text = f"stage store: {what} ({why}); going on without it (KDPIPE_STORE=off turns it off)"
    _warned.append(text)
    if console is None:
        warnings.warn(text, StoreWarning, stacklevel=3)
    else:
        from rich.markup import escape

        console.print(f"[yellow]warning[/] {escape(text)}")


def _entry_dir(root: Path, kind: str, rid: str) -> Path | None:
    return root / kind / rid if _NAME.match(kind) and _NAME.match(rid) else None


def _link(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src`; a copy where a link cannot be made (another file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _clear_stale(parent: Path, name: str) -> None:
    """Temporary directories of publishers and pruners that died before cleaning up."""
    for stale in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
        tail = stale.name.rsplit("-", 1)[-1]
        if not tail.isdigit() or (int(tail) != os.getpid() and not pid_alive(int(tail))):
            shutil.rmtree(stale, ignore_errors=True)


def publish(manifest: Manifest, final: Path, console: Console | None = None) -> None:
    """Put a copy of the finished stage at `final` into the store, unless the store has it already. Built in a
    temporary sibling and renamed into place, so a reader never sees half an entry; a publisher that loses the
    race to another deletes its own copy. Never raises for the store's sake: it warns once and goes on."""
    root = store_root()
    entry = None if root is None else _entry_dir(root, manifest.stage, manifest.run_id)
    if entry is None:
        return
    try:
        if (entry / MANIFEST).is_file():
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(entry.parent, entry.name)
        if entry.exists():  # a directory without a manifest is not an entry: never reused, replaced
            shutil.rmtree(entry)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for rec in manifest.outputs:
                _link(final / rec.path, tmp / rec.path)
            (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            (tmp / LAST_USED).touch()
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (OSError, KdpipeError) as e:
        if not (entry / MANIFEST).is_file():  # else: another publisher stored the same run first
            _warn(f"cannot store {manifest.stage} {manifest.run_id} in {entry.parent}", e, console)


def _verified(entry: Path, kind: str, rid: str, console: Console | None) -> Manifest | None:
    """The stored manifest when it reads and every output's bytes are intact; otherwise the entry is removed."""
    try:
        stored: Manifest | None = Manifest.from_file(entry / MANIFEST)
    except KdpipeError:
        stored = None
    if stored is None or stored.stage != kind or stored.run_id != rid:
        problems = [f"{entry / MANIFEST} is not the manifest of {kind} {rid}"]
    else:
        problems = verify_outputs(stored)
    if not problems:
        return stored
    if console is not None:
        from rich.markup import escape

        console.print(f"[yellow]dropped[/] the stored {kind} {rid}: {escape(problems[0])}")
    _remove(entry)
    return None


def fetch(
    stage_kind: str, rid: str, final: Path, lineage: dict[str, str], console: Console | None = None
) -> Manifest | None:
    """Materialise the stored stage `<kind>/<rid>` at `final` (atomically, hard links or copies) with `lineage`
    (relative to `final`) in its manifest, and return that manifest; None when the store has no intact copy."""
    root = store_root()
    entry = None if root is None else _entry_dir(root, stage_kind, rid)
    try:
        if entry is None or not (entry / MANIFEST).is_file():
            return None
        stored = _verified(entry, stage_kind, rid, console)
        if stored is None:
            return None
        manifest = replace(stored, lineage=dict(lineage))
        with atomic_dir(final) as work:
            for rec in stored.outputs:
                _link(entry / rec.path, work / rec.path)
            write_json_atomic(work / MANIFEST, manifest.to_json())
        manifest.dir = final
        with contextlib.suppress(OSError):  # a read-only store still serves its entries
            (entry / LAST_USED).touch()
        return manifest
    except (OSError, KdpipeError) as e:
        _warn(f"cannot reuse {stage_kind} {rid} from {entry}", e, console)
        return None


def _remove(entry: Path) -> None:
    """Rename away, then delete: a concurrent reader sees the whole entry or none."""
    gone = entry.with_name(f".{entry.name}.old-{os.getpid()}")
    try:
        os.rename(entry, gone)
    except OSError:
        gone = entry
    shutil.rmtree(gone, ignore_errors=True)


def _read_entry(path: Path) -> Entry:
    created = ""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        created = str(data.get("created_at", "")) if isinstance(data, dict) else ""
    except (OSError, ValueError):
        pass
    size = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                size += p.stat().st_size
        except OSError:
            continue
    mark = path / LAST_USED if (path / LAST_USED).is_file() else path / MANIFEST
    try:
        used = mark.stat().st_mtime
    except OSError:
        used = 0.0
    return Entry(path.parent.name, path.name, path, size, created, used)


def entries(root: Path | None = None) -> list[Entry]:
    """Every stored stage, most recently used first."""
    root = root if root is not None else store_root()
    if root is None or not root.is_dir():
        return []
    found = [
        _read_entry(e)
        for kind in sorted(root.iterdir())
        if kind.is_dir() and not kind.name.startswith(".")
        for e in sorted(kind.iterdir())
        if not e.name.startswith(".") and (e / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def prune(
    older_than_days: float | None, keep: int | None, dry_run: bool = False, root: Path | None = None
) -> list[Entry]:
    """Remove the stored stages that match every criterion given: last used more than `older_than_days` ago,
    and not among the `keep` most recently used (keep=0 with no age: all of them). Returns what was (or, with
    `dry_run`, would be) removed."""
    found = entries(root)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    doomed = [
        e for i, e in enumerate(found) if (cutoff is None or e.last_used < cutoff) and (keep is None or i >= keep)
    ]
    if not dry_run:
        for e in doomed:
            _remove(e.path)
    return doomed
