"""kdpipe.profiling.roofline: FLOPs from ONNX graphs at concrete shapes, the analytic BERT count, peak GEMM, floors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kdpipe.errors import ArtifactError, ModelError
from kdpipe.profiling.roofline import Cost, config_flops, estimate_latency_ms, onnx_cost, peak_gemm, roofline

B, T = "batch_size", "sequence_length"


def _save(tmp_path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def _init(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """MatMul [B,T,8] x [8,16], Gemm [B,8] x [16,8]^T, MatMulInteger [B,T,8]u8 x [8,4]s8 with a u8 zero point."""
    vi = helper.make_tensor_value_info
    return _save(
        tmp_path,
        [
            helper.make_node("MatMul", ["x", "W"], ["y"]),
            helper.make_node("Gemm", ["p", "W2"], ["g"], transB=1),
            helper.make_node("MatMulInteger", ["q", "Wq", "azp"], ["yq"]),
        ],
        [
            vi("x", TensorProto.FLOAT, [B, T, 8]),
            vi("p", TensorProto.FLOAT, [B, 8]),
            vi("q", TensorProto.UINT8, [B, T, 8]),
        ],
        [vi("y", TensorProto.FLOAT, None), vi("g", TensorProto.FLOAT, None), vi("yq", TensorProto.INT32, None)],
        [_init("W", (8, 16), np.float32), _init("W2", (16, 8), np.float32), _init("Wq", (8, 4), np.int8)]
        + [numpy_helper.from_array(np.array(3, dtype=np.uint8), "azp")],
    )


@pytest.mark.parametrize(("b", "t"), [(2, 5), (3, 7), (1, 1)])
def test_flops_follow_the_requested_shape(mixed: Path, b: int, t: int) -> None:
    c = onnx_cost(mixed, b, t)
    matmul, gemm, integer = 2 * b * t * 8 * 16, 2 * b * 8 * 16, 2 * b * t * 8 * 4
    assert (c.flops, c.int_flops, c.unknown_ops, c.shape) == (matmul + gemm + integer, integer, 0, (b, t))
    assert c.fp_flops == matmul + gemm


def test_hand_graph_is_valid_and_runs_at_the_counted_shape(mixed: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(mixed), providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((3, 7, 8), np.float32), "p": np.ones((3, 8), np.float32), "q": np.ones((3, 7, 8), np.uint8)}
    y, g, yq = sess.run(None, feed)
    assert (y.shape, g.shape, yq.shape) == ((3, 7, 16), (3, 16), (3, 7, 4))


def test_weight_bytes_by_dtype(mixed: Path) -> None:
    c = onnx_cost(mixed, 2, 5)
    assert c.weight_bytes_by_dtype == {"float32": 2 * 8 * 16 * 4, "int8": 8 * 4, "uint8": 1}
    assert c.weight_bytes == 1024 + 32 + 1


def test_nbits_float16_int4_weights_and_integer_flops(tmp_path: Path) -> None:
    vi = helper.make_tensor_value_info
    nbits = helper.make_node(
        "MatMulNBits", ["a", "Bq", "scales"], ["y"], domain="com.microsoft", K=32, N=8, bits=4, block_size=32
    )
    path = _save(
        tmp_path,
        [nbits],
        [vi("a", TensorProto.FLOAT, [B, T, 32])],
        [vi("y", TensorProto.FLOAT, None)],
        [
            _init("Bq", (8, 1, 16), np.uint8),  # N x blocks x (block_size * bits / 8)
            _init("scales", (8,), np.float32),
            _init("unused_half", (3, 5), np.float16),
            helper.make_tensor("unused_int4", TensorProto.INT4, [5], [1, 2, 3, 4, 5]),
        ],
    )
    for b, t in [(1, 4), (2, 9)]:
        c = onnx_cost(path, b, t)
        assert c.flops == c.int_flops == 2 * b * t * 32 * 8 and c.unknown_ops == 0
    assert c.weight_bytes_by_dtype == {"int4_packed": 8 * 16 + 3, "float32": 32, "float16": 30}


def test_fused_attention_ops(tmp_path: Path) -> None:
    vi = helper.make_tensor_value_info
    ms = "com.microsoft"
    path = _save(
        tmp_path,
        [
            helper.make_node("Attention", ["x", "W", "bias"], ["y"], domain=ms, num_heads=2),
            helper.make_node("QAttention", ["xq", "Wq", "bias", "s", "s"], ["yq"], domain=ms, num_heads=2),
            helper.make_node(
                "EmbedLayerNormalization", ["ids", "", "emb", "pos", "", "gamma", "beta"], ["e", "m"], domain=ms
            ),
        ],
        [
            vi("x", TensorProto.FLOAT, [B, T, 8]),
            vi("xq", TensorProto.UINT8, [B, T, 8]),
            vi("ids", TensorProto.INT32, [B, T]),
        ],
        [vi("y", TensorProto.FLOAT, None), vi("yq", TensorProto.FLOAT, None), vi("e", TensorProto.FLOAT, None)],
        [_init("W", (8, 24), np.float32), _init("Wq", (8, 24), np.int8), _init("bias", (24,), np.float32)]
        + [_init("s", (), np.float32), _init("emb", (10, 8), np.float32), _init("pos", (16, 8), np.float32)]
        + [_init("gamma", (8,), np.float32), _init("beta", (8,), np.float32)],
    )
    for b, t in [(1, 4), (3, 6)]:
        proj, attn = 2 * b * t * 8 * 24, 2 * 2 * b * t * t * 8
        c = onnx_cost(path, b, t)
        assert (c.flops, c.int_flops, c.unknown_ops) == (2 * (proj + attn), proj, 0)


def test_unknown_shapes_are_reported_not_guessed(tmp_path: Path) -> None:
    vi = helper.make_tensor_value_info
    path = _save(
        tmp_path,
        [
            helper.make_node("Mystery", ["x"], ["h"], domain="nobody.knows"),
            helper.make_node("MatMul", ["h", "W"], ["y"]),  # its input shape cannot be inferred
            helper.make_node("MatMul", ["x", "W"], ["z"]),  # this one can
            helper.make_node("Conv", ["img", "k"], ["c"]),  # MACs this module does not model
        ],
        [vi("x", TensorProto.FLOAT, [B, T, 8]), vi("img", TensorProto.FLOAT, [1, 1, 4, 4])],
        [vi("y", TensorProto.FLOAT, None), vi("z", TensorProto.FLOAT, None), vi("c", TensorProto.FLOAT, None)],
        [_init("W", (8, 16), np.float32), _init("k", (1, 1, 3, 3), np.float32)],
    )
    c = onnx_cost(path, 2, 3)
    assert c.unknown_ops == 2 and c.flops == 2 * 2 * 3 * 8 * 16


def test_unreadable_model_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read ONNX model"):
        onnx_cost(tmp_path / "missing.onnx", 1, 8)
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(ArtifactError):
        onnx_cost(tmp_path / "junk.onnx", 1, 8)
    with pytest.raises(ValueError):
        onnx_cost(tmp_path / "missing.onnx", 0, 8)


TINY = {
    "vocab_size": 50,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_labels": 3,
    "max_position_embeddings": 64,
}


def test_config_flops_by_hand() -> None:
    # per layer 2*16*(4*32*32 + 2*32*64) + 4*16*16*32 = 294912; x2 layers, + pooler 2048 + classifier 192
    assert config_flops(TINY, 1, 16) == 592064
    assert config_flops(TINY, 2, 16) == 2 * 592064
    with pytest.raises(ModelError, match="hidden_size"):
        config_flops({"num_hidden_layers": 2}, 1, 8)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, attn_implementation="eager")).eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges identical (all-zero, all-one) tensors
        for p in model.parameters():
            p.normal_()
    ids = torch.randint(0, 50, (2, 8))
    path = tmp_path_factory.mktemp("bert") / "model.onnx"
    axes = {0: "batch_size", 1: "sequence_length"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes},
            opset_version=18,
            dynamo=False,
        )
    return path, sum(p.numel() for p in model.parameters())


# (1, 16): batch 1 defeats onnx's own data propagation on this graph; (3, 40): not the export's (2, 8)
@pytest.mark.parametrize(("b", "t"), [(1, 16), (3, 40), (2, 8)])
def test_exported_bert_matches_the_analytic_count(tiny_bert: tuple[Path, int], b: int, t: int) -> None:
    path, params = tiny_bert
    c = onnx_cost(path, b, t)
    assert c.unknown_ops == 0 and c.int_flops == 0
    assert c.flops == pytest.approx(config_flops(TINY, b, t), rel=0.02)
    assert c.weight_bytes_by_dtype["float32"] == pytest.approx(4 * params, rel=0.01)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_peak_gemm_is_a_finite_positive_throughput(dtype: Any) -> None:
    g = peak_gemm(1, dtype, seconds=0.2, n=128)
    assert math.isfinite(g) and g > 0.1  # GFLOP/s; any CPU of this decade does far more


def test_peak_gemm_refuses_bad_arguments() -> None:
    for kwargs in ({"dtype": "fp16"}, {"threads": 0}, {"seconds": math.nan}, {"seconds": 0.0}, {"n": 0}):
        args: dict[str, Any] = {"threads": 1, "dtype": "fp32", "seconds": 0.05, "n": 16, **kwargs}
        with pytest.raises(ValueError):
            peak_gemm(**args)


def _cost(flops: int, int_flops: int = 0, weight_bytes: int = 0) -> Cost:
    return Cost(flops, int_flops, weight_bytes, {"float32": weight_bytes}, 0, (1, 128))


def test_roofline_arithmetic() -> None:
    r = roofline(_cost(10**9), 20.0, 100.0, None)
    assert r["compute_floor_ms"] == pytest.approx(10.0) and r["floor_ms"] == pytest.approx(10.0)
    assert r["percent_of_roofline"] == pytest.approx(50.0) and r["achieved_gflops"] == pytest.approx(50.0)
    assert r["memory_floor_ms"] is None and r["bound"] == "compute"
    mixed = _cost(15 * 10**8, int_flops=10**9)
    assert roofline(mixed, 10.0, 100.0, 400.0)["compute_floor_ms"] == pytest.approx(5.0 + 2.5)
    assert roofline(mixed, 10.0, 100.0, None)["compute_floor_ms"] == pytest.approx(15.0)  # int at the fp32 peak
    heavy = _cost(10**9, weight_bytes=4 * 10**8)
    r = roofline(heavy, 50.0, 100.0, None, mem_gbps=10.0)
    assert (r["memory_floor_ms"], r["floor_ms"], r["bound"]) == (pytest.approx(40.0), pytest.approx(40.0), "memory")
    assert r["percent_of_roofline"] == pytest.approx(80.0)
    assert estimate_latency_ms(heavy, 100.0, None, 10.0) == pytest.approx(40.0)
    assert estimate_latency_ms(mixed, 100.0, 400.0) == pytest.approx(7.5)


@pytest.mark.parametrize(
    "bad",
    [
        {"latency_ms": math.nan},
        {"latency_ms": math.inf},
        {"latency_ms": 0.0},
        {"latency_ms": -1.0},
        {"peak_fp32_gflops": 0.0},
        {"peak_fp32_gflops": math.nan},
        {"peak_int8_gflops": math.nan},
        {"peak_int8_gflops": 0.0},
        {"mem_gbps": 0.0},
        {"mem_gbps": math.inf},
    ],
)
def test_non_finite_or_zero_inputs_are_refused(bad: dict[str, float]) -> None:
    args: dict[str, Any] = {"latency_ms": 20.0, "peak_fp32_gflops": 100.0, "peak_int8_gflops": 400.0, **bad}
    with pytest.raises(ValueError):
        roofline(_cost(10**9), **args)
    if "latency_ms" not in bad:
        est = {k: v for k, v in args.items() if k != "latency_ms"}
        with pytest.raises(ValueError):
            estimate_latency_ms(_cost(10**9), **est)


def test_inconsistent_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        roofline(_cost(10, int_flops=20), 1.0, 100.0, None)
