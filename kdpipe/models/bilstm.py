"""A heterogeneous student: the BiLSTM sentence classifier of Tang et al. 2019, "Distilling task-specific
knowledge from BERT into simple neural networks".

Embedding -> bidirectional LSTM -> the two directions' final states, concatenated -> ReLU MLP -> logits. It
reads the teacher's token ids (same tokenizer), so the logit losses (Hinton KD, logit MSE) apply unchanged; it
has no hidden states or attentions that line up with a transformer's, so the feature losses do not
(`FEATURE_LOSSES_SUPPORTED`). Saved and reloaded like any HF model once this module is imported (`register`).

Padding never changes the result, and without pack_padded_sequence (so it exports to ONNX): each row is
first rolled so that its real tokens start at position 0 (a no-op for right padding; left padding works too),
the forward LSTM's state is read at position len-1, and the backward LSTM runs on the row reversed within its
length (index len-1-t for t < len, t otherwise), so it starts at the last REAL token, and its state is read at
position len-1 of the reversed row. The attention mask must mark one contiguous block of real tokens.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from kdpipe.errors import ConfigError, ModelError, did_you_mean

MODEL_TYPE = "kdpipe-bilstm"
# the sentence-encoder body (BiLSTMEncoderModel): token states instead of logits
ENCODER_MODEL_TYPE = "kdpipe-bilstm-encoder"
# the distill stage must refuse feature (hidden-state / attention) losses for this student
FEATURE_LOSSES_SUPPORTED = False
EMBEDDINGS = ("teacher", "random")
ONNX_INPUTS = ("input_ids", "attention_mask")


class BiLSTMConfig(PretrainedConfig):
    """Sizes of the BiLSTM student; num_labels, id2label and label2id are the base class's."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 30522,
        embedding_dim: int = 300,
        hidden_size: int = 300,
        num_layers: int = 1,
        mlp_size: int = 400,
        dropout: float = 0.1,
        pad_token_id: int = 0,
        initializer_range: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size  # per direction
        self.num_layers = num_layers
        self.mlp_size = mlp_size
        self.dropout = dropout
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def _positions(mask: Tensor) -> Tensor:
    """0, 1, ..., T-1 per row, (B, T) int64, from tensor ops only (no Python ints: the ONNX axes stay dynamic)."""
    return torch.cumsum(torch.ones_like(mask), dim=1) - 1


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, D) reordered along time by index (B, T): out[b, t] = x[b, index[b, t]]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand_as(x))


def _time_indices(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(roll, reverse, last) for a (B, T) mask with one contiguous block of real tokens per row.

    roll moves each row's real tokens to positions 0..len-1; reverse flips positions 0..len-1 and leaves the
    rest in place (an involution); last (B,) is len-1. A row with no real token is treated as length 1."""
    mask = mask.long()
    t = _positions(mask)
    length = mask.sum(1, keepdim=True).clamp(min=1)
    start = torch.argmax(mask, dim=1, keepdim=True)  # the first real token (0 for right padding)
    width = t[:, -1:] + 1  # T, as a tensor
    roll = torch.remainder(t + start, width)
    reverse = torch.where(t < length, length - 1 - t, t)
    return roll, reverse, (length - 1).squeeze(1)


def _unroll(mask: Tensor) -> Tensor:
    """The inverse of `_time_indices`' roll: position t of the original row is position (t - start) mod T of the
    rolled one (the identity for right padding)."""
    mask = mask.long()
    t = _positions(mask)
    start = torch.argmax(mask, dim=1, keepdim=True)
    return torch.remainder(t - start, t[:, -1:] + 1)


def _stack(
    x: Tensor,
    reverse: Tensor,
    forward_lstms: nn.ModuleList,
    backward_lstms: nn.ModuleList,
    dropout: nn.Module,
    layers: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The stacked BiLSTM on rolled embeddings x (B, T, E): (forward states (B, T, H) in rolled time, backward
    states (B, T, H) in reversed time: position s is token len-1-s). With `layers`, each layer's two directions
    in rolled time, (B, T, 2H), are appended to it."""
    fwd = bwd = x
    for i, (f_lstm, b_lstm) in enumerate(zip(forward_lstms, backward_lstms, strict=True)):
        if i:
            x = dropout(torch.cat([fwd, _gather_time(bwd, reverse)], dim=-1))
        fwd = f_lstm(x)[0]
        bwd = b_lstm(_gather_time(x, reverse))[0]
        if layers is not None:
            layers.append(torch.cat([fwd, _gather_time(bwd, reverse)], dim=-1))
    return fwd, bwd


def _init_bilstm_weights(module: nn.Module, std: float) -> None:
    """Normal embeddings (zero pad row), PyTorch's uniform LSTM init, normal linear weights, zero biases."""
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LSTM):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for p in module.parameters():
                p.uniform_(-bound, bound)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()


