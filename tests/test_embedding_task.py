"""teacher.task: embedding through every stage with `kdpipe run`: a tiny sentence encoder built in code (no hub),
the distilled student and its ONNX layout loaded by sentence-transformers, a diverging run and a parity failure
stopped with one line, and bad recipes refused before any model loads."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import invoke
from test_embedding_tiny import WORDS, make_st_dir

STAGES = ("teacher", "student", "distill", "export", "profile")


def _sentences(path: Path, n: int = 260) -> Path:
    rng = random.Random(0)
    lines = {" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(3 * n)}
    path.write_text("\n".join(sorted(lines)[:n]) + "\n", encoding="utf-8")
    return path


def _recipe(base: Path, teacher: Path, sentences: Path, **over: Any) -> Path:
    profile = base / "tiny-embedding-profile.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "tiny-embedding", "description": "test profile.", "intra_op_threads": 1,
        "shapes": [{"batch": 1, "seq": 16}], "warmup": 1, "min_runs": 3, "min_seconds": 0.0, "rounds": 1,
        "torch_eager": False, "variants": ["fp32"], "deploy": "fp32", "profile_ops": False,
    }))  # fmt: skip
    recipe: dict[str, Any] = {
        "out": str(base / "runs"),
        "teacher": {"task": "embedding", "model": str(teacher),
                    "embedding": {"sentences": str(sentences), "held_out": 40, "transfer_size": 160}},
        "student": {"layers": [0]},
        "distill": {"epochs": 1.0, "batch_size": 16, "lr": 1e-3, "baseline": False,
                    "embedding": {"mse": 1.0, "cosine": 1.0, "contrastive": 0.1}},
        "export": {"variants": ["int8-dynamic"], "parity_samples": 16},
        "profile": str(profile),
    }  # fmt: skip
    for key, value in over.items():
        section, _, field = key.partition("__")
        recipe[section] = value if not field else {**recipe[section], field: value}
    path = base / "embedding.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("emb-inputs")
    return make_st_dir(base / "teacher", pooling="mean", normalize=True), _sentences(base / "sentences.txt")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, Path]) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("emb-run")
    recipe = _recipe(base, *tiny)
    code, out = invoke("run", recipe)
    assert code == 0, out
    return recipe, base / "runs", out


def test_every_stage_runs_and_a_second_run_skips_them(run: tuple[Path, Path, str]) -> None:
    recipe, runs, _ = run
    for stage in STAGES:
        assert (runs / stage / "manifest.json").is_file(), stage
    teacher = json.loads((runs / "teacher" / "manifest.json").read_text())
    assert teacher["record"]["info"]["task"] == "embedding"
    assert teacher["record"]["info"]["pooling"] == "mean" and teacher["record"]["info"]["normalize"]
    distill = json.loads((runs / "distill" / "manifest.json").read_text())["metrics"]
    for name in ("lee_spearman", "lee_pearson", "mean_cosine", "recall_at_10", "retention"):
        assert name in distill, name
    report = (runs / "profile" / "report.md").read_text()
    assert "Lee Spearman" in report and "recall@10" in report and "p50 ms" in report
    assert (runs / "profile" / "cosines.png").is_file()
    from test_cards import check_cards  # every model directory's README.md, its code run from the run directory

    models = {"teacher/model", "student/model", "distill/model", "export/student", "export/student/st"}
    cards = check_cards(runs, models | {"export/teacher"})
    assert (
        "library_name: sentence-transformers" in cards["export/student/st"]
        and 'backend="onnx"' in cards["export/student/st"]
    )
    code, out = invoke("run", recipe)
    assert code == 0, out
    assert "re-running" not in out
    before = {s: json.loads((runs / s / "manifest.json").read_text())["run_id"] for s in STAGES}
    assert before == {s: json.loads((runs / s / "manifest.json").read_text())["run_id"] for s in STAGES}


def test_sentence_transformers_loads_the_student_and_its_onnx_layout(run: tuple[Path, Path, str]) -> None:
    from sentence_transformers import SentenceTransformer

    from kdpipe.tasks.embedding.encoder import encode, load_encoder

    _, runs, _ = run
    texts = ["the cat sleeps on the road", "a dog runs in the city fast"]
    ours = encode(*load_encoder(runs / "distill" / "model"), texts)
    theirs = SentenceTransformer(str(runs / "distill" / "model"), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    st = runs / "export" / "student" / "st"
    onnx = SentenceTransformer(str(st), backend="onnx", device="cpu", model_kwargs={"file_name": "model.onnx"})
    np.testing.assert_allclose(onnx.encode(texts), theirs, atol=1e-4)
    export = json.loads((runs / "export" / "manifest.json").read_text())["record"]["models"]
    assert {"teacher", "student", "student-int8-dynamic"} <= set(export)
    assert export["student"]["spec"]["parity"]["min_cosine"] >= 0.9999
    assert len(export["student"]["spec"]["parity"]["per_shape"]) == 3
    int8 = export["student"]["spec"]["sentence_transformers"]["int8"]
    assert (runs / "export" / int8["file"]).is_file() == int8["ok"]  # a variant that misses its gate is removed
    gate = export["student-int8-dynamic"]["gate"]
    assert gate["budget"] <= gate["reference"]  # the budget lies below the fp32 student's Spearman


def test_a_nan_loss_fails_distill_with_one_line(
    run: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from kdpipe.tasks.embedding import distill

    recipe, runs, _ = run
    shutil.copytree(runs, tmp_path / "runs")
    data = yaml.safe_load(recipe.read_text())
    data["out"] = str(tmp_path / "runs")
    data["distill"]["lr"] = 0.5  # a new distill run id; the teacher and student are reused
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    real = distill.loss
    monkeypatch.setattr(distill, "loss", lambda s, t, w: (real(s, t, w)[0] * torch.tensor(float("nan")), {}))
    code, out = invoke("run", tmp_path / "r.yaml")
    assert code != 0
    assert "training diverged at step 1" in out and "lower distill.lr" in out
    assert not (tmp_path / "runs" / "distill" / "manifest.json").read_text().count('"lr": 0.5')


def test_a_parity_failure_fails_export(
    run: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdpipe.tasks.embedding import onnx

    recipe, runs, _ = run
    shutil.copytree(runs, tmp_path / "runs")
    data = yaml.safe_load(recipe.read_text())
    data["out"] = str(tmp_path / "runs")
    data["export"]["parity_samples"] = 12  # a new export run id
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    real = onnx._min_row_cosine
    monkeypatch.setattr(onnx, "_min_row_cosine", lambda a, b: real(a + np.roll(a, 1, axis=1), b))
    code, out = invoke("run", tmp_path / "r.yaml")
    assert code != 0
    assert "ONNX embeddings differ from PyTorch's" in out
    assert json.loads((tmp_path / "runs" / "export" / "manifest.json").read_text())["config"]["parity_samples"] == 16


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"distill__losses": [{"name": "hinton"}]}, "distill.losses: hinton are classification terms"),
        ({"student__arch": "bilstm"}, "student.arch: bilstm: layers is not available"),
        ({"student__vocab": {"min_count": 1}}, "student: vocab is not available for embedding"),
    ],
)
def test_bad_embedding_recipes_are_refused_before_a_model_loads(
    tiny: tuple[Path, Path], tmp_path: Path, over: dict[str, Any], needle: str
) -> None:
    code, out = invoke("validate", _recipe(tmp_path, *tiny, **over))
    assert code != 0 and needle in " ".join(out.split()), out


def test_a_plain_transformer_folder_needs_a_pooling_override(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, sentences = tiny
    plain = tmp_path / "plain"
    shutil.copytree(teacher, plain)
    (plain / "modules.json").unlink()
    code, out = invoke("validate", _recipe(tmp_path, plain, sentences))
    assert code != 0 and "is not a sentence encoder" in out, out
    recipe = yaml.safe_load(_recipe(tmp_path, plain, sentences).read_text())
    recipe["teacher"]["embedding"]["pooling"] = "mean"
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(recipe))
    code, out = invoke("validate", tmp_path / "ok.yaml")
    assert code == 0, out


def test_an_empty_corpus_and_embedding_terms_in_a_classification_recipe(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, out = invoke("validate", _recipe(tmp_path, teacher, empty))
    assert code != 0 and "0 distinct non-empty sentences" in out, out
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump({"distill": {"embedding": {"mse": 1.0}}}))
    code, out = invoke("validate", tmp_path / "cls.yaml")
    assert (
        code != 0
        and "distill.embedding (embedding loss terms) is set but teacher.task is classification"
        in " ".join(out.split())
    ), out


def test_the_embedding_sections_leave_other_run_ids_unchanged() -> None:
    from kdpipe.config import DistillConfig, TeacherConfig

    assert "embedding" not in TeacherConfig().model_dump(mode="json")
    assert "embedding" not in DistillConfig().model_dump(mode="json")
    e = TeacherConfig.model_validate({"task": "embedding", "embedding": {}}).model_dump(mode="json")
    assert e["embedding"]["held_out"] == 500


def test_a_text_column_that_does_not_exist(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, sentences = tiny
    table = tmp_path / "table.csv"
    lines = sentences.read_text().splitlines()
    table.write_text("text,sentiment\n" + "\n".join(f"{t},positive" for t in lines) + "\n")
    recipe = yaml.safe_load(_recipe(tmp_path, teacher, sentences).read_text())
    recipe["teacher"]["embedding"].pop("sentences")
    recipe["teacher"]["data"] = {"source": str(table), "text_column": "body"}
    (tmp_path / "col.yaml").write_text(yaml.safe_dump(recipe))
    code, out = invoke("validate", tmp_path / "col.yaml")
    assert code != 0 and "body" in out, out
    recipe["teacher"]["data"]["text_column"] = "text"
    (tmp_path / "col.yaml").write_text(yaml.safe_dump(recipe))
    code, out = invoke("validate", tmp_path / "col.yaml")
    assert code == 0, out


def test_the_loss_terms_by_hand() -> None:
    import torch

    from kdpipe.config import EmbeddingDistillConfig
    from kdpipe.tasks.embedding.distill import loss

    torch.manual_seed(0)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    w = EmbeddingDistillConfig(mse=2.0, cosine=0.5, contrastive=1.0, temperature=0.1)
    total, parts = loss(s, t, w)
    mse = ((s - t) ** 2).mean()
    cos = 1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    sim = (s / s.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T / 0.1
    nce = -(sim.diag() - sim.logsumexp(dim=1)).mean()
    assert parts == pytest.approx({"mse": float(mse), "cosine": float(cos.mean()), "contrastive": float(nce)}, 1e-5)
    assert float(total) == pytest.approx(float(2 * mse + 0.5 * cos.mean() + nce), rel=1e-5)
    same, _ = loss(t, t, EmbeddingDistillConfig(mse=1.0, cosine=1.0))
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_retention_is_undefined_for_a_zero_or_nan_teacher() -> None:
    from kdpipe.tasks.embedding.distill import _retention

    assert _retention(0.4, 0.5) == 80.0
    assert _retention(0.4, 0.0) is None and _retention(0.4, float("nan")) is None and _retention(0.4, None) is None
