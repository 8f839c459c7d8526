"""The sentences of an embedding run: held-out and transfer splits from a text file or teacher.data's table.

Torch-free (pandas through kdpipe.data.tables), so a missing column or an empty corpus is one line before any model
loads. The teacher stage writes both splits as JSONL ({"text": ...} per line); the later stages read those files
through the teacher's manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.config import EmbeddingConfig, TeacherConfig
from kdpipe.data.tables import check_file, decode_bytes, read_counted, read_file_bytes, source_encoding, source_path
from kdpipe.errors import DataError
from kdpipe.files import shown

HELD_OUT = "data/held_out.jsonl"
TRANSFER = "data/transfer.jsonl"
MIN_TRANSFER = 2  # an in-batch term needs two sentences


@dataclass(frozen=True)
class Sentences:
    held_out: list[str]
    transfer: list[str]


def corpus_path(cfg: TeacherConfig) -> Path:
    """The file the sentences come from: teacher.embedding.sentences, or teacher.data's table."""
    e = _section(cfg)
    if e.sentences is None:
        return source_path(cfg.data)
    path = Path(e.sentences)
    check_file(path, "sentence file (teacher.embedding.sentences)", "give a text file, one sentence per line")
    return path


def read_corpus(cfg: TeacherConfig) -> list[str]:
    """Every distinct non-empty sentence, in file order; DataError for an empty corpus or a missing column."""
    e, path = _section(cfg), corpus_path(cfg)
    if e.sentences is not None:
        text = decode_bytes(
            read_file_bytes(path), path, "auto", fix="re-save it as UTF-8 (teacher.embedding.sentences)"
        )
        texts = [line.strip() for line in text.splitlines()]
        where = "teacher.embedding.sentences"
    else:
        # the label column is read too (kdpipe.data.tables reads text + label); rows without a label are dropped
        df, _ = read_counted(path, cfg.data.text_column, cfg.data.label_column, source_encoding(cfg.data))
        texts = [str(t).strip() for t in df.text.tolist()]
        where = f"teacher.data.text_column '{cfg.data.text_column}'"
    texts = list(dict.fromkeys(t for t in texts if t))
    need = e.held_out + MIN_TRANSFER
    if len(texts) < need:
        raise DataError(
            f"{shown(path)}: {len(texts)} distinct non-empty sentences ({where}); an embedding run needs at least "
            f"teacher.embedding.held_out + {MIN_TRANSFER} = {need} (the transfer corpus would be empty)",
            "give more sentences, or lower teacher.embedding.held_out",
        )
    return texts


def split(texts: list[str], e: EmbeddingConfig, seed: int) -> Sentences:
    """Seeded: the first `held_out` of a permutation are held out, the next `transfer_size` are the transfer set."""
    order = np.random.RandomState(seed).permutation(len(texts))
    held = [texts[i] for i in order[: e.held_out]]
    rest = order[e.held_out :]
    if e.transfer_size is not None:
        rest = rest[: e.transfer_size]
    return Sentences(held, [texts[i] for i in rest])


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
