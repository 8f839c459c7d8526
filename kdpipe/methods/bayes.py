"""Bayesian distillation: a Gaussian teacher posterior, conditioned into a Gaussian prior for the student.

Grabovoy & Strijov 2021; Ignashin 2024. The teacher posterior is `p(u | D) = N(m, S)`, with m the teacher's own
parameters (its last iterate). A student built by removing layers or neurons is an alignment transform psi of the
teacher: the teacher's coordinates split into `xi1` (the output projections of a removed block, which makes the block
the identity when they are 0), `xi2` (the rest of a removed block, irrelevant once xi1 = 0: marginalised out) and `v`
(kept: the student's parameters). Conditioning on xi1 = 0 and marginalising xi2 gives the student prior

    p(v | D) = N(mu, Xi),
    mu = m_v + S_{v,xi1} S_{xi1,xi1}^{-1} (0 - m_{xi1}),
    Xi = S_vv - S_{v,xi1} S_{xi1,xi1}^{-1} S_{xi1,v},

and distillation adds the prior term `1/2 (w - mu)^T Xi^{-1} (w - mu) / n_data` (per-example scale) to the data loss,
starting the student at w = mu.

Two posteriors, both of the form S = diag(var) + A A^T (A: P x K, K = 0 for the diagonal one):

* `laplace_diagonal`: diagonal Laplace with the empirical Fisher F = mean_i g_i^2 (g_i the per-example gradient of
  the NLL), precision = n_data * F + prior_precision, var = 1 / precision.
* `swag` (Maddox et al. 2019): SGD iterates theta_1..theta_T from the teacher's weights; with theta_bar their mean,
  Sigma_diag = E[theta^2] - E[theta]^2 and Sigma_lr = D D^T / (K - 1), D = the last K deviations theta_i - theta_bar.
  SWAG's covariance is 1/2 (Sigma_diag + Sigma_lr): var = Sigma_diag / 2, A = D / sqrt(2 (K - 1)).

`condition` works without ever forming a dense matrix. Diagonal S: mu = m_v and Xi = diag(var_v). Low rank, with
A1 / Av the rows of A for xi1 / v, D1 the variances of xi1 and C = I_K + A1^T D1^{-1} A1 (Woodbury):

    S_{xi1,xi1}^{-1} = D1^{-1} - D1^{-1} A1 C^{-1} A1^T D1^{-1},   S_{v,xi1} = Av A1^T   (v, xi1 disjoint, D diagonal)
    mu = m_v - Av C^{-1} A1^T D1^{-1} m1,   Xi = Dv + Av C^{-1} Av^T = Dv + B B^T,   B = Av L^{-T},  C = L L^T,

(since A1^T S11^{-1} A1 = I - C^{-1}). Cost: O(|xi1| K^2 + K^3 + |v| K) time, O((|xi1| + |v|) K) memory; the K x K
algebra runs in float64. `Prior.penalty` uses the same identity: with z = B^T Dv^{-1} r and C' = I + B^T Dv^{-1} B,
r^T Xi^{-1} r = r^T Dv^{-1} r - z^T C'^{-1} z.
"""

from __future__ import annotations

import copy
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe.errors import ConfigError, ModelError, TrainingDivergedError, did_you_mean

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], Tensor]
VAR_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------- files


