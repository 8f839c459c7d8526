"""docs/methods.md losses beyond the basic four: each against a hand computation or a known identity, plus
the properties that matter (zero at equality, padding never counts, per-token averaging, low-T
stability), on small seeded tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.losses.features import (
    Projection,
    attention_kl,
    attention_mse,
    cls_cosine,
    cls_mse_normalised,
    hidden_mse,
    hint,
    pkd_pairs,
)
from kdpipe.losses.logits import (
    ensemble_probs,
    generalized_jsd,
    hinton,
    hinton_from_probs,
    logit_mse_with_labels,
    ofa,
    reverse_kl,
    soft_kl,
)
from kdpipe.losses.masks import masked_mean, masked_sum, mean_pool
from kdpipe.losses.relational import VIDHead, crd_in_batch, pkt
from kdpipe.reporting.analysis import cka_matrix, linear_cka


def _randn(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _softmax(x: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in x]
    return [v / sum(e) for v in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)


def _grad(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    fn(z).backward()
    assert z.grad is not None
    return z.grad


# --- 1.1 ensemble and Hinton from probabilities ---------------------------------------------------


def test_ensemble_arithmetic_and_geometric_hand_computed() -> None:
    p1, p2 = [0.7, 0.2, 0.1], [0.1, 0.6, 0.3]
    logits = [torch.tensor([p1]).log(), torch.tensor([p2]).log()]  # SM(log p) = p at T = 1
    arith = ensemble_probs(logits, 1.0, "arithmetic")
    assert arith[0].tolist() == pytest.approx([0.4, 0.4, 0.2], abs=1e-6)
    g = [math.sqrt(a * b) for a, b in zip(p1, p2, strict=True)]
    geo = ensemble_probs(logits, 1.0, "geometric")
    assert geo[0].tolist() == pytest.approx([x / sum(g) for x in g], abs=1e-6)
    # the geometric mean punishes disagreement: class 0 (0.7 vs 0.1) loses mass relative to arithmetic
    assert geo[0, 0] < arith[0, 0]


def test_ensemble_of_one_teacher_is_its_softmax() -> None:
    v = _randn(0, 4, 5) * 3
    expected = F.softmax(v / 2.5, dim=-1)
    for mode in ("arithmetic", "geometric"):
        assert torch.allclose(ensemble_probs([v], 2.5, mode), expected, atol=1e-6)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ensemble_probs([], 1.0, "arithmetic")


def test_hinton_from_probs_hand_and_identity() -> None:
    z, y, T, a = [1.0, 2.0, 0.5], 1, 2.0, 0.7
    p = [0.5, 0.5, 0.0]  # an exact zero, as an ensemble member can give: 0 log 0 must count as 0
    q = _softmax(z, T)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
    ce = -math.log(_softmax(z)[y])
    got = hinton_from_probs(torch.tensor([z]), torch.tensor([p]), torch.tensor([y]), T, a)
    assert got.item() == pytest.approx((1 - a) * ce + a * T * T * kl, rel=1e-6)
    # with p = SM(v/T) it is exactly `hinton`, with and without labels
    zz, v, yy = _randn(1, 4, 3), _randn(2, 4, 3), torch.tensor([0, 2, 1, 1])
    pv = F.softmax(v / 3.0, dim=-1)
    assert hinton_from_probs(zz, pv, yy, 3.0, 0.4).item() == pytest.approx(hinton(zz, v, yy, 3.0, 0.4).item(), rel=1e-5)
    assert hinton_from_probs(zz, pv, None, 3.0, 0.4).item() == pytest.approx(hinton(zz, v, None, 3.0, 0.4).item())


# --- 1.2 logit regression with labels -------------------------------------------------------------


def test_logit_mse_with_labels_hand_computed() -> None:
    z = [[1.0, 2.0], [0.0, 0.0]]
    v = [[0.0, 0.0], [1.0, 3.0]]
    a = 0.25
    mse = (1 + 4 + 1 + 9) / 4
    ce_y = (-math.log(_softmax(z[0])[0]) - math.log(_softmax(z[1])[0])) / 2  # labels [0, 0]
    got = logit_mse_with_labels(torch.tensor(z), torch.tensor(v), torch.tensor([0, 0]), a)
    assert got.item() == pytest.approx(a * ce_y + (1 - a) * mse, rel=1e-6)
    # unlabeled: the training loop gives t = argmax v = [0 (tie -> first), 1] as the labels
    ce_t = (-math.log(_softmax(z[0])[0]) - math.log(_softmax(z[1])[1])) / 2
    t_arg = torch.tensor(v).argmax(-1)
    assert t_arg.tolist() == [0, 1]
    got = logit_mse_with_labels(torch.tensor(z), torch.tensor(v), t_arg, a)
    assert got.item() == pytest.approx(a * ce_t + (1 - a) * mse, rel=1e-6)
    # the labels are never guessed here
    with pytest.raises(ValueError, match="needs labels"):
        logit_mse_with_labels(torch.tensor(z), torch.tensor(v), None, a)


# --- 1.3 reverse KL and generalised JSD -----------------------------------------------------------


def test_reverse_kl_hand_computed_2d() -> None:
    z, v, T = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2.0
    q, p = _softmax(z, T), _softmax(v, T)
    got = reverse_kl(torch.tensor([z]), torch.tensor([v]), T)
    assert got.item() == pytest.approx(T * T * _kl(q, p), rel=1e-6)


@pytest.mark.parametrize("fn", ["reverse", "jsd"])
def test_kl_terms_zero_iff_equal(fn: str) -> None:
    loss = {
        "reverse": lambda z, v, m: reverse_kl(z, v, 2.0, m),
        "jsd": lambda z, v, m: generalized_jsd(z, v, 0.3, 2.0, m),
    }[fn]
    v = _randn(5, 2, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert loss(v.clone(), v, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(_randn(6, 2, 3, 6), v, mask).item() > 1e-3
    assert loss(v[:, 0].clone(), v[:, 0], None).item() == pytest.approx(0.0, abs=1e-6)  # 2-D
    assert loss(_randn(6, 2, 6), v[:, 0], None).item() > 1e-3


def _token_kls(z: torch.Tensor, v: torch.Tensor, T: float) -> list[list[float]]:
    """Per-token KL by plain python, (B, T, V) -> B x T list."""
    out = []
    for zr, vr in zip(z.tolist(), v.tolist(), strict=True):
        row = []
        for zt, vt in zip(zr, vr, strict=True):
            q, p = _softmax(zt, T), _softmax(vt, T)
            row.append(T * T * _kl(q, p))
        out.append(row)
    return out


def test_sequence_kl_averages_per_real_token_not_per_row() -> None:
    """Row 0 has 1 real token, row 1 has 3: the loss is the mean of the 4 real tokens' KLs."""
    z, v, T = _randn(7, 2, 3, 5), _randn(8, 2, 3, 5), 1.5
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    kls = _token_kls(z, v, T)
    real = [kls[0][0], kls[1][0], kls[1][1], kls[1][2]]
    per_token = sum(real) / 4
    per_row = (kls[0][0] + sum(kls[1]) / 3) / 2
    assert abs(per_token - per_row) > 1e-3  # the two conventions really differ on this batch
    assert reverse_kl(z, v, T, mask).item() == pytest.approx(per_token, rel=1e-5)


