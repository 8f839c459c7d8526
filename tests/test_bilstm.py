"""The BiLSTM student (kdpipe.models.bilstm): HF save/reload, padding invariance, from_teacher, KD training, ONNX
export."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from kdpipe.errors import ConfigError
from kdpipe.losses.logits import hinton
from kdpipe.models.bilstm import (
    MODEL_TYPE,
    BiLSTMConfig,
    BiLSTMForSequenceClassification,
    bilstm_parity,
    export_bilstm_onnx,
    from_teacher,
    is_bilstm,
    register,
)

VOCAB, PAD = 50, 0


def tiny(seed: int = 0, layers: int = 1, dropout: float = 0.0) -> BiLSTMForSequenceClassification:
    torch.manual_seed(seed)
    config = BiLSTMConfig(
        vocab_size=VOCAB,
        embedding_dim=16,
        hidden_size=16,
        num_layers=layers,
        mlp_size=16,
        dropout=dropout,
        pad_token_id=PAD,
        num_labels=3,
    )
    return BiLSTMForSequenceClassification(config).eval()


def padded(rows: list[list[int]], length: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id rows to `length`: (input_ids, attention_mask), int64."""
    ids = torch.full((len(rows), length), PAD, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def sentences(n: int, seed: int, longest: int = 8) -> list[list[int]]:
    """n rows of random real ids (never PAD), lengths 1..longest, all different where n allows."""
    g = torch.Generator().manual_seed(seed)
    lengths = [longest - (i % longest) for i in range(n)]
    return [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in lengths]


def batch_np(rows: list[list[int]], length: int, left: bool = False) -> dict[str, np.ndarray]:
    ids, mask = padded(rows, length, left)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def naive_bilstm(model: BiLSTMForSequenceClassification) -> nn.LSTM:
    """torch's own bidirectional LSTM with the student's (one-layer) weights: the definition to match."""
    h = model.config.hidden_size
    lstm = nn.LSTM(model.config.embedding_dim, h, batch_first=True, bidirectional=True)
    fwd, bwd = model.forward_lstms[0], model.backward_lstms[0]
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(lstm, f"{name}_l0").copy_(getattr(fwd, f"{name}_l0"))
            getattr(lstm, f"{name}_l0_reverse").copy_(getattr(bwd, f"{name}_l0"))
    return lstm.eval()


def final_states(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """(B, T, E) -> (B, 2H): [forward h_n, backward h_n], what Tang et al. concatenate."""
    h_n = lstm(x)[1][0]
    return torch.cat([h_n[0], h_n[1]], dim=-1)


def test_save_and_auto_reload_give_identical_logits(tmp_path: Path) -> None:
    model = tiny()
    ids, mask = padded(sentences(4, seed=1), 8)
    model.save_pretrained(tmp_path)
    assert is_bilstm(tmp_path) and not is_bilstm(tmp_path / "missing")
    register()  # idempotent: already called at import
    assert isinstance(AutoConfig.for_model(MODEL_TYPE), BiLSTMConfig)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path, local_files_only=True).eval()
    assert isinstance(back, BiLSTMForSequenceClassification)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, back(ids, mask).logits)


def test_padding_does_not_change_the_logits() -> None:
    """Rows of lengths 8..1 padded to 8 and to 20, right and left: the same logits (two layers, too)."""
    rows = sentences(8, seed=2)
    for layers in (1, 2):
        model = tiny(layers=layers)
        with torch.no_grad():
            ref = model(*padded(rows, 8)).logits
            for length, left in ((20, False), (20, True), (8, True)):
                got = model(*padded(rows, length, left)).logits
                torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
            alone = torch.cat([model(torch.tensor([r])).logits for r in rows])  # no mask, no padding
        torch.testing.assert_close(alone, ref, atol=1e-6, rtol=0)


def test_the_encoding_is_torchs_bilstm_on_the_real_tokens_and_a_naive_one_differs() -> None:
    """The student's features equal nn.LSTM(bidirectional=True) run on each row alone; the same naive
    module over the padded batch starts its backward pass on the padding and gets something else."""
    model = tiny()
    lstm = naive_bilstm(model)
    rows = sentences(6, seed=3)
    ids, mask = padded(rows, 20)
    with torch.no_grad():
        ours = model.encode(ids, mask)
        per_row = torch.cat([final_states(lstm, model.embeddings(torch.tensor([r]))) for r in rows])
        naive = final_states(lstm, model.embeddings(ids))
    torch.testing.assert_close(ours, per_row, atol=1e-6, rtol=0)
    assert (naive - per_row).abs().max() > 1e-3  # the padding test above is not vacuous


def test_token_type_ids_and_feature_flags_are_accepted_and_labels_give_ce() -> None:
    model = tiny()
    ids, mask = padded(sentences(3, seed=4), 8)
    labels = torch.tensor([0, 1, 2])
    types = torch.zeros_like(ids)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
    assert out.hidden_states is None and out.attentions is None
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    assert BiLSTMForSequenceClassification.supports_feature_losses is False


