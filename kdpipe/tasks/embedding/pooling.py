"""How a sentence encoder turns token vectors into one sentence vector, read from the model's own files.

A sentence-transformers folder lists its modules in `modules.json` (Transformer, Pooling, optional Dense,
optional Normalize); `1_Pooling/config.json` names the pooling mode, in the legacy form
(`pooling_mode_mean_tokens: true`, sentence-transformers < 5) or the new one (`pooling_mode: "mean"`). kdpipe pools
mean, cls and max, exactly as sentence-transformers does (the same masking and clamping), so that its vectors equal
`SentenceTransformer.encode`'s. Anything else is refused by name rather than approximated.

Reading the config is torch-free; `pool` and `normalize` import torch when called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from kdpipe.errors import ConfigError, ModelError, did_you_mean
from kdpipe.files import shown

if TYPE_CHECKING:
    from torch import Tensor

PoolingMode = Literal["mean", "cls", "max"]
POOLING_MODES: tuple[PoolingMode, ...] = ("mean", "cls", "max")

# sentence-transformers < 5 wrote one boolean per mode; 5.x reads them too, so folders of both ages occur.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dropout is the identity at inference; every other module would change the vector, so it is refused.
_SKIPPED_MODULES = {"Dropout"}
_POOLING_HINT = (
    "pass --pooling mean, cls or max to pool it as kdpipe can (the vectors then differ from the model's own)"
)


@dataclass(frozen=True)
class SentenceConfig:
    """What turns a backbone's token vectors into the model's sentence vector.

    `backbone` is the sub-folder holding the transformer (config.json, weights, tokenizer; "" for the root),
    `dense` the sub-folders of Dense modules applied after pooling (at most one), `max_seq_length` the truncation
    length from `sentence_bert_config.json` (None: the tokenizer's), `source` where pooling and normalisation came
    from (recorded with the teacher, so a report can say whether they were the model's own or an override)."""

    pooling: PoolingMode
    normalize: bool
    source: str
    backbone: str = ""
    dense: tuple[str, ...] = field(default=())
    max_seq_length: int | None = None
    do_lower_case: bool = False


def check_pooling(mode: str, what: str = "--pooling") -> PoolingMode:
    """`mode` as a PoolingMode, or a ConfigError naming `what` (the option or field it came from)."""
    if mode not in POOLING_MODES:
        raise ConfigError(f"{what}: unknown pooling mode '{mode}'", did_you_mean(mode, list(POOLING_MODES)))
    return mode


def read_sentence_config(model_dir: Path, pooling: str | None = None, normalize: bool | None = None) -> SentenceConfig:
    """The pooling and normalisation of the sentence encoder in `model_dir`, from its `modules.json`.

    `pooling` / `normalize` (a `--pooling`-style override) win over the folder's own files, and let a plain
    transformer folder (no modules.json) be used as a sentence encoder; without them, such a folder is a ModelError
    naming it. An unsupported module or pooling mode is a ModelError naming the file."""
    mode = check_pooling(pooling) if pooling is not None else None
    if not model_dir.is_dir():
        raise ModelError(
            f"{shown(model_dir)}: no such model directory", "give the path of a sentence-transformers folder"
        )
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        if mode is None:
            raise ModelError(
                f"{shown(model_dir)} is not a sentence encoder: it has no modules.json, so how its token vectors "
                "are pooled into one sentence vector is unknown",
                "point at a sentence-transformers folder, or pass --pooling mean, cls or max (and --normalize) to "
                "use it as one",
            )
        return SentenceConfig(mode, bool(normalize), source="override (no modules.json)")
    # with an explicit mode the folder's own pooling config is not read: the override is the way past one we refuse
    found = _read_modules(model_dir, modules_file, read_pooling=mode is None)
    own_mode = found.pooling
    if mode is None and own_mode is None:
        raise ModelError(f"{shown(modules_file)} lists no Pooling module", _POOLING_HINT)
    overridden = mode is not None or (normalize is not None and normalize != found.normalize)
    return SentenceConfig(
        pooling=cast(PoolingMode, mode or own_mode),
        normalize=found.normalize if normalize is None else normalize,
        source="override of modules.json" if overridden else "modules.json",
        backbone=found.backbone,
        dense=found.dense,
        max_seq_length=found.max_seq_length,
        do_lower_case=found.do_lower_case,
    )


@dataclass
class _Modules:
    backbone: str = ""
    pooling: PoolingMode | None = None
    normalize: bool = False
    dense: tuple[str, ...] = ()
    max_seq_length: int | None = None
    do_lower_case: bool = False


def _read_modules(model_dir: Path, modules_file: Path, read_pooling: bool) -> _Modules:
    entries = _load_json(modules_file)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
        raise ModelError(f"{shown(modules_file)}: not a sentence-transformers module list", "re-save the model")
    found = _Modules()
    kinds = [str(e["type"]).rsplit(".", 1)[-1] for e in entries]
    if not kinds or kinds[0] != "Transformer":
        first = kinds[0] if kinds else "nothing"
        raise ModelError(
            f"{shown(modules_file)}: the first module is {first}, not a Transformer",
            "kdpipe distils transformer sentence encoders; a static or LSTM model cannot be the teacher",
        )
    for kind, entry in zip(kinds, entries, strict=True):
        path = str(entry.get("path", ""))
        if kind == "Transformer":
            found.backbone = path
            found.max_seq_length, found.do_lower_case = _read_bert_config(model_dir / path)
        elif kind == "Pooling":
            found.pooling = _read_pooling(model_dir / path / "config.json") if read_pooling else None
        elif kind == "Dense":
            found.dense = (*found.dense, path)
        elif kind == "Normalize":
            found.normalize = True
        elif kind not in _SKIPPED_MODULES:
            raise ModelError(
                f"{shown(modules_file)}: module {kind} is not supported (kdpipe reads Transformer, Pooling, Dense, "
                "Normalize)",
                "use a sentence encoder built from those modules",
            )
    _check_order(modules_file, kinds, found)
    return found


def _check_order(modules_file: Path, kinds: list[str], found: _Modules) -> None:
    # SentenceEncoder applies pool -> projection -> normalize; another order (or two Dense) would be another model.
    if len(found.dense) > 1:
        raise ModelError(f"{shown(modules_file)}: {len(found.dense)} Dense modules (kdpipe supports one)", "")
    order = [k for k in kinds if k in ("Pooling", "Dense", "Normalize")]
    if order != sorted(order, key=("Pooling", "Dense", "Normalize").index):
        raise ModelError(
            f"{shown(modules_file)}: modules in the order {' -> '.join(order)} (kdpipe applies Pooling -> Dense -> "
            "Normalize)",
            "",
        )


def _read_pooling(config_file: Path) -> PoolingMode:
    config = _load_json(config_file)
    if not isinstance(config, dict):
        raise ModelError(f"{shown(config_file)}: not a pooling config (a JSON object)", "re-save the model")
    raw = config.get("pooling_mode")
    if raw is None:
        # sentence-transformers' rule for the legacy form: every true flag, in this order; none means mean
        raw = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key)] or ["mean"]
    modes = [raw] if isinstance(raw, str) else list(raw)
    if len(modes) != 1:
        raise ModelError(
            f"{shown(config_file)}: pooling combines {' + '.join(map(str, modes))} (kdpipe pools one mode)",
            _POOLING_HINT,
        )
    if modes[0] not in POOLING_MODES:
        raise ModelError(
            f"{shown(config_file)}: pooling mode '{modes[0]}' is not supported (kdpipe pools mean, cls, max)",
            _POOLING_HINT,
        )
    return cast(PoolingMode, modes[0])


