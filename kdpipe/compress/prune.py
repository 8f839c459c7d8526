"""Structured width pruning of a BERT-family student: attention heads and FFN neurons, by importance.

Three steps, plus `prune()` doing all three:

1. `importance()` scores every head and every FFN neuron on a few labelled batches.
   Heads: Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): I_h = E_x |dL(x)/dxi_h|, where xi_h is
   an all-ones mask multiplied into head h's attention probabilities (HF's `head_mask`), then L2-normalised over the
   heads of each layer. FFN neurons: the first-order Taylor score |a_j * dL/da_j| of the intermediate activation a_j
   (the output of `layer.intermediate`, i.e. after the activation function), captured with forward hooks and summed
   over real tokens (attention_mask == 1) and examples.
2. `plan_pruning()` picks what to remove: heads ranked globally across layers (at least `min_heads` kept per layer),
   FFN neurons per layer with the SAME kept count in every layer (see `ffn_keep_count`).
3. `apply_pruning()` removes them: heads through HF's own `model.prune_heads` (recorded in `config.pruned_heads`,
   which `from_pretrained` re-applies, so uneven heads per layer round-trip), FFN neurons by slicing
   `intermediate.dense` (rows + bias) and `output.dense` (columns) and setting `config.intermediate_size`.

Why the same FFN width in every layer: HF configs have a single `intermediate_size` for all layers, so a model whose
layers keep different neuron counts could not be saved with `save_pretrained` and loaded back with
`from_pretrained`. Each layer still chooses WHICH neurons to keep from its own scores.

Only BERT-family encoders (BERT, RoBERTa, ELECTRA, MiniLM...: `model.base_model.encoder.layer[i]` with
`.attention.self`, `.attention.output.dense`, `.intermediate.dense`, `.output.dense`); anything else is a ModelError.
torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from kdpipe.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import PreTrainedModel

M = TypeVar("M", bound="PreTrainedModel")
# (model, batch on the model's device, head_mask (layers, B, heads, 1, 1)) -> the batch's summed per-example loss
LossFn = Callable[[Any, "dict[str, Tensor]", "Tensor"], "Tensor"]

FFN_MULTIPLE = 8  # kept FFN widths >= 8 are rounded to a multiple of 8: GEMM kernels like tile-aligned dims
_LAYER_PARTS = ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense")
_SUPPORTED = "structured pruning supports BERT-family encoders (BERT, RoBERTa, ELECTRA, MiniLM)"


@dataclass(frozen=True)
class Importance:
    """Scores, higher = more important.

    heads: (layers x heads) Michel et al. scores, L2-normalised over each layer's heads (a layer whose heads all
        score 0 stays all 0).
    ffn: (layers x intermediate_size) Taylor scores |a_j * dL/da_j| summed over real tokens and examples.
    """

    heads: list[list[float]]
    ffn: list[list[float]]


@dataclass(frozen=True)
class PruningPlan:
    """What to remove.

    heads_to_prune: layer -> sorted head indices to remove (layers losing no head are absent), as HF's
        `prune_heads` takes them.
    ffn_keep: layer -> sorted FFN neuron indices to KEEP; every layer keeps the same count (empty dict: FFN untouched).
    """

    heads_to_prune: dict[int, list[int]]
    ffn_keep: dict[int, list[int]]


def importance(
    model: PreTrainedModel, batches: Iterable[dict[str, Tensor]], max_batches: int, loss_fn: LossFn | None = None
) -> Importance:
    """Head and FFN-neuron importance on at most `max_batches` batches, model in eval mode (no dropout).

    Each batch: `input_ids` (B, T), `labels` (B,), optional `attention_mask` / `token_type_ids` (B, T); the loss is
    the model's own loss on `labels` (cross-entropy for classifiers). With `loss_fn` (model, batch, head_mask) ->
    the batch's SUMMED per-example loss, the objective is the caller's (e.g. an embedding MSE to a teacher's
    vectors): batches then need only `input_ids`, and every tensor in them travels to the model's device. The head
    mask is given per example, shape
    (layers, B, heads, 1, 1), so each example's |dL/dxi| is taken before summing (E_x |.|, not |E_x .|). Gradients
    are taken with `torch.autograd.grad` on the mask and activations only: no parameter `.grad` is written.
    The attention_mask keeps pad positions out of the FFN sums (in a CLS-pooled classifier they also get zero
    gradient; the mask guards other heads). The model's train/eval mode is restored afterwards.
    """
    import itertools

    import torch

    layers = _encoder_layers(model)
    n_heads = _unpruned_heads(model, layers)
    if max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1, got {max_batches}", "score on at least one batch")
    acts: list[Tensor] = []
    hooks = [layer.intermediate.register_forward_hook(lambda _m, _i, out: acts.append(out)) for layer in layers]
    was_training = model.training
    model.eval()
    head_sum: Tensor | None = None
    ffn_sum: Tensor | None = None
    examples = 0
    try:
        with torch.enable_grad():
            for batch in itertools.islice(batches, max_batches):
                acts.clear()
                head, ffn, n = _score_batch(model, batch, acts, (len(layers), n_heads), loss_fn)
                head_sum = head if head_sum is None else head_sum + head
                ffn_sum = ffn if ffn_sum is None else ffn_sum + ffn
                examples += n
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if head_sum is None or ffn_sum is None or examples == 0:
        raise DataError("importance() got no batches", "pass at least one batch with input_ids and labels")
    heads = head_sum / examples
    heads = heads / heads.norm(dim=1, keepdim=True).clamp_min(torch.finfo(heads.dtype).tiny)
    return Importance(heads=heads.tolist(), ffn=ffn_sum.tolist())


def _score_batch(
    model: PreTrainedModel,
    batch: dict[str, Tensor],
    acts: list[Tensor],
    shape: tuple[int, int],
    loss_fn: LossFn | None = None,
) -> tuple[Tensor, Tensor, int]:
    """One batch's summed |dL_i/dxi| (layers, heads) and |a * dL/da| (layers, intermediate), float64, and B.

    shape: (layers, heads); `acts` is filled by the forward hooks with one (B, T, intermediate) tensor per layer.
    """
    import torch

    inputs = _model_inputs(model, batch, own_loss=loss_fn is None)
    ids = inputs["input_ids"]
    b = int(ids.shape[0])
    mask = torch.ones(shape[0], b, shape[1], 1, 1, device=ids.device, dtype=model.dtype, requires_grad=True)
    if loss_fn is not None:
        total = loss_fn(model, inputs, mask)
    else:
        out = model(**inputs, head_mask=mask)
        if out.loss is None:
            raise DataError("the model returned no loss for this batch", "batches must carry `labels`")
        total = out.loss * b
    # the loss is a mean over the batch; times B it is the sum of per-example losses, and since examples do not
    # interact in an encoder (eval mode), grad wrt mask[l, i, h] is example i's own dL_i/dxi_{l,h}
    grads = torch.autograd.grad(total, [mask, *acts])
    head = grads[0].abs().sum(dim=1).flatten(1)  # (layers, heads)
    real = inputs.get("attention_mask", torch.ones_like(ids)).to(acts[0].dtype).unsqueeze(-1)  # (B, T, 1)
    ffn = torch.stack([(a * g).abs().mul(real).sum(dim=(0, 1)) for a, g in zip(acts, grads[1:], strict=True)])
    return head.detach().double(), ffn.detach().double(), b


def _model_inputs(model: PreTrainedModel, batch: dict[str, Tensor], own_loss: bool = True) -> dict[str, Tensor]:
    """The batch's model inputs, on the model's device; a DataError when input_ids or labels are missing (labels:
    only for the model's own loss; with a loss_fn every tensor of the batch is passed on)."""
    missing = [k for k in ("input_ids", "labels") if k not in batch and (own_loss or k == "input_ids")]
    if missing:
        raise DataError(f"importance batch lacks {', '.join(missing)}", "batches need input_ids and labels")
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels") if own_loss else tuple(batch)
    return {k: batch[k].to(device) for k in keys if k in batch}


def plan_pruning(imp: Importance, heads_fraction: float, ffn_fraction: float, min_heads: int = 1) -> PruningPlan:
    """Remove round(heads_fraction * all heads) heads and keep `ffn_keep_count(I, ffn_fraction)` neurons per layer.

    Heads are ranked globally (lowest normalised score first, ties by layer then head) and skipped once their layer
    is down to `min_heads`; a fraction that cannot be met while keeping `min_heads` per layer is a ConfigError.
    FFN: each layer keeps its own top-scoring neurons, the same count in every layer (one `intermediate_size`).
    """
    _check_fraction("heads_fraction", heads_fraction)
    _check_fraction("ffn_fraction", ffn_fraction)
    if min_heads < 1:
        raise ConfigError(f"min_heads must be >= 1, got {min_heads}", "a layer with no heads cannot run")
    return PruningPlan(_plan_heads(imp.heads, heads_fraction, min_heads), _plan_ffn(imp.ffn, ffn_fraction))


def _plan_heads(scores: list[list[float]], fraction: float, min_heads: int) -> dict[int, list[int]]:
    """layer -> heads to remove, globally lowest scores first, never below `min_heads` in a layer."""
    left = [len(row) for row in scores]
    total = sum(left)
    n_remove = _round_half_up(fraction * total)
    removable = sum(max(n - min_heads, 0) for n in left)
    if n_remove > removable:
        raise ConfigError(
            f"removing {n_remove} of {total} heads would leave some layer with fewer than min_heads={min_heads}",
            f"at most {removable} heads can go; lower heads_fraction or min_heads",
        )
    order = sorted((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row))
    out: dict[int, list[int]] = {}
    removed = 0
    for _score, layer, head in order:
        if removed == n_remove:
            break
        if left[layer] > min_heads:
            out.setdefault(layer, []).append(head)
            left[layer] -= 1
            removed += 1
    return {layer: sorted(heads) for layer, heads in sorted(out.items())}


def _plan_ffn(scores: list[list[float]], fraction: float) -> dict[int, list[int]]:
    """layer -> sorted kept neurons: each layer's top `ffn_keep_count` by its own scores (ties: lower index)."""
    widths = {len(row) for row in scores}
    if len(widths) != 1:
        raise ModelError(
            f"FFN widths differ across layers ({sorted(widths)})",
            "HF configs have one intermediate_size for all layers",
        )
    width = widths.pop()
    keep = ffn_keep_count(width, fraction)
    return {layer: _top(row, keep) for layer, row in enumerate(scores)}


def _top(row: list[float], k: int) -> list[int]:
    """Sorted indices of the k largest values (ties: lower index first)."""
    return sorted(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])


