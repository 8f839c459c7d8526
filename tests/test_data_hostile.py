"""Hostile data files (issue 16): each wrong file is told as what it is, not as "no such file" or "check the
file's format", and no error message carries a NUL or another control byte from the file."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, invoke

from kdpipe.config import DataConfig
from kdpipe.data.splits import check_source
from kdpipe.data.tables import read_table
from kdpipe.errors import DataError

ROWS = [(f"some words {i}", "ab"[i % 2]) for i in range(40)]


def _csv(path: Path, rows: list[tuple[str, ...]] | None = None, header: str = "text,label") -> Path:
    path.write_text("\n".join([header, *(",".join(r) for r in (ROWS if rows is None else rows))]) + "\n")
    return path


def _error(source: Path | str, encoding: str = "auto") -> DataError:
    """The DataError check_source raises for `source` (the CLI's check before torch loads)."""
    cfg = DataConfig(
        source=str(source), encoding=encoding, text_column="text", label_column="label", test_size=5, val_size=5
    )
    with pytest.raises(DataError) as e:
        check_source(cfg)
    shown = e.value.message + e.value.hint
    assert shown.isprintable(), repr(shown)  # no NUL, newline, escape... from the file in what the terminal shows
    return e.value


def _teacher(tmp_path: Path, *args: object) -> tuple[int, str]:
    return invoke("teacher", *args, "--text-column", "text", "--label-column", "label", "-o", tmp_path / "runs")


# --------------------------------------------------------------------------- 1. not a file
@pytest.mark.parametrize("name", ["adir", "reviews.csv"])
def test_a_directory_is_said_to_be_one(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.mkdir()
    _csv(path / "train.csv")
    e = _error(path)
    assert e.message.startswith(f"{path}: is a directory, not a data file") and "no such" not in e.message
    assert "a file or a Hugging Face `datasets` directory" in e.hint and f"{path / 'train.csv'}" in e.hint
    assert_one_line_error(*_teacher(tmp_path, "--data", path), "is a directory, not a data file")


def test_a_symlink_loop_is_said_to_be_one(tmp_path: Path) -> None:
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop.name)
    e = _error(loop)
    assert e.message.startswith(f"{loop}: symlink loop") and "no such" not in e.message
    assert_one_line_error(*_teacher(tmp_path, "--data", loop), "symlink loop")


def test_a_dangling_symlink_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "data.csv"
    link.symlink_to("gone.csv")
    assert _error(link).message == f"{link}: a symlink to gone.csv, which does not exist"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_pipe_is_refused_before_it_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    e = _error(fifo)  # read, it would block (and the stage reads the data a second time)
    assert e.message == f"{fifo}: is a named pipe (FIFO), not a regular file" and "to a file" in e.hint


# --------------------------------------------------------------------------- 2. permissions
def test_permission_denied_is_said_to_be_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _csv(tmp_path / "locked.csv")
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "locked.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", refuse)  # root may read a chmod-000 file: the open call refuses instead
    e = _error(data)
    assert e.message == f"permission denied: {data}" and "check its permissions" in e.hint
    assert "format" not in e.hint


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads a chmod-000 file regardless")
def test_permission_denied_by_chmod(tmp_path: Path) -> None:
    data = _csv(tmp_path / "locked.csv")
    data.chmod(0)
    try:
        e = _error(data)
    finally:
        data.chmod(0o644)
    assert e.message == f"permission denied: {data}" and "check its permissions" in e.hint


# --------------------------------------------------------------------------- 3. JSON by line
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_broken_json_lines_name_the_line(tmp_path: Path, suffix: str) -> None:
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in ROWS]
    lines[6] = '{"text": "oops", "label": }'
    data = tmp_path / f"d{suffix}"
    data.write_text("\n".join(lines) + "\n")
    e = _error(data)
    assert e.message == f"{data}: line 7: not valid JSON (Expecting value, column 27)", e.message
    assert "position" not in e.message


def test_a_broken_json_array_names_the_line(tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text('[\n{"text": "a", "label": "b"},\n{"text": "a" "label": "b"}\n]\n')
    assert _error(data).message == f"{data}: line 3: not valid JSON (Expecting ',' delimiter, column 14)"


# --------------------------------------------------------------------------- 4. UTF-16 without a BOM, control bytes
@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_bom_is_named(tmp_path: Path, codec: str) -> None:
    data = tmp_path / "u16.csv"
    body = "\n".join(["text,label", *(",".join(r) for r in ROWS)]) + "\n"
    data.write_bytes(body.encode(codec))
    e = _error(data)
    assert e.message == f"{data}: looks like UTF-16 without a byte-order mark"
    assert f"--encoding {codec}" in e.hint and "teacher.data.encoding" in e.hint
    assert "\x00" not in _error(data, encoding="cp1252").message  # a one-byte codec named explicitly: the same
    assert len(read_table(data, "text", "label", codec)) == len(ROWS)  # and the hint's fix works


def test_control_bytes_in_a_header_are_escaped(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("te\x1b[31mxt,lab\x07el\n" + "\n".join(",".join(r) for r in ROWS) + "\n")
    e = _error(data)
    assert "te\\x1b[31mxt" in e.message and "lab\\x07el" in e.message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (gzip.compress(b"text,label\na,b\n"), "is gzip-compressed, not text"),
        (b"PK\x03\x04" + bytes(range(256)), "is a zip archive"),
        (b"text,label\n" + bytes(range(256)) * 4, "line 2: a NUL byte: a binary file, not text"),
    ],
    ids=["gzip", "xlsx", "binary"],
)
def test_binary_files_under_a_csv_name(tmp_path: Path, content: bytes, needle: str) -> None:
    data = tmp_path / "d.csv"
    data.write_bytes(content)
    assert needle in _error(data).message


