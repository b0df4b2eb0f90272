"""`pip install .` ships the compiled engine (setup.py, ADR 0003): the wheel holds a mypyc
extension for every module of pyproject.toml's native-modules, next to its pure source (the
fallback where no compiler exists, and what the extensions were built from)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import COMPILED_MODULES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_the_compiled_engine(tmp_path: Path) -> None:
    source = tmp_path / "src"
    # A copy of the tree (setuptools builds in place: the checkout must stay clean).
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("quorumbook-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in COMPILED_MODULES:
        path = module.replace(".", "/")
        assert any(n.startswith(path + ".cpython-") and n.endswith(".so") for n in names), path
        assert path + ".py" in names, path
