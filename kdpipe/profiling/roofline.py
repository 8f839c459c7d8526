"""A roofline for the profile stage: FLOPs and weight bytes of an ONNX model, peak GEMM throughput, floors.

Units throughout: FLOPs are counted as 2 x multiply-accumulates (one MAC = 2 FLOPs); throughput is in
GFLOP/s (1e9 FLOP/s); memory bandwidth in GB/s (1e9 bytes/s); latency and floors in milliseconds; sizes in
bytes. Only matrix products are counted (MatMul/Gemm and their quantized and fused variants): element-wise
ops, softmax, layer norm and gathers are left out, which for a transformer encoder is a few percent at most.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdpipe.errors import ArtifactError, ModelError

Dims = list[int] | None  # a tensor's concrete shape, None when its rank or any dim is unknown
Flops = tuple[int, int] | None  # (all FLOPs, the part done by integer kernels); None when the shape is unknown

# ops whose matrix product runs on integer (u8/s8, or 4-bit weight) kernels
_INTEGER_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "MatMulNBits"}
)
# ops that do multiply-accumulates this module does not count: always reported as unknown
_UNCOUNTED_OPS = frozenset(
    {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Einsum", "LSTM", "GRU", "RNN", "GroupQueryAttention"}
)
_COUNTED_OPS = frozenset(
    {"MatMul", "FusedMatMul", "Gemm", "Attention", "QAttention", "MultiHeadAttention"} | _INTEGER_OPS | _UNCOUNTED_OPS
)


@dataclass(frozen=True)
class Cost:
    """The work of one inference at `shape` = (batch, seq).

    `flops`: all counted FLOPs (2 x MACs), `int_flops` of them done by integer kernels (int8 / 4-bit weights);
    `weight_bytes`: bytes of all initializers, `weight_bytes_by_dtype` split by element type ('float32',
    'int8', 'uint8', 'float16', 'int4_packed', ...); `unknown_ops`: matrix-product ops whose FLOPs could not be
    counted (unknown shape, or an op type not modelled), so `flops` is a lower bound when it is not 0.
    """

    flops: int
    int_flops: int
    weight_bytes: int
    weight_bytes_by_dtype: dict[str, int]
    unknown_ops: int
    shape: tuple[int, int]

    @property
    def fp_flops(self) -> int:
        """The FLOPs done by floating-point kernels."""
        return self.flops - self.int_flops


# --- shapes -----------------------------------------------------------------------------------------------


def _dim_for(name: str, index: int, batch: int, seq: int) -> int | None:
    """The concrete value of a symbolic input dim: by its name, else by position (0 = batch, 1 = seq)."""
    low = name.lower()
    if "batch" in low:
        return batch
    if "seq" in low or "length" in low:
        return seq
    return {0: batch, 1: seq}.get(index)


def _concrete_copy(model: Any, batch: int, seq: int) -> Any:
    """A copy of `model` whose graph inputs have concrete dims, with stale value_info and output dims dropped."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in weights or not inp.type.tensor_type.HasField("shape"):
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            value = None if d.HasField("dim_value") else _dim_for(d.dim_param, i, batch, seq)
            if value is not None:
                d.dim_value = value  # a oneof: this clears dim_param
    del m.graph.value_info[:]
    for out in m.graph.output:
        out.type.tensor_type.ClearField("shape")
    return m


def _shapes_of(graph: Any) -> dict[str, Dims]:
    """Concrete shapes of the graph's inputs, outputs, value_info and initializers (None where unknown)."""
    shapes: dict[str, Dims] = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            shapes.setdefault(v.name, None)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        known = None if any(d is None for d in dims) else [int(d) for d in dims if d is not None]
        if known is not None or v.name not in shapes:
            shapes[v.name] = known
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    return shapes


def _infer_shapes(model: Any, batch: int, seq: int, with_ort: bool) -> dict[str, Dims]:
    """Tensor shapes at (batch, seq): onnx shape inference (with data propagation) on a concrete-input copy;
    `with_ort` fills what is left unknown from onnxruntime's symbolic shape inference, which also knows the
    contrib ops (com.microsoft) and resolves Shape->Gather->Slice chains onnx's data propagation sometimes
    drops (seen with batch 1 on torch-exported BERT). Both run from inside a temporary working directory: on a
    graph with an LSTM one of them writes <uuid>.data files into the working directory."""
    import tempfile
    from contextlib import chdir

    with tempfile.TemporaryDirectory() as tmp, chdir(tmp):
        return _infer_shapes_here(model, batch, seq, with_ort)


