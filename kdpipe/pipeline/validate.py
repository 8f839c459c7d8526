"""`kdpipe validate` and the recipe cross-checks that `kdpipe run` makes before the teacher trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kdpipe.config import Recipe, TargetProfile, format_validation_error, load_profile, read_yaml
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.tasks.registry import task_for


def file_kind(path: Path, data: dict[str, Any]) -> str:
    """'recipe' or 'profile': the file's own `kind:`, else its directory (profiles/ or stages/), else recipe."""
    kind = data.get("kind")
    if kind in ("recipe", "profile"):
        return str(kind)
    if kind is not None:
        raise ConfigError(
            f"{path}: kind: {kind!r} is neither 'recipe' nor 'profile'", "write kind: recipe or kind: profile"
        )
    parent = path.resolve().parent.name
    if parent in ("profiles", "stages"):
        return "profile" if parent == "profiles" else "recipe"
    # elsewhere: a profile when its keys are profile fields and none is a recipe field
    keys = set(data) - {"kind"}
    profile_only = set(TargetProfile.model_fields) - set(Recipe.model_fields)
    return "profile" if keys & profile_only and not keys & set(Recipe.model_fields) else "recipe"


def validate_file(path: Path) -> str:
    """Validate a recipe or a profile (by its `kind:` or its directory) with every cross-check that
    needs no model; returns what it was."""
    data = read_yaml(path)
    kind = file_kind(path, data)
    model: type[BaseModel] = TargetProfile if kind == "profile" else Recipe
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = format_validation_error(str(path), e)
        if kind == "recipe" and any(k in data for k in ("shapes", "execution_providers", "intra_op_threads")):
            err.hint = "this looks like a target profile: put it in profiles/ or add `kind: profile`"
        raise err from None
    if kind == "recipe":
        recipe = Recipe.model_validate(data)
        try:
            load_profile(recipe.profile)
            check_recipe(recipe)
        except KdpipeError as e:  # the recipe's own fields are at fault: name the file, as its schema errors do
            e.message = "\n".join(_named(str(path), line) for line in e.message.splitlines())
            raise
    return kind


def _named(source: str, line: str) -> str:
    return line if line.startswith(source) else f"{source}: {line}"


def check_recipe(recipe: Recipe) -> None:
    """Every cross-check of a recipe that needs no trained model, run by `kdpipe run` before the teacher
    trains and by `kdpipe validate`: input files and directories exist, the device is there, the loss
    terms fit the layer maps and widths (from the teacher's config.json when it is on this machine), the layers
    every student keeps exist in the stacks it is cut from, and SWAG collects enough iterates (the config)."""
    d = recipe.distill
    if d.transfer is not None and not Path(d.transfer).is_file():
        raise ConfigError(f"distill.transfer: {d.transfer}: no such file", "give a text file, one example per line")
    for i, t in enumerate(d.extra_teachers):
        if not Path(t).is_dir():
            raise ConfigError(f"distill.extra_teachers[{i}]: {t}: no such directory", "give local HF model directories")
    for name, student in (("student", recipe.student), ("assistant", recipe.assistant)):
        if student is not None and student.pretrained is not None and not Path(student.pretrained).is_dir():
            raise ConfigError(
                f"{name}.pretrained: {student.pretrained}: no such directory", "give a local HF model directory"
            )
    if d.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "distill.device: cuda, but this machine has no CUDA device", "set distill.device: auto (or cpu)"
            )
    profile = load_profile(recipe.profile)
    exported = {"fp32", *recipe.export.variants}
    if missing := [v for v in profile.variants if v not in exported]:
        raise ConfigError(
            f"profile {profile.name}: times variants {missing} that export.variants {recipe.export.variants} does "
            "not write",
            "add them to export.variants (e.g. --set export.variants=["
            + ", ".join(sorted(exported - {"fp32"} | set(missing)))
            + "])",
        )
    task_for(recipe.teacher).check_recipe(recipe)
