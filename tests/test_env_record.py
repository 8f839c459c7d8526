"""The environment record names the CPU's int8 instruction sets, the integer GEMM path onnxruntime's MLAS takes on
them and onnxruntime's version and providers; int8_kernels counts a graph's integer operators; every manifest
carries environment.cpu and report.md a "Machine:" line (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe import env

X86_BASE = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat clflush mmx fxsr sse sse2 ht syscall nx"
CPUS = {
    "epyc": (  # AMD EPYC 7763 (Milan): AVX2 only
        "AMD EPYC 7763 64-Core Processor",
        f"flags\t\t: {X86_BASE} pni ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 sha_ni vaes vpclmulqdq",
        ["avx2"],
        "AVX2 (u8s8 pair sums saturate at int16)",
    ),
    "skylake": (  # Xeon Skylake-SP: AVX-512 core without VNNI, still vpmaddubsw
        "Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz",
        f"flags\t\t: {X86_BASE} avx2 avx512f avx512dq avx512cd avx512bw avx512vl",
        ["avx2", "avx512f"],
        "AVX-512 (u8s8 pair sums saturate at int16)",
    ),
    "cascade": (  # Xeon Cascade Lake: AVX-512 VNNI
        "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz",
        f"flags\t\t: {X86_BASE} avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni",
        ["avx2", "avx512f", "avx512_vnni"],
        "AVX-512 VNNI",
    ),
    "alder": (  # a client core with AVX-VNNI and no AVX-512
        "12th Gen Intel(R) Core(TM) i7-12700",
        f"flags\t\t: {X86_BASE} avx2 avx_vnni",
        ["avx2", "avx_vnni"],
        "AVX-VNNI",
    ),
    "sapphire": (  # Xeon Sapphire Rapids: AMX tiles
        "Intel(R) Xeon(R) Platinum 8488C",
        f"flags\t\t: {X86_BASE} avx2 avx512f avx512bw avx512vl avx512_vnni avx_vnni amx_bf16 avx512_fp16 amx_tile "
        "amx_int8",
        ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"],
        "AMX",
    ),
    "graviton3": (  # arm64 Neoverse-V1: no "model name"; svei8mm is not i8mm, i8mm is
        "Arm Neoverse-V1",
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdrdm lrcpc dcpop asimddp sve svei8mm "
        "i8mm bf16\nCPU implementer\t: 0x41\nCPU part\t: 0xd40",
        ["asimddp", "i8mm", "sve"],
        "ARM64 i8mm",
    ),
    "graviton2": (  # arm64 Neoverse-N1: dot product only
        "Arm Neoverse-N1",
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdrdm lrcpc dcpop asimddp ssbs\n"
        "CPU implementer\t: 0x41\nCPU part\t: 0xd0c",
        ["asimddp"],
        "ARM64 dot product",
    ),
    "old-x86": ("Intel(R) Core(TM)2 Duo CPU", f"flags\t\t: {X86_BASE} ssse3 sse4_1", [], "generic"),
}


def _cpuinfo(tmp_path: Path, name: str, flags_line: str) -> Path:
    """Two processors, as /proc/cpuinfo lists them (the model name line only where x86 has one)."""
    head = f"model name\t: {name}\n" if flags_line.startswith("flags") else "BogoMIPS\t: 243.75\n"
    block = f"processor\t: {{}}\n{head}{flags_line}\n\n"
    path = tmp_path / "cpuinfo"
    path.write_text(block.format(0) + block.format(1))
    return path


@pytest.mark.parametrize("cpu", list(CPUS))
def test_flags_and_int8_path_of_each_cpu(tmp_path: Path, cpu: str) -> None:
    model, line, flags, path = CPUS[cpu]
    got = env.cpu_record(_cpuinfo(tmp_path, model, line), arch="test-arch")
    assert got == {"model": model, "flags": flags, "arch": "test-arch", "int8_path": path}
    assert env.int8_path(flags) == path  # the one function, from the flags alone
    assert env.int8_saturates(tmp_path / "cpuinfo") is ("saturate" in path)
    assert env.cpu_model(tmp_path / "cpuinfo") == {"model": model, "flags": flags}  # the search cost cache's key


@pytest.mark.parametrize("content", ["", "\x00\xff garbage \n:::\n", "processor\t: 0\nflags\t\t:\n", None, "dir"])
def test_an_unreadable_cpuinfo_gives_unknown(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "cpuinfo"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content.encode("latin-1"))
    got = env.cpu_record(path)
    assert got["flags"] == [] and got["int8_path"] == "unknown" and got["model"]
    assert env.int8_saturates(path) is False  # never 7-bit weights on a guess
    line = env.machine_line({"cpu": got, "onnxruntime": env.onnxruntime_info()})
    assert "int8 instruction sets: unknown; int8 path: unknown;" in line


def test_machine_line_of_a_record_without_cpu_reads_unknown() -> None:
    line = env.machine_line({"python": "3.11"})  # a manifest written before issue 20
    assert line.startswith("Machine: unknown") and "int8 path: unknown" in line and "\n" not in line


def _tiny_onnx(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Relu", ["Y"], ["Z"])],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 8])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_int8_kernels_counts_the_integer_operators(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _tiny_onnx(tmp_path / "model.onnx")
    assert env.int8_kernels(fp32) == {}
    int8 = tmp_path / "model.int8.onnx"
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    kernels = env.int8_kernels(int8)
    assert kernels["MatMulInteger"] == 1 and kernels["DynamicQuantizeLinear"] == 1
    assert set(kernels) <= env.INT8_OPS and "Relu" not in kernels
    assert env.int8_kernels(tmp_path) == kernels  # a folder: all its graphs
    line = env.machine_line(env.machine(), kernels, "student-int8-dynamic")
    assert "Integer operators of `student-int8-dynamic`: DynamicQuantizeLinear x1, MatMulInteger x1" in line


def test_int8_kernels_never_loads_external_weights(tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(_tiny_onnx(tmp_path / "a.onnx")))
    onnx.save(model, tmp_path / "b.onnx", save_as_external_data=True, location="b.data", size_threshold=0)
    (tmp_path / "b.data").unlink()  # the weights are gone; the graph is still read
    assert env.int8_kernels(tmp_path / "b.onnx") == {}


def test_every_manifest_and_the_report_name_the_machine(finished: tuple[Path, Path]) -> None:
    _, runs = finished
    here = env.cpu_record()
    for stage in ("teacher", "profile"):
        recorded = json.loads((runs / stage / "manifest.json").read_text())["environment"]
        assert recorded["cpu"]["flags"] == here["flags"] and recorded["cpu"]["int8_path"] == here["int8_path"]
        assert recorded["onnxruntime"] == env.onnxruntime_info()
    deploy = json.loads((runs / "profile" / "manifest.json").read_text())["record"]["deploy"]
    onnx = json.loads((runs / "export" / "manifest.json").read_text())["record"]["models"][deploy]["onnx"]
    kernels = env.int8_kernels(runs / "export" / onnx)
    report = (runs / "profile" / "report.md").read_text()
    machine = [line for line in report.splitlines() if line.startswith("Machine: ")]
    assert machine == [env.machine_line(env.machine(), kernels, deploy)]
    assert f"int8 path: {here['int8_path']}" in machine[0] and f"Integer operators of `{deploy}`: " in machine[0]
    if deploy.endswith("int8-dynamic"):  # the tiny profile's default: the int8 student, its MatMuls integer
        assert kernels["MatMulInteger"] > 0 and "MatMulInteger x" in machine[0]