def _infer_shapes_here(model: Any, batch: int, seq: int, with_ort: bool) -> dict[str, Dims]:
    import onnx

    concrete = _concrete_copy(model, batch, seq)
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # a graph onnx cannot infer: count what the declared shapes allow
        inferred = concrete
    shapes = _shapes_of(inferred.graph)
    if with_ort:
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            ort_model = SymbolicShapeInference.infer_shapes(concrete, auto_merge=True, guess_output_rank=True)
            for name, dims in _shapes_of(ort_model.graph).items():
                if shapes.get(name) is None:
                    shapes[name] = dims
        except Exception:  # best effort only: what stays unknown is reported as unknown
            pass
    return shapes


# --- FLOPs per op -----------------------------------------------------------------------------------------


def _matmul(a: Dims, b: Dims, integer: bool = False) -> Flops:
    """2 x MACs of numpy-style matmul a @ b (batch dims broadcast; 1-D operands promoted)."""
    if a is None or b is None or not a or not b:
        return None
    a2 = [1, *a] if len(a) == 1 else a
    b2 = [*b, 1] if len(b) == 1 else b
    m, k, n = a2[-2], a2[-1], b2[-1]
    if b2[-2] != k:
        return None
    ra, rb = a2[:-2], b2[:-2]
    width = max(len(ra), len(rb))
    ra, rb = [1] * (width - len(ra)) + ra, [1] * (width - len(rb)) + rb
    flops = 2 * math.prod(max(x, y) for x, y in zip(ra, rb, strict=True)) * m * k * n
    return flops, flops if integer else 0


def _transposed(dims: Dims, flag: int) -> Dims:
    """dims with its last two axes swapped when `flag` is set."""
    if dims is None or not flag or len(dims) < 2:
        return dims
    return [*dims[:-2], dims[-1], dims[-2]]