def _padding_changed(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """x (B, T, ...) with every padded position replaced by large arbitrary values."""
    noise = _randn(seed, *x.shape) * 100
    pad = ~mask.bool()
    return torch.where(pad.view(*pad.shape, *([1] * (x.dim() - 2))), noise, x)


@pytest.mark.parametrize("fn", ["reverse", "jsd"])
def test_token_kl_padding_never_contributes(fn: str) -> None:
    loss = {
        "reverse": lambda z, v, m: reverse_kl(z, v, 2.0, m),
        "jsd": lambda z, v, m: generalized_jsd(z, v, 0.5, 2.0, m),
    }[fn]
    z, v = _randn(9, 2, 4, 6), _randn(10, 2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    base = loss(z, v, mask).item()
    assert loss(_padding_changed(z, mask, 11), _padding_changed(v, mask, 12), mask).item() == pytest.approx(
        base, rel=1e-6
    )


def test_reverse_kl_low_temperature_is_finite_with_finite_gradient() -> None:
    """T = 0.05 and logits of magnitude ~50: softmax underflows to exact zeros; log_softmax must not."""
    z, v = _randn(13, 4, 3, 50) * 50, _randn(14, 4, 3, 50) * 50
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    for m in (mask, None):
        g = _grad(lambda x, m=m: reverse_kl(x, v, 0.05, m), z)
        assert torch.isfinite(g).all()
        assert torch.isfinite(reverse_kl(z, v, 0.05, m))
    assert torch.isfinite(_grad(lambda x: reverse_kl(x, v[:, 0], 0.05), z[:, 0])).all()  # 2-D too
    assert torch.isfinite(_grad(lambda x: generalized_jsd(x, v, 0.5, 0.05, mask), z)).all()


def test_generalized_jsd_half_is_usual_jsd_hand_computed() -> None:
    z, v, T = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 1.0
    q, p = _softmax(z, T), _softmax(v, T)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    jsd = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    assert generalized_jsd(torch.tensor([z]), torch.tensor([v]), 0.5, T).item() == pytest.approx(jsd, rel=1e-5)
    assert jsd < math.log(2)
    # beta = 0.2, T = 2, written out
    b, T = 0.2, 2.0
    q, p = _softmax(z, T), _softmax(v, T)
    m = [b * a + (1 - b) * c for a, c in zip(p, q, strict=True)]
    expected = T * T * (b * _kl(p, m) + (1 - b) * _kl(q, m))
    assert generalized_jsd(torch.tensor([z]), torch.tensor([v]), b, T).item() == pytest.approx(expected, rel=1e-5)


def test_generalized_jsd_limits_as_documented() -> None:
    """Endpoints are exactly 0; near them JSD / beta -> forward KL and JSD / (1 - beta) -> reverse KL."""
    z, v = _randn(15, 3, 5), _randn(16, 3, 5)
    assert generalized_jsd(z, v, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert generalized_jsd(z, v, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    eps = 1e-3
    fwd, rev = soft_kl(v, z, 1.0).item(), reverse_kl(z, v, 1.0).item()  # KL(p || q), KL(q || p)
    assert generalized_jsd(z, v, eps, 1.0).item() / eps == pytest.approx(fwd, rel=0.02)
    assert generalized_jsd(z, v, 1 - eps, 1.0).item() / eps == pytest.approx(rev, rel=0.02)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(z, v, 1.5, 1.0)


# --- 1.4 OFA ---------------------------------------------------------------------------------------


def test_ofa_hand_computed() -> None:
    z, v, c, g, T = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2, 2.0, 1.0
    q, p = _softmax(z, T), _softmax(v, T)
    expected = -((1 + p[c]) ** g) * math.log(q[c]) - sum(p[k] * math.log(q[k]) for k in range(3) if k != c)
    assert ofa(torch.tensor([z]), torch.tensor([v]), torch.tensor([c]), g, T).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_ofa_gamma_one_is_kd_with_labels_folded_in_and_gamma_weights_target() -> None:
    z, v, y = _randn(17, 6, 4), _randn(18, 6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    log_q = F.log_softmax(z, dim=-1)
    kd = F.cross_entropy(z, y) + (-(F.softmax(v, dim=-1) * log_q).sum(-1)).mean()  # CE(y, q) + soft CE(p, q)
    assert ofa(z, v, y, 1.0).item() == pytest.approx(kd.item(), rel=1e-6)
    # gamma > 1 adds ((1 + p_c)^g - (1 + p_c)) (-log q_c) >= 0 to each row: only the target term grows
    p_c = F.softmax(v, dim=-1).gather(1, y[:, None])[:, 0]
    extra = (((1 + p_c) ** 2 - (1 + p_c)) * -log_q.gather(1, y[:, None])[:, 0]).mean()
    assert ofa(z, v, y, 2.0).item() == pytest.approx(ofa(z, v, y, 1.0).item() + extra.item(), rel=1e-5)
    assert ofa(z, v, y, 2.0) > ofa(z, v, y, 1.0)
    with pytest.raises(ValueError, match="labels"):
        ofa(z, v, None, 1.0)


# --- 2.1 Patient KD --------------------------------------------------------------------------------


def test_pkd_pairs_12_to_6_and_general() -> None:
    assert pkd_pairs(6, 12, "skip") == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert pkd_pairs(6, 12, "last") == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert pkd_pairs(3, 12, "skip") == [(1, 4), (2, 8)]
    assert pkd_pairs(3, 12, "last") == [(1, 10), (2, 11)]
    assert pkd_pairs(4, 6, "skip") == [(1, 1), (2, 3), (3, 4)]  # floor(j * 6 / 4), strictly increasing
    assert pkd_pairs(6, 6, "skip") == pkd_pairs(6, 6, "last") == [(j, j) for j in range(1, 6)]
    with pytest.raises(ValueError, match="student 8 > teacher 6"):
        pkd_pairs(8, 6, "skip")
    with pytest.raises(ValueError, match="at least 2"):
        pkd_pairs(1, 12, "last")


def test_cls_mse_normalised_hand_computed_and_summed_over_pairs() -> None:
    # [CLS] of student: (3, 4) -> (0.6, 0.8); teacher (2, 0) -> (1, 0): squared distance 0.16 + 0.64 = 0.8
    # second example: identical directions -> 0. Other positions must be ignored.
    hs = (torch.tensor([[[3.0, 4.0], [9.0, 9.0]], [[1.0, 1.0], [5.0, -5.0]]]),)
    ht = (torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[7.0, 7.0], [1.0, 2.0]]]),)
    assert cls_mse_normalised(hs, ht, [(0, 0)]).item() == pytest.approx(0.4, rel=1e-6)
    assert cls_mse_normalised(hs * 2, ht * 2, [(0, 0), (1, 1)]).item() == pytest.approx(0.8, rel=1e-6)


# --- 2.3 TinyBERT / FitNets ------------------------------------------------------------------------


def test_projection_is_a_bias_free_linear_even_for_equal_widths() -> None:
    p = Projection(4, 4)
    assert isinstance(p.linear, torch.nn.Linear) and p.linear.bias is None
    x = _randn(19, 2, 3, 4)
    assert torch.allclose(p(x), x @ p.linear.weight.T)
    assert Projection(3, 5, bias=True)(torch.zeros(2, 3)).shape == (2, 5)


def test_hidden_mse_hand_computed_with_projection_and_padding() -> None:
    hs = (torch.tensor([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]]]),)
    ht = (torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]),)
    mask = torch.tensor([[1, 1, 0]])
    # token 0: (0 + 4) / 2 = 2; token 1: (9 + 16) / 2 = 12.5; token 2 is padding
    assert hidden_mse(hs, ht, {0: 0}, mask).item() == pytest.approx((2 + 12.5) / 2)
    # projection doubling the student: (2, 4) vs teacher (1, 0) -> (1 + 16) / 2 = 8.5; (6, 8) vs 0 -> 50
    proj = Projection(2, 2)
    with torch.no_grad():
        proj.linear.weight.copy_(2 * torch.eye(2))
    assert hidden_mse(hs, ht, {0: 0}, mask, proj).item() == pytest.approx((8.5 + 50) / 2)
    # mean over pairs: a perfect pair halves the value
    assert hidden_mse(hs * 2, (ht[0], hs[0]), {0: 0, 1: 1}, mask).item() == pytest.approx((2 + 12.5) / 4)


