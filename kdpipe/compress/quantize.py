"""Graph optimisation and quantisation of an exported ONNX classifier: the variants the export stage gates.

Each variant is a file beside the fp32 export; `make_variant` writes it and says what was done (fusions,
quantised operators, the graph it started from, what fell back). onnxruntime's own tools do the work:

- "optimized": the transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`, fusion only, so
  the graph stays portable across providers);
- "int8-dynamic": `quantize_dynamic` of the optimised graph. It needs `DefaultTensorType`: without it
  onnxruntime 1.32 fails with "Unable to find data type for weight_name" on the fused graph;
- "int8-static": `quantize_static` (QDQ) of the fp32 graph, calibrated on real samples. On the fused graph
  calibration fails ("Unable to get valid quantization scale for input '.../pooler/activation/Tanh_output_0'
  when quantizing bias 'classifier.bias'"), and fused Attention / SkipLayerNormalization have no QDQ form;
- "int4": weight-only block-wise int4 MatMuls (`MatMulNBits`) of the optimised graph when onnxruntime runs the
  result, else of the fp32 graph. On the optimised graph the q/k/v weights sit inside fused Attention and stay
  fp32; the embeddings stay fp32 in both;
- "fp16": the optimised graph in float16, int64 inputs and float32 logits kept, for GPU profiles; it also loads
  and runs on the CPU execution provider.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import chdir, contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from kdpipe.errors import ConfigError, did_you_mean

Variant = Literal["fp32", "optimized", "int8-dynamic", "int8-static", "int4", "fp16"]
VARIANTS: tuple[Variant, ...] = ("fp32", "optimized", "int8-dynamic", "int8-static", "int4", "fp16")
FILES: dict[Variant, str] = {
    "fp32": "model.onnx",
    "optimized": "model.opt.onnx",
    "int8-dynamic": "model.int8.onnx",
    "int8-static": "model.int8-static.onnx",
    "int4": "model.int4.onnx",
    "fp16": "model.fp16.onnx",
}
# variants that need `calibration` (real samples) passed to make_variant
CALIBRATED: frozenset[Variant] = frozenset({"int8-static"})

Calibrate = Literal["minmax", "percentile", "entropy"]
CALIBRATE_METHODS: tuple[Calibrate, ...] = get_args(Calibrate)
# what the calibrator is given. quantize_static passes neither num_bins nor num_quantized_bins on, and with its
# entropy defaults (128 and 128) the search has one candidate, the full range: "entropy" then gives exactly
# minmax's scales. So the ranges are computed here and handed to quantize_static as a calibration cache.
_CALIBRATOR_OPTIONS: dict[Calibrate, dict[str, Any]] = {
    "minmax": {},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
}
# static int8 quantises the weight-bearing operators only: with every operator quantised (Add, Mul, Softmax,
# the attention-score MatMuls) the MiniLM teacher's logits moved 4x more than with int8-dynamic. Gemm (pooler,
# classifier: a tiny share of the weights) stays fp32: quantising it alone moved MiniLM's logits the most.
STATIC_OP_TYPES = ("MatMul", "Gather")
# no Q/DQ after a MatMul: onnxruntime then runs DQ -> MatMul as MatMulIntegerToFloat (int8-dynamic's kernel);
# quantised outputs doubled MiniLM's logit error and were slower on this CPU
STATIC_EXTRA: dict[str, Any] = {"OpTypesToExcludeOutputQuantization": ["MatMul"]}
# int4: 32 weights share a scale (symmetric, no zero points); accuracy_level left unset (fp32 accumulation):
# level 4 (int8 compute) was no faster on MiniLM at 1 x 128 on this CPU
INT4_BLOCK = 32
# what a calibration feed brings; graphs may also ask for token_type_ids (fed as zeros, as the export stage does)
FEED_NAMES = ("input_ids", "attention_mask")


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's optimizer and quantizer log advice on the root logger (and print size notes); the
    export stage reports what was done itself. Handlers they add to the root logger are removed again."""
    import contextlib
    import io

    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


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


