"""A static-embedding student (Model2Vec): one vector per vocabulary token, a sentence is the mean of its tokens'.

The method is the `model2vec` package's own distillation, not a re-implementation: each token of the teacher's
vocabulary is run through the teacher alone ([CLS] token [SEP], pooled), the token vectors are reduced by PCA, and
weighted by SIF over Zipf-estimated frequencies (model2vec 0.9: weight = a / (a + p(rank)), p ~ 1/(rank + 1),
which replaced the earlier log(1 + rank) weighting). model2vec 0.9.0 is the newest release that installs with
kdpipe's pins (0.10 needs huggingface-hub >= 1.0); it works offline on a local folder (no hub call for a path).

The output folder is what `model2vec.StaticModel.from_pretrained` loads (and sentence-transformers'
StaticEmbedding too: model2vec writes a modules.json). Torch-free at import; model2vec's distillation imports
torch and transformers when it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import ConfigError, ModelError
from kdpipe.files import shown
from kdpipe.tasks.embedding.atomic import replacing_dir
from kdpipe.tasks.embedding.pooling import read_sentence_config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np

MODEL2VEC_PIN = "model2vec[distill]==0.9.0"
# model2vec pools each lone token's sequence itself: mean over [CLS] token [SEP], or the first ([CLS]) position.
# It has no max; a max-pooled teacher's static student is built with mean (recorded in StaticStudent.pooling).
_MODEL2VEC_POOLING = {"mean": "mean", "cls": "first", "max": "mean"}


@dataclass(frozen=True)
class StaticStudent:
    """A distilled static model: its folder, width, vocabulary size and how token vectors were pooled."""

    path: Path
    dim: int
    vocab_size: int
    pooling: str
    method: str


def distill_static(
    teacher_dir: Path,
    out_dir: Path,
    *,
    pca_dims: int = 256,
    sif_coefficient: float | None = 1e-4,
    quantize_to: str = "float16",
    device: str = "cpu",
) -> StaticStudent:
    """Distil the sentence-transformers teacher in `teacher_dir` into a static model written to `out_dir` (all or
    nothing): vectors (V, pca_dims). `pca_dims` must not exceed the teacher's width; `sif_coefficient` None turns
    the frequency weighting off; `quantize_to` is the stored dtype (model2vec's default float16 halves the size)."""
    config = read_sentence_config(teacher_dir)
    backbone = teacher_dir / config.backbone
    width = _hidden_size(backbone)
    if not 1 <= pca_dims <= width:
        raise ConfigError(
            f"pca_dims: {pca_dims} is not between 1 and the teacher's width {width}",
            f"use at most {width} (model2vec's default is 256)",
        )
    distill = _model2vec_distill()
    pooling = _MODEL2VEC_POOLING[config.pooling]
    model = distill(
        model_name=str(backbone),
        pca_dims=pca_dims,
        sif_coefficient=sif_coefficient,
        quantize_to=quantize_to,
        device=device,
        pooling=pooling,
    )
    with replacing_dir(out_dir) as staging:
        model.save_pretrained(str(staging))
    vocab, dim = model.embedding.shape
    method = f"model2vec {_model2vec_version()} distill (PCA {dim}, SIF {sif_coefficient}, {quantize_to})"
    return StaticStudent(out_dir, int(dim), int(vocab), pooling, method)


def _hidden_size(backbone: Path) -> int:
    try:
        return int(json.loads((backbone / "config.json").read_text(encoding="utf-8"))["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{shown(backbone / 'config.json')}: no hidden_size ({e})", "") from None


def _model2vec_distill() -> Callable[..., Any]:
    try:
        from model2vec.distill import distill
    except ImportError as e:  # model2vec without its [distill] extra lacks torch / skeletoken
        raise ModelError(
            f"the static student needs model2vec's distillation ({e})",
            f"pip install '{MODEL2VEC_PIN}' (it must not upgrade transformers or huggingface-hub)",
        ) from None
    return distill


def _model2vec_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("model2vec")


def load_static(path: Path) -> Any:
    """The model2vec StaticModel in `path` (ModelError when it is not one)."""
    try:
        from model2vec import StaticModel
    except ImportError as e:
        raise ModelError(f"loading a static student needs model2vec ({e})", f"pip install '{MODEL2VEC_PIN}'") from None
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise ModelError(f"{shown(path)}: not a model2vec folder (model.safetensors + tokenizer.json)", "")
    return StaticModel.from_pretrained(str(path))


def static_embedder(path: Path) -> Callable[[Sequence[str]], np.ndarray]:
    """texts -> float32 (N, D) unit vectors from the static model in `path` (loaded once)."""
    import numpy as np

    model = load_static(path)

    def embed(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.dim), dtype=np.float32)
        # no worker processes: a few thousand sentences take milliseconds, and forks under pytest / DDP misbehave
        return np.asarray(model.encode(list(texts), use_multiprocessing=False), dtype=np.float32)

    return embed


def require_model2vec() -> None:
    """ModelError naming the pinned install when model2vec's distillation cannot be imported (torch-free check)."""
    import importlib.util

    missing = [m for m in ("model2vec", "skeletoken") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"student.arch: static needs model2vec's distillation ({', '.join(missing)} not installed)",
            f"pip install '{MODEL2VEC_PIN}' (it must not upgrade transformers or huggingface-hub)",
        )


def token_table(model: Any) -> np.ndarray:
    """float32 (V, D): the vector StaticModel.encode averages for each token id (its token_mapping row times its
    weight, as model2vec's `_encode_helper` does)."""
    import numpy as np

    rows = np.asarray(model.embedding, dtype=np.float32)
    if model.token_mapping is not None:
        rows = rows[np.asarray(model.token_mapping)]
    if model.weights is not None:
        rows = rows * np.asarray(model.weights, dtype=np.float32)[:, None]
    return np.ascontiguousarray(rows)


def static_feed(model: Any, texts: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask (N, length) as StaticModel.encode(max_length=length) tokenizes (no special tokens,
    the unknown token dropped); the tokenizer runs outside the graph, as for the transformers."""
    import numpy as np

    ids = model.tokenize(list(texts), max_length=length)
    out = np.zeros((len(ids), length), dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, row in enumerate(ids):
        out[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": out, "attention_mask": mask}
