"""WebSocket subscriptions of the client SDK: a maintained order book, trades, own orders.

`Client.subscribe_book(market)` / `AsyncClient.subscribe_book(market)` and the `trades` and
`orders` variants return the iterators defined here (docs/reference/sdk.md, "Subscriptions").
They reconnect to any node of the URL list, check every message's `prev_seq` against the
last `seq` of its channel, and start again from a fresh snapshot when the chain breaks; a book
built across a gap is never handed out. Event channels drop what was already delivered
(`seq` <= the last one) and report what may have been missed as a `Gap`.

Written like the REST retry policy (`api.sdk.retry`): the protocol (`_Stream.flow`) is a
generator that yields I/O steps (`_Open`, `_Write`, `_Read`, `_Sleep`, `_Close`) and items for
the caller (`_Emit`), and receives each step's answer; the WebSocket framing is wsproto's
sans-IO `WSConnection`. `Subscription` (blocking sockets) and `AsyncSubscription` (anyio
streams, so trio or asyncio) only perform the steps.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import ByteStream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .codec import loads
from .errors import ApiError, ClusterUnavailable
from .signing import WS_PATH, Credentials, ws_auth

READ_BYTES = 1 << 16


# ---------------------------------------------------------------------- what the caller gets


class Book:
    """A market's order book as the subscription maintains it.

    `seq` is the global event sequence number the book reflects: every event up to it is
    applied and none after it. `snapshot` is true on the first book after a (re)snapshot: the
    subscription's start, a reconnection or a `prev_seq` gap. A subscription hands out the
    same object every time and updates it in place when asked for the next one: take `copy()`
    to keep one.
    """

    def __init__(self, market: str) -> None:
        self.market = market
        self.seq = 0
        self.snapshot = True
        self.bid_qty: dict[int, int] = {}  # price -> quantity (lots) resting at that price
        self.ask_qty: dict[int, int] = {}

    def bids(self, depth: int | None = None) -> list[list[int]]:
        """`[[price, qty], ...]`, best (highest) first, like the REST book."""
        return [[p, self.bid_qty[p]] for p in sorted(self.bid_qty, reverse=True)[:depth]]

    def asks(self, depth: int | None = None) -> list[list[int]]:
        """`[[price, qty], ...]`, best (lowest) first."""
        return [[p, self.ask_qty[p]] for p in sorted(self.ask_qty)[:depth]]

    def best_bid(self) -> tuple[int, int] | None:
        return (p := max(self.bid_qty), self.bid_qty[p]) if self.bid_qty else None

    def best_ask(self) -> tuple[int, int] | None:
        return (p := min(self.ask_qty), self.ask_qty[p]) if self.ask_qty else None

    def copy(self) -> Book:
        other = Book(self.market)
        other.seq, other.snapshot = self.seq, self.snapshot
        other.bid_qty, other.ask_qty = dict(self.bid_qty), dict(self.ask_qty)
        return other

    def __repr__(self) -> str:
        return (
            f"Book({self.market!r}, seq={self.seq}, bids={self.bids(5)}, "
            f"asks={self.asks(5)}{', snapshot' if self.snapshot else ''})"
        )


@dataclass(frozen=True)
class Gap:
    """Events of `channel` with `after_seq < seq <= until_seq` may have been missed.

    Yielded by trades and orders subscriptions, in order with the events, when the stream
    cannot prove it delivered everything: after a reconnection whose new subscription starts
    later than what was delivered (`reason="reconnect"`), or when a message's `prev_seq` does
    not chain (`reason="prev_seq"`). Reconcile over REST (`trades()`, `open_orders()`,
    `balances()`, `order_by_client_id()`).
    """

    channel: str
    after_seq: int
    until_seq: int
    reason: str


# ---------------------------------------------------------------------- steps (sans-IO)


@dataclass
class _Open:
    """Close any current connection and open a TCP (TLS for https) one to `url`'s host.
    Answer: None, or the exception."""

    url: str
    timeout_s: float


@dataclass
class _Write:
    """Send bytes on the connection. Answer: None, or the exception."""

    data: bytes


@dataclass
class _Read:
    """Receive some bytes. Answer: the bytes (b"" at end of stream), or the exception
    (`TimeoutError` when nothing came within `timeout_s`)."""

    timeout_s: float


@dataclass
class _Close:
    """Close the current connection (if any). Answer: None."""


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Emit:
    """Hand `item` to the caller; resumed (answer None) when the caller asks for the next."""

    item: Any


_Step = _Open | _Write | _Read | _Close | _Sleep | _Emit
_Flow = Generator[_Step, Any, None]


class _Wire:
    """One WebSocket client connection over wsproto: JSON messages in and out."""

    def __init__(self, url: str) -> None:
        self.netloc = urlsplit(url).netloc
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.accepted = False
        self.closed: tuple[int | None, str] | None = None  # (close code, reason)
        self._parts: list[str] = []

    def handshake(self) -> bytes:
        return self.conn.send(Request(host=self.netloc, target=WS_PATH))

    def message(self, message: dict) -> bytes:
        return self.conn.send(TextMessage(data=json.dumps(message, separators=(",", ":"))))

    def receive(self, data: bytes) -> tuple[list[dict], bytes]:
        """Feed bytes (b"": end of stream) -> (JSON messages, bytes to send back)."""
        out: list[dict] = []
        reply = b""
        try:
            self.conn.receive_data(data or None)
            for event in self.conn.events():
                if isinstance(event, AcceptConnection):
                    self.accepted = True
                elif isinstance(event, RejectConnection):
                    self.closed = (None, f"handshake rejected ({event.status_code})")
                elif isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        text, self._parts = "".join(self._parts), []
                        try:
                            message = loads(text)
                        except ValueError:
                            continue
                        if isinstance(message, dict):
                            out.append(message)
                elif isinstance(event, Ping):
                    reply += self.conn.send(event.response())
                elif isinstance(event, CloseConnection):
                    self.closed = (event.code, event.reason or "")
                    if self.conn.state == ConnectionState.REMOTE_CLOSING:
                        reply += self.conn.send(event.response())
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self.closed = (None, f"protocol error: {exc}")
        if not data and self.closed is None:
            self.closed = (None, "end of stream")
        return out, reply


# ---------------------------------------------------------------------- channel logic (pure)


class _BookTracker:
    """Snapshot, then deltas chained by `prev_seq`; a break asks for a new snapshot."""

    def __init__(self, market: str, stats: collections.Counter[str]) -> None:
        self.channel = "book:" + market
        self.book = Book(market)
        self.stats = stats
        self.chain: int | None = None  # seq of the channel's last message; None: await snapshot
        self.snapshots = 0
        self.fresh = False  # the next book handed out is the first after a snapshot
        self.handed_seq = -1  # seq of the last book handed out: never go back

    def connected(self) -> None:
        self.chain = None

    def handle(self, m: dict) -> tuple[list[Any], bool]:
        """One server message -> (items for the caller, resubscribe?)."""
        kind = m.get("type")
        if m.get("channel") == self.channel:
            if kind == "snapshot":
                book = self.book
                book.bid_qty = {p: q for p, q in m["bids"]}
                book.ask_qty = {p: q for p, q in m["asks"]}
                book.seq = self.chain = m["seq"]
                self.snapshots += 1
                if self.snapshots > 1:
                    self.stats["ws_resnapshots"] += 1
                self.fresh = True
                return self._hand_out(), False
            if kind == "delta":
                if self.chain is None:  # the old chain, before the snapshot we asked for
                    return [], False
                if m["prev_seq"] != self.chain:
                    self.stats["ws_seq_gaps"] += 1
                    self.chain = None
                    return [], True
                levels = self.book.bid_qty if m["side"] == "buy" else self.book.ask_qty
                if m["level_qty"]:
                    levels[m["price"]] = m["level_qty"]
                else:
                    levels.pop(m["price"], None)
                self.book.seq = self.chain = m["seq"]
                return self._hand_out(), False
        elif (
            kind in ("heartbeat", "pong")
            and self.chain is not None
            and isinstance(m.get("seq"), int)
            and m["seq"] > self.book.seq
        ):
            # Every message of the channel up to this seq has been sent: the book is
            # complete through it (docs/reference/websocket.md).
            self.book.seq = m["seq"]
            return self._hand_out(), False
        return [], False

    def _hand_out(self) -> list[Any]:
        if self.book.seq < self.handed_seq:
            return []  # a trailing node's snapshot: wait until it is as new as what was seen
        self.book.snapshot, self.fresh = self.fresh, False
        self.handed_seq = self.book.seq
        return [self.book]


class _EventTracker:
    """Events in `seq` order, each once; what cannot be proven delivered becomes a `Gap`."""

    def __init__(self, channel: str, stats: collections.Counter[str]) -> None:
        self.channel = channel
        self.stats = stats
        self.through: int | None = None  # every event up to here was handed out or in a Gap
        self.chain: int | None = None

    def connected(self) -> None:
        self.chain = None

    def handle(self, m: dict) -> tuple[list[Any], bool]:
        kind = m.get("type")
        seq = m.get("seq")
        if m.get("channel") == self.channel and isinstance(seq, int):
            if kind == "subscribed":
                out: list[Any] = []
                if self.through is not None and seq > self.through:
                    out.append(self._gap(seq, "reconnect"))
                self.through = seq if self.through is None else max(self.through, seq)
                self.chain = seq
                return out, False
            if "prev_seq" not in m or self.chain is None or self.through is None:
                return [], False
            out = []
            if m["prev_seq"] != self.chain:  # the server never skips: frames were lost
                self.stats["ws_seq_gaps"] += 1
                if m["prev_seq"] > self.through:
                    out.append(self._gap(m["prev_seq"], "prev_seq"))
                    self.through = m["prev_seq"]
            self.chain = seq
            if seq <= self.through:
                self.stats["ws_duplicates"] += 1  # delivered before the reconnection
                return out, False
            self.through = seq
            out.append(m)
            return out, False
        if (
            kind in ("heartbeat", "pong")
            and self.chain is not None
            and self.through is not None
            and isinstance(seq, int)
            and seq > self.through
        ):
            self.through = seq  # nothing of the channel up to seq is still on its way
        return [], False

    def _gap(self, until_seq: int, reason: str) -> Gap:
        assert self.through is not None
        self.stats["ws_gaps"] += 1
        return Gap(self.channel, self.through, until_seq, reason)


_Tracker = _BookTracker | _EventTracker


class _Refused(Exception):
    """A node answered the subscription (or its auth) with a definite error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


