"""A SentenceEncoder to ONNX, two ways, with a cosine parity check on real sentences.

- `export_onnx`: one graph from token ids to the sentence embedding, pooling and normalisation inside
  (inputs input_ids, attention_mask [+ token_type_ids when the backbone has segment embeddings], output
  `sentence_embedding` (B, D)); one call gives the unit vector, which is what a mobile or server runtime wants.
- `write_st_onnx`: the layout sentence-transformers' ONNX backend reads, `<st_dir>/onnx/model.onnx`.
  `SentenceTransformer(st_dir, backend="onnx")` runs it through optimum's ORTModelForFeatureExtraction, which
  returns the graph's `last_hidden_state` output, and then applies the folder's own Pooling / Dense / Normalize
  modules in torch. So that graph must stop at the backbone's token vectors (B, T, H): pooling inside it would
  be pooled twice.

Both are exported with the TorchScript exporter (dynamo=False, opset 17) from a copy of the backbone with eager
attention: SDPA exports as one opaque pattern that onnxruntime's transformer fusions do not recognise, the eager
matmul-softmax-matmul they do. Batch and sequence axes are dynamic, and the trace uses a shape (2 x 11) that no
parity shape has, so a size baked into the graph shows up as a parity failure rather than passing by luck.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import ExportToleranceError, ModelError
from kdpipe.files import shown

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from kdpipe.tasks.embedding.encoder import SentenceEncoder

OPSET = 17
MIN_COSINE = 0.9999
PARITY_SHAPES: tuple[tuple[int, int], ...] = ((1, 8), (4, 16), (7, 33))
_TRACE_SHAPE = (2, 11)
SENTENCE_OUTPUT = "sentence_embedding"
TOKEN_OUTPUT = "last_hidden_state"  # the name optimum's ORTModelForFeatureExtraction reads


@dataclass(frozen=True)
class OnnxExport:
    """An exported graph: its inputs, its one output and that output's width (D, or H for token vectors)."""

    path: Path
    inputs: tuple[str, ...]
    output: str
    dim: int
    opset: int


@dataclass(frozen=True)
class Parity:
    """Cosine parity of an ONNX graph with PyTorch: the minimum row cosine over all shapes and each shape's."""

    kind: str
    threshold: float
    min_cosine: float
    per_shape: tuple[tuple[int, int, float], ...]

    @property
    def passed(self) -> bool:
        # written as >=, so a NaN cosine fails
        return self.min_cosine >= self.threshold


def export_onnx(encoder: SentenceEncoder, path: Path, *, opset: int = OPSET) -> OnnxExport:
    """`encoder` -> ONNX at `path`: (B, T) ids and mask -> `sentence_embedding` (B, D), pooling and
    normalisation in the graph."""
    return _export(encoder, path, opset, tokens_only=False)


def write_st_onnx(encoder: SentenceEncoder, st_dir: Path, *, opset: int = OPSET) -> Path:
    """Write `<st_dir>/onnx/model.onnx` for `SentenceTransformer(st_dir, backend="onnx")`: the backbone alone,
    (B, T) -> `last_hidden_state` (B, T, H). `st_dir` must be the encoder's sentence-transformers folder (from
    save_sentence_transformers), whose Pooling / Dense / Normalize modules the backend applies."""
    if not (st_dir / "modules.json").is_file():
        raise ModelError(
            f"{shown(st_dir)}: not a sentence-transformers folder (no modules.json)",
            "write it with save_sentence_transformers first",
        )
    return _export(encoder, st_dir / "onnx" / "model.onnx", opset, tokens_only=True).path


