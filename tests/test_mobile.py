"""kdpipe.profiling.mobile on the tiny BERT: ORT-format packages of the fp32, int8 and fused exports, the operator
config, outputs at two dynamic shapes, onnxruntime's usability findings, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_dir

from kdpipe.errors import ConfigError, ExportToleranceError, KdpipeError, ModelError
from kdpipe.profiling.mobile import CONFIG_NAME, ORT_NAME, OrtPackage, to_ort_format, usability

# 1 x 5 and 3 x 11 tokens with [CLS]/[SEP]; the 3-row batch pads its shorter rows
TEXTS = (["good car road"], ["the city is very nice today my drive was", "bad road", "awful sad crash today"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model dir, fp32 model.onnx, its int8 dynamic quantisation and its optimizer-fused graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kdpipe.compress.quantize import optimize
    from kdpipe.tasks.classification.export import export_onnx

    base = tmp_path_factory.mktemp("mobile")
    model_dir = make_model_dir(base / "model")
    export_onnx(model_dir, base / "onnx", 18)
    fp32 = base / "onnx" / "model.onnx"
    int8 = base / "onnx" / "model.int8.onnx"
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    fused = base / "onnx" / "model.opt.onnx"
    fusions = optimize(fp32, fused, num_heads=2, hidden_size=32)
    assert fusions["Attention"] == 2 and fusions["SkipLayerNormalization"] > 0, fusions
    return {"dir": model_dir, "fp32": fp32, "int8": int8, "fused": fused, "base": base}


@pytest.fixture(scope="module")
def packages(exported: dict[str, Path]) -> dict[str, OrtPackage]:
    base = exported["base"]
    return {name: to_ort_format(exported[name], base / f"ort-{name}") for name in ("fp32", "int8", "fused")}


def config_ops(path: Path) -> dict[str, set[str]]:
    """domain -> op types, read from the config file here (not through kdpipe.profiling.mobile's parser)."""
    ops: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _opset, names = line.split(";")
            ops.setdefault(domain, set()).update(names.split(","))
    return ops


def graph_ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_package_files_have_stable_names(packages: dict[str, OrtPackage]) -> None:
    for pkg in packages.values():
        assert pkg.ort.name == ORT_NAME and pkg.required_operators.name == CONFIG_NAME
        assert sorted(p.name for p in pkg.ort.parent.iterdir()) == sorted([ORT_NAME, CONFIG_NAME])  # no leftovers
        assert pkg.bytes == pkg.ort.stat().st_size > 10_000
        assert pkg.ort.read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer file identifier
        assert {k.split(";")[0] for k in pkg.operators} == set(config_ops(pkg.required_operators))
        assert str(pkg.ort.resolve()) in pkg.required_operators.read_text()  # header names the final file


def test_fp32_config_lists_the_graph_ops(exported: dict[str, Path], packages: dict[str, OrtPackage]) -> None:
    ops = config_ops(packages["fp32"].required_operators)
    assert set(ops) == {"ai.onnx"}  # 'basic' adds no contrib fusions
    assert {"MatMul", "Gather", "Softmax", "LayerNormalization", "Erf"} <= ops["ai.onnx"]
    assert ops["ai.onnx"] <= graph_ops(exported["fp32"])  # basic only folds/removes nodes
    assert packages["fp32"].contrib_ops == []


def test_int8_config_lists_quantised_ops(exported: dict[str, Path], packages: dict[str, OrtPackage]) -> None:
    ops = config_ops(packages["int8"].required_operators)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops["ai.onnx"]
    assert "MatMulInteger" not in config_ops(packages["fp32"].required_operators)["ai.onnx"]
    assert packages["int8"].bytes < packages["fp32"].bytes


def test_fused_graph_converts_with_contrib_ops(packages: dict[str, OrtPackage]) -> None:
    pkg = packages["fused"]
    assert {"com.microsoft:Attention", "com.microsoft:SkipLayerNormalization"} <= set(pkg.contrib_ops)
    assert "Attention" in config_ops(pkg.required_operators)["com.microsoft"]


@pytest.mark.parametrize("name", ["fp32", "int8", "fused"])
def test_ort_outputs_equal_onnx_at_two_shapes(
    exported: dict[str, Path], packages: dict[str, OrtPackage], name: str
) -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["dir"])
    onnx_s = ort.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    ort_s = ort.InferenceSession(str(packages[name].ort), providers=["CPUExecutionProvider"])
    shapes = []
    for texts in TEXTS:
        enc = tok(texts, padding=True, return_tensors="np")
        feed = {i.name: enc[i.name].astype(np.int64) for i in onnx_s.get_inputs()}
        assert int(feed["input_ids"].max()) > 4  # real words, not only special tokens
        ref, got = onnx_s.run(["logits"], feed)[0], ort_s.run(["logits"], feed)[0]
        assert got.shape == ref.shape == (len(texts), 3)
        assert float(np.abs(ref - got).max()) <= 1e-5
        shapes.append(feed["input_ids"].shape)
    assert shapes == [(1, 5), (3, 11)]
    assert packages[name].max_abs_diff <= 1e-5


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_usability_findings(exported: dict[str, Path], name: str) -> None:
    findings = usability(exported[name])
    assert findings[0].startswith("Recommendation: ") and "CPU EP" in findings[0]
    assert all(f and "\n" not in f for f in findings)
    assert any(f.startswith("[NNAPI] Model should perform well with NNAPI as is:") for f in findings)
    assert any("Model has dynamic inputs and outputs" in f for f in findings)
    unsupported = " ".join(f for f in findings if "Unsupported ops:" in f)
    assert "ai.onnx:Erf" in unsupported
    assert ("ai.onnx:MatMulInteger" in unsupported) == (name == "int8")


