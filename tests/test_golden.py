"""Golden transcripts: commands in, exact events out (STYLE.md item 7).

Each `tests/golden/<scenario>.txt` is a worked example of docs/reference/state-machine.md:

    # a comment: what the scenario shows and why each outcome is right
    > {"op": "deposit", "account": "alice", "asset": "USD", "amount": 100, "ref": "d1"}
    < {"type":"balance", ..., "seq":1, "ts":1000, "cmd_index":1}

A `>` line is one command (JSON); when it is an object without `ts`, `ts` is set to
`cmd_index * 1000` (its 1-based position in the file). The `<` lines after it are the exact
events it produced, one compact JSON object per line, in emitted order and with the engine's
key order. Blank lines and `#` lines are kept as written.

The commands are replayed through a fresh `Exchange`, with `check_invariants()` after each
one, and the file must come out byte for byte the same. `pytest --rewrite-golden` rewrites
the `<` lines from the engine instead, keeping comments and commands, so a behaviour change
is reviewed as a diff of these files.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

from statemachine import Exchange

GOLDEN_DIR = Path(__file__).parent / "golden"
SCENARIOS = sorted(GOLDEN_DIR.glob("*.txt"))


def render(event: dict) -> str:
    # ensure_ascii keeps the files plain ASCII; compact separators keep one event per line.
    return "< " + json.dumps(event, separators=(",", ":"), ensure_ascii=True)


def replay(path: Path) -> tuple[str, int]:
    """The file's text with every `<` line regenerated, and the number of commands."""
    ex = Exchange()
    out: list[str] = []
    commands = 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("<"):
            continue  # regenerated below, right after its command
        out.append(line)
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith("> "):
            raise ValueError(f"{path.name}:{lineno}: expected '#', '>' or '<', got {line!r}")
        commands += 1
        command = json.loads(line[2:])
        if isinstance(command, dict) and "ts" not in command:
            command["ts"] = commands * 1000
        events = ex.apply(command)
        ex.check_invariants()
        out.extend(render(event) for event in events)
    return "\n".join(out) + "\n", commands


def test_scenarios_exist():
    assert SCENARIOS, f"no golden scenarios in {GOLDEN_DIR}"


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_golden(path: Path, request: pytest.FixtureRequest) -> None:
    expected = path.read_text()
    actual, commands = replay(path)
    assert commands, f"{path.name} has no commands"
    if request.config.getoption("--rewrite-golden"):
        if actual != expected:
            path.write_text(actual)
        return
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"{path.name} (file)",
                tofile=f"{path.name} (engine)",
            )
        )
        pytest.fail(
            f"{path.name} differs from the engine's events; if the change is intended, run "
            f"pytest tests/test_golden.py --rewrite-golden and review the diff\n{diff}",
            pytrace=False,
        )
