"""Every request body of the API, once, as typed msgspec Structs.

The OpenAPI document's request schemas are generated from these (api/openapi.py), and their
limits and patterns come from `statemachine.validation`, the state machine's own checks: one
place. Two kinds of body:

* Bodies the node itself acts on (admin routes, the batch and command envelopes): decoded
  into the Struct at the edge; a body that does not fit gets a 400 naming the field, and
  nothing else happens.
* The fields of a state-machine command (orders, cancels, markets, money): the state machine
  is their one judge (a body the node would refuse in any state is answered without the log,
  with the state machine's reason as the error code: statemachine/precheck.py). Their Structs
  describe exactly what it accepts, for the document and the SDK; a property test
  (tests/api/test_bodies.py) holds the two to the same verdicts.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from statemachine import validation as v

from .sdk.codec import loads

# --------------------------------------------------------------------------- field types


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


AccountId = Annotated[
    str,
    Meta(
        pattern=_anchored(v.ACCOUNT_PATTERN),
        description="`[A-Za-z0-9_.:-]{1,64}`, not starting with `_`",
        examples=["alice"],
    ),
]
AssetId = Annotated[str, Meta(pattern=_anchored(v.ASSET_PATTERN), examples=["USD"])]
MarketId = Annotated[str, Meta(pattern=_anchored(v.MARKET_PATTERN), examples=["BTC-USD"])]
Token = Annotated[
    str,
    Meta(
        pattern=_anchored(v.TOKEN_PATTERN),
        description="printable ASCII, 1-64 characters, no space at either end",
    ),
]
Qty = Annotated[int, Meta(ge=1, le=v.MAX_QTY, description="lots")]
Price = Annotated[int, Meta(ge=1, le=v.MAX_PRICE, description="quote minor units per lot")]
Amount = Annotated[int, Meta(ge=1, le=v.MAX_AMOUNT, description="minor units")]
OrderId = Annotated[int, Meta(ge=1, le=v.MAX_ID)]
FeeBps = Annotated[int, Meta(ge=0, le=v.MAX_FEE_BPS)]
Side = Literal["buy", "sell"]
OrderType = Literal["limit", "market"]
Tif = Literal["gtc", "ioc", "fok", "post_only"]
Stp = Literal["cancel_taker", "cancel_maker", "cancel_both", "none"]
NonEmpty = Annotated[str, Meta(min_length=1)]

assert Side.__args__ == v.SIDES and OrderType.__args__ == v.ORDER_TYPES  # type: ignore[attr-defined]
assert Tif.__args__ == v.TIFS and Stp.__args__ == v.STPS  # type: ignore[attr-defined]


class Body(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A request body. `field_codes`: the error code for a field whose value breaks its
    constraints (pattern, range), where the API has a more precise one than bad_request;
    `too_large`: (field, code) of a list over its length limit, answered 413."""

    field_codes: ClassVar[dict[str, str]] = {}
    too_large: ClassVar[tuple[str, str] | None] = None


# --------------------------------------------------------------------------- command fields
# The fields of a state-machine command that a caller sends; `op`, `ts` and (for traders)
# `account` are the node's. Field names, types, limits and defaults: statemachine/validation.py
# and docs/reference/state-machine.md.


class OrderRequest(Body):
    market: MarketId
    side: Side
    type: OrderType
    qty: Qty
    price: Annotated[Price, Meta(description="limit orders only, and required there")] | (
        UnsetType
    ) = UNSET
    tif: Annotated[Tif, Meta(description="default gtc (limit), ioc (market: always ioc)")] | (
        UnsetType
    ) = UNSET
    client_order_id: Token | UnsetType = UNSET
    stp: Stp = "cancel_taker"


class CancelRequest(Body):
    market: MarketId
    order_id: OrderId | UnsetType = UNSET
    client_order_id: Token | UnsetType = UNSET


class AmendRequest(Body):
    market: MarketId
    order_id: OrderId | UnsetType = UNSET
    client_order_id: Token | UnsetType = UNSET
    price: Price | UnsetType = UNSET
    qty: Qty | UnsetType = UNSET


class CancelAllRequest(Body):
    market: MarketId | UnsetType = UNSET


class CreateMarketRequest(Body):
    market: MarketId
    base: AssetId
    quote: AssetId
    lot_size: Annotated[int, Meta(ge=1, le=v.MAX_QTY, description="base minor units per lot")]
    tick_size: Annotated[int, Meta(ge=1, le=v.MAX_PRICE, description="price step")]
    maker_fee_bps: FeeBps
    taker_fee_bps: FeeBps


class MoneyRequest(Body):
    asset: AssetId
    amount: Amount
    ref: Annotated[Token, Meta(description="idempotency key shared by deposits and withdrawals")]


# What the JSON Schema cannot say with fields alone (cross-field rules), added to the generated
# schemas; the state machine is the judge of these too.
SCHEMA_EXTRAS: dict[str, dict[str, Any]] = {
    "OrderRequest": {
        "if": {"properties": {"type": {"const": "market"}}, "required": ["type"]},
        "then": {"not": {"required": ["price"]}, "properties": {"tif": {"const": "ioc"}}},
        "else": {"required": ["price"]},
    },
    "CancelRequest": {"oneOf": [{"required": ["order_id"]}, {"required": ["client_order_id"]}]},
    "AmendRequest": {
        "oneOf": [{"required": ["order_id"]}, {"required": ["client_order_id"]}],
        "anyOf": [{"required": ["price"]}, {"required": ["qty"]}],
    },
}

