"""Resume checkpoints are trusted only when their bytes are the ones kdpipe wrote (a sha256 in a sidecar, checked
before anything is unpickled); a damaged one is discarded and training starts over. A signal or a full disk while
one is written leaves no temporary file and no half checkpoint, and comes out as Ctrl-C / DiskFullError."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console
from test_resume import LOSSES, _same
from test_wiring import CPU, _bert, _cfg, _ctx, _data

from kdpipe import cli
from kdpipe.errors import ArtifactError, DiskFullError
from kdpipe.losses.objective import build_objective
from kdpipe.losses.schedule import Schedule
from kdpipe.train import checkpoints
from kdpipe.train import loop as train_mod
from kdpipe.train.distributed import World
from kdpipe.train.loop import TrainPlan, train


def _run(ckpt: Path | None, resume: bool = False, stop_at: int | None = None) -> tuple[Any, Any, str]:
    """test_resume's run (15 steps, a checkpoint every 2), with what it printed; stop_at: Ctrl-C after that step."""
    teacher = _bert(layers=2, seed=1).eval()
    student = _bert(layers=2, seed=2)
    torch.manual_seed(3)
    objective = build_objective([_cfg(**c) for c in LOSSES], _ctx())
    plan = TrainPlan(
        checkpoint=ckpt, resume=resume, epochs=3, batch_size=4, lr=1e-3, seed=7, checkpoint_every=2, description="kd"
    )
    out = io.StringIO()
    console = Console(file=out, width=400)
    real, calls = train_mod._step, [0]

    def dying(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if stop_at is not None and calls[0] > stop_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    train_mod._step = dying  # type: ignore[assignment]
    try:
        if stop_at is not None:
            with pytest.raises(KeyboardInterrupt):
                train(student, objective, _data(18), plan, CPU, teachers=[teacher], console=console)
            return None, student, out.getvalue()
        result = train(student, objective, _data(18), plan, CPU, teachers=[teacher], console=console)
        return result, student, out.getvalue()
    finally:
        train_mod._step = real  # type: ignore[assignment]


def _flip_largest_storage(ckpt: Path, n: int = 64) -> None:
    """Invert `n` bytes in the middle of the largest tensor storage's payload (the zip headers stay valid)."""
    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(ckpt.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
    raw[start : start + n] = bytes(b ^ 0xFF for b in raw[start : start + n])
    ckpt.write_bytes(bytes(raw))


def test_a_checkpoint_with_flipped_bytes_is_discarded_and_training_starts_over(tmp_path: Path) -> None:
    whole, whole_model, _ = _run(None)
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=8)
    _flip_largest_storage(ckpt)
    again, model, _ = _run(ckpt, resume=True)
    assert again.resumed_from is None and again.steps == 15
    assert [r["loss"] for r in again.history] == [r["loss"] for r in whole.history]
    _same(model, whole_model)  # the very weights of a run never interrupted, not the damaged ones


def test_the_discard_is_one_line_naming_the_file_and_why(tmp_path: Path) -> None:
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=3)
    _flip_largest_storage(ckpt)
    _, _, printed = _run_printing(ckpt)
    assert f"kd: checkpoint {ckpt} failed its integrity check (sha256 differs); discarded, training kd from step 0" in (
        printed
    )
    assert "resumed from" not in printed


def _run_printing(ckpt: Path) -> tuple[Any, Any, str]:
    """A resumed run stopped right after its first step, with what it printed on the way."""
    teacher, student = _bert(layers=2, seed=1).eval(), _bert(layers=2, seed=2)
    objective = build_objective([_cfg(**c) for c in LOSSES], _ctx())
    plan = TrainPlan(checkpoint=ckpt, resume=True, epochs=0.2, batch_size=4, seed=7, description="kd")
    out = io.StringIO()
    result = train(student, objective, _data(18), plan, CPU, teachers=[teacher], console=Console(file=out, width=400))
    return result, student, out.getvalue()


def test_a_checkpoint_without_its_integrity_record_is_not_trusted(tmp_path: Path) -> None:
    """A kdpipe of before the record, or a file copied in by hand: not read, training starts over."""
    whole, whole_model, _ = _run(None)
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=5)
    checkpoints.record_path(ckpt).unlink()
    again, model, _ = _run(ckpt, resume=True)
    assert again.resumed_from is None
    _same(model, whole_model)


def test_a_truncated_checkpoint_is_not_trusted(tmp_path: Path) -> None:
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=5)
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    _, _, printed = _run_printing(ckpt)
    assert "failed its integrity check (size differs" in printed


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch PWNED",))


