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