def test_hidden_mse_and_hint_ignore_padding() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    hs = tuple(_randn(20 + i, 2, 4, 3) for i in range(2))
    ht = tuple(_randn(30 + i, 2, 4, 5) for i in range(2))
    proj = Projection(3, 5)
    hs2 = tuple(_padding_changed(h, mask, 40 + i) for i, h in enumerate(hs))
    ht2 = tuple(_padding_changed(h, mask, 50 + i) for i, h in enumerate(ht))
    base = hidden_mse(hs, ht, {0: 0, 1: 1}, mask, proj).item()
    assert hidden_mse(hs2, ht2, {0: 0, 1: 1}, mask, proj).item() == pytest.approx(base, rel=1e-6)
    base = hint(hs, ht, 1, 0, proj, mask).item()
    assert hint(hs2, ht2, 1, 0, proj, mask).item() == pytest.approx(base, rel=1e-6)


def test_hint_hand_computed() -> None:
    hs = (torch.zeros(1, 2, 1), torch.tensor([[[1.0], [2.0]]]))
    ht = (torch.tensor([[[3.0, 3.0], [0.0, 0.0]]]),)
    reg = Projection(1, 2)
    with torch.no_grad():
        reg.linear.weight.copy_(torch.tensor([[1.0], [2.0]]))
    # regressor: (1, 2) and (2, 4); vs teacher (3, 3): (4 + 1) / 2 = 2.5; vs (0, 0): (4 + 16) / 2 = 10
    assert hint(hs, ht, 1, 0, reg, None).item() == pytest.approx((2.5 + 10) / 2)
    assert hint(hs, ht, 1, 0, reg, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)


