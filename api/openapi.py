"""The OpenAPI 3.1 document of the node's REST API, served by every node at `GET /v1/openapi.json`.

Request bodies are generated from their Structs (api/bodies.py), whose limits and patterns are
the state machine's (statemachine/validation.py); answers are written here from small helpers,
with the same limits. Three tests keep it true: `tests/api/test_openapi.py` (same routes and
methods as `app.url_map`, a valid document, the security each route enforces),
`tests/api/test_bodies.py` (the request schemas refuse exactly what the state machine refuses
for its shape) and `tests/integration/test_openapi.py` (schemathesis against a real cluster:
every answer has a documented status, headers and body).

Each operation names the traits that decide its error answers (signed, leader-only, a read,
a command for the state machine, a JSON body); `_errors` turns them into responses whose
`error.code` is an enum of exactly the codes that status can carry there.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from statemachine import validation as v

from . import bodies
from .auth import KEY_HEADER, SIG_HEADER, TS_HEADER, WINDOW_MS

PATH = "/v1/openapi.json"

Schema = dict[str, Any]

# --------------------------------------------------------------------------- schema helpers


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def integer(minimum: int | None = None, maximum: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", **extra}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def string(pattern: str | None = None, **extra: Any) -> Schema:
    return {"type": "string", **extra} | ({"pattern": pattern} if pattern else {})


def enum(*values: str, **extra: Any) -> Schema:
    return {"type": "string", "enum": list(values), **extra}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def obj(
    properties: dict[str, Schema],
    required: tuple[str, ...] = (),
    *,
    closed: bool = False,
    **extra: Any,
) -> Schema:
    """An object; `closed`: other fields are refused (request bodies the state machine checks)."""
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


# --------------------------------------------------------------------------- components


def field(kind: Any, **extra: Any) -> Schema:
    """The JSON Schema of one of api/bodies.py's field types (its limits: the state
    machine's), with `extra` keywords."""
    return {**msgspec.json.schema(kind), **extra}


ACCOUNT_ID = field(bodies.AccountId)
ASSET_ID = field(bodies.AssetId)
MARKET_ID = field(bodies.MarketId)
TOKEN_ID = field(bodies.Token)
QTY = field(bodies.Qty)
PRICE = field(bodies.Price)
AMOUNT = field(bodies.Amount)
ORDER_ID = field(bodies.OrderId)
SEQ = integer(1, description="the global event sequence number")

SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": string(),
                    "message": string(),
                    "order_id": integer(description="duplicate_client_order_id: the first order"),
                    "retry_after_s": integer(1, description="429: seconds to wait"),
                },
                ("code", "message"),
            ),
            "seq": integer(description="a state-machine rejection: the `rejected` event's seq"),
        },
        ("error",),
        description='Every error: `{"error": {"code", "message"}}`.',
    ),
    "Event": obj(
        {
            "type": enum(
                "market_created",
                "balance",
                "accepted",
                "rejected",
                "trade",
                "cancelled",
                "amended",
                "filled",
                "book",
            ),
            "seq": SEQ,
            "ts": integer(0, description="ns, stamped by the leader"),
            "cmd_index": integer(1),
        },
        ("type", "seq", "ts", "cmd_index"),
        description='A state-machine event (docs/reference/state-machine.md "Events"), as '
        "the caller may see it: the other party's account and fee are left out.",
    ),
    "CommandResult": obj(
        {"seq": SEQ, "events": array(ref("Event"), minItems=1)}, ("seq", "events")
    ),
    "OrderResult": {
        "allOf": [
            ref("CommandResult"),
            obj(
                {
                    "order_id": ORDER_ID,
                    "client_order_id": nullable(TOKEN_ID),
                    "status": enum("resting", "filled", "cancelled"),
                    "filled_qty": integer(0),
                    "trades": array(ref("Event")),
                },
                ("order_id", "client_order_id", "status", "filled_qty", "trades"),
            ),
        ]
    },
    "BatchResult": {
        "allOf": [
            obj({"http_status": integer(200, 599)}, ("http_status",)),
            {"anyOf": [ref("OrderResult"), ref("Error")]},
        ]
    },
    "Order": obj(
        {
            "order_id": ORDER_ID,
            "client_order_id": nullable(TOKEN_ID),
            "account": ACCOUNT_ID,
            "market": MARKET_ID,
            "side": enum("buy", "sell"),
            "price": PRICE,
            "remaining": integer(0),
            "filled": integer(0),
            "original": QTY,
            "tif": enum("gtc", "ioc", "fok", "post_only"),
            "stp": enum("cancel_taker", "cancel_maker", "cancel_both", "none"),
        },
        (
            "order_id",
            "client_order_id",
            "account",
            "market",
            "side",
            "price",
            "remaining",
            "filled",
            "original",
            "tif",
            "stp",
        ),
    ),
    "OpenOrder": {"allOf": [ref("Order"), obj({"status": enum("open")}, ("status",))]},
    "OrderLookup": {
        "anyOf": [
            ref("OpenOrder"),
            obj(
                {"status": enum("done"), "client_order_id": TOKEN_ID, "order_id": ORDER_ID},
                ("status", "client_order_id", "order_id"),
            ),
            obj(
                {"status": enum("unknown"), "client_order_id": string()},
                ("status", "client_order_id"),
            ),
        ]
    },
    "Market": obj(
        {
            "market": MARKET_ID,
            "base": ASSET_ID,
            "quote": ASSET_ID,
            "lot_size": integer(1),
            "tick_size": integer(1),
            "maker_fee_bps": integer(0, v.MAX_FEE_BPS),
            "taker_fee_bps": integer(0, v.MAX_FEE_BPS),
        },
        ("market", "base", "quote", "lot_size", "tick_size", "maker_fee_bps", "taker_fee_bps"),
    ),
    "Level": array(integer(1), minItems=2, maxItems=2, description="[price, qty]"),
    "Balance": obj(
        {"asset": ASSET_ID, "available": integer(0), "reserved": integer(0)},
        ("asset", "available", "reserved"),
    ),
    "NodeStatus": obj(
        {
            "node_id": string(),
            "role": string(),
            "leader": nullable(string()),
            "term": integer(0),
            "commit_index": integer(0),
            "applied_index": integer(0),
            "cmd_index": integer(0),
            "state_hash": string(),
            "peers": array(obj({})),
        },
        ("node_id", "role", "leader", "term", "commit_index", "applied_index", "cmd_index"),
        description='DESIGN.md "Node status"',
    ),
    # In a batch, an order the state machine refuses gets its error in its own result: the
    # batch itself refuses only a non-object or an order that sets a field the node sets.
    "BatchOrder": {
        "anyOf": [ref("OrderRequest"), obj({})],
        "not": {"anyOf": [{"required": [f]} for f in bodies.RESERVED_FIELDS]},
    },
    # Request bodies, generated from api/bodies.py.
    **bodies.schemas(),
}

# --------------------------------------------------------------------------- errors

# Traits of an operation; each one brings error answers (status -> codes).
SIGNED = "signed"  # X-QB-* headers; a follower sends an unknown key to the leader
LEADER = "leader"  # answered by the leader only, through the log
READ = "read"  # ?consistency=linearizable (the leader, after a read barrier) | stale
BODY = "body"  # reads a JSON object body
COMMAND = "command"  # one command for the state machine: its rejection is the error
ANY_REASON = ("*",)  # any rejection reason of the state machine (not listed here)

REJECTION_STATUS = {  # api/trading.py REASON_STATUS; any other reason is a 400
    404: ("unknown_market", "unknown_order"),
    409: ("duplicate_client_order_id", "duplicate_ref", "market_exists"),
    422: (
        "insufficient_funds",
        "post_only_would_cross",
        "fok_unfillable",
        "no_open_orders",
        "no_change",
    ),
}

TRAIT_ERRORS: dict[str, dict[int, tuple[str, ...]]] = {
    SIGNED: {
        401: ("unauthenticated", "expired", "replayed"),
        403: ("forbidden",),
        413: ("request_entity_too_large",),
        429: ("rate_limited",),
        307: ("not_leader",),
        503: ("no_leader",),
    },
    LEADER: {307: ("not_leader",), 503: ("no_leader", "overloaded")},
    READ: {
        400: ("bad_consistency",),
        307: ("not_leader",),
        503: ("no_leader", "no_quorum", "overloaded"),
    },
    BODY: {
        400: ("malformed_json", "bad_request", "field_not_allowed"),
        413: ("request_entity_too_large",),
    },
    COMMAND: {400: ANY_REASON, 503: ("outcome_unknown",), **REJECTION_STATUS},
}
# Every route can answer these (werkzeug's own errors through the app's error handler).
ALWAYS_ERRORS: dict[int, tuple[str, ...]] = {404: ("not_found",)}

