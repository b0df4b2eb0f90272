"""The WebSocket API (/v1/ws) on a real 3-node cluster: book, trades, orders, order entry.

The client here is a small synchronous one over `wsproto` (already installed: Hypercorn's
WebSocket implementation), so the tests need no extra dependency.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from api.sdk import Credentials, sign, signed_headers

from .conftest import admin

M = "BTC-USD"
MARKET = {
    "op": "create_market",
    "market": M,
    "base": "BTC",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}


class Closed(Exception):
    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


class WsClient:
    """A blocking WebSocket client: JSON in, JSON out."""

    def __init__(self, url: str, *, rcvbuf: int | None = None, timeout_s: float = 10.0) -> None:
        parsed = httpx.URL(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout_s)
        self.sock.connect((parsed.host, parsed.port))
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.pending: collections.deque[dict] = collections.deque()
        self.parts: list[str] = []
        self.closed: Closed | None = None
        self.accepted = False
        self.sock.sendall(
            self.conn.send(Request(host=f"{parsed.host}:{parsed.port}", target="/v1/ws"))
        )
        while not self.accepted:
            self._pump(timeout_s)
        # Every connection opens with the server's challenge, which `auth` signs.
        self.hello = self.recv(timeout_s)
        assert self.hello["type"] == "hello", self.hello
        self.nonce: str = self.hello["nonce"]

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.conn.state == ConnectionState.OPEN:
                self.sock.sendall(self.conn.send(CloseConnection(code=1000)))
        except OSError:
            pass
        self.sock.close()

    def send(self, message: Any) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.sock.sendall(self.conn.send(TextMessage(data=text)))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.conn.send(BytesMessage(data=data)))

    def _pump(self, timeout_s: float) -> None:
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(1 << 16)
        self.conn.receive_data(data or None)
        for event in self.conn.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                raise AssertionError(f"handshake rejected: {event.status_code}")
            elif isinstance(event, TextMessage):
                self.parts.append(event.data)
                if event.message_finished:
                    self.pending.append(json.loads("".join(self.parts)))
                    self.parts = []
            elif isinstance(event, Ping):
                self.sock.sendall(self.conn.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.closed = Closed(event.code, event.reason)
                if self.conn.state == ConnectionState.REMOTE_CLOSING:
                    self.sock.sendall(self.conn.send(event.response()))
        if not data and self.closed is None:
            self.closed = Closed(None, "eof")

    def recv(self, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self.pending:
            if self.closed is not None:
                raise self.closed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message")
            self._pump(remaining)
        return self.pending.popleft()

    def until(self, predicate: Any, timeout_s: float = 10.0) -> tuple[dict, list[dict]]:
        """Read until a message matches; (that message, the ones read before it)."""
        seen: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.recv(max(deadline - time.monotonic(), 0.001))
            if predicate(message):
                return message, seen
            seen.append(message)

    def request(self, message: dict, timeout_s: float = 10.0) -> tuple[dict, list[dict]]:
        """Send an order request and read until its response."""
        self.send(message)
        return self.until(
            lambda m: m.get("type") == "response" and m.get("request_id") == message["request_id"],
            timeout_s,
        )

    def auth(self, creds: Credentials) -> dict:
        self.send(auth_message(creds, self.nonce))
        return self.recv()


def auth_message(creds: Credentials, nonce: str, ts: int | None = None) -> dict:
    """The `auth` op for the connection whose `hello` carried `nonce`."""
    ts = time.time_ns() // 1_000_000 if ts is None else ts
    return {
        "op": "auth",
        "key_id": creds.key_id,
        "timestamp": ts,
        "signature": sign(creds.secret, ts, "WS", "/v1/ws", nonce.encode()),
    }


def call(url: str, creds: Credentials, method: str, path: str, body: Any = None) -> httpx.Response:
    raw = json.dumps(body).encode() if body is not None else b""
    return httpx.request(
        method,
        url + path,
        content=raw,
        timeout=10,
        headers=signed_headers(creds, method, path, raw),
    )


def fund(client: Any, *accounts: str) -> None:
    commands: list[dict] = [MARKET]
    for account in accounts:
        for asset in ("BTC", "USD"):
            commands.append(
                {
                    "op": "deposit",
                    "account": account,
                    "asset": asset,
                    "amount": 10**15,
                    "ref": f"{account}-{asset}",
                }
            )
    results = client.submit(commands)
    assert all("events" in r for r in results), results


def random_flow(rng: random.Random, n: int, accounts: tuple[str, ...], next_id: int) -> list[dict]:
    """Limit orders around 1000 from both sides, some IOC, some cancels and amends."""
    commands: list[dict] = []
    for _ in range(n):
        account = rng.choice(accounts)
        roll = rng.random()
        if roll < 0.15:
            commands.append(
                {
                    "op": "cancel",
                    "account": account,
                    "market": M,
                    "order_id": rng.randint(1, next_id),
                }
            )
        elif roll < 0.25:
            commands.append(
                {
                    "op": "amend",
                    "account": account,
                    "market": M,
                    "order_id": rng.randint(1, next_id),
                    "qty": rng.randint(1, 5),
                }
            )
        else:
            commands.append(
                {
                    "op": "place",
                    "account": account,
                    "market": M,
                    "side": rng.choice(("buy", "sell")),
                    "type": "limit",
                    "price": 5 * rng.randint(190, 210),
                    "qty": rng.randint(1, 10),
                    "tif": rng.choice(("gtc", "gtc", "gtc", "ioc")),
                }
            )
    return commands


def apply_book(book: dict[str, dict[int, int]], message: dict) -> None:
    if message["type"] == "snapshot":
        book["buy"] = {p: q for p, q in message["bids"]}
        book["sell"] = {p: q for p, q in message["asks"]}
    elif message["type"] == "delta":
        side = book[message["side"]]
        if message["level_qty"] == 0:
            side.pop(message["price"], None)
        else:
            side[message["price"]] = message["level_qty"]


def sorted_levels(book: dict[str, dict[int, int]]) -> tuple[list, list]:
    return (
        sorted(([p, q] for p, q in book["buy"].items()), reverse=True),
        sorted([p, q] for p, q in book["sell"].items()),
    )


def test_book_over_ws_equals_book_over_rest_and_trades_are_complete(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    leader_url = cluster.nodes[leader].config.api_url
    follower_url = next(n.config.api_url for nid, n in cluster.nodes.items() if nid != leader)
    rng = random.Random(7)
    with admin(cluster) as client:
        fund(client, "a", "b", "c")
        placed = 0

        def batch(n: int) -> None:
            nonlocal placed
            client.submit(random_flow(rng, n, ("a", "b", "c"), placed + n))
            placed += n

        batch(100)  # a book exists before anyone subscribes
        clients = {url: WsClient(url) for url in (leader_url, follower_url)}
        try:
            # Subscribe while the flow runs: the feed then carries events older than the
            # snapshot, which must be dropped, and newer ones, which must all arrive. The flow
            # goes on until a few batches after the subscriptions (a fixed-length flow could
            # be over before they are sent).
            subscribed = threading.Event()

            def flow_run() -> None:
                while not subscribed.is_set():
                    batch(40)
                for _ in range(4):
                    batch(40)

            flow = threading.Thread(target=flow_run)
            flow.start()
            deadline = time.monotonic() + 10
            while placed < 180 and time.monotonic() < deadline:  # two flow batches are in
                time.sleep(0.005)
            for ws in clients.values():
                ws.send({"op": "subscribe", "channel": f"book:{M}"})
                ws.send({"op": "subscribe", "channel": f"trades:{M}"})
            subscribed.set()
            flow.join()
            cluster.wait_converged()
            for url, ws in clients.items():
                rest = httpx.get(f"{url}/v1/markets/{M}/book?depth=1000&consistency=stale")
                rest_seq = int(rest.headers["X-QB-Seq"])
                book: dict[str, dict[int, int]] = {"buy": {}, "sell": {}}
                last: dict[str, int] = {}
                trades: list[dict] = []
                trades_from = None
                while True:  # ping until the connection has delivered everything to rest_seq
                    ws.send({"op": "ping"})
                    pong, seen = ws.until(lambda m: m["type"] == "pong")
                    for message in seen:
                        channel = message.get("channel")
                        if message["type"] in ("snapshot", "subscribed"):
                            last[channel] = message["seq"]
                            if channel == f"trades:{M}":
                                trades_from = message["seq"]
                        elif channel is not None:
                            # every channel message chains to the previous one: no gap
                            assert message["prev_seq"] == last[channel], message
                            assert message["seq"] > message["prev_seq"]
                            last[channel] = message["seq"]
                        if channel == f"book:{M}":
                            apply_book(book, message)
                        elif channel == f"trades:{M}" and message["type"] == "trade":
                            trades.append(message)
                    if pong["seq"] >= rest_seq:
                        break
                    time.sleep(0.05)
                assert pong["seq"] == rest_seq
                bids, asks = sorted_levels(book)
                assert (bids, asks) == (rest.json()["bids"], rest.json()["asks"]), url
                assert bids and asks
                recent = httpx.get(f"{url}/v1/markets/{M}/trades?limit=1000&consistency=stale")
                expected = [
                    t["trade_id"] for t in recent.json()["trades"] if t["seq"] > trades_from
                ]
                assert expected, "the flow traded after the subscription"
                assert [t["trade_id"] for t in trades] == expected, url
                # The public channel does not say who traded.
                assert not any(k in t for t in trades for k in ("maker_account", "taker_fee"))
        finally:
            for ws in clients.values():
                ws.close()


def test_orders_channel_needs_auth_and_shows_only_the_callers_events(make_cluster) -> None:
    cluster = make_cluster(3)
    url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    with admin(cluster) as client:
        fund(client, "alice", "bob", "carol")
        alice, bob, carol = (client.create_key(a) for a in ("alice", "bob", "carol"))
        admin_key = client.creds

    with WsClient(url) as ws_alice, WsClient(url) as ws_bob, WsClient(url) as other:
        ws_alice.send({"op": "subscribe", "channel": "orders"})
        assert ws_alice.recv()["code"] == "unauthenticated"
        # Wrong secret, stale timestamp, another connection's signature: all refused.
        forged = auth_message(
            Credentials(alice.key_id, "0" * 64, "trader", "alice"), ws_alice.nonce
        )
        ws_alice.send(forged)
        assert ws_alice.recv()["code"] == "unauthenticated"
        ws_alice.send(auth_message(alice, ws_alice.nonce, time.time_ns() // 1_000_000 - 60_000))
        assert ws_alice.recv()["code"] == "expired"
        good = auth_message(alice, ws_alice.nonce)
        ws_alice.send(good)
        authenticated = ws_alice.recv()
        assert authenticated["type"] == "authenticated" and authenticated["account"] == "alice"
        ws_alice.send(good)
        assert ws_alice.recv()["code"] == "already_authenticated"
        other.send(good)
        assert other.recv()["code"] == "unauthenticated"
        # An admin key has no account: no orders channel for it.
        assert other.auth(admin_key)["type"] == "authenticated"
        other.send({"op": "subscribe", "channel": "orders"})
        assert other.recv()["code"] == "forbidden"

        assert ws_bob.auth(bob)["account"] == "bob"
        for ws in (ws_alice, ws_bob):
            ws.send({"op": "subscribe", "channel": "orders"})
            assert ws.recv()["type"] == "subscribed"

        def place(creds: Credentials, side: str, price: int, qty: int, coid: str) -> dict:
            response = call(
                url,
                creds,
                "POST",
                "/v1/orders",
                {
                    "market": M,
                    "side": side,
                    "type": "limit",
                    "price": price,
                    "qty": qty,
                    "client_order_id": coid,
                },
            )
            assert response.status_code == 201, response.text
            return response.json()

        sell = place(bob, "sell", 1000, 5, "b1")
        place(carol, "sell", 1005, 5, "c1")  # nobody's business but carol's
        # Alice's buy goes over the socket: it takes bob's 5 and carol's 5, and 2 lots rest.
        buy, early = ws_alice.request(
            {
                "op": "place",
                "request_id": "a1",
                "market": M,
                "side": "buy",
                "type": "limit",
                "price": 1005,
                "qty": 12,
                "client_order_id": "a1",
            }
        )
        assert buy["http_status"] == 201 and buy["filled_qty"] == 10
        # The answer carries alice's events and the public ones, not the makers' balances.
        assert {e.get("account") for e in buy["events"]} == {None, "alice"}
        cancel = call(
            url, alice, "POST", "/v1/orders/cancel", {"market": M, "client_order_id": "a1"}
        )
        assert cancel.status_code == 200
        final_seq = cancel.json()["seq"]

        def stream(ws: WsClient) -> list[dict]:
            out: list[dict] = []
            while True:
                ws.send({"op": "ping"})
                pong, seen = ws.until(lambda m: m["type"] == "pong")
                out += [m for m in seen if m.get("channel") == "orders"]
                if pong["seq"] >= final_seq:
                    return out

        got_alice = [m for m in early if m.get("channel") == "orders"] + stream(ws_alice)
        assert [(m["type"], m.get("order_id")) for m in got_alice] == [
            ("accepted", buy["order_id"]),
            ("trade", None),
            ("trade", None),
            ("cancelled", buy["order_id"]),
        ]
        assert all(
            m.get("account") == "alice"
            or "alice" in (m.get("maker_account"), m.get("taker_account"))
            for m in got_alice
        )
        got_bob = stream(ws_bob)
        assert [(m["type"], m.get("order_id")) for m in got_bob] == [
            ("accepted", sell["order_id"]),
            ("trade", None),
            ("filled", sell["order_id"]),
        ]
        assert got_bob[1]["maker_account"] == "bob" and got_bob[1]["taker_account"] == "alice"
        for got in (got_alice, got_bob):
            assert [m["prev_seq"] for m in got[1:]] == [m["seq"] for m in got[:-1]]


def test_a_captured_auth_frame_opens_no_other_connection_on_any_node(make_cluster) -> None:
    """Each connection's `hello` carries its own nonce and `auth` signs it: a valid auth frame
    captured on one node's connection, replayed within the timestamp window to every other
    node and to a second connection on the same node, is refused there, and those sessions
    stay anonymous (no orders channel, no order entry). Before the nonce, that frame opened an
    authenticated session on every node."""
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    urls = {nid: n.config.api_url for nid, n in cluster.nodes.items()}
    with admin(cluster) as client:
        fund(client, "alice")
        alice = client.create_key("alice")
        client.barrier()  # the key is applied on every node: a refusal is not "unknown key"
    cluster.wait_converged()

    with WsClient(urls[leader]) as victim:
        captured = auth_message(alice, victim.nonce)
        victim.send(captured)
        assert victim.recv()["type"] == "authenticated"
        replays = [WsClient(url) for url in urls.values()]  # the leader's second one included
        try:
            nonces = {victim.nonce} | {ws.nonce for ws in replays}
            assert len(nonces) == len(urls) + 1  # fresh on every connection
            for ws in replays:
                ws.send(captured)
                refused = ws.recv()
                assert refused["type"] == "error" and refused["op"] == "auth", refused
                assert (refused["code"], refused["message"]) == ("unauthenticated", "bad signature")
                ws.send({"op": "subscribe", "channel": "orders"})
                assert ws.recv()["code"] == "unauthenticated"
                answer, _ = ws.request(
                    {
                        "op": "place",
                        "request_id": "stolen",
                        "market": M,
                        "side": "buy",
                        "type": "limit",
                        "price": 1000,
                        "qty": 1,
                    }
                )
                assert (answer["http_status"], answer["error"]["code"]) == (401, "unauthenticated")
                # The owner of the key still authenticates there, with that connection's nonce.
                assert ws.auth(alice)["type"] == "authenticated"
        finally:
            for ws in replays:
                ws.close()


def test_order_entry_over_ws_with_request_ids(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    url = cluster.nodes[leader].config.api_url
    follower_url = next(n.config.api_url for nid, n in cluster.nodes.items() if nid != leader)
    with admin(cluster) as client:
        fund(client, "alice")
        alice = client.create_key("alice")
        poor = client.create_key("pauper")

    with WsClient(url) as ws:
        order = {"market": M, "side": "buy", "type": "limit", "price": 1000, "qty": 3}
        response, _ = ws.request({"op": "place", "request_id": "early", **order})
        assert response["http_status"] == 401
        assert response["error"]["code"] == "unauthenticated"
        assert ws.auth(alice)["type"] == "authenticated"

        placed, _ = ws.request(
            {"op": "place", "request_id": "r1", **order, "client_order_id": "ws-1"}
        )
        assert placed["http_status"] == 201, placed
        assert placed["status"] == "resting" and placed["filled_qty"] == 0
        assert placed["seq"] == placed["events"][-1]["seq"]
        order_id = placed["order_id"]
        amended, _ = ws.request(
            {"op": "amend", "request_id": 2, "market": M, "order_id": order_id, "qty": 2}
        )
        assert amended["http_status"] == 200 and amended["events"][0]["type"] == "amended"
        dup, _ = ws.request({"op": "place", "request_id": "r3", **order, "client_order_id": "ws-1"})
        assert dup["http_status"] == 409
        assert dup["error"] == {
            "code": "duplicate_client_order_id",
            "message": "client_order_id already used",
            "order_id": order_id,
        }
        cancelled, _ = ws.request(
            {"op": "cancel", "request_id": "r4", "market": M, "client_order_id": "ws-1"}
        )
        assert cancelled["http_status"] == 200
        assert cancelled["events"][0]["type"] == "cancelled"
        again, _ = ws.request(
            {"op": "cancel", "request_id": "r5", "market": M, "order_id": order_id}
        )
        assert again["http_status"] == 404 and again["error"]["code"] == "unknown_order"
        forged, _ = ws.request({"op": "place", "request_id": "r6", **order, "account": "bob"})
        assert forged["http_status"] == 400 and forged["error"]["code"] == "field_not_allowed"
        bad_tick, _ = ws.request({"op": "place", "request_id": "r7", **order, "price": 1001})
        assert bad_tick["http_status"] == 400 and bad_tick["error"]["code"] == "bad_tick"
        # Out of range whatever the state: refused before the log, as REST does.
        huge, _ = ws.request({"op": "place", "request_id": "r8", **order, "qty": 10**30})
        assert huge["http_status"] == 400 and huge["error"]["code"] == "bad_qty"
        # An integer the log cannot carry, in a command only the state could judge (amend
        # looks the order up first), is refused before it reaches the log.
        huge, _ = ws.request(
            {"op": "amend", "request_id": "r9", "market": M, "order_id": 1, "qty": 10**30}
        )
        assert huge["http_status"] == 400 and huge["error"]["code"] == "wrong_type"
        ws.send({"op": "place", **order})
        assert ws.recv()["code"] == "bad_request_id"

        # Pipelined: many requests in flight, every one answered once under its own id.
        ids = [f"p{i}" for i in range(60)]
        for i, request_id in enumerate(ids):
            ws.send(
                {
                    "op": "place",
                    "request_id": request_id,
                    "market": M,
                    "side": "buy",
                    "type": "limit",
                    "price": 900 + 5 * (i % 10),
                    "qty": 1,
                }
            )
        answers: dict[str, dict] = {}
        while len(answers) < len(ids):
            message = ws.recv()
            if message["type"] == "response":
                assert message["request_id"] not in answers
                answers[message["request_id"]] = message
        assert sorted(answers) == sorted(ids)
        assert all(a["http_status"] == 201 for a in answers.values())
        everything, _ = ws.request({"op": "cancel_all", "request_id": "all", "market": M})
        assert everything["http_status"] == 200
        assert sum(e["type"] == "cancelled" for e in everything["events"]) == 60

        # A batch in one message, as POST /v1/orders/batch: one result per order, in order;
        # the malformed one refused before the log, the others committed together.
        batch, _ = ws.request(
            {
                "op": "place_batch",
                "request_id": "b1",
                "orders": [{**order, "price": 905}, {**order, "qty": 0}, {**order, "price": 910}],
            }
        )
        assert batch["http_status"] == 200, batch
        assert [r["http_status"] for r in batch["results"]] == [201, 400, 201]
        assert batch["results"][1]["error"]["code"] == "bad_qty"
        assert [r["status"] for r in batch["results"][::2]] == ["resting", "resting"]
        too_many, _ = ws.request({"op": "place_batch", "request_id": "b2", "orders": [order] * 101})
        assert too_many["http_status"] == 413 and too_many["error"]["code"] == "batch_too_large"
        forged, _ = ws.request(
            {"op": "place_batch", "request_id": "b3", "orders": [{**order, "account": "bob"}]}
        )
        assert forged["http_status"] == 400

    with WsClient(url) as ws:
        ws.auth(poor)
        broke, _ = ws.request({"op": "place", "request_id": 1, **order})
        assert broke["http_status"] == 422 and broke["error"]["code"] == "insufficient_funds"

    with WsClient(follower_url) as ws:
        assert ws.auth(alice)["type"] == "authenticated"
        redirected, _ = ws.request({"op": "place", "request_id": "f1", **order})
        assert redirected["http_status"] == 307
        assert redirected["error"]["code"] == "not_leader"
        assert redirected["error"]["leader_url"] == url
    # Nothing above killed or stalled the leader.
    assert httpx.get(url + "/v1/cluster/status").json()["role"] == "leader"


def test_bad_frames_get_errors_and_abuse_closes_the_connection(make_cluster) -> None:
    cluster = make_cluster(3)
    url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    with admin(cluster) as client:
        client.submit([MARKET])
    known = cluster.admin_credentials().key_id  # past the key look-up to the later checks

    with WsClient(url) as ws:
        cases = [
            ("{not json", "malformed_json"),
            ("[1, 2]", "bad_request"),
            ({"op": "dance"}, "unknown_op"),
            ({"nop": 1}, "unknown_op"),
            ({"op": ["place"]}, "unknown_op"),
            ({"op": "subscribe", "channel": "candles:BTC-USD"}, "bad_channel"),
            ({"op": "subscribe", "channel": 7}, "bad_channel"),
            ({"op": "subscribe", "channel": "book:NOPE"}, "unknown_market"),
            ({"op": "unsubscribe", "channel": f"trades:{M}"}, "not_subscribed"),
            ({"op": "auth", "key_id": 1}, "bad_request"),
            ({"op": "auth", "key_id": "nope", "timestamp": 1, "signature": "x"}, "unauthenticated"),
            # A digit that int() refuses, a signature that is not ASCII: both once crashed
            # the connection's task instead of answering.
            (
                {"op": "auth", "key_id": known, "timestamp": "\u00b2", "signature": "0" * 64},
                "unauthenticated",
            ),
            (
                {
                    "op": "auth",
                    "key_id": known,
                    "timestamp": time.time_ns() // 1_000_000,
                    "signature": "\u00e9" * 64,
                },
                "unauthenticated",
            ),
            ({"op": "cancel", "request_id": {"a": 1}}, "bad_request_id"),
            ("x" * (70 << 10), "message_too_large"),
        ]
        for message, code in cases:
            ws.send(message)
            reply = ws.recv()
            assert reply["type"] == "error" and reply["code"] == code, (message, reply)
            assert isinstance(reply["seq"], int)
        ws.send_bytes(b"\x00\x01")
        assert ws.recv()["code"] == "bad_frame"
        # The connection survives all of that.
        ws.send({"op": "subscribe", "channel": f"book:{M}"})
        snapshot = ws.recv()
        assert snapshot["type"] == "snapshot" and snapshot["bids"] == [] == snapshot["asks"]
        ws.send({"op": "ping", "request_id": "x"})
        assert ws.recv() == {"type": "pong", "seq": snapshot["seq"], "request_id": "x"}
        ws.send({"op": "unsubscribe", "channel": f"book:{M}"})
        assert ws.recv()["type"] == "unsubscribed"

    with WsClient(url) as ws:
        for _ in range(60):
            ws.send("garbage")
        codes = []
        with pytest.raises(Closed) as closed:
            while True:
                codes.append(ws.recv()["code"])
        assert closed.value.code == 1008 and closed.value.reason == "too_many_errors"
        assert codes[-1] == "too_many_errors" and set(codes[:-1]) <= {"malformed_json"}


def test_heartbeats_carry_the_seq(make_cluster, monkeypatch) -> None:
    monkeypatch.setenv("QB_WS_HEARTBEAT_S", "0.2")
    cluster = make_cluster(3)
    url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    with admin(cluster) as client:
        client.submit([MARKET])
    with WsClient(url) as ws:
        first, second = ws.recv(2), ws.recv(2)
        assert first["type"] == second["type"] == "heartbeat"
        assert first["seq"] == second["seq"] >= 1


ROUNDS = 8


def read_until_closed(ws: WsClient, timeout_s: float = 30.0) -> list[dict]:
    messages: list[dict] = []
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(Closed, TimeoutError):
        while time.monotonic() < deadline:
            messages.append(ws.recv(deadline - time.monotonic()))
    return messages


def test_a_subscriber_that_never_reads_is_cut_as_a_slow_consumer(make_cluster, monkeypatch) -> None:
    # Small bounds: 64 KiB of frames queued, the feed at most 1500 commands behind.
    monkeypatch.setenv("QB_WS_MAX_QUEUE_BYTES", str(64 << 10))
    monkeypatch.setenv("QB_WS_FEED_BUFFER", "1500")
    cluster = make_cluster(3)
    url = cluster.nodes[cluster.wait_for_leader()].config.api_url
    with admin(cluster) as client:
        fund(client, "a", "b")
        # A small receive buffer: the kernels then hold little for the one that never reads.
        with WsClient(url, rcvbuf=4096) as slow, WsClient(url) as healthy:
            for ws in (slow, healthy):
                ws.send({"op": "subscribe", "channel": f"book:{M}"})
                ws.send({"op": "subscribe", "channel": f"trades:{M}"})
            assert healthy.recv()["type"] == "snapshot"
            healthy_trades = 0
            done = threading.Event()

            def keep_up() -> None:  # the healthy subscriber reads all along
                nonlocal healthy_trades
                while not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        try:
                            healthy_trades += healthy.recv(0.2)["type"] == "trade"
                        except Closed:
                            return

            reader = threading.Thread(target=keep_up)
            reader.start()
            try:
                # Crossing pairs: each makes a trade and book deltas (~600 bytes on the wire).
                for round_ in range(ROUNDS):
                    commands = []
                    for i in range(400):
                        price = 5 * (100 + (round_ * 400 + i) % 50)
                        commands.append(
                            {
                                "op": "place",
                                "account": "a",
                                "market": M,
                                "side": "sell",
                                "type": "limit",
                                "price": price,
                                "qty": 1,
                            }
                        )
                        commands.append(
                            {
                                "op": "place",
                                "account": "b",
                                "market": M,
                                "side": "buy",
                                "type": "limit",
                                "price": price,
                                "qty": 1,
                            }
                        )
                    client.submit(commands)
                    # Paced so that a reader that keeps up is never more than a round behind.
                    deadline = time.monotonic() + 20
                    while healthy_trades < 400 * (round_ + 1) and time.monotonic() < deadline:
                        time.sleep(0.01)
            finally:
                done.set()
                reader.join()
            assert healthy_trades == 400 * ROUNDS
            # Now the slow one reads: what the kernels held, then the reason, then the close.
            messages = read_until_closed(slow)
            assert slow.closed is not None and slow.closed.code == 1008
            assert slow.closed.reason == "slow_consumer"
            assert messages[-1]["type"] == "error" and messages[-1]["code"] == "slow_consumer"
            assert sum(m["type"] == "trade" for m in messages) < 400 * ROUNDS
            # The healthy subscriber was not affected.
            healthy.send({"op": "ping"})
            assert healthy.until(lambda m: m["type"] == "pong")[0]["type"] == "pong"

    # Replies count too: a client that keeps asking for snapshots of a deep book but never
    # reads them is cut the same way.
    with admin(cluster) as client:
        deep = {**MARKET, "market": "DEEP", "base": "ETH"}
        client.submit(
            [
                deep,
                {"op": "deposit", "account": "a", "asset": "ETH", "amount": 10**15, "ref": "a-ETH"},
            ]
            + [
                {
                    "op": "place",
                    "account": "a",
                    "market": "DEEP",
                    "side": "sell",
                    "type": "limit",
                    "price": 5 * (1000 + i),
                    "qty": 1,
                }
                for i in range(998)
            ]
        )
    with WsClient(url, rcvbuf=4096) as greedy:
        for _ in range(400):  # ~15 KB each
            greedy.send({"op": "subscribe", "channel": "book:DEEP"})
        replies = read_until_closed(greedy)
        assert greedy.closed is not None and greedy.closed.code == 1008
        assert greedy.closed.reason == "slow_consumer"
        assert replies[-1]["code"] == "slow_consumer" and len(replies) < 400


def test_a_follower_that_installs_a_snapshot_tells_its_subscribers_to_resync(make_cluster) -> None:
    cluster = make_cluster(3, compaction_min_entries=20, compaction_min_time_s=0.2)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    with admin(cluster) as client:
        fund(client, "a")
        behind = cluster.wait_converged()[follower]["applied_index"]
        with WsClient(cluster.nodes[follower].config.api_url) as ws:
            ws.send({"op": "subscribe", "channel": f"book:{M}"})
            assert ws.recv()["type"] == "snapshot"
            # The follower sleeps while the others move on and compact their logs past it.
            cluster.signal(follower, signal.SIGSTOP)
            try:
                time.sleep(2)  # long enough for the leader to drop its connection to it
                deadline = time.monotonic() + 30
                chunk = 0
                # Both other nodes past it, not only the first leader: under load the other
                # follower may take over meanwhile, and a leader whose log still holds what the
                # follower lacks sends it entries, not a snapshot (a clean clone's run saw it).
                others = [n for n in cluster.nodes if n != follower]
                while min(cluster.status(n)["raft"]["log_first_index"] for n in others) <= (
                    behind + 1
                ):
                    assert time.monotonic() < deadline, "the others never compacted their logs"
                    client.submit(
                        [
                            {
                                "op": "place",
                                "account": "a",
                                "market": M,
                                "side": "buy",
                                "type": "limit",
                                "price": 5 * (100 + chunk * 10 + j),
                                "qty": 1,
                            }
                            for j in range(10)
                        ]
                    )
                    chunk += 1
                    time.sleep(0.05)
            finally:
                cluster.signal(follower, signal.SIGCONT)
            statuses = cluster.wait_converged(30)
            assert statuses[follower]["raft"]["snapshots_installed"] >= 1
            # The feed cannot bridge a snapshot: the subscriber is told to start over.
            client.submit(
                [
                    {
                        "op": "place",
                        "account": "a",
                        "market": M,
                        "side": "buy",
                        "type": "limit",
                        "price": 5,
                        "qty": 1,
                    }
                ]
            )
            messages = read_until_closed(ws)
            assert ws.closed is not None and (ws.closed.code, ws.closed.reason) == (1012, "resync")
            assert messages[-1]["code"] == "resync"
            assert all(m["type"] in ("delta", "heartbeat") for m in messages[:-1])
