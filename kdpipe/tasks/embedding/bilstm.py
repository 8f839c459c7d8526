"""The BiLSTM sentence-embedding student (`student.arch: bilstm` with `teacher.task: embedding`).

The teacher's tokenizer and (copied, or PCA-projected to student.bilstm.embedding_dim) word embeddings, a stacked
BiLSTM (kdpipe.models.bilstm.BiLSTMEncoderModel: token states (B, T, 2H), padding-independent), masked mean
pooling (max when the teacher pools max), a Linear to the teacher's embedding width, and the teacher's L2
normalisation: a kdpipe SentenceEncoder whose backbone is the BiLSTM (build.py assembles it from `build_parts`,
encoder.py from `load_saved`; this module does not import encoder.py, which imports it), so the distill loop, the
metrics and the ONNX export (pooling and normalisation in the graph) take it as they take a transformer student.

Saved as a sentence-transformers folder whose first module is `BiLSTMTokens` (this module's class path in
modules.json), followed by sentence-transformers' own Pooling, Dense (no activation) and Normalize:
`SentenceTransformer(dir)` loads it where kdpipe is importable (a custom module by class path, no remote code).
sentence-transformers' ONNX backend reads only a Transformer module's graph, so this student has no `st/onnx`
layout; its deployable graph is the export stage's `student/model.onnx`.

Importing this module imports torch and sentence-transformers; kdpipe.tasks.embedding.build imports it lazily.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule  # sentence-transformers 5.x (the pinned 5.7)
from torch import nn

from kdpipe.config import BiLSTMStudentConfig
from kdpipe.errors import ConfigError, ModelError
from kdpipe.files import shown
from kdpipe.models.bilstm import ENCODER_MODEL_TYPE, BiLSTMEncoderConfig, BiLSTMEncoderModel, _pad_id
from kdpipe.tasks.embedding.pooling import _read_bert_config, _read_pooling

POOLINGS = ("mean", "max")  # a recurrent encoder has no [CLS] summary token
CONFIG_FILE = "sentence_bert_config.json"


class BiLSTMTokens(InputModule):
    """sentence-transformers' input module for the BiLSTM: texts -> the teacher tokenizer's ids -> token states
    (features["token_embeddings"], B x T x 2H), which sentence-transformers' Pooling then pools."""

    config_keys = ["max_seq_length"]
    config_file_name = CONFIG_FILE
    save_in_root = True

    def __init__(self, model: BiLSTMEncoderModel, tokenizer: Any, max_seq_length: int) -> None:
        super().__init__()
        self.auto_model = model
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)

    def preprocess(self, inputs: Any, prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        texts = [str(t) for t in inputs]
        texts = self._prepend_prompt(texts, prompt) if prompt else texts
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                               return_tensors="pt")  # fmt: skip
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        states = self.auto_model(features["input_ids"], features["attention_mask"]).last_hidden_state
        features["token_embeddings"] = states
        return features

    def get_embedding_dimension(self) -> int:
        return self.auto_model.token_width

    def get_sentence_embedding_dimension(self) -> int:  # the name before sentence-transformers 5
        return self.get_embedding_dimension()

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.auto_model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> BiLSTMTokens:
        """From a local folder (kdpipe writes them; a hub id is not looked up, so the hub arguments are unused)."""
        from transformers import AutoTokenizer

        folder = Path(model_name_or_path) / subfolder
        length, _ = _read_bert_config(folder)
        model = BiLSTMEncoderModel.from_pretrained(str(folder), local_files_only=True)
        return cls(model.eval(), AutoTokenizer.from_pretrained(str(folder)), length or 512)


def class_path() -> str:
    """BiLSTMTokens' class path, as modules.json names it."""
    return f"{BiLSTMTokens.__module__}.{BiLSTMTokens.__qualname__}"


