"""The PID / SID Schedule and the Objective's step API: terms are told apart by their flags, never by
name, and the per-step move-on measure is an explicit value, not state hidden in the Objective."""

from __future__ import annotations

import pytest
import torch

from kdpipe.losses.objective import LossContext, Objective, StepLoss, Term, resolve_map
from kdpipe.losses.schedule import Schedule
from kdpipe.models.layermaps import layer_map, uniform_layers
from kdpipe.models.loading import KDOutputs


def test_layer_maps() -> None:
    assert uniform_layers(6, 12) == [1, 3, 5, 7, 9, 11]
    assert uniform_layers(4, 6) == [1, 2, 3, 5]  # round() sends the ties 1.5 and 4.5 to even
    assert layer_map([0, 2, 4]) == {0: 0, 1: 1, 2: 3, 3: 5}
    ctx = LossContext(layer_map=layer_map([1, 3]), n_student=2, n_teacher=4)
    assert resolve_map("kept", ctx, "m") == {1: 2, 2: 4}
    assert resolve_map("uniform", ctx, "m") == {1: 2, 2: 4}
    assert resolve_map([1, 4], ctx, "m") == {1: 1, 2: 4}


@pytest.mark.parametrize("kind", ["pid", "sid"])
def test_logit_terms_wait_for_the_classifier_phase_unless_soft_and_keep_soft(kind: str) -> None:
    s = Schedule(kind=kind, order=[1, 2], cap_steps=1)
    assert not s.logit_term_on(soft=True) and not s.logit_term_on(soft=False)
    keep = Schedule(kind=kind, order=[1, 2], cap_steps=1, keep_soft=True)
    assert keep.logit_term_on(soft=True) and not keep.logit_term_on(soft=False)
    for step in (1, 2):
        s.advance(step, None)
    assert not s.layer_phase and s.logit_term_on(soft=False) and s.logit_term_on(soft=True)
    assert s.active_layers() == ({1, 2} if kind == "sid" else set())
    assert Schedule(kind=kind, order=[1], classifier_last=False).logit_term_on(soft=False)
    assert Schedule().logit_term_on(soft=False) and Schedule().active_layers() is None


def test_cap_and_threshold_events() -> None:
    s = Schedule(kind="pid", order=[1, 2, 3], cap_steps=2, threshold=0.5)
    for step, loss in enumerate([0.9, 0.9, 0.1, 0.7, None, 0.2], start=1):
        s.advance(step, loss)
    assert [(e["step"], e["layer"], e["reason"]) for e in s.events] == [
        (2, 1, "cap"),
        (3, 2, "threshold"),
        (5, 3, "cap"),
    ]
    s.advance(7, 0.0)  # after the layer phase nothing moves
    assert len(s.events) == 3


def _out(seed: int) -> KDOutputs:
    g = torch.Generator().manual_seed(seed)
    hs = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))
    return KDOutputs(torch.randn(2, 3, generator=g), hs, None, torch.ones(2, 3), torch.tensor([0, 1]))


def _const(value: float) -> Term:
    return Term(
        "layer",
        1.0,
        lambda s, t, lm: torch.tensor(value * len(lm)),
        {1: 1, 2: 2},
        progress=lambda s, t, m, n: torch.tensor(0.01 * m),
    )


def test_objective_tells_terms_apart_by_their_flags_not_their_names() -> None:
    """Names a name list would get wrong: 'hinton' that is not soft, 'my_new_loss' that is."""
    hard = Term("hinton", 2.0, lambda s, t, lm: torch.tensor(1.0), on_logits=True, soft=False)
    new = Term("my_new_loss", 3.0, lambda s, t, lm: torch.tensor(1.0), on_logits=True, soft=True)
    sched = Schedule(kind="pid", order=[1, 2], cap_steps=1, keep_soft=True)
    obj = Objective([_const(5.0), hard, new], sched)
    out = obj(_out(1), _out(2))
    assert isinstance(out, StepLoss)
    assert out.values == {"layer": 5.0, "my_new_loss": 1.0}  # layer 1 only; the hard logit term waits
    assert out.total.item() == pytest.approx(5.0 + 3.0)
    assert obj.progress_term(1) is obj.terms[0]
    assert obj.progress_term(5) is None


def test_the_move_on_measure_is_an_explicit_value() -> None:
    obj = Objective([_const(1.0)], Schedule(kind="pid", order=[1, 2], cap_steps=10, threshold=0.05))
    s, t = _out(3), _out(4)
    out = obj(s, t)
    assert out.layer_loss == pytest.approx(0.01)  # layer 1's measure, below the threshold
    obj.after_step(1, None)  # the Objective does not remember the last forward: None means unknown
    assert obj.schedule.events == [] and obj.schedule.current_layer == 1
    obj.after_step(2, out.layer_loss)
    assert [(e["layer"], e["reason"]) for e in obj.schedule.events] == [(1, "threshold")]
    assert obj(s, t).layer_loss == pytest.approx(0.02)  # now layer 2's
    assert obj(s, None).layer_loss is None  # no teacher, nothing to compare
    done = Objective([_const(1.0)], Schedule())
    assert done(s, t).layer_loss is None  # no layer phase
