"""teacher.task: causal_lm through every stage with `kdpipe run` on a tiny Llama built in code: the export stage
(fp32 ONNX with its KV cache, parity, the int4 variant and its gate), the profile stage (TTFT / decode tokens/s
at short prompt lengths, budgets, report.md, report.json for --compare); a second run skips every stage; planted
failures: a 1e-6 ms TTFT budget under --strict, an ONNX graph whose logits drift (parity), a variant whose
perplexity is NaN (its gate), a variant causal_lm has no export for (refused before the teacher runs)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import assert_one_line_error, invoke
from tests.test_causal_lm import make_lm, make_prompts, write_recipe

TTFT_BUDGET = 1e-6  # ms: no model answers in a nanosecond: the planted miss


def _profile(path: Path) -> Path:
    doc = {
        "name": "tiny-lm", "description": "two short prompt lengths, one quick round.", "intra_op_threads": 1,
        "shapes": [{"batch": 1, "seq": 8}, {"batch": 1, "seq": 16}], "warmup": 0, "min_runs": 2, "min_seconds": 0,
        "rounds": 1, "profile_ops": False, "variants": ["fp32", "int4"], "deploy": "int4",
        "budgets": {"shape": "1x16", "ttft_ms": TTFT_BUDGET, "model_mib": 100},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def _recipe(base: Path, teacher: Path, prompts: Path, **over: Any) -> Path:
    over = {"profile": str(_profile(base / "tiny-lm.yaml")), "distill__epochs": 1, "distill__baseline": True, **over}
    path = write_recipe(base, teacher, prompts, **over)
    doc = yaml.safe_load(path.read_text())
    doc["export"] = {"variants": ["int4"], "parity_samples": 4, "accuracy_budget": 0.5}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("clm-pipeline")
    recipe = _recipe(base, make_lm(base / "teacher"), make_prompts(base / "prompts.jsonl"))
    code, out = invoke("run", recipe)
    assert code == 0, out
    return recipe, base / "runs", out


def _manifest(runs: Path, stage: str) -> dict[str, Any]:
    return json.loads((runs / stage / "manifest.json").read_text())


def test_every_stage_runs_and_the_export_holds_the_student_and_its_int4_variant(lm_run: tuple[Path, Path, str]) -> None:
    _, runs, out = lm_run
    export = _manifest(runs, "export")
    models = export["record"]["models"]
    assert set(models) == {"student", "student-int4"}
    student = models["student"]
    assert student["parity"]["kind"] == "generations" and student["parity"]["ok"]
    assert student["parity"]["examples"] == 4 and student["parity"]["agreement"] == 1.0
    assert student["gate"]["ok"] and student["gate"]["metric"] == "1/perplexity"
    assert "not exported" in student["spec"]["teacher"]
    assert (runs / "export" / "student" / "model.onnx").is_file()
    assert (runs / "export" / "student" / "genai_config.json").is_file()
    int4 = models["student-int4"]
    assert int4["variant"] == "int4" and int4["of"] == "student" and int4["gate"]["ok"], int4["gate"]
    assert int4["transforms"]["quantized_ops"].get("MatMulNBits", 0) > 0
    assert (runs / "export" / "student-int4" / "model.onnx").is_file()
    metrics = {k: v["value"] for k, v in export["metrics"].items()}
    assert math.isfinite(metrics["student_perplexity"]) and math.isfinite(metrics["student-int4_perplexity"])
    # budget = reference / (1 + tolerance), tolerance = 1 / accuracy_budget - 1: exactly accuracy_budget x reference
    assert int4["gate"]["budget"] == pytest.approx(0.5 * int4["gate"]["reference"])
    assert "report:" in out
    from tests.test_cards import check_cards  # every model directory's README.md, its code run from the run directory

    cards = check_cards(
        runs, {"teacher/model", "student/model", "distill/model", "export/student", "export/student-int4"}
    )
    assert "int4" in cards["export/student-int4"] and "ORTModelForCausalLM" in cards["export/student-int4"]


def test_the_profile_times_ttft_and_decode_and_writes_the_reports(lm_run: tuple[Path, Path, str]) -> None:
    _, runs, _ = lm_run
    profile = _manifest(runs, "profile")
    latency = json.loads((runs / "profile" / "latency.json").read_text())
    assert latency["prompt_lengths"] == [8, 16] and latency["max_new_tokens"] == 6
    assert set(latency["onnxruntime"]) == {"student", "student-int4"}
    assert set(latency["torch_eager"]) == {"teacher", "student"}
    for engine in ("onnxruntime", "torch_eager"):
        for r in latency[engine].values():
            assert set(r["shapes"]) == {"1x8", "1x16"}
            for s in r["shapes"].values():
                assert s["ttft_ms"] > 0 and s["decode_tokens_per_s"] > 0
    budgets = {b["budget"]: b for b in profile["record"]["budgets"]}
    assert profile["record"]["deploy"] == "student-int4"
    assert not budgets["TTFT at 1x16"]["ok"] and budgets["model size"]["ok"]
    report = (runs / "profile" / "report.md").read_text()
    needles = ["# kdpipe causal-LM report", "held-out perplexity", "Rouge-L", "## Generation latency",
               "| student-int4 | onnxruntime | 16 |", "TTFT at 1x16", "MISSED", "## Side by side",
               "**teacher**"]  # fmt: skip
    for needle in needles:
        assert needle in report, needle
    figures = json.loads((runs / "profile" / "report.json").read_text())
    assert figures["quality"] == "held-out 1/perplexity" and figures["deploy"] == "student-int4"
    teacher_ppl = _manifest(runs, "teacher")["metrics"]["perplexity"]["value"]
    assert figures["teacher"]["accuracy"] == pytest.approx(1 / teacher_ppl)
    assert set(figures["models"]) == {"student", "student-int4", "teacher-eager", "student-eager"}
    assert all(0 < m["accuracy"] <= 1 for m in figures["models"].values())


def test_a_second_run_skips_every_stage_and_strict_names_the_missed_ttft_budget(
    lm_run: tuple[Path, Path, str],
) -> None:
    recipe, runs, _ = lm_run
    code, out = invoke("run", recipe, "--strict")
    for stage in ("teacher", "student", "distill", "export", "profile"):
        assert f"skipped {stage}: up to date" in out, out
    assert code == 1, out
    assert "TTFT at 1x16" in out and "--strict" in out, out


def test_compare_reads_the_first_runs_report_json(lm_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    recipe, runs, _ = lm_run
    old = shutil.copy(runs / "profile" / "report.json", tmp_path / "old.json")
    code, out = invoke("run", recipe, "--compare", old)
    assert code == 0, out
    assert "no regression" in out, out


def _copy_upto_distill(runs: Path, base: Path) -> Path:
    """The run's teacher, student and distill stages in a fresh out dir (the export is re-run there)."""
    copy = base / "runs"
    for stage in ("teacher", "student", "distill"):
        shutil.copytree(runs / stage, copy / stage, symlinks=True)
    return copy


