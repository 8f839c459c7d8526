"""Causal-LM export and profile (kdpipe.tasks.causal_lm.export / .profile, kdpipe.profiling.generation's causal_lm
workload) on a tiny Llama and a tiny GPT-2 built in code, briefly trained on a few sentences so that their greedy
generations are not a coin toss, saved with a byte-level BPE tokenizer made in code."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdpipe.errors import ConfigError, ModelError

pytest.importorskip("optimum.exporters.onnx")

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model speaks in short words and plain sentences",
    "hello world, this is a test of the tiny language model",
    "the lazy dog sleeps while the quick fox runs away",
    "short words make a small model easy to train on a laptop",
    "every test of the model starts with a prompt and ends with tokens",
]
HELD_OUT = [
    "the quick fox runs over the lazy dog",
    "a tiny model speaks in plain words",
    "this is a test of the small language model",
]
PROMPTS = ["the quick brown", "a small model", "hello world, this"]
NEW = 12


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=end, eos_token=end, pad_token=end)


def _model(arch: str, vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    gpt2 = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(gpt2)


def _train(model: Any, tok: Any, steps: int = 120) -> None:
    """A few AdamW steps on 24-token windows of the sentences (peaked next-token distributions)."""
    import torch

    stream = torch.tensor(tok(" ".join(TEXTS * 3))["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 25, (8,), generator=gen)
        batch = torch.stack([stream[s : s + 24] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Per architecture: the saved model, its fp32 export (spec), parity, the fp32 PyTorch reference judged on the
    held-out texts, and the int8-dynamic / int4 variants with their gates. Built once for the module."""
    import torch

    from kdpipe.tasks.causal_lm import export as ex

    root = tmp_path_factory.mktemp("clm")
    tok = _tokenizer()
    out: dict[str, Any] = {"root": root}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: spinning OpenMP threads made training and parity 5-15x slower
    for arch in ("llama", "gpt2"):
        torch.manual_seed(0)
        model = _model(arch, len(tok))
        _train(model, tok)
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        spec = ex.export_lm(root / arch, root / f"{arch}-onnx")
        parity = ex.lm_parity(root / arch, root / f"{arch}-onnx", PROMPTS, NEW, 1e-4)
        ref = ex.judge_torch(root / arch, HELD_OUT, PROMPTS, NEW)
        variants = {}
        for v in ex.VARIANTS:
            done = ex.make_lm_variant(root / f"{arch}-onnx", root / f"{arch}-{v}", v)
            gate = ex.lm_gate(ex.judge_onnx(root / f"{arch}-{v}", HELD_OUT, PROMPTS, NEW), ref)
            variants[v] = (done, gate)
        out[arch] = {"spec": spec, "parity": parity, "ref": ref, "variants": variants}
    yield out
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_with_past_has_dynamic_axes_and_parity_holds(built: dict[str, Any], arch: str) -> None:
    spec, parity = built[arch]["spec"], built[arch]["parity"]
    assert spec["task"] == "text-generation-with-past" and "model.onnx" in spec["files"]
    assert spec["static_axes"] == []
    past = [n for n in spec["inputs"] if n.startswith("past_key_values.")]
    assert len(past) == 4  # 2 layers x key / value
    assert all(isinstance(spec["inputs"][n][2], str) for n in past)  # symbolic past length
    assert isinstance(spec["inputs"]["input_ids"][0], str) and isinstance(spec["inputs"]["input_ids"][1], str)
    assert parity.ok, parity.why
    assert parity.same_generations == parity.examples == len(PROMPTS)
    assert parity.max_abs_diff <= 1e-4 and parity.refused is None
    assert all(len(g) == NEW for g in parity.generations)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int8_and_int4_variants_quantize_the_decoder_and_pass_their_gate(built: dict[str, Any], arch: str) -> None:
    from kdpipe.tasks.causal_lm.export import GATE_METRIC, gate_line

    fp32_bytes = built[arch]["spec"]["bytes"]
    int8, g8 = built[arch]["variants"]["int8-dynamic"]
    int4, g4 = built[arch]["variants"]["int4"]
    assert int8["quantized_ops"].get("MatMulInteger", 0) >= 9 and int8["bytes"] < fp32_bytes
    # every projection (GPT-2's Conv1D exports as Gemm: rewritten to MatMul first) and the LM head
    assert int4["quantized_ops"]["MatMulNBits"] >= 9 and int4["bytes"] < fp32_bytes
    # the token-embedding table too (a tied head leaves it fp32 otherwise): no fp32 table Gather is left
    assert int4["quantized_ops"].get("GatherBlockQuantized", 0) >= 1, int4["quantized_ops"]
    ref_ppl = built[arch]["ref"].perplexity
    assert math.isfinite(ref_ppl) and ref_ppl < 50  # trained: far below the vocabulary size
    for g in (g8, g4):
        assert g.metric == GATE_METRIC and g.ok, gate_line(arch, g)
        assert g.value == pytest.approx(1 / (1 / g.value)) and g.budget == pytest.approx(g.reference / 1.05)
        assert g.nonfinite_outputs == 0 and 0.5 <= g.agreement <= 1