COMMAND_BODIES: dict[str, type[Body]] = {
    "place": OrderRequest,
    "cancel": CancelRequest,
    "amend": AmendRequest,
    "cancel_all": CancelAllRequest,
    "create_market": CreateMarketRequest,
    "deposit": MoneyRequest,
    "withdraw": MoneyRequest,
}

# --------------------------------------------------------------------------- node bodies

MAX_COMMANDS = 1000
MAX_BATCH_ORDERS = 100
# The fields of a command the node sets; a trader's body may not.
RESERVED_FIELDS = ("op", "ts", "account")


class CommandsRequest(Body):
    """POST /v1/admin/commands: whole commands (the state machine judges each)."""

    commands: Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=MAX_COMMANDS)]

    too_large: ClassVar[tuple[str, str] | None] = ("$.commands", "too_many_commands")


class BatchRequest(Body):
    """POST /v1/orders/batch and the WebSocket's place_batch: order fields per order (the
    state machine judges each; an order it refuses gets its error in its own result)."""

    orders: Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=MAX_BATCH_ORDERS)]

    too_large: ClassVar[tuple[str, str] | None] = ("$.orders", "batch_too_large")


class MembersRequest(Body):
    action: Literal["add", "remove"]
    id: NonEmpty
    raft_addr: Annotated[str, Meta(min_length=1, examples=["127.0.0.1:7004"])]
    api_url: Annotated[str, Meta(min_length=1, examples=["http://127.0.0.1:8004"])]


class TransferRequest(Body):
    to: Annotated[str, Meta(description="a node id; absent: the most caught-up peer")] | None = None


class KeyRequest(Body):
    account: AccountId
    role: Literal["trader", "admin"] = "trader"

    field_codes: ClassVar[dict[str, str]] = {"$.account": "bad_account"}


class DepositAddressRequest(Body):
    """`POST /v1/admin/deposit-addresses`: an EVM chain's address assigned to an account."""

    account: AccountId
    chain_id: Annotated[int, Meta(ge=1, le=2**53 - 1, examples=[1])]
    address: Annotated[
        str,
        Meta(
            pattern=r"^0x[0-9a-fA-F]{40}$", examples=["0x70997970c51812dc3a010c7d01b50e0d17dc79c8"]
        ),
    ]

    field_codes: ClassVar[dict[str, str]] = {
        "$.account": "bad_account",
        "$.chain_id": "bad_chain_id",
        "$.address": "bad_address",
    }


class EmptyRequest(Body):
    """A route that takes no fields (an empty body, or `{}`)."""


REQUEST_BODIES: tuple[type[Body], ...] = (
    OrderRequest,
    CancelRequest,
    AmendRequest,
    CancelAllRequest,
    CreateMarketRequest,
    MoneyRequest,
    CommandsRequest,
    BatchRequest,
    MembersRequest,
    TransferRequest,
    KeyRequest,
    DepositAddressRequest,
    EmptyRequest,
)

# --------------------------------------------------------------------------- decoding


class BodyError(ValueError):
    """A body that does not decode into its Struct: `status`, `code` and a message naming the
    field, for the 4xx answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_DECODERS: dict[type, msgspec.json.Decoder] = {}


def decode(raw: bytes, kind: type[Body]) -> Any:
    """`raw` (empty: `{}`) as a `kind`, or BodyError."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw or b"{}")
    except msgspec.ValidationError as exc:
        raise _body_error(str(exc), kind) from None
    except msgspec.DecodeError:
        raise BodyError(400, "malformed_json", "body is not valid JSON") from None


def convert(value: Any, kind: type[Body]) -> Any:
    """An already decoded message (a WebSocket frame's fields) as a `kind`, or BodyError."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise _body_error(str(exc), kind) from None


def _body_error(text: str, kind: type[Body]) -> BodyError:
    # msgspec says what and where: "Expected `int` >= 1 - at `$.qty`", "Object missing
    # required field `market`", "Object contains unknown field `x`".
    path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else ""
    if kind.too_large is not None and path == kind.too_large[0] and "length <=" in text:
        return BodyError(413, kind.too_large[1], text)
    constraint = "matching regex" in text or ">=" in text or "<=" in text
    return BodyError(
        400, kind.field_codes.get(path, "bad_request") if constraint else "bad_request", text
    )


def command_fields(raw: bytes, reserved: tuple[str, ...] = RESERVED_FIELDS) -> dict[str, Any]:
    """The fields of a state-machine command from a body: a JSON object (empty: `{}`) that sets
    none of `reserved`. Its fields are the state machine's to judge. BodyError otherwise."""
    try:
        payload = loads(raw) if raw else {}  # the API's codec: NaN, big integers as it reads them
    except ValueError:
        raise BodyError(400, "malformed_json", "body is not valid JSON") from None
    if type(payload) is not dict:
        raise BodyError(400, "bad_request", "body must be a JSON object")
    for name in reserved:
        if name in payload:
            raise BodyError(400, "field_not_allowed", f"field {name!r} is set by the server")
    return payload


def schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas (OpenAPI 3.1 components) of every request body, by Struct name."""
    _, components = msgspec.json.schema_components(
        REQUEST_BODIES, ref_template="#/components/schemas/{name}"
    )
    for name, extra in SCHEMA_EXTRAS.items():
        components[name] = {**components[name], **extra}
    return components
