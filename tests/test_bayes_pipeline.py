"""Bayesian distillation through the stages: teacher.posterior -> student.init: bayes -> the distill 'prior' term."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, invoke, make_csv, make_model_dir, write_recipe
from safetensors.torch import load_file

SWAG = {"kind": "swag", "steps": 12, "collect_every": 2, "rank": 4, "lr": 1e-3, "factor_dtype": "float32"}


def _recipe(tmp_path: Path, posterior: dict | None, losses: list[dict], **over: object) -> Path:
    teacher = make_model_dir(tmp_path / "teacher", layers=4)
    csv = make_csv(tmp_path / "d.csv")
    settings: dict[str, object] = {
        "teacher__posterior": posterior,
        "teacher__epochs": 10,
        "student__layers": [0, 1, 3],
        "student__init": "bayes",
        "distill__losses": losses,
        "distill__epochs": 2,
        "distill__baseline": False,
        **over,
    }
    return write_recipe(tmp_path / "r.yaml", teacher, csv, tmp_path / "runs", **settings)


def _student_weights(runs: Path) -> dict[str, torch.Tensor]:
    return load_file(runs / "student" / "model" / "model.safetensors")


def test_swag_posterior_moves_the_student_and_the_prior_term_trains(tmp_path: Path) -> None:
    """Low-rank posterior: the student starts at the conditional mean (not the copy), its prior is stored, and the
    distill stage reports the prior term's value; every stage finishes and the export gates pass."""
    recipe = _recipe(tmp_path, SWAG, [{"name": "hinton"}, {"name": "prior", "weight": 1.0}])
    code, out = invoke("run", recipe)
    assert code == 0, out
    runs = tmp_path / "runs"
    t_rec = json.loads((runs / "teacher" / "manifest.json").read_text())["record"]
    assert t_rec["posterior"]["kind"] == "swag" and t_rec["posterior"]["rank"] == 4
    assert (runs / "teacher" / t_rec["posterior"]["file"]).is_file()
    s_rec = json.loads((runs / "student" / "manifest.json").read_text())["record"]
    assert s_rec["init"] == "bayes" and s_rec["kept_layers"] == [0, 1, 3]
    prior = s_rec["prior"]
    assert prior["zeroed"] > 0 and prior["params"] > 0
    assert prior["shift"] > 0  # the low-rank covariance moves the kept weights away from the plain copy
    # a far move is flagged: the Gaussian is extrapolated many standard deviations out (docs/methods.md §4)
    assert ("conditional mean moved the kept weights" in " ".join(out.split())) == (prior["shift"] > 0.05)
    teacher = load_file(runs / "teacher" / "model" / "model.safetensors")
    student = _student_weights(runs)
    key = "bert.encoder.layer.2.attention.self.query.weight"  # student layer 2 = teacher layer 3
    moved = student[key] - teacher[key.replace("layer.2", "layer.3")]
    assert float(moved.abs().max()) > 0
    history = json.loads((runs / "distill" / "manifest.json").read_text())["record"]["history"]
    values = [h["term_prior"] for h in history if "term_prior" in h]
    assert values and all(v == v and v >= 0 for v in values), history[:3]  # NaN fails
    export = json.loads((runs / "export" / "manifest.json").read_text())["record"]["models"]
    assert export["student"]["gate"]["ok"]


def test_diagonal_posterior_starts_at_the_copy(tmp_path: Path) -> None:
    """S diagonal => S_{v,xi1} = 0 => mu = m_v: init bayes equals init copy exactly (the uncorrelated case)."""
    diag = {"kind": "diagonal", "max_examples": 40}
    recipe = _recipe(tmp_path, diag, [{"name": "hinton"}])
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "--recipe", recipe)
        assert code == 0, out
    runs = tmp_path / "runs"
    assert json.loads((runs / "student" / "manifest.json").read_text())["record"]["prior"]["shift"] == 0.0
    teacher = load_file(runs / "teacher" / "model" / "model.safetensors")
    student = _student_weights(runs)
    for s_i, t_i in enumerate([0, 1, 3]):
        for name in ("attention.self.query.weight", "output.dense.bias"):
            s_key, t_key = f"bert.encoder.layer.{s_i}.{name}", f"bert.encoder.layer.{t_i}.{name}"
            assert torch.equal(student[s_key], teacher[t_key])