def is_bilstm_encoder(encoder: Any) -> bool:
    """Whether a SentenceEncoder's backbone is the BiLSTM."""
    return getattr(getattr(encoder.backbone, "config", None), "model_type", None) == ENCODER_MODEL_TYPE


def _table(teacher: Any, cfg: BiLSTMStudentConfig) -> tuple[torch.Tensor | None, int]:
    """(word-vector table or None for random, embedding_dim): the teacher's table, PCA-projected (centred, top
    components) when embedding_dim is below its width."""
    table = teacher.backbone.get_input_embeddings().weight.detach().float().cpu()
    width = int(table.shape[1])
    if cfg.embeddings == "random":
        return None, cfg.embedding_dim or 300
    dim = cfg.embedding_dim or width
    if dim > width:
        raise ConfigError(
            f"student.bilstm.embedding_dim {dim} is wider than the teacher's word embeddings ({width})",
            f"drop it (the teacher's {width}), give at most {width} (a PCA projection) or set embeddings: random",
        )
    if dim == width:
        return table, dim
    centred = table - table.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:dim].T, dim


def build_parts(
    cfg: BiLSTMStudentConfig, teacher: Any, tokenizer: Any, seed: int
) -> tuple[BiLSTMEncoderModel, nn.Linear, str]:
    """(BiLSTM body, Linear to the teacher's width, pooling) of a fresh student on the teacher's tokenizer; the
    caller wraps them in a SentenceEncoder with the teacher's normalisation. student.bilstm.mlp_size is a
    classifier setting and is not used here."""
    table, dim = _table(teacher, cfg)
    pad = _pad_id(teacher.backbone, tokenizer)
    config = BiLSTMEncoderConfig(
        vocab_size=int(teacher.backbone.get_input_embeddings().weight.shape[0]), embedding_dim=dim,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, mlp_size=cfg.mlp_size, dropout=cfg.dropout,
        pad_token_id=pad,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BiLSTMEncoderModel(config)
        projection = nn.Linear(model.token_width, int(teacher.dim))
    if table is not None:
        with torch.no_grad():
            model.embeddings.weight.copy_(table)
            model.embeddings.weight[pad].zero_()
    return model, projection, teacher.pooling if teacher.pooling in POOLINGS else "mean"


def st_modules(encoder: Any, tokenizer: Any, models: Any) -> list[Any]:
    """The first sentence-transformers modules of a BiLSTM SentenceEncoder: BiLSTMTokens and Pooling (the caller
    adds Dense and Normalize as for a transformer)."""
    first = BiLSTMTokens(encoder.backbone, tokenizer, encoder.max_seq_length or 512)
    return [first, models.Pooling(encoder.hidden_size, pooling_mode=encoder.pooling)]


@dataclass(frozen=True)
class Saved:
    """What a saved BiLSTM student's folder holds, for encoder.load_encoder to assemble a SentenceEncoder."""

    model: BiLSTMEncoderModel
    tokenizer: Any
    max_seq_length: int
    pooling: str
    dense: Path | None
    normalize: bool


def load_saved(folder: Path) -> Saved:
    """A BiLSTM student's sentence-transformers folder (save_sentence_transformers'): the body in eval mode, the
    tokenizer (truncating at max_seq_length), the pooling, the Dense folder and whether it normalises."""
    from transformers import AutoTokenizer

    entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    kinds = {str(e["type"]).rsplit(".", 1)[-1]: str(e.get("path", "")) for e in entries[1:]}
    if "Pooling" not in kinds:
        raise ModelError(f"{shown(folder / 'modules.json')}: the BiLSTM has no Pooling module", "re-save the student")
    model = BiLSTMEncoderModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    length = _read_bert_config(folder)[0] or 512
    tokenizer.model_max_length = length
    dense = folder / kinds["Dense"] if "Dense" in kinds else None
    pooling = _read_pooling(folder / kinds["Pooling"] / "config.json")
    return Saved(model, tokenizer, length, pooling, dense, "Normalize" in kinds)
