"""The one table of tasks: `teacher.task` -> its Task (kdpipe.tasks.base), for a recipe or for a finished artifact.

The stages look their task up here and never import a task module themselves; adding a task adds one row.
"""

from __future__ import annotations

from typing import Any

from kdpipe.artifacts.manifest import MANIFEST, Manifest
from kdpipe.config import TeacherConfig
from kdpipe.errors import ArtifactError, ConfigError, did_you_mean
from kdpipe.tasks.base import Task
from kdpipe.tasks.causal_lm.task import CAUSAL_LM
from kdpipe.tasks.classification.task import CLASSIFICATION
from kdpipe.tasks.embedding.task import EMBEDDING
from kdpipe.tasks.translation.task import TRANSLATION

TASKS: dict[str, Task] = {
    "classification": CLASSIFICATION,
    "translation": TRANSLATION,
    "embedding": EMBEDDING,
    "causal_lm": CAUSAL_LM,
}


def task_for(cfg: TeacherConfig) -> Task:
    """The task a recipe's teacher section names (`teacher.task`)."""
    task = TASKS.get(cfg.task)
    if task is None:
        raise ConfigError(f"teacher.task: unknown task {cfg.task!r}", did_you_mean(cfg.task, list(TASKS)))
    return task


def task_of(manifest: Manifest) -> Task:
    """The task of a stage's lineage: its teacher's (the stage itself when it is the teacher). Reads the teacher's
    manifest without re-hashing its files (the stage that uses them verifies them); a teacher from before the
    `task` field, or one that cannot be found, is classification (whose path then gives its own errors)."""
    name = _teacher_task(manifest)
    task = TASKS.get(name)
    if task is None:
        raise ArtifactError(
            f"{manifest.dir}: its teacher's task is {name!r}, which this kdpipe does not know",
            f"re-run the teacher with this kdpipe (--force); {did_you_mean(name, list(TASKS))}",
        )
    return task


def _teacher_task(manifest: Manifest) -> str:
    if manifest.stage == "teacher":
        return _task_name(manifest.record)
    rel = manifest.lineage.get("teacher")
    path = manifest.dir / rel / MANIFEST if rel is not None else None
    if path is None or not path.is_file():
        return "classification"
    return _task_name(Manifest.from_file(path).record)


def _task_name(rec: dict[str, Any]) -> str:
    """A teacher record's task: its info's tag (a record from before `info`: its old `task` field)."""
    info = rec.get("info")
    if isinstance(info, dict) and info.get("task"):
        return str(info["task"])
    return str(rec.get("task") or "classification")
