"""The engine against a dumb reference (STYLE.md item 6).

A Hypothesis rule-based machine feeds `statemachine.Exchange` and `reference.ReferenceExchange`
the same commands and, after every step, compares the outcome (rejected or not, and why),
the order-level events (accepted, amended, cancelled, trade, filled) in order, the resting book,
every balance, and the event-level rules of docs/reference/state-machine.md; then it runs
`check_invariants()`.

Order ids: the reference numbers its own orders; the machine learns the engine's id for each
order from the `accepted` event and translates both ways, so the engine may number orders
however it likes.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from statemachine import Exchange

from .reference import MAX_AMOUNT, MAX_PRICE, MAX_QTY, ReferenceExchange
from .strategies import (
    ASSETS,
    MARKETS,
    STPS,
    TIFS,
    accounts,
    markets,
    price_near,
    quantities,
    setup_commands,
)

SIDES = ("buy", "sell")
UNKNOWN_ID_BASE = 10**9  # ids the engine cannot have handed out in a test this size

# The doc names the order type field of `accepted` "type", which is also the key holding every
# event's kind; the engine calls it `order_type`.
ORDER_TYPE_KEY = "order_type"

Key = tuple


def project(ev: dict, rid) -> tuple | None:
    """An engine event as the reference's outcome tuple (order ids through `rid`)."""
    kind = ev["type"]
    if kind == "market_created":
        return (
            kind,
            ev["market"],
            ev["base"],
            ev["quote"],
            ev["lot_size"],
            ev["tick_size"],
            ev["maker_fee_bps"],
            ev["taker_fee_bps"],
        )
    if kind == "accepted":
        return (
            kind,
            rid(ev["order_id"]),
            ev["client_order_id"],
            ev["account"],
            ev["market"],
            ev["side"],
            ev[ORDER_TYPE_KEY],
            ev["price"],
            ev["qty"],
            ev["tif"],
            ev["stp"],
        )
    if kind == "amended":
        return (
            kind,
            rid(ev["order_id"]),
            ev["client_order_id"],
            ev["account"],
            ev["market"],
            ev["price"],
            ev["qty"],
            ev["priority_kept"],
        )
    if kind == "cancelled":
        return (
            kind,
            rid(ev["order_id"]),
            ev["client_order_id"],
            ev["account"],
            ev["market"],
            ev["reason"],
            ev["remaining"],
        )
    if kind == "filled":
        return (kind, rid(ev["order_id"]), ev["client_order_id"], ev["account"], ev["market"])
    if kind == "trade":
        return (
            kind,
            ev["market"],
            ev["price"],
            ev["qty"],
            rid(ev["maker_order_id"]),
            rid(ev["taker_order_id"]),
            ev["maker_account"],
            ev["taker_account"],
            ev["taker_side"],
            ev["maker_fee"],
            ev["taker_fee"],
        )
    return None  # book and balance events are checked against the state instead


# Stage of each event kind in the doc's "Order of events within one command".
STAGE = {
    "rejected": 1,
    "market_created": 1,
    "accepted": 1,
    "amended": 1,
    "trade": 2,
    "filled": 2,
    "cancelled": 2,
    "book": 4,
    "balance": 5,
}


class Where:
    """The failure context, rendered only when an assertion message is built: the step, and
    every engine command so far (paste them into a fresh Exchange to reproduce)."""

    def __init__(self, history: list[object], events: list[dict], result: object) -> None:
        self.history, self.events, self.result = list(history), events, result

    def __radd__(self, message: str) -> str:
        lines = "\n".join(f"    {cmd!r}," for cmd in self.history)
        return (
            f"{message}\ncommand: {self.history[-1]!r}\nengine events: {self.events!r}"
            f"\nreference: {self.result!r}\ncommands to reproduce:\n[\n{lines}\n]"
        )


class ExchangeVsReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ex = Exchange()
        self.ref = ReferenceExchange()
        self.clock = 0
        self.seq = 0
        self.commands = 0
        self.r2e: dict[int, object] = {}
        self.e2r: dict[object, int] = {}
        self.orders: dict[int, tuple[str, str, str | None]] = {}  # rid -> account, market, coid
        self.used_coids: list[tuple[str, str]] = []
        self.used_refs: list[str] = []
        self.fresh = 0
        self.levels: dict[Key, int] = {}  # (market, side, price) -> qty, from book events
        self.balances: dict[Key, tuple[int, int]] = {}  # from balance events
        self.history: list[object] = []  # every command the engine was given, for reproduction

    # ------------------------------------------------------------ helpers

    def new_name(self, prefix: str) -> str:
        self.fresh += 1
        return f"{prefix}{self.fresh}"

    def now(self, data: st.DataObject) -> int:
        self.clock += data.draw(st.sampled_from((0, 1, 1, 2, 1000)), label="dt")
        return self.clock

    def rid(self, eid: object) -> object:
        return self.e2r.get(eid, ("engine-only", eid))

    def to_engine(self, cmd: object) -> object:
        if isinstance(cmd, dict) and "order_id" in cmd and cmd["order_id"] in self.r2e:
            return {**cmd, "order_id": self.r2e[cmd["order_id"]]}
        return cmd

    def ref_levels(self) -> dict[Key, int]:
        return {
            (spec.name, side, price): qty
            for spec in MARKETS
            for side in SIDES
            for price, qty in self.ref.levels(spec.name, side)
        }

    # ------------------------------------------------------------ one step

    def run(self, cmd: object) -> list[dict]:
        ecmd = self.to_engine(cmd)
        sent = copy.deepcopy(ecmd)
        self.history.append(sent)
        levels_before, balances_before = self.ref_levels(), self.ref.balances()
        events = self.ex.apply(ecmd)
        result = self.ref.apply(copy.deepcopy(cmd))
        self.ref.check()
        self.commands += 1
        where = Where(self.history, events, result)
        assert ecmd == sent, "apply mutated its command" + where

        # Event-level rules.
        assert isinstance(events, list) and events, "every command yields >= 1 event" + where
        for ev in events:
            self.seq += 1
            assert ev["seq"] == self.seq, "seq is global and gap-free from 1" + where
            assert ev["cmd_index"] == self.commands, "cmd_index counts commands" + where
            assert ev["ts"] == result.event_ts, "event ts" + where
            assert not any(isinstance(v, float) for v in ev.values()), "no floats" + where
        stages = [STAGE[ev["type"]] for ev in events]
        if isinstance(cmd, dict) and cmd.get("op") in ("cancel", "cancel_all"):
            stages = [
                1 if ev["type"] == "cancelled" else s for ev, s in zip(events, stages, strict=True)
            ]
        assert stages == sorted(stages), "events out of the documented order" + where

        # Rejections.
        if result.rejected is not None:
            assert len(events) == 1 and events[0]["type"] == "rejected", (
                "a rejected command yields exactly one rejected event" + where
            )
            ev = events[0]
            assert ev["reason"] == result.rejected, "rejection reason" + where
            op = cmd.get("op") if isinstance(cmd, dict) else None
            assert ev["op"] == (op if isinstance(op, str) else None), "rejected op" + where
            if result.rejected == "duplicate_client_order_id":
                assert self.rid(ev["order_id"]) == result.duplicate_of, "first order id" + where
        else:
            assert all(ev["type"] != "rejected" for ev in events), "unexpected rejection" + where

        # Bind the engine's id of a newly accepted order to the reference's.
        accepted = [ev for ev in events if ev["type"] == "accepted"]
        assert len(accepted) == (result.order_id is not None), "accepted event" + where
        if accepted:
            eid = accepted[0]["order_id"]
            assert eid not in self.e2r, "order ids are never reused" + where
            self.e2r[eid], self.r2e[result.order_id] = result.order_id, eid
            assert isinstance(cmd, dict)
            self.orders[result.order_id] = (
                cmd["account"],
                cmd["market"],
                cmd.get("client_order_id"),
            )
        projected = [p for p in (project(ev, self.rid) for ev in events) if p is not None]
        assert projected == result.events, "order-level events" + where

        # Book events: one per changed level, values = the level after the command.
        levels_after = self.ref_levels()
        touched: set[Key] = set()
        for ev in (e for e in events if e["type"] == "book"):
            key = (ev["market"], ev["side"], ev["price"])
            assert key not in touched, "one book event per level" + where
            touched.add(key)
            assert ev["level_qty"] == levels_after.get(key, 0), "book event level_qty" + where
            if ev["level_qty"]:
                self.levels[key] = ev["level_qty"]
            else:
                self.levels.pop(key, None)
        changed = {
            k
            for k in levels_before.keys() | levels_after.keys()
            if levels_before.get(k, 0) != levels_after.get(k, 0)
        }
        assert touched == changed, "book events = the levels whose qty changed" + where

        # Balance events: one per changed (account, asset), values = after the command.
        balances_after = self.ref.balances()
        touched = set()
        for ev in (e for e in events if e["type"] == "balance"):
            key = (ev["account"], ev["asset"])
            assert key not in touched, "one balance event per (account, asset)" + where
            touched.add(key)
            value = (ev["available"], ev["reserved"])
            assert value == balances_after.get(key, (0, 0)), "balance event values" + where
            self.balances[key] = value
            if isinstance(cmd, dict) and cmd.get("op") in ("deposit", "withdraw"):
                assert ev.get("ref") == cmd["ref"], "deposit/withdraw balance carries ref" + where
            else:
                assert "ref" not in ev or ev["ref"] is None, "ref only for transfers" + where
        changed = {
            k
            for k in balances_before.keys() | balances_after.keys()
            if balances_before.get(k, (0, 0)) != balances_after.get(k, (0, 0))
        }
        assert touched == changed, "balance events = the balances that changed" + where
        return events

    @invariant()
    def same_state(self) -> None:
        if not self.commands:
            return
        ref_levels = self.ref_levels()
        assert self.levels == ref_levels, "book rebuilt from events"
        assert {k: v for k, v in self.balances.items() if v != (0, 0)} == self.ref.balances()
        assert {k: v for k, v in self.ex.balances().items() if v != (0, 0)} == self.ref.balances()
        for spec in MARKETS:
            for side in SIDES:
                assert self.ex.book_levels(spec.name, side) == self.ref.levels(spec.name, side)
                mine = [
                    (self.rid(o["order_id"]), o["account"], o["price"], o["remaining"])
                    for o in self.ex.open_orders(market=spec.name)
                    if o["side"] == side
                ]
                assert mine == self.ref.book(spec.name, side), (spec.name, side)
        self.ex.check_invariants()

    # ------------------------------------------------------------ rules

    @initialize()
    def setup(self) -> None:
        self.clock = 1_000
        for cmd in setup_commands(self.clock):
            self.run(cmd)

    @rule(data=st.data())
    def place(self, data: st.DataObject) -> None:
        spec = data.draw(markets)
        otype = data.draw(st.sampled_from(("limit", "limit", "limit", "market")))
        cmd: dict = {
            "op": "place",
            "ts": self.now(data),
            "account": data.draw(accounts),
            "market": spec.name,
            "side": data.draw(st.sampled_from(SIDES)),
            "type": otype,
            "qty": data.draw(quantities),
        }
        if otype == "limit":
            cmd["price"] = data.draw(price_near(spec))
            tif = data.draw(st.sampled_from((None, *TIFS)))
        else:
            tif = data.draw(st.sampled_from((None, "ioc", "ioc", "gtc", "fok")))
        if tif is not None:
            cmd["tif"] = tif
        stp = data.draw(st.sampled_from((None, *STPS)))
        if stp is not None:
            cmd["stp"] = stp
        coid = data.draw(st.sampled_from(("none", "new", "new", "reuse")))
        if coid == "new":
            cmd["client_order_id"] = self.new_name("c")
        elif coid == "reuse" and self.used_coids:
            _, used = data.draw(st.sampled_from(self.used_coids))
            cmd["client_order_id"] = used  # same account: duplicate; another: allowed
        if "client_order_id" in cmd:
            self.used_coids.append((cmd["account"], cmd["client_order_id"]))
        self.run(cmd)

    def order_target(self, data: st.DataObject, op: str) -> dict:
        """A cancel/amend aimed mostly at a resting order (usually by its owner, in its market),
        sometimes at a finished one, or at nothing."""
        cmd: dict = {"op": op, "ts": self.now(data)}
        resting = sorted(o.order_id for o in self.ref.resting)
        kind = data.draw(st.sampled_from(("resting",) * 6 + ("any", "unknown")), label="target")
        pool = resting if kind == "resting" and resting else sorted(self.orders)
        if kind != "unknown" and pool:
            rid = data.draw(st.sampled_from(pool), label="order")
            account, market, coid = self.orders[rid]
            if data.draw(st.integers(0, 9)) == 0:
                account = data.draw(accounts)
            if data.draw(st.integers(0, 9)) == 0:
                market = data.draw(markets).name
            cmd.update(account=account, market=market)
            if coid is not None and data.draw(st.booleans()):
                cmd["client_order_id"] = coid
            else:
                cmd["order_id"] = rid
        else:
            cmd.update(account=data.draw(accounts), market=data.draw(markets).name)
            if data.draw(st.booleans()):
                cmd["client_order_id"] = self.new_name("nope")
            else:
                cmd["order_id"] = UNKNOWN_ID_BASE + data.draw(st.integers(0, 5))
        return cmd

    @rule(data=st.data())
    def place_aggressive(self, data: st.DataObject) -> None:
        """An order priced through the best opposite price, so that it trades."""
        spec = data.draw(markets)
        side = data.draw(st.sampled_from(SIDES))
        opposite = self.ref.levels(spec.name, "sell" if side == "buy" else "buy")
        cmd: dict = {
            "op": "place",
            "ts": self.now(data),
            "account": data.draw(accounts),
            "market": spec.name,
            "side": side,
            "qty": data.draw(quantities),
        }
        if opposite and data.draw(st.integers(0, 3)) == 0:
            cmd["type"] = "market"
        else:
            depth = data.draw(st.integers(0, 2)) * spec.tick_size
            best = opposite[0][0] if opposite else spec.mid
            price = best + (depth if side == "buy" else -depth)
            cmd.update(type="limit", price=max(spec.tick_size, price))
            tif = data.draw(st.sampled_from((None, *TIFS)))
            if tif is not None:
                cmd["tif"] = tif
        stp = data.draw(st.sampled_from((None, *STPS)))
        if stp is not None:
            cmd["stp"] = stp
        self.run(cmd)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.run(self.order_target(data, "cancel"))

    @rule(data=st.data())
    def amend(self, data: st.DataObject) -> None:
        cmd = self.order_target(data, "amend")
        spec = next((m for m in MARKETS if m.name == cmd["market"]), MARKETS[0])
        rid = cmd.get("order_id")
        current = self.ref.book(spec.name, "buy") + self.ref.book(spec.name, "sell")
        resting = next((o for o in current if o[0] == rid), None)
        which = data.draw(st.sampled_from(("price", "qty", "both", "same")))
        if which in ("price", "both"):
            cmd["price"] = data.draw(price_near(spec))
        if which in ("qty", "both"):
            cmd["qty"] = data.draw(st.integers(1, 10))
        if which == "same":  # no_change, or priority-keeping shrink when it is smaller
            if resting is not None:
                cmd["price"] = resting[2]
                cmd["qty"] = data.draw(st.integers(max(1, resting[3] - 2), resting[3]))
            else:
                cmd["qty"] = 1
        self.run(cmd)

    @rule(data=st.data())
    def cancel_all(self, data: st.DataObject) -> None:
        cmd = {"op": "cancel_all", "ts": self.now(data), "account": data.draw(accounts)}
        market = data.draw(st.sampled_from((None, None, *[m.name for m in MARKETS], "NOPE-1")))
        if market is not None:
            cmd["market"] = market
        self.run(cmd)

    @rule(data=st.data())
    def transfer(self, data: st.DataObject) -> None:
        op = data.draw(st.sampled_from(("deposit", "deposit", "withdraw")))
        asset = data.draw(st.sampled_from((*ASSETS, "DOGE")))
        ref = self.new_name("tx")
        if self.used_refs and data.draw(st.integers(0, 4)) == 0:
            ref = data.draw(st.sampled_from(self.used_refs))
        self.used_refs.append(ref)
        amount = data.draw(st.one_of(st.integers(1, 5_000), st.integers(1, 50)))
        if op == "deposit" and data.draw(st.integers(0, 30)) == 0:
            supply = sum(v[0] + v[1] for (_, a), v in self.ref.balance.items() if a == asset)
            amount = data.draw(st.sampled_from((MAX_AMOUNT, MAX_AMOUNT - supply + 1)))
        self.run(
            {
                "op": op,
                "ts": self.now(data),
                "account": data.draw(accounts),
                "asset": asset,
                "amount": amount,
                "ref": ref,
            }
        )

    def create_market(self, data: st.DataObject) -> None:
        spec = data.draw(markets)
        cmd = spec.create(self.now(data))
        defect = data.draw(
            st.sampled_from(("exists", "lot", "tick", "fee", "same", "asset", "name"))
        )
        cmd["market"] = self.new_name("NEW-") if defect != "exists" else spec.name
        if defect == "lot":
            cmd["lot_size"] = 0
        elif defect == "tick":
            cmd["tick_size"] = -5
        elif defect == "fee":
            cmd[data.draw(st.sampled_from(("maker_fee_bps", "taker_fee_bps")))] = 1001
        elif defect == "same":
            cmd["quote"] = cmd["base"]
        elif defect == "asset":
            cmd["base"] = "btc"
        elif defect == "name":
            cmd["market"] = "no spaces"
        self.run(cmd)

    @rule(data=st.data())
    def invalid(self, data: st.DataObject) -> None:
        """A valid-looking create_market/place/deposit/cancel_all with exactly one defect."""
        spec = data.draw(markets)
        base = data.draw(st.sampled_from(("create_market", "place", "deposit", "cancel_all")))
        if base == "create_market":
            self.create_market(data)
            return
        if base == "place":
            cmd: dict = {
                "op": "place",
                "ts": self.now(data),
                "account": data.draw(accounts),
                "market": spec.name,
                "side": "buy",
                "type": "limit",
                "qty": 1,
                "price": spec.mid,
                "tif": "ioc",
            }
            defects = {
                "account": ["_fees", "", "a" * 65, "sp ace"],
                "market": ["", "m" * 33, "sp ace", "NOPE-2"],
                "side": ["BUY", "bid"],
                "type": ["stop"],
                "qty": [0, -1, MAX_QTY + 1],
                "price": [0, -5, MAX_PRICE + spec.tick_size, spec.mid + 1, 10**15],
                "tif": ["day", "GTC"],
                "stp": ["both"],
                "client_order_id": ["", "x" * 65, "\x00", "caf\u00e9"],
            }
        elif base == "deposit":
            cmd = {
                "op": "deposit",
                "ts": self.now(data),
                "account": data.draw(accounts),
                "asset": "USD",
                "amount": 5,
                "ref": self.new_name("tx"),
            }
            defects = {
                "account": ["_fees", "b@d"],
                "asset": ["usd", "A" * 17, ""],
                "amount": [0, -3, MAX_AMOUNT + 1],
                "ref": ["", "r" * 65, "\n"],
            }
        else:
            cmd = {"op": "cancel_all", "ts": self.now(data), "account": data.draw(accounts)}
            defects = {"account": ["", "_x"], "market": ["sp ace", "NOPE-3"]}
        kind = data.draw(st.sampled_from(("value", "value", "shape", "ts")))
        if kind == "value":
            field = data.draw(st.sampled_from(sorted(defects)))
            cmd[field] = data.draw(st.sampled_from(defects[field]))
            if field == "price" and cmd["price"] == 10**15:
                cmd["qty"] = MAX_QTY  # notional_too_large
        elif kind == "ts":
            cmd["ts"] = data.draw(st.sampled_from((-1, self.ref.last_ts - 1)))
        else:
            shape = data.draw(
                st.sampled_from(("extra", "missing", "int_as_str", "bool", "float", "str_as_int"))
            )
            if shape == "extra":
                cmd["bogus"] = 1
            elif shape == "missing":
                del cmd[data.draw(st.sampled_from(sorted(k for k in cmd if k not in ("op",))))]
            elif shape == "str_as_int":
                cmd["account"] = 7
            else:
                field = "ts" if base == "cancel_all" else ("qty" if base == "place" else "amount")
                cmd[field] = {
                    "int_as_str": str(cmd[field]),
                    "bool": True,
                    "float": float(cmd[field]),
                }[shape]
        self.run(cmd)


