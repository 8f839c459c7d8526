"""The translation student: teacher blocks kept per stack, init copy / random / bayes."""

from __future__ import annotations

from pathlib import Path

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import PriorInfo, RunContext, StageOutput, StudentRecord, TeacherRecord, record
from kdpipe.compress import surgery
from kdpipe.config import StudentConfig
from kdpipe.errors import ConfigError
from kdpipe.tasks.translation import seq2seq
from kdpipe.tasks.translation.checks import check_student
from kdpipe.tasks.translation.common import MODEL_DIR, count_params, depth


def run_student(cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    check_student(cfg)
    t_rec = record(upstream, TeacherRecord)
    teacher, tok = seq2seq.load_seq2seq(upstream.directory(MODEL_DIR))
    keep = surgery.parse_keep(cfg.layers, surgery.stacks(teacher))
    prior: PriorInfo | None = None
    if cfg.init == "bayes":
        from kdpipe.methods.bayesinit import bayes_student

        if t_rec.posterior is None:
            raise ConfigError(
                "student.init: bayes needs the teacher's posterior, and the teacher stage did not write one",
                "set teacher.posterior: {kind: swag} and re-run the teacher (kdpipe teacher --force)",
            )
        student, prior = bayes_student(teacher, keep, upstream.path(t_rec.posterior.file), work)
        ctx.console.print(
            f"init bayes: {prior.params / 1e6:.2f}M params at the {prior.kind} posterior's conditional mean given "
            f"{prior.zeroed / 1e6:.2f}M zeroed output-projection weights (moved {prior.shift:.2e} relative to the copy)"
        )
    else:
        torch.manual_seed(ctx.seed)
        student, _ = surgery.remove_layers(teacher, keep)
        if (
            cfg.init == "random"
        ):  # U[-a, a] on every weight, norms kept at (1, 0) (kdpipe.tasks.classification.student's baseline)
            with torch.no_grad():
                for name, p in student.named_parameters():
                    if "norm" not in name.lower():
                        p.uniform_(-cfg.init_range, cfg.init_range)
    seq2seq.save_seq2seq(student, tok, work / MODEL_DIR)
    sp, tp = count_params(student), count_params(teacher)
    shape = ", ".join(f"{s} {v}" for s, v in keep.items())
    ctx.console.print(f"student: teacher blocks {shape}, init={cfg.init}, {sp / 1e6:.2f}M vs {tp / 1e6:.2f}M params")
    rec = StudentRecord(kept_layers=keep.get("decoder", []), layer_map={}, init=cfg.init, stacks=keep, prior=prior)
    return StageOutput(
        record=rec,
        metrics={
            "params": Metric(sp, "parameters"),
            "teacher_params": Metric(tp, "parameters"),
            "layers": Metric(depth(student), "layers"),
            "teacher_layers": Metric(depth(teacher), "layers"),
            "compression": Metric(round(tp / sp, 3), "x"),
        },
    )
