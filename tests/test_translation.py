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
             "min_seconds": 0.0, "torch_eager": True, "rounds": 1, "gemm_seconds": 0.2,
             "budgets": {"p50_ms": 1e6, "accuracy": 1.0}}  # planted: latency met, BLEU 100 (accuracy 1.0) missed
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
    assert teacher["record"]["info"]["task"] == "translation" and teacher["record"]["label_names"] == []
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
    # fp32 and int8-dynamic; "optimized" (a classification fusion) is skipped
    assert set(export["record"]["models"]) == {"student", "student-int8-dynamic", "teacher"}
    assert (runs / "export" / "student-int8-dynamic" / "decoder_with_past_model.onnx").is_file()
    from test_cards import check_cards  # every model directory's README.md, its code run from the run directory

    models = {"teacher/model", "student/model", "distill/model", "export/student", "export/student-int8-dynamic"}
    cards = check_cards(runs, models | {"export/teacher"})
    assert "ORTModelForSeq2SeqLM" in cards["export/student"] and "pipeline_tag: translation" in cards["distill/model"]
    profile = manifest(runs, "profile")
    assert profile["metrics"]["student_p50_ms_generate"]["value"] > 0
    assert profile["metrics"]["student-int8-dynamic_p50_ms_generate"]["value"] > 0
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


# --------------------------------------------------------------------------- budgets, int8, isolated timing
def test_strict_fails_on_the_planted_bleu_budget(run: tuple[int, str, Path]) -> None:
    """The fixture's profile asks for BLEU 100 (accuracy 1.0) and a p50 of at most 1e6 ms: `kdpipe run` finishes
    (not strict) and says so; `kdpipe profile --strict` (the stage skipped) exits 1 with the one-line error."""
    code, out, runs = run
    assert code == 0, out
    assert "budget missed: test BLEU / 100" in out, out
    budgets = {b["budget"]: b for b in manifest(runs, "profile")["record"]["budgets"]}
    bleu_check, latency = budgets["test BLEU / 100"], budgets["p50 latency at generate"]
    gate = manifest(runs, "export")["record"]["models"]["student-int8-dynamic"]["gate"]
    assert bleu_check["value"] == gate["value"] < 1.0 and not bleu_check["ok"], bleu_check
    assert latency["ok"] and 0 < latency["value"] < 1e6, latency
    code, out = invoke("profile", "-r", runs.parent / "recipe.yaml", "--strict")
    assert_one_line_error(code, out, "1 budget(s) of profile tiny missed by student-int8-dynamic (--strict)")
    assert "budget missed: test BLEU / 100" in out, out


def test_int8_variant_is_gated_on_bleu(run: tuple[int, str, Path]) -> None:
    models = manifest(runs := run[2], "export")["record"]["models"]
    for name in ("student", "student-int8-dynamic"):
        gate = models[name]["gate"]
        assert gate["ok"] and gate["metric"] == "bleu/100" and gate["examples"] == 16, gate
        assert gate["value"] >= gate["budget"] == pytest.approx(0.99 * gate["reference"]), gate
    int8 = models["student-int8-dynamic"]
    assert int8["variant"] == "int8-dynamic" and int8["of"] == "student" and int8["gate"]["atol"] is None
    ops = int8["transforms"]["graphs"]["decoder_model.onnx"]
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0, int8["transforms"]
    fp32_mib = sum(f.stat().st_size for f in (runs / "export" / "student").glob("*.onnx"))
    int8_mib = sum(f.stat().st_size for f in (runs / "export" / "student-int8-dynamic").glob("*.onnx"))
    assert int8_mib < fp32_mib


def test_each_model_is_timed_in_its_own_process(run: tuple[int, str, Path]) -> None:
    import os

    latency = json.loads((run[2] / "profile" / "latency.json").read_text())
    pids = {
        (engine, name): r["pids"] for engine in ("onnxruntime", "torch_eager") for name, r in latency[engine].items()
    }
    assert set(pids) == {
        ("onnxruntime", "teacher"), ("onnxruntime", "student"), ("onnxruntime", "student-int8-dynamic"),
        ("torch_eager", "teacher"), ("torch_eager", "student"),
    }  # fmt: skip
    flat = [p for ps in pids.values() for p in ps]
    assert os.getpid() not in flat and len(set(flat)) == len(flat), pids
    for r in latency["onnxruntime"].values():
        assert r["shapes"]["generate"]["runs"] >= 5 and r["peak_rss_mib"] > 0 and r["mean_tokens"] > 1


