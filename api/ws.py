"""Market data and order entry over one WebSocket, `/v1/ws` (docs/reference/websocket.md).

JSON text frames. Channels: `book:<market>` (a snapshot, then one delta per `book` event),
`trades:<market>` (every trade), `orders` (the authenticated account's order and fill events).
Order entry (`place`, `cancel`, `amend`, `cancel_all`) answers each request id with the REST
outcome: the same status, body and error codes.

How a subscription stays gap-free: the connection registers with the node's committed-event
feed *before* it reads the applied state (snapshot and its `seq`, both under the machine's
lock), and nothing awaits in between. Every event applied after that read reaches the feed
afterwards; events applied before it may still be in flight, and are dropped by `seq`. Each
channel message carries `prev_seq` (the `seq` of that channel's previous message, or of its
snapshot/acknowledgement), so a client can check the chain; the server never skips a message,
it disconnects a slow consumer instead (`slow_consumer`, close code 1008).

One outbox per connection, drained by one writer task: everything the client gets (feed,
responses, heartbeats, errors) goes through it in order, and it is bounded in bytes.

The first message of every connection is `hello` with a fresh random `nonce`; the `auth` op
signs it, so a signed auth frame opens only the connection it was made for: captured, it is
worth nothing on another connection, to this node or any other.

The route is served on ASGI directly (`register` puts it in front of the Quart app), not
through Quart's WebSocket wrapper: Quart relays every received frame through a task and a
channel of its own, and the node's leader spent a sixth of its CPU per WebSocket order on
that layer (docs/adr/0012-cost-per-order.md). Nothing of Quart's request context is used here.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
from collections.abc import Awaitable, Mapping
from typing import Annotated, Any

import msgspec
import trio
from quart_trio import QuartTrio

from . import bodies, outcomes
from .auth import KEY_HEADER, SIG_HEADER, TS_HEADER, AuthError, Credentials, Verifier
from .bodies import BodyError
from .common import rate_limited_body
from .port import NodeError, NodePort, Subscription
from .rate_limit import RateLimiter
from .sdk.codec import dumps, loads
from .trading import batch_orders, command_outcome, place_batch

PATH = "/v1/ws"
log = logging.getLogger(__name__)
# The signed message of the `auth` op: "{timestamp}\nWS\n/v1/ws\n{nonce}" (api.auth.sign with
# the connection's nonce, from its `hello`, as the body).
AUTH_METHOD = "WS"
CLOSE_WAIT_S = 5.0  # after the server's close frame, how long the client has to answer it
NONCE_BYTES = 16

CLOSE_POLICY = 1008  # slow consumer, too many bad messages
CLOSE_RESTART = 1012  # the node's state jumped (it installed a Raft snapshot): resubscribe
# op -> REST status; place_batch is POST /v1/orders/batch over the socket.
ORDER_OPS = {"place": 201, "cancel": 200, "amend": 200, "cancel_all": 200, "place_batch": 200}
ORDER_EVENTS = ("accepted", "cancelled", "amended", "filled")
# Left out of the public trades channel: who traded, and what they paid.
PRIVATE_TRADE_FIELDS = ("maker_account", "taker_account", "maker_fee", "taker_fee")
MAX_CHANNELS = 256
MAX_REQUEST_ID = 64
# `QB_WS_HEARTBEAT_S=0.2` overrides `heartbeat_s`, and so on (Settings.from_env).
ENV_PREFIX = "QB_WS_"


class Settings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Per-connection bounds: the node config's `[ws]` table (docs/reference/config.md), which
    takes its defaults from here. `QB_WS_<KEY>` environment variables override it (from_env)."""

    heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0  # a heartbeat every this many s
    # The outbox: the feed waits above it; replies fail above twice this.
    max_queue_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1 << 20
    # Commands the feed may lag behind (more than a Raft batch); then the connection is cut.
    feed_buffer: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 << 10  # largest frame we parse
    # Order requests awaiting their outcome; beyond it, reading pauses.
    max_inflight: Annotated[int, msgspec.Meta(ge=1)] = 1_000
    # Bad messages within error_window_s before the connection is closed.
    error_budget: Annotated[int, msgspec.Meta(ge=1)] = 50
    error_window_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] = os.environ, base: Settings | None = None
    ) -> Settings:
        """`base` (the defaults if None) with each key that has a `QB_WS_<KEY>` variable (upper
        case) set to its value; msgspec.ValidationError, located at the key, if one is bad."""
        given = {
            key: env[ENV_PREFIX + key.upper()]
            for key in cls.__struct_fields__
            if ENV_PREFIX + key.upper() in env
        }
        if not given:
            return cls() if base is None else base
        current = msgspec.to_builtins(cls() if base is None else base)
        return msgspec.convert({**current, **given}, cls, strict=False)


