"""Mobile packaging of an exported ONNX classifier: onnxruntime's ORT format plus the operator list of a
reduced-operator onnxruntime build, and onnxruntime's own mobile usability check (NNAPI / CoreML).

DESIGN notes

* Conversion calls onnxruntime's Python entry point
  `onnxruntime.tools.convert_onnx_models_to_ort.convert_onnx_models_to_ort` in this process (Fixed
  optimisation style, `target_platform="arm"`, no type reduction), not a subprocess: a subprocess re-imports
  onnxruntime (and torch, which `onnxruntime.tools` imports when installed) for ~2 s a model, and its errors
  come back as text rather than onnxruntime's exceptions. The entry point takes the optimisation level only
  from the environment variable ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL and prints progress to
  stdout, so the call sets the variable, captures stdout and restores both under a lock. The tool names its
  outputs after the level (`model.basic.ort`, `model.required_operators.basic.config`, ...): they are written
  to a temporary folder inside `out_dir` and moved to the stable names `model.ort` and
  `required_operators.config` only after the check below passed, so a failure leaves nothing behind.
* Dynamic shapes are checked, not assumed: the .ort file is loaded with `onnxruntime.InferenceSession` and
  run at two (batch, seq) shapes (CHECK_SHAPES) against the .onnx model run with every graph optimisation
  disabled (the graph as exported). Measured on the tiny 2-layer BERT (logits ~0.02) and fp32 / int8 /
  fused graphs at every level: max abs diff 0 to 1.4e-9. The bound (ORT_ATOL + ORT_RTOL * |reference|,
  1e-4 each) leaves room for fusions reordering float sums on real models; a larger diff, a shape the .ort
  refuses or non-finite outputs raise ExportToleranceError.
* Optimizer-fused graphs (`kdpipe.compress.quantize.optimize`: com.microsoft Attention, SkipLayerNormalization,
  EmbedLayerNormalization, BiasGelu; and their int8 form with QAttention / QEmbedLayerNormalization) convert at
  every level with onnxruntime 1.32, also for `target_platform="arm"` and 'basic', and match at both shapes:
  the contrib ops have CPU kernels. The cost is elsewhere: the config then lists `com.microsoft;1` ops, so the
  reduced build must keep contrib ops (no `--disable_contrib_ops`), and the usability checker reports them as
  unsupported by NNAPI and CoreML (`OrtPackage.contrib_ops` lists them). 'extended' / 'all' fuse the plain
  graph too (BiasGelu, FusedGemm; int8: DynamicQuantizeMatMul, MatMulIntegerToFloat), so only 'basic' keeps an
  int8 graph's config to standard ONNX ops (DynamicQuantizeLinear, MatMulInteger). A graph onnxruntime cannot
  load or has no kernel for raises ModelError with onnxruntime's message and a hint.
* `onnxruntime.tools` calls `logging.basicConfig` when first imported (its `logger.get_logger` and the
  usability script), which would install a stderr handler on the application's root logger; the imports
  run with a placeholder root handler so that call does nothing. The usability checker logs to a private
  `logging.Logger` (not registered, no propagation), whose records become the findings.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdpipe.errors import ConfigError, ExportToleranceError, ModelError, did_you_mean

Optimization = Literal["basic", "extended", "all"]
LEVELS: tuple[Optimization, ...] = ("basic", "extended", "all")
# (batch, seq) of the dynamic-shape check: neither equals optimum's dummy export shape (2, 16)
CHECK_SHAPES: tuple[tuple[int, int], ...] = ((1, 5), (3, 11))
ORT_ATOL = 1e-4
ORT_RTOL = 1e-4
ORT_NAME = "model.ort"
CONFIG_NAME = "required_operators.config"
_LEVEL_ENV = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
_TOOLS_LOCK = threading.Lock()

# onnxruntime.tools.check_onnx_model_mobile_usability's closing advice, keyed by analyze_model's result
RECOMMENDATION = {
    True: "As NNAPI or CoreML may provide benefits with this model it is recommended to compare the performance "
    "of the model using the NNAPI EP on Android, and the CoreML EP on iOS, against the performance using the CPU EP.",
    False: "For optimal performance the model should be used with the CPU EP.",
}
# the usability checker's log lines, most important first; lines matching none rank last (caveats, sizes)
_RANKS: tuple[tuple[str, int], ...] = (
    (r"^Model should perform well with", 1),
    (r"^Model has dynamic|^Shapes can be altered|^Unsupported nodes due to input having a dynamic shape", 2),
    (r"should work well|may work well|probably not work|can be considered|not recommended|cannot run any", 3),
    (r"^Unsupported ops:|^Ops with unsupported rank", 4),
    (r"partitions with a total of|^Unsupported nodes due to|subgraphs", 5),
)
_NOISE = {
    "",
    "--------",
    "================",
    "Checking if model will perform better if the dynamic shapes are fixed...",
}
_FIXED_MARKER = "Partition information if the model was updated to make the shapes fixed:"


@dataclass(frozen=True)
class OrtPackage:
    """An ORT-format model and the operator config of a reduced-operator onnxruntime build for it."""

    ort: Path
    required_operators: Path
    operators: dict[str, list[str]]  # "domain;opset" -> op types, as in the config file
    bytes: int  # size of the .ort file
    max_abs_diff: float  # worst |ort - onnx| output difference over CHECK_SHAPES

    @property
    def contrib_ops(self) -> list[str]:
        """'domain:op' of every operator outside the standard ONNX domain (needs contrib ops in the build)."""
        found = []
        for key, ops in self.operators.items():
            domain = key.split(";")[0]
            if domain != "ai.onnx":
                found += [f"{domain}:{op}" for op in ops]
        return found


def to_ort_format(onnx_path: Path, out_dir: Path, optimization: Optimization = "basic") -> OrtPackage:
    """Convert `onnx_path` to `out_dir/model.ort` plus `out_dir/required_operators.config` with onnxruntime's
    converter, after checking the .ort model matches the .onnx one at two (batch, seq) shapes."""
    if optimization not in LEVELS:
        raise ConfigError(f"unknown ORT optimization level '{optimization}'", did_you_mean(optimization, list(LEVELS)))
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: no such ONNX model file", "export the model first (kdpipe export)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as tmp:
        ort_tmp, config_tmp = _convert(onnx_path, Path(tmp), optimization)
        worst = _check_outputs(onnx_path, ort_tmp)
        ort_path, config_path = out_dir / ORT_NAME, out_dir / CONFIG_NAME
        # the config's header names the .ort file it came from: name the file's final place
        text = config_tmp.read_text().replace(str(ort_tmp.resolve()), str(ort_path.resolve()))
        config_tmp.write_text(text)
        os.replace(ort_tmp, ort_path)
        os.replace(config_tmp, config_path)
    return OrtPackage(
        ort=ort_path,
        required_operators=config_path,
        operators=parse_operator_config(text),
        bytes=ort_path.stat().st_size,
        max_abs_diff=worst,
    )


def parse_operator_config(text: str) -> dict[str, list[str]]:
    """A required-operators config ("domain;opset;Op1,Op2" lines, '#' comments) as "domain;opset" -> ops."""
    operators: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, ops = line.split(";", 2)
        operators[f"{domain};{opset}"] = [op.split("{")[0] for op in ops.split(",") if op]
    return operators


@contextlib.contextmanager
def _tools(level: str | None = None) -> Iterator[io.StringIO]:
    """Run onnxruntime.tools code: one caller at a time, its prints captured, `logging.basicConfig` a no-op
    (a placeholder root handler), and the converter's optimisation-level variable set then restored."""
    import logging

    out = io.StringIO()
    with _TOOLS_LOCK:
        root, guard, old = logging.getLogger(), logging.NullHandler(), os.environ.get(_LEVEL_ENV)
        root.addHandler(guard)
        if level is not None:
            os.environ[_LEVEL_ENV] = level
        try:
            with contextlib.redirect_stdout(out):
                yield out
        finally:
            root.removeHandler(guard)
            if old is None:
                os.environ.pop(_LEVEL_ENV, None)
            else:
                os.environ[_LEVEL_ENV] = old


