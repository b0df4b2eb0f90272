"""The exchange: a pure function of (state, command) -> (state', events).

No clock, randomness, I/O or floats; nothing iterates an unordered set. Every handler first
validates everything (raising `Rejection`, which changes nothing) and only then mutates, so
a rejected command leaves the state exactly as it was apart from the counters.
See docs/reference/state-machine.md for the contract this module implements.
"""

from __future__ import annotations

import hashlib
from typing import Any

from . import validation as v
from .errors import InvariantError, Rejection
from .order_book import BUY, SELL, Book, Level, Order
from .validation import FEE_ACCOUNT, MAX_AMOUNT, MAX_ID, MAX_PRICE, MAX_QTY


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
        self, name: str, base: str, quote: str, lot_size: int, tick_size: int, maker: int, taker: int
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


class Exchange:
    """Order books, balances and idempotency records of one replica."""

    def __init__(self) -> None:
        self._seq = 0
        self._cmd_index = 0
        self._last_ts = 0
        self._next_order_id = 1
        self._next_trade_id = 1
        self._markets: dict[str, Market] = {}
        self._balances: dict[str, dict[str, list[int]]] = {}  # account -> asset -> [avail, reserved]
        self._supply: dict[str, int] = {}  # asset -> deposits - withdrawals
        self._refs: set[str] = set()
        self._coids: dict[str, dict[str, int]] = {}  # account -> client_order_id -> order_id
        self._orders: dict[int, Order] = {}  # live resting orders
        self._account_orders: dict[str, dict[int, Order]] = {}
        # Per-command scratch: what changed, in first-touch order (dicts keep insertion order).
        # Values are what the balance / level held before this command touched it.
        self._touched_balances: dict[tuple[str, str], tuple[int, int]] = {}
        self._touched_levels: dict[tuple[str, str, int], int] = {}
        self._handlers = {
            "create_market": self._create_market,
            "deposit": self._deposit,
            "withdraw": self._withdraw,
            "place": self._place,
            "cancel": self._cancel,
            "amend": self._amend,
            "cancel_all": self._cancel_all,
        }

    # ------------------------------------------------------------------ public surface

    def apply(self, command: Any) -> list[dict]:
        """Apply one command and return its events. Never raises for a bad command."""
        self._cmd_index += 1
        self._touched_balances = {}
        self._touched_levels = {}
        events: list[dict] = []
        try:
            op, ts = v.check_envelope(command, self._last_ts)
            self._handlers[op](command, events)
        except Rejection as rejection:
            events = [self._rejected_event(command, rejection)]
            # The log's clock advances with any command whose ts is valid, accepted or not,
            # so event ts never goes back along seq.
            ts = v.safe_ts(command, self._last_ts)
        else:
            self._emit_changes(events)
        self._last_ts = ts
        seq = self._seq
        cmd_index = self._cmd_index
        for event in events:
            seq += 1
            event["seq"] = seq
            event["ts"] = ts
            event["cmd_index"] = cmd_index
        self._seq = seq
        return events

    def snapshot(self) -> bytes:
        from .snapshot import encode

        return encode(self)

    @classmethod
    def restore(cls, blob: bytes) -> Exchange:
        from .snapshot import decode

        return decode(blob)

    def state_hash(self, *, counters: bool = True) -> str:
        """Hex sha256 of the canonical state; `counters=False` leaves out seq/cmd_index/ts."""
        from .snapshot import COUNTER_FIELDS, body_fields, pack

        fields = body_fields(self)
        if not counters:
            fields = fields[COUNTER_FIELDS:]
        return hashlib.sha256(pack(fields)).hexdigest()

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def cmd_index(self) -> int:
        return self._cmd_index

    @property
    def last_ts(self) -> int:
        return self._last_ts

    def markets(self) -> list[dict]:
        return [self._markets[name].as_dict() for name in sorted(self._markets)]

    def balances(self, account: str | None = None) -> dict[tuple[str, str], tuple[int, int]]:
        """{(account, asset): (available, reserved)} for every non-zero balance."""
        out = {}
        for acct in sorted(self._balances):
            if account is not None and acct != account:
                continue
            assets = self._balances[acct]
            for asset in sorted(assets):
                avail, reserved = assets[asset]
                if avail or reserved:
                    out[(acct, asset)] = (avail, reserved)
        return out

    def book_levels(self, market: str, side: str, depth: int | None = None) -> list[tuple[int, int]]:
        """[(price, qty)] best first; empty for an unknown market."""
        m = self._markets.get(market)
        if m is None:
            return []
        levels = m.book.levels(side)
        return levels if depth is None else levels[:depth]

    def open_orders(self, account: str | None = None, market: str | None = None) -> list[dict]:
        """Resting orders, book by book (markets by name, bids then asks), in priority order."""
        out = []
        for name in sorted(self._markets):
            if market is not None and name != market:
                continue
            book = self._markets[name].book
            for levels in (book.bids, book.asks):
                for level in levels.values():
                    for order in level.orders:
                        if order.alive and (account is None or order.account == account):
                            out.append(order.as_dict())
        return out

    def order(self, order_id: int) -> dict | None:
        order = self._orders.get(order_id)
        return None if order is None else order.as_dict()

    def order_id_for(self, account: str, client_order_id: str) -> int | None:
        return self._coids.get(account, {}).get(client_order_id)

    def check_invariants(self) -> None:
        from .invariants import check

        check(self)

    # ------------------------------------------------------------------ plumbing

    def _rejected_event(self, command: Any, rejection: Rejection) -> dict:
        event = {
            "type": "rejected",
            "op": v.safe_op(command),
            "reason": rejection.reason,
            "message": rejection.message,
            "client_order_id": v.safe_client_order_id(command),
            "account": v.safe_account(command),
        }
        if rejection.order_id is not None:
            event["order_id"] = rejection.order_id
        return event

    def _emit_changes(self, events: list[dict]) -> None:
        for (market, side, price), before in self._touched_levels.items():
            level = self._markets[market].book.level(side, price)
            qty = 0 if level is None else level.qty
            if qty == before:
                continue
            events.append(
                {
                    "type": "book",
                    "market": market,
                    "side": side,
                    "price": price,
                    "level_qty": qty,
                }
            )
        balances = self._balances
        for (account, asset), before in self._touched_balances.items():
            avail, reserved = balances[account][asset]
            if (avail, reserved) == before:
                continue
            events.append(
                {
                    "type": "balance",
                    "account": account,
                    "asset": asset,
                    "available": avail,
                    "reserved": reserved,
                }
            )

    def _bal(self, account: str, asset: str) -> list[int]:
        """A balance to change (created on demand and recorded as touched)."""
        assets = self._balances.get(account)
        if assets is None:
            assets = self._balances[account] = {}
        bal = assets.get(asset)
        if bal is None:
            bal = assets[asset] = [0, 0]
        key = (account, asset)
        if key not in self._touched_balances:
            self._touched_balances[key] = (bal[0], bal[1])
        return bal

    def _available(self, account: str, asset: str) -> int:
        """Read-only: never creates an entry, so rejection paths cannot change state."""
        bal = self._balances.get(account, {}).get(asset)
        return 0 if bal is None else bal[0]

    def _market(self, command: dict) -> Market:
        name = v.market_name(command)
        market = self._markets.get(name)
        if market is None:
            raise Rejection("unknown_market", f"unknown market {name!r}")
        return market

    def _price(self, command: dict, market: Market) -> int:
        price = v.integer(command, "price", 1, MAX_PRICE, "bad_price")
        if price % market.tick_size:
            raise Rejection("bad_tick", f"price must be a multiple of tick_size {market.tick_size}")
        return price

    @staticmethod
    def _check_size(market: Market, price: int | None, qty: int) -> None:
        if qty * market.lot_size > MAX_AMOUNT or (price is not None and price * qty > MAX_AMOUNT):
            raise Rejection("notional_too_large", "order notional exceeds the limit")

    def _find_order(self, command: dict, account: str, market: Market) -> Order:
        has_id = "order_id" in command
        has_coid = "client_order_id" in command
        if has_id and has_coid:
            raise Rejection("ambiguous_order_ref", "give order_id or client_order_id, not both")
        if has_id:
            order_id = v.integer(command, "order_id", 1, MAX_ID, "bad_order_id")
        elif has_coid:
            coid = v.token(command, "client_order_id", "bad_client_order_id")
            order_id = self._coids.get(account, {}).get(coid, 0)
        else:
            raise Rejection("missing_field", "missing field 'order_id'")
        order = self._orders.get(order_id)
        if order is None or order.account != account or order.market != market.name:
            raise Rejection("unknown_order", "no such open order for this account and market")
        return order

    # ------------------------------------------------------------------ handlers

    def _create_market(self, command: dict, events: list[dict]) -> None:
        name = v.market_name(command)
        base = v.asset(command, "base")
        quote = v.asset(command, "quote")
        lot_size = v.integer(command, "lot_size", 1, MAX_QTY, "bad_lot_size")
        tick_size = v.integer(command, "tick_size", 1, MAX_PRICE, "bad_tick_size")
        maker = v.integer(command, "maker_fee_bps", 0, v.MAX_FEE_BPS, "bad_fee")
        taker = v.integer(command, "taker_fee_bps", 0, v.MAX_FEE_BPS, "bad_fee")
        if base == quote:
            raise Rejection("same_asset", "base and quote must differ")
        if name in self._markets:
            raise Rejection("market_exists", f"market {name!r} already exists")
        market = self._markets[name] = Market(name, base, quote, lot_size, tick_size, maker, taker)
        events.append({"type": "market_created", **market.as_dict()})

    def _transfer_args(self, command: dict) -> tuple[str, str, int, str]:
        account = v.account(command)
        asset = v.asset(command)
        amount = v.integer(command, "amount", 1, MAX_AMOUNT, "bad_amount")
        ref = v.token(command, "ref", "bad_ref")
        if ref in self._refs:
            raise Rejection("duplicate_ref", "ref already used")
        return account, asset, amount, ref

    def _deposit(self, command: dict, events: list[dict]) -> None:
        account, asset, amount, ref = self._transfer_args(command)
        supply = self._supply.get(asset, 0)
        if supply + amount > MAX_AMOUNT:
            raise Rejection("amount_too_large", "asset supply would exceed the limit")
        self._refs.add(ref)
        self._supply[asset] = supply + amount
        self._balance_change_event(account, asset, amount, ref, events)

    def _withdraw(self, command: dict, events: list[dict]) -> None:
        account, asset, amount, ref = self._transfer_args(command)
        if self._available(account, asset) < amount:
            raise Rejection("insufficient_funds", "available balance is lower than amount")
        self._refs.add(ref)
        self._supply[asset] -= amount
        self._balance_change_event(account, asset, -amount, ref, events)

    def _balance_change_event(
        self, account: str, asset: str, delta: int, ref: str, events: list[dict]
    ) -> None:
        bal = self._bal(account, asset)
        del self._touched_balances[(account, asset)]  # reported here, with its ref
        bal[0] += delta
        events.append(
            {
                "type": "balance",
                "account": account,
                "asset": asset,
                "available": bal[0],
                "reserved": bal[1],
                "ref": ref,
            }
        )

    def _place(self, command: dict, events: list[dict]) -> None:
        account = v.account(command)
        market = self._market(command)
        side = v.choice(command, "side", v.SIDES, "", "bad_side")
        order_type = v.choice(command, "type", v.ORDER_TYPES, "", "bad_order_type")
        qty = v.integer(command, "qty", 1, MAX_QTY, "bad_qty")
        is_limit = order_type == "limit"
        tif = v.choice(command, "tif", v.TIFS, "gtc" if is_limit else "ioc", "bad_tif")
        stp = v.choice(command, "stp", v.STPS, "cancel_taker", "bad_stp")
        coid = None
        if "client_order_id" in command:
            coid = v.token(command, "client_order_id", "bad_client_order_id")
        if is_limit:
            if "price" not in command:
                raise Rejection("missing_field", "missing field 'price' for a limit order")
            price: int | None = self._price(command, market)
        else:
            if "price" in command:
                raise Rejection("bad_price", "a market order takes no price")
            if tif != "ioc":
                raise Rejection("bad_tif", "a market order is always ioc")
            price = None
        self._check_size(market, price, qty)
        if coid is not None:
            first = self._coids.get(account, {}).get(coid)
            if first is not None:
                raise Rejection(
                    "duplicate_client_order_id", "client_order_id already used", order_id=first
                )
        if side == BUY:
            if price is not None and market.buy_reserve(price, qty) > self._available(
                account, market.quote
            ):
                raise Rejection("insufficient_funds", f"not enough {market.quote} available")
        elif qty * market.lot_size > self._available(account, market.base):
            raise Rejection("insufficient_funds", f"not enough {market.base} available")
        if tif == "post_only" and self._crosses(market, side, price):
            raise Rejection("post_only_would_cross", "a post-only order would trade on arrival")
        if tif == "fok" and self._fillable(market, side, price, qty, account, stp) < qty:
            raise Rejection("fok_unfillable", "a fill-or-kill order cannot fill completely")

        # Valid: from here on the command takes effect.
        order_id = self._next_order_id
        self._next_order_id = order_id + 1
        order = Order(order_id, account, market.name, side, price or 0, qty, tif, stp, coid)
        if coid is not None:
            self._coids.setdefault(account, {})[coid] = order_id
        if price is not None:
            self._reserve(market, order)
        events.append(
            {
                "type": "accepted",
                "order_id": order_id,
                "client_order_id": coid,
                "account": account,
                "market": market.name,
                "side": side,
                "order_type": order_type,
                "price": price,
                "qty": qty,
                "tif": tif,
                "stp": stp,
            }
        )
        self._take(market, order, price is None, events)

    def _cancel(self, command: dict, events: list[dict]) -> None:
        account = v.account(command)
        market = self._market(command)
        order = self._find_order(command, account, market)
        self._cancel_resting(market, order, "user", events)

    def _cancel_all(self, command: dict, events: list[dict]) -> None:
        account = v.account(command)
        market = self._market(command) if "market" in command else None
        mine = self._account_orders.get(account, {})
        victims = [
            mine[oid]
            for oid in sorted(mine)
            if market is None or mine[oid].market == market.name
        ]
        if not victims:
            raise Rejection("no_open_orders", "no open orders to cancel")
        for order in victims:
            self._cancel_resting(self._markets[order.market], order, "cancel_all", events)

    def _amend(self, command: dict, events: list[dict]) -> None:
        account = v.account(command)
        market = self._market(command)
        order = self._find_order(command, account, market)
        if "price" not in command and "qty" not in command:
            raise Rejection("missing_field", "amend needs price or qty")
        price = self._price(command, market) if "price" in command else order.price
        qty = v.integer(command, "qty", 1, MAX_QTY, "bad_qty") if "qty" in command else order.remaining
        if price == order.price and qty == order.remaining:
            raise Rejection("no_change", "the order already has this price and quantity")
        self._check_size(market, price, qty)
        if price == order.price and qty < order.remaining:
            self._amend_in_place(market, order, qty, events)
            return
        if order.side == BUY:
            held = market.buy_reserve(order.price, order.remaining)
            need = market.buy_reserve(price, qty)
            if need > held + self._available(account, market.quote):
                raise Rejection("insufficient_funds", f"not enough {market.quote} available")
        else:
            held = order.remaining * market.lot_size
            if qty * market.lot_size > held + self._available(account, market.base):
                raise Rejection("insufficient_funds", f"not enough {market.base} available")
        if order.tif == "post_only" and self._crosses(market, order.side, price):
            raise Rejection("post_only_would_cross", "a post-only order would trade on arrival")

        # Leaves its queue; a fresh object re-enters, so the dead queue entry stays dead.
        self._touch_level(market, order.side, order.price)
        market.book.remove(order)
        self._release(market, order)
        filled = order.original - order.remaining
        fresh = Order(
            order.order_id,
            account,
            market.name,
            order.side,
            price,
            qty,
            order.tif,
            order.stp,
            order.client_order_id,
        )
        fresh.original = filled + qty
        self._orders[fresh.order_id] = fresh
        self._account_orders[account][fresh.order_id] = fresh
        self._reserve(market, fresh)
        events.append(self._amended_event(fresh, priority_kept=False))
        self._take(market, fresh, False, events)

    def _amend_in_place(self, market: Market, order: Order, qty: int, events: list[dict]) -> None:
        delta = order.remaining - qty
        level = market.book.level(order.side, order.price)
        assert level is not None
        if order.side == BUY:
            freed = market.buy_reserve(order.price, order.remaining) - market.buy_reserve(
                order.price, qty
            )
            bal = self._bal(order.account, market.quote)
        else:
            freed = delta * market.lot_size
            bal = self._bal(order.account, market.base)
        bal[0] += freed
        bal[1] -= freed
        self._touch_level(market, order.side, order.price)
        level.qty -= delta
        order.remaining = qty
        order.original -= delta
        events.append(self._amended_event(order, priority_kept=True))

    @staticmethod
    def _amended_event(order: Order, *, priority_kept: bool) -> dict:
        return {
            "type": "amended",
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "account": order.account,
            "market": order.market,
            "price": order.price,
            "qty": order.remaining,
            "priority_kept": priority_kept,
        }

    # ------------------------------------------------------------------ matching

    def _crosses(self, market: Market, side: str, price: int | None) -> bool:
        best = market.book.best(SELL if side == BUY else BUY)
        if best is None:
            return False
        if price is None:
            return True
        return best <= price if side == BUY else best >= price

    def _fillable(
        self, market: Market, side: str, price: int | None, qty: int, account: str, stp: str
    ) -> int:
        """Quantity an incoming limit order would really get now (for the FOK check)."""
        levels = market.book.asks if side == BUY else market.book.bids
        got = 0
        for level in levels.values():
            if price is not None and (level.price > price if side == BUY else level.price < price):
                break
            for maker in level.orders:
                if not maker.alive:
                    continue
                if maker.account == account and stp != "none":
                    if stp == "cancel_maker":
                        continue
                    return got
                got += maker.remaining
                if got >= qty:
                    return got
        return got

    def _take(self, market: Market, taker: Order, is_market: bool, events: list[dict]) -> None:
        """Match an incoming (or re-entering) order, then rest, fill or cancel what is left."""
        book = market.book
        buy = taker.side == BUY
        levels = book.asks if buy else book.bids
        limit = taker.price
        account = taker.account
        stp = taker.stp
        maker_bps = market.maker_bps
        taker_bps = market.taker_bps
        mname = market.name
        maker_side = SELL if buy else BUY
        budget_limited = buy and is_market  # a market buy spends at most its available quote
        end_reason = None
        while taker.remaining and levels:
            key, level = levels.peekitem(0)
            price = level.price
            if not is_market and (price > limit if buy else price < limit):
                break
            touched = (mname, maker_side, price)
            if touched not in self._touched_levels:
                self._touched_levels[touched] = level.qty
            while taker.remaining and level.count:
                queue = level.orders
                maker = queue[0]
                if not maker.alive:
                    queue.popleft()
                    level.dead -= 1
                    continue
                if maker.account == account and stp != "none":
                    if stp != "cancel_taker":
                        level.kill(maker)
                        self._retire(market, maker)
                        events.append(self._cancelled_event(maker, "stp"))
                    if stp != "cancel_maker":
                        end_reason = "stp"
                        break
                    continue
                fill = min(taker.remaining, maker.remaining)
                if budget_limited:
                    budget = self._available(account, market.quote)
                    fill = min(fill, self._affordable(budget, price, taker_bps))
                    if fill == 0:
                        end_reason = "funds"
                        break
                self._settle(market, taker, maker, price, fill, is_market)
                notional = price * fill
                trade_id = self._next_trade_id
                self._next_trade_id = trade_id + 1
                events.append(
                    {
                        "type": "trade",
                        "trade_id": trade_id,
                        "market": mname,
                        "price": price,
                        "qty": fill,
                        "maker_order_id": maker.order_id,
                        "taker_order_id": taker.order_id,
                        "maker_account": maker.account,
                        "taker_account": account,
                        "taker_side": taker.side,
                        "maker_fee": notional * maker_bps // 10000,
                        "taker_fee": notional * taker_bps // 10000,
                    }
                )
                level.qty -= fill
                if maker.remaining == 0:
                    maker.alive = False
                    queue.popleft()
                    level.count -= 1
                    del self._orders[maker.order_id]
                    self._forget(maker)
                    events.append(self._filled_event(maker))
            if level.count == 0:
                del levels[key]
            if end_reason is not None:
                break

        if taker.remaining == 0:
            if not is_market:
                self._drop_record(taker)
            events.append(self._filled_event(taker))
            return
        if end_reason is None and not is_market and taker.tif in ("gtc", "post_only"):
            self._touch_level(market, taker.side, taker.price)
            book.add(taker)
            self._orders[taker.order_id] = taker
            self._account_orders.setdefault(account, {})[taker.order_id] = taker
            return
        if taker.tif == "fok":
            raise InvariantError("a FOK order passed its fill check but did not fill")
        if not is_market:
            self._release(market, taker)
            self._drop_record(taker)
        events.append(self._cancelled_event(taker, end_reason or "ioc"))

    def _drop_record(self, order: Order) -> None:
        """An amended order that finishes re-entry is still indexed; unindex it."""
        if self._orders.get(order.order_id) is order:
            del self._orders[order.order_id]
            self._forget(order)

    @staticmethod
    def _affordable(budget: int, price: int, bps: int) -> int:
        """Largest q with price*q + price*q*bps//10000 <= budget."""
        q = budget * 10000 // (price * (10000 + bps))
        while (price * (q + 1)) + (price * (q + 1) * bps // 10000) <= budget:
            q += 1
        return q

    def _settle(
        self,
        market: Market,
        taker: Order,
        maker: Order,
        price: int,
        fill: int,
        is_market: bool,
    ) -> None:
        """Move the money of one fill; both orders' remaining drop by `fill`."""
        notional = price * fill
        base_amount = fill * market.lot_size
        maker_fee = notional * market.maker_bps // 10000
        taker_fee = notional * market.taker_bps // 10000
        quote = market.quote
        base = market.base
        if taker.side == BUY:
            buyer, buyer_fee, seller, seller_fee = taker, taker_fee, maker, maker_fee
            seller_reserved = True
            buyer_reserved = not is_market
        else:
            buyer, buyer_fee, seller, seller_fee = maker, maker_fee, taker, taker_fee
            seller_reserved = not is_market
            buyer_reserved = True
        # Buyer: pays notional + fee in quote, receives base.
        if buyer_reserved:
            held_before = market.buy_reserve(buyer.price, buyer.remaining)
            held_after = market.buy_reserve(buyer.price, buyer.remaining - fill)
            bal = self._bal(buyer.account, quote)
            bal[1] -= held_before - held_after
            bal[0] += held_before - held_after - notional - buyer_fee
        else:
            self._bal(buyer.account, quote)[0] -= notional + buyer_fee
        self._bal(buyer.account, base)[0] += base_amount
        # Seller: delivers base, receives notional - fee in quote.
        bal = self._bal(seller.account, base)
        if seller_reserved:
            bal[1] -= base_amount
        else:
            bal[0] -= base_amount
        self._bal(seller.account, quote)[0] += notional - seller_fee
        if maker_fee or taker_fee:
            self._bal(FEE_ACCOUNT, quote)[0] += maker_fee + taker_fee
        taker.remaining -= fill
        maker.remaining -= fill

    # ------------------------------------------------------------------ order lifecycle

    def _reserve(self, market: Market, order: Order) -> None:
        if order.side == BUY:
            amount = market.buy_reserve(order.price, order.remaining)
            bal = self._bal(order.account, market.quote)
        else:
            amount = order.remaining * market.lot_size
            bal = self._bal(order.account, market.base)
        bal[0] -= amount
        bal[1] += amount

    def _release(self, market: Market, order: Order) -> None:
        if order.side == BUY:
            amount = market.buy_reserve(order.price, order.remaining)
            bal = self._bal(order.account, market.quote)
        else:
            amount = order.remaining * market.lot_size
            bal = self._bal(order.account, market.base)
        bal[0] += amount
        bal[1] -= amount

    def _cancel_resting(self, market: Market, order: Order, reason: str, events: list[dict]) -> None:
        self._touch_level(market, order.side, order.price)
        market.book.remove(order)
        self._retire(market, order)
        events.append(self._cancelled_event(order, reason))

    def _retire(self, market: Market, order: Order) -> None:
        """Release a resting order's funds and unindex it (it has left its queue)."""
        self._release(market, order)
        del self._orders[order.order_id]
        self._forget(order)

    def _forget(self, order: Order) -> None:
        mine = self._account_orders[order.account]
        del mine[order.order_id]
        if not mine:
            del self._account_orders[order.account]

    def _touch_level(self, market: Market, side: str, price: int) -> None:
        """Record a level's quantity before this command changes it (call before the change)."""
        key = (market.name, side, price)
        if key not in self._touched_levels:
            level = market.book.level(side, price)
            self._touched_levels[key] = 0 if level is None else level.qty

    @staticmethod
    def _cancelled_event(order: Order, reason: str) -> dict:
        return {
            "type": "cancelled",
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "account": order.account,
            "market": order.market,
            "reason": reason,
            "remaining": order.remaining,
        }

    @staticmethod
    def _filled_event(order: Order) -> dict:
        return {
            "type": "filled",
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "account": order.account,
            "market": order.market,
        }


__all__ = ["BUY", "SELL", "Exchange", "Level", "Market"]