class _Close:
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class _Outbox:
    """FIFO of encoded frames, bounded in bytes (frames are ASCII JSON: chars == bytes).

    The feed waits for room (`room()`), so a burst waits in the node subscription, whose
    buffer is the real lag bound; replies, snapshots and heartbeats are put at once, up to
    twice the limit.
    """

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[str | _Close] = collections.deque()
        self._limit = limit
        self._wakeup = trio.Event()
        self._space = trio.Event()
        self.size = 0

    def put(self, text: str) -> bool:
        """False when the frame does not fit (one frame always fits an empty outbox)."""
        if self._items and self.size + len(text) > 2 * self._limit:
            return False
        self._items.append(text)
        self.size += len(text)
        self._wakeup.set()
        return True

    async def room(self) -> None:
        while self.size >= self._limit:
            self._space = trio.Event()
            await self._space.wait()

    def replace_all(self, *items: str | _Close) -> None:
        self._items.clear()
        self._items.extend(items)
        self.size = sum(len(i) for i in items if isinstance(i, str))
        self._wakeup.set()
        self._space.set()

    async def get(self) -> str | _Close:
        while not self._items:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        item = self._items.popleft()
        if isinstance(item, str):
            self.size -= len(item)
            if self.size < self._limit:
                self._space.set()
        return item


def _encode(message: dict) -> str:
    return dumps(message).decode()


def _valid_request_id(value: object) -> bool:
    if type(value) is int:
        return -(1 << 63) <= value < (1 << 63)
    return isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID


def _channel(value: object) -> tuple[str, str | None] | None:
    """("book"|"trades"|"orders", market) for a well-formed channel name."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    if value == "orders":
        return "orders", None
    kind, _, market = value.partition(":")
    if kind in ("book", "trades") and market:
        return kind, market
    return None


class _Connection:
    def __init__(
        self,
        ws: Any,
        node: NodePort,
        verifier: Verifier,
        settings: Settings,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.ws = ws
        self.limiter = limiter  # order entry shares the key's REST token bucket
        self.node = node
        self.verifier = verifier
        self.settings = settings
        self.outbox = _Outbox(settings.max_queue_bytes)
        self.creds: Credentials | None = None
        # channel -> seq of the last message sent on it (its snapshot/ack seq at first)
        self.channels: dict[str, int] = {}
        self.sub: Subscription | None = None
        self.feed_pos = 0  # every channel is complete through this seq (once subscribed)
        self.closing = False
        self.errors: collections.deque[float] = collections.deque()
        self.inflight = trio.Semaphore(settings.max_inflight)
        self.nursery: trio.Nursery | None = None
        # The challenge an `auth` must sign: this connection's alone, and spent once it
        # authenticates (a second `auth` is refused anyway: already_authenticated).
        self.nonce: str | None = secrets.token_hex(NONCE_BYTES)

    # -------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        await self.ws.accept()
        self.send({"type": "hello", "nonce": self.nonce, "seq": self.position()})
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._heartbeat_loop)
                await self._read_loop()
        finally:
            if self.sub is not None:
                self.sub.close()

    async def _write_loop(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, _Close):
                await self.ws.close(item.code, item.reason)
                # The closing handshake (RFC 6455, 7.1.1): the client answers with a close
                # frame of its own, and the read loop ends the connection when it arrives.
                # Ending it at once made the server drop the TCP connection under the client's
                # answer (a reset, and the client could lose what it had not read yet).
                await trio.sleep(CLOSE_WAIT_S)  # a client that never answers
                assert self.nursery is not None
                self.nursery.cancel_scope.cancel()
                return
            # Hypercorn shields the socket write: a peer that never reads blocks here (see doc).
            await self.ws.send(item)

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.heartbeat_s)
            self.send({"type": "heartbeat", "seq": self.position()})

    def position(self) -> int:
        """A seq through which every subscribed channel's messages have been queued."""
        if self.sub is not None:
            return self.feed_pos
        return self.node.applied_seq()

    def send(self, message: dict) -> None:
        if self.closing:
            return
        if not self.outbox.put(_encode(message)):
            self.fail(
                "slow_consumer", "the client reads too slowly; resubscribe after reconnecting"
            )

    def fail(self, code: str, message: str, close_code: int = CLOSE_POLICY) -> None:
        """Drop what is queued, tell the client why and close (the writer does it in order)."""
        if self.closing:
            return
        self.closing = True
        if self.sub is not None:
            self.sub.close()
        frame = {"type": "error", "code": code, "message": message, "seq": self.position()}
        self.outbox.replace_all(_encode(frame), _Close(close_code, code))

    def error(self, code: str, message: str, **extra: Any) -> None:
        """A bad message: answer it; close the connection if they keep coming."""
        self.send(
            {"type": "error", "code": code, "message": message, **extra, "seq": self.position()}
        )
        now = trio.current_time()
        self.errors.append(now)
        while self.errors and self.errors[0] < now - self.settings.error_window_s:
            self.errors.popleft()
        if len(self.errors) > self.settings.error_budget:
            self.fail("too_many_errors", "too many bad messages; closing")

    # -------------------------------------------------------------- client messages

    async def _read_loop(self) -> None:
        while True:
            raw = await self.ws.receive()  # raises _ClientGone once the client closed
            if self.closing:
                continue  # nothing more is answered; waiting for the client's close
            if not isinstance(raw, str):
                self.error("bad_frame", "send JSON text frames")
                continue
            if len(raw) > self.settings.max_message_bytes:
                self.error(
                    "message_too_large",
                    f"messages are at most {self.settings.max_message_bytes} bytes",
                )
                continue
            try:
                msg = loads(raw)
            except (ValueError, RecursionError):
                self.error("malformed_json", "message is not valid JSON")
                continue
            if not isinstance(msg, dict):
                self.error("bad_request", 'a message is a JSON object with an "op"')
                continue
            await self._dispatch(msg)

    async def _dispatch(self, msg: dict) -> None:
        op = msg.get("op")
        if not isinstance(op, str):
            op = None
        if op in ORDER_OPS:
            request_id = msg.get("request_id")
            if not _valid_request_id(request_id):
                self.error(
                    "bad_request_id",
                    f"order requests need a request_id: a string of 1-{MAX_REQUEST_ID} "
                    "characters or an integer",
                    op=op,
                )
                return
            await self.inflight.acquire()  # back-pressure: stop reading while too many are out
            assert self.nursery is not None
            self.nursery.start_soon(self._order, op, request_id, msg)
        elif op in ("subscribe", "unsubscribe"):
            channel = msg.get("channel")
            parsed = _channel(channel)
            if parsed is None:
                self.error(
                    "bad_channel",
                    'channel must be "book:<market>", "trades:<market>" or "orders"',
                    op=op,
                )
            elif op == "subscribe":
                self._subscribe(channel, *parsed)
            else:
                self._unsubscribe(channel)
        elif op == "auth":
            self._auth(msg)
        elif op == "ping":
            pong: dict[str, Any] = {"type": "pong", "seq": self.position()}
            if "request_id" in msg:
                pong["request_id"] = msg["request_id"]
            self.send(pong)
        else:
            self.error(
                "unknown_op",
                "op must be one of subscribe, unsubscribe, auth, ping, "
                "place, cancel, amend, cancel_all",
            )

    def _auth(self, msg: dict) -> None:
        if self.creds is not None:
            self.error(
                "already_authenticated", "this connection is already authenticated", op="auth"
            )
            return
        key_id, ts, signature = msg.get("key_id"), msg.get("timestamp"), msg.get("signature")
        if type(ts) is int:
            ts = str(ts)
        if not all(isinstance(v, str) for v in (key_id, ts, signature)):
            self.error(
                "bad_request", "auth needs key_id, timestamp (Unix ms) and signature", op="auth"
            )
            return
        headers = {KEY_HEADER: key_id, TS_HEADER: ts, SIG_HEADER: signature}
        assert self.nonce is not None  # spent only by a success, after which we return above
        try:
            creds = self.verifier.verify(headers, AUTH_METHOD, PATH, self.nonce.encode())
        except AuthError as exc:
            self.error(exc.code, exc.message, op="auth")
            return
        self.creds = creds
        self.nonce = None
        self.send(
            {
                "type": "authenticated",
                "key_id": creds.key_id,
                "account": creds.account,
                "role": creds.role,
                "seq": self.position(),
            }
        )

    # -------------------------------------------------------------- channels

    def _subscribe(self, channel: str, kind: str, market: str | None) -> None:
        if kind == "orders" and (self.creds is None or not self.creds.account):
            code = "unauthenticated" if self.creds is None else "forbidden"
            self.error(
                code,
                "the orders channel needs an authenticated trader key",
                op="subscribe",
                channel=channel,
            )
            return
        if channel not in self.channels and len(self.channels) >= MAX_CHANNELS:
            self.error(
                "too_many_channels",
                f"at most {MAX_CHANNELS} channels per connection",
                op="subscribe",
                channel=channel,
            )
            return
        # Feed first, state second, no await in between: nothing falls in the gap.
        if self.sub is None:
            self.sub = self.node.subscribe(self.settings.feed_buffer)
            assert self.nursery is not None
            self.nursery.start_soon(self._feed_loop, self.sub)
            fresh = True
        else:
            fresh = False

        def query(ex: Any) -> tuple[int, Any]:
            if market is not None and market not in {m["market"] for m in ex.markets()}:
                return ex.seq, None
            if kind == "book":
                return ex.seq, (ex.book_levels(market, "buy"), ex.book_levels(market, "sell"))
            return ex.seq, True

        seq, found = self.node.read(query)
        if fresh:
            self.feed_pos = seq
        if found is None:
            self.error(
                "unknown_market", f"unknown market {market!r}", op="subscribe", channel=channel
            )
            return
        self.channels[channel] = seq  # a resubscription restarts the channel here
        if kind == "book":
            bids, asks = found
            self.send(
                {
                    "type": "snapshot",
                    "channel": channel,
                    "seq": seq,
                    "bids": [list(level) for level in bids],
                    "asks": [list(level) for level in asks],
                }
            )
        else:
            self.send({"type": "subscribed", "channel": channel, "seq": seq})

    def _unsubscribe(self, channel: str) -> None:
        if self.channels.pop(channel, None) is None:
            self.error(
                "not_subscribed",
                "not subscribed to this channel",
                op="unsubscribe",
                channel=channel,
            )
            return
        self.send({"type": "unsubscribed", "channel": channel, "seq": self.position()})

    async def _feed_loop(self, sub: Subscription) -> None:
        while not sub.overflowed:
            try:
                events = await sub.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                break
            await self.outbox.room()  # back-pressure: a burst waits in the subscription
            if self.closing:
                break
            self._route(events)
        if sub.overflowed:
            self.fail(
                "slow_consumer",
                "the client fell too far behind the feed; resubscribe after reconnecting",
            )

    def _route(self, events: list[dict]) -> None:
        """One applied command's events to the subscribed channels (trio thread, no await)."""
        first = events[0]["seq"]
        if first > self.feed_pos + 1:
            # Every command has events and the feed hands over every applied command in order,
            # so its seqs are contiguous from the first read on; a jump means the node
            # restored a snapshot under us, and no channel can be continued.
            self.fail(
                "resync",
                f"this node's state jumped from seq {self.feed_pos} to "
                f"{first - 1} (it installed a snapshot); reconnect and resubscribe",
                CLOSE_RESTART,
            )
            return
        channels = self.channels
        account = self.creds.account if self.creds is not None else None
        mine = account is not None and "orders" in channels
        for event in events:
            kind = event["type"]
            if kind == "book":
                channel = "book:" + event["market"]
                if channel in channels:
                    self._emit(
                        channel,
                        event,
                        {
                            "type": "delta",
                            "channel": channel,
                            "seq": event["seq"],
                            "side": event["side"],
                            "price": event["price"],
                            "level_qty": event["level_qty"],
                            "ts": event["ts"],
                        },
                    )
            elif kind == "trade":
                channel = "trades:" + event["market"]
                if channel in channels:
                    public = {k: v for k, v in event.items() if k not in PRIVATE_TRADE_FIELDS}
                    self._emit(channel, event, {**public, "channel": channel})
                if mine and account in (event["maker_account"], event["taker_account"]):
                    self._emit("orders", event, {**event, "channel": "orders"})
            elif mine and kind in ORDER_EVENTS and event.get("account") == account:
                self._emit("orders", event, {**event, "channel": "orders"})
        if events[-1]["seq"] > self.feed_pos:
            self.feed_pos = events[-1]["seq"]

    def _emit(self, channel: str, event: dict, message: dict) -> None:
        last = self.channels[channel]
        seq = event["seq"]
        if seq <= last:  # applied before this channel's snapshot: already in it
            return
        message["prev_seq"] = last
        self.channels[channel] = seq
        self.send(message)

    # -------------------------------------------------------------- order entry

    async def _order(self, op: str, request_id: str | int, msg: dict) -> None:
        try:
            status, body = await self._execute(op, msg)
        finally:
            self.inflight.release()
        if "seq" not in body:
            body["seq"] = self.node.applied_seq()
        # Like one result of POST /v1/orders/batch: the REST status and the REST body.
        self.send(
            {"type": "response", "request_id": request_id, "op": op, "http_status": status, **body}
        )

    async def _execute(self, op: str, msg: dict) -> tuple[int, dict]:
        """(REST status, REST body: the order summary or {"error": ...}) for one request."""
        creds = self.creds
        if creds is None:
            return 401, _err("unauthenticated", "authenticate first (op auth)")
        if creds.role != "trader" or not creds.account:
            return 403, _err("forbidden", "order entry needs a trader key")
        if self.limiter is not None:
            retry_after_s = self.limiter.check(creds.key_id, creds.role)
            if retry_after_s is not None:
                return 429, rate_limited_body(retry_after_s)
        order = {k: v for k, v in msg.items() if k not in ("op", "request_id")}
        if op == "place_batch":
            return await self._place_batch(creds, order)
        for name in bodies.RESERVED_FIELDS:
            if name in order:
                return 400, _err("field_not_allowed", f"field {name!r} is set by the server")
        command = {"op": op, **order, "account": creds.account}
        if not self.node.is_leader():
            return self._not_leader(self.node.leader_url())
        early = self.node.precheck(command)  # refused in any state: never logged
        if early is not None:
            events = [early]
        else:
            events, refusal = await self._submitted(self.node.submit(command))
            if refusal is not None:
                return refusal
        # Only what this account may see, as the REST route answers it.
        status, body = command_outcome(events, creds.account)
        return (ORDER_OPS[op] if status == 200 else status), body

    async def _place_batch(self, creds: Credentials, payload: dict) -> tuple[int, dict]:
        try:
            orders = batch_orders(payload)
        except BodyError as exc:
            return exc.status, _err(exc.code, exc.message)
        if not self.node.is_leader():
            return self._not_leader(self.node.leader_url())
        results, refusal = await self._submitted(place_batch(self.node, creds.account, orders))
        return refusal if refusal is not None else (200, {"results": results})

    async def _submitted(self, pending: Awaitable[Any]) -> tuple[Any, tuple[int, dict] | None]:
        """(result, None) once `pending` (a submit) is done, or (None, (status, body)) for
        what the node answers instead, as every REST route answers it (api/outcomes.py)."""
        try:
            return await pending, None
        except (NodeError, AuthError) as exc:
            answer = outcomes.answer(exc, self.node.leader_url())
            return None, (answer.status, answer.body())

    @staticmethod
    def _not_leader(url: str | None) -> tuple[int, dict]:
        answer = outcomes.not_leader(url)
        return answer.status, answer.body()


