"""The static-embedding student (model2vec's distillation) on the tiny teacher."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from test_embedding_tiny import SENTENCES, make_st_dir

from kdpipe.errors import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("model2vec") is None or importlib.util.find_spec("skeletoken") is None,
    reason="model2vec[distill]==0.9.0 is not installed",
)


def _pair_cosines(v: np.ndarray) -> np.ndarray:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    return (u @ u.T)[np.triu_indices(len(v), 1)]


def test_static_student_shape_determinism_and_agreement(tmp_path: Path) -> None:
    from scipy import stats

    from kdpipe.tasks.embedding.encoder import encode, load_encoder
    from kdpipe.tasks.embedding.static import distill_static, load_static, static_embedder

    teacher_dir = make_st_dir(tmp_path / "teacher", pooling="mean", init=0.05)
    student = distill_static(teacher_dir, tmp_path / "static", pca_dims=16)
    assert (student.dim, student.pooling) == (16, "mean") and student.vocab_size > 50
    assert "model2vec 0.9.0" in student.method
    embed = static_embedder(student.path)
    vectors = embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=5e-3)  # stored as float16
    assert embed([]).shape == (0, 16)
    again = distill_static(teacher_dir, tmp_path / "static-2", pca_dims=16)
    np.testing.assert_array_equal(static_embedder(again.path)(SENTENCES), vectors)  # deterministic
    assert load_static(student.path).dim == 16  # model2vec's own loader reads the folder
    encoder, tokenizer = load_encoder(teacher_dir)
    teacher = encode(encoder, tokenizer, SENTENCES)
    rho = stats.spearmanr(_pair_cosines(vectors), _pair_cosines(teacher)).statistic
    # against the same vectors given to the wrong sentences: what a broken token mapping would score
    permuted = vectors[np.random.default_rng(0).permutation(len(vectors))]
    chance = stats.spearmanr(_pair_cosines(permuted), _pair_cosines(teacher)).statistic
    assert rho > 0.4 and rho > chance + 0.3, (rho, chance)


def test_pca_dims_wider_than_the_teacher_is_refused(tmp_path: Path) -> None:
    from kdpipe.tasks.embedding.static import distill_static

    with pytest.raises(ConfigError, match="pca_dims: 65 is not between 1 and the teacher's width 64"):
        distill_static(make_st_dir(tmp_path / "teacher"), tmp_path / "static", pca_dims=65)
    assert not (tmp_path / "static").exists()


def test_corpus_sif_weights_are_model2vecs_rows_times_count_weights(tmp_path: Path) -> None:
    from kdpipe.tasks.embedding.static import distill_static, load_static, static_embedder, token_table

    teacher_dir = make_st_dir(tmp_path / "teacher", pooling="mean", init=0.05)
    counted = SENTENCES * 3 + ["the the the the"]  # "the" is by far the most frequent token
    plain = distill_static(teacher_dir, tmp_path / "plain", pca_dims=16, sif_coefficient=None, quantize_to="float32")
    corpus = distill_static(teacher_dir, tmp_path / "corpus", pca_dims=16, sif_coefficient=1e-2, frequencies=counted)
    assert f"over the token counts of {len(counted)} sentences" in corpus.method
    weighted, unweighted = load_static(corpus.path), load_static(plain.path)
    assert weighted.config["sif_frequencies"] == "corpus" and weighted.embedding.dtype == np.float16
    ids = [list(r) for r in weighted.tokenize(counted, max_length=512)]
    counts = np.bincount(np.concatenate(ids), minlength=len(weighted.tokens)).astype(np.float64)
    proba = (counts + 1) / (counts.sum() + len(counts))
    want = token_table(unweighted) * (1e-2 / (1e-2 + proba))[:, None]
    np.testing.assert_allclose(token_table(weighted), want, rtol=2e-3, atol=1e-4)  # float16 storage
    the, unseen = weighted.tokenizer.token_to_id("the"), int(np.argmin(counts))
    w = np.linalg.norm(token_table(weighted), axis=1) / np.linalg.norm(token_table(unweighted), axis=1)
    assert w[the] < 0.1 < 0.7 < w[unseen], (w[the], w[unseen])  # the frequent token is weighted down
    vectors = static_embedder(corpus.path)(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 16) and np.isfinite(vectors).all()


def test_corpus_weights_with_no_sentences_are_refused(tmp_path: Path) -> None:
    from kdpipe.tasks.embedding.static import distill_static

    with pytest.raises(ConfigError, match="sif_frequencies: corpus needs sentences"):
        distill_static(make_st_dir(tmp_path / "teacher"), tmp_path / "static", pca_dims=8, frequencies=[])
    assert not (tmp_path / "static").exists()


def test_a_nan_in_the_token_table_is_refused_not_written_or_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdpipe.errors import ExportToleranceError, ModelError
    from kdpipe.tasks.embedding import static
    from kdpipe.tasks.embedding.static_onnx import export_static_onnx

    teacher_dir = make_st_dir(tmp_path / "teacher", pooling="mean", init=0.05)
    real = static.corpus_sif_weights

    def planted(model, sentences, a):  # type: ignore[no-untyped-def]
        w = real(model, sentences, a)
        w[7] = np.nan  # a planted fault: one token's weight (so its table row) is NaN
        return w

    monkeypatch.setattr(static, "corpus_sif_weights", planted)
    with pytest.raises(ModelError, match=r"1 of \d+ rows with NaN or inf \(first: token id 7\); it is refused"):
        static.distill_static(teacher_dir, tmp_path / "static", pca_dims=8, frequencies=SENTENCES)
    assert not (tmp_path / "static").exists()  # nothing written
    monkeypatch.setattr(static, "corpus_sif_weights", real)
    good = static.distill_static(teacher_dir, tmp_path / "good", pca_dims=8, frequencies=SENTENCES)
    model = static.load_static(good.path)
    table = static.token_table(model)
    table[3, 2] = np.inf
    with pytest.raises(ExportToleranceError, match=r"1 of \d+ rows with NaN or inf \(first: token id 3\)"):
        export_static_onnx(model, tmp_path / "bad" / "model.onnx", table=table)
    assert not (tmp_path / "bad").exists()


def test_sif_frequencies_option() -> None:
    from pydantic import ValidationError

    from kdpipe.config import StaticStudentConfig

    assert StaticStudentConfig().sif_frequencies == "zipf"  # model2vec's own weighting stays the default
    assert StaticStudentConfig(sif_frequencies="corpus").sif_frequencies == "corpus"
    with pytest.raises(ValidationError):
        StaticStudentConfig(sif_frequencies="tweets")  # type: ignore[arg-type]


def _teacher_targets(teacher_dir: Path, texts: list[str]) -> np.ndarray:
    from kdpipe.tasks.embedding.encoder import encode, load_encoder

    encoder, tokenizer = load_encoder(teacher_dir)
    return encode(encoder, tokenizer, texts)


def test_a_finetuned_table_is_nearer_the_teacher_and_exports_with_parity(tmp_path: Path) -> None:
    from kdpipe.tasks.embedding.static import (
        distill_static,
        finetune_static,
        load_static,
        static_embedder,
        token_table,
    )
    from kdpipe.tasks.embedding.static_onnx import export_static_onnx, static_parity

    teacher_dir = make_st_dir(tmp_path / "teacher", pooling="mean", init=0.05)
    texts = SENTENCES * 4
    targets = _teacher_targets(teacher_dir, texts)
    plain = distill_static(teacher_dir, tmp_path / "plain", pca_dims=16)
    trained = distill_static(teacher_dir, tmp_path / "trained", pca_dims=16, train_on=(texts, targets), epochs=30)
    assert trained.dim == 64 and "then trained on the teacher's embeddings of" in trained.method  # teacher's width
    model = load_static(trained.path)
    assert model.config["finetune_epochs"] == 30 and np.isfinite(token_table(model)).all()
    again, info = finetune_static(load_static(plain.path), texts, targets, epochs=30)  # the same table, seeded
    np.testing.assert_allclose(token_table(again), token_table(model), atol=2e-3)  # float16, threaded sums
    assert info.val_cosine_after >= info.val_cosine_before and 0 <= info.best_epoch <= 30
    got = static_embedder(trained.path)(SENTENCES)
    unit = targets[: len(SENTENCES)] / np.linalg.norm(targets[: len(SENTENCES)], axis=1, keepdims=True)
    assert float((got * unit).sum(axis=1).mean()) > 0.9  # in the teacher's space now
    before = _pair_cosines(static_embedder(plain.path)(SENTENCES))
    after, want = _pair_cosines(got), _pair_cosines(unit)
    assert np.abs(after - want).mean() < np.abs(before - want).mean()  # the pair structure moved towards the teacher
    exported = export_static_onnx(model, tmp_path / "onnx" / "model.onnx")  # the graph holds the trained table
    assert exported.dim == 64 and static_parity(model, exported.path, SENTENCES).min_cosine >= 0.9999


def test_a_nan_in_the_trained_table_is_refused_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import model2vec.distill.distillation  # noqa: F401  (binds model2vec's own quantize_embeddings before the patch)
    from model2vec import quantization

    from kdpipe.errors import ModelError
    from kdpipe.tasks.embedding.static import distill_static

    teacher_dir = make_st_dir(tmp_path / "teacher", pooling="mean", init=0.05)
    texts = SENTENCES * 4
    targets = _teacher_targets(teacher_dir, texts)
    real = quantization.quantize_embeddings

    def planted(embeddings, dtype):  # type: ignore[no-untyped-def]
        out = real(embeddings, dtype)
        out[7, 3] = np.nan  # a planted fault: one row of the trained table is NaN
        return out

    monkeypatch.setattr(quantization, "quantize_embeddings", planted)
    with pytest.raises(ModelError, match=r"1 of \d+ rows with NaN or inf \(first: token id 7\); it is refused, not"):
        distill_static(teacher_dir, tmp_path / "static", pca_dims=16, train_on=(texts, targets), epochs=2)
    assert not (tmp_path / "static").exists()  # nothing written, so nothing to export
    monkeypatch.setattr(quantization, "quantize_embeddings", real)
    targets[5, 0] = np.nan  # a NaN teacher embedding is refused before any training
    with pytest.raises(ModelError, match=f"1 of {len(texts)} teacher embeddings of the transfer sentences are not"):
        distill_static(teacher_dir, tmp_path / "static", pca_dims=16, train_on=(texts, targets), epochs=2)
    assert not (tmp_path / "static").exists()


def test_finetune_needs_sentences(tmp_path: Path) -> None:
    from kdpipe.tasks.embedding.static import distill_static

    with pytest.raises(ConfigError, match="finetune_epochs: 3 of 3 transfer sentences have a token"):
        distill_static(make_st_dir(tmp_path / "teacher"), tmp_path / "static", pca_dims=8,
                       train_on=(SENTENCES[:3], np.ones((3, 64), np.float32)), epochs=1)  # fmt: skip
