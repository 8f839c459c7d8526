"""Resume: a run interrupted at any step and continued from its checkpoint ends bit-identical to one that never
stopped; gradient accumulation gives the same steps as the whole batch; a damaged checkpoint is discarded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_wiring import CPU, _bert, _cfg, _ctx, _data, _Sched

from kdpipe.errors import ArtifactError
from kdpipe.losses.objective import build_objective
from kdpipe.train import checkpoints
from kdpipe.train import loop as train_mod
from kdpipe.train.loop import TrainPlan, train

LOSSES = [  # a term with its own learned projection (its state must resume too), and soft + hard logits
    {"name": "hinton", "temperature": 2.0, "alpha": 0.5},
    {"name": "tinybert", "map": "kept", "attention": 0.0, "weight": 0.5},
]


def _run(
    ckpt: Path | None, resume: bool = False, stop_at: int | None = None, schedule: Any = None, **plan: Any
) -> tuple[Any, Any]:
    """Train a fresh student (dropout on) from the same seeds; with stop_at, die after that many steps."""
    teacher = _bert(layers=2, seed=1).eval()
    student = _bert(layers=2, seed=2)
    torch.manual_seed(3)  # the projection's initialisation
    objective = build_objective([_cfg(**c) for c in LOSSES], _ctx(), schedule)
    settings = {"epochs": 3, "batch_size": 4, "lr": 1e-3, "seed": 7, "checkpoint_every": 2, **plan}
    p = TrainPlan(checkpoint=ckpt, resume=resume, **settings)
    if stop_at is None:
        return train(student, objective, _data(18), p, CPU, teachers=[teacher]), student
    real, calls = train_mod._step, [0]

    def dying(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > stop_at:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does between two steps
        return real(*args, **kw)

    train_mod._step = dying  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            train(student, objective, _data(18), p, CPU, teachers=[teacher])
    finally:
        train_mod._step = real  # type: ignore[assignment]
    return None, student


def _same(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# 5 steps per epoch, a checkpoint every 2 steps and at epoch ends: before the first one, mid-epoch, right at an
# epoch end, in the second and in the last epoch
@pytest.mark.parametrize("stop_at", [1, 3, 5, 8, 13])
def test_an_interrupted_run_resumes_bit_identical(tmp_path: Path, stop_at: int) -> None:
    whole, whole_model = _run(None)
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=stop_at)
    assert ckpt.is_file() == (stop_at >= 2)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left behind
    resumed, model = _run(ckpt, resume=True)
    expected = max([s for s in (2, 4, 5, 6, 8, 10, 12, 14, 15) if s <= stop_at], default=None)
    assert resumed.resumed_from == expected
    assert resumed.steps == whole.steps == 15
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]  # exactly, not allclose
    _same(model, whole_model)


def test_without_resume_a_checkpoint_is_not_read(tmp_path: Path) -> None:
    """The same file without resume: training starts over (the planted state would otherwise show)."""
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=3)
    fresh, _ = _run(ckpt, resume=False)
    assert fresh.resumed_from is None and len(fresh.history) == 15


def test_the_schedule_position_resumes(tmp_path: Path) -> None:
    """PID moves layer by layer: a resumed run must be in the same phase at the same step."""
    sched = _Sched("pid", cap_steps=3)
    whole, whole_model = _run(None, schedule=sched)
    ckpt = tmp_path / "kd.pt"
    _run(ckpt, stop_at=4, schedule=_Sched("pid", cap_steps=3))
    resumed, model = _run(ckpt, resume=True, schedule=_Sched("pid", cap_steps=3))
    assert [sorted(r) for r in resumed.history] == [sorted(r) for r in whole.history]  # same terms on each step
    assert resumed.schedule_events == whole.schedule_events and whole.schedule_events
    _same(model, whole_model)


def test_a_damaged_checkpoint_is_discarded_and_training_starts_over(tmp_path: Path) -> None:
    """Bytes no integrity record vouches for are never read (tests/test_checkpoint_integrity.py has the rest)."""
    ckpt = tmp_path / "kd.pt"
    ckpt.write_bytes(b"not a checkpoint")
    fresh, _ = _run(ckpt, resume=True)
    assert fresh.resumed_from is None and len(fresh.history) == 15
    assert ckpt.read_bytes() != b"not a checkpoint"  # replaced by the new run's own


def test_a_vouched_for_checkpoint_that_does_not_load_is_one_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "kd.pt"
    ckpt.write_bytes(b"not a checkpoint")
    entry = {"sha256": hashlib.sha256(b"not a checkpoint").hexdigest(), "size": 16}
    checkpoints.record_path(ckpt).write_text(json.dumps({"version": 1, "accept": [entry]}))
    with pytest.raises(ArtifactError) as e:
        _run(ckpt, resume=True)
    assert "kd.pt" in e.value.message and "delete it" in (e.value.hint or "")


def test_gradient_accumulation_takes_the_same_steps() -> None:
    """Two micro-batches of 3 rows (then 2 + 1 on the last) give the step of the whole batch: each micro-loss is
    weighted by its share of the rows. Dropout off, so the two runs see the same noise (none)."""

    def run(accumulate: int) -> tuple[Any, Any]:
        teacher = _bert(layers=2, seed=1, hidden_dropout=0.0).eval()
        student = _bert(layers=2, seed=2, hidden_dropout=0.0)
        for m in (teacher, student):
            m.config.attention_probs_dropout_prob = 0.0
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        objective = build_objective([_cfg("hinton", temperature=2.0, alpha=0.5)], _ctx())
        plan = TrainPlan(epochs=2, batch_size=6, lr=1e-3, seed=7, accumulate=accumulate)
        return train(student, objective, _data(15), plan, CPU, teachers=[teacher]), student

    (one, m1), (two, m2) = run(1), run(2)
    assert len(one.history) == len(two.history) == 6
    for a, b in zip(one.history, two.history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"]))
    for (k, p), q in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), k
    fresh = _bert(layers=2, seed=2, hidden_dropout=0.0)
    assert not torch.allclose(fresh.classifier.weight, m1.classifier.weight)  # it trained: the check is not vacuous


def test_kdpipe_run_resumes_an_interrupted_teacher_by_default(tmp_path: Path, tiny_dir: Path, tiny_csv: Path) -> None:
    """Ctrl-C in the teacher's fine-tuning: no teacher stage on disk, its checkpoints kept; `kdpipe run` again
    resumes it (the default) and the teacher is bit-identical to one trained without a break."""
    import numpy as np
    from conftest import invoke, write_recipe

    settings = {"teacher__epochs": 4, "teacher__checkpoint_every": 5, "distill__epochs": 1}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, tiny_csv, tmp_path / "runs", **settings)
    ref = write_recipe(tmp_path / "ref.yaml", tiny_dir, tiny_csv, tmp_path / "ref", **settings)
    assert invoke("teacher", "-r", ref)[0] == 0

    real, calls = train_mod._step, [0]

    def dying(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > 12:
            raise KeyboardInterrupt
        return real(*args, **kw)

    train_mod._step = dying  # type: ignore[assignment]
    try:
        code, out = invoke("run", recipe)
    finally:
        train_mod._step = real  # type: ignore[assignment]
    assert code == 130, out
    runs = tmp_path / "runs"
    assert not (runs / "teacher" / "manifest.json").exists()
    assert (runs / ".checkpoints" / "teacher" / "fine-tune.pt").is_file()
    code, out = invoke("run", recipe)
    assert code == 0, out
    assert "resuming" in out and "resumed from step 10" in out
    a, b = np.load(runs / "teacher" / "test_logits.npy"), np.load(tmp_path / "ref" / "teacher" / "test_logits.npy")
    assert np.array_equal(a, b)
    assert not (runs / ".checkpoints" / "teacher").exists()


def test_operational_fields_do_not_change_run_ids() -> None:
    """How often checkpoints are written changes no result, and a teacher without a posterior keeps the run id it
    had before the field existed: neither may re-run a finished (possibly 40-minute) stage."""
    from kdpipe.config import load_recipe
    from kdpipe.pipeline import distill, teacher
    from kdpipe.pipeline.runner import context

    cfg, _ = load_recipe("default", [])
    ctx = context(cfg)
    t_ident = teacher.identity(cfg.teacher, ctx)
    assert "posterior" not in t_ident and "checkpoint_every" not in t_ident
    other, _ = load_recipe("default", ["teacher.checkpoint_every=7", "distill.checkpoint_every=9"])
    assert teacher.identity(other.teacher, ctx) == t_ident
    assert distill.identity(other.distill, ctx) == distill.identity(cfg.distill, ctx)
    with_posterior, _ = load_recipe("default", ["teacher.posterior={kind: diagonal}"])
    assert teacher.identity(with_posterior.teacher, ctx)["posterior"]["kind"] == "diagonal"
    assert distill.identity(cfg.distill, ctx) != distill.identity(
        load_recipe("default", ["distill.cache.use=false"])[0].distill, ctx
    )
