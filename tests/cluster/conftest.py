"""A deterministic harness that runs pysyncobj's real handlers with scripted message timing.

Every node is a real ``SyncObj`` (plain pysyncobj 0.3.17, or our ``HardenedSyncObj``) with
``autoTick=False`` and an in-memory transport. Messages are queued per directed link, in FIFO
order like TCP, and delivered only when a test says so. Time is a fake clock installed as
pysyncobj's ``monotonicTime``; election timeouts come from a seeded ``random.Random``. The same
script therefore produces the same run, message for message, against both classes.

Only the timing of deliveries, ticks and the clock is scripted: the messages themselves are
whatever the nodes' own handlers send. (Where a test crafts a message instead, it says so.)

``SimNet.deliver`` hands a message to the node's handler at once. ``SimNet.arrive`` models a
message that has reached the node's socket but has not been read: the node reads it the next
time its tick polls (``SimNode.socket``), as a TCP node would.
"""

from __future__ import annotations

import collections
import pickle
import random
from pathlib import Path

import msgpack
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj import syncobj as upstream
from pysyncobj.config import FAIL_REASON
from pysyncobj.node import TCPNode
from pysyncobj.transport import Transport

from cluster.raft.hardened import HardenedSyncObj
from indexer.services import free_port as free_port  # the tests' one too

KINDS = ("plain", "hardened")
# With "unsafe" (our adapter with its Raft safety fixes switched off, `raft_fixes=False`: the
# Jepsen harness's `--unsafe-raft-fixes-off`) a scenario must lose what plain pysyncobj loses.
KINDS_AND_UNSAFE = ("plain", "hardened", "unsafe")
LOSSY = ("plain", "unsafe")


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingMachine:
    """A StateMachinePort that records every execution (a side effect) and its state."""

    def __init__(self):
        self.state: list[bytes] = []
        self.executions: list[bytes] = []
        self.restores = 0
        self.on_apply = None  # a test's hook: called with the payload, inside apply
        self.on_snapshot = None  # a test's hook: called inside snapshot

    def apply(self, payload: bytes) -> bytes:
        if self.on_apply is not None:
            self.on_apply(payload)
        self.executions.append(payload)
        self.state.append(payload)
        return b"applied:" + payload

    def snapshot(self) -> bytes:
        if self.on_snapshot is not None:
            self.on_snapshot()
        return msgpack.packb(self.state)

    def restore(self, blob: bytes) -> None:
        self.state = list(msgpack.unpackb(blob))
        self.restores += 1


class PlainNode(SyncObj):
    """Plain pysyncobj: the replicated state is ``state``; ``executions`` counts side effects.

    ``executions`` is set before ``SyncObj.__init__`` so pysyncobj leaves it out of its
    snapshots (syncobj.py 274-276, 1461): it is what a side effect outside the state would see.
    """

    def __init__(self, addr, peers, conf, transport):
        self.executions = []
        self.on_apply = None  # a test's hook (see RecordingMachine)
        super().__init__(addr, peers, conf, transport=transport)
        self.state = []

    @replicated
    def apply(self, payload):
        if self.on_apply is not None:
            self.on_apply(payload)
        self.executions.append(payload)
        self.state.append(payload)
        return payload

    def propose(self, payload, callback):
        self.apply(payload, callback=callback)


class SimTransport(Transport):
    """Links as pysyncobj's TCP transport makes them: a node sends only to the peers it
    knows (``addNode``/``dropNode``, and the peers it started with), and refuses a connection
    from an address it does not know (transport.py 353-358), so what such a peer sends it is
    lost."""

    def __init__(self, net: SimNet, addr: str, peers: list[str]):
        super().__init__(None, None, None)
        self.net = net
        self.addr = addr
        self.known: set[str] = set(peers)

    def send(self, node, message):
        if node.id not in self.known:
            return False  # no connection object for it (transport.py 556-575)
        return self.net.post(self.addr, node.id, message)

    def addNode(self, node):
        # A membership change reached this node: its link to the new member comes up at once
        # (a TCP transport would connect within connectionRetryTime).
        self.known.add(node.id)
        self._onNodeConnected(node)

    def dropNode(self, node):
        self.known.discard(node.id)
        self._onNodeDisconnected(node)

    def receive(self, src: str, message) -> bool:
        """Hand a message from ``src`` to the node, unless the node refuses ``src``."""
        if src not in self.known:
            return False
        self._onMessageReceived(TCPNode(src), message)
        return True


def sim_conf(**overrides) -> SyncObjConf:
    """Elections and step-downs happen only when a test forces them."""
    values = dict(
        autoTick=False,
        raftMinTimeout=10.0,
        raftMaxTimeout=20.0,
        appendEntriesPeriod=0.05,
        leaderFallbackTimeout=1000.0,
        connectionTimeout=30.0,
        logCompactionMinEntries=10**9,
        logCompactionMinTime=10**9,
        commandsWaitLeader=False,
        useFork=False,
    )
    values.update(overrides)
    return SyncObjConf(**values)