def _attention(ins: list[Dims], attrs: dict[str, Any], quantized: bool) -> Flops:
    """com.microsoft Attention / QAttention: Q/K/V projections + QK^T + AV (no past state counted).

    QAttention's projections are integer GEMMs; its QK^T and AV, like Attention's, run in float."""
    x, w = ins[0], ins[1] if len(ins) > 1 else None
    if x is None or w is None or len(x) != 3 or len(w) != 2:
        return None
    b, s, h_in = x
    sizes = attrs.get("qkv_hidden_sizes") or [w[1] // 3] * 3
    hq, _hk, hv = (int(v) for v in sizes)
    proj = 2 * b * s * h_in * w[1]
    attn = 2 * b * s * s * hq + 2 * b * s * s * hv
    return proj + attn, proj if quantized else 0


def _multihead(ins: list[Dims]) -> Flops:
    """com.microsoft MultiHeadAttention with separate 3-D query [B,S,D], key [B,L,D], value [B,L,Dv]."""
    if len(ins) < 3 or any(d is None or len(d) != 3 for d in ins[:3]):
        return None
    q, k, v = ins[0], ins[1], ins[2]
    assert q is not None and k is not None and v is not None
    return 2 * q[0] * q[1] * k[1] * q[2] + 2 * q[0] * q[1] * k[1] * v[2], 0


def _nbits(ins: list[Dims], attrs: dict[str, Any]) -> Flops:
    """com.microsoft MatMulNBits: A [..., K] x a packed 4-bit (or n-bit) B of logical shape [K, N]."""
    a, k, n = ins[0], attrs.get("K"), attrs.get("N")
    if a is None or not a or k is None or n is None:
        return None
    flops = 2 * math.prod(a[:-1]) * int(k) * int(n)
    return flops, flops


def _gemm(ins: list[Dims], attrs: dict[str, Any], ia: int, ib: int, integer: bool) -> Flops:
    """Gemm / QGemm: A (input `ia`) [M,K] x B (input `ib`) [K,N], transA/transB honoured; bias not counted."""
    if len(ins) <= ib:
        return None
    a, b = _transposed(ins[ia], attrs.get("transA", 0)), _transposed(ins[ib], attrs.get("transB", 0))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    return _matmul(a, b, integer)


def _node_flops(node: Any, shapes: dict[str, Dims]) -> Flops:
    """(FLOPs, integer FLOPs) of one node; (0, 0) for ops without a matrix product; None when not countable."""
    from onnx import helper

    op = node.op_type
    ins = [shapes.get(name) if name else None for name in node.input]
    ins += [None] * max(0, 4 - len(ins))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    table: dict[str, Callable[[], Flops]] = {
        "MatMul": lambda: _matmul(ins[0], ins[1]),
        "FusedMatMul": lambda: _matmul(
            _transposed(ins[0], attrs.get("transA", 0)), _transposed(ins[1], attrs.get("transB", 0))
        ),
        "MatMulInteger": lambda: _matmul(ins[0], ins[1], True),
        "DynamicQuantizeMatMul": lambda: _matmul(ins[0], ins[1], True),
        "MatMulIntegerToFloat": lambda: _matmul(ins[0], ins[1], True),
        "QLinearMatMul": lambda: _matmul(ins[0], ins[3], True),
        "MatMulNBits": lambda: _nbits(ins, attrs),
        "Gemm": lambda: _gemm(ins, attrs, 0, 1, False),
        "QGemm": lambda: _gemm(ins, attrs, 0, 3, True),
        "Attention": lambda: _attention(ins, attrs, False),
        "QAttention": lambda: _attention(ins, attrs, True),
        "MultiHeadAttention": lambda: _multihead(ins),
        "EmbedLayerNormalization": lambda: (0, 0),  # gathers + layer norm: no matrix product
    }
    if op in _UNCOUNTED_OPS:
        return None
    return table[op]() if op in table else (0, 0)


def _counted_inside(node: Any, functions: dict[tuple[str, str], Any]) -> int:
    """How many matrix-product ops hide in a node's subgraphs (If/Loop/Scan) or model-local function body;
    they run an unknown number of times, so they are reported as unknown rather than counted."""
    from onnx import AttributeProto

    bodies = [a.g for a in node.attribute if a.type == AttributeProto.GRAPH]
    bodies += [g for a in node.attribute if a.type == AttributeProto.GRAPHS for g in a.graphs]
    inner = [n for g in bodies for n in g.node]
    fn = functions.get((node.domain, node.op_type))
    if fn is not None:
        inner += list(fn.node)
    return sum(_counted_inside(n, functions) + (n.op_type in _COUNTED_OPS) for n in inner)


def _count(graph: Any, shapes: dict[str, Dims], functions: dict[tuple[str, str], Any]) -> tuple[int, int, int]:
    """(FLOPs, integer FLOPs, unknown ops) summed over the graph's nodes."""
    flops = int_flops = unknown = 0
    for node in graph.node:
        unknown += _counted_inside(node, functions)
        got = _node_flops(node, shapes)
        if got is None:
            unknown += 1
        else:
            flops, int_flops = flops + got[0], int_flops + got[1]
    return flops, int_flops, unknown


# --- weights ----------------------------------------------------------------------------------------------

# bits per element of the packed sub-byte TensorProto types: UINT4, INT4, FLOAT4E2M1, UINT2, INT2, FLOAT6E2M3/E3M2
_SUB_BYTE = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2, 27: 6, 28: 6}


def _tensor_bytes(t: Any) -> int:
    """Bytes of one initializer: raw_data when inline, the external length, else element count x element size."""
    import onnx

    if t.raw_data:
        return len(t.raw_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    count = math.prod(int(d) for d in t.dims)
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return sum(len(s) for s in t.string_data)
    bits = _SUB_BYTE.get(t.data_type) or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return (count * bits + 7) // 8


def _dtype_name(data_type: int) -> str:
    """'float32', 'float16', 'int8', 'uint8', 'int4_packed', ... for a TensorProto data type."""
    import onnx

    name = onnx.TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, f"{name}_packed" if data_type in _SUB_BYTE else name)


def weight_bytes(graph: Any) -> dict[str, int]:
    """Bytes of the graph's initializers (sparse ones: values + indices) by dtype; MatMulNBits' packed uint8
    weights are filed under 'int{bits}_packed'."""
    packed = {n.input[1]: f"int{_nbits_bits(n)}_packed" for n in graph.node if n.op_type == "MatMulNBits"}
    out: dict[str, int] = {}
    tensors = [*graph.initializer]
    tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    for t in tensors:
        key = packed.get(t.name) or _dtype_name(t.data_type)
        out[key] = out.get(key, 0) + _tensor_bytes(t)
    return out


def _nbits_bits(node: Any) -> int:
    """The `bits` attribute of a MatMulNBits node (4 by default)."""
    return next((int(a.i) for a in node.attribute if a.name == "bits"), 4)


