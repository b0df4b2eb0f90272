"""The Raft port only talks to holders of the cluster password, and survives junk.

Real sockets on loopback, real replicas (``RaftReplica``). The controls run the same attack
on plain pysyncobj without a password, to show the test would catch the hole.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import msgpack
import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.node import TCPNode
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport
from pysyncobj.utility import TcpUtility, UtilityException

from cluster.raft import RaftReplica, RaftSettings, SubmitErrorReason
from cluster.raft.transport import BoundedTcpConnection, HardenedTCPTransport
from cluster.workload import wait_for

from .conftest import free_port

# Plain nodes on TCP here: their failed binds must not leak a socket (conftest.py).
pytestmark = pytest.mark.usefixtures("plain_tcp_server_closes_a_failed_bind")

POLL_S = 0.01  # how often wait_for looks: in-process replicas answer at once
DEADLINE_S = 10.0


class CountingMachine:
    def __init__(self):
        self.state: list[bytes] = []

    def apply(self, payload: bytes) -> bytes:
        self.state.append(payload)
        return b"ok"

    def snapshot(self) -> bytes:
        return msgpack.packb(self.state)

    def restore(self, blob: bytes) -> None:
        self.state = list(msgpack.unpackb(blob))


def submit_and_wait(replica: RaftReplica, payload: bytes):
    done = threading.Event()
    outcome = []

    def callback(result, error):
        outcome.append((result, error))
        done.set()

    replica.submit(payload, callback)
    assert done.wait(DEADLINE_S), "no callback"
    assert len(outcome) == 1
    return outcome[0]


def start(addr: str, peers, password: str, data_dir: Path, machine=None) -> RaftReplica:
    settings = RaftSettings(
        self_addr=addr, peers=tuple(peers), password=password, data_dir=data_dir, fsync=False
    )
    return RaftReplica(settings, machine or CountingMachine())


class MakesDirectoryWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def frame(payload: bytes) -> bytes:
    return struct.pack("i", len(payload)) + payload


def send_and_wait_for_close(addr: str, data: bytes) -> None:
    """Send ``data`` and wait until the server drops the connection."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
        sock.setblocking(False)
        view = memoryview(data)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                if view:
                    view = view[sock.send(view) :]
                if sock.recv(65536) == b"":
                    return
            except (BlockingIOError, InterruptedError):
                time.sleep(0.005)
            except (ConnectionResetError, BrokenPipeError):
                return
        raise AssertionError("the server kept the connection open")


def test_password_is_mandatory(tmp_path):
    for password in ("", None):
        with pytest.raises(ValueError, match="password is mandatory"):
            RaftSettings(self_addr="127.0.0.1:1", peers=(), password=password, data_dir=tmp_path)


@pytest.mark.parametrize("intruder_password", ["wrong", "cluster-secret"])
def test_peer_with_the_wrong_password_gets_nothing(tmp_path, intruder_password):
    """D is a configured member (the others would accept it), dialling everyone (its address
    sorts last, transport.py 409). With the wrong password it receives no entry, disturbs no
    term, and the others commit without it. The right-password run is the control."""
    addrs = sorted(f"127.0.0.1:{free_port()}" for _ in range(4))
    *members, intruder_addr = addrs
    replicas = []
    try:
        for i, addr in enumerate(members):
            replicas.append(
                start(addr, [a for a in addrs if a != addr], "cluster-secret", tmp_path / f"n{i}")
            )
        rejected_before = BoundedTcpConnection.rejected_frames
        intruder = start(intruder_addr, members, intruder_password, tmp_path / "intruder")
        replicas.append(intruder)
        members_only = replicas[:-1]
        # With the right password D is a full member and may win the first election itself
        # (every log is empty then): the control run takes any leader.
        candidates = members_only if intruder_password == "wrong" else replicas
        leader = wait_for(
            lambda: next((r for r in candidates if r.is_leader()), None),
            DEADLINE_S,
            "a leader among the members" if intruder_password == "wrong" else "a leader",
            interval_s=POLL_S,
        )
        term = leader.status()["term"]
        for i in range(20):
            _result, error = submit_and_wait(leader, b"cmd-%d" % i)
            assert error is None, error
        wait_for(
            lambda: all(r.status()["applied_index"] >= 22 for r in members_only),
            DEADLINE_S,
            "members applied everything",
            interval_s=POLL_S,
        )
        expected = [b"cmd-%d" % i for i in range(20)]

        if intruder_password == "wrong":
            # Evidence that D tried: every member dropped at least one of its handshakes
            # (D redials every connection_retry_s).
            wait_for(
                lambda: BoundedTcpConnection.rejected_frames - rejected_before >= 6,
                DEADLINE_S,
                "the members to reject D's handshakes",
                interval_s=POLL_S,
            )
            status = intruder.status()
            assert status["applied_index"] == 1 and status["term"] == 0
            assert not any(p["connected"] for p in status["peers"])
            assert intruder._obj._machine.state == []
            _result, error = submit_and_wait(intruder, b"from-intruder")
            assert error.reason is SubmitErrorReason.NO_LEADER and error.definite
            assert all(r.status()["term"] == term for r in members_only)
            assert all(r._obj._machine.state == expected for r in members_only)
        else:
            wait_for(
                lambda: intruder.status()["applied_index"] >= 22,
                DEADLINE_S,
                "D catching up",
                interval_s=POLL_S,
            )
            assert intruder._obj._machine.state == expected
    finally:
        for replica in replicas:
            replica.destroy()