ExchangeVsReference.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=60,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    # Fail fast: one bug at a time, and no line-tracing `explain` pass after shrinking.
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestExchangeVsReference = ExchangeVsReference.TestCase


# ---------------------------------------------------------------- the reference itself
# Worked by hand from the doc, so a bug in the reference is not mistaken for one in the engine.


def _market(ref: ReferenceExchange, **kw) -> None:
    spec = {
        "op": "create_market",
        "ts": 1,
        "market": "M",
        "base": "B",
        "quote": "Q",
        "lot_size": 2,
        "tick_size": 5,
        "maker_fee_bps": 10,
        "taker_fee_bps": 20,
    }
    assert ref.apply({**spec, **kw}).rejected is None


def _fund(ref: ReferenceExchange, account: str, asset: str, amount: int) -> None:
    cmd = {"op": "deposit", "ts": 1, "account": account, "asset": asset, "amount": amount}
    assert ref.apply({**cmd, "ref": f"{account}{asset}{amount}"}).rejected is None


def _place(ref: ReferenceExchange, account: str, side: str, qty: int, price=None, **kw):
    cmd = {"op": "place", "ts": 2, "account": account, "market": "M", "side": side, "qty": qty}
    cmd["type"] = "market" if price is None else "limit"
    if price is not None:
        cmd["price"] = price
    return ref.apply({**cmd, **kw})