def _convert(onnx_path: Path, tmp: Path, optimization: Optimization) -> tuple[Path, Path]:
    """onnxruntime's converter on one model into `tmp`; returns (the .ort file, the operator config)."""
    with _tools(optimization) as printed:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        try:
            convert_onnx_models_to_ort(
                onnx_path,
                output_dir=tmp,
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform="arm",
                enable_type_reduction=False,
            )
        except Exception as e:  # onnxruntime's own error types: an unreadable graph, an op without a kernel
            raise ModelError(
                f"{onnx_path}: onnxruntime cannot convert the model to ORT format ({_first_line(e)})", _hint(e)
            ) from None
    orts, configs = sorted(tmp.rglob("*.ort")), sorted(tmp.rglob("*.config"))
    if len(orts) != 1 or len(configs) != 1:  # the tool's naming changed: say so rather than pick a file
        raise ModelError(
            f"{onnx_path}: onnxruntime's converter wrote {[p.name for p in orts + configs]}, expected one .ort "
            "and one .config",
            f"converter output: {' '.join(printed.getvalue().split())[-300:]}",
        )
    return orts[0], configs[0]


def _hint(e: Exception) -> str:
    """What to do about a conversion failure, from onnxruntime's message."""
    text = str(e)
    if "INVALID_PROTOBUF" in text or "Protobuf parsing failed" in text:
        return "the file is not a valid ONNX model (truncated or corrupt): export it again (kdpipe export)"
    if "NOT_IMPLEMENTED" in text or "not a registered function/op" in text or "implementation" in text:
        return (
            "the graph uses an operator this onnxruntime has no CPU kernel for: convert the plain export "
            "(model.onnx) rather than a graph fused or quantised for another execution provider"
        )
    return "check that onnxruntime can load the model (onnxruntime.InferenceSession) and export it again"


