"""pysyncobj's TCP transport with bounded, authenticated-only frames.

pysyncobj frames are ``struct('i') length + [Fernet token of] zlib(pickle(message))``
(tcp_connection.py 141-149, 277-300). With a password every frame is HMAC-checked before it is
unpickled, which is what keeps an unauthenticated peer from running code. What is still open
upstream, and closed here:

* the length prefix is trusted: a peer can announce 2 GiB and the node buffers until memory
  runs out (upstream issue 174). ``BoundedTcpConnection`` drops the connection as soon as a
  frame announces more than ``max_frame_bytes`` or decompresses to more than that;
* a connection without an encryptor would unpickle whatever arrives. The adapter never runs
  without a password, and ``BoundedTcpConnection`` refuses frames on a connection that has no
  encryptor rather than unpickle them;
* rejected frames are dropped silently ("Why no logging of security errors?",
  tcp_connection.py 296): we log them, rate-limited;
* unauthenticated connections are never timed out while idle, so they can pile up; we cap
  them and close the ones that do not finish the handshake in time;
* any peer that knows the password can register as a read-only node and receive every log
  entry (transport.py 360-373); the cluster has no read-only members, so that is refused;
* a message sent before the password handshake finished lacks the session key and makes the
  peer drop the connection; ``send`` holds such messages back (see there);
* a connection counts as dead when nothing was *read* from it for ``connectionTimeout``, and
  that is checked only when something is sent or the socket polls ready (tcp_connection.py
  186, 227-236). The link between two followers carries nothing while a leader lives, so the
  first vote request after the leader dies finds it "idle", drops it and is lost: every
  failover took two election rounds. ``HardenedTCPTransport`` sends a small keepalive on every
  peer link that has not carried anything for ``keepalive_s`` (a quarter of the connection
  timeout), and ``BoundedTcpConnection`` does not call a link idle while bytes from the peer
  are waiting in the socket unread (a node whose tick stalled has simply not read them yet).
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import time
import zlib

from pysyncobj import pickle as _pickle
from pysyncobj import tcp_connection as _tcp_connection
from pysyncobj import transport as _transport
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

from cluster import raft_pin  # noqa: F401  (refuses any pysyncobj but the pinned one)

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("i")  # native int, as upstream (tcp_connection.py 147, 280)
_MAX_UNAUTHENTICATED = 32
_HANDSHAKE_TIMEOUT_S = 5.0
# The keepalive is a Raft-looking message of a type no handler knows: a node that does not
# filter it (an older build during a rolling upgrade) ignores it (syncobj.py 909-1083 only
# acts on known types). Ours drops it in the transport, before Raft sees it.
_KEEPALIVE_TYPE = "qb_keepalive"
_KEEPALIVE = {"type": _KEEPALIVE_TYPE}


def _transport_now() -> float:
    # Looked up at call time, as pysyncobj's own modules do, so a test that installs a fake
    # clock on pysyncobj.transport / pysyncobj.tcp_connection moves ours too.
    return _transport.monotonicTime()


def _connection_now() -> float:
    return _tcp_connection.monotonicTime()


class _RateLimitedLog:
    def __init__(self, period_s: float = 5.0):
        self._period_s = period_s
        self._last = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self._period_s:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar messages suppressed)"
        self._suppressed = 0
        self._last = now
        logger.warning(msg, *args)


_security_log = _RateLimitedLog()


class BoundedTcpConnection(TcpConnection):
    """A ``TcpConnection`` that caps frame sizes and never unpickles unauthenticated bytes.

    Instances are ordinary ``TcpConnection`` objects whose class is switched to this one right
    after pysyncobj creates them (see ``HardenedTCPTransport``); only the two private methods
    below differ from upstream.
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    rejected_frames = 0  # process-wide count of dropped connections (class attribute)

    def _TcpConnection__processConnectionTimeout(self):
        # Upstream 227-230 drops the connection when nothing was read from it for `timeout`,
        # and checks that before reading (186) or before sending (233). A node whose tick was
        # busy (a long apply) has not read what its peer sent meanwhile: bytes waiting in the
        # socket prove the peer alive, so the link is not idle. They are read right after.
        idle = _connection_now() - self._TcpConnection__lastReadTime
        if idle > self._TcpConnection__timeout and self._peer_bytes_waiting():
            return
        super()._TcpConnection__processConnectionTimeout()

    def _peer_bytes_waiting(self) -> bool:
        sock = self._TcpConnection__socket
        if sock is None or self.state != CONNECTION_STATE.CONNECTED:
            return False
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # b"": EOF
        except OSError:  # EAGAIN: nothing waiting; anything else: let upstream decide
            return False

    def _announced_size_ok(self) -> bool:
        buf = self._TcpConnection__readBuffer
        if len(buf) < _LENGTH.size:
            return True
        (size,) = _LENGTH.unpack_from(buf, 0)
        return 0 < size <= self.max_frame_bytes

    def _TcpConnection__processRead(self):
        # upstream tcp_connection.py 261-275 reads until EAGAIN with no bound; stop reading as
        # soon as the first frame announces an impossible size.
        more = super()._TcpConnection__processRead()
        if more and not self._announced_size_ok():
            BoundedTcpConnection.rejected_frames += 1
            _security_log.warning(
                "raft transport: dropping a connection whose frame announces more than %d bytes",
                self.max_frame_bytes,
            )
            self.disconnect()
            return False
        return more

    def _TcpConnection__processParseMessage(self):
        # Replaces tcp_connection.py 277-300.
        buf = self._TcpConnection__readBuffer
        if len(buf) < _LENGTH.size:
            return None
        if not self._announced_size_ok():
            BoundedTcpConnection.rejected_frames += 1
            _security_log.warning(
                "raft transport: dropping a connection whose frame announces more than %d bytes",
                self.max_frame_bytes,
            )
            self.disconnect()
            return None
        (size,) = _LENGTH.unpack_from(buf, 0)
        if len(buf) - _LENGTH.size < size:
            return None
        data = buf[_LENGTH.size : _LENGTH.size + size]
        try:
            if self.encryptor is None:
                raise PermissionError("no cluster password on this connection")
            # Fernet checks the HMAC before returning anything; nothing below runs on bytes
            # that were not produced with the cluster password.
            timestamp = self.encryptor.extract_timestamp(data)
            if timestamp < self.recvLastTimestamp:
                raise PermissionError("replayed or reordered frame")
            self.recvLastTimestamp = timestamp
            data = self.encryptor.decrypt(data)
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, self.max_frame_bytes)
            if inflater.unconsumed_tail:
                raise ValueError("frame inflates past the frame limit")
            message = _pickle.loads(raw)
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise PermissionError("session key mismatch")
        except Exception as exc:
            BoundedTcpConnection.rejected_frames += 1
            _security_log.warning(
                "raft transport: dropping a connection after a frame that "
                "failed authentication or decoding (%s)",
                type(exc).__name__,
            )
            self.disconnect()
            return None
        self._TcpConnection__readBuffer = buf[_LENGTH.size + size :]
        return message


