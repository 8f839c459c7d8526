"""Resume checkpoints of a training run: everything the next step depends on, written atomically and trusted only
when its bytes are the ones written.

One file per run (kdpipe.train.loop.TrainPlan.checkpoint) holds the student and the loss terms' own modules, the
optimiser, the LR scheduler, the fp16 gradient scaler, the PID/SID schedule's position, the data position
(epoch and batches done in it; the order of an epoch is a function of the seed), the loss history and the
best-on-validation weights, and the RNG states of every process (torch, CUDA, numpy, Python). Restoring it and
training on gives the very numbers an uninterrupted run gives (bit-identical on CPU).

Beside it, `<name>.json` (record_path) is its integrity record: the sha256 and size of the files it vouches for.
save() writes the new file under a temporary name (fsynced, hashed as it is written), then the record vouching
for both the file in place and the new one, then renames the new file over the old: a kill at any moment leaves
a file the record vouches for (the old one or the new one), never half of one, and never an untrusted one.
restore() hashes the file before torch reads a byte of it; a file with no record or other bytes (damaged on
disk, truncated, copied in by hand) is deleted and the run starts over from step 0 (UntrustedCheckpoint). Even
a vouched-for file is loaded weights-only (no pickled callables), so the RNG states are stored as plain data.

SIGINT / SIGTERM wait while a checkpoint is written (it is finished, then the signal is delivered), and a full
disk is DiskFullError; either way no temporary file is left. Under torchrun every process sends its RNG states
to rank 0, which alone writes; every process checks the file before any reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import numpy as np

from kdpipe.errors import ArtifactError, DiskFullError, disk_full
from kdpipe.train import distributed

if TYPE_CHECKING:
    from types import FrameType

    from kdpipe.train.distributed import World

VERSION = 2  # 2: RNG states as plain data (loads weights-only), the integrity record beside the file
RECORD_VERSION = 1
_CHUNK = 1 << 20


class UntrustedCheckpoint(ArtifactError):
    """A resume checkpoint whose bytes are not the ones save() wrote, or with no record to say; restore() deleted
    it, and the run starts over."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"checkpoint {path} failed its integrity check ({why}); discarded",
            "nothing to do: the training run starts over from step 0",
        )
        self.why = why


def record_path(path: Path) -> Path:
    """The checkpoint's integrity record: {"version", "accept": [{"sha256", "size"}, ...]}."""
    return path.with_name(path.name + ".json")