STATUS_TEXT = {
    307: "Not the leader: the same request goes to `Location` (the leader's URL is also in "
    "`X-Leader`).",
    400: "The request is malformed or the state machine rejected the command (its reason is "
    'the code: docs/reference/state-machine.md "Rejection reasons"); nothing changed.',
    401: f"Missing or bad signature, a timestamp more than {WINDOW_MS} ms off (`expired`), or a "
    "signature already seen (`replayed`).",
    403: "The key's role cannot use this route.",
    404: "No such route, market or open order.",
    409: "Already done: a `client_order_id`, `ref` or market used before; nothing changed.",
    413: "The body is over 1 MiB, or a batch is over its limit.",
    422: "Valid, but not possible now (funds, the book); nothing changed.",
    429: "This key is over its rate limit; retry after `Retry-After` seconds. Nothing happened.",
    503: "No leader, no quorum, the node's queue is full (`overloaded`: nothing applied), or "
    "the outcome is unknown (`outcome_unknown`: resend the same command to settle it).",
}
STATUS_HEADERS = {
    307: {"Location": "the same path and query on the leader", "X-Leader": "the leader's API URL"},
    429: {"Retry-After": "seconds"},
    503: {"Retry-After": "seconds"},
}


def header(description: str, schema: Schema | None = None, required: bool = True) -> Schema:
    return {"description": description, "required": required, "schema": schema or string()}


def error_response(status: int, codes: tuple[str, ...]) -> Schema:
    """An error answer whose `error.code` is one of `codes` (any code with ANY_REASON)."""
    schema = ref("Error")
    if not set(ANY_REASON) & set(codes):
        schema = {"allOf": [schema, obj({"error": obj({"code": enum(*codes)})})]}
    response: Schema = {
        "description": STATUS_TEXT[status],
        "content": {"application/json": {"schema": schema}},
    }
    if status in STATUS_HEADERS:
        response["headers"] = {name: header(text) for name, text in STATUS_HEADERS[status].items()}
    return response


def _errors(traits: tuple[str, ...], extra: dict[int, tuple[str, ...]]) -> dict[str, Schema]:
    """The error answers of an operation with these traits: one response per status."""
    codes: dict[int, list[str]] = {status: list(c) for status, c in ALWAYS_ERRORS.items()}
    for table in [TRAIT_ERRORS[t] for t in traits] + [extra]:
        for status, names in table.items():
            listed = codes.setdefault(status, [])
            listed += [n for n in names if n not in listed]
    return {
        str(status): error_response(status, tuple(names)) for status, names in sorted(codes.items())
    }


# --------------------------------------------------------------------------- operations


def json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def path_param(name: str, schema: Schema, example: Any, description: str = "") -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
        "example": example,
    }


CONSISTENCY = query(
    "consistency",
    enum("linearizable", "stale", default="linearizable"),
    "`linearizable` (the leader, after a read barrier) or `stale` (any node, "
    "from its applied state; `X-QB-Seq` says which seq it reflects)",
)
MARKET_PARAM = path_param(
    "market", MARKET_ID, "BTC-USD", 'percent-encoded: a market name may hold "/"'
)
READ_HEADERS = {
    "X-QB-Seq": header("the seq of the state this answer reflects", integer(0)),
    "X-QB-Consistency": header("linearizable or stale", enum("linearizable", "stale")),
}
SECURITY = [{"QbKey": [], "QbTimestamp": [], "QbSignature": []}]


def operation(
    summary: str,
    tag: str,
    *,
    role: str | None = None,
    traits: tuple[str, ...] = (),
    ok: tuple[int, str, Schema],
    body: Schema | None = None,
    params: tuple[Schema, ...] = (),
    errors: dict[int, tuple[str, ...]] | None = None,
    description: str = "",
    media_type: str = "application/json",
    example: Any = None,
) -> Schema:
    """One operation. `role`: the key it must be signed with (admin or trader), else public;
    `ok`: (status, description, schema) of the success answer; `example`: a request body."""
    status, ok_text, ok_schema = ok
    if role is not None:
        traits = (SIGNED, *traits)
    if READ in traits:
        params = (*params, CONSISTENCY)
    if body is not None:
        traits = (*traits, BODY)
    success: Schema = {"description": ok_text, "content": {media_type: {"schema": ok_schema}}}
    if READ in traits:
        success["headers"] = READ_HEADERS
    op: Schema = {
        "summary": summary,
        "tags": [tag],
        "operationId": _operation_id(summary),
        "responses": {str(status): success, **_errors(traits, errors or {})},
    }
    if description:
        op["description"] = description
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": True, "content": json_content(body)}
        if example is not None:
            op["requestBody"]["content"]["application/json"]["example"] = example
    if role is not None:
        op["security"] = SECURITY
        op["x-qb-role"] = role  # which key: the tests sign with it
    return op


