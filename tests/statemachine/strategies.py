"""Hypothesis strategies shared by the state-machine tests.

Two small markets whose prices sit around a mid so that orders cross often, with lot and
tick sizes above 1 and fees that are nonzero and round down often.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

ACCOUNTS = ("alice", "bob", "carol")
ASSETS = ("USD", "BTC", "ETH")
TIFS = ("gtc", "ioc", "fok", "post_only")
STPS = ("cancel_taker", "cancel_maker", "cancel_both", "none")
START_TS = 1_000


@dataclass(frozen=True)
class MarketSpec:
    name: str
    base: str
    quote: str
    lot_size: int
    tick_size: int
    maker_fee_bps: int
    taker_fee_bps: int
    mid: int  # in quote units, a multiple of tick_size

    def create(self, ts: int) -> dict:
        return {
            "op": "create_market",
            "ts": ts,
            "market": self.name,
            "base": self.base,
            "quote": self.quote,
            "lot_size": self.lot_size,
            "tick_size": self.tick_size,
            "maker_fee_bps": self.maker_fee_bps,
            "taker_fee_bps": self.taker_fee_bps,
        }


MARKETS = (
    # Maker and taker fees differ, so the max() in the buy reservation matters.
    MarketSpec(
        "BTC-USD", "BTC", "USD", lot_size=2, tick_size=5, maker_fee_bps=7, taker_fee_bps=30, mid=500
    ),
    # Fee at the 1000 bps ceiling on small notionals: rounding down decides most fees.
    MarketSpec(
        "ETH/USD",
        "ETH",
        "USD",
        lot_size=1,
        tick_size=1,
        maker_fee_bps=0,
        taker_fee_bps=1000,
        mid=20,
    ),
)
MARKET_BY_NAME = {m.name: m for m in MARKETS}

# Enough to trade for a while, little enough that insufficient_funds happens; carol is nearly
# broke, so her market buys run out of money (`funds`) and her orders get rejected.
INITIAL_DEPOSITS = {
    "alice": {"USD": 8_000, "BTC": 40, "ETH": 40},
    "bob": {"USD": 8_000, "BTC": 40, "ETH": 40},
    "carol": {"USD": 150, "BTC": 4, "ETH": 3},
}


def setup_commands(ts: int = START_TS) -> list[dict]:
    """Create the markets, fund every account and rest a few orders on both sides, so that
    trading starts at the first step."""
    cmds = [spec.create(ts) for spec in MARKETS]
    for account in ACCOUNTS:
        for asset, amount in INITIAL_DEPOSITS[account].items():
            cmds.append(
                {
                    "op": "deposit",
                    "ts": ts,
                    "account": account,
                    "asset": asset,
                    "amount": amount,
                    "ref": f"init:{account}:{asset}",
                }
            )
    for spec in MARKETS:
        for account, side, ticks in (
            ("alice", "sell", 1),
            ("alice", "sell", 2),
            ("bob", "buy", -1),
            ("bob", "buy", -2),
        ):
            cmds.append(
                {
                    "op": "place",
                    "ts": ts,
                    "account": account,
                    "market": spec.name,
                    "side": side,
                    "type": "limit",
                    "qty": 3,
                    "price": spec.mid + ticks * spec.tick_size,
                }
            )
    return cmds


def price_near(spec: MarketSpec, ticks: int = 4) -> st.SearchStrategy[int]:
    return st.integers(-ticks, ticks).map(
        lambda k: max(spec.tick_size, spec.mid + k * spec.tick_size)
    )


quantities = st.one_of(st.integers(1, 6), st.integers(1, 6), st.integers(7, 25))
accounts = st.sampled_from(ACCOUNTS)
markets = st.sampled_from(MARKETS)
sides = st.sampled_from(("buy", "sell"))
optional_tif = st.sampled_from((None, *TIFS))
optional_stp = st.sampled_from((None, *STPS))
# A small pool per account, so that duplicates and cancels by client_order_id happen.
client_order_ids = st.sampled_from([f"c{i}" for i in range(8)])


@st.composite
def place_commands(draw: st.DrawFn) -> dict:
    spec = draw(markets)
    otype = draw(st.sampled_from(("limit", "limit", "limit", "market")))
    cmd = {
        "op": "place",
        "account": draw(accounts),
        "market": spec.name,
        "side": draw(sides),
        "type": otype,
        "qty": draw(quantities),
    }
    if otype == "limit":
        cmd["price"] = draw(price_near(spec))
        tif = draw(optional_tif)
    else:
        tif = draw(st.sampled_from((None, "ioc")))
    if tif is not None:
        cmd["tif"] = tif
    stp = draw(optional_stp)
    if stp is not None:
        cmd["stp"] = stp
    if draw(st.booleans()):
        cmd["client_order_id"] = draw(client_order_ids)
    return cmd


@st.composite
def order_ref_commands(draw: st.DrawFn, op: str) -> dict:
    """A cancel or amend naming an order by a small id or a pooled client_order_id."""
    spec = draw(markets)
    cmd: dict = {"op": op, "account": draw(accounts), "market": spec.name}
    if draw(st.booleans()):
        cmd["order_id"] = draw(st.integers(1, 40))
    else:
        cmd["client_order_id"] = draw(client_order_ids)
    if op == "amend":
        which = draw(st.sampled_from(("price", "qty", "both")))
        if which in ("price", "both"):
            cmd["price"] = draw(price_near(spec))
        if which in ("qty", "both"):
            cmd["qty"] = draw(st.integers(1, 10))
    return cmd


@st.composite
def transfer_commands(draw: st.DrawFn) -> dict:
    return {
        "op": draw(st.sampled_from(("deposit", "deposit", "withdraw"))),
        "account": draw(accounts),
        "asset": draw(st.sampled_from(ASSETS)),
        "amount": draw(st.integers(1, 3_000)),
        "ref": draw(st.sampled_from([f"tx{i}" for i in range(12)])),
    }


@st.composite
def cancel_all_commands(draw: st.DrawFn) -> dict:
    cmd = {"op": "cancel_all", "account": draw(accounts)}
    market = draw(st.sampled_from((None, *MARKET_BY_NAME)))
    if market is not None:
        cmd["market"] = market
    return cmd


# A command without its ts; the session stamps ts.
session_step = st.one_of(
    place_commands(),
    place_commands(),
    place_commands(),
    order_ref_commands("cancel"),
    order_ref_commands("amend"),
    transfer_commands(),
    cancel_all_commands(),
)


@st.composite
def sessions(draw: st.DrawFn, min_size: int = 10, max_size: int = 80) -> list[dict]:
    """A well-shaped command stream with non-decreasing ts (some commands still get
    business rejections: that is part of the point)."""
    steps = draw(st.lists(session_step, min_size=min_size, max_size=max_size))
    ts = START_TS
    cmds = setup_commands(ts)
    for step in steps:
        ts += draw(st.integers(0, 2))
        cmds.append({**step, "ts": ts})
    return cmds


def busy_session() -> list[dict]:
    """A fixed session that leaves a varied state: partial fills on both sides, fees, an
    amended order, STP and `funds` cancellations, withdrawals, and resting orders on both
    sides of both markets."""
    ts = START_TS
    cmds = setup_commands(ts)
    btc, eth = MARKETS[0].name, MARKETS[1].name

    def place(account, market, side, qty, price=None, **kw):
        cmd = {
            "op": "place",
            "ts": ts,
            "account": account,
            "market": market,
            "side": side,
            "type": "market" if price is None else "limit",
            "qty": qty,
        }
        if price is not None:
            cmd["price"] = price
        return {**cmd, **kw}

    steps = [
        place("carol", btc, "buy", 1),  # cannot afford a lot: cancelled `funds`
        place("bob", btc, "buy", 4, 505, client_order_id="b1"),  # takes 3, rests 1
        place("alice", btc, "sell", 2, 505, stp="cancel_maker"),  # takes bob's 1, rests 1
        place("bob", btc, "buy", 2, 510, stp="cancel_both"),  # 505 then 510
        place("alice", btc, "buy", 1, 510, tif="ioc"),  # own ask: cancelled `stp`
        place("carol", eth, "sell", 2, 19, tif="ioc"),
        place("carol", eth, "buy", 1, 18, client_order_id="c-low"),
        place("bob", eth, "buy", 2, 17, client_order_id="b-eth"),
        {"op": "amend", "ts": ts, "account": "alice", "market": eth, "order_id": 5, "qty": 2},
        {
            "op": "amend",
            "ts": ts,
            "account": "bob",
            "market": eth,
            "client_order_id": "b-eth",
            "price": 18,
        },
        place("alice", eth, "buy", 1, 16, tif="post_only", client_order_id="a-po"),
        {"op": "withdraw", "ts": ts, "account": "bob", "asset": "USD", "amount": 100, "ref": "w1"},
        place("alice", btc, "buy", 2, 495, client_order_id="a-bid"),
        place("bob", btc, "sell", 1, 520, client_order_id="b-ask"),
    ]
    for step in steps:
        ts += 1
        cmds.append({**step, "ts": ts})
    return cmds
