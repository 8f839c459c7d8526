"""Multi-process training on PyTorch's own engine: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, kdpipe joins the
process group (gloo on CPU, NCCL on CUDA) and trains the student under DistributedDataParallel.

Each global batch is the one a single process would draw (same seed, same order); rank r takes its contiguous
share of the rows, scales its loss by its share of the examples, and DDP's gradient averaging then gives exactly
the gradient of the global batch's mean loss, so 2 processes follow 1 process's loss curve at the same global
batch (docs/methods.md §7.3). Only rank 0 writes artifacts and checkpoints; the others train into a scratch
directory that is thrown away.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from kdpipe.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from torchrun's environment (a single process when it is not set)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def join(device: str) -> World:
    """Join the process group once (gloo on CPU, NCCL on CUDA); on CUDA each process takes its local GPU."""
    import torch
    import torch.distributed as dist

    w = world()
    if w.distributed and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return w


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float], device: str) -> list[float]:
    """The element-wise sum of `values` over every process (itself when there is one)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order ([obj] alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, w: World) -> slice:
    """Rank w.rank's contiguous share of a batch of n rows (the first n % size ranks take one more)."""
    base, extra = divmod(n, w.size)
    lo = w.rank * base + min(w.rank, extra)
    return slice(lo, lo + base + (1 if w.rank < extra else 0))


def shard_teacher(model: Any) -> dict[str, int]:
    """Split the teacher's weights across the processes with FSDP2 (`fully_shard` on each transformer block, then
    the root): each process keeps 1/N of every weight and all-gathers a block's weights only while that block
    runs. Every process must then call the teacher's forward in lockstep (they do: each on its share of the
    batch). Returns the teacher's weight bytes in all and on this process."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    full = sum(p.numel() * p.element_size() for p in model.parameters())
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(lists, key=len) if lists else []:  # the transformer layers: the longest ModuleList
        fully_shard(block)
    fully_shard(model)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {"teacher_weight_bytes": full, "teacher_weight_bytes_per_process": local}


def launch(nproc: int, argv: list[str]) -> int:
    """`kdpipe distill --nproc N`: the same command again under torchrun, N processes on this machine."""
    if nproc < 2:
        raise ConfigError(f"--nproc {nproc}: needs at least 2 processes", "drop --nproc to train in one process")
    if world().distributed:
        raise ConfigError("--nproc: already running under torchrun", "drop --nproc, torchrun sets the processes")
    cleaned, skip = [], False  # argv without --nproc N / --nproc=N
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "kdpipe.cli", *cleaned]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads_each(nproc)))}
    return subprocess.call(cmd, env=env)


def _threads_each(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def scratch() -> str:
    """A throwaway directory for a follower rank's stage output."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"kdpipe-rank{world().rank}-")


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
