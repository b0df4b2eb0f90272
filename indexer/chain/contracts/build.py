"""Regenerate Token.json (ABI and deployment bytecode) from Token.vy.

    python -m pip install vyper==0.4.3   # in any environment: the project does not need it
    python indexer/chain/contracts/build.py

Token.json is committed; the tests deploy its bytecode on anvil and never compile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VYPER = "0.4.3"


def main() -> int:
    source = HERE / "Token.vy"
    out = subprocess.run(
        [sys.executable, "-m", "vyper", "-f", "abi,bytecode", str(source)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    abi_text, bytecode = out.stdout.strip().splitlines()
    version = subprocess.run([sys.executable, "-m", "vyper", "--version"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    if not version.startswith(VYPER):
        print(f"warning: vyper {version}, Token.json was built with {VYPER}", file=sys.stderr)
    doc = {"compiler": f"vyper {version}", "abi": json.loads(abi_text), "bytecode": bytecode}
    (HERE / "Token.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {HERE / 'Token.json'}: {len(bytecode) // 2 - 1} bytes of bytecode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
