"""Resting orders of one market: two sides of price levels, each a FIFO queue.

Both sides are `SortedDict`s keyed so that the best price comes first (bids by negated
price). A level is a deque; a cancelled order is only marked dead and skipped when it reaches
the front, so cancel is O(1) and matching never scans. Dead entries are compacted away once
they outnumber the live ones, which bounds the memory a cancel-heavy flow can pin.

Each side's best level is also kept in `best_bid` / `best_ask`: every incoming limit order
looks at the best opposite price, and reading the first item of a `SortedDict` costs a
Python-level call into sortedcontainers, many times a plain attribute. Levels are only
created by `add` and deleted by `remove` / `drop`, which keep it right; `invariants.py`
checks it.
"""

from __future__ import annotations

from collections import deque

from sortedcontainers import SortedDict  # type: ignore[import-untyped]

BUY = "buy"
SELL = "sell"


class Order:
    __slots__ = (
        "account",
        "alive",
        "client_order_id",
        "market",
        "order_id",
        "original",
        "price",
        "remaining",
        "side",
        "stp",
        "tif",
    )

    def __init__(
        self,
        order_id: int,
        account: str,
        market: str,
        side: str,
        price: int,
        qty: int,
        tif: str,
        stp: str,
        client_order_id: str | None,
    ) -> None:
        self.order_id = order_id
        self.account = account
        self.market = market
        self.side = side
        self.price = price
        self.remaining = qty
        self.original = qty
        self.tif = tif
        self.stp = stp
        self.client_order_id = client_order_id
        self.alive = True

    def as_dict(self) -> dict:
        return {
            "order_id": self.order_id,
            "client_order_id": self.client_order_id,
            "account": self.account,
            "market": self.market,
            "side": self.side,
            "price": self.price,
            "remaining": self.remaining,
            "filled": self.original - self.remaining,
            "original": self.original,
            "tif": self.tif,
            "stp": self.stp,
        }


class Level:
    __slots__ = ("count", "dead", "orders", "price", "qty")

    def __init__(self, price: int) -> None:
        self.price = price
        self.orders: deque[Order] = deque()
        self.qty = 0  # sum of live remaining
        self.count = 0  # live orders
        self.dead = 0  # dead entries still in the deque

    def kill(self, order: Order) -> None:
        """Remove a live order that is not at the front being matched (cancel, amend)."""
        order.alive = False
        self.qty -= order.remaining
        self.count -= 1
        self.dead += 1
        if self.dead > 32 and self.dead > self.count:
            self.orders = deque(o for o in self.orders if o.alive)
            self.dead = 0

    def live(self) -> list[Order]:
        return [o for o in self.orders if o.alive]


class Book:
    __slots__ = ("asks", "best_ask", "best_bid", "bids", "market")

    def __init__(self, market: str) -> None:
        self.market = market
        self.bids: SortedDict = SortedDict()  # -price -> Level
        self.asks: SortedDict = SortedDict()  # price -> Level
        self.best_bid: Level | None = None  # bids' first level
        self.best_ask: Level | None = None  # asks' first level

    def side(self, side: str) -> SortedDict:
        return self.bids if side == BUY else self.asks

    @staticmethod
    def key(side: str, price: int) -> int:
        return -price if side == BUY else price

    def level(self, side: str, price: int) -> Level | None:
        return (self.bids if side == BUY else self.asks).get(-price if side == BUY else price)

    def add(self, order: Order) -> Level:
        """Append a live order to the queue of its price (created if new); return the level."""
        price = order.price
        if order.side == BUY:
            level = self.bids.get(-price)
            if level is None:
                level = self.bids[-price] = Level(price)
                if self.best_bid is None or price > self.best_bid.price:
                    self.best_bid = level
        else:
            level = self.asks.get(price)
            if level is None:
                level = self.asks[price] = Level(price)
                if self.best_ask is None or price < self.best_ask.price:
                    self.best_ask = level
        level.orders.append(order)
        level.qty += order.remaining
        level.count += 1
        return level

    def remove(self, order: Order) -> None:
        """Take a live order out of its level (not the front of a level being matched)."""
        key = -order.price if order.side == BUY else order.price
        level = (self.bids if order.side == BUY else self.asks)[key]
        level.kill(order)
        if level.count == 0:
            self.drop(order.side, key)

    def drop(self, side: str, key: int) -> None:
        """Delete the emptied level at `key` of `side`, finding the new best if it was the best."""
        if side == BUY:
            if self.bids.pop(key) is self.best_bid:
                self.best_bid = self.bids.peekitem(0)[1] if self.bids else None
        elif self.asks.pop(key) is self.best_ask:
            self.best_ask = self.asks.peekitem(0)[1] if self.asks else None

    def reset_best(self) -> None:
        """Recompute both best levels (after levels were built directly, as a restore does)."""
        self.best_bid = self.bids.peekitem(0)[1] if self.bids else None
        self.best_ask = self.asks.peekitem(0)[1] if self.asks else None

    def best(self, side: str) -> int | None:
        level = self.best_bid if side == BUY else self.best_ask
        return None if level is None else level.price

    def levels(self, side: str) -> list[tuple[int, int]]:
        """(price, qty) best first."""
        return [(lv.price, lv.qty) for lv in (self.bids if side == BUY else self.asks).values()]