def test_int4_gate_planted_to_fail_on_perturbed_weights(built: dict[str, Any], tmp_path: Path) -> None:
    """A student whose weights were perturbed, exported and int4-quantised, against the clean fp32 reference: its
    held-out perplexity rises past the 5% budget, so the gate fails on the perplexity term."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdpipe.tasks.causal_lm import export as ex

    src = built["root"] / "llama"
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "noisy")
    shutil.copy(src / "tokenizer.json", tmp_path / "noisy")
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, tmp_path / "noisy")
    ex.export_lm(tmp_path / "noisy", tmp_path / "noisy-onnx")
    ex.make_lm_variant(tmp_path / "noisy-onnx", tmp_path / "noisy-int4", "int4")
    gate = ex.lm_gate(ex.judge_onnx(tmp_path / "noisy-int4", HELD_OUT, PROMPTS, NEW), built["llama"]["ref"])
    assert not gate.ok
    assert gate.value < gate.budget  # perplexity more than 5% above the reference's
    assert 1 / gate.value > 1.05 * (1 / gate.reference)
    assert "FAILED" in ex.gate_line("student-int4", gate)
    # and a zero-tolerance budget with full agreement asked is still a number check, not a crash
    strict = ex.lm_gate(ex.judge_onnx(tmp_path / "noisy-int4", HELD_OUT, PROMPTS, NEW), built["llama"]["ref"], 0.0, 1.0)
    assert not strict.ok


def _nan_copy(src: Path, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit becomes NaN
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, dst)


def test_nan_weights_fail_parity_the_gate_and_timing(built: dict[str, Any], tmp_path: Path) -> None:
    from kdpipe.config import TargetProfile
    from kdpipe.tasks.causal_lm import export as ex
    from kdpipe.tasks.causal_lm.profile import profile_lm

    _nan_copy(built["root"] / "llama", tmp_path / "nan")
    ex.export_lm(tmp_path / "nan", tmp_path / "nan-onnx")
    parity = ex.lm_parity(tmp_path / "nan", tmp_path / "nan-onnx", PROMPTS, 4, 1e-4)
    assert not parity.ok and parity.nonfinite_outputs > 0 and "non-finite" in parity.why
    assert not parity.max_abs_diff <= parity.atol  # inf: NaN never passes a comparison
    gate = ex.lm_gate(ex.judge_onnx(tmp_path / "nan-onnx", HELD_OUT, PROMPTS, 4), ex.judge_torch(
        built["root"] / "llama", HELD_OUT, PROMPTS, 4))  # fmt: skip
    assert not gate.ok and gate.nonfinite_outputs > 0
    prof = TargetProfile(name="t", intra_op_threads=1, warmup=0, min_runs=1, min_seconds=0, rounds=1)
    with pytest.raises(ModelError, match="non-finite"):
        profile_lm({"student": tmp_path / "nan-onnx"}, {}, prof, HELD_OUT, prompt_lengths=[8], max_new_tokens=4)


def _fix_axes(src: Path, dst: Path, seq: int) -> None:
    """The export with its sequence axis of input_ids and past length of every past input fixed (a static graph)."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        axis = 1 if i.name == "input_ids" else 2 if i.name.startswith("past_key_values.") else None
        if axis is not None:
            dims[axis].ClearField("dim_param")
            dims[axis].dim_value = seq
    onnx.save(model, str(dst / "model.onnx"))


