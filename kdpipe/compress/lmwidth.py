"""Minitron-style structured width pruning of decoder-only causal LMs: FFN neurons and KV groups, by activations.

Importance is Minitron's (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation") activation-based score, computed from a few forward passes without gradients:

- FFN neuron j of a layer: mean over real tokens (attention_mask == 1) of |a_j|, where a is the input of the
  down projection (Llama family: act_fn(gate_proj(x)) * up_proj(x); GPT-2: act(c_fc(x))), captured with a forward
  pre-hook on `down_proj` / `c_proj`.
- KV group g (a KV head together with its num_attention_heads / num_key_value_heads query heads): for every query
  head, the L2 norm over real tokens and its head_dim channels of the attention output (the input of `o_proj`);
  the group's score is the sum over its query heads. Pruning whole groups keeps GQA's grouping intact
  (`num_key_value_groups` is unchanged).

Each layer chooses WHICH neurons / groups to keep from its own scores, but every layer keeps the SAME number,
because HF configs hold a single intermediate_size / num_attention_heads / num_key_value_heads for all layers
(otherwise the model could not round-trip through save_pretrained / from_pretrained). hidden_size and head_dim are
unchanged; `config.head_dim` is set explicitly, since the default hidden_size // num_attention_heads would change.

Supported: Llama-family (`model.model.layers[i].mlp.{gate_proj,up_proj,down_proj}`,
`.self_attn.{q_proj,k_proj,v_proj,o_proj}`: llama, mistral, qwen2, qwen3) and GPT-2 (`transformer.h[i].mlp.{c_fc,
c_proj}`, Conv1D; FFN only). torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from kdpipe.compress.prune import ffn_keep_count
from kdpipe.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import PreTrainedModel

M = TypeVar("M", bound="PreTrainedModel")

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GPT2_FAMILY = ("gpt2",)
_SUPPORTED = f"width pruning supports Llama-family causal LMs ({', '.join(LLAMA_FAMILY)}) and GPT-2 (FFN only)"


@dataclass(frozen=True)
class LMWidthInfo:
    """What `prune_lm_width` removed (the same counts in every layer); JSON-able via dataclasses.asdict.

    ffn_*: FFN neurons per layer. kv_groups_*: KV heads per layer. heads_*: query heads per layer.
    params_*: unique parameters of the whole model. scored_tokens: real tokens the importance was computed on.
    """

    ffn_before: int
    ffn_after: int
    kv_groups_before: int
    kv_groups_after: int
    heads_before: int
    heads_after: int
    params_before: int
    params_after: int
    scored_tokens: int


@dataclass
class _Scores:
    """Per-layer accumulators (float64 on CPU; each batch is reduced in float32 on the model's device first)."""

    ffn_abs: list[Tensor]  # (layers, I): sum over real tokens of |a_j|
    head_sq: list[Tensor]  # (layers, heads): sum over real tokens and head_dim channels of o_proj input squared
    tokens: int = 0


def prune_lm_width(model: M, batches: list[dict[str, Tensor]], ffn: float, heads: float) -> tuple[M, LMWidthInfo]:
    """Score FFN neurons and KV groups on `batches`, remove the fraction `ffn` of every layer's FFN neurons and the
    fraction `heads` of every layer's KV groups, in place; returns the same model and what was removed.

    `batches`: dicts with input_ids and attention_mask (real tokens where mask == 1; a missing mask means all real).
    Kept FFN width: ffn_keep_count (round((1 - ffn) * I), a multiple of 8 when >= 8, at least 1). Kept groups:
    round((1 - heads) * groups), at least 1.
    """
    _check_fraction("ffn", ffn)
    _check_fraction("heads", heads)
    family = _family(model)
    if family == "gpt2" and heads > 0:
        raise ConfigError(
            f"heads={heads}: attention-head pruning is for Llama-family models, not GPT-2",
            "use heads=0 for GPT-2 (its FFN can still be pruned with ffn > 0)",
        )
    if not batches:
        raise DataError("no batches to score importance on", "pass at least one batch with real tokens")
    layers = _layers(model, family)
    dims = _dims(model, family, layers)
    params_before = _n_params(model)

    scores = _score(model, family, layers, batches, dims)
    width, groups, n_heads, head_dim = dims["ffn"], dims["groups"], dims["heads"], dims["head_dim"]
    keep_ffn = ffn_keep_count(width, ffn)
    keep_groups = _group_keep_count(groups, heads)
    per_group = n_heads // groups

    for i, layer in enumerate(layers):
        if keep_ffn < width:
            mean_abs = scores.ffn_abs[i] / scores.tokens
            _slice_ffn(layer, family, _top(mean_abs, keep_ffn))
        if keep_groups < groups:
            head_norm = scores.head_sq[i].sqrt()
            group_score = head_norm.view(groups, per_group).sum(dim=1)
            _slice_attention(layer.self_attn, _top(group_score, keep_groups), per_group, head_dim)

    _update_config(model, family, keep_ffn, keep_groups * per_group, keep_groups, head_dim, dims)
    info = LMWidthInfo(
        ffn_before=width,
        ffn_after=keep_ffn,
        kv_groups_before=groups,
        kv_groups_after=keep_groups,
        heads_before=n_heads,
        heads_after=keep_groups * per_group,
        params_before=params_before,
        params_after=_n_params(model),
        scored_tokens=scores.tokens,
    )
    return model, info


def _check_fraction(name: str, value: float) -> None:
    """ConfigError unless 0 <= value < 1."""
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value}", "it is the fraction to REMOVE from every layer")


