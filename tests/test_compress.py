"""kdpipe.compress.quantize on a tiny BERT classifier exported in code: the int8-static, int4 and fp16 variants (files,
sizes, dynamic axes, agreement with fp32, what each records), their refusals, and the older variants unchanged."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from conftest import FILLER, WORDS, make_model_dir

from kdpipe.compress import quantize as compress
from kdpipe.compress.quantize import FILES, VARIANTS, make_variant, op_counts
from kdpipe.errors import ConfigError

HEADS, HIDDEN, LABELS = 2, 32, 3
NEW = ("int8-static", "int4", "fp16")
# max abs logit difference from fp32 on the seeded batch below. Measured on this model (onnxruntime 1.32, x86):
# int8-static 0.32, int4 0.31, fp16 0.0016, int8-dynamic 0.085; the fp32 logits themselves spread 0.26-0.40
# (std over the batch). The bounds leave about 2x headroom for other CPUs' kernels while a graph that lost its
# weights or its mask is still caught (by agreement, below, when not by these).
MAX_DIFF = {"int8-static": 0.75, "int4": 0.75, "fp16": 0.01}
# argmax agreement with fp32: 0.969 (62/64) measured for int8-static and int4, 1.0 for fp16. The fp32 argmax
# splits the batch 40 / 24 between two classes, so a graph that answers one class everywhere scores <= 0.625.
MIN_AGREEMENT = 0.75


def _widen(model_dir: Path) -> None:
    """Redraw the encoder's and head's matrices from N(0, 0.2^2) (about 1/sqrt(hidden), Xavier's scale): with
    BERT's init (std 0.02) the tiny model's logits are the same to 1e-4 for every input, so argmax agreement
    would mean nothing and any quantisation error would look small."""
    import torch
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(model_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classifier's fp32 export (dynamic batch and sequence axes): out/model.onnx."""
    from kdpipe.tasks.classification.export import export_onnx

    base = tmp_path_factory.mktemp("compress")
    model_dir = make_model_dir(base / "model")
    _widen(model_dir)
    export_onnx(model_dir, base / "onnx", 18)
    return base / "onnx" / "model.onnx"


@pytest.fixture(scope="module")
def calibration(exported: Path) -> list[dict[str, np.ndarray]]:
    """32 sentences of the fixture vocabulary, tokenised in batches of 8 padded to each batch's longest (so the
    batches differ in length, as the export stage's would)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported.parent)
    rng = random.Random(1)
    words = [w for ws in WORDS.values() for w in ws] + FILLER
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(32)]
    feeds = []
    for i in range(0, len(texts), 8):
        enc = tok(texts[i : i + 8], padding=True, return_tensors="np")
        feeds.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return feeds


@pytest.fixture(scope="module")
def made(exported: Path, calibration: list[dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Every variant, made once beside the export in VARIANTS order (as the export stage does)."""
    return {v: make_variant(v, exported, HEADS, HIDDEN, calibration=calibration) for v in VARIANTS}


def _random_batch(exported: Path, batch: int = 64, tokens: int = 10) -> dict[str, np.ndarray]:
    """Seeded ids of real (non-special) tokens between [CLS] and [SEP], rows of random length padded with mask 0."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported.parent)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, len(tok), (batch, tokens))
    lengths = rng.integers(3, tokens + 1, batch)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = tok.cls_token_id
    ids[np.arange(batch), lengths - 1] = tok.sep_token_id
    return {"input_ids": np.where(mask == 1, ids, 0).astype(np.int64), "attention_mask": mask}


def _logits(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = feed["input_ids"]
    return session.run(None, {i.name: feed.get(i.name, np.zeros_like(ids)) for i in session.get_inputs()})[0]


def _scales(path: Path) -> dict[str, float]:
    """The per-tensor (activation) scales of a QDQ graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {
        t.name: float(numpy_helper.to_array(t)) for t in graph.initializer if t.name.endswith("_scale") and not t.dims
    }


def test_variant_names_files_and_order() -> None:
    assert VARIANTS == ("fp32", "optimized", "int8-dynamic", "int8-static", "int4", "fp16")
    assert get_args(compress.Variant) == VARIANTS
    assert set(FILES) == set(VARIANTS) and len(set(FILES.values())) == len(VARIANTS)
    assert compress.CALIBRATE_METHODS == ("minmax", "percentile", "entropy")


@pytest.mark.parametrize("variant", NEW)
def test_new_variant_runs_at_two_shapes_and_agrees_with_fp32(
    variant: str, exported: Path, made: dict[str, dict[str, Any]]
) -> None:
    path = exported.with_name(made[variant]["file"])
    assert path.is_file() and path.name == FILES[variant]  # type: ignore[index]
    for batch, tokens in ((1, 5), (4, 9)):  # neither is the exporter's dummy shape: a static axis fails here
        feed = _random_batch(exported, batch, tokens)
        got = _logits(path, feed)
        assert got.shape == (batch, LABELS) and got.dtype == np.float32
        assert np.isfinite(got).all()
    feed = _random_batch(exported)
    ref, got = _logits(exported, feed), _logits(path, feed)
    assert len(set(ref.argmax(-1).tolist())) > 1, "the fp32 model answers one class everywhere: agreement is vacuous"
    assert float(np.abs(ref - got).max()) < MAX_DIFF[variant]
    assert float((ref.argmax(-1) == got.argmax(-1)).mean()) >= MIN_AGREEMENT


def test_quantised_files_are_smaller(exported: Path, made: dict[str, dict[str, Any]]) -> None:
    size = {v: exported.with_name(d["file"]).stat().st_size for v, d in made.items()}
    # measured here: fp32 124 kB, optimized 90, int8-static 82, int4 56, fp16 49
    assert size["int8-static"] < 0.8 * size["fp32"]
    assert size["int4"] < 0.6 * size["fp32"] and size["int4"] < size["optimized"]
    assert size["fp16"] < 0.65 * size["optimized"]


def test_int8_static_records_calibration_and_source(
    exported: Path, made: dict[str, dict[str, Any]], calibration: list[dict[str, np.ndarray]]
) -> None:
    done = made["int8-static"]
    assert done["source"] == "fp32" and done["preprocessed"] is True and "preprocess_error" not in done
    samples = sum(len(f["input_ids"]) for f in calibration)
    widest = max(f["input_ids"].shape[1] for f in calibration)
    assert done["calibration"] == {"method": "minmax", "samples": samples, "tokens": widest}
    # every weight MatMul (6 per layer) and the three embedding Gathers hold int8 weights; the 4 attention
    # MatMuls of two activations stay fp32, and so do the pooler / classifier Gemms
    assert done["quantized_ops"] == {"Gather": 3, "MatMul": 12}
    assert done["fp32_matmuls"] == 4
    assert op_counts(exported.with_name(done["file"]))["Gemm"] == 2


def test_int4_and_fp16_record_their_source(exported: Path, made: dict[str, dict[str, Any]]) -> None:
    import onnx

    int4 = made["int4"]
    assert int4["source"] == "optimized" and "fallback_from" not in int4
    # the optimised graph's 6 MatMuls (attention output, FFN in and out per layer); q/k/v sit in fused Attention
    assert int4["quantized_ops"] == {"MatMulNBits": 6} and int4["block_size"] == 32
    fp16 = made["fp16"]
    assert fp16["source"] == "optimized" and "fallback_from" not in fp16
    model = onnx.load(str(exported.with_name(fp16["file"])))
    kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert "FLOAT16" in kinds
    elem = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert elem["input_ids"] == onnx.TensorProto.INT64 and elem["logits"] == onnx.TensorProto.FLOAT


def test_calibration_methods_reach_the_calibrator(
    exported: Path, made: dict[str, dict[str, Any]], calibration: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Each method gives its own activation scales. Through quantize_static alone, entropy gives minmax's
    scales exactly (onnxruntime's 128-bin default histogram leaves one candidate threshold)."""
    fp32 = tmp_path / "model.onnx"
    shutil.copy(exported, fp32)
    minmax = _scales(exported.with_name(made["int8-static"]["file"]))
    for method in ("percentile", "entropy"):
        done = make_variant("int8-static", fp32, HEADS, HIDDEN, calibration=calibration, calibrate=method)
        assert done["calibration"]["method"] == method
        scales = _scales(fp32.with_name(done["file"]))
        assert scales.keys() == minmax.keys()
        assert any(not np.isclose(scales[k], minmax[k]) for k in minmax), method


def test_calibrated_variant_needs_calibration_data(exported: Path, tmp_path: Path) -> None:
    fp32 = tmp_path / "model.onnx"
    shutil.copy(exported, fp32)
    with pytest.raises(ConfigError, match="calibration"):
        make_variant("int8-static", fp32, HEADS, HIDDEN)
    with pytest.raises(ConfigError, match="no samples"):
        make_variant("int8-static", fp32, HEADS, HIDDEN, calibration=[])
    with pytest.raises(ConfigError, match="attention_mask"):
        make_variant("int8-static", fp32, HEADS, HIDDEN, calibration=[{"input_ids": np.ones((2, 4), np.int64)}])
    assert not fp32.with_name(FILES["int8-static"]).exists()


def test_unknown_calibration_method_and_variant_are_refused(exported: Path, tmp_path: Path) -> None:
    fp32 = tmp_path / "model.onnx"
    shutil.copy(exported, fp32)
    feeds = [{"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)}]
    with pytest.raises(ConfigError, match="unknown calibration method 'minmx'") as info:
        make_variant("int8-static", fp32, HEADS, HIDDEN, calibration=feeds, calibrate="minmx")  # type: ignore[arg-type]
    assert "did you mean 'minmax'" in info.value.hint
    with pytest.raises(ConfigError, match="unknown export variant"):
        make_variant("int3", fp32, HEADS, HIDDEN)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_calibration_rows_pad_and_reader_feeds_token_type_zeros() -> None:
    feeds = [
        {"input_ids": np.full((2, 3), 7), "attention_mask": np.ones((2, 3), np.int32)},
        {"input_ids": np.full((1, 5), 8), "attention_mask": np.ones((1, 5), np.int64)},
    ]
    rows = compress.calibration_rows(feeds)
    assert [r["input_ids"].shape for r in rows] == [(1, 5)] * 3
    assert all(r[k].dtype == np.int64 for r in rows for k in r)
    assert rows[0]["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert rows[0]["input_ids"].tolist() == [[7, 7, 7, 0, 0]]
    reader = compress.calibration_reader(rows, ["input_ids", "attention_mask", "token_type_ids"])
    got = list(iter(reader.get_next, None))
    assert len(got) == 3 and reader.get_next() is None
    assert got[2]["token_type_ids"].tolist() == [[0] * 5] and got[2]["input_ids"].tolist() == [[8] * 5]
    with pytest.raises(ConfigError, match="pixel_values"):
        compress.calibration_reader(rows, ["input_ids", "pixel_values"])


def test_failed_preprocessing_falls_back_to_the_raw_graph(
    exported: Path, calibration: list[dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxruntime.quantization import shape_inference

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape inference exploded")

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    fp32 = tmp_path / "model.onnx"
    shutil.copy(exported, fp32)
    done = make_variant("int8-static", fp32, HEADS, HIDDEN, calibration=calibration)
    assert done["preprocessed"] is False and "shape inference exploded" in done["preprocess_error"]
    got = _logits(fp32.with_name(done["file"]), _random_batch(exported, 4, 9))
    assert got.shape == (4, LABELS) and np.isfinite(got).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8-static.onnx", "model.onnx"]


def test_int4_falls_back_to_the_fp32_graph_and_says_why(exported: Path, tmp_path: Path) -> None:
    sources = {"optimized": tmp_path / "missing.onnx", "fp32": exported}
    dst = tmp_path / "model.int4.onnx"
    done = compress._from_first(sources, dst, compress.quantize_int4)
    assert done["source"] == "fp32" and "optimized" in done["fallback_from"]
    # on the unfused graph all 12 weight MatMuls (q, k, v, attention output, FFN in / out) become MatMulNBits
    assert op_counts(dst)["MatMulNBits"] == 12
    with pytest.raises(ConfigError, match="no graph could be converted"):
        compress._from_first({"fp32": tmp_path / "missing.onnx"}, dst, compress.quantize_int4)
    assert not dst.exists()


def test_int4_without_onnx_ir_says_what_to_install(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime 1.32's int4 quantizer imports onnx_ir, which onnxruntime does not declare as a dependency."""
    import sys

    monkeypatch.delitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", raising=False)
    monkeypatch.setitem(sys.modules, "onnx_ir", None)  # what an environment without the package raises
    fp32 = tmp_path / "model.onnx"
    shutil.copy(exported, fp32)
    with pytest.raises(ConfigError, match="onnx_ir") as info:
        make_variant("int4", fp32, HEADS, HIDDEN)
    assert "pip install onnx-ir" in info.value.hint
    assert not fp32.with_name(FILES["int4"]).exists()


def test_existing_variants_unchanged(exported: Path, tmp_path: Path) -> None:
    """Op counts and fusions of 'optimized' and 'int8-dynamic' as kdpipe/compress/quantize.py made them before
    int8-static / int4 / fp16 were added (commit c004484, onnxruntime 1.32.0, this test's model); the files
    were also byte-identical then."""
    fp32 = tmp_path / "model.onnx"
    shutil.copy(exported, fp32)
    assert make_variant("fp32", fp32, HEADS, HIDDEN) == {"file": "model.onnx", "fusions": {}}
    opt = make_variant("optimized", fp32, HEADS, HIDDEN)
    applied = {k: v for k, v in opt["fusions"].items() if v}
    assert applied == {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2, "SkipLayerNormalization": 4}
    assert op_counts(fp32.with_name(opt["file"])) == {
        "Attention": 2, "BiasGelu": 2, "Cast": 3, "Constant": 1, "EmbedLayerNormalization": 1,
        "Gather": 1, "Gemm": 2, "MatMul": 6, "SkipLayerNormalization": 4, "Tanh": 1,
    }  # fmt: skip
    int8 = make_variant("int8-dynamic", fp32, HEADS, HIDDEN)
    assert int8["fusions"] == {}  # the optimised graph already exists: not re-made
    assert int8["quantized_ops"] == {
        "Add": 2, "DequantizeLinear": 2, "DynamicQuantizeLinear": 10, "MatMulInteger": 8, "Mul": 16,
        "QAttention": 2, "QEmbedLayerNormalization": 1,
    }  # fmt: skip
    assert op_counts(fp32.with_name(int8["file"])) == {
        "Add": 2, "BiasGelu": 2, "Cast": 11, "Constant": 1, "DequantizeLinear": 2, "DynamicQuantizeLinear": 10,
        "Gather": 1, "MatMulInteger": 8, "Mul": 16, "QAttention": 2, "QEmbedLayerNormalization": 1,
        "SkipLayerNormalization": 4, "Tanh": 1,
    }  # fmt: skip
