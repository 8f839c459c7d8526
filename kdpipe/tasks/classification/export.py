"""The classification export: ONNX through optimum-onnx, a fail-closed parity check on real inputs, then the student's
optimised and quantised variants (kdpipe.compress.quantize), each gated on the whole test split."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    ExportedModel,
    ExportRecord,
    Gate,
    ModelSource,
    Parity,
    RunContext,
    StageOutput,
    TeacherRecord,
    record,
)
from kdpipe.compress.quantize import Variant, make_variant
from kdpipe.config import ExportConfig
from kdpipe.data.tables import Encoded, Split, batches, collate, encode, read_split
from kdpipe.errors import ExportToleranceError
from kdpipe.models.loading import load_classifier, load_tokenizer

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

    from kdpipe.models.bilstm import export_bilstm_onnx, is_bilstm

    if is_bilstm(model_dir):  # kdpipe's own BiLSTM student: optimum does not know it; torch.onnx does
        out.mkdir(parents=True, exist_ok=True)
        return export_bilstm_onnx(model_dir, out / "model.onnx", opset)
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
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types: an invalid graph
        raise ExportToleranceError(
            f"{onnx_path}: onnxruntime cannot load the exported graph ({_first_line(e)})",
            "nothing was written; report the model (and try another export.opset)",
        ) from None
    worst, same, n, shapes, nonfinite, refused = 0.0, 0, 0, [], 0, None
    start = 0
    for size in PARITY_BATCHES:
        ids = enc.ids[start : start + size]
        if not ids:
            break
        start += size
        batch = collate(ids, enc.pad_id)
        with torch.no_grad():
            ref = model(**batch).logits.numpy()
        try:
            got = session.run(["logits"], onnx_inputs(session, batch))[0]
        except Exception as e:  # onnxruntime's own error types: a shape baked in as static, a bad graph
            refused = f"onnxruntime refused a batch of shape {list(batch['input_ids'].shape)} ({_first_line(e)})"
            break
        if not (np.isfinite(ref).all() and np.isfinite(got).all()):
            # NaN/inf logits are a broken model, never "equal": max(0.0, nan) is 0.0 in Python
            nonfinite += int((~np.isfinite(ref)).any(-1).sum() + (~np.isfinite(got)).any(-1).sum())
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        worst = max(worst, float(diff.max())) if np.isfinite(diff).all() else float("inf")
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += len(ids)
        shapes.append(list(batch["input_ids"].shape))
    return Parity(
        kind="logits",
        max_abs_diff=worst,
        atol=atol,
        agreement=same / n if n else 0.0,
        examples=n,
        shapes=shapes,
        nonfinite_outputs=nonfinite,
        refused=refused,
        # written so that NaN fails: `nan <= atol` is False, and non-finite outputs fail outright
        ok=bool(refused is None and nonfinite == 0 and n > 0 and worst <= atol and same == n),
    )


def _first_line(e: Exception) -> str:
    """onnxruntime's message on one line, without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" prefix."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(" : ")[-1][:240]


