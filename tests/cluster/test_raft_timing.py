"""Timing hazards of pysyncobj 0.3.17 that cost elections, reproduced on plain and fixed on ours.

Found by ``bench.failover`` (every failover took two election rounds) and ``bench.replication``
(a dozen elections in 20 s under heavy writes). As in test_raft_fixes.py, the scenario tests
run the same script on ``plain`` (pysyncobj's own classes) and ``hardened`` (ours): the plain
run asserts the harmful outcome, so each test demonstrably fails without the fix. Line numbers
are those of pysyncobj 0.3.17 (syncobj.py unless another file is named).
"""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj import tcp_connection as upstream_tcp_connection
from pysyncobj import transport as upstream_transport
from pysyncobj.poller import createPoller
from pysyncobj.syncobj import SyncObjException
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from cluster.raft import RaftReplica, RaftSettings
from cluster.raft.hardened import HardenedSyncObj
from cluster.raft.transport import BoundedTcpConnection, HardenedTCPTransport

from .conftest import KINDS, RecordingMachine, SimNet, free_port

# Plain nodes on TCP here: their failed binds must not leak a socket (conftest.py).
pytestmark = pytest.mark.usefixtures("plain_tcp_server_closes_a_failed_bind")

# ---------------------------------------------------------------------------------------------
# 1. An idle follower-to-follower link loses the first vote request after the leader dies
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tcp_fake_clock(fake_clock, monkeypatch):
    """The fake clock on every pysyncobj module that reads time (connections included)."""
    monkeypatch.setattr(upstream_transport, "monotonicTime", fake_clock)
    monkeypatch.setattr(upstream_tcp_connection, "monotonicTime", fake_clock)
    return fake_clock


def tcp_conf() -> SyncObjConf:
    return SyncObjConf(
        # A port free a moment ago can be taken meanwhile (another process's outgoing
        # connection): fail at once. pysyncobj retries a bind every bindRetryTime, measured on
        # the fake clock, which stands still: it would spin forever.
        maxBindRetries=1,
        autoTick=False,
        password="cluster-secret",
        # Elections only when the test forces one: the fake clock stands still between the
        # heartbeats of the quiet spell and after the leader dies.
        raftMinTimeout=0.5,
        raftMaxTimeout=1.0,
        appendEntriesPeriod=0.05,
        leaderFallbackTimeout=1000.0,
        connectionTimeout=1.0,  # RaftSettings' default
        connectionRetryTime=0.25,
        commandsWaitLeader=False,
        dynamicMembershipChange=False,
        useFork=False,
    )


def start_tcp_nodes(kind: str, n: int, tmp_path: Path, attempts: int = 5) -> list[TcpNode]:
    """``n`` nodes on free loopback ports; new ports if one was taken before it was bound."""
    for attempt in range(attempts):
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
        nodes: list[TcpNode] = []
        try:
            for a in addrs:
                data_dir = tmp_path / f"{attempt}-{a.split(':')[1]}"
                nodes.append(TcpNode(kind, a, [p for p in addrs if p != a], data_dir))
            return nodes
        except SyncObjException:
            for node in nodes:
                node.destroy()
            # Plain pysyncobj leaves the socket of the failed bind open (tcp_server.py 35-41;
            # ours closes it): collect it here, not as a ResourceWarning in a later test.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
    raise AssertionError(f"no free ports in {attempts} attempts")


class TcpNode:
    """A plain ``SyncObj`` with pysyncobj's ``TCPTransport``, or ours with
    ``HardenedTCPTransport``, on loopback; ticked by hand."""

    def __init__(self, kind: str, addr: str, peers: list[str], data_dir: Path):
        self.kind = kind
        self.addr = addr
        if kind == "plain":
            self.sync = SyncObj(addr, peers, tcp_conf())
        else:
            self.sync = HardenedSyncObj(
                addr,
                peers,
                tcp_conf(),
                RecordingMachine(),
                data_dir,
                transport_class=HardenedTCPTransport.factory(max_frame_bytes=16 * 1024 * 1024),
                fsync=False,
            )
        self.alive = True

    def tick(self) -> None:
        if self.alive:
            self.sync.doTick(0.0)

    def term(self) -> int:
        return self.sync._SyncObj__raftCurrentTerm

    def voted_for(self):
        return self.sync._SyncObj__votedForNodeId

    def is_leader(self) -> bool:
        return self.sync._isLeader()

    def links_ready(self) -> bool:
        """Every peer link connected, with the password handshake done."""
        transport = self.sync._SyncObj__transport
        conns = [transport._connections.get(node) for node in transport._nodes]
        return all(
            c is not None and c.state == CONNECTION_STATE.CONNECTED and c.sendRandKey for c in conns
        ) and len(self.sync._SyncObj__connectedNodes) == len(conns)

    def destroy(self) -> None:
        if self.alive:
            self.alive = False
            self.sync._doDestroy()
            if self.kind == "hardened":
                self.sync.close_storage()


