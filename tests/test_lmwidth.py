"""Minitron-style width pruning of causal LMs (kdpipe.compress.lmwidth) on tiny Llama / Qwen / GPT-2 models built
in code: planted dead / boosted neurons and KV groups, exact removal, config round-trips, generation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kdpipe.compress.lmwidth import LMWidthInfo, prune_lm_width
from kdpipe.errors import ConfigError, DataError, ModelError

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest.py already set it before transformers was imported above

VOCAB, HIDDEN, FFN, LAYERS = 64, 32, 64, 2


def tiny_llama(seed: int = 0, heads: int = 4, kv_heads: int = 2) -> Any:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def make_batches(seed: int = 1, n: int = 2, batch: int = 3, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches: row r has seq - 2r real tokens, the rest is padding (id 0, mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for r in range(batch):
            mask[r, seq - 2 * r :] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def logits(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Logits at real tokens only (padding positions are free to differ)."""
    with torch.no_grad():
        return [model(**b).logits[b["attention_mask"] == 1] for b in batches]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def kept_rows(old: torch.Tensor, new: torch.Tensor) -> list[int]:
    """For each row of `new`, the index of the equal row of `old` (rows are distinct random vectors)."""
    out = []
    for row in new:
        hits = [i for i in range(old.shape[0]) if torch.equal(old[i], row)]
        assert len(hits) == 1
        out.append(hits[0])
    return out