def quantize_int8(src: Path, dst: Path, reduce_range: bool = False) -> None:
    """Dynamic int8: weights quantised offline (QInt8, one scale per output channel), activations at run time,
    fp32 elsewhere. Per-channel scales: on the default 3-layer MiniLM student, per-tensor scales agreed with the
    fp32 student on 95.75% of the test split and missed the 99% accuracy budget (77.55% vs 77.57%); per-channel
    agreed on 98.35% (77.65%) at the same size. `reduce_range`: 7-bit weights, for CPUs whose int8 kernels
    saturate (kdpipe.env.int8_saturates: AVX2 without VNNI)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer can leave temporary files in the working directory when it fails: run it from inside a
    # temporary directory (so the paths are made absolute first)
    src, dst = src.resolve(), dst.resolve()
    with tempfile.TemporaryDirectory() as tmp, _quiet(), chdir(tmp):
        staged = Path(tmp) / "model.onnx"
        staged.write_bytes(src.read_bytes())
        quantize_dynamic(
            staged,
            Path(tmp) / "q.onnx",
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        dst.write_bytes((Path(tmp) / "q.onnx").read_bytes())


def _first_line(e: BaseException) -> str:
    """An exception on one short line, for the record."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:240]


def _new_ops(before: Path, after: Path) -> dict[str, int]:
    """Operator types in `after` that `before` does not have, with their counts."""
    old = op_counts(before)
    return {op: n for op, n in op_counts(after).items() if op not in old}


