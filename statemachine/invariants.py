"""Internal invariants of the exchange, checked in full.

Cheap enough to run after every step in tests and after every restore; a failure is a bug,
never bad input, and names the rule that broke (TIGER_STYLE: always say why).
"""

from __future__ import annotations

from typing import Any

from .errors import InvariantError
from .order_book import BUY, SELL
from .validation import FEE_ACCOUNT


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise InvariantError(why)


def check(ex: Any) -> None:
    expected_reserved: dict[tuple[str, str], int] = {}
    live = 0
    for name, market in ex._markets.items():
        book = market.book
        for side, levels in ((BUY, book.bids), (SELL, book.asks)):
            for key, level in levels.items():
                _require(key == (-level.price if side == BUY else level.price),
                         f"{name} {side}: level keyed {key} holds price {level.price}")
                orders = [o for o in level.orders if o.alive]
                _require(len(orders) == level.count > 0,
                         f"{name} {side} {level.price}: live count {level.count} != {len(orders)}")
                _require(sum(o.remaining for o in orders) == level.qty,
                         f"{name} {side} {level.price}: level qty {level.qty} != sum of orders")
                _require(sum(1 for o in level.orders if not o.alive) == level.dead,
                         f"{name} {side} {level.price}: dead count is wrong")
                _require(level.price % market.tick_size == 0, f"{name}: price off tick")
                for o in orders:
                    live += 1
                    _require(ex._orders.get(o.order_id) is o,
                             f"order {o.order_id} resting but not indexed")
                    _require(ex._account_orders.get(o.account, {}).get(o.order_id) is o,
                             f"order {o.order_id} missing from its account's index")
                    _require(o.market == name and o.side == side and o.price == level.price,
                             f"order {o.order_id} sits in the wrong level")
                    _require(0 < o.remaining <= o.original,
                             f"order {o.order_id}: filled + remaining != original")
                    _require(o.tif in ("gtc", "post_only"), f"order {o.order_id}: {o.tif} resting")
                    if o.client_order_id is not None:
                        _require(ex._coids.get(o.account, {}).get(o.client_order_id) == o.order_id,
                                 f"order {o.order_id}: client_order_id not recorded")
                    if side == BUY:
                        k = (o.account, market.quote)
                        amount = market.buy_reserve(o.price, o.remaining)
                    else:
                        k = (o.account, market.base)
                        amount = o.remaining * market.lot_size
                    expected_reserved[k] = expected_reserved.get(k, 0) + amount
        best_bid, best_ask = book.best(BUY), book.best(SELL)
        _require(best_bid is None or best_ask is None or best_bid < best_ask,
                 f"{name}: crossed book at rest (bid {best_bid} >= ask {best_ask})")
    _require(live == len(ex._orders), "order index holds orders that are not resting")
    _require(sum(len(m) for m in ex._account_orders.values()) == live,
             "account order index holds orders that are not resting")
    totals: dict[str, int] = {}
    for acct, assets in ex._balances.items():
        for asset, (avail, reserved) in assets.items():
            _require(avail >= 0 and reserved >= 0,
                     f"negative balance {acct}/{asset}: {avail}/{reserved}")
            _require(reserved == expected_reserved.get((acct, asset), 0),
                     f"{acct}/{asset}: reserved {reserved} != "
                     f"{expected_reserved.get((acct, asset), 0)} held by resting orders")
            totals[asset] = totals.get(asset, 0) + avail + reserved
    for key, amount in expected_reserved.items():
        bal = ex._balances.get(key[0], {}).get(key[1])
        _require(bal is not None and bal[1] == amount, f"{key}: orders hold funds not reserved")
    for asset in sorted(set(totals) | set(ex._supply)):
        _require(totals.get(asset, 0) == ex._supply.get(asset, 0),
                 f"{asset}: balances sum to {totals.get(asset, 0)}, deposits - withdrawals = "
                 f"{ex._supply.get(asset, 0)}")
    _require(FEE_ACCOUNT not in ex._account_orders, "the fee account has orders")
