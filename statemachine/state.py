"""The exchange's state, as one explicit object: what a snapshot holds, and nothing hidden.

`Exchange` (exchange.py) changes it command by command; `accounts.py` moves money in it,
`reads.py` answers queries from it, `snapshot.py` encodes and rebuilds it, `invariants.py`
checks it. They all use these public attributes; none reaches into `Exchange`.

Every attribute but the per-command scratch (`touched_*`, `Balance.touched`) is state:
`snapshot.py` writes it (the two order indexes are rebuilt from the books) and `state_hash`
covers it.
"""

from __future__ import annotations

from .order_book import Book, Order


class Market:
    __slots__ = (
        "base",
        "book",
        "lot_size",
        "maker_bps",
        "max_bps",
        "name",
        "quote",
        "taker_bps",
        "tick_size",
    )

    def __init__(
        self,
        name: str,
        base: str,
        quote: str,
        lot_size: int,
        tick_size: int,
        maker: int,
        taker: int,
    ) -> None:
        self.name = name
        self.base = base
        self.quote = quote
        self.lot_size = lot_size
        self.tick_size = tick_size
        self.maker_bps = maker
        self.taker_bps = taker
        self.max_bps = max(maker, taker)
        self.book = Book(name)

    def buy_reserve(self, price: int, qty: int) -> int:
        """Quote a resting buy of `qty` at `price` must hold: notional plus the worst fee."""
        notional = price * qty
        return notional + notional * self.max_bps // 10000

    def as_dict(self) -> dict:
        return {
            "market": self.name,
            "base": self.base,
            "quote": self.quote,
            "lot_size": self.lot_size,
            "tick_size": self.tick_size,
            "maker_fee_bps": self.maker_bps,
            "taker_fee_bps": self.taker_bps,
        }


class Balance:
    """What one account holds of one asset."""

    __slots__ = ("account", "asset", "available", "reserved", "touched")

    def __init__(self, account: str, asset: str, available: int = 0, reserved: int = 0) -> None:
        self.account = account
        self.asset = asset
        self.available = available
        self.reserved = reserved
        # cmd_index of the last command that recorded this balance as touched
        # (see `accounts.touch`).
        self.touched: int | None = None


class ExchangeState:
    """Counters, markets with their books, balances and idempotency records of one replica."""

    __slots__ = (
        "account_orders",
        "balances",
        "cmd_index",
        "coids",
        "last_ts",
        "markets",
        "next_order_id",
        "next_trade_id",
        "orders",
        "refs",
        "seq",
        "supply",
        "touched_balances",
        "touched_levels",
    )

    def __init__(self) -> None:
        # Counters: `seq` of the last event, commands applied, the log's clock (the largest
        # valid `ts` seen), and the next ids to give out.
        self.seq = 0
        self.cmd_index = 0
        self.last_ts = 0
        self.next_order_id = 1
        self.next_trade_id = 1
        self.markets: dict[str, Market] = {}  # each with its book of resting orders
        self.balances: dict[str, dict[str, Balance]] = {}  # account -> asset -> Balance
        self.supply: dict[str, int] = {}  # asset -> deposits - withdrawals
        self.refs: set[str] = set()  # deposit/withdrawal refs already used
        self.coids: dict[str, dict[str, int]] = {}  # account -> client_order_id -> order_id
        self.orders: dict[int, Order] = {}  # live resting orders
        # account -> order_id -> live resting order. Its order means nothing (a restore
        # rebuilds it in book order); cancel_all sorts the ids itself.
        self.account_orders: dict[str, dict[int, Order]] = {}
        # Per-command scratch, empty between commands and never snapshotted (filled while a
        # command runs, emptied by `Exchange._emit_changes`): what changed, in first-touch
        # order, with what it held before this command touched it. Levels: (market, side,
        # price) -> quantity. Balances: (balance, available, reserved); `Balance.touched`
        # says whether a balance is in the list already.
        self.touched_levels: dict[tuple[str, str, int], int] = {}
        self.touched_balances: list[tuple[Balance, int, int]] = []


__all__ = ["Balance", "ExchangeState", "Market"]