def test_usability_reports_contrib_ops(exported: dict[str, Path]) -> None:
    unsupported = " ".join(f for f in usability(exported["fused"]) if "Unsupported ops:" in f)
    assert "com.microsoft:Attention" in unsupported and "com.microsoft:SkipLayerNormalization" in unsupported


def test_corrupt_onnx_is_a_model_error(exported: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(exported["fp32"].read_bytes()[:5000])  # a truncated export
    with pytest.raises(ModelError) as info:
        to_ort_format(bad, tmp_path / "out")
    assert "Protobuf parsing failed" in info.value.message and "corrupt" in info.value.hint
    assert list((tmp_path / "out").iterdir()) == []
    findings = usability(bad)
    assert len(findings) == 1 and findings[0].startswith("usability check failed for model.onnx (")
    with pytest.raises(ModelError, match="no such ONNX model file"):
        to_ort_format(tmp_path / "missing.onnx", tmp_path / "out")


def test_unknown_operator_is_a_model_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "custom.onnx")
    with pytest.raises(ModelError) as info:
        to_ort_format(tmp_path / "custom.onnx", tmp_path / "out")
    assert "Frobnicate" in info.value.message and "kernel" in info.value.hint


def test_static_shapes_fail_the_check(exported: dict[str, Path], tmp_path: Path) -> None:
    """A graph whose (batch, seq) was fixed to (1, 5) cannot pass the 3 x 11 check shape: a clear error."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(exported["fp32"]))
    make_dim_param_fixed(model.graph, "batch_size", 1)
    make_dim_param_fixed(model.graph, "sequence_length", 5)
    onnx.save(model, tmp_path / "fixed.onnx")
    with pytest.raises(ModelError, match=r"refused inputs of shape \[3, 11\]") as info:
        to_ort_format(tmp_path / "fixed.onnx", tmp_path / "out")
    assert "static" in info.value.hint
    assert list((tmp_path / "out").iterdir()) == []  # nothing written on failure


def test_output_mismatch_fails_closed(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdpipe.profiling.mobile as mobile

    monkeypatch.setattr(mobile, "ORT_ATOL", -1.0)  # no diff can pass: the check must raise, not warn
    with pytest.raises(ExportToleranceError, match="differ from the ONNX model's") as info:
        to_ort_format(exported["fp32"], tmp_path / "out")
    assert info.value.hint
    assert list((tmp_path / "out").iterdir()) == []


def test_levels(exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from kdpipe.profiling.mobile import _LEVEL_ENV

    monkeypatch.setenv(_LEVEL_ENV, "basic")  # the converter's own knob: overridden for the call, then restored
    pkg = to_ort_format(exported["int8"], tmp_path / "all", "all")
    assert os.environ[_LEVEL_ENV] == "basic"
    assert "DynamicQuantizeMatMul" in config_ops(pkg.required_operators)["com.microsoft"]
    assert "com.microsoft" in config_ops(pkg.required_operators)  # 'all' fuses into contrib ops
    assert pkg.max_abs_diff <= 1e-5
    with pytest.raises(ConfigError, match="unknown ORT optimization level") as info:
        to_ort_format(exported["fp32"], tmp_path / "x", "fast")  # type: ignore[arg-type]
    assert isinstance(info.value, KdpipeError) and "basic" in info.value.hint
