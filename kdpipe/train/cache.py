"""The teacher-output cache: the teacher's outputs on the transfer set, computed once and memory-mapped.

`build_cache` runs the teacher once over the transfer set and writes what the objective reads into
`<root>/<key[:16]>/` as .npy files; `open_cache` memory-maps them (np.load(mmap_mode="r")) after checking
every file's sha256; `TeacherCache.outputs(index, ...)` gives a batch's teacher KDOutputs that every loss
term reads exactly like the live teacher's. The key (`cache_key`) covers the teacher, the transfer set's
token ids (`data_sha256`) and the CacheSpec (what is stored, and the precision the teacher ran in), so
any change rebuilds.

What is cached is what the objective reads (`teacher_reads`): the logits always, and only the hidden
states / attention maps whose indices some term reads. Features are stored RAGGED, only each example's
real tokens (padding to the longest would waste 2-3x): hidden.npy is (total tokens, cached layers, H),
attentions.npy one flat run of (cached layers, heads, n_i, n_i) per example; `outputs` pads them back to
the batch's width with zeros, which no term reads (every feature loss selects padding out).

Sparse KD (top-k). With `top_k = k` the cache keeps, per example, the k largest logits v_A (at their
indices A) and rho = log-sum-exp of the other C - k logits. `outputs` reconstructs dense logits v_hat: v_A
at A, every other logit rho - log(C - k). Let p = SM(v), p_hat = SM(v_hat), r = sum_{j not in A} p[j] the
teacher's tail mass, and KL(SM(v/T) || SM(z/T)) the soft term, whose gradient w.r.t. the student logits z
is (q - p_T) / T (q = SM(z/T)). Error bound:

- T = 1: p_hat[A] = p[A] exactly (the same top-k logits and the same partition sum_A e^v + e^rho) and
  p_hat has the same tail mass r, spread uniformly, so ||p_hat - p||_1 = sum_{j not in A} |r / (C - k) -
  p[j]| <= 2 r, and the soft term's gradient changes by (p - p_hat) / T: at most 2 r in L1 norm.
- T != 1: within A both distributions are SM(v_A / T) (the same logits) but the tail masses differ; with
  r_T, r_hat_T the tail masses of p_T, p_hat_T, ||p_hat_T - p_T||_1 <= |r_T - r_hat_T| + r_T + r_hat_T =
  2 max(r_T, r_hat_T), so the gradient changes by at most 2 max(r_T, r_hat_T) / T in L1 norm (hinton's
  T^2 factor scales that to 2 T max(r_T, r_hat_T)).

The bound is tight: with the whole tail mass on one class ||p_hat - p||_1 = 2 r (1 - 1 / (C - k)).
`TeacherCache.tail_mass` reports the mean and max of r over the transfer set. The argmax (the label the
training loop gives an unlabeled row) is unchanged. Only the distribution is preserved, not the tail's raw
logits: logit_mse, which regresses raw logits, regresses the flattened tail under top-k.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import operator
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdpipe.artifacts.manifest import atomic_dir, sha256_file, write_json_atomic
from kdpipe.errors import ArtifactError, DataError, ModelError

if TYPE_CHECKING:
    from rich.console import Console
    from torch import Tensor

    from kdpipe.config import CacheConfig
    from kdpipe.data.tables import Encoded
    from kdpipe.losses.objective import Objective
    from kdpipe.models.loading import KDOutputs
    from kdpipe.train.loop import Device

FORMAT = 1  # the on-disk layout; part of the key, so a layout change rebuilds
META = "cache.json"
FULL_LOGITS_UP_TO = 1024  # classes; above that the default is top-DEFAULT_TOP_K
DEFAULT_TOP_K = 64
_FEATURE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
_PRECISIONS = ("fp32", "bf16", "fp16")


class CacheMissError(ArtifactError):
    """A loss read a teacher hidden state / attention map that the cache does not hold."""


# --------------------------------------------------------------------------- spec and key
@dataclass(frozen=True)
class CacheSpec:
    """What a cache stores: the logits (full or top-k), which teacher features, in what storage dtype, and
    the precision the teacher ran in (bf16 outputs are other numbers than fp32 ones)."""

    top_k: int | None  # None: full (N, C) logits; k: top-k values + indices and the log-sum-exp of the rest
    hidden: tuple[int, ...]  # teacher hidden_states indices cached (0 = embeddings), sorted
    attentions: tuple[int, ...]  # teacher attentions indices cached (0-based layer), sorted
    features_dtype: str  # "fp32" | "fp16" storage of hidden states / attention maps
    precision: str  # the precision the teacher ran in ("fp32" | "bf16")

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"CacheSpec.top_k must be None or >= 1, got {self.top_k}")
        for name, idx in (("hidden", self.hidden), ("attentions", self.attentions)):
            if list(idx) != sorted(set(idx)) or any(i < 0 for i in idx):
                raise ValueError(f"CacheSpec.{name} must be sorted, distinct and >= 0, got {idx}")
        if self.features_dtype not in _FEATURE_DTYPES:
            raise ValueError(f"CacheSpec.features_dtype must be fp32 or fp16, got {self.features_dtype!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"CacheSpec.precision must be fp32, bf16 or fp16, got {self.precision!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "hidden": list(self.hidden),
            "attentions": list(self.attentions),
            "features_dtype": self.features_dtype,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        top_k = d["top_k"]
        return cls(
            top_k=None if top_k is None else int(top_k),
            hidden=tuple(int(i) for i in d["hidden"]),
            attentions=tuple(int(i) for i in d["attentions"]),
            features_dtype=str(d["features_dtype"]),
            precision=str(d["precision"]),
        )


def plan(
    cfg: CacheConfig, num_labels: int, hidden: tuple[int, ...], attentions: tuple[int, ...], precision: str
) -> CacheSpec:
    """The spec for distill.cache and the indices the objective reads (`teacher_reads`): top_k = cfg.top_k when
    given (None, full logits, when it is >= num_labels), else full logits up to 1024 classes and top-64 above."""
    if cfg.top_k is not None:
        top_k = None if cfg.top_k >= num_labels else cfg.top_k
    else:
        top_k = None if num_labels <= FULL_LOGITS_UP_TO else DEFAULT_TOP_K
    return CacheSpec(
        top_k=top_k,
        hidden=tuple(sorted(set(hidden))),
        attentions=tuple(sorted(set(attentions))),
        features_dtype=cfg.features_dtype,
        precision=precision,
    )


def data_sha256(data: Encoded) -> str:
    """The transfer set by content: every example's length and token ids, in order (labels and the pad id
    excluded: they do not change the teacher's outputs on real tokens)."""
    lengths = np.fromiter((len(x) for x in data.ids), dtype="<i8", count=len(data.ids))
    ids = np.fromiter(itertools.chain.from_iterable(data.ids), dtype="<i8", count=int(lengths.sum()))
    h = hashlib.sha256(b"kdpipe-transfer-ids-v1\0")
    h.update(lengths.tobytes())
    h.update(ids.tobytes())
    return h.hexdigest()


