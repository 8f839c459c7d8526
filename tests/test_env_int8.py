"""kdpipe.env.int8_saturates: dynamic int8 gets 7-bit weights (reduce_range) exactly on x86 CPUs with AVX2 and no
VNNI, where onnxruntime's u8 x s8 kernels saturate; the causal-LM int8 variant records what it did."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe import env


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n")
    return path


@pytest.mark.parametrize(
    ("flags", "saturates"),
    [
        ("avx2", True),  # AMD EPYC / older Intel: vpmaddubsw pair-sums saturate at int16
        ("avx2 avx512f avx512_vnni", False),
        ("avx2 avx_vnni", False),
        ("avx2 avx512f avx512_vnni amx_int8 amx_bf16", False),
        ("", False),  # not AVX2 x86 (e.g. ARM): onnxruntime's other kernels
    ],
)
def test_int8_saturates_only_on_avx2_without_vnni(tmp_path: Path, flags: str, saturates: bool) -> None:
    path = _cpuinfo(tmp_path, flags)
    assert env.int8_saturates(path) is saturates
    got = env.cpu_model(path)
    assert got["model"] == "Test CPU" and set(got["flags"]) == set(flags.split())


def test_an_unreadable_cpuinfo_is_not_an_error(tmp_path: Path) -> None:
    assert env.int8_saturates(tmp_path / "missing") is False


def test_the_causal_lm_int8_variant_records_reduce_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optimum.exporters.onnx")
    from kdpipe.compress import quantize
    from kdpipe.tasks.causal_lm import export as ex

    seen: list[bool] = []

    def fake_int8(src: Path, dst: Path, reduce_range: bool = False) -> None:
        seen.append(reduce_range)
        dst.write_bytes(src.read_bytes())

    src = tmp_path / "fp32"
    src.mkdir()
    (src / ex.ONNX_FILE).write_bytes(_tiny_onnx())
    monkeypatch.setattr(quantize, "quantize_int8", fake_int8)
    for saturates in (True, False):
        monkeypatch.setattr(ex, "int8_saturates", lambda s=saturates: s)
        done = ex.make_lm_variant(src, tmp_path / f"int8-{saturates}", "int8-dynamic")
        assert done["reduce_range"] is saturates and isinstance(done["cpu_flags"], list)
    assert seen == [True, False]


def _tiny_onnx() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    return bytes(helper.make_model(graph).SerializeToString())
