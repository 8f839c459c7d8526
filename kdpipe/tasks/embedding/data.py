"""The sentences of an embedding run: held-out and transfer splits, from a corpus (teacher.embedding.sentences or
teacher.data's table) split here (seeded), or given (teacher.embedding.files: {transfer, held_out}; a missing one
drawn), and the leakage count (held-out sentences also in the transfer set).

Torch-free (kdpipe.data.texts, the one reader of text tables), so a missing column, an empty corpus or a bad given
file is one line before any model loads. The teacher stage writes both splits as JSONL ({"text": ...} per line); the
later stages read those files through the teacher's manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdpipe.config import EmbeddingConfig, TeacherConfig
from kdpipe.data.splits import overlap
from kdpipe.data.tables import check_file, source_encoding, source_path
from kdpipe.data.texts import (
    check_distinct,
    check_text_path,
    input_files,
    inside_error,
    leakage_warning,
    missing_column,
    read_lines,
    read_records,
    split_origin,
)
from kdpipe.errors import DataError
from kdpipe.files import shown

HELD_OUT = "data/held_out.jsonl"
TRANSFER = "data/transfer.jsonl"
MIN_TRANSFER = 2  # an in-batch term needs two sentences
MIN_HELD_OUT = 20  # teacher.embedding.held_out's least value: recall@10 needs neighbours to rank
GIVEN = ("transfer", "held_out")


@dataclass(frozen=True)
class Part:
    """Sentences as read: the corpus (split "corpus") or a given split, with where they came from."""

    split: str  # corpus / transfer / held_out
    where: str  # the recipe field
    path: Path
    texts: list[str]  # distinct, non-empty, in file order


@dataclass(frozen=True)
class Sentences:
    held_out: list[str]
    transfer: list[str]
    origin: dict[str, str] = field(default_factory=dict)  # transfer / held_out -> where it came from
    leakage: dict[str, tuple[int, int]] = field(default_factory=dict)  # held_out -> (also in transfer, of)


def corpus_path(cfg: TeacherConfig) -> Path:
    """The file the sentences come from: teacher.embedding.sentences, or teacher.data's table."""
    e = _section(cfg)
    if e.sentences is None:
        return source_path(cfg.data)
    path = Path(e.sentences)
    check_file(path, "sentence file (teacher.embedding.sentences)", "give a text file, one sentence per line")
    return path


def given_paths(e: EmbeddingConfig) -> dict[str, Path]:
    """transfer / held_out -> the given file (teacher.embedding.files)."""
    if e.files is None:
        return {}
    return {s: Path(p) for s in GIVEN if (p := getattr(e.files, s)) is not None}


def data_files(cfg: TeacherConfig) -> list[tuple[str, Path]]:
    """(name in the manifest, file) of every file the sentences are read from, from the recipe alone: the corpus
    (`data/<name>`, as before given splits existed) unless a transfer split is given, and each given split's files
    (`data/<split>/...`). What the teacher's run id hashes by content."""
    given = given_paths(_section(cfg))
    out: list[tuple[str, Path]] = []
    if "transfer" not in given:
        out += input_files("data", corpus_path(cfg))
    for split, path in given.items():
        check_text_path(path, f"{split} file", f"teacher.embedding.files.{split}")  # a missing one: one line
        out += input_files(f"data/{split}", path)
    return out


def describe(parts: dict[str, Part]) -> str:
    """What the record calls the data: the corpus path (as before given splits existed), or each split's file."""
    if list(parts) == ["corpus"]:
        return str(parts["corpus"].path)
    return ", ".join(f"{p.split}: {shown(p.path)}" for p in parts.values())


def read_corpus(cfg: TeacherConfig) -> dict[str, Part]:
    """The transfer side (the given transfer split, else the corpus: split "corpus") and a given held-out split,
    read and checked: an empty corpus or file, a missing column, the same file twice, a held-out split entirely in
    the transfer side, too few sentences to split. What `kdpipe validate` runs before any model loads."""
    e = _section(cfg)
    parts = {s: _read_given(s, p, cfg) for s, p in given_paths(e).items()}
    if "transfer" not in parts:
        parts["corpus"] = _read_corpus_file(cfg)
    train = parts.get("transfer") or parts["corpus"]
    check_distinct({p.where: p.path for p in [train, *(p for p in parts.values() if p is not train)]})
    held = parts.get("held_out")
    if held is not None:
        n, of = overlap(train.texts, held.texts)
        if n == of:
            raise inside_error(held.where, of, f"the transfer sentences ({shown(train.path)})")
        if len(train.texts) < MIN_TRANSFER:
            raise DataError(
                f"{train.where}: {shown(train.path)} has {len(train.texts)} distinct non-empty sentences; the transfer "
                f"set needs at least {MIN_TRANSFER}",
                "give more sentences",
            )
        return parts
    need = e.held_out + MIN_TRANSFER
    if len(train.texts) < need:
        what = train.where if train.split == "corpus" else f"{train.where}, held_out drawn from it"
        raise DataError(
            f"{shown(train.path)}: {len(train.texts)} distinct non-empty sentences ({what}); an embedding run needs at "
            f"least teacher.embedding.held_out + {MIN_TRANSFER} = {need} (the transfer corpus would be empty)",
            "give more sentences, or lower teacher.embedding.held_out",
        )
    return parts