def _attention(seed: int, b: int, h: int, t: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = _randn(seed, b, h, t, t) * 2
    if mask is not None:  # as a model does: padded keys get exactly 0 probability
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], -math.inf)
    return F.softmax(scores, dim=-1)


def test_attention_mse_hand_computed() -> None:
    # one example, one head, T = 2 with the second token padded: only A[0, 0] counts
    a_s = (torch.tensor([[[[0.7, 0.3], [0.5, 0.5]]]]),)
    a_t = (torch.tensor([[[[0.2, 0.8], [0.1, 0.9]]]]),)
    assert attention_mse(a_s, a_t, {0: 0}, torch.tensor([[1, 0]])).item() == pytest.approx(0.25, rel=1e-6)
    # no padding: (0.25 + 0.25 + 0.16 + 0.16) / 4; with two heads (1/h) sum_heads
    full = (0.25 + 0.25 + 0.16 + 0.16) / 4
    assert attention_mse(a_s, a_t, {0: 0}, None).item() == pytest.approx(full, rel=1e-6)
    two_heads_s = (torch.cat([a_s[0], a_t[0]], dim=1),)
    two_heads_t = (torch.cat([a_t[0], a_t[0]], dim=1),)
    assert attention_mse(two_heads_s, two_heads_t, {0: 0}, None).item() == pytest.approx(full / 2, rel=1e-6)


