"""Accounts: balances, reservations, deposits and withdrawals, over an `ExchangeState`.

Money moves through these functions, except a fill's settlement: `Exchange._match` does that
inline (it is the hot loop), getting each balance it changes from `touch`. Like the
handlers, `deposit` and `withdraw` validate everything before their first write, so a
rejection changes nothing. The `balance` events are the exchange's to write.
"""

from __future__ import annotations

from . import validation as v
from .errors import Rejection
from .order_book import BUY, Order
from .state import Balance, ExchangeState, Market
from .validation import MAX_AMOUNT

_EMPTY: dict = {}  # stands for a missing inner dict in lookups (never written to)


def touch(state: ExchangeState, account: str, asset: str) -> Balance:
    """A balance about to change: created on demand, recorded as touched on first use.

    Call it before the change: the record keeps what the balance held before this command.
    """
    assets = state.balances.get(account)
    if assets is None:
        assets = state.balances[account] = {}
    bal = assets.get(asset)
    if bal is None:
        bal = assets[asset] = Balance(account, asset)
    if bal.touched != state.cmd_index:
        bal.touched = state.cmd_index
        state.touched_balances.append((bal, bal.available, bal.reserved))
    return bal


def available(state: ExchangeState, account: str, asset: str) -> int:
    """Read-only: never creates an entry, so rejection paths cannot change state."""
    bal = state.balances.get(account, _EMPTY).get(asset)
    return 0 if bal is None else bal.available


def reserve(state: ExchangeState, market: Market, order: Order) -> None:
    """Hold what a resting order needs: `buy_reserve` quote for a buy, its base for a sell."""
    if order.side == BUY:
        amount = market.buy_reserve(order.price, order.remaining)
        bal = touch(state, order.account, market.quote)
    else:
        amount = order.remaining * market.lot_size
        bal = touch(state, order.account, market.base)
    bal.available -= amount
    bal.reserved += amount


def release(state: ExchangeState, market: Market, order: Order) -> None:
    """Give back all that a resting order holds (it finished, or leaves its queue)."""
    if order.side == BUY:
        amount = market.buy_reserve(order.price, order.remaining)
        bal = touch(state, order.account, market.quote)
    else:
        amount = order.remaining * market.lot_size
        bal = touch(state, order.account, market.base)
    bal.available += amount
    bal.reserved -= amount


def affordable(budget: int, price: int, bps: int) -> int:
    """Largest q with price*q + price*q*bps//10000 <= budget."""
    q = budget * 10000 // (price * (10000 + bps))
    while (price * (q + 1)) + (price * (q + 1) * bps // 10000) <= budget:
        q += 1
    return q


def deposit(state: ExchangeState, command: dict) -> tuple[Balance, str]:
    """Credit a deposit; returns the balance credited and the deposit's ref."""
    account, asset, amount, ref = _transfer_args(state, command)
    supply = state.supply.get(asset, 0)
    if supply + amount > MAX_AMOUNT:
        raise Rejection("amount_too_large", "asset supply would exceed the limit")
    state.refs.add(ref)
    state.supply[asset] = supply + amount
    return _credit(state, account, asset, amount), ref


def withdraw(state: ExchangeState, command: dict) -> tuple[Balance, str]:
    """Debit a withdrawal from available funds; returns the balance debited and the ref."""
    account, asset, amount, ref = _transfer_args(state, command)
    if available(state, account, asset) < amount:
        raise Rejection("insufficient_funds", "available balance is lower than amount")
    state.refs.add(ref)
    state.supply[asset] -= amount
    return _credit(state, account, asset, -amount), ref


def _transfer_args(state: ExchangeState, command: dict) -> tuple[str, str, int, str]:
    account = v.account(command)
    asset = v.asset(command)
    amount = v.integer(command, "amount", 1, MAX_AMOUNT, "bad_amount")
    ref = v.token(command, "ref", "bad_ref")
    if ref in state.refs:
        raise Rejection("duplicate_ref", "ref already used")
    return account, asset, amount, ref


def _credit(state: ExchangeState, account: str, asset: str, delta: int) -> Balance:
    # Not recorded as touched: the exchange reports a transfer's balance itself, with its ref.
    assets = state.balances.get(account)
    if assets is None:
        assets = state.balances[account] = {}
    bal = assets.get(asset)
    if bal is None:
        bal = assets[asset] = Balance(account, asset)
    bal.available += delta
    return bal