def test_a_vouched_for_checkpoint_is_still_never_unpickled_freely(tmp_path: Path, monkeypatch: Any) -> None:
    """Even bytes the record vouches for load weights-only: a pickled callable is refused, never run."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "kd.pt"
    torch.save({"version": checkpoints.VERSION, "x": _Evil()}, ckpt)
    entry = {"sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(), "size": ckpt.stat().st_size}
    checkpoints.record_path(ckpt).write_text(json.dumps({"version": 1, "accept": [entry]}))
    with pytest.raises(ArtifactError) as e:
        _run_printing(ckpt)
    assert "kd.pt" in e.value.message and "delete it" in e.value.hint
    assert not (tmp_path / "PWNED").exists()


def test_a_kill_between_the_record_and_the_rename_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: Any) -> None:
    """The record vouches for the old file and the new one before the new one takes its name: a kill at any
    moment leaves a checkpoint that resumes."""
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=4)  # checkpoints at steps 2 and 4
    real = os.replace

    def killed(src: Any, dst: Any) -> None:
        if Path(dst) == ckpt:
            raise KeyboardInterrupt  # where SIGKILL would stop it, minus the clean-up
        real(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", killed)
    _run(ckpt, resume=True, stop_at=2)  # resumes at 4, dies writing the checkpoint of step 6
    monkeypatch.setattr(checkpoints.os, "replace", real)
    assert not list(tmp_path.glob(".*tmp*"))
    _, _, printed = _run(ckpt, resume=True, stop_at=0)
    assert "kd: resumed from step 4 of 15" in printed
    assert len(json.loads(checkpoints.record_path(ckpt).read_text())["accept"]) == 1  # the stale entry dropped


# ----------------------------------------------------------------------------- writing: signals, full disk
class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.objective = SimpleNamespace(schedule=Schedule())


def _state(steps: int) -> tuple[Any, Any, Any]:
    trainee = _Tiny()
    opt = torch.optim.SGD(trainee.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loop = SimpleNamespace(opt=opt, sched=sched, scaler=None, seen=steps * 4, ema=0.5)
    result = SimpleNamespace(steps=steps, history=[], best_val_accuracy=None, best_state=None, seconds=1.0)
    return trainee, loop, result


def _save(path: Path, steps: int, w: World = World()) -> None:
    trainee, loop, result = _state(steps)
    checkpoints.save(path, trainee, loop, result, 0, steps, w)


def _restored_steps(path: Path) -> int:
    trainee, loop, result = _state(0)
    checkpoints.restore(path, trainee, loop, result, World())
    return int(result.steps)


class _Interrupting:
    """A file whose third write sends this process `sig`: the signal lands inside torch's C++ zip writer."""

    def __init__(self, f: Any, sig: int) -> None:
        self.f, self.sig, self.writes = f, sig, 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), self.sig)
        return int(self.f.write(data))

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_checkpoint_is_written_is_an_interrupt(tmp_path: Path, monkeypatch: Any, sig: int) -> None:
    ckpt = tmp_path / "kd.pt"
    _save(ckpt, 2)
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real(obj, _Interrupting(f, sig)))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # what `kdpipe` runs under: Python's Ctrl-C handler (a pytest-xdist worker ignores SIGINT), and SIGTERM
    # unwinding like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, cli._terminated)
    try:
        with pytest.raises(KeyboardInterrupt):  # not torch's RuntimeError: the CLI says "interrupted", exit 130
            _save(ckpt, 4)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
        assert signal.getsignal(signal.SIGTERM) is cli._terminated
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd.pt", "kd.pt.json"]  # no temporary left
    monkeypatch.setattr(torch, "save", real)
    assert _restored_steps(ckpt) == 4  # the write in progress was finished, and is intact


class _FillingUp:
    """A file on a disk with `room` bytes free: the write that does not fit fails with ENOSPC."""

    def __init__(self, path: Any, mode: str, room: int) -> None:
        self.f, self.room = open(path, mode), room  # noqa: SIM115

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return int(self.f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FillingUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_a_full_disk_while_torch_writes_is_disk_full(tmp_path: Path, monkeypatch: Any) -> None:
    """torch's zip writer turns the ENOSPC of its file into RuntimeError('... unexpected pos ...')."""
    ckpt = tmp_path / "kd.pt"
    _save(ckpt, 2)
    monkeypatch.setattr(checkpoints, "open", lambda p, m: _FillingUp(p, m, room=4096), raising=False)
    with pytest.raises(DiskFullError) as e:
        _save(ckpt, 4)
    assert str(tmp_path) in e.value.message
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd.pt", "kd.pt.json"]  # the partial file removed
    assert _restored_steps(ckpt) == 2  # the previous checkpoint still resumes


def test_a_full_disk_reported_by_torch_is_disk_full(tmp_path: Path, monkeypatch: Any) -> None:
    ckpt = tmp_path / "kd.pt"

    def full(obj: Any, f: Any) -> None:
        f.write(b"x" * 1000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError):
        _save(ckpt, 2)
    assert list(tmp_path.iterdir()) == []


def test_any_failure_while_writing_removes_the_temporary(tmp_path: Path, monkeypatch: Any) -> None:
    ckpt = tmp_path / "kd.pt"

    def broken(obj: Any, f: Any) -> None:
        f.write(b"x" * 1000)
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else"):
        _save(ckpt, 2)
    assert list(tmp_path.iterdir()) == []


def test_only_rank_0_writes(tmp_path: Path) -> None:
    _save(tmp_path / "kd.pt", 2, World(rank=1, size=2))
    assert list(tmp_path.iterdir()) == []