def tiny_teacher() -> tuple[BertForSequenceClassification, Any]:
    torch.manual_seed(0)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    return BertForSequenceClassification(config).eval(), make_tokenizer()


def test_from_teacher_copies_vocab_labels_pad_and_embeddings() -> None:
    teacher, tok = tiny_teacher()
    student = from_teacher(teacher, tok, hidden_size=16, mlp_size=16)
    table = teacher.get_input_embeddings().weight
    assert torch.equal(student.get_input_embeddings().weight, table)
    c = student.config
    assert (c.vocab_size, c.embedding_dim, c.pad_token_id) == (VOCAB, 16, tok.pad_token_id)
    assert (c.num_labels, c.id2label, c.label2id) == (3, teacher.config.id2label, teacher.config.label2id)
    ids = tok(["good road", "the car was very bad"], padding=True, return_tensors="pt")
    assert student(**ids).logits.shape == (2, 3)  # takes the tokenizer's batch as is, token_type_ids included

    a = from_teacher(teacher, tok, embeddings="random", embedding_dim=8, hidden_size=8, mlp_size=8, seed=3)
    b = from_teacher(teacher, tok, embeddings="random", embedding_dim=8, hidden_size=8, mlp_size=8, seed=3)
    assert a.config.embedding_dim == 8
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ConfigError, match="embedding width 16"):
        from_teacher(teacher, tok, embedding_dim=8)
    with pytest.raises(ConfigError) as e:
        from_teacher(teacher, tok, embeddings="word2vec")
    assert "random" in e.value.hint


def test_a_few_dozen_hinton_steps_lower_the_loss() -> None:
    """A separable toy task (each class has its own tokens, placed anywhere in rows of different lengths);
    the teacher's logits say the class. 40 steps of kdpipe's Hinton loss at least halve it."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 3
    rows = []
    for i, c in enumerate(y.tolist()):
        row = torch.randint(31, VOCAB, (3 + i % 6,), generator=g)  # shared filler tokens
        row[int(torch.randint(0, len(row), (1,), generator=g))] = 1 + 10 * c + i % 10  # a class token
        rows.append(row.tolist())
    ids, mask = padded(rows, 10)
    v = 4.0 * nn.functional.one_hot(y, 3).float() - 2.0
    model = tiny(dropout=0.1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = hinton(model(ids, mask).logits, v, y, temperature=2.0, alpha=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("bilstm_onnx")
    tiny(layers=2).save_pretrained(root / "model")
    spec = export_bilstm_onnx(root / "model", root / "model.onnx", opset=18)
    return root / "model", root / "model.onnx", spec


def test_onnx_export_matches_torch_on_two_shapes(exported: tuple[Path, Path, dict[str, Any]]) -> None:
    """Neither batch is the exporter's dummy 2 x 16: the batch and sequence axes really are dynamic."""
    model_dir, onnx_path, spec = exported
    assert spec["opset"] == 18 and spec["input_names"] == ["input_ids", "attention_mask"]
    assert spec["inputs"]["input_ids"] == ["batch", "sequence"] and spec["outputs"]["logits"] == ["batch", 3]
    for batch in (batch_np(sentences(3, seed=5, longest=7), 7), batch_np(sentences(9, seed=6), 13, left=True)):
        ok, diff = bilstm_parity(model_dir, onnx_path, batch, atol=1e-5)
        assert ok and diff <= 1e-5, diff


def test_parity_catches_static_axes_and_a_perturbed_model(
    exported: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    model_dir, onnx_path, _ = exported
    static = tmp_path / "static.onnx"
    spec = export_bilstm_onnx(model_dir, static, dynamic=False)
    assert spec["inputs"]["input_ids"] == [2, 16]
    assert bilstm_parity(model_dir, static, batch_np(sentences(2, seed=7), 16), atol=1e-5)[0]  # its own shape
    other = batch_np(sentences(3, seed=7, longest=7), 7)
    assert bilstm_parity(model_dir, static, other, atol=1e-5) == (False, math.inf)  # onnxruntime refuses it

    perturbed = tmp_path / "perturbed"
    shutil.copytree(model_dir, perturbed)
    model = BiLSTMForSequenceClassification.from_pretrained(perturbed, local_files_only=True)
    with torch.no_grad():
        model.classifier.bias.add_(1e-3)
    model.save_pretrained(perturbed)
    ok, diff = bilstm_parity(perturbed, onnx_path, batch_np(sentences(3, seed=8, longest=7), 7), atol=1e-5)
    assert not ok and diff == pytest.approx(1e-3, rel=1e-2)


def test_a_nan_weight_fails_parity(tmp_path: Path) -> None:
    """NaN in both the model and its export: every comparison is NaN, and NaN must fail, not pass."""
    model = tiny()
    with torch.no_grad():
        model.mlp.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    export_bilstm_onnx(tmp_path / "model", tmp_path / "model.onnx")
    batch = batch_np(sentences(2, seed=9, longest=5), 5)
    ok, diff = bilstm_parity(tmp_path / "model", tmp_path / "model.onnx", batch, atol=1e-5)
    assert not ok and math.isnan(diff)