def _check_outputs(onnx_path: Path, ort_path: Path) -> float:
    """Worst |ort - onnx| output difference over CHECK_SHAPES; raises ExportToleranceError past the bound."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as exported
    reference = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    try:
        candidate = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types
        raise ExportToleranceError(
            f"{ort_path.name}: onnxruntime cannot load the ORT model ({_first_line(e)})",
            "nothing was written; try another optimization level and report the model",
        ) from None
    vocab, worst = _vocab_size(onnx_path), 0.0
    for batch, seq in CHECK_SHAPES:
        feed = _feed(reference.get_inputs(), batch, seq, vocab)
        try:
            ref = reference.run(None, feed)
        except Exception as e:  # onnxruntime's own error types: the export itself has static axes
            raise ModelError(
                f"{onnx_path.name}: the ONNX model refused inputs of shape {[batch, seq]} ({_first_line(e)})",
                "its batch / sequence axes are static: export with dynamic axes (kdpipe export) to package it",
            ) from None
        try:
            got = candidate.run(None, {i.name: feed[i.name] for i in candidate.get_inputs()})
        except Exception as e:  # a shape baked in as static by the conversion
            raise ExportToleranceError(
                f"{ort_path.name}: the ORT model refused inputs of shape {[batch, seq]} ({_first_line(e)})",
                "dynamic batch / sequence axes were lost in conversion; try optimization='basic'",
            ) from None
        for r, g in zip(ref, got, strict=True):
            worst = max(worst, _compare(r, g, f"{ort_path.name}: ORT outputs at shape {[batch, seq]}"))
    return worst


def _compare(ref: Any, got: Any, what: str) -> float:
    """Max abs diff of one output pair; raises ExportToleranceError past ORT_ATOL + ORT_RTOL * |ref|, on a
    shape mismatch or on non-finite outputs (NaN never passes: every comparison with it is False)."""
    import numpy as np

    r64, g64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    same_shape = r64.shape == g64.shape
    diff = float(np.abs(r64 - g64).max(initial=0.0)) if same_shape else float("inf")
    if same_shape and bool(np.all(np.abs(r64 - g64) <= ORT_ATOL + ORT_RTOL * np.abs(r64))):
        return diff
    raise ExportToleranceError(
        f"{what} differ from the ONNX model's (max abs diff {diff:.3g}, shapes {list(r64.shape)} / "
        f"{list(g64.shape)}, bound {ORT_ATOL:g} + {ORT_RTOL:g} * |onnx|)",
        "nothing was written; try optimization='basic' and report the model",
    )


def _feed(inputs: Sequence[Any], batch: int, seq: int, vocab: int) -> dict[str, Any]:
    """Token ids in [0, vocab), an attention mask with padding in the last row, zeros for other inputs."""
    import numpy as np

    rng = np.random.default_rng(0)
    feed: dict[str, Any] = {}
    for inp in inputs:
        if len(inp.shape) != 2 or "int" not in inp.type:
            raise ModelError(
                f"graph input '{inp.name}' is {inp.type} of rank {len(inp.shape)}, not (batch, seq) token ids",
                "to_ort_format checks BERT-style classifiers (input_ids, attention_mask, token_type_ids)",
            )
        dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
        if "mask" in inp.name:
            value = np.ones((batch, seq), dtype)
            value[-1, seq - seq // 3 :] = 0
        elif inp.name == "input_ids":
            value = rng.integers(0, vocab, (batch, seq)).astype(dtype)
        else:
            value = np.zeros((batch, seq), dtype)
        feed[inp.name] = value
    return feed


def _vocab_size(onnx_path: Path) -> int:
    """Rows of the word-embedding table (HF names it `*word_embeddings*`; the quantiser and the fusions keep
    the name), so the check feeds ids of every range; 2 when there is none (ids 0 and 1 exist in any vocab)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    rows = [int(t.dims[0]) for t in graph.initializer if "word_embeddings" in t.name and len(t.dims) == 2]
    return min(rows) if rows else 2