def _rng_state() -> dict[str, Any]:
    import torch

    numpy_state = cast("tuple[str, np.ndarray[Any, Any], int, int, float]", np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, gauss = numpy_state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # a tensor and numbers, not numpy's tuple with its array: the file then loads weights-only
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),  # (int, tuple of ints, None): plain data already
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, trainee: Any, loop: Any, result: Any, epoch: int, skip: int, w: World) -> None:
    """The state after `result.steps` steps; `epoch` / `skip`: where the data order continues. A SIGINT / SIGTERM
    meanwhile is delivered once the file is in place; a full disk is DiskFullError."""
    rngs = distributed.gather(_rng_state())  # a collective: every process calls save at the same step
    if not w.main:
        return
    state = {
        "version": VERSION,
        "steps": result.steps,
        "epoch": epoch,
        "skip": skip,
        "trainee": trainee.state_dict(),
        "schedule": dataclasses.asdict(trainee.objective.schedule),
        "opt": loop.opt.state_dict(),
        "sched": loop.sched.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
        "seen": loop.seen,
        "ema": loop.ema,
        "history": result.history,
        "best_val_accuracy": result.best_val_accuracy,
        "best_state": result.best_state,
        "seconds": result.seconds,
        "rng": rngs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with _signals_held():
        _replace(path, state)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT / SIGTERM recorded while the block runs, then delivered to the handlers they would have reached (the
    CLI's raise KeyboardInterrupt: exit 130). Raised inside torch's C++ zip writer, a KeyboardInterrupt comes out
    as RuntimeError ('... inline_container ...'), which the CLI can only call unexpected."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can be set in the main thread only, and Python runs them there only
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


class _Sink:
    """The temporary file as torch's zip writer sees it: hashes what it writes, and keeps the OSError of a failed
    write (torch replaces ENOSPC with its own RuntimeError, '... unexpected pos N vs M', which does not say)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.f.flush()


def _replace(path: Path, state: dict[str, Any]) -> None:
    """Write `state` beside `path`, vouch for it in the record (beside the file still in place), then rename it
    over `path`. Any exception removes the temporary file; a full disk is DiskFullError."""
    import torch

    for stale in path.parent.glob(f".{path.name}*.tmp-*"):  # left by a process killed while writing (SIGKILL)
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sink: _Sink | None = None
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            torch.save(state, cast("BinaryIO", sink))  # write() and flush() are all torch's zip writer calls
            f.flush()
            os.fsync(f.fileno())
            # torch's writer only appends, so the bytes hashed are the file's; should it ever seek, hash the file
            same = sink.size == os.fstat(f.fileno()).st_size
        sha, size = (sink.sha.hexdigest(), sink.size) if same else _digest(tmp)
        kept = _accepted(path)[-1:] if path.is_file() else []  # the last entry is the file in place (see restore)
        _write_record(path, [*kept, {"sha256": sha, "size": size}])
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e) or (sink is not None and sink.error is not None and disk_full(sink.error)):
            raise DiskFullError(path.parent) from e
        raise


def _write_record(path: Path, accept: list[dict[str, Any]]) -> None:
    """The integrity record of `path`, replaced atomically (fsynced before the rename, the rename after)."""
    rec = record_path(path)
    tmp = rec.with_name(f".{rec.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps({"version": RECORD_VERSION, "accept": accept}).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, rec)
        _fsync_dir(rec.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(d: Path) -> None:
    # the renames themselves reach the disk in order (POSIX; elsewhere a directory cannot be opened for this)
    if os.name != "posix":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _accepted(path: Path) -> list[dict[str, Any]]:
    """The record's entries (none when it is missing or unreadable)."""
    try:
        accept = json.loads(record_path(path).read_text(encoding="utf-8"))["accept"]
        return [{"sha256": str(e["sha256"]), "size": int(e["size"])} for e in accept]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _verify(path: Path) -> tuple[dict[str, Any], str]:
    """The record's entry for the file's bytes, or ({}, why the file is not trusted)."""
    rec = record_path(path)
    if not rec.is_file():
        return {}, f"no integrity record {rec.name}"
    accepted = _accepted(path)
    if not accepted:
        return {}, f"its integrity record {rec.name} is unreadable"
    try:
        sha, size = _digest(path)
    except OSError as e:
        return {}, f"it cannot be read: {e.strerror or e}"
    entry = {"sha256": sha, "size": size}
    if entry in accepted:
        return entry, ""
    sizes = sorted({e["size"] for e in accepted})
    if size not in sizes:
        return {}, f"size differs: {size} bytes, not {' or '.join(map(str, sizes))}"
    return {}, "sha256 differs"


def discard(path: Path) -> None:
    """Delete a checkpoint and its record."""
    path.unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


def restore(path: Path, trainee: Any, loop: Any, result: Any, w: World) -> tuple[int, int]:
    """Load `path` into the run's objects; returns (epoch, skip). UntrustedCheckpoint, with nothing loaded and the
    file deleted, when its bytes are not the ones save() wrote (on any process: they all start over); ArtifactError
    on a vouched-for file that does not load."""
    entry, why = _verify(path)  # before torch reads a byte: a damaged file is never unpickled
    whys = [x for x in distributed.gather(why) if x]  # a collective: every process restores, or none
    if whys:
        if w.main:
            discard(path)
        raise UntrustedCheckpoint(path, whys[0])
    if w.main:  # forget the entry of a write killed before its rename, so the next save keeps the right one
        _write_record(path, [entry])
    state = _load(path)
    trainee.load_state_dict(state["trainee"])
    for key, value in state["schedule"].items():
        setattr(trainee.objective.schedule, key, value)
    loop.opt.load_state_dict(state["opt"])
    loop.sched.load_state_dict(state["sched"])
    if loop.scaler is not None and state["scaler"] is not None:
        loop.scaler.load_state_dict(state["scaler"])
    loop.seen, loop.ema = state["seen"], state["ema"]
    result.steps, result.history, result.seconds = state["steps"], state["history"], state["seconds"]
    result.best_val_accuracy, result.best_state = state["best_val_accuracy"], state["best_state"]
    rngs = state["rng"]
    _set_rng_state(rngs[w.rank] if w.rank < len(rngs) else rngs[0])
    return int(state["epoch"]), int(state["skip"])


def _load(path: Path) -> dict[str, Any]:
    import torch

    hint = "delete it to start the stage over, or re-run without --resume"
    try:
        # weights-only (docs: kdpipe never unpickles): tensors and plain data, nothing that runs on load
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ArtifactError(
            f"{path}: the resume checkpoint holds objects other than tensors and plain data (not loaded)", hint
        ) from None
    except Exception as e:  # a file that torch cannot read, though the record vouches for it: not save()'s
        first = str(e).splitlines()[0] if str(e) else ""
        raise ArtifactError(
            f"{path}: the resume checkpoint cannot be read ({type(e).__name__}: {first})", hint
        ) from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ArtifactError(f"{path}: not a kdpipe checkpoint of version {VERSION}", "delete it to start over")
    return state
