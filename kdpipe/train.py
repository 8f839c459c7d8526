"""The explicit training loop shared by the teacher and distill stages, and evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.data import Encoded, batches
from kdpipe.errors import ConfigError, ModelError, TrainingDivergedError
from kdpipe.losses.objective import Objective
from kdpipe.models import KDOutputs, attention_dropout_off, attention_row_sums, forward_kd

if TYPE_CHECKING:
    import torch
    from rich.console import Console


@dataclass(frozen=True)
class Device:
    torch_device: str  # "cpu" | "cuda"
    amp_dtype: Any  # torch.bfloat16 or None

    @property
    def precision(self) -> str:
        return "bf16" if self.amp_dtype is not None else "fp32"

    def autocast(self) -> Any:
        import torch

        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.torch_device, dtype=self.amp_dtype)


def pick_device(device: str = "auto", precision: str = "auto") -> Device:
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError("distill.device=cuda but torch sees no CUDA device", "use device: auto or cpu")
    dev = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    want_bf16 = precision == "bf16" or (precision == "auto" and dev == "cuda")
    return Device(dev, torch.bfloat16 if want_bf16 else None)


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    macro_f1: float
    logits: np.ndarray  # (N, C) float32


def evaluate(model: torch.nn.Module, data: Encoded, device: Device, batch_size: int = 64) -> Evaluation:
    """Accuracy, macro-F1 and the (N, C) logits on a labelled split, without grad."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    model.eval()
    chunks = []
    with torch.no_grad(), device.autocast():
        for batch in batches(data, batch_size, shuffle=False):
            batch = {k: v.to(device.torch_device) for k, v in batch.items() if k != "labels"}
            chunks.append(model(**batch).logits.float().cpu().numpy())
    logits = np.concatenate(chunks).astype(np.float32)
    preds = logits.argmax(-1)
    return Evaluation(
        accuracy=float(accuracy_score(data.labels, preds)),
        macro_f1=float(f1_score(data.labels, preds, average="macro")),
        logits=logits,
    )


@dataclass
class TrainResult:
    steps: int
    seconds: float
    samples_per_second: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)  # {step, loss, [val_accuracy]}
    best_val_accuracy: float | None = None
    best_state: dict[str, Any] | None = None
    schedule_events: list[dict[str, Any]] = field(default_factory=list)
    # modules whose attention-probability dropout was off while training (attention loss terms)
    attention_dropout_off: list[str] = field(default_factory=list)


def _diverged(description: str, what: str, step: int, epoch: int, loss: float | None, lr_setting: str) -> Exception:
    last = "" if loss is None else f" (last loss {loss:.6g})"
    return TrainingDivergedError(
        f"{description}: training diverged at step {step}, epoch {epoch}: {what}{last}",
        f"lower {lr_setting} or raise the loss temperature(s) (a very low temperature overflows the "
        "softmax); nothing was written",
    )


def _first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor with a NaN/inf entry, or None; one reduction per tensor."""
    import torch

    for name, p in named:
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


@dataclass(frozen=True)
class TrainPlan:
    """The budget and optimiser settings of one training run (AdamW, linear warm-up then linear decay)."""

    epochs: float
    batch_size: int
    lr: float = 1e-4  # for the default parameter group (every parameter of the model)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    eval_every: int = 0  # evaluate on the validation split every N steps (0: never during training)
    keep_best: bool = False  # restore the weights that scored best on the validation split
    seed: int = 0
    description: str = "train"
    lr_setting: str = "distill.lr"  # what a divergence error tells the user to lower


@dataclass
class _Loop:
    """The optimiser state of one run: what the step function updates."""

    opt: Any
    sched: Any
    trained: list[tuple[str, Any]]  # (name, parameter) of everything the optimizer updates
    total: int
    seen: int = 0
    ema: float | None = None
    student_ids: Any = None  # (V_teacher,) teacher id -> student id, for a pruned-vocabulary student


def train(
    model: torch.nn.Module,
    objective: Objective,
    data: Any,
    plan: TrainPlan,
    device: Device,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    teachers: Sequence[torch.nn.Module] = (),
    val_data: Encoded | None = None,
    console: Console | None = None,
    student_ids: torch.Tensor | None = None,
) -> TrainResult:
    """Train `model` on the weighted sum of `objective`'s terms; teachers in eval mode, no grad (the first is
    the teacher, the others its fellow ensemble members). `data` is an Encoded split or a data-free set.

    When a term reads attention maps, the student's attention-probability dropout is off while it
    trains (restored afterwards), so the maps it gives the losses are softmax probabilities whose
    rows sum to 1; the first step checks that. Stops with TrainingDivergedError on a non-finite
    loss or gradient norm (every step) or non-finite weights (every epoch end and at the end).
    `student_ids` (V_teacher,): a pruned-vocabulary student reads `student_ids[input_ids]` of the teacher's ids."""
    off: AbstractContextManager[list[str]] = (
        attention_dropout_off(model) if objective.needs_attentions else nullcontext([])
    )
    with off as changed:
        result = _train(
            model, objective, data, plan, device, param_groups, list(teachers), val_data, console, student_ids
        )
        result.attention_dropout_off = list(changed)
    return result


