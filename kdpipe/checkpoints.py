"""Resume checkpoints of a training run: everything the next step depends on, written atomically.

One file per run (kdpipe.train.TrainPlan.checkpoint) holds the student and the loss terms' own modules, the
optimiser, the LR scheduler, the fp16 gradient scaler, the PID/SID schedule's position, the data position
(epoch and batches done in it; the order of an epoch is a function of the seed), the loss history and the
best-on-validation weights, and the RNG states of every process (torch, CUDA, numpy, Python). Restoring it and
training on gives the very numbers an uninterrupted run gives (bit-identical on CPU).

The file is written beside its final name and renamed over it (after an fsync), so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one. Under torchrun every process sends its RNG
states to rank 0, which alone writes.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe import distributed
from kdpipe.errors import ArtifactError

if TYPE_CHECKING:
    from kdpipe.distributed import World

VERSION = 1


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, trainee: Any, loop: Any, result: Any, epoch: int, skip: int, w: World) -> None:
    """The state after `result.steps` steps; `epoch` / `skip`: where the data order continues."""
    import torch

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore(path: Path, trainee: Any, loop: Any, result: Any, w: World) -> tuple[int, int]:
    """Load `path` into the run's objects; returns (epoch, skip). Raises ArtifactError on an unreadable file."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save()
    except Exception as e:  # a file that torch cannot read: not ours, or damaged on disk
        raise ArtifactError(
            f"{path}: the resume checkpoint cannot be read ({type(e).__name__}: {e})",
            "delete it to start the stage over, or re-run without --resume",
        ) from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ArtifactError(f"{path}: not a kdpipe checkpoint of version {VERSION}", "delete it to start over")
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