def kept_groups(old_k: torch.Tensor, new_k: torch.Tensor, head_dim: int) -> list[int]:
    """KV heads kept, from the rows of k_proj (each head's block of head_dim rows)."""
    rows = kept_rows(old_k, new_k)
    return [rows[j] // head_dim for j in range(0, len(rows), head_dim)]


# ----------------------------------------------------------------------------------------------- no-op


def test_zero_fractions_change_nothing() -> None:
    model = tiny_llama()
    batches = make_batches()
    before = logits(model, batches)
    n_params = sum(p.numel() for p in model.parameters())
    pruned, info = prune_lm_width(model, batches, ffn=0.0, heads=0.0)
    assert pruned is model
    assert_close(logits(pruned, batches), before, atol=1e-6)
    assert info == LMWidthInfo(
        ffn_before=FFN,
        ffn_after=FFN,
        kv_groups_before=2,
        kv_groups_after=2,
        heads_before=4,
        heads_after=4,
        params_before=n_params,
        params_after=n_params,
        scored_tokens=2 * (12 + 10 + 8),
    )
    json.dumps(asdict(info))
    assert not model.training


# ------------------------------------------------------------------------------------- planted importance

DEAD = {0: [2, 9, 17, 30, 31, 40, 55, 63, 1, 4, 6, 11, 20, 44, 50, 60], 1: list(range(48, 64))}
BOOSTED = {0: [3, 10, 21, 33, 42, 47, 58, 62], 1: [0, 7, 15, 23, 31, 39, 47, 55]}


def test_dead_ffn_neurons_are_the_ones_removed() -> None:
    model = tiny_llama()
    with torch.no_grad():
        for i, dead in DEAD.items():
            model.model.layers[i].mlp.gate_proj.weight[dead] = 0  # act(0) * up = 0: activation exactly 0
    old = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    _, info = prune_lm_width(model, make_batches(), ffn=0.25, heads=0.0)
    assert info.ffn_after == 48
    for i, dead in DEAD.items():
        kept = kept_rows(old[i], model.model.layers[i].mlp.up_proj.weight)
        assert sorted(set(range(FFN)) - set(kept)) == sorted(dead)
        assert kept == sorted(kept)  # order preserved


def test_boosted_ffn_neurons_are_kept() -> None:
    model = tiny_llama()
    with torch.no_grad():
        for i, boosted in BOOSTED.items():
            model.model.layers[i].mlp.up_proj.weight[boosted] *= 1e3
    old = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    _, info = prune_lm_width(model, make_batches(), ffn=0.875, heads=0.0)
    assert info.ffn_after == 8
    for i, boosted in BOOSTED.items():
        assert kept_rows(old[i], model.model.layers[i].mlp.up_proj.weight) == boosted


@pytest.mark.parametrize(("dead", "keep"), [({0: [0, 2], 1: [3, 1]}, {0: [1, 3], 1: [0, 2]})])
def test_dead_kv_groups_removed_boosted_kept(dead: dict[int, list[int]], keep: dict[int, list[int]]) -> None:
    model = tiny_llama(heads=8, kv_heads=4)  # head_dim 4, 2 query heads per KV head
    hd = 4
    with torch.no_grad():
        for i, groups in dead.items():
            v = model.model.layers[i].self_attn.v_proj.weight
            for g in groups:
                v[g * hd : (g + 1) * hd] = 0  # values 0 -> the group's query heads output exactly 0
    old = [layer.self_attn.k_proj.weight.detach().clone() for layer in model.model.layers]
    _, info = prune_lm_width(model, make_batches(), ffn=0.0, heads=0.5)
    assert (info.kv_groups_after, info.heads_after) == (2, 4)
    for i in dead:
        assert kept_groups(old[i], model.model.layers[i].self_attn.k_proj.weight, hd) == keep[i]

    model = tiny_llama(heads=8, kv_heads=4)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[3 * hd : 4 * hd] *= 1e3
        model.model.layers[1].self_attn.v_proj.weight[1 * hd : 2 * hd] *= 1e3
    old = [layer.self_attn.k_proj.weight.detach().clone() for layer in model.model.layers]
    _, info = prune_lm_width(model, make_batches(), ffn=0.0, heads=0.75)
    assert info.kv_groups_after == 1
    assert kept_groups(old[0], model.model.layers[0].self_attn.k_proj.weight, hd) == [3]
    assert kept_groups(old[1], model.model.layers[1].self_attn.k_proj.weight, hd) == [1]


# ------------------------------------------------------------------------------------------- exactness


def test_removing_silent_neurons_and_groups_is_exact() -> None:
    model = tiny_llama()
    hd = HIDDEN // 4
    with torch.no_grad():
        for i, dead in DEAD.items():
            mlp = model.model.layers[i].mlp
            mlp.down_proj.weight[:, dead] = 0  # contributes nothing ...
            mlp.gate_proj.weight[dead] = 0  # ... and scores 0, so it is the one removed
        attn = model.model.layers[0].self_attn
        attn.o_proj.weight[:, 0 : 2 * hd] = 0  # group 0 = query heads 0, 1
        attn.v_proj.weight[0:hd] = 0
        attn = model.model.layers[1].self_attn
        attn.o_proj.weight[:, 2 * hd : 4 * hd] = 0  # group 1 = query heads 2, 3
        attn.v_proj.weight[hd : 2 * hd] = 0
    batches = make_batches()
    before = logits(model, batches)
    _, info = prune_lm_width(model, batches, ffn=0.25, heads=0.5)
    assert (info.ffn_after, info.kv_groups_after, info.heads_after) == (48, 1, 2)
    assert_close(logits(model, batches), before, atol=1e-5)


def test_o_proj_silent_group_alone_is_removed_exactly() -> None:
    """Only o_proj columns zero (values still flow): the score sees non-zero outputs, so also silence v to make
    the group the least important; removal of a group whose o_proj columns are 0 must be exact."""
    model = tiny_llama()
    hd = HIDDEN // 4
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 2 * hd :] = 0
            layer.self_attn.v_proj.weight[hd:] *= 1e-3  # tiny but non-zero output: group 1 scores lowest
    batches = make_batches()
    before = logits(model, batches)
    prune_lm_width(model, batches, ffn=0.0, heads=0.5)
    assert_close(logits(model, batches), before, atol=1e-5)


# -------------------------------------------------------------------------------------- shapes, config