def _harden(conn: TcpConnection, max_frame_bytes: int) -> None:
    if type(conn) is TcpConnection:
        conn.__class__ = BoundedTcpConnection
    conn.max_frame_bytes = max_frame_bytes


class HardenedTCPTransport(TCPTransport):
    """``TCPTransport`` whose every connection is a ``BoundedTcpConnection``, and whose every
    peer link carries something at least every ``keepalive_s``."""

    def __init__(
        self,
        syncObj,
        selfNode,
        otherNodes,
        *,
        max_frame_bytes: int,
        keepalive_s: float | None = None,
    ):
        self._max_frame_bytes = max_frame_bytes
        self._handshake_started: dict[TcpConnection, float] = {}
        # Well under the connection timeout, so the peer reads something from us several
        # times per timeout even when one of our ticks runs long.
        if keepalive_s is None:
            keepalive_s = syncObj.conf.connectionTimeout / 4
        self._keepalive_s = keepalive_s
        self._last_sent: dict = {}  # node -> when a message to it last left
        self.keepalives_sent = 0
        super().__init__(syncObj, selfNode, otherNodes)

    @classmethod
    def factory(cls, *, max_frame_bytes: int, keepalive_s: float | None = None):
        """A ``transportClass`` for ``SyncObj(..., transportClass=...)``."""
        return functools.partial(cls, max_frame_bytes=max_frame_bytes, keepalive_s=keepalive_s)

    def addNode(self, node):
        # transport.py 511-533 creates the outgoing connection object here.
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None:
            _harden(conn, self._max_frame_bytes)

    def _onNewIncomingConnection(self, conn):
        # transport.py 316-329. The TcpConnection was created by TcpServer a moment ago and has
        # not read anything yet.
        _harden(conn, self._max_frame_bytes)
        if len(self._unknownConnections) >= _MAX_UNAUTHENTICATED:
            _security_log.warning(
                "raft transport: %d connections are still in their handshake; refusing another",
                len(self._unknownConnections),
            )
            conn.disconnect()
            return
        self._handshake_started[conn] = _transport_now()
        super()._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn, message):
        # transport.py 331-373, minus read-only registration: the cluster has no read-only
        # members, and a read-only node receives every log entry.
        handshake_done = bool(conn.sendRandKey) or self._syncObj.encryptor is None
        if handshake_done and message == "readonly":
            _security_log.warning("raft transport: refusing a read-only node registration")
            conn.disconnect()
            self._unknownConnections.discard(conn)
            return
        super()._onIncomingMessageReceived(conn, message)

    def send(self, node, message):
        # transport.py 556-575 only checks that the TCP connection is up. A candidate sends its
        # vote requests to every peer (syncobj.py 642-648) without checking that the password
        # handshake finished; such a message goes out without the session key, the peer
        # cannot unwrap it (tcp_connection.py 292-294) and drops the connection, which costs
        # heartbeats and causes needless elections. Until the handshake is done, the node is
        # not connected: drop the message (Raft tolerates lost messages).
        conn = self._connections.get(node)
        if conn is not None and self._syncObj.encryptor is not None and not conn.sendRandKey:
            return False
        sent = super().send(node, message)
        if sent:
            self._last_sent[node] = _transport_now()
        return sent

    def _onMessageReceived(self, node, message):
        # transport.py 106-108. Reading the keepalive already refreshed the connection's idle
        # clock (tcp_connection.py 259); Raft never sees it.
        if type(message) is dict and message.get("type") == _KEEPALIVE_TYPE:
            return
        super()._onMessageReceived(node, message)

    def _send_keepalives(self) -> None:
        now = _transport_now()
        for node, conn in list(self._connections.items()):
            if node not in self._nodes or conn.state != CONNECTION_STATE.CONNECTED:
                continue
            last = self._last_sent.get(node)
            if last is not None and now - last < self._keepalive_s:
                continue
            if self.send(node, _KEEPALIVE):  # held back until the handshake is done
                self.keepalives_sent += 1

    def _onTick(self):
        super()._onTick()
        self._send_keepalives()
        if not self._handshake_started:
            return
        now = _transport_now()
        for conn, started in list(self._handshake_started.items()):
            if conn not in self._unknownConnections:
                del self._handshake_started[conn]
            elif now - started > _HANDSHAKE_TIMEOUT_S:
                del self._handshake_started[conn]
                conn.disconnect()
                self._unknownConnections.discard(conn)

    def dropNode(self, node):
        super().dropNode(node)
        self._last_sent.pop(node, None)

    def destroy(self):
        super().destroy()
        self._handshake_started.clear()
        self._last_sent.clear()
