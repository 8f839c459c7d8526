"""The explicit training loop shared by the teacher and distill stages, and evaluation."""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.data import Encoded, batches
from kdpipe.errors import ModelError, TrainingDivergedError
from kdpipe.losses import Objective
from kdpipe.models import attention_dropout_off, attention_row_sums, forward_kd

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

    from kdpipe.errors import ConfigError

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


def train(
    model: torch.nn.Module,
    objective: Objective,
    train_data: Encoded,
    *,
    teacher: torch.nn.Module | None = None,
    extra_teachers: list[torch.nn.Module] | None = None,
    val_data: Encoded | None = None,
    epochs: float,
    batch_size: int,
    param_groups: list[dict[str, Any]],
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.06,
    grad_clip: float = 1.0,
    eval_every: int = 0,
    keep_best: bool = False,
    seed: int = 0,
    device: Device,
    description: str = "train",
    console: Console | None = None,
    lr_setting: str = "the learning rate (distill.lr; teacher.lr / teacher.head_lr for the teacher fine-tune)",
) -> TrainResult:
    """Train `model` on the weighted sum of `objective`'s terms; teacher in eval mode, no grad.

    When a term reads attention maps, the student's attention-probability dropout is off while it
    trains (restored afterwards), so the maps it gives the losses are softmax probabilities whose
    rows sum to 1; the first step checks that. Stops with TrainingDivergedError on a non-finite
    loss or gradient norm (every step) or non-finite weights (every epoch end and at the end)."""
    off: AbstractContextManager[list[str]] = (
        attention_dropout_off(model) if objective.needs_attentions else nullcontext([])
    )
    with off as changed:
        result = _train(
            model,
            objective,
            train_data,
            teacher=teacher,
            extra_teachers=extra_teachers,
            val_data=val_data,
            epochs=epochs,
            batch_size=batch_size,
            param_groups=param_groups,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            grad_clip=grad_clip,
            eval_every=eval_every,
            keep_best=keep_best,
            seed=seed,
            device=device,
            description=description,
            console=console,
            lr_setting=lr_setting,
        )
        result.attention_dropout_off = list(changed)
    return result


def _train(
    model: torch.nn.Module,
    objective: Objective,
    train_data: Encoded,
    *,
    teacher: torch.nn.Module | None,
    extra_teachers: list[torch.nn.Module] | None,
    val_data: Encoded | None,
    epochs: float,
    batch_size: int,
    param_groups: list[dict[str, Any]],
    weight_decay: float,
    warmup_ratio: float,
    grad_clip: float,
    eval_every: int,
    keep_best: bool,
    seed: int,
    device: Device,
    description: str,
    console: Console | None,
    lr_setting: str,
) -> TrainResult:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    torch.manual_seed(seed)
    model.to(device.torch_device).train()
    extra_teachers = extra_teachers or []
    for t in [teacher, *extra_teachers]:
        if t is not None:
            t.to(device.torch_device).eval()
    objective.to(device.torch_device)
    # projections / regressors a loss owns train with the student (never exported with it)
    owned = [p for p in objective.parameters() if p.requires_grad]
    if owned:
        param_groups = [*param_groups, {"params": owned, "lr": param_groups[0]["lr"]}]
    # everything the optimizer updates: gradient clipping and the finiteness checks cover it all
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(p): f"loss term {n}" for n, p in objective.named_parameters()})
    trained = [(names.get(id(p), "parameter"), p) for g in param_groups for p in g["params"]]
    trained_params = [p for _, p in trained]
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    warmup = int(warmup_ratio * total)
    opt = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    result = TrainResult(steps=0, seconds=0.0, samples_per_second=0.0, final_loss=float("nan"))
    seen, ema = 0, None
    start = time.perf_counter()
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
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, loss=float("nan"), speed=0.0)
        epoch = 0
        while result.steps < total:
            for batch in batches(train_data, batch_size, shuffle=True, seed=seed + epoch):
                if result.steps >= total:
                    break
                batch = {k: v.to(device.torch_device) for k, v in batch.items()}
                with device.autocast():
                    t_out = None
                    if objective.needs_teacher and teacher is not None:
                        with torch.no_grad():
                            t_out = forward_kd(teacher, batch, objective.needs_hidden, objective.needs_attentions)
                            t_out.ensemble_logits = tuple(forward_kd(m, batch).logits for m in extra_teachers)
                    s_out = forward_kd(model, batch, objective.needs_hidden, objective.needs_attentions)
                    if t_out is not None and (s_out.labels is None or bool((s_out.labels < 0).any())):
                        # unlabeled transfer data (or augmented copies, label -1): the teacher's argmax
                        t_arg = t_out.logits.argmax(-1)
                        y = t_arg if s_out.labels is None else torch.where(s_out.labels < 0, t_arg, s_out.labels)
                        s_out.labels = t_out.labels = y
                    if result.steps == 0 and s_out.attentions is not None:
                        _check_attention_rows(s_out.attentions, model)
                    loss, values = objective(s_out, t_out)
                value = float(loss.detach())
                step = result.steps + 1
                if not math.isfinite(value):
                    raise _diverged(description, f"the loss is {value}", step, epoch + 1, None, lr_setting)
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:  # a schedule step may leave no term with a gradient
                    loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(trained_params, grad_clip)
                if not bool(torch.isfinite(norm)):
                    what = f"the gradient norm is {float(norm)}"
                    raise _diverged(description, what, step, epoch + 1, value, lr_setting)
                opt.step()
                sched.step()
                result.steps += 1
                objective.after_step(result.steps)
                seen += len(batch["attention_mask"])
                ema = value if ema is None else 0.9 * ema + 0.1 * value
                elapsed = time.perf_counter() - start
                progress.update(task, advance=1, loss=ema, speed=seen / elapsed)
                if not progress.console.is_terminal and (
                    result.steps % max(1, total // 10) == 0 or result.steps == total
                ):
                    # no live bar in a log file or CI: a plain line every 10% instead
                    progress.console.print(
                        f"{description}: step {result.steps}/{total}, loss {ema:.4f}, "
                        f"{seen / elapsed:.1f} samples/s, {elapsed:.0f} s"
                    )
                record: dict[str, float] = {
                    "step": result.steps,
                    "loss": value,
                    **{f"term_{k}": v for k, v in values.items()},
                }
                if val_data is not None and eval_every and result.steps % eval_every == 0:
                    acc = evaluate(model, val_data, device).accuracy
                    model.train()
                    record["val_accuracy"] = acc
                    progress.console.log(f"{description}: step {result.steps}/{total} val accuracy {acc:.4f}")
                    if keep_best and (result.best_val_accuracy is None or acc > result.best_val_accuracy):
                        result.best_val_accuracy = acc
                        result.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                result.history.append(record)
            epoch += 1
            # at every epoch's end, the last (possibly partial) one included: one pass over the weights
            if bad := _first_nonfinite(trained):
                what = f"weights of {bad} are not finite (NaN/inf)"
                raise _diverged(description, what, result.steps, epoch, ema, lr_setting)
    result.seconds = time.perf_counter() - start
    result.schedule_events = list(objective.schedule.events)
    result.samples_per_second = seen / result.seconds if result.seconds else 0.0
    result.final_loss = ema if ema is not None else float("nan")
    if keep_best and val_data is not None:
        acc = evaluate(model, val_data, device).accuracy
        if result.best_val_accuracy is None or acc > result.best_val_accuracy:
            result.best_val_accuracy, result.best_state = acc, None  # the last one is the best
        if result.best_state is not None:
            model.load_state_dict(result.best_state)
    model.eval()
    return result


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
