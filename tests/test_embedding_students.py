"""Embedding students beyond a layer subset: a width-pruned transformer (heads and FFN neurons removed by the
gradient of the embedding MSE to the teacher) and a BiLSTM sentence encoder, each through student -> distill ->
export with `kdpipe run` on a tiny teacher built in code; the distilled folders load in sentence-transformers; a
head fraction no layer can afford, NaN weights and a graph with static axes are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke
from test_embedding_task import _recipe, _sentences
from test_embedding_tiny import SENTENCES, make_st_dir

from kdpipe.errors import ExportToleranceError

TEXTS = ["the cat sleeps on the road", "a dog runs in the city fast", "snow falls on the green tree"]
BILSTM = {"arch": "bilstm", "bilstm": {"hidden_size": 16, "embedding_dim": 32, "dropout": 0.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("emb-students-inputs")
    return make_st_dir(base / "teacher", pooling="mean", normalize=True), _sentences(base / "sentences.txt")


def _run(base: Path, tiny: tuple[Path, Path], student: dict[str, Any]) -> Path:
    recipe = _recipe(base, *tiny, student=student)
    code, out = invoke("run", recipe)
    assert code == 0, out
    return base / "runs"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, Path]) -> Path:
    width = {"heads": 0.5, "ffn": 0.5, "batches": 2}
    return _run(tmp_path_factory.mktemp("emb-pruned"), tiny, {"layers": [0, 1], "width": width})


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, Path]) -> Path:
    return _run(tmp_path_factory.mktemp("emb-bilstm"), tiny, BILSTM)


def _manifest(runs: Path, stage: str) -> dict[str, Any]:
    return dict(json.loads((runs / stage / "manifest.json").read_text()))


def _st_matches_kdpipe(folder: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from kdpipe.tasks.embedding.encoder import encode, load_encoder

    ours = encode(*load_encoder(folder), TEXTS)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    return np.asarray(theirs)


def test_a_width_pruned_student_distils_and_exports_with_parity(pruned: Path) -> None:
    from sentence_transformers import SentenceTransformer

    width = _manifest(pruned, "student")["record"]["width"]
    assert sum(len(h) for h in width["heads_removed"].values()) == 4  # half of 2 layers x 4 heads
    assert (width["ffn_kept"], width["ffn_total"]) == (64, 128)
    assert width["params_after"] < width["params_before"]
    config = json.loads((pruned / "distill" / "model" / "config.json").read_text())
    assert config["intermediate_size"] == 64 and sum(len(h) for h in config["pruned_heads"].values()) == 4
    theirs = _st_matches_kdpipe(pruned / "distill" / "model")
    export = _manifest(pruned, "export")["record"]["models"]
    assert export["student"]["spec"]["parity"]["min_cosine"] >= 0.9999
    st = pruned / "export" / "student" / "st"
    onnx = SentenceTransformer(str(st), backend="onnx", device="cpu", model_kwargs={"file_name": "model.onnx"})
    np.testing.assert_allclose(onnx.encode(TEXTS), theirs, atol=1e-4)
    gate = export["student-int8-dynamic"]["gate"]
    assert (
        gate["metric"] == "lee_spearman" and (pruned / "export" / "student" / "model.int8.onnx").is_file() == gate["ok"]
    )


def test_a_bilstm_student_distils_loads_in_sentence_transformers_and_exports(lstm: Path) -> None:
    import onnx
    import onnxruntime as ort

    from kdpipe.tasks.embedding.encoder import encode, load_encoder

    student = _manifest(lstm, "student")
    assert student["record"]["arch"] == "bilstm" and student["metrics"]["dim"]["value"] == 64
    modules = json.loads((lstm / "distill" / "model" / "modules.json").read_text())
    assert modules[0]["type"] == "kdpipe.tasks.embedding.bilstm.BiLSTMTokens"
    assert [m["type"].rsplit(".", 1)[-1] for m in modules[1:]] == ["Pooling", "Dense", "Normalize"]
    _st_matches_kdpipe(lstm / "distill" / "model")
    assert np.isfinite(_manifest(lstm, "distill")["metrics"]["lee_spearman"]["value"])
    export = _manifest(lstm, "export")["record"]["models"]
    spec = export["student"]["spec"]
    assert spec["parity"]["min_cosine"] >= 0.9999 and len(spec["parity"]["per_shape"]) == 3
    assert spec["inputs"] == ["input_ids", "attention_mask"] and spec["sentence_transformers"]["dir"] is None
    assert "student-int8-dynamic" in export
    path = lstm / "export" / "student" / "model.onnx"
    graph = onnx.load(str(path)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    encoder, tok = load_encoder(lstm / "distill" / "model")
    batch = tok(SENTENCES[:5], padding=True, return_tensors="np")  # a shape the parity check did not use
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(got, encode(encoder, tok, SENTENCES[:5]), atol=1e-5)


def test_a_head_fraction_no_layer_can_afford_is_one_line(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, *tiny, student={"layers": [0, 1], "width": {"heads": 0.9}})
    code, out = invoke("run", recipe)
    flat = " ".join(out.split())
    assert code != 0 and "student.width.heads: 0.9 removes 7 of the student's 8 attention heads" in flat, out
    assert "Traceback" not in out
    assert not (tmp_path / "runs" / "student" / "manifest.json").exists()


def test_bilstm_with_nan_weights_is_refused_at_export(
    lstm: Path, tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdpipe.tasks.embedding import export

    shutil.copytree(lstm, tmp_path / "runs")
    recipe = yaml.safe_load(_recipe(tmp_path, *tiny, student=BILSTM).read_text())
    recipe["out"] = str(tmp_path / "runs")
    recipe["export"]["parity_samples"] = 12  # a new export run id; teacher, student and distill are reused
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    real = export.load

    def poisoned(folder: Path, max_length: int | None = None) -> Any:
        encoder, tok = real(folder, max_length)
        if getattr(encoder.backbone, "token_width", None):
            with torch.no_grad():
                encoder.backbone.forward_lstms[0].weight_hh_l0.fill_(float("nan"))
        return encoder, tok

    monkeypatch.setattr(export, "load", poisoned)
    code, out = invoke("run", tmp_path / "r.yaml")
    assert code != 0 and "holds NaN or inf; not exported" in " ".join(out.split()), out
    assert _manifest(tmp_path / "runs", "export")["config"]["parity_samples"] == 16  # the old export stays


def _bilstm_encoder(tmp_path: Path) -> tuple[Any, Any]:
    from kdpipe.config import BiLSTMStudentConfig
    from kdpipe.tasks.embedding.bilstm import build_parts
    from kdpipe.tasks.embedding.encoder import SentenceEncoder, load_encoder

    teacher, tok = load_encoder(make_st_dir(tmp_path / "teacher"))
    parts = build_parts(BiLSTMStudentConfig(hidden_size=8, embedding_dim=16), teacher, tok, seed=0)
    body, projection, pooling = parts
    return SentenceEncoder(body, pooling, True, projection, teacher.max_seq_length).eval(), tok


def test_a_bilstm_graph_with_static_axes_fails_parity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdpipe.tasks.embedding.onnx import export_onnx, onnx_parity

    encoder, tok = _bilstm_encoder(tmp_path)
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: real(*a, **{**k, "dynamic_axes": None}))
    path = export_onnx(encoder, tmp_path / "static.onnx").path  # the trace shape (2 x 11) is baked in
    with pytest.raises(ExportToleranceError, match="ONNX embeddings differ from PyTorch's: min cosine nan"):
        onnx_parity(encoder, tok, path, SENTENCES)


def test_bilstm_word_vectors_are_the_teachers_or_their_pca(tmp_path: Path) -> None:
    from kdpipe.config import BiLSTMStudentConfig
    from kdpipe.errors import ConfigError
    from kdpipe.tasks.embedding import bilstm
    from kdpipe.tasks.embedding.encoder import BILSTM_MODULE, load_encoder

    assert bilstm.class_path() == BILSTM_MODULE
    teacher, tok = load_encoder(make_st_dir(tmp_path / "teacher"))
    table = teacher.backbone.get_input_embeddings().weight.detach()
    body, _, _ = bilstm.build_parts(BiLSTMStudentConfig(), teacher, tok, seed=0)
    pad = tok.pad_token_id
    keep = [i for i in range(table.shape[0]) if i != pad]
    torch.testing.assert_close(body.embeddings.weight[keep], table[keep])
    body, projection, _ = bilstm.build_parts(BiLSTMStudentConfig(embedding_dim=16), teacher, tok, seed=0)
    assert body.embeddings.weight.shape == (table.shape[0], 16) and projection.out_features == teacher.dim
    with pytest.raises(ConfigError, match="student.bilstm.embedding_dim 65 is wider"):
        bilstm.build_parts(BiLSTMStudentConfig(embedding_dim=65), teacher, tok, seed=0)


@pytest.mark.parametrize(
    ("student", "needle"),
    [
        ({**BILSTM, "width": {"heads": 0.5}}, "arch: bilstm builds a new network, which does not combine with width"),
        ({"arch": "bilstm", "layers": [0]}, "student.arch: bilstm: layers is not available"),
        ({"layers": [0], "vocab": {"min_count": 1}}, "student: vocab is not available for embedding"),
    ],
)
def test_embedding_student_options_refused_before_a_model_loads(
    tiny: tuple[Path, Path], tmp_path: Path, student: dict[str, Any], needle: str
) -> None:
    code, out = invoke("validate", _recipe(tmp_path, *tiny, student=student))
    assert code != 0 and needle in " ".join(out.split()), out


@pytest.mark.parametrize("student", [BILSTM, {"layers": [0], "width": {"heads": 0.25, "ffn": 0.5}}])
def test_bilstm_and_width_recipes_validate(tiny: tuple[Path, Path], tmp_path: Path, student: dict[str, Any]) -> None:
    code, out = invoke("validate", _recipe(tmp_path, *tiny, student=student))
    assert code == 0, out


def test_importance_takes_an_embedding_loss_without_labels() -> None:
    from test_embedding_tiny import make_bert

    from kdpipe.compress.prune import importance

    model = make_bert(40)
    ids = torch.randint(5, 40, (3, 7))
    target = torch.randn(3, 64)

    def loss(m: Any, batch: dict[str, Any], head_mask: Any) -> Any:
        out = m(input_ids=batch["input_ids"], head_mask=head_mask).last_hidden_state.mean(1)
        return ((out - batch["target"]) ** 2).mean(1).sum()

    imp = importance(model, [{"input_ids": ids, "target": target}], 1, loss_fn=loss)
    assert np.array(imp.heads).shape == (2, 4) and np.array(imp.ffn).shape == (2, 128)
    assert np.isfinite(imp.heads).all() and np.array(imp.ffn).sum() > 0