_REFUSAL_STATUS = {
    "unknown_market": 404,
    "forbidden": 403,
    "bad_channel": 400,
    "bad_request": 400,
    "too_many_channels": 400,
}


@dataclass
class _Stream:
    """One subscription's protocol: connect, authenticate, subscribe, follow, reconnect."""

    urls: list[str]
    channel: str
    tracker: _Tracker
    creds: Credentials | None  # authenticate first (the orders channel)
    stats: collections.Counter[str]
    connect_timeout_s: float = 3.0
    idle_timeout_s: float = 15.0
    max_outage_s: float | None = 60.0
    backoff_s: float = 0.02
    backoff_max_s: float = 1.0
    url: str | None = None  # the node currently serving the subscription
    start_seq: int | None = None  # seq of the first snapshot/acknowledgement
    _start: int = field(default=0)

    def flow(self) -> _Flow:
        n = len(self.urls)
        index = self._start
        backoff = self.backoff_s
        down_since = time.monotonic()
        refused: list[_Refused] = []
        sessions = 0
        while True:
            url = self.urls[index % n]
            index += 1
            try:
                served = yield from self._session(url, sessions)
            except _Refused as exc:
                served = False
                refused.append(exc)
                if exc.code == "forbidden" or len(refused) >= n:  # every node said no
                    yield _Close()
                    raise ApiError(exc.status, exc.code, exc.message) from None
            yield _Close()
            self.url = None
            now = time.monotonic()
            if served:
                sessions += 1
                refused.clear()
                down_since = now
                backoff = self.backoff_s
                continue  # straight to the next node
            if self.max_outage_s is not None and now - down_since > self.max_outage_s:
                raise ClusterUnavailable(
                    f"{self.channel}: no node served the subscription for {self.max_outage_s} s"
                )
            if index % n == self._start % n:  # tried every node: wait before the next round
                yield _Sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)

    def _session(self, url: str, sessions: int) -> Generator[_Step, Any, bool]:
        """One connection; True if it got as far as the channel's snapshot/acknowledgement."""
        if (yield _Open(url, self.connect_timeout_s)) is not None:
            self.stats["ws_connect_errors"] += 1
            return False
        wire = _Wire(url)
        pending: collections.deque[dict] = collections.deque()
        if (yield _Write(wire.handshake())) is not None:
            return False
        deadline = time.monotonic() + self.connect_timeout_s
        while not wire.accepted:
            got = yield from self._receive(wire, pending, deadline - time.monotonic())
            if not got or wire.closed is not None:
                self.stats["ws_connect_errors"] += 1
                return False
        if self.creds is not None:
            nonce = yield from self._nonce(wire, pending, deadline)
            if nonce is None:
                self.stats["ws_connect_errors"] += 1
                return False
            if (yield _Write(wire.message(ws_auth(self.creds, nonce)))) is not None:
                return False
        if (yield _Write(wire.message({"op": "subscribe", "channel": self.channel}))) is not None:
            return False
        self.tracker.connected()
        self.url = url
        served = False
        stats = self.stats
        stats["ws_connects"] += 1
        if sessions:
            stats["ws_reconnects"] += 1
        while True:
            while pending:
                m = pending.popleft()
                if m.get("type") == "error" and m.get("op") in ("auth", "subscribe"):
                    code = m.get("code", "error")
                    raise _Refused(
                        401
                        if m["op"] == "auth" and code != "forbidden"
                        else _REFUSAL_STATUS.get(code, 400),
                        code,
                        m.get("message", ""),
                    )
                if m.get("channel") == self.channel and m.get("type") in ("snapshot", "subscribed"):
                    served = True
                    if self.start_seq is None:
                        self.start_seq = m["seq"]
                items, resubscribe = self.tracker.handle(m)
                for item in items:
                    yield _Emit(item)
                if resubscribe:
                    stats["ws_resubscribes"] += 1
                    message = wire.message({"op": "subscribe", "channel": self.channel})
                    if (yield _Write(message)) is not None:
                        return served
            if wire.closed is not None:
                stats[f"ws_closed_{wire.closed[0] or 'eof'}"] += 1
                return served
            got = yield from self._receive(wire, pending, self.idle_timeout_s)
            if not got:
                return served

    def _nonce(
        self, wire: _Wire, pending: collections.deque[dict], deadline: float
    ) -> Generator[_Step, Any, str | None]:
        """The connection's challenge, from the server's first message (`hello`); None if it
        does not come by `deadline`. The message stays in `pending` (no channel reads it)."""
        while True:
            for m in pending:
                if m.get("type") == "hello" and isinstance(m.get("nonce"), str):
                    return m["nonce"]
            remaining = deadline - time.monotonic()
            if wire.closed is not None or remaining <= 0:
                return None
            if not (yield from self._receive(wire, pending, remaining)):
                return None

    def _receive(
        self, wire: _Wire, pending: collections.deque[dict], timeout_s: float
    ) -> Generator[_Step, Any, bool]:
        """Read once into `pending`; False when the connection failed or went quiet."""
        data = yield _Read(max(0.001, timeout_s))
        if isinstance(data, BaseException):
            self.stats[
                "ws_idle_timeouts" if isinstance(data, TimeoutError) else "ws_transport_errors"
            ] += 1
            return False
        messages, reply = wire.receive(data)
        pending.extend(messages)
        return not reply or (yield _Write(reply)) is None


