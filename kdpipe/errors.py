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
