"""The books of a snapshot body (format version 2), built into an `ExchangeState` and checked
as they are built: the part of a restore that costs per resting order.

Compiled with mypyc with the rest of the engine (pyproject.toml native-modules): the loop
below runs once per resting order, a million times for a large book, on every node that
loads a snapshot. Typed, it becomes C that calls `Order` and `Level` directly; as Python (a
build without a compiler) it gives the same state, only slower. snapshot.py has the layout
and the rest of the decode; this module holds no state of its own. Compiled, it holds the
GIL from start to end (about a second per million orders): a follower installing a large
snapshot answers nothing else meanwhile, as it applies nothing else.

A side of a book is eight columns (snapshot.py writes them): the level prices best first,
each level's order count, then per order in queue order its id, its account (an index into
the body's balances), its remaining quantity, its filled quantity (original - remaining),
its time in force and self-trade prevention (`tif << 2 | stp`), and its client order id or
nil. The seven integer columns are msgpack bins: empty, or one byte saying how wide every
value is (1, 2, 4 or 8 bytes, the least that holds the column's largest value) and the
values, unsigned little-endian (snapshot.uints); unpacking one makes no object per value. The
client order ids are a msgpack array. Nothing here trusts the body: a checksum proves only
that the bytes are the ones written, not that a build of ours wrote them, so every value
is range-checked before use and whatever is accepted passes `invariants.check`
(tests/statemachine/test_determinism.py).
"""

from __future__ import annotations

from typing import cast

from .errors import SnapshotError
from .order_book import BUY, SELL, Level, Order
from .state import ExchangeState, Market

TIF_CODES: dict[str, int] = {"gtc": 0, "post_only": 1}
STP_CODES: dict[str, int] = {"cancel_taker": 0, "cancel_maker": 1, "cancel_both": 2, "none": 3}
TIF_OF_CODE: dict[int, str] = {code: tif for tif, code in TIF_CODES.items()}
STP_OF_CODE: dict[int, str] = {code: stp for stp, code in STP_CODES.items()}
SIDE_COLUMNS = 8
WIDTHS = (1, 2, 4, 8)


def width_for(top: int) -> int:
    """The bytes per value of a column whose largest value is `top`."""
    return 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8