def test_reference_fill_with_fees_and_reservation_refund() -> None:
    ref = ReferenceExchange()
    _market(ref)
    _fund(ref, "a", "Q", 100_000)
    _fund(ref, "b", "B", 100)
    assert _place(ref, "b", "sell", 3, 500).rejected is None
    assert ref.balances()[("b", "B")] == (94, 6)
    res = _place(ref, "a", "buy", 5, 505)
    # Reserve 505*5 + 2525*20//10000 = 2530; pay 1500 + 3; back to 1010 + 2 = 1012.
    assert res.trades == [(500, 3, 1, 2, 1, 3)]
    assert ref.balances() == {
        ("a", "Q"): (100_000 - 2530 + (2530 - 1503 - 1012), 1012),
        ("a", "B"): (6, 0),
        ("b", "B"): (94, 0),
        ("b", "Q"): (1499, 0),
        ("_fees", "Q"): (4, 0),
    }
    assert ref.book("M", "buy") == [(2, "a", 505, 2)]
    ref.check()


def test_reference_market_buy_budget_keeps_buying_single_lots() -> None:
    ref = ReferenceExchange()
    _market(ref, lot_size=1, tick_size=1, maker_fee_bps=0, taker_fee_bps=1000)
    _fund(ref, "a", "Q", 10)
    _fund(ref, "b", "B", 100)
    _place(ref, "b", "sell", 10, 5)
    res = _place(ref, "a", "buy", 10)
    # cost(1) = 5, cost(2) = 11 > 10: one lot, then one more from the 5 left, then out.
    assert res.trades == [(5, 1, 1, 2, 0, 0), (5, 1, 1, 2, 0, 0)]
    assert res.events[-1] == ("cancelled", 2, None, "a", "M", "funds", 8)
    assert ("a", "Q") not in ref.balances()


