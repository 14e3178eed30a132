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
