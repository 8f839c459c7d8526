"""Two processes on CPU (torchrun, gloo, DDP) follow one process's loss curve at the same global batch; only rank 0
writes the stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import assert_one_line_error, invoke, make_csv, make_model_dir, write_recipe


def _dropout_free(model_dir: Path) -> Path:
    """Dropout is the one thing 2 processes draw differently from 1: off, the runs must agree step by step."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


def _nproc(recipe: Path, out: Path, *sets: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdpipe.cli", "distill", "-r", str(recipe), "--out", str(out), "--nproc", "2"]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _record(run: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run / "distill" / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_two_processes_follow_one_at_the_same_global_batch(tmp_path: Path) -> None:
    teacher = _dropout_free(make_model_dir(tmp_path / "teacher", seed=5))
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        teacher,
        make_csv(tmp_path / "tiny.csv", seed=5),
        tmp_path / "one",
        teacher__epochs=3,
        distill__epochs=3,
        distill__batch_size=15,  # 160 / 15: the last batch of an epoch (10 rows) splits 5 + 5, the others 8 + 7
        distill__losses=[{"name": "hinton", "temperature": 2.0, "alpha": 0.5}],
        distill__baseline=False,
        distill__cka_samples=0,
    )
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    two, sharded = tmp_path / "two", tmp_path / "sharded"
    shutil.copytree(tmp_path / "one", two)
    shutil.copytree(tmp_path / "one", sharded)
    code, out = invoke("distill", "-r", recipe)
    assert code == 0, out
    _nproc(recipe, two)
    one_m, two_m = _record(tmp_path / "one"), _record(two)
    assert one_m["record"]["processes"] == 1 and two_m["record"]["processes"] == 2
    a = np.array([r["loss"] for r in one_m["record"]["history"]])
    b = np.array([r["loss"] for r in two_m["record"]["history"]])
    assert len(a) == len(b) == 33
    assert np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert abs(a[0] - a[-1]) > 1e-3  # the curve moves: matching it is not vacuous
    # one stage directory each, written by rank 0 alone
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == [
        "cache",
        "distill",
        "student",
        "teacher",
    ]
    np.testing.assert_allclose(
        np.load(two / "distill" / "test_logits.npy"),
        np.load(tmp_path / "one" / "distill" / "test_logits.npy"),
        atol=1e-4,
    )

    assert one_m["record"]["teacher_cache"]["status"] == "miss" and two_m["record"]["teacher_cache"]["status"] == "miss"

    # the teacher's weights split across the 2 processes (FSDP2), online KD: still the same curve, half the weights
    _nproc(recipe, sharded, "distill.teacher_shard=true", "distill.cache.use=false")
    rec = _record(sharded)["record"]
    c = np.array([r["loss"] for r in rec["history"]])
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
    mem = rec["teacher_memory"]
    assert mem["teacher_weight_bytes_per_process"] <= 0.55 * mem["teacher_weight_bytes"]
    assert rec["teacher_cache"]["status"] == "bypassed"


def test_sharding_the_teacher_needs_torchrun(tmp_path: Path, tiny_dir: Path, tiny_csv: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, tiny_csv, tmp_path / "runs", teacher__epochs=1)
    for stage in ("teacher", "student"):
        assert invoke(stage, "-r", recipe)[0] == 0
    code, out = invoke(
        "distill", "-r", recipe, "--set", "distill.teacher_shard=true", "--set", "distill.cache.use=false"
    )
    assert_one_line_error(code, out, "distill.teacher_shard", "--nproc")
    code, out = invoke("distill", "-r", recipe, "--set", "distill.teacher_shard=true")
    assert_one_line_error(code, out, "cache.use")
