"""A distillation killed with SIGKILL at random points, again and again, always finishes with the result of a run
that was never killed (bit-identical on CPU), and never looks finished before it is."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import invoke, make_csv, make_model_dir, write_recipe

KDPIPE = [sys.executable, "-m", "kdpipe.cli"]


def _recipe(tmp: Path) -> tuple[Path, Path]:
    teacher = make_model_dir(tmp / "teacher", seed=3)
    csv = make_csv(tmp / "tiny.csv", seed=3)
    recipe = write_recipe(
        tmp / "recipe.yaml",
        teacher,
        csv,
        tmp / "runs",
        teacher__epochs=3,
        distill__epochs=40,  # 400 steps: a few seconds of training to land kills in
        distill__checkpoint_every=7,
        distill__baseline=False,
        distill__cka_samples=0,
    )
    return recipe, tmp / "runs"


def _history(run: Path) -> list[float]:
    return [r["loss"] for r in json.loads((run / "distill" / "manifest.json").read_text())["record"]["history"]]


def test_sigkill_at_random_points_always_finishes_with_the_same_result(tmp_path: Path) -> None:
    recipe, runs = _recipe(tmp_path)
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    ref = tmp_path / "ref"
    shutil.copytree(runs, ref)
    code, out = invoke("distill", "-r", recipe, "--out", ref)
    assert code == 0, out

    rng = random.Random(int(os.environ.get("KDPIPE_KILL_SEED", "0")))
    checkpoints = runs / ".checkpoints" / "distill"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed_in_training = 0
    for attempt in range(3):
        proc = subprocess.Popen(
            [*KDPIPE, "distill", "-r", str(recipe), "--resume"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started = time.monotonic()
        if attempt == 0:  # anywhere from start-up on: imports, loading, the teacher cache, training
            deadline = started + rng.uniform(1.0, 6.0)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
        else:  # once training has written a checkpoint, at a random moment after it
            while proc.poll() is None and not list(checkpoints.glob("*.pt")):
                time.sleep(0.02)
                assert time.monotonic() - started < 300, "no checkpoint after 300 s"
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:  # it finished before the kill landed: fine, that is a result too
            break
        in_training = bool(list(checkpoints.glob("*.pt")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_in_training += in_training
        # killed: the stage must not look finished
        assert not (runs / "distill" / "manifest.json").exists()
    else:
        done = subprocess.run(
            [*KDPIPE, "distill", "-r", str(recipe), "--resume"], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming" in done.stderr
    assert killed_in_training >= 2  # the kills did land mid-training, so resuming was really exercised
    record = json.loads((runs / "distill" / "manifest.json").read_text())["record"]
    assert record["resumed_from"] is not None
    assert _history(runs) == _history(ref)  # every step's loss, exactly
    for name in ("test_logits.npy",):
        a, b = np.load(runs / "distill" / name), np.load(ref / "distill" / name)
        assert np.array_equal(a, b)
    assert not checkpoints.exists()  # finished: nothing left to resume
