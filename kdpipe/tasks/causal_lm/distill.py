"""The causal-LM task's distill stage: token-level KD of the upstream student on the teacher's logits.

Data (distill.lm.data): 'seqkd', each train prompt followed by the teacher's generation (the teacher stage's
generations.jsonl, greedy and sampled rows alike), or 'texts', the train rows' responses after their prompts (a row
without a response: its whole text). Labels are the response tokens; prompt and padding are -100, and every KD term
is masked to the same positions (kdpipe.losses.tokens.logit_mask) and averaged over tokens. With distill.cache.use
(the default) the teacher runs once over the training sequences and its top-k logits (distill.cache.top_k, 64 when
unset) are cached (kdpipe.tasks.causal_lm.lmcache, <out>/cache/causal_lm/); every off-policy KD batch reads them and
the KD terms are their k + 1-bucket forms (tokens.topk_*); with distill.cache.use false the teacher runs on every
batch (no_grad) and the terms are the dense ones. distill.lm.on_policy (GKD's lambda) is the share of KD batches
whose continuations the student samples itself (OnPolicy), scored by the teacher. AdamW, linear warm-up and decay,
gradient clipping and a finite-loss check every step (a NaN or inf is a TrainingDivergedError naming the step;
nothing is written). With distill.baseline the same student is trained again from its initial weights on the CE
term alone, same steps, never on-policy. Scored on the teacher stage's held-out texts (perplexity; next-token top-1
agreement with the teacher) and held-out prompts (Rouge-L of greedy generations against the teacher's;
samples.json holds a few side by side).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import CausalLMInfo, DistillRecord, RunContext, StageOutput, TeacherRecord, record
from kdpipe.config import CausalLMDistillConfig, DistillConfig
from kdpipe.errors import DataError, TrainingDivergedError
from kdpipe.tasks.causal_lm import data, lm, lmcache
from kdpipe.tasks.causal_lm.build import MODEL_DIR

if TYPE_CHECKING:
    from torch import Tensor

    from kdpipe.tasks.causal_lm.lmcache import LMCache

SAMPLES = "samples.json"
SIDE_BY_SIDE = 5
BASELINE = CausalLMDistillConfig(forward_kl=0.0, ce=1.0)


def terms(cfg: DistillConfig) -> CausalLMDistillConfig:
    """distill.lm, or forward KL alone when it is not given."""
    return cfg.lm or CausalLMDistillConfig()


def objective(s: Tensor, t: Tensor | None, labels: Tensor, w: CausalLMDistillConfig) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of distill.lm's terms on (B, T, V) student / teacher logits with (B, T) labels (-100 on
    prompt and padding), and each term's value. `t` may be None only when every KD weight is 0 (CE alone)."""
    import torch

    from kdpipe.losses import tokens

    mask = tokens.logit_mask(labels)
    parts: dict[str, Tensor] = {}
    kd = {"forward_kl": tokens.forward_kl, "reverse_kl": tokens.reverse_kl, "tvd": tokens.tvd}
    for name, fn in kd.items():
        if getattr(w, name):
            assert t is not None
            parts[name] = fn(s, t, mask, w.temperature)
    if w.jsd:
        assert t is not None
        parts["jsd"] = tokens.gkd_jsd(s, t, mask, w.beta, w.temperature)
    if w.ce:
        parts["ce"] = tokens.token_ce(s, labels)
    total = sum((getattr(w, k) * v for k, v in parts.items()), torch.zeros((), device=s.device))
    return total, {k: float(v.detach()) for k, v in parts.items()}


def topk_objective(
    s: Tensor, top: tuple[Tensor, Tensor, Tensor], labels: Tensor, w: CausalLMDistillConfig
) -> tuple[Tensor, dict[str, float]]:
    """`objective` against the cached teacher: `top` the batch's (B, T, k) values, (B, T, k) indices and (B, T)
    lse_rest (lmcache.LMCache.batch); the KD terms are their k + 1-bucket forms, CE is unchanged."""
    import torch

    from kdpipe.losses import tokens

    mask = tokens.logit_mask(labels)
    parts: dict[str, Tensor] = {}
    kd = {"forward_kl": tokens.topk_forward_kl, "reverse_kl": tokens.topk_reverse_kl, "tvd": tokens.topk_tvd}
    for name, fn in kd.items():
        if getattr(w, name):
            parts[name] = fn(s, *top, mask, w.temperature)
    if w.jsd:
        parts["jsd"] = tokens.topk_gkd_jsd(s, *top, mask, w.beta, w.temperature)
    if w.ce:
        parts["ce"] = tokens.token_ce(s, labels)
    total = sum((getattr(w, k) * v for k, v in parts.items()), torch.zeros((), device=s.device))
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _needs_teacher(w: CausalLMDistillConfig) -> bool:
    return any(getattr(w, k) for k in ("forward_kl", "reverse_kl", "jsd", "tvd"))


