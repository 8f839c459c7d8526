"""The embedding profile: PyTorch eager beside onnxruntime on real held-out sentences, report.json for `--compare`,
a missed latency budget failing --strict, a NaN model refused by the timing worker, and the distill stage's CKA
figure in report.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import invoke
from test_embedding_task import _recipe, _sentences
from test_embedding_tiny import make_st_dir

from kdpipe.errors import ModelError
from kdpipe.profiling import timing
from kdpipe.tasks.embedding import profile as emb_profile
from kdpipe.tasks.embedding.timing_loader import LOADER

PROFILE = {
    "name": "tiny-embedding-eager", "description": "test profile.", "intra_op_threads": 1,
    "shapes": [{"batch": 1, "seq": 16}], "warmup": 1, "min_runs": 3, "min_seconds": 0.0, "rounds": 1,
    "torch_eager": True, "variants": ["fp32", "int8-dynamic"], "deploy": "fp32", "profile_ops": False,
}  # fmt: skip


def _profile(path: Path, **over: Any) -> Path:
    path.write_text(yaml.safe_dump({**PROFILE, **over}))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny embedding run of every stage, its profile timing PyTorch eager too."""
    base = tmp_path_factory.mktemp("emb-profile")
    teacher = make_st_dir(base / "teacher", pooling="mean", normalize=True)
    recipe = _recipe(base, teacher, _sentences(base / "sentences.txt"))
    _profile(base / "tiny-embedding-profile.yaml")  # the recipe's profile file, now with torch_eager
    code, out = invoke("run", recipe)
    assert code == 0, out
    return recipe, base / "runs"


def _copy(run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    recipe, runs = run
    shutil.copytree(runs, tmp_path / "runs")
    data = yaml.safe_load(recipe.read_text())
    data["out"] = str(tmp_path / "runs")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "r.yaml", tmp_path / "runs"


def test_eager_and_onnxruntime_are_timed_on_real_sentences(run: tuple[Path, Path]) -> None:
    _, runs = run
    prof = runs / "profile"
    latency = json.loads((prof / "latency.json").read_text())
    assert set(latency["torch_eager"]) == {"teacher", "student"}
    assert {"teacher", "student"} <= set(latency["onnxruntime"])
    key = "1x16"  # the profile's first shape
    for engine in ("torch_eager", "onnxruntime"):
        for name, r in latency[engine].items():
            p50 = r["shapes"][key]["p50_ms"]
            assert p50 > 0 and np.isfinite(p50), (engine, name)
    # the inputs were real sentences: the student's tokenizer, the first held-out sentence, padded with a real mask
    inputs = np.load(prof / "inputs" / "distill.npz")
    held = [json.loads(line)["text"] for line in (runs / "teacher" / "data" / "held_out.jsonl").read_text().split("\n")
            if line.strip()]  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs / "distill" / "model")
    want = tok([held[0]], padding="max_length", truncation=True, max_length=16, return_tensors="np")
    np.testing.assert_array_equal(inputs["1x16/input_ids"], want["input_ids"])
    mask = inputs["32x16/attention_mask"]
    assert mask.shape == (32, 16) and 0 < mask.mean() < 1  # padding: not the synthetic full mask
    assert latency["inputs"]["kind"] == "real held-out sentences"
    report = (prof / "report.md").read_text()
    assert "Inputs timed: real held-out sentences" in report and "PyTorch eager" in report
    assert "| student | PyTorch eager |" in report and "| student | onnxruntime |" in report
    assert "vs teacher eager" in report and "Speed-up vs the teacher in PyTorch eager at 1x16" in report
    if (runs / "distill" / "cka.png").is_file():  # the distill stage's CKA figure, beside report.md
        assert "](cka.png)" in report and (prof / "cka.png").is_file()
    metrics = json.loads((prof / "manifest.json").read_text())["metrics"]
    for name in ("student_eager_speedup_vs_teacher_eager_1x16", "student_speedup_vs_teacher_eager_1x16"):
        x = metrics[name]["value"]
        assert x is not None and x > 0, name
        print(f"{name}: {x:.2f}x")  # an example figure of the tiny model, for the record (-s)
    figures = json.loads((prof / "report.json").read_text())
    assert {"teacher", "student", "teacher-eager", "student-eager"} <= set(figures["models"])
    assert figures["models"]["student-eager"]["engine"] == "torch eager"


