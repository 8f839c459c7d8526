"""Structured width pruning (kdpipe.compress.prune) on tiny BERTs built in code: scores, plans, exact pruning,
round-trips."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch

from kdpipe.compress.prune import (
    Importance,
    PruningPlan,
    apply_pruning,
    ffn_keep_count,
    importance,
    plan_pruning,
    prune,
)
from kdpipe.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification, PreTrainedModel

LAYERS, HEADS, HIDDEN, FFN = 2, 4, 32, 64
HEAD_SIZE = HIDDEN // HEADS
DEAD_HEADS = {0: [1], 1: [3]}
DEAD_NEURONS = {0: [5, 30], 1: [17, 40]}  # the same count per layer, so a plan can drop exactly these


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_labels=3,
        max_position_embeddings=32,
        attn_implementation="eager",  # the constructor takes it through the config
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # BERT's init (0.02-std weights, zero biases) gives near-constant logits and would hide
        for name, p in model.named_parameters():  # a mis-sliced bias; a wider one makes every unit and bias matter
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def blocks(model: PreTrainedModel) -> list[Any]:
    """The encoder layers (untyped: transformers types submodules as Tensor | Module)."""
    return list(cast(Any, model).bert.encoder.layer)


def kill(
    model: BertForSequenceClassification, heads: dict[int, list[int]], neurons: dict[int, list[int]]
) -> BertForSequenceClassification:
    """Zero the output projection of the given heads (attention.output.dense columns) and FFN neurons."""
    with torch.no_grad():
        for layer, hs in heads.items():
            dense = blocks(model)[layer].attention.output.dense
            for h in hs:
                dense.weight[:, h * HEAD_SIZE : (h + 1) * HEAD_SIZE] = 0
        for layer, js in neurons.items():
            blocks(model)[layer].output.dense.weight[:, js] = 0
    return model


def make_batches(n: int = 3, b: int = 4, t: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 40, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t // 2 :] = 0  # some padding
        mask[-1, t - 2 :] = 0
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (b,), generator=g)})
    return out


def logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def n_params(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def dead_model_and_importance() -> tuple[BertForSequenceClassification, Importance]:
    model = kill(tiny_bert(), DEAD_HEADS, DEAD_NEURONS)
    return model, importance(model, make_batches(), max_batches=3)


def test_importance_shapes_and_dead_units_score_zero() -> None:
    model, imp = dead_model_and_importance()
    assert [len(r) for r in imp.heads] == [HEADS] * LAYERS
    assert [len(r) for r in imp.ffn] == [FFN] * LAYERS
    for rows in (imp.heads, imp.ffn):
        assert all(math.isfinite(v) and v >= 0 for row in rows for v in row)
    for layer in range(LAYERS):
        assert math.isclose(math.hypot(*imp.heads[layer]), 1.0, rel_tol=1e-9)  # Michel et al.: L2 per layer
        for h in range(HEADS):
            assert (imp.heads[layer][h] == 0) == (h in DEAD_HEADS[layer]), (layer, h, imp.heads[layer])
        dead = DEAD_NEURONS[layer]
        assert all(imp.ffn[layer][j] == 0 for j in dead)
        assert min(v for j, v in enumerate(imp.ffn[layer]) if j not in dead) > 0
    assert all(p.grad is None for p in model.parameters())  # grads of the masks/activations only


def test_importance_is_mean_of_per_example_magnitudes_and_ignores_padding() -> None:
    model = tiny_bert()
    (batch,) = make_batches(n=1)
    whole = importance(model, [batch], max_batches=1)
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    split = importance(model, singles, max_batches=4)
    # E_x |dL(x)/dxi| (not |dL(batch)/dxi|): batching must not change the scores
    torch.testing.assert_close(torch.tensor(whole.heads), torch.tensor(split.heads), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(whole.ffn), torch.tensor(split.ffn), rtol=1e-4, atol=1e-7)
    # padding does not count: example 0 padded to 10 tokens scores like its 5 real tokens alone (in a CLS-pooled
    # classifier pad positions also get zero gradient, so this holds with or without the mask; it guards the sum)
    trimmed = {k: (v[:, :5] if v.dim() == 2 else v) for k, v in singles[0].items()}
    torch.testing.assert_close(
        torch.tensor(importance(model, [trimmed], 1).ffn), torch.tensor(importance(model, [singles[0]], 1).ffn)
    )


def test_importance_bookkeeping() -> None:
    model = tiny_bert().train()
    pulled: list[int] = []

    def stream() -> Iterator[dict[str, torch.Tensor]]:
        for i, b in enumerate(make_batches(n=5)):
            pulled.append(i)
            yield b

    importance(model, stream(), max_batches=2)
    assert pulled == [0, 1]  # max_batches honoured, nothing extra consumed
    assert model.training  # mode restored
    with pytest.raises(DataError, match="no batches"):
        importance(model, [], max_batches=2)
    with pytest.raises(DataError, match="labels"):
        importance(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], max_batches=1)
    with pytest.raises(ConfigError, match="max_batches"):
        importance(model, make_batches(), max_batches=0)


def test_plan_prefers_dead_units_and_removes_requested_counts() -> None:
    _, imp = dead_model_and_importance()
    plan = plan_pruning(imp, heads_fraction=0.25, ffn_fraction=0.125)  # 2 of 8 heads; keep 56 of 64 neurons
    assert plan.heads_to_prune == DEAD_HEADS
    for layer in range(LAYERS):
        keep = plan.ffn_keep[layer]
        assert len(keep) == 56 and keep == sorted(set(keep))
        assert not set(DEAD_NEURONS[layer]) & set(keep)
        dropped = set(range(FFN)) - set(keep)  # the 8 lowest scores of this layer, dead ones among them
        assert max(imp.ffn[layer][j] for j in dropped) <= min(imp.ffn[layer][j] for j in keep)


def test_plan_min_heads_and_validation() -> None:
    imp = Importance(heads=[[0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.6]], ffn=[[1.0] * 16, [1.0] * 16])
    assert plan_pruning(imp, 0.5, 0.0).heads_to_prune == {0: [0, 1, 2], 1: [3]}  # global, but layer 0 keeps one
    assert plan_pruning(imp, 0.5, 0.0, min_heads=2).heads_to_prune == {0: [0, 1], 1: [2, 3]}
    assert plan_pruning(imp, 0.0, 0.0) == PruningPlan({}, {0: list(range(16)), 1: list(range(16))})
    with pytest.raises(ConfigError, match="min_heads=2"):
        plan_pruning(imp, 0.75, 0.0, min_heads=2)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="fraction"):
            plan_pruning(imp, bad, 0.0)
        with pytest.raises(ConfigError, match="fraction"):
            plan_pruning(imp, 0.0, bad)
    with pytest.raises(ConfigError, match="min_heads"):
        plan_pruning(imp, 0.0, 0.0, min_heads=0)
    with pytest.raises(ModelError, match="FFN widths differ"):
        plan_pruning(Importance(heads=imp.heads, ffn=[[1.0] * 16, [1.0] * 8]), 0.0, 0.5)


@pytest.mark.parametrize(
    ("width", "fraction", "keep"),
    [(64, 0.0, 64), (64, 0.25, 48), (64, 0.5, 32), (64, 0.1, 56), (1536, 0.5, 768), (12, 0.4, 7), (10, 0.95, 1)],
)
def test_ffn_keep_count_rounds_to_multiples_of_8(width: int, fraction: float, keep: int) -> None:
    assert ffn_keep_count(width, fraction) == keep
    assert ffn_keep_count(61, 0.02) == 56  # 60 would round up to 64 > 61: one multiple of 8 lower


def test_pruning_dead_units_is_exact_and_live_units_matter() -> None:
    (batch,) = make_batches(n=1)
    model = kill(tiny_bert(), DEAD_HEADS, DEAD_NEURONS)
    before = logits(model, batch)
    keep = {layer: [j for j in range(FFN) if j not in js] for layer, js in DEAD_NEURONS.items()}
    apply_pruning(model, PruningPlan(DEAD_HEADS, keep))
    assert [lay.attention.self.num_attention_heads for lay in blocks(model)] == [3, 3]
    assert model.config.intermediate_size == FFN - 2
    torch.testing.assert_close(logits(model, batch), before)

    live = tiny_bert()
    before = logits(live, batch)
    apply_pruning(live, PruningPlan({0: [0], 1: [1]}, {0: list(range(2, FFN)), 1: list(range(FFN - 2))}))
    assert (logits(live, batch) - before).abs().max() > 1e-3


def test_prune_drops_expected_parameters() -> None:
    model = tiny_bert()
    start = n_params(model)
    pruned, plan, imp = prune(model, make_batches(), heads_fraction=0.25, ffn_fraction=0.25, max_batches=2)
    assert pruned is model and len(imp.heads) == LAYERS
    assert sum(len(h) for h in plan.heads_to_prune.values()) == 2
    assert model.config.intermediate_size == 48
    per_head = 3 * (HEAD_SIZE * HIDDEN + HEAD_SIZE) + HEAD_SIZE * HIDDEN  # Q, K, V rows + bias; out-proj columns
    per_neuron = (HIDDEN + 1) + HIDDEN  # intermediate row + bias; output column
    assert start - n_params(model) == 2 * per_head + LAYERS * 16 * per_neuron


def uneven_pruned() -> BertForSequenceClassification:
    model = tiny_bert()
    keep = {0: list(range(0, FFN, 2)), 1: list(range(FFN // 2))}
    return apply_pruning(model, PruningPlan({0: [0, 2], 1: [1]}, keep))


def test_save_load_round_trip_keeps_uneven_heads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = uneven_pruned()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert {k: sorted(v) for k, v in loaded.config.pruned_heads.items()} == {0: [0, 2], 1: [1]}
    assert loaded.config.intermediate_size == FFN // 2
    assert [lay.attention.self.num_attention_heads for lay in blocks(loaded)] == [2, 3]
    assert n_params(loaded) == n_params(model)
    (batch,) = make_batches(n=1)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    with pytest.raises(ModelError, match="already pruned"):
        importance(loaded, make_batches(), 1)


def test_pruned_model_exports_to_onnx_with_dynamic_axes(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = uneven_pruned()
    ids = torch.randint(5, 40, (2, 8))
    mask = torch.ones_like(ids)
    path = tmp_path / "model.onnx"
    axes = {0: "batch_size", 1: "sequence_length"}
    torch.onnx.export(
        model,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch_size"}},
        opset_version=18,
        dynamo=False,
    )
    (batch,) = make_batches(n=1, b=3, t=13, seed=7)  # another batch size and length, with padding
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    (got,) = session.run(["logits"], feed)
    torch.testing.assert_close(torch.from_numpy(got), logits(model, batch), rtol=1e-4, atol=1e-5)


def test_apply_pruning_rejects_bad_plans() -> None:
    model = tiny_bert()
    full = {0: list(range(FFN)), 1: list(range(FFN))}
    for plan, match in [
        (PruningPlan({0: [0, 1, 2, 3]}, {}), "every head"),
        (PruningPlan({2: [0]}, {}), "layer 2"),
        (PruningPlan({0: [4]}, {}), "heads"),
        (PruningPlan({}, {0: list(range(8))}), "not all"),
        (PruningPlan({}, {0: list(range(8)), 1: list(range(16))}), "differ"),
        (PruningPlan({}, {**full, 1: [1, 0, *range(2, FFN)]}), "ascending"),
        (PruningPlan({}, {**full, 1: [*range(1, FFN), FFN]}), "below"),
    ]:
        with pytest.raises(ModelError, match=match):
            apply_pruning(model, plan)
    assert n_params(model) == n_params(tiny_bert())  # nothing half-applied


def test_non_bert_models_are_refused() -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ModelError, match="not a BERT-family encoder") as err:
        importance(gpt2, make_batches(), 1)
    assert "BERT" in err.value.hint
    with pytest.raises(ModelError, match="GPT2ForSequenceClassification"):
        apply_pruning(gpt2, PruningPlan({0: [0]}, {}))
    with pytest.raises(ModelError):
        prune(gpt2, make_batches(), 0.5, 0.5)
