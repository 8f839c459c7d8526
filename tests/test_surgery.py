"""kdpipe.compress.surgery on tiny models of every family it lists: layer removal per stack (saved, reloaded, generated
from, exported to ONNX), zeroing a block's xi1 against removing it, FFN neurons, and hostile specs."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdpipe.compress import surgery
from kdpipe.errors import ConfigError, ModelError

VOCAB = 100
SIZE = dict(vocab_size=VOCAB, max_position_embeddings=64)
BART = dict(
    d_model=32,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    attn_implementation="eager",
    **SIZE,
)
DECODER = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
    **SIZE,
)


def _config(name: str, **over: Any) -> Any:
    import transformers as T

    configs: dict[str, Callable[[], Any]] = {
        "bert": lambda: T.BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, num_labels=3, **SIZE
        ),
        "llama": lambda: T.LlamaConfig(**DECODER),
        "qwen2": lambda: T.Qwen2Config(**DECODER),
        "gpt2": lambda: T.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=4, n_head=2, bos_token_id=1, eos_token_id=2
        ),
        "marian": lambda: T.MarianConfig(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **BART),
        "mbart": lambda: T.MBartConfig(
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, **BART
        ),
        "t5": lambda: T.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=4,
            num_decoder_layers=4,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    }
    config = configs[name]()
    for key, value in over.items():
        setattr(config, key, value)
    return config


CLASSES = {
    "bert": "BertForSequenceClassification",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "marian": "MarianMTModel",
    "mbart": "MBartForConditionalGeneration",
    "t5": "T5ForConditionalGeneration",
}
ENC_DEC = ("marian", "mbart", "t5")


def _perturb(model: Any, seed: int) -> Any:
    """Move every trainable tensor off HF's init (norms far from (1, 0)) so that equalities are not luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue  # Marian's sinusoidal positions: recomputed, never trained
            scale = 0.3 if "norm" in name.lower() or ".ln_" in name else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def build(name: str, seed: int = 0, **over: Any) -> Any:
    import transformers as T

    torch.manual_seed(seed)
    model = getattr(T, CLASSES[name])(_config(name, **over))
    return _perturb(model, seed).eval()


@functools.cache
def teacher(name: str) -> Any:
    """One tiny teacher per family for the whole module; tests that change one work on a deepcopy."""
    return build(name)


def ids(batch: int = 3, seq: int = 7, seed: int = 0) -> torch.Tensor:
    """Random real tokens (no pad/bos/eos/start ids, which are all below 3)."""
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def model_inputs(name: str, inputs: torch.Tensor | None = None) -> dict[str, Any]:
    x = ids() if inputs is None else inputs
    kwargs: dict[str, Any] = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if name in ENC_DEC:
        kwargs["decoder_input_ids"] = ids(3, 5, seed=1)
    if name == "bert":
        kwargs["attention_mask"][0, -2:] = 0  # one padded row
        kwargs["token_type_ids"] = torch.zeros_like(x)
    return kwargs


def logits(model: Any, name: str, inputs: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(name, inputs)).logits


# --- stacks -------------------------------------------------------------------------------------------------

EXPECTED_STACKS = {
    "bert": {"encoder": ("bert.encoder.layer", ("num_hidden_layers",))},
    "llama": {"decoder": ("model.layers", ("num_hidden_layers",))},
    "qwen2": {"decoder": ("model.layers", ("num_hidden_layers",))},
    "gpt2": {"decoder": ("transformer.h", ("n_layer",))},
    "marian": {
        "encoder": ("model.encoder.layers", ("encoder_layers", "num_hidden_layers")),
        "decoder": ("model.decoder.layers", ("decoder_layers",)),
    },
    "mbart": {
        "encoder": ("model.encoder.layers", ("encoder_layers", "num_hidden_layers")),
        "decoder": ("model.decoder.layers", ("decoder_layers",)),
    },
    "t5": {
        "encoder": ("encoder.block", ("num_layers",)),
        "decoder": ("decoder.block", ("num_decoder_layers",)),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_STACKS))
def test_stacks_are_found_under_task_heads(name: str) -> None:
    found = surgery.stacks(teacher(name))
    assert {s: (st.path, st.config_keys) for s, st in found.items()} == EXPECTED_STACKS[name]
    assert all(st.size == 4 and st.name == s for s, st in found.items())


