"""Whole harness runs, short: a healthy cluster under kill, pause and partition faults is
valid; the planted bug (`--unsafe-local-reads`) is caught by a run with partitions. Each
leaves no process, namespace or rule behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jepsen.net import ours, requirements_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(requirements_missing()),
        reason=f"network namespaces unavailable: {', '.join(requirements_missing())}",
    ),
]


def jepsen_run(out: Path, *args: str) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "jepsen", "run", "--out", str(out), "--json", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def assert_nothing_left(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    for node in manifest["nodes"]:
        pid = node.get("pid")
        assert pid is None or not Path(f"/proc/{pid}").exists() or _zombie(pid), node
    net = json.loads((run_dir / "results.json").read_text())["run"].get("net")
    if net is not None:  # (other runs may be going on: only this one's are checked)
        left = [name for names in ours().values() for name in names if name.startswith(net)]
        assert not left, left


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_a_healthy_cluster_under_faults_is_valid(tmp_path):
    code, results = jepsen_run(
        tmp_path, "--nodes", "3", "--time", "14", "--rate", "60", "--interval", "2",
        "--nemesis", "kill,pause,partition", "--seed", "3",
    )  # fmt: skip
    run_dir = Path(results["dir"])
    assert code == 0 and results["valid"] is True, results
    assert results["run"]["faults"] >= 2
    assert {"sequencer", "reads", "bank"} <= set(results["checkers"])
    stats = results["checkers"]["sequencer"]["stats"]
    assert stats["ok"] > 100 and stats["log_commands"] >= stats["ok"]
    assert results["checkers"]["reads"]["stats"]["reads"] > 50
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert {op["f"] for op in history if op["process"] == "nemesis"} <= {
        "kill", "pause", "partition"}  # fmt: skip
    assert (run_dir / "index.html").exists() and (run_dir / "latency.png").exists()
    assert_nothing_left(run_dir)
    # `jepsen check` gives the same verdict from the stored files alone.
    again = subprocess.run(
        [sys.executable, "-m", "cluster", "jepsen", "check", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["valid"] is True


def test_the_planted_bug_is_caught(tmp_path):
    """Every node answering linearizable reads from its own state: a partition lets the
    minority's node answer reads the majority has moved past."""
    code, results = jepsen_run(
        tmp_path, "--nodes", "3", "--time", "16", "--rate", "80", "--interval", "3",
        "--nemesis", "partition", "--seed", "5", "--unsafe-local-reads",
    )  # fmt: skip
    assert code == 1 and results["valid"] is False, results
    reads = results["checkers"]["reads"]
    assert reads["valid"] is False
    kinds = {a["kind"] for a in reads["anomalies"]}
    assert kinds & {"stale_read", "impossible_read"}, kinds
    assert all(a["op_indexes"] for a in reads["anomalies"])
    # The writes stay correct: the bug is in the reads only, and the checkers say so.
    assert results["checkers"]["sequencer"]["valid"] is True
    assert_nothing_left(Path(results["dir"]))
