"""Token-level LM losses (kdpipe/losses/tokens.py) against hand computations on tiny written-out tensors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.losses import tokens as lt

# two tokens, V = 3, written out as probabilities; logits are their logs (+ a shift softmax ignores)
P_T = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # teacher
P_S = np.array([[0.4, 0.4, 0.2], [0.6, 0.3, 0.1]])  # student


def _logits(p: np.ndarray, shift: float = 0.0) -> torch.Tensor:
    return torch.tensor(np.log(p) + shift, dtype=torch.float32)[None]  # (1, T, V)


def _ones(t: int) -> torch.Tensor:
    return torch.ones(1, t, dtype=torch.bool)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row sum_v a_v log(a_v / b_v)."""
    return (a * np.log(a / b)).sum(-1)


def _jsd(p: np.ndarray, q: np.ndarray, beta: float) -> np.ndarray:
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


S, T = _logits(P_S, 1.5), _logits(P_T, -0.7)
M2 = _ones(2)
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "forward_kl": lt.forward_kl,
    "reverse_kl": lt.reverse_kl,
    "jsd": lambda s, t, m: lt.gkd_jsd(s, t, m, beta=0.3),
    "tvd": lt.tvd,
    "topk": lambda s, t, m: lt.topk_forward_kl(s, *lt.topk_compress(t, 2), m),
    "topk_reverse_kl": lambda s, t, m: lt.topk_reverse_kl(s, *lt.topk_compress(t, 2), m),
    "topk_jsd": lambda s, t, m: lt.topk_gkd_jsd(s, *lt.topk_compress(t, 2), m, beta=0.3),
    "topk_tvd": lambda s, t, m: lt.topk_tvd(s, *lt.topk_compress(t, 2), m),
}


def test_forward_and_reverse_kl_are_the_hand_values_and_differ() -> None:
    # first token by hand: 0.7 ln(0.7/0.4) + 0.2 ln(0.2/0.4) + 0.1 ln(0.1/0.2) = 0.183787
    assert _kl(P_T, P_S)[0] == pytest.approx(0.1837869, abs=1e-6)
    assert _kl(P_S, P_T)[0] == pytest.approx(0.1920420, abs=1e-6)
    fwd, rev = lt.forward_kl(S, T, M2).item(), lt.reverse_kl(S, T, M2).item()
    assert fwd == pytest.approx(_kl(P_T, P_S).mean(), rel=1e-5)  # KL(teacher || student)
    assert rev == pytest.approx(_kl(P_S, P_T).mean(), rel=1e-5)  # KL(student || teacher)
    assert abs(fwd - rev) > 1e-2  # an asymmetric example: the direction matters
    assert lt.forward_kl(S, T, M2).item() == pytest.approx(lt.reverse_kl(T, S, M2).item(), rel=1e-6)


def test_tau_squared_scaling_of_the_kl_terms_not_of_tvd() -> None:
    s, t = S[0].numpy(), T[0].numpy()
    p, q = _softmax(t / 2), _softmax(s / 2)
    assert lt.forward_kl(S, T, M2, 2.0).item() == pytest.approx(4 * _kl(p, q).mean(), rel=1e-5)
    assert lt.reverse_kl(S, T, M2, 2.0).item() == pytest.approx(4 * _kl(q, p).mean(), rel=1e-5)
    assert lt.gkd_jsd(S, T, M2, 0.5, 2.0).item() == pytest.approx(4 * 4 * _jsd(p, q, 0.5).mean(), rel=1e-5)
    assert lt.tvd(S, T, M2, 2.0).item() == pytest.approx((0.5 * np.abs(p - q).sum(-1)).mean(), rel=1e-5)