# --------------------------------------------------------------------------- int8-static
def _graph(path: Path) -> Any:
    """The graph of the model at `path` (weights not loaded from external files)."""
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def calibration_rows(calibration: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The samples of `calibration` (feeds of int64 (B, T) input_ids and attention_mask) as one (1, T_max) feed
    each, padded with id 0 under mask 0 to the longest: onnxruntime's histogram calibrators (percentile,
    entropy) stack all outputs of a tensor into one array and fail on ragged batch or sequence sizes."""
    rows: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(calibration):
        missing = [n for n in FEED_NAMES if n not in feed]
        if missing:
            raise ConfigError(
                f"calibration feed {i} has no {', '.join(missing)}", "each feed maps input_ids and attention_mask"
            )
        ids, mask = (np.asarray(feed[n]).astype(np.int64) for n in FEED_NAMES)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ConfigError(
                f"calibration feed {i}: input_ids {list(ids.shape)}, attention_mask {list(mask.shape)}",
                "both are (batch, tokens) of one shape",
            )
        rows += [{"input_ids": ids[j : j + 1], "attention_mask": mask[j : j + 1]} for j in range(len(ids))]
    if not rows:
        raise ConfigError("int8-static: the calibration data holds no samples", "pass tokenised real samples")
    width = max(r["input_ids"].shape[1] for r in rows)
    return [{n: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for n, v in r.items()} for r in rows]


def calibration_reader(rows: list[dict[str, np.ndarray]], input_names: list[str]) -> Any:
    """A `CalibrationDataReader` over `rows` that feeds what the graph asks for: zeros for token_type_ids."""
    from onnxruntime.quantization import CalibrationDataReader

    unknown = [n for n in input_names if n not in (*FEED_NAMES, "token_type_ids")]
    if unknown:
        raise ConfigError(f"int8-static: the graph asks for inputs {unknown}", "calibration feeds ids and mask only")

    class FeedReader(CalibrationDataReader):
        """The rows one at a time, then None (onnxruntime's protocol)."""

        def __init__(self) -> None:
            self._rows = iter(rows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self._rows, None)
            if row is None:
                return None
            return {n: row[n] if n in row else np.zeros_like(row["input_ids"]) for n in input_names}

    return FeedReader()


def _preprocess(staged: Path, work: Path) -> tuple[Path, str | None]:
    """onnxruntime's quant_pre_process of `staged` (ONNX shape inference and basic optimisation, symbolic shape
    inference skipped); returns the graph to quantise and, when pre-processing failed, why (then the raw graph)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    try:
        quant_pre_process(str(staged), str(out), skip_symbolic_shape=True)
    except Exception as e:  # onnxruntime's and onnx's own error types
        return staged, _first_line(e)
    return (out, None) if out.is_file() else (staged, "quant_pre_process wrote no model")


def _activation_matmuls(graph: Any) -> list[str]:
    """MatMul nodes with no constant operand (attention scores; probabilities x values): they stay fp32. QDQ
    quantisation ignores `MatMulConstBOnly` (only the QOperator format reads it), so they are excluded by name."""
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def _calibration_method(method: Calibrate) -> Any:
    """onnxruntime's CalibrationMethod for `method`."""
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    return methods[method]


def _calibrate(model: Path, reader: Any, method: Calibrate, work: Path) -> Path:
    """Tensor ranges of `model` on the reader's samples by `method`, saved as the calibration cache that
    quantize_static reads instead of calibrating itself; returns the cache's path."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model,
        list(STATIC_OP_TYPES),
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=_calibration_method(method),
        extra_options=_CALIBRATOR_OPTIONS[method],
    )
    calibrator.collect_data(reader)
    cache = work / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _qdq_weight_ops(path: Path) -> dict[str, int]:
    """Operator type -> count of the nodes that read a dequantised int8 weight: what static QDQ quantised."""
    graph = _graph(path)
    weights = {t.name for t in graph.initializer}
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights for o in n.output}
    return dict(sorted(Counter(n.op_type for n in graph.node if any(i in dq for i in n.input)).items()))


def quantize_static_int8(src: Path, dst: Path, rows: list[dict[str, np.ndarray]], method: Calibrate) -> dict[str, Any]:
    """Static int8 QDQ of `src` calibrated on `rows`: asymmetric uint8 activations (int8 activations ran 2-5x
    slower here: this AVX2 CPU has no VNNI, and onnxruntime's x86 kernels are u8s8), per-channel int8 weights.
    Returns what was done."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        work = Path(tmp).resolve()
        staged = work / "model.onnx"
        staged.write_bytes(src.read_bytes())
        model, failed = _preprocess(staged, work)
        graph = _graph(model)
        inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        kept = _activation_matmuls(graph)
        cache = _calibrate(model, calibration_reader(rows, inputs), method, work)
        quantize_static(
            str(model),
            str(work / "q.onnx"),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(STATIC_OP_TYPES),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=kept,
            calibrate_method=_calibration_method(method),
            extra_options=dict(STATIC_EXTRA),
            calibration_cache_path=cache,
        )
        dst.write_bytes((work / "q.onnx").read_bytes())
    done: dict[str, Any] = {"source": "fp32", "preprocessed": failed is None, "quantized_ops": _qdq_weight_ops(dst)}
    if failed:
        done["preprocess_error"] = failed
    done["calibration"] = {"method": method, "samples": len(rows), "tokens": int(rows[0]["input_ids"].shape[1])}
    return {**done, "activations": "uint8 per-tensor", "weights": "int8 per-channel", "fp32_matmuls": len(kept)}


# --------------------------------------------------------------------------- int4, fp16
def _runs_on_cpu(path: Path) -> None:
    """Raise unless onnxruntime's CPU provider loads `path` and runs it on a (1, 4) batch to finite outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: np.ones((1, 4), dtype=np.int64) for i in session.get_inputs()}
    outputs = session.run(None, feed)
    if not all(np.isfinite(np.asarray(o, dtype=np.float64)).all() for o in outputs):
        raise ValueError(f"{path.name}: non-finite outputs on a (1, 4) batch of ones")


def _from_first(sources: dict[str, Path], dst: Path, build: Callable[[Path, Path], None]) -> dict[str, Any]:
    """`build(src, dst)` from the first source whose result onnxruntime runs on CPU; returns {source, and
    why earlier sources were passed over}. Raises ConfigError when none works."""
    skipped: dict[str, str] = {}
    for name, src in sources.items():
        try:
            build(src, dst)
            _runs_on_cpu(dst)
        except ConfigError:
            raise
        except Exception as e:  # onnxruntime's and onnx's own error types: a graph the tool cannot handle
            skipped[name] = _first_line(e)
            continue
        return {"source": name, **({"fallback_from": skipped} if skipped else {})}
    dst.unlink(missing_ok=True)
    raise ConfigError(
        f"{dst.name}: no graph could be converted ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})",
        "drop the variant from export.variants and report the model",
    )


def _nbits_quantizer() -> Any:
    """onnxruntime's MatMulNBitsQuantizer class. Importing its module runs logging.basicConfig(level=INFO),
    which would leave a handler and the INFO level on the root logger: both are put back."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ModuleNotFoundError as e:  # it imports onnx_ir, which onnxruntime does not declare
        raise ConfigError(
            f"int4 needs the Python package '{e.name}', which onnxruntime's int4 quantizer imports",
            f"pip install {str(e.name).replace('_', '-')}, or drop int4 from export.variants",
        ) from None
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
    return MatMulNBitsQuantizer


def gemms_to_matmuls(model: Any) -> int:
    """Rewrite, in place, each Gemm of `model` with a constant weight, alpha = beta = 1 and no transposed input
    A as MatMul (+ Add of its bias), the weight transposed into the initializer when transB is set; returns how
    many were rewritten. MatMulNBitsQuantizer quantises MatMul (and Gather) only: GPT-2's Conv1D projections
    export as Gemm and would all stay fp32 (measured: 1 of 9 weight MatMuls quantised on a 2-layer GPT-2)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            arr = numpy_helper.to_array(inits[weight]).T.copy()
            weight = f"{node.input[1]}_transposed_{rewritten}"
            model.graph.initializer.append(numpy_helper.from_array(arr, weight))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [out], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def quantize_int4(src: Path, dst: Path, gemm: bool = False, gather: bool = False) -> None:
    """Weight-only int4 of the MatMuls of `src` with a constant weight: MatMulNBits, INT4_BLOCK weights per
    symmetric scale; activations and every other operator stay fp32. `gemm`: rewrite plain Gemms with a constant
    weight as MatMul (+ Add) first (`gemms_to_matmuls`), so they are quantised too (decoder graphs: GPT-2).
    `gather`: the constant-table Gathers too (GatherBlockQuantized, blocks along the embedding width): a causal
    LM's token-embedding table, which a tied LM head otherwise leaves in fp32 (28M of SmolLM2's 135M weights)."""
    import onnx

    quantizer_class = _nbits_quantizer()
    with _quiet():
        model = onnx.load(str(src))
        if gemm:
            gemms_to_matmuls(model)
        ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))}
        quantizer = quantizer_class(model, block_size=INT4_BLOCK, is_symmetric=True, **(ops if gather else {}))
        quantizer.process()
        if not _op_counts_of(quantizer.model.model).get("MatMulNBits"):
            raise ValueError("no MatMul with a constant weight to quantise")
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _op_counts_of(model: Any) -> dict[str, int]:
    """Operator type -> count in an in-memory ModelProto."""
    return dict(Counter(n.op_type for n in model.graph.node))


def to_fp16(src: Path, dst: Path) -> None:
    """`src` in float16 (onnxruntime.transformers' OnnxModel.convert_float_to_float16): graph inputs and outputs
    keep their types, so ids stay int64 and logits float32; operators on its default block list stay fp32."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        model = OnnxModel(onnx.load(str(src)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(dst))


# --------------------------------------------------------------------------- the variants
def _check_request(variant: str, calibration: object, calibrate: str) -> None:
    """ConfigError for an unknown variant or calibration method, or a calibrated variant without samples."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown export variant '{variant}'", did_you_mean(variant, list(VARIANTS)))
    if calibrate not in CALIBRATE_METHODS:
        raise ConfigError(f"unknown calibration method '{calibrate}'", did_you_mean(calibrate, list(CALIBRATE_METHODS)))
    if variant in CALIBRATED and calibration is None:
        raise ConfigError(
            f"the {variant} variant is calibrated on real samples, and no calibration data was given",
            "pass calibration= (feeds of int64 input_ids and attention_mask), or drop the variant",
        )


def make_variant(
    variant: Variant,
    fp32: Path,
    num_heads: int,
    hidden_size: int,
    *,
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    calibrate: Calibrate = "minmax",
) -> dict[str, Any]:
    """Write `variant` beside the fp32 export `fp32`; returns {file, what was done}. `calibration` (feeds of
    int64 (B, T) input_ids and attention_mask) is needed by int8-static, `calibrate` picks its method."""
    _check_request(variant, calibration, calibrate)
    out = fp32.with_name(FILES[variant])
    if variant == "fp32":
        return {"file": out.name, "fusions": {}}
    if variant == "int8-static":
        assert calibration is not None  # _check_request
        return {"file": out.name, **quantize_static_int8(fp32, out, calibration_rows(calibration), calibrate)}
    optimized = fp32.with_name(FILES["optimized"])
    fusions = optimize(fp32, optimized, num_heads, hidden_size) if not optimized.is_file() else {}
    if variant == "optimized":
        return {"file": out.name, "fusions": fusions}
    if variant == "int8-dynamic":
        quantize_int8(optimized, out)
        return {"file": out.name, "fusions": fusions, "quantized_ops": _new_ops(optimized, out)}
    sources = {"optimized": optimized, "fp32": fp32}
    if variant == "int4":
        done = _from_first(sources, out, quantize_int4)
        base = sources[done["source"]]
        left = op_counts(out).get("MatMul", 0)
        quant = {"quantized_ops": _new_ops(base, out), "fp32_matmuls": left, "block_size": INT4_BLOCK}
        return {"file": out.name, "fusions": fusions, **done, **quant, "symmetric": True}
    done = _from_first(sources, out, to_fp16)
    return {
        "file": out.name,
        "fusions": fusions,
        **done,
        "keep_io_types": True,
        "cast_nodes": op_counts(out).get("Cast", 0),
    }
