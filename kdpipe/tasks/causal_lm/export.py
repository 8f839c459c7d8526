"""The causal-LM export as library functions the stage hooks call: ONNX with the KV cache (optimum-onnx's
text-generation-with-past: one `model.onnx` whose past may be empty, dynamic batch / sequence / past axes), parity
on real prompts (first-step logits within atol, identical greedy generations, the graph driven with its past key
values by kdpipe.profiling.generation.OrtCausalLM), the int8-dynamic and int4 weight-only variants
(kdpipe.compress.quantize's quantize_int8 / quantize_int4 on the decoder graph), and their gate: held-out perplexity
of the ONNX graph against the fp32 PyTorch student, and greedy-generation agreement.

kdpipe's Gate is higher-is-better, so perplexity is stored as its reciprocal: metric "1/perplexity", value =
1 / ppl(variant), reference = 1 / ppl(fp32 PyTorch), budget = reference / (1 + ppl_tolerance). `value >= budget`
is exactly `ppl <= (1 + ppl_tolerance) * ppl_reference` (default tolerance 0.05: within 5%); a NaN perplexity
fails (`nan >= x` is False).
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    CausalLMInfo,
    ExportedModel,
    ExportRecord,
    Gate,
    ModelSource,
    Parity,
    RunContext,
    StageOutput,
    TeacherRecord,
    record,
)
from kdpipe.config import ExportConfig
from kdpipe.env import cpu_model, int8_saturates
from kdpipe.errors import ConfigError, ExportToleranceError, ModelError
from kdpipe.tasks.causal_lm.build import MODEL_DIR

ONNX_FILE = "model.onnx"
TASK = "text-generation-with-past"
VARIANTS = ("int8-dynamic", "int4")
PPL_TOLERANCE = 0.05  # a variant's held-out perplexity at most 5% above the fp32 PyTorch student's
MIN_AGREEMENT = 0.5  # share of greedy generations identical to the fp32 PyTorch student's, at least
GATE_METRIC = "1/perplexity"
# onnxruntime-genai model types that read a decoder with past_key_values.%d.key / .value as named in its config;
# anything else is written as "llama" (genai's "gpt2" type expects other inputs: "Model input was not found")
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "granite", "olmo"})
# the axes that must stay symbolic: input name prefix -> axis indices (batch, sequence / past length)
DYNAMIC_AXES = {"input_ids": (0, 1), "attention_mask": (0, 1), "position_ids": (0, 1), "past_key_values.": (0, 2)}


# --------------------------------------------------------------------------- export
def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise ModelError(
            f"{model_dir}: not a causal-LM directory (needs config.json, the weights and tokenizer.json)",
            "point at the stage's model/ folder (save_pretrained of the model and its tokenizer)",
        )


def graph_io(path: Path) -> dict[str, dict[str, list[Any]]]:
    """{"inputs" | "outputs": {name: [dims, a string for a symbolic axis, an int for a fixed one]}} of a graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"inputs": {i.name: dims(i) for i in graph.input}, "outputs": {o.name: dims(o) for o in graph.output}}


def static_axes(path: Path) -> list[str]:
    """'name[axis]=size' for every batch / sequence / past axis the graph fixes (empty: all dynamic)."""
    fixed = []
    for name, dims in graph_io(path)["inputs"].items():
        axes = next((a for prefix, a in DYNAMIC_AXES.items() if name.startswith(prefix)), ())
        fixed += [f"{name}[{a}]={dims[a]}" for a in axes if a < len(dims) and isinstance(dims[a], int)]
    return fixed


