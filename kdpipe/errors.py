"""The few error types the CLI turns into one `error:` line and one `hint:` line."""

from __future__ import annotations


class KdpipeError(Exception):
    """A problem the user can fix. `message` says what is wrong, `hint` how to fix it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(KdpipeError):
    """A recipe, profile or option is invalid."""


class ArtifactError(KdpipeError):
    """An upstream artifact directory is missing, incomplete or tampered with."""


class DataError(KdpipeError):
    """A dataset file cannot be used (missing file, missing columns, too few rows)."""


class ModelError(KdpipeError):
    """A model directory cannot be used (not a HF model, mismatched tokenizer)."""


class TrainingDivergedError(KdpipeError):
    """Training produced a non-finite loss, gradient or weight (NaN/inf); nothing is written."""


class ExportToleranceError(KdpipeError):
    """The ONNX model's outputs do not match PyTorch's within the recorded tolerance."""


def did_you_mean(name: str, valid: list[str]) -> str:
    """A hint listing the valid names, with the closest one first when there is one."""
    import difflib

    close = difflib.get_close_matches(name, valid, n=1)
    prefix = f"did you mean '{close[0]}'? " if close else ""
    return f"{prefix}valid: {', '.join(sorted(valid))}"


class BudgetError(KdpipeError):
    """The deployed variant missed a budget of the target profile (`--strict`)."""


def disk_full(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a full disk: OSError ENOSPC, or the message torch's zip writer and
    safetensors' Rust writer turn it into (they raise RuntimeError / SafetensorError, not OSError)."""
    import errno

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cur)
        if any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded", "os error 28")):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class DiskFullError(KdpipeError):
    """The disk filled up while kdpipe wrote a file; the partial file was removed."""

    def __init__(self, directory: object) -> None:
        super().__init__(
            f"no space left on {directory} (the partial file was removed; nothing was marked finished)",
            "free some space (or use --out on another disk) and run the same command again",
        )