class SimNode:
    def __init__(
        self,
        net: SimNet,
        kind: str,
        addr: str,
        peers: list[str],
        data_dir: Path,
        conf: SyncObjConf,
        fsync: bool,
        hold_bytes: int = 0,
    ):
        self.net = net
        self.kind = kind
        self.addr = addr
        self.peers = list(peers)
        self.data_dir = data_dir
        self.transport = SimTransport(net, addr, peers)
        self.outcomes: dict[bytes, tuple] = {}
        self.applied_history: list[int] = []
        data_dir.mkdir(parents=True, exist_ok=True)
        if kind == "plain":
            self.machine = None
            self.sync = PlainNode(addr, peers, conf, self.transport)
        elif kind in ("hardened", "unsafe"):
            self.machine = RecordingMachine()
            self.sync = HardenedSyncObj(
                addr,
                peers,
                conf,
                self.machine,
                data_dir,
                transport=self.transport,
                fsync=fsync,
                raft_fixes=kind == "hardened",
                compaction_hold_max_bytes=hold_bytes,
            )
        else:
            raise ValueError(kind)
        for peer in peers:
            self.transport._onNodeConnected(TCPNode(peer))
        # Messages that reached this node's socket but were not read yet (SimNet.arrive); the
        # node reads them when its tick polls, wherever in the tick that poll is.
        self.socket: collections.deque = collections.deque()
        self._poll = self.sync._poller.poll
        self.sync._poller.poll = self._poll_socket
        self.alive = True
        self._record()

    def _poll_socket(self, timeout) -> None:
        while self.socket and self.alive:
            src, message = self.socket.popleft()
            self.transport.receive(src, message)
        self._poll(timeout)

    # views on the node
    @property
    def executions(self) -> list[bytes]:
        return self.sync.executions if self.kind == "plain" else self.machine.executions

    @property
    def state(self) -> list[bytes]:
        return self.sync.state if self.kind == "plain" else self.machine.state

    def last_applied(self) -> int:
        return self.sync._SyncObj__raftLastApplied

    def commit_index(self) -> int:
        return self.sync._SyncObj__raftCommitIndex

    def term(self) -> int:
        return self.sync._SyncObj__raftCurrentTerm

    def log(self) -> list[tuple[int, int]]:
        return [(idx, term) for _cmd, idx, term in self.sync._SyncObj__raftLog[:]]

    def is_leader(self) -> bool:
        return self.sync._isLeader()

    # driving it
    def propose(self, payload: bytes) -> None:
        def done(result, reason, payload=payload):
            assert payload not in self.outcomes, "callback fired twice"
            self.outcomes[payload] = (result, reason)

        self.sync.propose(payload, done)

    def acknowledged(self) -> list[bytes]:
        return [p for p, (_r, reason) in self.outcomes.items() if reason == FAIL_REASON.SUCCESS]

    def tick(self) -> None:
        self.sync.doTick(0.0)
        self._record()

    def force_election_timeout(self) -> None:
        self.sync._SyncObj__raftElectionDeadline = 0

    def set_apply_hook(self, hook) -> None:
        """``hook(payload)`` runs inside this node's apply, before the state changes."""
        if self.kind == "plain":
            self.sync.on_apply = hook
        else:
            self.machine.on_apply = hook

    def role(self) -> str:
        return {0: "follower", 1: "candidate", 2: "leader"}[self.sync._SyncObj__raftState]

    def _record(self) -> None:
        self.applied_history.append(self.last_applied())

    def destroy(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.sync._doDestroy()
        if self.kind != "plain":
            self.sync.close_storage()


class SimNet:
    def __init__(self, tmp_path: Path, clock: FakeClock):
        self.tmp_path = tmp_path
        self.clock = clock
        self.nodes: dict[str, SimNode] = {}
        self.links: dict[tuple[str, str], collections.deque] = collections.defaultdict(
            collections.deque
        )
        self.isolated: set[str] = set()
        self.cut_links: set[frozenset[str]] = set()
        self.held: set[tuple[str, str]] = set()

    def add(
        self,
        kind: str,
        addr: str,
        peers: list[str],
        *,
        conf: SyncObjConf | None = None,
        fsync: bool = False,
        data_dir: Path | None = None,
        hold_bytes: int = 0,
    ) -> SimNode:
        node = SimNode(
            self,
            kind,
            addr,
            peers,
            data_dir or self.tmp_path / addr.replace(":", "_"),
            conf or sim_conf(),
            fsync,
            hold_bytes,
        )
        self.nodes[addr] = node
        return node

    def cluster(self, kind: str, size: int = 3, **conf_overrides) -> list[SimNode]:
        addrs = [f"10.0.0.{i + 1}:4321" for i in range(size)]
        return [
            self.add(kind, a, [p for p in addrs if p != a], conf=sim_conf(**conf_overrides))
            for a in addrs
        ]

    # the network
    def isolate(self, addr: str) -> None:
        """Cut ``addr`` off: what is queued to or from it is lost, and so is what follows."""
        self.isolated.add(addr)
        for (src, dst), queue in self.links.items():
            if addr in (src, dst):
                queue.clear()

    def heal(self, addr: str) -> None:
        self.isolated.discard(addr)

    def cut(self, a: str, b: str) -> None:
        """Cut the link between ``a`` and ``b`` both ways (one link of a partition, as a
        per-link proxy or firewall rule does): what is queued on it is lost, and what follows."""
        self.cut_links.add(frozenset((a, b)))
        self.links[(a, b)].clear()
        self.links[(b, a)].clear()

    def mend(self, a: str, b: str) -> None:
        self.cut_links.discard(frozenset((a, b)))

    def crash(self, node: SimNode) -> None:
        """Stop ``node``; what it had not yet sent (still queued) is lost."""
        node.destroy()
        for (src, _dst), queue in self.links.items():
            if src == node.addr:
                queue.clear()

    def post(self, src: str, dst: str, message) -> bool:
        if src in self.isolated or dst in self.isolated or frozenset((src, dst)) in self.cut_links:
            return True  # lost on the way
        # A copy, as the bytes on the wire would be.
        self.links[(src, dst)].append(pickle.loads(pickle.dumps(message)))
        return True

    def queued(self, src: str, dst: str) -> list:
        return list(self.links[(src, dst)])

    def drop(self, src: str, dst: str) -> int:
        count = len(self.links[(src, dst)])
        self.links[(src, dst)].clear()
        return count

    def deliver(self, src: str, dst: str, count: int | None = None) -> int:
        queue = self.links[(src, dst)]
        target = self.nodes[dst]
        delivered = 0
        while queue and (count is None or delivered < count):
            message = queue.popleft()
            if target.alive and target.transport.receive(src, message):
                target._record()
            delivered += 1
        return delivered

    def arrive(self, src: str, dst: str) -> int:
        """Move what is queued from ``src`` to ``dst`` into ``dst``'s socket, unread."""
        queue = self.links[(src, dst)]
        count = len(queue)
        target = self.nodes[dst]
        while queue:
            target.socket.append((src, queue.popleft()))
        return count

    def deliver_all(self, rounds: int = 50) -> None:
        """Deliver everything on every link that is not held, until nothing moves."""
        for _ in range(rounds):
            moved = 0
            for src, dst in list(self.links):
                if (src, dst) in self.held:
                    continue
                moved += self.deliver(src, dst)
            if not moved:
                return
        raise AssertionError("messages still moving after deliver_all")

    def step(self, seconds: float = 0.06, stalled: tuple[SimNode, ...] = ()) -> None:
        """Advance the clock past one heartbeat period, tick every live node, deliver.

        ``stalled`` nodes neither tick nor read (a process starved of CPU, a long pause):
        what is sent to them waits on the link."""
        self.clock.advance(seconds)
        for node in self.nodes.values():
            if node.alive and node not in stalled:
                node.tick()
        waiting = {(src, n.addr) for n in stalled for src in self.nodes} - self.held
        self.held |= waiting
        try:
            self.deliver_all()
        finally:
            self.held -= waiting

    def settle(self, steps: int = 6) -> None:
        for _ in range(steps):
            self.step()

    def elect(self, leader: SimNode) -> None:
        """Time ``leader`` out first, deliver its vote requests and the answers."""
        leader.force_election_timeout()
        leader.tick()
        self.deliver_all()
        assert leader.is_leader(), f"{leader.addr} did not win the election"

    def destroy(self) -> None:
        for node in self.nodes.values():
            node.destroy()


@pytest.fixture
def plain_tcp_server_closes_a_failed_bind(monkeypatch):
    """Plain pysyncobj leaves the socket of a failed bind open (tcp_server.py 35-41; ours closes
    it: cluster/raft/transport.py `_BacklogTcpServer.bind`). A plain node whose port was taken
    meanwhile (free ports race on a loaded machine) then leaks one socket per retry, and the
    ResourceWarning surfaces in whichever test the collector runs in. The tests of plain
    pysyncobj are about its protocol, not this leak: close it for them (the modules that run
    plain nodes on TCP use this fixture; `test_a_failed_bind_closes_its_socket` tests ours
    without it)."""
    from pysyncobj.tcp_server import TcpServer

    bind = TcpServer.bind

    def closing_bind(self):
        try:
            bind(self)
        except BaseException:
            sock, self._TcpServer__socket = self._TcpServer__socket, None
            if sock is not None:
                sock.close()
            raise

    monkeypatch.setattr(TcpServer, "bind", closing_bind)


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(upstream, "monotonicTime", clock)
    monkeypatch.setattr(upstream, "random", random.Random(20240607))
    return clock


@pytest.fixture
def sim(tmp_path, fake_clock):
    net = SimNet(tmp_path, fake_clock)
    yield net
    net.destroy()