# --- the public API ---------------------------------------------------------------------------------------


def onnx_cost(model_path: Path, batch: int, seq: int) -> Cost:
    """FLOPs (2 x MACs) of one inference of the ONNX model at input shape [batch, seq], and its weight bytes.

    The symbolic input dims ('batch_size', 'sequence_length', or by position) are set to batch/seq in a copy of
    the model before shape inference, so the count is for this shape, not for the exporter's dummy input.
    Matrix products whose shapes stay unknown are counted in `unknown_ops` and left out of `flops`."""
    import onnx

    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got {batch} x {seq}")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # a missing file (OSError) or protobuf's DecodeError
        raise ArtifactError(f"cannot read ONNX model {model_path}: {e}", "re-run the export stage") from e
    functions = {(f.domain, f.name): f for f in model.functions}
    flops, int_flops, unknown = _count(model.graph, _infer_shapes(model, batch, seq, False), functions)
    if unknown:  # a second, slower pass for what onnx alone could not shape
        flops, int_flops, unknown = _count(model.graph, _infer_shapes(model, batch, seq, True), functions)
    by_dtype = weight_bytes(model.graph)
    return Cost(
        flops=flops,
        int_flops=int_flops,
        weight_bytes=sum(by_dtype.values()),
        weight_bytes_by_dtype=by_dtype,
        unknown_ops=unknown,
        shape=(batch, seq),
    )


def config_flops(config: dict[str, Any], batch: int, seq: int) -> int:
    """Analytic FLOPs (2 x MACs) of a BERT-style encoder + pooler + classifier from its config.json dict.

    Per layer 2*B*T*(4*H*H + 2*H*I) for the Q/K/V/output and FFN projections plus 2*2*B*T*T*H for QK^T and
    AV; then the pooler 2*B*H*H and the classifier 2*B*H*C. Embedding lookups are 0 FLOPs."""
    try:
        layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
        inter = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(
            f"config has no usable BERT size field: {e}",
            "need num_hidden_layers, hidden_size and intermediate_size in config.json",
        ) from e
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    b, t, h = batch, seq, hidden
    per_layer = 2 * b * t * (4 * h * h + 2 * h * inter) + 2 * 2 * b * t * t * h
    return layers * per_layer + 2 * b * h * h + 2 * b * h * labels


def _gemm_model(dtype: str, n: int) -> tuple[bytes, Any]:
    """A one-node ONNX model (MatMul fp32, or MatMulInteger u8 x s8 -> s32) with B an initializer, as ORT
    prepacks real weights; returns the serialized model and a matching input A [n, n]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a: np.ndarray[Any, Any]
    b: np.ndarray[Any, Any]
    if dtype == "fp32":
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        op, in_type, out_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    else:
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b = rng.integers(-128, 128, (n, n), dtype=np.int8)
        op, in_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["Y"])],
        "peak_gemm",
        [helper.make_tensor_value_info("A", in_type, [n, n])],
        [helper.make_tensor_value_info("Y", out_type, [n, n])],
        [numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), a


def peak_gemm(threads: int, dtype: Literal["fp32", "int8"], seconds: float = 1.0, n: int = 512) -> float:
    """The machine's measured peak GEMM throughput in GFLOP/s, with onnxruntime's CPU provider and thread pool.

    One [n,n] x [n,n] MatMul (fp32) or MatMulInteger (uint8 x int8 -> int32), 2*n^3 FLOPs a run, in a session
    with intra_op_num_threads=threads and I/O bound once. After 5 warm-up runs, runs are timed for `seconds`
    in 3 equal windows; the result is the best window's median per-run GFLOP/s. The median is robust to single
    slow runs; taking the best window discards a window slowed by other work sharing the cores (noise only
    ever lowers a throughput, and a peak is wanted)."""
    import numpy as np
    import onnxruntime as ort

    if dtype not in ("fp32", "int8"):
        raise ValueError(f"dtype must be 'fp32' or 'int8', got {dtype!r}")
    if threads < 1 or n < 1 or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"need threads >= 1, n >= 1, seconds > 0; got {threads}, {n}, {seconds}")
    blob, a = _gemm_model(dtype, n)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    io.bind_cpu_input("A", a)
    out = np.empty((n, n), dtype=np.float32 if dtype == "fp32" else np.int32)
    io.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))
    for _ in range(5):
        sess.run_with_iobinding(io)
    flop = 2.0 * n**3
    medians = []
    for _ in range(3):
        rates: list[float] = []
        end = time.perf_counter() + seconds / 3
        while len(rates) < 3 or time.perf_counter() < end:
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            rates.append(flop / max(time.perf_counter() - t0, 1e-9) / 1e9)
        medians.append(statistics.median(rates))
    return max(medians)


def _require(name: str, value: float | None, optional: bool = False) -> None:
    """ValueError unless `value` is a finite number > 0 (or None when optional): a NaN must never turn into a
    plausible-looking floor or percentage."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _floors(
    cost: Cost, peak_fp32_gflops: float, peak_int8_gflops: float | None, mem_gbps: float | None
) -> tuple[float, float | None]:
    """(compute floor ms, memory floor ms or None), the inputs checked."""
    _require("peak_fp32_gflops", peak_fp32_gflops)
    _require("peak_int8_gflops", peak_int8_gflops, optional=True)
    _require("mem_gbps", mem_gbps, optional=True)
    if not 0 <= cost.int_flops <= cost.flops or cost.weight_bytes < 0:
        raise ValueError(f"inconsistent cost: {cost}")
    int_peak = peak_int8_gflops if peak_int8_gflops is not None else peak_fp32_gflops
    # GFLOP/s x 1e6 = FLOP per ms
    compute_ms = cost.fp_flops / (peak_fp32_gflops * 1e6) + cost.int_flops / (int_peak * 1e6)
    memory_ms = cost.weight_bytes / (mem_gbps * 1e6) if mem_gbps is not None else None  # GB/s x 1e6 = B/ms
    return compute_ms, memory_ms


