"""The static student's ONNX graph and its parity with model2vec's StaticModel.encode.

model2vec 0.9.0 ships no ONNX exporter (its repository has a script, not a packaged function), and the graph is
five ops, so it is written here with onnx.helper, torch-free: input_ids, attention_mask (B, T) -> Gather of the
token table (each row already times its SIF weight, kdpipe.tasks.embedding.static.token_table), masked mean over
T (EmbeddingBag mode "mean"; an all-padding row gives 0 like model2vec), then L2 normalisation (the sqrt of a
ReduceSum, the same at every opset) when the model normalises. The tokenizer runs outside the graph, as for every
kdpipe embedding export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import ExportToleranceError
from kdpipe.files import shown
from kdpipe.tasks.embedding.onnx import (
    MIN_COSINE,
    OPSET,
    PARITY_SHAPES,
    SENTENCE_OUTPUT,
    Parity,
    _min_row_cosine,
    _require,
)
from kdpipe.tasks.embedding.static import static_feed, token_table

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class StaticExport:
    path: Path
    dim: int
    vocab_size: int
    normalize: bool


def export_static_onnx(model: Any, path: Path, *, opset: int = OPSET, table: np.ndarray | None = None) -> StaticExport:
    """Write the StaticModel `model` as ONNX at `path` (`table` overrides its token table: tests plant a fault).
    A table with NaN or inf is refused (ExportToleranceError) before anything is written."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = token_table(model) if table is None else np.asarray(table, dtype=np.float32)
    bad = ~np.isfinite(w).all(axis=1)
    if bad.any():
        raise ExportToleranceError(
            f"{shown(path)}: the static token table has {int(bad.sum())} of {len(w)} rows with NaN or inf (first: "
            f"token id {int(np.argmax(bad))}); the graph is not exported",
            "rebuild the student stage (kdpipe refuses such a student when it distils it)",
        )
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["rows"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["rows", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["total", "count1"], ["mean" if model.normalize else SENTENCE_OUTPUT]),
    ]
    if model.normalize:
        nodes += [
            helper.make_node("Mul", ["mean", "mean"], ["square"]),
            helper.make_node("ReduceSum", ["square", "axis1"], ["square_sum"], keepdims=1),
            helper.make_node("Sqrt", ["square_sum"], ["norm"]),
            helper.make_node("Max", ["norm", "tiny"], ["norm1"]),
            helper.make_node("Div", ["mean", "norm1"], [SENTENCE_OUTPUT]),
        ]
    inits = [
        numpy_helper.from_array(w, "table"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "tiny"),
    ]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUTS]
    out = helper.make_tensor_value_info(SENTENCE_OUTPUT, TensorProto.FLOAT, ["batch", int(w.shape[1])])
    graph = helper.make_graph(nodes, "kdpipe_static_embedding", ins, [out], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="kdpipe")
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return StaticExport(path, int(w.shape[1]), int(w.shape[0]), bool(model.normalize))


def static_parity(
    model: Any,
    onnx_path: Path,
    sentences: Sequence[str],
    *,
    shapes: Sequence[tuple[int, int]] = PARITY_SHAPES,
    threshold: float = MIN_COSINE,
) -> Parity:
    """Min row cosine of the graph with StaticModel.encode(max_length=T) on real sentences at each batch x length;
    ExportToleranceError below `threshold` or on NaN (fail closed)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    per_shape = []
    for batch, length in shapes:
        texts = [sentences[i % len(sentences)] for i in range(batch)]
        (got,) = session.run([SENTENCE_OUTPUT], static_feed(model, texts, length))
        ref = model.encode(texts, max_length=length, use_multiprocessing=False)
        per_shape.append((batch, length, _min_row_cosine(got, np.asarray(ref, dtype=np.float32))))
    parity = Parity("cosine", threshold, float(np.min([c for _, _, c in per_shape])), tuple(per_shape))
    _require(parity, onnx_path)
    return parity
