from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import assert_one_line_error, invoke

from kdpipe.artifacts.manifest import list_outputs, write_json_atomic
from kdpipe.tasks.classification.export import PARITY_BATCHES


def test_export_has_dynamic_axes_and_parity_on_other_shapes(finished: tuple[Path, Path]) -> None:
    import json

    _, runs = finished
    m = json.loads((runs / "export" / "manifest.json").read_text())
    for name in ("student", "teacher"):
        info = m["record"]["models"][name]
        assert info["spec"]["inputs"]["input_ids"] == ["batch_size", "sequence_length"]
        par = info["parity"]
        assert par["ok"] and par["max_abs_diff"] <= par["atol"] and par["agreement"] == 1.0
        batches = [b for b, _ in par["shapes"]]
        assert batches[:2] == list(PARITY_BATCHES[:2]) and sum(batches) == par["examples"] == 20
        assert all(b != 2 for b, _ in par["shapes"])  # none at the exporter's dummy batch size


def test_parity_miss_fails_closed_with_figures(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    shutil.rmtree(copy / "export")
    code, out = invoke("export", "-r", recipe, "-o", copy, "--atol", "1e-30")
    assert_one_line_error(code, out, "ONNX parity check failed", "max |diff|", "vs atol 1e-30")
    assert not (copy / "export").exists()


def _poison(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    for k in state:
        if k.endswith("classifier.weight"):
            state[k] = state[k] * float("nan")
    save_file(state, str(path), metadata={"format": "pt"})


def test_nan_student_fails_the_parity_gate(finished: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    shutil.rmtree(copy / "export")
    shutil.rmtree(copy / "profile")
    _poison(copy / "distill" / "model")
    # re-record the distill outputs, as a stage that wrote NaN weights itself would have
    m = json.loads((copy / "distill" / "manifest.json").read_text())
    m["outputs"] = [r.__dict__ for r in list_outputs(copy / "distill")]
    write_json_atomic(copy / "distill" / "manifest.json", json.dumps(m))
    code, out = invoke("export", "-r", recipe, "-o", copy)
    assert_one_line_error(code, out, "ONNX parity check failed", "student", "NaN/inf")
    assert not (copy / "export").exists()


def test_parity_treats_nan_as_failure(tiny_dir: Path, tmp_path: Path) -> None:
    from kdpipe.tasks.classification.export import export_onnx, parity

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, model)
    _poison(model)
    export_onnx(model, tmp_path / "onnx", 18)
    check = parity(model, tmp_path / "onnx" / "model.onnx", ["good day", "bad day"] * 5, 16, 1e-4)
    assert check.ok is False and check.nonfinite_outputs > 0
    assert not check.max_abs_diff <= 1e-4  # NaN or inf: never "within tolerance"


# ----------------------------------------------------------------------------- variants and their gates
def _export_again(finished: tuple[Path, Path], tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    recipe, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    shutil.rmtree(copy / "export")
    code, out = invoke("export", "-r", recipe, "-o", copy, *args)
    return code, out, copy


def test_every_variant_is_written_and_gated_on_the_whole_test_split(finished: tuple[Path, Path]) -> None:
    _, runs = finished
    m = json.loads((runs / "export" / "manifest.json").read_text())
    models = m["record"]["models"]
    assert {"student", "student-optimized", "student-int8-dynamic", "teacher"} == set(models)
    for name in ("student", "student-optimized", "student-int8-dynamic"):
        gate = models[name]["gate"]
        assert gate["ok"] and gate["examples"] == 60 and gate["value"] >= gate["budget"] > 0
        assert (runs / "export" / models[name]["onnx"]).is_file()
    assert models["student-optimized"]["transforms"]["fusions"]["Attention"] == 1  # the 1-layer student
    assert models["student-int8-dynamic"]["transforms"]["quantized_ops"].get("MatMulInteger", 0) > 0
    assert models["student-int8-dynamic"]["gate"]["atol"] is None
    sizes = {n: m["metrics"][f"{n}_onnx_bytes"]["value"] for n in ("student", "student-int8-dynamic")}
    assert sizes["student-int8-dynamic"] < sizes["student"] / 2
    report = (runs / "profile" / "report.md").read_text()
    assert "## Student variants (gated on the whole test split)" in report and "| student-int8-dynamic |" in report


def _perturbed(real, variant: str, scale: float):  # type: ignore[no-untyped-def]
    """make_variant, then the given variant's classifier weights multiplied by `scale` (an export bug)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def fake(v, fp32, heads, hidden, **kw):  # type: ignore[no-untyped-def]
        made = real(v, fp32, heads, hidden, **kw)
        if v == variant:
            path = fp32.with_name(made["file"])
            model = onnx.load(str(path))
            for init in model.graph.initializer:
                # the classifier's weight: fp32 `classifier.weight`, or int8 `..._quantized` (not its scale)
                if init.name in ("classifier.weight", "classifier.weight_Transposed_quantized"):
                    arr = numpy_helper.to_array(init)
                    new = arr.astype("float64") * scale
                    if arr.dtype.kind in "iu":  # a quantised weight stays of its integer type
                        info = np.iinfo(arr.dtype)
                        new = new.round().clip(info.min, info.max)
                    init.CopyFrom(numpy_helper.from_array(new.astype(arr.dtype), init.name))
            onnx.save(model, str(path))
        return made

    return fake


def test_weights_perturbed_after_optimisation_fail_the_gate(finished, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import kdpipe.tasks.classification.export

    monkeypatch.setattr(
        kdpipe.tasks.classification.export,
        "make_variant",
        _perturbed(kdpipe.tasks.classification.export.make_variant, "optimized", 1.01),
    )
    code, out, copy = _export_again(finished, tmp_path, "--set", "export.teacher=false")
    assert_one_line_error(code, out, "variant gate failed on the test split", "student-optimized", "max |diff|")
    assert "student-int8" not in " ".join(out.split()).split("variant gate failed")[1]  # only the broken one
    assert not (copy / "export").exists() and not list(copy.glob(".export*"))


def test_a_quantised_variant_below_the_accuracy_budget_fails(finished, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import kdpipe.tasks.classification.export

    # negated classifier weights: finite logits, no tolerance for int8, but the accuracy collapses
    monkeypatch.setattr(
        kdpipe.tasks.classification.export,
        "make_variant",
        _perturbed(kdpipe.tasks.classification.export.make_variant, "int8-dynamic", -1.0),
    )
    code, out, _ = _export_again(finished, tmp_path, "--set", "export.teacher=false")
    assert_one_line_error(code, out, "student-int8-dynamic: test accuracy", "points short of the budget", "99%")


def test_a_static_axis_fails_the_parity_gate(finished, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import onnx

    import kdpipe.tasks.classification.export

    real = kdpipe.tasks.classification.export.export_onnx

    def static(model_dir, out, opset):  # type: ignore[no-untyped-def]
        spec = real(model_dir, out, opset)
        model = onnx.load(str(out / "model.onnx"))
        for inp in model.graph.input:
            inp.type.tensor_type.shape.dim[0].dim_value = 2  # the exporter's dummy batch, baked in
        onnx.save(model, str(out / "model.onnx"))
        return spec

    monkeypatch.setattr(kdpipe.tasks.classification.export, "export_onnx", static)
    code, out, _ = _export_again(finished, tmp_path)
    assert_one_line_error(code, out, "ONNX parity check failed", "onnxruntime refused", "invalid dimensions")
    assert "unexpected" not in out


def test_gate_treats_nan_outputs_as_failure(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from kdpipe.data.tables import Split, encode
    from kdpipe.models.loading import load_tokenizer
    from kdpipe.tasks.classification.export import gate

    _, runs = finished
    enc = encode(load_tokenizer(runs / "distill" / "model"), Split(texts=["good day"] * 4, labels=[0] * 4), 16)
    ref = np.full((4, 3), np.nan, dtype=np.float32)  # a broken reference never compares equal
    g = gate(runs / "export" / "student" / "model.onnx", enc, ref, 1.0, 1e-4, 0.99)
    assert not g.ok and not g.max_abs_diff <= 1e-4


def test_every_precision_variant_is_written_and_gated(finished, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """int8-static (calibrated on train samples), int4 (MatMulNBits) and fp16 beside the default variants: each
    file is written, recorded with what was done, and passes its gate on the whole test split."""
    every = "export.variants=[optimized,int8-dynamic,int8-static,int4,fp16]"
    code, out, copy = _export_again(finished, tmp_path, "--set", every, "--set", "export.teacher=false")
    assert code == 0, out
    models = json.loads((copy / "export" / "manifest.json").read_text())["record"]["models"]
    assert {f"student-{v}" for v in ("int8-static", "int4", "fp16")} <= set(models)
    static = models["student-int8-static"]
    assert static["transforms"]["calibration"]["method"] == "minmax" and static["gate"]["atol"] is None
    assert models["student-fp16"]["gate"]["atol"] == 1e-2 and models["student-fp16"]["gate"]["max_abs_diff"] < 1e-2
    assert all(m["gate"]["ok"] for m in models.values() if m["gate"] is not None)