def test_shapes_config_roundtrip_and_tied_embeddings(tmp_path: Path) -> None:
    model = tiny_llama()
    batches = make_batches()
    _, info = prune_lm_width(model, batches, ffn=0.5, heads=0.5)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 2, 1, 8)
    assert info.params_after < info.params_before == sum(p.numel() for p in tiny_llama().parameters())
    assert info.params_after == sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (32, HIDDEN)
        assert layer.mlp.down_proj.weight.shape == (HIDDEN, 32)
        assert layer.self_attn.q_proj.weight.shape == (16, HIDDEN)
        assert layer.self_attn.k_proj.weight.shape == (8, HIDDEN)
        assert layer.self_attn.o_proj.weight.shape == (HIDDEN, 16)
        assert layer.self_attn.num_key_value_groups == 2
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.head_dim == 8 and loaded.config.num_attention_heads == 2
    assert_close(logits(loaded, batches), logits(model, batches), atol=0)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_models_roundtrip(kind: str, tmp_path: Path) -> None:
    cls, model_cls = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),  # q_norm / k_norm over head_dim
        "mistral": ("MistralConfig", "MistralForCausalLM"),
    }[kind]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = getattr(transformers, model_cls)(config).eval()
    batches = make_batches()
    _, info = prune_lm_width(model, batches, ffn=0.5, heads=0.5)
    assert (info.ffn_after, info.heads_after, info.kv_groups_after) == (32, 2, 1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(logits(loaded, batches), logits(model, batches), atol=0)


# ----------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_ffn_pruning_removes_dead_neurons_and_roundtrips(tmp_path: Path) -> None:
    model = tiny_gpt2()
    width = 4 * HIDDEN
    dead = {0: list(range(0, width, 2)), 1: list(range(1, width, 2))}
    with torch.no_grad():
        for i, cols in dead.items():
            mlp = model.transformer.h[i].mlp
            mlp.c_fc.weight[:, cols] = 0  # Conv1D weight is (in, out)
            mlp.c_fc.bias[cols] = 0  # gelu(0) = 0
            mlp.c_proj.weight[cols] = 0
    old = [h.mlp.c_fc.weight.detach().t().clone() for h in model.transformer.h]
    batches = make_batches()
    before = logits(model, batches)
    _, info = prune_lm_width(model, batches, ffn=0.5, heads=0.0)
    assert (info.ffn_before, info.ffn_after) == (width, width // 2)
    assert (info.heads_before, info.heads_after) == (4, 4)
    assert model.config.n_inner == width // 2
    for i, cols in dead.items():
        kept = kept_rows(old[i], model.transformer.h[i].mlp.c_fc.weight.t())
        assert sorted(set(range(width)) - set(kept)) == cols
    assert_close(logits(model, batches), before, atol=1e-5)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(logits(loaded, batches), logits(model, batches), atol=0)


def test_gpt2_head_pruning_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Llama-family") as e:
        prune_lm_width(tiny_gpt2(), make_batches(), ffn=0.0, heads=0.25)
    assert e.value.hint


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("ffn", "heads"), [(1.0, 0.0), (0.0, 1.0), (-0.1, 0.0), (0.0, 1.5)])
def test_fraction_outside_range_is_a_config_error(ffn: float, heads: float) -> None:
    with pytest.raises(ConfigError):
        prune_lm_width(tiny_llama(), make_batches(), ffn=ffn, heads=heads)


def test_no_data_is_a_data_error() -> None:
    model = tiny_llama()
    with pytest.raises(DataError):
        prune_lm_width(model, [], ffn=0.5, heads=0.0)
    batches = make_batches()
    for b in batches:
        b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    with pytest.raises(DataError, match="no real token"):
        prune_lm_width(model, batches, ffn=0.5, heads=0.0)
    assert model.config.intermediate_size == FFN  # nothing was pruned


def test_unknown_model_is_a_model_error() -> None:
    fake = cast(Any, SimpleNamespace(config=SimpleNamespace(model_type="t5")))
    with pytest.raises(ModelError, match="t5") as e:
        prune_lm_width(fake, make_batches(), ffn=0.5, heads=0.0)
    assert e.value.hint


# ------------------------------------------------------------------------------------------ generation


def test_generation_after_pruning_matches_with_and_without_cache() -> None:
    model = tiny_llama()
    prune_lm_width(model, make_batches(), ffn=0.5, heads=0.5)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kwargs)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kwargs)
    assert cached.shape == (2, 9)
    assert torch.equal(cached, uncached)
