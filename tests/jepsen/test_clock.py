"""The clock nemesis (jepsen/nemesis/clock.py) and the bank checker's `clock_backwards`."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cluster import clock as node_clock
from jepsen.checkers import bank
from jepsen.nemesis import Context
from jepsen.nemesis.clock import OFFSET_FILE, SIZES, Clock, offset_ns
from statemachine import Exchange

from . import Cluster

NODES = ("n1", "n2", "n3")


def data_dirs(tmp_path: Path) -> dict[str, Path]:
    return {n: tmp_path / n / "data" for n in NODES}


def offset_in(data_dir: Path) -> int | None:
    """What the node would add to its clock: cluster/clock.py reading the file."""
    if not (data_dir / OFFSET_FILE).exists():
        return None
    return node_clock.WallClock.of_data_dir(data_dir).refresh()


def test_the_file_name_is_the_nodes() -> None:
    assert OFFSET_FILE == node_clock.OFFSET_FILE


def test_offsets_are_seeded_go_both_ways_and_come_in_three_sizes() -> None:
    drawn = [offset_ns(random.Random(7)) for _ in range(3)]
    assert drawn[0] == drawn[1] == drawn[2]
    rng = random.Random(1)
    many = [offset_ns(rng) for _ in range(2_000)]
    sizes = Counter(size for size, _ in many)
    assert set(sizes) == {"small", "medium", "large"}
    assert 0.05 < sizes["large"] / len(many) < 0.15
    assert 0.4 < sum(1 for _, o in many if o < 0) / len(many) < 0.6
    bounds = {name: (low, high) for name, _, low, high in SIZES}
    for size, offset in many:
        low, high = bounds[size]
        assert offset % 1_000_000 == 0 and low <= abs(offset) // 1_000_000 <= high
    # small ones stay inside the signing window (5 s), medium and large ones do not
    assert bounds["small"][1] < 5_000 <= bounds["medium"][0]


def test_start_skews_the_leader_half_the_time_and_the_node_reads_it(tmp_path: Path) -> None:
    dirs = data_dirs(tmp_path)
    nemesis = Clock(dirs)
    ctx = Context(nodes=list(NODES), rng=random.Random(3), leader=lambda: "n2")
    targets = Counter()
    for _ in range(200):
        did = nemesis.start(ctx)
        targets[did["node"]] += 1
        assert did["was_leader"] == (did["node"] == "n2")
        assert set(did) == {"node", "was_leader", "size", "offset_ms"}
        # exactly one node skewed at a time (a start replaces the fault), by what it says
        skewed = {n: offset_in(d) for n, d in dirs.items() if offset_in(d) is not None}
        assert skewed == {did["node"]: did["offset_ms"] * 1_000_000}
    assert 0.55 < targets["n2"] / 200 < 0.8  # half the time the leader, else any node
    assert targets["n1"] > 20 and targets["n3"] > 20
    assert nemesis.stop(ctx) == {"reset": [did["node"]]}
    assert all(offset_in(d) is None for d in dirs.values())
    assert nemesis.stop(ctx) == {"reset": []}  # nothing active: harmless


def test_the_same_seed_gives_the_same_faults(tmp_path: Path) -> None:
    runs = []
    for attempt in ("a", "b"):
        nemesis = Clock(data_dirs(tmp_path / attempt))
        ctx = Context(nodes=list(NODES), rng=random.Random(11), leader=lambda: "n1")
        runs.append([nemesis.start(ctx) for _ in range(20)])
        nemesis.heal_all()
    assert runs[0] == runs[1]


def test_heal_all_removes_every_file_it_wrote_and_is_idempotent(tmp_path: Path) -> None:
    dirs = data_dirs(tmp_path)
    members = dict(dirs)
    nemesis = Clock(lambda node: members[node])  # a function: nodes may come and go
    Clock(dirs).heal_all()  # before any start
    ctx = Context(nodes=list(NODES), rng=random.Random(5))  # no leader known
    did = nemesis.start(ctx)
    del members[did["node"]]  # removed from the cluster meanwhile: still healed
    nemesis.heal_all()
    nemesis.heal_all()
    assert all(offset_in(d) is None for d in dirs.values())
    assert not list(tmp_path.rglob("*.tmp"))


def test_heal_all_raises_if_a_file_may_remain(tmp_path: Path) -> None:
    dirs = data_dirs(tmp_path)
    nemesis = Clock(dirs)
    did = nemesis.start(Context(nodes=["n1"], rng=random.Random(0)))
    path = dirs[did["node"]] / OFFSET_FILE
    path.unlink()
    path.mkdir()  # cannot be unlinked
    with pytest.raises(OSError):
        nemesis.heal_all()


# ---------------------------------------------------------------------- clock_backwards


def funded() -> Cluster:
    c = Cluster(spread=1)
    c.setup(accounts=("alice", "bob"))
    return c


def test_a_frozen_or_jumping_ahead_clock_is_valid() -> None:
    c = funded()
    c.ts += 60 * 10**9  # a leader 60 s ahead
    c.place("alice", "sell", 100, 5, "a1")
    c.ts -= 10  # the next stamps are clamped to it: the same ts again
    c.place("bob", "buy", 100, 2, "b1")
    c.place("bob", "buy", 100, 1, "b2")
    assert c.log[-2]["ts"] == c.log[-3]["ts"]
    result = bank.check(c.history(), c.log)
    assert result.valid is True, result.anomalies


def test_a_command_stamped_before_the_last_is_clock_backwards() -> None:
    """What the log would hold if the state machine took a leader's stamp as it is: the
    exchange rejects it (`bad_ts`), and the checker names the command."""
    c = funded()
    c.place("alice", "sell", 100, 5, "a1")
    placed = c.place("bob", "buy", 100, 2, "b1")
    at = placed.logged_at
    c.log[at - 1]["ts"] = c.log[at - 2]["ts"] - 3 * 10**9
    result = bank.check(c.history(), c.log)
    assert result.kinds() == {"clock_backwards"}
    (anomaly,) = result.anomalies
    assert anomaly["message"].startswith(f"cmd_index {at} has ts ")
    assert f"3000000000 ns before cmd_index {at - 1}'s" in anomaly["message"]


class BackInTime:
    """An exchange that stamps the events of the `at`-th command a second early (a state
    machine whose clock goes back)."""

    def __init__(self, at: int) -> None:
        self.exchange = Exchange()
        self.at = at

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exchange, name)

    def apply(self, command: dict) -> list[dict]:
        events = self.exchange.apply(command)
        if self.exchange.cmd_index == self.at:
            for e in events:
                e["ts"] -= 10**9
        return events


def test_events_whose_ts_go_back_along_seq_are_clock_backwards() -> None:
    c = funded()
    c.place("alice", "sell", 100, 5, "a1")
    placed = c.place("bob", "buy", 100, 2, "b1")
    at = placed.logged_at
    result = bank.check(c.history(), c.log, exchange_factory=lambda: BackInTime(at))
    assert result.kinds() == {"clock_backwards"}
    (anomaly,) = result.anomalies  # one per command, not one per event
    assert anomaly["message"].startswith("event seq ")
    assert f"(cmd_index {at})" in anomaly["message"]
    assert anomaly["op_indexes"]  # tied to the write that saw it
