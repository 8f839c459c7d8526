"""Every recipe term wired end to end on tiny models; schedules; ensembles; unlabeled transfer data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_model_dir, write_recipe
from pydantic import TypeAdapter

from kdpipe.data.tables import collate
from kdpipe.errors import ConfigError
from kdpipe.losses.objective import LossContext, build_objective
from kdpipe.losses.schedule import Schedule
from kdpipe.losses.terms import LOSS_TYPES, LossConfig
from kdpipe.models.layermaps import layer_map
from kdpipe.models.loading import forward_kd, load_classifier

ALL_TERMS = {
    "hinton": {},
    "ce": {},
    "logit_mse": {"alpha": 0.5},
    "reverse_kl": {},
    "jsd": {},
    "ofa": {},
    "pkd": {},
    "hidden_cosine": {},
    "tinybert": {"project": "always"},
    "attention_kl": {},
    "hint": {},
    "crd": {"dim": 8},
    "pkt": {"symmetric": True},
    "vid": {},
}
LEARNED = {"tinybert", "hint", "crd", "vid"}


def test_every_registered_loss_has_a_recipe_term_and_a_test() -> None:
    # 'prior' reads the student's weights through the distill stage, not the two models' outputs: tests/test_terms.py
    # and tests/test_bayes_pipeline.py train with it
    assert set(LOSS_TYPES) - {"prior"} == set(ALL_TERMS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("pair")
    teacher = load_classifier(make_model_dir(base / "t", layers=4)).eval()
    student = load_classifier(make_model_dir(base / "s", layers=2, seed=1))
    ctx = LossContext(layer_map=layer_map([1, 3]), n_student=2, n_teacher=4, d_student=32, d_teacher=32)
    batch = collate([[2, 7, 8, 9, 3], [2, 10, 3], [2, 11, 12, 3], [2, 7, 3]], pad_id=0, labels=[0, 1, 2, 0])
    return teacher, student, ctx, batch


@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_term_trains_student_and_its_own_modules(name: str, pair) -> None:
    teacher, student, ctx, batch = pair
    cfg = TypeAdapter(LossConfig).validate_python({"name": name, **ALL_TERMS[name]})
    obj = build_objective([cfg], ctx)
    with torch.no_grad():
        t = forward_kd(teacher, batch, obj.needs_hidden, obj.needs_attentions)
    student.zero_grad()
    s = forward_kd(student, batch, obj.needs_hidden, obj.needs_attentions)
    out = obj(s, t)
    total, values = out.total, out.values
    assert math.isfinite(total.item()) and set(values) == {name}
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    owned = list(obj.parameters())
    assert bool(owned) == (name in LEARNED)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owned)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in teacher.parameters())


def test_layer_map_that_does_not_fit_fails_before_models_load(tiny_recipe: Path) -> None:
    from typer.testing import CliRunner

    from kdpipe.cli import app

    data = yaml.safe_load(tiny_recipe.read_text())
    data["distill"]["losses"] = [{"name": "tinybert", "map": [1, 2, 3]}]  # the tiny student has 1 layer
    tiny_recipe.write_text(yaml.safe_dump(data))
    out = CliRunner().invoke(app, ["validate", str(tiny_recipe)]).output
    assert "tinybert.map: layer map [1, 2, 3] does not fit a 1-layer student and a 2-layer teacher" in out


def test_schedule_needs_a_layer_term() -> None:
    ctx = LossContext(layer_map={0: 0, 1: 1}, n_student=1, n_teacher=1, d_student=4, d_teacher=4)
    cfg = TypeAdapter(LossConfig).validate_python({"name": "hinton"})

    class Sched:
        kind, cap_steps, threshold, classifier_last, keep_soft = "pid", 5, 0.0, True, False

    with pytest.raises(ConfigError, match="needs at least one layer term"):
        build_objective([cfg], ctx, Sched())


def test_pid_moves_on_cap_and_threshold_and_trains_classifier_last() -> None:
    s = Schedule(kind="pid", order=[1, 2, 3], cap_steps=3, threshold=0.5)
    seen = []
    losses = [1.0, 1.0, 1.0, 0.4, 1.0, 1.0, 1.0, 1.0]
    for step, loss in enumerate(losses, start=1):
        seen.append((s.active_layers(), s.logit_term_on(soft=True)))
        s.advance(step, loss)
    assert seen[0] == ({1}, False) and seen[2] == ({1}, False)
    assert seen[3] == ({2}, False)  # layer 1 hit its 3-step cap
    assert seen[4] == ({3}, False)  # layer 2 fell below the threshold after one step
    assert seen[7] == (set(), True)  # pid: every layer done, only the classifier terms
    assert [e["reason"] for e in s.events] == ["cap", "threshold", "cap"]


def test_sid_keeps_lower_layers_and_keep_soft() -> None:
    s = Schedule(kind="sid", order=[0, 1, 2], cap_steps=1, keep_soft=True)
    assert s.active_layers() == {0} and s.logit_term_on(soft=True) and not s.logit_term_on(soft=False)
    s.advance(1, None)
    assert s.active_layers() == {0, 1}
    s.advance(2, None)
    s.advance(3, None)
    assert s.active_layers() == {0, 1, 2} and s.logit_term_on(soft=False)


def test_objective_skips_inactive_terms(pair) -> None:
    teacher, student, ctx, batch = pair
    adapter = TypeAdapter(LossConfig)
    cfgs = [adapter.validate_python({"name": "hidden_cosine"}), adapter.validate_python({"name": "hinton"})]

    class Sched:
        kind, cap_steps, threshold, classifier_last, keep_soft = "pid", 1, 0.0, True, False

    obj = build_objective(cfgs, ctx, Sched())
    assert obj.schedule.order == [0, 1, 2]
    with torch.no_grad():
        t = forward_kd(teacher, batch, True)
        s = forward_kd(student, batch, True)
        first = obj(s, t).values
        assert set(first) == {"hidden_cosine"}
        for step in range(3):
            obj.after_step(step, None)
        last = obj(s, t).values
        assert set(last) == {"hinton"}


def _run(recipe: Path, *extra: str) -> str:
    from typer.testing import CliRunner

    from kdpipe.cli import app

    result = CliRunner().invoke(app, ["run", str(recipe), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_methods_through_the_pipeline(tiny_dir: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """TinyBERT with a PID schedule, an ensemble of two teachers, and unlabeled transfer data."""
    transfer = tmp_path / "unlabeled.txt"
    transfer.write_text("\n".join(["good great day", "bad awful road", "the car today", "", "love it"] * 8))
    member = make_model_dir(tmp_path / "member", layers=2, seed=5)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        tiny_csv,
        tmp_path / "runs",
        distill__losses=[{"name": "tinybert", "map": "uniform"}, {"name": "hinton", "temperature": 2.0}],
        distill__schedule={"kind": "pid", "cap_steps": 2},
        distill__extra_teachers=[str(member)],
        distill__transfer=str(transfer),
        distill__baseline=False,
    )
    out = " ".join(_run(recipe).split())  # rich wraps long lines
    assert "ensemble of 2 teachers" in out and "32 unlabeled examples" in out, out
    m = json.loads((tmp_path / "runs" / "distill" / "manifest.json").read_text())
    assert [e["layer"] for e in m["record"]["schedule_events"]] == [0, 1]
    assert m["record"]["train_examples"] == 32  # empty lines dropped
    cka = json.loads((tmp_path / "runs" / "distill" / "cka.json").read_text())
    assert len(cka["matrix"]) == 3 and len(cka["matrix"][0]) == 2  # 2-layer teacher x 1-layer student
    assert cka["matrix"][0][0] == pytest.approx(1.0, abs=0.2)  # the student keeps the teacher's embeddings
    report = (tmp_path / "runs" / "profile" / "report.md").read_text()
    assert "![CKA](cka.png)" in report and "Layer schedule `pid`" in report
    # projections the losses own are not part of the student that is saved and exported
    from safetensors import safe_open

    with safe_open(tmp_path / "runs" / "distill" / "model" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "w_h" in k or "learned" in k]  # noqa: SIM118


def test_teaching_assistant_chain(tiny_csv: Path, tmp_path: Path) -> None:
    teacher_dir = make_model_dir(tmp_path / "t4", layers=4)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        teacher_dir,
        tiny_csv,
        tmp_path / "runs",
        distill__baseline=False,
        distill__epochs=2,
        teacher__epochs=5,
    )
    data = yaml.safe_load(recipe.read_text())
    data["assistant"] = {"layers": [0, 1, 3]}
    recipe.write_text(yaml.safe_dump(data))
    _run(recipe)
    runs = tmp_path / "runs"
    assistant = json.loads((runs / "assistant" / "manifest.json").read_text())
    assert assistant["stage"] == "teacher" and assistant["record"]["assistant"]["kept_layers"] == [0, 1, 3]
    assert assistant["metrics"]["layers"]["value"] == 3
    student = json.loads((runs / "student" / "manifest.json").read_text())
    # the student's teacher is the assistant; the assistant chain's own student and distill stages stay
    # behind it (its lineage) and are not this student's
    assert student["lineage"]["teacher"] == "../assistant" and "student" not in student["lineage"]
    assert student["metrics"]["teacher_layers"]["value"] == 3 and student["metrics"]["layers"]["value"] == 2
    distill = json.loads((runs / "distill" / "manifest.json").read_text())
    assert distill["lineage"]["teacher"] == "../assistant"
    assert (runs / "assistant-student" / "manifest.json").is_file() and (
        runs / "assistant-distill" / "manifest.json"
    ).is_file()
    assert json.loads((runs / "assistant-distill" / "manifest.json").read_text())["config"]["baseline"] is False
    report = (runs / "profile" / "report.md").read_text()
    assert "| teaching assistant | 3 |" in report and "| teacher | 4 |" in report
    # nothing changed: every stage, the assistant included, is skipped
    out = _run(recipe)
    names = (
        "teacher",
        "assistant-student",
        "assistant-distill",
        "assistant",
        "student",
        "distill",
        "export",
        "profile",
    )
    assert all(f"skipped {s}" in out for s in names)


def test_augmentation_rules() -> None:
    import numpy as np
    from conftest import make_tokenizer

    from kdpipe.config import AugmentConfig
    from kdpipe.data.tables import Split
    from kdpipe.methods.augment import Neighbours, augment

    tok = make_tokenizer()
    emb = np.random.RandomState(0).randn(len(tok), 8).astype(np.float32)
    good = tok.get_vocab()["good"]
    emb[tok.get_vocab()["great"]] = emb[good] * 2  # the nearest neighbour of "good" by cosine
    assert Neighbours(tok, emb, k=1).of("good") == ["great"]
    split = Split(texts=["the good car is very nice"], labels=[2])
    masked = augment(split, tok, emb, AugmentConfig(p_mask=1.0, p_ngram=0.0, n_iter=3), seed=0)
    assert masked.texts == ["[MASK] " * 5 + "[MASK]"] * 3 and masked.labels == [-1] * 3
    grams = augment(split, tok, emb, AugmentConfig(p_mask=0, p_replace=0, p_ngram=1.0, ngram_max=2, n_iter=20), 0)
    assert all(1 <= len(t.split()) <= 2 and t in "the good car is very nice" for t in grams.texts)
    replaced = augment(split, tok, emb, AugmentConfig(p_mask=0, p_replace=1.0, p_ngram=0, n_iter=5), 0)
    assert all(t != split.texts[0] and len(t.split()) == 6 for t in replaced.texts)
    again = augment(split, tok, emb, AugmentConfig(p_mask=0, p_replace=1.0, p_ngram=0, n_iter=5), 0)
    assert again.texts == replaced.texts  # seeded


def test_augmented_transfer_set_is_an_artifact(tiny_dir: Path, tiny_csv: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        tiny_csv,
        tmp_path / "runs",
        distill__train_limit=50,
        distill__augment={"n_iter": 3},
        distill__epochs=1,
    )
    _run(recipe)
    m = json.loads((tmp_path / "runs" / "distill" / "manifest.json").read_text())
    assert "augmented.jsonl" in {r["path"] for r in m["outputs"]}
    assert m["record"]["train_examples"] == 50 * 4
    lines = (tmp_path / "runs" / "distill" / "augmented.jsonl").read_text().splitlines()
    assert len(lines) == 150 and all(json.loads(x)["label"] == -1 for x in lines)


def test_data_free_distillation(tiny_dir: Path, tiny_csv: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        tiny_csv,
        tmp_path / "runs",
        distill__baseline=False,
        distill__data_free={"samples_per_class": 20, "seq_len": 8, "steps": 30, "lr": 0.1},
        distill__epochs=2,
    )
    out = " ".join(_run(recipe).split())
    assert "60 data-free examples" in out
    runs = tmp_path / "runs"
    stats = json.loads((runs / "teacher" / "logit_stats.json").read_text())
    assert set(stats["classes"]) == {"negative", "neutral", "positive"}
    assert all(len(c["cov"]) == 3 and len(c["mean"]) == 3 for c in stats["classes"].values())
    m = json.loads((runs / "distill" / "manifest.json").read_text())
    df = m["record"]["data_free"]
    assert df["inputs"] == 60 and df["match_loss_last"] < df["match_loss_first"]
    import numpy as np

    assert np.load(runs / "distill" / "data_free_inputs.npy").shape == (60, 8, 32)


def test_data_free_hit_rate_uses_each_class_s_own_index(tiny_dir: Path) -> None:
    """A class left out of the statistics (fewer than 2 validation rows) must not shift the others' indices."""
    from rich.console import Console

    from kdpipe.config import DataFreeConfig
    from kdpipe.methods.datafree import synthesize, write_logit_stats

    teacher = load_classifier(tiny_dir).eval()
    with torch.no_grad():  # a teacher that always predicts class 2
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))
    import numpy as np

    logits = np.array([[0, 0, 9], [0, 1, 8], [0, 0, 7.5], [1, 0, 9]], dtype=np.float32)
    write_logit_stats(logits, [0, 2, 2, 2], ["a", "b", "c"], tiny_dir.parent / "stats.json")
    stats = json.loads((tiny_dir.parent / "stats.json").read_text())
    assert list(stats["classes"]) == ["c"] and stats["classes"]["c"]["index"] == 2  # a: 1 row, b: none
    cfg = DataFreeConfig(samples_per_class=4, seq_len=4, steps=2, lr=0.01)
    _, report = synthesize(teacher, stats, cfg, 0, "cpu", Console(quiet=True))
    assert report["sampled_class_hit_rate"] == 1.0  # was 0.0: class c was counted as index 0


def test_schedule_that_outlasts_the_budget_is_reported() -> None:
    from kdpipe.config import DistillConfig
    from kdpipe.tasks.classification.checks import check_objective, schedule_warning

    ctx = LossContext(layer_map={0: 0, 1: 1, 2: 3, 3: 5}, n_student=3, n_teacher=6, d_student=8, d_teacher=8)
    losses = [{"name": "attention_kl"}, {"name": "hinton"}]
    long = DistillConfig.model_validate(
        {"losses": losses, "epochs": 1, "baseline": False, "schedule": {"kind": "pid", "cap_steps": 40}}
    )
    warning = schedule_warning(check_objective(long, ctx), long, examples=3000)  # 94 steps < 3 x 40
    assert warning is not None and "3 layers x cap_steps 40 = 120 steps >= the 94 training steps" in warning
    short = long.model_copy(update={"schedule": long.schedule.model_copy(update={"cap_steps": 15})})
    assert schedule_warning(check_objective(short, ctx), short, examples=3000) is None