def test_attention_kl_hand_computed_and_zero_iff_equal() -> None:
    a_s = (torch.tensor([[[[0.7, 0.3], [0.5, 0.5]]]]),)
    a_t = (torch.tensor([[[[0.2, 0.8], [0.1, 0.9]]]]),)
    rows = [_kl([0.2, 0.8], [0.7, 0.3]), _kl([0.1, 0.9], [0.5, 0.5])]
    assert attention_kl(a_s, a_t, {0: 0}, None).item() == pytest.approx(sum(rows) / 2, rel=1e-5)
    # teacher row with an exact 0 at a real key: 0 log 0 counts as 0 thanks to the eps clamp
    a_t0 = (torch.tensor([[[[0.0, 1.0], [0.1, 0.9]]]]),)
    expected = (math.log(1.0 / 0.3) + rows[1]) / 2
    assert attention_kl(a_s, a_t0, {0: 0}, None).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    at = (_attention(60, 2, 3, 4, mask),)
    assert attention_kl((at[0].clone(),), at, {0: 0}, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl((_attention(61, 2, 3, 4, mask),), at, {0: 0}, mask).item() > 1e-3


def test_attention_losses_ignore_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    a_s = tuple(_attention(70 + i, 2, 3, 4, mask) for i in range(2))
    a_t = tuple(_attention(80 + i, 2, 3, 4, mask) for i in range(2))
    pad_q = ~mask.bool()[:, None, :, None]
    pad_k = ~mask.bool()[:, None, None, :]

    def scramble(a: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.where(pad_q | pad_k, _randn(seed, *a.shape).abs(), a)  # padded rows and columns

    a_s2 = tuple(scramble(a, 90 + i) for i, a in enumerate(a_s))
    a_t2 = tuple(scramble(a, 95 + i) for i, a in enumerate(a_t))
    lmap = {0: 1, 1: 0}
    for fn in (attention_mse, attention_kl):
        assert fn(a_s2, a_t2, lmap, mask).item() == pytest.approx(fn(a_s, a_t, lmap, mask).item(), rel=1e-6)


@pytest.mark.parametrize("fn", [attention_mse, attention_kl])
def test_attention_losses_need_equal_head_counts(fn) -> None:
    with pytest.raises(ValueError, match=r"student has 2 attention heads and teacher has 4"):
        fn((_attention(1, 1, 2, 3),), (_attention(2, 1, 4, 3),), {0: 0}, None)


# --- 2.4 [CLS] cosine ------------------------------------------------------------------------------


def test_cls_cosine_hand_computed() -> None:
    # example 0: (1, 0) vs (0, 1) -> 1 - 0 = 1; example 1: (1, 1) vs (2, 2) -> 0; positions 1 ignored
    hs = (torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[1.0, 1.0], [-1.0, 0.0]]]),)
    ht = (torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[2.0, 2.0], [1.0, 0.0]]]),)
    assert cls_cosine(hs, ht, [(0, 0)]).item() == pytest.approx(0.5, rel=1e-6)
    # mean over pairs: a second, perfect pair halves it
    assert cls_cosine(hs + ht, ht, [(0, 0), (1, 0)]).item() == pytest.approx(0.25, rel=1e-6)