@pytest.mark.parametrize(
    ("stp", "expected_trades", "expected_tail", "resting"),
    [
        ("cancel_taker", [(500, 1, 1, 3, 0, 1)], ("cancelled", 3, None, "a", "M", "stp", 2), 2),
        ("cancel_maker", [(500, 1, 1, 3, 0, 1)], ("cancelled", 3, None, "a", "M", "ioc", 2), 0),
        ("cancel_both", [(500, 1, 1, 3, 0, 1)], ("cancelled", 3, None, "a", "M", "stp", 2), 0),
        (
            "none",
            [(500, 1, 1, 3, 0, 1), (505, 1, 2, 3, 0, 1)],
            ("cancelled", 3, None, "a", "M", "ioc", 1),
            0,
        ),
    ],
)
def test_reference_self_trade_prevention(stp, expected_trades, expected_tail, resting) -> None:
    ref = ReferenceExchange()
    _market(ref)
    for account in ("a", "b"):
        _fund(ref, account, "Q", 100_000)
        _fund(ref, account, "B", 100)
    _place(ref, "b", "sell", 1, 500)
    _place(ref, "a", "sell", 1, 505)
    res = _place(ref, "a", "buy", 3, 510, tif="ioc", stp=stp)
    assert res.trades == expected_trades
    assert res.events[-1] == expected_tail
    assert len(ref.book("M", "sell")) == (1 if resting == 2 else 0)
    ref.check()


