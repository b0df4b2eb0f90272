"""statemachine/precheck.py: a command refused before the log is one the log would refuse
with the same reason, in whatever state it meets there."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from statemachine import Exchange
from statemachine.precheck import CHECKED_OPS, STATE_REASONS, ShapeCheck

from .strategies import MARKETS, sessions, setup_commands
from .test_fuzz import garbage

SETTINGS = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


def ask(check: ShapeCheck, ex: Exchange, command: object) -> dict | None:
    return check.rejection(command, ex.market_count, ex.markets)


def untimed(command: object) -> object:
    """As the API builds it: no ts (the leader stamps it)."""
    if isinstance(command, dict):
        return {k: v for k, v in command.items() if k != "ts"}
    return command


@SETTINGS
@given(sessions(min_size=5, max_size=40), st.data())
def test_an_early_refusal_is_the_log_s_refusal_in_any_state(
    cmds: list[dict], data: st.DataObject
) -> None:
    ex, check = Exchange(), ShapeCheck()
    for cmd in cmds:
        if cmd["op"] in CHECKED_OPS:
            for _ in range(data.draw(st.sampled_from((0, 1, 2)), label="probes")):
                probe = untimed(
                    data.draw(st.one_of(garbage(cmd, ex.last_ts), st.just(cmd)), label="probe")
                )
                early = ask(check, ex, probe)
                if early is None:
                    continue
                event(f"refused early: {early['reason']}")
                assert early["type"] == "rejected" and early["reason"] not in STATE_REASONS
                later = ex.apply({**probe, "ts": ex.last_ts})
                assert len(later) == 1 and later[0]["type"] == "rejected", probe
                assert (later[0]["reason"], later[0]["message"]) == (
                    early["reason"],
                    early["message"],
                ), probe
        ex.apply(cmd)


def test_it_refuses_shapes_and_leaves_state_questions_to_the_log() -> None:
    ex, check = Exchange(), ShapeCheck()
    for cmd in setup_commands():
        ex.apply(cmd)
    spec = MARKETS[0]
    order = {
        "op": "place",
        "account": "alice",
        "market": spec.name,
        "side": "buy",
        "type": "limit",
        "qty": 1,
        "price": spec.tick_size * 1000,
    }
    refused = {
        "bad_qty": {**order, "qty": 0},
        "wrong_type": {**order, "qty": "1"},
        "unknown_field": {**order, "colour": "red"},
        "bad_tick": {**order, "price": spec.tick_size * 1000 + 1},
        "notional_too_large": {**order, "price": spec.tick_size * 10**9, "qty": 10**12},
        "bad_side": {**order, "side": "up"},
        "missing_field": {k: v for k, v in order.items() if k != "side"},
    }
    for reason, cmd in refused.items():
        early = ask(check, ex, cmd)
        assert early is not None and early["reason"] == reason, (reason, early)
    passed = [
        order,  # valid
        {**order, "account": "nobody"},  # insufficient_funds: state
        {**order, "market": "NEW-USD"},  # unknown_market: may exist by then
        {"op": "cancel", "account": "alice", "market": spec.name, "order_id": 99},  # unknown_order
        {"op": "cancel_all", "account": "alice"},  # no_open_orders: state
        {"op": "deposit", "account": "alice", "asset": "X", "amount": 0, "ref": "r"},  # admin op
        {**order, "ts": 5},  # carries a ts: not an API command
    ]
    for cmd in passed:
        assert ask(check, ex, cmd) is None, cmd


def test_a_market_created_later_is_seen() -> None:
    ex, check = Exchange(), ShapeCheck()
    order = {
        "op": "place",
        "account": "alice",
        "market": "NEW-USD",
        "side": "buy",
        "type": "limit",
        "qty": 1,
        "price": 7,
    }
    assert ask(check, ex, order) is None  # unknown market: the log decides
    ex.apply(
        {
            "op": "create_market",
            "ts": 1,
            "market": "NEW-USD",
            "base": "NEW",
            "quote": "USD",
            "lot_size": 1,
            "tick_size": 5,
            "maker_fee_bps": 0,
            "taker_fee_bps": 0,
        }
    )
    early = ask(check, ex, order)
    assert early is not None and early["reason"] == "bad_tick"