@pytest.mark.parametrize(
    ("cls", "name", "paths"),
    [
        ("BertModel", "bert", {"encoder": "encoder.layer"}),
        ("LlamaModel", "llama", {"decoder": "layers"}),
        ("GPT2Model", "gpt2", {"decoder": "h"}),
        ("MarianModel", "marian", {"encoder": "encoder.layers", "decoder": "decoder.layers"}),
        ("T5EncoderModel", "t5", {"encoder": "encoder.block"}),
    ],
)
def test_stacks_are_found_in_base_models(cls: str, name: str, paths: dict[str, str]) -> None:
    import transformers as T

    model = getattr(T, cls)(_config(name))
    assert {s: st.path for s, st in surgery.stacks(model).items()} == paths
    student, _ = surgery.remove_layers(model, {next(iter(paths)): [1, 2]})
    assert surgery.stacks(student)[next(iter(paths))].size == 2


def test_mpnet_and_roberta_are_encoder_stacks() -> None:
    import transformers as T

    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    mpnet = T.MPNetForSequenceClassification(T.MPNetConfig(**small))
    assert surgery.stacks(mpnet)["encoder"].path == "mpnet.encoder.layer"
    assert surgery.zeroed_params(mpnet, "encoder", 1) == [
        "mpnet.encoder.layer.1.attention.attn.o.weight",
        "mpnet.encoder.layer.1.attention.attn.o.bias",
        "mpnet.encoder.layer.1.output.dense.weight",
        "mpnet.encoder.layer.1.output.dense.bias",
    ]
    roberta = T.RobertaModel(T.RobertaConfig(pad_token_id=1, **small))
    assert surgery.stacks(roberta)["encoder"].path == "encoder.layer"
    assert surgery.residual_identity(roberta)[0] is False


# --- remove_layers, save, reload, generate, ONNX ------------------------------------------------------------

ROUNDTRIP = {
    "bert": ([0, 2], "AutoModelForSequenceClassification", "ORTModelForSequenceClassification", "text-classification"),
    "llama": ([0, 1, 3], "AutoModelForCausalLM", "ORTModelForCausalLM", "text-generation-with-past"),
    "marian": (
        {"encoder": "all", "decoder": [0, 1, 3]},
        "AutoModelForSeq2SeqLM",
        "ORTModelForSeq2SeqLM",
        "text2text-generation-with-past",
    ),
}


def _export(model_dir: Path, out: Path, task: str) -> None:
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(model_dir), output=str(out), task=task, do_validation=False, no_post_process=True, device="cpu")


def _generate(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)


def _onnx_logits(ort: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ort(**model_inputs(name, x)).logits)


@pytest.mark.parametrize("name", sorted(ROUNDTRIP))
def test_student_saves_reloads_generates_and_exports(name: str, tmp_path: Path) -> None:
    import optimum.onnxruntime as ort_models
    import transformers as T

    spec, auto, ort_cls, task = ROUNDTRIP[name]
    t = teacher(name)
    keep = surgery.parse_keep(spec, surgery.stacks(t))
    student, _ = surgery.remove_layers(t, keep)
    student.save_pretrained(tmp_path / "pt", safe_serialization=True)
    reloaded = getattr(T, auto).from_pretrained(tmp_path / "pt", local_files_only=True).eval()
    assert type(reloaded) is type(t)
    depth = {s: st.size for s, st in surgery.stacks(reloaded).items()}
    assert depth == {s: len(v) for s, v in keep.items()}
    if name == "marian":
        assert (reloaded.config.encoder_layers, reloaded.config.decoder_layers) == (4, 3)
    else:
        assert reloaded.config.num_hidden_layers == len(spec)
    x = ids(3, 9, seed=2)
    ref = logits(student, name, x)
    torch.testing.assert_close(logits(reloaded, name, x), ref, rtol=0, atol=1e-6)
    greedy = None
    if name != "bert":
        greedy = _generate(student, x)
        assert greedy.shape[1] > (x.shape[1] if name == "llama" else 1)
        assert torch.equal(_generate(reloaded, x), greedy)
    _export(tmp_path / "pt", tmp_path / "onnx", task)
    onnx = getattr(ort_models, ort_cls).from_pretrained(tmp_path / "onnx")
    torch.testing.assert_close(_onnx_logits(onnx, name, x).float(), logits(student, name, x), rtol=0, atol=1e-4)
    if greedy is not None:
        assert torch.equal(_generate(onnx, x), greedy)


# --- zeroing xi1 == removing the block (pre-LN) ------------------------------------------------------------

PRE_LN = [
    ("llama", "decoder", 2),
    ("qwen2", "decoder", 0),
    ("gpt2", "decoder", 1),
    ("mbart", "encoder", 1),
    ("mbart", "decoder", 3),
    ("t5", "encoder", 0),  # block 0 holds the relative attention bias the others reuse
    ("t5", "decoder", 2),
]


