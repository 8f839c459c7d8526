"""What the classification distill stage reads: the teacher (and ensemble members), the student, the encoded splits
and the loss context of the two architectures, checked against each other."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import (
    StudentRecord,
    TeacherRecord,
    record,
)
from kdpipe.config import DistillConfig
from kdpipe.data.tables import SPLITS, Encoded, encode, read_split
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses.objective import LossContext
from kdpipe.models.loading import load_classifier, load_tokenizer, require_same_tokenizer, resolve_model_dir
from kdpipe.tasks.classification.checks import check_objective, loss_context


@dataclass
class Pair:
    """What the distill stage reads: the teacher (and ensemble members), the student's directory, the
    encoded splits, and the loss context of the two architectures."""

    teachers: list[Any]
    teacher_tokenizer: Any
    student_dir: Path
    student_tokenizer: Any
    teacher_record: TeacherRecord
    teacher_manifest: Manifest
    splits: dict[str, Encoded]  # train: what both models read (teacher ids); val / test: the student's own ids
    loss_ctx: LossContext
    student_ids: Any = None  # (V_teacher,) int64 tensor: teacher id -> student id, for a pruned vocabulary
    prior_file: Path | None = None  # init: bayes: the student's prior N(mu, Xi), for the 'prior' term
    attn: str = "eager"  # the attention implementation both models load with ("sdpa" on the GPU path)

    @property
    def train_tokenizer(self) -> Any:
        """The tokenizer of the data both models read: the teacher's when the student's vocabulary is pruned."""
        return self.teacher_tokenizer if self.student_ids is not None else self.student_tokenizer


def load_pair(cfg: DistillConfig, upstream: Manifest) -> Pair:
    t_manifest = upstream.upstream("teacher")
    t_dir, s_dir = t_manifest.directory("model"), upstream.directory("model")
    s_rec, t_rec = record(upstream, StudentRecord), record(t_manifest, TeacherRecord)
    t_conf, s_conf = json.loads((t_dir / "config.json").read_text()), json.loads((s_dir / "config.json").read_text())
    ctx = loss_context(t_conf, s_conf, s_rec.layer_map)
    if check_objective(cfg, ctx).needs_attentions and any(s_conf.get("pruned_heads", {}).values()):
        raise ConfigError(
            "distill.losses: an attention term compares the attention maps head by head, but the student's heads "
            "were pruned (student.width.heads)",
            "drop the attention terms (attention_kl, tinybert's attention), or set student.width.heads: 0",
        )
    attn = _attention_implementation(cfg, check_objective(cfg, ctx).needs_attentions, s_conf)
    prior_file = upstream.path(s_rec.prior.file) if s_rec.prior is not None else None
    if prior_file is None and any(c.name == "prior" for c in cfg.losses):
        raise ConfigError(
            f"distill.losses: the 'prior' term needs a student built with student.init: bayes (this one: {s_rec.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    teacher = load_classifier(t_dir, attn=attn)
    t_tok, s_tok = load_tokenizer(t_dir), load_tokenizer(s_dir)
    student_ids = _student_ids(upstream, s_rec, t_tok, s_tok, s_dir)
    _check_member(teacher, load_classifier(s_dir), t_tok, s_tok, cfg, s_dir, same_vocab=student_ids is None)
    teachers = [teacher]
    for i, member_path in enumerate(cfg.extra_teachers):
        e_dir = resolve_model_dir(member_path, f"distill.extra_teachers[{i}]")
        member = load_classifier(e_dir)
        _check_member(teacher, member, t_tok, load_tokenizer(e_dir), cfg, e_dir)
        teachers.append(member)
    train_tok = t_tok if student_ids is not None else s_tok
    splits = {
        n: encode(
            train_tok if n == "train" else s_tok, read_split(t_manifest.path(f"data/{n}.jsonl")), t_rec.max_length
        )
        for n in SPLITS
    }
    return Pair(teachers, t_tok, s_dir, s_tok, t_rec, t_manifest, splits, ctx, student_ids, prior_file, attn)


def _attention_implementation(cfg: DistillConfig, needs_attentions: bool, s_conf: dict[str, Any]) -> str:
    """SDPA (torch's fused attention kernels) on CUDA unless a term reads attention maps, which only the eager
    implementation returns; eager on the CPU, where every figure in the docs was measured with it."""
    import torch

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    bilstm = s_conf.get("model_type") == "kdpipe-bilstm"
    # an architecture without SDPA falls back to eager as it loads (kdpipe.models.loading.load_classifier_with_head)
    return "sdpa" if cuda and not needs_attentions and not bilstm else "eager"


def _student_ids(upstream: Manifest, s_rec: StudentRecord, t_tok: Any, s_tok: Any, s_dir: Path) -> Any:
    """A pruned-vocabulary student's teacher-id -> student-id map (None: the student reads the teacher's ids)."""
    import torch

    if s_rec.vocab is None:
        return None
    lut = np.load(upstream.path(s_rec.vocab.map), allow_pickle=False)
    if len(lut) != len(t_tok) or int(lut.max()) >= len(s_tok):
        raise ModelError(
            f"{s_dir}: its vocabulary map covers {len(lut)} teacher tokens and ids up to {int(lut.max())}, but the "
            f"teacher has {len(t_tok)} tokens and the student {len(s_tok)}",
            "re-run `kdpipe student --force`",
        )
    return torch.from_numpy(lut)


def _check_member(
    teacher: Any, other: Any, t_tok: Any, o_tok: Any, cfg: DistillConfig, where: Path, same_vocab: bool = True
) -> None:
    """The student (or an ensemble member) against the teacher: same tokenizer (unless the student's vocabulary
    was pruned and maps the teacher's ids), labels and, for hidden_cosine, width."""
    if same_vocab:
        require_same_tokenizer(t_tok, o_tok, where)
    if teacher.config.num_labels != other.config.num_labels:
        raise ModelError(
            f"{where}: has {other.config.num_labels} classes, the teacher {teacher.config.num_labels}",
            "use models trained for the same labels",
        )
    if any(c.name == "hidden_cosine" for c in cfg.losses) and teacher.config.hidden_size != other.config.hidden_size:
        raise ConfigError(
            f"distill.losses: hidden_cosine needs equal widths (student {other.config.hidden_size}, "
            f"teacher {teacher.config.hidden_size})",
            "use tinybert or hint, which learn a projection",
        )
