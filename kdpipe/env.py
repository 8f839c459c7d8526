"""Provenance recorded in every manifest: package versions, device, git sha, the CPU (model, int8 instruction
sets, the integer GEMM path onnxruntime takes on them) and onnxruntime (version, providers)."""

from __future__ import annotations

import platform
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("kdpipe", "torch", "transformers", "tokenizers", "optimum-onnx", "onnx", "onnxruntime")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """The commit of the kdpipe checkout, when kdpipe runs from one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
# arm64's /proc/cpuinfo `Features` that decide onnxruntime's integer GEMM: sdot/udot, smmla/ummla, SVE
ARM_INT8_FEATURES = ("asimddp", "i8mm", "sve")
# (CPU implementer, CPU part) of arm64 cores whose /proc/cpuinfo has no "model name"
_ARM_CORES = {
    ("0x41", "0xd08"): "Arm Cortex-A72",
    ("0x41", "0xd0b"): "Arm Cortex-A76",
    ("0x41", "0xd0c"): "Arm Neoverse-N1",
    ("0x41", "0xd40"): "Arm Neoverse-V1",
    ("0x41", "0xd49"): "Arm Neoverse-N2",
    ("0x41", "0xd4f"): "Arm Neoverse-V2",
}
SATURATES = "(u8s8 pair sums saturate at int16)"


def _cpuinfo_fields(cpuinfo: Path) -> dict[str, str]:
    """The first value of every `key : value` field of /proc/cpuinfo ({} when it cannot be read)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu(cpuinfo: Path) -> tuple[str, list[str] | None]:
    """(model name, the int8 flags present; None when /proc/cpuinfo names no flags at all: not known)."""
    fields = _cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or _ARM_CORES.get((fields.get("CPU implementer", ""), fields.get("CPU part", "")))
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    flags = [f for f in (*INT8_FLAGS, *ARM_INT8_FEATURES) if f in present] if present else None
    return name or platform.processor() or "unknown", flags


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and the SIMD flags that matter for int8 (INT8_FLAGS on x86, ARM_INT8_FEATURES on
    arm64, those present in /proc/cpuinfo; [] when it cannot be read)."""
    name, flags = _cpu(cpuinfo)
    return {"model": name, "flags": flags or []}


def int8_path(flags: Iterable[str] | None) -> str:
    """The integer GEMM path onnxruntime's MLAS takes on a CPU with these flags (kdpipe's INT8_FLAGS /
    ARM_INT8_FEATURES names; None: not known). It follows MLAS's dispatch (onnxruntime/core/mlas/lib/platform.cpp),
    where a later check overrides an earlier one: x86 AVX2 (u8 x s8 by vpmaddubsw, whose pair sums saturate at
    int16), then AVX-VNNI (vpdpbusd, 256-bit), then AVX-512 core (vpmaddubsw again: saturates), then AVX-512 VNNI,
    then AMX tiles (u8s8 only, falling back to AVX-512 VNNI for small GEMMs); arm64 dot product (udot/sdot), then
    i8mm (ummla/smmla, Linux). Anything else runs MLAS's baseline SSE / NEON kernels: "generic". Returns "unknown"
    for None, never a guess."""
    if flags is None:
        return "unknown"
    f = set(flags)
    if "amx_int8" in f:
        return "AMX"
    if "avx512f" in f:
        return "AVX-512 VNNI" if "avx512_vnni" in f else f"AVX-512 {SATURATES}"
    if "avx_vnni" in f:
        return "AVX-VNNI"
    if "avx2" in f:
        return f"AVX2 {SATURATES}"
    if "i8mm" in f:
        return "ARM64 i8mm"
    if "asimddp" in f:
        return "ARM64 dot product"
    return "generic"


def cpu_record(cpuinfo: Path = Path("/proc/cpuinfo"), arch: str | None = None) -> dict[str, Any]:
    """environment()["cpu"]: model, the int8 flags, arch (platform.machine()) and int8_path."""
    name, flags = _cpu(cpuinfo)
    return {"model": name, "flags": flags or [], "arch": arch or platform.machine(), "int8_path": int8_path(flags)}


def int8_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether onnxruntime's int8 MatMuls here run on AVX2 / AVX-512 without VNNI (int8_path), whose u8 x s8
    pair-sums (vpmaddubsw) saturate at int16: dynamic int8 then wants 7-bit weights (quantize_dynamic's
    reduce_range). False off x86, where avx512_vnni / avx_vnni / amx_int8 is present, and where the flags are not
    known. Measured on an AMD EPYC (avx2 only), a 15-layer SmolLM2 student's held-out perplexity went from 23,211
    (fp32) to 108,120 in int8 and to 27,880 with reduce_range."""
    return SATURATES in int8_path(_cpu(cpuinfo)[1])


