"""The causal-LM teacher-output cache (kdpipe/tasks/causal_lm/lmcache.py) on a tiny Llama built in code: built once,
hit by a re-run without the teacher's forward in training, a corrupted file rebuilt (same result), another teacher
another key, bypassed with distill.cache.use false, and the cached loss at k = V - 1 equal to the live one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import invoke
from tests.test_causal_lm import make_lm, make_prompts, write_recipe

os.environ["HF_HUB_OFFLINE"] = "1"


def _record(runs: Path) -> dict[str, Any]:
    return json.loads((runs / "distill" / "manifest.json").read_text())["record"]


def _losses(runs: Path) -> list[float]:
    return [h["train_loss"] for h in _record(runs)["history"]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """teacher -> student -> distill with the cache on (the default): the distill stage built it."""
    base = tmp_path_factory.mktemp("clm-cache")
    over = {"distill__baseline": False, "distill__lm": {"forward_kl": 1.0, "reverse_kl": 0.5, "ce": 0.1}}
    recipe = write_recipe(base, make_lm(base / "teacher"), make_prompts(base / "prompts.jsonl"), **over)
    for stage in ("teacher", "student", "distill"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    return base / "runs"


def _copy(built: Path, tmp_path: Path) -> Path:
    """A copy of the finished run (cache included) under tmp_path, with its recipe pointing at it."""
    shutil.copytree(built, tmp_path / "runs")
    recipe = built.parent / "recipe.yaml"
    (tmp_path / "r.yaml").write_text(recipe.read_text().replace(str(built), str(tmp_path / "runs")))
    return tmp_path / "r.yaml"


def _count_teacher_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the teacher's forward inside distill.fit (training; the cache build and evaluation are outside)."""
    from kdpipe.tasks.causal_lm import distill

    calls: list[int] = []
    real = distill.fit

    def fit(student: Any, teacher: Any, *a: Any, **k: Any) -> Any:
        hook = teacher.register_forward_hook(lambda *_: calls.append(1))
        try:
            return real(student, teacher, *a, **k)
        finally:
            hook.remove()

    monkeypatch.setattr(distill, "fit", fit)
    return calls


def _entry(runs: Path) -> Path:
    rec = _record(runs)["teacher_cache"]
    return (runs / "distill" / rec["dir"]).resolve()


def test_the_first_distill_builds_the_cache_under_the_output_root(built: Path) -> None:
    rec = _record(built)["teacher_cache"]
    assert rec["status"] == "built" and rec["top_k"] == 21 and rec["vocab"] == 21  # k = min(64, V): no tail bucket
    assert not os.path.isabs(rec["dir"]) and rec["dir"] == f"../cache/causal_lm/{rec['key'][:16]}"
    entry = _entry(built)
    assert entry == (built / "cache" / "causal_lm" / rec["key"][:16]).resolve()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] == rec["key"] and meta["positions"] == rec["positions"] > 0
    assert rec["bytes"] == sum(f["bytes"] for f in meta["files"].values())
    assert rec["tail_mass_max"] == 0.0  # k = V
    assert np.load(entry / "values.npy").shape == (rec["positions"], 21)
    assert np.load(entry / "indices.npy").dtype == np.int32


