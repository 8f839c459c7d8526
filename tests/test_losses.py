"""Each loss against a hand computation or a known identity, on seeded tensors."""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.losses.features import hidden_cosine
from kdpipe.losses.logits import hinton, logit_mse, soft_kl
from kdpipe.losses.objective import LossContext, build_objective
from kdpipe.losses.terms import CELoss, HiddenCosineLoss, HintonLoss, LogitMSELoss
from kdpipe.models.loading import KDOutputs


def _logits(seed: int, shape=(4, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def test_hinton_matches_hand_computation() -> None:
    z = torch.tensor([[1.0, 2.0, 0.5]])
    v = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([1])
    T, a = 2.0, 0.7

    def softmax(x: list[float]) -> list[float]:
        e = [math.exp(t) for t in x]
        return [t / sum(e) for t in e]

    p = softmax([2.0 / T, 0.0 / T, 1.0 / T])
    q = softmax([1.0 / T, 2.0 / T, 0.5 / T])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    ce = -math.log(softmax([1.0, 2.0, 0.5])[1])
    expected = (1 - a) * ce + a * T * T * kl
    assert hinton(z, v, y, T, a).item() == pytest.approx(expected, rel=1e-6)


def test_kl_zero_iff_equal() -> None:
    v = _logits(0)
    assert soft_kl(v, v.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert soft_kl(v, _logits(1), 3.0).item() > 1e-4


def test_hinton_without_labels_is_soft_term_only() -> None:
    z, v = _logits(0), _logits(1)
    assert hinton(z, v, None, 2.0, 0.3).item() == pytest.approx(4.0 * soft_kl(v, z, 2.0).item(), rel=1e-6)


def _grad(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    fn(z).backward()
    assert z.grad is not None
    return z.grad


def test_t_squared_keeps_gradient_scale() -> None:
    """With T^2 the soft term's gradient magnitude stays put as T grows (without it, it shrinks as 1/T^2)."""
    z, v = _logits(2, (8, 5)) * 0.5, _logits(3, (8, 5)) * 0.5
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    norms = [_grad(lambda x, T=T: hinton(x, v, None, T, 1.0), z).norm().item() for T in (5.0, 10.0, 20.0)]
    assert max(norms) / min(norms) < 1.1
    raw = [_grad(lambda x, T=T: soft_kl(v, x, T), z).norm().item() for T in (5.0, 20.0)]
    assert raw[0] / raw[1] == pytest.approx(16.0, rel=0.1)


def test_high_temperature_hinton_gradient_approaches_logit_mse() -> None:
    """docs/methods.md §1.1: for large T and zero-mean logits, dC/dz_i ~ (z_i - v_i) / (N T^2): with the T^2
    factor Hinton's gradient tends to (z - v) / (N B), i.e. logit MSE's gradient (2 (z - v) / (N B)) / 2."""
    z, v = _logits(4, (6, 5)), _logits(5, (6, 5))
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    g_kd = _grad(lambda x: hinton(x, v, None, 100.0, 1.0), z)
    g_mse = _grad(lambda x: logit_mse(x, v), z)
    assert torch.allclose(g_kd, g_mse / 2, rtol=0.02, atol=1e-5)
    # and at low temperature they are not close: the property is a limit, not an identity
    g_low = _grad(lambda x: hinton(x, v, None, 1.0, 1.0), z)
    assert not torch.allclose(g_low, g_mse / 2, rtol=0.02, atol=1e-5)


def test_logit_mse_hand_computation() -> None:
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    v = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    assert logit_mse(z, v).item() == pytest.approx((1 + 4 + 1 + 9) / 4)


def test_hidden_cosine_ignores_padding_and_matches_hand_value() -> None:
    hs = (torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]),)
    ht = (torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-9.0, 3.0]]]),)
    mask = torch.tensor([[1, 1, 0]])
    # token 0: cos 1 -> 0; token 1: cos 0 -> 1; token 2 is padding and must not count
    assert hidden_cosine(hs, ht, mask, {0: 0}).item() == pytest.approx(0.5)
    changed = (torch.tensor([[[1.0, 0.0], [1.0, 0.0], [123.0, -7.0]]]),)
    assert hidden_cosine(changed, ht, mask, {0: 0}).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_hidden_cosine_padding_may_hold_nan_or_inf(bad: float) -> None:
    """Padding is selected out, not multiplied by 0: a non-finite padded state cannot change the value."""
    hs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[1.0, 1.0], [2.0, 0.0], [3.0, -1.0]]])
    ht = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-9.0, 3.0]], [[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    base = hidden_cosine((hs,), (ht,), mask, {0: 0}).item()
    hs_bad, ht_bad = hs.clone(), ht.clone()
    hs_bad[0, 2, 0] = bad
    ht_bad[0, 2] = bad
    assert math.isfinite(base)
    assert hidden_cosine((hs_bad,), (ht,), mask, {0: 0}).item() == pytest.approx(base, rel=1e-6)
    assert hidden_cosine((hs_bad,), (ht_bad,), mask, {0: 0}).item() == pytest.approx(base, rel=1e-6)


def test_objective_weights_and_needs() -> None:
    ctx = LossContext(layer_map={0: 0, 1: 1, 2: 2}, n_student=2, n_teacher=2, d_student=4, d_teacher=4)
    obj = build_objective([HintonLoss(weight=0.5), CELoss(weight=0.2), LogitMSELoss(), HiddenCosineLoss()], ctx)
    assert obj.needs_teacher and obj.needs_hidden and [t.weight for t in obj.terms] == [0.5, 0.2, 1.0, 1.0]
    baseline = build_objective([CELoss()], ctx)
    assert not baseline.needs_teacher and not baseline.needs_hidden
    h = tuple(_logits(i, (2, 3, 4)) for i in range(3))
    s = KDOutputs(_logits(7, (2, 3)), h, None, torch.ones(2, 3), torch.tensor([0, 2]))
    t = KDOutputs(_logits(8, (2, 3)), h, None, torch.ones(2, 3), torch.tensor([0, 2]))
    out = obj(s, t)
    values = out.values
    assert set(values) == {"hinton", "ce", "logit_mse", "hidden_cosine"}
    assert values["hidden_cosine"] == pytest.approx(0.0, abs=1e-6)  # identical hidden states
    expected = sum(term.weight * values[term.name] for term in obj.terms)
    assert out.total.item() == pytest.approx(expected, rel=1e-6)
    assert out.layer_loss is None  # no layer schedule
