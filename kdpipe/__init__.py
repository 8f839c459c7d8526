"""kdpipe: teacher -> student -> distill -> export -> profile, one honest pipeline.

From Python: `kdpipe.run(recipe, overrides={...}, out=...)` (the whole chain) and one call per stage
(`kdpipe.teacher`, `student`, `distill`, `export`, `profile`); see kdpipe.api.
"""

__version__ = "0.1.0"

from kdpipe.api import RunResult, StageResult, distill, export, profile, run, stage, student, teacher  # noqa: E402

__all__ = [
    "RunResult",
    "StageResult",
    "__version__",
    "distill",
    "export",
    "profile",
    "run",
    "stage",
    "student",
    "teacher",
]
