"""The compiled state machine in the wheel (ADR 0003): `pip install .` builds the modules listed
under [tool.quorumbook] native-modules in pyproject.toml with mypyc, so every node a user starts
runs the engine the benchmarks measure. Where they cannot be compiled (no C compiler, mypyc
refuses) the wheel keeps the pure modules, which give the same bytes, only slower; a node's
`/v1/cluster/status` says which it runs (`engine`).

Editable installs (`pip install -e .`, what `make` uses for development) stay pure: a `.so`
next to its source would shadow every edit of it. `make native` builds the compiled copy for
development in build/native instead. QB_PURE=1 skips compiling.
"""

import os
import sys
import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# The commands that build what gets installed; metadata and editable builds compile nothing.
BUILDING = {"bdist_wheel", "build", "build_ext", "install"} & set(sys.argv)


def native_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["quorumbook"]["native-modules"]


def ext_modules() -> list:
    if not BUILDING or "editable_wheel" in sys.argv or os.environ.get("QB_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify

        extensions = mypycify(native_modules(), opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc missing, or it refuses the sources (exits)
        print(f"quorumbook: not compiling the state machine ({exc}); pure Python", file=sys.stderr)
        return []
    for extension in extensions:
        # A failed C compile skips the extension instead of failing the install: the wheel
        # then imports the pure module of the same name.
        extension.optional = True
    return extensions


setup(ext_modules=ext_modules())
