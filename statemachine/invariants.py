"""Internal invariants of the exchange, checked in full.

Cheap enough to run after every step in tests and after every restore; a failure is a bug,
never bad input, and names the rule that broke (TIGER_STYLE: always say why).

The rules, in the order they are checked (the first broken one is reported):

1. per price level, best first: it is keyed by its price; its live count matches its queue
   and is not zero; its quantity is the sum of its live orders; its dead count is right; its
   price is on the tick;
2. per live order of that level, in queue order: indexed by id and by account; sits in the
   level of its market, side and price; 0 < remaining <= original; only gtc/post_only rest;
   its client_order_id is recorded;
3. per market: `best_bid` / `best_ask` are the first levels; the book is not crossed at rest;
4. the order indexes hold nothing but the resting orders; every balance is filed under its
   own account and asset; no balance is negative; every reservation is exactly what the
   resting orders hold; per asset, balances sum to deposits - withdrawals; the fee account
   has no orders.

It is one pass over the resting orders (a restore of a million orders runs it), and a
message is only formatted once a rule has failed. It reads an `ExchangeState` (state.py)
through its public attributes.
"""

from __future__ import annotations

from typing import NoReturn

from .errors import InvariantError
from .order_book import BUY, SELL, Level
from .state import ExchangeState
from .validation import FEE_ACCOUNT

_NONE: dict = {}  # what a missing index entry looks like (never written to)
_RESTING_TIFS = ("gtc", "post_only")


def check(state: ExchangeState) -> None:
    orders_index = state.orders
    account_index = state.account_orders
    coids = state.coids
    # (account, asset) -> what the resting orders hold, in first-seen order.
    expected_reserved: dict[tuple[str, str], int] = {}
    live = 0
    for name, market in state.markets.items():
        book = market.book
        tick = market.tick_size
        lot_size = market.lot_size
        max_bps = market.max_bps
        for side, levels in ((BUY, book.bids), (SELL, book.asks)):
            buy = side == BUY
            asset = market.quote if buy else market.base
            # This side's reservations by account. A running sum starts from what earlier
            # books already put on the same (account, asset), so the additions are the ones,
            # in the order, of adding each order straight into `expected_reserved`.
            held: dict[str, int] = {}
            for key, level in levels.items():
                price = level.price
                if key != (-price if buy else price):
                    raise InvariantError(f"{name} {side}: level keyed {key} holds price {price}")
                qty = n_dead = 0
                for o in level.orders:
                    if not o.alive:
                        n_dead += 1
                        continue
                    remaining = o.remaining
                    qty += remaining
                    oid = o.order_id
                    account = o.account
                    # id(): the same test as `is`, without mypy narrowing `o` to the index's
                    # `Order | None` afterwards.
                    if id(orders_index.get(oid)) != id(o):
                        _order_broken(
                            name, side, level, tick, f"order {oid} resting but not indexed"
                        )
                    if id(account_index.get(account, _NONE).get(oid)) != id(o):
                        _order_broken(
                            name, side, level, tick, f"order {oid} missing from its account's index"
                        )
                    if not (o.market == name and o.side == side and o.price == price):
                        _order_broken(
                            name, side, level, tick, f"order {oid} sits in the wrong level"
                        )
                    if not 0 < remaining <= o.original:
                        _order_broken(
                            name, side, level, tick, f"order {oid}: filled + remaining != original"
                        )
                    if o.tif not in _RESTING_TIFS:
                        _order_broken(name, side, level, tick, f"order {oid}: {o.tif} resting")
                    coid = o.client_order_id
                    if coid is not None and coids.get(account, _NONE).get(coid) != oid:
                        _order_broken(
                            name, side, level, tick, f"order {oid}: client_order_id not recorded"
                        )
                    if buy:  # `market.buy_reserve(o.price, remaining)`, inline
                        notional = o.price * remaining
                        amount = notional + notional * max_bps // 10000
                    else:
                        amount = remaining * lot_size
                    so_far = held.get(account)
                    if so_far is None:
                        so_far = expected_reserved.get((account, asset), 0)
                    held[account] = so_far + amount
                n_live = len(level.orders) - n_dead
                _check_level(name, side, level, tick, n_live, qty, n_dead)
                live += n_live
            for account, amount in held.items():
                expected_reserved[(account, asset)] = amount
        if book.best_bid is not (book.bids.peekitem(0)[1] if book.bids else None):
            raise InvariantError(f"{name}: best_bid is not the first bid level")
        if book.best_ask is not (book.asks.peekitem(0)[1] if book.asks else None):
            raise InvariantError(f"{name}: best_ask is not the first ask level")
        best_bid, best_ask = book.best(BUY), book.best(SELL)
        if not (best_bid is None or best_ask is None or best_bid < best_ask):
            raise InvariantError(f"{name}: crossed book at rest (bid {best_bid} >= ask {best_ask})")
    if live != len(orders_index):
        raise InvariantError("order index holds orders that are not resting")
    if sum(len(m) for m in account_index.values()) != live:
        raise InvariantError("account order index holds orders that are not resting")
    check_funds(state, expected_reserved)
    if FEE_ACCOUNT in account_index:
        raise InvariantError("the fee account has orders")