def test_a_static_axis_is_refused_at_parity(built: dict[str, Any], tmp_path: Path) -> None:
    from kdpipe.tasks.causal_lm import export as ex

    _fix_axes(built["root"] / "llama-onnx", tmp_path / "static", 8)
    assert "input_ids[1]=8" in ex.static_axes(tmp_path / "static" / "model.onnx")
    parity = ex.lm_parity(built["root"] / "llama", tmp_path / "static", PROMPTS, 4, 1e-4)
    assert not parity.ok and parity.refused is not None
    assert "input_ids[1]=8" in parity.why and "past_key_values.0.key[2]=8" in parity.why
    assert "\n" not in parity.why


def test_bad_input_is_one_clear_line(built: dict[str, Any], tmp_path: Path) -> None:
    from kdpipe.tasks.causal_lm import export as ex

    llama, onnx_dir = built["root"] / "llama", built["root"] / "llama-onnx"
    cases = [
        (ConfigError, "no prompts", lambda: ex.lm_parity(llama, onnx_dir, [], 4)),
        (ConfigError, "exceeds the context", lambda: ex.lm_parity(llama, onnx_dir, ["the " * 1030], 4)),
        (ConfigError, "no held-out texts", lambda: ex.judge_onnx(onnx_dir, [], PROMPTS, 4)),
        (ConfigError, "unknown causal-LM export variant", lambda: ex.make_lm_variant(onnx_dir, tmp_path / "x", "int3")),
        (ModelError, "not a causal-LM directory", lambda: ex.export_lm(tmp_path, tmp_path / "out")),
        (ModelError, "has no model.onnx", lambda: ex.lm_parity(llama, tmp_path, PROMPTS, 4)),
        (ConfigError, "ppl_tolerance", lambda: ex.lm_gate(built["llama"]["ref"], built["llama"]["ref"], -1.0)),
    ]
    for kind, words, call in cases:
        with pytest.raises(kind, match=words) as info:
            call()
        assert "\n" not in info.value.message


def test_generation_timing_on_the_tiny_model_is_finite_and_budgets_bite(built: dict[str, Any]) -> None:
    from kdpipe.artifacts.records import ExportRecord
    from kdpipe.config import Budgets, TargetProfile
    from kdpipe.tasks.causal_lm import profile as pr

    root = built["root"]
    budgets = Budgets(shape="1x32", p50_ms=1e-6, model_mib=100)
    prof = TargetProfile(name="tiny", intra_op_threads=1, warmup=1, min_runs=2, min_seconds=0, rounds=1,
                         deploy="fp32", budgets=budgets)  # fmt: skip
    onnx = {"student": root / "llama-onnx", "student-int4": root / "llama-int4"}
    res = pr.profile_lm(onnx, {"student": root / "llama"}, prof, HELD_OUT, prompt_lengths=[32, 128], max_new_tokens=16)
    json.dumps(res)  # report.json-ready
    for engine, names in (("onnxruntime", ["student", "student-int4"]), ("torch_eager", ["student"])):
        for name in names:
            r = res[engine][name]
            assert list(r["shapes"]) == ["1x32", "1x128"] and r["model_bytes"] > 0 and r["peak_rss_mib"] > 0
            for s in r["shapes"].values():
                assert math.isfinite(s["ttft_ms"]) and s["ttft_ms"] > 0
                assert math.isfinite(s["decode_tokens_per_s"]) and s["decode_tokens_per_s"] > 0
    assert res["onnxruntime"]["student-int4"]["model_bytes"] < res["onnxruntime"]["student"]["model_bytes"]
    checks = {c.budget: c for c in pr.check_lm_budgets(prof, res, ExportRecord(models={}), None)}
    assert not checks["p50 latency at 1x32"].ok  # 1 ns TTFT: planted miss (what --strict fails on)
    assert checks["model size"].ok
    lines = pr.report_lines(res, list(checks.values()), "student")
    assert any("| student-int4 | onnxruntime | 128 |" in line for line in lines)
    assert any("MISSED" in line for line in lines)


