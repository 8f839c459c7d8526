"""Writing a model folder all or nothing: built in a staging folder beside it, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block ends without error it becomes `out_dir` (an older `out_dir`
    is replaced), and on error nothing changes. The staging folder sits beside `out_dir` so the final rename stays on
    one file system, where it is atomic."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging / "new"
        if out_dir.exists():
            # a directory cannot be replaced by one rename: move the old one aside first (never half-written)
            os.rename(out_dir, staging / "old")
        os.rename(staging / "new", out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