def test_compare_a_second_run_with_the_first(run: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = _copy(run, tmp_path)
    first = run[1] / "profile"
    code, out = invoke("profile", "--recipe", recipe, "--out", runs, "--force", "--compare", first / "report.json")
    assert code == 0, out
    assert f"compared with {first / 'report.json'}" in " ".join(out.split()), out
    assert "student" in out
    # a manifest is not a report: refused, never an empty comparison
    code, out = invoke("profile", "--recipe", recipe, "--out", runs, "--compare", first / "manifest.json")
    assert code != 0 and "not a kdpipe report.json" in " ".join(out.split()), out


@pytest.mark.parametrize("budget", ["p50_ms", "p99_ms"])
def test_a_missed_student_latency_budget_fails_strict(run: tuple[Path, Path], tmp_path: Path, budget: str) -> None:
    recipe, runs = _copy(run, tmp_path)
    measured = json.loads((run[1] / "profile" / "latency.json").read_text())["onnxruntime"]["student"]
    limit = measured["shapes"]["1x16"]["p50_ms"] / 1000  # far below what this machine measured
    prof = _profile(tmp_path / "strict.yaml", torch_eager=False, variants=["fp32"], budgets={budget: limit})
    code, out = invoke("profile", "--recipe", recipe, "--out", runs, "--profile", prof, "--strict")
    assert code != 0, out
    flat = " ".join(out.split())
    assert f"{budget[:3]} latency at 1x16" in flat and "--strict" in flat, out


def _nan_copy(src: Path, dst: Path) -> Path:
    """A copy of the sentence-transformers folder `src` with every float weight NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(state, weights)
    return dst


def test_a_nan_model_is_refused_not_timed(run: tuple[Path, Path], tmp_path: Path) -> None:
    runs = run[1]
    folder = _nan_copy(runs / "distill" / "model", tmp_path / "nan")
    inputs = str(runs / "profile" / "inputs" / "distill.npz")
    job = {"model": str(folder), "engine": "torch", "loader": LOADER, "inputs": inputs, "shapes": [[1, 16]],
           "vocab_size": 1, "warmup": 0, "min_runs": 2, "min_seconds": 0.0}  # fmt: skip
    # unchecked, the NaN model "times" like any other: a finite latency of garbage
    unchecked = timing.run_job(job, timeout_s=120)
    assert all(np.isfinite(unchecked["times_s"]["1x16"]))
    # the embedding profile sets check_finite: an error naming the model, never a latency
    with pytest.raises(ModelError, match="not finite") as e:
        timing.run_job({**job, "check_finite": True}, timeout_s=120)
    assert str(folder) in e.value.message


def test_worker_inputs_are_checked(tmp_path: Path) -> None:
    npz = tmp_path / "in.npz"
    arrays: dict[str, Any] = {"1x4/input_ids": np.ones((1, 4), dtype=np.int64)}
    np.savez(npz, **arrays)
    job = timing.normalize_job({"model": "m", "shapes": [[1, 4]], "vocab_size": 9, "inputs": str(npz)})
    feed = timing.job_feed(job, [1, 4], None)
    assert list(feed) == ["input_ids"] and feed["input_ids"].tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ModelError, match="no attention_mask at 1x4"):
        timing.job_feed(job, [1, 4], ["input_ids", "attention_mask"])
    with pytest.raises(ModelError, match="no input_ids at 2x4"):
        timing.job_feed(job, [2, 4], None)
    from kdpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="loader"):
        timing.normalize_job({"model": "m", "shapes": [[1, 4]], "vocab_size": 9, "engine": "torch", "loader": "x"})


def test_real_inputs_repeat_sentences_and_measure_the_mask() -> None:
    def feed(texts: list[str], length: int) -> dict[str, np.ndarray]:
        ids = np.zeros((len(texts), length), dtype=np.int64)
        for i, t in enumerate(texts):
            ids[i, : min(length, len(t.split()))] = 1
        return {"input_ids": ids, "attention_mask": ids.copy()}

    arrays, fill = emb_profile.real_inputs(feed, ["a b", "a b c d"], [[3, 4]])
    assert arrays["3x4/input_ids"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert fill == {"3x4": pytest.approx(8 / 12)}
    assert (
        emb_profile.speedup({"shapes": {"s": {"p50_ms": float("nan")}}}, {"shapes": {"s": {"p50_ms": 1.0}}}, "s")
        is None
    )


class _Distill:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def has(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def path(self, name: str) -> Path:
        return self.folder / name


class _Upstream:
    def __init__(self, folder: Path) -> None:
        self.distill = _Distill(folder)

    def upstream(self, stage: str) -> Any:
        assert stage == "distill"
        return self.distill


def test_the_cka_figure_is_copied_and_linked(run: tuple[Path, Path], tmp_path: Path) -> None:
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.config import TargetProfile

    distill, work = tmp_path / "distill", tmp_path / "profile"
    distill.mkdir()
    work.mkdir()
    (distill / emb_profile.CKA_FIGURE).write_bytes(b"\x89PNG cka")
    copied = emb_profile._copy_figures(_Upstream(distill), work)  # type: ignore[arg-type]
    assert copied == [emb_profile.CKA_FIGURE] and (work / "cka.png").read_bytes() == b"\x89PNG cka"
    runs = run[1]
    latency = json.loads((runs / "profile" / "latency.json").read_text())
    export = read_manifest(runs / "export", "export")
    prof = TargetProfile.model_validate(PROFILE)
    lines = emb_profile.report_lines(export, prof, latency["onnxruntime"], latency["sizes"], [], [], copied,
                                     latency["torch_eager"], latency["inputs"])  # fmt: skip
    assert "](cka.png)" in "\n".join(lines) and "](cosines.png)" not in "\n".join(lines)