def _lstms(config: BiLSTMConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
    sizes = [config.embedding_dim] + [2 * config.hidden_size] * (config.num_layers - 1)
    return (
        nn.ModuleList(nn.LSTM(n, config.hidden_size, batch_first=True) for n in sizes),
        nn.ModuleList(nn.LSTM(n, config.hidden_size, batch_first=True) for n in sizes),
    )


class BiLSTMForSequenceClassification(PreTrainedModel):
    """Tang et al. 2019's BiLSTM classifier behind the HF sequence-classification interface."""

    config_class = BiLSTMConfig
    base_model_prefix = "bilstm"
    main_input_name = "input_ids"
    supports_feature_losses = FEATURE_LOSSES_SUPPORTED

    def __init__(self, config: BiLSTMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.forward_lstms, self.backward_lstms = _lstms(config)
        self.dropout = nn.Dropout(config.dropout)
        self.mlp = nn.Linear(2 * config.hidden_size, config.mlp_size)
        self.classifier = nn.Linear(config.mlp_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Normal embeddings (zero pad row), PyTorch's uniform LSTM init, normal linear weights, zero biases."""
        _init_bilstm_weights(module, self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"the BiLSTM's input embeddings must be an nn.Embedding, got {type(value).__name__}")
        self.embeddings = value

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, 2H): the forward state at the last real token, the backward one at the first."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        roll, reverse, last = _time_indices(attention_mask)
        x = self.dropout(self.embeddings(_gather_time(input_ids.unsqueeze(-1), roll).squeeze(-1)))
        fwd, bwd = _stack(x, reverse, self.forward_lstms, self.backward_lstms, self.dropout)
        index = last.view(-1, 1, 1).expand(-1, 1, fwd.shape[-1])
        return torch.cat([fwd.gather(1, index).squeeze(1), bwd.gather(1, index).squeeze(1)], dim=-1)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Logits (B, C); loss = CE (MSE for one label) when labels are given. token_type_ids are ignored and
        there are no hidden states or attentions to return."""
        h = self.encode(input_ids, attention_mask)
        logits = self.classifier(self.dropout(F.relu(self.mlp(self.dropout(h)))))
        loss: Any = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BiLSTMEncoderConfig(BiLSTMConfig):
    """The sentence-encoder body's sizes (mlp_size and the labels are unused)."""

    model_type = ENCODER_MODEL_TYPE


class BiLSTMEncoderModel(PreTrainedModel):
    """The BiLSTM as a sentence encoder's body: (B, T) ids -> token states (B, T, 2H), both directions'
    outputs at every position, returned as a transformer's `last_hidden_state` (so a SentenceEncoder pools them).

    The forward direction reads each row from its first real token, the backward one from its last (the same
    roll / reversal as the classifier), so a real token's state does not depend on the padding; states at pad
    positions are whatever the LSTMs give and must be masked out by the pooling. token_type_ids are ignored."""

    config_class = BiLSTMEncoderConfig
    base_model_prefix = "bilstm"
    main_input_name = "input_ids"
    supports_feature_losses = FEATURE_LOSSES_SUPPORTED

    def __init__(self, config: BiLSTMEncoderConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.forward_lstms, self.backward_lstms = _lstms(config)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        _init_bilstm_weights(module, self.config.initializer_range)

    @property
    def token_width(self) -> int:
        """The width of a token state: 2 x hidden_size (both directions)."""
        return 2 * int(self.config.hidden_size)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"the BiLSTM's input embeddings must be an nn.Embedding, got {type(value).__name__}")
        self.embeddings = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        """(B, T) ids and mask -> BaseModelOutput(last_hidden_state (B, T, 2H)) in the input's positions; with
        output_hidden_states also hidden_states: the word vectors (B, T, E), then each layer's (B, T, 2H)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        roll, reverse, _ = _time_indices(attention_mask)
        x = self.dropout(self.embeddings(_gather_time(input_ids.unsqueeze(-1), roll).squeeze(-1)))
        layers: list[Tensor] = [x]
        _stack(x, reverse, self.forward_lstms, self.backward_lstms, self.dropout, layers)
        unroll = _unroll(attention_mask)
        if not output_hidden_states:
            return BaseModelOutput(last_hidden_state=_gather_time(layers[-1], unroll))  # type: ignore[arg-type]
        states: Any = tuple(_gather_time(h, unroll) for h in layers)
        return BaseModelOutput(last_hidden_state=states[-1], hidden_states=states)


def register() -> None:
    """Make AutoConfig / AutoModelForSequenceClassification know "kdpipe-bilstm", and AutoConfig / AutoModel
    "kdpipe-bilstm-encoder" (idempotent)."""
    AutoConfig.register(MODEL_TYPE, BiLSTMConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(BiLSTMConfig, BiLSTMForSequenceClassification, exist_ok=True)
    AutoConfig.register(ENCODER_MODEL_TYPE, BiLSTMEncoderConfig, exist_ok=True)
    AutoModel.register(BiLSTMEncoderConfig, BiLSTMEncoderModel, exist_ok=True)


register()


def is_bilstm(model_dir: Path) -> bool:
    """Whether a saved model directory holds this student (reads config.json only)."""
    try:
        return bool(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == MODEL_TYPE)
    except (OSError, ValueError):
        return False


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"bilstm {name} must be a positive integer, got {value!r}", f"set {name}: 300")


def _pad_id(teacher: Any, tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, getattr(teacher.config, "pad_token_id", None), tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    raise ModelError("the teacher's tokenizer has no pad token", "set tokenizer.pad_token before building the BiLSTM")


def from_teacher(
    teacher: Any,
    tokenizer: Any,
    *,
    embedding_dim: int | None = None,
    hidden_size: int = 300,
    num_layers: int = 1,
    mlp_size: int = 400,
    dropout: float = 0.1,
    embeddings: str = "teacher",
    seed: int = 0,
) -> BiLSTMForSequenceClassification:
    """A BiLSTM student with the teacher's vocabulary, labels and pad id; embeddings="teacher" copies the
    teacher's input word embeddings (embedding_dim then defaults to, and must equal, their width)."""
    if embeddings not in EMBEDDINGS:
        raise ConfigError(f"unknown bilstm embeddings {embeddings!r}", did_you_mean(embeddings, list(EMBEDDINGS)))
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"bilstm dropout must be in [0, 1), got {dropout}", "set dropout: 0.1")
    table = teacher.get_input_embeddings().weight.detach()
    vocab, width = int(table.shape[0]), int(table.shape[1])
    if len(tokenizer) > vocab:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the teacher's embedding only {vocab} rows",
            "use the teacher's own tokenizer",
        )
    if embedding_dim is None:
        embedding_dim = width if embeddings == "teacher" else 300
    if embeddings == "teacher" and embedding_dim != width:
        raise ConfigError(
            f"bilstm embedding_dim {embedding_dim} differs from the teacher's embedding width {width}",
            f"drop embedding_dim (it defaults to {width}) or use embeddings: random",
        )
    _check_sizes(embedding_dim=embedding_dim, hidden_size=hidden_size, num_layers=num_layers, mlp_size=mlp_size)
    tc = teacher.config
    config = BiLSTMConfig(
        vocab_size=vocab,
        embedding_dim=embedding_dim,
        hidden_size=hidden_size,
        num_layers=num_layers,
        mlp_size=mlp_size,
        dropout=dropout,
        pad_token_id=_pad_id(teacher, tokenizer),
        num_labels=tc.num_labels,
        id2label=dict(tc.id2label),
        label2id=dict(tc.label2id),
        problem_type=getattr(tc, "problem_type", None),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BiLSTMForSequenceClassification(config)
    if embeddings == "teacher":
        with torch.no_grad():
            model.embeddings.weight.copy_(table.float())
    return model


class _LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits, the signature the ONNX graph gets."""

    def __init__(self, model: BiLSTMForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _dummy_inputs(vocab: int, pad: int) -> tuple[Tensor, Tensor]:
    """Batch 2, length 16, rows of different lengths (so the traced graph exercises the reversal)."""
    ids = torch.arange(2 * 16, dtype=torch.int64).view(2, 16) % max(vocab, 1)
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 9:] = 0
    return ids.masked_fill(mask == 0, pad), mask


def load_bilstm(model_dir: Path) -> BiLSTMForSequenceClassification:
    """A saved BiLSTM student, in eval mode, from local files only."""
    if not is_bilstm(model_dir):
        raise ModelError(f"{model_dir} does not hold a {MODEL_TYPE} model", "pass the distill stage's student dir")
    model = BiLSTMForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True)
    return model.eval()


def export_bilstm_onnx(model_dir: Path, out_path: Path, opset: int = 18, *, dynamic: bool = True) -> dict[str, Any]:
    """torch.onnx.export (TorchScript, dynamo=False) to out_path: inputs input_ids and attention_mask (int64),
    output logits, batch and sequence axes dynamic (dynamic=False bakes in the dummy 2 x 16, for tests)."""
    import onnx

    model = load_bilstm(model_dir)
    args = _dummy_inputs(model.config.vocab_size, int(model.config.pad_token_id or 0))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript LSTM symbolic warns about h0/c0 and batch sizes; they are zeros built in-graph, and
        # bilstm_parity on other batch sizes is the real check
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # nn.LSTM's own shape checks
        torch.onnx.export(
            _LogitsOnly(model),
            args,
            str(out_path),
            input_names=list(ONNX_INPUTS),
            output_names=["logits"],
            opset_version=opset,
            dynamic_axes={**axes, "logits": {0: "batch"}} if dynamic else None,
            dynamo=False,
        )
    graph = onnx.load(str(out_path), load_external_data=False).graph

    def dims(v: Any) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "opset": opset,
        "input_names": [i.name for i in graph.input],
        "inputs": {i.name: dims(i) for i in graph.input},
        "outputs": {o.name: dims(o) for o in graph.output},
    }


def bilstm_parity(model_dir: Path, onnx_path: Path, batch: dict[str, np.ndarray], atol: float) -> tuple[bool, float]:
    """(ok, max |logits_torch - logits_onnx|) on one batch; fail-closed: NaN/inf, a shape mismatch or a batch
    onnxruntime refuses (e.g. axes baked in as static) give ok False."""
    import onnxruntime as ort

    model = load_bilstm(model_dir)
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in batch.items() if k in ONNX_INPUTS}
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        got = session.run(["logits"], {k: v for k, v in feed.items() if k in wanted})[0]
    except Exception:  # onnxruntime's own error types: a static shape, a missing input, a bad graph
        return False, float("inf")
    if got.shape != ref.shape:
        return False, float("inf")
    if ref.size == 0:
        return False, float("inf")
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
    # written so that NaN fails: `nan <= atol` is False (np.max propagates NaN)
    return bool(diff <= atol), diff
