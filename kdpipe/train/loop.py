"""The explicit training loop shared by the teacher and distill stages, and evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from kdpipe.data.tables import Encoded, batches
from kdpipe.errors import ConfigError, ModelError, TrainingDivergedError
from kdpipe.losses.objective import Objective, StepLoss
from kdpipe.models.loading import KDOutputs, attention_dropout_off, attention_row_sums, forward_kd
from kdpipe.train import checkpoints, distributed

if TYPE_CHECKING:
    import torch
    from rich.console import Console


@dataclass(frozen=True)
class Device:
    torch_device: str  # "cpu" | "cuda"
    amp_dtype: Any  # torch.bfloat16 or None

    @property
    def precision(self) -> str:
        import torch

        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def cuda(self) -> bool:
        return self.torch_device == "cuda"

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
    if precision == "fp32" or (precision == "auto" and dev == "cpu"):
        return Device(dev, None)
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        # fp16 autocast trains with a gradient scaler (kdpipe.train.loop._setup); bf16 needs none
        return Device(dev, torch.float16)
    return Device(dev, torch.bfloat16)


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
    resumed_from: int | None = None  # the step a resumed run continued from


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
    checkpoint: Path | None = None  # resume checkpoint file (None: no checkpoints)
    checkpoint_every: int = 200  # steps between checkpoints (0: epoch ends only); every epoch end writes one too
    resume: bool = False  # continue from `checkpoint` when it exists
    accumulate: int = 1  # micro-batches per optimiser step (gradient accumulation)
    compile: bool = False  # torch.compile the student (nn.Module.compile: the state-dict keys stay)
    teacher_device: str | None = None  # where the teachers run (None: beside the student)


@dataclass
class _Loop:
    """The optimiser state of one run: what the step function updates."""

    opt: Any
    sched: Any
    trained: list[tuple[str, Any]]  # (name, parameter) of everything the optimizer updates
    total: int
    seen: int = 0
    ema: float | None = None
    scaler: Any = None  # fp16 autocast: torch.amp.GradScaler


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
    cache: Any = None,
) -> TrainResult:
    """Train `model` on the weighted sum of `objective`'s terms; teachers in eval mode, no grad (the first is
    the teacher, the others its fellow ensemble members). `data` is an Encoded split or a data-free set.

    When a term reads attention maps, the student's attention-probability dropout is off while it
    trains (restored afterwards), so the maps it gives the losses are softmax probabilities whose
    rows sum to 1; the first step checks that. Stops with TrainingDivergedError on a non-finite
    loss or gradient norm (every step) or non-finite weights (every epoch end and at the end).
    `student_ids` (V_teacher,): a pruned-vocabulary student reads `student_ids[input_ids]` of the teacher's ids.
    `cache` (kdpipe.train.cache.TeacherCache): the teacher's outputs are read from it instead of running the teacher.

    With `plan.checkpoint`, the whole state (weights, optimiser, scheduler, the loss terms' own modules and
    schedule, every RNG, the data position, the loss history) is written atomically every
    `plan.checkpoint_every` steps and at every epoch end; with `plan.resume` a run continues from it and ends
    bit-identical (on CPU) to one never interrupted. Under torchrun the student trains under DDP (kdpipe.
    distributed): each process takes its share of every global batch."""
    off: AbstractContextManager[list[str]] = (
        attention_dropout_off(model) if objective.needs_attentions else nullcontext([])
    )
    with off as changed:
        result = _train(
            model, objective, data, plan, device, param_groups, list(teachers), val_data, console, student_ids, cache
        )
        result.attention_dropout_off = list(changed)
    return result


def _setup(
    model: torch.nn.Module,
    objective: Objective,
    plan: TrainPlan,
    groups: list[dict[str, Any]],
    steps_per_epoch: int,
    device: Device,
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
    # fused AdamW: one kernel for every parameter on CUDA (the CPU keeps the default for-each path)
    opt = torch.optim.AdamW(groups, weight_decay=plan.weight_decay, fused=True if device.cuda else None)
    sched = linear_schedule(opt, total, warmup)
    fp16 = device.amp_dtype is torch.float16
    scaler = torch.amp.GradScaler(device.torch_device) if fp16 else None
    return _Loop(opt=opt, sched=sched, trained=trained, total=total, scaler=scaler)


def linear_schedule(opt: Any, total: int, warmup: int) -> Any:
    """The learning-rate factor of every kdpipe training run: linear warm-up over `warmup` steps ((s + 1) / warmup),
    then linear decay to 0 at step `total`."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )


def optimizer_step(total: torch.Tensor, opt: Any, params: Any, clip: float) -> float:
    """One plain optimiser step on the loss `total`: its value, and, when it is finite, backward, the gradient norm
    clipped to `clip`, and the step (a non-finite loss is returned untouched, for the caller to stop on)."""
    import torch

    value = float(total.detach())
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return value


