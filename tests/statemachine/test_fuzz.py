"""Garbage in, one `rejected` event out, and nothing else changes.

Hypothesis interleaves malformed commands into a valid session. For each one, `apply` must not
raise and must return exactly one `rejected` event (with the right seq / cmd_index / ts and only
plain values); at the end the exchange must be in the same state as one that saw only the
valid commands, and every valid command must have produced the same events in both.

Each garbage command is built to be invalid by construction (a defect the doc names), so a
rejection is the only right answer, whatever the reason.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from statemachine import Exchange

from .reference import INT_FIELDS, OPS, valid_account, valid_token
from .strategies import MARKETS, sessions

# The closed list of docs/reference/state-machine.md, "Rejection reasons".
REASONS = frozenset(
    {
        "bad_command",
        "bad_order_id",
        "unknown_op",
        "unknown_field",
        "missing_field",
        "wrong_type",
        "bad_ts",
        "bad_account",
        "bad_asset",
        "bad_market",
        "bad_ref",
        "bad_client_order_id",
        "bad_amount",
        "amount_too_large",
        "bad_lot_size",
        "bad_tick_size",
        "bad_fee",
        "same_asset",
        "market_exists",
        "unknown_market",
        "bad_side",
        "bad_order_type",
        "bad_tif",
        "bad_stp",
        "bad_price",
        "bad_tick",
        "bad_qty",
        "notional_too_large",
        "insufficient_funds",
        "duplicate_ref",
        "duplicate_client_order_id",
        "post_only_would_cross",
        "fok_unfillable",
        "unknown_order",
        "ambiguous_order_ref",
        "no_change",
        "no_open_orders",
    }
)
COUNTERS = ("seq", "cmd_index")

big_ints = st.one_of(
    st.integers(),
    st.integers(min_value=2**62 - 2, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-1),
)
# Built by construction rather than by filtering: filters make generation several times slower.
leaves: dict[str, st.SearchStrategy] = {
    "none": st.none(),
    "bool": st.booleans(),
    "int": big_ints,
    "float": st.floats(),
    "str": st.text(max_size=6),
    "bytes": st.binary(max_size=6),
}
anything = st.recursive(
    st.one_of(*leaves.values()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=3),
    ),
    max_leaves=5,
)
containers = st.one_of(
    st.lists(anything, max_size=3),
    st.tuples(anything),
    st.dictionaries(st.text(max_size=3), anything, max_size=2),
)


def anything_but(*kinds: str, dicts: bool = True) -> st.SearchStrategy:
    """Any value whose type is not one of the `leaves` named (nor a dict if `dicts=False`)."""
    parts = [strategy for kind, strategy in leaves.items() if kind not in kinds]
    nested = containers if dicts else st.one_of(st.lists(anything, max_size=3), st.tuples(anything))
    return st.one_of(*parts, nested)


not_int = anything_but("int")  # bools stay in: a bool is not an int here
not_str = anything_but("str")
not_a_dict = anything_but(dicts=False)


def bad_strings(field: str) -> st.SearchStrategy[str]:
    """Strings the doc forbids for `field`."""
    common = st.sampled_from(["", "x" * 65, "a b\x00", "caf\u00e9", "\u0661\u0662"])
    by_field = {
        "account": st.sampled_from(["_fees", "_x", "a" * 65, "a b", "a/b", "a#", "\u00e9"]),
        "asset": st.sampled_from(["usd", "A" * 17, "A-B", "U$D", "\u00c9"]),
        "base": st.sampled_from(["btc", "B" * 17, "B.C"]),
        "quote": st.sampled_from(["usd", "Q" * 17, "Q Q"]),
        "market": st.sampled_from(["m" * 33, "a b", "m#", "m\u00e9", "m\n"]),
        "ref": st.sampled_from(["\x00", "\x1f", "\x7f", "r\u00e9", "r" * 65]),
        "client_order_id": st.sampled_from(["\x00", "\x1f", "\x7f", "c\u00e9", "c" * 65]),
        "side": st.text(max_size=5).filter(lambda s: s not in ("buy", "sell")),
        "type": st.text(max_size=7).filter(lambda s: s not in ("limit", "market")),
        "tif": st.text(max_size=9).filter(lambda s: s not in ("gtc", "ioc", "fok", "post_only")),
        "stp": st.text(max_size=12).filter(
            lambda s: s not in ("cancel_taker", "cancel_maker", "cancel_both", "none")
        ),
        "op": st.text(max_size=12).filter(lambda s: s not in OPS),
    }
    return st.one_of(common, by_field[field]) if field in by_field else common


def bad_ints(field: str, watermark: int) -> st.SearchStrategy[int]:
    """Ints the doc forbids for `field` (ts: negative or before the watermark)."""
    if field == "ts":
        before = [st.integers(0, watermark - 1)] if watermark > 0 else []
        return st.one_of(st.integers(-(2**200), -1), *before)
    if field == "order_id":  # no such order: ids are positive and few in a test this size
        return st.one_of(st.integers(-(2**200), 0), st.integers(2**40, 2**200))
    low = {"maker_fee_bps": -1, "taker_fee_bps": -1}.get(field, 0)
    high = {
        "amount": 2**62,
        "qty": 10**12,
        "price": 10**15,
        "maker_fee_bps": 1000,
        "taker_fee_bps": 1000,
    }
    below = st.integers(-(2**200), low)
    if field in high:
        return st.one_of(below, st.integers(high[field] + 1, 2**200))
    return below  # lot_size, tick_size: >= 1, no upper bound


def required(cmd: dict) -> list[str]:
    fields = sorted(OPS[cmd["op"]][0] | {"op", "ts"})
    if cmd["op"] == "place" and cmd["type"] == "limit":
        fields.append("price")
    return fields


def settable(cmd: dict) -> list[str]:
    req, opt = OPS[cmd["op"]]
    return sorted(req | opt | {"ts"})


@st.composite
def garbage(draw: st.DrawFn, template: dict, watermark: int) -> object:
    """A command that must be rejected, usually one defect away from `template`."""
    cmd = dict(template)
    cmd["ts"] = watermark  # never a later valid ts: that could move the clock
    kind = draw(
        st.sampled_from(
            (
                "not_a_dict",
                "random_dict",
                "bad_op",
                "missing",
                "extra",
                "wrong_type",
                "wrong_type",
                "bad_value",
                "bad_value",
                "bad_value",
                "special",
            )
        ),
        label="kind",
    )
    if kind == "not_a_dict":
        return draw(not_a_dict)
    if kind == "random_dict":
        junk = draw(st.dictionaries(st.sampled_from([*settable(cmd), "op", "x"]), anything))
        junk.pop(draw(st.sampled_from(required(cmd))), None)
        if isinstance(junk.get("op"), str) and junk["op"] in OPS:
            junk.pop("ts", None)  # an op the junk was not built for might be satisfied
        return junk
    if kind == "bad_op":
        cmd["op"] = draw(st.one_of(not_str, bad_strings("op")))
        return cmd
    if kind == "missing":
        del cmd[draw(st.sampled_from(required(cmd)))]
        return cmd
    if kind == "extra":
        allowed = set(settable(cmd)) | {"op"}
        key = draw(
            st.one_of(
                st.text(max_size=8).filter(lambda k: k not in allowed),
                st.integers(),
                st.none(),
                st.binary(max_size=3),
                st.tuples(st.integers()),
            )
        )
        cmd[key] = draw(anything)
        return cmd
    if kind == "wrong_type":
        field = draw(st.sampled_from([*settable(cmd), "op"]))
        cmd[field] = draw(not_int if field in INT_FIELDS else not_str)
        return cmd
    if kind == "bad_value":
        field = draw(st.sampled_from(settable(cmd)))
        if field in INT_FIELDS:
            cmd[field] = draw(bad_ints(field, watermark))
        else:
            cmd[field] = draw(bad_strings(field))
        return cmd
    # Defects that take two fields, or depend on another field's value.
    op = cmd["op"]
    if op == "place" and cmd["type"] == "market":
        if draw(st.booleans()):
            cmd["price"] = draw(st.integers(1, 10**15))  # limit only
        else:
            cmd["tif"] = draw(st.sampled_from(("gtc", "fok", "post_only")))  # ioc only
    elif op == "place":
        cmd["price"] = cmd["price"] * 10**12  # still on tick and <= 10**15, but
        cmd["qty"] = 10**12  # price * qty > 2**62
    elif op in ("cancel", "amend"):
        if draw(st.booleans()):
            cmd["order_id"], cmd["client_order_id"] = 1, "c0"  # ambiguous
        elif op == "amend":
            cmd.pop("price", None)
            cmd.pop("qty", None)
        else:
            cmd.pop("order_id", None)
            cmd.pop("client_order_id", None)
    elif op == "cancel_all":
        cmd["market"] = draw(st.sampled_from(("NOPE", "nope/x")))  # not a market
    elif op in ("deposit", "withdraw"):
        cmd.update(op="withdraw", amount=2**62)  # far more than anyone holds
    else:
        cmd["quote"] = cmd["base"]
    return cmd


def without_counters(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in ev.items() if k not in COUNTERS} for ev in events]


def public_state(ex: Exchange) -> tuple:
    return (
        ex.markets(),
        ex.balances(),
        ex.open_orders(),
        [ex.book_levels(m.name, side) for m in MARKETS for side in ("buy", "sell")],
        ex.last_ts,
        ex.state_hash(counters=False),
    )


def check_rejection(cmd: object, events: object, before: tuple[int, int, int]) -> None:
    seq, index, watermark = before
    where = f"\ngarbage: {cmd!r}\nevents: {events!r}"
    assert isinstance(events, list) and len(events) == 1, "exactly one event" + where
    ev = events[0]
    assert ev["type"] == "rejected", "garbage must be rejected" + where
    assert ev["reason"] in REASONS, "a documented rejection reason" + where
    assert (ev["seq"], ev["cmd_index"]) == (seq + 1, index + 1), "seq / cmd_index" + where
    ts = cmd.get("ts") if isinstance(cmd, dict) else None
    valid_ts = type(ts) is int and watermark <= ts <= 2**63 - 1
    assert ev["ts"] == (ts if valid_ts else watermark), (
        "ts: its own if valid, else the clock" + where
    )
    for key, value in ev.items():
        assert value is None or type(value) in (int, str), f"{key} is not plain" + where
    op = cmd.get("op") if isinstance(cmd, dict) else None
    assert ev["op"] == (op[:64] if type(op) is str else None), "op echoes a str op" + where
    assert isinstance(ev["message"], str) and ev["message"], "a message" + where
    for key, valid in (("account", valid_account), ("client_order_id", valid_token)):
        if ev[key] is not None:  # echoed only when the command carried it validly
            assert isinstance(cmd, dict) and ev[key] == cmd.get(key) and valid(ev[key]), (
                f"{key} echoed only when valid" + where
            )
    if "order_id" in ev:
        assert ev["reason"] == "duplicate_client_order_id", "order_id only on duplicates" + where


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    # Fail fast: one bug at a time, and no line-tracing `explain` pass after shrinking.
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
@given(sessions(min_size=5, max_size=40), st.data())
def test_garbage_is_rejected_and_changes_nothing(cmds: list[dict], data: st.DataObject) -> None:
    clean, dirty = Exchange(), Exchange()
    for cmd in cmds:
        for _ in range(data.draw(st.sampled_from((0, 0, 1, 2)), label="garbage count")):
            junk = data.draw(garbage(cmd, clean.last_ts), label="garbage")
            # A valid ts in garbage advances the clock (the doc): keep it at or below the
            # next valid command's, so both instances accept that command alike. Such a ts
            # was no fault of the junk, which stays invalid for its other faults.
            if (
                isinstance(junk, dict)
                and type(junk.get("ts")) is int
                and cmd["ts"] < junk["ts"] <= 2**63 - 1
            ):
                junk["ts"] = cmd["ts"]
            before = (dirty.seq, dirty.cmd_index, dirty.last_ts)
            check_rejection(junk, dirty.apply(junk), before)
        assert without_counters(dirty.apply(cmd)) == without_counters(clean.apply(cmd)), cmd
        dirty.check_invariants()
    assert public_state(dirty) == public_state(clean)
