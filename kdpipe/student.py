"""Student construction: keep a subset of the teacher's layers, initialise from them or randomly."""

from __future__ import annotations

import copy
import re
from typing import Any

from kdpipe.config import StudentConfig
from kdpipe.errors import ConfigError

# "<prefix>.layer.<i>.<rest>" / "<prefix>.layers.<i>.<rest>": the stacked blocks of an encoder
_LAYER_KEY = re.compile(r"^(?P<prefix>.*\.(?:layer|layers))\.(?P<idx>\d+)\.(?P<rest>.+)$")


def select_layers(cfg: StudentConfig, n_teacher: int) -> list[int]:
    """Teacher layer indices (0-based) the student keeps, in order."""
    spec = cfg.layers
    if spec == "every-other":
        layers = list(range(0, n_teacher, 2))
    elif spec in ("last-k", "first-k"):
        if cfg.k is None:
            raise ConfigError(f"student.k is required with student.layers={spec}", "e.g. --set student.k=3")
        if cfg.k > n_teacher:
            raise ConfigError(f"student.k={cfg.k} exceeds the teacher's {n_teacher} layers", f"use k <= {n_teacher}")
        layers = list(range(n_teacher - cfg.k, n_teacher)) if spec == "last-k" else list(range(cfg.k))
    elif isinstance(spec, list):
        layers = list(spec)
        bad = [i for i in layers if not 0 <= i < n_teacher]
        if bad or not layers:
            raise ConfigError(
                f"student.layers {layers}: indices {bad} outside the teacher's layers 0..{n_teacher - 1}",
                f"list 0-based teacher layers between 0 and {n_teacher - 1}",
            )
        if len(set(layers)) != len(layers) or layers != sorted(layers):
            raise ConfigError(f"student.layers {layers}: must be increasing without repeats", "e.g. [0, 2, 4]")
    return layers


def uniform_layers(m: int, n: int) -> list[int]:
    """0-based teacher layers for an m-layer student under the uniform map g(k) = k n / m (TinyBERT)."""
    return [max(1, round((i + 1) * n / m)) - 1 for i in range(m)]


def layer_map(kept: list[int]) -> dict[int, int]:
    """Student hidden-state index -> teacher hidden-state index (0 is the embeddings in both)."""
    return {0: 0, **{i + 1: t + 1 for i, t in enumerate(kept)}}


def build_student(teacher: Any, cfg: StudentConfig, kept: list[int], seed: int) -> Any:
    """A model of the teacher's class with len(kept) layers.

    init='teacher': every tensor is copied from the teacher, block i from teacher block kept[i]
    (DistilBERT's init). init='random': U[-a, a] on every weight and bias except LayerNorm, which
    keeps (1, 0) so the baseline trains at all."""
    import torch

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    torch.manual_seed(seed)
    student = type(teacher)(config)
    if cfg.init == "random":
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "LayerNorm" not in name and "layer_norm" not in name:
                    p.uniform_(-cfg.init_range, cfg.init_range)
        return student
    t_state = teacher.state_dict()
    new_state = {}
    for key in student.state_dict():
        m = _LAYER_KEY.match(key)
        src = f"{m['prefix']}.{kept[int(m['idx'])]}.{m['rest']}" if m else key
        new_state[key] = t_state[src].clone()
    student.load_state_dict(new_state)
    return student


def run_student(recipe: Any, upstream: Any, work: Any, console: Any) -> Any:
    """The student stage: a smaller model from the teacher's layers (or a pretrained one)."""
    from kdpipe.artifacts import Metric
    from kdpipe.errors import ModelError
    from kdpipe.models import count_params, load_classifier, load_tokenizer, resolve_model_dir, vocab_mismatch
    from kdpipe.pipeline import StageOutput

    cfg: StudentConfig = recipe.student
    t_dir = upstream.dir / "model"
    teacher = load_classifier(t_dir)
    t_tok = load_tokenizer(t_dir)
    n_teacher = int(teacher.config.num_hidden_layers)
    if cfg.pretrained is not None:
        s_dir = resolve_model_dir(cfg.pretrained, field="student.pretrained")
        tokenizer = load_tokenizer(s_dir)
        why = vocab_mismatch(t_tok, tokenizer)
        if why:
            raise ModelError(
                f"{s_dir}: the student's tokenizer does not match the teacher's ({why})",
                "the losses feed the same token ids to both models: use a student with the "
                "teacher's tokenizer, or build one from the teacher (drop student.pretrained)",
            )
        student = load_classifier(s_dir, upstream.extra["label_names"])
        m = int(student.config.num_hidden_layers)
        kept = uniform_layers(m, n_teacher)
        init = "pretrained"
    else:
        kept = select_layers(cfg, n_teacher)
        student = build_student(teacher, cfg, kept, recipe.seed)
        tokenizer = t_tok
        init = cfg.init
    student.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    sp, tp = count_params(student), count_params(teacher)
    console.print(
        f"student: {len(kept)} of {n_teacher} layers (teacher layers {kept}), init={init}, "
        f"{sp / 1e6:.1f}M vs {tp / 1e6:.1f}M params ({tp / sp:.2f}x smaller)"
    )
    return StageOutput(
        metrics={
            "params": Metric(sp, "parameters"),
            "teacher_params": Metric(tp, "parameters"),
            "layers": Metric(len(kept), "layers"),
            "teacher_layers": Metric(n_teacher, "layers"),
            "compression": Metric(round(tp / sp, 3), "x"),
        },
        extra={"kept_layers": kept, "layer_map": {str(k): v for k, v in layer_map(kept).items()}, "init": init},
    )