def test_width_pruned_bayes_student_conditions_on_the_removed_neurons(tmp_path: Path) -> None:
    """FFN pruning + init bayes: the removed neurons' output columns join xi1. With a diagonal posterior the
    conditional mean is the kept slice itself, so the student equals init copy + the same pruning, bit for bit."""
    diag = {"kind": "diagonal", "max_examples": 40}
    recipe = _recipe(tmp_path, diag, [{"name": "hinton"}], student__width={"ffn": 0.5})
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "--recipe", recipe)
        assert code == 0, out
    runs = tmp_path / "runs"
    prior = json.loads((runs / "student" / "manifest.json").read_text())["record"]["prior"]
    ffn = 64 * 32  # the tiny teacher's FFN output projection (hidden 32 x intermediate 64)
    assert prior["zeroed"] >= 3 * ffn // 2  # the removed layer's projections and half of each kept layer's columns
    code, out = invoke(
        "student", "--recipe", recipe, "--teacher", runs / "teacher", "--out", tmp_path / "copy", "--set",
        "student.init=copy",
    )  # fmt: skip
    assert code == 0, out
    bayes_w, copy_w = _student_weights(runs), load_file(tmp_path / "copy" / "student" / "model" / "model.safetensors")
    assert bayes_w.keys() == copy_w.keys()
    assert bayes_w["bert.encoder.layer.0.intermediate.dense.weight"].shape[0] == 32  # half of the 64 neurons
    for key in bayes_w:
        assert torch.equal(bayes_w[key], copy_w[key]), key


def test_prior_term_without_a_bayes_student_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, None, [{"name": "hinton"}, {"name": "prior"}], student__init="copy")
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, "prior", "student.init: bayes")
    assert not (tmp_path / "runs" / "teacher").exists()  # refused before anything trains


def test_bayes_init_without_a_posterior_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, None, [{"name": "hinton"}])
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, "teacher.posterior")


@pytest.mark.parametrize("clash", [{"student__width": {"heads": 0.5}}, {"student__vocab": {"min_count": 1}}])
def test_bayes_init_with_head_or_vocab_pruning_is_refused(tmp_path: Path, clash: dict) -> None:
    recipe = _recipe(tmp_path, SWAG, [{"name": "hinton"}], **clash)
    code, out = invoke("validate", recipe)  # refused by the recipe check, before any stage
    assert code != 0 and "init: bayes" in out and "Traceback" not in out


def test_bilstm_student_through_the_pipeline(tmp_path: Path) -> None:
    """Tang et al.'s heterogeneous student: built on the teacher's tokenizer, distilled with the logit terms,
    exported to ONNX (torch.onnx: optimum does not know it) and gated like any student."""
    teacher = make_model_dir(tmp_path / "teacher", layers=2)
    csv = make_csv(tmp_path / "d.csv")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        teacher,
        csv,
        tmp_path / "runs",
        student__arch="bilstm",
        student__bilstm={"hidden_size": 16, "mlp_size": 16},
        distill__losses=[{"name": "hinton", "temperature": 2.0, "alpha": 0.5}],
        distill__baseline=False,
        distill__lr=1e-2,
    )
    code, out = invoke("run", recipe)
    assert code == 0, out
    runs = tmp_path / "runs"
    config = json.loads((runs / "distill" / "model" / "config.json").read_text())
    assert config["model_type"] == "kdpipe-bilstm"
    s_rec = json.loads((runs / "student" / "manifest.json").read_text())["record"]
    assert s_rec["arch"] == "bilstm"
    models = json.loads((runs / "export" / "manifest.json").read_text())["record"]["models"]
    assert all(m["gate"]["ok"] for n, m in models.items() if n.startswith("student"))
    assert models["student"]["gate"]["value"] > 0.5


def test_bilstm_with_a_feature_term_is_refused(tmp_path: Path) -> None:
    teacher = make_model_dir(tmp_path / "teacher", layers=2)
    recipe = write_recipe(
        tmp_path / "r.yaml", teacher, make_csv(tmp_path / "d.csv"), tmp_path / "runs", student__arch="bilstm"
    )  # the default test recipe has hidden_cosine
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, "hidden_cosine", "bilstm")
