"""The single-order write routes served on ASGI (api/fastpath.py) answer exactly as the Quart
routes do: every case runs both ways, on a fresh leader each, with a real exchange behind it.
A query string sends a request to the Quart route (signed over the path with its query)."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from api import fastpath
from api.app import MAX_BODY_BYTES, create_app
from api.auth import Credentials, Verifier, new_credentials
from api.port import NotLeaderError, OutcomeUnknownError
from api.rate_limit import RateLimiter, RateLimits
from api.sdk import signed_headers
from cluster.workload import BOOK_MARKET as MARKET
from statemachine import Exchange
from statemachine.precheck import ShapeCheck

ORDER = {"market": "BTC-USD", "side": "buy", "type": "limit", "qty": 2, "price": 100}
ALICE = new_credentials("trader", "alice")
BOB = new_credentials("trader", "bob")  # never funded
ADMIN = new_credentials("admin")
STRANGER = new_credentials("trader", "carol")  # a key the node does not know


class ExchangeLeader:
    """A leader whose log is one real exchange: submit applies at once."""

    node_id = "n1"

    def __init__(self) -> None:
        self.exchange = Exchange()
        self.ts = 1
        self.apply({"op": "create_market", **MARKET})
        self.apply({"op": "deposit", "account": "alice", "asset": "USD", "amount": 10**6,
                    "ref": "d1"})  # fmt: skip
        self.shapes = ShapeCheck()
        self.raise_next: Exception | None = None
        self.leading = True

    def apply(self, command: dict) -> list[dict]:
        self.ts += 1
        return self.exchange.apply({**command, "ts": self.ts})

    def is_leader(self) -> bool:
        return self.leading

    def leader_url(self) -> str | None:
        return None if self.leading else "http://127.0.0.1:9001"

    def precheck(self, command: dict) -> dict | None:
        event = self.shapes.rejection(command, self.exchange.market_count, self.exchange.markets)
        if event is None:
            return None
        return {k: v for k, v in event.items() if k not in ("seq", "ts", "cmd_index")}

    async def submit(self, command: dict, request: Any = None) -> list[dict]:
        assert request is not None and len(request[0]) == 64
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        return self.apply(command)


def cases() -> list[tuple[str, Credentials, str, Any]]:
    """(what, key, path, body: a dict, or raw bytes) in the order they are sent."""
    return [
        ("place", ALICE, "/v1/orders", {**ORDER, "client_order_id": "c1"}),
        ("place again: duplicate", ALICE, "/v1/orders", {**ORDER, "client_order_id": "c1"}),
        ("amend", ALICE, "/v1/orders/amend", {"market": "BTC-USD", "order_id": 1, "qty": 1}),
        ("cancel", ALICE, "/v1/orders/cancel", {"market": "BTC-USD", "order_id": 1}),
        ("cancel a gone order", ALICE, "/v1/orders/cancel", {"market": "BTC-USD", "order_id": 1}),
        ("cancel-all: none open", ALICE, "/v1/orders/cancel-all", {"market": "BTC-USD"}),
        ("no funds", BOB, "/v1/orders", ORDER),
        ("precheck: zero qty", ALICE, "/v1/orders", {**ORDER, "qty": 0}),
        ("empty body", ALICE, "/v1/orders", b""),
        ("malformed JSON", ALICE, "/v1/orders", b"{"),
        ("not an object", ALICE, "/v1/orders", [1]),
        ("reserved field", ALICE, "/v1/orders", {**ORDER, "account": "bob"}),
        ("admin key", ADMIN, "/v1/orders", ORDER),
        ("unknown key", STRANGER, "/v1/orders", ORDER),
        ("bad signature", ALICE, "/v1/orders", "tampered"),
        ("outcome unknown", ALICE, "/v1/orders", OutcomeUnknownError("no outcome within 5 s")),
        ("deposed meanwhile", ALICE, "/v1/orders", NotLeaderError("http://127.0.0.1:9003")),
        ("follower", ALICE, "/v1/orders/cancel", "follower"),
        ("rate limited", ALICE, "/v1/orders", ORDER),
    ]


def run(via_quart: bool) -> list[tuple[str, int, Any, dict]]:
    """Every case, in order, on a fresh leader: (what, status, body, headers)."""
    node = ExchangeLeader()
    limiter = RateLimiter(RateLimits(per_s=0.001, burst=14))  # alice's 15th request: 429
    app = create_app(node, Verifier([ALICE, BOB, ADMIN]), limiter=limiter)
    quart_requests: list[str] = []
    handle_request = app.handle_request

    async def counted(request: Any) -> Any:
        quart_requests.append(request.path)
        return await handle_request(request)

    app.handle_request = counted  # type: ignore[method-assign]
    out = []

    async def go() -> None:
        client = app.test_client()
        for what, key, path, body in cases():
            if isinstance(body, Exception):
                node.raise_next, body = body, ORDER
            if body == "follower":
                node.leading, body = False, {"market": "BTC-USD", "order_id": 1}
            target = path + "?via=quart" if via_quart else path
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = signed_headers(key, "POST", target, raw)
            if body == "tampered":
                raw = json.dumps(ORDER).encode()
            response = await client.post(target, data=raw, headers=headers)
            node.leading = True
            answer = json.loads(await response.get_data())
            kept = {
                name.lower(): value.replace("?via=quart", "")
                for name, value in response.headers.items()
                if name.lower() not in ("date", "server")
            }
            out.append((what, response.status_code, answer, kept))

    trio.run(go)
    assert bool(quart_requests) == via_quart, quart_requests
    return out


def test_the_asgi_order_routes_answer_as_the_quart_routes_do() -> None:
    fast, quart = run(via_quart=False), run(via_quart=True)
    assert [(what, status) for what, status, _, _ in fast] == [
        ("place", 201),
        ("place again: duplicate", 409),
        ("amend", 200),
        ("cancel", 200),
        ("cancel a gone order", 404),
        ("cancel-all: none open", 422),
        ("no funds", 422),
        ("precheck: zero qty", 400),
        ("empty body", 400),
        ("malformed JSON", 400),
        ("not an object", 400),
        ("reserved field", 400),
        ("admin key", 403),
        ("unknown key", 401),
        ("bad signature", 401),
        ("outcome unknown", 503),
        ("deposed meanwhile", 307),
        ("follower", 307),
        ("rate limited", 429),
    ]
    for one, other in zip(fast, quart, strict=True):
        assert one == other
    by_case = {what: (body, headers) for what, _, body, headers in fast}
    assert by_case["follower"][1]["location"] == "http://127.0.0.1:9001/v1/orders/cancel"
    assert by_case["deposed meanwhile"][1]["location"] == "http://127.0.0.1:9003/v1/orders"
    assert by_case["rate limited"][1]["retry-after"] == "1000"  # 1 token at 0.001/s
    assert by_case["place"][0]["order_id"] == 1 and by_case["place"][1] == {
        "content-type": "application/json",
        "content-length": str(len(json.dumps(by_case["place"][0], separators=(",", ":")))),
    }


def test_a_body_over_the_limit_gets_the_same_413_on_either_path() -> None:
    """A Content-Length over the app's limit goes to the Quart route; a body without one that
    grows past it (chunked) is cut off on the ASGI path: the same answer."""
    assert fastpath.content_length([(b"content-length", b"12")]) == 12
    assert fastpath.content_length([(b"Content-Length", b"12")]) == 12
    assert fastpath.content_length([]) is None
    assert fastpath.content_length([(b"content-length", b"1"), (b"content-length", b"1")]) is None
    assert fastpath.content_length([(b"content-length", b"-1")]) is None
    app = create_app(ExchangeLeader(), Verifier([ALICE]))
    raw = b" " * (MAX_BODY_BYTES + 1)
    signed = signed_headers(ALICE, "POST", "/v1/orders", raw)

    async def post(headers: dict) -> tuple[int, dict, str]:
        response = await app.test_client().post("/v1/orders", data=raw, headers=headers)
        body = json.loads(await response.get_data())
        return response.status_code, body, response.headers["Content-Type"]

    declared = trio.run(post, {**signed, "Content-Length": str(len(raw))})
    undeclared = trio.run(post, signed)  # Quart's test client sends no Content-Length
    assert declared == undeclared
    assert declared[:2] == (413, declared[1]) and declared[1]["error"]["code"] == (
        "request_entity_too_large"
    )


def test_a_body_that_never_ends_gets_the_same_408_on_either_path() -> None:
    """Quart gives a request body `BODY_TIMEOUT` (60 s) to arrive; so does the ASGI path."""
    app = create_app(ExchangeLeader(), Verifier([ALICE]))

    async def post(query: bytes) -> tuple[int, dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            await trio.sleep_forever()  # the client sends its headers, then nothing

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/orders",
            "raw_path": b"/v1/orders", "query_string": query, "root_path": "",
            "headers": [(b"host", b"node"), (b"content-length", b"10")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
        }  # fmt: skip
        with trio.move_on_after(3600):
            await app(scope, receive, send)
        start, body = [m for m in sent if m["type"].startswith("http.response")][:2]
        return start["status"], json.loads(body["body"])

    clock = trio.testing.MockClock(autojump_threshold=0)
    fast = trio.run(post, b"", clock=clock)
    quart = trio.run(post, b"via=quart", clock=clock)
    assert fast == quart
    assert (fast[0], fast[1]["error"]["code"]) == (408, "request_timeout")