def test_jsd_at_beta_0_half_1_and_between() -> None:
    assert lt.gkd_jsd(S, T, M2, 0.0).item() == pytest.approx(_kl(P_T, P_S).mean(), rel=1e-5)  # forward
    assert lt.gkd_jsd(S, T, M2, 1.0).item() == pytest.approx(_kl(P_S, P_T).mean(), rel=1e-5)  # reverse
    # the symmetric JSD by hand on the first token: m = (p + q) / 2 = (0.55, 0.3, 0.15)
    m = np.array([0.55, 0.3, 0.15])
    hand = 0.5 * (0.7 * np.log(0.7 / 0.55) + 0.2 * np.log(0.2 / 0.3) + 0.1 * np.log(0.1 / 0.15))
    hand += 0.5 * (0.4 * np.log(0.4 / 0.55) + 0.4 * np.log(0.4 / 0.3) + 0.2 * np.log(0.2 / 0.15))
    assert hand == pytest.approx(_jsd(P_T[:1], P_S[:1], 0.5)[0]) and m.sum() == pytest.approx(1.0)
    sym = _jsd(P_T, P_S, 0.5).mean()
    assert lt.gkd_jsd(S, T, M2, 0.5, scaled=False).item() == pytest.approx(sym, rel=1e-5)
    assert lt.gkd_jsd(S, T, M2, 0.5).item() == pytest.approx(4 * sym, rel=1e-5)  # / (beta (1 - beta))
    assert lt.gkd_jsd(S, T, M2, 0.3).item() == pytest.approx(_jsd(P_T, P_S, 0.3).mean() / 0.21, rel=1e-5)


def test_scaled_jsd_is_continuous_at_the_kl_ends() -> None:
    fwd, rev = lt.forward_kl(S, T, M2).item(), lt.reverse_kl(S, T, M2).item()
    assert lt.gkd_jsd(S, T, M2, 1e-3).item() == pytest.approx(fwd, rel=1e-2)
    assert lt.gkd_jsd(S, T, M2, 1 - 1e-3).item() == pytest.approx(rev, rel=1e-2)
    assert lt.gkd_jsd(S, T, M2, 1e-3, scaled=False).item() < 1e-3 * fwd * 1.01  # TRL's form vanishes there


def test_unscaled_jsd_is_trls_generalized_jsd_loss() -> None:
    """TRL's formula, written out with F.kl_div(input, target, log_target=True) = KL(target || input)."""
    beta = 0.3
    ls, lp = F.log_softmax(S, -1), F.log_softmax(T, -1)
    b = torch.tensor(beta)
    log_m = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lp + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(log_m, lp, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, ls, reduction="none", log_target=True)
    trl = (beta * kl_teacher + (1 - beta) * kl_student).sum() / 2  # batchmean over B * T = 2 tokens
    assert lt.gkd_jsd(S, T, M2, beta, scaled=False).item() == pytest.approx(trl.item(), rel=1e-5)
    trl_fwd = F.kl_div(ls, lp, reduction="none", log_target=True).sum() / 2  # TRL's beta == 0 case
    assert lt.gkd_jsd(S, T, M2, 0.0, scaled=False).item() == pytest.approx(trl_fwd.item(), rel=1e-5)


def test_tvd_is_the_hand_value() -> None:
    assert 0.5 * np.abs(P_T[0] - P_S[0]).sum() == pytest.approx(0.3)
    assert lt.tvd(S, T, M2).item() == pytest.approx((0.5 * np.abs(P_T - P_S).sum(-1)).mean(), rel=1e-5)


def test_token_ce_shifts_and_ignores() -> None:
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [1e30, 0.0, 0.0]]])
    labels = torch.tensor([[5, 2, 0]])  # position 0 predicts 2, position 1 predicts 0, position 2 nothing
    z = s[0, :2].numpy()
    hand = -(np.log(_softmax(z[0])[2]) + np.log(_softmax(z[1])[0])) / 2
    assert lt.token_ce(s, labels).item() == pytest.approx(hand, rel=1e-5)
    prompt = torch.tensor([[5, -100, 0]])  # the label at 1 is prompt: only position 1 -> 0 counts
    assert lt.token_ce(s, prompt).item() == pytest.approx(-np.log(_softmax(z[1])[0]), rel=1e-5)
    assert lt.logit_mask(prompt).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="no unmasked token"):
        lt.token_ce(s, torch.tensor([[5, -100, -100]]))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("junk", [1e30, float("inf"), float("nan")])