def _read_bert_config(folder: Path) -> tuple[int | None, bool]:
    file = folder / "sentence_bert_config.json"
    if not file.is_file():
        return None, False
    config = _load_json(file)
    if not isinstance(config, dict):
        raise ModelError(f"{shown(file)}: not a JSON object", "re-save the model")
    length = config.get("max_seq_length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise ModelError(f"{shown(file)}: max_seq_length must be a positive integer, not {length!r}", "")
    return length, bool(config.get("do_lower_case", False))


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{shown(file)}: missing (the module list refers to it)", "re-save the model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{shown(file)}: cannot be read as JSON ({e})", "re-save the model") from None


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Pool token vectors `hidden` (B, T, H) over the real tokens of `attention_mask` (B, T; 1 = real) -> (B, H).

    The same arithmetic as sentence-transformers' Pooling: mean divides by the clamped token count, cls takes
    the first real token (so left padding works too), max ignores padding through -inf."""
    import torch

    if mode == "cls":
        # an int32 argmax: onnxruntime's ArgMax has no int64 kernel, and this function is exported as is
        first = attention_mask.to(torch.int32).argmax(dim=1)
        index = first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return torch.gather(hidden, 1, index).squeeze(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    raise ConfigError(f"unknown pooling mode '{mode}'", did_you_mean(mode, list(POOLING_MODES)))


def normalize(vectors: Tensor) -> Tensor:
    """Unit L2 norm per row: (B, D) -> (B, D), as sentence-transformers' Normalize (eps 1e-12)."""
    import torch.nn.functional as F

    return F.normalize(vectors, p=2, dim=1)
