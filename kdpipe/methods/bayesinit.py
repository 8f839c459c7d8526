"""Bayesian distillation in the pipeline (docs/methods.md §4): the teacher stage's posterior, the student
stage's `init: bayes` and the distill stage's `prior` term. The mathematics is kdpipe.methods.bayes; which
parameters are zeroed when a block goes is kdpipe.compress.surgery. This module only connects them to the stages.

- teacher stage, `teacher.posterior`: N(m, S) over the teacher's weights, fitted on the train split after
  fine-tuning, written to `posterior.safetensors` (m = the teacher's own weights).
- student stage, `init: bayes`: psi removes the blocks the student does not keep; the student starts at
  mu = m_v + S_{v,xi1} S_{xi1,xi1}^{-1} (0 - m_xi1) and its prior N(mu, Xi) is written to `prior.safetensors`.
- distill stage, loss term `prior`: (1 / n_data) * 1/2 (w - mu)^T Xi^{-1} (w - mu), the per-example share of the
  variational objective's KL term, on the parameters the prior covers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.artifacts.records import PosteriorInfo, PriorInfo
from kdpipe.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from rich.console import Console
    from torch import Tensor

    from kdpipe.config import PosteriorConfig
    from kdpipe.data.tables import Encoded

POSTERIOR_FILE = "posterior.safetensors"
PRIOR_FILE = "prior.safetensors"


def scope_names(model: Any, scope: str) -> list[str]:
    """The trainable parameters a posterior covers: every one ('all'), or those inside the model's stacks of
    transformer blocks ('layers': what removing a block conditions on; embeddings and head keep no prior)."""
    from kdpipe.compress import surgery

    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if scope == "all":
        return names
    prefixes = tuple(f"{s.path}." for s in surgery.stacks(model).values())
    inside = [n for n in names if _strip(n, model).startswith(prefixes) or n.startswith(prefixes)]
    if not inside:
        raise ModelError(
            f"teacher.posterior.scope=layers: no parameter of {type(model).__name__} lies in its stacks",
            "use teacher.posterior.scope: all",
        )
    return inside


def _strip(name: str, model: Any) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def classification_loss(model: Any, batch: Mapping[str, Any]) -> Tensor:
    """Mean cross-entropy of a sequence classifier on a labelled batch: the NLL the posterior is fitted to."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits.float(), batch["labels"])