def test_a_masked_token_changes_nothing(name: str, junk: float) -> None:
    loss = LOSSES[name]
    s3 = torch.cat([S, torch.full((1, 1, 3), junk)], dim=1)
    t3 = torch.cat([T, torch.tensor([[[junk, -junk, 0.0]]])], dim=1)
    m3 = torch.tensor([[True, True, False]])
    assert loss(s3, t3, m3).item() == pytest.approx(loss(S, T, M2).item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_an_all_masked_batch_is_an_error(name: str) -> None:
    with pytest.raises(ValueError, match="no unmasked token"):
        LOSSES[name](S, T, torch.zeros(1, 2, dtype=torch.bool))


def test_weighting_is_by_tokens_not_by_sequences() -> None:
    """Sequence A has 3 counted tokens, B has 1 (then padding): the loss is the mean of the 4 token values."""
    pt = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.8, 0.1, 0.1]])
    ps = np.array([[0.4, 0.4, 0.2], [0.25, 0.25, 0.5], [0.6, 0.2, 0.2], [0.2, 0.5, 0.3]])
    pad = np.full((2, 3), 1 / 3)
    s = torch.tensor(np.log(np.stack([ps[:3], np.concatenate([ps[3:], pad])])), dtype=torch.float32)
    t = torch.tensor(np.log(np.stack([pt[:3], np.concatenate([pt[3:], pad])])), dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token = _kl(pt, ps)
    got = lt.forward_kl(s, t, mask).item()
    assert got == pytest.approx(per_token.sum() / 4, rel=1e-5)
    assert got != pytest.approx((per_token[:3].mean() + per_token[3]) / 2, rel=1e-3)  # not a mean of means


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_are_finite_and_zero_on_masked_positions(name: str) -> None:
    s = torch.cat([S, torch.tensor([[[1e30, 0.0, -1e30]]])], dim=1).requires_grad_(True)
    t = torch.cat([T, torch.tensor([[[0.0, 1e30, 0.0]]])], dim=1)
    LOSSES[name](s, t, torch.tensor([[True, True, False]])).backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())
    assert s.grad[0, 2].abs().sum().item() == 0.0 and s.grad[0, :2].abs().sum().item() > 0


def test_ce_gradient_is_finite() -> None:
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [1e30, 0.0, 0.0]]], requires_grad=True)
    lt.token_ce(s, torch.tensor([[5, 2, 0]])).backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_nan_logits_on_a_counted_token_give_a_nan_loss(name: str) -> None:
    s = S.clone()
    s[0, 1, 0] = float("nan")
    assert torch.isnan(LOSSES[name](s, T, M2))
    t = T.clone()
    t[0, 0, 2] = float("nan")
    if name != "topk":  # topk's torch.topk places NaN first, but the loss is NaN all the same
        assert torch.isnan(LOSSES[name](S, t, M2))
    assert torch.isnan(lt.token_ce(s.flip(1), torch.tensor([[0, 1]])))  # position 0 (the NaN) predicts label 1


def test_bad_temperature_and_beta_fail_including_nan() -> None:
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            lt.forward_kl(S, T, M2, tau)
    for beta in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            lt.gkd_jsd(S, T, M2, beta)


def test_zero_teacher_probabilities_give_finite_terms() -> None:
    """p_v = 0 exactly (logit -inf) contributes 0, not 0 * log 0 = NaN."""
    t = torch.tensor([[[0.0, float("-inf"), 0.0]]])
    s = torch.tensor([[[0.0, 0.0, 0.0]]])
    assert lt.forward_kl(s, t, _ones(1)).item() == pytest.approx(np.log(1.5), rel=1e-5)  # 2 * 0.5 ln(0.5 / (1/3))
    assert lt.reverse_kl(s, t, _ones(1)).item() == float("inf")  # the student puts mass where the teacher has none


