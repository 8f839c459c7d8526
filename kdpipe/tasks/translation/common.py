"""What the translation stages share: the splits as the teacher wrote them, the training plan and `fit`, test BLEU."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.records import RunContext
from kdpipe.compress import surgery
from kdpipe.data import pairs as parallel
from kdpipe.errors import ModelError
from kdpipe.tasks.translation import seq2seq

if TYPE_CHECKING:
    from torch import Tensor


Pair = tuple[str, str]
SPLITS = ("train", "val", "test")
MODEL_DIR = "model"


@dataclass(frozen=True)
class Plan:
    """One train_seq2seq run: the budget (fractional epochs become a step cap) and the decoding settings."""

    epochs: float
    batch_size: int
    lr: float
    warmup_ratio: float
    label_smoothing: float
    max_length: int
    max_new_tokens: int
    description: str
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Pairs:
    train: list[Pair]
    val: list[Pair]
    test: list[Pair]


def write_pairs(pairs: list[Pair], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for src, tgt in pairs:
            f.write(json.dumps({"source": src, "target": tgt}, ensure_ascii=False) + "\n")


def read_splits(teacher: Manifest) -> Pairs:
    """The teacher stage's splits, as it wrote them."""

    def read(name: str) -> list[Pair]:
        lines = teacher.path(f"data/{name}.jsonl").read_text(encoding="utf-8").splitlines()
        return [(r["source"], r["target"]) for r in map(json.loads, lines) if r]

    return Pairs(*(read(n) for n in SPLITS))


def pick_device(preference: str) -> str:
    import torch

    return "cuda" if preference != "cpu" and torch.cuda.is_available() else "cpu"


def fit(
    model: Any,
    tok: Any,
    data: Pairs,
    plan: Plan,
    ctx: RunContext,
    teacher: Any = None,
    kd: seq2seq.Seq2SeqKD | None = None,
    regulariser: Callable[[Any], Tensor] | None = None,
) -> list[dict[str, float]]:
    """train_seq2seq on data.train (bucketed, reshuffled per epoch), validation loss and BLEU every epoch."""
    enc = parallel.encode_pairs(tok, data.train, plan.max_length)

    def batches(epoch: int) -> list[dict[str, Any]]:
        seed = ctx.seed * 1000 + epoch
        return list(parallel.pair_batches(enc, plan.batch_size, shuffle=True, seed=seed, bucket=True))

    per_epoch = len(batches(0))
    total = max(1, math.ceil(plan.epochs * per_epoch))
    val_enc = parallel.encode_pairs(tok, data.val, plan.max_length)
    val = seq2seq.ValSet(
        batches=list(parallel.pair_batches(val_enc, 64, shuffle=False)),
        sources=[s for s, _ in data.val],
        references=[t for _, t in data.val],
        tokenizer=tok,
        max_new_tokens=plan.max_new_tokens,
    )
    return seq2seq.train_seq2seq(
        model, batches, math.ceil(total / per_epoch), lr=plan.lr, warmup_steps=round(plan.warmup_ratio * total),
        teacher=teacher, kd=kd, label_smoothing=plan.label_smoothing, val=val, regulariser=regulariser,
        console=ctx.console, description=plan.description, seed=ctx.seed, max_steps=total,
        grad_clip=plan.grad_clip, weight_decay=plan.weight_decay,
    )  # fmt: skip


def test_bleu(model: Any, tok: Any, pairs: list[Pair], max_new_tokens: int, max_length: int) -> float:
    """Corpus BLEU (sacreBLEU) of greedy translations of the test split; finite by construction."""
    hyps = seq2seq.translate(model, tok, [s for s, _ in pairs], max_new_tokens, max_length=max_length)
    value = seq2seq.bleu(hyps, [t for _, t in pairs])
    if not math.isfinite(value):
        raise ModelError(f"test BLEU is {value}", "the model is broken; nothing was written")
    return round(value, 2)


def count_params(model: Any) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def depth(model: Any) -> int:
    return sum(s.size for s in surgery.stacks(model).values())