def test_admin_commands_need_the_password(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    replica = start(addr, [], "cluster-secret", tmp_path / "n")
    try:
        with pytest.raises(UtilityException):
            TcpUtility(password="wrong", timeout=DEADLINE_S).executeCommand(addr, ["status"])
        with pytest.raises(UtilityException):
            TcpUtility(password=None, timeout=DEADLINE_S).executeCommand(addr, ["status"])
        status = TcpUtility(password="cluster-secret", timeout=DEADLINE_S).executeCommand(
            addr, ["status"]
        )
        assert status["partner_nodes_count"] == 0
    finally:
        replica.destroy()


def test_unpickling_attack_runs_code_on_plain_pysyncobj_without_password(tmp_path):
    """Control for the next test: pysyncobj without a password unpickles the first frame a
    stranger sends (tcp_connection.py 291)."""
    addr = f"127.0.0.1:{free_port()}"
    node = SyncObj(addr, [], SyncObjConf(autoTick=False))
    marker = tmp_path / "owned"
    try:
        attack = frame(
            zlib.compress(pickle.dumps(MakesDirectoryWhenUnpickled(str(marker)), protocol=2))
        )
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
            sock.sendall(attack)
            deadline = time.monotonic() + DEADLINE_S
            while not marker.exists() and time.monotonic() < deadline:
                node.doTick(0.01)
        assert marker.exists()
    finally:
        node._doDestroy()


@pytest.mark.parametrize("attack", ["random", "pickle", "huge-length", "negative-length"])
def test_junk_on_the_raft_port_runs_nothing_and_the_node_keeps_working(tmp_path, attack):
    addr = f"127.0.0.1:{free_port()}"
    replica = start(addr, [], "cluster-secret", tmp_path / "n")
    marker = tmp_path / "owned"
    try:
        wait_for(replica.is_leader, DEADLINE_S, "the single node to lead", interval_s=POLL_S)
        if attack == "random":
            data = frame(os.urandom(4096))
        elif attack == "pickle":
            data = frame(
                zlib.compress(pickle.dumps(MakesDirectoryWhenUnpickled(str(marker)), protocol=2))
            )
        elif attack == "huge-length":
            # upstream would buffer up to 2 GiB waiting for this frame (issue 174)
            data = struct.pack("i", 2**31 - 1) + b"\0" * (1 << 20)
        else:
            data = struct.pack("i", -5) + os.urandom(64)
        send_and_wait_for_close(addr, data)
        assert not marker.exists()
        result, error = submit_and_wait(replica, b"still-alive")
        assert error is None and result == b"ok"
        assert replica.status()["role"] == "leader"
    finally:
        replica.destroy()


@pytest.mark.parametrize("kind", ["plain", "hardened"])
def test_no_message_leaves_before_the_password_handshake(kind):
    """A candidate sends vote requests to every peer whose TCP connection is up (syncobj.py
    642-648), even while the password handshake is still running. Upstream sends it without
    the session key and the peer drops the connection (tcp_connection.py 292-298): heartbeats
    are lost and needless elections follow. Our transport holds the message back."""
    server_addr, client_addr = sorted(f"127.0.0.1:{free_port()}" for _ in range(2))
    transport_class = (
        TCPTransport if kind == "plain" else HardenedTCPTransport.factory(max_frame_bytes=1 << 20)
    )
    conf = dict(
        autoTick=False,
        password="pw",
        raftMinTimeout=10.0,
        raftMaxTimeout=20.0,
        connectionTimeout=30.0,
        # No reconnect within the test: on a loaded machine the first connection can take
        # longer than the default 5 s, and plain's dropped link then came back at once.
        connectionRetryTime=1000.0,
    )
    server = SyncObj(
        server_addr, [client_addr], SyncObjConf(**conf), transportClass=transport_class
    )
    client = SyncObj(
        client_addr, [server_addr], SyncObjConf(**conf), transportClass=transport_class
    )
    try:
        to_server = client._SyncObj__transport._connections[TCPNode(server_addr)]
        wait_for(
            lambda: client.doTick(0.001) or to_server.state == CONNECTION_STATE.CONNECTED,
            DEADLINE_S,
            "the client's TCP connection",
            interval_s=POLL_S,
        )
        assert to_server.sendRandKey is None  # our key sent, theirs not yet received
        client._SyncObj__transport.send(
            TCPNode(server_addr),
            {"type": "request_vote", "term": 1, "last_log_index": 1, "last_log_term": 0},
        )
        for _ in range(50):
            server.doTick(0.002)
            client.doTick(0.002)
        connected = server.isNodeConnected(TCPNode(client_addr)) and client.isNodeConnected(
            TCPNode(server_addr)
        )
        assert connected is (kind == "hardened")
    finally:
        server._doDestroy()
        client._doDestroy()