def _read_corpus_file(cfg: TeacherConfig) -> Part:
    e, path = _section(cfg), corpus_path(cfg)
    if e.sentences is not None:  # a text file, one sentence per line, whatever its name
        lines = read_lines(path, "auto", "re-save it as UTF-8 (teacher.embedding.sentences)")
        return Part("corpus", "teacher.embedding.sentences", path, list(dict.fromkeys(lines)))
    # teacher.data's table: its text column only (a label column is not needed for sentences)
    column = cfg.data.text_column
    texts, _ = _texts(path, column, source_encoding(cfg.data), "", "teacher.data.text_column")
    return Part("corpus", f"teacher.data.text_column '{column}'", path, texts)


def _read_given(split: str, path: Path, cfg: TeacherConfig) -> Part:
    where = f"teacher.embedding.files.{split}"
    check_text_path(path, f"{split} file", where)
    fix = f"re-save it as UTF-8 ({where})"
    texts, read = _texts(path, cfg.data.text_column, "auto", fix, "teacher.data.text_column")
    if not texts:
        why = "has no rows" if read == 0 else f"has no non-empty sentence ({read:,} rows read)"
        raise DataError(f"{where}: {shown(path)} {why}", f"give {split} sentences, or leave {where} out")
    if split == "held_out" and len(texts) < MIN_HELD_OUT:
        raise DataError(
            f"{where}: {shown(path)} has {len(texts)} distinct non-empty sentences; a held-out split needs at least "
            f"{MIN_HELD_OUT} (recall@10 ranks each one's neighbours)",
            "give more held-out sentences, or leave the split out to draw it from the transfer sentences",
        )
    return Part(split, where, path, texts)


def _texts(path: Path, column: str, encoding: str, fix: str, field: str) -> tuple[list[str], int]:
    """The distinct non-empty texts of `column` (a .txt file: its lines), and the rows read."""
    rows, columns = read_records(path, encoding, fix, (column,))
    if path.suffix.lower() == ".txt" and not path.is_dir():
        column = "text"
    elif column not in columns:
        raise missing_column(path, column, columns, field)
    return list(dict.fromkeys(t for r in rows if (t := r[column].strip()))), len(rows)


def split(parts: dict[str, Part], e: EmbeddingConfig, seed: int) -> Sentences:
    """Without a given held-out split (the corpus, or the given transfer sentences): seeded, the first `held_out` of
    a permutation are held out, the next `transfer_size` are the transfer set. A given split is used as it is (a
    size set in the recipe subsamples it, seeded); the corpus is capped at transfer_size."""
    train, held = parts.get("transfer") or parts["corpus"], parts.get("held_out")
    texts = train.texts
    cap = e.transfer_size if train.split == "corpus" or "transfer_size" in e.model_fields_set else None
    if held is None:
        order = np.random.RandomState(seed).permutation(len(texts))
        held_out = [texts[i] for i in order[: e.held_out]]
        rest = order[e.held_out :]
        held_origin = split_origin(len(held_out), len(texts), "sentences", _source(train), seed, drawn=True)
    else:
        rng = np.random.RandomState(seed)
        keep = e.held_out if "held_out" in e.model_fields_set else None
        held_out = [held.texts[i] for i in rng.permutation(len(held.texts))[:keep]]
        rest = rng.permutation(len(texts))
        held_origin = split_origin(len(held_out), len(held.texts), "sentences", _source(held), seed, drawn=False)
    if cap is not None:
        rest = rest[:cap]
    transfer = [texts[i] for i in rest]
    total = len(texts) - (len(held_out) if held is None else 0)
    first = split_origin(len(transfer), total, "sentences", _source(train), seed, drawn=train.split == "corpus")
    leakage = {"held_out": overlap(transfer, held_out)}
    return Sentences(held_out, transfer, {"transfer": first, "held_out": held_origin}, leakage)


def _source(p: Part) -> str:
    return f"{shown(p.path.name)} ({p.where})"


def leakage_warnings(s: Sentences, threshold: float) -> list[str]:
    """A warning when the share of held-out sentences also in the transfer set is above teacher.data.leakage_warn."""
    n, of = s.leakage["held_out"]
    line = leakage_warning("held-out sentences", n, of, "transfer set", threshold)
    return [] if line is None else [line]


def write_sentences(texts: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def read_sentences(path: Path) -> list[str]:
    return [str(json.loads(line)["text"]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _section(cfg: TeacherConfig) -> EmbeddingConfig:
    if cfg.embedding is None:  # the config's validator requires it for task: embedding
        raise DataError("teacher.embedding is not set", "add teacher.embedding: {} (task: embedding)")
    return cfg.embedding
