from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdpipe.config import StudentConfig
from kdpipe.errors import ConfigError
from kdpipe.models.layermaps import layer_map
from kdpipe.models.loading import load_classifier
from kdpipe.tasks.classification.student import build_student, select_layers


@pytest.mark.parametrize(
    ("cfg", "n", "expected"),
    [
        (StudentConfig(), 6, [0, 2, 4]),
        (StudentConfig(), 12, [0, 2, 4, 6, 8, 10]),
        (StudentConfig(layers="last-k", k=2), 6, [4, 5]),
        (StudentConfig(layers="first-k", k=2), 6, [0, 1]),
        (StudentConfig(layers=[1, 5]), 6, [1, 5]),
    ],
)
def test_select_layers(cfg: StudentConfig, n: int, expected: list[int]) -> None:
    assert select_layers(cfg, n) == expected


@pytest.mark.parametrize(
    "cfg",
    [
        StudentConfig(layers=[0, 9]),
        StudentConfig(layers=[3, 1]),
        StudentConfig(layers="last-k"),
        StudentConfig(layers="last-k", k=7),
    ],
)
def test_select_layers_rejects(cfg: StudentConfig) -> None:
    with pytest.raises(ConfigError):
        select_layers(cfg, 6)


def test_layer_map() -> None:
    assert layer_map([0, 2, 4]) == {0: 0, 1: 1, 2: 3, 3: 5}


def test_teacher_init_copies_kept_layers(tmp_path: Path) -> None:
    from conftest import make_model_dir

    teacher = load_classifier(make_model_dir(tmp_path / "t", layers=4))
    student = build_student(teacher, StudentConfig(layers=[1, 3]), [1, 3], seed=0)
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for i, src in enumerate([1, 3]):
        key = "attention.self.query.weight"
        assert torch.equal(s[f"bert.encoder.layer.{i}.{key}"], t[f"bert.encoder.layer.{src}.{key}"])
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])


def test_random_init_is_uniform_in_range(tmp_path: Path) -> None:
    from conftest import make_model_dir

    teacher = load_classifier(make_model_dir(tmp_path / "t", layers=2))
    student = build_student(teacher, StudentConfig(init="random"), [0], seed=0)
    w = student.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    assert w.abs().max() <= 0.08 and w.std() > 0.03  # U[-0.08, 0.08] has std 0.046
    assert torch.equal(student.state_dict()["bert.encoder.layer.0.output.LayerNorm.weight"], torch.ones(32))


def test_vocabulary_pruning_through_the_pipeline(tmp_path: Path) -> None:
    """A WordPiece teacher with 20 pieces no text uses: the student keeps the train split's pieces, reads the
    teacher's batches through its map while distilling, and its ONNX export (own tokenizer) passes the gates."""
    import json

    import numpy as np
    from conftest import invoke, make_csv, make_model_dir, write_recipe

    teacher = make_model_dir(tmp_path / "wp-teacher", wordpiece=True)
    csv = make_csv(tmp_path / "d.csv")
    recipe = write_recipe(
        tmp_path / "r.yaml", teacher, csv, tmp_path / "runs", student__vocab={"min_count": 1}, distill__baseline=False
    )
    code, out = invoke("run", recipe)
    assert code == 0, out
    runs = tmp_path / "runs"
    student = json.loads((runs / "student" / "manifest.json").read_text())
    vocab = student["record"]["vocab"]
    t_size = len(json.loads((teacher / "tokenizer.json").read_text())["model"]["vocab"])
    assert vocab["old_size"] == t_size and vocab["kept"] <= t_size - 20  # the unused pieces are gone
    assert vocab["coverage"] == 1.0  # the test split uses only words the train split has
    lut = np.load(runs / "student" / "vocab_map.npy")
    assert lut.shape == (t_size,) and lut.max() == vocab["kept"] - 1
    config = json.loads((runs / "distill" / "model" / "config.json").read_text())
    assert config["vocab_size"] == vocab["kept"]
    export = json.loads((runs / "export" / "manifest.json").read_text())
    assert all(m["gate"]["ok"] for n, m in export["record"]["models"].items() if n.startswith("student"))
    assert export["record"]["models"]["student"]["gate"]["value"] > 0.5  # it learned through the map


def test_width_pruning_through_the_pipeline(tmp_path: Path) -> None:
    """Half the heads and half the FFN neurons of a 4-head student removed by importance: the student saves,
    reloads, distils and exports with every gate passing, and is smaller than the depth-only student."""
    import json

    from conftest import invoke, make_csv, make_model_dir, write_recipe

    teacher = make_model_dir(tmp_path / "t4", heads=4)
    csv = make_csv(tmp_path / "d.csv")
    width = {"heads": 0.5, "ffn": 0.5, "batches": 2}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        teacher,
        csv,
        tmp_path / "runs",
        student__width=width,
        distill__baseline=False,
        distill__losses=[{"name": "hinton", "temperature": 2.0}, {"name": "hidden_cosine", "weight": 0.1}],
    )
    code, out = invoke("run", recipe)
    assert code == 0, out
    runs = tmp_path / "runs"
    rec = json.loads((runs / "student" / "manifest.json").read_text())["record"]["width"]
    assert sum(len(v) for v in rec["heads_removed"].values()) == 2  # half of the 1-layer student's 4 heads
    assert rec["ffn_kept"] == 32 and rec["ffn_total"] == 64 and rec["params_after"] < rec["params_before"]
    config = json.loads((runs / "distill" / "model" / "config.json").read_text())
    assert config["intermediate_size"] == 32 and sum(len(v) for v in config["pruned_heads"].values()) == 2
    export = json.loads((runs / "export" / "manifest.json").read_text())["record"]["models"]
    assert all(m["gate"]["ok"] for n, m in export.items() if n.startswith("student"))
