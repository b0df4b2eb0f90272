"""Python client (SDK) for a quorumbook cluster.

`Client` (sync) and `AsyncClient` (async: asyncio or trio) know every node, find the leader,
follow `307` redirects (`X-Leader`), back off briefly while there is no leader, and retry a
request whose outcome is unknown. `AdminClient` is the operator's client (admin commands,
keys, membership). Imports nothing of ours but the wire format (`api.auth`'s signing).

Outcomes (STYLE.md 9, docs/reference/sdk.md):
- a returned value, or `ApiError` (a 4xx), is *definite*;
- `ClusterUnavailable` is definite too: no attempt can have been applied (nothing was sent, or
  every answer said "not applied": 307, `no_leader`, connection refused);
- `OutcomeUnknown` (a `ClusterUnavailable`) is *indefinite*: some attempt may have been applied
  and the deadline passed before a retry settled it.

A place always carries a `client_order_id` (generated when the caller gives none), so every
resend is idempotent: the state machine answers a resend of an applied order with `409
duplicate_client_order_id`, and the client then returns that order's outcome from
`GET /v1/orders/by-client-id/<coid>` instead of raising.

The retry logic is written once, as generators that yield what to send (`_Send`) or how long
to wait (`_Sleep`) and receive the answer (an `httpx.Response` or the transport exception);
`Client` and `AsyncClient` are the two thin drivers that do the I/O.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import anyio
import httpx

from .auth import KEY_HEADER, SIG_HEADER, TS_HEADER, Credentials, sign
from .jsoncodec import dumps, loads
from .subscription import (
    AsyncSubscription,
    Book,
    Gap,
    Subscription,
    _BookTracker,
    _EventTracker,
    _Stream,
)

__all__ = [
    "AdminClient",
    "ApiError",
    "AsyncClient",
    "AsyncSubscription",
    "Book",
    "Client",
    "ClusterUnavailable",
    "Gap",
    "OutcomeUnknown",
    "Subscription",
]

MAX_BATCH_ORDERS = 100  # the server's bound (api/trading.py); place_batch splits longer lists


class ClusterUnavailable(Exception):
    """Definite: no node answered as leader before the deadline; nothing was applied."""


class OutcomeUnknown(ClusterUnavailable):
    """Indefinite: an attempt may have been applied, and no retry settled it in time.

    Resend the same request (same `client_order_id`) later to settle it, or look it up with
    `order_by_client_id`.
    """


class ApiError(Exception):
    """A definite error answer (4xx): the request was not applied.

    `after_retry` is true when an earlier attempt of the same call had an unknown outcome:
    then `unknown_order` (cancel), `no_change` (amend) and `no_open_orders` (cancel_all) mean
    that the first attempt most likely took effect (docs/reference/sdk.md).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        order_id: int | None = None,
        *,
        after_retry: bool = False,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.order_id = order_id
        self.after_retry = after_retry


# ---------------------------------------------------------------------- signing


