"""Read-only queries over an `ExchangeState`: what the API and the tests ask of a replica.

Nothing here writes to the state. Every answer comes out in a defined order (sorted names,
book priority), never in the order of a dict's history. `Exchange` has one method per
function, which is how other packages call them.
"""

from __future__ import annotations

from .state import ExchangeState

_EMPTY: dict = {}  # stands for a missing inner dict in lookups (never written to)


def markets(state: ExchangeState) -> list[dict]:
    """Every market's parameters, by name."""
    by_name = state.markets
    return [by_name[name].as_dict() for name in sorted(by_name)]


def balances(
    state: ExchangeState, account: str | None = None
) -> dict[tuple[str, str], tuple[int, int]]:
    """{(account, asset): (available, reserved)} for every non-zero balance."""
    out = {}
    for acct in sorted(state.balances):
        if account is not None and acct != account:
            continue
        assets = state.balances[acct]
        for asset in sorted(assets):
            bal = assets[asset]
            if bal.available or bal.reserved:
                out[(acct, asset)] = (bal.available, bal.reserved)
    return out


def book_levels(
    state: ExchangeState, market: str, side: str, depth: int | None = None
) -> list[tuple[int, int]]:
    """[(price, qty)] best first; empty for an unknown market."""
    m = state.markets.get(market)
    if m is None:
        return []
    levels = m.book.levels(side)
    return levels if depth is None else levels[:depth]


def open_orders(
    state: ExchangeState, account: str | None = None, market: str | None = None
) -> list[dict]:
    """Resting orders, book by book (markets by name, bids then asks), in priority order."""
    out = []
    for name in sorted(state.markets):
        if market is not None and name != market:
            continue
        book = state.markets[name].book
        for levels in (book.bids, book.asks):
            for level in levels.values():
                for o in level.orders:
                    if o.alive and (account is None or o.account == account):
                        out.append(o.as_dict())
    return out


def order(state: ExchangeState, order_id: int) -> dict | None:
    """A resting order, or None (never placed, or no longer resting)."""
    found = state.orders.get(order_id)
    return None if found is None else found.as_dict()


def order_id_for(state: ExchangeState, account: str, client_order_id: str) -> int | None:
    """The order an account placed with this client_order_id, resting or not."""
    return state.coids.get(account, _EMPTY).get(client_order_id)