def run_export(cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """ONNX of the student (and teacher), parity-checked, then the student's variants, each gated."""
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
        src = _model_dir(manifest, source)
        spec = export_onnx(src, work / name, cfg.opset)
        check = parity(src, work / name / "model.onnx", texts, max_length, cfg.atol)
        size = (work / name / "model.onnx").stat().st_size
        ctx.console.print(
            f"{name}: ONNX {size / 2**20:.1f} MiB, parity on {check.examples} real test examples "
            f"at shapes {check.shapes}: max |diff| {check.max_abs_diff:.2e} (atol {cfg.atol:g}), "
            f"class agreement {check.agreement:.2%}"
        )
        models[name] = ExportedModel(onnx=f"{name}/model.onnx", spec=spec, parity=check, source=source)
        metrics[f"{name}_max_abs_diff"] = Metric(check.max_abs_diff, "logit units")
        metrics[f"{name}_class_agreement"] = Metric(check.agreement, "fraction")
        metrics[f"{name}_onnx_bytes"] = Metric(size, "bytes")
        if not check.ok:
            failures.append(_failure(name, check))
    if failures:
        raise ExportToleranceError(
            "ONNX parity check failed: " + "; ".join(failures),
            "nothing was written; raise export.atol only if the difference is expected "
            "(e.g. a different opset), otherwise report the model",
        )
    test = read_split(t_manifest.path("data/test.jsonl"))
    models.update(_student_variants(cfg, models["student"], upstream, test, max_length, work, ctx, metrics))
    return StageOutput(record=ExportRecord(models=models), metrics=metrics)


def _model_dir(manifest: Manifest, source: ModelSource) -> Path:
    return manifest.directory(source.dir)


def _student_variants(
    cfg: ExportConfig,
    base: ExportedModel,
    distill: Manifest,
    test: Split,
    max_length: int,
    work: Path,
    ctx: RunContext,
    metrics: dict[str, Metric],
) -> dict[str, ExportedModel]:
    """fp32 and every configured variant of the student, each gated against the fp32 PyTorch student on the
    whole test split; a variant outside the budget fails the stage, naming it and the shortfall."""
    from kdpipe.train.loop import evaluate, pick_device

    model_dir = _model_dir(distill, base.source)
    conf = json.loads((model_dir / "config.json").read_text())
    enc = encode(load_tokenizer(model_dir), test, max_length)
    reference = evaluate(load_classifier(model_dir), enc, pick_device("cpu"))  # fp32 on the CPU, any device
    calibration = _calibration(distill, base.source, max_length, cfg.calibration_samples)
    out: dict[str, ExportedModel] = {}
    failures = []
    variants: list[Variant] = ["fp32", *cfg.variants]
    for variant in variants:
        fp32 = work / "student" / "model.onnx"
        feeds = calibration if variant == "int8-static" else None
        # a BiLSTM has no heads: 0 and 0 let onnxruntime's optimizer skip attention fusion
        heads = conf.get("num_attention_heads", 0)
        hidden = conf["hidden_size"] if heads else 0
        made = make_variant(variant, fp32, heads, hidden, calibration=feeds, calibrate=cfg.calibrate)
        path = work / "student" / made.pop("file")
        atol = {"fp16": cfg.fp16_atol, **dict.fromkeys(QUANTIZED)}.get(variant, cfg.atol)
        check = gate(path, enc, reference.logits, reference.accuracy, atol, cfg.accuracy_budget)
        name = "student" if variant == "fp32" else f"student-{variant}"
        out[name] = _variant_record(base, variant, path, check, made)
        metrics[f"{name}_test_accuracy"] = Metric(round(check.value, 5), "fraction")
        metrics[f"{name}_agreement"] = Metric(round(check.agreement, 5), "fraction")
        metrics[f"{name}_onnx_bytes"] = Metric(path.stat().st_size, "bytes")
        ctx.console.print(_gate_line(name, check, path.stat().st_size))
        if not check.ok:
            failures.append(_gate_failure(name, check))
    if failures:
        raise ExportToleranceError(
            "variant gate failed on the test split: " + "; ".join(failures),
            "nothing was written; drop the variant (export.variants) or lower export.accuracy_budget if the loss "
            "is acceptable",
        )
    return out


QUANTIZED = ("int8-dynamic", "int8-static", "int4")  # no logit tolerance: judged by the accuracy budget


def _calibration(distill: Manifest, source: ModelSource, max_length: int, samples: int) -> list[dict[str, np.ndarray]]:
    """Feeds of real train-split examples (the student's tokenizer), batches of 8, for static quantisation."""
    teacher = distill.upstream("teacher")
    tok = load_tokenizer(_model_dir(distill, source))
    split = read_split(teacher.path("data/train.jsonl"))
    enc = encode(tok, Split(texts=split.texts[:samples], labels=None), max_length)
    return [{k: v.numpy() for k, v in b.items()} for b in batches(enc, 8, shuffle=False)]


def _variant_record(
    base: ExportedModel, variant: Variant, path: Path, check: Gate, made: dict[str, Any]
) -> ExportedModel:
    """The fp32 student's record with its gate, or a variant's: its file, what was done, its gate. A variant
    keeps the fp32 export's spec and dynamic-shape parity (the graph's inputs and outputs are the same)."""
    if variant == "fp32":
        return base.model_copy(update={"gate": check})
    update = {"onnx": f"student/{path.name}", "variant": variant, "of": "student", "gate": check, "transforms": made}
    return base.model_copy(update=update)


def gate(
    path: Path, enc: Encoded, ref_logits: np.ndarray, ref_accuracy: float, atol: float | None, budget: float
) -> Gate:
    """Run the ONNX model on every example of `enc` (the test split) and compare it with the PyTorch logits
    `ref_logits` (N, C): accuracy against the labels, class agreement, max abs diff. Written so that NaN fails:
    a non-finite output fails outright and `nan >= x` / `nan <= x` are False."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        chunks = [session.run(["logits"], onnx_inputs(session, b))[0] for b in batches(enc, 64, shuffle=False)]
    except Exception as e:  # onnxruntime's own error types
        raise ExportToleranceError(
            f"{path.name}: onnxruntime refused the test split ({_first_line(e)})",
            "nothing was written; the variant's graph is broken: drop it from export.variants and report it",
        ) from None
    got = np.concatenate(chunks).astype(np.float64)
    nonfinite = int((~np.isfinite(got)).any(-1).sum())
    diff = np.abs(got - ref_logits.astype(np.float64))
    worst = float(diff.max()) if np.isfinite(diff).all() else math.inf
    preds = got.argmax(-1)
    accuracy = float((preds == np.asarray(enc.labels)).mean())
    need = budget * ref_accuracy
    ok = nonfinite == 0 and accuracy >= need and (atol is None or worst <= atol)
    return Gate(
        examples=len(preds),
        metric="accuracy",
        value=accuracy,
        reference=ref_accuracy,
        budget=need,
        agreement=float((preds == ref_logits.argmax(-1)).mean()),
        max_abs_diff=worst,
        atol=atol,
        nonfinite_outputs=nonfinite,
        ok=bool(ok),
    )


def _gate_line(name: str, g: Gate, size: int) -> str:
    diff = f"max |diff| {g.max_abs_diff:.2e}" + (f" (atol {g.atol:g})" if g.atol is not None else "")
    return (
        f"{name}: {size / 2**20:.1f} MiB, test accuracy {g.value:.4f} on {g.examples} examples (fp32 PyTorch "
        f"{g.reference:.4f}, needs {g.budget:.4f}), agreement {g.agreement:.2%}, {diff}: "
        + ("ok" if g.ok else "FAILED")
    )


def _gate_failure(name: str, g: Gate) -> str:
    why = []
    if g.nonfinite_outputs:
        why.append(f"{g.nonfinite_outputs} outputs with NaN/inf logits (a broken model)")
    if not g.value >= g.budget:
        why.append(
            f"test accuracy {g.value:.4f} is {100 * (g.budget - g.value):.2f} points short of the budget "
            f"{g.budget:.4f} ({g.budget / g.reference:.0%} of the fp32 student's {g.reference:.4f})"
        )
    if g.atol is not None and not g.max_abs_diff <= g.atol:
        why.append(f"max |diff| {g.max_abs_diff:.3e} vs atol {g.atol:g}")
    return f"{name}: " + ", ".join(why)


def _failure(name: str, check: Parity) -> str:
    if check.refused:
        return f"{name}: {check.refused}"
    broken = (
        f", {check.nonfinite_outputs} outputs with NaN/inf logits (a broken model)" if check.nonfinite_outputs else ""
    )
    return (
        f"{name}: max |diff| {check.max_abs_diff:.3e} vs atol {check.atol:g}, "
        f"class agreement {check.agreement:.2%} on {check.examples} examples{broken}"
    )
