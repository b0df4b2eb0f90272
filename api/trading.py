"""The trading API: orders, markets, books, trades, balances (REST under /v1).

Every private route is signed (api/auth.py) with a trader key bound to one account: the
command's `account` always comes from the key, never from the body, so a key can only touch
its own orders. Rejections of the state machine become 4xx with the state machine's reason as
the error code; nothing rejected changes state. Reads are linearizable by default (served by
the leader after a read barrier); `?consistency=stale` is served by any node from its applied
state and says which `seq` it reflects in `X-QB-Seq`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from . import bodies, outcomes
from .auth import AuthError, Credentials
from .bodies import RESERVED_FIELDS, BatchRequest
from .common import Http, Reply, answer_reply, error, full_path, json_response, reply_response
from .port import NodeError, NodePort
from .sdk.answers import summarize

MAX_DEPTH = 1000

# State machine reason -> HTTP status. Anything not listed is a 400 (malformed or invalid).
REASON_STATUS = {
    "unknown_market": 404,
    "unknown_order": 404,
    "duplicate_client_order_id": 409,
    "duplicate_ref": 409,
    "market_exists": 409,
    "insufficient_funds": 422,
    "post_only_would_cross": 422,
    "fok_unfillable": 422,
    "no_open_orders": 422,
    "no_change": 422,
}
TRADER_OPS = ("place", "cancel", "amend", "cancel_all")
# The single-order write routes: path -> (op, status of a command that took effect). Served by
# the Quart routes below and, in front of them, on ASGI (api/fastpath.py), from this table.
SINGLE_WRITES = {
    "/v1/orders": ("place", 201),
    "/v1/orders/cancel": ("cancel", 200),
    "/v1/orders/amend": ("amend", 200),
    "/v1/orders/cancel-all": ("cancel_all", 200),
}


def public_trade(e: dict) -> dict:
    return {
        k: v
        for k, v in e.items()
        if k not in ("maker_account", "taker_account", "maker_fee", "taker_fee")
    }


def command_outcome(events: list[dict], account: str | None = None) -> tuple[int, dict]:
    """(REST status, body) of one command's events: the summary, or the rejection as an error."""
    first = events[0]
    if first["type"] == "rejected":
        body = {"error": {"code": first["reason"], "message": first["message"]}}
        if "seq" in first:  # absent when the node refused it before the log
            body["seq"] = first["seq"]
        if "order_id" in first:
            body["error"]["order_id"] = first["order_id"]
        return REASON_STATUS.get(first["reason"], 400), body
    return 200, summarize(events, account)


def batch_orders(payload: Any) -> list[dict]:
    """The orders of a batch (`{"orders": [order, ...]}`, decoded: REST's body or the
    WebSocket's place_batch): 1..MAX_BATCH_ORDERS objects that leave op/ts/account to the
    server (their fields are the state machine's to judge); BodyError otherwise."""
    orders = bodies.convert(payload, BatchRequest).orders
    for order in orders:
        if any(f in order for f in RESERVED_FIELDS):
            raise bodies.BodyError(
                400, "field_not_allowed", "an order may not set op, ts or account"
            )
    return orders


async def place_batch(
    node: NodePort, account: str, orders: list[dict], request: tuple[str, int] | None = None
) -> list[dict]:
    """Place `orders` for `account`: one result per order, `{http_status, ...body}`.

    Orders the log would refuse in any state are answered here; the rest go in one slot,
    committed together, in the order given (with the signed `request` they came in, if any).
    Raises NotLeaderError / OutcomeUnknownError, or AuthError when the cluster's replay
    window refuses the request (none of its orders placed).
    """
    commands = [{"op": "place", **order, "account": account} for order in orders]
    refused = [node.precheck(command) for command in commands]
    outcomes: list[list[dict] | None] = [None if early is None else [early] for early in refused]
    pending = [i for i, events in enumerate(outcomes) if events is None]
    submitted = await node.submit_many([commands[i] for i in pending], request) if pending else []
    for i, events in zip(pending, submitted, strict=True):
        outcomes[i] = events
    results = []
    for events in outcomes:
        status, body = command_outcome(events, account)
        results.append({"http_status": 201 if status == 200 else status, **body})
    return results


async def write_reply(
    node: NodePort, command: dict, ok_status: int, signed: tuple[str, int], path: str
) -> Reply:
    """Submit one command from a request signed `signed` (signature, ts_ms) at `path`; the
    answer, or what the node answers instead (api/outcomes.py).

    A trader command the log would refuse in any state is answered without it."""
    if not node.is_leader():
        return answer_reply(outcomes.not_leader(node.leader_url()), path)
    account = command.get("account") if command.get("op") in TRADER_OPS else None
    events = node.precheck(command)
    if events is None:
        try:
            status, body = command_outcome(await node.submit(command, signed), account)
        except (NodeError, AuthError) as exc:
            return answer_reply(outcomes.answer(exc, node.leader_url()), path)
    else:
        status, body = command_outcome([events], account)
    return (ok_status if status == 200 else status), body, {}


