"""A static-embedding student (Model2Vec): one vector per vocabulary token, a sentence is the mean of its tokens'.

The method is the `model2vec` package's own distillation, not a re-implementation: each token of the teacher's
vocabulary is run through the teacher alone ([CLS] token [SEP], pooled), the token vectors are reduced by PCA, and
weighted by SIF over Zipf-estimated frequencies (model2vec 0.9: weight = a / (a + p(rank)), p ~ 1/(rank + 1),
which replaced the earlier log(1 + rank) weighting). model2vec 0.9.0 is the newest release that installs with
kdpipe's pins (0.10 needs huggingface-hub >= 1.0); it works offline on a local folder (no hub call for a path).

`sif_frequencies: corpus` (kdpipe's one addition) takes p(token) from add-one token counts of the run's own
transfer sentences instead of Zipf over token ids: model2vec's distillation runs with the weighting off (PCA then
rows x 1, so the rows are model2vec's own) and each row is then multiplied by a / (a + p(token)), the same SIF
formula, before the float16 cast. BERT-style token ids are only loosely frequency-ordered (single characters and
'##' pieces sit in the first few thousand ids), so Zipf-by-id down-weights the wrong tokens; on the embedded
tweets it raised Lee Spearman retention from 75.7% to 90-93% but halved recall@10 of the teacher's neighbours
(benchmarks/results/static-study.md), so it is an option, not a default.

`finetune_epochs` (finetune_static) trains the table on the teacher's embeddings of the transfer sentences, as
tokenlearn does at scale: the mean of a sentence's rows through a linear map to the teacher's width (least-squares
init), 1 - cosine, the best epoch on a validation split kept, the map folded into the table (V, teacher width).
On the 1,000 transfer tweets: Lee retention 75.7% -> ~102% (the map alone) / ~101.7% (trained), recall@10 0.295 ->
0.394. A table with NaN or inf is refused before it is written (and static_onnx refuses to export one).

The output folder is what `model2vec.StaticModel.from_pretrained` loads (and sentence-transformers'
StaticEmbedding too: model2vec writes a modules.json). Torch-free at import; model2vec's distillation imports
torch and transformers when it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.errors import ConfigError, ModelError
from kdpipe.files import shown
from kdpipe.tasks.embedding.atomic import replacing_dir
from kdpipe.tasks.embedding.pooling import read_sentence_config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

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
    frequencies: Sequence[str] | None = None,
    train_on: tuple[Sequence[str], np.ndarray] | None = None,
    epochs: int = 0,
    seed: int = 0,
) -> StaticStudent:
    """Distil the sentence-transformers teacher in `teacher_dir` into a static model written to `out_dir` (all or
    nothing): vectors (V, pca_dims). `pca_dims` must not exceed the teacher's width; `sif_coefficient` None turns
    the frequency weighting off; `quantize_to` is the stored dtype (model2vec's default float16 halves the size).
    `frequencies`: sentences whose token counts give the SIF p(token) (None: model2vec's Zipf over token ids).
    `train_on` (sentences, the teacher's embeddings of them) with `epochs` > 0: the table is then trained on them
    (finetune_static) and the student is (V, the teacher's width)."""
    config = read_sentence_config(teacher_dir)
    backbone = teacher_dir / config.backbone
    corpus = frequencies is not None and sif_coefficient is not None
    _check_settings(pca_dims, _hidden_size(backbone), corpus and not frequencies)
    distill = _model2vec_distill()
    pooling = _MODEL2VEC_POOLING[config.pooling]
    model = distill(
        model_name=str(backbone),
        pca_dims=pca_dims,
        sif_coefficient=None if corpus else sif_coefficient,
        quantize_to="float32" if corpus else quantize_to,
        device=device,
        pooling=pooling,
    )
    weighting = f"SIF {sif_coefficient}"
    if corpus:
        assert frequencies is not None and sif_coefficient is not None
        weights = corpus_sif_weights(model, frequencies, sif_coefficient)
        model = weighted_model(model, weights, quantize_to, sif_coefficient)
        weighting += f" over the token counts of {len(frequencies)} sentences"
    trained = ""
    if train_on is not None and epochs > 0:
        model, info = finetune_static(
            model, train_on[0], train_on[1], epochs=epochs, seed=seed, quantize_to=quantize_to
        )
        trained = (f", then trained on the teacher's embeddings of {info.sentences} sentences (kept epoch "
                   f"{info.best_epoch} of {info.epochs}: validation cosine {info.val_cosine_before:.3f} -> "
                   f"{info.val_cosine_after:.3f})")  # fmt: skip
    _require_finite(model)
    with replacing_dir(out_dir) as staging:
        model.save_pretrained(str(staging))
    vocab, dim = model.embedding.shape
    method = f"model2vec {_model2vec_version()} distill (PCA {pca_dims}, {weighting}, {quantize_to}){trained}"
    return StaticStudent(out_dir, int(dim), int(vocab), pooling, method)


def _check_settings(pca_dims: int, width: int, no_corpus: bool) -> None:
    if not 1 <= pca_dims <= width:
        raise ConfigError(
            f"pca_dims: {pca_dims} is not between 1 and the teacher's width {width}",
            f"use at most {width} (model2vec's default is 256)",
        )
    if no_corpus:
        raise ConfigError(
            "student.static.sif_frequencies: corpus needs sentences to count tokens in, and the transfer set is empty",
            "give the teacher stage a transfer set (teacher.embedding.transfer_size), or use sif_frequencies: zipf",
        )


def corpus_sif_weights(model: Any, sentences: Sequence[str], sif_coefficient: float) -> np.ndarray:
    """float64 (V,): a / (a + p(token)), p the add-one frequency of each token id in `sentences` tokenized as
    StaticModel.encode tokenizes them (no special tokens, the unknown token dropped). An unseen token gets p =
    1 / (tokens + V), so a weight near 1; the most frequent ones (the, a, punctuation) are weighted towards 0."""

    counts = np.zeros(len(model.tokens), dtype=np.float64)
    for ids in model.tokenize(list(sentences), max_length=512):
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1.0)
    proba = (counts + 1.0) / (counts.sum() + len(counts))
    return sif_coefficient / (sif_coefficient + proba)


def weighted_model(model: Any, weights: np.ndarray, quantize_to: str, sif_coefficient: float) -> Any:
    """A StaticModel like `model` (float32 rows, no weights of its own) with each row times its weight, stored as
    `quantize_to` through model2vec's own quantize_embeddings."""
    from model2vec import StaticModel
    from model2vec.quantization import DType, quantize_embeddings

    rows = np.asarray(model.embedding, dtype=np.float32)
    if rows.shape[0] != len(weights) or model.token_mapping is not None:
        raise ModelError(f"{rows.shape[0]} token vectors for {len(weights)} weights", "a model2vec bug?")
    vectors = quantize_embeddings(rows * weights[:, None].astype(np.float32), DType(quantize_to))
    config = {**model.config, "sif_coefficient": sif_coefficient, "sif_frequencies": "corpus"}
    return StaticModel(vectors=vectors, tokenizer=model.tokenizer, config=config, normalize=model.normalize,
                       base_model_name=model.base_model_name, language=model.language)  # fmt: skip


@dataclass(frozen=True)
class Finetune:
    """How the token table was trained: epochs run, the epoch kept, validation cosine before and after."""

    epochs: int
    best_epoch: int
    val_cosine_before: float
    val_cosine_after: float
    sentences: int


def finetune_static(
    model: Any,
    sentences: Sequence[str],
    targets: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 256,
    quantize_to: str = "float16",
) -> tuple[Any, Finetune]:
    """Train the token table on the teacher's embeddings `targets` (N, Dt) of `sentences`, as tokenlearn does: the
    student's sentence vector is StaticModel.encode's mean of its tokens' rows (nn.EmbeddingBag mode "mean"), put
    through a linear map to the teacher's width (least-squares init), loss 1 - cosine, Adam; 10% of the sentences
    (seeded) are a validation split and the epoch with the best validation cosine is kept. The map is then folded
    into the table (a mean is linear: mean(E) W + b = mean(E W + b)), so the model is still a Gather and a mean, now
    (V, Dt): a StaticModel like `model` with the trained rows, stored as `quantize_to`."""
    import torch

    seqs, keep = _finetune_inputs(model, sentences, targets)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = rng.permutation(keep)
    n_val = max(1, len(order) // 10)
    val, train = order[:n_val].tolist(), order[n_val:].tolist()
    target = torch.tensor(np.asarray(targets, dtype=np.float32))
    target = target / target.norm(dim=1, keepdim=True).clamp_min(1e-12)
    fit = _TableFit(token_table(model), seqs, target, train, val)
    opt = torch.optim.Adam([*fit.bag.parameters(), *fit.proj.parameters()], lr=lr)
    before = best = fit.val_cosine()
    best_epoch, state = 0, fit.state()
    for epoch in range(1, epochs + 1):
        shuffled = rng.permutation(train).tolist()
        for start in range(0, len(shuffled), batch_size):
            loss = fit.loss(shuffled[start : start + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = fit.val_cosine()
        if score > best:  # NaN never compares greater: a diverged epoch is not kept
            best, best_epoch, state = score, epoch, fit.state()
    return _folded(model, state, quantize_to, epochs), Finetune(epochs, best_epoch, before, best, len(keep))


def _finetune_inputs(model: Any, sentences: Sequence[str], targets: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """The sentences' token ids as StaticModel.encode reads them, and the indices of those with a token; refuses too
    few of them, a non-finite table and non-finite teacher embeddings (each in one line)."""
    seqs = [np.asarray(r, dtype=np.int64) for r in model.tokenize(list(sentences), max_length=512)]
    keep = [i for i, r in enumerate(seqs) if len(r)]
    if len(keep) < 10 or len(targets) != len(seqs):
        raise ConfigError(
            f"student.static.finetune_epochs: {len(keep)} of {len(seqs)} transfer sentences have a token "
            f"({len(targets)} teacher embeddings); training the table needs at least 10",
            "give the teacher stage more transfer sentences (teacher.embedding.transfer_size)",
        )
    _require_finite(model)  # the table trained from (lstsq on NaN fails inside LAPACK, not with a message)
    bad = int((~np.isfinite(np.asarray(targets, dtype=np.float64))).any(axis=1).sum())
    if bad:
        raise ModelError(f"{bad} of {len(targets)} teacher embeddings of the transfer sentences are not finite", "")
    return seqs, keep


class _TableFit:
    """The trainable table (nn.EmbeddingBag, mean) and the linear map to the teacher's width, least-squares
    initialised on the train sentences."""

    def __init__(self, table: np.ndarray, seqs: list[np.ndarray], target: Any, train: list[int], val: list[int]):
        import torch
        from torch import nn

        self.seqs, self.target, self.val = seqs, target, val
        self.bag = nn.EmbeddingBag.from_pretrained(torch.tensor(table), freeze=False, mode="mean")
        self.proj = nn.Linear(self.bag.embedding_dim, target.shape[1])
        with torch.no_grad():  # training starts from the best linear read-out
            x = self.pooled(train)
            solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), target[train]).solution
            self.proj.weight.copy_(solution[:-1].T)
            self.proj.bias.copy_(solution[-1])

    def pooled(self, idx: list[int]) -> Any:
        import torch

        flat = torch.from_numpy(np.concatenate([self.seqs[i] for i in idx]))
        offsets = torch.tensor(np.cumsum([0] + [len(self.seqs[i]) for i in idx[:-1]]), dtype=torch.long)
        return self.bag(flat, offsets)

    def loss(self, idx: list[int]) -> Any:
        from torch import nn

        return (1 - nn.functional.cosine_similarity(self.proj(self.pooled(idx)), self.target[idx])).mean()

    def val_cosine(self) -> float:
        import torch
        from torch import nn

        with torch.no_grad():
            return float(
                nn.functional.cosine_similarity(self.proj(self.pooled(self.val)), self.target[self.val]).mean()
            )

    def state(self) -> list[Any]:
        return [t.detach().clone() for t in (self.bag.weight, self.proj.weight, self.proj.bias)]


def _folded(model: Any, state: list[Any], quantize_to: str, epochs: int) -> Any:
    """A StaticModel like `model` whose rows are the trained table through the map (E W^T + b)."""
    import torch
    from model2vec import StaticModel
    from model2vec.quantization import DType, quantize_embeddings

    with torch.no_grad():
        table = (state[0] @ state[1].T + state[2]).numpy()
    vectors = quantize_embeddings(table.astype(np.float32), DType(quantize_to))
    config = {**model.config, "hidden_dim": int(table.shape[1]), "finetune_epochs": epochs}
    return StaticModel(vectors=vectors, tokenizer=model.tokenizer, config=config, normalize=model.normalize,
                       base_model_name=model.base_model_name, language=model.language)  # fmt: skip


def _require_finite(model: Any) -> None:
    """ModelError when a token vector holds NaN or inf: such a student is refused, never written."""

    table = token_table(model)
    bad = ~np.isfinite(table).all(axis=1)
    if bad.any():
        raise ModelError(
            f"the static student's token table has {int(bad.sum())} of {len(table)} rows with NaN or inf "
            f"(first: token id {int(np.argmax(bad))}); it is refused, not written",
            "check the teacher's weights and the SIF weights (sif_coefficient)",
        )


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

    rows = np.asarray(model.embedding, dtype=np.float32)
    if model.token_mapping is not None:
        rows = rows[np.asarray(model.token_mapping)]
    if model.weights is not None:
        rows = rows * np.asarray(model.weights, dtype=np.float32)[:, None]
    return np.ascontiguousarray(rows)


def static_feed(model: Any, texts: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask (N, length) as StaticModel.encode(max_length=length) tokenizes (no special tokens,
    the unknown token dropped); the tokenizer runs outside the graph, as for the transformers."""

    ids = model.tokenize(list(texts), max_length=length)
    out = np.zeros((len(ids), length), dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, row in enumerate(ids):
        out[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": out, "attention_mask": mask}
