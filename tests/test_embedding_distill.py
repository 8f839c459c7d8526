"""The embedding distill stage's terms, teacher-output cache and CKA: PKT / RKD / hidden-state terms (on tiny
tensors and through `kdpipe distill`), the refusals of terms the encoders cannot be compared on, the cache's miss,
hit and recovery from a corrupted entry, cka.json / cka.png, and the distill run id of stages/embedding.yaml kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import invoke
from test_embedding_task import _recipe, _sentences
from test_embedding_tiny import make_st_dir

# config_hash of the distill identity of stages/embedding.yaml (seed 0), computed before the PKT / RKD / hidden
# terms existed: new terms at weight 0 must not change it
EMBEDDING_DISTILL_HASH = "a8f5acf9d7052de7"


def _manifest(runs: Path, stage: str = "distill") -> dict[str, Any]:
    return json.loads((runs / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Teacher, student (teacher layer 0 of 2) and one distill run (mse + cosine + contrastive)."""
    base = tmp_path_factory.mktemp("emb-distill")
    recipe = _recipe(base, make_st_dir(base / "teacher"), _sentences(base / "sentences.txt"))
    out = ""
    for stage in ("teacher", "student", "distill"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    return recipe, base / "runs", out


def _copy(built: tuple[Path, Path, str], tmp_path: Path) -> tuple[Path, Path]:
    recipe, runs, _ = built
    shutil.copytree(runs, tmp_path / "runs")
    text = recipe.read_text().replace(str(runs), str(tmp_path / "runs"))
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml", tmp_path / "runs"


def test_the_distill_run_id_of_stages_embedding_is_unchanged() -> None:
    from kdpipe.config import EmbeddingDistillConfig, config_hash, load_recipe
    from kdpipe.pipeline.distill import identity
    from kdpipe.pipeline.runner import context

    recipe, _ = load_recipe("stages/embedding.yaml")
    assert config_hash(identity(recipe.distill, context(recipe))) == EMBEDDING_DISTILL_HASH
    assert set(EmbeddingDistillConfig(mse=1.0, cosine=1.0).model_dump()) == {
        "mse",
        "cosine",
        "contrastive",
        "temperature",
    }
    assert EmbeddingDistillConfig(pkt=0.5).model_dump()["pkt"] == 0.5


def test_every_weight_zero_is_refused() -> None:
    from pydantic import ValidationError

    from kdpipe.config import EmbeddingDistillConfig

    with pytest.raises(ValidationError, match="hidden"):
        EmbeddingDistillConfig(mse=0.0)
    assert EmbeddingDistillConfig(mse=0.0, rkd_angle=1.0).rkd_angle == 1.0


@pytest.mark.parametrize("term", ["pkt", "rkd_distance", "rkd_angle"])
def test_each_relational_term_changes_the_loss_and_trains_on_different_widths(term: str) -> None:
    import torch

    from kdpipe.config import EmbeddingDistillConfig
    from kdpipe.losses import relational
    from kdpipe.tasks.embedding.distill import loss

    torch.manual_seed(0)
    t = torch.randn(8, 16)
    s = torch.randn(8, 16, requires_grad=True)
    base, _ = loss(s, t, EmbeddingDistillConfig(mse=1.0))
    total, parts = loss(s, t, EmbeddingDistillConfig(mse=1.0, **{term: 2.0}))
    assert parts[term] == pytest.approx(float(getattr(relational, term)(s, t).detach()), rel=1e-6)
    assert float(total.detach()) == pytest.approx(float(base.detach()) + 2 * parts[term], rel=1e-5) and parts[term] > 0
    narrow = torch.nn.Linear(5, 3)  # a student 3-d, the teacher 16-d: only relational terms compare them
    x = torch.randn(8, 5)
    opt = torch.optim.SGD(narrow.parameters(), lr=0.5)
    w = EmbeddingDistillConfig(mse=0.0, **{term: 1.0})
    values = []
    for _ in range(20):
        value, _ = loss(narrow(x), t, w)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(float(value.detach()))
    assert values[-1] < values[0]


def _enc(dim: int, hidden: int) -> SimpleNamespace:
    return SimpleNamespace(dim=dim, hidden_size=hidden)


def test_terms_the_encoders_cannot_be_compared_on_are_refused_in_one_line() -> None:
    from kdpipe.artifacts.records import StudentRecord
    from kdpipe.config import EmbeddingDistillConfig
    from kdpipe.errors import ConfigError
    from kdpipe.tasks.embedding.distill import check_terms, layer_map

    copy = StudentRecord(kept_layers=[0, 2, 4], layer_map={}, init="copy")
    pretrained = StudentRecord(kept_layers=[0, 1], layer_map={}, init="pretrained")
    hidden = EmbeddingDistillConfig(hidden=1.0)
    check_terms(hidden, _enc(64, 64), _enc(64, 64), copy)
    assert layer_map(copy) == {1: 1, 2: 3, 3: 5}
    for w, s, rec, words in [
        (hidden, _enc(64, 32), copy, "hidden width 32 differs from the teacher's 64"),
        (hidden, _enc(64, 64), pretrained, "the student is pretrained"),
        (EmbeddingDistillConfig(), _enc(32, 64), copy, "distill.embedding.mse: the student's embeddings are 32-d"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_terms(w, s, _enc(64, 64), rec)
        assert words in str(e.value) and "\n" not in str(e.value)
        assert "distill.embedding." in str(e.value)
    check_terms(EmbeddingDistillConfig(mse=0.0, pkt=1.0, rkd_angle=1.0), _enc(32, 16), _enc(64, 64), pretrained)


def test_hidden_with_a_pretrained_or_static_student_is_refused_by_the_recipe_check(tmp_path: Path) -> None:
    from kdpipe.config import DistillConfig, EmbeddingDistillConfig, Recipe, StudentConfig
    from kdpipe.errors import ConfigError
    from kdpipe.tasks.embedding.distill import check_recipe_terms

    d = DistillConfig(embedding=EmbeddingDistillConfig(hidden=1.0))
    recipe = Recipe.model_construct(distill=d, student=StudentConfig(pretrained=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"distill\.embedding\.hidden: student\.pretrained"):
        check_recipe_terms(recipe)
    bilstm = Recipe.model_construct(distill=d, student=StudentConfig(arch="bilstm"))
    with pytest.raises(ConfigError, match=r"distill\.embedding\.hidden: student\.arch: bilstm"):
        check_recipe_terms(bilstm)
    check_recipe_terms(Recipe.model_construct(distill=d, student=StudentConfig()))


def test_the_cache_misses_then_hits_with_the_same_targets(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    from kdpipe.tasks.embedding import data
    from kdpipe.tasks.embedding.build import load
    from kdpipe.tasks.embedding.encoder import encode

    _, runs, first = built
    cached = _manifest(runs)["record"]["teacher_cache"]
    assert cached["status"] == "miss" and "teacher embeddings: cache miss" in first
    recipe, runs = _copy(built, tmp_path)
    code, out = invoke("distill", "-r", recipe, "-s", "seed=1")
    assert code == 0, out
    hit = _manifest(runs)["record"]["teacher_cache"]
    assert hit["status"] == "hit" and hit["key"] == cached["key"] and "teacher embeddings: cache hit" in out
    stored = np.load((runs / "distill" / hit["dir"] / "embeddings.npy").resolve())
    teacher, tok = load(runs / "teacher" / "model")
    texts = data.read_sentences(runs / "teacher" / data.TRANSFER)
    assert stored.shape == (160, 64) == (hit["examples"], teacher.dim)
    np.testing.assert_array_equal(stored, encode(teacher, tok, texts, batch_size=64))


def test_a_corrupted_cache_entry_is_discarded_and_recomputed(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    recipe, runs = _copy(built, tmp_path)
    info = _manifest(runs)["record"]["teacher_cache"]
    npy = (runs / "distill" / info["dir"] / "embeddings.npy").resolve()
    raw = bytearray(npy.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])
    npy.write_bytes(bytes(raw))
    code, out = invoke("distill", "-r", recipe, "--force")
    assert code == 0, out
    assert out.count("teacher cache entry discarded") == 1 and "sha256 differs" in out
    rebuilt = _manifest(runs)
    assert rebuilt["record"]["teacher_cache"]["status"] == "miss"
    npy.write_bytes(npy.read_bytes()[:200])  # truncated
    code, out = invoke("distill", "-r", recipe, "--force", "-s", "distill.cache.use=false")
    assert code == 0, out
    assert "teacher embeddings: cache bypassed (distill.cache.use is false)" in out
    uncached = _manifest(runs)
    assert uncached["record"]["teacher_cache"] == {"status": "bypassed", "reason": "distill.cache.use is false"}
    drop = {"train_seconds"}
    assert {k: v for k, v in rebuilt["metrics"].items() if k not in drop} == {
        k: v for k, v in uncached["metrics"].items() if k not in drop
    }


def test_cka_files_are_written_with_the_diagonal_in_0_1(built: tuple[Path, Path, str]) -> None:
    _, runs, _ = built
    m = _manifest(runs)
    doc = json.loads((runs / "distill" / "cka.json").read_text())
    assert (runs / "distill" / "cka.png").is_file()
    assert np.asarray(doc["matrix"]).shape == (3, 2)  # teacher: embeddings + 2 layers; student: embeddings + 1
    assert doc["layer_map"] == {"1": 1} and doc["examples"] == 40
    diagonal = m["record"]["cka_diagonal"]
    assert len(diagonal) == 1 and all(0.0 <= v <= 1.0 for v in diagonal)
    assert m["metrics"]["cka_diagonal_mean"]["value"] == pytest.approx(diagonal[0], abs=1e-5)


def test_hidden_and_relational_terms_train_through_kdpipe_distill(
    built: tuple[Path, Path, str], tmp_path: Path
) -> None:
    recipe, runs = _copy(built, tmp_path)
    terms = '{"mse": 1.0, "pkt": 1.0, "rkd_distance": 1.0, "rkd_angle": 1.0, "hidden": 1.0}'
    code, out = invoke("distill", "-r", recipe, "-s", f"distill.embedding={terms}")
    assert code == 0, out
    assert "the teacher runs on every batch (no_grad)" in out and "1 x hidden" in out
    m = _manifest(runs)
    assert m["record"]["teacher_cache"]["status"] == "bypassed"
    assert np.isfinite(m["metrics"]["final_loss"]["value"])
    assert m["record"]["losses"][0]["hidden"] == 1.0


def test_nan_student_weights_fail_before_any_cka_plot(
    built: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from kdpipe.errors import ModelError
    from kdpipe.tasks.embedding import distill
    from kdpipe.tasks.embedding.build import load

    recipe, runs = _copy(built, tmp_path)
    real = distill.fit

    def poisoned(student: Any, *args: Any) -> Any:
        history = real(student, *args)
        with torch.no_grad():
            next(student.parameters()).fill_(float("nan"))
        return history

    monkeypatch.setattr(distill, "fit", poisoned)
    called: list[bool] = []
    monkeypatch.setattr(distill, "write_cka", lambda *a: called.append(True))
    code, out = invoke("distill", "-r", recipe, "--force")
    assert code != 0 and "weights hold NaN or inf" in out and not called
    monkeypatch.undo()
    student, tok = load(runs / "distill" / "model")
    teacher, t_tok = load(runs / "teacher" / "model")
    with torch.no_grad():
        next(student.parameters()).fill_(float("nan"))
    with pytest.raises(ModelError, match="NaN or inf"):
        distill.write_cka(student, tok, teacher, t_tok, ["the cat", "a dog runs", "my car"], {1: 1}, tmp_path)
    assert not (tmp_path / "cka.png").exists()


def test_rkd_terms_are_zero_for_a_similar_copy_and_positive_otherwise() -> None:
    import torch

    from kdpipe.losses.relational import rkd_angle, rkd_distance

    torch.manual_seed(0)
    t = torch.randn(6, 4)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4))
    similar = 3.0 * t @ rotation + 1.0  # scaled, rotated, shifted: the same distances (up to scale) and angles
    assert float(rkd_distance(similar, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_angle(similar, t)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(6, 9)
    assert float(rkd_distance(other, t)) > 1e-3 and float(rkd_angle(other, t)) > 1e-3
    with pytest.raises(ValueError, match="same B"):
        rkd_angle(torch.randn(5, 4), t)


def test_the_hidden_term_adds_the_hidden_state_mse_at_the_copied_layers(built: tuple[Path, Path, str]) -> None:
    import torch

    from kdpipe.config import EmbeddingDistillConfig
    from kdpipe.losses.features import hidden_mse
    from kdpipe.tasks.embedding.build import load
    from kdpipe.tasks.embedding.distill import Batches, _objective, hidden_states, loss

    _, runs, _ = built
    student, tok = load(runs / "distill" / "model")
    teacher, _ = load(runs / "teacher" / "model")
    texts = ["the cat sleeps on the road", "a dog runs in the city", "my car was very fast today"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    b = Batches(texts, None, 3, teacher.eval(), {1: 1})
    rows = np.arange(3)
    with torch.no_grad():
        plain = _objective(student, batch, b, rows, EmbeddingDistillConfig(mse=1.0))
        both = _objective(student, batch, b, rows, EmbeddingDistillConfig(mse=1.0, hidden=2.0))
        with hidden_states(student) as hs, hidden_states(teacher) as ht:
            s = student(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            t = teacher(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        expected = hidden_mse(hs[-1], ht[-1], {1: 1}, batch["attention_mask"])
    assert len(hs[-1]) == 2 and len(ht[-1]) == 3  # embeddings + 1 student layer; embeddings + 2 teacher layers
    assert float(plain) == pytest.approx(float(loss(s, t, EmbeddingDistillConfig(mse=1.0))[0]), rel=1e-5)
    assert float(both - plain) == pytest.approx(2 * float(expected), rel=1e-4) and float(expected) > 0


def test_relational_terms_distil_a_teacher_of_another_width(tmp_path: Path) -> None:
    # the teacher projects to 32-d (a Dense module); the layer-subset student keeps its 64-d pooled states
    recipe = _recipe(tmp_path, make_st_dir(tmp_path / "teacher", dense_out=32), _sentences(tmp_path / "s.txt", 120))
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    code, out = invoke("distill", "-r", recipe)
    assert code != 0 and "distill.embedding.mse: the student's embeddings are 64-d, the teacher's 32-d" in out
    relational = '{"mse": 0.0, "cosine": 0.0, "contrastive": 0.0, "pkt": 1.0, "rkd_distance": 1.0, "rkd_angle": 1.0}'
    code, out = invoke("distill", "-r", recipe, "-s", f"distill.embedding={relational}")
    assert code == 0, out
    m = _manifest(tmp_path / "runs")
    assert np.isfinite(m["metrics"]["final_loss"]["value"]) and m["metrics"]["mean_cosine"]["value"] is None
    assert m["record"]["teacher_cache"]["contents"]["embeddings"] == [80, 32]