def spin(nodes, condition, what: str, rounds: int = 2000) -> None:
    """Tick every node until ``condition()``: real sockets, so messages need real time."""
    for _ in range(rounds):
        for node in nodes:
            node.tick()
        if condition():
            return
        time.sleep(0.001)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.mark.parametrize("kind", KINDS)
def test_vote_request_after_a_quiet_spell_reaches_the_other_follower(
    kind, tcp_fake_clock, tmp_path
):
    """Upstream drops a link when nothing was read from it for connectionTimeout, and checks
    that only when sending (tcp_connection.py 228-236). While a leader lives the followers
    send each other nothing, so after the leader dies the first RequestVote one of them sends
    finds their link "idle", drops it and is lost; the other follower times out later, stands
    in the same term and the election needs a second round. Ours keeps every link alive."""
    nodes = start_tcp_nodes(kind, 3, tmp_path)
    leader, b, c = nodes
    try:
        spin(nodes, lambda: all(n.links_ready() for n in nodes), "every link to be up")
        leader.sync._SyncObj__raftElectionDeadline = 0
        spin(nodes, lambda: leader.is_leader() and b.term() == c.term() == 1, "a leader")

        # Three seconds with a live leader: heartbeats both ways on the leader's links.
        for _ in range(60):
            tcp_fake_clock.advance(0.05)
            for _ in range(3):
                for node in nodes:
                    node.tick()
                time.sleep(0.001)
        assert leader.is_leader() and b.term() == c.term() == 1

        leader.destroy()  # SIGKILL-like: its sockets close
        spin([b, c], lambda: not b.sync.isNodeConnected(leader.sync.selfNode), "B to notice")
        b.sync._SyncObj__raftElectionDeadline = 0  # B times out first; C's timer is far off
        b.tick()  # B stands in term 2 and sends C its RequestVote
        assert b.term() == 2
        for _ in range(300):  # C gets 0.3 s of real time to answer
            b.tick()
            c.tick()
            if b.is_leader():
                break
            time.sleep(0.001)

        if kind == "plain":
            # The RequestVote died with the "idle" link: C never heard of term 2.
            assert not b.is_leader() and b.term() == 2
            assert c.term() == 1 and c.voted_for() == leader.addr  # its vote of term 1
        else:
            assert b.is_leader() and b.term() == 2
            assert c.term() == 2 and c.voted_for() == b.addr
            assert b.sync._SyncObj__transport.keepalives_sent > 0
    finally:
        for node in nodes:
            node.destroy()


@pytest.mark.parametrize("conn_class", [TcpConnection, BoundedTcpConnection])
def test_bytes_waiting_in_the_socket_keep_a_link_alive(conn_class, tcp_fake_clock):
    """A node whose tick stalled past connectionTimeout has not read what its peer sent in the
    meantime; upstream then calls the link idle and drops it on its next send. Ours counts the
    unread bytes as a sign of life, and still drops a link that is really silent."""
    poller = createPoller("auto")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # as pysyncobj's sockets are
    conn = conn_class(poller, socket=ours, timeout=1.0)
    try:
        theirs.sendall(b"\x00" * 16)  # the peer's heartbeat, not read yet
        tcp_fake_clock.advance(1.5)  # our tick stalled
        conn.send("a message")
        if conn_class is TcpConnection:
            assert conn.state == CONNECTION_STATE.DISCONNECTED
            return
        assert conn.state == CONNECTION_STATE.CONNECTED
        assert theirs.recv(4096)  # and the message went out

        # Nothing waiting: the idle rule applies as upstream.
        ours.recv(4096)
        tcp_fake_clock.advance(1.5)
        conn.send("another")
        assert conn.state == CONNECTION_STATE.DISCONNECTED
    finally:
        conn.disconnect()
        theirs.close()