class _Signer:
    """Signs requests so that no two requests of this process ever share a signature.

    The server rejects a signature it has already seen inside its window (`401 replayed`).
    Two requests with the same key, method, path and body in the same millisecond (two reads
    from two threads, a fast resend) would sign identically, so the timestamp is bumped by a
    millisecond until the signature is new.
    """

    def __init__(self, window_ms: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._recent: dict[bytes, int] = {}
        self._window_ms = window_ms

    def headers(self, creds: Credentials, method: str, path: str, body: bytes) -> dict[str, str]:
        digest = hashlib.sha256(body).digest()
        now = time.time_ns() // 1_000_000
        with self._lock:
            ts = now
            while True:
                ident = hashlib.sha256(
                    f"{creds.key_id}\n{ts}\n{method}\n{path}\n".encode() + digest
                ).digest()
                if ident not in self._recent:
                    break
                ts += 1
            self._recent[ident] = now
            if len(self._recent) > 4096:
                cutoff = now - self._window_ms
                self._recent = {k: v for k, v in self._recent.items() if v >= cutoff}
        return {
            KEY_HEADER: creds.key_id,
            TS_HEADER: str(ts),
            SIG_HEADER: sign(creds.secret, ts, method, path, body),
        }


_SIGNER = _Signer()


# ---------------------------------------------------------------------- the shared logic


@dataclass
class _Send:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    timeout_s: float


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Reply:
    status: int
    body: Any
    url: str
    unknown_before: bool  # an earlier attempt of this call may have been applied


_Step = _Send | _Sleep
_Answer = httpx.Response | httpx.HTTPError | None
T = TypeVar("T")
_Flow = Generator[_Step, _Answer, T]

# Transport errors raised before any byte of the request can have reached the server.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


def tls_context(verify: Any) -> Any:
    """`verify=` as httpx takes it: True/False, an `ssl.SSLContext`, or a CA file path."""
    if isinstance(verify, (str, bytes)) or hasattr(verify, "__fspath__"):
        import ssl

        return ssl.create_default_context(cafile=verify)
    return verify


def _ssl_context(verify: Any) -> Any:
    """The `ssl.SSLContext` for WebSocket connections to https nodes (None: the default)."""
    context = tls_context(verify)
    if context is True:
        return None
    if context is False:
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _error_of(body: Any) -> dict:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return {}


def _api_error(reply: _Reply) -> ApiError:
    err = _error_of(reply.body)
    return ApiError(
        reply.status,
        err.get("code", "http_error"),
        err.get("message", ""),
        err.get("order_id"),
        after_retry=reply.unknown_before,
    )


def _path(*segments: str) -> str:
    """A URL path whose variable segments are percent-encoded (no '/' inside a segment)."""
    return "/".join(quote(s, safe="") for s in segments)


def _query(**params: Any) -> str:
    pairs = [f"{k}={quote(str(v), safe='')}" for k, v in params.items() if v is not None]
    return ("?" + "&".join(pairs)) if pairs else ""


def new_client_order_id() -> str:
    """A fresh client order id (16 hex characters after `sdk-`)."""
    return "sdk-" + secrets.token_hex(8)


def _check_client_order_id(coid: Any) -> None:
    # The outcome look-up puts the id in a URL path segment: a '/' could never be looked up.
    if (
        not isinstance(coid, str)
        or not 1 <= len(coid) <= 64
        or "/" in coid
        or coid != coid.strip(" ")
        or not all(" " <= ch <= "~" for ch in coid)
    ):
        raise ValueError(
            "client_order_id must be 1-64 printable ASCII characters, no '/', "
            "no space at either end"
        )


class _Core:
    """Leader tracking and the retry policy, shared by `Client` and `AsyncClient`."""

    def __init__(
        self,
        urls: list[str],
        creds: Credentials | None,
        *,
        timeout_s: float,
        deadline_s: float,
        backoff_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        if not urls:
            raise ValueError("give at least one node URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.creds = creds
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.leader: str | None = None
        # retries: attempts after the first; redirects: 307s followed; transport_errors;
        # busy: 503/429/5xx answers; replayed: 401 replayed (re-signed); unknown: attempts
        # with an unknown outcome; recovered: places settled by the outcome look-up.
        self.stats: collections.Counter[str] = collections.Counter()

    def _next_url(self, after: str | None) -> str:
        if after in self.urls:
            return self.urls[(self.urls.index(after) + 1) % len(self.urls)]
        return self.urls[0]

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        signed: bool = True,
        write: bool = False,
        leader_only: bool = True,
        deadline_s: float | None = None,
    ) -> _Flow[_Reply]:
        """Send until a node answers definitely (2xx/4xx); re-signed on every attempt.

        `path` is the path and query exactly as sent (already percent-encoded). The server
        verifies the signature over the *decoded* path and the raw query, so that is what is
        signed; for the paths this client builds the two differ only inside an encoded segment.
        """
        raw = dumps(body) if body is not None else b""
        signed_path = _signed_form(path)
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        url = self.leader or self.urls[0]
        unknown = False
        backoff = self.backoff_s
        attempts = 0
        redirects_in_row = 0
        while True:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            if signed:
                if self.creds is None:
                    raise ValueError("this route needs credentials")
                headers.update(_SIGNER.headers(self.creds, method, signed_path, raw))
            remaining = deadline - time.monotonic()
            if attempts:
                self.stats["retries"] += 1
            attempts += 1
            answer = yield _Send(
                method, url + path, headers, raw, max(0.05, min(self.timeout_s, remaining))
            )
            wait = True
            if not (isinstance(answer, httpx.Response) and answer.status_code == 307):
                redirects_in_row = 0
            if isinstance(answer, httpx.HTTPError):
                self.stats["transport_errors"] += 1
                if not isinstance(answer, _NOT_SENT) and write:
                    unknown = True
                    self.stats["unknown"] += 1
                if self.leader == url:
                    self.leader = None
                url = self._next_url(url)
            else:
                assert isinstance(answer, httpx.Response)
                try:
                    payload = loads(answer.content)
                except ValueError:
                    payload = None
                status = answer.status_code
                code = _error_of(payload).get("code")
                if status == 307 and answer.headers.get("X-Leader"):
                    self.stats["redirects"] += 1
                    target = answer.headers["X-Leader"].rstrip("/")
                    self.leader = target
                    # A leader that redirects to itself (its submit queue is full) is busy; nodes
                    # that point at each other (mid-election) are given time to agree.
                    redirects_in_row += 1
                    wait = target == url or redirects_in_row > len(self.urls)
                    url = target
                elif status == 401 and code == "replayed":
                    # This copy was not applied, but this client never sends a signature
                    # twice: another copy of the same attempt (duplicated on the way) reached
                    # the cluster first and may have been applied. Re-signed below.
                    self.stats["replayed"] += 1
                    if write:
                        unknown = True
                        self.stats["unknown"] += 1
                    wait = False
                elif status == 429:
                    self.stats["busy"] += 1  # rate limited: not applied; back off and resend
                elif status >= 500 or status == 307:
                    self.stats["busy"] += 1
                    if write and (code == "outcome_unknown" or status != 503):
                        unknown = True
                        self.stats["unknown"] += 1
                    if code == "no_leader" or status == 307:
                        if self.leader == url:
                            self.leader = None
                        url = self._next_url(url)
                else:
                    # Only a success proves leadership: a follower answers auth and body
                    # errors itself, before it would redirect.
                    if leader_only and status < 300:
                        self.leader = url
                    return _Reply(status, payload, url, unknown)
            now = time.monotonic()
            if now >= deadline:
                what = f"{method} {path.split('?')[0]}"
                if unknown:
                    raise OutcomeUnknown(
                        f"{what}: outcome unknown after {attempts} attempts; "
                        "resend it (same client_order_id) to settle it"
                    )
                raise ClusterUnavailable(
                    f"{what}: no leader answered within the deadline "
                    f"({attempts} attempts); not applied"
                )
            if wait:
                yield _Sleep(min(backoff, deadline - now))
                backoff = min(backoff * 2, self.backoff_max_s)

    # ------------------------------------------------------------------ operations

    def place(self, order: dict) -> _Flow[dict]:
        order = _with_client_order_id(order)
        reply = yield from self.request("POST", "/v1/orders", order, write=True)
        if reply.status < 300:
            return reply.body
        err = _error_of(reply.body)
        if (
            reply.status == 409
            and err.get("code") == "duplicate_client_order_id"
            and reply.unknown_before
        ):
            return (yield from self.recover(order["client_order_id"]))
        raise _api_error(reply)

    def recover(self, coid: str) -> _Flow[dict]:
        """The outcome of an order whose resend was a duplicate: the first copy was applied."""
        self.stats["recovered"] += 1
        found = yield from self.order_by_client_id(coid)
        if found.get("status") == "unknown":  # cannot happen after a 409; never guess
            raise OutcomeUnknown(f"client_order_id {coid!r} was a duplicate but is not known")
        return {**found, "recovered": True}

    def place_batch(self, orders: list[dict]) -> _Flow[list[dict]]:
        orders = [_with_client_order_id(o) for o in orders]
        results: list[dict] = [{} for _ in orders]
        for start in range(0, len(orders), MAX_BATCH_ORDERS):
            chunk = range(start, min(start + MAX_BATCH_ORDERS, len(orders)))
            yield from self._place_chunk(orders, list(chunk), results)
        return results

    def _place_chunk(
        self, orders: list[dict], pending: list[int], results: list[dict]
    ) -> _Flow[None]:
        maybe_applied: set[int] = set()
        deadline = time.monotonic() + self.deadline_s
        backoff = self.backoff_s
        while pending:
            try:
                reply = yield from self.request(
                    "POST",
                    "/v1/orders/batch",
                    {"orders": [orders[i] for i in pending]},
                    write=True,
                    deadline_s=max(0.1, deadline - time.monotonic()),
                )
            except OutcomeUnknown:
                maybe_applied.update(pending)
                break
            except ClusterUnavailable:
                break
            if reply.unknown_before:
                maybe_applied.update(pending)
            if reply.status >= 300:
                raise _api_error(reply)
            retry = []
            for i, item in zip(pending, reply.body["results"], strict=True):
                code = _error_of(item).get("code")
                if item.get("status") == 503:
                    if code != "not_leader":
                        maybe_applied.add(i)
                    retry.append(i)
                elif code == "duplicate_client_order_id" and i in maybe_applied:
                    results[i] = yield from self.recover(orders[i]["client_order_id"])
                else:
                    results[i] = item
            pending = retry
            if pending:
                now = time.monotonic()
                if now >= deadline:
                    break
                yield _Sleep(min(backoff, deadline - now))
                backoff = min(backoff * 2, self.backoff_max_s)
        for i in pending:
            code = "outcome_unknown" if i in maybe_applied else "cluster_unavailable"
            results[i] = {
                "status": 503,
                "client_order_id": orders[i]["client_order_id"],
                "error": {"code": code, "message": "no outcome before the deadline"},
            }

    def command(self, path: str, body: dict) -> _Flow[dict]:
        """cancel / amend / cancel_all: resent after an unknown attempt; a result or error
        after such a resend says so (`after_retry`), see docs/reference/sdk.md."""
        reply = yield from self.request("POST", path, body, write=True)
        if reply.status >= 300:
            raise _api_error(reply)
        if reply.unknown_before:
            return {**reply.body, "after_retry": True}
        return reply.body

    def get(
        self, path: str, *, signed: bool = True, leader_only: bool = True, key: str | None = None
    ) -> _Flow[Any]:
        reply = yield from self.request("GET", path, signed=signed, leader_only=leader_only)
        if reply.status >= 300:
            raise _api_error(reply)
        return reply.body if key is None else reply.body[key]

    def balances(self) -> _Flow[dict[str, dict]]:
        body = yield from self.get("/v1/accounts/me/balances")
        return {
            row["asset"]: {"available": row["available"], "reserved": row["reserved"]}
            for row in body["balances"]
        }

    def order_by_client_id(self, coid: str) -> _Flow[dict]:
        _check_client_order_id(coid)
        return (yield from self.get("/v1/orders/by-client-id/" + _path(coid)))


def _signed_form(path: str) -> str:
    """What the server verifies: the percent-decoded path and the query as sent."""
    route, sep, query = path.partition("?")
    return unquote(route) + (sep + query if query else "")


def _with_client_order_id(order: dict) -> dict:
    if not isinstance(order, dict):
        raise TypeError("an order is a dict")
    order = {k: v for k, v in order.items() if v is not None}
    if "client_order_id" not in order:
        order["client_order_id"] = new_client_order_id()
    _check_client_order_id(order["client_order_id"])
    return order


def _drop_none(**fields: Any) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


class _Api:
    """The public methods. Each builds a flow and hands it to the driver's `_run`: in `Client`
    that returns the value, in `AsyncClient` it returns a coroutine to await."""

    _core: _Core

    def _run(self, flow: _Flow[Any]) -> Any:
        raise NotImplementedError

    @property
    def leader(self) -> str | None:
        """The URL of the node that last answered as leader (None before the first call)."""
        return self._core.leader

    @property
    def stats(self) -> collections.Counter[str]:
        """Counters: retries (attempts after the first), redirects (307), transport_errors,
        busy (503/429), replayed (401 replayed, re-signed), unknown (attempts whose outcome was
        unknown), recovered (places settled by the outcome look-up); subscriptions:
        ws_connects, ws_reconnects, ws_resnapshots (book snapshots after the first),
        ws_seq_gaps (prev_seq breaks), ws_gaps (`Gap`s handed out), ws_duplicates (events
        dropped as already delivered), ws_idle_timeouts, ws_connect_errors,
        ws_transport_errors, ws_closed_<code> (closes by the node, ws_closed_eof for none)."""
        return self._core.stats

    def place(
        self,
        market: str,
        side: str,
        type: str,
        qty: int,
        price: int | None = None,
        tif: str | None = None,
        client_order_id: str | None = None,
        stp: str | None = None,
    ) -> Any:
        """Place one order -> `{order_id, client_order_id, status, filled_qty, trades, ...}`.

        Without `client_order_id` one is generated, so a retry never trades twice. When a
        resend found the first attempt applied, the result is the outcome look-up's
        `{order_id, client_order_id, status: "open"|"done", ..., "recovered": True}`.
        """
        return self._run(
            self._core.place(
                _drop_none(
                    market=market,
                    side=side,
                    type=type,
                    qty=qty,
                    price=price,
                    tif=tif,
                    client_order_id=client_order_id,
                    stp=stp,
                )
            )
        )

    def place_batch(self, orders: list[dict]) -> Any:
        """Place many orders (split into requests of at most 100) -> one result per order.

        A result without `error` is what `place` returns for that order. One with `error` is
        a definite rejection `{status: 4xx, error: {code, message}}` or, when the deadline
        passed first, `{status: 503, error: {code: "outcome_unknown"|"cluster_unavailable"}}`
        (indefinite / definitely not applied).
        """
        return self._run(self._core.place_batch(orders))

    def cancel(
        self, market: str, order_id: int | None = None, client_order_id: str | None = None
    ) -> Any:
        """Cancel one order (by id or client order id) -> `{events, seq}`."""
        return self._run(
            self._core.command(
                "/v1/orders/cancel",
                _drop_none(market=market, order_id=order_id, client_order_id=client_order_id),
            )
        )

    def amend(
        self,
        market: str,
        order_id: int | None = None,
        *,
        price: int | None = None,
        qty: int | None = None,
        client_order_id: str | None = None,
    ) -> Any:
        """Set a new price and/or remaining qty -> `{order_id, status, ...}`."""
        return self._run(
            self._core.command(
                "/v1/orders/amend",
                _drop_none(
                    market=market,
                    order_id=order_id,
                    client_order_id=client_order_id,
                    price=price,
                    qty=qty,
                ),
            )
        )

    def cancel_all(self, market: str | None = None) -> Any:
        """Cancel every open order of the caller (in one market) -> `{events, seq}`."""
        return self._run(self._core.command("/v1/orders/cancel-all", _drop_none(market=market)))

    def order(self, order_id: int) -> Any:
        """The open order `{status: "open", ...}`; `ApiError(404, "unknown_order")` if not open."""
        return self._run(self._core.get(f"/v1/orders/{int(order_id)}"))

    def order_by_client_id(self, client_order_id: str) -> Any:
        """The outcome look-up: `{status: "open", ...}`, `{status: "done", order_id}` or
        `{status: "unknown"}` (never accepted)."""
        return self._run(self._core.order_by_client_id(client_order_id))

    def open_orders(self, market: str | None = None) -> Any:
        """The caller's open orders, book by book in priority order (a list of dicts)."""
        return self._run(self._core.get("/v1/orders" + _query(market=market), key="orders"))

    def balances(self) -> Any:
        """`{asset: {"available": int, "reserved": int}}` of the caller's account."""
        return self._run(self._core.balances())

    def markets(self) -> Any:
        """Every market with its parameters (a list of dicts)."""
        return self._run(self._core.get("/v1/markets", signed=False, key="markets"))

    def book(self, market: str, depth: int = 50, consistency: str = "linearizable") -> Any:
        """`{market, seq, bids: [[price, qty]], asks}`; `consistency="stale"` reads any node."""
        if consistency not in ("linearizable", "stale"):
            raise ValueError("consistency must be 'linearizable' or 'stale'")
        stale = consistency == "stale"
        path = f"/v1/markets/{_path(market)}/book" + _query(
            depth=depth, consistency="stale" if stale else None
        )
        return self._run(self._core.get(path, signed=False, leader_only=not stale))

    def trades(self, market: str, limit: int = 100) -> Any:
        """The market's recent trades, oldest first (a list of dicts)."""
        path = f"/v1/markets/{_path(market)}/trades" + _query(limit=limit)
        return self._run(self._core.get(path, signed=False, key="trades"))

    # ------------------------------------------------------------------ WebSocket subscriptions

    def _subscription(self, stream: _Stream) -> Any:
        raise NotImplementedError

    def _stream(
        self,
        channel: str,
        tracker: Any,
        creds: Credentials | None,
        idle_timeout_s: float,
        max_outage_s: float | None,
    ) -> Any:
        core = self._core
        return self._subscription(
            _Stream(
                core.urls,
                channel,
                tracker,
                creds,
                lambda c, nonce: _SIGNER.headers(c, "WS", "/v1/ws", nonce.encode()),
                core.stats,
                api_error=lambda status, code, message: ApiError(status, code, message),
                unavailable=ClusterUnavailable,
                connect_timeout_s=core.timeout_s,
                idle_timeout_s=idle_timeout_s,
                max_outage_s=max_outage_s,
                backoff_s=core.backoff_s,
            )
        )

    def subscribe_book(
        self, market: str, *, idle_timeout_s: float = 15.0, max_outage_s: float | None = 60.0
    ) -> Any:
        """The market's order book, kept up to date over `/v1/ws` -> an iterator of `Book`.

        A `Book` comes after the snapshot, after every delta and when a heartbeat moves its
        `seq`; it is the same object each time, updated in place. On a `prev_seq` gap the
        subscription takes a new snapshot; on a close, a dead node or `idle_timeout_s` of
        silence it reconnects to the next node. It never hands out a book built across a gap,
        nor one older than the last (`seq` never goes back). `ClusterUnavailable` when no node
        served it for `max_outage_s` (None: keep trying); `ApiError` for an unknown market.
        """
        return self._stream(
            "book:" + market,
            _BookTracker(market, self._core.stats),
            None,
            idle_timeout_s,
            max_outage_s,
        )

    def subscribe_trades(
        self, market: str, *, idle_timeout_s: float = 15.0, max_outage_s: float | None = 60.0
    ) -> Any:
        """The market's trades (dicts, in `seq` order, each once) -> an iterator; a `Gap` item
        marks where trades may have been missed across a reconnection."""
        return self._stream(
            "trades:" + market,
            _EventTracker("trades:" + market, self._core.stats),
            None,
            idle_timeout_s,
            max_outage_s,
        )

    def subscribe_orders(
        self, *, idle_timeout_s: float = 15.0, max_outage_s: float | None = 60.0
    ) -> Any:
        """The caller's order events and fills (the private `orders` channel, authenticated
        with the client's key) -> an iterator of dicts and `Gap`s, like `subscribe_trades`."""
        if self._core.creds is None:
            raise ValueError("the orders channel needs credentials")
        return self._stream(
            "orders",
            _EventTracker("orders", self._core.stats),
            self._core.creds,
            idle_timeout_s,
            max_outage_s,
        )


# ---------------------------------------------------------------------- the two drivers


class Client(_Api):
    """Synchronous SDK client; one may be shared between threads.

    `Client(urls, creds)`: every node's API URL and a trader key (`Credentials`) bound to one
    account. `timeout_s` bounds one HTTP attempt, `deadline_s` one call with all its retries.
    """

    def __init__(
        self,
        urls: list[str],
        creds: Credentials | None,
        *,
        timeout_s: float = 3.0,
        deadline_s: float = 15.0,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self._core = _Core(urls, creds, timeout_s=timeout_s, deadline_s=deadline_s)
        self._http = httpx.Client(
            transport=transport, timeout=timeout_s, verify=tls_context(verify)
        )
        self._ssl = _ssl_context(verify)

    def _subscription(self, stream: _Stream) -> Subscription:
        return Subscription(stream, self._ssl)

    def _run(self, flow: _Flow[T]) -> T:
        answer: _Answer = None
        try:
            while True:
                step = flow.send(answer)
                if isinstance(step, _Sleep):
                    time.sleep(max(0.0, step.seconds))
                    answer = None
                    continue
                try:
                    answer = self._http.request(
                        step.method,
                        step.url,
                        content=step.body,
                        headers=step.headers,
                        timeout=step.timeout_s,
                    )
                except httpx.HTTPError as exc:
                    answer = exc
        except StopIteration as stop:
            return stop.value

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Api):
    """The same SDK for async code, under trio or asyncio: every method is awaited.

    One client may serve many tasks (they share its connection pool and known leader).
    """

    def __init__(
        self,
        urls: list[str],
        creds: Credentials | None,
        *,
        timeout_s: float = 3.0,
        deadline_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self._core = _Core(urls, creds, timeout_s=timeout_s, deadline_s=deadline_s)
        self._http = httpx.AsyncClient(
            transport=transport, timeout=timeout_s, verify=tls_context(verify)
        )
        self._ssl = _ssl_context(verify)

    def _subscription(self, stream: _Stream) -> AsyncSubscription:
        return AsyncSubscription(stream, self._ssl)

    async def _run(self, flow: _Flow[T]) -> T:
        answer: _Answer = None
        try:
            while True:
                step = flow.send(answer)
                if isinstance(step, _Sleep):
                    # anyio (httpx's own dependency) sleeps on whichever loop runs: trio or asyncio.
                    await anyio.sleep(max(0.0, step.seconds))
                    answer = None
                    continue
                try:
                    answer = await self._http.request(
                        step.method,
                        step.url,
                        content=step.body,
                        headers=step.headers,
                        timeout=step.timeout_s,
                    )
                except httpx.HTTPError as exc:
                    answer = exc
        except StopIteration as stop:
            return stop.value

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------- operators


class AdminClient:
    def __init__(
        self, urls: list[str], creds: Credentials, *, timeout_s: float = 10.0, verify: Any = True
    ) -> None:
        self.urls = list(urls)
        self.creds = creds
        self.timeout_s = timeout_s
        self._http = httpx.Client(timeout=timeout_s, verify=tls_context(verify))
        self._leader: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, url: str) -> dict:
        response = self._http.get(url + "/v1/cluster/status")
        response.raise_for_status()
        return loads(response.content)

    def statuses(self) -> dict[str, dict | None]:
        out: dict[str, dict | None] = {}
        for url in self.urls:
            try:
                out[url] = self.status(url)
            except httpx.HTTPError:
                out[url] = None
        return out

    def _post(self, path: str, payload: Any, deadline_s: float) -> dict:
        body = dumps(payload)
        deadline = time.monotonic() + deadline_s
        candidates = ([self._leader] if self._leader else []) + self.urls
        attempt = 0
        while True:
            url = candidates[attempt % len(candidates)]
            attempt += 1
            try:
                response = self._http.post(
                    url + path,
                    content=body,
                    headers={
                        "Content-Type": "application/json",
                        **_SIGNER.headers(self.creds, "POST", path, body),
                    },
                )
            except httpx.HTTPError:
                response = None
            if response is not None:
                if response.status_code == 307 and response.headers.get("X-Leader"):
                    self._leader = response.headers["X-Leader"]
                    candidates = [self._leader, *self.urls]
                    attempt = 0
                    continue
                if response.status_code < 300:
                    self._leader = url
                    return loads(response.content)
                if response.status_code not in (503, 307):
                    raise httpx.HTTPStatusError(
                        f"{response.status_code}: {response.text}",
                        request=response.request,
                        response=response,
                    )
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"no leader answered {path} within {deadline_s} s")
            if attempt % len(candidates) == 0:
                time.sleep(0.05)

    def submit(self, commands: list[dict], *, deadline_s: float = 15.0) -> list[dict]:
        """Send commands to the leader; one result per command ({"events"} or {"error"})."""
        return self._post("/v1/admin/commands", {"commands": commands}, deadline_s)["results"]

    def balances(self, url: str, account: str | None = None) -> dict:
        """One node's applied balances (stale read, signed admin route)."""
        path = "/v1/admin/balances" + (f"?account={account}" if account else "")
        response = self._http.get(url + path, headers=_SIGNER.headers(self.creds, "GET", path, b""))
        response.raise_for_status()
        return loads(response.content)

    def create_key(
        self, account: str, role: str = "trader", *, deadline_s: float = 15.0
    ) -> Credentials:
        """Create an API key for `account`; the secret is only returned here."""
        raw = self._post("/v1/admin/keys", {"account": account, "role": role}, deadline_s)
        return Credentials(raw["key_id"], raw["secret"], raw["role"], raw["account"])

    def change_membership(
        self, action: str, node_id: str, raft_addr: str, api_url: str, *, deadline_s: float = 30.0
    ) -> dict:
        """Add or remove one member; returns the leader's status once the change is committed
        (`change`: "added"/"removed", or "unchanged" if it already held, which makes a retry
        after an unknown outcome safe). While another change is uncommitted the leader answers
        409 membership_change_in_progress: wait for it, until `deadline_s`."""
        payload = {"action": action, "id": node_id, "raft_addr": raft_addr, "api_url": api_url}
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return self._post(
                    "/v1/admin/members", payload, max(0.1, deadline - time.monotonic())
                )
            except httpx.HTTPStatusError as exc:
                busy = (
                    exc.response.status_code == 409
                    and b"membership_change_in_progress" in exc.response.content
                )
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def transfer_leader(self, to: str | None = None, *, deadline_s: float = 15.0) -> dict:
        return self._post("/v1/admin/transfer-leader", {"to": to} if to else {}, deadline_s)

    def barrier(self, *, deadline_s: float = 15.0) -> dict:
        """Linearizable point: returns the leader's status after a committed no-op."""
        return self._post("/v1/admin/barrier", {}, deadline_s)
