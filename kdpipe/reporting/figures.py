"""`report.json`, the source of truth of a run's report: every model's quality, size and timing in one place.

The Markdown report, the Pareto chart and `kdpipe profile --compare` all read this dict, so a figure is computed
once. Models are named as in the export record (`teacher`, `student`, `student-<variant>`), plus `teacher-eager`
and `student-eager` for PyTorch eager where the profile timed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import DistillRecord, ExportRecord, ProfileRecord, StudentRecord, TeacherRecord, record


@dataclass
class Run:
    """The manifests and records of one run, found through the export stage's lineage. Behind a teaching
    assistant, `teacher` is the original teacher and `assistant` the direct one."""

    teacher: Manifest
    teacher_rec: TeacherRecord
    assistant: Manifest | None
    student: Manifest
    student_rec: StudentRecord
    distill: Manifest
    distill_rec: DistillRecord
    export: Manifest
    export_rec: ExportRecord

    @classmethod
    def of(cls, export: Manifest) -> Run:
        teacher, assistant = export.upstream("teacher"), None
        if record(teacher, TeacherRecord).assistant is not None:
            assistant, teacher = teacher, teacher.upstream("teacher")
        student, distill = export.upstream("student"), export.upstream("distill")
        return cls(
            teacher=teacher,
            teacher_rec=record(teacher, TeacherRecord),
            assistant=assistant,
            student=student,
            student_rec=record(student, StudentRecord),
            distill=distill,
            distill_rec=record(distill, DistillRecord),
            export=export,
            export_rec=record(export, ExportRecord),
        )

    def warnings(self) -> list[str]:
        """What the stages flagged (a teacher that predicts one class, a schedule that outlasts the budget,
        ...), once each, in stage order: a figure next to a warning is not a result to quote."""
        found = [*self.teacher_rec.warnings]
        if self.assistant is not None:
            found += record(self.assistant, TeacherRecord).warnings
        found += self.distill_rec.warnings
        seen: list[str] = []
        for w in found:
            if w not in seen:
                seen.append(w)
        return seen


SCHEMA = 1
_TIMING_KEYS = ("session_init_ms", "first_run_ms", "peak_rss_mib", "model_rss_mib", "providers", "top_ops", "rounds")


def _model(
    accuracy: float | None, size: int | None, engine: str, timed: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "accuracy": accuracy,
        "bytes": size,
        "engine": engine,
        "latency": timed.get("shapes", {}),
        **{k: timed[k] for k in _TIMING_KEYS if k in timed},
        **extra,
    }


def _scaled(value: Any, scale: float) -> Any:
    return value if value is None or scale == 1.0 else value * scale


def figures(
    run: Run, results: dict[str, Any], rec: ProfileRecord, quality: str = "test_accuracy", scale: float = 1.0
) -> dict[str, Any]:
    """The report's figures: per model test accuracy (whole split), bytes on disk, latency per shape; the
    deployed variant and its budgets; the teacher's and the no-KD student's quality for reference.

    `quality` is the stages' metric read as "accuracy" (x `scale`): translation passes "test_bleu" and 0.01, so
    `accuracy` is BLEU / 100 there, as in its gates and budgets, and `--compare` works on it alike."""
    ort_res, eager = results["onnxruntime"], results.get("torch_eager", {})
    t_acc = _scaled(run.teacher.metric(quality), scale)
    models: dict[str, Any] = {}
    for name, info in run.export_rec.models.items():
        if name not in ort_res:
            continue
        acc = info.gate.value if info.gate is not None else (t_acc if name == "teacher" else None)
        extra = {"variant": info.variant, "agreement": None if info.gate is None else info.gate.agreement}
        roof = results.get("roofline") or {}
        extra["roofline"] = roof.get("models", {}).get(name, {})
        extra["estimate_ms"] = ((roof.get("estimates") or {}).get("models") or {}).get(name)
        models[name] = _model(acc, ort_res[name].get("model_bytes"), "onnxruntime", ort_res[name], **extra)
    s_acc = _scaled(run.distill.metric(quality), scale)
    for name, timed in eager.items():
        models[f"{name}-eager"] = _model(t_acc if name == "teacher" else s_acc, None, "torch eager", timed)
    return {
        "schema": SCHEMA,
        "profile": {k: results["profile"][k] for k in ("name", "description", "emulated", "intra_op_threads")},
        "providers": results.get("providers"),
        "shapes": list(next(iter(ort_res.values()))["shapes"]) if ort_res else [],
        "teacher": {
            "accuracy": t_acc,
            "macro_f1": run.teacher.metric("test_macro_f1"),
            "layers": run.teacher.metric("layers"),
        },
        "student": {
            "accuracy": s_acc,
            "macro_f1": run.distill.metric("test_macro_f1"),
            "baseline_accuracy": _scaled(run.distill.metric(f"baseline_{quality}"), scale),
            "layers": run.student.metric("layers"),
            "params": run.student.metric("params"),
        },
        "models": models,
        "host_peaks": (results.get("roofline") or {}).get("host"),
        "estimates_for": ((results.get("roofline") or {}).get("estimates") or {}).get("device"),
        "mobile": None if rec.mobile is None else rec.mobile.model_dump(mode="json"),
        "deploy": rec.deploy,
        "budgets": [b.model_dump(mode="json") for b in rec.budgets],
        "warnings": run.warnings(),
        "quality": quality,
    }
