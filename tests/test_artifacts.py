from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke

from kdpipe.artifacts.manifest import (
    LOCK,
    Manifest,
    Metric,
    atomic_dir,
    describe_changes,
    list_outputs,
    locked,
    read_manifest,
    run_id,
    write_json_atomic,
)
from kdpipe.errors import ArtifactError


def _stage(tmp: Path, name: str = "distill") -> Path:
    with atomic_dir(tmp / name) as work:
        (work / "model").mkdir()
        (work / "model" / "w.bin").write_bytes(b"weights")
        (work / "a.txt").write_text("a")
        m = Manifest(
            stage=name,
            run_id="r",
            config={"x": 1},
            config_hash="h",
            inputs=[],
            outputs=list_outputs(work),
            environment={},
            metrics={"acc": Metric(0.5, "fraction")},
        )
        write_json_atomic(work / "manifest.json", m.to_json())
    return tmp / name


def test_roundtrip_and_sorted_outputs(tmp_path: Path) -> None:
    d = _stage(tmp_path)
    m = read_manifest(d, "distill")
    assert [r.path for r in m.outputs] == ["a.txt", "model/w.bin"]
    assert m.metric("acc") == 0.5 and m.metrics["acc"].unit == "fraction"


def test_interrupted_stage_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "distill") as work:
        (work / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_rerun_keeps_previous_result(tmp_path: Path) -> None:
    d = _stage(tmp_path)
    with pytest.raises(RuntimeError), atomic_dir(d):
        raise RuntimeError("boom")
    assert read_manifest(d, "distill").stage == "distill"


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such directory"):
        read_manifest(tmp_path / "none", "distill")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "half", "distill")
    d = _stage(tmp_path)
    with pytest.raises(ArtifactError, match="expected a 'export' stage"):
        read_manifest(d, "export")
    (d / "model" / "w.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="w.bin changed since the distill stage wrote it"):
        read_manifest(d, "distill")
    (d / "a.txt").unlink()
    with pytest.raises(ArtifactError, match=r"a.txt is missing \(and 1 more\)"):
        read_manifest(d, "distill")


def test_run_id_depends_on_config_inputs_and_upstream(tmp_path: Path) -> None:
    d = _stage(tmp_path)
    recs = read_manifest(d, "distill").outputs
    base = run_id("export", "h1", recs, ["u"])
    assert base == run_id("export", "h1", list(reversed(recs)), ["u"])
    assert base != run_id("export", "h2", recs, ["u"])
    assert base != run_id("export", "h1", recs[:1], ["u"])
    assert base != run_id("export", "h1", recs, ["v"])


def test_describe_changes() -> None:
    assert describe_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: 2 -> 3"]


def test_leftovers_of_a_killed_run_are_cleared(tmp_path: Path) -> None:
    (tmp_path / ".distill.tmp-999999").mkdir()
    (tmp_path / ".distill.old-999999").mkdir()
    _stage(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distill"]


def test_sigterm_discards_the_stage_in_progress(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import time, sys\n"
        "from pathlib import Path\n"
        "from kdpipe.artifacts.manifest import atomic_dir\n"
        "from kdpipe import cli\n"
        "import signal\n"
        "signal.signal(signal.SIGTERM, cli._terminated)\n"
        f"with atomic_dir(Path({str(tmp_path)!r}) / 'distill') as work:\n"
        "    (work / 'half.bin').write_bytes(b'x')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    time.sleep(0.1)
    assert proc.returncode != 0 and list(tmp_path.iterdir()) == []


@pytest.fixture
def live_pid() -> int:
    """The PID of a process that is alive for the duration of the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(root: Path, pid: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": "t"}))


def test_second_command_on_a_locked_out_is_refused(tiny_recipe: Path, tmp_path: Path, live_pid: int) -> None:
    _write_lock(tmp_path / "runs", live_pid)
    code, out = invoke("teacher", "-r", tiny_recipe, "-o", tmp_path / "runs")
    assert_one_line_error(code, out, "in use by another kdpipe", f"PID {live_pid}", LOCK)
    assert not (tmp_path / "runs" / "teacher").exists()
    assert json.loads((tmp_path / "runs" / LOCK).read_text())["pid"] == live_pid  # the holder's lock is kept


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_recipe: Path, tmp_path: Path) -> None:
    _write_lock(tmp_path / "runs", dead_pid())
    code, out = invoke("teacher", "-r", tiny_recipe, "-o", tmp_path / "runs")
    assert code == 0, out
    assert read_manifest(tmp_path / "runs" / "teacher", "teacher").stage == "teacher"
    assert not (tmp_path / "runs" / LOCK).exists()  # released at the end


def test_lock_is_reentrant_and_exclusive(tmp_path: Path, live_pid: int) -> None:
    with locked(tmp_path), locked(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()
    _write_lock(tmp_path, live_pid)
    with pytest.raises(ArtifactError, match="in use"), locked(tmp_path):
        pass


def test_temporary_dir_of_a_live_process_is_never_cleared(tmp_path: Path, live_pid: int) -> None:
    live = tmp_path / f".teacher.tmp-{live_pid}"
    dead = tmp_path / f".teacher.tmp-{dead_pid()}"
    for d in (live, dead):
        d.mkdir()
        (d / "train.jsonl").write_text("{}")
    with atomic_dir(tmp_path / "teacher") as work:
        (work / "x").write_text("x")
    assert (live / "train.jsonl").is_file()  # another kdpipe's stage in progress survives
    assert not dead.exists()  # a killed run's leftovers are cleared
