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
* before the password handshake a connection may buffer a frame of the full size, grown with
  ``bytes +=`` (tcp_connection.py 274: quadratic, about a second of the tick thread for 16 MiB),
  and each parsed frame is cut off with a copy of the rest (299). Until the handshake is done
  a connection here gets ``PRE_AUTH_FRAME_BYTES`` (4 KiB; the two handshake frames are under
  500 bytes) and never buffers more than one such frame; the read buffer is a ``bytearray``
  (an append or cutting off a parsed frame costs what it adds or removes);
* unauthenticated connections are never timed out while idle, so they can pile up; we close
  the ones that do not finish the handshake within ``handshake_timeout_s``, and bound them per
  source address and in all (see ``HardenedTCPTransport._make_room``: a newcomer takes the
  slot of a connection that has not sent one authentic frame, so a flood cannot hold the slots
  a member needs);
* ``TcpServer`` accepts one connection per poll from a listen queue of 5, and on any accept()
  error but EAGAIN unbinds the port for good (tcp_server.py 42, 57-77): under a connection
  flood a member's SYN finds the queue full (the kernel retries it after 1, 3, 7 s), and
  EMFILE (descriptors exhausted anywhere in the process) leaves the node deaf.
  ``_BacklogTcpServer`` accepts every waiting connection, queues 128, and retries transient
  errors on the next poll;
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

import collections
import dataclasses
import errno
import functools
import logging
import socket
import struct
import time
import zlib

from pysyncobj import pickle as _pickle
from pysyncobj import tcp_connection as _tcp_connection
from pysyncobj import transport as _transport
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport

from . import pin  # noqa: F401  (refuses any pysyncobj but the pinned one)

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("i")  # native int, as upstream (tcp_connection.py 147, 280)
# Until the password handshake is done a peer sends two frames: its random key (232 bytes with
# the length prefix) and (our key, its address) (252 bytes for "127.0.0.1:port", 488 for a
# 253-character host name); test_the_pre_auth_cap_leaves_room_for_the_handshake_frames.
PRE_AUTH_FRAME_BYTES = 4096
_MAX_HANDSHAKES = 32  # incoming connections in their password handshake, all sources together
_MAX_HANDSHAKES_PER_SOURCE = 4  # ... and from one source address
# Connections TcpServer accepts per readable event (upstream: one), and its listen backlog
# (upstream: 5). Under a connection flood a member's SYN would otherwise find the queue full
# and be dropped, and the kernel retries it only after 1, 3, 7 s.
_ACCEPTS_PER_EVENT = 64
_LISTEN_BACKLOG = 128
# accept() errors that concern one connection or a passing shortage (Linux passes a new
# socket's pending network errors to accept(), man 2 accept), not the listening socket.
_TRANSIENT_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        *("ECONNABORTED", "EPROTO", "EPERM", "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"),
        *("ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP"),
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
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
    """At most one line per message (its format string) per period; the next line of that
    message says how many were suppressed meanwhile."""

    def __init__(self, period_s: float = 5.0):
        self._period_s = period_s
        self._state: dict[str, tuple[float, int]] = {}  # msg -> (last logged, suppressed)

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        last, suppressed = self._state.get(msg, (float("-inf"), 0))
        if now - last < self._period_s:
            self._state[msg] = (last, suppressed + 1)
            return
        self._state[msg] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} similar messages suppressed)"
        logger.warning(msg, *args)


_security_log = _RateLimitedLog()


