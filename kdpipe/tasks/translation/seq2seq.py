"""Sequence-to-sequence (translation) models: a small pre-LN teacher config, a training loop with optional
token-level distillation, greedy/beam translation, BLEU, ONNX export and a torch-vs-onnxruntime parity check.

Batches are `kdpipe.data.pairs.encode_pairs` / `pair_batches` dicts: input_ids, attention_mask (B, S) and
labels (B, L) with -100 on padding, each target ending with </s>.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdpipe.errors import ConfigError, ModelError, TrainingDivergedError
from kdpipe.losses.logits import reverse_kl, soft_kl
from kdpipe.losses.masks import masked_mean
from kdpipe.train.loop import _progress, linear_schedule

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import Tensor
    from transformers import MBartConfig

Batch = dict[str, "Tensor"]


def small_config(
    vocab_size: int,
    d_model: int = 256,
    encoder_layers: int = 3,
    decoder_layers: int = 3,
    ffn_dim: int = 1024,
    heads: int = 4,
    max_position: int = 128,
    dropout: float = 0.1,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    bos_token_id: int = 3,
    decoder_start_token_id: int | None = None,
) -> MBartConfig:
    """A Marian-sized translation transformer as an mBART config (MBartForConditionalGeneration).

    mBART on purpose: its blocks are PRE-LayerNorm (x + f(LN(x))), so zeroing a block's output
    projections (self_attn.out_proj, encoder_attn.out_proj, fc2 and their biases) makes the block exactly
    the identity -- the assumption of the Bayesian layer-removal alignment. HF's Marian is post-LN
    (LN(x + f(x))), where no weight setting gives the identity. Scaled embeddings (sqrt(d_model)) and
    tied input/output embeddings as in Marian. The decoder starts from </s> by default: mBART's own
    label shift wraps the last label (</s>) to the front, so training and generation agree."""
    from transformers import MBartConfig

    start = eos_token_id if decoder_start_token_id is None else decoder_start_token_id
    return MBartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        max_position_embeddings=max_position,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="gelu",
        scale_embedding=True,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        decoder_start_token_id=start,
        forced_eos_token_id=None,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
    )


# --------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class Seq2SeqKD:
    """Token-level distillation terms, all averaged over real target tokens (labels != -100).

    method 'hinton': (1 - alpha) CE + alpha T^2 KL(teacher || student) per token (docs/methods.md §1.1);
    'reverse_kl': (1 - alpha) CE + alpha T^2 KL(student || teacher) per token (§1.3).
    Hidden-state MSE (optional, weights 0 = off): per mapped layer, the squared error averaged over the
    hidden size and the real positions (decoder: target tokens; encoder: source tokens), summed over the
    map. A layer map is {student index: teacher index} into the hidden-state tuples (0 = embeddings,
    i = after block i); None maps the student's layers evenly onto the teacher's (`even_layer_map`)."""

    method: Literal["hinton", "reverse_kl"] = "hinton"
    alpha: float = 0.5
    temperature: float = 2.0
    decoder_hidden_weight: float = 0.0
    encoder_hidden_weight: float = 0.0
    decoder_layer_map: dict[int, int] | None = None
    encoder_layer_map: dict[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("hinton", "reverse_kl"):
            raise ConfigError(f"Seq2SeqKD.method: unknown method {self.method!r}", "use 'hinton' or 'reverse_kl'")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ConfigError(
                f"Seq2SeqKD: alpha {self.alpha} / temperature {self.temperature} out of range",
                "use 0 <= alpha <= 1 and temperature > 0",
            )


def even_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """{student hidden-state index: teacher index}: embeddings to embeddings, last to last, the rest evenly."""
    if student_layers <= 0:
        return {0: 0}
    return {i: round(i * teacher_layers / student_layers) for i in range(student_layers + 1)}


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: [start, y_1 .. y_{L-1}], with -100 read as padding."""
    import torch

    shifted = torch.full_like(labels, pad_id)
    shifted[:, 0] = start_id
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return shifted


