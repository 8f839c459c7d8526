"""A sentence encoder as one torch module: backbone -> pooling -> optional projection -> optional L2 normalisation.

The same computation as a sentence-transformers model built from Transformer, Pooling, Dense (no activation) and
Normalize, so a teacher loads from a sentence-transformers folder (`load_encoder`) and a distilled student is saved
as one (`save_sentence_transformers`) that `SentenceTransformer(dir)` loads and that gives the student's vectors.

This module defines an nn.Module, so importing it imports torch; the embedding modules that only read configs,
files or arrays (pooling, teachers, quality, onnx, static) import it only inside their functions.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdpipe.errors import ModelError
from kdpipe.files import shown
from kdpipe.tasks.embedding.atomic import replacing_dir
from kdpipe.tasks.embedding.pooling import SentenceConfig, check_pooling, pool, read_sentence_config
from kdpipe.tasks.embedding.pooling import normalize as unit_norm

Embed = Callable[[Sequence[str]], np.ndarray]
_IDENTITY = "torch.nn.modules.linear.Identity"
# a tokenizer's "no limit" is a huge sentinel (int(1e30)); beyond this it is not a length
_NO_LIMIT = 1_000_000
# modules.json's type of a BiLSTM student's input module (kdpipe.tasks.embedding.bilstm.class_path())
BILSTM_MODULE = "kdpipe.tasks.embedding.bilstm.BiLSTMTokens"


class SentenceEncoder(nn.Module):
    """(input_ids (B, T), attention_mask (B, T)[, token_type_ids (B, T)]) -> sentence embeddings (B, D).

    D is the projection's output width when there is one, the backbone's hidden size otherwise. With `normalize`
    every row has unit L2 norm (what cosine-similarity users expect); without, the raw pooled (projected) vector.
    `max_seq_length` is the truncation length the encoder was trained for (None: the tokenizer's)."""

    def __init__(
        self,
        backbone: nn.Module,
        pooling: str,
        normalize: bool,
        projection: nn.Linear | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__()
        # Any: a Hugging Face model (its .config and keyword forward), which nn.Module's typing does not know
        self.backbone: Any = backbone
        self.pooling = check_pooling(pooling, "pooling")
        self.normalize = normalize
        self.projection = projection
        self.max_seq_length = max_seq_length
        # MPNet, DistilBERT and the like have no segment embeddings; BERT does (all zeros for one sentence)
        self.takes_token_type_ids = "token_type_ids" in inspect.signature(backbone.forward).parameters
        if projection is not None and projection.in_features != self.hidden_size:
            raise ModelError(
                f"projection takes {projection.in_features} features but the backbone gives {self.hidden_size}",
                "build the projection as nn.Linear(backbone hidden size, output width)",
            )

    @property
    def hidden_size(self) -> int:
        """The backbone's token-vector width H (a BiLSTM body's `token_width`, both directions)."""
        return int(getattr(self.backbone, "token_width", None) or self.backbone.config.hidden_size)

    @property
    def dim(self) -> int:
        """The sentence-embedding width D."""
        return self.projection.out_features if self.projection is not None else self.hidden_size

    def token_embeddings(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        """The backbone's last hidden state (B, T, H), before pooling. `head_mask` (HF's, multiplied into the
        attention probabilities) is what width pruning's importance differentiates (kdpipe.compress.prune)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.takes_token_type_ids:
            inputs["token_type_ids"] = token_type_ids
        if head_mask is not None:
            inputs["head_mask"] = head_mask
        return self.backbone(**inputs, return_dict=True).last_hidden_state

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, T) ids and mask -> (B, D) sentence embeddings."""
        hidden = self.token_embeddings(input_ids, attention_mask, token_type_ids, head_mask)
        vectors = pool(hidden, attention_mask, self.pooling)
        if self.projection is not None:
            vectors = self.projection(vectors)
        return unit_norm(vectors) if self.normalize else vectors


def load_encoder(
    model_dir: Path,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    attn_implementation: str | None = None,
) -> tuple[SentenceEncoder, Any]:
    """The sentence encoder in a sentence-transformers folder, in eval mode, and its tokenizer.

    `pooling` / `normalize` override the folder's modules.json (and make a plain transformer folder usable);
    `attn_implementation="eager"` is what the ONNX export wants. The tokenizer truncates at the model's
    max_seq_length, as sentence-transformers does. A BiLSTM student's folder (kdpipe.tasks.embedding.bilstm) loads
    as the SentenceEncoder it was saved from."""
    if pooling is None and normalize is None and _is_bilstm_folder(model_dir):
        return _load_bilstm(model_dir)
    config = read_sentence_config(model_dir, pooling, normalize)
    folder = model_dir / config.backbone
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{shown(folder)}: no config.json (the Transformer module of {shown(model_dir / 'modules.json')})",
            "re-save the model with sentence-transformers or transformers",
        )
    from transformers import AutoModel, AutoTokenizer

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        backbone = AutoModel.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{shown(folder)}: cannot be loaded as a transformer ({reason})", "") from e
    length = _max_seq_length(config, tokenizer, backbone)
    tokenizer.model_max_length = length
    if config.do_lower_case:
        _lowercase(tokenizer)
    projection = _load_dense(model_dir / config.dense[0], int(backbone.config.hidden_size)) if config.dense else None
    encoder = SentenceEncoder(backbone, config.pooling, config.normalize, projection, length)
    return encoder.eval(), tokenizer


def _is_bilstm_folder(model_dir: Path) -> bool:
    """Whether modules.json's first module is kdpipe's BiLSTMTokens (read without importing that module, which
    imports sentence-transformers)."""
    try:
        entries = json.loads((Path(model_dir) / "modules.json").read_text(encoding="utf-8"))
        return bool(entries) and entries[0].get("type") == BILSTM_MODULE
    except (OSError, ValueError, AttributeError, TypeError, KeyError, IndexError):
        return False


def _load_bilstm(model_dir: Path) -> tuple[SentenceEncoder, Any]:
    from kdpipe.tasks.embedding.bilstm import load_saved

    saved = load_saved(model_dir)
    width = saved.model.token_width
    projection = _load_dense(saved.dense, width) if saved.dense is not None else None
    encoder = SentenceEncoder(saved.model, saved.pooling, saved.normalize, projection, saved.max_seq_length)
    return encoder.eval(), saved.tokenizer


def _max_seq_length(config: SentenceConfig, tokenizer: Any, backbone: Any) -> int:
    # sentence-transformers' rule: sentence_bert_config.json's max_seq_length, else the tokenizer's limit capped
    # at the position table
    if config.max_seq_length is not None:
        return config.max_seq_length
    limit = int(tokenizer.model_max_length)
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    return limit if limit < _NO_LIMIT else 512


def _lowercase(tokenizer: Any) -> None:
    # do_lower_case: sentence-transformers puts a Lowercase normaliser in front of the tokenizer's own
    from tokenizers.normalizers import Lowercase, Sequence

    current = tokenizer.backend_tokenizer.normalizer
    tokenizer.backend_tokenizer.normalizer = Sequence([Lowercase(), current] if current is not None else [Lowercase()])


def _load_dense(folder: Path, hidden: int) -> nn.Linear:
    """A sentence-transformers Dense module without activation as nn.Linear (its weights under `linear.`)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{shown(folder / 'config.json')}: cannot be read ({e})", "re-save the model") from None
    # sentence-transformers' Dense defaults to tanh when the config names no activation
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation != _IDENTITY:
        raise ModelError(
            f"{shown(folder)}: Dense activation {activation} is not supported (kdpipe's projection is linear)",
            "use a model whose Dense module has no activation (torch.nn.Identity)",
        )
    state = _load_weights(folder)
    weight = state.get("linear.weight")
    if weight is None or weight.ndim != 2 or weight.shape[1] != hidden:
        got = "none" if weight is None else tuple(weight.shape)
        raise ModelError(f"{shown(folder)}: Dense weight linear.weight should be (D, {hidden}), is {got}", "")
    bias = state.get("linear.bias")
    linear = nn.Linear(hidden, weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None and linear.bias is not None:
            linear.bias.copy_(bias)
    return linear


def _load_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return dict(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True))
    raise ModelError(f"{shown(folder)}: no model.safetensors or pytorch_model.bin", "re-save the model")


def encode(encoder: SentenceEncoder, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Embed `texts` -> float32 (N, D), in batches of similar length (as sentence-transformers sorts them), in
    eval mode (the encoder's mode is restored afterwards)."""
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    device = next(encoder.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=encoder.max_seq_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                vectors = encoder(
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                    batch["token_type_ids"].to(device) if "token_type_ids" in batch else None,
                )
            out[rows] = vectors.float().cpu().numpy()
    finally:
        encoder.train(was_training)
    return out


def embedder(encoder: SentenceEncoder, tokenizer: Any, batch_size: int = 32) -> Embed:
    """`encode` bound to one encoder: texts -> (N, D), what the quality metrics take."""
    return lambda texts: encode(encoder, tokenizer, texts, batch_size)


def save_sentence_transformers(encoder: SentenceEncoder, tokenizer: Any, out_dir: Path) -> Path:
    """Write `encoder` as a sentence-transformers folder (Transformer, Pooling, [Dense], [Normalize]) with
    sentence-transformers' own save, so `SentenceTransformer(out_dir)` loads it. All or nothing: it is built in a
    temporary folder beside `out_dir` and renamed into place (replacing an older one). A BiLSTM backbone is saved
    with kdpipe's BiLSTMTokens input module in place of Transformer (kdpipe.tasks.embedding.bilstm)."""
    from sentence_transformers import SentenceTransformer

    out_dir = Path(out_dir)
    with replacing_dir(out_dir) as staging:
        hf = staging.parent / "hf"
        if _is_bilstm(encoder):
            from kdpipe.tasks.embedding.bilstm import st_modules

            first = st_modules(encoder, tokenizer, _st_module_classes())
        else:
            encoder.backbone.save_pretrained(hf)
            tokenizer.save_pretrained(hf)
            first = _st_input(encoder, hf)
        model = SentenceTransformer(modules=[*first, *_st_head(encoder)], device="cpu")
        model.save(str(staging), create_model_card=False)
    return out_dir


def _is_bilstm(encoder: SentenceEncoder) -> bool:
    from kdpipe.models.bilstm import ENCODER_MODEL_TYPE

    return getattr(getattr(encoder.backbone, "config", None), "model_type", None) == ENCODER_MODEL_TYPE


def _st_input(encoder: SentenceEncoder, hf: Path) -> list[Any]:
    models = _st_module_classes()
    return [
        models.Transformer(str(hf), max_seq_length=encoder.max_seq_length),
        models.Pooling(encoder.hidden_size, pooling_mode=encoder.pooling),
    ]


def _st_head(encoder: SentenceEncoder) -> list[Any]:
    """Dense (no activation) and Normalize, as the encoder has them."""
    models = _st_module_classes()
    modules: list[Any] = []
    if encoder.projection is not None:
        proj = encoder.projection
        modules.append(
            models.Dense(
                proj.in_features,
                proj.out_features,
                bias=proj.bias is not None,
                activation_function=nn.Identity(),
                init_weight=proj.weight.detach().cpu().clone(),
                init_bias=proj.bias.detach().cpu().clone() if proj.bias is not None else None,
            )
        )
    if encoder.normalize:
        modules.append(models.Normalize())
    return modules


def _st_module_classes() -> Any:
    """sentence-transformers' module classes (Transformer, Pooling, Dense, Normalize)."""
    import importlib

    try:  # their home in 5.x; the old `sentence_transformers.models` path warns that it is deprecated
        return importlib.import_module("sentence_transformers.sentence_transformer.modules")
    except ImportError:
        return importlib.import_module("sentence_transformers.models")
