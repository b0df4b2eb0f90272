"""The request bodies (api/bodies.py) against the state machine, their one judge.

The OpenAPI document's request schemas are generated from the Structs; the state machine
decides what a command's fields may be. This test holds the two to the same verdicts: for
bodies built field by field from valid and broken values, the generated schema refuses
exactly those the state machine refuses for their shape (a missing, unknown, mistyped,
out-of-range or malformed field), and accepts those it accepts or refuses only for the state
it is in (an unknown order, funds). A limit changed on one side only fails here.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import bodies
from statemachine import Exchange
from statemachine import validation as v

# Rejections for a field's shape: the schema must say the same.
SHAPE_REASONS = {
    "missing_field",
    "unknown_field",
    "wrong_type",
    "ambiguous_order_ref",
    *(
        f"bad_{name}"
        for name in [
            "qty",
            "price",
            "market",
            "asset",
            "account",
            "client_order_id",
            "ref",
            "order_id",
            "side",
            "order_type",
            "tif",
            "stp",
            "lot_size",
            "tick_size",
            "fee",
            "amount",
        ]
    ),
}
# Rejections the schema cannot express (a relation between fields and the market, or sums).
BEYOND_SCHEMA = {"same_asset", "notional_too_large", "bad_tick", "amount_too_large"}

MARKET = "BTC-USD"
COID = "c-1"  # the open order's client_order_id; its order_id is ORDER_ID
SETUP = [
    {
        "op": "create_market",
        "market": MARKET,
        "base": "BTC",
        "quote": "USD",
        "lot_size": 1,
        "tick_size": 1,
        "maker_fee_bps": 0,
        "taker_fee_bps": 0,
    },
    {"op": "deposit", "account": "alice", "asset": "USD", "amount": 10**15, "ref": "f-usd"},
    {"op": "deposit", "account": "alice", "asset": "BTC", "amount": 10**15, "ref": "f-btc"},
    {
        "op": "place",
        "account": "alice",
        "market": MARKET,
        "side": "buy",
        "type": "limit",
        "price": 100,
        "qty": 5,
        "client_order_id": COID,
    },
]


def _setup_blob() -> tuple[bytes, int]:
    ex = Exchange()
    for ts, command in enumerate(SETUP, 1):
        events = ex.apply({**command, "ts": ts})
        assert events[0]["type"] != "rejected", events
    order_id = ex.order_id_for("alice", COID)
    assert order_id is not None
    return ex.snapshot(), order_id


BLOB, ORDER_ID = _setup_blob()

NOT_INTS = st.sampled_from([None, True, 1.5, [], {}, "7"])
NOT_STRINGS = st.sampled_from([None, True, 1.5, [], {}, 7])
INTS = {
    "qty": (1, v.MAX_QTY),
    "price": (1, v.MAX_PRICE),
    "amount": (1, v.MAX_AMOUNT),
    "lot_size": (1, v.MAX_QTY),
    "tick_size": (1, v.MAX_PRICE),
    "maker_fee_bps": (0, v.MAX_FEE_BPS),
    "taker_fee_bps": (0, v.MAX_FEE_BPS),
}
CHOICES = {"side": v.SIDES, "type": v.ORDER_TYPES, "tif": v.TIFS, "stp": v.STPS}


def field_values(op: str, name: str) -> st.SearchStrategy[Any]:
    """Valid values (such that the state holds for them) and broken ones for one field."""
    if name in INTS:
        lo, hi = INTS[name]
        valid = st.one_of(st.sampled_from([lo, hi]), st.integers(lo, min(hi, 10**6)))
        broken = st.sampled_from([lo - 1, hi + 1, -5, 2**64])
    elif name in CHOICES:
        valid = st.sampled_from(CHOICES[name])
        broken = st.sampled_from(["", "BUY", "gtc ", "other"])
    elif name == "market":
        # Only the existing market among the valid names: another would be unknown_market,
        # which the state decides before the other fields.
        valid = st.just(MARKET) if op != "create_market" else st.sampled_from(["ETH-USD", "X"])
        broken = st.sampled_from(["", "a" * 33, "bad market", "é"])
    elif name in ("asset", "base", "quote"):
        valid = st.sampled_from(["USD", "BTC", "ETH"])
        broken = st.sampled_from(["", "usd", "A" * 17, "U S"])
    elif name == "order_id":
        valid = st.just(ORDER_ID)
        broken = st.sampled_from([0, -1, v.MAX_ID + 1])
    elif name in ("client_order_id", "ref"):
        valid = (
            st.just(COID)
            if name == "client_order_id" and op != "place"
            else st.sampled_from(["r-9", "x", "~" * 64, "a b"])
        )
        broken = st.sampled_from(["", " x", "x ", "a" * 65, "é", "\t"])
    else:
        raise AssertionError(f"no values for {name}")
    wrong = NOT_INTS if name in INTS or name == "order_id" else NOT_STRINGS
    # Mostly valid values: a body reaches the state machine's later checks only when every
    # field before them is valid.
    return st.integers(0, 9).flatmap(lambda n: valid if n < 7 else broken if n < 9 else wrong)


@st.composite
def command_bodies(draw, op: str) -> dict:
    body = {}
    for field in msgspec.structs.fields(bodies.COMMAND_BODIES[op]):
        # Required fields are there most of the time: else every body is missing one.
        if draw(st.integers(0, 9)) < (9 if field.required else 5):
            body[field.name] = draw(field_values(op, field.name))
    if draw(st.integers(0, 9)) == 0:
        body["surprise"] = 1
    return body


SCHEMAS = bodies.schemas()


def schema_verdict(op: str, body: dict) -> bool:
    schema = SCHEMAS[bodies.COMMAND_BODIES[op].__name__]
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def state_machine_reason(op: str, body: dict) -> str | None:
    ex = Exchange.restore(BLOB)
    command = {**body, "op": op, "ts": ex.last_ts}
    if op not in ("create_market",):
        command["account"] = "alice"
    first = ex.apply(command)[0]
    return first["reason"] if first["type"] == "rejected" else None


@pytest.mark.parametrize("op", sorted(bodies.COMMAND_BODIES))
@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_the_schema_and_the_state_machine_agree_on_every_body(op: str, data) -> None:
    body = data.draw(command_bodies(op))
    reason = state_machine_reason(op, body)
    valid = schema_verdict(op, body)
    if reason in BEYOND_SCHEMA:
        return
    if reason in SHAPE_REASONS:
        assert not valid, f"{op} {body}: the state machine refuses it ({reason}), the schema not"
    else:
        assert valid, f"{op} {body}: the schema refuses it, the state machine says {reason}"


def test_the_limits_come_from_the_state_machine() -> None:
    order = SCHEMAS["OrderRequest"]["properties"]
    assert order["qty"]["maximum"] == v.MAX_QTY and order["price"]["maximum"] == v.MAX_PRICE
    market = SCHEMAS["CreateMarketRequest"]["properties"]
    assert market["lot_size"]["maximum"] == v.MAX_QTY
    assert market["tick_size"]["maximum"] == v.MAX_PRICE
    assert market["maker_fee_bps"]["maximum"] == v.MAX_FEE_BPS
    assert v.ACCOUNT_PATTERN in SCHEMAS["KeyRequest"]["properties"]["account"]["pattern"]


@pytest.mark.parametrize(
    ("kind", "raw", "status", "code"),
    [
        (bodies.MembersRequest, b'{"action": "add"}', 400, "bad_request"),
        (
            bodies.MembersRequest,
            b'{"action": "grow", "id": "n", "raft_addr": "a", "api_url": "u"}',
            400,
            "bad_request",
        ),
        (bodies.MembersRequest, b"not json", 400, "malformed_json"),
        (bodies.MembersRequest, b"[1, 2]", 400, "bad_request"),
        (bodies.KeyRequest, b'{"account": "_fees"}', 400, "bad_account"),
        (bodies.KeyRequest, b'{"account": 7}', 400, "bad_request"),
        (bodies.KeyRequest, b'{"account": "a", "role": "root"}', 400, "bad_request"),
        (bodies.KeyRequest, b'{"account": "a", "extra": 1}', 400, "bad_request"),
        (bodies.CommandsRequest, b'{"commands": []}', 400, "bad_request"),
        (
            bodies.CommandsRequest,
            msgspec.json.encode({"commands": [{}] * 1001}),
            413,
            "too_many_commands",
        ),
        (bodies.BatchRequest, msgspec.json.encode({"orders": [{}] * 101}), 413, "batch_too_large"),
        (bodies.BatchRequest, b'{"orders": [1]}', 400, "bad_request"),
        (bodies.TransferRequest, b'{"to": 3}', 400, "bad_request"),
    ],
)
def test_a_body_that_does_not_fit_gets_a_4xx_naming_the_field(kind, raw, status, code) -> None:
    with pytest.raises(bodies.BodyError) as caught:
        bodies.decode(raw, kind)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.message


def test_bodies_that_fit_decode_into_their_types() -> None:
    assert bodies.decode(b"", bodies.TransferRequest).to is None
    assert bodies.decode(b'{"to": "n2"}', bodies.TransferRequest).to == "n2"
    assert bodies.decode(b'{"account": "alice"}', bodies.KeyRequest).role == "trader"
    members = bodies.decode(
        b'{"action": "add", "id": "n4", "raft_addr": "h:1", "api_url": "http://h:2"}',
        bodies.MembersRequest,
    )
    assert (members.action, members.id) == ("add", "n4")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", "malformed_json"),
        (b"[]", "bad_request"),
        (b'{"op": "place"}', "field_not_allowed"),
        (b'{"account": "bob"}', "field_not_allowed"),
    ],
)
def test_command_fields_refuse_what_the_node_sets(raw, code) -> None:
    with pytest.raises(bodies.BodyError) as caught:
        bodies.command_fields(raw)
    assert caught.value.code == code
    assert bodies.command_fields(b"") == {}
