"""The training loop: divergence stops it, clipping covers every trained parameter, labels filled once, CUDA."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_recipe
from test_wiring import CPU, _bert, _cfg, _ctx, _data, _train

from kdpipe.errors import KdpipeError
from kdpipe.losses.objective import build_objective
from kdpipe.models.loading import KDOutputs
from kdpipe.train.loop import TrainPlan, pick_device, train


def _assert_diverged(err: BaseException, *words: str) -> None:
    assert type(err).__name__ == "TrainingDivergedError" and isinstance(err, KdpipeError)
    for word in words:
        assert word in err.message, err.message
    assert "distill.lr" in err.hint and "temperature" in err.hint  # type: ignore[attr-defined]


def test_planted_nan_stops_training_at_the_first_step() -> None:
    teacher = _bert().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.classifier.weight[0, 0] = float("nan")
    with pytest.raises(KdpipeError) as e:
        _train(student, teacher, [_cfg("hinton")], lr=1e-3)
    _assert_diverged(e.value, "step 1", "epoch 1", "loss is nan")


def test_huge_learning_rate_stops_training() -> None:
    teacher = _bert().eval()
    with pytest.raises(KdpipeError) as e:
        _train(copy.deepcopy(teacher), teacher, [_cfg("hinton")], lr=1e6, epochs=4, data=_data(32))
    _assert_diverged(e.value, "diverged at step")


def test_weights_broken_by_the_last_step_are_caught() -> None:
    """One step whose loss is finite but whose update is not: the end-of-training check catches it."""
    teacher = _bert().eval()
    with pytest.raises(KdpipeError) as e:
        _train(copy.deepcopy(teacher), teacher, [_cfg("hinton")], lr=math.inf)
    _assert_diverged(e.value, "step 1", "weights of", "not finite")


def _cli(recipe: Path) -> Any:
    from typer.testing import CliRunner

    from kdpipe.cli import app

    return CliRunner().invoke(app, ["run", str(recipe)])


def _nan_loss(real: Any) -> Any:
    def fn(*a: Any, **k: Any) -> torch.Tensor:
        return real(*a, **k) * float("nan")

    return fn


def test_diverged_distillation_writes_no_artifact(
    tiny_dir: Path, tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a NaN loss planted in the KD term (the recipe bounds refuse temperature: 1e-300 up front)
    runs = tmp_path / "runs"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        tiny_csv,
        runs,
        teacher__epochs=1,
        distill__losses=[{"name": "hinton", "temperature": 2.0}],
    )
    import kdpipe.losses.logits as lg

    monkeypatch.setattr(lg, "hinton", _nan_loss(lg.hinton))
    result = _cli(recipe)
    out = " ".join(result.output.split())
    assert result.exit_code == 1, out
    assert "error: distill (KD): training diverged at step 1, epoch 1: the loss is nan" in out
    assert "hint: lower distill.lr or raise the loss temperature" in out
    assert (runs / "student" / "manifest.json").is_file()
    assert not (runs / "distill").exists() and not list(runs.glob(".distill*"))


def test_diverged_teacher_finetune_writes_no_artifact(
    tiny_dir: Path, tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, tiny_csv, runs, teacher__epochs=1)
    import kdpipe.losses.logits as lg

    monkeypatch.setattr(lg, "cross_entropy", _nan_loss(lg.cross_entropy))
    result = _cli(recipe)
    out = " ".join(result.output.split())
    assert result.exit_code == 1, out
    assert "error: teacher fine-tune: training diverged" in out and "teacher.lr" in out
    assert not (runs / "teacher").exists() and not list(runs.glob(".teacher*"))


def test_gradient_clipping_covers_the_loss_terms_own_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.nn.utils.clip_grad_norm_
    clipped: list[list[torch.Tensor]] = []
    norms_after: list[float] = []

    def spy(params: Any, max_norm: float, *a: Any, **kw: Any) -> torch.Tensor:
        params = list(params)
        clipped.append(params)
        out = real(params, max_norm, *a, **kw)
        every = [p for p in [*student.parameters(), *obj_params] if p.grad is not None]
        norms_after.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in every]))))
        return out

    teacher = _bert().eval()
    student = copy.deepcopy(teacher)
    obj_params: list[torch.Tensor] = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    obj = build_objective([_cfg("hint"), _cfg("vid")], _ctx())
    obj_params.extend(obj.parameters())
    data = _data()
    train(
        student, obj, data, TrainPlan(epochs=1, batch_size=len(data), lr=1e-3, grad_clip=1e-3), CPU, teachers=[teacher]
    )
    ids = {id(p) for p in clipped[0]}
    assert obj_params and all(id(p) in ids for p in obj_params)
    assert all(id(p) in ids for p in student.parameters())
    assert norms_after[0] <= 1e-3 * (1 + 1e-4)  # the joint norm, projections included, is clipped


def _outs(labels: list[int] | None, logits: list[list[float]]) -> KDOutputs:
    z = torch.tensor(logits)
    y = None if labels is None else torch.tensor(labels)
    return KDOutputs(logits=z, hidden_states=None, attentions=None, attention_mask=None, labels=y)


def test_unlabeled_rows_take_the_teacher_argmax_and_nothing_is_mutated() -> None:
    from kdpipe.train.loop import with_targets

    s = _outs([2, -1, 0], [[0, 0, 0]] * 3)
    t = _outs([2, -1, 0], [[5, 0, 0], [0, 5, 0], [0, 0, 5]])
    member = torch.zeros(3, 3)
    s2, t2 = with_targets(s, t, (member,))
    assert s2.labels.tolist() == [2, 1, 0] and t2 is not None and t2.labels.tolist() == [2, 1, 0]
    assert t2.ensemble_logits == (member,)
    assert s.labels.tolist() == [2, -1, 0] and t.ensemble_logits == ()  # the inputs are left as they were
    s3, t3 = with_targets(_outs(None, [[0, 0]] * 2), _outs(None, [[0, 3], [3, 0]]))
    assert s3.labels.tolist() == [1, 0] and t3 is not None and t3.labels.tolist() == [1, 0]
    gold, none = with_targets(s, None)
    assert gold is s and none is None  # no teacher: the gold labels stay


def test_a_ce_recipe_on_unlabeled_data_is_labelled_by_the_teacher() -> None:
    """`ce` needs no teacher outputs, but unlabeled rows still need the teacher's argmax."""
    teacher = _bert().eval()
    data = _data(8)
    unlabeled = type(data)(ids=data.ids, labels=[-1] * len(data), pad_id=data.pad_id)
    result, _ = _train(copy.deepcopy(teacher), teacher, [_cfg("ce")], lr=1e-3, data=unlabeled)
    assert result.steps == 1 and math.isfinite(result.final_loss)


