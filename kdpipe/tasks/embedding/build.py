"""The embedding task's teacher and student stages.

- teacher: resolve the sentence encoder (kdpipe.tasks.embedding.teachers; no fine-tuning), write it into the stage as
  a sentence-transformers folder with the pooling it was used with (so an override travels with it), split the
  sentences (held out / transfer, seeded) and score it on the Lee similarity set (Spearman, Pearson).
- student: the teacher's backbone with a subset of its layers (kdpipe.compress.surgery), its pooling and
  normalisation; or a local sentence-transformers folder (student.pretrained) with a linear projection to the
  teacher's width when the widths differ; or a BiLSTM on the teacher's tokenizer (student.arch: bilstm,
  kdpipe.tasks.embedding.bilstm). student.width then prunes attention heads and FFN neurons of a transformer
  student (kdpipe.compress.prune), by the gradient of MSE(student embedding, teacher embedding) on a few batches of
  the transfer sentences. Saved as a sentence-transformers folder.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import FileRecord, Manifest, Metric, input_records
from kdpipe.artifacts.records import (
    EmbeddingInfo,
    LeakageCount,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    WidthInfo,
    record,
)
from kdpipe.config import EmbeddingConfig, StudentConfig, TeacherConfig, WidthConfig
from kdpipe.data.texts import data_digest
from kdpipe.errors import ConfigError
from kdpipe.tasks.embedding import data
from kdpipe.tasks.embedding.teachers import Teacher, resolve_teacher

MODEL_DIR = "model"


def cache_dir() -> Path:
    """Where packaged teachers (all-mpnet-base-v2) are unzipped once: $KDPIPE_CACHE or ~/.cache/kdpipe."""
    return Path(os.environ.get("KDPIPE_CACHE") or Path.home() / ".cache" / "kdpipe") / "teachers"


def section(cfg: TeacherConfig) -> EmbeddingConfig:
    if cfg.embedding is None:  # the config's validator requires it for task: embedding
        raise ConfigError("teacher.embedding is not set", "add teacher.embedding: {} (task: embedding)")
    return cfg.embedding


def teacher_of(cfg: TeacherConfig) -> Teacher:
    """The resolved teacher (torch-free: a folder and its pooling config; ModelError naming the fix otherwise)."""
    e = section(cfg)
    return resolve_teacher(cfg.model, cache_dir(), pooling=e.pooling, normalize=e.normalize)


def teacher_inputs(cfg: TeacherConfig) -> list[FileRecord]:
    """The teacher folder's files and the sentence files (the corpus, the given splits), by content."""
    files = [FileRecord.of(path, name) for name, path in data.data_files(cfg)]
    return [*input_records(teacher_of(cfg).path, "model"), *files]


def _params(model: Any) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def load(folder: Path, max_length: int | None = None) -> tuple[Any, Any]:
    """(SentenceEncoder, tokenizer) of a sentence-transformers folder, truncating at `max_length` when given."""
    from kdpipe.tasks.embedding.encoder import load_encoder

    encoder, tok = load_encoder(folder)
    if max_length is not None:
        encoder.max_seq_length = max_length
        tok.model_max_length = max_length
    return encoder, tok