class BoundedTcpConnection(TcpConnection):
    """A ``TcpConnection`` that caps frame sizes and never unpickles unauthenticated bytes.

    Instances are ordinary ``TcpConnection`` objects whose class is switched to this one right
    after pysyncobj creates them (see ``HardenedTCPTransport``); only the private methods below
    and ``disconnect`` differ from upstream.
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    rejected_frames = 0  # process-wide count of dropped connections (class attribute)
    # Set by HardenedTCPTransport once the password handshake is done (cleared on disconnect):
    # until then frames are capped at PRE_AUTH_FRAME_BYTES.
    authenticated: bool = False
    # A frame on this connection passed the password's HMAC check (cleared on disconnect).
    password_proven: bool = False

    def frame_cap(self) -> int:
        if self.authenticated:
            return self.max_frame_bytes
        return min(PRE_AUTH_FRAME_BYTES, self.max_frame_bytes)

    def disconnect(self):
        self.authenticated = False
        self.password_proven = False
        super().disconnect()

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

    def _read_buffer(self) -> bytearray:
        # Upstream resets the buffer to bytes() (tcp_connection.py 68, 125, 168).
        buf = self._TcpConnection__readBuffer
        if type(buf) is not bytearray:
            buf = self._TcpConnection__readBuffer = bytearray(buf)
        return buf

    def _announced_size_ok(self) -> bool:
        buf = self._TcpConnection__readBuffer
        if len(buf) < _LENGTH.size:
            return True
        (size,) = _LENGTH.unpack_from(buf, 0)
        return 0 < size <= self.frame_cap()

    def _reject_announced_size(self) -> None:
        BoundedTcpConnection.rejected_frames += 1
        _security_log.warning(
            "raft transport: dropping a connection whose frame announces more than %d bytes (%s)",
            self.frame_cap(),
            "authenticated peer" if self.authenticated else "before the password handshake",
        )
        self.disconnect()

    def _TcpConnection__processRead(self):
        # Replaces tcp_connection.py 261-275, which appends with `bytes +=` (a copy of the
        # whole buffer per recv) and reads until EAGAIN with no bound. Stop as soon as the
        # first frame announces more than the cap; before the handshake, never buffer more than
        # one capped frame (the poller reports the rest again: poll() is level-triggered).
        buf = self._read_buffer()
        sock = self._TcpConnection__socket
        want = self._TcpConnection__recvBufferSize
        if not self.authenticated:
            want = min(want, _LENGTH.size + self.frame_cap() - len(buf))
            if want <= 0:
                return False  # a whole capped frame is buffered: parse it first
        try:
            incoming = sock.recv(want)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or not incoming:
            self.disconnect()
            return False
        buf += incoming
        if not self._announced_size_ok():
            self._reject_announced_size()
            return False
        return True

    def _TcpConnection__processParseMessage(self):
        # Replaces tcp_connection.py 277-300.
        buf = self._read_buffer()
        if len(buf) < _LENGTH.size:
            return None
        if not self._announced_size_ok():
            self._reject_announced_size()
            return None
        (size,) = _LENGTH.unpack_from(buf, 0)
        if len(buf) - _LENGTH.size < size:
            return None
        with memoryview(buf) as view:
            data = bytes(view[_LENGTH.size : _LENGTH.size + size])  # Fernet wants bytes
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
        self.password_proven = True
        # A bytearray drops a prefix in place (it moves its start): no copy of what follows.
        del buf[: _LENGTH.size + size]
        return message


class _BacklogTcpServer(TcpServer):
    """``TcpServer`` with a deeper listen queue that accepts every waiting connection on a
    readable event (up to ``_ACCEPTS_PER_EVENT``), not one per poll (tcp_server.py 42, 57-77)."""

    def bind(self):
        try:
            super().bind()
        except BaseException:
            # Upstream leaves the socket of a failed bind open (tcp_server.py 35-41), and
            # pysyncobj retries the bind every bindRetryTime: one file descriptor per retry.
            sock, self._TcpServer__socket = self._TcpServer__socket, None
            if sock is not None:
                sock.close()
            raise
        self._TcpServer__socket.listen(_LISTEN_BACKLOG)  # Linux: a second listen() resizes

    def _TcpServer__onNewConnection(self, descr, event):
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(_ACCEPTS_PER_EVENT):
                if self._TcpServer__socket is None or self._TcpServer__fileno is None:
                    return  # unbound meanwhile
                try:
                    sock, _addr = self._TcpServer__socket.accept()
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    if exc.errno in _TRANSIENT_ACCEPT_ERRNOS:
                        # Upstream unbinds on any of these (tcp_server.py 74-77): a peer that
                        # resets early, or a flood that exhausts file descriptors, would leave
                        # the node deaf for good. Try again on the next event.
                        _security_log.warning(
                            "raft transport: accept() failed (%s); retrying",
                            errno.errorcode.get(exc.errno, exc.errno),
                        )
                        break
                    self.unbind()
                    return
                try:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpServer__sendBufferSize
                    )
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpServer__recvBufferSize
                    )
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setblocking(False)
                except OSError:  # the peer is gone already
                    sock.close()
                    continue
                conn = TcpConnection(
                    poller=self._TcpServer__poller,
                    socket=sock,
                    timeout=self._TcpServer__connectionTimeout,
                    sendBufferSize=self._TcpServer__sendBufferSize,
                    recvBufferSize=self._TcpServer__recvBufferSize,
                    keepalive=self._TcpServer__keepalive,
                )
                self._TcpServer__onNewConnectionCallback(conn)
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()


def _harden(conn: TcpConnection, max_frame_bytes: int) -> None:
    if type(conn) is TcpConnection:
        conn.__class__ = BoundedTcpConnection
    conn.max_frame_bytes = max_frame_bytes


@dataclasses.dataclass
class _Handshake:
    started: float
    source: str  # the peer's IP address


def _source_address(conn: TcpConnection) -> str | None:
    sock = conn._TcpConnection__socket
    try:
        return sock.getpeername()[0] if sock is not None else None
    except OSError:  # reset before we got to it
        return None


class HardenedTCPTransport(TCPTransport):
    """``TCPTransport`` whose every connection is a ``BoundedTcpConnection``, whose incoming
    handshakes are bounded in number and time, and whose every peer link carries something at
    least every ``keepalive_s``."""

    def __init__(
        self,
        syncObj,
        selfNode,
        otherNodes,
        *,
        max_frame_bytes: int,
        keepalive_s: float | None = None,
        handshake_timeout_s: float | None = None,
    ):
        self._max_frame_bytes = max_frame_bytes
        # Incoming connections in their password handshake: the same set as upstream's
        # _unknownConnections (entries leave both together).
        self._handshakes: dict[TcpConnection, _Handshake] = {}
        # Well under the connection timeout, so the peer reads something from us several
        # times per timeout even when one of our ticks runs long.
        if keepalive_s is None:
            keepalive_s = syncObj.conf.connectionTimeout / 4
        self._keepalive_s = keepalive_s
        # A member finishes the handshake in one round trip (milliseconds); twice the
        # connection timeout still spares one whose tick stalled (a dump: up to ~1.3 s), and a
        # member whose handshake is cut redials after connectionRetryTime.
        if handshake_timeout_s is None:
            handshake_timeout_s = 2 * syncObj.conf.connectionTimeout
        self._handshake_timeout_s = handshake_timeout_s
        self._last_sent: dict = {}  # node -> when a message to it last left
        self.keepalives_sent = 0
        # Incoming connections closed in their handshake: displaced by a newcomer, refused
        # (every slot held by a connection that proved the password), timed out.
        self.handshakes_displaced = 0
        self.handshakes_refused = 0
        self.handshakes_timed_out = 0
        super().__init__(syncObj, selfNode, otherNodes)

    def counters(self) -> dict[str, int]:
        """What the transport refused, for the node status (docs/operating/raft-port.md)."""
        return {
            "frames_rejected": BoundedTcpConnection.rejected_frames,
            "handshakes_displaced": self.handshakes_displaced,
            "handshakes_refused": self.handshakes_refused,
            "handshakes_timed_out": self.handshakes_timed_out,
        }

    @classmethod
    def factory(
        cls,
        *,
        max_frame_bytes: int,
        keepalive_s: float | None = None,
        handshake_timeout_s: float | None = None,
    ):
        """A ``transportClass`` for ``SyncObj(..., transportClass=...)``."""
        return functools.partial(
            cls,
            max_frame_bytes=max_frame_bytes,
            keepalive_s=keepalive_s,
            handshake_timeout_s=handshake_timeout_s,
        )

    def _createServer(self):
        super()._createServer()  # transport.py 258-282
        self._server.__class__ = _BacklogTcpServer

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
        source = _source_address(conn)
        if source is None or not self._make_room(source):
            conn.disconnect()
            return
        self._handshakes[conn] = _Handshake(_transport_now(), source)
        super()._onNewIncomingConnection(conn)

    def _make_room(self, source: str) -> bool:
        """Whether a new connection from ``source`` may start its handshake; closes one
        connection to make room if needed.

        At most _MAX_HANDSHAKES_PER_SOURCE from one address and _MAX_HANDSHAKES in all. When
        full, the newcomer takes the slot of the oldest connection that has not sent a single
        authentic frame, from the same source, or else from the source holding the most slots.
        A member sends its first frame (its key) as soon as it connects, so it is at risk only
        for that one round trip; a flood cannot keep slots, it can only displace its own. If
        every candidate proved the password, the newcomer is refused.
        """
        counts = collections.Counter(h.source for h in self._handshakes.values())
        if counts[source] >= _MAX_HANDSHAKES_PER_SOURCE:
            candidates = [c for c, h in self._handshakes.items() if h.source == source]
        elif len(self._handshakes) >= _MAX_HANDSHAKES:
            candidates = list(self._handshakes)
        else:
            return True
        unproven = [c for c in candidates if not c.password_proven]
        if not unproven:
            self.handshakes_refused += 1
            _security_log.warning(
                "raft transport: refusing a connection from %s: %d connections from it, %d in "
                "all, are in the password handshake",
                source,
                counts[source],
                len(self._handshakes),
            )
            return False
        victim = min(
            unproven,
            key=lambda c: (-counts[self._handshakes[c].source], self._handshakes[c].started),
        )
        victim_source = self._handshakes[victim].source
        self.handshakes_displaced += 1
        _security_log.warning(
            "raft transport: closing a connection from %s that sent nothing authentic, to make "
            "room for one from %s (%d in the password handshake from %s, %d in all)",
            victim_source,
            source,
            counts[victim_source],
            victim_source,
            len(self._handshakes),
        )
        self._close_handshake(victim)
        return True

    def _close_handshake(self, conn) -> None:
        conn.disconnect()  # calls _onDisconnected, which forgets it
        self._unknownConnections.discard(conn)
        self._handshakes.pop(conn, None)

    def _onIncomingMessageReceived(self, conn, message):
        # transport.py 331-373, minus read-only registration: the cluster has no read-only
        # members, and a read-only node receives every log entry.
        handshake_done = bool(conn.sendRandKey) or self._syncObj.encryptor is None
        if handshake_done and message == "readonly":
            _security_log.warning("raft transport: refusing a read-only node registration")
            self._close_handshake(conn)
            return
        super()._onIncomingMessageReceived(conn, message)
        if conn not in self._unknownConnections:  # a member named itself (or it was dropped)
            self._handshakes.pop(conn, None)
            if conn.state == CONNECTION_STATE.CONNECTED:
                conn.authenticated = True

    def _onOutgoingMessageReceived(self, conn, message):
        # transport.py 462-479: the first message on our own connection is the peer's key.
        super()._onOutgoingMessageReceived(conn, message)
        if conn.sendRandKey and conn.state == CONNECTION_STATE.CONNECTED:
            conn.authenticated = True

    def _onDisconnected(self, conn):
        super()._onDisconnected(conn)  # transport.py 481-497
        self._handshakes.pop(conn, None)

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
        if not self._handshakes:
            return
        now = _transport_now()
        expired = [
            c for c, h in self._handshakes.items() if now - h.started > self._handshake_timeout_s
        ]
        for conn in expired:
            self.handshakes_timed_out += 1
            _security_log.warning(
                "raft transport: closing a connection from %s that did not finish the password "
                "handshake within %.1f s",
                self._handshakes[conn].source,
                self._handshake_timeout_s,
            )
            self._close_handshake(conn)

    def dropNode(self, node):
        super().dropNode(node)
        self._last_sent.pop(node, None)

    def destroy(self):
        super().destroy()
        self._handshakes.clear()
        self._last_sent.clear()