# --------------------------------------------------------------------------- top-k teacher
def test_topk_compress_is_the_caches_representation() -> None:
    from kdpipe.train.cache import topk_compress as cache_compress

    t = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    for a, b in zip(lt.topk_compress(t, 3), cache_compress(t, 3), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_with_k_equal_v_is_the_full_forward_kl(tau: float) -> None:
    full = lt.forward_kl(S, T, M2, tau).item()
    assert lt.topk_forward_kl(S, *lt.topk_compress(T, 3), M2, tau).item() == pytest.approx(full, rel=1e-5)


def _topk_case() -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    pt = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.1, 0.6, 0.25]])  # V = 4, k = 2
    ps = np.array([[0.4, 0.2, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    return pt, ps, torch.tensor(np.log(ps), dtype=torch.float32)[None], torch.tensor(np.log(pt))[None].float()


def test_topk_is_the_bucket_kl_by_hand_and_within_the_tail_bound() -> None:
    pt, ps, s, t = _topk_case()
    top = [[0, 1], [2, 3]]  # the teacher's two largest per token
    bucket = []
    for n, a in enumerate(top):
        p_b = np.append(pt[n, a], 1 - pt[n, a].sum())  # top-k + one tail bucket
        q_b = np.append(ps[n, a], 1 - ps[n, a].sum())
        bucket.append(_kl(p_b, q_b))
    got = lt.topk_forward_kl(s, *lt.topk_compress(t, 2), M2).item()
    assert got == pytest.approx(np.mean(bucket), rel=1e-5)
    # the gap to the full KL is r * KL(p(. | tail) || q(. | tail)) >= 0
    gap = []
    for n, a in enumerate(top):
        rest = [v for v in range(4) if v not in a]
        r, rq = pt[n, rest].sum(), ps[n, rest].sum()
        gap.append(r * _kl(pt[n, rest] / r, ps[n, rest] / rq))
    full = lt.forward_kl(s, t, M2).item()
    assert full - got == pytest.approx(np.mean(gap), rel=1e-4) and full >= got


def test_topk_gradient_is_within_twice_the_tail_mass_of_the_full_one() -> None:
    pt, _, s0, t = _topk_case()
    grads = []
    for fn in (lambda s: lt.forward_kl(s, t, M2), lambda s: lt.topk_forward_kl(s, *lt.topk_compress(t, 2), M2)):
        s = s0.clone().requires_grad_(True)
        fn(s).backward()
        assert s.grad is not None
        grads.append(s.grad[0] * 2)  # undo the mean over the 2 tokens: per-token gradients
    r = np.array([pt[0, 2:].sum(), pt[1, :2].sum()])
    l1 = (grads[0] - grads[1]).abs().sum(-1).numpy()
    assert np.all(l1 <= 2 * r + 1e-6) and np.all(l1 > 0)


def test_topk_tail_at_tau_is_the_caches_uniform_reconstruction() -> None:
    """A student whose logits are the cache's dense reconstruction matches the teacher's buckets at any tau."""
    from kdpipe.train.cache import reconstruct_logits

    _, _, _, t = _topk_case()
    values, indices, rest = lt.topk_compress(t, 2)
    dense = reconstruct_logits(values[0], indices[0], rest[0], 4)[None]
    assert lt.topk_forward_kl(dense, values, indices, rest, M2, 2.5).item() == pytest.approx(0.0, abs=1e-6)
    assert lt.topk_forward_kl(t, values, indices, rest, M2, 1.0).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- top-k reverse KL, JSD, TVD
DENSE = {
    "forward_kl": (lt.forward_kl, lt.topk_forward_kl),
    "reverse_kl": (lt.reverse_kl, lt.topk_reverse_kl),
    "tvd": (lt.tvd, lt.topk_tvd),
    "jsd_0.3": (
        lambda s, t, m, tau: lt.gkd_jsd(s, t, m, 0.3, tau),
        lambda s, *a: lt.topk_gkd_jsd(s, *a[:-1], beta=0.3, temperature=a[-1]),
    ),
    "jsd_0.5": (
        lambda s, t, m, tau: lt.gkd_jsd(s, t, m, 0.5, tau),
        lambda s, *a: lt.topk_gkd_jsd(s, *a[:-1], beta=0.5, temperature=a[-1]),
    ),
}


def _random_case(vocab: int = 9, tokens: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(2, tokens, vocab, generator=g)
    t = 2 * torch.randn(2, tokens, vocab, generator=g)
    mask = torch.ones(2, tokens, dtype=torch.bool)
    mask[1, -2:] = False  # padding
    return s, t, mask


@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_forms_with_k_v_minus_1_are_the_dense_forms(name: str, tau: float) -> None:
    """A one-token tail bucket is that token: every top-k form is its dense form, at any tau."""
    dense, top = DENSE[name]
    s, t, mask = _random_case()
    want = dense(s, t, mask, tau).item()
    assert top(s, *lt.topk_compress(t, 8), mask, tau).item() == pytest.approx(want, abs=1e-5)
    assert top(s, *lt.topk_compress(t, 9), mask, tau).item() == pytest.approx(want, abs=1e-5)  # k = V: no tail


@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_forms_with_a_tail_of_mass_0_are_the_dense_forms(name: str, tau: float) -> None:
    """The teacher's (and, for reverse KL, the student's: it weighs the student's tail by log q / p) tail logits far
    below the top-3: its tail mass is ~0 and the k + 1-bucket forms are the dense ones."""
    dense, top = DENSE[name]
    s, t, mask = _random_case()
    t[..., 3:] -= 1e4  # the teacher's top-3 are tokens 0-2, its tail mass ~0
    if name == "reverse_kl":
        s[..., 3:] -= 1e4
    values, indices, rest = lt.topk_compress(t, 3)
    assert sorted(indices[0, 0].tolist()) == [0, 1, 2]
    want = dense(s, t, mask, tau).item()
    assert top(s, values, indices, rest, mask, tau).item() == pytest.approx(want, abs=1e-5)


def test_topk_reverse_kl_by_hand_on_a_3_token_vocabulary() -> None:
    """V = 3, k = 1: buckets {top-1, tail of 2 tokens}; KL(q_b || p_b) by hand."""
    pt = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])  # teacher top-1: token 0, then token 1
    ps = np.array([[0.3, 0.2, 0.5], [0.4, 0.4, 0.2]])
    s, t = torch.tensor(np.log(ps)).float()[None], torch.tensor(np.log(pt)).float()[None]
    # token 1: p_b = (0.6, 0.4), q_b = (0.3, 0.7): 0.3 ln(0.3/0.6) + 0.7 ln(0.7/0.4) = 0.183787
    # token 2: p_b = (0.5, 0.5), q_b = (0.4, 0.6): 0.4 ln(0.4/0.5) + 0.6 ln(0.6/0.5) = 0.020136
    hand = (0.3 * np.log(0.3 / 0.6) + 0.7 * np.log(0.7 / 0.4) + 0.4 * np.log(0.4 / 0.5) + 0.6 * np.log(0.6 / 0.5)) / 2
    assert hand == pytest.approx((0.183787 + 0.020136) / 2, abs=1e-6)
    got = lt.topk_reverse_kl(s, *lt.topk_compress(t, 1), M2).item()
    assert got == pytest.approx(hand, rel=1e-5)
    assert got <= lt.reverse_kl(s, t, M2).item()  # the chain rule: the bucket form never exceeds the dense one
    assert lt.topk_reverse_kl(s, *lt.topk_compress(t, 1), M2, 2.0).item() > 0  # tau works (tail at tau)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_jsd_at_beta_0_and_1_is_topk_forward_and_reverse(tau: float) -> None:
    s, t, mask = _random_case()
    top = lt.topk_compress(t, 3)
    fwd, rev = lt.topk_forward_kl(s, *top, mask, tau).item(), lt.topk_reverse_kl(s, *top, mask, tau).item()
    assert lt.topk_gkd_jsd(s, *top, mask, 0.0, tau).item() == fwd
    assert lt.topk_gkd_jsd(s, *top, mask, 1.0, tau).item() == rev
    assert fwd != pytest.approx(rev, rel=1e-3)
    # continuous at the ends, like the dense scaled form
    assert lt.topk_gkd_jsd(s, *top, mask, 1e-3, tau).item() == pytest.approx(fwd, rel=5e-2)
    assert lt.topk_gkd_jsd(s, *top, mask, 1 - 1e-3, tau).item() == pytest.approx(rev, rel=5e-2)
    for beta in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            lt.topk_gkd_jsd(s, *top, mask, beta)


def test_topk_tvd_never_exceeds_the_dense_tvd() -> None:
    s, t, mask = _random_case()
    for k in range(1, 9):
        assert lt.topk_tvd(s, *lt.topk_compress(t, k), mask).item() <= lt.tvd(s, t, mask).item() + 1e-6


@pytest.mark.parametrize("name", ["topk", "topk_reverse_kl", "topk_jsd", "topk_tvd"])
def test_nan_in_the_cached_teacher_on_a_counted_token_gives_nan(name: str) -> None:
    fn = {"topk": lt.topk_forward_kl, "topk_reverse_kl": lt.topk_reverse_kl, "topk_tvd": lt.topk_tvd,
          "topk_jsd": lambda *a: lt.topk_gkd_jsd(*a, beta=0.3)}[name]  # fmt: skip
    values, indices, rest = lt.topk_compress(T, 2)
    for bad in (values.clone(), rest.clone()):
        bad.view(-1)[0] = float("nan")
        args = (bad, indices, rest) if bad.shape == values.shape else (values, indices, bad)
        assert torch.isnan(fn(S, *args, M2))
