"""The space `kdpipe search` explores (a recipe's future `search:` section) and the candidates in it.

A candidate is one student shape (depth, heads and FFN fractions removed), one precision it ships in and one
distillation budget. Its `key()` names the whole candidate; its `arch_key()` only what its latency and size
depend on (not the epochs), so candidates that differ only in training share one cost measurement
(kdpipe.search.costs). `student_overrides` turns a candidate into the `--set` strings of a normal run.
Cheap to import: no torch, no optuna.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdpipe.config import MAX_DEPTH as MAX_DEPTH
from kdpipe.config import MAX_EPOCHS as MAX_EPOCHS
from kdpipe.config import PRECISIONS as PRECISIONS
from kdpipe.config import Precision, SearchSpace, TargetProfile
from kdpipe.errors import ConfigError


def _digest(data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces), first 16 hex digits."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Candidate:
    """One point of the space. Numbers are normalised (int depth, float fractions and epochs) so that
    `Candidate(3, 0, 0, ...)` and `Candidate(3, 0.0, 0.0, ...)` are the same candidate with the same keys."""

    layers: int
    heads: float
    ffn: float
    precision: Precision
    epochs: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", int(self.layers))
        for name in ("heads", "ffn", "epochs"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def arch(self) -> dict[str, Any]:
        """What the candidate's latency, size and memory depend on (its weights do not: so not the epochs)."""
        return {"layers": self.layers, "heads": self.heads, "ffn": self.ffn, "precision": self.precision}

    def key(self) -> str:
        """A stable name of the whole candidate: 16 hex digits of sha256 over its canonical JSON."""
        return _digest({**self.arch(), "epochs": self.epochs})

    def arch_key(self) -> str:
        """A stable name of its architecture: candidates differing only in epochs share it (and one cost)."""
        return _digest(self.arch())


def candidates(space: SearchSpace, teacher_layers: int, note: Callable[[str], None] | None = None) -> list[Candidate]:
    """The grid of the space in a fixed order (layers, heads, ffn, precision, epochs, each as listed). Depths
    above the teacher's are dropped, said once through `note` (default: a UserWarning); nothing left is a
    ConfigError in one line, raised before anything is built or trained."""
    if teacher_layers < 1:
        raise ConfigError(f"the teacher has {teacher_layers} layers", "a search needs a teacher with layers")
    depths = [d for d in space.layers if d <= teacher_layers]
    dropped = [d for d in space.layers if d > teacher_layers]
    if not depths:
        raise ConfigError(
            f"every depth in search.layers ({', '.join(map(str, space.layers))}) exceeds the teacher's "
            f"{teacher_layers} layers",
            f"give depths from 1 to {teacher_layers}, e.g. search.layers: [{max(1, teacher_layers // 2)}]",
        )
    if dropped:
        text = (
            f"search.layers: {', '.join(map(str, dropped))} exceed(s) the teacher's {teacher_layers} layers; "
            "dropped from the search"
        )
        if note is None:
            warnings.warn(text, UserWarning, stacklevel=2)
        else:
            note(text)
    grid = itertools.product(depths, space.heads, space.ffn, space.precision, space.epochs)
    return [Candidate(layers=d, heads=h, ffn=f, precision=p, epochs=e) for d, h, f, p, e in grid]


def spaced_layers(depth: int, teacher_layers: int) -> list[int]:
    """The `depth` teacher layers (0-based) a student keeps: index ceil(i * n / depth) for i < depth, n the
    teacher's layers. Evenly spaced, starting at layer 0, strictly increasing, all below n; depth = ceil(n / 2)
    gives exactly every-other (0, 2, 4, ..., DistilBERT's init), depth = n keeps every layer."""
    if not 1 <= depth <= teacher_layers:
        raise ConfigError(
            f"a student of {depth} layers cannot be taken from a teacher of {teacher_layers}",
            f"give a depth from 1 to {teacher_layers}",
        )
    return [-(-i * teacher_layers // depth) for i in range(depth)]


def _number(v: float) -> str:
    return repr(float(v))  # YAML reads 0.25 / 1.0 back as the same float


def student_overrides(c: Candidate, teacher_layers: int) -> list[str]:
    """The `--set key=value` strings (kdpipe.config.parse_overrides) that make a recipe train and export `c`:
    the kept layers, the width pruning (`student.width=null` when nothing is removed, so that a width in the
    recipe does not leak into a candidate measured without it), the one export variant it ships in (none
    besides the plain export for fp32) and the distillation budget. The profile side is `deploy_profile`."""
    kept = ",".join(map(str, spaced_layers(c.layers, teacher_layers)))
    if c.heads > 0 or c.ffn > 0:
        width = f"student.width={{heads: {_number(c.heads)}, ffn: {_number(c.ffn)}}}"
    else:
        width = "student.width=null"
    variants = "" if c.precision == "fp32" else c.precision
    return [
        f"student.layers=[{kept}]",
        width,
        f"export.variants=[{variants}]",
        f"distill.epochs={_number(c.epochs)}",
    ]


def deploy_profile(prof: TargetProfile, c: Candidate) -> TargetProfile:
    """The target profile timing only the variant `c` ships in, and deploying it (its budgets apply to it), at
    the budget's shape alone, without PyTorch eager beside it (a search times many candidates; the teacher's
    figures come from one profile of their own)."""
    shape = prof.budgets.shape
    shapes = [s for s in prof.shapes if f"{s.batch}x{s.seq}" == shape] if shape else prof.shapes[:1]
    return prof.model_copy(
        update={"variants": [c.precision], "deploy": c.precision, "torch_eager": False, "shapes": shapes or prof.shapes}
    )


def fidelities(c: Candidate, space: SearchSpace) -> list[float]:
    """The distillation budgets (epochs) of a candidate's rungs, smallest first, ending at its own `epochs`:
    epochs / reduction^k for k = rungs-1 .. 0."""
    return [c.epochs / space.reduction**k for k in range(space.rungs - 1, -1, -1)]