def _setup(
    model: torch.nn.Module, objective: Objective, plan: TrainPlan, groups: list[dict[str, Any]], steps_per_epoch: int
) -> _Loop:
    import torch

    # projections / regressors a loss owns train with the student (never exported with it)
    owned = [p for p in objective.parameters() if p.requires_grad]
    if owned:
        groups = [*groups, {"params": owned, "lr": groups[0]["lr"]}]
    # everything the optimizer updates: gradient clipping and the finiteness checks cover it all
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(p): f"loss term {n}" for n, p in objective.named_parameters()})
    trained = [(names.get(id(p), "parameter"), p) for g in groups for p in g["params"]]
    total = max(1, math.ceil(plan.epochs * steps_per_epoch))
    warmup = int(plan.warmup_ratio * total)
    opt = torch.optim.AdamW(groups, weight_decay=plan.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    return _Loop(opt=opt, sched=sched, trained=trained, total=total)


def _progress(console: Console | None) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:.1f} samples/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=False)


def with_targets(
    s_out: KDOutputs, t_out: KDOutputs | None, ensemble: tuple[Any, ...] = ()
) -> tuple[KDOutputs, KDOutputs | None]:
    """THE place where unlabeled examples get their labels: a batch without labels (a transfer file), or rows
    labelled -1 (augmented copies, data-free inputs), take the teacher's argmax. New outputs are returned
    (nothing is mutated); the teacher's carries its fellow ensemble members' logits."""
    import torch

    if t_out is None:
        return s_out, None
    y = s_out.labels
    if y is None or bool((y < 0).any()):
        t_arg = t_out.logits.argmax(-1)
        y = t_arg if y is None else torch.where(y < 0, t_arg, y)
    return replace(s_out, labels=y), replace(t_out, labels=y, ensemble_logits=ensemble)


def _forward(
    model: torch.nn.Module,
    objective: Objective,
    teachers: list[torch.nn.Module],
    batch: dict[str, Any],
    student_ids: torch.Tensor | None = None,
) -> tuple[KDOutputs, KDOutputs | None]:
    """Student outputs with grad; teacher (and ensemble) outputs without, as the objective needs them. A student
    with a pruned vocabulary reads the same tokens through `student_ids` (teacher id -> its id)."""
    import torch

    hidden, attentions = objective.needs_hidden, objective.needs_attentions
    labels = batch.get("labels")
    unlabeled = labels is None or bool((labels < 0).any())  # then the teacher labels them, even for a `ce` recipe
    t_out, ensemble = None, tuple[Any, ...]()
    if teachers and (objective.needs_teacher or unlabeled):
        with torch.no_grad():
            t_out = forward_kd(teachers[0], batch, hidden, attentions)
            ensemble = tuple(forward_kd(m, batch).logits for m in teachers[1:])
    if student_ids is not None and "input_ids" in batch:
        batch = {**batch, "input_ids": student_ids[batch["input_ids"]]}
    return with_targets(forward_kd(model, batch, hidden, attentions), t_out, ensemble)


def _step(
    loop: _Loop,
    model: torch.nn.Module,
    objective: Objective,
    teachers: list[torch.nn.Module],
    batch: dict[str, Any],
    plan: TrainPlan,
    device: Device,
    step: int,
    epoch: int,
) -> tuple[float, dict[str, float]]:
    """One optimiser step; a non-finite loss or gradient norm stops training."""
    import torch

    with device.autocast():
        s_out, t_out = _forward(model, objective, teachers, batch, loop.student_ids)
        if step == 1 and s_out.attentions is not None:
            _check_attention_rows(s_out.attentions, model)
        out = objective(s_out, t_out)
    loss = out.total
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _diverged(plan.description, f"the loss is {value}", step, epoch, None, plan.lr_setting)
    loop.opt.zero_grad(set_to_none=True)
    if loss.requires_grad:  # a schedule step may leave no term with a gradient
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in loop.trained], plan.grad_clip)
    if not bool(torch.isfinite(norm)):
        raise _diverged(plan.description, f"the gradient norm is {float(norm)}", step, epoch, value, plan.lr_setting)
    loop.opt.step()
    loop.sched.step()
    objective.after_step(step, out.layer_loss)
    return value, out.values


