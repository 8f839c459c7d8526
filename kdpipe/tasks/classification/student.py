"""The classification student: keep a subset of the teacher's layers, initialise from them or randomly; prune its width
and vocabulary."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import Manifest, Metric
from kdpipe.artifacts.records import (
    PriorInfo,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    VocabInfo,
    WidthInfo,
    record,
)
from kdpipe.config import StudentConfig, VocabConfig, WidthConfig
from kdpipe.data.tables import batches, encode, read_split
from kdpipe.errors import ConfigError, ModelError
from kdpipe.models.layermaps import layer_map, uniform_layers
from kdpipe.models.loading import (
    count_params,
    load_classifier,
    load_tokenizer,
    require_same_tokenizer,
    resolve_model_dir,
)

# "<prefix>.layer.<i>.<rest>" / "<prefix>.layers.<i>.<rest>": the stacked blocks of an encoder
_LAYER_KEY = re.compile(r"^(?P<prefix>.*\.(?:layer|layers))\.(?P<idx>\d+)\.(?P<rest>.+)$")


def select_layers(cfg: StudentConfig, n_teacher: int) -> list[int]:
    """Teacher layer indices (0-based) the student keeps, in order, for a model with one stack of layers."""
    spec: Any = cfg.layers
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise ConfigError(
                f"student.layers names {len(spec)} stacks ({', '.join(spec)}), but this model has one stack of layers",
                "give a list of 0-based layers, or {encoder: [...]} / {decoder: [...]}",
            )
        (spec,) = spec.values()
        if spec == "all":
            return list(range(n_teacher))
    if spec == "every-other":
        layers = list(range(0, n_teacher, 2))
    elif spec in ("last-k", "first-k"):
        if cfg.k is None:
            raise ConfigError(f"student.k is required with student.layers={spec}", "e.g. --set student.k=3")
        if cfg.k > n_teacher:
            raise ConfigError(f"student.k={cfg.k} exceeds the teacher's {n_teacher} layers", f"use k <= {n_teacher}")
        layers = list(range(n_teacher - cfg.k, n_teacher)) if spec == "last-k" else list(range(cfg.k))
    elif isinstance(spec, list):
        layers = list(spec)
        bad = [i for i in layers if not 0 <= i < n_teacher]
        if bad or not layers:
            raise ConfigError(
                f"student.layers {layers}: indices {bad} outside the teacher's layers 0..{n_teacher - 1}",
                f"list 0-based teacher layers between 0 and {n_teacher - 1}",
            )
        if len(set(layers)) != len(layers) or layers != sorted(layers):
            raise ConfigError(f"student.layers {layers}: must be increasing without repeats", "e.g. [0, 2, 4]")
    return layers


def build_student(teacher: Any, cfg: StudentConfig, kept: list[int], seed: int) -> Any:
    """A model of the teacher's class with len(kept) layers (kdpipe.compress.surgery: per stack, config updated).

    init='copy': every tensor is copied from the teacher, block i from teacher block kept[i]
    (DistilBERT's init). init='random': U[-a, a] on every weight and bias except LayerNorm, which
    keeps (1, 0) so the baseline trains at all. init='bayes' starts as 'copy'; kdpipe.methods.bayesinit then
    moves the weights to the posterior's conditional mean."""
    import torch

    torch.manual_seed(seed)
    student = _with_layers(teacher, kept)
    if cfg.init == "random":
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "norm" not in name.lower():  # LayerNorm, layer_norm, RMSNorm's input_layernorm
                    p.uniform_(-cfg.init_range, cfg.init_range)
    return student


def _with_layers(teacher: Any, kept: list[int]) -> Any:
    """The teacher with only the `kept` blocks of its one stack; architectures kdpipe.compress.surgery does not list
    (DistilBERT, ...) fall back to mapping `<prefix>.layer.<i>` state-dict keys."""
    from kdpipe.compress import surgery

    try:
        stacks = surgery.stacks(teacher)
    except ModelError:
        stacks = {}
    if len(stacks) == 1:
        (stack,) = stacks
        return surgery.remove_layers(teacher, {stack: kept})[0]
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    student = type(teacher)(config)
    t_state = teacher.state_dict()
    new_state = {}
    for key in student.state_dict():
        m = _LAYER_KEY.match(key)
        src = f"{m['prefix']}.{kept[int(m['idx'])]}.{m['rest']}" if m else key
        new_state[key] = t_state[src].clone()
    student.load_state_dict(new_state)
    return student


def run_student(cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    """A smaller model from the teacher's layers (or a pretrained one)."""
    t_dir = upstream.directory("model")
    teacher = load_classifier(t_dir)
    t_tok = load_tokenizer(t_dir)
    n_teacher = int(teacher.config.num_hidden_layers)
    student, kept, tokenizer, init = _base_student(teacher, t_tok, cfg, upstream, ctx)
    t_rec = record(upstream, TeacherRecord)
    width, ffn_keep = _prune_width(student, cfg.width, upstream, t_tok, t_rec, ctx) if cfg.width else (None, {})
    prior = None
    if init == "bayes":  # after pruning: the removed FFN neurons are conditioned on too
        student, prior = _bayes(teacher, student, kept, ffn_keep, upstream, t_rec, work, ctx)
    vocab = None
    if cfg.vocab is not None:
        tokenizer, vocab = _prune_vocab(student, t_tok, cfg.vocab, upstream, t_rec, work, ctx)
    student.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    sp, tp = count_params(student), count_params(teacher)
    shape = (
        "a BiLSTM classifier" if cfg.arch == "bilstm" else f"{len(kept)} of {n_teacher} layers (teacher layers {kept})"
    )
    ctx.console.print(
        f"student: {shape}, init={init}, {sp / 1e6:.1f}M vs {tp / 1e6:.1f}M params ({tp / sp:.2f}x smaller)"
    )
    return StageOutput(
        record=StudentRecord(
            kept_layers=kept,
            layer_map=layer_map(kept),
            init=init,
            width=width,
            vocab=vocab,
            arch=cfg.arch,
            prior=prior,
        ),
        metrics={
            "params": Metric(sp, "parameters"),
            "teacher_params": Metric(tp, "parameters"),
            "layers": Metric(len(kept), "layers"),
            "teacher_layers": Metric(n_teacher, "layers"),
            "compression": Metric(round(tp / sp, 3), "x"),
        },
    )


def _base_student(
    teacher: Any, t_tok: Any, cfg: StudentConfig, upstream: Manifest, ctx: RunContext
) -> tuple[Any, list[int], Any, str]:
    """(student, teacher layers kept, tokenizer, init) before any pruning: a given pretrained model, a BiLSTM,
    or the teacher's architecture with `student.layers`."""
    n_teacher = int(teacher.config.num_hidden_layers)
    if cfg.pretrained is not None:
        s_dir = resolve_model_dir(cfg.pretrained, field="student.pretrained")
        tokenizer = load_tokenizer(s_dir)
        require_same_tokenizer(
            t_tok,
            tokenizer,
            s_dir,
            "the losses feed the same token ids to both models: use a student with the teacher's tokenizer, "
            "or build one from the teacher (drop student.pretrained)",
        )
        student = load_classifier(s_dir, record(upstream, TeacherRecord).label_names)
        return student, uniform_layers(int(student.config.num_hidden_layers), n_teacher), tokenizer, "pretrained"
    if cfg.arch == "bilstm":
        return _bilstm(teacher, t_tok, cfg, ctx), [], t_tok, cfg.init
    kept = select_layers(cfg, n_teacher)
    return build_student(teacher, cfg, kept, ctx.seed), kept, t_tok, cfg.init


def _bilstm(teacher: Any, tokenizer: Any, cfg: StudentConfig, ctx: RunContext) -> Any:
    """Tang et al.'s BiLSTM classifier on the teacher's tokenizer and labels (kdpipe.models.bilstm)."""
    from kdpipe.models.bilstm import from_teacher

    b = cfg.bilstm
    student = from_teacher(
        teacher,
        tokenizer,
        embedding_dim=b.embedding_dim,
        hidden_size=b.hidden_size,
        num_layers=b.num_layers,
        mlp_size=b.mlp_size,
        dropout=b.dropout,
        embeddings=b.embeddings,
        seed=ctx.seed,
    )
    if cfg.init == "random":
        import torch

        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            for p in student.parameters():
                p.uniform_(-cfg.init_range, cfg.init_range)
    return student


def _bayes(
    teacher: Any,
    student: Any,
    kept: list[int],
    ffn_keep: dict[int, list[int]],
    upstream: Manifest,
    t_rec: TeacherRecord,
    work: Path,
    ctx: RunContext,
) -> tuple[Any, PriorInfo]:
    """init: bayes: the student at the conditional mean of the teacher's posterior (kdpipe.methods.bayesinit)."""
    from kdpipe.compress import surgery
    from kdpipe.methods.bayesinit import bayes_student

    if t_rec.posterior is None:
        raise ConfigError(
            "student.init: bayes needs the teacher's posterior, and the teacher stage did not write one",
            "set teacher.posterior: {kind: swag} and re-run the teacher (kdpipe teacher --force)",
        )
    (stack,) = surgery.stacks(teacher)
    student, info = bayes_student(teacher, {stack: kept}, upstream.path(t_rec.posterior.file), work, student, ffn_keep)
    ctx.console.print(
        f"init bayes: {info.params / 1e6:.2f}M params start at the {info.kind} posterior's conditional mean given "
        f"{info.zeroed / 1e6:.2f}M zeroed output-projection weights (moved {info.shift:.2e} relative to the copy)"
    )
    if info.shift > SHIFT_WARNING:
        ctx.console.print(f"[yellow]warning[/]: {shift_warning(info.shift)}")
    return student, info


SHIFT_WARNING = 0.05


def shift_warning(shift: float) -> str:
    """Why a large conditional-mean shift deserves a look (docs/methods.md §4, 'When the mean moves far')."""
    return (
        f"the conditional mean moved the kept weights by {shift:.1%} of their norm: conditioning on xi1 = 0 lies "
        "many posterior standard deviations from the teacher, where the Gaussian posterior extrapolates; compare "
        "with student.init: copy (the diagonal posterior's mean), or fit a wider posterior"
    )


def _prune_vocab(
    student: Any,
    t_tok: Any,
    cfg: VocabConfig,
    teacher: Manifest,
    t_rec: TeacherRecord,
    work: Path,
    ctx: RunContext,
) -> tuple[Any, VocabInfo]:
    """Keep the word pieces of the train split (kdpipe.compress.vocab); the tokenizer is written to work/model and the
    teacher-id -> student-id map to work/vocab_map.npy (what distillation feeds the student)."""
    import numpy as np

    from kdpipe.compress.vocab import coverage, prune

    train = read_split(teacher.path("data/train.jsonl")).texts
    test = read_split(teacher.path("data/test.jsonl")).texts
    _, tokenizer, plan = prune(student, t_tok, train, t_rec.max_length, work / "model", cfg.min_count, cfg.max_size)
    unk = plan.old_to_new[t_tok.unk_token_id]
    lut = np.full(plan.old_size, unk, dtype=np.int64)
    lut[plan.kept] = np.arange(len(plan.kept))
    np.save(work / "vocab_map.npy", lut, allow_pickle=False)
    cov = coverage(plan, t_tok, test, t_rec.max_length)
    ctx.console.print(
        f"vocabulary: {len(plan.kept)} of {plan.old_size} word pieces kept (those of the train split); "
        f"they cover {cov:.2%} of the test split's tokens"
    )
    return tokenizer, VocabInfo(kept=len(plan.kept), old_size=plan.old_size, coverage=cov, map="vocab_map.npy")


def _prune_width(
    student: Any, cfg: WidthConfig, teacher: Manifest, t_tok: Any, t_rec: TeacherRecord, ctx: RunContext
) -> tuple[WidthInfo, dict[int, list[int]]]:
    """Remove the least important heads and FFN neurons (kdpipe.compress.prune), measured on train batches."""
    from kdpipe.compress.prune import prune

    enc = encode(t_tok, read_split(teacher.path("data/train.jsonl")), t_rec.max_length)
    before, ffn_total = count_params(student), int(student.config.intermediate_size)
    _, plan, _ = prune(student, batches(enc, 32, shuffle=True, seed=ctx.seed), cfg.heads, cfg.ffn, cfg.batches)
    info = WidthInfo(
        heads_removed={int(k): list(v) for k, v in plan.heads_to_prune.items()},
        ffn_kept=int(student.config.intermediate_size),
        ffn_total=ffn_total,
        params_before=before,
        params_after=count_params(student),
    )
    removed = sum(len(v) for v in info.heads_removed.values())
    ctx.console.print(
        f"width: {removed} attention heads removed, {info.ffn_kept} of {info.ffn_total} FFN neurons kept per "
        f"layer; {before / 1e6:.1f}M -> {info.params_after / 1e6:.1f}M params"
    )
    return info, {int(k): list(v) for k, v in plan.ffn_keep.items()}
