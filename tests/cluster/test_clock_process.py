"""A real 3-node cluster whose leader's wall clock jumps (DATA_DIR/clock-offset-ns, the clock
nemesis's file) while a client keeps placing orders through the SDK.

What it shows (docs/jepsen.md, "clock"): a leader clock off by more than the signing window
(5 s) refuses every signed request as `401 expired`, definite, and stamps nothing; inside the
window the orders are acknowledged while the leader's stamps go back and forth, and the
exchange's clock never goes back along seq; a skewed follower refuses what is sent to it;
afterwards every node converges to one state hash, the replay's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.sdk import AdminClient, ApiError, Client
from cluster.clock import OFFSET_FILE
from cluster.launcher import LocalCluster
from disaster_recovery.export import committed_commands
from disaster_recovery.target import open_target
from jepsen.checkers import bank
from jepsen.history import LogEntry
from jepsen.nemesis.clock import write_offset
from statemachine import Exchange

pytestmark = pytest.mark.slow

S = 1_000_000_000
MARKET = {"op": "create_market", "market": "BTC-USD", "base": "BTC", "quote": "USD",
          "lot_size": 1, "tick_size": 1, "maker_fee_bps": 1, "taker_fee_bps": 2}  # fmt: skip
PICKED_UP_S = 0.3  # the node looks at the file every 0.1 s; a phase's first ops are not judged


@dataclass
class Placed:
    invoked: float  # time.monotonic()
    done: float
    wall_ns: int  # the client's wall clock when answered
    answer: dict | None = None
    error: BaseException | None = None


class Submitter(threading.Thread):
    """Places limit orders that rest (bids at 90, asks at 110), one after another."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stop = threading.Event()
        self.placed: list[Placed] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            side, price = ("buy", 90) if n % 2 else ("sell", 110)
            invoked = time.monotonic()
            try:
                answer = self.client.place("BTC-USD", side, "limit", 1, price, "gtc", f"o{n}")
                error = None
            except Exception as exc:  # judged by the test, per phase
                answer, error = None, exc
            self.placed.append(Placed(invoked, time.monotonic(), time.time_ns(), answer, error))
            time.sleep(0.01)


def expired(error: BaseException | None) -> bool:
    return isinstance(error, ApiError) and (error.status, error.code) == (401, "expired")


