"""A deliberately dumb reference exchange, written only from docs/reference/state-machine.md.

It never looked at `statemachine/`: the point is to be an independent second opinion
(STYLE.md item 6). Everything is a plain list or dict scanned linearly; speed does not
matter, obviousness does.

It does not reproduce the exact event stream. `apply` returns a `Result` that says whether
the command was rejected (and why), and lists the order-level outcomes in the order the doc
prescribes (accepted / amended / cancelled / trade / filled / market_created) as plain
tuples; `book`, `levels` and `balances` expose the state after the command.

Where the doc leaves a choice open, the choice is named in a comment starting `ASSUMPTION`
so a disagreement with the engine can be classified quickly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_QTY = 10**12
MAX_PRICE = 10**15
MAX_TS = 2**63 - 1
MAX_AMOUNT = 2**62
MAX_NOTIONAL = 2**62
MAX_SUPPLY = 2**62
MAX_FEE_BPS = 1000
FEE_ACCOUNT = "_fees"

SIDES = ("buy", "sell")
ORDER_TYPES = ("limit", "market")
TIFS = ("gtc", "ioc", "fok", "post_only")
STPS = ("cancel_taker", "cancel_maker", "cancel_both", "none")

# op -> (required fields, optional fields); `op` and `ts` are required everywhere.
OPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "create_market": (
        frozenset(
            {"market", "base", "quote", "lot_size", "tick_size", "maker_fee_bps", "taker_fee_bps"}
        ),
        frozenset(),
    ),
    "deposit": (frozenset({"account", "asset", "amount", "ref"}), frozenset()),
    "withdraw": (frozenset({"account", "asset", "amount", "ref"}), frozenset()),
    "place": (
        frozenset({"account", "market", "side", "type", "qty"}),
        frozenset({"price", "tif", "client_order_id", "stp"}),
    ),
    "cancel": (frozenset({"account", "market"}), frozenset({"order_id", "client_order_id"})),
    "amend": (
        frozenset({"account", "market"}),
        frozenset({"order_id", "client_order_id", "price", "qty"}),
    ),
    "cancel_all": (frozenset({"account"}), frozenset({"market"})),
}

INT_FIELDS = frozenset(
    {
        "ts",
        "lot_size",
        "tick_size",
        "maker_fee_bps",
        "taker_fee_bps",
        "amount",
        "qty",
        "price",
        # ASSUMPTION: order ids are ints (the doc never says; events carry them).
        "order_id",
    }
)
STR_FIELDS = frozenset(
    {
        "op",
        "market",
        "base",
        "quote",
        "account",
        "asset",
        "ref",
        "side",
        "type",
        "tif",
        "client_order_id",
        "stp",
    }
)

_ACCOUNT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ASSET = re.compile(r"[A-Z0-9]{1,16}")
_MARKET = re.compile(r"[A-Za-z0-9_.:/-]{1,32}")


def valid_account(value: str) -> bool:
    return _ACCOUNT.fullmatch(value) is not None and not value.startswith("_")


def valid_asset(value: str) -> bool:
    return _ASSET.fullmatch(value) is not None


def valid_market_name(value: str) -> bool:
    return _MARKET.fullmatch(value) is not None


def valid_token(value: str) -> bool:
    """`client_order_id` and `ref`: printable ASCII (0x20..0x7e), 1-64 chars, no space at
    either end (the doc)."""
    return (
        1 <= len(value) <= 64
        and all(0x20 <= ord(ch) <= 0x7E for ch in value)
        and value == value.strip(" ")
    )


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Market:
    name: str
    base: str
    quote: str
    lot_size: int
    tick_size: int
    maker_fee_bps: int
    taker_fee_bps: int


@dataclass
class Order:
    order_id: int
    client_order_id: str | None
    account: str
    market: str
    side: str
    type: str
    price: int | None
    remaining: int
    tif: str
    stp: str
    reserved: int = 0  # quote for a buy, base for a sell
    arrival: int = 0  # time priority: smaller is earlier


@dataclass
class Result:
    rejected: str | None = None
    event_ts: int = 0
    order_id: int | None = None  # the order this command accepted, if any
    duplicate_of: int | None = None  # for duplicate_client_order_id
    # ("market_created", market, base, quote, lot_size, tick_size, maker_fee_bps, taker_fee_bps)
    # ("accepted", order_id, client_order_id, account, market, side, type, price, qty, tif, stp)
    # ("amended", order_id, client_order_id, account, market, price, qty, priority_kept)
    # ("cancelled", order_id, client_order_id, account, market, reason, remaining)
    # ("filled", order_id, client_order_id, account, market)
    # ("trade", market, price, qty, maker_order_id, taker_order_id, maker_account,
    #           taker_account, taker_side, maker_fee, taker_fee)
    events: list[tuple] = field(default_factory=list)

    @property
    def trades(self) -> list[tuple[int, int, int, int, int, int]]:
        """(price, qty, maker_order_id, taker_order_id, maker_fee, taker_fee) per trade."""
        return [(e[2], e[3], e[4], e[5], e[9], e[10]) for e in self.events if e[0] == "trade"]


class Reject(Exception):
    def __init__(self, reason: str, duplicate_of: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.duplicate_of = duplicate_of


class ReferenceExchange:
    def __init__(self) -> None:
        self.markets: dict[str, Market] = {}
        self.resting: list[Order] = []  # every resting order of every market, unsorted
        self.balance: dict[tuple[str, str], list[int]] = {}  # -> [available, reserved]
        self.supply: dict[str, int] = {}  # asset -> deposits - withdrawals
        self.refs: set[str] = set()
        self.client_order_ids: dict[tuple[str, str], int] = {}
        self.next_order_id = 1
        self.next_arrival = 1
        # The doc: the clock is the largest valid ts seen; any command whose ts is valid
        # advances it, accepted or rejected (shape faults included).
        self.last_ts = 0
        self.commands = 0

    # ---------------------------------------------------------------- queries

    def book(self, market: str, side: str) -> list[tuple[int, str, int, int]]:
        """[(order_id, account, price, remaining)] in priority order."""
        return [(o.order_id, o.account, o.price, o.remaining) for o in self._side(market, side)]

    def levels(self, market: str, side: str) -> list[tuple[int, int]]:
        """[(price, level_qty)] in priority order."""
        out: list[tuple[int, int]] = []
        for o in self._side(market, side):
            if out and out[-1][0] == o.price:
                out[-1] = (o.price, out[-1][1] + o.remaining)
            else:
                out.append((o.price, o.remaining))
        return out

    def balances(self) -> dict[tuple[str, str], tuple[int, int]]:
        """{(account, asset): (available, reserved)}, all-zero entries left out."""
        return {k: (v[0], v[1]) for k, v in self.balance.items() if v != [0, 0]}

    def check(self) -> None:
        """The reference's own sanity: reservations add up, nothing negative, book uncrossed."""
        reserved: dict[tuple[str, str], int] = {}
        for o in self.resting:
            m = self.markets[o.market]
            asset = m.quote if o.side == "buy" else m.base
            want = self._reservation(m, o.side, o.price, o.remaining)
            assert o.reserved == want, (o, want)
            assert o.remaining > 0
            reserved[(o.account, asset)] = reserved.get((o.account, asset), 0) + o.reserved
        for key, (avail, res) in self.balance.items():
            assert avail >= 0 and res >= 0, key
            assert res == reserved.get(key, 0), (key, res, reserved.get(key, 0))
        totals: dict[str, int] = {}
        for (_, asset), (avail, res) in self.balance.items():
            totals[asset] = totals.get(asset, 0) + avail + res
        for asset, supply in self.supply.items():
            assert totals.get(asset, 0) == supply, (asset, totals.get(asset), supply)
        for name in self.markets:
            bids, asks = self._side(name, "buy"), self._side(name, "sell")
            if bids and asks:
                assert bids[0].price < asks[0].price, name

    # ---------------------------------------------------------------- apply

    def apply(self, cmd: object) -> Result:
        self.commands += 1
        reason = self._shape(cmd)
        if reason is not None:
            ts = cmd.get("ts") if isinstance(cmd, dict) else None
            if type(ts) is int and self.last_ts <= ts <= MAX_TS:
                self.last_ts = ts
            return Result(rejected=reason, event_ts=self.last_ts)
        assert isinstance(cmd, dict)
        ts = cmd["ts"]
        if ts < 0 or ts < self.last_ts:
            return Result(rejected="bad_ts", event_ts=self.last_ts)
        self.last_ts = ts
        result = Result(event_ts=ts)
        try:
            getattr(self, "_" + cmd["op"])(cmd, result)
        except Reject as rejection:
            assert not result.events, "a rejection must come before any change"
            return Result(
                rejected=rejection.reason, event_ts=ts, duplicate_of=rejection.duplicate_of
            )
        return result

    @staticmethod
    def _shape(cmd: object) -> str | None:
        if not isinstance(cmd, dict):
            return "bad_command"
        if "op" not in cmd:
            return "missing_field"
        op = cmd["op"]
        if not isinstance(op, str):
            return "wrong_type"  # ASSUMPTION: a non-str op is a type error, not unknown_op
        if op not in OPS:
            return "unknown_op"
        required, optional = OPS[op]
        allowed = required | optional | {"op", "ts"}
        for key in cmd:
            if key not in allowed:
                return "unknown_field"
        for key in sorted(required | {"ts"}):
            if key not in cmd:
                return "missing_field"
        for key, value in cmd.items():
            if key in INT_FIELDS and not is_int(value):
                return "wrong_type"
            if key in STR_FIELDS and not isinstance(value, str):
                return "wrong_type"
        return None

    # ---------------------------------------------------------------- commands

    def _create_market(self, c: dict, r: Result) -> None:
        if not valid_market_name(c["market"]):
            raise Reject("bad_market")
        if not valid_asset(c["base"]) or not valid_asset(c["quote"]):
            raise Reject("bad_asset")
        if c["lot_size"] < 1:
            raise Reject("bad_lot_size")
        if c["tick_size"] < 1:
            raise Reject("bad_tick_size")
        for key in ("maker_fee_bps", "taker_fee_bps"):
            if not 0 <= c[key] <= MAX_FEE_BPS:
                raise Reject("bad_fee")
        if c["base"] == c["quote"]:
            raise Reject("same_asset")
        if c["market"] in self.markets:
            raise Reject("market_exists")
        m = Market(
            c["market"],
            c["base"],
            c["quote"],
            c["lot_size"],
            c["tick_size"],
            c["maker_fee_bps"],
            c["taker_fee_bps"],
        )
        self.markets[m.name] = m
        r.events.append(
            (
                "market_created",
                m.name,
                m.base,
                m.quote,
                m.lot_size,
                m.tick_size,
                m.maker_fee_bps,
                m.taker_fee_bps,
            )
        )

    def _check_transfer(self, c: dict) -> None:
        if not valid_account(c["account"]):
            raise Reject("bad_account")
        if not valid_asset(c["asset"]):
            raise Reject("bad_asset")
        if not 1 <= c["amount"] <= MAX_AMOUNT:
            raise Reject("bad_amount")
        if not valid_token(c["ref"]):
            raise Reject("bad_ref")
        # ASSUMPTION: idempotency first, so a retry always answers duplicate_ref.
        if c["ref"] in self.refs:
            raise Reject("duplicate_ref")

    def _deposit(self, c: dict, r: Result) -> None:
        self._check_transfer(c)
        asset = c["asset"]
        if self.supply.get(asset, 0) + c["amount"] > MAX_SUPPLY:
            raise Reject("amount_too_large")
        self.refs.add(c["ref"])
        self.supply[asset] = self.supply.get(asset, 0) + c["amount"]
        self._bal(c["account"], asset)[0] += c["amount"]

    def _withdraw(self, c: dict, r: Result) -> None:
        self._check_transfer(c)
        bal = self._bal(c["account"], c["asset"])
        if bal[0] < c["amount"]:
            raise Reject("insufficient_funds")
        self.refs.add(c["ref"])
        self.supply[c["asset"]] -= c["amount"]
        bal[0] -= c["amount"]

    def _place(self, c: dict, r: Result) -> None:
        account, side, otype = c["account"], c["side"], c["type"]
        if not valid_account(account):
            raise Reject("bad_account")
        if not valid_market_name(c["market"]):
            raise Reject("bad_market")
        if side not in SIDES:
            raise Reject("bad_side")
        if otype not in ORDER_TYPES:
            raise Reject("bad_order_type")
        if otype == "limit" and "price" not in c:
            raise Reject("missing_field")
        if otype == "market" and "price" in c:
            raise Reject("bad_price")  # ASSUMPTION: the doc only says "limit only"
        qty, price = c["qty"], c.get("price")
        if not 1 <= qty <= MAX_QTY:
            raise Reject("bad_qty")
        if price is not None and not 1 <= price <= MAX_PRICE:
            raise Reject("bad_price")
        # ASSUMPTION: a market order without tif means ioc (its only legal tif).
        tif = c.get("tif", "gtc" if otype == "limit" else "ioc")
        if tif not in TIFS or (otype == "market" and tif != "ioc"):
            raise Reject("bad_tif")
        stp = c.get("stp", "cancel_taker")
        if stp not in STPS:
            raise Reject("bad_stp")
        coid = c.get("client_order_id")
        if coid is not None and not valid_token(coid):
            raise Reject("bad_client_order_id")
        m = self.markets.get(c["market"])
        if m is None:
            raise Reject("unknown_market")
        if price is not None and price % m.tick_size != 0:
            raise Reject("bad_tick")
        if price is not None and price * qty > MAX_NOTIONAL:
            raise Reject("notional_too_large")
        if coid is not None and (account, coid) in self.client_order_ids:
            raise Reject(
                "duplicate_client_order_id", duplicate_of=self.client_order_ids[(account, coid)]
            )
        # ASSUMPTION: funds are checked before post_only / fok.
        if otype == "limit" or side == "sell":
            need = self._reservation(m, side, price, qty)
            if self._bal(account, m.quote if side == "buy" else m.base)[0] < need:
                raise Reject("insufficient_funds")
        # ASSUMPTION: a market buy has no up-front funds check; with nothing available it is
        # accepted and then cancelled `funds` (or `ioc` if the book is empty).
        incoming = Order(
            order_id=self.next_order_id,
            client_order_id=coid,
            account=account,
            market=m.name,
            side=side,
            type=otype,
            price=price,
            remaining=qty,
            tif=tif,
            stp=stp,
        )
        if tif == "post_only" and self._crosses_best(incoming):
            raise Reject("post_only_would_cross")
        if tif == "fok" and self._fok_available(incoming) < qty:
            raise Reject("fok_unfillable")

        self.next_order_id += 1
        if coid is not None:
            self.client_order_ids[(account, coid)] = incoming.order_id
        r.order_id = incoming.order_id
        r.events.append(
            (
                "accepted",
                incoming.order_id,
                coid,
                account,
                m.name,
                side,
                otype,
                price,
                qty,
                tif,
                stp,
            )
        )
        if otype == "limit" or side == "sell":
            self._set_reserved(incoming, self._reservation(m, side, price, qty))
        end = self._match(incoming, r)
        self._finish(incoming, end, r)

    def _find(self, c: dict) -> Order:
        """The caller's resting order named by the command (cancel / amend)."""
        account = c["account"]
        for o in self.resting:
            if o.account != account or o.market != c["market"]:
                continue
            if "order_id" in c and o.order_id == c["order_id"]:
                return o
            if "client_order_id" in c and o.client_order_id == c["client_order_id"]:
                return o
        raise Reject("unknown_order")

    def _check_order_ref(self, c: dict) -> None:
        if not valid_account(c["account"]):
            raise Reject("bad_account")
        if not valid_market_name(c["market"]):
            raise Reject("bad_market")
        if "order_id" in c and "client_order_id" in c:
            raise Reject("ambiguous_order_ref")
        if "order_id" not in c and "client_order_id" not in c:
            raise Reject("missing_field")  # ASSUMPTION: neither given is a missing field
        if "client_order_id" in c and not valid_token(c["client_order_id"]):
            raise Reject("bad_client_order_id")

    def _cancel(self, c: dict, r: Result) -> None:
        self._check_order_ref(c)
        if c["market"] not in self.markets:
            raise Reject("unknown_market")
        o = self._find(c)
        self._cancel_resting(o, "user", r)

    def _amend(self, c: dict, r: Result) -> None:
        self._check_order_ref(c)
        if "price" not in c and "qty" not in c:
            raise Reject("missing_field")  # ASSUMPTION: as for the order reference
        if "qty" in c and not 1 <= c["qty"] <= MAX_QTY:
            raise Reject("bad_qty")
        if "price" in c and not 1 <= c["price"] <= MAX_PRICE:
            raise Reject("bad_price")
        m = self.markets.get(c["market"])
        if m is None:
            raise Reject("unknown_market")
        o = self._find(c)
        price, qty = c.get("price", o.price), c.get("qty", o.remaining)
        assert price is not None
        if price % m.tick_size != 0:
            raise Reject("bad_tick")
        if price * qty > MAX_NOTIONAL:
            raise Reject("notional_too_large")
        if price == o.price and qty == o.remaining:
            raise Reject("no_change")
        need = self._reservation(m, o.side, price, qty)
        asset = m.quote if o.side == "buy" else m.base
        if self._bal(o.account, asset)[0] + o.reserved < need:
            raise Reject("insufficient_funds")
        moved = Order(**{**o.__dict__, "price": price, "remaining": qty})
        if o.tif == "post_only" and self._crosses_best(moved):
            raise Reject("post_only_would_cross")

        kept = price == o.price and qty < o.remaining
        r.events.append(
            ("amended", o.order_id, o.client_order_id, o.account, o.market, price, qty, kept)
        )
        o.price, o.remaining = price, qty
        self._set_reserved(o, need)
        if kept:
            return
        self.resting.remove(o)
        end = self._match(o, r)
        self._finish(o, end, r)

    def _cancel_all(self, c: dict, r: Result) -> None:
        if not valid_account(c["account"]):
            raise Reject("bad_account")
        if "market" in c:
            if not valid_market_name(c["market"]):
                raise Reject("bad_market")
            if c["market"] not in self.markets:
                raise Reject("unknown_market")
        mine = [
            o
            for o in self.resting
            if o.account == c["account"] and ("market" not in c or o.market == c["market"])
        ]
        if not mine:
            raise Reject("no_open_orders")
        for o in sorted(mine, key=lambda o: o.order_id):
            self._cancel_resting(o, "cancel_all", r)

    # ---------------------------------------------------------------- matching

    def _side(self, market: str, side: str) -> list[Order]:
        orders = [o for o in self.resting if o.market == market and o.side == side]
        if side == "buy":
            orders.sort(key=lambda o: (-o.price, o.arrival))
        else:
            orders.sort(key=lambda o: (o.price, o.arrival))
        return orders

    @staticmethod
    def _would_trade(incoming: Order, maker_price: int) -> bool:
        if incoming.type == "market":
            return True
        assert incoming.price is not None
        if incoming.side == "buy":
            return maker_price <= incoming.price
        return maker_price >= incoming.price

    def _crosses_best(self, o: Order) -> bool:
        opposite = self._side(o.market, "sell" if o.side == "buy" else "buy")
        return bool(opposite) and self._would_trade(o, opposite[0].price)

    def _fok_available(self, o: Order) -> int:
        total = 0
        for maker in self._side(o.market, "sell" if o.side == "buy" else "buy"):
            if not self._would_trade(o, maker.price):
                break
            if maker.account == o.account and o.stp != "none":
                if o.stp == "cancel_maker":
                    continue
                break
            total += maker.remaining
        return total

    def _match(self, o: Order, r: Result) -> str | None:
        """Match `o` against the book; return why it must stop early ('stp', 'funds')."""
        m = self.markets[o.market]
        while o.remaining > 0:
            makers = self._side(o.market, "sell" if o.side == "buy" else "buy")
            if not makers or not self._would_trade(o, makers[0].price):
                return None
            maker = makers[0]
            if maker.account == o.account and o.stp != "none":
                # ASSUMPTION: self-trade prevention is decided before the market-buy budget.
                if o.stp in ("cancel_maker", "cancel_both"):
                    self._cancel_resting(maker, "stp", r)
                if o.stp in ("cancel_taker", "cancel_both"):
                    return "stp"
                continue
            qty = min(o.remaining, maker.remaining)
            if o.type == "market" and o.side == "buy":
                # ASSUMPTION: the budget is re-checked before every fill, so the order keeps
                # buying while it can afford at least one lot at the best price.
                qty = self._affordable(o.account, m, maker.price, qty)
                if qty == 0:
                    return "funds"
            self._trade(m, maker, o, qty, r)
        return None

    def _affordable(self, account: str, m: Market, price: int, qty_max: int) -> int:
        available = self._bal(account, m.quote)[0]
        lo, hi = 0, qty_max
        while lo < hi:  # largest q with p*q + p*q*bps//10000 <= available
            mid = (lo + hi + 1) // 2
            if price * mid + price * mid * m.taker_fee_bps // 10000 <= available:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _trade(self, m: Market, maker: Order, taker: Order, qty: int, r: Result) -> None:
        price = maker.price
        assert price is not None
        notional = price * qty
        maker_fee = notional * m.maker_fee_bps // 10000
        taker_fee = notional * m.taker_fee_bps // 10000
        buy, sell = (maker, taker) if maker.side == "buy" else (taker, maker)
        buy_fee, sell_fee = (maker_fee, taker_fee) if buy is maker else (taker_fee, maker_fee)

        if buy.type == "market":
            self._bal(buy.account, m.quote)[0] -= notional + buy_fee
        else:
            self._consume(buy, notional + buy_fee)
        self._bal(buy.account, m.base)[0] += qty * m.lot_size
        self._consume(sell, qty * m.lot_size)
        self._bal(sell.account, m.quote)[0] += notional - sell_fee
        if maker_fee + taker_fee:
            self._bal(FEE_ACCOUNT, m.quote)[0] += maker_fee + taker_fee

        maker.remaining -= qty
        taker.remaining -= qty
        if buy.type == "limit":  # back to exactly the formula; the excess becomes available
            excess = buy.reserved - self._reservation(m, "buy", buy.price, buy.remaining)
            assert excess >= 0, "a buy reservation never runs short"
            self._set_reserved(buy, buy.reserved - excess)
        r.events.append(
            (
                "trade",
                m.name,
                price,
                qty,
                maker.order_id,
                taker.order_id,
                maker.account,
                taker.account,
                taker.side,
                maker_fee,
                taker_fee,
            )
        )
        if maker.remaining == 0:
            self.resting.remove(maker)
            assert maker.reserved == 0
            r.events.append(
                ("filled", maker.order_id, maker.client_order_id, maker.account, maker.market)
            )

    def _finish(self, o: Order, end: str | None, r: Result) -> None:
        """The incoming order's end: filled, cancelled, or resting."""
        if o.remaining == 0:
            self._set_reserved(o, 0)
            r.events.append(("filled", o.order_id, o.client_order_id, o.account, o.market))
            return
        if end is None and o.type == "limit" and o.tif in ("gtc", "post_only"):
            o.arrival = self.next_arrival
            self.next_arrival += 1
            self.resting.append(o)
            return
        self._set_reserved(o, 0)
        r.events.append(
            (
                "cancelled",
                o.order_id,
                o.client_order_id,
                o.account,
                o.market,
                end or "ioc",
                o.remaining,
            )
        )

    def _cancel_resting(self, o: Order, reason: str, r: Result) -> None:
        self.resting.remove(o)
        self._set_reserved(o, 0)
        r.events.append(
            ("cancelled", o.order_id, o.client_order_id, o.account, o.market, reason, o.remaining)
        )

    # ---------------------------------------------------------------- money

    @staticmethod
    def _reservation(m: Market, side: str, price: int | None, qty: int) -> int:
        if side == "sell":
            return qty * m.lot_size
        assert price is not None
        bps = max(m.maker_fee_bps, m.taker_fee_bps)
        return price * qty + price * qty * bps // 10000

    def _bal(self, account: str, asset: str) -> list[int]:
        return self.balance.setdefault((account, asset), [0, 0])

    def _set_reserved(self, o: Order, amount: int) -> None:
        """Move between available and reserved so that `o` holds exactly `amount`."""
        m = self.markets[o.market]
        bal = self._bal(o.account, m.quote if o.side == "buy" else m.base)
        delta = amount - o.reserved
        bal[0] -= delta
        bal[1] += delta
        o.reserved = amount
        assert bal[0] >= 0 and bal[1] >= 0, (o, bal)

    def _consume(self, o: Order, amount: int) -> None:
        """Spend `amount` of `o`'s reservation: it leaves the account."""
        m = self.markets[o.market]
        bal = self._bal(o.account, m.quote if o.side == "buy" else m.base)
        bal[1] -= amount
        o.reserved -= amount
        assert bal[1] >= 0 and o.reserved >= 0, (o, bal)
