"""Provenance recorded in every manifest: package versions, device, git sha."""

from __future__ import annotations

import platform
import subprocess
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


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and the SIMD flags that matter for int8 (INT8_FLAGS present in /proc/cpuinfo)."""
    name, flags = platform.processor(), set[str]()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": name, "flags": [f for f in INT8_FLAGS if f in flags]}


def int8_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether onnxruntime's int8 MatMuls here run on AVX2 without VNNI, whose u8 x s8 pair-sums (vpmaddubsw)
    saturate at int16: dynamic int8 then wants 7-bit weights (quantize_dynamic's reduce_range). False off x86 and
    where avx512_vnni / avx_vnni / amx_int8 is present. Measured on an AMD EPYC (avx2 only), a 15-layer SmolLM2
    student's held-out perplexity went from 23,211 (fp32) to 108,120 in int8 and to 27,880 with reduce_range."""
    flags = set(cpu_model(cpuinfo)["flags"])
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


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
    }