def check_funds(state: ExchangeState, expected_reserved: dict[tuple[str, str], int]) -> None:
    """The balance rules of 4, given what the resting orders hold per (account, asset): every
    balance filed under its own account and asset and not negative, every reservation exactly
    what the orders hold, per asset balances summing to deposits - withdrawals. (The snapshot
    decode calls it too, with the holdings it summed while building the books.)"""
    totals: dict[str, int] = {}
    for acct, assets in state.balances.items():
        for asset, bal in assets.items():
            if bal.account != acct or bal.asset != asset:
                raise InvariantError(f"{acct}/{asset}: balance filed under the wrong key")
            avail, reserved = bal.available, bal.reserved
            if not (avail >= 0 and reserved >= 0):
                raise InvariantError(f"negative balance {acct}/{asset}: {avail}/{reserved}")
            if reserved != expected_reserved.get((acct, asset), 0):
                raise InvariantError(
                    f"{acct}/{asset}: reserved {reserved} != "
                    f"{expected_reserved.get((acct, asset), 0)} held by resting orders"
                )
            totals[asset] = totals.get(asset, 0) + avail + reserved
    balances = state.balances
    for key, amount in expected_reserved.items():
        holder = balances.get(key[0], _NONE).get(key[1])
        if not (holder is not None and holder.reserved == amount):
            raise InvariantError(f"{key}: orders hold funds not reserved")
    supply = state.supply
    for asset in sorted(set(totals) | set(supply)):
        if totals.get(asset, 0) != supply.get(asset, 0):
            raise InvariantError(
                f"{asset}: balances sum to {totals.get(asset, 0)}, deposits - withdrawals = "
                f"{supply.get(asset, 0)}"
            )


def _check_level(
    name: str, side: str, level: Level, tick: int, n_live: int, qty: int, n_dead: int
) -> None:
    """The level rules, given what its queue holds (live orders, their quantity, dead entries)."""
    if not n_live == level.count > 0:
        raise InvariantError(f"{name} {side} {level.price}: live count {level.count} != {n_live}")
    if qty != level.qty:
        raise InvariantError(f"{name} {side} {level.price}: level qty {level.qty} != sum of orders")
    if n_dead != level.dead:
        raise InvariantError(f"{name} {side} {level.price}: dead count is wrong")
    if not level.price % tick == 0:
        raise InvariantError(f"{name}: price off tick")


def _order_broken(name: str, side: str, level: Level, tick: int, why: str) -> NoReturn:
    """An order of `level` broke a rule. The level's own rules come first in the rule order,
    so if one of them is broken too, that is the one reported."""
    live = [o for o in level.orders if o.alive]
    n_dead = len(level.orders) - len(live)
    _check_level(name, side, level, tick, len(live), sum(o.remaining for o in live), n_dead)
    raise InvariantError(why)