def roofline(
    cost: Cost,
    latency_ms: float,
    peak_fp32_gflops: float,
    peak_int8_gflops: float | None,
    mem_gbps: float | None = None,
) -> dict[str, Any]:
    """Where a measured latency stands against the roofline floor of `cost`.

    compute_floor_ms = fp FLOPs / fp32 peak + integer FLOPs / int8 peak (the fp32 peak when no int8 figure);
    memory_floor_ms = weight_bytes / mem_gbps (weights read once per inference; None without a bandwidth);
    floor_ms = the larger of the two, `bound` says which. percent_of_roofline = 100 * floor_ms / latency_ms:
    how close the MEASURED latency comes to the floor (100 = at the floor; above 100 means a peak was
    underestimated). achieved_gflops = flops / latency. With unknown_ops > 0 the floor is a lower bound.
    Peaks in GFLOP/s, bandwidth in GB/s (1e9 B/s), times in ms. Non-finite or non-positive inputs: ValueError."""
    _require("latency_ms", latency_ms)
    compute_ms, memory_ms = _floors(cost, peak_fp32_gflops, peak_int8_gflops, mem_gbps)
    floor_ms = max(compute_ms, memory_ms or 0.0)
    return {
        "shape": list(cost.shape),
        "flops": cost.flops,
        "int_flops": cost.int_flops,
        "weight_bytes": cost.weight_bytes,
        "unknown_ops": cost.unknown_ops,
        "peak_fp32_gflops": peak_fp32_gflops,
        "peak_int8_gflops": peak_int8_gflops,
        "mem_gbps": mem_gbps,
        "latency_ms": latency_ms,
        "compute_floor_ms": compute_ms,
        "memory_floor_ms": memory_ms,
        "floor_ms": floor_ms,
        "bound": "memory" if memory_ms is not None and memory_ms > compute_ms else "compute",
        "achieved_gflops": cost.flops / (latency_ms * 1e6),
        "percent_of_roofline": 100.0 * floor_ms / latency_ms,
    }


def estimate_latency_ms(
    cost: Cost, peak_fp32_gflops: float, peak_int8_gflops: float | None = None, mem_gbps: float | None = None
) -> float:
    """An ESTIMATE, in ms, for a device the profile does not run on: the roofline floor, max(compute floor,
    memory floor), from the device's peaks (GFLOP/s) and bandwidth (GB/s). Never a measurement: callers must
    label it as an estimate. Real latency is above it (kernel efficiency, non-GEMM ops, dispatch overhead)."""
    compute_ms, memory_ms = _floors(cost, peak_fp32_gflops, peak_int8_gflops, mem_gbps)
    return max(compute_ms, memory_ms or 0.0)


__all__ = ["Cost", "config_flops", "estimate_latency_ms", "onnx_cost", "peak_gemm", "roofline"]
