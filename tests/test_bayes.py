"""kdpipe.methods.bayes: posteriors, conditioning against the dense textbook formulas, the Woodbury penalty, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdpipe.errors import ConfigError, ModelError
from kdpipe.methods.bayes import (
    Posterior,
    Prior,
    Slot,
    condition,
    condition_dense,
    laplace_diagonal,
    student_slots,
    swag,
)

# ------------------------------------------------------------------------------------------------- toy Gaussians

SHAPES = {"a": (2, 3), "b": (6,)}  # P = 12 over two "parameters"
OFFSET = {"a": 0, "b": 6}


def toy_posterior(rank: int = 3, seed: int = 0) -> tuple[Posterior, Tensor, Tensor]:
    """S = diag(d) + A A^T in float64, with its dense mean and covariance."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(12, generator=g, dtype=torch.float64)
    d = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    a = torch.randn(12, rank, generator=g, dtype=torch.float64)
    cov = torch.diag(d) + a @ a.T

    def split(t: Tensor) -> dict[str, Tensor]:
        return {n: t[OFFSET[n] : OFFSET[n] + torch.Size(s).numel()].reshape(s).clone() for n, s in SHAPES.items()}

    factor = {n: a[OFFSET[n] : OFFSET[n] + torch.Size(s).numel()].clone() for n, s in SHAPES.items()} if rank else None
    return Posterior("swag", split(m), split(d), factor, n_data=100), m, cov


def toy_split() -> tuple[dict[str, Tensor | None], dict[str, Slot], Tensor, Tensor]:
    """xi1: 2 entries of a, 1 of b; v: 3 of a (as a (3,) student) and 4 of b (as (2, 2)); a[5], b[5] dropped (xi2)."""
    mask_a = torch.zeros(2, 3, dtype=torch.bool)
    mask_a.view(-1)[[1, 3]] = True
    mask_b = torch.zeros(6, dtype=torch.bool)
    mask_b[0] = True
    keep = {
        "sa": Slot("a", torch.tensor([4, 0, 2]), (3,)),
        "sb": Slot("b", torch.tensor([1, 2, 3, 4]), (2, 2)),
    }
    xi1_idx = torch.tensor([1, 3, 6])
    v_idx = torch.tensor([4, 0, 2, 7, 8, 9, 10])
    return {"a": mask_a, "b": mask_b}, keep, xi1_idx, v_idx


def dense_xi(prior: Prior) -> Tensor:
    d = torch.cat([prior.var[n].flatten() for n in prior.names])
    xi = torch.diag(d)
    if prior.factor is not None:
        b = torch.cat([prior.factor[n] for n in prior.names])
        xi = xi + b @ b.T
    return xi


def test_low_rank_condition_matches_the_dense_formulas() -> None:
    post, m, cov = toy_posterior()
    xi1, keep, xi1_idx, v_idx = toy_split()
    prior = condition(post, xi1, keep)
    mu_ref, xi_ref = condition_dense(m, cov, xi1_idx, v_idx)
    mu = torch.cat([prior.mean[n].flatten() for n in prior.names])
    assert prior.names == ["sa", "sb"] and prior.mean["sb"].shape == (2, 2)
    assert prior.factor is not None and prior.factor["sa"].shape == (3, 3)
    torch.testing.assert_close(mu, mu_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_xi(prior), xi_ref, atol=1e-10, rtol=0)


