"""Resting orders of one market: two sides of price levels, each a FIFO queue.

Both sides are `SortedDict`s keyed so that the best price comes first (bids by negated
price). A level is a deque; a cancelled order is only marked dead and skipped when it reaches
the front, so cancel is O(1) and matching never scans. Dead entries are compacted away once
they outnumber the live ones, which bounds the memory a cancel-heavy flow can pin.
"""

from __future__ import annotations

from collections import deque

from sortedcontainers import SortedDict

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

    def append(self, order: Order) -> None:
        self.orders.append(order)
        self.qty += order.remaining
        self.count += 1

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
    __slots__ = ("asks", "bids", "market")

    def __init__(self, market: str) -> None:
        self.market = market
        self.bids: SortedDict = SortedDict()  # -price -> Level
        self.asks: SortedDict = SortedDict()  # price -> Level

    def side(self, side: str) -> SortedDict:
        return self.bids if side == BUY else self.asks

    @staticmethod
    def key(side: str, price: int) -> int:
        return -price if side == BUY else price

    def level(self, side: str, price: int) -> Level | None:
        return (self.bids if side == BUY else self.asks).get(-price if side == BUY else price)

    def add(self, order: Order) -> None:
        levels = self.bids if order.side == BUY else self.asks
        key = -order.price if order.side == BUY else order.price
        level = levels.get(key)
        if level is None:
            level = levels[key] = Level(order.price)
        level.append(order)

    def remove(self, order: Order) -> None:
        levels = self.bids if order.side == BUY else self.asks
        key = -order.price if order.side == BUY else order.price
        level = levels[key]
        level.kill(order)
        if level.count == 0:
            del levels[key]

    def best(self, side: str) -> int | None:
        levels = self.bids if side == BUY else self.asks
        if not levels:
            return None
        return levels.peekitem(0)[1].price

    def levels(self, side: str) -> list[tuple[int, int]]:
        """(price, qty) best first."""
        return [(lv.price, lv.qty) for lv in (self.bids if side == BUY else self.asks).values()]
