"""Shared pytest options, and the check that a compiled run really tests the compiled engine."""

import os
import tomllib
from pathlib import Path

import pytest

# pyproject.toml [tool.quorumbook] native-modules, as module names.
COMPILED_MODULES = tuple(
    path.removesuffix(".py").replace("/", ".")
    for path in tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())[
        "tool"
    ]["quorumbook"]["native-modules"]
)


def pytest_addoption(parser):
    parser.addoption(
        "--rewrite-golden",
        action="store_true",
        default=False,
        help="rewrite the '<' event lines of tests/golden/*.txt from the engine's output",
    )


def pytest_collection_modifyitems(config, items):
    """The tests that start process clusters (tests/integration/) are `slow`: `make
    test-fast` leaves them out for the edit-test loop; `make test` runs everything."""
    for item in items:
        if item.path.parent.name == "integration":
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session):
    """QB_NATIVE=1 (make test's second run): the mypyc build of build/native must be the one
    imported, else that run would silently test the pure sources a second time."""
    if os.environ.get("QB_NATIVE") != "1":
        return
    import importlib

    pure = [
        name
        for name in COMPILED_MODULES
        if not importlib.import_module(name).__file__.endswith(".so")
    ]
    if pure:
        pytest.exit(f"QB_NATIVE=1 but not compiled: {', '.join(pure)} (run `make native`)", 2)