def ffn_keep_count(width: int, fraction: float) -> int:
    """Neurons every layer keeps when pruning `fraction` of `width`: round((1 - f) * width), then, when that is >= 8,
    rounded to a multiple of 8 (tile-aligned GEMMs), never above `width`, never below 1; f == 0 keeps all."""
    if fraction == 0:
        return width
    keep = _round_half_up((1 - fraction) * width)
    if keep >= FFN_MULTIPLE:
        keep = FFN_MULTIPLE * _round_half_up(keep / FFN_MULTIPLE)
        if keep > width:
            keep -= FFN_MULTIPLE
    return max(keep, 1)


def apply_pruning(model: M, plan: PruningPlan) -> M:
    """Remove the plan's heads and FFN neurons in place; returns the same model.

    Heads: `model.prune_heads` (Q/K/V rows and attention-output columns; `config.pruned_heads` updated).
    FFN: `intermediate.dense` (I, H) -> (k, H) rows + bias, `output.dense` (H, I) -> (H, k) columns, new
    `nn.Linear`s with the source dtype/device; `config.intermediate_size = k`. The plan must keep the same k in every
    layer (or leave `ffn_keep` empty), so the result round-trips through save_pretrained/from_pretrained.
    """
    layers = _encoder_layers(model)
    _check_head_plan(model, layers, plan.heads_to_prune)
    width = _check_ffn_plan(layers, plan.ffn_keep)
    heads = {layer: list(hs) for layer, hs in plan.heads_to_prune.items() if hs}
    if heads:
        model.prune_heads(heads)
    if plan.ffn_keep:
        for layer, keep in plan.ffn_keep.items():
            _slice_ffn(layers[layer], keep)
        model.config.intermediate_size = width
    return model