def onnxruntime_info() -> dict[str, Any]:
    """environment()["onnxruntime"]: version and available execution providers (no session is created)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"version": None, "providers": []}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def machine() -> dict[str, Any]:
    """This host as environment() records it: {"cpu": cpu_record(), "onnxruntime": onnxruntime_info()}."""
    return {"cpu": cpu_record(), "onnxruntime": onnxruntime_info()}


# the ONNX op types that carry integer math: dynamic / static quantisation, QDQ, int4 weights, contrib kernels
INT8_OPS = frozenset(
    {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
     "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QAttention", "QEmbedLayerNormalization",
     "QGemm", "QOrderedMatMul", "DynamicQuantizeLSTM", "GatherBlockQuantized"}
)  # fmt: skip


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of an ONNX graph, those of its subgraphs (If / Loop / Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                yield from _nodes(sub)


def int8_kernels(onnx_path: Path) -> dict[str, int]:
    """{op type: count} of the graph's operators that carry the integer math (INT8_OPS and QLinear*), read from
    the ONNX file (external weights not loaded; a directory: all its *.onnx). {} for a float graph. These are the
    graph's operators: onnxruntime may still fuse a QDQ pair into QLinearMatMul / MatMulIntegerToFloat when it
    builds its session, and which CPU kernel runs them is int8_path's answer."""
    import onnx

    files = sorted(Path(onnx_path).glob("*.onnx")) if Path(onnx_path).is_dir() else [Path(onnx_path)]
    counts: Counter[str] = Counter()
    for file in files:
        graph = onnx.load(str(file), load_external_data=False).graph
        counts.update(n.op_type for n in _nodes(graph) if n.op_type in INT8_OPS or n.op_type.startswith("QLinear"))
    return dict(sorted(counts.items()))


def machine_line(env: Mapping[str, Any], kernels: Mapping[str, int] | None = None, model: str | None = None) -> str:
    """The reports' one-line "Machine:": CPU model and arch, int8 instruction sets, int8 path, onnxruntime version
    and providers, from an environment record (environment() or machine(); a missing key reads "unknown"); with
    `model`, the integer kernels of its graph (int8_kernels)."""
    cpu, ort = env.get("cpu") or {}, env.get("onnxruntime") or {}
    path = cpu.get("int8_path", "unknown")
    flags = ", ".join(cpu.get("flags") or []) or (
        "unknown" if path == "unknown" else "none of " + "/".join(INT8_FLAGS + ARM_INT8_FEATURES)
    )
    providers = ", ".join(ort.get("providers") or []) or "none"
    line = (
        f"Machine: {cpu.get('model', 'unknown')} ({cpu.get('arch', 'unknown')}); int8 instruction sets: {flags}; "
        f"int8 path: {path}; onnxruntime {ort.get('version') or 'unknown'} "
        f"(providers {providers})."
    )
    if model is not None:
        ops = ", ".join(f"{op} x{n}" for op, n in (kernels or {}).items()) or "none (a float graph)"
        line += f" Integer operators of `{model}`: {ops}."
    return line


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def environment() -> dict[str, object]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
        **machine(),
    }