def _family(model: Any) -> str:
    """'llama' or 'gpt2' from config.model_type, or a ModelError."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in GPT2_FAMILY:
        return "gpt2"
    raise ModelError(
        f"{type(model).__name__} (model_type {model_type!r}) is not supported for width pruning", _SUPPORTED
    )


def _layers(model: Any, family: str) -> list[Any]:
    """The decoder layers, checked to have the parts pruning touches, or a ModelError."""
    name = type(model).__name__
    if family == "llama":
        layers = getattr(getattr(model, "model", None), "layers", None)
        parts = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") + tuple(
            f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        where = "model.layers"
    else:
        layers = getattr(getattr(model, "transformer", None), "h", None)
        parts = ("mlp.c_fc", "mlp.c_proj")
        where = "transformer.h"
    if layers is None or len(layers) == 0:
        raise ModelError(f"{name} has no {where}", _SUPPORTED)
    for i, layer in enumerate(layers):
        for part in parts:
            if _attr_path(layer, part) is None:
                raise ModelError(f"{name} layer {i} has no .{part}", _SUPPORTED)
    return list(layers)


def _attr_path(obj: Any, path: str) -> Any:
    """obj.a.b for path 'a.b', or None when a link is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _dims(model: Any, family: str, layers: list[Any]) -> dict[str, int]:
    """ffn / heads / groups / head_dim per layer, the same in every layer (else a ModelError)."""
    cfg = model.config
    if family == "gpt2":
        widths = {int(layer.mlp.c_fc.weight.shape[1]) for layer in layers}
        n_heads = int(cfg.n_head)
        dims = {"heads": n_heads, "groups": n_heads, "head_dim": int(cfg.n_embd) // n_heads}
    else:
        widths = {int(layer.mlp.down_proj.weight.shape[1]) for layer in layers}
        n_heads = int(cfg.num_attention_heads)
        groups = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        if n_heads % groups:
            raise ModelError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {groups}", "")
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            shapes = (attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.o_proj.weight.shape[1])
            if shapes != (n_heads * head_dim, groups * head_dim, n_heads * head_dim):
                raise ModelError(
                    f"layer {i} attention shapes {shapes} do not match the config "
                    f"({n_heads} heads, {groups} KV heads, head_dim {head_dim})",
                    "width pruning needs the same head counts in every layer",
                )
        dims = {"heads": n_heads, "groups": groups, "head_dim": head_dim}
    if len(widths) != 1:
        raise ModelError(f"FFN widths differ across layers: {sorted(widths)}", "width pruning needs one FFN width")
    dims["ffn"] = widths.pop()
    return dims


def _n_params(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _group_keep_count(groups: int, fraction: float) -> int:
    """KV groups every layer keeps: round((1 - f) * groups) (half up), at least 1; f == 0 keeps all."""
    if fraction == 0:
        return groups
    return max(1, min(groups, int((1 - fraction) * groups + 0.5 + 1e-9)))


def _top(scores: Tensor, k: int) -> list[int]:
    """Sorted indices of the k largest scores (ties: lower index first)."""
    row = scores.tolist()
    return sorted(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])


def _ids_and_mask(batch: dict[str, Tensor], b: int, device: Any) -> tuple[Tensor, Tensor]:
    """A scoring batch's input_ids and attention_mask (all ones when absent) on `device`; DataError when malformed."""
    import torch

    if "input_ids" not in batch:
        raise DataError(f"batch {b} has no input_ids", "each batch needs input_ids and attention_mask")
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    if mask.shape != ids.shape:
        raise DataError(
            f"batch {b}: attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}",
            "pass a (batch, seq) mask with 1 at real tokens",
        )
    return ids, mask


def _score(
    model: Any, family: str, layers: list[Any], batches: list[dict[str, Tensor]], dims: dict[str, int]
) -> _Scores:
    """Run the batches through the model (eval, no grad) with pre-hooks on down_proj / c_proj and o_proj."""
    import torch

    n_heads, head_dim = dims["heads"], dims["head_dim"]
    scores = _Scores(
        ffn_abs=[torch.zeros(dims["ffn"], dtype=torch.float64) for _ in layers],
        head_sq=[torch.zeros(n_heads, dtype=torch.float64) for _ in layers],
    )
    state: dict[str, Tensor] = {}

    def real(x: Tensor) -> Tensor:
        """The rows of x (B, T, C) at real tokens, as float32 (N, C) on x's device (reduced there, then moved)."""
        return x[state["mask"].to(x.device)].float()

    def ffn_hook(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            scores.ffn_abs[i] += real(args[0]).abs().sum(dim=0).to(device="cpu", dtype=torch.float64)

        return hook

    def attn_hook(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = real(args[0]).view(-1, n_heads, head_dim)
            scores.head_sq[i] += x.square().sum(dim=(0, 2)).to(device="cpu", dtype=torch.float64)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        down = layer.mlp.down_proj if family == "llama" else layer.mlp.c_proj
        handles.append(down.register_forward_pre_hook(ffn_hook(i)))
        if family == "llama":
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook(i)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                ids, mask = _ids_and_mask(batch, b, device)
                n = int((mask == 1).sum())
                if n == 0:
                    continue
                state["mask"] = mask == 1
                scores.tokens += n
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if scores.tokens == 0:
        raise DataError(
            "no real token in the scoring batches (every attention_mask is all zeros)",
            "pass batches whose attention_mask is 1 at real tokens",
        )
    return scores


def _slice_ffn(layer: Any, family: str, keep: list[int]) -> None:
    """Keep FFN neurons `keep` of one layer."""
    import torch

    mlp = layer.mlp
    if family == "llama":
        idx = torch.tensor(keep, dtype=torch.long, device=mlp.down_proj.weight.device)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, idx, dim=0)
        mlp.up_proj = _sliced_linear(mlp.up_proj, idx, dim=0)
        mlp.down_proj = _sliced_linear(mlp.down_proj, idx, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
    else:
        idx = torch.tensor(keep, dtype=torch.long, device=mlp.c_proj.weight.device)
        mlp.c_fc = _sliced_conv1d(mlp.c_fc, idx, outputs=True)
        mlp.c_proj = _sliced_conv1d(mlp.c_proj, idx, outputs=False)


def _slice_attention(attn: Any, keep_groups: list[int], per_group: int, head_dim: int) -> None:
    """Keep KV heads `keep_groups` and their query heads (group g owns query heads g*per_group .. +per_group-1)."""
    import torch

    device = attn.o_proj.weight.device
    q_heads = [g * per_group + r for g in keep_groups for r in range(per_group)]

    def channels(heads: list[int]) -> Tensor:
        return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long, device=device)

    q_idx, kv_idx = channels(q_heads), channels(keep_groups)
    attn.q_proj = _sliced_linear(attn.q_proj, q_idx, dim=0)
    attn.k_proj = _sliced_linear(attn.k_proj, kv_idx, dim=0)
    attn.v_proj = _sliced_linear(attn.v_proj, kv_idx, dim=0)
    attn.o_proj = _sliced_linear(attn.o_proj, q_idx, dim=1)
    # transformers 4.57 reads only head_dim / num_key_value_groups (unchanged); older versions kept head counts too
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(q_heads)
    if hasattr(attn, "num_attention_heads"):
        attn.num_attention_heads = len(q_heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(keep_groups)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = per_group


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
            new.bias.copy_(old.bias.detach()[idx] if dim == 0 else old.bias.detach())
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None and old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    return new


def _sliced_conv1d(old: Any, idx: Tensor, outputs: bool) -> Any:
    """A new HF Conv1D (weight (in, out), bias (out)) restricted to `idx` along its outputs or its inputs."""
    import torch
    from transformers.pytorch_utils import Conv1D

    weight = old.weight.detach().index_select(1 if outputs else 0, idx)
    bias = old.bias.detach()[idx] if outputs else old.bias.detach()
    new = Conv1D(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    new.train(old.training)
    return new


def _update_config(
    model: Any, family: str, ffn: int, n_heads: int, groups: int, head_dim: int, dims: dict[str, int]
) -> None:
    """Record the new widths in model.config."""
    cfg = model.config
    if family == "gpt2":
        if ffn != dims["ffn"]:
            cfg.n_inner = ffn
        return
    cfg.intermediate_size = ffn
    cfg.head_dim = head_dim  # explicit: the default hidden_size // num_attention_heads changes with the head count
    cfg.num_attention_heads = n_heads
    cfg.num_key_value_heads = groups
