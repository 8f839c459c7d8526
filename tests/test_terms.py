"""The recipe catalogue (kdpipe.losses.terms): torch-free, one class per loss carrying its own flags and
building its own Term; labels are never guessed on the loss side."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter

from kdpipe.losses.logits import hinton, logit_mse
from kdpipe.losses.objective import LossContext, Term
from kdpipe.losses.terms import LOSS_TYPES, LossConfig
from kdpipe.models.loading import KDOutputs

# (on_logits, soft) of every recipe term: the spec the schedules rely on
FLAGS = {
    "hinton": (True, True),
    "ce": (True, False),
    "logit_mse": (True, True),
    "reverse_kl": (True, True),
    "jsd": (True, True),
    "ofa": (True, True),
    "pkd": (False, False),
    "hidden_cosine": (False, False),
    "tinybert": (False, False),
    "attention_kl": (False, False),
    "hint": (False, False),
    "crd": (False, False),
    "pkt": (False, False),
    "vid": (False, False),
    "prior": (True, False),
}
ADAPTER: TypeAdapter[Any] = TypeAdapter(LossConfig)
CTX = LossContext(layer_map={0: 0, 1: 1, 2: 3}, n_student=2, n_teacher=4, d_student=8, d_teacher=8)


def _outputs(seed: int, layers: int, labels: list[int] | None) -> KDOutputs:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    hs = tuple(torch.randn(4, 3, 8, generator=g) for _ in range(layers + 1))
    att = tuple(torch.softmax(torch.randn(4, 2, 3, 3, generator=g), -1) for _ in range(layers))
    y = None if labels is None else torch.tensor(labels)
    return KDOutputs(torch.randn(4, 3, generator=g), hs, att, mask, y)


def test_catalogue_import_does_not_import_torch() -> None:
    code = (
        "import sys, kdpipe.losses.terms, kdpipe.losses.schedule, kdpipe.models.layermaps; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_union_member_is_registered_with_its_flags() -> None:
    assert list(LOSS_TYPES) == list(FLAGS)
    for name, cls in LOSS_TYPES.items():
        assert (cls.on_logits, cls.soft) == FLAGS[name], name
        assert type(ADAPTER.validate_python({"name": name})) is cls
        assert cls.needs_teacher == (name not in ("ce", "prior"))
        assert "on_logits" not in cls.model_fields and "soft" not in cls.model_fields  # ClassVars, not recipe keys


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_each_config_builds_a_term_carrying_its_flags(name: str) -> None:
    cfg = ADAPTER.validate_python({"name": name, "weight": 0.25})
    term = cfg.build(CTX)
    assert isinstance(term, Term)
    assert (term.name, term.weight) == (name, 0.25)
    assert (term.on_logits, term.soft) == FLAGS[name]
    assert term.needs_teacher == (name not in ("ce", "prior"))
    assert bool(term.layers) != term.on_logits  # a logit term has no layers; a layer term has some


@pytest.mark.parametrize(
    "loss", [{"name": "ce"}, {"name": "ofa"}, {"name": "crd", "dim": 4}, {"name": "logit_mse", "alpha": 0.5}]
)
def test_a_term_that_needs_labels_says_so_instead_of_guessing(loss: dict[str, Any]) -> None:
    """The teacher's argmax for unlabeled rows is the training loop's job; the loss side never guesses."""
    term = ADAPTER.validate_python(loss).build(CTX)
    s, t = _outputs(1, 2, None), _outputs(2, 4, None)
    with pytest.raises(ValueError, match=f"the '{loss['name']}' loss term needs labels"):
        term(s, t)
    s.labels = t.logits.argmax(-1)  # what the loop gives it
    assert torch.isfinite(term(s, t))


def test_hinton_without_labels_is_its_soft_term_and_pure_logit_mse_needs_none() -> None:
    s, t = _outputs(3, 2, None), _outputs(4, 4, None)
    got = ADAPTER.validate_python({"name": "hinton", "temperature": 2.0}).build(CTX)(s, t)
    assert got.item() == pytest.approx(hinton(s.logits, t.logits, None, 2.0, 0.5).item())
    got = ADAPTER.validate_python({"name": "logit_mse"}).build(CTX)(s, t)
    assert got.item() == pytest.approx(logit_mse(s.logits, t.logits).item())


def test_a_teacher_term_without_teacher_outputs_fails_clearly() -> None:
    term = ADAPTER.validate_python({"name": "hidden_cosine"}).build(CTX)
    with pytest.raises(ValueError, match="needs the teacher's outputs"):
        term(_outputs(5, 2, [0, 1, 2, 0]), None)


def test_prior_term_reads_the_penalty_of_the_student_being_trained() -> None:
    """The 'prior' term returns ctx.prior() (the distill stage binds it to the student's weights); built without
    one (recipe validation), calling it is a clear ConfigError, not a silent 0."""
    from dataclasses import replace

    from kdpipe.errors import ConfigError

    w = torch.tensor([1.0, -2.0], requires_grad=True)
    term = ADAPTER.validate_python({"name": "prior", "weight": 0.5}).build(replace(CTX, prior=lambda: (w**2).sum()))
    s = _outputs(0, 2, [0, 1, 2, 0])
    value = term(s, None)
    assert float(value) == 5.0 and term.weight == 0.5
    value.backward()
    assert w.grad is not None and w.grad.tolist() == [2.0, -4.0]
    unbound = ADAPTER.validate_python({"name": "prior"}).build(CTX)
    with pytest.raises(ConfigError, match="student.init: bayes"):
        unbound(s, None)