def _err(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def register(
    app: QuartTrio,
    node: NodePort,
    verifier: Verifier,
    settings: Settings | None = None,
    limiter: RateLimiter | None = None,
) -> None:
    settings = Settings.from_env() if settings is None else settings

    quart_app = app.asgi_app

    async def asgi_app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket" or scope["path"] != PATH:
            await quart_app(scope, receive, send)
            return
        conn = _Connection(_AsgiWebsocket(receive, send), node, verifier, settings, limiter)
        # The connection's nursery wraps what its tasks raised. Cancellation (the server
        # stopping) goes through untouched: trio.Cancelled is not an Exception.
        try:
            await conn.run()
        except* _ClientGone:
            pass
        except* Exception as failed:
            # Hypercorn then closes the connection with 1011 (internal error).
            log.error("WebSocket connection failed", exc_info=failed)

    app.asgi_app = asgi_app  # type: ignore[method-assign]  # Quart's way to add ASGI middleware


class _ClientGone(Exception):
    """The client closed the connection or it dropped: the connection's tasks end."""


class _AsgiWebsocket:
    """The four calls `_Connection` makes, on the ASGI server's own receive and send."""

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive = receive
        self._send = send

    async def accept(self) -> None:
        await self._send({"type": "websocket.accept"})

    async def receive(self) -> str | bytes:
        while True:
            event = await self._receive()
            kind = event["type"]
            if kind == "websocket.receive":
                text = event.get("text")
                return text if text is not None else (event.get("bytes") or b"")
            if kind == "websocket.disconnect":
                raise _ClientGone
            # "websocket.connect" comes first; nothing else is defined

    async def send(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})
