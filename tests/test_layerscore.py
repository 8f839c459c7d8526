"""student.layers: importance / block (kdpipe.compress.layerscore): Block Influence and the angular distance by hand
on planted hidden states, a tiny Llama teacher whose no-op layers are the ones dropped (so a selection by index or
at random fails), NaN refused, and the selection refused for tasks that do not score layers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kdpipe.errors import ConfigError, DataError
from tests.conftest import assert_one_line_error, invoke
from tests.test_causal_lm import make_lm, make_prompts, write_recipe


def _hidden(*rows: list[list[float]]) -> list:
    import torch

    return [torch.tensor([r], dtype=torch.float32) for r in rows]  # each (1, T, W)


def test_block_influence_and_angular_distance_by_hand() -> None:
    import torch

    from kdpipe.compress import layerscore

    # h0 -> h1 unchanged (BI 0), h1 -> h2 a quarter turn (cos 0: BI 1), h2 -> h3 half a quarter (cos 1/sqrt2)
    h = _hidden([[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]])
    mask = torch.ones((1, 1), dtype=torch.long)
    bi = layerscore.block_influence(h, mask)
    assert bi == pytest.approx([0.0, 1.0, 1 - 1 / math.sqrt(2)], abs=1e-9)
    # blocks of 2: h0 vs h2 is 90 degrees (0.5), h1 vs h3 is 45 degrees (0.25)
    assert layerscore.angular_distances(h, mask, 2) == pytest.approx([0.5, 0.25], abs=1e-9)
    assert layerscore.choose("importance", h, mask, 2).kept == [1, 2]  # layer 0 changes nothing: dropped
    # layer i maps h_i to h_{i+1}: the block of layers 1, 2 (h1 -> h3) is the most alike, so layer 0 stays
    assert layerscore.choose("block", h, mask, 1).kept == [0]


def test_padding_is_not_scored() -> None:
    import torch

    from kdpipe.compress import layerscore

    # token 2 is padding whose hidden states would make layer 0 look important
    h = _hidden([[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 0]])
    assert layerscore.block_influence(h, mask) == pytest.approx([0.0, 1.0], abs=1e-9)
    assert layerscore.choose("importance", h, mask, 1).tokens == 1


def test_nan_hidden_states_and_bad_k_are_refused() -> None:
    import torch

    from kdpipe.compress import layerscore

    h = _hidden([[1.0, 0.0]], [[float("nan"), 0.0]], [[0.0, 1.0]])
    mask = torch.ones((1, 1), dtype=torch.long)
    with pytest.raises(DataError, match="not finite"):
        layerscore.choose("importance", h, mask, 1)
    with pytest.raises(DataError, match="not finite"):
        layerscore.choose("block", h, mask, 1)
    with pytest.raises(ConfigError, match="student.k in 1..2"):
        layerscore.choose("importance", h, mask, 3)
    with pytest.raises(DataError, match="no calibration token"):
        layerscore.choose("importance", h, torch.zeros((1, 1), dtype=torch.long), 1)


def _noop_layers(folder: Path, layers: list[int]) -> None:
    """Zero the output projections of these layers: each adds nothing to the residual stream (a no-op)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    for name in state:
        if any(f"layers.{i}.self_attn.o_proj" in name or f"layers.{i}.mlp.down_proj" in name for i in layers):
            state[name] = state[name] * 0
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("criterion", ["importance", "block"])
def test_the_students_layers_are_the_teachers_working_ones(tmp_path: Path, criterion: str) -> None:
    teacher = make_lm(tmp_path / "teacher", layers=4)
    _noop_layers(teacher, [1, 2])
    recipe = write_recipe(tmp_path, teacher, make_prompts(tmp_path / "prompts.jsonl"),
                          student={"layers": criterion, "k": 2})  # fmt: skip
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    m = json.loads((tmp_path / "runs" / "student" / "manifest.json").read_text())
    rec = m["record"]
    assert rec["kept_layers"] == [0, 3], rec  # by index (first-k, every-other) it would keep a no-op layer
    sel = rec["selection"]
    assert sel["criterion"] == criterion and sel["tokens"] > 0 and all(math.isfinite(v) for v in sel["scores"])
    if criterion == "importance":
        assert sel["scores"][1] == pytest.approx(0.0, abs=1e-6) and sel["scores"][2] == pytest.approx(0.0, abs=1e-6)
    else:
        assert len(sel["scores"]) == 3 and sel["scores"][1] == pytest.approx(0.0, abs=1e-6)  # block [1, 2] is a no-op
    assert m["metrics"]["layers"]["value"] == 2


def test_a_scored_selection_needs_k(tmp_path: Path) -> None:
    teacher = make_lm(tmp_path / "teacher", layers=4)
    recipe = write_recipe(tmp_path, teacher, make_prompts(tmp_path / "p.jsonl"), student={"layers": "importance"})
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, "student.k is required")
    assert not (tmp_path / "runs" / "teacher").exists()


def test_a_scored_selection_is_refused_for_classification(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "runs"), "student": {"layers": "importance", "k": 2}}))
    code, out = invoke("validate", recipe)
    assert_one_line_error(code, out, "student.layers: importance", "causal_lm")


def test_a_width_pruned_student_through_the_student_stage(tmp_path: Path) -> None:
    """student.width on a causal LM (kdpipe.compress.lmwidth through the stage): the record and the saved model
    say the same widths, embeddings stay tied, and the dead FFN neurons planted in the teacher are the ones cut."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    teacher = make_lm(tmp_path / "teacher", layers=4)  # FFN 64, 4 heads / 2 KV heads
    state = load_file(teacher / "model.safetensors")
    for name in state:
        if "mlp.gate_proj" in name:
            state[name][:32] = 0  # neurons 0..31 of every layer are dead: silu(0) * up = 0
    save_file(state, teacher / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, teacher, make_prompts(tmp_path / "prompts.jsonl"),
                          student={"layers": "importance", "k": 3, "width": {"ffn": 0.5, "heads": 0.5}})  # fmt: skip
    for stage in ("teacher", "student"):
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    rec = json.loads((tmp_path / "runs" / "student" / "manifest.json").read_text())["record"]
    w = rec["lm_width"]
    assert (w["ffn_before"], w["ffn_after"], w["kv_groups_before"], w["kv_groups_after"]) == (64, 32, 2, 1)
    assert w["heads_after"] == 2 and w["params_after"] < w["params_before"] and w["scored_tokens"] > 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "student" / "model")
    assert student.config.intermediate_size == 32 and student.config.num_key_value_heads == 1
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    kept_gate = student.model.layers[0].mlp.gate_proj.weight
    assert bool((kept_gate.abs().sum(dim=1) > 0).all())  # no dead neuron was kept