def test_a_leader_clock_jumping_back_and_forth(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    cluster = LocalCluster.create(
        tmp_path / "cluster", 3, target=str(archive), segment_max_s=0.5, backup_interval_s=0
    )
    cluster.exit_with_launcher = True
    try:
        cluster.start()
        cluster.wait_all_following(30)
        _scenario(cluster, archive)
    finally:
        cluster.stop_all()


def _scenario(cluster: LocalCluster, archive: Path) -> None:
    leader = cluster.wait_for_leader(30)
    followers = sorted(n for n in cluster.nodes if n != leader)
    url = {nid: n.config.api_url for nid, n in cluster.nodes.items()}

    def skew(node: str, seconds: float) -> None:
        write_offset(cluster.nodes[node].config.data_dir / OFFSET_FILE, int(seconds * S))

    with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
        admin.submit([MARKET] + [
            {"op": "deposit", "account": "alice", "asset": asset, "amount": 10**9,
             "ref": f"alice-{asset}"} for asset in ("BTC", "USD")
        ])  # fmt: skip
        key = admin.create_key("alice")

    # (label, node, offset s, how long): the leader far behind, far ahead, then back and
    # forth inside the signing window, then a follower far behind.
    phases = [("start", leader, 0, 1.0), ("leader -60 s", leader, -60, 1.5),
              ("leader +60 s", leader, +60, 1.5), ("leader 0", leader, 0, 1.0)]  # fmt: skip
    phases += [(f"leader {o:+d} s", leader, o, 0.6) for o in (+3, -3, +3, -3, +4, -4, +3)]
    phases += [("leader 0 again", leader, 0, 1.0), ("follower -60 s", followers[0], -60, 1.5)]
    marks: list[tuple[float, str]] = []
    follower_reads: dict[str, Any] = {}
    with Client(cluster.api_urls(), key, deadline_s=10) as client:
        submitter = Submitter(client)
        submitter.start()
        try:
            for label, node, offset, hold_s in phases:
                for other in cluster.nodes:  # one node skewed at a time
                    if other != node:
                        (cluster.nodes[other].config.data_dir / OFFSET_FILE).unlink(missing_ok=True)
                skew(node, offset)
                marks.append((time.monotonic(), label))
                time.sleep(hold_s)
            # The skewed follower refuses what is sent to it, even a read it would redirect;
            # the other follower sends it on to the leader.
            for nid in followers:
                with Client([url[nid]], key, deadline_s=5) as reader:
                    try:
                        follower_reads[nid] = reader.balances()
                    except ApiError as exc:
                        follower_reads[nid] = exc
        finally:
            submitter.stop.set()
            submitter.join(30)
            for node in cluster.nodes:
                (cluster.nodes[node].config.data_dir / OFFSET_FILE).unlink(missing_ok=True)
    ends = [t for t, _ in marks[1:]] + [time.monotonic()]
    # Raft runs on monotonic clocks: the skew moved no leadership (else the phases below
    # would have skewed a follower).
    assert cluster.wait_for_leader(10) == leader

    # Judge each order by the phase it ran in, well inside it.
    by_phase: dict[str, list[Placed]] = {label: [] for _, label in marks}
    for p in submitter.placed:
        assert p.answer is not None or expired(p.error), p.error  # nothing else, ever
        for (start, label), end in zip(marks, ends, strict=True):
            if start + PICKED_UP_S <= p.invoked and p.done <= end:
                by_phase[label].append(p)
    for label, placed in by_phase.items():
        ok = sum(1 for p in placed if p.answer is not None)
        print(f"{label:>16}: {ok} acknowledged, {len(placed) - ok} 401 expired")  # figures, -s
        assert placed, f"no order placed well inside phase {label!r}"
        far = label.startswith("leader") and label.endswith("60 s")
        if far:  # the leader's clock is 60 s off: every signed request refused, definite
            assert all(expired(p.error) for p in placed), label
        else:  # acknowledged, a skewed follower notwithstanding
            assert all(p.answer is not None for p in placed), (label, [p.error for p in placed])
    assert isinstance(follower_reads[followers[0]], ApiError)
    assert expired(follower_reads[followers[0]])
    assert not isinstance(follower_reads[followers[1]], ApiError), follower_reads[followers[1]]

    # What the clients were answered: ts never back along seq; while the leader's clock was
    # behind just after being ahead, its stamps were clamped to the latest one (ahead of the
    # real time), and no stamp of the 60 s ahead leader entered the log.
    acked = sorted(
        (e["seq"], e["ts"]) for p in submitter.placed if p.answer for e in p.answer["events"]
    )
    assert [ts for _, ts in acked] == sorted(ts for _, ts in acked)
    clamped = [p for p in by_phase["leader -3 s"] if p.answer["events"][0]["ts"] > p.wall_ns]
    assert clamped, "no order of the -3 s phase carried the +3 s phase's clock"
    assert max(ts for _, ts in acked) < time.time_ns() + 5 * S

    # Every node converges to one state; the archived log replays to it with the exchange's
    # clock never going back (the bank checker's clock_backwards), event by event.
    statuses = cluster.wait_converged(30)
    assert len({s["state_hash"] for s in statuses.values()}) == 1
    applied = max(s["applied_index"] for s in statuses.values())
    deadline = time.monotonic() + 30
    while max((s.get("archive") or {}).get("archived_index") or 0
              for s in cluster.statuses().values() if s) < applied:  # fmt: skip
        assert time.monotonic() < deadline, "the archive did not catch up"
        time.sleep(0.1)
    log = [LogEntry(c["cmd_index"], c["command"]) for c in
           committed_commands(open_target(str(archive)), applied)]  # fmt: skip
    exchange, last = Exchange(), (0, 0)
    for entry in log:
        for e in exchange.apply(dict(entry.command)):
            assert (e["seq"], e["ts"]) > last and e["ts"] >= last[1], (e, last)
            last = (e["seq"], e["ts"])
    final = next(iter(statuses.values()))
    assert (exchange.cmd_index, exchange.state_hash()) == (final["cmd_index"], final["state_hash"])
    result = bank.check([], log)
    assert result.valid is True, result.anomalies