def test_a_rerun_hits_the_cache_and_never_runs_the_teacher_in_training(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _copy(built, tmp_path)
    calls = _count_teacher_forwards(monkeypatch)
    code, out = invoke("distill", "-r", recipe, "--force")
    assert code == 0, out
    rec = _record(tmp_path / "runs")["teacher_cache"]
    assert rec["status"] == "hit" and rec["key"] == _record(built)["teacher_cache"]["key"]
    assert "causal-LM teacher cache hit" in out
    assert calls == []  # no teacher forward during training
    assert _losses(tmp_path / "runs") == pytest.approx(_losses(built), abs=1e-6)


def test_with_cache_use_false_the_teacher_runs_live_and_the_record_says_bypassed(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _copy(built, tmp_path)
    calls = _count_teacher_forwards(monkeypatch)
    code, out = invoke("distill", "-r", recipe, "-s", "distill.cache.use=false")
    assert code == 0, out
    rec = _record(tmp_path / "runs")["teacher_cache"]
    assert rec == {"status": "bypassed", "reason": rec["reason"]} and "distill.cache.use is false" in rec["reason"]
    assert len(calls) == 6  # 12 sequences / batch 4 x 2 epochs
    # k = V: the cached top-k forms are the dense ones, so the live run trains the same
    assert _losses(tmp_path / "runs") == pytest.approx(_losses(built), abs=1e-4)


def test_a_corrupted_cache_file_is_detected_and_rebuilt_to_the_same_result(built: Path, tmp_path: Path) -> None:
    recipe = _copy(built, tmp_path)
    entry = _entry(tmp_path / "runs")
    clean = json.loads((entry / "meta.json").read_text())["files"]
    raw = bytearray((entry / "values.npy").read_bytes())
    raw[-3] ^= 0x40  # one byte of the last stored logit
    (entry / "values.npy").write_bytes(bytes(raw))
    code, out = invoke("distill", "-r", recipe, "--force")
    assert code == 0, out
    rec = _record(tmp_path / "runs")["teacher_cache"]
    assert rec["status"] == "built" and "sha256" in rec["rebuilt_because"] and "values.npy" in rec["rebuilt_because"]
    assert str(tmp_path) not in rec["rebuilt_because"]  # relative to the run
    assert "cache rebuilt" in " ".join(out.split())
    rebuilt = json.loads((entry / "meta.json").read_text())["files"]
    assert {k: v["sha256"] for k, v in rebuilt.items()} == {k: v["sha256"] for k, v in clean.items()}
    assert _losses(tmp_path / "runs") == pytest.approx(_losses(built), abs=1e-6)


def _inputs(runs: Path) -> tuple[Any, Any, Any, list[Any], int]:
    from kdpipe.artifacts.manifest import read_manifest
    from kdpipe.config import DistillConfig
    from kdpipe.tasks.causal_lm import lm
    from kdpipe.tasks.causal_lm.distill import train_seqs

    t_manifest = read_manifest(runs / "teacher", "teacher")
    teacher, tok = lm.load(runs / "teacher" / "model")
    seqs = train_seqs(DistillConfig.model_validate({"lm": {}}), t_manifest, tok)
    return t_manifest, teacher, tok, seqs, int(tok.pad_token_id)


def test_another_teacher_gets_another_key_and_never_reads_this_cache(built: Path, tmp_path: Path) -> None:
    import dataclasses

    import torch

    from kdpipe.tasks.causal_lm import lmcache

    t_manifest, teacher, _, seqs, pad = _inputs(built)
    key = _record(built)["teacher_cache"]["key"]
    assert lmcache.lm_key(t_manifest, seqs, 21) == key  # the recorded key is this teacher's
    outputs = [
        dataclasses.replace(r, sha256="0" * 64) if r.path.endswith("model.safetensors") else r
        for r in t_manifest.outputs
    ]
    other = lmcache.lm_key(dataclasses.replace(t_manifest, outputs=outputs), seqs, 21)
    assert other != key and other[:16] != key[:16]
    assert lmcache.lm_key(t_manifest, seqs[1:], 21) != key and lmcache.lm_key(t_manifest, seqs, 8) != key
    assert lmcache.open_cache(built / "cache" / "causal_lm" / key[:16], other) is None  # another key: not read
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mine = lmcache.build(tmp_path / other[:16], other, teacher, seqs, pad, 21)
    theirs = lmcache.open_cache(built / "cache" / "causal_lm" / key[:16], key)
    assert theirs is not None and not np.allclose(mine.values, theirs.values)


def test_non_finite_teacher_logits_are_a_model_error_naming_the_sequence(built: Path, tmp_path: Path) -> None:
    import torch

    from kdpipe.errors import ModelError
    from kdpipe.tasks.causal_lm import lmcache

    _, teacher, _, seqs, pad = _inputs(built)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[5] = float("nan")
    with pytest.raises(ModelError, match="non-finite .* training sequence 0"):
        lmcache.build(tmp_path / "entry", "k" * 64, teacher, seqs, pad, 4)
    assert not (tmp_path / "entry").exists()  # nothing written


def test_a_cache_over_max_gb_is_bypassed_with_the_reason(built: Path) -> None:
    from kdpipe.artifacts.records import RunContext
    from kdpipe.config import DistillConfig
    from kdpipe.tasks.causal_lm import lmcache

    _, _, _, seqs, _ = _inputs(built)
    ctx = RunContext(seed=0, console=None, profile=None, cache_root=built / "cache")  # type: ignore[arg-type]
    small = DistillConfig.model_validate({"lm": {}, "cache": {"max_gb": 1e-9}})
    why = lmcache.bypass_reason(small, True, 0.0, seqs, 64, ctx)
    assert why is not None and "distill.cache.max_gb" in why
    assert lmcache.bypass_reason(DistillConfig.model_validate({"lm": {}}), True, 0.0, seqs, 64, ctx) is None
    assert "no KD term" in str(lmcache.bypass_reason(small, False, 0.0, seqs, 64, ctx))


def test_the_cached_loss_at_k_v_minus_1_is_the_live_teachers_on_one_batch(built: Path, tmp_path: Path) -> None:
    import torch

    from kdpipe.config import CausalLMDistillConfig
    from kdpipe.tasks.causal_lm import lm, lmcache
    from kdpipe.tasks.causal_lm.distill import objective, topk_objective

    _, teacher, _, seqs, pad = _inputs(built)
    student, _ = lm.load(built / "student" / "model")
    cache = lmcache.build(tmp_path / "entry", "k" * 64, teacher, seqs, pad, 20)  # V = 21
    rows = [3, 0, 7, 5]
    chosen = [seqs[i] for i in rows]
    b = lm.batch(chosen, pad)
    w = CausalLMDistillConfig(forward_kl=1.0, reverse_kl=0.5, jsd=0.7, beta=0.3, tvd=0.2, ce=0.1, temperature=2.0)
    with torch.no_grad():
        s, t = lm.logits(student, b), lm.logits(teacher, b)
        live, live_parts = objective(s, t, b["labels"], w)
        cached, cached_parts = topk_objective(s, cache.batch(rows, chosen, b["input_ids"].shape[1]), b["labels"], w)
    assert set(live_parts) == set(cached_parts) == {"forward_kl", "reverse_kl", "jsd", "tvd", "ce"}
    for name in live_parts:
        assert cached_parts[name] == pytest.approx(live_parts[name], abs=1e-5), name
    assert float(cached) == pytest.approx(float(live), abs=1e-5)


def test_a_perturbed_teacher_model_builds_its_own_entry(built: Path, tmp_path: Path) -> None:
    """Another teacher model (the same folder, weights perturbed) through the CLI: the teacher stage re-runs, and
    distill builds a new entry under another key beside the first, which it does not read."""
    import torch
    from safetensors.torch import load_file, save_file

    recipe = _copy(built, tmp_path)
    src = built.parent / "teacher"
    shutil.copytree(src, tmp_path / "teacher2")
    weights = load_file(tmp_path / "teacher2" / "model.safetensors")
    torch.manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}
    save_file(perturbed, tmp_path / "teacher2" / "model.safetensors", metadata={"format": "pt"})
    recipe.write_text(recipe.read_text().replace(str(src), str(tmp_path / "teacher2")))
    for stage in ("teacher", "student", "distill"):
        code, out = invoke(stage, "-r", recipe, "--force")
        assert code == 0, out
    rec, first = _record(tmp_path / "runs")["teacher_cache"], _record(built)["teacher_cache"]
    assert rec["status"] == "built" and rec["key"] != first["key"]
    assert sorted(p.name for p in (tmp_path / "runs" / "cache" / "causal_lm").iterdir()) == sorted(
        [rec["key"][:16], first["key"][:16]]
    )


def test_top_k_below_v_caches_a_tail_and_on_policy_batches_run_the_teacher(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _copy(built, tmp_path)
    calls = _count_teacher_forwards(monkeypatch)
    lm_terms = '{"forward_kl": 1.0, "jsd": 0.5, "beta": 0.3, "tvd": 0.2, "on_policy": 0.5}'
    code, out = invoke("distill", "-r", recipe, "-s", "distill.cache.top_k=4", "-s", f"distill.lm={lm_terms}")
    assert code == 0, out
    rec = _record(tmp_path / "runs")
    cache = rec["teacher_cache"]
    assert cache["status"] == "built" and cache["top_k"] == 4 and 0 < cache["tail_mass_mean"] <= cache["tail_mass_max"]
    on = sum(h["on_policy_batches"] for h in rec["history"])
    assert 0 < on < 6 and len(calls) == on  # the teacher scores the student's samples only
    assert all(np.isfinite(h["train_loss"]) for h in rec["history"])
