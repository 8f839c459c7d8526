"""ONNX export with pooling + normalisation in the graph, and sentence-transformers' ONNX backend layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_embedding_tiny import SENTENCES, make_st_dir

from kdpipe.errors import ExportToleranceError, ModelError
from kdpipe.tasks.embedding.encoder import SentenceEncoder, encode, load_encoder, save_sentence_transformers
from kdpipe.tasks.embedding.onnx import PARITY_SHAPES, export_onnx, onnx_parity, st_backend_parity, write_st_onnx


@pytest.mark.parametrize(("mode", "dense"), [("mean", None), ("cls", 32), ("max", None)])
def test_graph_has_pooling_inside_and_matches_pytorch(tmp_path: Path, mode: str, dense: int | None) -> None:
    import onnx
    import onnxruntime as ort

    encoder, tokenizer = load_encoder(make_st_dir(tmp_path / "st", pooling=mode, dense_out=dense))
    export = export_onnx(encoder, tmp_path / "model.onnx")
    graph = onnx.load(str(export.path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["sentence_embedding"] and export.dim == (dense or 64)
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert (out_dims[0].dim_param, out_dims[1].dim_value) == ("batch_size", dense or 64)
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    assert export.opset == 17 and any(
        op.domain in ("", "ai.onnx") and op.version == 17 for op in onnx.load(str(export.path)).opset_import
    )
    parity = onnx_parity(encoder, tokenizer, export.path, SENTENCES)
    assert parity.passed and parity.min_cosine >= 0.9999
    assert [(b, t) for b, t, _ in parity.per_shape] == list(PARITY_SHAPES) == [(1, 8), (4, 16), (7, 33)]
    # one call gives the unit embedding: rows have norm 1 straight out of onnxruntime
    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    batch = tokenizer(SENTENCES[:5], padding=True, return_tensors="np")
    (out,) = session.run(None, {k: v.astype(np.int64) for k, v in batch.items()})
    assert out.shape == (5, dense or 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, encode(encoder, tokenizer, SENTENCES[:5]), atol=1e-4)


def test_export_uses_eager_attention_and_leaves_the_encoder_alone(tmp_path: Path) -> None:
    import onnx

    encoder, _ = load_encoder(make_st_dir(tmp_path / "st"))
    before = encoder.backbone.config._attn_implementation
    export_onnx(encoder, tmp_path / "model.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"MatMul", "Softmax"} <= ops  # eager attention: the pattern onnxruntime's fusions look for
    assert encoder.backbone.config._attn_implementation == before
    assert not list(tmp_path.glob(".*partial"))


def test_parity_failure_is_an_error_not_a_pass(tmp_path: Path) -> None:
    encoder, tokenizer = load_encoder(make_st_dir(tmp_path / "st"))
    path = export_onnx(encoder, tmp_path / "model.onnx").path
    with torch.no_grad():  # the PyTorch model moves on, the exported graph does not
        encoder.backbone.embeddings.word_embeddings.weight.mul_(-1.0).add_(0.3)
    with pytest.raises(ExportToleranceError, match="min cosine .* < 0.9999 \\(worst at batch"):
        onnx_parity(encoder, tokenizer, path, SENTENCES)


def test_sentence_transformers_onnx_backend_loads_the_student(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from test_embedding_tiny import make_bert, make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(7)
    student = SentenceEncoder(make_bert(len(tokenizer), seed=4), "mean", True, torch.nn.Linear(64, 32), 48).eval()
    st_dir = save_sentence_transformers(student, tokenizer, tmp_path / "student")
    with pytest.raises(ModelError, match="not a sentence-transformers folder"):
        write_st_onnx(student, tmp_path)
    path = write_st_onnx(student, st_dir)
    assert path == st_dir / "onnx" / "model.onnx"
    vectors = SentenceTransformer(str(st_dir), backend="onnx", device="cpu").encode(SENTENCES)
    expected = encode(student, tokenizer, SENTENCES)
    cos = (vectors * expected).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1))
    assert vectors.shape == (len(SENTENCES), 32) and cos.min() >= 0.9999
    assert st_backend_parity(st_dir, student, tokenizer, SENTENCES).passed
    # the torch backend of the same folder is unaffected by the onnx/ subfolder
    assert SentenceTransformer(str(st_dir), device="cpu").encode(SENTENCES[:2]).shape == (2, 32)
