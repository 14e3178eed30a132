"""The layers import downwards only: nothing below the command line (and the HTTP service beside it) imports it."""

from __future__ import annotations

import ast
import pathlib

import klvae

PACKAGE = pathlib.Path(klvae.__file__).parent
TOP_LAYERS = ("cli", "serve")


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_nothing_below_the_command_line_imports_it():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in TOP_LAYERS:
            continue
        found = [m for m in _imported_modules(path) if m == "klvae.cli" or m.startswith("klvae.cli.")]
        offenders += [f"{relative}: {m}" for m in found]
    assert offenders == []


def _module_graph() -> dict[str, set[str]]:
    """klvae's modules and the klvae modules each imports, at any depth of its code (imports inside functions
    count). ``from package import submodule`` is an edge to the submodule: a package's own __init__ importing its
    submodules is not a cycle."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                edges.update(subs)
                if len(subs) < len(node.names):
                    edges.add(base)
        graph[name] = {m for m in edges if m in modules and m != name}
    return graph


def test_no_import_cycles():
    graph, cycles = _module_graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
