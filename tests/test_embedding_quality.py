"""Quality metrics on hand-made vectors with known answers; the Lee set from the installed gensim wheel."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from kdpipe.errors import DataError, ModelError
from kdpipe.tasks.embedding.quality import (
    LEE_DOCUMENTS,
    LEE_PAIRS,
    CosineDistributions,
    LeeSet,
    cosine_distributions,
    gensim_test_data,
    lee_score,
    load_lee,
    mean_cosine,
    plot_distributions,
    recall_at_k,
)


def _has_gensim() -> bool:
    try:
        return (gensim_test_data() / "lee.cor").is_file()
    except DataError:
        return False


needs_gensim = pytest.mark.skipif(not _has_gensim(), reason="gensim (which ships the Lee set) is not installed")
RNG = np.random.default_rng(0)
VECTORS = RNG.normal(size=(200, 24))


def _rotation(d: int) -> np.ndarray:
    q, _ = np.linalg.qr(RNG.normal(size=(d, d)))
    return q


def test_identical_and_rotated_embeddings() -> None:
    assert recall_at_k(VECTORS, VECTORS) == 1.0
    assert mean_cosine(VECTORS, VECTORS) == pytest.approx(1.0)
    rotated = VECTORS @ _rotation(24)
    assert recall_at_k(rotated, VECTORS) == 1.0  # a rotation keeps every cosine, so every neighbour
    assert mean_cosine(rotated, VECTORS) < 0.5  # but the vectors themselves moved
    assert recall_at_k(VECTORS * 3.0, VECTORS) == 1.0  # and scale does not count


def test_shuffled_rows_give_chance_recall() -> None:
    shuffled = VECTORS[RNG.permutation(len(VECTORS))]
    assert recall_at_k(shuffled, VECTORS) < 0.15  # chance is 10 / 199
    assert abs(mean_cosine(shuffled, VECTORS)) < 0.1


def test_recall_counts_overlap_exactly() -> None:
    teacher = np.array([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]])
    student = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9], [0.9, 0.1]])  # rows 1 and 3 swapped
    # teacher nn: 0->1, 1->0, 2->3, 3->2 ; student nn: 0->3, 1->2, 2->1, 3->0 : no overlap
    assert recall_at_k(student, teacher, k=1) == 0.0
    assert recall_at_k(teacher, teacher, k=1) == 1.0
    with pytest.raises(DataError, match="needs more than 4 held-out sentences"):
        recall_at_k(teacher, teacher, k=4)


def test_nan_and_bad_shapes_fail() -> None:
    bad = VECTORS.copy()
    bad[3, 5] = np.nan
    for fn in (recall_at_k, mean_cosine):
        with pytest.raises(ModelError, match="1 of 200 embeddings contain NaN"):
            fn(bad, VECTORS)  # type: ignore[operator]
        with pytest.raises(ModelError, match="teacher: 1 of 200"):
            fn(VECTORS, bad)  # type: ignore[operator]
    with pytest.raises(ModelError, match="24-wide, the teacher's 8"):
        mean_cosine(VECTORS, VECTORS[:, :8])
    assert recall_at_k(VECTORS[:, :8], VECTORS) < 1.0  # widths may differ for recall
    with pytest.raises(ModelError, match="shape"):
        mean_cosine(VECTORS, VECTORS[:10])
    zero = VECTORS.copy()
    zero[0] = 0.0
    with pytest.raises(ModelError, match="all zeros"):
        mean_cosine(zero, VECTORS)


def _fake_lee() -> LeeSet:
    docs = tuple(f"doc {i}" for i in range(LEE_DOCUMENTS))
    return LeeSet(docs, RNG.uniform(size=LEE_PAIRS))


@pytest.mark.parametrize("seed", [1, 2])
def test_lee_score_of_an_encoder_that_knows_the_answer(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(LEE_DOCUMENTS, 16))
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    cosines = (unit @ unit.T)[np.triu_indices(LEE_DOCUMENTS, 1)]
    lee = LeeSet(tuple(f"d{i}" for i in range(LEE_DOCUMENTS)), 2 * cosines + 1)  # an affine map of the cosines
    score = lee_score(lambda texts: base, lee)
    assert score.spearman == pytest.approx(1.0) and score.pearson == pytest.approx(1.0) and score.pairs == LEE_PAIRS
    reversed_lee = LeeSet(lee.documents, -lee.human)
    assert lee_score(lambda texts: base, reversed_lee).spearman == pytest.approx(-1.0)


def test_constant_embeddings_give_an_error_not_nan() -> None:
    lee = _fake_lee()
    with pytest.raises(ModelError, match="Lee Spearman is nan"):
        lee_score(lambda texts: np.ones((len(texts), 4)), lee)
    with pytest.raises(ModelError, match="contain NaN"):
        lee_score(lambda texts: np.full((len(texts), 4), np.nan), lee)
    with pytest.raises(ModelError, match=r"shape \(49, 4\)"):
        lee_score(lambda texts: np.ones((49, 4)), lee)


@needs_gensim
def test_lee_set_from_the_installed_gensim() -> None:
    lee = load_lee()
    assert len(lee.documents) == 50 and lee.human.shape == (1225,)
    assert lee.documents[0].startswith("The national executive of the strife-torn Democrats")
    assert np.isfinite(lee.human).all() and lee.human.min() >= 0.0 and lee.human.max() <= 1.0
    # tf-idf bag of words: Lee et al. report a correlation of about 0.5 for such word-overlap models; raw counts
    # (dominated by stop words) do worse, and scores shuffled across pairs do not correlate at all
    docs = [re.findall(r"[a-z]+", d.lower()) for d in lee.documents]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    df = np.zeros(len(vocab))
    for d in docs:
        df[[vocab[w] for w in set(d)]] += 1

    def bag(texts: Sequence[str], idf: bool = True) -> np.ndarray:
        out = np.zeros((len(texts), len(vocab)))
        for r, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[r, vocab[w]] += 1
        return out * np.log(len(docs) / df) if idf else out

    tfidf, counts = lee_score(bag, lee), lee_score(lambda t: bag(t, idf=False), lee)
    assert 0.45 < tfidf.pearson < 0.65 and 0.15 < tfidf.spearman < 0.4, tfidf
    assert counts.pearson < tfidf.pearson - 0.2
    shuffled = LeeSet(lee.documents, np.random.default_rng(0).permutation(lee.human))
    assert abs(lee_score(bag, shuffled).pearson) < 0.1


def test_missing_lee_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be read"):
        load_lee(tmp_path)


@needs_gensim
def test_cosine_distributions_and_plot(tmp_path: Path) -> None:
    lee = load_lee()
    rng = np.random.default_rng(5)
    base = rng.normal(size=(LEE_DOCUMENTS, 8))
    teacher = cosine_distributions(lambda texts: base, lee)
    high, low = np.quantile(lee.human, [0.75, 0.25])
    assert teacher.similar.size == int((lee.human >= high).sum()) >= LEE_PAIRS // 4
    assert teacher.dissimilar.size == int((lee.human <= low).sum()) >= LEE_PAIRS // 4
    assert (teacher.similar_threshold, teacher.dissimilar_threshold) == (high, low)
    student = CosineDistributions(teacher.similar * 0.5, teacher.dissimilar * 0.5, high, low)
    assert student.separation == pytest.approx(teacher.separation * 0.5)
    png = plot_distributions(tmp_path / "fig" / "cosines.png", teacher, student)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