@pytest.mark.gpu
def test_a_distillation_step_runs_on_cuda_in_bf16() -> None:

    device = pick_device("cuda", "auto")
    assert device.precision == "bf16"
    teacher = _bert().eval()
    obj = build_objective([_cfg("hinton")], _ctx())
    data = _data(8)
    plan = TrainPlan(epochs=1, batch_size=4, lr=1e-3)
    result = train(copy.deepcopy(teacher), obj, data, plan, device, teachers=[teacher])
    assert result.steps == 2 and math.isfinite(result.final_loss)


def test_fp16_autocast_trains_with_a_gradient_scaler() -> None:
    """The fp16 path (GPUs without bf16) on the CPU: the scaler unscales before clipping and steps; finite."""
    device = pick_device("cpu", "fp16")
    assert device.precision == "fp16"
    teacher = _bert().eval()
    student = copy.deepcopy(teacher)
    before = student.classifier.weight.detach().clone()
    obj = build_objective([_cfg("hinton")], _ctx())
    result = train(student, obj, _data(8), TrainPlan(epochs=2, batch_size=4, lr=1e-3), device, teachers=[teacher])
    assert result.steps == 4 and math.isfinite(result.final_loss)
    assert not torch.equal(before, student.classifier.weight)  # the scaler did step the optimiser


@pytest.mark.gpu
def test_the_gpu_path_fp16_accumulation_cache_and_sdpa(tmp_path: Path) -> None:
    """On CUDA: fp16 + scaler with accumulation, a teacher cast for inference, KD from a cache built on the GPU,
    and SDPA attention giving the eager logits."""
    from conftest import make_model_dir

    from kdpipe.config import CacheConfig
    from kdpipe.models.loading import load_classifier
    from kdpipe.train import cache as tcache

    device = pick_device("cuda", "fp16")
    teacher = _bert().eval()
    obj = build_objective([_cfg("hinton")], _ctx())
    plan = TrainPlan(epochs=2, batch_size=4, lr=1e-3, accumulate=2)
    result = train(copy.deepcopy(teacher), obj, _data(8), plan, device, teachers=[teacher])
    assert result.steps == 4 and math.isfinite(result.final_loss)
    assert next(teacher.parameters()).dtype == torch.float16  # the teacher only infers: cast to half

    bf16 = pick_device("cuda", "bf16")
    data = _data(8)
    spec = tcache.plan(CacheConfig(), 3, (), (), bf16.precision)
    key = tcache.cache_key("t", tcache.data_sha256(data), spec)
    found = tcache.build_cache(tmp_path, key, _bert().eval().cuda(), data, spec, bf16)
    result = train(copy.deepcopy(teacher).float(), obj, data, TrainPlan(epochs=1, batch_size=4), bf16, cache=found)
    assert math.isfinite(result.final_loss)

    model_dir = make_model_dir(tmp_path / "m")
    eager, sdpa = load_classifier(model_dir).cuda().eval(), load_classifier(model_dir, attn="sdpa").cuda().eval()
    ids = torch.tensor([[2, 7, 8, 9, 3]], device="cuda")
    with torch.no_grad():
        a, b = eager(input_ids=ids).logits, sdpa(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
