"""How good a sentence encoder is, and how close a student is to its teacher.

(a) Lee et al. (2005): 50 news documents, every pair (1,225) rated for similarity by people; Spearman and Pearson
    between the cosine of two documents' embeddings and the mean human rating. The files ship in the gensim wheel
    (gensim/test/test_data/lee.cor, similarities0-1.txt) and are read from the installed package, never copied:
    gensim is LGPL-2.1 and the data carry no licence of their own (Michael D. Lee gave them to gensim's authors).
(b) held-out sentences: the mean cosine between a student's and the teacher's embedding of each sentence, and
    recall@k of the teacher's k nearest neighbours (self excluded) among the student's k nearest.
(c) the cosine distributions of similar vs dissimilar Lee pairs (top vs bottom quartile of the human scores), for
    the report's figure.

Every metric is checked finite before it is returned: a NaN embedding or metric raises instead of being compared
(NaN >= budget is False, but NaN < budget is False too, so a NaN would pass a "fail when below" gate).
Torch-free; numpy at import, scipy / matplotlib when called.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.errors import DataError, ModelError
from kdpipe.files import shown

Embed = Callable[[Sequence[str]], np.ndarray]
LEE_DOCUMENTS = 50
LEE_PAIRS = LEE_DOCUMENTS * (LEE_DOCUMENTS - 1) // 2  # 1,225
GENSIM_PIN = "gensim==4.4.0"


@dataclass(frozen=True)
class LeeSet:
    """The 50 documents and the human score (0..1) of each pair i < j, in np.triu_indices(50, 1) order: (1225,)."""

    documents: tuple[str, ...]
    human: np.ndarray


@dataclass(frozen=True)
class LeeScore:
    """Spearman / Pearson correlation of embedding cosines with the human scores over `pairs` pairs."""

    spearman: float
    pearson: float
    pairs: int


@dataclass(frozen=True)
class CosineDistributions:
    """Cosines (N,) of the similar pairs (human score >= the upper quartile) and of the dissimilar ones
    (<= the lower quartile); `separation` = mean(similar) - mean(dissimilar)."""

    similar: np.ndarray
    dissimilar: np.ndarray
    similar_threshold: float
    dissimilar_threshold: float

    @property
    def separation(self) -> float:
        return float(self.similar.mean() - self.dissimilar.mean())


def gensim_test_data() -> Path:
    """gensim's test_data folder in the installed wheel, found without importing gensim (which is slow)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Lee et al. similarity set ships inside the gensim wheel, and gensim is not installed",
            f"pip install {GENSIM_PIN} (kdpipe reads two of its test files; nothing of gensim is imported)",
        )
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def load_lee(folder: Path | None = None) -> LeeSet:
    """The Lee set from gensim's test data (or `folder` holding lee.cor and similarities0-1.txt)."""
    folder = folder or gensim_test_data()
    docs_file, sims_file = folder / "lee.cor", folder / "similarities0-1.txt"
    try:
        # latin-1: the corpus has a few pound signs in that encoding (gensim's own test reads it so)
        documents = tuple(line.strip() for line in docs_file.read_text(encoding="latin-1").splitlines() if line.strip())
        matrix = np.loadtxt(sims_file)
    except (OSError, ValueError) as e:
        raise DataError(
            f"{shown(folder)}: the Lee similarity files cannot be read ({e})", f"pip install {GENSIM_PIN}"
        ) from None
    if len(documents) != LEE_DOCUMENTS or matrix.shape != (LEE_DOCUMENTS, LEE_DOCUMENTS):
        raise DataError(
            f"{shown(folder)}: expected {LEE_DOCUMENTS} documents and a {LEE_DOCUMENTS}x{LEE_DOCUMENTS} score matrix, "
            f"found {len(documents)} and {matrix.shape}",
            f"reinstall {GENSIM_PIN}",
        )
    return LeeSet(documents, matrix[np.triu_indices(LEE_DOCUMENTS, 1)])


def _check(name: str, embeddings: np.ndarray, rows: int | None = None) -> np.ndarray:
    """`embeddings` as float64 (N, D), finite and with no zero row (a cosine needs a direction)."""
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or (rows is not None and array.shape[0] != rows):
        want = f"({rows}, D)" if rows is not None else "(N, D)"
        raise ModelError(f"{name}: embeddings of shape {array.shape}, expected {want}", "embed(texts) returns (N, D)")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ModelError(f"{name}: {bad} of {array.shape[0]} embeddings contain NaN or inf", "the model diverged")
    if (np.linalg.norm(array, axis=1) == 0).any():
        raise ModelError(f"{name}: an embedding is all zeros (its cosine is undefined)", "")
    return array