def export_lm(model_dir: str | Path, out_dir: str | Path, opset: int = 18) -> dict[str, Any]:
    """optimum-onnx's exporter, task text-generation-with-past: `out_dir/model.onnx` (input_ids, attention_mask,
    position_ids where the architecture takes them, past_key_values.<i>.key / .value -> logits, present.<i>.*) plus
    the config and tokenizer files. Returns the spec: exporter, task, opset, files, graph inputs / outputs with
    their axes, and the axes it left fixed (none expected; lm_parity refuses a graph that has any)."""
    import torch
    from optimum.exporters.onnx import main_export

    src, out = Path(model_dir), Path(out_dir)
    _check_model_dir(src)
    with warnings.catch_warnings():
        # the TorchScript tracer warns about constants in transformers' mask code; parity is the real check
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        main_export(
            str(src), output=str(out), task=TASK, opset=opset, do_validation=False, no_post_process=True, device="cpu"
        )
    if not (out / ONNX_FILE).is_file():
        raise ModelError(f"{src}: the exporter wrote no {ONNX_FILE} into {out}", "report the model's architecture")
    io = graph_io(out / ONNX_FILE)
    return {
        "exporter": "optimum-onnx main_export (TorchScript)",
        "task": TASK,
        "opset": opset,
        "files": sorted(p.name for p in out.iterdir() if p.is_file()),
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "static_axes": static_axes(out / ONNX_FILE),
        "bytes": onnx_bytes(out),
    }


def onnx_bytes(directory: Path) -> int:
    """Bytes on disk of the graphs (and their external data) in `directory`."""
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file() and ".onnx" in f.name)


