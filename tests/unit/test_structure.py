"""The import structure of `ember/`: no cycles between modules or between its packages, and
`ember/kernels` (the bottom layer) imports nothing from models, layers or attention.

Only module-level imports count (imports inside functions are deferred on purpose, and
`if TYPE_CHECKING:` blocks never run); `from ember.x import y` counts as importing the module
`ember.x.y` when that is a module, else `ember.x`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "ember"
FORBIDDEN_FOR_KERNELS = ("ember.models", "ember.layers", "ember.attention")


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """ember modules `name` imports at module level."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + [base]).rstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if sub in modules else base)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _package(module: str) -> str:
    """ember.loading.gguf -> ember.loading; ember.plan -> ember.plan."""
    return ".".join(module.split(".")[:2])


def test_the_walk_sees_imports():
    graph = _graph()
    assert "ember.models.base" in graph["ember.models.llama"]
    assert "ember.kernels.ops" in graph["ember.plan"]


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module == "ember":  # the package front door re-exports the public API
            continue
        packages.setdefault(_package(module), set()).update(
            _package(d) for d in deps if _package(d) != _package(module) and d != "ember")
    cycle = _cycle(packages)
    assert cycle is None, " -> ".join(cycle or [])


def test_kernels_are_the_bottom_layer():
    graph = _graph()
    bad = {f"{module} -> {dep}" for module, deps in graph.items()
           if module.startswith("ember.kernels") for dep in deps
           if dep.startswith(FORBIDDEN_FOR_KERNELS)}
    assert not bad, sorted(bad)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _environment_reads(source: str) -> list[int]:
    """Lines of `source` that read an environment variable (os.getenv, os.environ[...],
    os.environ.get, `in os.environ`, from os import environ/getenv). Passing the whole
    environment on to a child process ({**os.environ}, dict(os.environ, ...)) and
    os.environ.update(...) are not reads."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in ("environ", "getenv") for a in node.names):
            lines.append(node.lineno)
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "os" and node.attr in ("environ", "getenv")):
            continue
        parent = parents.get(node)
        passed_on = node.attr == "environ" and (
            isinstance(parent, ast.Dict)  # {**os.environ, ...}
            or (isinstance(parent, ast.Call) and node in parent.args)  # dict(os.environ, ...)
            or (isinstance(parent, ast.Attribute) and parent.attr == "update"))
        if not passed_on:
            lines.append(node.lineno)
    return sorted(lines)


def test_only_config_reads_the_environment():
    """DESIGN: `ember/config.py` is the only module that reads environment variables."""
    bad = {f"{name}:{line}" for name, path in _modules().items() if name != "ember.config"
           for line in _environment_reads(path.read_text(encoding="utf-8"))}
    assert not bad, sorted(bad)


def test_environment_read_finder_finds_reads():
    src = ("import os\nfrom os import getenv\na = os.environ['A']\nb = os.getenv('B')\n"
           "c = os.environ.get('C')\nd = 'D' in os.environ\n"
           "e = {**os.environ, 'E': '1'}\nf = dict(os.environ, F='1')\nos.environ.update(e)\n")
    assert _environment_reads(src) == [2, 3, 4, 5, 6]