# --- 3.1 PKT ---------------------------------------------------------------------------------------


def _pkt_probs_by_hand(f: list[list[float]]) -> list[list[float]]:
    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)

    k = [[(cos(a, b) + 1) / 2 for b in f] for a in f]
    return [[x / sum(row) for x in row] for row in k]


def test_pkt_hand_computed_reference_convention() -> None:
    fs = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    ft = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # a different width is fine
    ps, pt = _pkt_probs_by_hand(fs), _pkt_probs_by_hand(ft)
    kl_ts = sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(3) for j in range(3)) / 9
    kl_st = sum(ps[i][j] * math.log(ps[i][j] / pt[i][j]) for i in range(3) for j in range(3)) / 9
    assert pkt(torch.tensor(fs), torch.tensor(ft)).item() == pytest.approx(kl_ts, rel=1e-4)
    assert pkt(torch.tensor(fs), torch.tensor(ft), symmetric=True).item() == pytest.approx(kl_ts + kl_st, rel=1e-4)


def test_pkt_zero_iff_equal() -> None:
    f = _randn(100, 6, 4)
    assert pkt(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt(f * 3, f, symmetric=True).item() == pytest.approx(0.0, abs=1e-7)  # cosine: scale-free
    assert pkt(_randn(101, 6, 4), f).item() > 1e-4
    assert pkt(_randn(101, 6, 4), f, symmetric=True).item() > 1e-4


# --- 3.2 VID ---------------------------------------------------------------------------------------


def test_vid_init_variance_and_hand_computed_loss() -> None:
    head = VIDHead(2, 3, init_var=5.0)
    assert torch.allclose(head.variance(), torch.full((3,), 5.0), atol=1e-5)
    assert isinstance(head.mu, torch.nn.Linear)
    assert isinstance(VIDHead(2, 3, hidden=8).mu, torch.nn.Sequential)
    with torch.no_grad():
        head.mu.weight.zero_()
        head.mu.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    fs, ft = torch.zeros(2, 2), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    var = 5.0
    per_row = []
    for t in ft.tolist():
        terms = [0.5 * math.log(var) + (tc - mc) ** 2 / (2 * var) for tc, mc in zip(t, [1.0, 0.0, -1.0], strict=True)]
        per_row.append(sum(terms) / 3)
    assert head(fs, ft).item() == pytest.approx(sum(per_row) / 2, rel=1e-5)


def test_vid_is_learnable_and_masks_tokens() -> None:
    torch.manual_seed(0)
    fs = _randn(110, 32, 6)
    ft = fs @ _randn(111, 6, 4) + 0.5  # t is a linear function of s: mu can fit it, sigma can shrink
    head = VIDHead(6, 4)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = head(fs, ft).item()
    for _ in range(30):
        opt.zero_grad()
        loss = head(fs, ft)
        loss.backward()
        opt.step()
    assert head(fs, ft).item() < first - 0.5
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s3, t3 = _randn(112, 2, 3, 6), _randn(113, 2, 3, 4)
    assert head(_padding_changed(s3, mask, 114), _padding_changed(t3, mask, 115), mask).item() == pytest.approx(
        head(s3, t3, mask).item(), rel=1e-6
    )


# --- 2.5 CRD (in-batch) ----------------------------------------------------------------------------


def test_crd_near_zero_for_identical_embeddings_at_low_temperature() -> None:
    f = F.normalize(_randn(120, 8, 64), dim=-1)
    ident = torch.nn.Identity()
    assert crd_in_batch(f, f.clone(), torch.arange(8), ident, ident, temperature=0.02).item() < 1e-4
    assert crd_in_batch(f, _randn(121, 8, 64), torch.arange(8), ident, ident, temperature=0.02).item() > 1.0


def test_crd_same_label_pairs_are_not_negatives_hand_computed() -> None:
    s = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    t = [[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]
    tau = 0.5
    logit = [[sum(a * b for a, b in zip(si, tj, strict=True)) / tau for tj in t] for si in s]

    def nce(i: int, cols: list[int]) -> float:
        return -logit[i][i] + math.log(sum(math.exp(logit[i][j]) for j in cols))

    ident = torch.nn.Identity()
    # labels [0, 0, 1]: rows 0 and 1 share a class, so each drops the other from its negatives
    expected = (nce(0, [0, 2]) + nce(1, [1, 2]) + nce(2, [0, 1, 2])) / 3
    got = crd_in_batch(torch.tensor(s), torch.tensor(t), torch.tensor([0, 0, 1]), ident, ident, tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # without labels every other column is a negative
    expected = sum(nce(i, [0, 1, 2]) for i in range(3)) / 3
    got = crd_in_batch(torch.tensor(s), torch.tensor(t), None, ident, ident, tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_crd_trains_projections_not_teacher() -> None:
    fs, ft = _randn(122, 4, 5).requires_grad_(True), _randn(123, 4, 3).requires_grad_(True)
    ps, pt = Projection(5, 6), Projection(3, 6)
    crd_in_batch(fs, ft, torch.tensor([0, 1, 0, 1]), ps, pt).backward()
    assert fs.grad is not None and ps.linear.weight.grad is not None and pt.linear.weight.grad is not None
    assert ft.grad is None


# --- 3.3 CKA ---------------------------------------------------------------------------------------


def test_linear_cka_hand_computed() -> None:
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[1.0], [0.0], [2.0]])
    # 1-D linear CKA is the squared Pearson correlation: centred x (-1, 0, 1), y (0, -1, 1): r = 1 / sqrt(2 * 2)
    assert linear_cka(x, y) == pytest.approx(0.25, rel=1e-12)


def test_linear_cka_invariances_and_widths() -> None:
    x = _randn(130, 40, 8)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(_randn(131, 8, 8))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    y = _randn(132, 40, 5)  # different width, independent
    c = linear_cka(x, y)
    assert 0.0 < c < 0.6
    assert linear_cka(x @ q * 3.0, y) == pytest.approx(c, rel=1e-6)  # x @ q is float32 arithmetic
    assert linear_cka(x.numpy(), y) == pytest.approx(c, rel=1e-12)
    with pytest.raises(ValueError, match="examples"):
        linear_cka(x, y[:10])


def test_cka_matrix_shape_and_mean_pool() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_pool(h, mask).tolist() == [[2.0, 3.0], [5.0, 6.0]]
    teacher = [_randn(140 + i, 20, 6) for i in range(3)]
    student = [teacher[0], _randn(150, 20, 4)]
    m = cka_matrix(teacher, student)
    assert m.shape == (3, 2)
    assert m[0, 0] == pytest.approx(1.0, abs=1e-12) and m[1, 0] < 1.0


# --- masks -----------------------------------------------------------------------------------------


def test_masked_mean_selects_real_entries_so_non_finite_padding_never_matters() -> None:
    x = torch.tensor([[1.0, 2.0, math.nan], [4.0, math.inf, -math.inf]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = masked_mean(x, mask)
    assert got.item() == pytest.approx(7 / 3)
    got.backward()
    assert x.grad is not None  # padding gets exactly no gradient, even where it is NaN / inf
    assert x.grad.flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0, 0.0])
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # nothing real: 0, not NaN
    assert masked_mean(x[:, :1], None).item() == pytest.approx(2.5)
    # a (B, 1, T) mask broadcast over heads: each head has the same real entries
    heads = torch.stack([x.detach(), 2 * x.detach()], dim=1)  # (B, 2, T)
    assert masked_mean(heads, mask[:, None, :]).item() == pytest.approx(7 / 3 * 1.5)
    assert masked_sum(heads, mask[:, None, :], dim=-1).tolist() == [[3.0, 6.0], [4.0, 8.0]]


def test_mean_pool_ignores_non_finite_padding() -> None:
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [math.nan, math.inf]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    assert mean_pool(h[:, :2], None).tolist() == [[2.0, 3.0]]