def train_seqs(cfg: DistillConfig, teacher: Manifest, tok: Any) -> list[lm.Seq]:
    """The training sequences of distill.lm.data, truncated to distill.lm.max_length; those with no target left
    are dropped (DataError when none is left)."""
    w, info = terms(cfg), record(teacher, TeacherRecord).info_as(CausalLMInfo)
    prompts = data.read_jsonl(teacher.path(info.train_prompts))
    pids = [lm.prompt_ids(tok, p["input"], bool(p["chat"])) for p in prompts]
    seqs: list[lm.Seq] = []
    if w.data == "seqkd":
        for g in data.read_jsonl(teacher.path(info.generations)):
            seqs.append(lm.Seq(pids[int(g["index"])] + [int(i) for i in g["response_ids"]], len(pids[int(g["index"])])))
    else:
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for p, ids in zip(prompts, pids, strict=True):
            if p.get("response"):
                seqs.append(
                    lm.Seq(ids + list(tok(p["response"], add_special_tokens=False)["input_ids"]) + eos, len(ids))
                )
            else:
                seqs.append(lm.Seq(list(tok(p["text"])["input_ids"]), 0))
    seqs = [lm.Seq(s.ids[: w.max_length], s.start) for s in seqs]
    seqs = [s for s in seqs if len(s.ids) > max(s.start, 1)]
    if cfg.train_limit:
        seqs = seqs[: cfg.train_limit]
    if not seqs:
        raise DataError(
            f"distill.lm.data: {w.data}: no training sequence has a target token within distill.lm.max_length "
            f"{w.max_length}",
            "raise distill.lm.max_length, or use data: texts",
        )
    return seqs


def _schedule(opt: Any, total: int, warmup_ratio: float) -> Any:
    from kdpipe.train.loop import linear_schedule

    return linear_schedule(opt, total, round(warmup_ratio * total))


def _step(
    student: Any, teacher: Any, b: dict[str, Tensor], w: CausalLMDistillConfig, opt: Any, clip: float,
    top: tuple[Tensor, Tensor, Tensor] | None = None,
) -> float:  # fmt: skip
    """One optimiser step; against the cached teacher `top` (the top-k forms) when given, else the live one."""
    import torch

    from kdpipe.train.loop import optimizer_step

    if top is not None:
        total, _ = topk_objective(lm.logits(student, b), top, b["labels"], w)
        return optimizer_step(total, opt, student.parameters(), clip)
    t = None
    if _needs_teacher(w):
        with torch.no_grad():
            t = lm.logits(teacher, b)
    total, _ = objective(lm.logits(student, b), t, b["labels"], w)
    return optimizer_step(total, opt, student.parameters(), clip)


@dataclass(frozen=True)
class OnPolicy:
    """GKD's on-policy batches: with probability `share` (distill.lm.on_policy, lambda) a batch's continuations are
    replaced by the student's own, sampled at T = 1 for `max_new_tokens` after each sequence's prompt (a text-only
    sequence: its first half), and the teacher scores them."""

    share: float
    tok: Any
    max_new_tokens: int
    seed: int