def _recipe_at(recipe: Path, base: Path, out: Path) -> Path:
    doc = yaml.safe_load(recipe.read_text())
    doc["out"] = str(out)
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_logits_that_drift_fail_parity_and_write_no_export(
    lm_run: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdpipe.profiling.generation import OrtCausalLM

    recipe, runs, _ = lm_run
    copy = _copy_upto_distill(runs, tmp_path)
    run = OrtCausalLM._run

    def drifted(self: Any, *args: Any, **kw: Any) -> Any:
        logits, past = run(self, *args, **kw)
        return logits + 0.5, past  # the argmax is kept, the logits are not: parity's atol must catch it

    monkeypatch.setattr(OrtCausalLM, "_run", drifted)
    code, out = invoke("export", "-r", _recipe_at(recipe, tmp_path, copy))
    assert_one_line_error(code, out, "ONNX parity check failed", "exceeds atol")
    assert not (copy / "export").exists()


def test_a_variant_that_misses_its_gate_is_removed_and_recorded(
    lm_run: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from kdpipe.tasks.causal_lm import export

    recipe, runs, _ = lm_run
    copy = _copy_upto_distill(runs, tmp_path)
    judge = export.judge_onnx

    def nan_variant(onnx_dir: Any, *args: Any) -> Any:
        got = judge(onnx_dir, *args)
        return got if Path(onnx_dir).name == "student" else dataclasses.replace(got, perplexity=math.nan)

    monkeypatch.setattr(export, "judge_onnx", nan_variant)
    code, out = invoke("export", "-r", _recipe_at(recipe, tmp_path, copy))
    assert code == 0, out
    assert "student-int4 REMOVED" in out, out
    gate = _manifest(copy, "export")["record"]["models"]["student-int4"]["gate"]
    assert gate["ok"] is False and math.isnan(gate["value"])
    assert not (copy / "export" / "student-int4").exists()
    assert (copy / "export" / "student" / "model.onnx").is_file()


def test_a_variant_causal_lm_has_no_export_for_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, make_lm(tmp_path / "teacher", layers=2), make_prompts(tmp_path / "prompts.jsonl"))
    doc = yaml.safe_load(recipe.read_text())
    doc["export"]["variants"] = ["int4", "optimized"]
    recipe.write_text(yaml.safe_dump(doc))
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, "export.variants: optimized is not available for causal_lm")
    assert not (tmp_path / "runs" / "teacher").exists()