def test_no_xi1_is_the_plain_marginal() -> None:
    post, m, cov = toy_posterior()
    _, keep, _, v_idx = toy_split()
    prior = condition(post, {}, keep)
    mu_ref, xi_ref = condition_dense(m, cov, torch.tensor([], dtype=torch.long), v_idx)
    torch.testing.assert_close(torch.cat([prior.mean[n].flatten() for n in prior.names]), mu_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(dense_xi(prior), xi_ref, atol=1e-10, rtol=0)


def test_condition_dense_on_a_general_spd_matrix() -> None:
    """Against the same conditional from the precision Q of the (xi1, v) marginal: covariance inv(Q_vv), mean
    m_v - inv(Q_vv) Q_{v,1} (0 - m_1)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 10, generator=g, dtype=torch.float64)
    cov = x @ x.T + 0.5 * torch.eye(10, dtype=torch.float64)
    m = torch.randn(10, generator=g, dtype=torch.float64)
    xi1_idx, v_idx = torch.tensor([0, 4, 7]), torch.tensor([1, 2, 5, 8, 9])  # 3 and 6 marginalised out
    mu, xi = condition_dense(m, cov, xi1_idx, v_idx)
    both = torch.cat([xi1_idx, v_idx])
    q = torch.linalg.inv(cov[both][:, both])
    q_vv, q_v1 = q[3:, 3:], q[3:, :3]
    xi_ref = torch.linalg.inv(q_vv)
    mu_ref = m[v_idx] - xi_ref @ q_v1 @ (0 - m[xi1_idx])
    torch.testing.assert_close(xi, xi_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(mu, mu_ref, atol=1e-10, rtol=0)


def test_diagonal_condition_keeps_the_teacher_weights_exactly() -> None:
    post, _, _ = toy_posterior(rank=0)
    xi1, keep, _, _ = toy_split()
    prior = condition(post, xi1, keep)
    assert prior.factor is None
    assert torch.equal(prior.mean["sa"], post.mean["a"].flatten()[[4, 0, 2]])
    assert torch.equal(prior.mean["sb"], post.mean["b"][1:5].reshape(2, 2))
    assert torch.equal(prior.var["sb"], post.var["b"][1:5].reshape(2, 2))


# ----------------------------------------------------------------------------------------------------- penalty


def test_woodbury_penalty_and_gradient_match_the_dense_quadratic_form() -> None:
    post, _, _ = toy_posterior()
    xi1, keep, _, _ = toy_split()
    prior = condition(post, xi1, keep)
    g = torch.Generator().manual_seed(2)
    params = {n: (prior.mean[n] + torch.randn(prior.mean[n].shape, generator=g, dtype=torch.float64)) for n in keep}
    params = {n: p.requires_grad_(True) for n, p in params.items()}
    r = torch.cat([(params[n] - prior.mean[n]).detach().flatten() for n in prior.names])
    inv = torch.linalg.inv(dense_xi(prior))
    value = prior.penalty(params)
    value.backward()
    torch.testing.assert_close(value.detach(), 0.5 * r @ inv @ r, atol=1e-10, rtol=1e-10)
    grad = torch.cat([params[n].grad.flatten() for n in prior.names])  # type: ignore[union-attr]
    torch.testing.assert_close(grad, inv @ r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(prior.per_example_penalty(params).detach(), value.detach() / 100)
    # a subset of the parameters: the marginal of Xi on them (its rows of B), cached separately
    sub = prior.penalty({"sb": params["sb"]}).detach()
    rb = r[3:]
    torch.testing.assert_close(sub, 0.5 * rb @ torch.linalg.inv(dense_xi(prior)[3:, 3:]) @ rb, atol=1e-10, rtol=1e-10)
    assert len(prior._chol) == 2


def test_penalty_rejects_unknown_names_unless_told_not_to() -> None:
    post, _, _ = toy_posterior()
    xi1, keep, _, _ = toy_split()
    prior = condition(post, xi1, keep)
    with pytest.raises(ModelError, match="'head.weight'"):
        prior.penalty({"head.weight": torch.zeros(2)})
    assert prior.penalty({**prior.mean, "head.weight": torch.zeros(2)}, strict=False).item() == 0.0


# --------------------------------------------------------------------------------------------------- tiny models


def regression_batches(n: int = 64, batch: int = 16) -> list[dict[str, Tensor]]:
    """y = 2 x0 - x1 + noise; x0 has std 3, x1 std 0.1: the weight on x0 has the far larger Fisher."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g) * torch.tensor([3.0, 0.1])
    y = x @ torch.tensor([2.0, -1.0]) + 0.3 * torch.randn(n, generator=g)
    return [{"x": x[i : i + batch], "y": y[i : i + batch]} for i in range(0, n, batch)]


def mse(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return 0.5 * (model(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor], training: bool) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training is training
    assert all(p.grad is None for p in model.parameters())


def test_laplace_diagonal_on_linear_regression() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1).train()
    before = state(model)
    post = laplace_diagonal(model, regression_batches(), mse, n_data=64, prior_precision=1.0)
    assert_unchanged(model, before, training=True)
    assert post.kind == "diagonal" and post.rank == 0 and post.numel == 3 and post.meta["examples"] == 64
    assert torch.equal(post.mean["weight"], before["weight"])
    for v in post.var.values():
        assert torch.isfinite(v).all() and (v > 0).all() and (v <= 1.0).all()
    assert post.var["weight"][0, 0] < post.var["weight"][0, 1] / 10  # large-variance input: larger Fisher


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def test_laplace_vmap_and_loop_agree_and_max_examples_caps() -> None:
    model = mlp()
    fast = laplace_diagonal(model, regression_batches(), mse, n_data=64, per_example="vmap")
    slow = laplace_diagonal(model, regression_batches(), mse, n_data=64, per_example="loop", names=["2.weight"])
    assert fast.meta["per_example"] == "vmap" and slow.names == ["2.weight"]
    torch.testing.assert_close(fast.var["2.weight"], slow.var["2.weight"], rtol=1e-5, atol=0)
    capped = laplace_diagonal(model, regression_batches(), mse, n_data=64, max_examples=20)
    assert capped.meta["examples"] == 20
    with pytest.raises(ModelError, match="'2.wieght'"):
        laplace_diagonal(model, regression_batches(), mse, n_data=64, names=["2.wieght"])


def test_swag_on_a_tiny_mlp_leaves_the_model_alone() -> None:
    model = mlp().eval()
    before = state(model)
    steps: list[int] = []
    post = swag(
        model, regression_batches(), mse, n_data=64, lr=0.01, steps=20, rank=4, collect_every=2, progress=steps.append
    )
    assert_unchanged(model, before, training=False)
    assert steps == list(range(1, 21)) and post.meta["iterates"] == 10
    assert post.rank == 4 and post.factor is not None
    for n, m in post.mean.items():
        assert torch.equal(m, before[n])
        assert post.factor[n].shape == (m.numel(), 4)
        assert (post.var[n] > 0).all()
    with pytest.raises(ConfigError, match="rank"):
        swag(model, regression_batches(), mse, n_data=64, lr=0.01, steps=20, rank=1, collect_every=2)
    with pytest.raises(ConfigError, match="ran out"):
        swag(model, iter(regression_batches()), mse, n_data=64, lr=0.01, steps=20, rank=2, collect_every=2)


# --------------------------------------------------------------------------------------------------------- files


def test_posterior_and_prior_round_trip(tmp_path: Path) -> None:
    post, _, _ = toy_posterior()
    post.meta = {"teacher": "toy"}
    back = Posterior.load(post.save(tmp_path / "post.safetensors"))
    assert back.kind == "swag" and back.n_data == 100 and back.meta == {"teacher": "toy"} and back.rank == 3
    assert back.factor is not None and post.factor is not None
    for n in post.names:
        assert torch.equal(back.mean[n], post.mean[n]) and torch.equal(back.var[n], post.var[n])
        assert torch.equal(back.factor[n], post.factor[n])
    half = Posterior.load(post.save(tmp_path / "half.safetensors", half_factor=True))
    assert half.factor is not None
    for n in post.names:
        torch.testing.assert_close(
            half.factor[n].double(), post.factor[n], rtol=0, atol=2e-3 * post.factor[n].abs().max()
        )
    xi1, keep, _, _ = toy_split()
    prior = condition(post, xi1, keep)
    again = Prior.load(prior.save(tmp_path / "prior.safetensors"))
    assert again.n_data == 100 and again.factor is not None and prior.factor is not None
    for n in prior.names:
        assert torch.equal(again.mean[n], prior.mean[n]) and torch.equal(again.factor[n], prior.factor[n])
    with pytest.raises(ModelError, match="not a teacher posterior"):
        Posterior.load(tmp_path / "prior.safetensors")


def test_a_planted_nan_or_a_corrupt_file_is_a_model_error(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Posterior("diagonal", {"w": torch.ones(3)}, {"w": torch.ones(3)}, None, 10).save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["var/w"][1] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match="'w' has a non-finite var"):
        Posterior.load(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="not a readable"):
        Posterior.load(tmp_path / "junk.safetensors")
    with pytest.raises(ModelError, match="no posterior file"):
        Posterior.load(tmp_path / "missing.safetensors")


def test_condition_rejects_bad_names_overlaps_and_shapes() -> None:
    post, _, _ = toy_posterior()
    xi1, keep, _, _ = toy_split()
    with pytest.raises(ModelError, match="'c'"):
        condition(post, {"c": None}, keep)
    with pytest.raises(ModelError, match="'zz'"):
        condition(post, xi1, {"s": Slot("zz", None, (6,))})
    with pytest.raises(ConfigError, match="also in xi1"):
        condition(post, xi1, {"s": Slot("a", torch.tensor([1]), (1,))})  # a[1] is in xi1
    with pytest.raises(ModelError, match="do not fill"):
        condition(post, xi1, {"s": ("b", torch.tensor([1, 2]), (3,))})
    with pytest.raises(ModelError, match="bool mask of shape"):
        condition(post, {"a": torch.ones(6, dtype=torch.bool)}, {})


# ------------------------------------------------------------------------------------------------ end to end


class Block(nn.Module):
    """x + out(tanh(inp(x))): with `out` at 0 the block is the identity."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, 6), nn.Linear(6, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out(torch.tanh(self.inp(x)))


class ResMLP(nn.Module):
    def __init__(self, blocks: int, d: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d) for _ in range(blocks)))
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def test_removing_a_residual_block_end_to_end() -> None:
    torch.manual_seed(0)
    teacher, student = ResMLP(2), ResMLP(1)
    x = regression_batches()[0]["x"]
    xi1: dict[str, Tensor | None] = {"blocks.1.out.weight": None, "blocks.1.out.bias": None}  # blocks.1.inp: xi2
    names = {n: n for n, _ in student.named_parameters()}  # blocks.0.* and head.* map to themselves
    keep = student_slots(names, student, teacher)
    for post in (
        laplace_diagonal(teacher, regression_batches(), mse, n_data=64),
        swag(teacher, regression_batches(), mse, n_data=64, lr=0.01, steps=12, rank=3, collect_every=2),
    ):
        prior = condition(post, xi1, keep)
        assert set(prior.names) == set(names) and prior.rank == post.rank
        prior.init_student(student)
        at_mu = dict(student.named_parameters())
        assert prior.penalty(at_mu).item() == 0.0
        moved = {n: p.detach() + 0.01 for n, p in at_mu.items()}
        assert prior.penalty(moved).item() > 0
    # diagonal: mu = the teacher's kept weights, and the student equals the teacher with blocks.1.out zeroed
    condition(laplace_diagonal(teacher, regression_batches(), mse, n_data=64), xi1, keep).init_student(student)
    with torch.no_grad():
        teacher.blocks[1].out.weight.zero_()
        teacher.blocks[1].out.bias.zero_()
        torch.testing.assert_close(student(x), teacher(x))
    with pytest.raises(ModelError, match="differ in shape"):
        student_slots({"head.weight": "blocks.0.inp.weight"}, student, teacher)
