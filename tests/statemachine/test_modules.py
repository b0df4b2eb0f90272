"""Inside statemachine/, imports go one way too (STYLE.md item 4).

The state (state.py) and the modules that work on it (accounts, reads, snapshot, invariants)
never import exchange.py: no import cycle, and they see the state only through its public
attributes, never an `Exchange`'s insides.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "statemachine"
# What applies commands or drives an `Exchange` (the shadow of precheck.py) may import it.
EXCHANGE_USERS = {"__init__", "exchange", "precheck"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def _package_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(module of this package, line) for every `from .x import ...` / `from . import x`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append((node.module.split(".")[0], node.lineno))
            else:
                found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "statemachine" and len(parts) > 1:
                found.append((parts[1], node.lineno))
    return found


def test_only_the_drivers_import_exchange() -> None:
    wrong = [
        f"statemachine/{path.name}:{line}"
        for path in _modules()
        if path.stem not in EXCHANGE_USERS
        for module, line in _package_imports(ast.parse(path.read_text()))
        if module == "exchange"
    ]
    assert not wrong, "imports exchange.py (the state side must not):\n" + "\n".join(wrong)


def test_no_module_reads_another_objects_private_attributes() -> None:
    """`x._name` only on `self` / `cls`: the state is shared through public attributes."""
    wrong = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                wrong.append(f"statemachine/{path.name}:{node.lineno} reads .{node.attr}")
    assert not wrong, "\n".join(wrong)