# --------------------------------------------------------------------------- 5. an empty source
@pytest.mark.parametrize("source", ["", "  "])
def test_an_empty_source_is_not_the_current_directory(source: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="is empty; give a data file path or 'default'"):
        DataConfig(source=source)  # the recipe refuses it ...
    cfg = DataConfig.model_construct(source=source, encoding="auto")
    with pytest.raises(DataError) as e:  # ... and the reader, should a config bypass validation
        check_source(cfg)
    assert e.value.message == "teacher.data.source is empty; give a data file path or 'default'"


def test_an_empty_source_from_the_command_line(tmp_path: Path) -> None:
    code, out = invoke("teacher", "--set", "teacher.data.source=", "-o", tmp_path / "runs")
    assert_one_line_error(code, out, "teacher.data.source: Value error, is empty; give a data file path or 'default'")
    assert "no such" not in out


# --------------------------------------------------------------------------- 6. ragged rows
def test_rows_with_an_extra_field_are_not_shifted_onto_the_label(tmp_path: Path) -> None:
    # pandas makes the surplus first field of every row the index: 'label' then holds the third field ('cols')
    data = _csv(tmp_path / "d.csv", [(t, lab, "cols") for t, lab in ROWS])
    e = _error(data)
    assert e.message == f"{data}: line 2 has 3 fields, the header has 2 (an unquoted comma in a text?)"
    assert "distinct" not in e.message and "quote" in e.hint


def test_one_ragged_row_is_named_by_its_line(tmp_path: Path) -> None:
    rows = [*ROWS[:20], ("I liked it", " a lot", "a"), *ROWS[20:]]
    data = _csv(tmp_path / "d.csv", rows)
    assert _error(data).message == f"{data}: line 22 has 3 fields, the header has 2 (an unquoted comma in a text?)"
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\n" + "\n".join("\t".join(r) for r in rows[:21]) + "\n")
    assert _error(tsv).message.startswith(f"{tsv}: line 22 has 3 fields, the header has 2 (an unquoted tab")


def test_a_quoted_separator_is_not_ragged(tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.csv", [(f'"{t}, quoted"', lab) for t, lab in ROWS])
    df = read_table(data, "text", "label")
    assert len(df) == len(ROWS) and df.text[0] == "some words 0, quoted"


# --------------------------------------------------------------------------- more hostile inputs
def test_only_whitespace_and_header_only(tmp_path: Path) -> None:
    blank = tmp_path / "blank.csv"
    blank.write_text(" \n\n\t\n")
    assert _error(blank).message == f"{blank}: the file holds only blank lines / whitespace"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert _error(empty).message == f"{empty}: the file is empty"
    header = _csv(tmp_path / "header.csv", [])
    assert _error(header).message.endswith("= 12 (the file has a header but no rows)")


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.csv", [(t, lab, lab) for t, lab in ROWS], header="text,label,label")
    assert _error(data).message == f"{data}: line 1: the header names column 'label' 2 times (fields 2, 3)"
    other = _csv(tmp_path / "o.csv", [(t, lab, lab, lab) for t, lab in ROWS], header="text,label,x,x")
    assert len(read_table(other, "text", "label")) == len(ROWS)  # a duplicate kdpipe does not read is harmless


def test_all_labels_missing_points_at_the_label_column(tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.csv", [(t, "NaN") for t, _ in ROWS])
    e = _error(data)
    assert "40 with a missing label" in e.message and "--label-column" in e.hint


def test_crlf_line_endings_read(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_bytes(("text,label\r\n" + "".join(f"{t},{lab}\r\n" for t, lab in ROWS)).encode())
    df = read_table(data, "text", "label")
    assert len(df) == len(ROWS) and set(df.label) == {"a", "b"} and not any("\r" in t for t in df.text)


def test_a_directory_of_pairs_is_said_to_be_one(tmp_path: Path) -> None:
    from kdpipe.config import TranslationConfig
    from kdpipe.tasks.translation.checks import pairs_path

    (tmp_path / "pairs.tsv").mkdir()
    with pytest.raises(DataError, match=r"pairs.tsv: is a directory, not a pair file"):
        pairs_path(TranslationConfig(source=str(tmp_path / "pairs.tsv")))
    with pytest.raises(DataError, match=r"^teacher.translation.source is empty"):
        pairs_path(TranslationConfig.model_construct(source=""))  # the reader's backstop
    with pytest.raises(ValueError, match="is empty; give a pair file path"):
        TranslationConfig(source=" ")