def _batches(train: Encoded, size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Labelled train batches, reshuffled every pass, for as long as the estimator asks."""
    from kdpipe.data.tables import batches

    epoch = 0
    while True:
        yield from batches(train, size, shuffle=True, seed=seed + epoch)
        epoch += 1


def fit_posterior(model: Any, cfg: PosteriorConfig, train: Encoded, seed: int, console: Console) -> Any:
    """N(m, S) of the fine-tuned teacher on its train split (kdpipe.methods.bayes), the model unchanged."""
    from kdpipe.methods import bayes

    if train.labels is None or not len(train):
        raise ConfigError("teacher.posterior needs a labelled train split", "set teacher.data.label_column")
    names = scope_names(model, cfg.scope)
    n = len(train)
    what = (
        f"diagonal Laplace on {min(n, cfg.max_examples)} examples"
        if cfg.kind == "diagonal"
        else (f"SWAG, {cfg.steps} SGD steps, rank {cfg.rank}")
    )
    console.print(
        f"posterior: {what}, {sum(dict(model.named_parameters())[k].numel() for k in names) / 1e6:.1f}M params"
    )
    data = _batches(train, 32, seed)
    if cfg.kind == "diagonal":
        return bayes.laplace_diagonal(
            model, data, classification_loss, n, prior_precision=cfg.prior_precision,
            max_examples=cfg.max_examples, names=names,
        )  # fmt: skip
    return bayes.swag(
        model, data, classification_loss, n, lr=cfg.lr, steps=cfg.steps, rank=cfg.rank,
        collect_every=cfg.collect_every, names=names, prior_precision=cfg.prior_precision,
    )  # fmt: skip


def write_posterior(
    model: Any, cfg: PosteriorConfig, train: Encoded, seed: int, work: Path, console: Console
) -> PosteriorInfo:
    """fit_posterior, saved as the teacher stage's posterior.safetensors."""
    start = time.perf_counter()
    post = fit_posterior(model, cfg, train, seed, console)
    post.save(work / POSTERIOR_FILE, half_factor=cfg.factor_dtype == "float16")
    return PosteriorInfo(
        file=POSTERIOR_FILE,
        kind=cfg.kind,
        rank=post.rank,
        params=post.numel,
        n_data=post.n_data,
        seconds=round(time.perf_counter() - start, 1),
    )


def zeroed(teacher: Any, keep: dict[str, list[int]]) -> dict[str, None]:
    """psi's xi1: the output projections of every block a student built with `keep` does not have."""
    from kdpipe.compress import surgery

    out: dict[str, None] = {}
    for name, stack in surgery.stacks(teacher).items():
        for k in sorted(set(range(stack.size)) - set(keep.get(name, range(stack.size)))):
            out.update(dict.fromkeys(surgery.zeroed_params(teacher, name, k)))
    return out


def bayes_student(
    teacher: Any,
    keep: dict[str, list[int]],
    posterior: Path,
    work: Path,
    student: Any = None,
    ffn_keep: dict[int, list[int]] | None = None,
) -> tuple[Any, PriorInfo]:
    """The student with the teacher's `keep` blocks, moved to the conditional mean mu of the teacher's posterior
    given xi1 = 0; its prior N(mu, Xi) written to work/prior.safetensors.

    `student` / `ffn_keep`: a student already built from `keep` whose FFNs were then pruned (student layer i keeps
    the neurons ffn_keep[i] of the one stack): the removed neurons' output-projection columns join xi1, and the
    kept slices of the teacher's FFN tensors are the student's."""
    import torch

    from kdpipe.compress import surgery
    from kdpipe.methods import bayes

    post = bayes.Posterior.load(posterior)
    built, name_map = surgery.remove_layers(teacher, keep)
    student = built if student is None else student
    xi1: dict[str, Any] = {k: v for k, v in zeroed(teacher, keep).items() if k in post.mean}
    neurons, gone = _neuron_split(teacher, keep, ffn_keep or {})
    xi1.update({k: m for k, m in neurons.items() if k in post.mean})
    if not xi1:
        raise ModelError(
            f"{posterior}: the teacher's posterior covers none of the removed blocks' output projections",
            "re-run the teacher with teacher.posterior.scope: layers or all (kdpipe teacher --force)",
        )
    params = dict(student.named_parameters())
    slots = {
        s: bayes.Slot(t, torch.nonzero(~gone[t].flatten()).flatten() if t in gone else None, tuple(params[s].shape))
        for s, t in name_map.items()
        if t in post.mean
    }
    prior = bayes.condition(post, xi1, slots)
    with torch.no_grad():
        num = sum(float((prior.mean[n] - params[n]).double().pow(2).sum()) for n in prior.mean)
        den = sum(float(params[n].double().pow(2).sum()) for n in prior.mean)
        for n, mu in prior.mean.items():
            params[n].copy_(mu.to(params[n].dtype))
    prior.save(work / PRIOR_FILE)
    return student, PriorInfo(
        file=PRIOR_FILE,
        kind=post.kind,
        rank=prior.rank,
        params=sum(int(t.numel()) for t in prior.mean.values()),
        zeroed=sum(int(post.mean[k].numel() if m is None else m.sum()) for k, m in xi1.items()),
        shift=round((num / max(den, 1e-30)) ** 0.5, 8),
    )


def _neuron_split(
    teacher: Any, keep: dict[str, list[int]], ffn_keep: dict[int, list[int]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """psi for FFN neurons (docs/methods.md §4): (xi1 masks: the removed neurons' output-projection columns,
    masks of every entry a pruned teacher tensor loses: xi1 and xi2 together)."""
    from kdpipe.compress import surgery

    if not ffn_keep:
        return {}, {}
    (stack,) = keep
    width = int(teacher.config.intermediate_size)
    xi1: dict[str, Any] = {}
    gone: dict[str, Any] = {}
    for i, kept in ffn_keep.items():
        removed = sorted(set(range(width)) - set(kept))
        x1, x2 = surgery.ffn_neurons(teacher, stack, keep[stack][i], removed)
        xi1.update(x1)
        for name, mask in [*x1.items(), *x2.items()]:
            gone[name] = mask if name not in gone else gone[name] | mask
    return xi1, gone


class PriorPenalty:
    """The distill `prior` term's value for one student: penalty(w) / n_data on the covered parameters."""

    def __init__(self, path: Path, model: Any) -> None:
        from kdpipe.methods import bayes

        self.prior = bayes.Prior.load(path)
        self.model = model
        params = dict(model.named_parameters())
        missing = [n for n in self.prior.mean if n not in params]
        if missing:
            raise ModelError(
                f"{path}: the prior names {len(missing)} parameters the student lacks (e.g. {missing[0]})",
                "re-run the student stage (kdpipe student --force)",
            )
        self.device: Any = None

    def __call__(self) -> Tensor:
        params = dict(self.model.named_parameters())
        device = next(iter(params.values())).device
        if self.device != device:
            self.prior = self.prior.to(device)
            self.device = device
        return self.prior.penalty({n: params[n] for n in self.prior.mean}) / self.prior.n_data
