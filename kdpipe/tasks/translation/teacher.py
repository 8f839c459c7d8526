"""The translation teacher: split the pairs, train a tokenizer and a model from scratch (or fine-tune a local
seq2seq directory), test BLEU; the posterior when teacher.posterior asks for one."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.artifacts.manifest import Metric, sha256_file
from kdpipe.artifacts.records import PosteriorInfo, RunContext, StageOutput, TeacherRecord, TranslationInfo
from kdpipe.config import PosteriorConfig, TeacherConfig
from kdpipe.data import pairs as parallel
from kdpipe.tasks.translation import seq2seq
from kdpipe.tasks.translation.checks import pairs_path, teacher_dir
from kdpipe.tasks.translation.common import (
    MODEL_DIR,
    SPLITS,
    Pair,
    Pairs,
    Plan,
    count_params,
    depth,
    fit,
    pick_device,
    test_bleu,
    write_pairs,
)

if TYPE_CHECKING:
    from torch import Tensor


def _new_teacher(cfg: TeacherConfig, train: list[Pair], seed: int) -> tuple[Any, Any]:
    """(model, tokenizer): a from-scratch small_config model on a tokenizer trained on the train pairs, or the
    given directory's model and tokenizer."""
    import torch
    from transformers import MBartForConditionalGeneration

    t = cfg.translation
    assert t is not None
    if not t.from_scratch:
        return seq2seq.load_seq2seq(teacher_dir(cfg))
    tok = parallel.train_tokenizer([s for pair in train for s in pair], t.vocab_size)
    config = seq2seq.small_config(
        len(tok), d_model=t.d_model, encoder_layers=t.layers, decoder_layers=t.layers, ffn_dim=4 * t.d_model,
        heads=t.heads, max_position=max(128, t.max_length, t.max_new_tokens) + 2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MBartForConditionalGeneration(config), tok


def run_teacher(cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
    t = cfg.translation
    assert t is not None  # the config's validator requires it
    path = pairs_path(t)
    pairs = parallel.read_pairs(path, t.source_column, t.target_column)  # a bad file fails before torch loads
    data = Pairs(*parallel.split_pairs(pairs, t.test_size, t.val_size, seed=ctx.seed))
    (work / "data").mkdir()
    for name in SPLITS:
        write_pairs(getattr(data, name), work / "data" / f"{name}.jsonl")
    model, tok = _new_teacher(cfg, data.train, ctx.seed)
    model.to(pick_device("auto"))
    how = "from scratch" if t.from_scratch else f"fine-tuned from {cfg.model}"
    ctx.console.print(
        f"translation teacher {how}: {count_params(model) / 1e6:.2f}M params, {len(tok)} tokens, on {len(data.train)} "
        f"train / {len(data.val)} val / {len(data.test)} test pairs of {path.name}"
    )
    plan = Plan(cfg.epochs, cfg.batch_size, cfg.lr, t.warmup_ratio, t.label_smoothing, t.max_length,
                t.max_new_tokens, "teacher (translation)")  # fmt: skip
    start = time.perf_counter()
    history = fit(model, tok, data, plan, ctx)
    seconds = time.perf_counter() - start
    seq2seq.save_seq2seq(model, tok, work / MODEL_DIR)
    bleu = test_bleu(model, tok, data.test, t.max_new_tokens, t.max_length)
    ctx.console.print(f"teacher test BLEU {bleu:.2f} (greedy, {len(data.test)} pairs)")
    metrics = {
        "test_bleu": Metric(bleu, "BLEU"),
        "val_bleu": Metric(round(float(history[-1].get("val_bleu", float("nan"))), 2), "BLEU"),
        "params": Metric(count_params(model), "parameters"),
        "layers": Metric(depth(model), "layers"),
        "train_seconds": Metric(round(seconds, 1), "s"),
        "train_final_loss": Metric(round(float(history[-1]["train_loss"]), 4), "nats"),
    }
    posterior = None
    if cfg.posterior is not None:
        posterior = write_posterior(model, tok, cfg.posterior, data.train, plan, ctx, work)
        metrics["posterior_seconds"] = Metric(posterior.seconds, "s")
    return StageOutput(record=_teacher_record(cfg, path, data, posterior), metrics=metrics)


def _teacher_record(cfg: TeacherConfig, path: Path, data: Pairs, posterior: PosteriorInfo | None) -> TeacherRecord:
    t = cfg.translation
    assert t is not None
    return TeacherRecord(
        label_names=[],
        max_length=t.max_length,
        split_sizes={n: len(getattr(data, n)) for n in SPLITS},
        data_source="embedded: Debian ru-en message pairs (kdpipe/_data/ru_en)" if t.source == "default" else t.source,
        data_sha256=sha256_file(path),
        model_source="from scratch (kdpipe.tasks.translation.seq2seq.small_config)" if t.from_scratch else cfg.model,
        finetuned=True,
        trained_params="all",
        posterior=posterior,
        info=TranslationInfo(
            source_column=t.source_column,
            target_column=t.target_column,
            max_new_tokens=t.max_new_tokens,
            label_smoothing=t.label_smoothing,
            from_scratch=t.from_scratch,
        ),
    )


def write_posterior(
    model: Any, tok: Any, cfg: PosteriorConfig, train: list[Pair], plan: Plan, ctx: RunContext, work: Path
) -> PosteriorInfo:
    """N(m, S) of the trained teacher on its train pairs (kdpipe.methods.bayes, loss: the token-level CE), saved as
    posterior.safetensors like the classification teacher's."""
    from kdpipe.methods import bayes
    from kdpipe.methods.bayesinit import POSTERIOR_FILE, scope_names

    start = time.perf_counter()
    enc = parallel.encode_pairs(tok, train, plan.max_length)
    device = next(model.parameters()).device

    def stream() -> Iterator[dict[str, Any]]:
        for epoch in range(10**9):
            for b in parallel.pair_batches(enc, 32, shuffle=True, seed=ctx.seed + 7919 + epoch, bucket=True):
                yield {k: v.to(device) for k, v in b.items()}

    def loss(m: Any, b: Mapping[str, Any]) -> Tensor:
        return seq2seq.seq2seq_loss(m, dict(b))[0]

    names = scope_names(model, cfg.scope)
    covered = sum(dict(model.named_parameters())[n].numel() for n in names)
    ctx.console.print(f"posterior: {cfg.kind} over {covered / 1e6:.2f}M params")
    if cfg.kind == "diagonal":
        post = bayes.laplace_diagonal(model, stream(), loss, len(train), prior_precision=cfg.prior_precision,
                                      max_examples=cfg.max_examples, names=names)  # fmt: skip
    else:
        post = bayes.swag(model, stream(), loss, len(train), lr=cfg.lr, steps=cfg.steps, rank=cfg.rank,
                          collect_every=cfg.collect_every, names=names,
                          prior_precision=cfg.prior_precision)  # fmt: skip
    post.save(work / POSTERIOR_FILE, half_factor=cfg.factor_dtype == "float16")
    return PosteriorInfo(file=POSTERIOR_FILE, kind=cfg.kind, rank=post.rank, params=post.numel, n_data=post.n_data,
                         seconds=round(time.perf_counter() - start, 1))  # fmt: skip