def run_teacher(cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.tasks.embedding.encoder import embedder, load_encoder, save_sentence_transformers
    from kdpipe.tasks.embedding.quality import lee_score

    e, teacher = section(cfg), teacher_of(cfg)
    parts = data.read_corpus(cfg)
    sentences = data.split(parts, e, ctx.seed)
    data.write_sentences(sentences.held_out, work / data.HELD_OUT)
    data.write_sentences(sentences.transfer, work / data.TRANSFER)
    encoder, tok = load_encoder(teacher.path, pooling=e.pooling, normalize=e.normalize)
    if e.max_length is not None:
        encoder.max_seq_length = e.max_length
    ctx.console.print(
        f"embedding teacher {teacher.name} ({teacher.note}): {encoder.pooling} pooling, normalize {encoder.normalize}, "
        f"{encoder.dim}-d, {_params(encoder) / 1e6:.1f}M params; {len(sentences.held_out)} held-out / "
        f"{len(sentences.transfer)} transfer sentences"
    )
    leaks = _print_splits(sentences, cfg, ctx)
    start = time.perf_counter()
    lee = lee_score(embedder(encoder, tok), name="teacher")
    ctx.console.print(
        f"teacher Lee similarity: Spearman {lee.spearman:.4f}, Pearson {lee.pearson:.4f} ({lee.pairs} pairs)"
    )
    save_sentence_transformers(encoder, tok, work / MODEL_DIR)
    info = EmbeddingInfo(
        pooling=encoder.pooling, normalize=encoder.normalize, pooling_source=teacher.config.source, dim=encoder.dim,
        hidden_size=encoder.hidden_size, layers=int(encoder.backbone.config.num_hidden_layers), teacher=teacher.name,
        teacher_kind=teacher.kind, sha256=teacher.sha256, model_dir=MODEL_DIR, held_out=data.HELD_OUT,
        transfer=data.TRANSFER,
    )  # fmt: skip
    rec = TeacherRecord(
        label_names=[], max_length=int(encoder.max_seq_length or 512),
        split_sizes={"held_out": len(sentences.held_out), "transfer": len(sentences.transfer)},
        data_source=data.describe(parts), data_sha256=data_digest(data.data_files(cfg)), model_source=teacher.name,
        finetuned=False, trained_params="head", info=info, data_splits=dict(sentences.origin),
        leakage={s: LeakageCount(overlap=n, of=of) for s, (n, of) in sentences.leakage.items()}, warnings=leaks,
    )  # fmt: skip
    metrics = {
        "lee_spearman": Metric(round(lee.spearman, 5), "Spearman rho"),
        "lee_pearson": Metric(round(lee.pearson, 5), "Pearson r"),
        "params": Metric(_params(encoder), "parameters"),
        "layers": Metric(info.layers, "layers"),
        "dim": Metric(info.dim, "dimensions"),
        "eval_seconds": Metric(round(time.perf_counter() - start, 1), "s"),
    }
    return StageOutput(record=rec, metrics=metrics)


def _print_splits(sentences: data.Sentences, cfg: TeacherConfig, ctx: RunContext) -> list[str]:
    """Where each split came from and its leakage printed; the leakage warnings (for the record)."""
    for split, where in sentences.origin.items():
        ctx.console.print(f"  {split}: {where}")
    n, of = sentences.leakage["held_out"]
    ctx.console.print(f"  leakage: {n:,} of the {of:,} held-out sentences also in the transfer set")
    leaks = data.leakage_warnings(sentences, cfg.data.leakage_warn)
    for line in leaks:
        ctx.console.print(f"[yellow]warning[/]: {line}")
    return leaks


def select_layers(cfg: StudentConfig, n: int) -> list[int]:
    """The teacher layers (0-based) the student keeps: every-other, first-k / last-k or an explicit list."""
    if cfg.layers == "every-other":
        keep = list(range(0, n, 2))
    elif cfg.layers in ("first-k", "last-k"):
        if cfg.k is None or not 1 <= cfg.k <= n:
            raise ConfigError(f"student.layers: {cfg.layers} needs student.k in 1..{n}", f"e.g. student.k: {n // 2}")
        keep = list(range(cfg.k)) if cfg.layers == "first-k" else list(range(n - cfg.k, n))
    elif isinstance(cfg.layers, list):
        keep = list(cfg.layers)
        bad = [i for i in keep if not 0 <= i < n]
        if bad or len(set(keep)) != len(keep) or keep != sorted(keep) or not keep:
            raise ConfigError(
                f"student.layers: {keep} must be distinct increasing indices in 0..{n - 1}", "e.g. [0, 2, 4]"
            )
    else:
        raise ConfigError(f"student.layers: {cfg.layers} is not available for embedding", "give a list or every-other")
    return keep


def run_student(cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.tasks.embedding.encoder import save_sentence_transformers

    teacher, t_tok = load(upstream.directory(MODEL_DIR))
    tok, kept = t_tok, list[int]()
    if cfg.arch == "bilstm":
        student = _bilstm(cfg, teacher, t_tok, ctx.seed)
    elif cfg.pretrained is not None:
        student, tok, kept = _pretrained(cfg.pretrained, teacher, ctx.seed)
    else:
        student, kept = _layer_subset(cfg, teacher)
    width = _prune_width(student, tok, teacher, t_tok, cfg.width, upstream, ctx) if cfg.width else None
    save_sentence_transformers(student, tok, work / MODEL_DIR)
    tp, sp = _params(teacher), _params(student)
    ctx.console.print(
        f"embedding student: {_describe(cfg, student, kept, upstream)}, {sp / 1e6:.1f}M params ({tp / sp:.2f}x "
        f"smaller), {student.dim}-d" + (", with a projection" if student.projection is not None else "")
    )
    init = "copy" if cfg.pretrained is None else "pretrained"
    rec = StudentRecord(kept_layers=kept, layer_map={}, init=init, width=width, arch=cfg.arch)
    metrics = {
        "params": Metric(sp, "parameters"),
        "layers": Metric(_layers(student), "layers"),
        "teacher_layers": Metric(_layers(teacher), "layers"),
        "compression": Metric(round(tp / sp, 3), "x"),
        "dim": Metric(student.dim, "dimensions"),
    }
    return StageOutput(record=rec, metrics=metrics)


def _layers(encoder: Any) -> int:
    config = encoder.backbone.config
    return int(getattr(config, "num_hidden_layers", None) or config.num_layers)  # a BiLSTM: its LSTM layers


def _describe(cfg: StudentConfig, student: Any, kept: list[int], upstream: Manifest) -> str:
    if cfg.arch == "bilstm":
        c, source = student.backbone.config, "the teacher's" if cfg.bilstm.embeddings == "teacher" else "random"
        return (f"BiLSTM ({c.num_layers} layer(s) x {c.hidden_size} per direction, {c.embedding_dim}-d word vectors "
                f"({source}), {student.pooling} pooling)")  # fmt: skip
    info = record(upstream, TeacherRecord).info_as(EmbeddingInfo)
    return f"teacher layers {kept} of {info.layers if info else '?'}"


def _layer_subset(cfg: StudentConfig, teacher: Any) -> tuple[Any, list[int]]:
    """The teacher's backbone with the layers `cfg.layers` keeps, its pooling and normalisation."""
    from kdpipe.compress import surgery
    from kdpipe.tasks.embedding.encoder import SentenceEncoder

    kept = select_layers(cfg, int(teacher.backbone.config.num_hidden_layers))
    backbone, _ = surgery.remove_layers(teacher.backbone, {"encoder": kept})
    return SentenceEncoder(backbone, teacher.pooling, teacher.normalize, None, teacher.max_seq_length), kept


def _bilstm(cfg: StudentConfig, teacher: Any, tok: Any, seed: int) -> Any:
    """The BiLSTM sentence encoder (kdpipe.tasks.embedding.bilstm) on the teacher's tokenizer."""
    from kdpipe.tasks.embedding.bilstm import build_parts
    from kdpipe.tasks.embedding.encoder import SentenceEncoder

    body, projection, pooling = build_parts(cfg.bilstm, teacher, tok, seed)
    return SentenceEncoder(body, pooling, teacher.normalize, projection, teacher.max_seq_length)


def _pretrained(folder: str, teacher: Any, seed: int) -> tuple[Any, Any, list[int]]:
    """A local sentence encoder as the student; a Linear projection to the teacher's width when they differ."""
    import torch

    from kdpipe.tasks.embedding.encoder import SentenceEncoder

    student, tok = load(Path(folder))
    if student.projection is None and student.dim != teacher.dim:
        torch.manual_seed(seed)
        projection = torch.nn.Linear(student.dim, teacher.dim)
        student = SentenceEncoder(
            student.backbone, student.pooling, teacher.normalize, projection, student.max_seq_length
        )
    n = int(student.backbone.config.num_hidden_layers)
    return student, tok, list(range(n))


IMPORTANCE_BATCH = 32  # WidthConfig.batches counts batches of 32


def _check_heads(cfg: WidthConfig, student: Any) -> None:
    """student.width.heads must leave every layer one head (ConfigError naming the field, before any scoring)."""
    config = student.backbone.config
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    total = layers * heads
    remove = math.floor(cfg.heads * total + 0.5 + 1e-9)  # prune's rounding (half up)
    if remove > total - layers:
        raise ConfigError(
            f"student.width.heads: {cfg.heads} removes {remove} of the student's {total} attention heads, but each "
            f"of its {layers} layers must keep one (at most {total - layers} can go)",
            f"set student.width.heads to at most {(total - layers) / total:.3f}",
        )


def _prune_width(
    student: Any, tok: Any, teacher: Any, t_tok: Any, cfg: WidthConfig, upstream: Manifest, ctx: RunContext
) -> WidthInfo:
    """Remove the least important heads and FFN neurons of the student's backbone (kdpipe.compress.prune), the
    importance being the gradient of MSE(student embedding, teacher embedding) on transfer sentences."""
    import numpy as np

    from kdpipe.compress.prune import prune
    from kdpipe.tasks.embedding.encoder import encode

    _check_heads(cfg, student)
    info = record(upstream, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    texts = data.read_sentences(upstream.path(info.transfer))
    order = np.random.RandomState(ctx.seed).permutation(len(texts))[: cfg.batches * IMPORTANCE_BATCH]
    sample = [texts[i] for i in order]
    targets = encode(teacher, t_tok, sample, batch_size=IMPORTANCE_BATCH)  # the teacher's vectors, once
    before, ffn_total = _params(student), int(student.backbone.config.intermediate_size)

    def mse(_model: Any, batch: dict[str, Any], head_mask: Any) -> Any:
        s = student(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), head_mask)
        return ((s - batch["targets"]) ** 2).mean(dim=1).sum()  # per-example MSE, summed over the batch

    batches = _importance_batches(tok, sample, targets, student.max_seq_length)
    _, plan, _ = prune(student.backbone, batches, cfg.heads, cfg.ffn, cfg.batches, loss_fn=mse)
    width = WidthInfo(
        heads_removed={int(k): list(v) for k, v in plan.heads_to_prune.items()},
        ffn_kept=int(student.backbone.config.intermediate_size), ffn_total=ffn_total, params_before=before,
        params_after=_params(student),
    )  # fmt: skip
    removed = sum(len(v) for v in width.heads_removed.values())
    ctx.console.print(
        f"width: {removed} attention heads removed, {width.ffn_kept} of {ffn_total} FFN neurons kept per layer "
        f"(importance: embedding MSE to the teacher on {len(sample)} transfer sentences); {before / 1e6:.1f}M -> "
        f"{width.params_after / 1e6:.1f}M params"
    )
    return width


def _importance_batches(tok: Any, texts: list[str], targets: Any, max_length: int | None) -> Any:
    """Batches of 32 tokenized sentences with their teacher vectors under `targets`."""
    import torch

    for i in range(0, len(texts), IMPORTANCE_BATCH):
        enc = tok(texts[i : i + IMPORTANCE_BATCH], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")  # fmt: skip
        yield {**{k: v for k, v in enc.items()}, "targets": torch.from_numpy(targets[i : i + IMPORTANCE_BATCH])}