def _write(path: str | Path, groups: dict[str, dict[str, Tensor]], meta: dict[str, Any], half_factor: bool) -> Path:
    """One safetensors file: `<group>/<name>` tensors; `meta` as JSON strings in the header."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for group, named in groups.items():
        for name, t in named.items():
            t = t.detach().cpu()
            if group == "factor" and half_factor:
                scale = t.abs().amax(dim=0).clamp_min(1e-30).float()  # per column: fp16 keeps 3 digits of each
                tensors[f"factor_scale/{name}"] = scale.contiguous()
                t = (t.float() / scale).half()
            tensors[f"{group}/{name}"] = t.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def _read(path: str | Path, what: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The groups and metadata `_write` stored, checked: present, readable, every value finite."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no {what} file there", f"write one first (kdpipe.methods.bayes: {what}.save)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except Exception as e:  # safetensors raises its own and OS errors; json raises ValueError
        raise ModelError(f"{path}: not a readable {what} file ({e})", "write it again") from e
    groups: dict[str, dict[str, Tensor]] = {"mean": {}, "var": {}, "factor": {}, "factor_scale": {}}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise ModelError(f"{path}: unexpected tensor '{key}' in a {what} file", "write it again")
        if not torch.isfinite(t).all():
            raise ModelError(f"{path}: parameter '{name}' has a non-finite {group} (NaN/inf)", "write it again")
        groups[group][name] = t
    for name, scale in groups.pop("factor_scale").items():
        groups["factor"][name] = groups["factor"][name].float() * scale
    if "n_data" not in meta or set(groups["mean"]) != set(groups["var"]):
        raise ModelError(f"{path}: an incomplete {what} file (no n_data, or means without variances)", "write again")
    return groups, meta


def _check_shapes(mean: dict[str, Tensor], var: dict[str, Tensor], factor: dict[str, Tensor] | None, who: str) -> None:
    """Same names and shapes for mean and var; factor rows = numel, one rank for all."""
    if set(mean) != set(var):
        raise ModelError(f"{who}: mean and var name different parameters", "build it again")
    ranks = set()
    for name, m in mean.items():
        if var[name].shape != m.shape:
            raise ModelError(f"{who}: '{name}' has var shape {tuple(var[name].shape)}, mean {tuple(m.shape)}", "")
        if not (torch.isfinite(m).all() and torch.isfinite(var[name]).all()):
            raise ModelError(f"{who}: '{name}' has a non-finite mean or variance (NaN/inf)", "build it again")
        if (var[name] <= 0).any():
            raise ModelError(f"{who}: '{name}' has a non-positive variance", "build it again")
        if factor is not None:
            if name not in factor or factor[name].ndim != 2 or factor[name].shape[0] != m.numel():
                raise ModelError(f"{who}: '{name}' has no factor of shape ({m.numel()}, K)", "build it again")
            ranks.add(factor[name].shape[1])
    if len(ranks) > 1:
        raise ModelError(f"{who}: the factor has different ranks across parameters ({sorted(ranks)})", "")


# ------------------------------------------------------------------------------------------------------- posterior


@dataclass(eq=False)
class Posterior:
    """The teacher posterior N(m, S), S = diag(var) + A A^T, per teacher parameter name."""

    kind: str  # "diagonal" | "swag"
    mean: dict[str, Tensor]  # the teacher's own weights, float32
    var: dict[str, Tensor]  # diagonal variances, same shapes
    factor: dict[str, Tensor] | None  # name -> (numel, K) rows of A; None for a diagonal posterior
    n_data: int  # training examples the posterior was fitted on: the prior term is divided by it
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_shapes(self.mean, self.var, self.factor, f"{self.kind} posterior")

    @property
    def rank(self) -> int:
        """K, the columns of the low-rank factor (0 for a diagonal posterior)."""
        if not self.factor:
            return 0
        return int(next(iter(self.factor.values())).shape[1])

    @property
    def numel(self) -> int:
        """P, the number of teacher coordinates in scope."""
        return sum(m.numel() for m in self.mean.values())

    @property
    def names(self) -> list[str]:
        """The teacher parameter names in scope, in order."""
        return list(self.mean)

    def save(self, path: str | Path, half_factor: bool = False) -> Path:
        """One safetensors file; `half_factor` stores A in float16 (per-column scaled), about half the bytes."""
        groups = {"mean": self.mean, "var": self.var, "factor": self.factor or {}}
        meta = {"kind": self.kind, "rank": self.rank, "n_data": self.n_data, "meta": self.meta}
        return _write(path, groups, meta, half_factor)

    @classmethod
    def load(cls, path: str | Path) -> Posterior:
        """Read a `save`d posterior; a missing, corrupt or non-finite file is a ModelError."""
        groups, meta = _read(path, "posterior")
        if meta.get("kind") not in ("diagonal", "swag"):
            raise ModelError(f"{path}: a {meta.get('kind')} file, not a teacher posterior", "use Prior.load")
        return cls(
            kind=str(meta.get("kind", "diagonal")),
            mean=groups["mean"],
            var=groups["var"],
            factor=groups["factor"] or None,
            n_data=int(meta["n_data"]),
            meta=dict(meta.get("meta", {})),
        )


def _scope(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """The parameters in scope: `names`, or every trainable floating parameter."""
    params = dict(model.named_parameters())
    if names is None:
        return {n: p for n, p in params.items() if p.requires_grad and p.is_floating_point()}
    chosen = {}
    for n in names:
        if n not in params:
            raise ModelError(f"the model has no parameter '{n}'", did_you_mean(n, list(params)))
        chosen[n] = params[n]
    if not chosen:
        raise ConfigError("no parameters in scope for the posterior", "pass at least one name, or names=None")
    return chosen


def _snapshot(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}


# --------------------------------------------------------------------------------------------------------- laplace


class _LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module, so torch.func.functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.model, batch)


def _split(batch: Batch) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
    """(examples, the per-example tensors, the rest): tensors whose first dim is the batch size are sliced."""
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.ndim > 0]
    if not sizes:
        raise ConfigError("a batch has no tensor with a batch dimension", "batches are dicts of [batch, ...] tensors")
    n = sizes[0]
    sliced = {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n}
    return n, sliced, {k: v for k, v in batch.items() if k not in sliced}


def _sq_grads_vmap(
    wrapper: _LossModule, params: dict[str, Tensor], sliced: dict[str, Tensor], static: dict[str, Any]
) -> dict[str, Tensor]:
    """Sum over the examples of the squared per-example gradients, all at once with vmap(grad)."""
    from torch.func import functional_call, grad, vmap

    def one(p: dict[str, Tensor], example: dict[str, Tensor]) -> Tensor:
        batch = {**static, **{k: v.unsqueeze(0) for k, v in example.items()}}
        return functional_call(wrapper, {f"model.{n}": t for n, t in p.items()}, (batch,))

    g = vmap(grad(one), in_dims=(None, 0))(params, sliced)
    return {n: g[n].float().pow(2).sum(0) for n in params}


def _sq_grads_loop(
    wrapper: _LossModule, params: dict[str, Tensor], sliced: dict[str, Tensor], static: dict[str, Any], n: int
) -> dict[str, Tensor]:
    """The same sum, one example at a time (any model, n backward passes)."""
    from torch.func import functional_call

    live = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    out = {k: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for k, t in params.items()}
    for i in range(n):
        batch = {**static, **{k: v[i : i + 1] for k, v in sliced.items()}}
        loss = functional_call(wrapper, {f"model.{k}": t for k, t in live.items()}, (batch,))
        grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        for acc, g in zip(out.values(), grads, strict=True):
            if g is not None:
                acc += g.float().pow(2)
    return out


def _fisher(
    model: nn.Module, scope: dict[str, nn.Parameter], batches: Iterable[Batch], loss_fn: LossFn, cap: int, how: str
) -> tuple[dict[str, Tensor], int, str]:
    """The diagonal empirical Fisher (mean of squared per-example gradients), examples used, the method used."""
    wrapper = _LossModule(model, loss_fn)
    params = {n: p.detach() for n, p in scope.items()}
    total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    seen = 0
    for batch in batches:
        n, sliced, static = _split(batch)
        n = min(n, cap - seen)
        sliced = {k: v[:n] for k, v in sliced.items()}
        sq = None
        if how in ("auto", "vmap"):
            try:
                sq = _sq_grads_vmap(wrapper, params, sliced, static)
                how = "vmap"
            except Exception:  # data-dependent control flow, .item(), in-place ops...: vmap cannot run this model
                if how == "vmap":
                    raise
                how = "loop"
        if sq is None:
            sq = _sq_grads_loop(wrapper, params, sliced, static, n)
        for k in total:
            total[k] += sq[k]
        seen += n
        if seen >= cap:
            break
    if seen == 0:
        raise ConfigError("no examples to fit the posterior on", "pass at least one non-empty batch")
    return {k: t / seen for k, t in total.items()}, seen, how


def laplace_diagonal(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    n_data: int,
    prior_precision: float = 1.0,
    max_examples: int = 2048,
    names: Iterable[str] | None = None,
    per_example: str = "auto",
) -> Posterior:
    """Diagonal Laplace: var = 1 / (n_data * F + prior_precision), F the diagonal empirical Fisher.

    `loss_fn(model, batch)` returns the MEAN NLL of a batch (a dict of tensors, already on the model's device); it is
    called on one-example slices `{k: v[i:i+1]}` of every tensor whose first dim is the batch size (other entries are
    passed as they are), so on a single example it is that example's NLL. The model runs in eval mode (no dropout).
    `per_example`: "vmap" (torch.func, one pass per batch), "loop" (one backward per example) or "auto" (vmap, else
    the loop: HF models with data-dependent masking code fall back). At most `max_examples` examples are used.
    The model is unchanged: its parameters are swapped functionally, no .grad is written, its mode is restored.
    """
    if n_data < 1 or prior_precision <= 0 or max_examples < 1:
        raise ConfigError(
            "laplace_diagonal needs n_data >= 1, max_examples >= 1 and prior_precision > 0",
            "prior_precision bounds the variance of a parameter the data says nothing about",
        )
    if per_example not in ("auto", "vmap", "loop"):
        raise ConfigError(f"per_example must be auto, vmap or loop, not '{per_example}'", "")
    scope = _scope(model, names)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            fisher, seen, how = _fisher(model, scope, batches, loss_fn, max_examples, per_example)
    finally:
        model.train(was_training)
    var = {n: (1.0 / (n_data * f + prior_precision)).cpu() for n, f in fisher.items()}
    meta = {"method": "laplace_diagonal", "examples": seen, "per_example": how, "prior_precision": prior_precision}
    return Posterior("diagonal", _snapshot(scope), var, None, n_data, meta)


# ------------------------------------------------------------------------------------------------------------ swag


def _stream(batches: Iterable[Batch]) -> Iterator[Batch]:
    """The batches, again and again (a one-shot iterator that runs dry is an error, not a silent stop)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ConfigError("swag ran out of batches", "pass a re-iterable (a list or a DataLoader), not a generator")


@dataclass
class _Moments:
    """Running sums of d = theta - theta_0 (shifted, so float32 loses little) and the last K deviations."""

    start: dict[str, Tensor]
    rank: int
    count: int = 0
    s1: dict[str, Tensor] = field(default_factory=dict)
    s2: dict[str, Tensor] = field(default_factory=dict)
    last: deque[dict[str, Tensor]] = field(default_factory=deque)

    def collect(self, params: Mapping[str, Tensor]) -> None:
        d = {n: p.detach().float() - self.start[n] for n, p in params.items()}
        for n, t in d.items():
            self.s1[n] = self.s1.get(n, torch.zeros_like(t)) + t
            self.s2[n] = self.s2.get(n, torch.zeros_like(t)) + t * t
        if self.rank:
            self.last.append({n: t.flatten().cpu() for n, t in d.items()})
            while len(self.last) > self.rank:
                self.last.popleft()
        self.count += 1

    def finish(self, halve: bool) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        half = 0.5 if halve else 1.0
        mean = {n: t / self.count for n, t in self.s1.items()}
        var = {n: (half * (self.s2[n] / self.count - m * m)).clamp_min(VAR_EPS).cpu() for n, m in mean.items()}
        if not self.rank:
            return var, None
        scale = math.sqrt((2.0 if halve else 1.0) * (self.rank - 1))
        factor = {
            n: torch.stack([snap[n] - m.flatten().cpu() for snap in self.last], dim=1) / scale for n, m in mean.items()
        }
        return var, factor


def _check_swag(lr: float, steps: int, rank: int, collect_every: int, n_data: int) -> None:
    snaps = steps // max(collect_every, 1)
    if lr <= 0 or steps < 1 or collect_every < 1 or n_data < 1:
        raise ConfigError("swag needs lr > 0, steps >= 1, collect_every >= 1, n_data >= 1", "")
    if rank == 1 or rank < 0:
        raise ConfigError(f"swag rank must be 0 (diagonal only) or >= 2, not {rank}", "the factor divides by rank-1")
    if snaps < max(2, rank):
        raise ConfigError(
            f"swag collects {snaps} iterates (steps {steps} // collect_every {collect_every}), fewer than "
            f"max(2, rank={rank})",
            "raise steps or lower collect_every",
        )


def swag(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    n_data: int,
    lr: float,
    steps: int,
    rank: int,
    collect_every: int,
    names: Iterable[str] | None = None,
    weight_decay: float = 0.0,
    prior_precision: float = 0.0,
    momentum: float = 0.0,
    halve: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Posterior:
    """SWAG (Maddox et al. 2019) around the model's weights: SGD on a deep copy, an iterate every `collect_every`.

    Only the parameters in scope are trained (the others are held fixed). `loss_fn(model, batch)` is the mean
    training loss of a batch; the batches are cycled for `steps` SGD steps (in train mode). The SGD objective adds
    weight decay `weight_decay + prior_precision / n_data` (a N(0, 1/prior_precision) prior, per example).
    `halve=True` is SWAG's 1/2 (Sigma_diag + Sigma_lowrank); False keeps both at full scale (S = Sigma_diag +
    Sigma_lowrank). `progress(step)` is called after every step.

    The posterior's MEAN is the ORIGINAL model's weights, not the SWA average: the theorem's m is the teacher's
    last iterate, the student must start at the teacher's kept weights (those the teacher's accuracy was measured
    with), and SWAG only estimates the shape of the posterior around them. The caller's model is unchanged.
    """
    _check_swag(lr, steps, rank, collect_every, n_data)
    scope = _scope(model, names)
    work = copy.deepcopy(model).train()
    live = dict(work.named_parameters())
    for n, p in live.items():
        p.requires_grad_(n in scope)
    params = {n: live[n] for n in scope}
    decay = weight_decay + prior_precision / n_data
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum, weight_decay=decay)
    moments = _Moments({n: p.detach().float().clone() for n, p in params.items()}, rank)
    for step, batch in zip(range(1, steps + 1), _stream(batches), strict=False):
        loss = loss_fn(work, batch)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"swag: the loss is {loss.item()} at step {step}", "lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % collect_every == 0:
            moments.collect(params)
        if progress is not None:
            progress(step)
    var, factor = moments.finish(halve)
    meta = {"method": "swag", "lr": lr, "steps": steps, "collect_every": collect_every, "iterates": moments.count}
    return Posterior("swag", _snapshot(scope), var, factor, n_data, {**meta, "momentum": momentum, "halve": halve})


# ------------------------------------------------------------------------------------------------------- condition


@dataclass(frozen=True)
class Slot:
    """A student parameter cut from a teacher one: `teacher.flatten()[index].reshape(shape)` (index None: all)."""

    teacher: str
    index: Tensor | None
    shape: tuple[int, ...]


SlotLike = Slot | tuple[str, "Tensor | None", tuple[int, ...]]


def _masks(post: Posterior, xi1: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """xi1 as flat bool masks over the teacher tensors, checked against the posterior."""
    masks = {}
    for name, mask in xi1.items():
        if name not in post.mean:
            raise ModelError(f"xi1 names '{name}', which the posterior does not cover", did_you_mean(name, post.names))
        shape = post.mean[name].shape
        if mask is None:
            mask = torch.ones(shape, dtype=torch.bool)
        if mask.dtype != torch.bool or mask.shape != shape:
            raise ModelError(
                f"xi1 '{name}': need a bool mask of shape {tuple(shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        masks[name] = mask.flatten().cpu()
    return masks


def _slot(post: Posterior, student: str, raw: SlotLike) -> Slot:
    """One keep entry as a Slot with a flat LongTensor index, checked against the posterior."""
    slot = raw if isinstance(raw, Slot) else Slot(*raw)
    if slot.teacher not in post.mean:
        hint = did_you_mean(slot.teacher, post.names)
        raise ModelError(f"student '{student}' comes from '{slot.teacher}', which the posterior does not cover", hint)
    numel = post.mean[slot.teacher].numel()
    index = torch.arange(numel) if slot.index is None else slot.index.flatten().cpu()
    if index.is_floating_point() or index.dtype == torch.bool:
        raise ModelError(f"student '{student}': the index must be integer flat indices, not {index.dtype}", "")
    index = index.long()
    if index.numel() and (index.min() < 0 or index.max() >= numel):
        raise ModelError(f"student '{student}': an index is outside '{slot.teacher}' ({numel} entries)", "")
    if index.numel() != math.prod(slot.shape):
        raise ModelError(
            f"student '{student}': {index.numel()} teacher entries do not fill its shape {tuple(slot.shape)}", ""
        )
    return Slot(slot.teacher, index, tuple(slot.shape))


def _validate(
    post: Posterior, xi1: Mapping[str, Tensor | None], keep: Mapping[str, SlotLike]
) -> tuple[dict[str, Tensor], dict[str, Slot]]:
    """Flat masks and slots; no teacher coordinate both in xi1 and v, nor kept twice."""
    masks = _masks(post, xi1)
    claimed = {n: m.clone() for n, m in masks.items()}
    slots = {}
    for student, raw in keep.items():
        slot = _slot(post, student, raw)
        assert slot.index is not None
        seen = claimed.setdefault(slot.teacher, torch.zeros(post.mean[slot.teacher].numel(), dtype=torch.bool))
        if seen[slot.index].any() or torch.unique(slot.index).numel() != slot.index.numel():
            raise ConfigError(
                f"student '{student}' takes entries of '{slot.teacher}' that are also in xi1 or kept twice",
                "xi1 (conditioned to 0) and v (kept) must be disjoint",
            )
        seen[slot.index] = True
        slots[student] = slot
    return masks, slots


def _xi1_solve(post: Posterior, masks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(L, c): C = I + A1^T D1^{-1} A1 = L L^T and c = C^{-1} A1^T D1^{-1} m1, float64, O(|xi1| K^2 + K^3)."""
    assert post.factor is not None
    k = post.rank
    device = next(iter(post.factor.values())).device
    c_mat = torch.eye(k, dtype=torch.float64, device=device)
    g = torch.zeros(k, dtype=torch.float64, device=device)
    for name, mask in masks.items():
        mask = mask.to(device)
        a1 = post.factor[name][mask].double()
        d1 = post.var[name].flatten()[mask].double()
        m1 = post.mean[name].flatten()[mask].double()
        ad = a1 / d1[:, None]
        c_mat += a1.T @ ad
        g += ad.T @ m1
    chol = torch.linalg.cholesky(c_mat)
    return chol, torch.cholesky_solve(g[:, None], chol).squeeze(1)


def condition(post: Posterior, xi1: Mapping[str, Tensor | None], keep: Mapping[str, SlotLike]) -> Prior:
    """The student prior N(mu, Xi): condition the teacher posterior on xi1 = 0, keep v, marginalise the rest.

    `xi1`: teacher name -> bool mask of the entries set to 0 (None: the whole tensor). `keep`: student name ->
    Slot(teacher name, flat indices or None, student shape), or the same as a tuple. Diagonal posterior: mu = m_v,
    Xi = diag(var_v) exactly. Low rank: the Woodbury formulas of the module docstring, Xi = diag(var_v) + B B^T.
    """
    masks, slots = _validate(post, xi1, keep)

    def cut(source: dict[str, Tensor], slot: Slot) -> Tensor:
        assert slot.index is not None
        return source[slot.teacher].flatten()[slot.index.to(source[slot.teacher].device)]

    mean = {s: cut(post.mean, sl).reshape(sl.shape).clone() for s, sl in slots.items()}
    var = {s: cut(post.var, sl).reshape(sl.shape).clone() for s, sl in slots.items()}
    meta = {"posterior": post.kind, "xi1": sum(int(m.sum()) for m in masks.values()), "teacher_meta": post.meta}
    if post.factor is None or post.rank == 0:
        return Prior(mean, var, None, post.n_data, meta)
    chol, c = _xi1_solve(post, masks)
    factor = {}
    for s, sl in slots.items():
        assert sl.index is not None
        av = post.factor[sl.teacher][sl.index.to(post.factor[sl.teacher].device)].double()
        shift = (av @ c).reshape(sl.shape).to(mean[s].dtype)
        mean[s] = mean[s] - shift if masks else mean[s]
        b_t = torch.linalg.solve_triangular(chol, av.T, upper=False)  # L^{-1} Av^T: B = Av L^{-T}, B B^T = Av C^-1 Av^T
        factor[s] = b_t.T.to(post.factor[sl.teacher].dtype).contiguous()
    return Prior(mean, var, factor, post.n_data, meta)


def condition_dense(mean: Tensor, cov: Tensor, xi1_idx: Tensor, v_idx: Tensor) -> tuple[Tensor, Tensor]:
    """The textbook Gaussian conditioning on x[xi1] = 0, marginal over v (O(P^3); for tests and as documentation):
    mu = m_v - S_{v,1} S_{11}^{-1} m_1, Xi = S_vv - S_{v,1} S_{11}^{-1} S_{1,v}."""
    s_vv = cov[v_idx][:, v_idx]
    if xi1_idx.numel() == 0:
        return mean[v_idx].clone(), s_vv.clone()
    s_11 = cov[xi1_idx][:, xi1_idx]
    s_v1 = cov[v_idx][:, xi1_idx]
    sol = torch.linalg.solve(s_11, torch.cat([mean[xi1_idx][:, None], s_v1.T], dim=1))
    return mean[v_idx] - s_v1 @ sol[:, 0], s_vv - s_v1 @ sol[:, 1:]


def _shapes(obj: Any) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a module, a Posterior/Prior or a name -> tensor mapping."""
    if isinstance(obj, nn.Module):
        return {n: tuple(p.shape) for n, p in obj.named_parameters()}
    named = obj.mean if isinstance(obj, Posterior | Prior) else obj
    return {n: tuple(t.shape) for n, t in named.items()}


def student_slots(name_map: Mapping[str, str], student: Any, teacher: Any) -> dict[str, Slot]:
    """`keep` for layer removal: each student parameter is a whole teacher tensor of the same shape.

    `name_map`: student name -> teacher name (e.g. `encoder.layer.1.*` -> `encoder.layer.3.*`); student and teacher
    are modules, Posteriors or name -> tensor mappings.
    """
    s_shapes, t_shapes = _shapes(student), _shapes(teacher)
    slots = {}
    for s_name, t_name in name_map.items():
        if s_name not in s_shapes:
            raise ModelError(f"the student has no parameter '{s_name}'", did_you_mean(s_name, list(s_shapes)))
        if t_name not in t_shapes:
            raise ModelError(f"the teacher has no parameter '{t_name}'", did_you_mean(t_name, list(t_shapes)))
        if s_shapes[s_name] != t_shapes[t_name]:
            raise ModelError(
                f"student '{s_name}' {s_shapes[s_name]} and teacher '{t_name}' {t_shapes[t_name]} differ in shape",
                "layer removal keeps whole tensors; pass Slots with indices for neuron removal",
            )
        slots[s_name] = Slot(t_name, None, s_shapes[s_name])
    return slots


# ----------------------------------------------------------------------------------------------------------- prior


@dataclass(eq=False)
class Prior:
    """The student prior N(mu, Xi), Xi = diag(var) + B B^T, per STUDENT parameter name."""

    mean: dict[str, Tensor]
    var: dict[str, Tensor]
    factor: dict[str, Tensor] | None  # name -> (numel, K) rows of B; None: diagonal
    n_data: int
    meta: dict[str, Any] = field(default_factory=dict)
    _chol: dict[tuple[str, ...], Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_shapes(self.mean, self.var, self.factor, "prior")

    @property
    def rank(self) -> int:
        """K, the columns of B (0: diagonal)."""
        return 0 if not self.factor else int(next(iter(self.factor.values())).shape[1])

    @property
    def names(self) -> list[str]:
        """The student parameter names the prior covers."""
        return list(self.mean)

    def to(self, device: str | torch.device) -> Prior:
        """Move every tensor (in place; returns self)."""
        self.mean = {n: t.to(device) for n, t in self.mean.items()}
        self.var = {n: t.to(device) for n, t in self.var.items()}
        self.factor = None if self.factor is None else {n: t.to(device) for n, t in self.factor.items()}
        self._chol.clear()
        return self

    def _cholesky(self, names: tuple[str, ...]) -> Tensor:
        """L with L L^T = I + B^T D^{-1} B over `names` (the marginal of a subset is its rows), cached."""
        if names not in self._chol:
            assert self.factor is not None
            first = self.factor[names[0]]
            c_mat = torch.eye(self.rank, dtype=torch.float64, device=first.device)
            for n in names:
                b = self.factor[n].double()
                c_mat += b.T @ (b / self.var[n].flatten().double()[:, None])
            self._chol[names] = torch.linalg.cholesky(c_mat)
        return self._chol[names]

    def _residuals(self, params: Mapping[str, Tensor], strict: bool) -> dict[str, Tensor]:
        out = {}
        for n, w in params.items():
            if n not in self.mean:
                if strict:
                    raise ModelError(f"the prior has no parameter '{n}'", did_you_mean(n, self.names))
                continue
            if w.shape != self.mean[n].shape:
                raise ModelError(f"'{n}' has shape {tuple(w.shape)}, the prior {tuple(self.mean[n].shape)}", "")
            dtype = torch.promote_types(w.dtype, torch.float32)
            out[n] = (w.to(dtype) - self.mean[n].to(w.device, dtype)).flatten()
        if not out:
            raise ConfigError("penalty of no parameters: none of the names given is in the prior", "")
        return out

    def penalty(self, params: Mapping[str, Tensor], strict: bool = True) -> Tensor:
        """1/2 (w - mu)^T Xi^{-1} (w - mu) over the given parameters (Xi's marginal on them), differentiable in w.

        The raw quadratic form: divide by n_data (`per_example_penalty`) to add it to a mean per-example loss.
        `strict=False` ignores names the prior does not cover.
        """
        res = self._residuals(params, strict)
        quad: Tensor = sum((r * r / self.var[n].flatten().to(r)).sum(dtype=torch.float64) for n, r in res.items())  # type: ignore[assignment]
        if self.factor is not None and self.rank:
            names = tuple(sorted(res))
            chol = self._cholesky(names)
            z = sum((self.factor[n].to(r).T @ (r / self.var[n].flatten().to(r))).double() for n, r in res.items())
            y = torch.linalg.solve_triangular(chol, z[:, None], upper=False)  # type: ignore[index]
            quad = quad - (y * y).sum()
        out_dtype = torch.float64 if any(r.dtype == torch.float64 for r in res.values()) else torch.float32
        return (0.5 * quad).to(out_dtype)

    def per_example_penalty(self, params: Mapping[str, Tensor], strict: bool = True) -> Tensor:
        """`penalty / n_data`: on the scale of a mean per-example data loss."""
        return self.penalty(params, strict) / self.n_data

    def init_student(self, model: nn.Module) -> None:
        """Copy mu into the student's parameters of the same names (the student starts at the prior mean)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, m in self.mean.items():
                if n not in params or params[n].shape != m.shape:
                    raise ModelError(f"the student has no parameter '{n}' of shape {tuple(m.shape)}", "")
                params[n].copy_(m)

    def save(self, path: str | Path, half_factor: bool = False) -> Path:
        """One safetensors file, like `Posterior.save`."""
        groups = {"mean": self.mean, "var": self.var, "factor": self.factor or {}}
        return _write(
            path, groups, {"kind": "prior", "rank": self.rank, "n_data": self.n_data, "meta": self.meta}, half_factor
        )

    @classmethod
    def load(cls, path: str | Path) -> Prior:
        """Read a `save`d prior; a missing, corrupt or non-finite file is a ModelError."""
        groups, meta = _read(path, "prior")
        if meta.get("kind") != "prior":
            raise ModelError(f"{path}: a {meta.get('kind')} posterior file, not a student prior", "use Posterior.load")
        return cls(
            groups["mean"], groups["var"], groups["factor"] or None, int(meta["n_data"]), dict(meta.get("meta", {}))
        )
