"""Translation (seq2seq) through the stages, for `teacher.task: translation`.

The stages reach it through kdpipe.tasks.registry (TranslationTask, below); everything translation-specific lives in
this module, built from the library: kdpipe.data.pairs (pairs, splits, tokenizer, batches), kdpipe.tasks.seq2seq (the
small pre-LN mBART config, the KD training loop, greedy translation, BLEU, ONNX export and parity),
kdpipe.compress.surgery (per-stack layer removal), kdpipe.methods.bayesinit / kdpipe.methods.bayes (posterior, bayes
init, the prior term).

- teacher: read the pairs, split them (seeded), train a tokenizer and a model from scratch (or fine-tune a local
  seq2seq directory), validation BLEU per epoch, test BLEU (greedy); the splits go to data/{train,val,test}.jsonl
  ({"source", "target"} per line) so that every later stage reads the same pairs.
- student: keep blocks per stack ({encoder: all, decoder: [0, 2]}), init copy / random / bayes.
- distill: the recipe's terms mapped onto Seq2SeqKD (hinton, reverse_kl), plain CE (ce) and the prior term.
- export: encoder + decoder (+ with past) ONNX of the student (and teacher), gated by seq2seq_parity; fp32 only.
- profile: greedy-generation latency of the ONNX models (and PyTorch eager) on real test sentences.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.artifacts.manifest import FileRecord, Manifest, Metric, input_records, sha256_file
from kdpipe.artifacts.records import (
    DistillRecord,
    ExportedModel,
    ExportRecord,
    ModelSource,
    Parity,
    PosteriorInfo,
    PriorInfo,
    ProfileRecord,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    TranslationInfo,
    record,
)
from kdpipe.compress import surgery
from kdpipe.config import (
    DistillConfig,
    ExportConfig,
    PosteriorConfig,
    Recipe,
    StudentConfig,
    TargetProfile,
    TeacherConfig,
    TranslationConfig,
)
from kdpipe.data import pairs as parallel
from kdpipe.data.tables import check_file
from kdpipe.errors import ConfigError, DataError, ExportToleranceError, ModelError
from kdpipe.tasks import seq2seq

if TYPE_CHECKING:
    from torch import Tensor

Pair = tuple[str, str]
SPLITS = ("train", "val", "test")
MODEL_DIR = "model"
KD_TERMS = ("hinton", "reverse_kl", "ce", "prior")
PROFILE_SENTENCES = 8


# --------------------------------------------------------------------------- recipe checks (no model loaded)
@dataclass(frozen=True)
class KDPlan:
    """The distill terms as train_seq2seq takes them: Seq2SeqKD (None: plain CE, no teacher) and a prior weight."""

    kd: seq2seq.Seq2SeqKD | None
    prior_weight: float


def kd_plan(cfg: DistillConfig) -> KDPlan:
    """hinton -> Seq2SeqKD(hinton, its alpha and temperature); reverse_kl -> Seq2SeqKD(reverse_kl), alpha its share
    of the weights next to a `ce` term (1 without one); ce alone -> plain CE; prior -> the PriorPenalty weight."""
    by_name = {t.name: t for t in cfg.losses}
    for term in cfg.losses:
        if term.name not in KD_TERMS:
            raise ConfigError(
                f"distill.losses: {term.name} is not available for translation; use hinton, reverse_kl, ce, prior",
                "translation distils token-level logits only (kdpipe.tasks.seq2seq.Seq2SeqKD)",
            )
    if len(by_name) != len(cfg.losses):
        raise ConfigError("distill.losses: a term is listed twice", "give each term once")
    if "hinton" in by_name and ("reverse_kl" in by_name or "ce" in by_name):
        raise ConfigError(
            "distill.losses: hinton already holds its CE share (1 - alpha); it does not combine with "
            f"{' or '.join(n for n in ('reverse_kl', 'ce') if n in by_name)} for translation",
            "use hinton alone (with alpha), or reverse_kl with ce",
        )
    prior = by_name.get("prior")
    weight = float(prior.weight) if prior is not None else 0.0
    hinton, rkl = by_name.get("hinton"), by_name.get("reverse_kl")
    if hinton is not None:
        kd = seq2seq.Seq2SeqKD("hinton", alpha=_field(hinton, "alpha"), temperature=_field(hinton, "temperature"))
        return KDPlan(kd, weight)
    if rkl is not None:
        ce_w = float(by_name["ce"].weight) if "ce" in by_name else 0.0
        alpha = float(rkl.weight) / (float(rkl.weight) + ce_w) if rkl.weight + ce_w > 0 else 0.0
        kd = seq2seq.Seq2SeqKD("reverse_kl", alpha=alpha, temperature=_field(rkl, "temperature"))
        return KDPlan(kd, weight)
    return KDPlan(None, weight)


def _field(term: Any, name: str) -> float:
    return float(getattr(term, name))


def check_student(cfg: StudentConfig) -> None:
    """What a translation student supports: the teacher's architecture, layers per stack, init copy/random/bayes."""
    clash = [f for f in ("pretrained", "width", "vocab") if getattr(cfg, f) is not None]
    if cfg.arch != "teacher":
        clash.append(f"arch: {cfg.arch}")
    if clash:
        raise ConfigError(
            f"student: {', '.join(clash)} is not available for translation", "drop it (translation keeps layers only)"
        )
    if isinstance(cfg.layers, str):
        raise ConfigError(
            f"student.layers: '{cfg.layers}' is not available for translation; name the layers per stack",
            "e.g. student.layers: {encoder: all, decoder: [0, 2]}",
        )


