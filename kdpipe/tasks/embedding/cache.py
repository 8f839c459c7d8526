"""The embedding task's teacher-output cache: the teacher's N x D embeddings of the transfer sentences on disk.

`<cache_root>/embedding-teacher/<key[:16]>/` holds embeddings.npy (float32, N x D, the rows in the transfer
sentences' order) and cache.json (format, key, n, dim, and the .npy's bytes and sha256). The key (`embedding_key`)
is the sha256 of the canonical JSON of: the layout's format number, the teacher stage's recorded content hashes of
its model folder, the sha256 of the transfer sentences, the teacher's max_seq_length, pooling and normalize, the
precision (fp32) and the encoding batch size; any change gives another key, so another entry. An entry is built in a
temporary sibling and renamed into place (cache.json written last), so a killed build never looks complete. On a
hit the .npy's size, sha256, dtype and shape are checked before use; an entry that fails a check is discarded (one
console line says why) and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, atomic_dir, sha256_file, write_json_atomic
from kdpipe.artifacts.records import EmbeddingInfo, RunContext, TeacherRecord, record
from kdpipe.config import DistillConfig
from kdpipe.train.cache import META

FORMAT = 1  # the on-disk layout; part of the key
FOLDER = "embedding-teacher"
ARRAY = "embeddings.npy"
BATCH_SIZE = 64  # the teacher's encoding batch (padding, hence rounding, depends on it): part of the key


def texts_sha256(texts: list[str]) -> str:
    """The transfer sentences by content and order: sha256 over each sentence's UTF-8 length and bytes."""
    h = hashlib.sha256(b"kdpipe-embedding-texts-v1\0")
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def embedding_key(teacher: Manifest, texts: list[str], max_seq_length: int | None) -> str:
    """sha256 hex of the canonical JSON of (format, the teacher model folder's recorded file hashes, the texts'
    sha256, max_seq_length, pooling, normalize, precision, batch size)."""
    info = record(teacher, TeacherRecord).info_as(EmbeddingInfo)
    assert info is not None
    prefix = info.model_dir.rstrip("/") + "/"
    doc = {
        "format": FORMAT,
        "model": sorted((r.path, r.sha256) for r in teacher.outputs if r.path.startswith(prefix)),
        "texts": texts_sha256(texts),
        "max_seq_length": max_seq_length,
        "pooling": info.pooling,
        "normalize": info.normalize,
        "precision": "fp32",
        "batch_size": BATCH_SIZE,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def problem(directory: Path, key: str, shape: tuple[int, int]) -> str | None:
    """Why the entry in `directory` cannot be used (missing, another key, a changed, truncated or misshapen .npy),
    or None when its cache.json names `key` and the .npy has the recorded bytes and sha256, float32 and `shape`."""
    path = directory / ARRAY
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
            return f"{directory / META} is for another key or format"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != int(meta["bytes"]) or sha256_file(path) != meta["sha256"]:
            return f"{path} changed since it was written (its size or sha256 differs from {META}'s)"
        arr = np.load(path, mmap_mode="r")
        if arr.shape != shape or arr.dtype != np.float32:
            return f"{path} is {arr.shape} {arr.dtype}, expected {shape} float32"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory} is unreadable ({e.__class__.__name__}: {e})"
    return None


def _write(final: Path, key: str, vectors: np.ndarray, seconds: float) -> None:
    with atomic_dir(final) as work:
        np.save(work / ARRAY, np.ascontiguousarray(vectors, dtype=np.float32))
        meta = {
            "format": FORMAT, "key": key, "n": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
            "dtype": "float32", "bytes": (work / ARRAY).stat().st_size, "sha256": sha256_file(work / ARRAY),
            "build_seconds": round(seconds, 3),
        }  # fmt: skip
        write_json_atomic(work / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def bypass_reason(cfg: DistillConfig, ctx: RunContext, shape: tuple[int, int]) -> str | None:
    """Why the teacher's `shape` embeddings are not cached (None: they are)."""
    if cfg.embedding is not None and cfg.embedding.hidden > 0:
        return "distill.embedding.hidden > 0: the teacher runs on every batch for its hidden states"
    if not cfg.cache.use:
        return "distill.cache.use is false"
    if ctx.cache_root is None:
        return "no cache directory (the runner gave none)"
    if 4 * shape[0] * shape[1] > cfg.cache.max_gb * 1e9:
        return (
            f"{4 * shape[0] * shape[1] / 1e9:.1f} GB of embeddings is over distill.cache.max_gb = {cfg.cache.max_gb:g}"
        )
    return None


def teacher_embeddings(
    cfg: DistillConfig, teacher: Manifest, texts: list[str], encode: Callable[[], np.ndarray], shape: tuple[int, int],
    max_seq_length: int | None, work: Path, ctx: RunContext,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """The teacher's (N, D) embeddings of `texts` and what DistillRecord.teacher_cache records: read from the cache
    (a hit, after `problem` found nothing), or computed by `encode()` and written to it (a miss; a broken entry is
    discarded with one console line first), or computed and not cached (bypassed, and why)."""
    reason = bypass_reason(cfg, ctx, shape)
    if reason is not None:
        ctx.console.print(f"teacher embeddings: cache bypassed ({reason})")
        return encode(), {"status": "bypassed", "reason": reason}
    assert ctx.cache_root is not None
    key = embedding_key(teacher, texts, max_seq_length)
    final = ctx.cache_root / FOLDER / key[:16]
    why = problem(final, key, shape) if final.exists() else "no entry"
    status, start = "hit", time.perf_counter()
    if why is None:
        vectors = np.array(np.load(final / ARRAY), dtype=np.float32)
    else:
        if final.exists():
            ctx.console.print(f"[yellow]teacher cache entry discarded[/]: {why}; recomputing it")
            shutil.rmtree(final, ignore_errors=True)
        vectors = encode()
        _write(final, key, vectors, time.perf_counter() - start)
        status = "miss"
    seconds = time.perf_counter() - start
    size = (final / ARRAY).stat().st_size
    ctx.console.print(
        f"teacher embeddings: cache {status} ({vectors.shape[0]} x {vectors.shape[1]}, {size:,} bytes) in "
        f"{seconds:.1f} s"
    )
    info = {
        "status": status, "key": key, "dir": os.path.relpath(final.resolve(), work.resolve()),
        "examples": int(vectors.shape[0]), "bytes": size, "bytes_per_example": size / max(1, vectors.shape[0]),
        "contents": {"embeddings": [int(vectors.shape[0]), int(vectors.shape[1])], "dtype": "float32"},
        "build_seconds": round(seconds, 3) if status == "miss" else 0.0,
    }  # fmt: skip
    return vectors, info | ({"reason": why} if status == "miss" and why != "no entry" else {})