# ---------------------------------------------------------------------- the two drivers


def _host_port(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    tls = parts.scheme in ("https", "wss")
    return parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80), tls


class Subscription:
    """A subscription for blocking code: iterate it (`for book in sub: ...`); `close()` it, or
    use it as a context manager. `url` is the node serving it now (None between connections).
    Nothing is read from the node while the caller is busy: a caller that falls too far
    behind is cut by the node and the subscription starts again from a snapshot."""

    def __init__(self, stream: _Stream, ssl_context: ssl.SSLContext | None = None) -> None:
        self._stream = stream
        self._flow = stream.flow()
        self._ssl = ssl_context
        self._sock: socket.socket | None = None
        self._answer: Any = None
        self._ready: collections.deque[Any] = collections.deque()  # items wait_subscribed took
        self._done = False

    @property
    def url(self) -> str | None:
        return self._stream.url

    def wait_subscribed(self) -> int:
        """Connect and subscribe now (the first `next()` does it too) -> the `seq` the channel
        starts at: every event after it will be yielded, or reported in a `Gap`."""
        while self._stream.start_seq is None:
            item = self._drive(lambda: self._stream.start_seq is not None)
            if item is not None:
                self._ready.append(item)
        return self._stream.start_seq

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Any:
        if self._ready:
            return self._ready.popleft()
        return self._drive(lambda: False)

    def _drive(self, stop: Any) -> Any:
        """Perform steps until the flow hands out an item (returned) or `stop()` (None)."""
        if self._done:
            raise StopIteration
        try:
            while not stop():
                step = self._flow.send(self._answer)
                self._answer = None
                if isinstance(step, _Emit):
                    return step.item
                self._answer = self._perform(step)
            return None
        except BaseException:
            self.close()
            raise

    def _open_socket(self, host: str, port: int, timeout_s: float) -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout_s)

    def _perform(self, step: _Step) -> Any:
        if isinstance(step, _Sleep):
            time.sleep(max(0.0, step.seconds))
            return None
        if isinstance(step, _Close):
            self._close_socket()
            return None
        try:
            if isinstance(step, _Open):
                self._close_socket()
                host, port, tls = _host_port(step.url)
                sock = self._open_socket(host, port, step.timeout_s)
                if tls:
                    sock = (self._ssl or ssl.create_default_context()).wrap_socket(
                        sock, server_hostname=host
                    )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sock = sock
                return None
            if self._sock is None:
                return ConnectionError("not connected")
            if isinstance(step, _Write):
                self._sock.settimeout(self._stream.connect_timeout_s)
                self._sock.sendall(step.data)
                return None
            assert isinstance(step, _Read)
            self._sock.settimeout(step.timeout_s)
            return self._sock.recv(READ_BYTES)
        except OSError as exc:  # socket.timeout is TimeoutError; ssl errors are OSErrors
            return exc

    def _close_socket(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._done = True
        self._flow.close()
        self._close_socket()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscription:
    """A subscription for async code (trio or asyncio, through anyio): `async for book in
    sub`; `await sub.aclose()`, or `async with`. Cancelling a wait for the next item is safe:
    the next call picks up where it stopped (a cancelled write costs a reconnection)."""

    def __init__(self, stream: _Stream, ssl_context: ssl.SSLContext | None = None) -> None:
        self._stream = stream
        self._flow = stream.flow()
        self._ssl = ssl_context
        self._conn: ByteStream | None = None
        self._answer: Any = None
        self._redo: _Step | None = None  # a read or sleep that a cancellation interrupted
        self._ready: collections.deque[Any] = collections.deque()  # items wait_subscribed took
        self._done = False

    @property
    def url(self) -> str | None:
        return self._stream.url

    async def wait_subscribed(self) -> int:
        """Connect and subscribe now (the first `__anext__` does it too) -> the `seq` the
        channel starts at: every event after it will be yielded, or reported in a `Gap`."""
        while self._stream.start_seq is None:
            item = await self._drive(lambda: self._stream.start_seq is not None)
            if item is not None:
                self._ready.append(item)
        return self._stream.start_seq

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Any:
        if self._ready:
            return self._ready.popleft()
        return await self._drive(lambda: False)

    async def _drive(self, stop: Any) -> Any:
        """Perform steps until the flow hands out an item (returned) or `stop()` (None)."""
        if self._done:
            raise StopAsyncIteration
        try:
            if self._redo is not None:
                step, self._redo = self._redo, None
                self._answer = await self._perform(step)
            while not stop():
                step = self._flow.send(self._answer)
                self._answer = None
                if isinstance(step, _Emit):
                    return step.item
                self._answer = await self._perform(step)
            return None
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException:
            await self.aclose()
            raise

    async def _perform(self, step: _Step) -> Any:
        try:
            return await self._perform_io(step)
        except anyio.get_cancelled_exc_class():
            if isinstance(step, (_Read, _Sleep)):
                self._redo = step  # nothing was consumed: do it again next time
            else:  # the connection is in an unknown state: the flow will reconnect
                await self._close_conn()
                self._answer = ConnectionError("interrupted")
            raise

    async def _perform_io(self, step: _Step) -> Any:
        if isinstance(step, _Sleep):
            await anyio.sleep(max(0.0, step.seconds))
            return None
        if isinstance(step, _Close):
            await self._close_conn()
            return None
        try:
            if isinstance(step, _Open):
                await self._close_conn()
                host, port, tls = _host_port(step.url)
                with anyio.fail_after(step.timeout_s):
                    self._conn = await anyio.connect_tcp(
                        host,
                        port,
                        tls=tls,
                        ssl_context=self._ssl if tls else None,
                        tls_standard_compatible=False,
                    )
                return None
            if self._conn is None:
                return ConnectionError("not connected")
            if isinstance(step, _Write):
                with anyio.fail_after(self._stream.connect_timeout_s):
                    await self._conn.send(step.data)
                return None
            assert isinstance(step, _Read)
            with anyio.move_on_after(step.timeout_s):
                try:
                    return await self._conn.receive(READ_BYTES)
                except anyio.EndOfStream:
                    return b""
            return TimeoutError("nothing received")
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            return exc  # TimeoutError (fail_after) and ssl.SSLError are OSErrors

    async def _close_conn(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(
                    OSError, anyio.BrokenResourceError, anyio.ClosedResourceError
                ):
                    await conn.aclose()

    async def aclose(self) -> None:
        self._done = True
        self._flow.close()
        await self._close_conn()

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
