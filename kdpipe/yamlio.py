"""Reading recipe and profile YAML: finding the file by name or path, and parsing it strictly.

Strict means: YAML 1.2 floats, no duplicate key (PyYAML silently keeps the last one), no nesting or alias
expansion deep or large enough to exhaust Python's stack or the validator, and a true message for every path
that cannot be read (a directory, a symlink loop, a permission problem), each naming the file.
Torch-free, so that every check of a recipe runs before any model loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from kdpipe.errors import ConfigError, did_you_mean
from kdpipe.files import is_file, message, path_problem, shown

# a recipe is a few levels deep (distill.losses[0].pairs[0] is 5): far below what would exhaust the stack
MAX_DEPTH = 64
# nodes after aliases are expanded: a recipe has about a hundred; an alias bomb has billions
MAX_NODES = 100_000
MAX_BYTES = 4 * 2**20
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 floats: `lr: 2e-5` is a number (PyYAML's YAML 1.1 needs `2.0e-5`), since configs are
    validated strictly and a float field does not take a string. Records duplicate keys (with both lines) and
    refuses nesting deeper than MAX_DEPTH while composing, before the recursion can overflow."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # before SafeConstructor flattens `<<: *base` merges: a key given next to a merge overrides it on purpose
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((str(key), seen[key], line))
                else:
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits): a syntax error
            raise yaml.constructor.ConstructorError(
                None, None, "an integer with thousands of digits", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def _expanded(node: Any, memo: dict[int, tuple[int, int]], open_: set[int]) -> tuple[int, int]:
    """(nodes, depth) of `node` with every alias expanded. An alias names a node composed earlier, so the
    recursion follows the text's own nesting (at most MAX_DEPTH) and the memo makes each node count once."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise _SelfReference(node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return 1, 0
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
    open_.add(key)
    total, depth = 1, 0
    for child in children:
        n, d = _expanded(child, memo, open_)
        total, depth = min(total + n, MAX_NODES + 1), max(depth, d + 1)
    open_.discard(key)
    memo[key] = (total, depth)
    return memo[key]


class _SelfReference(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in `text`; ConfigError naming `source` (a file, or `--set key=value`) for duplicate
    keys, too deep nesting, a self-referencing or exploding alias. A syntax error stays a yaml.YAMLError, which
    the caller reports in its own words."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes, depth = _expanded(node, {}, set())
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise ConfigError(
                f"{source}: its aliases (*name) expand to more than {MAX_NODES} values or {MAX_DEPTH} levels",
                "write the values out instead of nesting aliases in aliases",
            )
        data = loader.construct_document(node)
    except _TooDeep as e:
        raise ConfigError(
            f"{source}: line {e.line}: nested too deeply (more than {MAX_DEPTH} levels of lists or mappings)",
            "a recipe or profile is a few levels deep: look for unclosed or repeated [ and {",
        ) from None
    except _SelfReference as e:
        raise ConfigError(
            f"{source}: line {e.line}: an alias refers to the list or mapping it is inside of",
            "a recipe or profile cannot contain itself: write the value out",
        ) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        lines = [f"{source}: line {b}: duplicate key '{k}' (first at line {a})" for k, a, b in loader.duplicates]
        raise ConfigError(
            "\n".join(lines), "give each key once: YAML would silently keep only the last value of a repeated key"
        )
    return data


# --------------------------------------------------------------------------- files
def check_file(path: Path) -> None:
    """ConfigError with the true reason (kdpipe.files) when `path` is not a readable recipe/profile file."""
    problem = path_problem(path)
    if problem is None:
        return
    hint = "give the path of a recipe or profile YAML file"
    if problem.kind == "directory":
        inside = sorted(p.name for p in _safe_glob(path))[:4]
        hint = f"give one of its files ({', '.join(inside)})" if inside else hint
    elif problem.kind == "permission":
        hint = f"e.g. ls -l {shown(path)}; chmod u+r the file (and u+x its directories)"
    raise ConfigError(message(path, problem), hint)


def _safe_glob(path: Path) -> list[Path]:
    try:
        return [*path.glob("*.yaml"), *path.glob("*.yml")]
    except OSError:
        return []


def _search_dirs(kind: str) -> list[Path]:
    """Where recipe / profile names are looked up: ./<kind>, the source checkout, the wheel copy."""
    pkg = Path(__file__).resolve().parent
    dirs = [Path.cwd() / kind, pkg.parent / kind, pkg / "_bundled" / kind]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.append(d.resolve())
    return seen


def available(kind: str) -> list[str]:
    """Names of the recipes ('stages') or profiles ('profiles') that can be given by name."""
    return sorted({p.stem for d in _search_dirs(kind) for p in d.glob("*.yaml")})


def _named(kind: str, name: str) -> Path | None:
    if not name or "/" in name or os.sep in name or "\x00" in name:
        return None
    return next((c for d in _search_dirs(kind) if is_file(c := d / f"{name}.yaml")), None)


def resolve(kind: str, name_or_path: str | Path) -> Path:
    """A recipe/profile name ('default', 'cpu') or a path -> an existing YAML file."""
    p = Path(name_or_path)
    text = str(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.path.lexists(p):
        problem = path_problem(p)
        if problem is None:
            return p
        # a bare name that is also something else here (a directory ./edge/) still means the recipe of that name
        named = None if p.suffix in (".yaml", ".yml") else _named(kind, text)
        if named is not None:
            return named
        if problem.kind == "missing":
            raise ConfigError(
                f"{p}: no such file", f"give an existing YAML file, or a name ({did_you_mean(p.stem, available(kind))})"
            )
        check_file(p)
    named = _named(kind, text)
    if named is not None:
        return named
    what = "recipe" if kind == "stages" else "profile"
    shown = text if len(text) <= 100 else text[:80] + "..."
    raise ConfigError(f"unknown {what} '{shown}'", did_you_mean(shown, available(kind)))


def _read_bytes(path: Path) -> bytes:
    check_file(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(
                f"{path}: {size / 2**20:.0f} MiB; a recipe or profile is a small text file", "is it the right file?"
            )
        return path.read_bytes()
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied: check the file's permissions", f"e.g. ls -l {path}; chmod u+r {path}"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})", "check the file and its disk") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A recipe or profile file's top-level mapping; ConfigError naming the file for anything else."""
    raw = _read_bytes(path)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ConfigError(f"{path}: UTF-16 text, not UTF-8", "save the file as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); is it a binary file?",
            "a recipe or profile is a YAML text file saved as UTF-8",
        ) from None
    if "\x00" in text:
        raise ConfigError(
            f"{path}: contains NUL bytes; is it a binary file?", "a recipe or profile is a YAML text file"
        )
    try:
        data = parse_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise ConfigError(f"{path}: {where}not valid YAML ({problem})", "fix the YAML syntax") from None
    if data is None:
        # an empty file is almost always a mistake (a truncated write, the wrong file): running it would train
        # the default teacher for half an hour; every default is one word away (`kdpipe run default`)
        raise ConfigError(
            f"{path}: empty; a recipe needs at least one field (e.g. out: runs/mine), a profile at least name:",
            "write the fields that differ from the defaults; for the defaults themselves use the recipe 'default'",
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level", "write key: value pairs")
    return data