def test_reference_fok_counts_what_it_would_really_get() -> None:
    ref = ReferenceExchange()
    _market(ref)
    for account in ("a", "b"):
        _fund(ref, account, "Q", 100_000)
        _fund(ref, account, "B", 100)
    _place(ref, "a", "sell", 2, 500)
    _place(ref, "b", "sell", 2, 505)
    assert _place(ref, "a", "buy", 2, 505, tif="fok").rejected == "fok_unfillable"
    assert (
        _place(ref, "a", "buy", 3, 505, tif="fok", stp="cancel_maker").rejected == "fok_unfillable"
    )
    res = _place(ref, "a", "buy", 2, 505, tif="fok", stp="cancel_maker")
    assert res.rejected is None
    assert [e[0] for e in res.events] == ["accepted", "cancelled", "trade", "filled", "filled"]
    ref.check()


def test_reference_amend_priority() -> None:
    ref = ReferenceExchange()
    _market(ref)
    _fund(ref, "a", "Q", 100_000)
    _place(ref, "a", "buy", 3, 500)
    _place(ref, "a", "buy", 3, 500)
    amend = {"op": "amend", "ts": 3, "account": "a", "market": "M", "order_id": 1}
    assert ref.apply({**amend, "qty": 2}).events[0][-1] is True
    assert [o[0] for o in ref.book("M", "buy")] == [1, 2]
    assert ref.apply({**amend, "qty": 2}).rejected == "no_change"
    assert ref.apply({**amend, "qty": 4}).events[0][-1] is False
    assert [o[0] for o in ref.book("M", "buy")] == [2, 1]
    assert ref.apply({**amend, "price": 501}).rejected == "bad_tick"
    ref.check()


# ---------------------------------------------------------------- single-rule conformance


@pytest.mark.parametrize("token", [" r", "r ", " ", "a b", "~" * 64, "!", "\t", "\x7f", "\u00e9"])
def test_ref_and_client_order_id_follow_one_rule(token: str) -> None:
    """The doc gives `ref` and `client_order_id` the same rule: printable ASCII, 1-64 chars."""
    cmds = [
        *setup_commands(),
        {
            "op": "deposit",
            "ts": 2_000,
            "account": "alice",
            "asset": "USD",
            "amount": 1,
            "ref": token,
        },
        {
            "op": "place",
            "ts": 2_000,
            "account": "alice",
            "market": MARKETS[0].name,
            "side": "buy",
            "type": "limit",
            "qty": 1,
            "price": MARKETS[0].mid - 10 * MARKETS[0].tick_size,
            "client_order_id": token,
        },
    ]
    ex, ref = Exchange(), ReferenceExchange()
    for cmd in cmds:
        events, result = ex.apply(cmd), ref.apply(cmd)
        reason = events[0]["reason"] if events[0]["type"] == "rejected" else None
        assert reason == result.rejected, (cmd, events)
