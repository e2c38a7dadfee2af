"""The house rules that a reader checks by eye, checked by a script: no import loop anywhere in the
package (function-level imports included), data flowing one way between the folders, experiments/
importing at the top, and no source file past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = "tokensel"
SOURCE_DIRS = ("common", "vlms", "datamodules", "selectors", "callbacks", "experiments")
MAX_LINES = 500
# Imported where they are used: the optional extras (pyproject's [project.optional-dependencies]) and
# the CLI's dispatcher, which imports only the command it runs.
LATE_IMPORTS_ALLOWED = {"lmms_eval", "wandb", "submitit", "pycocoevalcap"}
DISPATCHER = "experiments/cli.py"
# Which folder may import which: common is the bottom layer, then the VLM-family wing (vlms imports
# only common: a selector reaches it as an argument); data flows datamodules -> selectors ->
# callbacks -> experiments. A selector may read FeatureBatch (datamodules/batch.py), never an encoder.
ALLOWED = {
    "common": {"common"},
    "vlms": {"common", "vlms"},
    "datamodules": {"common", "vlms", "datamodules"},
    "selectors": {"common", "vlms", "selectors", "datamodules.batch"},
    "callbacks": {"common", "vlms", "datamodules", "selectors", "callbacks"},
    "experiments": {"common", "vlms", "datamodules", "selectors", "callbacks", "experiments"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def source_files() -> list[Path]:
    files = [REPO / "__init__.py"]
    for folder in SOURCE_DIRS:
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def import_graph() -> dict[str, set[str]]:
    """Module -> the tokensel modules it imports, wherever the import statement stands."""
    files = source_files()
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = module_name(path)
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name and target != PACKAGE:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_folders_import_only_downstream():
    bad = []
    for module, edges in import_graph().items():
        folder = module.split(".")[1] if module.count(".") else ""
        if folder not in ALLOWED:
            continue
        for target in edges:
            rest = target.split(".", 1)[1]
            if not any(rest == allowed or rest.startswith(allowed + ".") for allowed in ALLOWED[folder]):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the data flow: " + "; ".join(sorted(bad))


def test_no_source_file_over_500_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in source_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "split these files: " + ", ".join(long)


def test_experiments_import_at_the_top():
    late = []
    for path in sorted((REPO / "experiments").glob("*.py")):
        if path.relative_to(REPO).as_posix() == DISPATCHER:
            continue
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if not all(name.split(".")[0] in LATE_IMPORTS_ALLOWED for name in names):
                    late.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not late, "imports inside functions (move them to the top): " + ", ".join(late)