def test_report_json_compares(run: tuple[int, str, Path]) -> None:
    runs = run[2]
    report = json.loads((runs / "profile" / "report.json").read_text())
    assert report["quality"] == "test_bleu" and report["deploy"] == "student-int8-dynamic"
    assert report["teacher"]["accuracy"] == pytest.approx(bleu(manifest(runs, "teacher")) / 100)
    assert report["models"]["student-int8-dynamic"]["latency"]["generate"]["p50_ms"] > 0
    code, out = invoke("profile", "-r", runs.parent / "recipe.yaml", "--compare", runs)
    assert code == 0 and "no regression" in out, out


def test_a_broken_int8_graph_fails_the_export(
    run: tuple[int, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantizer that writes NaN weights: the int8 gate fails closed (exit 1, one line, naming the variant)."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from kdpipe.compress import quantize

    real = quantize.quantize_int8

    def broken(src: Path, dst: Path) -> None:
        real(src, dst)
        model = onnx.load(str(dst))
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT and "lm_head" not in init.name:
                init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
        onnx.save(model, str(dst))

    monkeypatch.setattr(quantize, "quantize_int8", broken)
    shutil.copytree(run[2], tmp_path / "runs")
    doc = yaml.safe_load((run[2].parent / "recipe.yaml").read_text())
    doc["out"] = str(tmp_path / "runs")
    doc["export"]["teacher"] = False
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    code, out = invoke("export", "-r", tmp_path / "recipe.yaml")
    assert_one_line_error(code, out, "variant gate failed", "student-int8-dynamic", "NaN")


def test_bleu_gate_fails_closed_on_nan_and_on_a_bleu_shortfall() -> None:
    import numpy as np

    from kdpipe.tasks.translation.export import Judged, bleu_gate

    refs = ["open the file 1 now", "close the disk 2 now", "save the key 3 now", "copy the window 4 now"]
    ref = Judged(list(refs), np.zeros((4, 5)))
    same = bleu_gate(ref, ref, refs, 0.99, None)
    assert same.ok and same.value == pytest.approx(1.0) and same.agreement == 1.0 and same.metric == "bleu/100"
    worse = bleu_gate(
        Judged(["open the file", "close it", "save", "copy the window 4 now"], ref.logits), ref, refs, 0.99, None
    )
    assert not worse.ok and worse.value < worse.budget == pytest.approx(0.99), worse
    nan = bleu_gate(Judged(list(refs), np.full((4, 5), np.nan)), ref, refs, 0.5, None)
    assert not nan.ok and nan.nonfinite_outputs == 4 and nan.max_abs_diff == math.inf, nan
    drift = bleu_gate(Judged(list(refs), ref.logits + 1e-2), ref, refs, 0.99, 1e-4)  # fp32 keeps its logit bound
    assert not drift.ok and drift.max_abs_diff == pytest.approx(1e-2)


def test_a_generation_job_names_the_bad_key() -> None:
    from kdpipe.errors import ConfigError
    from kdpipe.profiling.generation import normalize_generation_job

    with pytest.raises(ConfigError, match="sentences"):
        normalize_generation_job({"model": "m", "max_new_tokens": 4})
    with pytest.raises(ConfigError, match="engine"):
        normalize_generation_job({"model": "m", "sentences": ["a"], "max_new_tokens": 4, "engine": "tf"})
    with pytest.raises(ConfigError, match="no sentences"):
        normalize_generation_job({"model": "m", "sentences": [], "max_new_tokens": 4})
    job = normalize_generation_job({"model": "m", "sentences": ["a"], "max_new_tokens": "4"})
    assert job["max_new_tokens"] == 4 and job["engine"] == "onnxruntime" and job["min_runs"] == 50
