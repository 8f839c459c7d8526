"""SentenceEncoder: a projection student saved as a sentence-transformers folder loads there with the same vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_embedding_tiny import SENTENCES, make_bert, make_st_dir, make_tokenizer

from kdpipe.errors import ModelError
from kdpipe.tasks.embedding.encoder import SentenceEncoder, encode, load_encoder, save_sentence_transformers


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.mark.parametrize("normalize", [True, False])
def test_projection_student_round_trips_through_sentence_transformers(tmp_path: Path, normalize: bool) -> None:
    from sentence_transformers import SentenceTransformer

    tokenizer = make_tokenizer()
    torch.manual_seed(3)
    projection = torch.nn.Linear(64, 32)
    encoder = SentenceEncoder(make_bert(len(tokenizer)), "mean", normalize, projection, max_seq_length=48).eval()
    ours = encode(encoder, tokenizer, SENTENCES)
    assert ours.shape == (len(SENTENCES), 32)
    out = save_sentence_transformers(encoder, tokenizer, tmp_path / "student")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense"] + (["Normalize"] if normalize else [])
    theirs = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
    assert theirs.shape == (len(SENTENCES), 32)
    assert _min_cosine(ours, theirs) >= 0.99999
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # raw vectors too: the projection's bias was kept
    again, tok2 = load_encoder(out)  # and kdpipe reads back what it wrote
    assert again.projection is not None and again.dim == 32 and again.max_seq_length == 48
    np.testing.assert_allclose(encode(again, tok2, SENTENCES), ours, atol=1e-5)


def test_save_replaces_an_older_folder_whole(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    out = tmp_path / "student"
    first = SentenceEncoder(make_bert(len(tokenizer), seed=1), "cls", True).eval()
    save_sentence_transformers(first, tokenizer, out)
    second = SentenceEncoder(make_bert(len(tokenizer), seed=2), "max", False).eval()
    save_sentence_transformers(second, tokenizer, out)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "max"
    assert not (out / "2_Normalize").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no staging folder left behind


def test_encode_restores_training_mode_and_handles_empty(tmp_path: Path) -> None:
    encoder, tokenizer = load_encoder(make_st_dir(tmp_path / "st"))
    encoder.train()
    a = encode(encoder, tokenizer, SENTENCES[:4])
    assert encoder.training
    np.testing.assert_allclose(a, encode(encoder, tokenizer, SENTENCES[:4]), atol=1e-6)  # dropout was off
    assert encode(encoder, tokenizer, []).shape == (0, 64)


def test_bad_dense_and_missing_backbone(tmp_path: Path) -> None:
    d = make_st_dir(tmp_path / "st", dense_out=16)
    cfg = d / "2_Dense" / "config.json"
    cfg.write_text(
        json.dumps({**json.loads(cfg.read_text()), "activation_function": "torch.nn.modules.activation.Tanh"})
    )
    with pytest.raises(ModelError, match="Dense activation torch.nn.modules.activation.Tanh is not supported"):
        load_encoder(d)
    (d / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json"):
        load_encoder(d)
    with pytest.raises(ModelError, match="projection takes 32 features but the backbone gives 64"):
        SentenceEncoder(make_bert(60), "mean", True, torch.nn.Linear(32, 8))


def test_importing_the_config_modules_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import kdpipe.tasks.embedding.pooling, kdpipe.tasks.embedding.teachers, kdpipe.tasks.embedding.quality\n"
        "import kdpipe.tasks.embedding.onnx, kdpipe.tasks.embedding.static\n"
        "heavy = ('torch', 'transformers', 'sentence_transformers', 'gensim', 'model2vec', 'scipy', 'onnx')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
