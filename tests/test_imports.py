"""The repository's import graph, computed from the source of every .py file in it (the top-level
modules, experiments/, benchmarks/, scripts/, tests/, ...; module-level and function-level imports
alike): no file imports another in a circle, and nothing but the tests imports the entry point train.py.

    python tests/test_imports.py     # prints the graph: module -> the repository modules it imports

A module is named by its path without `.py` (`train`, `benchmarks/efficiency`,
`experiments/frozen_lake_paper/run`; a package by its folder). An import is resolved as Python
would find it: a file inside a package (a folder with __init__.py) is run from the repository root
(`python -m experiments...`); a script in a plain folder (benchmarks/, scripts/, tests/) sees its own
folder first, then the repository root (which it puts on sys.path, or pytest does).
"""

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP = {".venv", ".git", "runs", "outputs", "multirun", "wandb", "__pycache__", "node_modules"}


pytestmark = pytest.mark.unit


def module_name(path, repo=REPO):
    """'train', 'benchmarks/efficiency', 'experiments/frozen_lake_paper' (its __init__.py)."""
    relative = path.relative_to(repo).with_suffix("")
    return str(relative.parent if relative.name == "__init__" else relative)


def repository_files(repo=REPO):
    """{module name: path} of every .py file of the repository (not the virtual env, runs, caches)."""
    return {module_name(path, repo): path for path in sorted(repo.rglob("*.py"))
            if not SKIP & set(path.relative_to(repo).parts)}


def _in_package(path):
    return (path.parent / "__init__.py").is_file()


def _resolve(dotted, roots, modules, repo):
    """The repository modules that importing `dotted` (a.b.c) runs: a, a/b, a/b/c, as found in the
    first root that has a; [] when it is not the repository's (torch, numpy, ...)."""
    parts = dotted.split(".")
    for root in roots:
        prefix = str(root.relative_to(repo)) if root != repo else ""
        names = ["/".join(filter(None, [prefix, *parts[:i + 1]])) for i in range(len(parts))]
        if names[0] in modules:
            return [n for n in names if n in modules]
    return []


def imports_of(path, modules, repo=REPO):
    """The repository modules `path` imports anywhere in its file, function bodies included."""
    roots = [repo] if _in_package(path) or path.parent == repo else [path.parent, repo]
    package = ".".join(path.relative_to(repo).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_resolve(alias.name, roots, modules, repo))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..a import b: relative to this file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*anchor, base]))
            found.update(_resolve(base, roots, modules, repo))
            for alias in node.names:  # `from package import submodule` imports the submodule too
                found.update(_resolve(f"{base}.{alias.name}", roots, modules, repo)[-1:])
    return sorted(found - {module_name(path, repo)})


@functools.lru_cache(maxsize=None)  # the tests of one session read the same tree: parse it once
def import_graph(repo=REPO):
    """{module: sorted repository modules it imports}, over every .py file of the repository."""
    modules = repository_files(repo)
    return {name: imports_of(path, modules, repo) for name, path in modules.items()}


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


def test_imports_are_resolved_as_python_finds_them(tmp_path):
    """A hand-made repository: each kind of import lands on the file Python would run."""
    files = {"top.py": "import lib\n", "lib.py": "def f():\n    from pkg.sub import mod\n",
             "pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/mod.py": "from . import other\nimport top\n",
             "pkg/sub/other.py": "from pkg import sub\nimport tokenizers.trainers\n",
             "bench/script.py": "import sibling, top\nfrom tokenizers import trainers\n", "bench/sibling.py": "",
             "trainers.py": "", ".venv/lib/x.py": "import top\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {"bench/script": ["bench/sibling", "top"], "bench/sibling": [], "lib": ["pkg", "pkg/sub", "pkg/sub/mod"],
                     "pkg": [], "pkg/sub": [], "pkg/sub/mod": ["pkg", "pkg/sub", "pkg/sub/other", "top"],
                     "pkg/sub/other": ["pkg", "pkg/sub"], "top": ["lib"], "trainers": []}
    assert cycles(graph) == [["top", "lib", "pkg/sub/mod", "top"]]  # a function-level import closes it


def test_every_file_is_in_the_graph():
    graph = import_graph()
    for name in ("train", "training/pipeline", "benchmarks/gpu_check", "experiments/frozen_lake_paper/run",
                 "scripts/make_standins", "tests/conftest"):
        assert name in graph, name
    assert "training/pipeline" in graph["experiments/frozen_lake_paper/run"]
    assert "training/pipeline" in graph["benchmarks/gpu_check"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_only_tests_import_the_entry_point():
    importers = [m for m, deps in import_graph().items() if "train" in deps]
    assert [m for m in importers if not m.startswith("tests/")] == []


def test_the_front_door_is_small_and_nothing_edits_sys_path():
    """At most 9 .py files at the top level (the files a researcher opens; the machinery is in training/),
    and no file outside tests/ edits sys.path or needs `# noqa: E402` (an import after code): the
    repository imports as an installed package (`pip install -e .`) or from its root."""
    top = sorted(p.name for p in REPO.glob("*.py"))
    assert len(top) <= 9, top
    offenders = [name for name, path in repository_files().items() if not name.startswith("tests/")
                 and ("sys.path.insert" in (text := path.read_text(encoding="utf-8")) or "sys.path.append" in text
                      or "noqa: E402" in text)]
    assert offenders == []


if __name__ == "__main__":
    graph = import_graph()
    for module, deps in graph.items():
        print(f"{module} -> {', '.join(deps) or '-'}")
    print("cycles:", cycles(graph) or "none")
    print("importers of train:", [m for m, deps in graph.items() if "train" in deps] or "none")