def usability(onnx_path: Path) -> list[str]:
    """onnxruntime's mobile usability findings for `onnx_path` (NNAPI / CoreML partitioning, unsupported ops,
    dynamic shapes), one line each, the recommendation first; never raises (a failed check is one finding)."""
    onnx_path = Path(onnx_path)
    checked, shapes = _Collector(), _Collector()
    try:
        with _tools():
            from onnxruntime.tools.mobile_helpers import usability_checker
            from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

            try_eps = usability_checker.analyze_model(onnx_path, skip_optimize=False, logger=checked.logger)
            # analyze_model checks the inputs' shapes without a logger: log that advice too
            inferred = ModelProtoWithShapeInfo(onnx_path.resolve(strict=True)).model_with_shape_info
            usability_checker.check_shapes(inferred.graph, logger=shapes.logger)
    except Exception as e:  # the checker's own failures: an unreadable model, an op shape inference rejects
        return [f"usability check failed for {onnx_path.name} ({type(e).__name__}: {_first_line(e)})"]
    ranked = _ranked(shapes.messages) + _ranked(checked.messages)
    ranked.sort(key=lambda item: item[0])
    return [f"Recommendation: {RECOMMENDATION[bool(try_eps)]}"] + [text for _, text in ranked]


class _Collector:
    """A private `logging.Logger` (not registered, not propagating) that keeps its messages."""

    def __init__(self) -> None:
        import logging

        self.messages: list[str] = []
        self.logger = logging.Logger("kdpipe.profiling.mobile.usability", logging.INFO)
        collector = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                collector.messages.append(record.getMessage())

        self.logger.addHandler(_Handler())


def _ranked(messages: list[str]) -> list[tuple[int, str]]:
    """The checker's log lines as (rank, one-line finding) with the EP they belong to, minus separators,
    progress lines and lines the fixed-shape pass repeats unchanged."""
    ep, fixed = "", False
    seen: set[tuple[str, str]] = set()
    out: list[tuple[int, str]] = []
    for raw in messages:
        msg = " ".join(raw.split())
        if msg in _NOISE or msg.endswith("for usability with ORT Mobile."):
            continue
        if msg.startswith("Checking "):
            ep, fixed = msg.removeprefix("Checking "), False
            continue
        if msg == _FIXED_MARKER:
            fixed = True
            continue
        if (ep, msg) in seen:
            continue
        seen.add((ep, msg))
        rank = next((r for pattern, r in _RANKS if re.search(pattern, msg)), len(_RANKS) + 1)
        context = f"[{ep}, fixed shapes] " if fixed else f"[{ep}] "
        out.append((rank, context + msg if ep else msg))
    return out


def _first_line(e: Exception) -> str:
    """onnxruntime's message on one line, without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" prefix."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(" : ")[-1][:240]