# ---------------------------------------------------------------------------------------------
# 2. A long tick: the follower stands with a heartbeat waiting; the leader goes silent
# ---------------------------------------------------------------------------------------------

TIMING = dict(raftMinTimeout=0.15, raftMaxTimeout=0.30, appendEntriesPeriod=0.04)


@pytest.mark.parametrize("kind", KINDS)
def test_follower_reads_a_waiting_heartbeat_before_standing(sim: SimNet, kind):
    """Upstream checks the election deadline at the top of a tick (634-650) and reads its
    sockets only at its end (706). A follower whose last tick ran long (a large batch applied,
    the GIL held by another thread) finds its deadline passed although the leader's
    AppendEntries is already waiting in its socket: it stands, and the leader's next message
    (an older term) is ignored. Ours reads first."""
    leader, b, c = sim.cluster(kind, **TIMING)
    sim.elect(leader)
    sim.settle(3)
    term = leader.term()

    # B's tick stalls for 0.5 s; the leader keeps ticking and its heartbeats reach B's socket.
    stalled_at = sim.clock.now
    while sim.clock.now - stalled_at < 0.5:
        sim.clock.advance(0.04)
        leader.tick()
        c.tick()
        for src, dst in [(leader.addr, c.addr), (c.addr, leader.addr)]:
            sim.deliver(src, dst)
    assert sim.arrive(leader.addr, b.addr) > 0
    b.tick()  # the top of B's next tick

    if kind == "plain":
        assert b.role() == "candidate" and b.term() == term + 1
    else:
        assert b.role() == "follower" and b.term() == term
        assert b.sync.elections_averted == 1
    sim.deliver_all()
    sim.settle(3)
    if kind == "hardened":
        assert leader.is_leader() and leader.term() == term


@pytest.mark.parametrize("kind", KINDS)
def test_leader_reads_waiting_answers_before_stepping_down(sim: SimNet, kind):
    """Upstream's leader steps down when a majority has not answered within
    leaderFallbackTimeout (678-686), judged at the top of a tick, before the tick reads its
    sockets. A leader whose tick thread was busy longer than that (a large apply, a dump, a
    state hash) finds the followers' answers waiting unread and steps down all the same.
    Ours reads first."""
    leader, b, c = sim.cluster(kind, leaderFallbackTimeout=0.75)
    sim.elect(leader)
    sim.settle(3)
    term = leader.term()

    # The leader's last heartbeats reach the followers; their answers reach its socket while
    # its tick thread is busy for 1 s (no tick).
    sim.clock.advance(0.06)
    leader.tick()
    for follower in (b, c):
        sim.deliver(leader.addr, follower.addr)
        follower.tick()
        assert sim.arrive(follower.addr, leader.addr) > 0
    sim.clock.advance(1.0)
    leader.tick()  # the top of its next tick

    if kind == "plain":
        assert leader.role() == "follower"
    else:
        assert leader.is_leader() and leader.term() == term
        assert leader.sync.step_downs_averted == 1
        sim.settle(3)
        assert leader.is_leader() and leader.term() == term


@pytest.mark.parametrize("kind", KINDS)
def test_leader_keeps_sending_heartbeats_while_applying(sim: SimNet, kind):
    """Upstream's leader applies everything committed inside one tick (688, 708-729) and
    sends nothing until it is done. One batch that takes longer than the election timeout
    to apply (1000 orders on a loaded machine: 100-450 ms measured) makes the followers
    stand. Ours sends heartbeats while apply() runs (the heartbeat helper thread, here driven
    by hand from inside the apply at the times it would wake)."""
    leader, b, c = sim.cluster(kind, **TIMING)
    sim.elect(leader)
    sim.settle(3)
    term = leader.term()
    followers = [b, c]
    seen_after_apply = []

    def slow_apply(payload: bytes) -> None:
        # 0.6 s in apply(); meanwhile the followers tick and get whatever the leader sends.
        leader.set_apply_hook(None)
        for _ in range(15):
            sim.clock.advance(0.04)
            if kind == "hardened":
                leader.sync.heartbeat_if_due()  # what the helper thread does when it wakes
            for follower in followers:
                sim.deliver(leader.addr, follower.addr)
                follower.tick()
        seen_after_apply.extend((f.role(), f.term()) for f in followers)

    leader.set_apply_hook(slow_apply)
    leader.propose(b"big batch")
    for _ in range(10):
        sim.step(0.02)
        if seen_after_apply:
            break
    assert leader.acknowledged() == [b"big batch"]

    if kind == "plain":
        assert any(role == "candidate" and t > term for role, t in seen_after_apply)
    else:
        assert seen_after_apply == [("follower", term)] * 2
        assert leader.sync.heartbeats_lent["apply"] >= 10
        sim.settle(3)
        assert leader.is_leader() and leader.term() == term
        assert all(f.role() == "follower" and f.term() == term for f in followers)
        assert [f.state for f in followers] == [[b"big batch"]] * 2


