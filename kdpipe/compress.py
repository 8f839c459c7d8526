"""Graph optimisation and quantisation of an exported ONNX classifier: the variants the export stage gates.

Each variant is a file beside the fp32 export; `make_variant` writes it and says what was done (fusions,
quantised operators). onnxruntime's own tools do the work: the transformer optimizer
(`onnxruntime.transformers.optimizer.optimize_model`, fusion only, so the graph stays portable across
providers) and dynamic int8 quantisation (`onnxruntime.quantization.quantize_dynamic`). Quantising the
optimised graph needs `DefaultTensorType`: without it onnxruntime 1.32 fails with "Unable to find data type for
weight_name" on the fused graph.
"""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

Variant = Literal["fp32", "optimized", "int8-dynamic"]
VARIANTS: tuple[Variant, ...] = ("fp32", "optimized", "int8-dynamic")
FILES: dict[Variant, str] = {"fp32": "model.onnx", "optimized": "model.opt.onnx", "int8-dynamic": "model.int8.onnx"}


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's optimizer and quantizer log advice on the root logger (and print size notes); the
    export stage reports what was done itself."""
    import contextlib
    import io
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def op_counts(path: Path) -> dict[str, int]:
    """Operator type -> count in the graph (what a fusion or quantisation changed)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def optimize(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """The transformer optimizer's fusions (attention, skip / embed layer-norm, bias-GELU, ...) on `src`,
    written to `dst`; returns the fused operator counts onnxruntime reports (0 = that fusion did not apply)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
        model.save_model_to_file(str(dst))
    stats: dict[str, Any] = model.get_fused_operator_statistics()
    return {str(k): int(v) for k, v in stats.items()}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: weights quantised offline (QInt8), activations at run time, fp32 elsewhere."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer leaves temporary files in the working directory when it fails: keep it in a temp dir
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        staged = Path(tmp) / "model.onnx"
        staged.write_bytes(src.read_bytes())
        quantize_dynamic(
            staged,
            Path(tmp) / "q.onnx",
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        dst.write_bytes((Path(tmp) / "q.onnx").read_bytes())


def make_variant(variant: Variant, fp32: Path, num_heads: int, hidden_size: int) -> dict[str, Any]:
    """Write `variant` beside the fp32 export `fp32`; returns {file, what was done}."""
    out = fp32.with_name(FILES[variant])
    if variant == "fp32":
        return {"file": out.name, "fusions": {}}
    optimized = fp32.with_name(FILES["optimized"])
    fusions = optimize(fp32, optimized, num_heads, hidden_size) if not optimized.is_file() else {}
    if variant == "optimized":
        return {"file": out.name, "fusions": fusions}
    quantize_int8(optimized, out)
    before, after = op_counts(optimized), op_counts(out)
    quantized = {op: n for op, n in after.items() if op not in before}
    return {"file": out.name, "fusions": fusions, "quantized_ops": quantized}
