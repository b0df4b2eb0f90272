"""The trader's SDK: `Client` (sync) and `AsyncClient` (async: asyncio or trio).

Both know every node, find the leader, follow `307` redirects (`X-Leader`), back off briefly
while there is no leader, and retry a request whose outcome is unknown: the retry policy of
`api.sdk.retry`, the same for `AdminClient`. Outcomes (STYLE.md 9, docs/reference/sdk.md):
a returned value, or `ApiError` (a 4xx), is *definite*; `ClusterUnavailable` is definite too
(no attempt can have been applied); `OutcomeUnknown` (a `ClusterUnavailable`) is not: some
attempt may have been applied and the deadline passed before a retry settled it.

A place always carries a `client_order_id` (generated when the caller gives none), so every
resend is idempotent: the state machine answers a resend of an applied order with `409
duplicate_client_order_id`, and the client then returns that order's outcome from
`GET /v1/orders/by-client-id/<coid>` instead of raising.

The operations are flows (`api.sdk.retry`): generators that yield what to send or how long to
wait; `Client` and `AsyncClient` are the two thin drivers that do the I/O.
"""

from __future__ import annotations

import collections
import secrets
import time
from typing import Any
from urllib.parse import quote

import httpx

from .errors import ClusterUnavailable, OutcomeUnknown
from .retry import T, _api_error, _Core, _error_of, _Flow, _Sleep, adrive, drive
from .signing import Credentials
from .subscription import (
    AsyncSubscription,
    Subscription,
    _BookTracker,
    _EventTracker,
    _Stream,
)

MAX_BATCH_ORDERS = 100  # the server's bound (api/trading.py); place_batch splits longer lists


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


class _Trading(_Core):
    """The trader's operations as flows, over the shared retry policy."""

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

    def balances(self) -> _Flow[dict[str, dict]]:
        body = yield from self.get("/v1/accounts/me/balances")
        return {
            row["asset"]: {"available": row["available"], "reserved": row["reserved"]}
            for row in body["balances"]
        }

    def order_by_client_id(self, coid: str) -> _Flow[dict]:
        _check_client_order_id(coid)
        return (yield from self.get("/v1/orders/by-client-id/" + _path(coid)))


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

    _core: _Trading

    def _run(self, flow: _Flow[Any]) -> Any:
        raise NotImplementedError

    @property
    def leader(self) -> str | None:
        """The URL of the node that last answered as leader (None before the first call)."""
        return self._core.leader

    @property
    def stats(self) -> collections.Counter[str]:
        """Counters: retries (attempts after the first), redirects (307), transport_errors,
        busy (503/429, a 4xx with Retry-After), replayed (401 replayed, re-signed), unknown
        (attempts whose outcome was unknown), recovered (places settled by the outcome look-up); subscriptions:
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
                core.stats,
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
    account. `timeout_s` bounds one HTTP attempt, `deadline_s` one call with all its retries;
    between attempts it backs off from `backoff_s`, doubling up to `backoff_max_s`.
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
        backoff_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        self._core = _Trading(
            urls,
            creds,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self._http = httpx.Client(
            transport=transport, timeout=timeout_s, verify=tls_context(verify)
        )
        self._ssl = _ssl_context(verify)

    def _subscription(self, stream: _Stream) -> Subscription:
        return Subscription(stream, self._ssl)

    def _run(self, flow: _Flow[T]) -> T:
        return drive(self._http, flow)

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
        backoff_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        self._core = _Trading(
            urls,
            creds,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self._http = httpx.AsyncClient(
            transport=transport, timeout=timeout_s, verify=tls_context(verify)
        )
        self._ssl = _ssl_context(verify)

    def _subscription(self, stream: _Stream) -> AsyncSubscription:
        return AsyncSubscription(stream, self._ssl)

    async def _run(self, flow: _Flow[T]) -> T:
        return await adrive(self._http, flow)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