def test_members_compact_at_staggered_points(tmp_path):
    """Equal logs and equal thresholds made every member write its dump at once; each now
    waits rank/n longer (entries and time), whatever order the peers are listed in."""
    addrs = ["127.0.0.1:7003", "127.0.0.1:7001", "127.0.0.1:7002"]
    settings = {
        a: RaftSettings(
            self_addr=a,
            peers=tuple(reversed([p for p in addrs if p != a])),
            password="x",
            data_dir=tmp_path,
            compaction_min_entries=5000,
            compaction_min_time_s=300,
        )
        for a in addrs
    }
    thresholds = {a: s.compaction_thresholds() for a, s in settings.items()}
    assert thresholds == {
        "127.0.0.1:7001": (5000, 300.0),
        "127.0.0.1:7002": (6666, 400.0),
        "127.0.0.1:7003": (8333, 500.0),
    }
    conf = settings["127.0.0.1:7002"].to_syncobj_conf()
    assert (conf.logCompactionMinEntries, conf.logCompactionMinTime) == (6666, 400.0)


def test_leader_keeps_sending_heartbeats_while_its_journal_syncs(sim: SimNet):
    """The leader syncs its journal at the top of every tick that follows an append, holding
    the tick lock; on a shared disk one fdatasync can take longer than the election timeout
    (the node logs "fdatasync of the journal took N ms"), and the leader sent nothing
    meanwhile: the followers stood. Ours lends the heartbeats to the helper while the journal
    syncs (sending entries the leader has not made durable yet is safe: it counts itself
    toward a commit only after the sync). The helper thread is driven by hand, at the times it
    would wake, when the tick lock is free for it. Plain pysyncobj never syncs: not a case."""
    leader, b, c = sim.cluster("hardened", **TIMING)
    sim.elect(leader)
    sim.settle(3)
    term = leader.term()
    followers = [b, c]
    seen_after_sync = []
    journal = leader.sync._journal
    real_sync = journal._fdatasync

    def slow_sync() -> None:
        journal._fdatasync = real_sync
        for _ in range(15):  # 0.6 s
            sim.clock.advance(0.04)
            if not leader.sync._tick_lock.locked():  # else the helper waits for the tick
                leader.sync.heartbeat_if_due()
            for follower in followers:
                sim.deliver(leader.addr, follower.addr)
                follower.tick()
        seen_after_sync.extend((f.role(), f.term()) for f in followers)
        real_sync()

    journal._fdatasync = slow_sync
    leader.propose(b"order")
    for _ in range(10):
        sim.step(0.02)
        if seen_after_sync:
            break
    assert seen_after_sync == [("follower", term)] * 2
    assert leader.sync.heartbeats_lent["sync"] >= 10
    sim.settle(3)
    assert leader.is_leader() and leader.term() == term
    assert leader.acknowledged() == [b"order"]
    assert [f.state for f in followers] == [[b"order"]] * 2


@contextlib.contextmanager
def solo_leader_with_helper(tmp_path: Path, *, fsync: bool, **conf_extra):
    """A one-node HardenedSyncObj ticked by the test, leading, with its heartbeat helper
    running on a real thread; everything stopped and closed on the way out."""
    conf = SyncObjConf(
        autoTick=False,
        raftMinTimeout=0.15,
        raftMaxTimeout=0.2,
        appendEntriesPeriod=0.04,
        useFork=False,
        **conf_extra,
    )
    solo = HardenedSyncObj(
        f"127.0.0.1:{free_port()}", [], conf, RecordingMachine(), tmp_path, fsync=fsync
    )
    helper = threading.Thread(target=solo.run_heartbeat_helper, daemon=True)
    helper.start()
    try:
        deadline = time.monotonic() + 10
        while not solo._isLeader() and time.monotonic() < deadline:
            solo.doTick(0.01)
        assert solo._isLeader()
        yield solo
    finally:
        solo.stop_heartbeat_helper()
        helper.join(5)
        assert not helper.is_alive()
        solo._doDestroy()
        solo.close_storage()


