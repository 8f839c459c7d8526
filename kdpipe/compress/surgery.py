"""Architecture-aware layer removal for Hugging Face models: which nn.ModuleList holds each stack of blocks
(encoder, decoder), a new model that keeps some of their blocks, and which parameters make a block or an FFN
neuron a no-op when zeroed (xi1) against the rest of it (xi2).

Every stack is named explicitly per architecture (kdpipe.tasks.classification.student's `layer.<i>` regex cannot tell an
encoder's blocks from a decoder's), and every tensor of a new model is copied from the teacher by name: block i of stack
s from the teacher's block keep[s][i], everything else from the tensor of the same name.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from kdpipe.errors import ConfigError, ModelError, did_you_mean

_BERT_OUT = (r"attention\.output\.dense", r"output\.dense")
_BERT_FFN = (r"output\.dense", (r"intermediate\.dense",))
_LLAMA_OUT = (r"self_attn\.o_proj", r"mlp\.down_proj")
_LLAMA_FFN = (r"mlp\.down_proj", (r"mlp\.gate_proj", r"mlp\.up_proj"))
_BART_OUT = (r"self_attn\.out_proj", r"encoder_attn\.out_proj", r"fc2")
_BART_FFN = (r"fc2", (r"fc1",))
_T5_OUT = (r"layer\.\d+\.SelfAttention\.o", r"layer\.\d+\.EncDecAttention\.o", r"layer\.\d+\.DenseReluDense\.wo")
_T5_FFN = (r"layer\.\d+\.DenseReluDense\.wo", (r"layer\.\d+\.DenseReluDense\.wi(_0|_1)?",))
_POST_LN = (
    "post-LN: the LayerNorm after each residual still acts on a zeroed block, so zeroing only approximates removal"
)


@dataclass(frozen=True)
class _Arch:
    """One family: its stacks (name -> (path under the base model, config depth keys)), the module names (regex,
    relative to a block) of the output projections (xi1) and of the FFN (output, inputs), and its LN placement."""

    stacks: dict[str, tuple[str, tuple[str, ...]]]
    out: tuple[str, ...]
    ffn: tuple[str, tuple[str, ...]]
    pre_ln: bool


_StackTable = dict[str, tuple[str, tuple[str, ...]]]
_ENCODER: _StackTable = {"encoder": ("encoder.layer", ("num_hidden_layers",))}
_DECODER: _StackTable = {"decoder": ("layers", ("num_hidden_layers",))}
_BART_STACKS: _StackTable = {
    "encoder": ("encoder.layers", ("encoder_layers", "num_hidden_layers")),
    "decoder": ("decoder.layers", ("decoder_layers",)),
}
ARCHS: dict[str, _Arch] = {
    **{t: _Arch(_ENCODER, _BERT_OUT, _BERT_FFN, False) for t in ("bert", "roberta", "xlm-roberta", "electra")},
    "mpnet": _Arch(_ENCODER, (r"attention\.attn\.o", r"output\.dense"), _BERT_FFN, False),
    **{t: _Arch(_DECODER, _LLAMA_OUT, _LLAMA_FFN, True) for t in ("llama", "qwen2", "qwen3", "mistral")},
    "gpt2": _Arch(
        {"decoder": ("h", ("n_layer",))}, (r"attn\.c_proj", r"mlp\.c_proj"), (r"mlp\.c_proj", (r"mlp\.c_fc",)), True
    ),
    "marian": _Arch(_BART_STACKS, _BART_OUT, _BART_FFN, False),
    "bart": _Arch(_BART_STACKS, _BART_OUT, _BART_FFN, False),
    "mbart": _Arch(_BART_STACKS, _BART_OUT, _BART_FFN, True),
    "t5": _Arch(
        {"encoder": ("encoder.block", ("num_layers",)), "decoder": ("decoder.block", ("num_decoder_layers",))},
        _T5_OUT,
        _T5_FFN,
        True,
    ),
}
# per-layer config lists that follow the blocks they describe (Qwen2/Qwen3/Llama `layer_types` in 4.57)
_PER_LAYER_KEYS = ("layer_types",)


@dataclass(frozen=True)
class Stack:
    """One stack of transformer blocks: `path` is the dotted name of its nn.ModuleList within the model (the
    prefix of its blocks' parameter names), `config_keys` the config attributes holding its depth."""

    name: str
    path: str
    config_keys: tuple[str, ...]
    size: int


def _arch(model: Any) -> _Arch:
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in ARCHS:
        raise ModelError(
            f"{type(model).__name__}: model_type '{model_type}' has no known layer stacks for layer removal",
            f"supported model types: {', '.join(sorted(ARCHS))}",
        )
    return ARCHS[model_type]


def stacks(model: Any) -> dict[str, Stack]:
    """The model's stacks of blocks by name ("encoder", "decoder"), found under the model itself or its base
    model (BertModel and BertForSequenceClassification alike); ModelError for an architecture not listed."""
    import torch

    arch = _arch(model)
    prefixes = ["", f"{getattr(model, 'base_model_prefix', '')}.", "model."]
    found: dict[str, Stack] = {}
    for name, (rel, keys) in arch.stacks.items():
        for prefix in dict.fromkeys(p for p in prefixes if p != "."):
            try:
                module = model.get_submodule(prefix + rel)
            except AttributeError:
                continue
            if isinstance(module, torch.nn.ModuleList):
                found[name] = Stack(name=name, path=prefix + rel, config_keys=keys, size=len(module))
                break
    if not found:
        wanted = ", ".join(rel for rel, _ in arch.stacks.values())
        raise ModelError(
            f"{type(model).__name__} ({model.config.model_type}): no nn.ModuleList at {wanted}",
            "pass a Hugging Face model of this architecture (base model or one with a task head)",
        )
    return found


def parse_keep(spec: Any, stacks: dict[str, Stack], field: str = "student.layers") -> dict[str, list[int]]:
    """The blocks to keep per stack: `spec` is a list of indices (one-stack models only) or {stack: "all" | list};
    stacks not named keep every block. ConfigError naming the field (`student.layers.decoder`) otherwise."""
    if isinstance(spec, list | tuple):
        if len(stacks) != 1:
            example = ", ".join(f"{s}: all" for s in stacks)
            raise ConfigError(
                f"{field}: a list of layers is ambiguous for a model with stacks {', '.join(stacks)}",
                f"name the stack, e.g. {field}: {{{example}}} with a list for the one to shrink",
            )
        spec = {next(iter(stacks)): list(spec)}
        named = {next(iter(stacks)): field}
    elif isinstance(spec, dict):
        named = {s: f"{field}.{s}" for s in spec}
    else:
        raise ConfigError(f"{field}: expected a list of layer indices or a mapping of stacks", "e.g. [0, 2]")
    for name in spec:
        if name not in stacks:
            raise ConfigError(f"{field}.{name}: the model has no stack '{name}'", did_you_mean(str(name), list(stacks)))
    return {s: _indices(spec.get(s, "all"), st.size, named.get(s, f"{field}.{s}")) for s, st in stacks.items()}


def _indices(value: Any, size: int, field: str) -> list[int]:
    """One stack's kept indices, validated: "all", or a non-empty increasing list within 0..size-1."""
    if value == "all":
        return list(range(size))
    if not isinstance(value, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"{field}: expected 'all' or a list of integer layer indices, got {value!r}", "e.g. [0, 2]")
    layers = list(value)
    if not layers:
        raise ConfigError(f"{field}: keeps no layer", f"list at least one of 0..{size - 1}, or write 'all'")
    bad = [i for i in layers if not 0 <= i < size]
    if bad:
        raise ConfigError(
            f"{field}: indices {bad} outside the teacher's layers 0..{size - 1}",
            f"list 0-based teacher layers between 0 and {size - 1}",
        )
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ConfigError(f"{field}: {layers} must be increasing without repeats", "e.g. [0, 2, 3]")
    return layers


def _student_config(model: Any, found: dict[str, Stack], keep: dict[str, list[int]]) -> Any:
    """The teacher's config, deep-copied, with every depth key, per-layer list and pruned-head entry remapped."""
    config = copy.deepcopy(model.config)
    for name, stack in found.items():
        for key in stack.config_keys:
            setattr(config, key, len(keep[name]))
        if len(found) == 1:
            for key in _PER_LAYER_KEYS:
                value = getattr(config, key, None)
                if isinstance(value, list) and len(value) == stack.size:
                    setattr(config, key, [value[i] for i in keep[name]])
    pruned = getattr(config, "pruned_heads", None)
    if pruned and len(found) == 1:
        kept = next(iter(keep.values()))
        old = {int(k): v for k, v in pruned.items()}
        config.pruned_heads = {i: list(old[t]) for i, t in enumerate(kept) if old.get(t)}
    return config


def _source(key: str, found: dict[str, Stack], keep: dict[str, list[int]], teacher_keys: Any) -> str:
    """The teacher tensor a student tensor is copied from: its block's teacher block, or the same name. A tensor
    only block 0 of a stack holds (T5's relative_attention_bias) comes from the teacher's block 0."""
    for name, stack in found.items():
        prefix = stack.path + "."
        if key.startswith(prefix):
            idx, _, rest = key[len(prefix) :].partition(".")
            src = f"{prefix}{keep[name][int(idx)]}.{rest}"
            if src not in teacher_keys and int(idx) == 0 and f"{prefix}0.{rest}" in teacher_keys:
                return f"{prefix}0.{rest}"
            return src
    return key


def _new_model(model: Any, config: Any) -> Any:
    """type(model)(config) with the teacher's floating dtype, weights left uninitialised when transformers allows
    (every tensor is loaded right after), tied weights re-tied."""
    import torch

    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        from contextlib import nullcontext as no_init_weights  # type: ignore[assignment]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            student = type(model)(config)
    finally:
        torch.set_default_dtype(previous)
    student.tie_weights()
    return student


def remove_layers(model: Any, keep: dict[str, list[int]]) -> tuple[Any, dict[str, str]]:
    """A new model of the teacher's class keeping block keep[s][i] of each stack s as its block i (stacks not in
    `keep` whole), every tensor copied from the teacher; and student parameter name -> teacher parameter name."""
    import torch

    found = stacks(model)
    for name in keep.keys() - found.keys():
        raise ConfigError(f"keep.{name}: the model has no stack '{name}'", did_you_mean(str(name), list(found)))
    keep = {s: _indices(keep.get(s, "all"), st.size, f"keep.{s}") for s, st in found.items()}
    student = _new_model(model, _student_config(model, found, keep))
    t_state = model.state_dict()
    sources = {key: _source(key, found, keep, t_state) for key in student.state_dict()}
    missing = sorted(src for src in sources.values() if src not in t_state)
    if missing:
        raise ModelError(
            f"{type(model).__name__}: the student's tensors {missing[:3]} have no teacher tensor of that name",
            "report the architecture; kdpipe.compress.surgery maps blocks by position and the rest by name",
        )
    with torch.no_grad():
        student.load_state_dict({k: t_state[src].detach().clone() for k, src in sources.items()}, strict=True)
    device = next(iter(t_state.values())).device if t_state else torch.device("cpu")
    student.to(device)
    if getattr(model, "generation_config", None) is not None and hasattr(student, "generation_config"):
        student.generation_config = copy.deepcopy(model.generation_config)
    student.train(model.training)
    name_map = {name: sources[name] for name, _ in student.named_parameters()}
    return student, name_map


def _block(model: Any, stack: str, index: int) -> tuple[Any, str]:
    """Block `index` of `stack` and its parameter-name prefix; ConfigError for a stack or index not there."""
    found = stacks(model)
    if stack not in found:
        raise ConfigError(
            f"stack '{stack}': {type(model).__name__} has no such stack", did_you_mean(stack, list(found))
        )
    st = found[stack]
    if not 0 <= index < st.size:
        raise ConfigError(f"{stack} layer {index}: outside 0..{st.size - 1}", f"use an index below {st.size}")
    return model.get_submodule(f"{st.path}.{index}"), f"{st.path}.{index}."


def _matching(block: Any, patterns: tuple[str, ...]) -> dict[str, Any]:
    """The block's submodules (relative name -> module) whose name fully matches one of the patterns."""
    return {n: m for n, m in block.named_modules() if n and any(re.fullmatch(p, n) for p in patterns)}


def zeroed_params(model: Any, stack: str, index: int) -> list[str]:
    """xi1: the parameters of block `index` of `stack` that, set to zero, remove the block from the residual
    stream: the output projections of self-attention, cross-attention (decoders of encoder-decoders) and FFN,
    weights and biases alike (exactly the identity for pre-LN families, see residual_identity)."""
    block, prefix = _block(model, stack, index)
    modules = _matching(block, _arch(model).out)
    names = [f"{prefix}{m}.{p}" for m, mod in modules.items() for p, _ in mod.named_parameters(recurse=False)]
    if not names:
        raise ModelError(
            f"{type(model).__name__}: no output projection found in {prefix.rstrip('.')}",
            "report the architecture; kdpipe.compress.surgery names output projections per model type",
        )
    return names


def removed_params(model: Any, stack: str, index: int) -> list[str]:
    """xi2: every parameter of block `index` of `stack` that zeroed_params does not list."""
    block, prefix = _block(model, stack, index)
    xi1 = set(zeroed_params(model, stack, index))
    return [prefix + n for n, _ in block.named_parameters() if prefix + n not in xi1]


def residual_identity(model: Any) -> tuple[bool, str]:
    """Whether zeroing a block's xi1 makes it exactly the identity (pre-LN), with the reason when it does not."""
    if _arch(model).pre_ln:
        return True, "pre-LN: each sublayer adds its output projection to the residual stream, so zero adds nothing"
    return False, _POST_LN


def ffn_neurons(model: Any, stack: str, index: int, neurons: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """For removing FFN hidden neurons `neurons` of block `index`: (xi1, xi2) as {parameter name: bool mask of its
    shape}. xi1 is the output projection's input slice for those neurons (zeroed, their contribution is gone for
    any LN placement); xi2 the input projections' rows (weights and biases) that compute them."""
    import torch

    block, prefix = _block(model, stack, index)
    out_pattern, in_patterns = _arch(model).ffn
    outs, ins = _matching(block, (out_pattern,)), _matching(block, in_patterns)
    if len(outs) != 1 or not ins:
        raise ModelError(
            f"{type(model).__name__}: no FFN projections found in {prefix.rstrip('.')}",
            "report the architecture; kdpipe.compress.surgery names FFN projections per model type",
        )
    (out_name, out), width = next(iter(outs.items())), _ffn_width(next(iter(outs.values())))
    bad = [j for j in neurons if not 0 <= j < width] if neurons else ["none"]
    if bad or len(set(neurons)) != len(neurons):
        raise ConfigError(f"neurons {neurons}: must be distinct FFN neurons of 0..{width - 1}", f"FFN width {width}")
    idx = torch.tensor(sorted(neurons), dtype=torch.long)
    xi1 = {f"{prefix}{out_name}.weight": _mask(out.weight, idx, out_side=True, conv=_is_conv1d(out))}
    xi2: dict[str, Any] = {}
    for name, mod in ins.items():
        for pname, p in mod.named_parameters(recurse=False):
            xi2[f"{prefix}{name}.{pname}"] = _mask(p, idx, out_side=False, conv=_is_conv1d(mod))
    return xi1, xi2


def _is_conv1d(module: Any) -> bool:
    """GPT-2's Conv1D stores weight as (in, out), the transpose of nn.Linear."""
    return type(module).__name__ == "Conv1D"


def _ffn_width(out: Any) -> int:
    return int(out.weight.shape[0] if _is_conv1d(out) else out.weight.shape[1])


def _mask(param: Any, idx: Any, out_side: bool, conv: bool) -> Any:
    """A bool mask of param's shape selecting the hidden neurons idx: the inputs of the output projection
    (out_side) or the outputs of an input projection; a bias is 1-D and indexed directly."""
    import torch

    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    if param.dim() == 1:
        mask[idx.to(param.device)] = True
        return mask
    # Linear weight (out, in): neuron j is column j of the output projection, row j of an input projection;
    # Conv1D weight (in, out) is the transpose.
    dim = (0 if conv else 1) if out_side else (1 if conv else 0)
    mask.index_fill_(dim, idx.to(param.device), True)
    return mask