def check_recipe(recipe: Recipe) -> None:
    """`kdpipe validate` / `kdpipe run` for task: translation, before anything trains."""
    t, s, d = recipe.teacher, recipe.student, recipe.distill
    assert t.translation is not None  # the config's validator requires it
    if recipe.assistant is not None:
        raise ConfigError("assistant: a teaching assistant is not available for translation", "drop assistant")
    check_student(s)
    plan = kd_plan(d)
    refused = [f for f in ("transfer", "augment", "data_free") if getattr(d, f) is not None]
    refused += ["extra_teachers"] if d.extra_teachers else []
    refused += [f"schedule.kind: {d.schedule.kind}"] if d.schedule.kind != "all" else []
    if refused:
        raise ConfigError(f"distill: {', '.join(refused)} is not available for translation", "drop it")
    if d.baseline and plan.kd is None:
        raise ConfigError(
            "distill.baseline: the recipe's loss is already plain CE", "set distill.baseline: false, or add hinton"
        )
    if plan.prior_weight and s.init != "bayes":
        raise ConfigError(
            f"distill.losses: the 'prior' term needs student.init: bayes (it is {s.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    if s.init == "bayes" and t.posterior is None:
        raise ConfigError(
            "student.init: bayes starts from the teacher's posterior, but teacher.posterior is not set",
            "add teacher.posterior: {kind: swag} (or kind: diagonal) to the recipe",
        )
    pairs_path(t.translation)
    if not t.translation.from_scratch:
        _model_dir(t)


def pairs_path(t: TranslationConfig) -> Path:
    """The pair file: the shipped ru->en pairs for 'default'."""
    if t.source == "default":
        return parallel.default_pairs_path()
    if not t.source.strip():  # Path("") is ".", which would be reported as a missing file named "."
        raise DataError(
            "teacher.translation.source is empty; give a pair file path or 'default'",
            "give a .tsv, .csv or .jsonl (optionally .gz)",
        )
    path = Path(t.source)
    # data.check_file: a directory, a symlink loop or an unreadable file each said as such, not "no such file"
    check_file(path, "pair file (teacher.translation.source)", "give a .tsv, .csv or .jsonl (optionally .gz)")
    return path


def _model_dir(cfg: TeacherConfig) -> Path:
    path = Path(cfg.model)
    if cfg.model == "default" or not (path / "config.json").is_file():
        raise ConfigError(
            f"teacher.model: {cfg.model}: translation.from_scratch is false, so it must be a local seq2seq HF "
            "directory (config.json, weights, tokenizer)",
            "give such a directory, or set teacher.translation.from_scratch: true",
        )
    return path


def teacher_inputs(cfg: TeacherConfig) -> list[FileRecord]:
    """The pair file and, when fine-tuning, the model directory: a change to either re-runs the teacher."""
    assert cfg.translation is not None
    path = pairs_path(cfg.translation)
    records = [FileRecord.of(path, f"data/{path.name}")]
    if not cfg.translation.from_scratch:
        records += input_records(_model_dir(cfg), "model")
    return records


# --------------------------------------------------------------------------- shared training pieces
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


def _device(preference: str) -> str:
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


def _params(model: Any) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def _depth(model: Any) -> int:
    return sum(s.size for s in surgery.stacks(model).values())


# --------------------------------------------------------------------------- teacher
def _new_teacher(cfg: TeacherConfig, train: list[Pair], seed: int) -> tuple[Any, Any]:
    """(model, tokenizer): a from-scratch small_config model on a tokenizer trained on the train pairs, or the
    given directory's model and tokenizer."""
    import torch
    from transformers import MBartForConditionalGeneration

    t = cfg.translation
    assert t is not None
    if not t.from_scratch:
        return seq2seq.load_seq2seq(_model_dir(cfg))
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
    model.to(_device("auto"))
    how = "from scratch" if t.from_scratch else f"fine-tuned from {cfg.model}"
    ctx.console.print(
        f"translation teacher {how}: {_params(model) / 1e6:.2f}M params, {len(tok)} tokens, on {len(data.train)} "
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
        "params": Metric(_params(model), "parameters"),
        "layers": Metric(_depth(model), "layers"),
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
        model_source="from scratch (kdpipe.tasks.seq2seq.small_config)" if t.from_scratch else cfg.model,
        finetuned=True,
        trained_params="all",
        posterior=posterior,
        task="translation",
        translation=TranslationInfo(
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


# --------------------------------------------------------------------------- student
def run_student(cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    check_student(cfg)
    t_rec = record(upstream, TeacherRecord)
    teacher, tok = seq2seq.load_seq2seq(upstream.directory(MODEL_DIR))
    keep = surgery.parse_keep(cfg.layers, surgery.stacks(teacher))
    prior: PriorInfo | None = None
    if cfg.init == "bayes":
        from kdpipe.methods.bayesinit import bayes_student

        if t_rec.posterior is None:
            raise ConfigError(
                "student.init: bayes needs the teacher's posterior, and the teacher stage did not write one",
                "set teacher.posterior: {kind: swag} and re-run the teacher (kdpipe teacher --force)",
            )
        student, prior = bayes_student(teacher, keep, upstream.path(t_rec.posterior.file), work)
        ctx.console.print(
            f"init bayes: {prior.params / 1e6:.2f}M params at the {prior.kind} posterior's conditional mean given "
            f"{prior.zeroed / 1e6:.2f}M zeroed output-projection weights (moved {prior.shift:.2e} relative to the copy)"
        )
    else:
        torch.manual_seed(ctx.seed)
        student, _ = surgery.remove_layers(teacher, keep)
        if (
            cfg.init == "random"
        ):  # U[-a, a] on every weight, norms kept at (1, 0) (kdpipe.tasks.classification.student's baseline)
            with torch.no_grad():
                for name, p in student.named_parameters():
                    if "norm" not in name.lower():
                        p.uniform_(-cfg.init_range, cfg.init_range)
    seq2seq.save_seq2seq(student, tok, work / MODEL_DIR)
    sp, tp = _params(student), _params(teacher)
    shape = ", ".join(f"{s} {v}" for s, v in keep.items())
    ctx.console.print(f"student: teacher blocks {shape}, init={cfg.init}, {sp / 1e6:.2f}M vs {tp / 1e6:.2f}M params")
    rec = StudentRecord(kept_layers=keep.get("decoder", []), layer_map={}, init=cfg.init, stacks=keep, prior=prior)
    return StageOutput(
        record=rec,
        metrics={
            "params": Metric(sp, "parameters"),
            "teacher_params": Metric(tp, "parameters"),
            "layers": Metric(_depth(student), "layers"),
            "teacher_layers": Metric(_depth(teacher), "layers"),
            "compression": Metric(round(tp / sp, 3), "x"),
        },
    )


# --------------------------------------------------------------------------- distill
def _distil(
    s_dir: Path, teacher: Any, plan: Plan, data: Pairs, kd: KDPlan, prior: Path | None, device: str, ctx: RunContext
) -> tuple[Any, Any, list[dict[str, float]]]:
    """A fresh copy of the student trained with `kd` (teacher None: plain CE) and the prior term."""
    from kdpipe.methods.bayesinit import PriorPenalty

    student, tok = seq2seq.load_seq2seq(s_dir)
    student.to(device)
    regulariser = None
    if kd.prior_weight and prior is not None:
        penalty, weight = PriorPenalty(prior, student), kd.prior_weight
        regulariser = lambda _m: weight * penalty()  # noqa: E731
    history = fit(student, tok, data, plan, ctx, teacher=teacher if kd.kd else None, kd=kd.kd, regulariser=regulariser)
    return student, tok, history


def run_distill(cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    import torch

    plan_kd = kd_plan(cfg)
    t_manifest = upstream.upstream("teacher")
    t_rec, s_rec = record(t_manifest, TeacherRecord), record(upstream, StudentRecord)
    info = t_rec.translation
    assert info is not None
    if plan_kd.prior_weight and s_rec.prior is None:
        raise ConfigError(
            f"distill.losses: the 'prior' term needs a student built with student.init: bayes (this one: {s_rec.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    data = read_splits(t_manifest)
    if cfg.train_limit:
        data = replace(data, train=data.train[: cfg.train_limit])
    teacher, _ = seq2seq.load_seq2seq(t_manifest.directory(MODEL_DIR))
    s_dir = upstream.directory(MODEL_DIR)
    prior = upstream.path(s_rec.prior.file) if s_rec.prior is not None else None
    terms = ", ".join(f"{c.weight:g} x {c.name}" for c in cfg.losses)
    kd = plan_kd.kd
    how = f"{kd.method} (alpha {kd.alpha:g}, T {kd.temperature:g})" if kd else "plain CE"
    how += f" + {plan_kd.prior_weight:g} x prior" if plan_kd.prior_weight else ""
    ctx.console.print(f"distilling (translation) on {device}: {terms} -> {how}; "
                      f"{len(data.train)} pairs x {cfg.epochs:g} epochs")  # fmt: skip
    plan = Plan(cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_ratio, info.label_smoothing, t_rec.max_length,
                info.max_new_tokens, "distill (KD)", cfg.weight_decay, cfg.grad_clip)  # fmt: skip
    student, tok, history = _distil(s_dir, teacher, plan, data, plan_kd, prior, device, ctx)
    seq2seq.save_seq2seq(student, tok, work / MODEL_DIR)
    bleu = test_bleu(student, tok, data.test, info.max_new_tokens, t_rec.max_length)
    t_bleu = float(t_manifest.metric("test_bleu"))
    ctx.console.print(f"KD student test BLEU {bleu:.2f} (teacher {t_bleu:.2f})")
    metrics = {
        "test_bleu": Metric(bleu, "BLEU"),
        "teacher_test_bleu": Metric(t_bleu, "BLEU"),
        "retention": Metric(round(100 * bleu / t_bleu, 2) if t_bleu else None, "% of teacher BLEU"),
        "train_seconds": Metric(round(sum(h["seconds"] for h in history), 1), "s"),
        "steps": Metric(int(history[-1]["step"]), "steps"),
        "final_loss": Metric(round(float(history[-1]["train_loss"]), 4), "loss"),
    }
    baseline = None
    if cfg.baseline:
        base_plan = replace(plan, description="baseline (plain CE)")
        b_model, _, baseline = _distil(s_dir, None, base_plan, data, KDPlan(None, 0.0), None, device, ctx)
        b_bleu = test_bleu(b_model, tok, data.test, info.max_new_tokens, t_rec.max_length)
        ctx.console.print(f"no-KD student test BLEU {b_bleu:.2f}")
        metrics["baseline_test_bleu"] = Metric(b_bleu, "BLEU")
    rec = DistillRecord(
        device=device, precision="fp32", history=history, baseline_history=baseline,
        losses=[c.model_dump() for c in cfg.losses], schedule_kind="all", schedule_events=[],
        train_examples=len(data.train),
    )  # fmt: skip
    return StageOutput(record=rec, metrics=metrics)


# --------------------------------------------------------------------------- export
def run_export(cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).translation
    assert info is not None
    sentences = [s for s, _ in read_splits(t_manifest).test[: cfg.parity_samples]]
    sources = {"student": (upstream, ModelSource(stage="distill", dir=MODEL_DIR))}
    if cfg.teacher:
        sources["teacher"] = (t_manifest, ModelSource(stage="teacher", dir=MODEL_DIR))
    models: dict[str, ExportedModel] = {}
    metrics: dict[str, Metric] = {}
    failures = []
    for name, (manifest, source) in sources.items():
        src = manifest.directory(source.dir)
        spec = seq2seq.export_seq2seq_onnx(src, work / name, cfg.opset)
        check = seq2seq.seq2seq_parity(src, work / name, sentences, info.max_new_tokens, cfg.atol)
        size = sum((work / name / f).stat().st_size for f in spec["files"])
        ctx.console.print(
            f"{name}: ONNX {', '.join(spec['files'])} ({size / 2**20:.1f} MiB), parity on {check.examples} real test "
            f"sentences: first-step max |diff| {check.max_abs_diff:.2e} (atol {cfg.atol:g}), identical greedy "
            f"generations {check.same_generations}/{check.examples}"
        )
        parity = Parity(
            max_abs_diff=check.max_abs_diff, atol=cfg.atol, class_agreement=check.same_generations / check.examples,
            examples=check.examples, shapes=[], nonfinite_outputs=0 if math.isfinite(check.max_abs_diff) else 1,
            refused=None, ok=check.ok,
        )  # fmt: skip
        spec["parity"] = {"same_generations": check.same_generations, "why": check.why, "agreement": "generations"}
        models[name] = ExportedModel(onnx=f"{name}/encoder_model.onnx", spec=spec, parity=parity, source=source)
        metrics[f"{name}_max_abs_diff"] = Metric(check.max_abs_diff, "logit units")
        metrics[f"{name}_same_generations"] = Metric(round(check.same_generations / check.examples, 5), "fraction")
        metrics[f"{name}_onnx_bytes"] = Metric(size, "bytes")
        if not check.ok:
            failures.append(f"{name}: {check.why}")
    if failures:
        raise ExportToleranceError(
            "ONNX parity check failed: " + "; ".join(failures),
            "nothing was written; raise export.atol only if the difference is expected, otherwise report the model",
        )
    if cfg.variants:
        ctx.console.print(f"translation: only the fp32 export is written; export.variants {cfg.variants} skipped")
    return StageOutput(record=ExportRecord(models=models), metrics=metrics)


# --------------------------------------------------------------------------- profile
def _session_options(prof: TargetProfile) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = prof.intra_op_threads
    so.inter_op_num_threads = prof.inter_op_threads
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so.graph_optimization_level = levels[prof.graph_optimization_level]
    return so


def time_generation(
    model: Any, tok: Any, sentences: list[str], max_new_tokens: int, prof: TargetProfile
) -> dict[str, float]:
    """Greedy generation of one sentence per run (cycling through `sentences`): `warmup` untimed runs, then
    runs until both `min_runs` and `min_seconds`; p50 / p90 / mean ms and the mean output length (tokens)."""
    import numpy as np
    import torch

    enc = [tok([s], return_tensors="pt") for s in sentences]
    gen = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}

    def once(i: int) -> int:
        with torch.inference_mode():
            out = model.generate(**enc[i % len(enc)], **gen)
        return int(out.shape[-1])

    for i in range(prof.warmup):
        once(i)
    times: list[float] = []
    tokens: list[int] = []
    start, i = time.perf_counter(), 0
    while len(times) < prof.min_runs or time.perf_counter() - start < prof.min_seconds:
        t0 = time.perf_counter()
        tokens.append(once(i))
        times.append(time.perf_counter() - t0)
        i += 1
    ms = np.asarray(times) * 1e3
    return {
        "runs": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "mean_tokens": float(np.mean(tokens)),
    }


def run_profile(
    prof: TargetProfile, upstream: Manifest, work: Path, ctx: RunContext, providers: list[str]
) -> StageOutput:
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    export = record(upstream, ExportRecord)
    t_manifest = upstream.upstream("teacher")
    info = record(t_manifest, TeacherRecord).translation
    assert info is not None
    sentences = [s for s, _ in read_splits(t_manifest).test[:PROFILE_SENTENCES]]
    torch.set_num_threads(prof.intra_op_threads)
    results: dict[str, Any] = {"profile": prof.name, "providers": providers, "sentences": len(sentences),
                               "max_new_tokens": info.max_new_tokens, "onnxruntime": {}, "torch_eager": {}}  # fmt: skip
    ctx.console.print(f"profiling greedy generation of {len(sentences)} real test sentences on {prof.name} ...")
    for name, m in export.models.items():
        src = upstream.upstream(m.source.stage).directory(m.source.dir)
        model, tok = seq2seq.load_seq2seq(src)
        onnx_dir = upstream.directory(Path(m.onnx).parent.as_posix())  # every file in it listed and verified
        onnx = ORTModelForSeq2SeqLM.from_pretrained(
            str(onnx_dir), use_cache=True, use_merged=False, providers=providers,
            session_options=_session_options(prof),
        )  # fmt: skip
        results["onnxruntime"][name] = time_generation(onnx, tok, sentences, info.max_new_tokens, prof)
        if prof.torch_eager:
            results["torch_eager"][name] = time_generation(model, tok, sentences, info.max_new_tokens, prof)
    (work / "latency.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (work / "report.md").write_text("\n".join(report_lines(upstream, results)) + "\n")
    metrics = {}
    for engine, key in (("onnxruntime", ""), ("torch_eager", "torch_")):
        for name, stats in results[engine].items():
            metrics[f"{name}_{key}p50_ms_generate"] = Metric(round(stats["p50_ms"], 3), "ms")
    ort_res = results["onnxruntime"]
    if "teacher" in ort_res:
        speedup = ort_res["teacher"]["p50_ms"] / ort_res["student"]["p50_ms"]
        metrics["speedup_generate"] = Metric(round(speedup, 3), "x (teacher p50 / student p50)")
    ctx.console.print(" ".join(f"{n}: {s['p50_ms']:.1f} ms p50" for n, s in ort_res.items()))
    return StageOutput(record=ProfileRecord(report="report.md", profile=prof.name), metrics=metrics)


def report_lines(export: Manifest, results: dict[str, Any]) -> list[str]:
    """The Markdown report of a translation run: BLEU, size, parity, generation latency."""
    distill, teacher = export.upstream("distill"), export.upstream("teacher")
    student = export.upstream("student")
    rec = record(export, ExportRecord)
    lines = [
        "# kdpipe translation report",
        "",
        "| model | layers | params | test BLEU |",
        "|---|---|---|---|",
        f"| teacher | {teacher.metric('layers')} | {teacher.metric('params')} | {teacher.metric('test_bleu')} |",
        f"| student, KD | {student.metric('layers')} | {student.metric('params')} | {distill.metric('test_bleu')} |",
    ]
    if distill.metric("baseline_test_bleu") is not None:
        lines.append(f"| student, plain CE | {student.metric('layers')} | {student.metric('params')} | "
                     f"{distill.metric('baseline_test_bleu')} |")  # fmt: skip
    retention = distill.metric("retention")
    kept = "n/a (the teacher's BLEU is 0)" if retention is None else f"{retention}% of the teacher's BLEU"
    lines += ["", f"Retention: {kept} (greedy decoding, sacreBLEU on the test split).", ""]
    for name, m in rec.models.items():
        lines.append(
            f"- ONNX {name} (fp32 only; encoder + decoder + decoder with past): first-step max |diff| "
            f"{m.parity.max_abs_diff:.2e}, identical greedy generations {m.parity.class_agreement:.0%} of "
            f"{m.parity.examples} test sentences, ok: {m.parity.ok}"
        )
    lines += ["", f"Greedy generation, one sentence per run ({results['sentences']} real test sentences, "
              f"at most {results['max_new_tokens']} new tokens), profile {results['profile']}:", "",
              "| model | engine | p50 ms | p90 ms | mean output tokens |", "|---|---|---|---|---|"]  # fmt: skip
    for engine in ("onnxruntime", "torch_eager"):
        for name, s in results[engine].items():
            lines.append(f"| {name} | {engine} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['mean_tokens']:.1f} |")
    return lines


# --------------------------------------------------------------------------- the task
class TranslationTask:
    """Seq2seq translation (kdpipe.tasks.registry.TASKS["translation"]): the stage hooks of kdpipe.tasks.base.Task."""

    name = "translation"

    def check_recipe(self, recipe: Recipe) -> None:
        check_recipe(recipe)

    def teacher_inputs(self, cfg: TeacherConfig) -> list[FileRecord]:
        return teacher_inputs(cfg)

    def run_teacher(self, cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
        return run_teacher(cfg, work, ctx)

    def run_student(self, cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return run_student(cfg, upstream, work, ctx)

    def run_distill(self, cfg: DistillConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return run_distill(cfg, upstream, work, ctx)

    def run_export(self, cfg: ExportConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
        return run_export(cfg, upstream, work, ctx)

    def run_profile(
        self,
        prof: TargetProfile,
        upstream: Manifest,
        work: Path,
        ctx: RunContext,
        providers: list[str],
        missing: list[str],
    ) -> StageOutput:
        return run_profile(prof, upstream, work, ctx, providers)  # timed on what is there; it has no fallback note


TRANSLATION = TranslationTask()