def _train(
    model: torch.nn.Module,
    objective: Objective,
    data: Any,
    plan: TrainPlan,
    device: Device,
    param_groups: list[dict[str, Any]] | None,
    teachers: list[torch.nn.Module],
    val_data: Encoded | None,
    console: Console | None,
    student_ids: torch.Tensor | None,
) -> TrainResult:
    import torch

    torch.manual_seed(plan.seed)
    model.to(device.torch_device).train()
    for t in teachers:
        t.to(device.torch_device).eval()
    objective.to(device.torch_device)
    groups = param_groups or [{"params": list(model.parameters()), "lr": plan.lr}]
    loop = _setup(model, objective, plan, groups, math.ceil(len(data) / plan.batch_size))
    loop.student_ids = None if student_ids is None else student_ids.to(device.torch_device)
    result = TrainResult(steps=0, seconds=0.0, samples_per_second=0.0, final_loss=float("nan"))
    start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task(plan.description, total=loop.total, loss=float("nan"), speed=0.0)
        epoch = 0
        while result.steps < loop.total:
            for batch in batches(data, plan.batch_size, shuffle=True, seed=plan.seed + epoch):
                if result.steps >= loop.total:
                    break
                batch = {k: v.to(device.torch_device) for k, v in batch.items()}
                value, values = _step(
                    loop, model, objective, teachers, batch, plan, device, result.steps + 1, epoch + 1
                )
                result.steps += 1
                loop.seen += len(batch["attention_mask"])
                loop.ema = value if loop.ema is None else 0.9 * loop.ema + 0.1 * value
                _report(progress, task, loop, result.steps, plan.description, time.perf_counter() - start)
                record = {"step": result.steps, "loss": value, **{f"term_{k}": v for k, v in values.items()}}
                if val_data is not None and plan.eval_every and result.steps % plan.eval_every == 0:
                    record["val_accuracy"] = _validate(model, val_data, device, plan, result, progress)
                result.history.append(record)
            epoch += 1
            # at every epoch's end, the last (possibly partial) one included: one pass over the weights
            if bad := _first_nonfinite(loop.trained):
                what = f"weights of {bad} are not finite (NaN/inf)"
                raise _diverged(plan.description, what, result.steps, epoch, loop.ema, plan.lr_setting)
    result.seconds = time.perf_counter() - start
    result.schedule_events = list(objective.schedule.events)
    result.samples_per_second = loop.seen / result.seconds if result.seconds else 0.0
    result.final_loss = loop.ema if loop.ema is not None else float("nan")
    if plan.keep_best and val_data is not None:
        _restore_best(model, val_data, device, result)
    model.eval()
    return result


def _report(progress: Any, task: Any, loop: _Loop, steps: int, description: str, elapsed: float) -> None:
    progress.update(task, advance=1, loss=loop.ema, speed=loop.seen / elapsed)
    if not progress.console.is_terminal and (steps % max(1, loop.total // 10) == 0 or steps == loop.total):
        # no live bar in a log file or CI: a plain line every 10% instead
        progress.console.print(
            f"{description}: step {steps}/{loop.total}, loss {loop.ema:.4f}, "
            f"{loop.seen / elapsed:.1f} samples/s, {elapsed:.0f} s"
        )


def _validate(
    model: torch.nn.Module, val_data: Encoded, device: Device, plan: TrainPlan, result: TrainResult, progress: Any
) -> float:
    """Validation accuracy now; with keep_best, a copy of the weights when it is the best so far."""
    acc = evaluate(model, val_data, device).accuracy
    model.train()
    progress.console.log(f"{plan.description}: step {result.steps} val accuracy {acc:.4f}")
    if plan.keep_best and (result.best_val_accuracy is None or acc > result.best_val_accuracy):
        result.best_val_accuracy = acc
        result.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return acc


def _restore_best(model: torch.nn.Module, val_data: Encoded, device: Device, result: TrainResult) -> None:
    acc = evaluate(model, val_data, device).accuracy
    if result.best_val_accuracy is None or acc > result.best_val_accuracy:
        result.best_val_accuracy, result.best_state = acc, None  # the last one is the best
    if result.best_state is not None:
        model.load_state_dict(result.best_state)


def _check_attention_rows(attentions: tuple[torch.Tensor, ...], model: torch.nn.Module) -> None:
    """The student's maps in train mode must be probabilities: a row that does not sum to 1 means
    dropout is still applied to them (an architecture `attention_dropout_off` does not know)."""
    lo, hi = attention_row_sums(attentions)
    if lo < 0.98 or hi > 1.02:
        raise ModelError(
            f"{type(model).__name__}: the student's attention maps have dropout applied in train mode "
            f"(rows sum to {lo:.3f}..{hi:.3f}, not 1), so the attention loss terms would compare noise",
            "set the attention dropout in the student's config.json to 0 "
            "(attention_probs_dropout_prob or attention_dropout)",
        )