def _progress(console: Console | None, training: bool = True) -> Any:
    """The house progress bar; `training`: with the loss and samples/s fields a training loop updates."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    fields = (TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.1f} samples/s"))
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(fields if training else ()),
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


class _Trainee(nn.Module):
    """What trains, as one module: the student and the loss terms' own modules (projections, regressors).
    Its forward is the student's forward plus the objective, so that DDP sees the loss as the output and finds
    exactly the parameters a step used (a PID/SID schedule leaves some without a gradient)."""

    def __init__(self, model: nn.Module, objective: Objective, student_ids: Any = None) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        self.student_ids = student_ids  # (V_teacher,) teacher id -> student id, for a pruned-vocabulary student
        self.last: StepLoss | None = None

    def forward(
        self, batch: dict[str, Any], t_out: KDOutputs | None, ensemble: tuple[Any, ...], check_rows: bool
    ) -> torch.Tensor:
        hidden, attentions = self.objective.needs_hidden, self.objective.needs_attentions
        if self.student_ids is not None and "input_ids" in batch:
            batch = {**batch, "input_ids": self.student_ids[batch["input_ids"]]}
        s_out = forward_kd(self.model, batch, hidden, attentions)
        if check_rows and s_out.attentions is not None:
            _check_attention_rows(s_out.attentions, self.model)
        s_out, t_out = with_targets(s_out, t_out, ensemble)
        self.last = self.objective(s_out, t_out)
        return self.last.total


def _teacher_outputs(
    teachers: list[torch.nn.Module], objective: Objective, batch: dict[str, Any], cache: Any, device: Device
) -> tuple[KDOutputs | None, tuple[Any, ...]]:
    """The teacher's (and ensemble's) outputs on `batch`: read from the cache, or one forward in inference mode
    (cloned out of it, so the losses may save them for backward). None when nothing reads them."""
    import torch

    labels = batch.get("labels")
    unlabeled = labels is None or bool((labels < 0).any())  # then the teacher labels them, even for a `ce` recipe
    if not teachers and cache is None:
        return None, ()
    if not (objective.needs_teacher or unlabeled):
        return None, ()
    if cache is not None:
        return cache.outputs(batch["index"], batch["attention_mask"], labels, device.torch_device), ()
    t_dev = _device_of(teachers[0])
    t_batch = batch if t_dev == batch["attention_mask"].device else {k: v.to(t_dev) for k, v in batch.items()}
    # autocast as the student (softmax / layer norm stay fp32 under it), unless the teacher runs on the host
    amp = device.autocast() if t_dev.type == device.torch_device else nullcontext()
    with torch.inference_mode(), amp:
        t_out = forward_kd(teachers[0], t_batch, objective.needs_hidden, objective.needs_attentions)
        ensemble = tuple(forward_kd(m, t_batch).logits for m in teachers[1:])
    dev = batch["attention_mask"].device
    return _out_of_inference(t_out, dev, batch), tuple(e.to(dev).clone() for e in ensemble)


def _device_of(model: torch.nn.Module) -> Any:
    p = next(model.parameters())
    return p.device


def _out_of_inference(out: KDOutputs, device: Any, batch: dict[str, Any]) -> KDOutputs:
    """Teacher outputs as ordinary tensors on the student's device (cloned out of inference mode)."""

    def tup(x: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        return None if x is None else tuple(t.to(device).clone() for t in x)

    return replace(
        out,
        logits=out.logits.to(device).clone(),
        hidden_states=tup(out.hidden_states),
        attentions=tup(out.attentions),
        attention_mask=batch.get("attention_mask"),
        labels=batch.get("labels"),
    )


def _rows(batch: dict[str, Any], part: slice) -> dict[str, Any]:
    return {k: v[part] for k, v in batch.items()}


def _micro(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """`batch` split into at most `parts` micro-batches of near-equal size."""
    n = len(batch["attention_mask"])
    bounds = np.linspace(0, n, min(parts, n) + 1).astype(int)
    return [_rows(batch, slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _step(
    loop: _Loop,
    runner: Any,
    trainee: _Trainee,
    teachers: list[torch.nn.Module],
    batch: dict[str, Any],
    plan: TrainPlan,
    device: Device,
    step: int,
    epoch: int,
    cache: Any,
) -> tuple[float, dict[str, float]]:
    """One optimiser step on a global batch: this process's share of it, in `plan.accumulate` micro-batches,
    each loss weighted by its share of the global batch (so the step's gradient is that of the global mean,
    whatever the split); a non-finite loss or gradient norm stops training."""
    import torch

    w = distributed.world()
    n_global = len(batch["attention_mask"])
    names, sums = _backward(loop, runner, trainee, teachers, batch, plan, device, step, cache, w)
    # the global batch's mean of the loss, of every term and of the schedule's layer loss, on every process
    total = distributed.all_sum(sums, device.torch_device) if w.distributed else sums
    value, *term_values, layer_sum = [v / n_global for v in total]
    layer_loss = None if math.isnan(layer_sum) else layer_sum
    if not math.isfinite(value):
        raise _diverged(plan.description, f"the loss is {value}", step, epoch, None, plan.lr_setting)
    if loop.scaler is not None:
        loop.scaler.unscale_(loop.opt)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in loop.trained], plan.grad_clip)
    if loop.scaler is not None:
        loop.scaler.step(loop.opt)  # skips the step when fp16 overflowed, and lowers the scale
        loop.scaler.update()
    else:
        if not bool(torch.isfinite(norm)):
            what = f"the gradient norm is {float(norm)}"
            raise _diverged(plan.description, what, step, epoch, value, plan.lr_setting)
        loop.opt.step()
    loop.sched.step()
    trainee.objective.after_step(step, layer_loss)
    return value, dict(zip(names, term_values, strict=True))


def _backward(
    loop: _Loop,
    runner: Any,
    trainee: _Trainee,
    teachers: list[torch.nn.Module],
    batch: dict[str, Any],
    plan: TrainPlan,
    device: Device,
    step: int,
    cache: Any,
    w: distributed.World,
) -> tuple[list[str], list[float]]:
    """Forward and backward of this process's rows of the global batch, micro-batch by micro-batch; returns the
    term names and the row-weighted sums of [loss, *terms, layer loss] over those rows."""
    n_global = len(batch["attention_mask"])
    local = _rows(batch, distributed.shard(n_global, w)) if w.distributed else batch
    empty = len(local["attention_mask"]) == 0  # a last batch with fewer rows than processes
    if empty:  # DDP needs every process's backward: one row, weighted 0
        local = _rows(batch, slice(0, 1))
    loop.opt.zero_grad(set_to_none=True)
    micro = _micro(local, plan.accumulate)
    sums: list[float] = []
    names: list[str] = []
    for i, mb in enumerate(micro):
        n = 0 if empty else len(mb["attention_mask"])
        t_out, ensemble = _teacher_outputs(teachers, trainee.objective, mb, cache, device)
        sync = nullcontext() if i == len(micro) - 1 or not w.distributed else runner.no_sync()
        with sync:
            with device.autocast():
                loss = runner(mb, t_out, ensemble, step == 1 and i == 0)
            out = trainee.last
            assert out is not None
            if not loss.requires_grad and w.distributed:  # a schedule step with no term: DDP still needs a backward
                loss = loss + 0.0 * sum(p.sum() for _, p in loop.trained)
            share = n * w.size / n_global  # the loss is a mean over the micro-batch; DDP averages over processes
            if loss.requires_grad:
                scaled = loss * share
                (loop.scaler.scale(scaled) if loop.scaler is not None else scaled).backward()
        names = list(out.values)
        layer = out.layer_loss if out.layer_loss is not None else float("nan")
        values = [float(loss.detach()), *out.values.values(), layer]
        sums = [a + n * b for a, b in zip(sums or [0.0] * len(values), values, strict=True)]
    return names, sums


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
    cache: Any,
) -> TrainResult:
    w = distributed.join(device.torch_device)
    loop, trainee, runner = _prepare(model, objective, data, plan, device, param_groups, teachers, student_ids, w)
    result = TrainResult(steps=0, seconds=0.0, samples_per_second=0.0, final_loss=float("nan"))
    epoch, skip = _resume(plan, trainee, loop, result, w, console)
    result.resumed_from = result.steps if result.steps else None
    start = time.perf_counter() - result.seconds
    with _progress(console) as progress:
        task = progress.add_task(
            plan.description, total=loop.total, completed=result.steps, loss=loop.ema or float("nan"), speed=0.0
        )
        while result.steps < loop.total:
            order = batches(data, plan.batch_size, shuffle=True, seed=plan.seed + epoch, with_index=True, skip=skip)
            for batch in order:
                if result.steps >= loop.total:
                    break
                batch = _to_device(batch, device)
                value, values = _step(
                    loop, runner, trainee, teachers, batch, plan, device, result.steps + 1, epoch + 1, cache
                )
                result.steps += 1
                skip += 1
                loop.seen += len(batch["attention_mask"])
                loop.ema = value if loop.ema is None else 0.9 * loop.ema + 0.1 * value
                _report(progress, task, loop, result.steps, plan.description, time.perf_counter() - start)
                record = {"step": result.steps, "loss": value, **{f"term_{k}": v for k, v in values.items()}}
                if val_data is not None and plan.eval_every and result.steps % plan.eval_every == 0:
                    record["val_accuracy"] = _validate(model, val_data, device, plan, result, progress)
                result.history.append(record)
                if plan.checkpoint is not None and plan.checkpoint_every and result.steps % plan.checkpoint_every == 0:
                    _checkpoint(plan, trainee, loop, result, epoch, skip, w, time.perf_counter() - start)
            epoch, skip = epoch + 1, 0
            # every epoch's end, the last (possibly partial) one included: the weights checked, a resume point
            _checkpoint(plan, trainee, loop, result, epoch, 0, w, time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    result.schedule_events = list(objective.schedule.events)
    result.samples_per_second = loop.seen / result.seconds if result.seconds else 0.0
    result.final_loss = loop.ema if loop.ema is not None else float("nan")
    if plan.keep_best and val_data is not None:
        _restore_best(model, val_data, device, result)
    model.eval()
    return result


def _resume(
    plan: TrainPlan, trainee: _Trainee, loop: _Loop, result: TrainResult, w: distributed.World, console: Console | None
) -> tuple[int, int]:
    """(epoch, skip) where training starts: the checkpoint's when resuming from one that passes its integrity
    check, (0, 0) otherwise (a damaged one is discarded, saying so: the run is then a fresh one)."""
    if plan.checkpoint is None or not plan.resume or not plan.checkpoint.is_file():
        return 0, 0
    try:
        epoch, skip = checkpoints.restore(plan.checkpoint, trainee, loop, result, w)
    except checkpoints.UntrustedCheckpoint as e:
        if console is not None:
            line = f"{plan.description}: {e.message}, training {plan.description} from step 0"
            console.print(line, markup=False, soft_wrap=True)
        return 0, 0
    if console is not None:
        console.print(f"{plan.description}: resumed from step {result.steps} of {loop.total} ({plan.checkpoint})")
    return epoch, skip


def _to_device(batch: dict[str, Any], device: Device) -> dict[str, Any]:
    """A batch on the training device; on CUDA from pinned memory, without blocking."""
    pin = device.cuda
    return {k: (v.pin_memory() if pin else v).to(device.torch_device, non_blocking=pin) for k, v in batch.items()}


def _checkpoint(
    plan: TrainPlan,
    trainee: _Trainee,
    loop: _Loop,
    result: TrainResult,
    epoch: int,
    skip: int,
    w: distributed.World,
    elapsed: float,
) -> None:
    """One pass over the weights (non-finite ones stop training), then, when the plan has a checkpoint file, a
    resume point after `result.steps` steps."""
    _require_finite_weights(loop, plan, result.steps, epoch + (1 if skip else 0))
    if plan.checkpoint is None:
        return
    result.seconds = elapsed
    checkpoints.save(plan.checkpoint, trainee, loop, result, epoch, skip, w)


def _prepare(
    model: torch.nn.Module,
    objective: Objective,
    data: Any,
    plan: TrainPlan,
    device: Device,
    param_groups: list[dict[str, Any]] | None,
    teachers: list[torch.nn.Module],
    student_ids: torch.Tensor | None,
    w: distributed.World,
) -> tuple[_Loop, _Trainee, Any]:
    """Models on their devices, the optimiser, and what trains: the student + the terms' modules, under DDP when
    there are several processes."""
    import torch

    torch.manual_seed(plan.seed)
    model.to(device.torch_device).train()
    for t in teachers:
        sharded = _is_sharded(t)
        t.to(plan.teacher_device or device.torch_device).eval()
        if device.cuda and device.amp_dtype is not None and plan.teacher_device in (None, "cuda") and not sharded:
            t.to(device.amp_dtype)  # the teacher only infers: half the memory, and its matmuls run in bf16 anyway
    objective.to(device.torch_device)
    if plan.compile:
        model.compile()
    groups = param_groups or [{"params": list(model.parameters()), "lr": plan.lr}]
    loop = _setup(model, objective, plan, groups, math.ceil(len(data) / plan.batch_size), device)
    ids = None if student_ids is None else student_ids.to(device.torch_device)
    trainee = _Trainee(model, objective, ids)
    if not w.distributed:
        return loop, trainee, trainee
    from torch.nn.parallel import DistributedDataParallel

    return loop, trainee, DistributedDataParallel(trainee, find_unused_parameters=True)


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 split the model's weights across processes (kdpipe.train.distributed.shard_teacher)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _require_finite_weights(loop: _Loop, plan: TrainPlan, step: int, epoch: int) -> None:
    if bad := _first_nonfinite(loop.trained):
        what = f"weights of {bad} are not finite (NaN/inf)"
        raise _diverged(plan.description, what, step, epoch, loop.ema, plan.lr_setting)


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
