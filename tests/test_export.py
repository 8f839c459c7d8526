from __future__ import annotations

import shutil
from pathlib import Path

from conftest import assert_one_line_error, invoke

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