def _run(model: torch.nn.Module, batch: Batch, hidden: bool) -> Any:
    cfg: Any = model.config
    dec_in = shift_right(batch["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=dec_in,
        output_hidden_states=hidden,
        use_cache=False,
    )


def _hidden_mse(
    student: Sequence[Tensor], teacher: Sequence[Tensor], layer_map: dict[int, int], real: Tensor
) -> Tensor:
    total = None
    for s_i, t_i in layer_map.items():
        if not (0 <= s_i < len(student) and 0 <= t_i < len(teacher)):
            raise ConfigError(
                f"Seq2SeqKD layer map {s_i}->{t_i}: the student has hidden states 0..{len(student) - 1}, "
                f"the teacher 0..{len(teacher) - 1}",
                "map indices of the hidden-state tuples (0 = embeddings)",
            )
        s, t = student[s_i].float(), teacher[t_i].detach().float()
        if s.shape != t.shape:
            raise ConfigError(
                f"Seq2SeqKD layer map {s_i}->{t_i}: hidden sizes differ ({s.shape[-1]} vs {t.shape[-1]})",
                "map layers of the same width (or set the hidden weights to 0)",
            )
        term = masked_mean(((s - t) ** 2).mean(-1), real)
        total = term if total is None else total + term
    assert total is not None
    return total


def seq2seq_loss(
    model: torch.nn.Module,
    batch: Batch,
    teacher: torch.nn.Module | None = None,
    kd: Seq2SeqKD | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The training loss of one batch and its terms. Without a teacher: token-level CE (label smoothing
    optional). With one: the teacher runs in eval mode under inference_mode and `kd` (default
    Seq2SeqKD()) adds its terms; the student's logits are first selected at the real target tokens,
    (B, T, V) -> (N, V), then the (N, V) losses of kdpipe.losses.logits apply."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    real = labels != -100
    kd = kd or Seq2SeqKD()
    need_hidden = teacher is not None and (kd.decoder_hidden_weight > 0 or kd.encoder_hidden_weight > 0)
    out = _run(model, batch, need_hidden)
    z = out.logits[real]
    ce = F.cross_entropy(z.float(), labels[real], label_smoothing=label_smoothing)
    if teacher is None:
        return ce, {"ce": float(ce.detach())}
    teacher.eval()
    with torch.inference_mode():
        t_out = _run(teacher, batch, need_hidden)
    v = t_out.logits[real].clone()  # out of inference mode: a plain tensor autograd can read
    t = kd.temperature
    soft = t**2 * soft_kl(v, z, t) if kd.method == "hinton" else reverse_kl(z, v, t)
    loss = (1 - kd.alpha) * ce + kd.alpha * soft
    terms = {"ce": float(ce.detach()), kd.method: float(soft.detach())}
    for side, weight, layer_map, mask in (
        ("decoder", kd.decoder_hidden_weight, kd.decoder_layer_map, real),
        ("encoder", kd.encoder_hidden_weight, kd.encoder_layer_map, batch["attention_mask"].bool()),
    ):
        if weight > 0:
            s_h, t_h = (
                getattr(out, f"{side}_hidden_states"),
                [h.clone() for h in getattr(t_out, f"{side}_hidden_states")],
            )
            mse = _hidden_mse(s_h, t_h, layer_map or even_layer_map(len(s_h) - 1, len(t_h) - 1), mask)
            loss = loss + weight * mse
            terms[f"{side}_hidden_mse"] = float(mse.detach())
    return loss, terms


def validation_loss(model: torch.nn.Module, batches: Iterable[Batch]) -> float:
    """Token-weighted CE (nats per real target token) without dropout or grad."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            real = batch["labels"] != -100
            z = _run(model, batch, False).logits[real].float()
            total += float(F.cross_entropy(z, batch["labels"][real], reduction="sum"))
            count += int(real.sum())
    model.train(was_training)
    return total / max(1, count)


# --------------------------------------------------------------------------- training
@dataclass
class ValSet:
    """Validation data: batches for the loss and, when a tokenizer is given, sources/references for BLEU."""

    batches: list[Batch]
    sources: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    tokenizer: Any = None
    max_new_tokens: int = 48
    num_beams: int = 1


@dataclass
class _Run:
    opt: Any
    sched: Any
    total: int
    step: int = 0
    ema: float | None = None


def _optimiser(model: torch.nn.Module, lr: float, warmup_steps: int, total: int, weight_decay: float) -> _Run:
    """AdamW, linear warm-up over `warmup_steps`, then linear decay to 0 at `total` (kdpipe.train.loop's schedule)."""
    import torch

    warmup = max(0, min(warmup_steps, total - 1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = linear_schedule(opt, total, warmup)
    return _Run(opt=opt, sched=sched, total=total)


def _step(
    run: _Run,
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: Callable[[Batch], tuple[Tensor, dict[str, float]]],
    regulariser: Callable[[torch.nn.Module], Tensor] | None,
    grad_clip: float,
    epoch: int,
) -> float:
    """One optimiser step; a non-finite loss or gradient norm stops training."""
    import torch

    loss, _ = loss_fn(batch)
    if regulariser is not None:
        loss = loss + regulariser(model)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDivergedError(
            f"seq2seq training diverged at step {run.step + 1}, epoch {epoch}: the loss is {value}",
            "lower lr, raise warmup_steps, or check the regulariser",
        )
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not bool(torch.isfinite(norm)):
        raise TrainingDivergedError(
            f"seq2seq training diverged at step {run.step + 1}, epoch {epoch}: the gradient norm is {float(norm)}",
            "lower lr or grad_clip",
        )
    run.opt.step()
    run.sched.step()
    run.step += 1
    run.ema = value if run.ema is None else 0.9 * run.ema + 0.1 * value
    return value


def _evaluate(model: torch.nn.Module, val: ValSet) -> dict[str, float]:
    record = {"val_loss": validation_loss(model, val.batches)}
    if val.tokenizer is not None and val.sources:
        hyps = translate(model, val.tokenizer, val.sources, val.max_new_tokens, num_beams=val.num_beams)
        record["val_bleu"] = bleu(hyps, val.references)
    return record


def train_seq2seq(
    model: torch.nn.Module,
    train_batches_fn: Callable[[int], Iterable[Batch]],
    epochs: int,
    lr: float = 5e-4,
    warmup_steps: int = 200,
    *,
    teacher: torch.nn.Module | None = None,
    kd: Seq2SeqKD | None = None,
    label_smoothing: float = 0.0,
    val: ValSet | None = None,
    evaluate_every_epoch: bool = True,
    regulariser: Callable[[torch.nn.Module], Tensor] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    console: Console | None = None,
    description: str = "seq2seq",
    seed: int = 0,
    max_steps: int | None = None,
    grad_clip: float = 1.0,
    weight_decay: float = 0.01,
) -> list[dict[str, float]]:
    """Train `model` in place on `train_batches_fn(epoch)` (a fresh, e.g. reshuffled, iterable per epoch),
    on the model's device; returns one record per epoch: epoch, step, train_loss (mean over the epoch),
    seconds, lr, and with `val` val_loss / val_bleu (every epoch, or only after the last when
    evaluate_every_epoch is False). `regulariser(model)` is added to every step's loss (e.g. a prior
    penalty); `on_epoch_end(epoch, record)` runs after each epoch. `max_steps` caps the run (and the
    schedule's length). Teacher: see `seq2seq_loss`; it is moved to the model's device and never updated."""
    import torch

    if epochs < 1:
        raise ConfigError(f"train_seq2seq: epochs must be >= 1, got {epochs}", "train for at least one epoch")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    if teacher is not None:
        teacher.to(device).eval()
    per_epoch = sum(1 for _ in train_batches_fn(0))
    total = max(1, per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs))
    run = _optimiser(model, lr, warmup_steps, total, weight_decay)
    loss_fn = functools.partial(seq2seq_loss, model, teacher=teacher, kd=kd, label_smoothing=label_smoothing)
    history: list[dict[str, float]] = []

    with _progress(console) as progress:
        task = progress.add_task(description, total=total, loss=float("nan"), speed=0.0)
        for epoch in range(1, epochs + 1):
            if run.step >= total:
                break
            record = _epoch(
                run, model, train_batches_fn(epoch - 1), loss_fn, regulariser, grad_clip, epoch, progress, task
            )
            if val is not None and (evaluate_every_epoch or epoch == epochs or run.step >= total):
                record.update(_evaluate(model, val))
                model.train()
            _log_epoch(progress, description, record)
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    run.opt.zero_grad(set_to_none=True)  # no stale gradients left on the model (or memory held by them)
    model.eval()
    return history


def _epoch(
    run: _Run,
    model: torch.nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[Batch], tuple[Tensor, dict[str, float]]],
    regulariser: Callable[[torch.nn.Module], Tensor] | None,
    grad_clip: float,
    epoch: int,
    progress: Any,
    task: Any,
) -> dict[str, float]:
    device = next(model.parameters()).device
    model.train()
    start, losses, seen = time.perf_counter(), [], 0
    for batch in batches:
        if run.step >= run.total:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        losses.append(_step(run, model, batch, loss_fn, regulariser, grad_clip, epoch))
        seen += len(batch["input_ids"])
        progress.update(task, advance=1, loss=run.ema, speed=seen / max(1e-9, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch,
        "step": run.step,
        "train_loss": sum(losses) / max(1, len(losses)),
        "seconds": seconds,
        "lr": float(run.sched.get_last_lr()[0]),
    }


def _log_epoch(progress: Any, description: str, record: dict[str, float]) -> None:
    extra = "".join(f", {k} {record[k]:.4g}" for k in ("val_loss", "val_bleu") if k in record)
    progress.console.log(
        f"{description}: epoch {record['epoch']}, step {record['step']}, train loss {record['train_loss']:.4f}"
        f"{extra}, {record['seconds']:.0f} s"
    )


# --------------------------------------------------------------------------- inference and metrics
def translate(
    model: torch.nn.Module,
    tok: Any,
    sources: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 64,
    num_beams: int = 1,
    max_length: int | None = None,
) -> list[str]:
    """Decoded translations of `sources`, in order: greedy (num_beams=1) or beam search, under inference_mode.
    Sources are batched by length (less padding) and truncated to max_length (default: the model's positions)."""
    import torch

    if not sources:
        return []
    device = next(model.parameters()).device
    limit = max_length or int(getattr(model.config, "max_position_embeddings", 512))
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([sources[i] for i in idx], truncation=True, max_length=limit, padding=True, return_tensors="pt")
            ids = model.generate(  # type: ignore[operator]
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
            )
            for i, text in zip(idx, tok.batch_decode(ids, skip_special_tokens=True), strict=True):
                out[i] = text.strip()
    model.train(was_training)
    return out


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 0-100) of hypotheses against one reference each."""
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"bleu: {len(hyps)} hypotheses but {len(refs)} references")
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu, 0-100)."""
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"chrf: {len(hyps)} hypotheses but {len(refs)} references")
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


# --------------------------------------------------------------------------- saving, ONNX, parity
def save_seq2seq(model: torch.nn.Module, tok: Any, out_dir: str | Path) -> Path:
    """Model (safetensors, config, generation config) and tokenizer in one directory, as export expects."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))  # type: ignore[operator]
    tok.save_pretrained(str(out))
    return out


def load_seq2seq(model_dir: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a `save_seq2seq` directory, offline."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: no config.json, not a saved seq2seq model",
            "save it with kdpipe.tasks.translation.seq2seq.save_seq2seq",
        )
    model = AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def export_seq2seq_onnx(model_dir: str | Path, out_dir: str | Path, opset: int = 18) -> dict[str, Any]:
    """optimum-onnx's exporter, task text2text-generation-with-past: encoder_model.onnx, decoder_model.onnx
    and decoder_with_past_model.onnx (past key values; not merged) plus the configs and tokenizer, which
    ORTModelForSeq2SeqLM.from_pretrained(out_dir) loads. Returns the spec (files, opset, graph inputs)."""
    import onnx
    import torch
    from optimum.exporters.onnx import main_export

    model_dir, out = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise ModelError(
            f"{model_dir}: needs config.json, the weights and tokenizer.json",
            "save it with kdpipe.tasks.translation.seq2seq.save_seq2seq",
        )
    with warnings.catch_warnings():
        # the TorchScript tracer warns about constants in transformers' mask code; parity is the real check
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        main_export(
            str(model_dir),
            output=str(out),
            task="text2text-generation-with-past",
            opset=opset,
            do_validation=False,
            no_post_process=True,
            device="cpu",
        )
    files = sorted(p.name for p in out.glob("*.onnx"))
    inputs = {f: [i.name for i in onnx.load(str(out / f), load_external_data=False).graph.input] for f in files}
    return {
        "exporter": "optimum-onnx main_export (TorchScript)",
        "task": "text2text-generation-with-past",
        "opset": opset,
        "files": files,
        "inputs": inputs,
    }


@dataclass(frozen=True)
class Seq2SeqParity:
    """torch vs onnxruntime on real sentences: the first decoder step's logits and greedy generations."""

    max_abs_diff: float
    atol: float
    same_generations: int
    examples: int
    ok: bool
    why: str = ""  # one line when not ok


def seq2seq_parity(
    model_dir: str | Path, onnx_dir: str | Path, sentences: Sequence[str], max_new_tokens: int = 24, atol: float = 1e-4
) -> Seq2SeqParity:
    """Fail-closed parity: the first decoder step's logits within `atol` (max abs diff, NaN fails) and the
    greedy generations' token ids identical on every sentence."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    if not sentences:
        raise ConfigError("seq2seq_parity: no sentences", "give real source sentences")
    model, tok = load_seq2seq(model_dir)
    ort_model = ORTModelForSeq2SeqLM.from_pretrained(str(onnx_dir), use_cache=True, use_merged=False)
    enc = tok(
        list(sentences),
        truncation=True,
        max_length=model.config.max_position_embeddings,
        padding=True,
        return_tensors="pt",
    )
    start = torch.full((len(sentences), 1), model.config.decoder_start_token_id, dtype=torch.long)
    with torch.inference_mode():
        ref = model(**enc, decoder_input_ids=start).logits.float().numpy()
        got = ort_model(**enc, decoder_input_ids=start).logits.float().numpy()
        gen = dict(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        ref_ids = model.generate(**enc, **gen).tolist()
        got_ids = ort_model.generate(**enc, **gen).tolist()
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    worst = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    same = sum(a == b for a, b in zip(ref_ids, got_ids, strict=True))
    why = ""
    if not worst <= atol:
        why = f"first-step logits differ by {worst:.3g} > atol {atol:g}"
    elif same != len(sentences):
        first = next(i for i, (a, b) in enumerate(zip(ref_ids, got_ids, strict=True)) if a != b)
        why = f"greedy generations differ on {len(sentences) - same} of {len(sentences)} sentences (first: #{first})"
    return Seq2SeqParity(
        max_abs_diff=worst, atol=atol, same_generations=same, examples=len(sentences), ok=not why, why=why
    )
