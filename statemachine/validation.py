"""Shape and range checks for commands.

Every check either returns a clean value or raises `Rejection` with a stable reason code.
Nothing here touches exchange state, so a command rejected at this stage cannot change it.
Types are checked with `type(x) is int` on purpose: `bool` is an `int` subclass in Python and
a `True` quantity must not trade one lot.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import Rejection

MAX_QTY = 10**12
MAX_PRICE = 10**15
MAX_AMOUNT = 2**62
MAX_ID = 2**63 - 1
MAX_TS = 2**63 - 1
MAX_FEE_BPS = 1000
FEE_ACCOUNT = "_fees"

SIDES = ("buy", "sell")
ORDER_TYPES = ("limit", "market")
TIFS = ("gtc", "ioc", "fok", "post_only")
STPS = ("cancel_taker", "cancel_maker", "cancel_both", "none")

# The names a command may carry (matched whole). Public: the API's request schemas use them
# (api/bodies.py), so the limits live in one place.
ACCOUNT_PATTERN = r"[A-Za-z0-9.:-][A-Za-z0-9_.:-]{0,63}"
ASSET_PATTERN = r"[A-Z0-9]{1,16}"
MARKET_PATTERN = r"[A-Za-z0-9_.:/-]{1,32}"
# The definition of a token (client order ids, refs); `is_token` implements it without the regex.
TOKEN_PATTERN = r"[\x21-\x7e][\x20-\x7e]{0,62}[\x21-\x7e]|[\x21-\x7e]"
_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
_ASSET_RE = re.compile(ASSET_PATTERN)
_MARKET_RE = re.compile(MARKET_PATTERN)
_TOKEN_RE = re.compile(TOKEN_PATTERN)

# op -> (required fields, optional fields); `op` and `ts` are implied for every op.
COMMAND_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "create_market": (
        frozenset(
            ("market", "base", "quote", "lot_size", "tick_size", "maker_fee_bps", "taker_fee_bps")
        ),
        frozenset(),
    ),
    "deposit": (frozenset(("account", "asset", "amount", "ref")), frozenset()),
    "withdraw": (frozenset(("account", "asset", "amount", "ref")), frozenset()),
    "place": (
        frozenset(("account", "market", "side", "type", "qty")),
        frozenset(("price", "tif", "client_order_id", "stp")),
    ),
    "cancel": (frozenset(("account", "market")), frozenset(("order_id", "client_order_id"))),
    "amend": (
        frozenset(("account", "market")),
        frozenset(("order_id", "client_order_id", "price", "qty")),
    ),
    "cancel_all": (frozenset(("account",)), frozenset(("market",))),
}
_MISSING = object()  # `command.get(field, _MISSING)`: tells a missing field from a None value

# op -> (allowed fields, required fields), for the envelope check.
_ENVELOPES = {op: (req | opt | {"op", "ts"}, req) for op, (req, opt) in COMMAND_FIELDS.items()}

# Names already checked, one cache per pattern: the hot path does a dict lookup instead of a
# regex. Bounded so garbage cannot grow them; past the bound a name is simply checked again.
# `exchange.py` reads them directly (a hit there is exactly a `True` here).
ACCOUNTS_SEEN: dict[str, bool] = {}
ASSETS_SEEN: dict[str, bool] = {}
MARKETS_SEEN: dict[str, bool] = {}
_SEEN_MAX = 100_000


def _matches(seen: dict[str, bool], pattern: re.Pattern[str], value: str) -> bool:
    hit = seen.get(value)
    if hit is None:
        hit = pattern.fullmatch(value) is not None
        if len(seen) < _SEEN_MAX:
            seen[value] = hit
    return hit


def is_token(value: str) -> bool:
    """`_TOKEN_RE` without the regex (and without a cache: client order ids rarely repeat).

    Printable ASCII is exactly 0x20-0x7e, so this is 1-64 characters of it with no space at
    either end; checked equal to the pattern for every single character and at the lengths
    around the bounds.
    """
    return (
        0 < len(value) <= 64
        and value.isascii()
        and value.isprintable()
        and value[0] != " "
        and value[-1] != " "
    )


def check_envelope(command: Any, last_ts: int) -> tuple[str, int]:
    """Check the parts shared by every command; return (op, ts)."""
    if type(command) is not dict:
        raise Rejection("bad_command", "a command must be a map")
    op = command.get("op", _MISSING)
    if type(op) is not str:
        if op is _MISSING:
            raise Rejection("missing_field", "missing field 'op'")
        raise Rejection("wrong_type", "field 'op' must be a string")
    envelope = _ENVELOPES.get(op)
    if envelope is None:
        raise Rejection("unknown_op", f"unknown op {op[:40]!r}")
    ts = command.get("ts", _MISSING)
    if type(ts) is not int:
        if ts is _MISSING:
            raise Rejection("missing_field", "missing field 'ts'")
        raise Rejection("wrong_type", "field 'ts' must be an integer")
    if not last_ts <= ts <= MAX_TS:  # (last_ts >= 0)
        if ts < 0 or ts > MAX_TS:
            raise Rejection("bad_ts", "field 'ts' out of range")
        raise Rejection("bad_ts", "ts went backwards")
    allowed, required = envelope
    # Subset tests through the keys view: `frozenset.issubset(dict)` would copy the dict's
    # keys into a temporary set on every command.
    keys = command.keys()
    if not keys <= allowed:
        for key in sorted(command, key=repr):
            if key not in allowed:
                shown = key[:40] if type(key) is str else type(key).__name__
                raise Rejection("unknown_field", f"unknown field {shown!r} for op {op!r}")
    if not keys >= required:
        missing = sorted(required.difference(command))
        raise Rejection("missing_field", f"missing field {missing[0]!r}")
    return op, ts


def integer(command: dict, field: str, lo: int, hi: int, reason: str) -> int:
    value = command[field]
    if type(value) is not int:
        raise Rejection("wrong_type", f"field {field!r} must be an integer")
    if value < lo or value > hi:
        raise Rejection(reason, f"field {field!r} must be in [{lo}, {hi}]")
    return value


def text(command: dict, field: str) -> str:
    value = command[field]
    if type(value) is not str:
        raise Rejection("wrong_type", f"field {field!r} must be a string")
    return value


def account(command: dict) -> str:
    value = text(command, "account")
    if not _matches(ACCOUNTS_SEEN, _ACCOUNT_RE, value):
        raise Rejection("bad_account", "bad account id")
    return value


def asset(command: dict, field: str = "asset") -> str:
    value = text(command, field)
    if not _matches(ASSETS_SEEN, _ASSET_RE, value):
        raise Rejection("bad_asset", f"bad asset in field {field!r}")
    return value


def market_name(command: dict) -> str:
    value = text(command, "market")
    if not _matches(MARKETS_SEEN, _MARKET_RE, value):
        raise Rejection("bad_market", "bad market name")
    return value


def token(command: dict, field: str, reason: str) -> str:
    value = text(command, field)
    if not is_token(value):
        raise Rejection(reason, f"field {field!r} must be 1-64 printable ASCII characters")
    return value


def choice(command: dict, field: str, options: tuple[str, ...], default: str, reason: str) -> str:
    if field not in command:
        return default
    value = text(command, field)
    if value not in options:
        raise Rejection(reason, f"field {field!r} must be one of {', '.join(options)}")
    return value


def safe_account(command: Any) -> str | None:
    """The command's account if it is a valid one, for the `rejected` event; never raises."""
    if type(command) is dict:
        value = command.get("account")
        if type(value) is str and _matches(ACCOUNTS_SEEN, _ACCOUNT_RE, value):
            return value
    return None


def safe_client_order_id(command: Any) -> str | None:
    if type(command) is dict:
        value = command.get("client_order_id")
        if type(value) is str and is_token(value):
            return value
    return None


def safe_op(command: Any) -> str | None:
    """The command's op if it is a string (cut to 64 characters), for the `rejected` event."""
    if type(command) is dict:
        value = command.get("op")
        if type(value) is str:
            return value[:64]
    return None


def safe_ts(command: Any, last_ts: int) -> int:
    """The command's ts if it is valid now, else the last one: a rejection's event ts."""
    if type(command) is dict:
        ts = command.get("ts")
        if type(ts) is int and last_ts <= ts <= MAX_TS:
            return ts
    return last_ts
