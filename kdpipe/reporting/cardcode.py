"""The "how to load it" code of a model card (kdpipe.reporting.card): transformers, optimum, sentence-transformers and
onnxruntime snippets for one model directory, written from what the directory holds (its files, the ONNX graphs'
real input names) and the task's CardHints. Every path is relative to the run directory; tests/test_cards.py runs
every snippet from there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
# the files of optimum's split seq2seq export: ORTModelForSeq2SeqLM finds them by these names
SEQ2SEQ = ("encoder_model.onnx", "decoder_model.onnx")


@dataclass(frozen=True)
class CardHints:
    """A task's side of its model cards (Task.card_hints): what Hugging Face calls its artifacts and how its models
    are run; everything else on a card is read from the stage's manifest and the directory itself."""

    pipeline_tag: str  # Hugging Face pipeline_tag of its transformers / ONNX artifacts (text-classification, ...)
    pipeline_task: str  # the transformers pipeline() task that runs a model (text-classification, translation, ...)
    auto_class: str  # transformers Auto class of its models (AutoModelForSequenceClassification, ...)
    ort_class: str | None  # optimum.onnxruntime class of its ONNX exports (None: none reads kdpipe's layout)
    example: str  # a sample input text
    quality: dict[str, str] = field(default_factory=dict)  # metric key (without a model prefix) -> HF metric type
    generates: bool = False  # whether running it is generate() (max_new_tokens), not a forward pass
    st_pipeline_tag: str = "sentence-similarity"  # pipeline_tag of a sentence-transformers folder


@dataclass(frozen=True)
class Loader:
    """One way to load a directory: a heading and a Python block (None: a sentence that says why there is none)."""

    title: str
    code: str | None
    note: str = ""


def _known_model_type(model_dir: Path) -> bool:
    """Whether transformers knows the directory's config.json model_type (kdpipe's BiLSTM and static students are
    its own architectures, which transformers cannot load)."""
    from transformers import CONFIG_MAPPING

    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return False
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _gen(hints: CardHints) -> str:
    return ", max_new_tokens=8" if hints.generates else ""


def transformers_loader(rel: str, model_dir: Path, hints: CardHints) -> Loader:
    if not _known_model_type(model_dir):
        return Loader("transformers", None, "a kdpipe architecture transformers does not know: load its ONNX export")
    code = (
        f"from transformers import {hints.auto_class}, AutoTokenizer, pipeline\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{rel}")\n'
        f'model = {hints.auto_class}.from_pretrained("{rel}")\n'
        f'pipe = pipeline("{hints.pipeline_task}", model=model, tokenizer=tokenizer)\n'
        f"print(pipe({hints.example!r}{_gen(hints)}))\n"
    )
    return Loader("transformers", code)


def sentence_transformers_loaders(rel: str, model_dir: Path, hints: CardHints) -> list[Loader]:
    code = (
        "from sentence_transformers import SentenceTransformer\n\n"
        f'model = SentenceTransformer("{rel}", device="cpu")\n'
        f"print(model.encode([{hints.example!r}]).shape)\n"
    )
    loaders = [Loader("sentence-transformers", code)]
    onnx = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.glob("onnx/*.onnx"))
    if onnx:
        lines = [
            f'model = SentenceTransformer("{rel}", backend="onnx", device="cpu", model_kwargs={{"file_name": "{f}"}})\n'
            f"print(model.encode([{hints.example!r}]).shape)\n"
            for f in onnx
        ]
        code = "from sentence_transformers import SentenceTransformer\n\n" + "".join(lines)
        loaders.append(Loader("sentence-transformers, ONNX backend (optimum)", code))
    return loaders


def optimum_loader(rel: str, model_dir: Path, files: list[str], hints: CardHints) -> Loader | None:
    """optimum's ORTModel for an export with its config and tokenizer beside it (optimum's own layout)."""
    if not (model_dir / "config.json").is_file() or not _tokenizer_in(model_dir) or not _known_model_type(model_dir):
        return None
    split = all(f in files for f in SEQ2SEQ)
    cls = "ORTModelForSeq2SeqLM" if split else hints.ort_class
    if cls is None:
        return None
    head = f"from optimum.onnxruntime import {cls}\nfrom transformers import AutoTokenizer, pipeline\n\n"
    head += f'tokenizer = AutoTokenizer.from_pretrained("{rel}")\n'
    loads = [f'{cls}.from_pretrained("{rel}")'] if split else [
        f'{cls}.from_pretrained("{rel}", file_name="{f}")' for f in files
    ]  # fmt: skip
    body = ""
    for load in loads:
        body += f"model = {load}\n"
        if hints.generates:
            body += (
                f'ids = model.generate(**tokenizer([{hints.example!r}], return_tensors="pt", '
                "return_token_type_ids=False), max_new_tokens=8)\n"
                "print(tokenizer.batch_decode(ids, skip_special_tokens=True))\n"
            )
        else:
            body += f'print(pipeline("{hints.pipeline_task}", model=model, tokenizer=tokenizer)({hints.example!r}))\n'
    return Loader("optimum (onnxruntime)", head + body)


