"""Manifests, fingerprints and atomic stage directories.

A stage writes `<out>/<stage>/` through a temporary sibling directory; `manifest.json` is written
last and the directory is renamed into place, so a directory without a manifest (or a missing
directory) is never mistaken for a finished stage, whatever interrupts the run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdpipe import __version__
from kdpipe.errors import ArtifactError, DiskFullError, disk_full
from kdpipe.files import atomic_dir as atomic_dir
from kdpipe.files import pid_alive

SCHEMA_VERSION = 2  # 2: `extra` became the stage's typed `record` (kdpipe.artifacts.records)
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the stage directory (outputs) or as given (inputs)
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path, name: str) -> FileRecord:
        return cls(path=name, sha256=sha256_file(path), bytes=path.stat().st_size)


def input_records(path: Path, name: str) -> list[FileRecord]:
    """Content records of an input a stage reads: one for a file, one per file (recursively) for a
    directory, each named `name/<relative path>`. Inputs are identified by their bytes, never by
    their path, so editing a file in place re-runs the stage that reads it."""
    if path.is_file():
        return [FileRecord.of(path, name)]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [FileRecord.of(p, f"{name}/{p.relative_to(path).as_posix()}") for p in files]


@dataclass(frozen=True)
class Metric:
    value: float | int | str | None
    unit: str


@dataclass
class Manifest:
    stage: str
    run_id: str
    config: dict[str, Any]
    config_hash: str
    inputs: list[FileRecord]
    outputs: list[FileRecord]
    environment: dict[str, Any]
    metrics: dict[str, Metric] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)  # stage -> dir, relative to this one
    record: dict[str, Any] = field(default_factory=dict)  # the stage's typed hand-over (kdpipe.artifacts.records)
    schema_version: int = SCHEMA_VERSION
    kdpipe_version: str = __version__
    created_at: str = ""
    # where this manifest was read from (not serialised)
    dir: Path = field(default=Path("."), compare=False, repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("dir")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ArtifactError(
                    f"{path}: not a valid kdpipe manifest (a JSON {type(data).__name__}, not an object)",
                    "re-run the stage that wrote it (--force)",
                )
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ArtifactError(
                    f"{path}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}",
                    "re-run the stage with this kdpipe version (--force)",
                )
            data["inputs"] = [FileRecord(**r) for r in data["inputs"]]
            data["outputs"] = [FileRecord(**r) for r in data["outputs"]]
            if escaped := [r.path for r in data["outputs"] if not _inside(r.path)]:
                raise ArtifactError(
                    f"{path}: output {escaped[0]!r} is not a path inside the stage directory",
                    "re-run the stage that wrote it (--force); outputs are relative paths inside their stage",
                )
            data["metrics"] = {k: Metric(**m) for k, m in data.get("metrics", {}).items()}
            return cls(**data, dir=path.parent)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(
                f"{path}: not a valid kdpipe manifest ({e.__class__.__name__}: {e})",
                "re-run the stage that wrote it (--force)",
            ) from None

    def path(self, name: str) -> Path:
        """An output file of this stage, by its recorded name."""
        if name not in {r.path for r in self.outputs}:
            raise ArtifactError(
                f"{self.dir}: the {self.stage} manifest lists no file '{name}'", "re-run the stage with --force"
            )
        return self.dir / name

    def directory(self, name: str) -> Path:
        """An output directory of this stage (a model: config, weights, tokenizer), to hand to a loader that
        opens whatever it finds there. Every file in it must be a recorded output (read_manifest has checked
        their bytes), so a file the manifest does not list is never loaded unverified."""
        listed = {r.path for r in self.outputs if r.path.startswith(f"{name}/")}
        root = self.dir / name
        if not listed or not root.is_dir():
            raise ArtifactError(
                f"{self.dir}: the {self.stage} manifest lists no directory '{name}'", "re-run the stage with --force"
            )
        unlisted = sorted(
            rel
            for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and (rel := p.relative_to(self.dir).as_posix()) not in listed
        )
        if unlisted:
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise ArtifactError(
                f"{self.dir / unlisted[0]}: not among the {self.stage} manifest's outputs{more}, so it is not "
                "verified; a stage opens only the files its upstream manifest lists",
                f"the artifact was modified after it was written: re-run `kdpipe {self.stage} --force`",
            )
        return root

    def has(self, name: str) -> bool:
        """Whether this stage recorded an output file `name`."""
        return name in {r.path for r in self.outputs}

    def metric(self, name: str) -> Any:
        m = self.metrics.get(name)
        return None if m is None else m.value

    def upstream(self, stage: str) -> Manifest:
        """The (verified) manifest of an earlier stage in this one's lineage."""
        if stage not in self.lineage:
            raise ArtifactError(
                f"{self.dir}: no '{stage}' stage in this artifact's lineage",
                "run the pipeline from the teacher stage on",
            )
        return read_manifest(self.dir / self.lineage[stage], stage)


