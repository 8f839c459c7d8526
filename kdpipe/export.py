"""The export stage: ONNX through optimum-onnx, then a fail-closed parity check on real inputs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts import Manifest, Metric
from kdpipe.config import ExportConfig
from kdpipe.data import Split, collate, encode, read_split
from kdpipe.errors import ExportToleranceError
from kdpipe.models import load_classifier, load_tokenizer
from kdpipe.records import (
    ExportedModel,
    ExportRecord,
    ModelSource,
    Parity,
    RunContext,
    StageOutput,
    StageSpec,
    TeacherRecord,
    record,
    unseeded,
)

# batch sizes of the parity check: none equals the exporter's dummy batch (2), and real texts give
# sequence lengths other than its dummy length (16), so axes baked in as static cannot pass.
PARITY_BATCHES = (1, 7, 64)


def onnx_inputs(session: Any, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Feed what the graph asks for: ids and mask from the batch, zeros for token_type_ids."""
    ids = batch["input_ids"].numpy()
    feed = {}
    for inp in session.get_inputs():
        if inp.name in batch:
            feed[inp.name] = batch[inp.name].numpy().astype(np.int64)
        else:
            feed[inp.name] = np.zeros_like(ids, dtype=np.int64)
    return feed


def export_onnx(model_dir: Path, out: Path, opset: int) -> dict[str, Any]:
    """optimum-onnx's exporter (TorchScript, dynamic batch and sequence axes); returns the spec."""
    import onnx
    import torch
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        # the TorchScript tracer warns about constants in transformers' mask code; parity below is the real check
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        main_export(
            str(model_dir),
            output=str(out),
            task="text-classification",
            opset=opset,
            do_validation=False,
            no_post_process=True,
            device="cpu",
        )
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph

    def dims(v: Any) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "exporter": "optimum-onnx main_export (TorchScript)",
        "opset": opset,
        "inputs": {i.name: dims(i) for i in graph.input},
        "outputs": {o.name: dims(o) for o in graph.output},
    }


def parity(model_dir: Path, onnx_path: Path, texts: list[str], max_length: int, atol: float) -> Parity:
    """Max abs diff of logits and class agreement between PyTorch and ONNX on real texts."""
    import onnxruntime as ort
    import torch

    model = load_classifier(model_dir).eval()
    tok = load_tokenizer(model_dir)
    enc = encode(tok, Split(texts=texts, labels=[0] * len(texts)), max_length)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, same, n, shapes, nonfinite = 0.0, 0, 0, [], 0
    start = 0
    for size in PARITY_BATCHES:
        ids = enc.ids[start : start + size]
        if not ids:
            break
        start += size
        batch = collate(ids, enc.pad_id)
        with torch.no_grad():
            ref = model(**batch).logits.numpy()
        got = session.run(["logits"], onnx_inputs(session, batch))[0]
        if not (np.isfinite(ref).all() and np.isfinite(got).all()):
            # NaN/inf logits are a broken model, never "equal": max(0.0, nan) is 0.0 in Python
            nonfinite += int((~np.isfinite(ref)).any(-1).sum() + (~np.isfinite(got)).any(-1).sum())
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        worst = max(worst, float(diff.max())) if np.isfinite(diff).all() else float("inf")
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += len(ids)
        shapes.append(list(batch["input_ids"].shape))
    return Parity(
        max_abs_diff=worst,
        atol=atol,
        class_agreement=same / n if n else 0.0,
        examples=n,
        shapes=shapes,
        nonfinite_outputs=nonfinite,
        # written so that NaN fails: `nan <= atol` is False, and non-finite outputs fail outright
        ok=bool(nonfinite == 0 and n > 0 and worst <= atol and same == n),
    )


def run_export(cfg: ExportConfig, upstream: Manifest | None, work: Path, ctx: RunContext) -> StageOutput:
    assert upstream is not None  # STAGE names a distill upstream; the runner reads and verifies it
    t_manifest = upstream.upstream("teacher")
    texts = read_split(t_manifest.path("data/test.jsonl")).texts[: cfg.parity_samples]
    max_length = record(t_manifest, TeacherRecord).max_length
    # where each PyTorch model lives, as a stage of this run's lineage (never an absolute path)
    sources = {"student": (upstream, ModelSource(stage="distill", dir="model"))}
    if cfg.teacher:
        sources["teacher"] = (t_manifest, ModelSource(stage="teacher", dir="model"))
    metrics: dict[str, Metric] = {}
    models: dict[str, ExportedModel] = {}
    failures = []
    for name, (manifest, source) in sources.items():
        src = manifest.path(f"{source.dir}/config.json").parent
        spec = export_onnx(src, work / name, cfg.opset)
        check = parity(src, work / name / "model.onnx", texts, max_length, cfg.atol)
        size = (work / name / "model.onnx").stat().st_size
        ctx.console.print(
            f"{name}: ONNX {size / 2**20:.1f} MiB, parity on {check.examples} real test examples "
            f"at shapes {check.shapes}: max |diff| {check.max_abs_diff:.2e} (atol {cfg.atol:g}), "
            f"class agreement {check.class_agreement:.2%}"
        )
        models[name] = ExportedModel(onnx=f"{name}/model.onnx", spec=spec, parity=check, source=source)
        metrics[f"{name}_max_abs_diff"] = Metric(check.max_abs_diff, "logit units")
        metrics[f"{name}_class_agreement"] = Metric(check.class_agreement, "fraction")
        metrics[f"{name}_onnx_bytes"] = Metric(size, "bytes")
        if not check.ok:
            failures.append(_failure(name, check))
    if failures:
        raise ExportToleranceError(
            "ONNX parity check failed: " + "; ".join(failures),
            "nothing was written; raise export.atol only if the difference is expected "
            "(e.g. a different opset), otherwise report the model",
        )
    return StageOutput(record=ExportRecord(models=models), metrics=metrics)


def _failure(name: str, check: Parity) -> str:
    broken = (
        f", {check.nonfinite_outputs} outputs with NaN/inf logits (a broken model)" if check.nonfinite_outputs else ""
    )
    return (
        f"{name}: max |diff| {check.max_abs_diff:.3e} vs atol {check.atol:g}, "
        f"class agreement {check.class_agreement:.2%} on {check.examples} examples{broken}"
    )


STAGE = StageSpec(
    name="export",
    upstream="distill",
    section=lambda recipe, ctx: recipe.export,
    run=run_export,
    summary="export to ONNX and check parity",
    identity=unseeded,
)