def _zeroed(model: Any, names: list[str]) -> Any:
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].zero_()
    return out


@pytest.mark.parametrize(("name", "stack", "k"), PRE_LN)
def test_zeroing_xi1_equals_removing_the_block_pre_ln(name: str, stack: str, k: int) -> None:
    t = teacher(name)
    assert surgery.residual_identity(t)[0] is True
    xi1 = surgery.zeroed_params(t, stack, k)
    student, _ = surgery.remove_layers(t, {stack: [i for i in range(4) if i != k]})
    zeroed = logits(_zeroed(t, xi1), name)
    torch.testing.assert_close(zeroed, logits(student, name), rtol=0, atol=1e-5)
    assert (zeroed - logits(t, name)).abs().max() > 1e-4  # the block did something before (10x the atol)


@pytest.mark.parametrize(("name", "stack"), [("bert", "encoder"), ("marian", "decoder")])
def test_zeroing_is_only_approximate_post_ln(name: str, stack: str) -> None:
    """Post-LN: LN(h + 0) != h, so the zeroed block still renormalises; the prior code must know."""
    t = teacher(name)
    identity, reason = surgery.residual_identity(t)
    assert identity is False and "post-LN" in reason
    student, _ = surgery.remove_layers(t, {stack: [0, 1, 3]})
    zeroed = logits(_zeroed(t, surgery.zeroed_params(t, stack, 2)), name)
    assert (zeroed - logits(student, name)).abs().max() > 1e-4


ZEROED = {
    ("bert", "encoder"): [
        "bert.encoder.layer.2.attention.output.dense.weight",
        "bert.encoder.layer.2.attention.output.dense.bias",
        "bert.encoder.layer.2.output.dense.weight",
        "bert.encoder.layer.2.output.dense.bias",
    ],
    ("llama", "decoder"): ["model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"],
    ("gpt2", "decoder"): [
        "transformer.h.2.attn.c_proj.weight",
        "transformer.h.2.attn.c_proj.bias",
        "transformer.h.2.mlp.c_proj.weight",
        "transformer.h.2.mlp.c_proj.bias",
    ],
    ("marian", "encoder"): [
        "model.encoder.layers.2.self_attn.out_proj.weight",
        "model.encoder.layers.2.self_attn.out_proj.bias",
        "model.encoder.layers.2.fc2.weight",
        "model.encoder.layers.2.fc2.bias",
    ],
    ("marian", "decoder"): [
        "model.decoder.layers.2.self_attn.out_proj.weight",
        "model.decoder.layers.2.self_attn.out_proj.bias",
        "model.decoder.layers.2.encoder_attn.out_proj.weight",
        "model.decoder.layers.2.encoder_attn.out_proj.bias",
        "model.decoder.layers.2.fc2.weight",
        "model.decoder.layers.2.fc2.bias",
    ],
    ("t5", "encoder"): [
        "encoder.block.2.layer.0.SelfAttention.o.weight",
        "encoder.block.2.layer.1.DenseReluDense.wo.weight",
    ],
    ("t5", "decoder"): [
        "decoder.block.2.layer.0.SelfAttention.o.weight",
        "decoder.block.2.layer.1.EncDecAttention.o.weight",
        "decoder.block.2.layer.2.DenseReluDense.wo.weight",
    ],
}


@pytest.mark.parametrize(("name", "stack"), sorted(ZEROED))
def test_xi1_and_xi2_partition_the_block(name: str, stack: str) -> None:
    t = teacher(name)
    xi1, xi2 = surgery.zeroed_params(t, stack, 2), surgery.removed_params(t, stack, 2)
    assert sorted(xi1) == sorted(ZEROED[(name, stack)])
    path = surgery.stacks(t)[stack].path
    block = {n for n, _ in t.named_parameters() if n.startswith(f"{path}.2.")}
    assert set(xi1) | set(xi2) == block and not set(xi1) & set(xi2)


# --- FFN neurons --------------------------------------------------------------------------------------------