# --------------------------------------------------------------------------- onnxruntime-genai
def genai_config(onnx_dir: str | Path, max_length: int | None = None) -> dict[str, Any]:
    """Write `onnx_dir/genai_config.json`, which lets onnxruntime-genai's generate loop (og.Model(onnx_dir)) run
    the optimum export as it is: the decoder's input / output names (past_key_values.%d.* -> present.%d.*), heads,
    head size, layers, special tokens, greedy search. Measured here (onnxruntime-genai 0.18.0 beside onnxruntime
    1.32.0): identical greedy tokens to OrtCausalLM. Its model builder cannot run with transformers 4.57 (it
    imports transformers 5 classes), so this is the genai layout kdpipe can make. Model types genai handles
    differently (gpt2) are written as "llama", its generic decoder path. Returns the config written."""
    import json

    d = Path(onnx_dir)
    cfg = json.loads((d / "config.json").read_text())
    io = graph_io(d / ONNX_FILE)["inputs"]
    layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)))
    heads = int(cfg.get("num_attention_heads", cfg.get("n_head", 0)))
    hidden = int(cfg.get("hidden_size", cfg.get("n_embd", 0)))
    past = io.get("past_key_values.0.key", [None, heads, None, hidden // max(heads, 1)])
    names = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
             "past_value_names": "past_key_values.%d.value"}  # fmt: skip
    names |= {n: n for n in ("attention_mask", "position_ids") if n in io}
    eos = cfg.get("eos_token_id", 0)
    context = int(cfg.get("max_position_embeddings", cfg.get("n_positions", 2048)))
    decoder = {
        "filename": ONNX_FILE, "head_size": int(past[3]), "hidden_size": hidden, "num_attention_heads": heads,
        "num_key_value_heads": int(past[1]), "num_hidden_layers": layers, "inputs": names,
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
    }  # fmt: skip
    search = {"do_sample": False, "num_beams": 1, "top_k": 1, "max_length": max_length or context,
              "past_present_share_buffer": False, "num_return_sequences": 1}  # fmt: skip
    kind = cfg.get("model_type") if cfg.get("model_type") in GENAI_TYPES else "llama"  # the generic decoder path
    doc = {"model": {"type": kind, "bos_token_id": cfg.get("bos_token_id", eos),
                     "eos_token_id": eos, "pad_token_id": cfg.get("pad_token_id") or eos,
                     "vocab_size": cfg["vocab_size"], "context_length": context, "decoder": decoder},
           "search": search}  # fmt: skip
    (d / "genai_config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# --------------------------------------------------------------------------- parity
@dataclass(frozen=True)
class LmParity:
    """PyTorch vs onnxruntime on real prompts: first-step logits and greedy generations (KV cache on both)."""

    max_abs_diff: float
    atol: float
    same_generations: int
    examples: int
    max_new_tokens: int
    ok: bool
    why: str = ""  # one line when not ok
    refused: str | None = None  # the graph was not run (fixed axes)
    nonfinite_outputs: int = 0
    generations: list[list[int]] = field(default_factory=list, repr=False)  # the ONNX graph's, per prompt


def _load_torch(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", local_files_only=True).eval()


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def context_of(cfg: Any) -> int | None:
    """A model config's context length (max_position_embeddings / n_positions), or None."""
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(limit) if limit else None


Prompt = str | Sequence[int]  # a text (tokenised with the tokenizer's special tokens) or token ids as they are


def encode_prompts(tok: Any, prompts: Sequence[Prompt], max_new_tokens: int, context: int | None) -> list[np.ndarray]:
    """Each prompt as (1, T) int64 ids (a text through `tok`, token ids as given: e.g. a chat-templated prompt); a
    ConfigError (one line) for no prompts, one that tokenises to nothing, or one that with `max_new_tokens` does
    not fit the context."""
    if not prompts:
        raise ConfigError("causal-LM parity / gate: no prompts", "give real held-out prompts")
    out = []
    for i, text in enumerate(prompts):
        ids = list(tok(text)["input_ids"]) if isinstance(text, str) else [int(t) for t in text]
        if not ids:
            raise ConfigError(f"prompt {i} ({str(text)[:40]!r}) tokenises to nothing", "drop empty prompts")
        if context is not None and len(ids) + max_new_tokens > context:
            raise ConfigError(
                f"prompt {i} has {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the context of "
                f"{context}", "use shorter prompts or fewer new tokens",
            )  # fmt: skip
        out.append(np.asarray([ids], dtype=np.int64))
    return out


def _max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(max |a - b| over rows, inf when anything is not finite; rows of `a` with a non-finite value)."""
    nonfinite = int((~np.isfinite(a)).any(-1).sum())
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return (float(diff.max()) if np.isfinite(diff).all() and diff.size else math.inf), nonfinite


def _refused_parity(why: str, atol: float, examples: int, max_new_tokens: int) -> LmParity:
    return LmParity(math.inf, atol, 0, examples, max_new_tokens, ok=False, why=why, refused=why)


def lm_parity(
    model_dir: str | Path,
    onnx_dir: str | Path,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 16,
    atol: float = 1e-4,
) -> LmParity:
    """Fail-closed parity of `onnx_dir/model.onnx` against the PyTorch model in `model_dir` on real `prompts`:
    first-step logits max |diff| within `atol` (NaN / inf fails), and the `max_new_tokens` greedy tokens (no stop
    at EOS; KV cache fed step by step) identical on every prompt. A graph with a fixed batch / sequence / past axis
    is refused before it runs."""
    from kdpipe.profiling.generation import OrtCausalLM, TorchCausalLM, greedy

    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    if not (onnx_dir / ONNX_FILE).is_file():
        raise ModelError(f"{onnx_dir} has no {ONNX_FILE}", "export it with export_lm first")
    model = _load_torch(model_dir)
    ids = encode_prompts(_tokenizer(model_dir), prompts, max_new_tokens, context_of(model.config))
    fixed = static_axes(onnx_dir / ONNX_FILE)
    if fixed:
        refusal = f"the graph fixes {', '.join(fixed)}: generation with a KV cache needs dynamic axes (re-export)"
        return _refused_parity(refusal, atol, len(ids), max_new_tokens)
    torch_lm, ort_lm = TorchCausalLM(model), OrtCausalLM(onnx_dir / ONNX_FILE)
    ref = [greedy(torch_lm, x, max_new_tokens) for x in ids]
    got = [greedy(ort_lm, x, max_new_tokens) for x in ids]
    worst, nonfinite = _max_diff(np.stack([g["first_logits"] for g in got]), np.stack([r["first_logits"] for r in ref]))
    nonfinite += sum(not g["finite"] for g in got) if not nonfinite else 0
    same = sum(g["tokens"] == r["tokens"] for g, r in zip(got, ref, strict=True))
    why = []
    if nonfinite or not math.isfinite(worst):
        why.append(f"non-finite logits on {max(nonfinite, 1)} of {len(ids)} prompts (NaN / inf: a broken model)")
    elif not worst <= atol:
        why.append(f"first-step max |diff| {worst:.3e} exceeds atol {atol:g}")
    if same != len(ids):
        why.append(f"greedy generations differ on {len(ids) - same} of {len(ids)} prompts")
    return LmParity(
        worst, atol, same, len(ids), max_new_tokens, ok=not why, why="; ".join(why),
        nonfinite_outputs=nonfinite, generations=[g["tokens"] for g in got],
    )  # fmt: skip


# --------------------------------------------------------------------------- variants
def make_lm_variant(fp32_dir: str | Path, out_dir: str | Path, variant: str) -> dict[str, Any]:
    """`variant` (int8-dynamic: quantize_dynamic, QInt8 per-channel weights, 7-bit where kdpipe.env.int8_saturates
    says this CPU's int8 kernels saturate; int4: MatMulNBits weight-only, block
    32, symmetric, Gemms included, and the embedding table as GatherBlockQuantized) of the fp32 export in
    `fp32_dir`, written to `out_dir` with the config and tokenizer copied, so it loads as the fp32 export does.
    Returns what was done: quantised operators, MatMuls left fp32, bytes."""
    from kdpipe.compress import quantize

    src, dst = Path(fp32_dir), Path(out_dir)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown causal-LM export variant {variant!r}", f"use one of {', '.join(VARIANTS)}")
    if not (src / ONNX_FILE).is_file():
        raise ModelError(f"{src} has no {ONNX_FILE}", "export it with export_lm first")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and ".onnx" not in f.name:
            shutil.copy2(f, dst / f.name)
    reduce_range = variant == "int8-dynamic" and int8_saturates()
    if variant == "int8-dynamic":
        quantize.quantize_int8(src / ONNX_FILE, dst / ONNX_FILE, reduce_range=reduce_range)
    else:  # Gemms too (GPT-2's projections export as Gemm), and the token-embedding Gather
        quantize.quantize_int4(src / ONNX_FILE, dst / ONNX_FILE, gemm=True, gather=True)
    before, after = quantize.op_counts(src / ONNX_FILE), quantize.op_counts(dst / ONNX_FILE)
    done: dict[str, Any] = {
        "variant": variant,
        "quantized_ops": {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)},
        "fp32_matmuls": after.get("MatMul", 0),
        "bytes": onnx_bytes(dst),
    }
    if variant == "int8-dynamic":
        done |= {"reduce_range": reduce_range, "cpu_flags": cpu_model()["flags"]}
    if variant == "int4":
        done |= {"block_size": quantize.INT4_BLOCK, "symmetric": True}
    return done


# --------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class LmJudged:
    """A model's held-out perplexity (token-weighted over the texts) and greedy generations of the prompts."""

    perplexity: float
    scored_tokens: int
    generations: list[list[int]]
    first_logits: np.ndarray  # (prompts, vocab)
    nonfinite: int  # texts or prompts with a non-finite logit


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token negative log-likelihood of ids[1:] under logits[:-1] (float64 log-softmax)."""
    z = logits[0, :-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    logz = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]
    return float((logz - z[np.arange(len(z)), ids[0, 1:]]).sum())


def judge(runner: Any, tok: Any, texts: Sequence[str], prompts: Sequence[Prompt], max_new_tokens: int,
          context: int | None) -> LmJudged:  # fmt: skip
    """Perplexity of `runner` (OrtCausalLM / TorchCausalLM: the same calls for both, so a gate compares like with
    like) on the held-out `texts` (each truncated to the context, texts of < 2 tokens skipped) and its greedy
    generations of `prompts`."""
    from kdpipe.profiling.generation import greedy

    if not texts:
        raise ConfigError("causal-LM gate: no held-out texts for perplexity", "give a non-empty held-out split")
    total, count, nonfinite = 0.0, 0, 0
    for text in texts:
        ids = np.asarray([list(tok(str(text))["input_ids"])[: context or None]], dtype=np.int64)
        if ids.shape[1] < 2:
            continue
        logits = runner.forward(ids)
        nonfinite += int(not np.isfinite(logits).all())
        total, count = total + _nll(logits, ids), count + ids.shape[1] - 1
    if count == 0:
        raise ConfigError("causal-LM gate: the held-out texts hold no scorable tokens", "give texts of 2+ tokens")
    gens = [greedy(runner, x, max_new_tokens) for x in encode_prompts(tok, prompts, max_new_tokens, context)]
    nonfinite += sum(not g["finite"] for g in gens)
    ppl = math.exp(total / count) if math.isfinite(total) else math.nan
    first = np.stack([g["first_logits"] for g in gens])
    return LmJudged(ppl, count, [g["tokens"] for g in gens], first, nonfinite)


def judge_torch(
    model_dir: str | Path, texts: Sequence[str], prompts: Sequence[Prompt], max_new_tokens: int
) -> LmJudged:
    """`judge` of the fp32 PyTorch model in `model_dir` (the gate's reference)."""
    from kdpipe.profiling.generation import TorchCausalLM

    model = _load_torch(Path(model_dir))
    return judge(
        TorchCausalLM(model), _tokenizer(Path(model_dir)), texts, prompts, max_new_tokens, context_of(model.config)
    )


def judge_onnx(onnx_dir: str | Path, texts: Sequence[str], prompts: Sequence[Prompt], max_new_tokens: int) -> LmJudged:
    """`judge` of `onnx_dir/model.onnx` in onnxruntime (CPU), tokenised by the directory's own tokenizer."""
    from transformers import AutoConfig

    from kdpipe.profiling.generation import OrtCausalLM

    d = Path(onnx_dir)
    if not (d / ONNX_FILE).is_file():
        raise ModelError(f"{d} has no {ONNX_FILE}", "export it (export_lm / make_lm_variant) first")
    context = context_of(AutoConfig.from_pretrained(d, local_files_only=True))
    return judge(OrtCausalLM(d / ONNX_FILE), _tokenizer(d), texts, prompts, max_new_tokens, context)


def lm_gate(
    got: LmJudged,
    ref: LmJudged,
    ppl_tolerance: float = PPL_TOLERANCE,
    min_agreement: float = MIN_AGREEMENT,
    atol: float | None = None,
) -> Gate:
    """A variant against the fp32 PyTorch student: held-out perplexity within (1 + ppl_tolerance) x the reference's
    (stored as 1/perplexity, higher is better: see the module docstring), at least `min_agreement` of the greedy
    generations identical, and (atol given: the fp32 export) first-step logits within atol. NaN fails."""
    if ppl_tolerance < 0 or not 0 <= min_agreement <= 1:
        raise ConfigError(
            f"causal-LM gate: ppl_tolerance {ppl_tolerance} / min_agreement {min_agreement} out of range",
            "use ppl_tolerance >= 0 and 0 <= min_agreement <= 1",
        )
    value, reference = 1 / got.perplexity, 1 / ref.perplexity
    need = reference / (1 + ppl_tolerance)
    worst, nonfinite = _max_diff(got.first_logits, ref.first_logits)
    nonfinite = max(nonfinite, got.nonfinite)
    same = sum(a == b for a, b in zip(got.generations, ref.generations, strict=True))
    agreement = same / len(ref.generations)
    ok = (nonfinite == 0 and math.isfinite(value) and value >= need and agreement >= min_agreement
          and (atol is None or worst <= atol))  # fmt: skip
    return Gate(
        metric=GATE_METRIC, examples=len(ref.generations), value=value, reference=reference, budget=need,
        agreement=agreement, max_abs_diff=worst, atol=atol, nonfinite_outputs=nonfinite, ok=bool(ok),
    )  # fmt: skip


def gate_line(name: str, g: Gate) -> str:
    """One console / failure line for a gate, in perplexity terms."""
    ppl, ref, limit = (1 / x if x else math.inf for x in (g.value, g.reference, g.budget))
    diff = f", first-step max |diff| {g.max_abs_diff:.2e}" + (f" (atol {g.atol:g})" if g.atol is not None else "")
    bad = f", {g.nonfinite_outputs} non-finite outputs" if g.nonfinite_outputs else ""
    return (
        f"{name}: held-out perplexity {ppl:.3f} (fp32 PyTorch {ref:.3f}, at most {limit:.3f}), identical greedy "
        f"generations {g.agreement:.0%} of {g.examples}{diff}{bad}: " + ("ok" if g.ok else "FAILED")
    )


# --------------------------------------------------------------------------- the stage
PARITY_NEW_TOKENS = 16  # greedy tokens per prompt compared at parity and at the gates (fewer if the teacher's are)
STUDENT = "student"
PARITY_KIND = "generations"
NO_TEACHER = (
    "not exported: the profile times the teacher in PyTorch eager; an ONNX teacher would cost as much to export and "
    "check as the student and serves no deployment"
)


def ppl_tolerance(cfg: ExportConfig) -> float:
    """export.accuracy_budget as the gate's perplexity tolerance. The gate is higher-is-better on 1/perplexity and
    needs value >= accuracy_budget x reference, i.e. ppl <= ppl_reference / accuracy_budget: tolerance =
    1 / accuracy_budget - 1 (0.95: perplexity at most 5.3% above the fp32 PyTorch student's). A recipe that leaves
    export.accuracy_budget unset gets PPL_TOLERANCE (5%) instead of the default 0.99's 1%: MLPerf's 99% is of an
    accuracy, and 1% of perplexity is within the noise of int8 on a small LM."""
    if "accuracy_budget" not in cfg.model_fields_set:
        return PPL_TOLERANCE
    return 1 / cfg.accuracy_budget - 1


@dataclass(frozen=True)
class HeldOut:
    """What parity and the gates run on: the teacher stage's held-out texts (perplexity) and the token ids of its
    first export.parity_samples held-out prompts (chat template applied as the stages applied it)."""

    texts: list[str]
    prompts: list[list[int]]
    new_tokens: int


def held_out(upstream: Manifest, cfg: ExportConfig, student_dir: Path) -> HeldOut:
    from kdpipe.tasks.causal_lm import data, lm

    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).info_as(CausalLMInfo)
    assert info is not None
    tok = _tokenizer(student_dir)
    texts = [str(r["text"]) for r in data.read_jsonl(t_manifest.path(info.held_out_texts))]
    rows = data.read_jsonl(t_manifest.path(info.held_out_prompts))[: cfg.parity_samples]
    prompts = [lm.prompt_ids(tok, str(r["input"]), bool(r["chat"])) for r in rows]
    return HeldOut(texts, prompts, min(PARITY_NEW_TOKENS, info.max_new_tokens))


def _perplexity(inverse: float) -> float | None:
    """A gate value (1/perplexity) as a perplexity rounded for the manifest; None when it is not finite."""
    return round(1 / inverse, 5) if inverse and math.isfinite(inverse) else None


def parity_record(p: LmParity) -> Parity:
    return Parity(
        kind=PARITY_KIND, max_abs_diff=p.max_abs_diff, atol=p.atol, agreement=p.same_generations / max(p.examples, 1),
        examples=p.examples, shapes=[], nonfinite_outputs=p.nonfinite_outputs, refused=p.refused, ok=p.ok,
    )  # fmt: skip


def _gate_parity(g: Gate) -> Parity:
    """A variant's Parity record from its gate (no logit bound: atol inf)."""
    return Parity(kind=PARITY_KIND, max_abs_diff=g.max_abs_diff, atol=math.inf, agreement=g.agreement,
                  examples=g.examples, shapes=[], nonfinite_outputs=g.nonfinite_outputs, ok=g.ok)  # fmt: skip


def _export_student(
    cfg: ExportConfig, student_dir: Path, work: Path, held: HeldOut, ctx: RunContext
) -> tuple[dict[str, Any], LmParity]:
    """The fp32 export and its parity; ExportToleranceError when parity fails (the runner then writes nothing)."""
    out = work / STUDENT
    spec = export_lm(student_dir, out, cfg.opset)
    p = lm_parity(student_dir, out, held.prompts, held.new_tokens, cfg.atol)
    ctx.console.print(
        f"student: ONNX {ONNX_FILE} with past ({spec['bytes'] / 2**20:.1f} MiB), parity on {p.examples} real "
        f"held-out prompts: first-step max |diff| {p.max_abs_diff:.2e} (atol {cfg.atol:g}), identical greedy "
        f"generations {p.same_generations}/{p.examples} ({p.max_new_tokens} tokens)"
    )
    if not p.ok:
        raise ExportToleranceError(
            f"ONNX parity check failed: student: {p.why}",
            "nothing was written; raise export.atol only if the difference is expected, otherwise report the model",
        )
    spec["genai"] = {"config": "genai_config.json", "type": genai_config(out)["model"]["type"]}
    spec["parity"] = {"kind": PARITY_KIND, "same_generations": p.same_generations, "new_tokens": p.max_new_tokens}
    spec["teacher"] = NO_TEACHER
    return spec, p


def _gate_fp32(cfg: ExportConfig, held: HeldOut, work: Path, ref: LmJudged, ctx: RunContext) -> Gate:
    gate = lm_gate(judge_onnx(work / STUDENT, held.texts, held.prompts, held.new_tokens), ref, ppl_tolerance(cfg),
                   atol=cfg.atol)  # fmt: skip
    ctx.console.print(gate_line(STUDENT, gate))
    if not gate.ok:
        raise ExportToleranceError(
            f"ONNX gate failed on the held-out split: {gate_line(STUDENT, gate)}",
            "nothing was written; the fp32 graph should match PyTorch: report the model",
        )
    return gate


def _variant(
    cfg: ExportConfig, variant: str, held: HeldOut, work: Path, ref: LmJudged, ctx: RunContext
) -> tuple[ExportedModel, dict[str, Metric]]:
    """One variant of the fp32 export, gated against the fp32 PyTorch student; removed (its folder deleted) and
    recorded with gate.ok false when it misses."""
    name = f"{STUDENT}-{variant}"
    out = work / name
    done = make_lm_variant(work / STUDENT, out, variant)
    gate = lm_gate(judge_onnx(out, held.texts, held.prompts, held.new_tokens), ref, ppl_tolerance(cfg))
    ctx.console.print(gate_line(name, gate) + ("" if gate.ok else f"; {name} REMOVED (missed the budget)"))
    metrics = {
        f"{name}_perplexity": Metric(_perplexity(gate.value), "held-out perplexity"),
        f"{name}_agreement": Metric(round(gate.agreement, 5), "fraction of identical greedy generations"),
    }
    if gate.ok:
        genai_config(out)
        metrics[f"{name}_onnx_bytes"] = Metric(onnx_bytes(out), "bytes")
    else:
        shutil.rmtree(out)
    model = ExportedModel(
        onnx=f"{name}/{ONNX_FILE}", spec={"parity": {"kind": PARITY_KIND}}, parity=_gate_parity(gate),
        source=ModelSource(stage="distill", dir=MODEL_DIR), variant=variant, of=STUDENT, gate=gate,
        transforms={k: v for k, v in done.items() if k != "variant"},
    )  # fmt: skip
    return model, metrics


def run_export(cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """The distilled student as ONNX with its KV cache (fail-closed parity on real held-out prompts, then the
    held-out perplexity gate within export.atol), onnxruntime-genai's config beside it, and each of export.variants
    that a causal LM has (int8-dynamic, int4) gated on held-out perplexity (`ppl_tolerance`) and greedy agreement
    (MIN_AGREEMENT) against the fp32 PyTorch student; a variant that misses is removed and recorded as missed. The
    teacher is not exported (NO_TEACHER)."""
    student_dir = upstream.directory(MODEL_DIR)
    held = held_out(upstream, cfg, student_dir)
    spec, p = _export_student(cfg, student_dir, work, held, ctx)
    ref = judge_torch(student_dir, held.texts, held.prompts, held.new_tokens)
    gate = _gate_fp32(cfg, held, work, ref, ctx)
    source = ModelSource(stage="distill", dir=MODEL_DIR)
    models = {STUDENT: ExportedModel(onnx=f"{STUDENT}/{ONNX_FILE}", spec=spec, parity=parity_record(p), source=source,
                                     gate=gate)}  # fmt: skip
    metrics = {
        "student_max_abs_diff": Metric(p.max_abs_diff, "logit units"),
        "student_same_generations": Metric(round(p.same_generations / p.examples, 5), "fraction"),
        "student_onnx_bytes": Metric(onnx_bytes(work / STUDENT), "bytes"),
        "student_torch_perplexity": Metric(_perplexity(1 / ref.perplexity), "held-out perplexity"),
        "student_perplexity": Metric(_perplexity(gate.value), "held-out perplexity"),
    }
    if skipped := [v for v in cfg.variants if v not in VARIANTS]:
        ctx.console.print(
            f"causal_lm: export.variants {skipped} skipped (a causal LM exports fp32, {', '.join(VARIANTS)})"
        )
    for variant in (v for v in cfg.variants if v in VARIANTS):
        models[f"{STUDENT}-{variant}"], extra = _variant(cfg, variant, held, work, ref, ctx)
        metrics |= extra
    return StageOutput(record=ExportRecord(models=models), metrics=metrics)
