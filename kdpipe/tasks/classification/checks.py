"""The classification recipe checks made before any model loads: the layers every student (and assistant) keeps
against the one stack it is cut from, the distill objective built from the two config.json files, the bayes
prerequisites, and the PID/SID schedule warning."""

from __future__ import annotations

import json
import math
from typing import Any

from kdpipe.compress.layercheck import config_size, one_stack_problems, raise_problems
from kdpipe.config import DistillConfig, Recipe
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses.objective import LossContext, Objective, build_objective
from kdpipe.models.layermaps import layer_map, uniform_layers
from kdpipe.models.loading import resolve_model_dir
from kdpipe.tasks.classification.student import select_layers


def loss_context(
    teacher_config: dict[str, Any], student_config: dict[str, Any], layer_map: dict[int, int]
) -> LossContext:
    """From the two config.json dicts: enough to build (and so validate) every term without weights."""
    return LossContext(
        layer_map=layer_map,
        n_student=int(student_config.get("num_hidden_layers", 0)),  # a BiLSTM student has no layers to map
        n_teacher=int(teacher_config["num_hidden_layers"]),
        d_student=int(student_config["hidden_size"]),
        d_teacher=int(teacher_config["hidden_size"]),
    )


def check_objective(cfg: DistillConfig, ctx: LossContext) -> Objective:
    """Build the objective once on the configs alone: a layer map that does not fit fails here,
    before any model loads."""
    objective = build_objective(list(cfg.losses), ctx, cfg.schedule)
    if cfg.baseline and all(c.name == "ce" for c in cfg.losses):
        raise ConfigError(
            "distill.baseline: the recipe's loss is already hard CE only",
            "set distill.baseline: false, or add a distillation term",
        )
    return objective


def check_recipe(recipe: Recipe) -> None:
    """`kdpipe validate` / `kdpipe run` before the teacher trains: every layer selection against the stack it is
    cut from (all problems at once), then build the distill objective from the teacher's config.json and the
    student spec alone, so that a layer map that does not fit fails before any model loads. Skipped when the
    teacher is not on this machine yet."""
    raise_problems(one_stack_problems(recipe))
    _check_bayes(recipe)
    if recipe.student.arch == "bilstm":
        feature = [c.name for c in recipe.distill.losses if not c.on_logits]
        if feature:
            raise ConfigError(
                f"distill.losses: {', '.join(feature)} compare hidden states, which a BiLSTM student (student.arch: "
                "bilstm) does not have",
                "use logit terms only (hinton, logit_mse, ce, reverse_kl, jsd, ofa)",
            )
        return
    try:
        t_dir = resolve_model_dir(recipe.teacher.model)
    except ModelError:
        return
    t_conf = _sizes(json.loads((t_dir / "config.json").read_text()))
    if t_conf is None:  # an architecture whose config names its sizes otherwise: the student stage checks it
        return
    if recipe.student.pretrained is not None:
        s_conf = _sizes(
            json.loads((resolve_model_dir(recipe.student.pretrained, "student.pretrained") / "config.json").read_text())
        )
        if s_conf is None:
            return
        kept = uniform_layers(int(s_conf["num_hidden_layers"]), int(t_conf["num_hidden_layers"]))
    else:
        kept = select_layers(recipe.student, int(t_conf["num_hidden_layers"]))
        s_conf = {**t_conf, "num_hidden_layers": len(kept)}
    check_objective(recipe.distill, loss_context(t_conf, s_conf, layer_map(kept)))


_SIZE_ALIASES = {"num_hidden_layers": ("n_layer", "num_layers", "encoder_layers"), "hidden_size": ("n_embd", "d_model")}


def _sizes(conf: Any) -> dict[str, Any] | None:
    """A config.json dict with `num_hidden_layers` and `hidden_size` under those names (GPT-2 says n_layer / n_embd,
    BART encoder_layers / d_model), or None when it names neither (read as the layer checks read a depth)."""
    if not isinstance(conf, dict):
        return None
    out = dict(conf)
    for key, aliases in _SIZE_ALIASES.items():
        value = config_size(conf, (key, *aliases))
        if value is None:
            return None
        out[key] = value
    return out


def _check_bayes(recipe: Recipe) -> None:
    """The prior term needs a bayes student, and a bayes student needs the teacher's posterior."""
    if any(c.name == "prior" for c in recipe.distill.losses) and recipe.student.init != "bayes":
        raise ConfigError(
            f"distill.losses: the 'prior' term needs student.init: bayes (it is {recipe.student.init})",
            "set student.init: bayes and teacher.posterior, or drop the prior term",
        )
    if recipe.student.init == "bayes" and recipe.teacher.posterior is None:
        raise ConfigError(
            "student.init: bayes starts from the teacher's posterior, but teacher.posterior is not set",
            "add teacher.posterior: {kind: swag} (or kind: diagonal) to the recipe",
        )


def schedule_warning(objective: Objective, cfg: DistillConfig, examples: int) -> str | None:
    """PID/SID with the classifier last: say so when the layer phase can outlast the whole budget."""
    sched = objective.schedule
    if sched.kind == "all" or not cfg.schedule.classifier_last:
        return None
    total = math.ceil(cfg.epochs * math.ceil(examples / cfg.batch_size))
    layer_steps = len(sched.order) * cfg.schedule.cap_steps
    if layer_steps < total:
        return None
    unless = " unless a layer's [CLS] cosine loss falls below the threshold" if cfg.schedule.threshold else ""
    return (
        f"warning: schedule {sched.kind}: {len(sched.order)} layers x cap_steps {cfg.schedule.cap_steps} = "
        f"{layer_steps} steps >= the {total} training steps, so the classifier terms may never run{unless}; "
        "lower distill.schedule.cap_steps or train longer"
    )
