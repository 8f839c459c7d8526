"""Why a path is not a readable regular file, in words: one place for what the data readers (DataError) and the
recipe / profile loader (ConfigError) tell a user, so a directory is never "no such file" and a permission
problem never "check the file's format". Torch-free, stdlib only."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kdpipe.errors import DiskFullError, disk_full
from kdpipe.textcodec import printable

_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class PathProblem:
    """`kind` for the caller's hint (missing, directory, loop, dangling, special, permission, invalid, other);
    `text` what is wrong, to follow `<path>: ` (or, for permission, to be said as is)."""

    kind: str
    text: str


def shown(path: Path | str) -> str:
    """A path as an error message names it: a newline, an escape or a NUL in a file name would garble the line."""
    return printable(str(path))


def path_problem(path: Path, what: str = "file") -> PathProblem | None:
    """Why `path` is not a regular file this process may read (None when it is one). `what` names the file
    the user meant ("data file", "pair file"), for "no such ..."."""
    try:
        mode = path.stat().st_mode
    except ValueError:  # an embedded NUL byte (from a --set value; a shell cannot pass one)
        return PathProblem("invalid", "not a valid path (it contains a NUL byte)")
    except OSError as e:
        return _stat_problem(path, what, e)
    if stat.S_ISDIR(mode):
        return PathProblem("directory", f"is a directory, not a {what}")
    special = next((name for test, name in _SPECIAL if test(mode)), None)
    if special:  # kdpipe reads a file twice (the CLI's check, then the stage): a pipe would be empty the second time
        return PathProblem("special", f"is {special}, not a regular file")
    if not stat.S_ISREG(mode):
        return PathProblem("special", "is not a regular file")
    if not os.access(path, os.R_OK):
        return PathProblem("permission", "permission denied")
    return None


def _stat_problem(path: Path, what: str, e: OSError) -> PathProblem:
    if e.errno == errno.ELOOP:
        return PathProblem("loop", "symlink loop (the link leads, directly or through others, back to itself)")
    if isinstance(e, PermissionError):  # a directory on the way that may not be searched
        return PathProblem("permission", "permission denied")
    if isinstance(e, NotADirectoryError):
        file = next((p for p in reversed(path.parents) if is_file(p)), None)
        where = f" ({shown(file)} is a file, not a directory)" if file else ""
        return PathProblem("missing", f"no such {what}{where}")
    if e.errno == errno.ENAMETOOLONG:
        return PathProblem("invalid", "the path is too long")
    if isinstance(e, FileNotFoundError):
        if path.is_symlink():
            return PathProblem("dangling", f"a symlink to {printable(os.readlink(path))}, which does not exist")
        tilde = " ('~' is not expanded inside a recipe or --set: write the full path)" if str(path)[:1] == "~" else ""
        return PathProblem("missing", f"no such {what}{tilde}")
    return PathProblem("other", f"cannot be opened ({printable(e.strerror or str(e))})")


def is_file(path: Path) -> bool:
    """Path.is_file, with an OS error (a name too long for the file system) read as 'not there'."""
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system: not there
        return False


def message(path: Path, problem: PathProblem) -> str:
    """The error line: `permission denied: <path>` or `<path>: <what is wrong>`."""
    if problem.kind == "permission":
        return f"{problem.text}: {shown(path)}"
    return f"{shown(path)}: {problem.text}"


PERMISSION_HINT = "check its permissions (`ls -l`; e.g. `chmod u+r FILE`, and u+x on its directories)"


# --------------------------------------------------------------------------- atomic directories
def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (signal 0 probes without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


def _owner_pid(path: Path) -> int | None:
    """The PID in a `.<name>.tmp-<pid>` / `.<name>.old-<pid>` directory name."""
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final`; on success it replaces `final`, on any error
    (Ctrl-C included) it is deleted and `final` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of a run killed without a chance to clean up (SIGKILL, power loss); a directory whose
    # PID is still alive belongs to a live process and is never touched
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        pid = _owner_pid(stale)
        if pid is None or pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e) and not isinstance(e, DiskFullError):  # torch / safetensors word it as a RuntimeError
            raise DiskFullError(final.parent) from None
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
