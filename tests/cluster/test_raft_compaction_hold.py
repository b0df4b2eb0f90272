"""The compaction hold (ADR 0008): a node with a log archiver keeps, when it compacts, a state
at or before the archive's end and every journal entry after it, so that whichever node's
archiver carries the archive on finds no gap.

The gap the Jepsen matrix found (5 nodes, kill nemesis): the archiving follower was killed at
archive end 4900, the follower that took over had compacted at 5000 and its log started
there; entries 4901-4999 were nowhere an archiver could read them. Each scenario here is run
with the hold off (today's compaction: the gap, asserted, so the test can fail) and on.

What an archiver needs is checked the way it reads: the node's data directory only (its dumps
and its journal file), replayed from the newest kept state at or before the archive's end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgpack
import pytest
from pysyncobj.config import SyncObjConf

from cluster.raft.hardened import HELD_DUMP, payload_of_entry
from cluster.raft.storage import JournalGap, JournalReader, read_dump

from .conftest import SimNet, SimNode, sim_conf

SOLO = "10.0.0.9:4321"
HOLD = 10**7  # bytes of journal a hold may keep: more than any scenario here needs


def conf() -> SyncObjConf:
    return sim_conf()


def start(sim: SimNet, data_dir: Path, hold_bytes: int, addr: str = SOLO, peers=()) -> SimNode:
    return sim.add("hardened", addr, list(peers), data_dir=data_dir, hold_bytes=hold_bytes)


def propose(sim: SimNet, leader: SimNode, tag: str, n: int) -> None:
    for i in range(n):
        leader.propose(f"{tag}{i}".encode())
    sim.settle()


def compact(sim: SimNet, node: SimNode) -> int:
    """Compact now; the index of the new dump."""
    node.sync.forceLogCompaction()
    sim.settle()
    return read_dump(node.data_dir / "raft.dump")[0].index


def rebuilt(data_dir: Path, end: int, applied: int) -> list[bytes] | None:
    """The state an archiver whose archive ends at `end` rebuilds from this data directory up
    to `applied`: the newest state kept at or before `end` (raft.dump, the held dump, or the
    empty state), then every journal entry after it. None: a gap (the journal lacks one)."""
    states: list[tuple[int, list[bytes]]] = [(0, [])]
    for name in ("raft.dump", HELD_DUMP):
        if (data_dir / name).exists():
            header, blob = read_dump(data_dir / name)
            states.append((header.index, list(msgpack.unpackb(blob))))
    index, state = max((s for s in states if s[0] <= end), key=lambda s: s[0])
    reader = JournalReader(data_dir / "raft.journal")
    try:
        entries = reader.read(index + 1, applied, 10**6)
    except JournalGap:
        return None
    finally:
        reader.close()
    assert entries and entries[-1][1] == applied, "the journal ends before the applied index"
    for command, _idx, _term in entries:
        payload = payload_of_entry(command)
        if payload is not None:
            state.append(payload)
    return state


@pytest.mark.parametrize("hold_bytes", [0, HOLD], ids=["no-hold", "hold"])
def test_an_archive_behind_the_compaction_point_still_finds_every_entry(
    sim: SimNet, tmp_path, hold_bytes
):
    node = start(sim, tmp_path / "node", hold_bytes)
    sim.elect(node)
    propose(sim, node, "A", 4)
    end = node.last_applied()  # the archive has everything up to here ...
    node.sync.compaction_hold = end
    propose(sim, node, "B", 6)  # ... and nothing after: its archiver was killed
    dump_at = compact(sim, node)
    assert dump_at > end + 1
    applied = node.last_applied()

    got = rebuilt(node.data_dir, end, applied)
    if not hold_bytes:
        assert got is None  # today's compaction: the entries after `end` are gone
        assert node.log()[0][0] == dump_at - 1
        return
    assert got == node.state
    status = node.sync.raft_status()
    # The journal still starts at 1 (the empty state is the one kept): no held dump needed.
    assert status["log_first_index"] == 1 and status["held_dump_index"] is None
    assert not (node.data_dir / HELD_DUMP).exists()


def test_the_hold_keeps_the_newest_state_it_can_and_lets_go_when_the_archive_catches_up(
    sim: SimNet, tmp_path
):
    node = start(sim, tmp_path / "node", HOLD)
    sim.elect(node)
    propose(sim, node, "A", 3)
    node.sync.compaction_hold = node.last_applied()  # the archive keeps up
    d1 = compact(sim, node)
    assert node.sync.raft_status()["held_dump_index"] is None
    assert node.log()[0][0] == d1 - 1  # nothing held: compaction as without the hold

    propose(sim, node, "B", 3)
    end = d1 + 1  # the archive stops a little past the dump at d1
    node.sync.compaction_hold = end
    d2 = compact(sim, node)
    # The dump at d1 (at or before the archive's end) is kept, the journal from there.
    assert node.sync.raft_status()["held_dump_index"] == d1
    assert read_dump(node.data_dir / HELD_DUMP)[0].index == d1
    assert node.log()[0][0] == d1
    assert rebuilt(node.data_dir, end, node.last_applied()) == node.state

    propose(sim, node, "C", 3)
    d3 = compact(sim, node)  # still stuck at `end`: the same held dump, the journal grows
    assert d3 > d2
    assert node.sync.raft_status()["held_dump_index"] == d1
    assert node.log()[0][0] == d1
    assert rebuilt(node.data_dir, end, node.last_applied()) == node.state

    node.sync.compaction_hold = d3  # another node's archiver carried it to d3
    propose(sim, node, "D", 3)
    d4 = compact(sim, node)
    assert node.sync.raft_status()["held_dump_index"] == d3  # the newer state replaces it
    assert node.log()[0][0] == d3
    assert rebuilt(node.data_dir, d3, node.last_applied()) == node.state

    node.sync.compaction_hold = node.last_applied()  # caught up
    propose(sim, node, "E", 1)
    node.sync.compaction_hold = node.last_applied()
    d5 = compact(sim, node)
    assert d5 > d4
    assert node.sync.raft_status()["held_dump_index"] is None
    assert not (node.data_dir / HELD_DUMP).exists()
    assert node.log()[0][0] == d5 - 1


def test_past_its_bound_the_hold_is_released_and_said(sim: SimNet, tmp_path, caplog):
    node = start(sim, tmp_path / "node", hold_bytes=600)
    sim.elect(node)
    propose(sim, node, "A", 2)
    node.sync.compaction_hold = end = node.last_applied()
    propose(sim, node, "B" * 40, 10)  # well over 600 bytes of journal after `end`
    with caplog.at_level(logging.WARNING, logger="cluster.raft.hardened"):
        dump_at = compact(sim, node)
    assert "compaction hold released" in caplog.text
    status = node.sync.raft_status()
    assert status["compaction_holds_released"] == 1
    assert status["log_first_index"] == dump_at - 1
    assert rebuilt(node.data_dir, end, node.last_applied()) is None  # the gap, said loudly


def crashed_holding(sim: SimNet, data_dir: Path) -> tuple[int, list[bytes]]:
    """A node that compacted twice while the archive stayed at its first dump, then applied
    C0..C2 and crashed: (the held dump's index, its state at the crash)."""
    node = start(sim, data_dir, HOLD)
    sim.elect(node)
    propose(sim, node, "A", 3)
    node.sync.compaction_hold = node.last_applied()
    d1 = compact(sim, node)
    propose(sim, node, "B", 3)
    node.sync.compaction_hold = d1
    compact(sim, node)
    assert (data_dir / HELD_DUMP).exists()
    propose(sim, node, "C", 3)
    state = list(node.state)
    sim.crash(node)
    return d1, state


def test_a_restarted_node_keeps_its_held_state_and_applies_nothing_twice(sim: SimNet, tmp_path):
    data_dir = tmp_path / "node"
    d1, state = crashed_holding(sim, data_dir)
    end = d1

    node = start(sim, data_dir, HOLD)
    # Until the archiver says otherwise, it keeps what it has: the held state.
    assert node.sync.compaction_hold == d1
    assert node.sync.raft_status()["held_dump_index"] == d1
    sim.elect(node)
    sim.settle()
    assert node.state == state
    assert node.machine.restores == 1
    assert node.executions == [b"C0", b"C1", b"C2"]  # the entries after the dump, once
    assert node.log()[0][0] == d1
    propose(sim, node, "D", 2)
    compact(sim, node)
    assert rebuilt(data_dir, end, node.last_applied()) == node.state


def test_a_restart_without_a_hold_drops_the_held_dump(sim: SimNet, tmp_path):
    data_dir = tmp_path / "node"
    _d1, state = crashed_holding(sim, data_dir)

    node = start(sim, data_dir, hold_bytes=0)  # [archive] taken out of the config
    assert not (data_dir / HELD_DUMP).exists()
    sim.elect(node)
    sim.settle()
    assert node.state == state


def test_a_snapshot_install_drops_the_held_dump(sim: SimNet, tmp_path):
    """A follower that falls behind the leader's log start installs the leader's snapshot:
    its journal restarts at the snapshot, so the state it held no longer leads anywhere."""
    addrs = [f"10.0.0.{i}:4321" for i in (1, 2, 3)]
    a, b = (sim.add("hardened", x, [p for p in addrs if p != x], conf=conf()) for x in addrs[:2])
    c = sim.add("hardened", addrs[2], addrs[:2], conf=conf(), hold_bytes=HOLD)
    sim.elect(a)
    propose(sim, a, "A", 3)
    c.sync.compaction_hold = c.last_applied()
    d1 = compact(sim, c)
    propose(sim, a, "B", 3)
    c.sync.compaction_hold = d1
    compact(sim, c)
    assert (c.data_dir / HELD_DUMP).exists()

    sim.isolate(c.addr)
    propose(sim, a, "C", 5)
    compact(sim, a)
    compact(sim, b)
    sim.heal(c.addr)
    sim.settle(12)
    assert c.sync.snapshots_installed == 1
    assert c.state == a.state
    assert not (c.data_dir / HELD_DUMP).exists()
    assert c.sync.raft_status()["held_dump_index"] is None