class _Uints:
    """An integer column of a side (see the module's doc), read in place: `at(i)`."""

    def __init__(self, column: object) -> None:
        if type(column) is not bytes:
            raise SnapshotError("snapshot book column is not bytes")
        data: bytes = column
        self.data = data
        self.width = width = data[0] if data else 1
        self.n = (len(data) - 1) // width if data else 0
        if data and (width not in WIDTHS or (len(data) - 1) % width or not self.n):
            raise SnapshotError("snapshot book column has a bad width or length")
        if width > 1 and not any(
            data[1 + k :: width] != bytes(self.n) for k in range(width // 2, width)
        ):
            # No value needs the upper half of the width: not how this build writes it.
            raise SnapshotError("snapshot book column is wider than its values need")

    def at(self, i: int) -> int:
        data = self.data
        width = self.width
        j = 1 + i * width
        if width == 1:
            return data[j]
        if width == 2:
            return data[j] | data[j + 1] << 8
        if width == 4:
            return data[j] | data[j + 1] << 8 | data[j + 2] << 16 | data[j + 3] << 24
        value = 0
        for k in range(j + 7, j - 1, -1):
            value = value << 8 | data[k]
        return value


def _least(value: int, lo: int) -> int:
    if value < lo:
        raise SnapshotError(f"snapshot book value {value} is below {lo}")
    return value


def build_books(
    state: ExchangeState, books: list, accounts: list[str]
) -> dict[tuple[str, str], int]:
    """Fill `state`'s books, `orders` and `account_orders` from the body's books, and add the
    client order ids of resting orders to `state.coids` (which holds the others). Returns
    what the resting orders hold per (account, asset), for `invariants.check_funds`.

    Checked here, besides the shape: levels best first, on the tick, none empty; each order's
    fields, remaining > 0, its id used once, its client order id used once by its account;
    no crossed book. (snapshot.py checks that the fee account rests nothing, and the
    balances' reservations against what this returns.)"""
    if type(books) is not list:
        raise SnapshotError("snapshot books are not a list")
    orders = state.orders
    by_id: dict = orders  # keyed by `key` (typed as int, each use would box a new object)
    account_orders = state.account_orders
    coids = state.coids
    n_accounts = len(accounts)
    # By account number: its orders, each followed by its id's int object (one for the keys
    # of `orders` and `account_orders` and the values of `coids`, as a live engine has).
    orders_of: list[list[object] | None] = [None] * n_accounts
    reserved: dict[tuple[str, str], int] = {}
    placed = 0
    names = [entry[0] for entry in books if type(entry) is list and len(entry) == 3]
    if names != sorted(state.markets) or len(names) != len(books):
        raise SnapshotError("snapshot books do not match its markets")
    for entry in books:
        name: str = entry[0]
        market: Market = state.markets[name]
        book = market.book
        tick = market.tick_size
        for s in range(2):
            buy = s == 0
            side = BUY if buy else SELL
            columns = entry[1 + s]
            if type(columns) is not list or len(columns) != SIDE_COLUMNS:
                raise SnapshotError("snapshot book side has the wrong shape")
            prices = _Uints(columns[0])
            counts = _Uints(columns[1])
            oids = _Uints(columns[2])
            numbers = _Uints(columns[3])
            remainings = _Uints(columns[4])
            filleds = _Uints(columns[5])
            flags = _Uints(columns[6])
            client_ids = columns[7]
            if type(client_ids) is not list:
                raise SnapshotError("snapshot client order id column is not a list")
            n = oids.n
            if prices.n != counts.n or not (
                numbers.n == remainings.n == filleds.n == flags.n == len(client_ids) == n
            ):
                raise SnapshotError("snapshot book columns differ in length")
            book_side = book.bids if buy else book.asks
            previous = 0
            at = 0
            for i in range(prices.n):
                price = _least(prices.at(i), 1)
                count = _least(counts.at(i), 1)
                # Canonical: levels best first, each price once, on the tick.
                if (previous and (price >= previous if buy else price <= previous)) or (
                    price % tick
                ):
                    raise SnapshotError("snapshot book levels are out of order, empty or off tick")
                previous = price
                end = at + count
                if end > n:
                    raise SnapshotError("snapshot book levels hold more orders than its columns")
                level = Level(price)
                book_side[-price if buy else price] = level
                queue: list[Order] = []  # into the level's deque in one call at the end
                qty = 0
                while at < end:
                    oid = _least(oids.at(at), 1)
                    key: object = oid  # one int object for the order's id in every index
                    number = numbers.at(at)
                    remaining = _least(remainings.at(at), 1)
                    filled = filleds.at(at)
                    flag = flags.at(at)
                    client_id = client_ids[at]
                    if number >= n_accounts:
                        raise SnapshotError("snapshot order's account is not in its balances")
                    acct = accounts[number]
                    tif = TIF_OF_CODE.get(flag >> 2)
                    stp = STP_OF_CODE.get(flag & 3)
                    if tif is None or stp is None:
                        raise SnapshotError("snapshot order's time in force is unknown")
                    coid: str | None = None
                    if client_id is not None:
                        if type(client_id) is not str:
                            raise SnapshotError("snapshot order's client order id is not a string")
                        coid = client_id
                        hash(coid)  # computed now, while its bytes are in cache
                    order = Order(oid, acct, name, side, price, remaining, tif, stp, coid)
                    order.original = remaining + filled
                    queue.append(order)
                    qty += remaining
                    by_id[key] = order
                    theirs = orders_of[number]
                    if theirs is None:
                        orders_of[number] = [order, key]
                    else:
                        theirs.append(order)
                        theirs.append(key)
                    at += 1
                    placed += 1
                level.orders.extend(queue)
                level.qty = qty
                level.count = count
            if at != n:
                raise SnapshotError("snapshot book columns hold orders no level counts")
        book.reset_best()
        best_bid, best_ask = book.best(BUY), book.best(SELL)
        if best_bid is not None and best_ask is not None and best_bid >= best_ask:
            raise SnapshotError(f"{name}: crossed book at rest (bid {best_bid} >= ask {best_ask})")
    if len(orders) != placed:
        raise SnapshotError("snapshot books hold an order id twice")
    # Each account's index of its orders and of its client order ids, and what its orders
    # hold, one account at a time (in book order, every order would go to a different
    # account's dictionaries: a cache miss or more each, a second per million orders).
    markets = state.markets
    for number in range(n_accounts):
        theirs = orders_of[number]
        if theirs is None:
            continue
        acct = accounts[number]
        mine: dict[int, Order] = {}
        by_key: dict = mine
        recorded: dict[str, int] | None = None
        held: dict[str, int] = {}  # asset -> what the account's orders hold of it
        # An account's orders come a market and a side at a time (book order): what they
        # hold is summed per run, as a plain integer, and added to `held` when the run ends.
        run_market = ""
        run_buy = False
        run_asset = ""
        max_bps = lot_size = 0
        total = 0
        for at in range(0, len(theirs), 2):
            order = cast(Order, theirs[at])
            key = theirs[at + 1]
            by_key[key] = order
            buy = order.side == BUY
            if order.market != run_market or buy != run_buy:
                if total:
                    held[run_asset] = held.get(run_asset, 0) + total
                market = markets[order.market]
                run_market, run_buy = order.market, buy
                run_asset = market.quote if buy else market.base
                max_bps, lot_size, total = market.max_bps, market.lot_size, 0
            if buy:  # `Market.buy_reserve`: the quote a resting buy holds
                notional = order.price * order.remaining
                total += notional + notional * max_bps // 10000
            else:  # the base a resting sell holds
                total += order.remaining * lot_size
            coid = order.client_order_id
            if coid is not None:
                if recorded is None:
                    recorded = coids.get(acct)
                    if recorded is None:
                        recorded = {}
                        coids[acct] = recorded
                ids: dict = recorded
                size = len(recorded)
                ids[coid] = key  # one probe; a repeat leaves the size as it was
                if len(recorded) == size:
                    raise SnapshotError(f"order {order.order_id}: client_order_id used twice")
        held[run_asset] = held.get(run_asset, 0) + total  # the last run
        account_orders[acct] = mine
        for asset, amount in held.items():
            reserved[(acct, asset)] = amount
    return reserved