def _operation_id(summary: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in summary).split()
    return words[0].lower() + "".join(w.capitalize() for w in words[1:])


ORDER_EXAMPLE = {"market": "BTC-USD", "side": "buy", "type": "limit", "qty": 1, "price": 1000}
DEPOSIT_EXAMPLE = {"asset": "USD", "amount": 100_000, "ref": "tx-0001"}
WRITE = (LEADER, COMMAND)  # a trading write: leader only, through the state machine
WRITE_TEXT = "committed; the command's events (the caller's view)"

PATHS: dict[str, dict[str, Schema]] = {
    # ----------------------------------------------------------- health and cluster
    "/healthz": {
        "get": operation(
            "Liveness",
            "cluster",
            ok=(
                200,
                "the node's API is up",
                obj({"ok": {"const": True}, "node_id": string()}, ("ok", "node_id")),
            ),
        )
    },
    "/readyz": {
        "get": operation(
            "Readiness",
            "cluster",
            errors={503: ("not_ready",)},
            description="Ready: a leader is known (this node leads, or follows it over a live "
            "link) and this node has applied the log to within "
            "`ready_max_lag_entries` of the commit index.",
            ok=(
                200,
                "this node can serve",
                obj(
                    {
                        "ready": {"const": True},
                        "node_id": string(),
                        "role": string(),
                        "leader": nullable(string()),
                        "lag_entries": integer(),
                    },
                    ("ready", "node_id", "role", "leader", "lag_entries"),
                ),
            ),
        )
    },
    "/metrics": {
        "get": operation(
            "Prometheus metrics",
            "cluster",
            media_type="text/plain",
            ok=(200, "the Prometheus text format", string()),
        )
    },
    "/v1/cluster/status": {
        "get": operation(
            "Node status", "cluster", ok=(200, "this node's view of the cluster", ref("NodeStatus"))
        )
    },
    PATH: {
        "get": operation(
            "OpenAPI document", "cluster", ok=(200, "this document", obj({}, ("openapi", "paths")))
        )
    },
    # ----------------------------------------------------------- admin
    "/v1/admin/commands": {
        "post": operation(
            "Submit commands",
            "admin",
            role="admin",
            traits=(LEADER,),
            example={"commands": [DEPOSIT_EXAMPLE | {"op": "deposit", "account": "alice"}]},
            body=ref("CommandsRequest"),
            errors={400: ("wrong_type",), 413: ("too_many_commands",), 503: ("outcome_unknown",)},
            description="Raw state-machine commands, committed together in one slot (all or "
            "none). A command the state machine rejects is a `rejected` event in its result, "
            "not an error; a failure of the whole request is its answer (307, 503).",
            ok=(
                200,
                "each command's events",
                obj(
                    {
                        "results": array(obj({"events": array(ref("Event"))}, ("events",))),
                        "elapsed_ms": {"type": "number"},
                    },
                    ("results", "elapsed_ms"),
                ),
            ),
        )
    },
    "/v1/admin/barrier": {
        "post": operation(
            "Read barrier",
            "admin",
            role="admin",
            traits=(LEADER,),
            body=ref("EmptyRequest"),
            errors={503: ("no_quorum",)},
            ok=(
                200,
                "the leader's status once a no-op proposed now has committed",
                ref("NodeStatus"),
            ),
        )
    },
    "/v1/admin/snapshot": {
        "get": operation(
            "Node snapshot",
            "admin",
            role="admin",
            ok=(
                200,
                "this node's state at its applied index (the node snapshot bytes; "
                "`quorumbook backup create` asks a follower); X-QB-Applied-Index, "
                "X-QB-Cmd-Index, X-QB-Seq and X-QB-State-Hash say where it was taken",
                {"type": "string", "format": "binary"},
            ),
            media_type="application/octet-stream",
        )
    },
    "/v1/admin/balances": {
        "get": operation(
            "All balances",
            "admin",
            role="admin",
            params=(query("account", string(), "only this account"),),
            ok=(
                200,
                "this node's applied balances (a stale read)",
                obj(
                    {
                        "node_id": string(),
                        "cmd_index": integer(0),
                        "balances": array(
                            obj(
                                {
                                    "account": string(),
                                    "asset": string(),
                                    "available": integer(0),
                                    "reserved": integer(0),
                                },
                                ("account", "asset", "available", "reserved"),
                            )
                        ),
                    },
                    ("node_id", "cmd_index", "balances"),
                ),
            ),
        )
    },
    "/v1/admin/members": {
        "post": operation(
            "Change membership",
            "admin",
            role="admin",
            traits=(LEADER,),
            example={
                "action": "add",
                "id": "n4",
                "raft_addr": "127.0.0.1:7004",
                "api_url": "http://127.0.0.1:8004",
            },
            body=ref("MembersRequest"),
            description="One change at a time: answered once the change is committed; while "
            "another is uncommitted, 409 membership_change_in_progress with "
            "Retry-After (nothing changed). Asking for what already holds answers "
            "change: unchanged, so a retry is safe.",
            errors={
                409: ("membership_change_in_progress", "membership_change_refused"),
                503: ("outcome_unknown",),
            },
            ok=(
                200,
                "the leader's status once the change is committed",
                {
                    "allOf": [
                        ref("NodeStatus"),
                        obj({"change": enum("added", "removed", "unchanged")}, ("change",)),
                    ]
                },
            ),
        )
    },
    "/v1/admin/transfer-leader": {
        "post": operation(
            "Transfer leadership",
            "admin",
            role="admin",
            traits=(LEADER,),
            example={"to": "n2"},
            body=ref("TransferRequest"),
            errors={404: ("unknown_node",), 409: ("transfer_refused",), 503: ("outcome_unknown",)},
            ok=(
                200,
                "the hand-over was asked for",
                obj({"requested": {"const": True}, "to": nullable(string())}, ("requested", "to")),
            ),
        )
    },
    "/v1/admin/keys": {
        "post": operation(
            "Create an API key",
            "admin",
            role="admin",
            traits=(LEADER,),
            example={"account": "alice", "role": "trader"},
            body=ref("KeyRequest"),
            errors={400: ("bad_account",), 503: ("outcome_unknown", "not_configured")},
            description="The secret is shown once, here; the cluster stores only (key id, account, "
            "role).",
            ok=(
                200,
                "the new key",
                obj(
                    {
                        "key_id": string(),
                        "secret": string(),
                        "account": string(),
                        "role": enum("trader", "admin"),
                    },
                    ("key_id", "secret", "account", "role"),
                ),
            ),
        )
    },
    "/v1/admin/deposit-addresses": {
        "post": operation(
            "Assign a deposit address",
            "admin",
            role="admin",
            traits=(LEADER,),
            example={
                "account": "alice",
                "chain_id": 1,
                "address": "0x70997970c51812dc3a010c7d01b50e0d17dc79c8",
            },
            body=ref("DepositAddressRequest"),
            errors={
                400: ("bad_account", "bad_chain_id", "bad_address"),
                409: ("address_taken",),
                503: ("outcome_unknown",),
            },
            description="Replicated: every node credits what the chain watcher sees sent to "
            "the address to the account. An address is one account's for good: assigning it "
            "again to the same account answers `unchanged` (a retry is safe), to another is "
            "`409 address_taken` and changes nothing. Addresses are stored in lower case.",
            ok=(
                200,
                "the assignment",
                obj(
                    {
                        "change": enum("assigned", "unchanged"),
                        "chain_id": integer(1),
                        "address": string(),
                        "account": string(),
                    },
                    ("change", "chain_id", "address", "account"),
                ),
            ),
        ),
        "get": operation(
            "Deposit addresses",
            "admin",
            role="admin",
            params=(query("chain_id", integer(1), "only this chain"),),
            errors={400: ("bad_chain_id",)},
            ok=(
                200,
                "this node's applied deposit addresses (a stale read)",
                obj(
                    {
                        "node_id": string(),
                        "addresses": array(
                            obj(
                                {"chain_id": integer(1), "address": string(), "account": string()},
                                ("chain_id", "address", "account"),
                            )
                        ),
                    },
                    ("node_id", "addresses"),
                ),
            ),
        ),
    },
    # ----------------------------------------------------------- orders
    "/v1/orders": {
        "post": operation(
            "Place an order",
            "orders",
            role="trader",
            traits=WRITE,
            body=ref("OrderRequest"),
            example=ORDER_EXAMPLE,
            ok=(201, "accepted (it may have traded, rested or been cancelled)", ref("OrderResult")),
        ),
        "get": operation(
            "Open orders",
            "orders",
            role="trader",
            traits=(READ,),
            params=(query("market", string(), "only this market"),),
            ok=(
                200,
                "the caller's open orders, in priority order",
                obj({"orders": array(ref("Order"))}, ("orders",)),
            ),
        ),
    },
    "/v1/orders/batch": {
        "post": operation(
            "Place orders",
            "orders",
            role="trader",
            traits=(LEADER,),
            example={"orders": [ORDER_EXAMPLE, ORDER_EXAMPLE | {"side": "sell", "price": 1100}]},
            body=obj(
                {"orders": array(ref("BatchOrder"), minItems=1, maxItems=bodies.MAX_BATCH_ORDERS)},
                ("orders",),
                closed=True,
            ),
            errors={400: ("wrong_type",), 413: ("batch_too_large",), 503: ("outcome_unknown",)},
            description="Committed together, in the order given; each order has its own outcome "
            "(`http_status` is what `POST /v1/orders` would have answered).",
            ok=(
                200,
                "one result per order",
                obj({"results": array(ref("BatchResult"))}, ("results",)),
            ),
        )
    },
    "/v1/orders/cancel": {
        "post": operation(
            "Cancel an order",
            "orders",
            role="trader",
            traits=WRITE,
            body=ref("CancelRequest"),
            example={"market": "BTC-USD", "order_id": 1},
            ok=(200, WRITE_TEXT, ref("CommandResult")),
        )
    },
    "/v1/orders/amend": {
        "post": operation(
            "Amend an order",
            "orders",
            role="trader",
            traits=WRITE,
            body=ref("AmendRequest"),
            example={"market": "BTC-USD", "order_id": 1, "qty": 1},
            ok=(200, "amended", ref("OrderResult")),
        )
    },
    "/v1/orders/cancel-all": {
        "post": operation(
            "Cancel all orders",
            "orders",
            role="trader",
            traits=WRITE,
            body=ref("CancelAllRequest"),
            example={"market": "BTC-USD"},
            ok=(200, WRITE_TEXT, ref("CommandResult")),
        )
    },
    "/v1/orders/{order_id}": {
        "get": operation(
            "Get an open order",
            "orders",
            role="trader",
            traits=(READ,),
            params=(path_param("order_id", integer(0, v.MAX_ID), 1),),
            errors={404: ("unknown_order",)},
            ok=(200, "the caller's open order", ref("OpenOrder")),
        )
    },
    "/v1/orders/by-client-id/{client_order_id}": {
        "get": operation(
            "Look up a client order id",
            "orders",
            role="trader",
            traits=(READ,),
            params=(
                path_param(
                    "client_order_id",
                    string(minLength=1),
                    "c-1",
                    "percent-encoded; the signature covers the decoded path",
                ),
            ),
            description="The outcome look-up after `503 outcome_unknown`: was this id ever "
            "accepted, and is the order still open?",
            ok=(200, "open (with the order), done, or unknown", ref("OrderLookup")),
        )
    },
    # ----------------------------------------------------------- markets and accounts
    "/v1/markets": {
        "get": operation(
            "Markets",
            "markets",
            traits=(READ,),
            ok=(200, "every market", obj({"markets": array(ref("Market"))}, ("markets",))),
        ),
        "post": operation(
            "Create a market",
            "markets",
            role="admin",
            traits=WRITE,
            body=ref("CreateMarketRequest"),
            example={
                "market": "ETH-USD",
                "base": "ETH",
                "quote": "USD",
                "lot_size": 100,
                "tick_size": 5,
                "maker_fee_bps": 1,
                "taker_fee_bps": 2,
            },
            ok=(201, WRITE_TEXT, ref("CommandResult")),
        ),
    },
    "/v1/markets/{market}/book": {
        "get": operation(
            "Order book",
            "markets",
            traits=(READ,),
            params=(
                MARKET_PARAM,
                query("depth", integer(1, 1000, default=50), "price levels per side"),
            ),
            errors={400: ("bad_depth",), 404: ("unknown_market",)},
            ok=(
                200,
                "aggregated price levels, best first",
                obj(
                    {
                        "market": MARKET_ID,
                        "seq": integer(0),
                        "bids": array(ref("Level")),
                        "asks": array(ref("Level")),
                    },
                    ("market", "seq", "bids", "asks"),
                ),
            ),
        )
    },
    "/v1/markets/{market}/trades": {
        "get": operation(
            "Recent trades",
            "markets",
            traits=(READ,),
            params=(
                MARKET_PARAM,
                query("limit", integer(1, 1000, default=100), "most recent trades"),
            ),
            errors={400: ("bad_limit",), 404: ("unknown_market",)},
            ok=(
                200,
                "this node's recent trades, oldest first, without accounts or fees",
                obj({"market": MARKET_ID, "trades": array(ref("Event"))}, ("market", "trades")),
            ),
        )
    },
    "/v1/accounts/me/balances": {
        "get": operation(
            "My balances",
            "accounts",
            role="trader",
            traits=(READ,),
            ok=(
                200,
                "the caller's non-zero balances",
                obj(
                    {"account": ACCOUNT_ID, "balances": array(ref("Balance"))},
                    ("account", "balances"),
                ),
            ),
        )
    },
    "/v1/accounts/{account}/deposits": {
        "post": operation(
            "Deposit",
            "accounts",
            role="admin",
            traits=WRITE,
            params=(path_param("account", ACCOUNT_ID, "alice"),),
            body=ref("MoneyRequest"),
            example=DEPOSIT_EXAMPLE,
            description="Idempotent by `ref`: a resend is `409 duplicate_ref`.",
            ok=(201, WRITE_TEXT, ref("CommandResult")),
        )
    },
    "/v1/accounts/{account}/withdrawals": {
        "post": operation(
            "Withdraw",
            "accounts",
            role="admin",
            traits=WRITE,
            params=(path_param("account", ACCOUNT_ID, "alice"),),
            body=ref("MoneyRequest"),
            example=DEPOSIT_EXAMPLE,
            description="Idempotent by `ref`: a resend is `409 duplicate_ref`.",
            ok=(201, WRITE_TEXT, ref("CommandResult")),
        )
    },
}

