"""teacher.task: translation through every stage (kdpipe.tasks.translation), on a tiny ru->en pair file built in
code."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_one_line_error, invoke

VERBS = {"открыть": "open", "закрыть": "close", "удалить": "delete", "сохранить": "save", "скопировать": "copy"}
NOUNS = {"файл": "file", "папку": "folder", "диск": "disk", "сеть": "network", "окно": "window", "ключ": "key"}


def make_pairs(path: Path, columns: tuple[str, str] = ("ru", "en")) -> Path:
    """120 pairs 'verb noun N' -> 'verb noun N' (5 verbs x 6 nouns x 4 numbers), a tsv with a package column."""
    rows = [f"{columns[0]}\t{columns[1]}\tpackage"]
    for k in range(1, 5):
        for ru_v, en_v in VERBS.items():
            for ru_n, en_n in NOUNS.items():
                rows.append(f"{ru_v} {ru_n} {k}\t{en_v} {en_n} {k}\ttest")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def recipe(tmp: Path, pairs: Path, **over: Any) -> Path:
    profile = tmp / "tiny-profile.yaml"
    profile.write_text(
        yaml.safe_dump(
            {"name": "tiny", "description": "test profile.", "intra_op_threads": 1, "warmup": 1, "min_runs": 3,
             "min_seconds": 0.0, "torch_eager": True, "rounds": 1, "gemm_seconds": 0.2}
        )
    )  # fmt: skip
    doc: dict[str, Any] = {
        "out": str(tmp / "runs"),
        "teacher": {
            "task": "translation",
            "translation": {
                "source": str(pairs),
                "test_size": 16,
                "val_size": 8,
                "max_length": 16,
                "vocab_size": 200,
                "d_model": 32,
                "layers": 2,
                "heads": 4,
                "max_new_tokens": 12,
            },
            "epochs": 2.0,
            "batch_size": 16,
            "lr": 3e-3,
        },  # fmt: skip
        "student": {"layers": {"encoder": "all", "decoder": [0]}},
        "distill": {
            "losses": [{"name": "hinton", "temperature": 2.0, "alpha": 0.5}],
            "epochs": 1.0,
            "batch_size": 16,
            "lr": 1e-3,
            "threads": 1,
            "baseline": True,
        },
        "export": {"parity_samples": 8},
        "profile": str(profile),
    }
    for key, value in over.items():
        node = doc
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        if value is None:
            node.pop(parts[-1])
        else:
            node[parts[-1]] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    import torch

    tmp = tmp_path_factory.mktemp("translation")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny teacher trains faster on one thread than on two busy ones
    try:
        code, out = invoke("run", recipe(tmp, make_pairs(tmp / "pairs.tsv")))
    finally:
        torch.set_num_threads(threads)
    yield code, out, tmp / "runs"


def manifest(runs: Path, stage: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((runs / stage / "manifest.json").read_text())
    return data


def bleu(m: dict[str, Any], key: str = "test_bleu") -> float:
    value = m["metrics"][key]["value"]
    assert isinstance(value, float | int) and math.isfinite(value), m["metrics"]
    return float(value)


def test_run_goes_through_every_stage(run: tuple[int, str, Path]) -> None:
    code, out, runs = run
    assert code == 0, out
    teacher = manifest(runs, "teacher")
    assert teacher["record"]["task"] == "translation" and teacher["record"]["label_names"] == []
    assert teacher["record"]["split_sizes"] == {"train": 96, "val": 8, "test": 16}
    first = json.loads((runs / "teacher" / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"source", "target"}
    bleu(teacher)
    bleu(teacher, "val_bleu")
    student = manifest(runs, "student")
    assert student["record"]["stacks"] == {"encoder": [0, 1], "decoder": [0]}
    config = json.loads((runs / "student" / "model" / "config.json").read_text())
    assert config["decoder_layers"] == 1 and config["encoder_layers"] == 2
    distill = manifest(runs, "distill")
    bleu(distill)
    bleu(distill, "baseline_test_bleu")
    assert distill["metrics"]["teacher_test_bleu"]["value"] == teacher["metrics"]["test_bleu"]["value"]
    assert "retention" in distill["metrics"] and distill["record"]["history"]
    export = manifest(runs, "export")
    for name in ("student", "teacher"):
        parity = export["record"]["models"][name]["parity"]
        assert parity["ok"] and parity["examples"] == 8, parity
        assert (runs / "export" / name / "decoder_model.onnx").is_file()
    assert set(export["record"]["models"]) == {"student", "teacher"}  # fp32 only, no classification variants
    profile = manifest(runs, "profile")
    assert profile["metrics"]["student_p50_ms_generate"]["value"] > 0
    assert "test BLEU" in (runs / "profile" / "report.md").read_text()


def test_translation_without_its_section_is_one_line(tmp_path: Path) -> None:
    code, out = invoke("validate", recipe(tmp_path, make_pairs(tmp_path / "p.tsv"), teacher__translation=None))
    assert_one_line_error(code, out, "teacher.translation")


def test_a_classification_term_is_refused_for_translation(tmp_path: Path) -> None:
    losses = [{"name": "hinton"}, {"name": "hidden_cosine", "weight": 0.1}]
    code, out = invoke("validate", recipe(tmp_path, make_pairs(tmp_path / "p.tsv"), distill__losses=losses))
    assert_one_line_error(code, out, "hidden_cosine is not available for translation")


def test_a_pair_file_without_the_column_is_one_line(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "bad.tsv", columns=("ru", "english"))
    code, out = invoke("run", recipe(tmp_path, pairs))
    assert_one_line_error(code, out, "bad.tsv", "'en'")
    assert not (tmp_path / "runs" / "teacher" / "manifest.json").exists()


def test_a_classification_teacher_keeps_its_run_identity() -> None:
    """The task fields are not hashed for classification: runs made before them are not re-run."""
    from rich.console import Console

    from kdpipe.artifacts.records import RunContext
    from kdpipe.config import TeacherConfig, load_profile
    from kdpipe.pipeline.teacher import STAGE

    ctx = RunContext(seed=0, console=Console(), profile=load_profile("cpu"))
    ident = STAGE.identity(TeacherConfig(), ctx)
    assert "task" not in ident and "translation" not in ident and ident["seed"] == 0
    assert STAGE.identity(TeacherConfig(task="translation", translation={}), ctx)["task"] == "translation"
