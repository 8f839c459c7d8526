from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import assert_one_line_error, invoke

from kdpipe.artifacts import list_outputs, write_json_atomic
from kdpipe.export import PARITY_BATCHES


def test_export_has_dynamic_axes_and_parity_on_other_shapes(finished: tuple[Path, Path]) -> None:
    import json

    _, runs = finished
    m = json.loads((runs / "export" / "manifest.json").read_text())
    for name in ("student", "teacher"):
        info = m["record"]["models"][name]
        assert info["spec"]["inputs"]["input_ids"] == ["batch_size", "sequence_length"]
        par = info["parity"]
        assert par["ok"] and par["max_abs_diff"] <= par["atol"] and par["class_agreement"] == 1.0
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
    from kdpipe.export import export_onnx, parity

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, model)
    _poison(model)
    export_onnx(model, tmp_path / "onnx", 18)
    check = parity(model, tmp_path / "onnx" / "model.onnx", ["good day", "bad day"] * 5, 16, 1e-4)
    assert check.ok is False and check.nonfinite_outputs > 0
    assert not check.max_abs_diff <= 1e-4  # NaN or inf: never "within tolerance"