def _unit(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def _finite(name: str, value: float) -> float:
    if not np.isfinite(value):
        raise ModelError(f"{name} is {value} (constant embeddings or scores?); it cannot be compared", "")
    return float(value)


def pair_cosines(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Cosine of every document pair i < j: (50, D) -> (1225,), in the human scores' order."""
    unit = _unit(_check(name, embeddings, LEE_DOCUMENTS))
    return (unit @ unit.T)[np.triu_indices(LEE_DOCUMENTS, 1)]


def lee_score(embed: Embed, lee: LeeSet | None = None, name: str = "model") -> LeeScore:
    """Spearman and Pearson of the model's document cosines with the Lee human scores."""
    from scipy import stats

    lee = lee or load_lee()
    cosines = pair_cosines(embed(list(lee.documents)), name)
    spearman = _finite(f"{name}: Lee Spearman", stats.spearmanr(cosines, lee.human).statistic)
    pearson = _finite(f"{name}: Lee Pearson", stats.pearsonr(cosines, lee.human).statistic)
    return LeeScore(spearman, pearson, len(cosines))


def mean_cosine(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean over rows of cos(student_i, teacher_i): (N, D) x (N, D) -> scalar in [-1, 1]."""
    s = _check("student", student)
    t = _check("teacher", teacher, s.shape[0])
    if s.shape[1] != t.shape[1]:
        raise ModelError(
            f"student embeddings are {s.shape[1]}-wide, the teacher's {t.shape[1]}: their cosine is undefined",
            "give the student a projection to the teacher's width, or compare by recall@k only",
        )
    return _finite("mean cosine", float((_unit(s) * _unit(t)).sum(axis=1).mean()))


def _neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """The k nearest rows of each row by cosine, self excluded: (N, D) -> (N, k) indices."""
    unit = _unit(embeddings)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    # argsort of the negation, stable: ties go to the lower index, the same in both spaces
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def recall_at_k(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each sentence's k nearest neighbours under the teacher (self excluded) that are also among
    its k nearest under the student: (N, Ds) x (N, Dt) -> [0, 1]. The widths may differ."""
    s = _check("student", student)
    t = _check("teacher", teacher, s.shape[0])
    if not 1 <= k < s.shape[0]:
        raise DataError(f"recall@{k} needs more than {k} held-out sentences, got {s.shape[0]}", "use more sentences")
    ns, nt = _neighbours(s, k), _neighbours(t, k)
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ns, nt, strict=True)]
    return _finite(f"recall@{k}", float(np.mean(hits)) / k)


def cosine_distributions(embed: Embed, lee: LeeSet | None = None, name: str = "model") -> CosineDistributions:
    """The model's cosines of the similar (top quartile of human scores) and dissimilar (bottom quartile) Lee pairs.
    The scores have many ties, so each side can hold a little more than a quarter of the 1,225 pairs."""
    lee = lee or load_lee()
    cosines = pair_cosines(embed(list(lee.documents)), name)
    high, low = (float(q) for q in np.quantile(lee.human, [0.75, 0.25]))
    return CosineDistributions(cosines[lee.human >= high], cosines[lee.human <= low], high, low)


def plot_distributions(path: Path, teacher: CosineDistributions, student: CosineDistributions) -> Path:
    """A PNG: histograms of similar vs dissimilar pair cosines, teacher beside student (shared x axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a Figure with an Agg canvas, not pyplot: no global backend or figure state is touched
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    lo = min(float(d.min()) for p in (teacher, student) for d in (p.similar, p.dissimilar))
    bins = np.linspace(min(lo, 0.0), 1.0, 41)
    for ax, title, dist in zip(axes, ("teacher", "student"), (teacher, student), strict=True):
        ax.hist(dist.dissimilar, bins=bins, alpha=0.6, label=f"dissimilar (n={dist.dissimilar.size})", color="tab:red")
        ax.hist(dist.similar, bins=bins, alpha=0.6, label=f"similar (n={dist.similar.size})", color="tab:blue")
        ax.set_title(f"{title}: separation {dist.separation:.3f}")
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("Lee document pairs")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