def _check_head_plan(model: PreTrainedModel, layers: list[Any], heads_to_prune: dict[int, list[int]]) -> None:
    """ModelError unless every layer/head index exists and every layer keeps at least one head."""
    total = int(model.config.num_attention_heads)
    for layer, heads in heads_to_prune.items():
        if not 0 <= layer < len(layers):
            raise ModelError(f"pruning plan names layer {layer}; the model has {len(layers)}", "plan on this model")
        bad = [h for h in heads if not 0 <= h < total]
        if bad:
            raise ModelError(f"pruning plan names heads {bad} in layer {layer}; it has {total}", "plan on this model")
        gone = set(model.config.pruned_heads.get(layer, [])) | set(heads)
        if len(gone) >= total:
            raise ModelError(f"the plan would remove every head of layer {layer}", "keep min_heads >= 1")


def _check_ffn_plan(layers: list[Any], ffn_keep: dict[int, list[int]]) -> int:
    """The common kept width; ModelError unless all layers are planned, with equal counts of valid indices."""
    if not ffn_keep:
        return 0
    if set(ffn_keep) != set(range(len(layers))):
        raise ModelError(
            f"ffn_keep covers layers {sorted(ffn_keep)}, not all {len(layers)}",
            "HF configs have one intermediate_size: plan every layer with the same kept count",
        )
    widths = {len(keep) for keep in ffn_keep.values()}
    if len(widths) != 1 or 0 in widths:
        raise ModelError(f"ffn_keep counts differ across layers or are 0: {sorted(widths)}", "use plan_pruning()")
    for layer, keep in ffn_keep.items():
        current = int(layers[layer].intermediate.dense.out_features)
        if keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= current:
            raise ModelError(
                f"ffn_keep[{layer}] must be ascending unique indices below {current}", "plan on this model"
            )
    return widths.pop()