def test_heartbeat_helper_never_runs_outside_apply(tmp_path):
    """The helper takes turns with the tick thread: it acts only while apply() runs, on the
    leader, and it stops when told."""
    with solo_leader_with_helper(tmp_path, fsync=False) as solo:
        assert solo.heartbeats_lent["apply"] == 0  # nothing applied slowly: it never woke to act
        done = threading.Event()
        solo._machine.on_apply = lambda payload: time.sleep(0.3)  # the helper's turn
        solo.propose(b"slow", lambda result, reason: done.set())
        while not done.is_set():
            solo.doTick(0.01)
        assert solo.heartbeats_lent["apply"] >= 3  # every 0.04 s during 0.3 s
        count = solo.heartbeats_lent["apply"]
        for _ in range(30):
            solo.doTick(0.01)
        assert solo.heartbeats_lent["apply"] == count


def apply_three(solo) -> None:
    """Propose a, b and c on the solo leader and tick until they are applied."""
    done = threading.Event()
    for payload in (b"a", b"b", b"c"):
        solo.propose(payload, lambda result, reason: done.set())
    while not done.is_set() or solo.raft_status()["applied_index"] < 4:
        solo.doTick(0.01)


def test_heartbeat_helper_stands_in_while_a_dump_is_written(tmp_path):
    """Writing a dump runs on the tick thread too (compaction; a large book takes hundreds of
    ms to encode and fsync): the helper keeps the leader's AppendEntries going meanwhile, and
    the dump is written whole."""
    with solo_leader_with_helper(
        tmp_path, fsync=True, logCompactionMinEntries=10**6, logCompactionMinTime=10**6
    ) as solo:
        apply_three(solo)
        assert solo.heartbeats_lent["dump"] == 0
        slow = threading.Event()
        solo._machine.on_snapshot = lambda: (slow.set(), time.sleep(0.3))
        solo.forceLogCompaction()
        deadline = time.monotonic() + 10
        while not (slow.is_set() and solo._dump_path.exists()) and time.monotonic() < deadline:
            solo.doTick(0.01)
        assert solo._dump_path.exists()
        assert solo.heartbeats_lent["dump"] >= 3  # every 0.04 s during 0.3 s
        assert solo.heartbeats_lent["apply"] == 0
        count = solo.heartbeats_lent["dump"]
        for _ in range(30):
            solo.doTick(0.01)
        assert solo.heartbeats_lent["dump"] == count  # only while the dump was being written
    restarted = HardenedSyncObj(
        f"127.0.0.1:{free_port()}",
        [],
        SyncObjConf(autoTick=False, useFork=False),
        RecordingMachine(),
        tmp_path,
        fsync=False,
    )
    try:
        assert restarted._machine.restores == 1
        assert restarted._machine.state[-3:] == [b"a", b"b", b"c"]
    finally:
        restarted._doDestroy()
        restarted.close_storage()


def test_heartbeat_helper_stands_in_while_the_journal_is_rewritten(tmp_path):
    """After a dump, compaction rewrites the journal on the tick thread: a few entries
    normally, up to `compaction_hold_mb` of them while the log archive lags (ADR 0008). The
    helper keeps the leader's AppendEntries going meanwhile."""
    with solo_leader_with_helper(
        tmp_path, fsync=False, logCompactionMinEntries=10**6, logCompactionMinTime=10**6
    ) as solo:
        apply_three(solo)
        rewrite = solo._journal.reset
        rewritten = threading.Event()

        def slow_reset(entries):
            time.sleep(0.3)
            rewrite(entries)
            rewritten.set()

        solo._journal.reset = slow_reset
        solo.forceLogCompaction()
        deadline = time.monotonic() + 10
        while not rewritten.is_set() and time.monotonic() < deadline:
            solo.doTick(0.01)
        assert rewritten.is_set() and solo._journal.first_index() > 1
        assert solo.heartbeats_lent["dump"] >= 3  # every 0.04 s during 0.3 s


