"""The teacher-output cache through the pipeline: `kdpipe run` builds it (a miss), another student of the same
teacher reuses it (a hit, said in the manifest and the report), and augmentation bypasses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import invoke


def _distill(run: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run / "distill" / "manifest.json").read_text())["record"]  # type: ignore[no-any-return]


def test_the_default_chain_uses_the_cache_and_another_student_reuses_it(
    tmp_path: Path, finished: tuple[Path, Path]
) -> None:
    recipe, runs = finished
    first = _distill(runs)["teacher_cache"]
    assert first["status"] == "miss"
    assert first["bytes_per_example"] > 0 and first["examples"] == 160
    assert first["contents"]["top_k"] is None and first["contents"]["hidden"]  # hinton + hidden_cosine
    assert not Path(first["dir"]).is_absolute()  # relative to the stage
    assert (runs / "distill" / first["dir"] / "cache.json").is_file()

    run2 = tmp_path / "runs"
    shutil.copytree(runs, run2, symlinks=True)
    # another student of the same teacher layers (a random init): it reads the same teacher outputs
    code, out = invoke("run", recipe, "--out", run2, "--set", "student.init=random")
    assert code == 0, out
    again = _distill(run2)
    assert again["teacher_cache"]["status"] == "hit", out
    assert again["teacher_cache"]["key"] == first["key"]
    assert "re-running student" in out and "re-running distill" in out
    report = next(run2.glob("profile/report.md")).read_text()
    assert "cache hit" in report and "bytes/example" in report
    # a different student really trained: its outputs differ from the first one's
    a, b = np.load(runs / "distill" / "test_logits.npy"), np.load(run2 / "distill" / "test_logits.npy")
    assert not np.array_equal(a, b)


def test_augmentation_and_cache_off_bypass_it_and_say_why(tmp_path: Path, finished: tuple[Path, Path]) -> None:
    recipe, runs = finished
    for sets, reason in (
        (["distill.augment={n_iter: 1}", "distill.epochs=1"], "augment"),
        (["distill.cache.use=false", "distill.epochs=1"], "cache.use"),
    ):
        run = tmp_path / reason
        shutil.copytree(runs, run, symlinks=True)
        args = ["distill", "-r", recipe, "--out", run, "--no-baseline"]
        for s in sets:
            args += ["--set", s]
        code, out = invoke(*args)
        assert code == 0, out
        info = _distill(run)["teacher_cache"]
        assert info["status"] == "bypassed" and reason in info["reason"], info