SIGNATURE_TEXT = (
    f"Signed routes need all three headers: `{KEY_HEADER}` (key id), `{TS_HEADER}` (Unix ms) "
    f"and `{SIG_HEADER}` = hex HMAC-SHA256 with the key's secret over "
    '`"{timestamp}\\n{METHOD}\\n{path?query}\\n" + body`, where the path is percent-decoded '
    f"and the query is as sent. A timestamp more than {WINDOW_MS} ms off is `401 expired`; a "
    "signature already seen is `401 replayed`. Admin routes need an admin key; trading routes "
    "a trader key, bound to one account (`x-qb-role` on each operation)."
)


def _security_scheme(name: str, text: str) -> Schema:
    return {"type": "apiKey", "in": "header", "name": name, "description": text}


def document() -> dict:
    """The whole document (a fresh dict: callers may change it)."""
    return copy.deepcopy(_DOCUMENT)


_DOCUMENT: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "quorumbook node API",
        "version": "1",
        "description": (
            "REST under `/v1`, JSON in and out, served by every node "
            "(docs/reference/api.md, docs/reference/admin-api.md). Writes and linearizable "
            "reads go to the leader: a follower answers `307` to the leader, and with no "
            'leader `503` + `Retry-After`. Errors are `{"error": {"code", "message"}}`. '
            "Any route answers `405 method_not_allowed` for a method it does not have. "
            "Market data and order entry over WebSocket at `/v1/ws` "
            "(docs/reference/websocket.md) are not described here.\n\n" + SIGNATURE_TEXT
        ),
    },
    "tags": [{"name": t} for t in ("orders", "markets", "accounts", "admin", "cluster")],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "QbKey": _security_scheme(KEY_HEADER, "the key id"),
            "QbTimestamp": _security_scheme(TS_HEADER, "Unix time in ms"),
            "QbSignature": _security_scheme(SIG_HEADER, SIGNATURE_TEXT),
        },
    },
}