def test_heartbeat_helper_stands_in_while_the_journal_syncs_slowly(tmp_path):
    """A real helper thread, not woken for a journal sync (most take a fraction of a ms):
    it wakes by itself when the next AppendEntries is due and sends it while the tick thread
    waits on the disk; nothing afterwards."""
    with solo_leader_with_helper(tmp_path, fsync=True) as solo:
        journal = solo._journal
        real_sync = journal._fdatasync
        synced = threading.Event()

        def slow_sync() -> None:
            journal._fdatasync = real_sync
            time.sleep(0.3)
            real_sync()
            synced.set()

        journal._fdatasync = slow_sync
        done = threading.Event()
        solo.propose(b"order", lambda result, reason: done.set())
        deadline = time.monotonic() + 10
        while not done.is_set() and time.monotonic() < deadline:
            solo.doTick(0.01)
        assert synced.is_set() and done.is_set()
        assert solo.heartbeats_lent["sync"] >= 3  # every 0.04 s during 0.3 s
        count = solo.heartbeats_lent["sync"]
        for _ in range(30):
            solo.doTick(0.01)
        assert solo.heartbeats_lent["sync"] == count


def test_a_long_read_between_ticks_lends_the_heartbeats(tmp_path):
    """A long read of the state machine (a state hash of a large book) runs on the tick
    thread between ticks; the helper sends the leader's AppendEntries meanwhile."""
    with solo_leader_with_helper(tmp_path, fsync=False) as solo:
        assert solo.run_between_ticks(lambda: (time.sleep(0.3), 7)[1]) == 7
        assert solo.heartbeats_lent["read"] >= 3  # every 0.04 s during 0.3 s
        assert solo.heartbeats_lent["apply"] == solo.heartbeats_lent["dump"] == 0
        for _ in range(10):
            solo.doTick(0.01)  # the tick lock came back: ticking goes on
        with pytest.raises(ZeroDivisionError):
            solo.run_between_ticks(lambda: 1 / 0)
        solo.doTick(0.01)


# ---------------------------------------------------------------------------------------------
# The adapter end to end: a slow batch on three RaftReplica over loopback costs no election
# ---------------------------------------------------------------------------------------------


class SlowBatchMachine:
    """``b"slow"`` keeps the CPU busy for 0.45 s (longer than any election timeout, shorter
    than the leader's fallback timeout), as a large batch does on a loaded machine."""

    def __init__(self):
        self.state: list[bytes] = []

    def apply(self, payload: bytes) -> bytes:
        if payload == b"slow":
            end = time.monotonic() + 0.45
            while time.monotonic() < end:
                pass
        self.state.append(payload)
        return b"ok"

    def snapshot(self) -> bytes:
        return b""

    def restore(self, blob: bytes) -> None:
        self.state = []


def test_a_slow_batch_costs_no_election_on_real_replicas(tmp_path):
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    replicas = {
        a: RaftReplica(
            RaftSettings(
                self_addr=a,
                peers=tuple(p for p in addrs if p != a),
                password="cluster-secret",
                data_dir=tmp_path / a.split(":")[1],
                fsync=False,
            ),
            SlowBatchMachine(),
        )
        for a in addrs
    }
    try:
        deadline = time.monotonic() + 20
        leader = None
        while leader is None and time.monotonic() < deadline:
            leader = next((r for r in replicas.values() if r.is_leader()), None)
            time.sleep(0.01)
        assert leader is not None
        time.sleep(0.5)  # let the cluster settle
        terms = {a: r.status()["term"] for a, r in replicas.items()}
        assert len(set(terms.values())) == 1

        done = threading.Event()
        outcome = []

        def callback(result, error):
            outcome.append((result, error))
            done.set()

        leader.submit(b"slow", callback)
        assert done.wait(20)
        assert outcome == [(b"ok", None)]
        time.sleep(1.0)  # the followers apply it too
        after = {a: r.status() for a, r in replicas.items()}
        assert {a: s["term"] for a, s in after.items()} == terms
        assert leader.is_leader()
        assert after[leader._settings.self_addr]["heartbeats_during_apply"] >= 2
    finally:
        for replica in replicas.values():
            replica.destroy()
