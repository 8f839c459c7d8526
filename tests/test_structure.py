"""The shape of the package: no import cycle among kdpipe's modules nor among its folders, no function longer than a
screen, and no flat module outside the few that stay at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kdpipe"
MAX_LINES = 60
# the only modules directly in kdpipe/; anything else belongs in a folder (pipeline/, tasks/, data/, ...)
TOP_LEVEL = {"__init__", "api", "cli", "config", "yamlio", "files", "textcodec", "errors", "env"}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the kdpipe modules it imports, at module level, inside functions and under TYPE_CHECKING alike
    (a function-level import hides a cycle, it does not remove it)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for n in names:
                target = resolve(n) if n.split(".")[0] == "kdpipe" else None
                # a package's own __init__ is not a cycle
                if target and target != m and not m.startswith(target + "."):
                    graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_kdpipe_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph["kdpipe.pipeline.runner"] >= {"kdpipe.pipeline.teacher", "kdpipe.pipeline.distill"}
    assert cycles(graph) == []


def test_stages_never_import_the_runner() -> None:
    graph = import_graph()
    for stage in ("teacher", "student", "distill", "export", "profile", "assistant"):
        assert "kdpipe.pipeline.runner" not in graph[f"kdpipe.pipeline.{stage}"], stage


# kdpipe/tasks/<name>.py or kdpipe/tasks/<name>/ is one task (a package's modules may import each other); these
# modules belong to a task of another name (none since the translator model moved into kdpipe/tasks/translation/)
TASK_PARTS: dict[str, str] = {}
NOT_TASKS = {"base", "registry"}  # the protocol and the table: what the stages may import from kdpipe/tasks/


def task_of_module(module: str) -> str | None:
    """The task a module under kdpipe/tasks/ belongs to; None for any other module, and for base and registry."""
    parts = module.split(".")
    if parts[:2] != ["kdpipe", "tasks"] or len(parts) < 3 or parts[2] in NOT_TASKS:
        return None
    return TASK_PARTS.get(parts[2], parts[2])


def test_task_of_module_groups_a_package_into_one_task() -> None:
    assert task_of_module("kdpipe.tasks.classification.distill") == "classification"
    assert task_of_module("kdpipe.tasks.embedding.pooling") == "embedding"
    assert task_of_module("kdpipe.tasks.translation.seq2seq") == task_of_module("kdpipe.tasks.translation.task")
    assert task_of_module("kdpipe.tasks.translation.export") == "translation"
    assert task_of_module("kdpipe.tasks.registry") is None and task_of_module("kdpipe.tasks.base") is None
    assert task_of_module("kdpipe.pipeline.distill") is None and task_of_module("kdpipe.tasks") is None


def test_stages_reach_tasks_only_through_the_base_and_the_registry() -> None:
    """No module under kdpipe/pipeline/ imports a task module: a stage asks kdpipe.tasks.registry for its task."""
    graph = import_graph()
    stages = [m for m in graph if m.startswith("kdpipe.pipeline")]
    named = {m: sorted(t for t in graph[m] if task_of_module(t)) for m in stages}
    assert {m: ts for m, ts in named.items() if ts} == {}
    assert {"kdpipe.tasks.registry"} <= graph["kdpipe.pipeline.distill"]


def test_no_task_imports_another_task() -> None:
    """A task sees the library and kdpipe.tasks.base, never another task (only the registry lists them all); the
    protocol itself imports no task."""
    graph = import_graph()
    crossing = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if (own := task_of_module(m)) is not None or m == "kdpipe.tasks.base"
        for t in sorted(targets)
        if (other := task_of_module(t)) is not None and other != own
    ]
    assert crossing == []


def test_every_task_of_the_config_has_its_row() -> None:
    """teacher.task's values and TASKS' keys are the same, and each entry knows its own name."""
    from typing import get_args

    from kdpipe.config import TeacherConfig
    from kdpipe.tasks.registry import TASKS

    assert set(get_args(TeacherConfig.model_fields["task"].annotation)) == set(TASKS)
    assert all(task.name == name for name, task in TASKS.items())


def folder_of(module: str) -> str:
    """kdpipe.<folder> for a module in a folder (or the folder's __init__), the module itself at the top level."""
    parts = module.split(".")
    return ".".join(parts[:2])


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """kdpipe.<folder> -> the folders (and top-level modules) its modules import."""
    folders: dict[str, set[str]] = {folder_of(m): set() for m in graph}
    for m, targets in graph.items():
        folders[folder_of(m)] |= {folder_of(t) for t in targets} - {folder_of(m)}
    return folders


def test_folder_graph_groups_modules_by_folder() -> None:
    graph = {"kdpipe.a.x": {"kdpipe.b.y", "kdpipe.a.z"}, "kdpipe.a.z": set(), "kdpipe.b.y": {"kdpipe.cli"}}
    graph["kdpipe.cli"] = set()
    assert folder_graph(graph) == {"kdpipe.a": {"kdpipe.b"}, "kdpipe.b": {"kdpipe.cli"}, "kdpipe.cli": set()}


def test_no_import_cycle_among_folders() -> None:
    """A folder is a layer: kdpipe/<folder> -> kdpipe/<folder> must be acyclic (top-level modules are nodes too)."""
    folders = folder_graph(import_graph())
    assert folders["kdpipe.pipeline"] >= {"kdpipe.artifacts", "kdpipe.train"}
    assert cycles(folders) == []


def test_only_the_listed_modules_sit_at_the_top() -> None:
    """A new flat module chooses a folder: kdpipe/ itself holds only the entry point and the torch-free basics."""
    flat = {f.stem for f in PKG.glob("*.py")}
    assert flat - TOP_LEVEL == set()
    assert all((d / "__init__.py").is_file() for d in PKG.iterdir() if d.is_dir() and not d.name.startswith("_"))


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_LINES:
                    long.append(f"{f.relative_to(PKG.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_config_loading_does_not_import_torch() -> None:
    """Recipes, profiles and data are checked in a second: the config layer is torch-free."""
    import subprocess
    import sys

    code = "import sys, kdpipe.config, kdpipe.data.tables; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_edge_ci_workflow_and_dockerfile_fit_together() -> None:
    """The example CI workflow is valid YAML that runs a shipped recipe with --strict, and the Dockerfile's
    edge-check target runs the same one (hadolint lints the Dockerfile in `make lint`)."""
    import yaml

    root = PKG.parent
    flow = yaml.safe_load((root / ".github" / "workflows" / "edge.yml").read_text())
    steps = flow["jobs"]["edge"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "docker build" in runs and "--strict" in runs
    recipe = runs.split("kdpipe run ")[1].split()[0]
    assert (root / "stages" / f"{recipe}.yaml").is_file()
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    docker = (root / "Dockerfile").read_text()
    assert "AS edge-check" in docker and f"kdpipe run {recipe} --strict" in docker


def task_mentions(source: str, names: set[str]) -> list[str]:
    """Where code names a task: a string constant that is exactly a task's name (`== "translation"`, a dict key, a
    pop), an attribute of a task's name (recipe.teacher.translation), or `.task` compared with a string. Docstrings,
    comments and messages that mention a task are prose, not a branch on it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "task" for s in sides) and any(
                isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides
            ):
                found.append(f"{node.lineno}: .task compared with a string")
    return found


def test_the_task_finder_finds_planted_branches_and_skips_prose() -> None:
    names = {"translation", "classification", "embedding"}
    code = '''
def f(cfg, ident):
    """A translation teacher keeps its embedding section; classification drops it."""
    if cfg.task == "translation":
        ident.pop("classification", None)
    if cfg.task != "speech":
        pass
    x = cfg.embedding
    raise ValueError(f"{cfg.task}: translation is refused")  # translation
'''
    assert sorted(task_mentions(code, names)) == [
        "4: 'translation'",
        "4: .task compared with a string",
        "5: 'classification'",
        "6: .task compared with a string",
        "8: .embedding",
    ]


def test_stages_never_name_a_task() -> None:
    """Issue 17: the shared stage code (kdpipe/pipeline/) branches on no task; a task's own rules live in
    kdpipe/tasks/<task>/ and the stages reach them through kdpipe.tasks.registry."""
    from typing import get_args

    from kdpipe.config import TeacherConfig

    names = set(get_args(TeacherConfig.model_fields["task"].annotation))
    named = {
        str(f.relative_to(PKG.parent)): hits
        for f in sorted((PKG / "pipeline").rglob("*.py"))
        if (hits := task_mentions(f.read_text(), names))
    }
    assert named == {}