def _slice_ffn(layer: Any, keep: list[int]) -> None:
    """Keep neurons `keep` of one layer's FFN: rows of intermediate.dense, columns of output.dense."""
    import torch

    idx = torch.tensor(keep, dtype=torch.long, device=layer.intermediate.dense.weight.device)
    layer.intermediate.dense = _sliced_linear(layer.intermediate.dense, idx, dim=0)
    layer.output.dense = _sliced_linear(layer.output.dense, idx, dim=1)


def _sliced_linear(old: nn.Linear, idx: Tensor, dim: int) -> nn.Linear:
    """A new Linear with `old.weight` (out, in) restricted to `idx` along dim 0 (outputs) or 1 (inputs)."""
    import torch
    from torch import nn

    weight = old.weight.detach().index_select(dim, idx)
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=old.bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias[idx] if dim == 0 else old.bias)
    new.train(old.training)
    return new


def prune(
    model: M,
    batches: Iterable[dict[str, Tensor]],
    heads_fraction: float,
    ffn_fraction: float,
    max_batches: int = 8,
    min_heads: int = 1,
    loss_fn: LossFn | None = None,
) -> tuple[M, PruningPlan, Importance]:
    """importance() -> plan_pruning() -> apply_pruning(); fractions are checked before any scoring."""
    _check_fraction("heads_fraction", heads_fraction)
    _check_fraction("ffn_fraction", ffn_fraction)
    imp = importance(model, batches, max_batches, loss_fn)
    plan = plan_pruning(imp, heads_fraction, ffn_fraction, min_heads)
    return apply_pruning(model, plan), plan, imp


def _encoder_layers(model: Any) -> list[Any]:
    """`model.base_model.encoder.layer` as a list, or a ModelError saying why the model is not supported."""
    name = type(model).__name__
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if layers is None or len(layers) == 0 or not callable(getattr(model, "prune_heads", None)):
        raise ModelError(f"{name} is not a BERT-family encoder (no base_model.encoder.layer)", _SUPPORTED)
    for i, layer in enumerate(layers):
        for part in _LAYER_PARTS:
            if _attr_path(layer, part) is None:
                raise ModelError(f"{name} layer {i} has no .{part}", _SUPPORTED)
        attn = layer.attention.self
        if not (hasattr(attn, "num_attention_heads") and hasattr(attn, "attention_head_size")):
            raise ModelError(f"{name} layer {i} attention has no num_attention_heads/attention_head_size", _SUPPORTED)
    return list(layers)


def _attr_path(obj: Any, path: str) -> Any:
    """obj.a.b.c for path 'a.b.c', or None when a link is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unpruned_heads(model: PreTrainedModel, layers: list[Any]) -> int:
    """Heads per layer; a ModelError when heads were already pruned (HF's head_mask must be rectangular)."""
    total = int(model.config.num_attention_heads)
    counts = [int(layer.attention.self.num_attention_heads) for layer in layers]
    if model.config.pruned_heads or any(c != total for c in counts):
        raise ModelError(
            f"heads were already pruned (heads per layer: {counts})",
            "score importance on the model before pruning: HF's head_mask needs the same head count in every layer",
        )
    return total


def _check_fraction(name: str, value: float) -> None:
    """ConfigError unless 0 <= value < 1."""
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value}", "it is the fraction to REMOVE")


def _round_half_up(x: float) -> int:
    """round() without banker's rounding (2.5 -> 3), robust to 0.30000000000000004-style noise."""
    return math.floor(x + 0.5 + 1e-9)