def cache_key(teacher_id: str, data_hash: str, spec: CacheSpec) -> str:
    """sha256 hex of the canonical JSON of (format, teacher id, data hash, spec)."""
    doc = {"format": FORMAT, "teacher": teacher_id, "data": data_hash, "spec": spec.as_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Dims:
    """The sizes a cache's arrays follow from: examples' lengths, classes, width, heads."""

    lengths: np.ndarray  # (N,) int64
    num_labels: int
    hidden_size: int
    heads: int

    def files(self, spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Every array of the cache: file name -> (shape, numpy dtype)."""
        n = len(self.lengths)
        out: dict[str, tuple[tuple[int, ...], Any]] = {"lengths.npy": ((n,), np.int32)}
        if spec.top_k is None:
            out["logits.npy"] = ((n, self.num_labels), np.float32)
        else:
            out["topk_values.npy"] = ((n, spec.top_k), np.float32)
            out["topk_indices.npy"] = ((n, spec.top_k), np.int32)
            out["lse_rest.npy"] = ((n,), np.float32)
        feat = _FEATURE_DTYPES[spec.features_dtype]
        if spec.hidden:
            out["hidden.npy"] = ((int(self.lengths.sum()), len(spec.hidden), self.hidden_size), feat)
        if spec.attentions:
            per_token2 = len(spec.attentions) * self.heads
            out["attentions.npy"] = ((int((self.lengths**2).sum()) * per_token2,), feat)
        return out


def _npy_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """The size of a .npy file as np.lib.format.open_memmap writes it (header + data)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue()) + math.prod(shape) * np.dtype(dtype).itemsize


def _config_int(config: Any, names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(
        f"the teacher's config has no {what} ({' / '.join(names)})", "use an encoder with a standard HF config"
    )


def estimate_bytes(data: Encoded, spec: CacheSpec, config: Any) -> int:
    """The bytes the cache of `data` under `spec` takes on disk (its arrays; exact for this layout), from the
    teacher's HF config (hidden_size, num_attention_heads, num_labels): what distill.cache.max_gb compares."""
    dims = _Dims(
        lengths=np.fromiter((len(x) for x in data.ids), dtype=np.int64, count=len(data.ids)),
        num_labels=_config_int(config, ("num_labels",), "number of labels"),
        hidden_size=_config_int(config, ("hidden_size", "dim", "d_model"), "hidden width") if spec.hidden else 0,
        heads=_config_int(config, ("num_attention_heads", "n_heads"), "attention head count") if spec.attentions else 0,
    )
    return sum(_npy_bytes(shape, dtype) for shape, dtype in dims.files(spec).values())


# --------------------------------------------------------------------------- teacher_reads
class _Recording(tuple[Any, ...]):
    """A teacher output tuple that records every index read: an index (negative ones normalised), a slice's
    indices, or all of them on iteration. (C-level access such as torch.stack(tuple) bypasses it.)"""

    seen: set[int]

    def __new__(cls, items: tuple[Any, ...], seen: set[int]) -> _Recording:
        obj = super().__new__(cls, items)
        obj.seen = seen
        return obj

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            self.seen.update(range(*i.indices(len(self))))
        else:
            j = operator.index(i)
            if -len(self) <= j < len(self):
                self.seen.add(j % len(self))
        return super().__getitem__(i)

    def __iter__(self) -> Iterator[Any]:
        self.seen.update(range(len(self)))
        return super().__iter__()


def teacher_reads(objective: Objective, s_out: KDOutputs, t_out: KDOutputs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(hidden_states indices, attentions indices) of the teacher that the objective's terms read, found by
    running each teacher term once on real outputs of one batch with every layer active (term(s, t, None)),
    its logit_fn and its progress measure on every mapped layer, under no_grad, with t_out's tuples replaced
    by recording ones. s_out / t_out: forward_kd of both models with the hidden states and attentions the
    objective needs (objective.needs_hidden / needs_attentions); unlabeled rows take the teacher's argmax."""
    import torch

    from kdpipe.losses.objective import Term

    y = s_out.labels
    if y is None or bool((y < 0).any()):
        t_arg = t_out.logits.argmax(-1)
        y = t_arg if y is None else torch.where(y < 0, t_arg, y)
    hidden_seen: set[int] = set()
    att_seen: set[int] = set()
    s = replace(s_out, labels=y)
    t = replace(
        t_out,
        labels=y,
        hidden_states=None if t_out.hidden_states is None else _Recording(tuple(t_out.hidden_states), hidden_seen),
        attentions=None if t_out.attentions is None else _Recording(tuple(t_out.attentions), att_seen),
    )
    with torch.no_grad():
        for term in objective.terms:
            assert isinstance(term, Term)
            if not term.needs_teacher:
                continue
            term(s, t, None)
            if term.logit_fn is not None:
                term.logit_fn(s, t)
            if term.progress is not None and s.hidden_states is not None and t.hidden_states is not None:
                for m, n in term.layer_map.items():
                    term.progress(s, t, m, n)
    return tuple(sorted(hidden_seen)), tuple(sorted(att_seen))


# --------------------------------------------------------------------------- sparse logits
def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C) -> the k largest logits (B, k) float32, their indices (B, k) and the log-sum-exp of the other
    C - k logits (B,)."""
    import torch

    z = logits.float()
    values, indices = torch.topk(z, k, dim=-1)
    lse_rest = torch.logsumexp(z.scatter(-1, indices, float("-inf")), dim=-1)
    return values, indices, lse_rest


def reconstruct_logits(values: Tensor, indices: Tensor, lse_rest: Tensor, num_classes: int) -> Tensor:
    """Dense (B, C) float32 logits from `topk_compress`: the top-k at their indices, every other logit
    lse_rest - log(C - k), so the tail carries exactly the teacher's tail mass (see the module docstring)."""
    k = values.shape[-1]
    if not 0 < k < num_classes:
        raise ValueError(f"reconstruct_logits needs 0 < k < C, got k={k}, C={num_classes}")
    fill = (lse_rest.float() - math.log(num_classes - k))[..., None]
    dense = fill.expand(*values.shape[:-1], num_classes).clone()
    return dense.scatter_(-1, indices.long(), values.float())


# --------------------------------------------------------------------------- reading
class _NotCached:
    """What an uncached slot of a cached output tuple holds: any use raises CacheMissError."""

    def __init__(self, what: str, j: int, cached: tuple[int, ...]) -> None:
        object.__setattr__(self, "_slot", (what, j, cached))

    def __getattr__(self, name: str) -> Any:
        raise _miss(*object.__getattribute__(self, "_slot"))

    def __repr__(self) -> str:
        return "<not in the teacher-output cache>"


class _Partial(tuple[Any, ...]):
    """A teacher output tuple of its full length with only the cached slots; reading another one (by index,
    slice or iteration) raises CacheMissError naming it."""

    what: str
    cached: tuple[int, ...]

    def __new__(cls, items: tuple[Any, ...], what: str, cached: tuple[int, ...]) -> _Partial:
        obj = super().__new__(cls, items)
        obj.what, obj.cached = what, cached
        return obj

    def _check(self, j: int) -> None:
        if j not in self.cached:
            raise _miss(self.what, j, self.cached)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            for j in range(*i.indices(len(self))):
                self._check(j)
        else:
            j = operator.index(i)
            if -len(self) <= j < len(self):
                self._check(j % len(self))
        return super().__getitem__(i)

    def __iter__(self) -> Iterator[Any]:
        for j in range(len(self)):
            yield self[j]


def _miss(what: str, j: int, cached: tuple[int, ...]) -> CacheMissError:
    return CacheMissError(
        f"the teacher's {what}[{j}] is not in the teacher-output cache (it holds {what} {list(cached)})",
        "kdpipe.train.cache.teacher_reads did not see a loss term read it: set distill.cache.use: false and report it",
    )


def _full_tuple(tensors: dict[int, Any], slots: int, what: str) -> tuple[Any, ...]:
    cached = tuple(sorted(tensors))
    items = tuple(tensors[j] if j in tensors else _NotCached(what, j, cached) for j in range(slots))
    return items if len(cached) == slots else _Partial(items, what, cached)


class TeacherCache:
    """An opened, verified cache: memory-mapped arrays (`arrays`, name -> np.memmap) and `outputs`, the
    teacher's KDOutputs of a batch's examples."""

    def __init__(self, directory: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.dir = directory
        self.spec = CacheSpec.from_dict(meta["spec"])
        self.key: str = meta["key"]
        self.n: int = int(meta["n"])
        self.num_labels: int = int(meta["num_labels"])
        self.hidden_slots: int = int(meta["hidden_slots"])  # len(hidden_states) of the teacher (L + 1)
        self.attention_slots: int = int(meta["attention_slots"])  # len(attentions) (L)
        self.heads: int = int(meta["heads"])
        self.arrays = arrays
        self.bytes: int = sum(int(f["bytes"]) for f in meta["files"].values())
        tail = meta.get("tail_mass")
        self.tail_mass: tuple[float, float] | None = None if tail is None else (float(tail[0]), float(tail[1]))
        self.seconds: float = float(meta.get("seconds", 0.0))  # the build's teacher pass
        self._lengths = np.asarray(arrays["lengths.npy"], dtype=np.int64)
        self._tok_off = np.concatenate([[0], np.cumsum(self._lengths)])
        att_per_example = len(self.spec.attentions) * self.heads * self._lengths**2
        self._att_off = np.concatenate([[0], np.cumsum(att_per_example)])

    @property
    def bytes_per_example(self) -> float:
        return self.bytes / max(self.n, 1)

    def outputs(self, index: Tensor, attention_mask: Tensor, labels: Tensor | None, device: str) -> KDOutputs:
        """The teacher's KDOutputs for the examples `index` (B,) of a batch padded to attention_mask.shape[1],
        every tensor float32 on `device`: logits (B, C) (top-k: dense, `reconstruct_logits`); hidden_states a
        tuple of the teacher's full length (L + 1) whose cached slots are (B, W, H) (zeros on padding) and
        whose other slots raise CacheMissError when read; attentions likewise, (B, heads, W, W); None when
        nothing of the kind is cached. attention_mask and labels as given."""

        from kdpipe.models.loading import KDOutputs

        idx = np.asarray(index.detach().cpu().numpy(), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"teacher-output cache {self.dir}: index out of range 0..{self.n - 1}")
        width = int(attention_mask.shape[1])
        n = self._lengths[idx]
        real = np.arange(width)[None, :] < n[:, None]  # (B, W)
        if not np.array_equal(attention_mask.detach().cpu().numpy() != 0, real):
            raise ArtifactError(
                f"teacher-output cache {self.dir}: the batch's attention mask does not match the cached lengths "
                "of its examples (another transfer set, or an index that is not the examples' positions)",
                "read the cache with the batches' own 'index' (kdpipe.data.tables.batches(..., with_index=True))",
            )
        hidden = self._hidden(idx, n, real, device) if self.spec.hidden else None
        attentions = self._attentions(idx, n, width, device) if self.spec.attentions else None
        return KDOutputs(
            logits=self._logits(idx).to(device),
            hidden_states=hidden,
            attentions=attentions,
            attention_mask=attention_mask,
            labels=labels,
        )

    def _logits(self, idx: np.ndarray) -> Tensor:
        """(B, C) float32: the cached logits, or the dense reconstruction of the top-k ones."""
        import torch

        if self.spec.top_k is None:
            return torch.from_numpy(np.array(self.arrays["logits.npy"][idx], dtype=np.float32))
        return reconstruct_logits(
            torch.from_numpy(np.array(self.arrays["topk_values.npy"][idx], dtype=np.float32)),
            torch.from_numpy(np.array(self.arrays["topk_indices.npy"][idx], dtype=np.int64)),
            torch.from_numpy(np.array(self.arrays["lse_rest.npy"][idx], dtype=np.float32)),
            self.num_labels,
        )

    def _hidden(self, idx: np.ndarray, n: np.ndarray, real: np.ndarray, device: str) -> tuple[Tensor, ...]:
        """The cached hidden states of the examples `idx` (lengths n), padded to the batch (real: (B, W))."""
        import torch

        spec = self.spec
        starts = self._tok_off[idx]
        first = np.concatenate([[0], np.cumsum(n)[:-1]])  # each example's first row in the gathered block
        rows = np.repeat(starts - first, n) + np.arange(int(n.sum()))
        gathered = np.asarray(self.arrays["hidden.npy"][rows], dtype=np.float32)  # (sum n, layers, H)
        padded = np.zeros((len(spec.hidden), len(idx), real.shape[1], gathered.shape[-1]), dtype=np.float32)
        padded[:, real] = gathered.transpose(1, 0, 2)
        per_layer = torch.from_numpy(padded).to(device)
        return _full_tuple(dict(zip(spec.hidden, per_layer.unbind(0), strict=True)), self.hidden_slots, "hidden_states")

    def _attentions(self, idx: np.ndarray, n: np.ndarray, width: int, device: str) -> tuple[Tensor, ...]:
        """The cached attention maps of the examples `idx` (lengths n), padded to (B, heads, W, W)."""
        import torch

        la, h = len(self.spec.attentions), self.heads
        att = np.zeros((la, len(idx), h, width, width), dtype=np.float32)
        flat = self.arrays["attentions.npy"]
        for b, (i, n_i) in enumerate(zip(idx, n, strict=True)):
            att[:, b, :, :n_i, :n_i] = flat[self._att_off[i] : self._att_off[i + 1]].reshape(la, h, n_i, n_i)
        per_layer = torch.from_numpy(att).to(device)
        maps = dict(zip(self.spec.attentions, per_layer.unbind(0), strict=True))
        return _full_tuple(maps, self.attention_slots, "attentions")


def _read_meta(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is not an object")
    return meta


def _problem(directory: Path, key: str) -> tuple[str | None, dict[str, Any], dict[str, np.ndarray]]:
    """(why the cache in `directory` cannot be used or None, its metadata, its memory-mapped arrays)."""
    if not (directory / META).is_file():
        return f"{directory}: no {META} (no cache, or an interrupted build)", {}, {}
    try:
        meta = _read_meta(directory)
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return f"{directory}: {META} is for another key or format", {}, {}
        spec = CacheSpec.from_dict(meta["spec"])
        records = meta["files"]
        arrays: dict[str, np.ndarray] = {}
        lengths = np.load(directory / "lengths.npy", mmap_mode="r")
        dims = _Dims(
            np.asarray(lengths, dtype=np.int64), int(meta["num_labels"]), int(meta["hidden_size"]), int(meta["heads"])
        )
        expected = dims.files(spec)
        if set(records) != set(expected) or len(lengths) != int(meta["n"]):
            return f"{directory}: {META} lists other files than its spec needs", {}, {}
        for name, (shape, dtype) in expected.items():
            path = directory / name
            if not path.is_file():
                return f"{path}: missing", {}, {}
            rec = records[name]
            if path.stat().st_size != int(rec["bytes"]) or sha256_file(path) != rec["sha256"]:
                return f"{path}: changed since it was written (sha256 differs)", {}, {}
            arr = np.load(path, mmap_mode="r")
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                return f"{path}: shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}", {}, {}
            arrays[name] = arr
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory}: unreadable cache ({e.__class__.__name__}: {e})", {}, {}
    return None, meta, arrays


def cache_problem(root: Path, key: str) -> str | None:
    """Why `open_cache(root, key)` gives None (a line for the manifest / log), or None when it opens."""
    return _problem(Path(root) / key[:16], key)[0]


def open_cache(root: Path, key: str) -> TeacherCache | None:
    """The cache `<root>/<key[:16]>/` when complete and intact: its cache.json names the key, the spec, n and
    every file's size and sha256, and every file has those bytes (hashed by content) and the shape the spec
    gives. Anything missing, truncated or changed -> None (the caller rebuilds; `cache_problem` says why)."""
    directory = Path(root) / key[:16]
    why, meta, arrays = _problem(directory, key)
    return None if why is not None else TeacherCache(directory, meta, arrays)


# --------------------------------------------------------------------------- building
class _Writer:
    """The cache's arrays, opened as writable memmaps once the first batch gives the teacher's sizes."""

    def __init__(self, work: Path, spec: CacheSpec, lengths: np.ndarray) -> None:
        self.work, self.spec, self.lengths = work, spec, lengths
        self.tok_off = np.concatenate([[0], np.cumsum(lengths)])
        self.tail = np.zeros(len(lengths), dtype=np.float64) if spec.top_k is not None else None
        self.arrays: dict[str, np.ndarray] = {}
        self.dims: _Dims | None = None
        self.hidden_slots = self.attention_slots = 0
        self.att_off = self.tok_off

    def _open(self, out: KDOutputs) -> None:
        spec = self.spec
        if out.logits.dim() != 2:
            raise ModelError(
                f"the teacher-output cache holds classifier logits (B, C); the teacher gave {tuple(out.logits.shape)}",
                "set distill.cache.use: false for this teacher",
            )
        num_labels = int(out.logits.shape[-1])
        if spec.top_k is not None and spec.top_k >= num_labels:
            raise ValueError(
                f"CacheSpec.top_k={spec.top_k} needs more than {num_labels} classes (kdpipe.train.cache.plan)"
            )
        hs, att = out.hidden_states or (), out.attentions or ()
        self.hidden_slots, self.attention_slots = len(hs), len(att)
        for what, idx, slots in (("hidden_states", spec.hidden, len(hs)), ("attentions", spec.attentions, len(att))):
            if idx and idx[-1] >= slots:
                raise ModelError(
                    f"the cache spec asks for teacher {what} {list(idx)}, the teacher has {slots}",
                    "build the spec from this teacher's outputs (kdpipe.train.cache.teacher_reads)",
                )
        hidden_size = int(hs[0].shape[-1]) if spec.hidden else 0
        heads = int(att[0].shape[1]) if spec.attentions else 0
        self.dims = _Dims(self.lengths, num_labels, hidden_size, heads)
        self.att_off = np.concatenate([[0], np.cumsum(len(spec.attentions) * heads * self.lengths**2)])
        for name, (shape, dtype) in self.dims.files(spec).items():
            self.arrays[name] = np.lib.format.open_memmap(self.work / name, mode="w+", dtype=dtype, shape=shape)
        self.arrays["lengths.npy"][:] = self.lengths

    def write(self, idx: np.ndarray, out: KDOutputs) -> None:
        """The outputs of the examples `idx` (a padded batch of them, in that order)."""
        import torch

        if self.dims is None:
            self._open(out)
        spec = self.spec
        logits = out.logits.float()
        if not bool(torch.isfinite(logits).all()):
            _non_finite("logits", idx, logits)
        if spec.top_k is None:
            self.arrays["logits.npy"][idx] = logits.cpu().numpy()
        else:
            assert self.tail is not None
            values, indices, lse_rest = topk_compress(logits, spec.top_k)
            self.arrays["topk_values.npy"][idx] = values.cpu().numpy()
            self.arrays["topk_indices.npy"][idx] = indices.cpu().numpy().astype(np.int32)
            self.arrays["lse_rest.npy"][idx] = lse_rest.cpu().numpy()
            lse_all = logits.double().logsumexp(-1)
            self.tail[idx] = (lse_rest.double() - lse_all).exp().cpu().numpy()
        n = self.lengths[idx]
        store = _FEATURE_DTYPES[spec.features_dtype]
        if spec.hidden:
            assert out.hidden_states is not None
            hs = [out.hidden_states[j].float().cpu().numpy() for j in spec.hidden]  # each (B, W, H)
            stacked = np.stack(hs, axis=2)  # (B, W, layers, H)
            for b, (i, n_i) in enumerate(zip(idx, n, strict=True)):
                self.arrays["hidden.npy"][self.tok_off[i] : self.tok_off[i + 1]] = _finite(
                    stacked[b, :n_i].astype(store), "hidden states", i, spec
                )
        if spec.attentions:
            assert out.attentions is not None
            flat = self.arrays["attentions.npy"]
            for j, layer in enumerate(spec.attentions):
                a = out.attentions[layer].float().cpu().numpy()  # (B, heads, W, W)
                for b, (i, n_i) in enumerate(zip(idx, n, strict=True)):
                    size = a.shape[1] * n_i * n_i
                    start = self.att_off[i] + j * size
                    block = _finite(a[b, :, :n_i, :n_i].astype(store), "attention maps", i, spec)
                    flat[start : start + size] = block.reshape(-1)

    def finish(self, key: str, seconds: float) -> dict[str, Any]:
        """Flush and close the arrays; the cache.json document (files hashed by content)."""
        assert self.dims is not None
        for arr in self.arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        self.arrays.clear()
        files = {}
        for name in self.dims.files(self.spec):
            path = self.work / name
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        tail = None if self.tail is None else [float(self.tail.mean()), float(self.tail.max())]
        return {
            "format": FORMAT,
            "key": key,
            "spec": self.spec.as_dict(),
            "n": len(self.lengths),
            "num_labels": self.dims.num_labels,
            "hidden_size": self.dims.hidden_size,
            "heads": self.dims.heads,
            "hidden_slots": self.hidden_slots,
            "attention_slots": self.attention_slots,
            "tail_mass": tail,
            "seconds": round(seconds, 3),
            "files": files,
        }


def _non_finite(what: str, idx: np.ndarray, rows: Tensor) -> None:
    import torch

    bad = (~torch.isfinite(rows)).any(-1).cpu().numpy()
    examples = [int(i) for i in idx[bad]]
    raise ModelError(
        f"the teacher's outputs are non-finite (NaN/inf {what}) on {len(examples)} transfer examples "
        f"(e.g. example {min(examples)}): a cache of them would be silently invalid, nothing was written",
        "check the teacher (a diverged fine-tune, NaN weights) or run it in fp32 (distill.precision)",
    )


def _finite(x: np.ndarray, what: str, example: int, spec: CacheSpec) -> np.ndarray:
    if not np.isfinite(x).all():
        overflow = spec.features_dtype == "fp16"
        raise ModelError(
            f"the teacher's {what} on transfer example {example} are non-finite (NaN/inf"
            f"{', or beyond the fp16 range' if overflow else ''}): nothing was written",
            "set distill.cache.features_dtype: fp32" if overflow else "check the teacher (NaN weights?)",
        )
    return x


def build_cache(
    root: Path,
    key: str,
    teacher: Any,
    data: Encoded,
    spec: CacheSpec,
    device: Device,
    console: Console | None = None,
    batch_size: int = 64,
) -> TeacherCache:
    """One teacher pass over `data` (eval mode, torch.inference_mode, device.autocast(); inputs on
    device.torch_device, where the teacher must already be), in batches of similar length (less padding),
    written into a temporary sibling of `<root>/<key[:16]>/` that is renamed into place with cache.json
    written last, so a killed build never looks complete. A progress bar on `console` when given.
    Raises ModelError on non-finite teacher outputs (nothing is written). Returns the opened cache."""
    import torch

    from kdpipe.data.tables import collate
    from kdpipe.models.loading import forward_kd

    n = len(data)
    lengths = np.fromiter((len(x) for x in data.ids), dtype=np.int64, count=n)
    if n == 0 or int(lengths.min()) == 0:
        raise DataError("the transfer set is empty or has an empty example: nothing to cache", "check distill.transfer")
    final = Path(root) / key[:16]
    order = np.argsort(lengths, kind="stable")
    starts = list(range(0, n, batch_size))
    was_training = bool(getattr(teacher, "training", False))
    teacher.eval()
    t0 = time.perf_counter()
    try:
        with atomic_dir(final) as work, _bar(console, n) as advance:
            writer = _Writer(work, spec, lengths)
            for start in starts:
                idx = order[start : start + batch_size]
                batch = collate([data.ids[i] for i in idx], data.pad_id)
                batch = {k: v.to(device.torch_device) for k, v in batch.items()}
                with torch.inference_mode(), device.autocast():
                    out = forward_kd(teacher, batch, bool(spec.hidden), bool(spec.attentions))
                writer.write(idx, out)
                advance(len(idx))
            meta = writer.finish(key, time.perf_counter() - t0)
            write_json_atomic(work / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    finally:
        teacher.train(was_training)
    arrays = {name: np.load(final / name, mmap_mode="r") for name in meta["files"]}
    return TeacherCache(final, meta, arrays)


@contextmanager
def _bar(console: Console | None, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar for the teacher pass on `console` (nothing without one); yields advance(k)."""
    if console is None:
        yield lambda k: None
        return
    from kdpipe.train.loop import _progress

    with _progress(console, training=False) as progress:
        task = progress.add_task("teacher cache", total=total)
        yield lambda k: progress.advance(task, k)