def register(app: QuartTrio, node: NodePort, http: Http) -> None:
    authed = http.authed

    async def write(command: dict, ok_status: int = 200) -> Response:
        return reply_response(
            await write_reply(node, command, ok_status, http.signed_request(), full_path())
        )

    async def read(query: Callable[[Any], Any]) -> Response:
        """Linearizable by default (leader + read barrier); ?consistency=stale: any node."""
        consistency = request.args.get("consistency", "linearizable")
        if consistency not in ("linearizable", "stale"):
            return error(400, "bad_consistency", "consistency must be linearizable or stale")
        # (getattr: a node port without the attribute is a safe one.)
        if consistency == "linearizable" and not getattr(node, "unsafe_local_reads", False):
            if not node.is_leader():
                return http.not_leader()
            await node.read_barrier()
        seq, value = node.read(lambda ex: (ex.seq, query(ex)))
        if isinstance(value, Response):
            return value
        return json_response(value, 200, {"X-QB-Seq": str(seq), "X-QB-Consistency": consistency})

    # -------------------------------------------------------------- orders

    def single_write(op: str, ok_status: int) -> Callable[..., Any]:
        @authed()
        async def route(creds: Credentials) -> Response:
            fields = await http.command_fields()
            return await write({"op": op, **fields, "account": creds.account}, ok_status)

        return route

    for path, (op, ok_status) in SINGLE_WRITES.items():
        app.add_url_rule(path, f"{op}_order", single_write(op, ok_status), methods=["POST"])

    @app.post("/v1/orders/batch")
    @authed()
    async def place_orders(creds: Credentials) -> Response:
        orders = batch_orders(await http.command_fields(reserved=()))
        if not node.is_leader():
            return http.not_leader()
        results = await place_batch(node, creds.account, orders, http.signed_request())
        return json_response({"results": results})

    def order_view(ex: Any, account: str, order_id: int | None) -> dict | Response:
        live = ex.order(order_id) if order_id is not None else None
        if live is not None and live["account"] == account:
            return {"status": "open", **live}
        return error(404, "unknown_order", "no open order with this id for this account")

    @app.get("/v1/orders/<int:order_id>")
    @authed()
    async def get_order(creds: Credentials, order_id: int) -> Response:
        return await read(lambda ex: order_view(ex, creds.account, order_id))

    @app.get("/v1/orders/by-client-id/<path:client_order_id>")
    @authed()
    async def get_order_by_client_id(creds: Credentials, client_order_id: str) -> Response:
        """The SDK's outcome look-up: was this client_order_id ever accepted, and is it open?"""

        def query(ex: Any) -> dict:
            order_id = ex.order_id_for(creds.account, client_order_id)
            if order_id is None:
                return {"client_order_id": client_order_id, "status": "unknown"}
            live = ex.order(order_id)
            if live is not None:
                return {"status": "open", **live}
            return {"client_order_id": client_order_id, "order_id": order_id, "status": "done"}

        return await read(query)

    @app.get("/v1/orders")
    @authed()
    async def open_orders(creds: Credentials) -> Response:
        market = request.args.get("market")
        return await read(
            lambda ex: {"orders": ex.open_orders(account=creds.account, market=market)}
        )

    # -------------------------------------------------------------- markets and accounts

    @app.get("/v1/markets")
    async def markets() -> Response:
        return await read(lambda ex: {"markets": ex.markets()})

    @app.post("/v1/markets")
    @authed("admin")
    async def create_market(creds: Credentials) -> Response:
        fields = await http.command_fields()
        return await write({"op": "create_market", **fields}, 201)

    @app.get("/v1/markets/<path:market>/book")  # path: a market name may hold "/"
    async def book(market: str) -> Response:
        depth_text = request.args.get("depth", "50")
        if not depth_text.isdigit() or not 1 <= int(depth_text) <= MAX_DEPTH:
            return error(400, "bad_depth", f"depth must be an integer in [1, {MAX_DEPTH}]")
        depth = int(depth_text)

        def query(ex: Any) -> dict | Response:
            if market not in {m["market"] for m in ex.markets()}:
                return error(404, "unknown_market", f"unknown market {market!r}")
            return {
                "market": market,
                "seq": ex.seq,
                "bids": ex.book_levels(market, "buy", depth),
                "asks": ex.book_levels(market, "sell", depth),
            }

        return await read(query)

    @app.get("/v1/markets/<path:market>/trades")
    async def trades(market: str) -> Response:
        limit_text = request.args.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            return error(400, "bad_limit", "limit must be an integer in [1, 1000]")
        limit = int(limit_text)

        def query(ex: Any) -> dict | Response:
            if market not in {m["market"] for m in ex.markets()}:
                return error(404, "unknown_market", f"unknown market {market!r}")
            return {
                "market": market,
                "trades": [public_trade(t) for t in node.recent_trades(market, limit)],
            }

        return await read(query)

    @app.get("/v1/accounts/me/balances")
    @authed()
    async def my_balances(creds: Credentials) -> Response:
        def query(ex: Any) -> dict:
            rows = ex.balances(creds.account)
            return {
                "account": creds.account,
                "balances": [
                    {"asset": asset, "available": a, "reserved": r}
                    for (_, asset), (a, r) in rows.items()
                ],
            }

        return await read(query)

    @app.post("/v1/accounts/<string:account>/deposits")
    @authed("admin")
    async def deposit(creds: Credentials, account: str) -> Response:
        fields = await http.command_fields()
        return await write({"op": "deposit", **fields, "account": account}, 201)

    @app.post("/v1/accounts/<string:account>/withdrawals")
    @authed("admin")
    async def withdraw(creds: Credentials, account: str) -> Response:
        fields = await http.command_fields()
        return await write({"op": "withdraw", **fields, "account": account}, 201)