def _inside(rel: object) -> bool:
    """Whether a recorded output path stays inside its stage directory (relative, no '..', not empty)."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    parts = Path(rel).parts
    return not Path(rel).is_absolute() and ".." not in parts and rel not in (".", MANIFEST)


def verify_outputs(m: Manifest) -> list[str]:
    """Every recorded output file that is missing or whose bytes changed; [] when all match."""
    problems = []
    for rec in m.outputs:
        p = m.dir / rec.path
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != rec.bytes or sha256_file(p) != rec.sha256:
            problems.append(f"{p} changed since the {m.stage} stage wrote it (sha256 differs)")
    return problems


def read_manifest(directory: Path, expected_stage: str) -> Manifest:
    """Read and check an upstream stage directory; one clear error for each way it can be wrong."""
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(
            f"{directory}: no such directory (expected a '{expected_stage}' stage output)",
            f"run `kdpipe {expected_stage}` first, or point to its output directory",
        )
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"{directory}: no {MANIFEST}, so this is not a finished '{expected_stage}' stage",
            f"run `kdpipe {expected_stage}` to produce it (an interrupted stage leaves no manifest)",
        )
    m = Manifest.from_file(mpath)
    if m.stage != expected_stage:
        raise ArtifactError(
            f"{directory}: is a '{m.stage}' stage, expected a '{expected_stage}' stage",
            f"point to the output directory of `kdpipe {expected_stage}`",
        )
    problems = verify_outputs(m)
    if problems:
        raise ArtifactError(
            f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            f"the artifact was modified after it was written: re-run `kdpipe {m.stage} --force`",
        )
    return m


def run_id(stage: str, cfg_hash: str, inputs: list[FileRecord], upstream_ids: list[str]) -> str:
    h = hashlib.sha256()
    h.update(stage.encode())
    h.update(cfg_hash.encode())
    for r in sorted(inputs, key=lambda r: r.path):
        h.update(r.sha256.encode())
    for u in upstream_ids:
        h.update(u.encode())
    return h.hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def list_outputs(work: Path) -> list[FileRecord]:
    files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [FileRecord.of(p, p.relative_to(work).as_posix()) for p in files]


def write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFullError(path.parent) from None
        raise


LOCK = ".kdpipe.lock"
_held: dict[Path, int] = {}  # lock path -> nesting depth, for this process


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold `<root>/.kdpipe.lock` (this process's PID) while stages write into `root`.

    A second kdpipe on the same output root is refused with the holder's PID instead of racing it
    (each would clear the other's temporary stage directory). A lock left by a process that no
    longer exists is stale and taken over. Re-entrant within one process."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(
            f"{root}: cannot create the output directory ({e.strerror or type(e).__name__})",
            "give --out a directory you can write to",
        ) from None
    path = (root / LOCK).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    info = json.dumps({"pid": os.getpid(), "host": platform.node(), "started": now()})
    # written in full beside it, then hard-linked into place: link() fails if the lock exists, so
    # taking it is atomic and a reader never sees a half-written lock
    mine = path.with_name(f"{LOCK}.{os.getpid()}")
    mine.write_text(info + "\n", encoding="utf-8")
    try:
        for _attempt in range(3):
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                holder = _read_lock(path)
            pid = holder.get("pid")
            same_host = holder.get("host", platform.node()) == platform.node()
            if isinstance(pid, int) and pid != os.getpid() and (not same_host or pid_alive(pid)):
                where = "" if same_host else f" on host {holder.get('host')}"
                raise ArtifactError(
                    f"{root}: in use by another kdpipe (PID {pid}{where}, since {holder.get('started', '?')})",
                    f"wait for it to finish or use another --out; if no kdpipe is running, delete {root / LOCK}",
                )
            path.unlink(missing_ok=True)  # stale: its process is gone (killed, machine restarted)
        else:
            raise ArtifactError(f"{root / LOCK}: could not take the lock", "retry; another kdpipe may be starting")
    finally:
        mine.unlink(missing_ok=True)
    _held[path] = 1
    try:
        yield
    finally:
        _held.pop(path, None)
        try:
            if _read_lock(path).get("pid") == os.getpid():
                path.unlink()
        except FileNotFoundError:
            pass


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"pid": None}  # unreadable: treated as stale
    return data if isinstance(data, dict) else {"pid": None}


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay whole."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