def _export(encoder: SentenceEncoder, path: Path, opset: int, tokens_only: bool) -> OnnxExport:
    import torch

    eager = _eager_copy(encoder)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if eager.takes_token_type_ids else [])
    output = TOKEN_OUTPUT if tokens_only else SENTENCE_OUTPUT
    batch, length = _TRACE_SHAPE
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(eager.backbone.config.vocab_size), (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -4:] = 0  # a padded row, so the trace sees a mask that is not all ones
    example = (ids, mask, torch.zeros_like(ids))[: len(names)]
    axes: dict[str, dict[int, str]] = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes[output] = {0: "batch_size", 1: "sequence_length"} if tokens_only else {0: "batch_size"}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # a BiLSTM student: the TorchScript LSTM symbolic warns about batch sizes; its h0/c0 are zeros built in
            # the graph, and the parity shapes (batch 1, 4, 7) are the real check
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.modules.rnn")
            torch.onnx.export(
                _graph_module(eager, tokens_only),
                example,
                str(partial),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=[output],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        dim = eager.hidden_size if tokens_only else eager.dim
        _fix_width(partial, dim)
        os.replace(partial, path)  # a reader never sees a half-written graph
    finally:
        partial.unlink(missing_ok=True)
    return OnnxExport(path, tuple(names), output, dim, opset)


def _fix_width(path: Path, dim: int) -> None:
    """Write the output's last axis as the number it is: the tracer names it symbolically after the division of
    the normalisation, and a runtime that allocates outputs ahead (mobile) wants D as a number."""
    import onnx

    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = dim
    onnx.save(model, str(path))


def _eager_copy(encoder: SentenceEncoder) -> SentenceEncoder:
    """A CPU copy of `encoder` whose backbone uses eager attention (the same weights)."""
    from kdpipe.tasks.embedding.encoder import SentenceEncoder

    backbone: Any = encoder.backbone
    if getattr(backbone, "token_width", None) is not None:  # a BiLSTM body: no attention to choose
        fresh = copy.deepcopy(backbone)
    else:
        config = copy.deepcopy(backbone.config)
        # attention classes are chosen when a model is built (BERT in transformers 4.x), so rebuild, not
        # reconfigure; a width-pruned student's config.pruned_heads is re-applied by the constructor
        fresh = type(backbone)._from_config(config, attn_implementation="eager")
        fresh.load_state_dict(backbone.state_dict())
    projection = copy.deepcopy(encoder.projection).cpu() if encoder.projection is not None else None
    clone = SentenceEncoder(fresh.cpu().eval(), encoder.pooling, encoder.normalize, projection, encoder.max_seq_length)
    return clone.eval()


def _graph_module(encoder: SentenceEncoder, tokens_only: bool) -> nn.Module:
    """The module that is traced: positional (ids, mask[, token types]) -> one tensor."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> torch.Tensor:
            if tokens_only:
                return self.encoder.token_embeddings(input_ids, attention_mask, token_type_ids)
            return self.encoder(input_ids, attention_mask, token_type_ids)

    return Graph().eval()


def _batches(tokenizer: Any, sentences: Sequence[str], shapes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Real sentences at exactly batch x length (padded or truncated to the length), as int64 numpy arrays."""
    if not sentences:
        raise ModelError("ONNX parity needs real sentences, got none", "pass held-out sentences")
    out = []
    for batch, length in shapes:
        texts = [sentences[i % len(sentences)] for i in range(batch)]
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
        out.append({k: v.astype("int64") for k, v in encoded.items()})
    return out


def onnx_parity(
    encoder: SentenceEncoder,
    tokenizer: Any,
    onnx_path: Path,
    sentences: Sequence[str],
    *,
    shapes: Sequence[tuple[int, int]] = PARITY_SHAPES,
    threshold: float = MIN_COSINE,
) -> Parity:
    """Cosine of every row of `export_onnx`'s graph (onnxruntime, CPU) with the PyTorch encoder's on `sentences`
    at each batch x length of `shapes`. Raises ExportToleranceError below `threshold`, on NaN, and when
    onnxruntime refuses a shape (a static axis)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    device = next(encoder.parameters()).device
    per_shape = []
    for (batch, length), inputs in zip(shapes, _batches(tokenizer, sentences, shapes), strict=True):
        try:
            (got,) = session.run([SENTENCE_OUTPUT], {k: v for k, v in inputs.items() if k in wanted})
        except Exception:  # onnxruntime's own error types: e.g. a batch or length baked into the graph
            per_shape.append((batch, length, float("nan")))  # a parity failure, not a crash
            continue
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
            ref = encoder(tensors["input_ids"], tensors["attention_mask"], tensors.get("token_type_ids"))
        per_shape.append((batch, length, _min_row_cosine(got, ref.float().cpu().numpy())))
    parity = Parity("cosine", threshold, float(np.min([c for _, _, c in per_shape])), tuple(per_shape))
    _require(parity, onnx_path)
    return parity


def st_backend_parity(
    st_dir: Path, encoder: SentenceEncoder, tokenizer: Any, sentences: Sequence[str], *, threshold: float = MIN_COSINE
) -> Parity:
    """Cosine of `SentenceTransformer(st_dir, backend="onnx").encode(sentences)` with the PyTorch encoder's vectors
    (one shape: sentence-transformers pads each batch to its longest sentence). Raises below `threshold`."""
    from sentence_transformers import SentenceTransformer

    from kdpipe.tasks.embedding.encoder import encode

    model = SentenceTransformer(str(st_dir), backend="onnx", device="cpu", model_kwargs={"file_name": "model.onnx"})
    got = model.encode(list(sentences), convert_to_numpy=True)
    cosine = _min_row_cosine(got, encode(encoder, tokenizer, sentences))
    parity = Parity("cosine", threshold, cosine, ((len(sentences), 0, cosine),))
    _require(parity, st_dir / "onnx" / "model.onnx")
    return parity


def _min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")  # a shape mismatch is a parity failure, not a crash later
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()) if cos.size else float("nan")


def _require(parity: Parity, path: Path) -> None:
    if not parity.passed:
        worst = min(parity.per_shape, key=lambda s: s[2] if s[2] == s[2] else -2.0)
        raise ExportToleranceError(
            f"{shown(path)}: ONNX embeddings differ from PyTorch's: min cosine {parity.min_cosine:.6f} < "
            f"{parity.threshold} (worst at batch {worst[0]} x length {worst[1]})",
            "re-export with the same transformers/torch versions; an op the exporter mistranslates shows here",
        )
