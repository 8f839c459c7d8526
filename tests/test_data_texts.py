"""The one reader of text tables (kdpipe.data.texts) on every format, and the given splits of the embedding and
causal-LM tasks: used as given, sizes set in the recipe subsample them, a missing split drawn, the leakage count and
its warning, and every bad input planted (one DataError before any model loads: these are the functions the tasks'
check_recipe runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdpipe.artifacts.records import LeakageCount, TeacherRecord
from kdpipe.config import TeacherConfig
from kdpipe.data.texts import check_text_path, read_records
from kdpipe.errors import DataError
from kdpipe.reporting.report import leakage_lines
from kdpipe.tasks.causal_lm import data as lm_data
from kdpipe.tasks.embedding import data as emb_data

WORDS = ["cat", "dog", "red", "blue", "mat", "sun", "sea", "tree", "bird", "fish"]


def sentences(n: int, tag: str) -> list[str]:
    """n distinct sentences, distinct from another tag's."""
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]} {tag} number {i}" for i in range(n)]


def lines(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def raises(fn: Any, *args: Any) -> str:
    with pytest.raises(DataError) as e:
        fn(*args)
    assert "\n" not in e.value.message
    return e.value.message


# --------------------------------------------------------------------------- the one reader
def test_the_one_reader_reads_every_format(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    rows = [{"text": "a cat", "n": "1"}, {"text": "a dog", "n": "2"}]
    lines(tmp_path / "t.txt", ["  a cat ", "", "a dog"])
    (tmp_path / "t.csv").write_text("text,n\na cat,1\na dog,2\n")
    (tmp_path / "t.tsv").write_text("text\tn\na cat\t1\na dog\t2\n")
    (tmp_path / "t.json").write_text(json.dumps([{"text": "a cat", "n": 1}, {"text": "a dog", "n": 2}]))
    jsonl(tmp_path / "t.jsonl", [{"text": "a cat", "n": 1}, {"text": "a dog", "n": 2}])
    pd.DataFrame({"text": ["a cat", "a dog"], "n": ["1", "2"]}).to_parquet(tmp_path / "t.parquet")
    datasets.Dataset.from_dict({"text": ["a cat", "a dog"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "t.txt") == ([{"text": "a cat"}, {"text": "a dog"}], ["text"])
    for name in ("t.csv", "t.tsv", "t.json", "t.jsonl", "t.parquet", "ds"):
        assert read_records(tmp_path / name) == (rows, ["text", "n"]), name
        check_text_path(tmp_path / name, "test file", "test.field")


def test_the_one_reader_refuses_bad_files_in_one_line(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "empty.csv").write_text("")
    assert "the file is empty" in raises(read_records, tmp_path / "empty.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert "line 2: not valid JSON" in raises(read_records, tmp_path / "bad.jsonl")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    assert "not valid utf-8" in raises(read_records, tmp_path / "latin.txt")
    (tmp_path / "x.docx").write_text("hi")
    assert "unsupported test file format '.docx' (test.field)" in raises(
        check_text_path, tmp_path / "x.docx", "test file", "test.field"
    )
    assert "no such test file (test.field)" in raises(check_text_path, tmp_path / "nope.txt", "test file", "test.field")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})})
    d.save_to_disk(str(tmp_path / "dd"))
    assert "a DatasetDict" in raises(read_records, tmp_path / "dd")


# --------------------------------------------------------------------------- embedding
def emb(**e: Any) -> TeacherConfig:
    return TeacherConfig.model_validate({"task": "embedding", "embedding": e})


def test_embedding_given_splits_are_used_as_given(tmp_path: Path) -> None:
    transfer = lines(tmp_path / "transfer.txt", sentences(60, "t"))
    held = jsonl(tmp_path / "held.jsonl", [{"text": t} for t in sentences(30, "h")])
    cfg = emb(files={"transfer": str(transfer), "held_out": str(held)})
    assert cfg.embedding is not None
    s = emb_data.split(emb_data.read_corpus(cfg), cfg.embedding, seed=0)
    assert sorted(s.transfer) == sorted(sentences(60, "t")) and sorted(s.held_out) == sorted(sentences(30, "h"))
    assert "held.jsonl (teacher.embedding.files.held_out)" in s.origin["held_out"]
    assert s.leakage == {"held_out": (0, 30)} and emb_data.leakage_warnings(s, 0.01) == []
    names = [name for name, _ in emb_data.data_files(cfg)]  # hashed by content into the teacher's run id
    assert names == ["data/transfer/transfer.txt", "data/held_out/held.jsonl"]
    sized = emb(files={"transfer": str(transfer), "held_out": str(held)}, held_out=20, transfer_size=10)
    assert sized.embedding is not None
    s2 = emb_data.split(emb_data.read_corpus(sized), sized.embedding, seed=0)
    again = emb_data.split(emb_data.read_corpus(sized), sized.embedding, seed=0)
    assert (len(s2.held_out), len(s2.transfer)) == (20, 10) and s2 == again  # subsampled, seeded
    assert (
        s2.origin["transfer"].startswith("10 of the 60 sentences of transfer.txt") and "seed 0" in s2.origin["transfer"]
    )


def test_embedding_a_missing_split_is_drawn(tmp_path: Path) -> None:
    transfer = lines(tmp_path / "transfer.txt", sentences(60, "t"))
    cfg = emb(files={"transfer": str(transfer)}, held_out=20)
    assert cfg.embedding is not None
    s = emb_data.split(emb_data.read_corpus(cfg), cfg.embedding, seed=0)
    assert len(s.held_out) == 20 and len(s.transfer) == 40 and not set(s.held_out) & set(s.transfer)
    assert "drawn from transfer.txt" in s.origin["held_out"]
    corpus = lines(tmp_path / "corpus.txt", sentences(50, "c"))
    held = lines(tmp_path / "held.txt", sentences(25, "h"))
    cfg = emb(sentences=str(corpus), files={"held_out": str(held)})
    assert cfg.embedding is not None
    s = emb_data.split(emb_data.read_corpus(cfg), cfg.embedding, seed=0)
    assert sorted(s.transfer) == sorted(sentences(50, "c")) and len(s.held_out) == 25
    assert [n for n, _ in emb_data.data_files(cfg)] == ["data/corpus.txt", "data/held_out/held.txt"]
    assert "files" not in emb().model_dump(mode="json")["embedding"]  # existing run ids unchanged


def test_embedding_leakage_is_counted_and_warned(tmp_path: Path) -> None:
    held_texts = sentences(25, "h")
    transfer = lines(tmp_path / "transfer.txt", [*sentences(40, "t"), "  THE Cat   sat  ", held_texts[3].upper()])
    held = lines(tmp_path / "held.txt", ["the cat sat", *held_texts])
    cfg = emb(files={"transfer": str(transfer), "held_out": str(held)})
    assert cfg.embedding is not None
    s = emb_data.split(emb_data.read_corpus(cfg), cfg.embedding, seed=0)
    assert s.leakage == {"held_out": (2, 26)}  # modulo case and whitespace
    assert emb_data.leakage_warnings(s, 0.1) == []
    (warning,) = emb_data.leakage_warnings(s, 0.05)
    assert "2 of the 26 held-out sentences (7.7%) also occur in the transfer set" in warning


def test_embedding_bad_given_files_are_refused(tmp_path: Path) -> None:
    transfer = lines(tmp_path / "transfer.txt", sentences(40, "t"))
    held = lines(tmp_path / "held.txt", sentences(25, "h"))
    (tmp_path / "empty.txt").write_text("\n \n")
    msg = raises(emb_data.read_corpus, emb(files={"transfer": str(transfer), "held_out": str(tmp_path / "empty.txt")}))
    assert msg.startswith("teacher.embedding.files.held_out:") and "has no rows" in msg
    msg = raises(emb_data.read_corpus, emb(files={"transfer": str(transfer), "held_out": str(transfer)}))
    assert "is also teacher.embedding.files.transfer" in msg
    msg = raises(emb_data.read_corpus, emb(sentences=str(held), files={"held_out": str(held)}))
    assert "is also teacher.embedding.sentences" in msg
    jsonl(tmp_path / "held.jsonl", [{"sentence": t} for t in sentences(25, "h")])
    msg = raises(emb_data.read_corpus, emb(files={"transfer": str(transfer), "held_out": str(tmp_path / "held.jsonl")}))
    assert "no column 'text' (teacher.data.text_column; columns: sentence)" in msg
    inside = lines(tmp_path / "inside.txt", [t.upper() for t in sentences(40, "t")[:22]])
    msg = raises(emb_data.read_corpus, emb(files={"transfer": str(transfer), "held_out": str(inside)}))
    assert "every one of its 22 texts also occurs in the transfer sentences" in msg
    with pytest.raises(ValueError, match="both sentences"):
        emb(sentences=str(held), files={"transfer": str(transfer)})


# --------------------------------------------------------------------------- causal LM
def lm(**c: Any) -> TeacherConfig:
    return TeacherConfig.model_validate({"task": "causal_lm", "causal_lm": c})


def prompts(path: Path, n: int, tag: str) -> Path:
    return jsonl(path, [{"prompt": p, "response": f"reply {i}"} for i, p in enumerate(sentences(n, tag))])


def test_causal_lm_given_splits_are_used_as_given(tmp_path: Path) -> None:
    train = prompts(tmp_path / "train.jsonl", 30, "p")
    texts = lines(tmp_path / "texts.txt", sentences(10, "x"))
    held = prompts(tmp_path / "held.jsonl", 5, "q")
    files = {"train": str(train), "held_out_texts": str(texts), "held_out_prompts": str(held)}
    cfg = lm(files=files)
    c = lm_data.section(cfg)
    s = lm_data.split(lm_data.read_parts(cfg), c, seed=0)
    assert (len(s.train), len(s.held_out_texts), len(s.held_out_prompts)) == (30, 10, 5)  # all: no size set
    assert sorted(r.text for r in s.held_out_texts) == sorted(sentences(10, "x"))
    assert s.leakage == {"held_out_prompts": (0, 5), "held_out_texts": (0, 10)}
    assert "texts.txt (teacher.causal_lm.files.held_out_texts)" in s.origin["held_out_texts"]
    assert [n for n, _ in lm_data.data_files(c)] == [
        "data/train/train.jsonl", "data/held_out_prompts/held.jsonl", "data/held_out_texts/texts.txt"
    ]  # fmt: skip
    sized = lm(files=files, train_prompts=12, held_out_texts=4)
    s2 = lm_data.split(lm_data.read_parts(sized), lm_data.section(sized), seed=0)
    assert (len(s2.train), len(s2.held_out_texts), len(s2.held_out_prompts)) == (12, 4, 5)
    assert "files" not in lm().model_dump(mode="json")["causal_lm"]  # existing run ids unchanged


def test_causal_lm_missing_held_out_splits_are_drawn_from_train(tmp_path: Path) -> None:
    data = prompts(tmp_path / "data.jsonl", 30, "p")
    texts = lines(tmp_path / "texts.txt", sentences(10, "x"))
    cfg = lm(data=str(data), files={"held_out_texts": str(texts)}, held_out_prompts=4, train_prompts=100)
    s = lm_data.split(lm_data.read_parts(cfg), lm_data.section(cfg), seed=0)
    assert (len(s.train), len(s.held_out_prompts), len(s.held_out_texts)) == (26, 4, 10)
    assert not {r.prompt for r in s.train} & {r.prompt for r in s.held_out_prompts}
    assert "drawn from data.jsonl (teacher.causal_lm.data)" in s.origin["held_out_prompts"]
    assert lm_data.read_rows(cfg) == lm_data.read_parts(cfg)["corpus"].rows  # what check_recipe reads
    too_many = lm(data=str(data), files={"held_out_texts": str(texts)}, held_out_prompts=30)
    msg = raises(lm_data.read_parts, too_many)
    assert "needs at least held_out_prompts + 1 = 31" in msg


def test_causal_lm_leakage_is_counted_and_warned(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", [{"prompt": p, "text": f"{p} text"} for p in sentences(20, "p")])
    texts = lines(tmp_path / "texts.txt", ["CAT cat  P number 0 text", *sentences(9, "x")])  # train row 0's text
    held = jsonl(tmp_path / "held.jsonl", [{"prompt": p} for p in [sentences(20, "p")[5].upper(), "a new one"]])
    cfg = lm(files={"train": str(train), "held_out_texts": str(texts), "held_out_prompts": str(held)})
    s = lm_data.split(lm_data.read_parts(cfg), lm_data.section(cfg), seed=0)
    assert s.leakage == {"held_out_prompts": (1, 2), "held_out_texts": (1, 10)}
    warnings = lm_data.leakage_warnings(s, 0.2)
    assert len(warnings) == 1 and "1 of the 2 held-out prompts (50.0%) also occur in the train prompts" in warnings[0]
    assert len(lm_data.leakage_warnings(s, 0.01)) == 2


def test_causal_lm_bad_given_files_are_refused(tmp_path: Path) -> None:
    train = prompts(tmp_path / "train.jsonl", 30, "p")
    (tmp_path / "empty.txt").write_text("  \n")
    msg = raises(lm_data.read_parts, lm(files={"train": str(train), "held_out_texts": str(tmp_path / "empty.txt")}))
    assert msg.startswith("teacher.causal_lm.files.held_out_texts:") and "no usable prompt or text" in msg
    msg = raises(lm_data.read_parts, lm(files={"train": str(train), "held_out_prompts": str(train)}))
    assert "is also teacher.causal_lm.files.train" in msg
    msg = raises(lm_data.read_parts, lm(data=str(train), files={"held_out_texts": str(train)}))
    assert "is also teacher.causal_lm.data" in msg
    held = prompts(tmp_path / "held.jsonl", 5, "q")
    msg = raises(lm_data.read_parts, lm(files={"train": str(train), "held_out_prompts": str(held)}, prompt_column="q"))
    assert "no column 'q' (teacher.causal_lm.prompt_column; columns: prompt, response)" in msg
    inside = jsonl(tmp_path / "inside.jsonl", [{"prompt": p.upper()} for p in sentences(30, "p")[:6]])
    msg = raises(lm_data.read_parts, lm(files={"train": str(train), "held_out_prompts": str(inside)}))
    assert "every one of its 6 texts also occurs in the train prompts (train.jsonl)" in msg
    with pytest.raises(ValueError, match="both data"):
        lm(data=str(train), files={"train": str(train)})


# --------------------------------------------------------------------------- report
def test_leakage_lines() -> None:
    rec = TeacherRecord(
        label_names=[], max_length=8, split_sizes={}, data_source="x", data_sha256="0", model_source="m",
        finetuned=False, trained_params="head", leakage={"held_out": LeakageCount(overlap=1, of=4)},
    )  # fmt: skip
    assert leakage_lines(rec, {"held_out": "held-out sentences"}, "transfer set") == [
        "- Leakage: 1 of the 4 held-out sentences (25.0%) also occur in the transfer set (after case / whitespace "
        "normalisation)."
    ]
    assert leakage_lines(rec) == [
        "- Leakage: 1 of the 4 held_out texts (25.0%) also occur in the train split (after case / whitespace "
        "normalisation)."
    ]
