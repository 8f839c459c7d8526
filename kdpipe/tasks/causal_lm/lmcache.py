"""The causal-LM task's teacher-output cache: the teacher's top-k next-token logits on the training sequences.

The teacher runs once over the distill stage's training sequences (batched, no_grad, float32) and, for every
counted position of every sequence (the positions `kdpipe.losses.tokens.logit_mask(labels)` keeps: the logits that
predict a response token), keeps the k largest logits (values.npy, float32), their token ids (indices.npy, int32)
and lse_rest.npy (float32), the log-sum-exp of the other V - k logits: `tokens.topk_compress`, the representation
`tokens.topk_forward_kl` and its siblings read (k + 1 buckets: the top-k and one tail). The files are RAGGED, only
the counted positions, one row each, sequence after sequence (offsets.npy, int64 (n + 1): sequence i's rows are
offsets[i]:offsets[i + 1]); `LMCache.batch` puts a batch's rows back at their (B, T) positions (zeros elsewhere,
which no loss reads: every term selects the counted positions first).

Where: `<out>/cache/causal_lm/<key[:16]>/` (ctx.cache_root, shared by the stages of one output root, like the
classification and embedding caches), with meta.json (format, key, k, vocab, sequences, positions, tail mass, every
file's bytes and sha256). The key (`lm_key`) is the sha256 of the canonical JSON of: the layout's format number, the
teacher stage's recorded content hashes of its model folder (its manifest's outputs under info.model_dir: another
teacher, even one only perturbed, gives another key), the sha256 of the sequences' token ids and starts (in order),
k, the precision (fp32) and the teacher pass's batch size. An entry is built in a temporary sibling and renamed
into place with meta.json written last (kdpipe.artifacts.manifest.atomic_dir), so a killed build never looks
complete; on open every file's size, sha256, dtype and shape are checked, and an entry that fails a check is
rebuilt with one console line saying why (never a silent wrong read).

Error bound (kdpipe/train/cache.py's, per token): the k + 1-bucket forward KL differs from the dense one by r KL(p(.
| tail) || q(. | tail)) and its gradient by at most 2 r in L1 norm, r the teacher's tail mass at that position;
`tail_mass_mean` / `tail_mass_max` (over every cached position, at T = 1) are recorded in meta.json and in
DistillRecord.teacher_cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest, atomic_dir, sha256_file, write_json_atomic
from kdpipe.artifacts.records import CausalLMInfo, TeacherRecord, record
from kdpipe.errors import ModelError
from kdpipe.tasks.causal_lm import lm

if TYPE_CHECKING:
    from rich.console import Console
    from torch import Tensor

    from kdpipe.artifacts.records import RunContext
    from kdpipe.config import DistillConfig

FORMAT = 1  # the on-disk layout; part of the key
FOLDER = "causal_lm"
META = "meta.json"
# distill.cache.top_k None: top-64. A causal LM's vocabulary is large (SmolLM2's 49,152 tokens), so full logits
# cost 49,152 x 4 bytes = 192 KiB per target token; 64 values + 64 int32 ids + 1 tail = 516 bytes (~380x less),
# and an instruction-tuned teacher's next-token distribution is peaked enough that the top 64 hold nearly all of
# its mass (the recorded tail mass says how much is left out on the actual data).
DEFAULT_TOP_K = 64
BATCH_SIZE = 8  # the teacher pass's batch (padding changes the float rounding): part of the key
FILES = {"values.npy": np.float32, "indices.npy": np.int32, "lse_rest.npy": np.float32, "offsets.npy": np.int64}


def top_k(configured: int | None, vocab: int) -> int:
    """distill.cache.top_k, DEFAULT_TOP_K when it is None, at most the vocabulary (k = V: no tail bucket)."""
    return min(configured or DEFAULT_TOP_K, vocab)


def first_counted(seq: lm.Seq) -> int:
    """The first logit position of `seq` that counts: position i predicts label i + 1, the labels start at
    `start` (and label 0 never has a predecessor); the counted positions are first_counted .. len(ids) - 2."""
    return max(seq.start, 1) - 1


def counted(seq: lm.Seq) -> int:
    """How many logit positions of `seq` count (what logit_mask keeps for it in any right-padded batch)."""
    return max(0, len(seq.ids) - 1 - first_counted(seq))


def seqs_sha256(seqs: Sequence[lm.Seq]) -> str:
    """The sequences by content and order: sha256 over each one's start, length and token ids (int64)."""
    h = hashlib.sha256(b"kdpipe-causal-lm-seqs-v1\0")
    for s in seqs:
        h.update(np.array([s.start, len(s.ids)], dtype=np.int64).tobytes())
        h.update(np.asarray(s.ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def teacher_identity(teacher: Manifest) -> list[tuple[str, str]] | str:
    """The teacher model's content identity: the teacher stage's recorded (path, sha256) of every file of its model
    folder; its run id when the manifest records none (a teacher stage always does)."""
    info = record(teacher, TeacherRecord).info_as(CausalLMInfo)
    prefix = info.model_dir.rstrip("/") + "/"
    files = sorted((r.path, r.sha256) for r in teacher.outputs if r.path.startswith(prefix))
    return files or teacher.run_id


def lm_key(teacher: Manifest, seqs: Sequence[lm.Seq], k: int) -> str:
    """sha256 hex of the canonical JSON of (format, the teacher's model files, the sequences' sha256, k, precision,
    the teacher pass's batch size)."""
    doc = {
        "format": FORMAT,
        "teacher": teacher_identity(teacher),
        "sequences": seqs_sha256(seqs),
        "top_k": k,
        "precision": "fp32",
        "batch_size": BATCH_SIZE,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def estimate_bytes(seqs: Sequence[lm.Seq], k: int) -> int:
    """The entry's size on disk (what distill.cache.max_gb compares), .npy headers aside."""
    positions = sum(counted(s) for s in seqs)
    return positions * (4 * k + 4 * k + 4) + 8 * (len(seqs) + 1)


def _shapes(n: int, positions: int, k: int) -> dict[str, tuple[int, ...]]:
    return {"values.npy": (positions, k), "indices.npy": (positions, k), "lse_rest.npy": (positions,),
            "offsets.npy": (n + 1,)}  # fmt: skip


class LMCache:
    """An opened (checked) entry: memory-mapped arrays and its meta.json."""

    def __init__(self, directory: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.dir, self.meta = directory, meta
        self.values, self.indices = arrays["values.npy"], arrays["indices.npy"]
        self.lse_rest, self.offsets = arrays["lse_rest.npy"], arrays["offsets.npy"]
        self.k, self.vocab = int(meta["top_k"]), int(meta["vocab"])

    @property
    def positions(self) -> int:
        return int(self.meta["positions"])

    @property
    def bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.meta["files"].values())

    def batch(self, rows: Sequence[int], seqs: Sequence[lm.Seq], width: int) -> tuple[Tensor, Tensor, Tensor]:
        """The cached teacher of the training sequences `rows` (indices into the cached list; `seqs` their
        sequences, in the batch's order) as (B, width, k) values, (B, width, k) indices and (B, width) lse_rest
        at the positions logit_mask counts in `lm.batch(seqs, pad)` (zeros elsewhere)."""
        import torch

        b = len(rows)
        values = np.zeros((b, width, self.k), dtype=np.float32)
        indices = np.zeros((b, width, self.k), dtype=np.int64)
        rest = np.zeros((b, width), dtype=np.float32)
        for j, (i, s) in enumerate(zip(rows, seqs, strict=True)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi - lo != counted(s):
                raise ModelError(
                    f"the causal-LM teacher cache {self.dir} holds {hi - lo} positions for training sequence {i}, "
                    f"the sequence has {counted(s)}",
                    "delete the cache folder (it is rebuilt)",
                )
            p = first_counted(s)
            values[j, p : p + hi - lo] = self.values[lo:hi]
            indices[j, p : p + hi - lo] = self.indices[lo:hi]
            rest[j, p : p + hi - lo] = self.lse_rest[lo:hi]
        return torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(rest)


def problem(directory: Path, key: str) -> str | None:
    """Why the entry in `directory` cannot be used (missing, another key or format, a changed, truncated or
    misshapen file), or None when its meta.json names `key` and every file has the recorded bytes, sha256, dtype
    and shape."""
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
            return f"{directory / META} is for another key or format"
        shapes = _shapes(int(meta["sequences"]), int(meta["positions"]), int(meta["top_k"]))
        for name, dtype in FILES.items():
            path, rec = directory / name, meta["files"][name]
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != int(rec["bytes"]) or sha256_file(path) != rec["sha256"]:
                return f"{path} changed since it was written (its size or sha256 differs from {META}'s)"
            arr = np.load(path, mmap_mode="r")
            if arr.shape != shapes[name] or arr.dtype != dtype:
                return f"{path} is {arr.shape} {arr.dtype}, expected {shapes[name]} {np.dtype(dtype)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory} is unreadable ({e.__class__.__name__}: {e})"
    return None


def open_cache(directory: Path, key: str) -> LMCache | None:
    """The entry in `directory` when `problem` finds nothing, memory-mapped; None otherwise."""
    if not directory.exists() or problem(directory, key) is not None:
        return None
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    return LMCache(directory, meta, {name: np.load(directory / name, mmap_mode="r") for name in FILES})


def _require_finite(rows: Any, i: int, s: lm.Seq) -> None:
    """ModelError naming training sequence i when the teacher's logits on it hold NaN / inf."""
    import torch

    if not bool(torch.isfinite(rows).all()):
        raise ModelError(
            f"the teacher's logits are non-finite (NaN/inf) on training sequence {i} (ids "
            f"{s.ids[:8]}{'...' if len(s.ids) > 8 else ''}): a cache of them would be silently invalid, nothing "
            "was written",
            "check the teacher (NaN weights?)",
        )


def build(
    directory: Path, key: str, teacher: Any, seqs: Sequence[lm.Seq], pad: int, k: int, console: Console | None = None
) -> LMCache:
    """One teacher pass (no_grad, float32) over `seqs` in batches of BATCH_SIZE, their counted positions' top-k
    written into a temporary sibling of `directory` that replaces it, meta.json last. ModelError naming the
    sequence when the teacher's logits there are non-finite (nothing is written)."""
    import torch

    from kdpipe.losses import tokens

    n, start = len(seqs), time.perf_counter()
    offsets = np.concatenate([[0], np.cumsum([counted(s) for s in seqs])]).astype(np.int64)
    positions = int(offsets[-1])
    tail_sum, tail_max, vocab = 0.0, 0.0, 0
    with atomic_dir(directory) as work:
        arrays: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for lo in range(0, n, BATCH_SIZE):
                chunk = seqs[lo : lo + BATCH_SIZE]
                b = lm.batch(chunk, pad)
                z = lm.logits(teacher, b).float()
                if not arrays:
                    vocab = int(z.shape[-1])
                    if not 1 <= k <= vocab:
                        raise ValueError(f"top-k needs 1 <= k <= V = {vocab}, got {k}")
                    for name, shape in _shapes(n, positions, k).items():
                        arrays[name] = np.lib.format.open_memmap(work / name, "w+", dtype=FILES[name], shape=shape)
                    arrays["offsets.npy"][:] = offsets
                mask = tokens.logit_mask(b["labels"])
                for j, s in enumerate(chunk):
                    i = lo + j
                    rows = z[j][mask[j]]  # (counted(s), V), positions first_counted(s) .. len - 2
                    _require_finite(rows, i, s)
                    values, idx, rest = tokens.topk_compress(rows, k)
                    tail = (rest.double() - rows.double().logsumexp(-1)).exp()  # the teacher's tail mass at T = 1
                    tail_sum += float(tail.sum())
                    tail_max = max(tail_max, float(tail.max()) if tail.numel() else 0.0)
                    a, e = int(offsets[i]), int(offsets[i + 1])
                    arrays["values.npy"][a:e] = values.numpy()
                    arrays["indices.npy"][a:e] = idx.numpy().astype(np.int32)
                    arrays["lse_rest.npy"][a:e] = rest.numpy()
        for arr in arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        arrays.clear()
        files = {name: {"sha256": sha256_file(work / name), "bytes": (work / name).stat().st_size} for name in FILES}
        meta = {
            "format": FORMAT, "key": key, "top_k": k, "vocab": vocab, "sequences": n, "positions": positions,
            "tail_mass_mean": tail_sum / max(1, positions), "tail_mass_max": tail_max,
            "build_seconds": round(time.perf_counter() - start, 3), "files": files,
        }  # fmt: skip
        write_json_atomic(work / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    opened = open_cache(directory, key)
    assert opened is not None, f"the causal-LM teacher cache {directory} just built opens"
    if console is not None:
        console.print(f"causal-LM teacher cache: {positions} positions built in {meta['build_seconds']:.1f} s")
    return opened


def bypass_reason(cfg: DistillConfig, needs_teacher: bool, on_policy: float, seqs: Sequence[lm.Seq], k: int,
                  ctx: RunContext) -> str | None:  # fmt: skip
    """Why the teacher's top-k are not cached (None: they are)."""
    if not needs_teacher:
        return "no KD term reads the teacher"
    if not cfg.cache.use:
        return "distill.cache.use is false: the teacher runs on every batch (dense losses)"
    if on_policy >= 1:
        return "distill.lm.on_policy is 1: every KD batch is the student's samples, scored by the live teacher"
    if ctx.cache_root is None:
        return "no cache directory (the runner gave none)"
    size = estimate_bytes(seqs, k)
    if size > cfg.cache.max_gb * 1e9:
        return f"it would take {size / 1e9:.1f} GB, over distill.cache.max_gb = {cfg.cache.max_gb:g}"
    return None


def teacher_topk(
    cfg: DistillConfig, t_manifest: Manifest, teacher: Any, seqs: Sequence[lm.Seq], pad: int, needs_teacher: bool,
    on_policy: float, work: Path, ctx: RunContext,
) -> tuple[LMCache | None, dict[str, Any]]:  # fmt: skip
    """The teacher's top-k on `seqs` and what DistillRecord.teacher_cache records: opened from the cache (hit),
    computed once into it (built; a broken entry is rebuilt with one console line saying why), or not cached
    (bypassed, and why; the caller runs the teacher on every batch)."""
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    k = top_k(cfg.cache.top_k, vocab)
    reason = bypass_reason(cfg, needs_teacher, on_policy, seqs, k, ctx)
    if reason is not None:
        if needs_teacher:
            ctx.console.print(f"causal-LM teacher cache bypassed: {reason}")
        return None, {"status": "bypassed", "reason": reason}
    assert ctx.cache_root is not None
    key = lm_key(t_manifest, seqs, k)
    directory = ctx.cache_root / FOLDER / key[:16]
    here = os.path.relpath(directory.resolve(), work.resolve())
    rebuilt = None
    found = open_cache(directory, key)
    status = "hit"
    if found is None:
        if directory.exists():
            rebuilt = (problem(directory, key) or f"{directory}: unreadable").replace(str(directory), here)
            ctx.console.print(f"[yellow]causal-LM teacher cache rebuilt[/]: {rebuilt}")
        found, status = build(directory, key, teacher, seqs, pad, k), "built"
    info = {
        "status": status, "key": key, "dir": here, "top_k": k, "vocab": found.vocab, "sequences": len(seqs),
        "positions": found.positions, "tail_mass_mean": round(float(found.meta["tail_mass_mean"]), 6),
        "tail_mass_max": round(float(found.meta["tail_mass_max"]), 6), "bytes": found.bytes,
        "build_seconds": float(found.meta["build_seconds"]) if status == "built" else 0.0,
    }  # fmt: skip
    ctx.console.print(
        f"causal-LM teacher cache {status}: top-{k} of {found.vocab} at {found.positions} positions, "
        f"{found.bytes:,} bytes, teacher tail mass mean {info['tail_mass_mean']:.2e} / max "
        f"{info['tail_mass_max']:.2e}" + (f", built in {info['build_seconds']:.1f} s" if status == "built" else "")
    )
    return found, info | ({"rebuilt_because": rebuilt} if rebuilt else {})
