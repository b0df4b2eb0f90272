"""Each pysyncobj 0.3.17 hazard, reproduced on plain pysyncobj and shown fixed on ours.

The scenario tests are parametrized over ``kind``: ``plain`` is pysyncobj's own ``SyncObj``,
``hardened`` is ``cluster.raft.hardened.HardenedSyncObj``. Both run the same script through the
harness in conftest.py; the plain run asserts the unsafe outcome (so the test demonstrably can
fail) and the hardened run asserts the safe one. Upstream line numbers are those of
pysyncobj/syncobj.py 0.3.17.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import pytest
from pysyncobj import pickle as pysyncobj_pickle
from pysyncobj.config import FAIL_REASON, SyncObjConf
from pysyncobj.node import TCPNode

from cluster.raft import (
    EXIT_APPLY_FAILED,
    EXIT_ENTRY_UNREADABLE,
    RaftReplica,
    RaftSettings,
    RaftStartupError,
    SubmitErrorReason,
)
from cluster.raft.storage import DurableJournal, RaftStorageError
from cluster.raft.transport import BoundedTcpConnection
from cluster.workload import wait_for
from jepsen.nemesis import Context
from jepsen.nemesis.data import _raise_commit_hint

from .conftest import KINDS, KINDS_AND_UNSAFE, LOSSY, SimNet, free_port, sim_conf

X = [b"X%d" % i for i in range(1, 5)]

# Plain pysyncobj's MetaStorer.getMeta leaks the meta file's handle (journal.py 361,
# ``open(...).read()``); only the plain runs with a file journal hit it.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in.*_io\.FileIO name=[^>]*raft\.journal\.meta'"
    ":pytest.PytestUnraisableExceptionWarning"
)


def entry_len(payload: bytes) -> int:
    """Bytes of the log entry pysyncobj makes for one call of the replicated method."""
    return 1 + len(pysyncobj_pickle.dumps((0, (payload,))))


def assert_no_double_execution(*nodes) -> None:
    for node in nodes:
        repeated = {p for p in node.executions if node.executions.count(p) > 1}
        assert not repeated, f"{node.addr} executed {sorted(repeated)} more than once"


def assert_applied_never_decreased(*nodes) -> None:
    for node in nodes:
        history = node.applied_history
        drops = [(a, b) for a, b in itertools.pairwise(history) if b < a]
        assert not drops, f"{node.addr}: lastApplied moved backwards {drops}"


# ---------------------------------------------------------------------------------------------
# Fix 1: truncation on overlap (syncobj.py 991-1006) and the commit index (1027-1035)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS_AND_UNSAFE)
def test_overlapping_resend_loses_acknowledged_writes_only_on_plain(sim: SimNet, kind):
    """A rewound leader resends a batch a follower already holds, then crashes.

    Every message is one the nodes' own handlers sent; only delivery timing is scripted:
    A sends two batches to B; B's first reply reaches A late, after which A rewinds nextIndex
    (1077-1078) and resends from there; B's other replies arrive and A commits and
    acknowledges all four writes (with B's help, C being cut off); A crashes with only the
    first resent batch delivered. Plain B truncated its log to that batch (991-1006); B then
    wins the election and the acknowledged X3, X4 are gone.
    """
    a, b, c = sim.cluster(kind, appendEntriesBatchSizeBytes=entry_len(X[0]) + 1)
    sim.held.add((b.addr, a.addr))  # B's replies to A are slow
    sim.elect(a)  # term 1; C's vote and ack arrive
    sim.isolate(c.addr)  # C is cut off from here on

    for payload in X:
        a.propose(payload)
    a.tick()  # A appends X1..X4 at indexes 3..6
    sim.clock.advance(0.06)
    a.tick()  # sends [3,4] and [5,6] to B (2 entries per batch)
    assert [[e[1] for e in m["entries"]] for m in sim.queued(a.addr, b.addr)] == [[3, 4], [5, 6]]
    sim.deliver(a.addr, b.addr)  # B holds 1..6

    sim.deliver(b.addr, a.addr, count=2)  # B's vote, then its ack of the no-op: nextIndex -> 3
    sim.clock.advance(0.06)
    a.tick()  # resends [3,4] and [5,6]
    sim.deliver(b.addr, a.addr)  # B's acks of [3,4] and [5,6]: matchIndex[B] = 6
    sim.clock.advance(0.06)
    a.tick()  # commits 3..6 with B, applies, acknowledges
    assert a.acknowledged() == X

    sim.deliver(a.addr, b.addr, count=1)  # the resent [3,4] reaches B ...
    sim.crash(a)  # ... and A dies with the rest unsent

    sim.held.clear()
    sim.heal(c.addr)
    sim.elect(b)
    sim.settle()

    for survivor in (b, c):
        missing = [p for p in a.acknowledged() if p not in survivor.state]
        if kind in LOSSY:
            assert missing == [b"X3", b"X4"], (survivor.addr, missing)
        else:
            assert missing == [], (survivor.addr, missing)
    if kind == "hardened":
        assert b.state == c.state == X


@pytest.mark.parametrize("kind", KINDS)
def test_late_resend_never_truncates_applied_entries_nor_lowers_commit(sim: SimNet, kind, caplog):
    """A resend of an early batch (the leader's own message, delivered again) reaches a
    follower that has applied past it: plain deletes applied entries (CRITICAL line at 1000)
    and lowers its commit index (1029-1030); ours keeps both."""
    a, b, _c = sim.cluster(kind, appendEntriesBatchSizeBytes=entry_len(X[0]) + 1)
    sim.elect(a)
    sim.settle()
    for payload in X:
        a.propose(payload)
    sim.step()  # appended
    sim.clock.advance(0.06)
    a.tick()  # sends [3,4] and [5,6]
    early_batch = sim.queued(a.addr, b.addr)[0]
    assert [e[1] for e in early_batch["entries"]] == [3, 4]
    sim.deliver_all()
    sim.settle()
    assert b.last_applied() == b.commit_index() == 6

    caplog.set_level(logging.CRITICAL)
    b.transport._onMessageReceived(a.sync.selfNode, early_batch)

    if kind == "plain":
        assert [idx for idx, _ in b.log()][-1] == 4  # entries 5, 6 deleted
        assert b.commit_index() == 4  # commit index lowered
        assert "truncating already-applied log entries" in caplog.text
    else:
        assert [idx for idx, _ in b.log()][-1] == 6
        assert b.commit_index() == 6
        assert caplog.text == ""


@pytest.mark.parametrize("kind", KINDS)
def test_conflicting_entry_at_committed_index_is_refused(sim: SimNet, kind, caplog):
    """A (crafted) AppendEntries that contradicts a committed entry: plain deletes committed,
    applied entries; ours refuses, logs CRITICAL and keeps its log."""
    a, b, _c = sim.cluster(kind)
    sim.elect(a)
    for payload in X:
        a.propose(payload)
    sim.settle()
    assert b.last_applied() == 6
    log_before = b.log()
    caplog.set_level(logging.CRITICAL)
    # term 1 everywhere; this claims index 4 holds a term-1 entry different from ours (term 2)
    forged = {
        "type": "append_entries",
        "term": a.term(),
        "commit_index": 6,
        "prevLogIdx": 3,
        "prevLogTerm": 1,
        "entries": [(b"\x01", 4, 2)],
    }
    b.transport._onMessageReceived(a.sync.selfNode, forged)
    if kind == "plain":
        assert [idx for idx, _ in b.log()][-1] == 4 and b.log() != log_before
    else:
        assert b.log() == log_before
        assert b.sync.refused_truncations == 1
        assert "refusing to truncate log entries from index 4" in caplog.text
        reply = sim.queued(b.addr, a.addr)[-1]
        assert reply["type"] == "next_node_idx" and reply["success"] is False


def test_commit_never_passes_the_verified_prefix(sim: SimNet):
    """Ours keeps a follower's log when a resend only overlaps it, so it must not commit past
    what the message verified: a stale entry after the verified prefix stays uncommitted.
    (Plain is safe here only because it deletes everything after prevLogIdx.)"""
    a, b, _c = sim.cluster("hardened")
    sim.elect(a)
    sim.settle()
    # B holds a stale entry at 3 (term 1) that A never had; A is now in term 5 and its log has
    # a different entry at 3. A sends entries up to 2 only (a batch boundary) with commit 3.
    b.sync._SyncObj__raftLog.add(b"\x01", 3, 1)
    message = {
        "type": "append_entries",
        "term": 5,
        "commit_index": 3,
        "prevLogIdx": 1,
        "prevLogTerm": 0,
        "entries": [(b"\x01", 2, 1)],
    }
    b.transport._onMessageReceived(a.sync.selfNode, message)
    assert b.commit_index() == 2
    assert b.log()[-1] == (3, 1)  # kept, not committed, to be resolved later


# ---------------------------------------------------------------------------------------------
# Fix 2: commit through snapshot chunks (syncobj.py 1022-1025 then 1029-1035)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS_AND_UNSAFE)
def test_deposed_leader_never_commits_its_own_entries_from_a_snapshot_chunk(sim: SimNet, kind):
    """A deposed leader holding uncommitted entries receives the new leader's snapshot.

    Plain: the first chunk runs the commit step, commitIndex = min(leaderCommit, own last
    index): the old leader applies its own uncommitted X1..X3 and reports SUCCESS for them,
    then the snapshot replaces its state. Ours: chunks never move the commit index; the
    waiting commands end UNKNOWN when the snapshot covers their indexes.
    """
    a, _b, c = sim.cluster(kind)
    sim.elect(a)
    sim.settle()
    sim.isolate(a.addr)
    for payload in X[:3]:
        a.propose(payload)
    a.tick()  # A appends 3..5, nobody hears of them
    assert [idx for idx, _ in a.log()][-1] == 5

    sim.elect(c)  # term 2 with B
    for payload in [b"Y1", b"Y2", b"Y3", b"Y4", b"Y5"]:
        c.propose(payload)
    sim.settle()
    c.sync.forceLogCompaction()
    sim.settle()  # C dumps and trims its log
    assert c.log()[0][0] > 5

    sim.heal(a.addr)
    sim.held.add((c.addr, a.addr))
    sim.clock.advance(0.06)
    c.tick()
    sim.deliver(c.addr, a.addr)  # C's heartbeat: A steps down, asks to rewind
    sim.deliver(a.addr, c.addr)
    sim.clock.advance(0.06)
    c.tick()  # C sends its snapshot in chunks
    chunks = [m for m in sim.queued(c.addr, a.addr) if "serialized" in m]
    assert len(chunks) >= 2
    sim.deliver(c.addr, a.addr, count=1)  # the first chunk only
    a.tick()  # A's apply step

    if kind in LOSSY:
        assert a.commit_index() == 5
        assert a.executions == X[:3]  # its own uncommitted commands applied
        assert a.acknowledged() == X[:3]  # ... and reported as SUCCESS
    else:
        assert a.commit_index() == 2
        assert a.executions == []
        assert a.outcomes == {}

    sim.held.clear()
    sim.settle()
    assert a.state == c.state
    if kind == "hardened":
        assert a.sync.snapshots_installed == 1
        assert a.acknowledged() == []
        assert {reason for _r, reason in a.outcomes.values()} == {FAIL_REASON.UNKNOWN_OUTCOME}
        assert not set(X[:3]) & set(a.executions)


# ---------------------------------------------------------------------------------------------
# Fix 3: stale snapshot re-install (syncobj.py 1497)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS_AND_UNSAFE)
def test_stale_snapshot_is_not_reinstalled(sim: SimNet, kind):
    """B's first ack reaches the leader only after the leader compacted and B had applied past
    the compaction point: the leader rewinds nextIndex below its log (1077-1078) and sends its
    snapshot. Plain B installs it: lastApplied moves back and B executes Y1, Y2 a second time.
    Ours ignores a snapshot it has already passed."""
    a, b, c = sim.cluster(kind)
    sim.held.add((b.addr, a.addr))  # all of B's answers to A are late
    sim.elect(a)
    for payload in X:
        a.propose(payload)
    sim.settle()  # committed with C; B applies via leaderCommit
    assert b.last_applied() == 6
    a.sync.forceLogCompaction()
    sim.settle()
    assert a.log()[0][0] == 5  # A's log now starts after B's acked position
    for payload in (b"Y1", b"Y2"):
        a.propose(payload)
    sim.settle()
    assert b.last_applied() == 8

    sim.deliver(b.addr, a.addr, count=2)  # B's vote, then its ack of the no-op (index 2)
    sim.clock.advance(0.06)
    a.tick()  # nextIndex[B] = 3 < A's log start: snapshot
    assert any("serialized" in m for m in sim.queued(a.addr, b.addr))
    sim.held.clear()
    sim.settle()

    assert b.state == a.state
    if kind in LOSSY:
        assert b.executions.count(b"Y1") == 2 and b.executions.count(b"Y2") == 2
        assert min(b.applied_history[b.applied_history.index(8) :]) == 6
    else:
        assert b.sync.snapshots_ignored == 1 and b.sync.snapshots_installed == 0
        assert_no_double_execution(a, b, c)
        assert_applied_never_decreased(a, b, c)


# ---------------------------------------------------------------------------------------------
# Fix 4: journal / dump / meta crash windows and durability
# ---------------------------------------------------------------------------------------------

SOLO = "10.0.0.1:4321"


def file_conf(kind: str, data_dir: Path, **overrides):
    """Plain pysyncobj with its own journal and dump files; ours always has them."""
    if kind == "plain":
        overrides.update(
            journalFile=str(data_dir / "raft.journal"), fullDumpFile=str(data_dir / "raft.dump")
        )
    return sim_conf(**overrides)


def start_solo(sim: SimNet, kind: str, data_dir: Path, peers=(), fsync=False):
    node = sim.add(
        kind, SOLO, list(peers), conf=file_conf(kind, data_dir), fsync=fsync, data_dir=data_dir
    )
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_trimmed_journal_without_its_dump_is_refused(sim: SimNet, kind, tmp_path):
    """Window (a): the journal was trimmed by a compaction, the dump is gone. Plain starts,
    keeps committing, and never applies anything again; ours refuses to start."""
    data_dir = tmp_path / "node"
    node = start_solo(sim, kind, data_dir)
    sim.elect(node)
    for payload in X:
        node.propose(payload)
    sim.settle()
    node.sync.forceLogCompaction()
    sim.settle()
    assert node.log()[0][0] > 1
    sim.crash(node)
    (data_dir / "raft.dump").unlink()

    if kind == "hardened":
        with pytest.raises(RaftStorageError, match=r"raft\.dump is missing"):
            start_solo(sim, kind, data_dir)
        return
    node = start_solo(sim, kind, data_dir)
    sim.elect(node)
    node.propose(b"Y1")
    sim.settle(20)
    assert node.commit_index() > 6  # it commits ...
    assert node.last_applied() == 1  # ... and never applies
    assert node.outcomes == {}  # the client waits forever


@pytest.mark.parametrize("kind", KINDS)
def test_dump_written_but_journal_not_trimmed_keeps_acknowledged_entries(
    sim: SimNet, kind, tmp_path, monkeypatch
):
    """Window (b): a crash after the dump was written and before the journal was trimmed.
    Plain cuts the journal back to the dump's two entries on restart (1489-1495), losing the
    acknowledged Y1..Y3; ours keeps the journal and applies them once."""
    data_dir = tmp_path / "node"
    node = start_solo(sim, kind, data_dir)
    sim.elect(node)
    for payload in X:
        node.propose(payload)
    sim.settle()
    # The trim that follows a dump never reaches the disk.
    monkeypatch.setattr(node.sync._SyncObj__raftLog, "deleteEntriesTo", lambda entryTo: None)
    node.sync.forceLogCompaction()
    sim.settle()
    assert (data_dir / "raft.dump").exists() and node.log()[0][0] == 1
    for payload in (b"Y1", b"Y2", b"Y3"):
        node.propose(payload)
    sim.settle()
    assert node.acknowledged() == [*X, b"Y1", b"Y2", b"Y3"]
    sim.crash(node)

    node = start_solo(sim, kind, data_dir)
    sim.elect(node)
    sim.settle()
    if kind == "plain":
        assert node.state == X  # Y1..Y3 acknowledged, then lost
    else:
        assert node.state == [*X, b"Y1", b"Y2", b"Y3"]
        assert node.machine.restores == 1
        assert node.executions == [b"Y1", b"Y2", b"Y3"]  # replayed once, after the dump


@pytest.mark.parametrize("kind", KINDS)
def test_empty_meta_file_is_refused_not_read_as_blank(sim: SimNet, kind, tmp_path):
    """The node voted in term 5, then its meta file was emptied. Plain reads it as blank and
    votes again in term 5 (two leaders possible); ours refuses to start."""
    data_dir = tmp_path / "node"
    voter_1, voter_2 = "10.0.0.2:4321", "10.0.0.3:4321"
    node = start_solo(sim, kind, data_dir, peers=[voter_1, voter_2])
    vote_request = {"type": "request_vote", "term": 5, "last_log_index": 1, "last_log_term": 0}
    node.transport._onMessageReceived(TCPNode(voter_1), dict(vote_request))
    assert [m["type"] for m in sim.queued(node.addr, voter_1)] == ["response_vote"]
    sim.crash(node)
    (data_dir / "raft.journal.meta").write_bytes(b"")

    if kind == "hardened":
        with pytest.raises(RaftStorageError, match="corrupt or empty"):
            start_solo(sim, kind, data_dir, peers=[voter_1, voter_2])
        return
    node = start_solo(sim, kind, data_dir, peers=[voter_1, voter_2])
    node.transport._onMessageReceived(TCPNode(voter_2), dict(vote_request))
    assert [m["type"] for m in sim.queued(node.addr, voter_2)] == ["response_vote"]  # 2nd vote


def test_a_flipped_bit_in_the_commit_hint_is_refused_not_applied(sim: SimNet):
    """Fix 18. A leader appended U and could not commit it; while it was down one bit of the
    commit index hint in its meta file flipped (a bad sector, a stray write). The adapter
    before the fix started, took the hint as committed (clamped to its last index) and applied
    U, which the cluster never committed: a state no other replica ever has. The meta file
    carries a crc32 of its fields now: the node refuses to start, changing nothing."""
    a, b, c = sim.cluster("hardened")
    sim.elect(a)
    a.propose(b"W1")
    sim.settle()
    sim.held |= {(a.addr, b.addr), (a.addr, c.addr)}
    a.propose(b"U")
    a.tick()
    committed = a.commit_index()
    assert a.log()[-1][0] == committed + 1  # U appended, not committed
    sim.crash(a)
    meta = a.data_dir / "raft.journal.meta"
    _raise_commit_hint(meta, Context(nodes=[a.addr], rng=random.Random(7)))
    assert msgpack.unpackb(meta.read_bytes())["commit"] > committed
    damaged = meta.read_bytes()

    with pytest.raises(RaftStorageError, match="checksum mismatch"):
        sim.add("hardened", a.addr, [b.addr, c.addr], data_dir=a.data_dir)
    assert meta.read_bytes() == damaged


def test_a_meta_file_of_format_version_1_is_read_and_rewritten_with_its_checksum(tmp_path):
    """Meta files without a crc (version 1, earlier builds) still load; the next store writes
    version 2."""
    journal = DurableJournal(tmp_path / "raft.journal", app_version="0.3.17", fsync=False)
    journal.setCurrentTerm(4, "10.0.0.2:4321")
    journal.close()
    meta = tmp_path / "raft.journal.meta"
    doc = msgpack.unpackb(meta.read_bytes())
    assert doc["version"] == 2 and "crc" in doc
    del doc["crc"]
    doc["version"] = 1
    meta.write_bytes(msgpack.packb(doc))
    journal = DurableJournal(tmp_path / "raft.journal", app_version="0.3.17", fsync=False)
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (4, "10.0.0.2:4321")
    journal.setCurrentTerm(5, None)
    journal.close()
    assert msgpack.unpackb(meta.read_bytes())["version"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_vote_and_log_are_durable_before_they_are_acknowledged(
    sim: SimNet, kind, tmp_path, monkeypatch
):
    """Ours: the meta file is fsynced before a vote leaves, the journal before an
    AppendEntries is acknowledged. Plain never fsyncs."""
    events: list = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def recorder(fd, real=real, name=name):
            events.append(name)
            return real(fd)

        monkeypatch.setattr(os, name, recorder)
    leader = "10.0.0.2:4321"
    node = start_solo(sim, kind, tmp_path / "node", peers=[leader, "10.0.0.3:4321"], fsync=True)
    real_post = sim.post

    def post(src, dst, message):
        events.append(("send", message["type"], message.get("success")))
        return real_post(src, dst, message)

    monkeypatch.setattr(sim, "post", post)
    events.clear()
    node.transport._onMessageReceived(
        TCPNode(leader),
        {"type": "request_vote", "term": 1, "last_log_index": 1, "last_log_term": 0},
    )
    node.transport._onMessageReceived(
        TCPNode(leader),
        {
            "type": "append_entries",
            "term": 1,
            "commit_index": 1,
            "prevLogIdx": 1,
            "prevLogTerm": 0,
            "entries": [(b"\x01", 2, 1)],
        },
    )
    sends = [e for e in events if isinstance(e, tuple)]
    assert sends == [("send", "response_vote", None), ("send", "next_node_idx", True)]
    if kind == "plain":
        assert [e for e in events if not isinstance(e, tuple)] == []
    else:
        vote_at = events.index(sends[0])
        ack_at = events.index(sends[1])
        assert "fsync" in events[:vote_at]  # meta: term 1, voted for the leader
        assert "fdatasync" in events[vote_at:ack_at]  # journal: entry 2


@pytest.mark.parametrize("kind", KINDS)
def test_compaction_never_rewrites_the_journal_in_place(sim: SimNet, kind, tmp_path):
    """Plain compacts by rewriting the journal file in place (journal.py 458-462): a crash
    half-way loses the log's tail. Ours writes a new file and renames it: the old inode (seen
    through a hard link) is never touched."""
    data_dir = tmp_path / "node"
    node = start_solo(sim, kind, data_dir)
    sim.elect(node)
    for payload in X:
        node.propose(payload)
    sim.settle()
    if kind == "plain":
        node.sync._SyncObj__raftLog.flush()
    old_inode = data_dir / "journal-before-compaction"
    os.link(data_dir / "raft.journal", old_inode)
    before = old_inode.read_bytes()
    node.sync.forceLogCompaction()
    sim.settle()
    assert node.log()[0][0] > 1
    if kind == "plain":
        assert old_inode.read_bytes() != before
    else:
        assert old_inode.read_bytes() == before
        assert (data_dir / "raft.journal").read_bytes() != before


# The journal's own tests (torn tails, corruption, format conversion) are in
# test_raft_journal.py.


# ---------------------------------------------------------------------------------------------
# Fix 5: a leader cut off from the majority steps down within about a second
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cut_off_leader_steps_down_within_a_second(sim: SimNet, kind, tmp_path):
    """Plain defaults keep a cut-off leader for leaderFallbackTimeout = 30 s; ours, 0.75 s."""
    if kind == "plain":
        timing = {}  # pysyncobj's defaults (config.py 37-57)
    else:
        settings = RaftSettings(self_addr=SOLO, peers=(), password="x", data_dir=tmp_path)
        conf = settings.to_syncobj_conf()
        timing = {
            name: getattr(conf, name)
            for name in (
                "raftMinTimeout",
                "raftMaxTimeout",
                "appendEntriesPeriod",
                "leaderFallbackTimeout",
                "connectionTimeout",
            )
        }
    defaults = SyncObjConf()
    overrides = {
        name: timing.get(name, getattr(defaults, name))
        for name in (
            "raftMinTimeout",
            "raftMaxTimeout",
            "appendEntriesPeriod",
            "leaderFallbackTimeout",
            "connectionTimeout",
        )
    }
    addrs = ["10.0.0.1:4321", "10.0.0.2:4321", "10.0.0.3:4321"]
    nodes = [
        sim.add(kind, a, [p for p in addrs if p != a], conf=sim_conf(**overrides)) for a in addrs
    ]
    leader = nodes[0]
    sim.elect(leader)
    sim.settle(3)
    sim.isolate(leader.addr)
    cut_at = sim.clock.now
    while leader.is_leader() and sim.clock.now - cut_at < 5.0:
        sim.clock.advance(0.01)
        leader.tick()
    held_for = sim.clock.now - cut_at
    if kind == "plain":
        assert leader.is_leader() and held_for >= 5.0
    else:
        assert not leader.is_leader()
        assert held_for <= 1.0


# ---------------------------------------------------------------------------------------------
# The adapter end to end: RaftReplica on loopback, real TCP, password, fsync
# ---------------------------------------------------------------------------------------------

POLL_S = 0.005  # how often wait_for looks: in-process replicas answer at once
DEADLINE_S = 20.0


class CountingMachine:
    """Used only on its replica's tick thread; tests read it after waiting on a callback."""

    def __init__(self):
        self.state: list[bytes] = []
        self.executions: list[bytes] = []
        self.restores = 0

    def apply(self, payload: bytes) -> bytes:
        self.executions.append(payload)
        self.state.append(payload)
        return b"#%d" % len(self.state)

    def snapshot(self) -> bytes:
        return msgpack.packb(self.state)

    def restore(self, blob: bytes) -> None:
        self.state = list(msgpack.unpackb(blob))
        self.restores += 1


def wait_for_leader(replicas: dict[str, RaftReplica]) -> str:
    """The address of the replica that leads, once one does."""
    return wait_for(
        lambda: next((a for a, r in replicas.items() if r.is_leader()), None),
        DEADLINE_S,
        "a leader",
        interval_s=POLL_S,
    )


def loopback_settings(tmp_path, addrs: list[str], addr: str, **overrides) -> RaftSettings:
    return RaftSettings(
        self_addr=addr,
        peers=tuple(a for a in addrs if a != addr),
        password="cluster-secret",
        data_dir=tmp_path / addr.split(":")[1],
        **overrides,
    )


def submit_and_wait(replica: RaftReplica, payload: bytes):
    done = threading.Event()
    outcome = []

    def callback(result, error):
        outcome.append((result, error, threading.current_thread().name))
        done.set()

    replica.submit(payload, callback)
    assert done.wait(DEADLINE_S), "no callback"
    assert len(outcome) == 1
    return outcome[0]


def test_three_replicas_commit_compact_restart_and_step_down(tmp_path):
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]

    def settings(addr):
        return loopback_settings(tmp_path, addrs, addr)

    machines = {addr: CountingMachine() for addr in addrs}
    rejected_before = BoundedTcpConnection.rejected_frames
    replicas = {addr: RaftReplica(settings(addr), machines[addr]) for addr in addrs}
    try:
        leader_addr = wait_for_leader(replicas)
        leader = replicas[leader_addr]

        # 1000 pipelined submissions, each answered exactly once on the replica's thread.
        results: dict[int, tuple] = {}
        lock = threading.Lock()
        all_done = threading.Event()

        def make_callback(i):
            def callback(result, error):
                with lock:
                    assert i not in results, "callback fired twice"
                    results[i] = (result, error, threading.current_thread().name)
                    if len(results) == 1000:
                        all_done.set()

            return callback

        payloads = [b"p%04d" % i for i in range(1000)]
        for i, payload in enumerate(payloads):
            leader.submit(payload, make_callback(i))
        assert all_done.wait(DEADLINE_S)
        assert [e for _r, e, _t in results.values() if e is not None] == []
        assert {t for _r, _e, t in results.values()} == {f"raft-{leader_addr}"}
        # Log: index 1 is pysyncobj's initial entry, 2 the leader's no-op, 3..1002 ours.
        wait_for(
            lambda: all(r.status()["applied_index"] >= 1002 for r in replicas.values()),
            DEADLINE_S,
            "every replica to apply everything",
            interval_s=POLL_S,
        )
        for machine in machines.values():
            assert machine.state == payloads

        # Definite errors.
        follower_addr, other_addr = [a for a in addrs if a != leader_addr]
        _r, error, _t = submit_and_wait(replicas[follower_addr], b"on-a-follower")
        assert error.reason is SubmitErrorReason.NOT_LEADER and error.definite
        assert error.leader in addrs and error.leader != follower_addr  # the leader's address
        _r, error, _t = submit_and_wait(leader, b"x" * (leader._settings.max_payload_bytes + 1))
        assert error.reason is SubmitErrorReason.TOO_LARGE and error.definite

        # Compaction writes a msgpack dump (never pickle) and trims the journal.
        follower = replicas[follower_addr]
        follower.force_compaction()
        wait_for(
            lambda: follower.status()["log_first_index"] > 1,
            DEADLINE_S,
            "the follower to compact",
            interval_s=POLL_S,
        )
        dump = (tmp_path / follower_addr.split(":")[1] / "raft.dump").read_bytes()
        assert dump[:1] != b"\x80" and dump[:2] != b"\x1f\x8b"  # no pickle, no gzip'd pickle
        outer = msgpack.unpackb(dump)
        assert outer["format"] == "quorumbook-raft-dump"
        body = msgpack.unpackb(outer["body"])
        assert msgpack.unpackb(body["machine"]) == payloads
        assert sorted(body["cluster"]) == sorted(addrs)
        snapshot_index = body["last"][1]

        # Restart the follower from its data directory while the others go on.
        follower.destroy()
        for i in range(10):
            _r, error, _t = submit_and_wait(leader, b"after-%d" % i)
            assert error is None
        restarted_machine = CountingMachine()
        replicas[follower_addr] = RaftReplica(settings(follower_addr), restarted_machine)
        assert restarted_machine.restores == 1  # restored at construction
        assert restarted_machine.state == payloads
        expected = payloads + [b"after-%d" % i for i in range(10)]
        wait_for(
            lambda: replicas[follower_addr].status()["applied_index"] >= 1002 + 10,
            DEADLINE_S,
            "the restarted follower to catch up",
            interval_s=POLL_S,
        )
        assert restarted_machine.state == machines[leader_addr].state == expected
        assert restarted_machine.executions == expected[snapshot_index - 2 :]  # no re-execution
        assert BoundedTcpConnection.rejected_frames == rejected_before  # no link dropped

        # A leader cut off from the majority steps down within about a second.
        for addr in (follower_addr, other_addr):
            replicas[addr].destroy()
        cut_at = time.monotonic()
        wait_for(lambda: not leader.is_leader(), 5, "the leader to step down", interval_s=POLL_S)
        assert time.monotonic() - cut_at < 1.5
    finally:
        for replica in replicas.values():
            replica.destroy()