def _tokenizer_in(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def graph_inputs(path: Path) -> list[tuple[str, int, list[int | str]]]:
    """(name, ONNX element type, dims: an int or the symbolic name) of each graph input, read without the weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [
        (
            i.name,
            i.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
        )
        for i in graph.input
        if i.name not in inits
    ]


_TOKEN_FEEDS = {
    "input_ids": 'enc["input_ids"].astype(np.int64)',
    "attention_mask": 'enc["attention_mask"].astype(np.int64)',
    "token_type_ids": 'np.zeros_like(enc["input_ids"], dtype=np.int64)',
    "position_ids": 'np.arange(enc["input_ids"].shape[1], dtype=np.int64)[None, :]',
}
_NP_DTYPES = {1: "np.float32", 10: "np.float16", 7: "np.int64", 6: "np.int32"}


def _feed_line(name: str, elem: int, dims: list[int | str]) -> str | None:
    """The feed of one graph input, or None when it is not one a tokenizer (or an empty KV cache) provides."""
    if name in _TOKEN_FEEDS:
        return f'    "{name}": {_TOKEN_FEEDS[name]},\n'
    if "past" in name and elem in _NP_DTYPES:  # an empty KV cache: batch 1, no past positions
        shape = tuple(d if isinstance(d, int) else (1 if "batch" in d else 0) for d in dims)
        return f'    "{name}": np.zeros({shape}, dtype={_NP_DTYPES[elem]}),\n'
    return None


def _tokenizer_dir(rel: str, model_dir: Path, source: str | None) -> str | None:
    return rel if _tokenizer_in(model_dir) else source


def onnxruntime_loader(rel: str, model_dir: Path, files: list[str], source: str | None, hints: CardHints) -> Loader:
    """An InferenceSession per graph a tokenizer can feed, its inputs named as the graph names them; `source` is the
    run-relative directory of the PyTorch model it was exported from (its tokenizer, when the export has none)."""
    tok = _tokenizer_dir(rel, model_dir, source)
    if tok is None:
        return Loader("onnxruntime", None, "no tokenizer is recorded beside these graphs")
    groups: dict[str, list[str]] = {}
    skipped = []
    for f in files:
        lines = [_feed_line(*inp) for inp in graph_inputs(model_dir / f)]
        if any(line is None for line in lines):
            skipped.append(f)
            continue
        groups.setdefault("".join(line for line in lines if line is not None), []).append(f)
    if not groups:
        return Loader("onnxruntime", None, f"{', '.join(skipped)} take(s) a decoder's inputs: use optimum above")
    code = (
        "import numpy as np\nimport onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{tok}")\n'
        f'enc = tokenizer([{hints.example!r}], return_tensors="np")\n'
    )
    for feed, names in groups.items():
        code += "feed = {\n" + feed + "}\n"
        code += f"for name in {names!r}:\n"
        code += f'    session = ort.InferenceSession(f"{rel}/{{name}}", providers=["CPUExecutionProvider"])\n'
        code += "    outputs = session.run(None, feed)\n"
        code += "    print(name, {o.name: v.shape for o, v in zip(session.get_outputs(), outputs)})\n"
    note = f"{', '.join(skipped)}: a decoder graph, which optimum drives (above)" if skipped else ""
    return Loader("onnxruntime", code, note)


def render(loaders: list[Loader]) -> list[str]:
    lines: list[str] = []
    for loader in loaders:
        lines += [f"### {loader.title}", ""]
        if loader.code is not None:
            lines += ["```python", loader.code.rstrip("\n"), "```", ""]
        if loader.note:
            lines += [f"({loader.note})" if loader.code is not None else f"Not loadable this way: {loader.note}.", ""]
    return lines


def as_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
