"""Pooling and normalisation read from a sentence-transformers folder give SentenceTransformer.encode's vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_embedding_tiny import SENTENCES, make_st_dir

from kdpipe.errors import ConfigError, ModelError
from kdpipe.tasks.embedding.pooling import normalize, pool, read_sentence_config


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(("mode", "norm"), [("mean", True), ("cls", False), ("max", True)])
def test_pooled_vectors_equal_sentence_transformers(tmp_path: Path, mode: str, norm: bool) -> None:
    from sentence_transformers import SentenceTransformer

    from kdpipe.tasks.embedding.encoder import encode, load_encoder

    d = make_st_dir(tmp_path / mode, pooling=mode, normalize=norm)
    config = read_sentence_config(d)
    assert (config.pooling, config.normalize, config.source) == (mode, norm, "modules.json")
    encoder, tokenizer = load_encoder(d)
    ours = encode(encoder, tokenizer, SENTENCES, batch_size=5)  # batches of mixed lengths: padding matters
    theirs = SentenceTransformer(str(d), device="cpu").encode(SENTENCES, batch_size=3)
    assert ours.shape == theirs.shape == (len(SENTENCES), 64)
    assert _cosines(ours, theirs).min() >= 0.99999
    if norm:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    else:  # the raw vector, not a rescaled one
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # the modes really differ: a reader that ignored the config would fail one of the parametrisations
    other = encode(load_encoder(d, pooling="mean" if mode != "mean" else "cls")[0], tokenizer, SENTENCES)
    assert _cosines(other, theirs).min() < 0.999


def test_pool_masks_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]], [[0.0, 0.0], [5.0, 6.0], [7.0, -8.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0 right-padded, row 1 left-padded
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, -1.0], [6.0, -1.0]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[3.0, 2.0], [7.0, 6.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    torch.testing.assert_close(normalize(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
    with pytest.raises(ConfigError, match="lasttoken"):
        pool(hidden, mask, "lasttoken")


def _st_folder(tmp_path: Path, modules: list[dict[str, str]], pooling: dict[str, object]) -> Path:
    d = tmp_path / "m"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return d


TRANSFORMER = {"path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def test_legacy_pooling_config_and_minilm_layout(tmp_path: Path) -> None:
    # the layout of sentence-transformers < 5 (all-MiniLM-L6-v2's): boolean flags, 2_Normalize listed, no folder
    d = _st_folder(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], {"pooling_mode_cls_token": True})
    (d / "sentence_bert_config.json").write_text('{"max_seq_length": 256, "do_lower_case": false}')
    config = read_sentence_config(d)
    assert (config.pooling, config.normalize, config.max_seq_length) == ("cls", True, 256)
    flags_off = _st_folder(tmp_path / "b", [TRANSFORMER, POOLING], {"pooling_mode_mean_tokens": False})
    assert read_sentence_config(flags_off).pooling == "mean"  # sentence-transformers' default when none is set


def test_override(tmp_path: Path) -> None:
    d = _st_folder(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], {"pooling_mode": "mean"})
    config = read_sentence_config(d, pooling="max", normalize=False)
    assert (config.pooling, config.normalize, config.source) == ("max", False, "override of modules.json")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert read_sentence_config(plain, pooling="cls").pooling == "cls"
    with pytest.raises(ConfigError, match="--pooling: unknown pooling mode 'avg'"):
        read_sentence_config(d, pooling="avg")


def test_not_a_sentence_encoder_names_the_folder(tmp_path: Path) -> None:
    plain = tmp_path / "bert-base"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="bert-base is not a sentence encoder") as e:
        read_sentence_config(plain)
    assert "--pooling" in e.value.hint
    with pytest.raises(ModelError, match="no such model directory"):
        read_sentence_config(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("pooling", "needle"),
    [
        ({"pooling_mode": "lasttoken"}, "pooling mode 'lasttoken' is not supported"),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, "'mean_sqrt_len_tokens' is not supported"),
        ({"pooling_mode": ["cls", "mean"]}, "pooling combines cls \\+ mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}, "combines cls \\+ max"),
    ],
)
def test_unsupported_pooling_is_refused(tmp_path: Path, pooling: dict[str, object], needle: str) -> None:
    d = _st_folder(tmp_path, [TRANSFORMER, POOLING], pooling)
    with pytest.raises(ModelError, match=needle) as e:
        read_sentence_config(d)
    assert "config.json" in e.value.message and "--pooling" in e.value.hint
    assert read_sentence_config(d, pooling="mean").pooling == "mean"  # the override is the way out


def test_unsupported_modules_are_refused(tmp_path: Path) -> None:
    layer_norm = {"path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    with pytest.raises(ModelError, match="module LayerNorm is not supported"):
        read_sentence_config(_st_folder(tmp_path / "a", [TRANSFORMER, POOLING, layer_norm], {}))
    with pytest.raises(ModelError, match="Normalize -> Dense"):
        dense = {"path": "3_Dense", "type": "sentence_transformers.models.Dense"}
        read_sentence_config(_st_folder(tmp_path / "b", [TRANSFORMER, POOLING, NORMALIZE, dense], {}))
    static = {"path": "", "type": "sentence_transformers.models.StaticEmbedding"}
    with pytest.raises(ModelError, match="first module is StaticEmbedding"):
        read_sentence_config(_st_folder(tmp_path / "c", [static], {}))
    broken = _st_folder(tmp_path / "d", [TRANSFORMER, POOLING], {})
    (broken / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot be read as JSON"):
        read_sentence_config(broken)