def test_causal_timing_jobs_check_their_input(built: dict[str, Any]) -> None:
    from kdpipe.profiling.generation import normalize_generation_job, run_generation_job

    base = {"model": str(built["root"] / "llama-onnx"), "sentences": HELD_OUT, "max_new_tokens": 4}
    with pytest.raises(ConfigError, match="unknown workload"):
        normalize_generation_job({**base, "workload": "chat"})
    with pytest.raises(ConfigError, match="prompt_lengths"):
        normalize_generation_job({**base, "workload": "causal_lm", "prompt_lengths": [0]})
    too_long = {**base, "workload": "causal_lm", "prompt_lengths": [1022], "min_runs": 1, "warmup": 0}
    with pytest.raises(ModelError, match="exceeds the model's context of 1024"):
        run_generation_job(too_long, timeout_s=120)


def test_greedy_loop_feeds_present_to_past(built: dict[str, Any]) -> None:
    """The hand-driven KV-cache loop: decoding step by step gives the logits of a full forward pass."""
    from kdpipe.profiling.generation import OrtCausalLM

    lm = OrtCausalLM(built["root"] / "gpt2-onnx" / "model.onnx")
    ids = np.asarray([[5, 17, 33, 41, 2]], dtype=np.int64)
    full = lm.forward(ids)
    logits, state = lm.prefill(ids[:, :2])
    steps = [logits]
    for t in range(2, ids.shape[1]):
        logits, state = lm.decode(ids[:, t], state)
        steps.append(logits)
    assert state["len"] == ids.shape[1]
    np.testing.assert_allclose(np.stack(steps, 1)[0], full[0, 1:], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_genai_config_names_the_graph_and_runs_in_genai_where_installed(
    built: dict[str, Any], arch: str, tmp_path: Path
) -> None:
    """genai_config.json over the optimum export: every input / output name it gives is the graph's; where
    onnxruntime-genai is installed (not a kdpipe dependency), its generate loop gives OrtCausalLM's greedy tokens."""
    from kdpipe.profiling.generation import OrtCausalLM, greedy
    from kdpipe.tasks.causal_lm.export import genai_config, graph_io

    d = tmp_path / "genai"
    shutil.copytree(built["root"] / f"{arch}-int4", d)
    doc = genai_config(d, max_length=64)
    dec, io = doc["model"]["decoder"], graph_io(d / "model.onnx")
    layers = dec["num_hidden_layers"]
    assert layers == 2 and doc["model"]["type"] == "llama"  # gpt2 through genai's generic decoder path
    for key, name in dec["inputs"].items():
        names = [name % i for i in range(layers)] if "%d" in name else [name]
        assert all(n in io["inputs"] for n in names), key
    for key, name in dec["outputs"].items():
        names = [name % i for i in range(layers)] if "%d" in name else [name]
        assert all(n in io["outputs"] for n in names), key
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(d))
    ids = list(og.Tokenizer(model).encode(PROMPTS[0]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    ours = greedy(OrtCausalLM(d / "model.onnx"), np.asarray([ids], dtype=np.int64), NEW)["tokens"]
    assert tokens == ours[: len(tokens)] and len(tokens) >= NEW // 2