def on_policy_seqs(student: Any, seqs: list[lm.Seq], policy: OnPolicy, seed: int) -> list[lm.Seq]:
    """The sequences' prompts followed by the student's sampled continuations (a sequence whose sample is empty
    keeps its own); the student is in eval mode while it samples and back in train mode after."""
    prompts = [s.ids[: s.start] if s.start > 0 else s.ids[: max(1, len(s.ids) // 2)] for s in seqs]
    was_training = student.training
    student.eval()
    gens = lm.generate(student, policy.tok, prompts, policy.max_new_tokens, len(prompts), True, 1.0, seed)
    student.train(was_training)
    return [lm.Seq(p + g, len(p)) if g else s for p, g, s in zip(prompts, gens, seqs, strict=True)]


def _pick(student: Any, seqs: list[lm.Seq], policy: OnPolicy | None, rng: np.random.RandomState, step: int) -> tuple:
    if policy is None or not policy.share or rng.rand() >= policy.share:
        return seqs, 0
    return on_policy_seqs(student, seqs, policy, policy.seed * 1000 + step), 1


def fit(
    student: Any, teacher: Any, seqs: list[lm.Seq], pad: int, w: CausalLMDistillConfig, cfg: DistillConfig,
    ctx: RunContext, name: str, policy: OnPolicy | None = None, cache: LMCache | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """Train `student` in place on the sequences (on-policy batches as `policy` says); one history row per epoch.
    With `cache` (the teacher's top-k on `seqs`) the off-policy KD batches read it instead of running the teacher;
    on-policy batches (the student's samples) always run the teacher."""
    import torch

    from kdpipe.train.loop import _progress

    per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched, history, step = _schedule(opt, total, cfg.warmup_ratio), list[dict[str, float]](), 0
    rng = np.random.RandomState(ctx.seed + 7)
    student.train()
    with _progress(ctx.console) as progress:
        task = progress.add_task(name, total=total, loss=0.0, speed=0.0)
        for epoch in range(math.ceil(total / per_epoch)):
            order = np.random.RandomState(ctx.seed * 1000 + epoch).permutation(len(seqs))
            start, losses, on = time.perf_counter(), list[float](), 0
            for i in range(0, len(order), cfg.batch_size):
                if step >= total:
                    break
                rows = [int(j) for j in order[i : i + cfg.batch_size]]
                chosen, used = _pick(student, [seqs[j] for j in rows], policy, rng, step)
                on += used
                b = lm.batch(chosen, pad)
                top = None
                if cache is not None and not used and _needs_teacher(w):
                    top = cache.batch(rows, chosen, b["input_ids"].shape[1])
                value = _step(student, teacher, b, w, opt, cfg.grad_clip, top)
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"distill (causal_lm, {name}): training diverged at step {step + 1}, epoch {epoch}: the loss "
                        f"is {value}",
                        f"lower distill.lr (it is {cfg.lr:g}); nothing was written",
                    )
                sched.step()
                step, losses = step + 1, [*losses, value]
                progress.update(
                    task,
                    advance=1,
                    loss=value,
                    speed=len(losses) * cfg.batch_size / max(1e-9, time.perf_counter() - start),
                )
            history.append({"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                            "seconds": time.perf_counter() - start, "on_policy_batches": on})  # fmt: skip
    student.eval()
    _require_finite(student, name)
    return history


def _require_finite(model: Any, name: str) -> None:
    import torch

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDivergedError(
            f"distill (causal_lm, {name}): the weights hold NaN or inf after training ({bad[0]})",
            "lower distill.lr; nothing was written",
        )


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):  # NaN fails
        raise TrainingDivergedError(
            f"distill (causal_lm): the {what} is {value}", "lower distill.lr; nothing was written"
        )
    return value


def evaluate(model: Any, teacher: Any, tok: Any, t_manifest: Manifest, info: CausalLMInfo, bs: int) -> dict[str, Any]:
    """Held-out perplexity, top-1 agreement with the teacher, and the greedy generations' Rouge-L against the
    teacher's (mean over the held-out prompts)."""
    pad = int(tok.pad_token_id)
    texts = [str(r["text"]) for r in data.read_jsonl(t_manifest.path(info.held_out_texts))]
    seqs = lm.text_seqs(tok, texts, info.max_length)
    prompts = data.read_jsonl(t_manifest.path(info.held_out_prompts))
    reference = [str(g["response"]) for g in data.read_jsonl(t_manifest.path(info.held_out_generations))]
    ids = [lm.prompt_ids(tok, p["input"], bool(p["chat"])) for p in prompts]
    gens = [tok.decode(g, skip_special_tokens=True) for g in lm.generate(model, tok, ids, info.max_new_tokens, bs)]
    rouge = [lm.rouge_l(g, r) for g, r in zip(gens, reference, strict=True)]
    return {
        "perplexity": _finite(lm.perplexity(model, seqs, pad, bs), "held-out perplexity"),
        "agreement": lm.agreement(model, teacher, seqs, pad, bs),
        "rouge_l": float(np.mean(rouge)),
        "generations": gens,
    }


def _samples(t_manifest: Manifest, info: CausalLMInfo, kd: dict[str, Any], base: dict[str, Any] | None) -> list:
    prompts = data.read_jsonl(t_manifest.path(info.held_out_prompts))
    teacher = data.read_jsonl(t_manifest.path(info.held_out_generations))
    rows = []
    for i in range(min(SIDE_BY_SIDE, len(prompts))):
        row = {"prompt": prompts[i]["prompt"], "teacher": teacher[i]["response"], "student": kd["generations"][i]}
        rows.append({**row, "baseline": base["generations"][i]} if base else row)
    return rows


def run_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_manifest, w = upstream.upstream("teacher"), terms(cfg)
    info = record(t_manifest, TeacherRecord).info_as(CausalLMInfo)
    teacher, tok = lm.load(t_manifest.directory(info.model_dir))
    seqs, pad = train_seqs(cfg, t_manifest, tok), int(tok.pad_token_id)
    weighted = " + ".join(f"{getattr(w, k):g} x {k}" for k in w.TERMS if getattr(w, k))
    ctx.console.print(
        f"distilling (causal_lm) on cpu: {weighted} (T {w.temperature:g}, beta {w.beta:g}); {len(seqs)} "
        f"{w.data} sequences x {cfg.epochs:g} epochs, {sum(len(s.ids) - s.start for s in seqs)} target tokens"
        + (f"; on-policy share {w.on_policy:g} (student samples scored by the teacher)" if w.on_policy else "")
    )
    torch.manual_seed(ctx.seed)
    student, _ = lm.load(upstream.directory(MODEL_DIR))
    policy = OnPolicy(w.on_policy, tok, info.max_new_tokens, ctx.seed) if w.on_policy else None
    cache, cache_info = lmcache.teacher_topk(cfg, t_manifest, teacher, seqs, pad, _needs_teacher(w), w.on_policy,
                                             work, ctx)  # fmt: skip
    history = fit(student, teacher, seqs, pad, w, cfg, ctx, "kd", policy, cache)
    kd = evaluate(student, teacher, tok, t_manifest, info, cfg.batch_size)
    student.save_pretrained(work / MODEL_DIR, safe_serialization=True)
    tok.save_pretrained(work / MODEL_DIR)
    base, base_history = None, None
    if cfg.baseline:
        torch.manual_seed(ctx.seed)
        plain, _ = lm.load(upstream.directory(MODEL_DIR))
        base_history = fit(plain, teacher, seqs, pad, BASELINE, cfg, ctx, "baseline")
        base = evaluate(plain, teacher, tok, t_manifest, info, cfg.batch_size)
    (work / SAMPLES).write_text(json.dumps(_samples(t_manifest, info, kd, base), indent=2, ensure_ascii=False) + "\n")
    return _output(cfg, t_manifest, kd, base, history, base_history, len(seqs), ctx, cache_info)


def _output(
    cfg: DistillConfig, teacher: Manifest, kd: dict[str, Any], base: dict[str, Any] | None,
    history: list[dict[str, float]], base_history: list[dict[str, float]] | None, examples: int, ctx: RunContext,
    teacher_cache: dict[str, Any],
) -> StageOutput:  # fmt: skip
    t_ppl = teacher.metric("perplexity")
    ctx.console.print(
        f"student held-out perplexity {kd['perplexity']:.3f} (teacher {t_ppl}"
        + (f", no-KD baseline {base['perplexity']:.3f}" if base else "")
        + f"); top-1 agreement {kd['agreement']:.4f}; Rouge-L vs the teacher {kd['rouge_l']:.4f}"
    )
    metrics = {
        "perplexity": Metric(round(kd["perplexity"], 5), "held-out perplexity"),
        "teacher_perplexity": Metric(t_ppl, "held-out perplexity"),
        "top1_agreement": Metric(round(kd["agreement"], 5), "fraction of next tokens"),
        "rouge_l": Metric(round(kd["rouge_l"], 5), "Rouge-L F1 vs the teacher's greedy generations"),
        "train_seconds": Metric(round(sum(h["seconds"] for h in history), 1), "s"),
        "steps": Metric(int(history[-1]["step"]), "steps"),
        "final_loss": Metric(round(float(history[-1]["train_loss"]), 6), "loss"),
    }
    if base is not None:
        metrics["baseline_perplexity"] = Metric(round(base["perplexity"], 5), "held-out perplexity")
        metrics["baseline_top1_agreement"] = Metric(round(base["agreement"], 5), "fraction of next tokens")
        metrics["baseline_rouge_l"] = Metric(round(base["rouge_l"], 5), "Rouge-L F1 vs the teacher's generations")
    rec = DistillRecord(
        device="cpu", precision="fp32", history=history, baseline_history=base_history,
        losses=[terms(cfg).model_dump(mode="json")], schedule_kind="all", schedule_events=[],
        train_examples=examples, teacher_cache=teacher_cache,
    )  # fmt: skip
    return StageOutput(record=rec, metrics=metrics)