def test_a_raising_callback_does_not_reapply_the_entry(tmp_path):
    machine = CountingMachine()
    replica = RaftReplica(
        RaftSettings(
            self_addr=f"127.0.0.1:{free_port()}",
            peers=(),
            password="pw",
            data_dir=tmp_path,
            fsync=False,
        ),
        machine,
    )
    try:
        wait_for(replica.is_leader, DEADLINE_S, "leadership", interval_s=POLL_S)

        def bad_callback(result, error):
            raise RuntimeError("a buggy caller")

        replica.submit(b"first", bad_callback)
        _r, error, _t = submit_and_wait(replica, b"second")
        assert error is None
        assert machine.executions == [b"first", b"second"]
    finally:
        replica.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        replica.submit(b"late", lambda r, e: None)


def run_solo_replica(tmp_path, then: str) -> subprocess.CompletedProcess:
    """A one-node replica in a subprocess; once it leads, run ``then`` (Python source, with
    ``replica`` and ``threading`` at hand), then wait: the test expects the process to end."""
    script = (
        textwrap.dedent(f"""
        import pathlib, pickle, sys, threading
        from pysyncobj.syncobj import _COMMAND_TYPE
        from cluster.raft import RaftReplica, RaftSettings

        class Machine:
            def apply(self, payload):
                if payload == b"boom":
                    raise ValueError("cannot apply this")
                return b"ok"
            def snapshot(self):
                return b""
            def restore(self, blob):
                pass

        replica = RaftReplica(RaftSettings(
            self_addr="127.0.0.1:{free_port()}", peers=(), password="pw",
            data_dir=pathlib.Path({str(tmp_path)!r})), Machine())
        led = threading.Event()
        while not led.wait(0.01):
            if replica.is_leader():
                led.set()
    """)
        + textwrap.dedent(then)
        + textwrap.dedent("""
        threading.Event().wait(30)   # the replica's thread ends the process before this
        sys.exit(0)
    """)
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_apply_that_raises_stops_the_process_with_a_distinct_code(tmp_path):
    proc = run_solo_replica(
        tmp_path,
        """
        applied = threading.Event()
        replica.submit(b"fine", lambda result, error: applied.set())
        applied.wait(10)
        replica.submit(b"boom", lambda result, error: None)
    """,
    )
    assert proc.returncode == EXIT_APPLY_FAILED, proc.stderr
    assert "state machine apply() failed on committed log index 4" in proc.stderr
    assert "ValueError: cannot apply this" in proc.stderr


@pytest.mark.parametrize("entry", ["unknown method", "undecodable"])
def test_an_entry_this_build_cannot_apply_stops_the_process_loudly(tmp_path, entry):
    """Outside the state machine's apply (which _apply_guarded covers), upstream's apply loop
    (syncobj.py 708-729) lets an unpickling error or an unknown method id escape the tick; our
    tick loop logged it and the next tick tried the same entry again, forever, while the node
    went on voting and acknowledging. It must stop instead, with a line that says why."""
    command = {
        "unknown method": "pickle.dumps((99, (b'x',)))",
        "undecodable": "b'not a pickle at all'",
    }[entry]
    # What a newer build (or a damaged log) would hold: pysyncobj's queue is thread-safe.
    proc = run_solo_replica(
        tmp_path,
        f"""
        replica._obj._applyCommand({command}, None, _COMMAND_TYPE.REGULAR)
    """,
    )
    assert proc.returncode == EXIT_ENTRY_UNREADABLE, proc.stderr
    assert "committed log entry 3 cannot be applied by this build" in proc.stderr
    assert proc.stderr.count("cannot be applied") == 1  # once, not once per tick


def test_import_refuses_any_other_pysyncobj_version(monkeypatch):
    import pysyncobj.version

    import cluster.raft.pin

    monkeypatch.setattr(pysyncobj.version, "VERSION", "0.3.18")
    with pytest.raises(ImportError, match=r"pysyncobj==0\.3\.17"):
        importlib.reload(cluster.raft.pin)
    monkeypatch.undo()
    importlib.reload(cluster.raft.pin)


def call_and_wait(method, *args):
    done = threading.Event()
    outcome = []

    def callback(result, error):
        outcome.append((result, error))
        done.set()

    method(*args, callback)
    assert done.wait(DEADLINE_S), "no callback"
    return outcome[0]


def call_until_accepted(method, *args):
    """Retry definite refusals (a new leader refuses membership changes until its no-op is
    applied, syncobj.py 1357-1359); anything else is returned."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result, error = call_and_wait(method, *args)
        if error is None or not error.definite or time.monotonic() > deadline:
            return result, error
        time.sleep(0.02)


def test_transfer_leadership_and_membership_changes(tmp_path):
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    members, newcomer = addrs[:3], addrs[3]

    def settings(addr, peers):
        return RaftSettings(
            self_addr=addr,
            peers=tuple(peers),
            password="pw",
            data_dir=tmp_path / addr.split(":")[1],
            fsync=False,
        )

    machines = {addr: CountingMachine() for addr in addrs}
    replicas = {
        a: RaftReplica(settings(a, [p for p in members if p != a]), machines[a]) for a in members
    }
    try:
        leader_addr = wait_for_leader(replicas)
        target = next(a for a in members if a != leader_addr)
        wait_for(
            lambda: all(
                p["match_index"] == replicas[leader_addr].status()["commit_index"]
                for p in replicas[leader_addr].status()["peers"]
            ),
            DEADLINE_S,
            "peers in sync",
            interval_s=POLL_S,
        )
        _r, error = call_until_accepted(replicas[leader_addr].transfer_leadership, target)
        assert error is None
        wait_for(
            lambda: replicas[target].is_leader(), DEADLINE_S, "the transfer", interval_s=POLL_S
        )
        leader = replicas[target]

        _r, error = call_until_accepted(leader.add_node, newcomer)
        assert error is None
        replicas[newcomer] = RaftReplica(settings(newcomer, members), machines[newcomer])
        _r, error, _t = submit_and_wait(leader, b"with-four")
        assert error is None
        wait_for(
            lambda: machines[newcomer].state == [b"with-four"],
            DEADLINE_S,
            "the newcomer to apply",
            interval_s=POLL_S,
        )

        removed = next(a for a in members if a != target)
        _r, error = call_until_accepted(leader.remove_node, removed)
        assert error is None
        wait_for(
            lambda: removed not in {p["id"] for p in leader.status()["peers"]},
            DEADLINE_S,
            "the removal",
            interval_s=POLL_S,
        )
        _r, error, _t = submit_and_wait(leader, b"without-removed")
        assert error is None
    finally:
        for replica in replicas.values():
            replica.destroy()


def test_busy_port_fails_fast_with_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(RaftStartupError, match="cannot bind the raft port"):
            RaftReplica(
                RaftSettings(self_addr=addr, peers=(), password="pw", data_dir=tmp_path),
                CountingMachine(),
            )


# ---------------------------------------------------------------------------------------------
# Pre-vote (Raft thesis 9.6): a follower that missed heartbeats does not depose a healthy leader
# ---------------------------------------------------------------------------------------------


def _terms(*nodes) -> list[int]:
    return [n.sync._SyncObj__raftCurrentTerm for n in nodes]


@pytest.mark.parametrize("pre_vote", [False, True])
def test_a_stalled_follower_deposes_the_leader_only_without_pre_vote(sim: SimNet, pre_vote):
    """B's timer runs out (its process was starved) while A leads and C hears A. Upstream: B
    stands in term 2 and its vote request alone makes A step down. With pre-vote, B first
    asks; C (heard A just now) and A (leads) refuse; nobody's term moves."""
    a, b, c = sim.cluster("hardened")
    sim.elect(a)
    for node in (a, b, c):
        node.sync._pre_vote = pre_vote
    sim.step()  # a heartbeat round: B and C hear from A
    b.force_election_timeout()
    b.tick()
    sim.deliver_all()
    for _ in range(3):  # B keeps timing out: every round is refused the same way
        b.force_election_timeout()
        b.tick()
        sim.deliver_all()
    if pre_vote:
        assert a.is_leader() and _terms(a, b, c) == [1, 1, 1]
        assert a.sync.pre_votes_refused + c.sync.pre_votes_refused == 8
        sim.step()
        assert b.role() == "follower" and b.sync._SyncObj__raftLeader is not None
    else:
        assert not a.is_leader() and _terms(a)[0] > 1


def _pre_vote_cluster_whose_leader_died(sim: SimNet):
    """B and C, with pre-vote, 20 s after their leader A crashed: past every election timeout
    (the simulation's are 10-20 s), nobody has heard from A since."""
    a, b, c = sim.cluster("hardened")
    sim.elect(a)
    for node in (a, b, c):
        node.sync._pre_vote = True
    sim.step()
    sim.crash(a)
    sim.clock.advance(20.0)
    return b, c


def test_with_pre_vote_a_lost_leader_is_still_replaced(sim: SimNet):
    b, c = _pre_vote_cluster_whose_leader_died(sim)
    waited = 0.0
    while not (b.is_leader() or c.is_leader()) and waited < 60.0:
        for node in (b, c):
            node.tick()
        sim.deliver_all()
        sim.clock.advance(0.5)
        waited += 0.5
    assert [b.is_leader(), c.is_leader()].count(True) == 1
    assert waited <= 20.0  # within one more election timeout, split votes included
    assert max(_terms(b, c)) <= 3


def test_granting_a_pre_vote_defers_our_own_candidacy(sim: SimNet):
    """A dies; B's and C's timers run out together. B asks first and C grants: C then waits an
    election timeout instead of standing in the same term (which split the vote)."""
    b, c = _pre_vote_cluster_whose_leader_died(sim)
    b.tick()  # B asks first
    sim.deliver(b.addr, c.addr)  # C grants
    c.tick()  # C's own timer had run out as well
    for _ in range(3):
        sim.deliver_all()
        b.tick()
        c.tick()
    assert b.is_leader() and c.role() == "follower"
    assert _terms(b, c) == [2, 2]  # one election, no split vote


def test_a_leader_that_steps_down_answers_its_proposals_unknown_at_once(tmp_path):
    """A leader cut off from the majority steps down within ~1 s (fix 5); what it proposed
    and has not seen commit is answered UNKNOWN then (not definite: the next leader may hold
    it), not after proposal_timeout_s: the clients resend to the new leader that much sooner.
    Upstream keeps the callbacks until it hears the next leader."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    replicas = {
        addr: RaftReplica(
            loopback_settings(tmp_path, addrs, addr, fsync=False, proposal_timeout_s=30.0),
            CountingMachine(),
        )
        for addr in addrs
    }
    try:
        leader_addr = wait_for_leader(replicas)
        leader = replicas[leader_addr]
        assert submit_and_wait(leader, b"before")[1] is None
        for addr in addrs:
            if addr != leader_addr:
                replicas[addr].destroy()
        started = time.monotonic()
        _result, error, _thread = submit_and_wait(leader, b"cut-off")
        took = time.monotonic() - started
        assert error.reason is SubmitErrorReason.LEADER_CHANGED and not error.definite
        assert took < 5.0, took  # step-down ~0.75-1.5 s; the proposal timeout is 30 s
        wait_for(  # the status is published at the end of the tick that answered it
            lambda: leader.status()["step_down_unknowns"] == 1 and not leader.is_leader(),
            DEADLINE_S,
            "the step-down in the status",
            interval_s=POLL_S,
        )
    finally:
        for replica in replicas.values():
            replica.destroy()
