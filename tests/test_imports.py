"""The repository's import graph, computed from the source (module-level and function-level imports):
no module imports another in a circle, and nothing but the tests imports the entry point train.py.

    python tests/test_imports.py     # prints the graph: module -> the repository modules it imports
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def repository_modules():
    """{module name: path} of the top-level Python modules (train, losses, ...)."""
    return {p.stem: p for p in sorted(REPO.glob("*.py"))}


def import_graph(paths=None):
    """{module: sorted repository modules it imports anywhere in its file, function bodies included}."""
    modules = repository_modules()
    graph = {}
    for name, path in (paths or modules).items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = sorted(found & set(modules) - {name})
    return graph


def cycles(graph):
    """Every import cycle, each as a list of modules [a, b, ..., a], found by depth-first search."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    return found


def test_cycles_finds_a_circle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_only_tests_import_the_entry_point():
    importers = [m for m, deps in import_graph().items() if "train" in deps]
    assert importers == []


if __name__ == "__main__":
    graph = import_graph()
    for module, deps in graph.items():
        print(f"{module} -> {', '.join(deps) or '-'}")
    print("cycles:", cycles(graph) or "none")