def _drop(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p without the masked slice: a 1-D bias loses its entries, a matrix its fully masked rows or columns."""
    if p.dim() == 1:
        return p[~mask]
    return p[~mask.all(1)][:, ~mask.all(0)]


def _physically_removed(model: Any, masks: dict[str, torch.Tensor]) -> Any:
    out = copy.deepcopy(model)
    for full, mask in masks.items():
        module_name, _, pname = full.rpartition(".")
        module = out.get_submodule(module_name)
        smaller = _drop(getattr(module, pname).detach(), mask).clone()
        assert smaller.numel() == int((~mask).sum())
        setattr(module, pname, torch.nn.Parameter(smaller))
        if type(module).__name__ == "Conv1D" and pname == "weight":
            module.nf = smaller.shape[1]  # GPT-2's Conv1D reshapes its output to nf
    return out


@pytest.mark.parametrize(
    ("name", "stack", "over"),
    [
        ("bert", "encoder", {}),
        ("llama", "decoder", {}),
        ("gpt2", "decoder", {}),
        ("marian", "decoder", {}),
        ("t5", "encoder", {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True}),
    ],
)
def test_ffn_neurons_zeroing_xi1_equals_removing_them(name: str, stack: str, over: dict[str, Any]) -> None:
    t = build(name, seed=3, **over) if over else teacher(name)
    neurons = [0, 5, 17, 63] if name != "gpt2" else [0, 5, 17, 127]  # GPT-2's FFN is 4 x n_embd
    xi1, xi2 = surgery.ffn_neurons(t, stack, 1, neurons)
    assert len(xi1) == 1 and xi2
    if over:
        assert {n.rsplit(".", 2)[-2] for n in xi2} == {"wi_0", "wi_1"}
    params = dict(t.named_parameters())
    for n, mask in {**xi1, **xi2}.items():
        assert mask.shape == params[n].shape and mask.dtype == torch.bool
        assert int(mask.sum()) == len(neurons) * (params[n].numel() // _ffn_size(params[n], mask))
    zeroed = copy.deepcopy(t)
    zparams = dict(zeroed.named_parameters())
    with torch.no_grad():
        for n, mask in xi1.items():
            zparams[n][mask] = 0.0
    removed = _physically_removed(t, {**xi1, **xi2})
    torch.testing.assert_close(logits(zeroed, name), logits(removed, name), rtol=0, atol=1e-5)
    assert (logits(zeroed, name) - logits(t, name)).abs().max() > 1e-4


def _ffn_size(p: torch.Tensor, mask: torch.Tensor) -> int:
    """The length of the FFN axis of p (the one the mask selects along)."""
    if p.dim() == 1:
        return p.shape[0]
    return p.shape[1] if bool(mask.all(0).any()) else p.shape[0]


def test_ffn_neurons_rejects_bad_indices() -> None:
    with pytest.raises(ConfigError, match="neurons"):
        surgery.ffn_neurons(teacher("llama"), "decoder", 0, [64])
    with pytest.raises(ConfigError, match="neurons"):
        surgery.ffn_neurons(teacher("llama"), "decoder", 0, [1, 1])


# --- remove_layers: the teacher, the name map, ties, dtype, T5's bias --------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_remove_layers_leaves_the_teacher_and_maps_every_parameter(name: str) -> None:
    t = teacher(name)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    config_before = t.config.to_dict()
    keep = {s: [1, 3] for s in surgery.stacks(t)}
    student, name_map = surgery.remove_layers(t, keep)
    after = t.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert t.config.to_dict() == config_before and not t.training and not student.training
    t_params, s_params = dict(t.named_parameters()), dict(student.named_parameters())
    assert set(name_map) == set(s_params)
    for s_name, t_name in name_map.items():
        assert t_name in t_params, t_name
        assert s_params[s_name].shape == t_params[t_name].shape
        assert torch.equal(s_params[s_name], t_params[t_name])
        assert s_params[s_name].data_ptr() != t_params[t_name].data_ptr()
    for stack, kept in keep.items():
        prefix = surgery.stacks(t)[stack].path + "."
        for s_name, t_name in name_map.items():
            if s_name.startswith(prefix) and "relative_attention_bias" not in s_name:
                i, rest = s_name[len(prefix) :].split(".", 1)
                assert t_name == f"{prefix}{kept[int(i)]}.{rest}"
    if hasattr(t, "get_output_embeddings") and t.config.tie_word_embeddings and name != "bert":
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_t5_block_zero_keeps_the_relative_attention_bias() -> None:
    t = teacher("t5")
    student, name_map = surgery.remove_layers(t, {"encoder": [1, 2], "decoder": [2, 3]})
    for stack in ("encoder", "decoder"):
        key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert name_map[key] == key
        assert torch.equal(student.get_parameter(key), t.get_parameter(key))
        first = 1 if stack == "encoder" else 2  # the first kept teacher block
        q = "layer.0.SelfAttention.q.weight"
        assert name_map[f"{stack}.block.0.{q}"] == f"{stack}.block.{first}.{q}"
    assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 2)


def test_remove_layers_keeps_dtype_mode_and_per_layer_config() -> None:
    t = copy.deepcopy(teacher("qwen2")).to(torch.bfloat16).train()
    student, _ = surgery.remove_layers(t, {"decoder": [0, 3]})
    assert student.training and student.dtype == torch.bfloat16
    assert student.config.num_hidden_layers == 2 and len(student.config.layer_types) == 2
    gpt2, _ = surgery.remove_layers(teacher("gpt2"), {"decoder": [2]})
    assert gpt2.config.n_layer == 1 and len(gpt2.transformer.h) == 1


def test_remove_layers_remaps_pruned_heads() -> None:
    t = copy.deepcopy(teacher("bert"))
    t.prune_heads({1: [0], 2: [1]})
    student, _ = surgery.remove_layers(t, {"encoder": [1, 3]})
    assert student.config.pruned_heads == {0: [0]}
    assert student.bert.encoder.layer[0].attention.self.num_attention_heads == 1
    torch.testing.assert_close(logits(student, "bert"), logits(student, "bert"))


# --- hostile specs ------------------------------------------------------------------------------------------


def test_parse_keep_accepts_lists_dicts_and_all() -> None:
    bert, marian = surgery.stacks(teacher("bert")), surgery.stacks(teacher("marian"))
    assert surgery.parse_keep([0, 2], bert) == {"encoder": [0, 2]}
    assert surgery.parse_keep({"encoder": "all"}, bert) == {"encoder": [0, 1, 2, 3]}
    assert surgery.parse_keep({"decoder": [1]}, marian) == {"encoder": [0, 1, 2, 3], "decoder": [1]}


@pytest.mark.parametrize(
    ("spec", "model", "field"),
    [
        ([0, 4], "bert", "student.layers: indices [4]"),
        ([-1, 2], "llama", "student.layers: indices [-1]"),
        ([0, 0, 1], "bert", "student.layers: [0, 0, 1] must be increasing"),
        ([2, 1], "bert", "must be increasing"),
        ([], "llama", "student.layers: keeps no layer"),
        ({"decoder": [0, 9]}, "marian", "student.layers.decoder: indices [9]"),
        ({"decoder": [1, 1]}, "t5", "student.layers.decoder"),
        ({"encoder": []}, "marian", "student.layers.encoder: keeps no layer"),
        ({"decodr": [0]}, "marian", "student.layers.decodr: the model has no stack"),
        ({"encoder": [0]}, "llama", "student.layers.encoder: the model has no stack"),
        ([0, 1], "marian", "student.layers: a list of layers is ambiguous"),
        ({"decoder": "some"}, "marian", "student.layers.decoder: expected 'all'"),
        ({"decoder": [0, True]}, "marian", "student.layers.decoder"),
        ("every-other", "bert", "student.layers: expected"),
    ],
)
def test_parse_keep_rejects_bad_specs(spec: Any, model: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        surgery.parse_keep(spec, surgery.stacks(teacher(model)))
    assert field in err.value.message and err.value.hint
    assert "\n" not in err.value.message


def test_hint_suggests_the_stack_name() -> None:
    with pytest.raises(ConfigError) as err:
        surgery.parse_keep({"decodr": [0]}, surgery.stacks(teacher("marian")))
    assert "did you mean 'decoder'" in err.value.hint


def test_remove_layers_and_block_lookups_reject_bad_input() -> None:
    with pytest.raises(ConfigError, match="keep.decodr"):
        surgery.remove_layers(teacher("marian"), {"decodr": [0]})
    with pytest.raises(ConfigError, match=r"keep.decoder: indices \[7\]"):
        surgery.remove_layers(teacher("marian"), {"decoder": [7]})
    with pytest.raises(ConfigError, match="decoder layer 4"):
        surgery.zeroed_params(teacher("llama"), "decoder", 4)
    with pytest.raises(ConfigError, match="no such stack"):
        surgery.removed_params(teacher("llama"), "encoder", 0)


def test_unknown_model_type_is_a_model_error() -> None:
    import transformers as T

    model = T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    with pytest.raises(ModelError) as err:
        surgery.stacks(model)
    assert "'distilbert'" in err.value.message and "bert" in err.value.hint and "t5" in err.value.hint
    fake = SimpleNamespace(config=SimpleNamespace(model_type="mamba"))
    for call in (surgery.stacks, surgery.residual_identity):
        with pytest.raises(ModelError, match="mamba"):
            call(fake)
