"""The exchange: a pure function of (state, command) -> (state', events).

No clock, randomness, I/O or floats; nothing iterates an unordered set. Every handler first
validates everything (raising `Rejection`, which changes nothing) and only then mutates, so
a rejected command leaves the state exactly as it was apart from the counters.
See docs/reference/state-machine.md for the contract this module implements.

`Exchange` holds an `ExchangeState` (state.py) and is the only thing that applies commands
to it: the handlers, matching with self-trade prevention, settlement and the events are here,
together, because they are the hot path. Money outside a fill is in accounts.py, the
read-only queries in reads.py; `Exchange` keeps one thin method for each read, the
snapshot codec (snapshot.py) and the invariant check (invariants.py), all of which take the
state, not the exchange.

Every replica runs every command through here, so this is the cluster's hot path
(`python -m bench.statemachine` measures it). What keeps it fast, without changing a byte it
emits:

- `place` and `cancel` test each field inline for the usual valid value; anything else goes
  to the function of validation.py for that field, which raises the exact rejection. The
  checks keep the order of the contract, so a command with several faults still gets one
  stable reason.
- An event gets its `seq`, `ts` and `cmd_index` when it is created, as the last keys of its
  dict literal (key order: `type`, fields..., `seq`, `ts`, `cmd_index`).
- The two commands that make up most of the traffic, a limit order that rests without
  trading and a cancel, change exactly one level and one balance, always: they write their
  `book` and `balance` events directly. Everything else records what it touches and lets
  `_emit_changes` diff it at the end of the command.
- A balance records itself as touched by stamping the command's index on itself: the
  "first touch this command?" test is an attribute compare, not a tuple key in a dict.
- A fill settles with two balance lookups (the maker's); the taker's balances and the fee
  account's are looked up once per command. Hot loops keep what they use in locals.
- A method reads the state through one local (`st = self.state`); compiled, an attribute of
  `st` is a field load, like one of `self` was when the state lived on the exchange.
"""

from __future__ import annotations

from typing import Any

from . import accounts, invariants, reads
from . import snapshot as codec
from . import validation as v
from .accounts import affordable, available, release, reserve, touch
from .errors import InvariantError, Rejection
from .order_book import BUY, SELL, Level, Order
from .state import Balance, ExchangeState, Market
from .validation import FEE_ACCOUNT, MAX_AMOUNT, MAX_ID, MAX_PRICE, MAX_QTY

_ABSENT = object()  # `command.get(field, _ABSENT)`: tells a missing field from a None value
_EMPTY: dict = {}  # stands for a missing inner dict in lookups (never written to)
_RESTING_TIFS = ("gtc", "post_only")
# Names validation.py has already found valid (see its caches); a hit skips a function call.
_ACCOUNTS_SEEN = v.ACCOUNTS_SEEN
_MARKETS_SEEN = v.MARKETS_SEEN


class Exchange:
    """Applies commands to one replica's `ExchangeState` (`state`, the whole of it)."""

    def __init__(self, state: ExchangeState | None = None) -> None:
        # No table of bound methods: it would make every exchange a reference cycle, so a
        # dropped state (a snapshot replacing it) would wait for the cyclic collector, and a
        # node freezes its state out of that collector's sight (cluster/machine.py).
        self.state = ExchangeState() if state is None else state

    # ------------------------------------------------------------------ public surface

    def apply(self, command: Any) -> list[dict]:
        """Apply one command and return its events. Never raises for a bad command."""
        st = self.state
        st.cmd_index += 1
        seq_before = st.seq
        clock = st.last_ts
        events: list[dict] = []
        try:
            op, ts = v.check_envelope(command, clock)
            # The log's clock advances with any command whose ts is valid, accepted or not,
            # so event ts never goes back along seq. Handlers stamp their events with it.
            st.last_ts = ts
            # Most frequent first; compiled, each is a direct call.
            if op == "place":
                self._place(command, events)
            elif op == "cancel":
                self._cancel(command, events)
            elif op == "amend":
                self._amend(command, events)
            elif op == "cancel_all":
                self._cancel_all(command, events)
            elif op == "deposit":
                self._deposit(command, events)
            elif op == "withdraw":
                self._withdraw(command, events)
            else:  # check_envelope knows no other op
                self._create_market(command, events)
        except Rejection as rejection:
            # Handlers reject before they change anything: only the counters move.
            st.seq = seq_before
            st.touched_levels.clear()
            st.touched_balances.clear()
            st.last_ts = v.safe_ts(command, clock)
            return [self._rejected_event(command, rejection)]
        except BaseException:
            # A bug (an InvariantError): the replica must stop. Leave seq and the clock as
            # they were, and no scratch behind.
            st.seq = seq_before
            st.last_ts = clock
            st.touched_levels.clear()
            st.touched_balances.clear()
            raise
        if st.touched_levels or st.touched_balances:
            self._emit_changes(events)
        return events

    def snapshot(self) -> bytes:
        return codec.encode(self.state)

    @classmethod
    def restore(cls, blob: Any) -> Exchange:  # Any: non-bytes get SnapshotError, not TypeError
        return cls(codec.decode(blob))

    def state_hash(self, *, counters: bool = True) -> str:
        """Hex sha256 of the canonical state; `counters=False` leaves out seq/cmd_index/ts."""
        return codec.state_hash(self.state, counters=counters)

    @property
    def seq(self) -> int:
        return self.state.seq

    @property
    def cmd_index(self) -> int:
        return self.state.cmd_index

    @property
    def last_ts(self) -> int:
        return self.state.last_ts

    @property
    def market_count(self) -> int:
        """Markets are only ever added: a cheap "did they change?" for readers."""
        return len(self.state.markets)

    # Reads (reads.py), one method each: how other packages ask.

    def markets(self) -> list[dict]:
        return reads.markets(self.state)

    def balances(self, account: str | None = None) -> dict[tuple[str, str], tuple[int, int]]:
        """{(account, asset): (available, reserved)} for every non-zero balance."""
        return reads.balances(self.state, account)

    def book_levels(
        self, market: str, side: str, depth: int | None = None
    ) -> list[tuple[int, int]]:
        """[(price, qty)] best first; empty for an unknown market."""
        return reads.book_levels(self.state, market, side, depth)

    def open_orders(self, account: str | None = None, market: str | None = None) -> list[dict]:
        """Resting orders, book by book (markets by name, bids then asks), in priority order."""
        return reads.open_orders(self.state, account, market)

    def order(self, order_id: int) -> dict | None:
        return reads.order(self.state, order_id)

    def order_id_for(self, account: str, client_order_id: str) -> int | None:
        return reads.order_id_for(self.state, account, client_order_id)

    def check_invariants(self) -> None:
        invariants.check(self.state)

    # ------------------------------------------------------------------ plumbing

    def _stamp(self, event: dict) -> dict:
        """Give an event built piece by piece its seq, ts and cmd_index (the last keys)."""
        st = self.state
        st.seq += 1
        event["seq"] = st.seq
        event["ts"] = st.last_ts
        event["cmd_index"] = st.cmd_index
        return event

    def _rejected_event(self, command: Any, rejection: Rejection) -> dict:
        event: dict[str, Any] = {
            "type": "rejected",
            "op": v.safe_op(command),
            "reason": rejection.reason,
            "message": rejection.message,
            "client_order_id": v.safe_client_order_id(command),
            "account": v.safe_account(command),
        }
        if rejection.order_id is not None:
            event["order_id"] = rejection.order_id
        return self._stamp(event)

    def _emit_changes(self, events: list[dict]) -> None:
        """One `book` event per level and one `balance` event per balance whose value differs
        from the start of the command, in first-touch order; then forget the touches."""
        st = self.state
        seq = st.seq
        ts = st.last_ts
        cmd_index = st.cmd_index
        touched_levels = st.touched_levels
        if touched_levels:
            markets = st.markets
            for (market, side, price), before in touched_levels.items():
                book = markets[market].book
                level = book.bids.get(-price) if side == BUY else book.asks.get(price)
                qty = 0 if level is None else level.qty
                if qty != before:
                    seq += 1
                    events.append(
                        {
                            "type": "book",
                            "market": market,
                            "side": side,
                            "price": price,
                            "level_qty": qty,
                            "seq": seq,
                            "ts": ts,
                            "cmd_index": cmd_index,
                        }
                    )
            touched_levels.clear()
        touched_balances = st.touched_balances
        if touched_balances:
            for bal, avail, reserved in touched_balances:
                if bal.available != avail or bal.reserved != reserved:
                    seq += 1
                    events.append(
                        {
                            "type": "balance",
                            "account": bal.account,
                            "asset": bal.asset,
                            "available": bal.available,
                            "reserved": bal.reserved,
                            "seq": seq,
                            "ts": ts,
                            "cmd_index": cmd_index,
                        }
                    )
            touched_balances.clear()
        st.seq = seq

    def _market(self, command: dict) -> Market:
        st = self.state
        name = command["market"]
        if type(name) is str and _MARKETS_SEEN.get(name) is True:  # checked before: valid
            market = st.markets.get(name)
            if market is not None:
                return market
        name = v.market_name(command)
        market = st.markets.get(name)
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
        st = self.state
        order_id = command.get("order_id", _ABSENT)
        if type(order_id) is int and 0 < order_id <= MAX_ID and "client_order_id" not in command:
            pass  # the usual case: a valid order_id alone
        elif order_id is not _ABSENT and "client_order_id" in command:
            raise Rejection("ambiguous_order_ref", "give order_id or client_order_id, not both")
        elif order_id is not _ABSENT:
            order_id = v.integer(command, "order_id", 1, MAX_ID, "bad_order_id")
        elif "client_order_id" in command:
            coid = v.token(command, "client_order_id", "bad_client_order_id")
            order_id = st.coids.get(account, _EMPTY).get(coid, 0)
        else:
            raise Rejection("missing_field", "missing field 'order_id'")
        order = st.orders.get(order_id)
        if order is None or order.account != account or order.market != market.name:
            raise Rejection("unknown_order", "no such open order for this account and market")
        return order

    # ------------------------------------------------------------------ handlers

    def _create_market(self, command: dict, events: list[dict]) -> None:
        st = self.state
        name = v.market_name(command)
        base = v.asset(command, "base")
        quote = v.asset(command, "quote")
        lot_size = v.integer(command, "lot_size", 1, MAX_QTY, "bad_lot_size")
        tick_size = v.integer(command, "tick_size", 1, MAX_PRICE, "bad_tick_size")
        maker = v.integer(command, "maker_fee_bps", 0, v.MAX_FEE_BPS, "bad_fee")
        taker = v.integer(command, "taker_fee_bps", 0, v.MAX_FEE_BPS, "bad_fee")
        if base == quote:
            raise Rejection("same_asset", "base and quote must differ")
        if name in st.markets:
            raise Rejection("market_exists", f"market {name!r} already exists")
        market = st.markets[name] = Market(name, base, quote, lot_size, tick_size, maker, taker)
        events.append(self._stamp({"type": "market_created", **market.as_dict()}))

    def _deposit(self, command: dict, events: list[dict]) -> None:
        bal, ref = accounts.deposit(self.state, command)
        events.append(self._transfer_event(bal, ref))

    def _withdraw(self, command: dict, events: list[dict]) -> None:
        bal, ref = accounts.withdraw(self.state, command)
        events.append(self._transfer_event(bal, ref))

    def _transfer_event(self, bal: Balance, ref: str) -> dict:
        # A transfer reports its balance here, with its ref: it is not recorded as touched.
        event = {
            "type": "balance",
            "account": bal.account,
            "asset": bal.asset,
            "available": bal.available,
            "reserved": bal.reserved,
            "ref": ref,
        }
        return self._stamp(event)

    def _place(self, command: dict, events: list[dict]) -> None:
        st = self.state
        # Fields in the order of the command table. Each line tests for the usual valid value;
        # on anything else, validation.py raises the exact rejection (or returns the value).
        account = command["account"]
        if type(account) is not str or _ACCOUNTS_SEEN.get(account) is not True:
            account = v.account(command)
        market = self._market(command)
        side = command["side"]
        if type(side) is not str or (side != BUY and side != SELL):
            side = v.choice(command, "side", v.SIDES, "", "bad_side")
        order_type = command["type"]
        if type(order_type) is not str or (order_type != "limit" and order_type != "market"):
            order_type = v.choice(command, "type", v.ORDER_TYPES, "", "bad_order_type")
        qty = command["qty"]
        if type(qty) is not int or not 0 < qty <= MAX_QTY:
            qty = v.integer(command, "qty", 1, MAX_QTY, "bad_qty")
        is_limit = order_type == "limit"
        tif = command.get("tif", _ABSENT)
        if tif is _ABSENT:
            tif = "gtc" if is_limit else "ioc"
        elif type(tif) is not str or tif not in v.TIFS:
            tif = v.choice(command, "tif", v.TIFS, "", "bad_tif")
        stp = command.get("stp", _ABSENT)
        if stp is _ABSENT:
            stp = "cancel_taker"
        elif type(stp) is not str or stp not in v.STPS:
            stp = v.choice(command, "stp", v.STPS, "cancel_taker", "bad_stp")
        coid = None
        if "client_order_id" in command:
            coid = v.token(command, "client_order_id", "bad_client_order_id")
        if is_limit:
            price = command.get("price", _ABSENT)
            if price is _ABSENT:
                raise Rejection("missing_field", "missing field 'price' for a limit order")
            if type(price) is not int or not 0 < price <= MAX_PRICE or price % market.tick_size:
                price = self._price(command, market)
        else:
            if "price" in command:
                raise Rejection("bad_price", "a market order takes no price")
            if tif != "ioc":
                raise Rejection("bad_tif", "a market order is always ioc")
            price = None
        # Business checks, in the contract's order.
        lot_size = market.lot_size
        if qty * lot_size > MAX_AMOUNT or (price is not None and price * qty > MAX_AMOUNT):
            raise Rejection("notional_too_large", "order notional exceeds the limit")  # _check_size
        if coid is not None:
            first = st.coids.get(account, _EMPTY).get(coid)
            if first is not None:
                raise Rejection(
                    "duplicate_client_order_id", "client_order_id already used", order_id=first
                )
        buy = side == BUY
        reservation = 0  # what a limit order holds while it rests
        # The balance the order needs (quote to buy, base to sell), if the account has it.
        bal = st.balances.get(account, _EMPTY).get(market.quote if buy else market.base)
        if buy:
            if price is not None:
                notional = price * qty
                reservation = notional + notional * market.max_bps // 10000
                if bal is None or reservation > bal.available:
                    raise Rejection("insufficient_funds", f"not enough {market.quote} available")
        else:
            reservation = qty * lot_size
            if bal is None or reservation > bal.available:
                raise Rejection("insufficient_funds", f"not enough {market.base} available")
        if tif == "post_only" and self._crosses(market, side, price):
            raise Rejection("post_only_would_cross", "a post-only order would trade on arrival")
        if tif == "fok" and self._fillable(market, side, price, qty, account, stp) < qty:
            raise Rejection("fok_unfillable", "a fill-or-kill order cannot fill completely")

        # Valid: from here on the command takes effect.
        order_id = st.next_order_id
        st.next_order_id = order_id + 1
        order = Order(order_id, account, market.name, side, price or 0, qty, tif, stp, coid)
        if coid is not None:
            st.coids.setdefault(account, {})[coid] = order_id
        book = market.book
        best = book.best_ask if buy else book.best_bid
        rests_untouched = (
            price is not None
            and tif in _RESTING_TIFS
            and (best is None or (best.price > price if buy else best.price < price))
        )
        if price is not None:
            if not rests_untouched:
                bal = touch(st, account, market.quote if buy else market.base)
            # (Else `bal` is the one the funds check found; it records nothing as touched.)
            bal.available -= reservation  # type: ignore[union-attr]
            bal.reserved += reservation  # type: ignore[union-attr]
        st.seq += 1
        ts = st.last_ts
        cmd_index = st.cmd_index
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
                "seq": st.seq,
                "ts": ts,
                "cmd_index": cmd_index,
            }
        )
        if not rests_untouched:
            self._take(market, order, price is None, events)
            return
        # The usual case: a limit order that rests without trading. It changes exactly one
        # level (by +qty) and one balance (by the reservation, >= 1), so the `book` and
        # `balance` events `_emit_changes` would derive are known: write them directly.
        level = book.add(order)
        st.orders[order_id] = order
        mine = st.account_orders.get(account)
        if mine is None:
            mine = st.account_orders[account] = {}
        mine[order_id] = order
        seq = st.seq
        events.append(
            {
                "type": "book",
                "market": market.name,
                "side": side,
                "price": price,
                "level_qty": level.qty,
                "seq": seq + 1,
                "ts": ts,
                "cmd_index": cmd_index,
            }
        )
        events.append(
            {
                "type": "balance",
                "account": bal.account,  # type: ignore[union-attr]
                "asset": bal.asset,  # type: ignore[union-attr]
                "available": bal.available,  # type: ignore[union-attr]
                "reserved": bal.reserved,  # type: ignore[union-attr]
                "seq": seq + 2,
                "ts": ts,
                "cmd_index": cmd_index,
            }
        )
        st.seq = seq + 2

    def _cancel(self, command: dict, events: list[dict]) -> None:
        st = self.state
        account = command["account"]
        if type(account) is not str or _ACCOUNTS_SEEN.get(account) is not True:
            account = v.account(command)
        market = self._market(command)
        order_id = command.get("order_id")
        if type(order_id) is int and 0 < order_id <= MAX_ID and "client_order_id" not in command:
            order = st.orders.get(order_id)  # `_find_order`'s usual case, inline
            if order is None or order.account != account or order.market != market.name:
                raise Rejection("unknown_order", "no such open order for this account and market")
        else:
            order = self._find_order(command, account, market)
        # One resting order leaves: its level drops by its remaining (>= 1) and its balance
        # gets its reservation (>= 1) back, so the `book` and `balance` events are known, as
        # in `_place`'s resting case. (cancel_all goes through `_cancel_resting`: its orders
        # may share levels and balances.)
        book = market.book
        price = order.price
        if order.side == BUY:
            level = book.bids[-price]
            released = market.buy_reserve(price, order.remaining)
            bal = st.balances[account][market.quote]
        else:
            level = book.asks[price]
            released = order.remaining * market.lot_size
            bal = st.balances[account][market.base]
        level.kill(order)  # `book.remove`, with the level already at hand
        if level.count == 0:
            book.drop(order.side, -price if order.side == BUY else price)
        bal.available += released
        bal.reserved -= released
        del st.orders[order.order_id]
        mine = st.account_orders[account]
        del mine[order.order_id]
        if not mine:
            del st.account_orders[account]
        seq = st.seq
        ts = st.last_ts
        cmd_index = st.cmd_index
        events.append(
            {
                "type": "cancelled",
                "order_id": order.order_id,
                "client_order_id": order.client_order_id,
                "account": order.account,
                "market": order.market,
                "reason": "user",
                "remaining": order.remaining,
                "seq": seq + 1,
                "ts": ts,
                "cmd_index": cmd_index,
            }
        )
        events.append(
            {
                "type": "book",
                "market": market.name,
                "side": order.side,
                "price": price,
                "level_qty": level.qty if level.count else 0,  # 0: the level is gone
                "seq": seq + 2,
                "ts": ts,
                "cmd_index": cmd_index,
            }
        )
        events.append(
            {
                "type": "balance",
                "account": bal.account,
                "asset": bal.asset,
                "available": bal.available,
                "reserved": bal.reserved,
                "seq": seq + 3,
                "ts": ts,
                "cmd_index": cmd_index,
            }
        )
        st.seq = seq + 3

    def _cancel_all(self, command: dict, events: list[dict]) -> None:
        st = self.state
        account = v.account(command)
        market = self._market(command) if "market" in command else None
        mine = st.account_orders.get(account, {})
        victims = [
            mine[oid] for oid in sorted(mine) if market is None or mine[oid].market == market.name
        ]
        if not victims:
            raise Rejection("no_open_orders", "no open orders to cancel")
        for order in victims:
            self._cancel_resting(st.markets[order.market], order, "cancel_all", events)

    def _amend(self, command: dict, events: list[dict]) -> None:
        st = self.state
        account = v.account(command)
        market = self._market(command)
        order = self._find_order(command, account, market)
        if "price" not in command and "qty" not in command:
            raise Rejection("missing_field", "amend needs price or qty")
        price = self._price(command, market) if "price" in command else order.price
        qty = (
            v.integer(command, "qty", 1, MAX_QTY, "bad_qty")
            if "qty" in command
            else order.remaining
        )
        if price == order.price and qty == order.remaining:
            raise Rejection("no_change", "the order already has this price and quantity")
        self._check_size(market, price, qty)
        if price == order.price and qty < order.remaining:
            self._amend_in_place(market, order, qty, events)
            return
        if order.side == BUY:
            held = market.buy_reserve(order.price, order.remaining)
            need = market.buy_reserve(price, qty)
            if need > held + available(st, account, market.quote):
                raise Rejection("insufficient_funds", f"not enough {market.quote} available")
        else:
            held = order.remaining * market.lot_size
            if qty * market.lot_size > held + available(st, account, market.base):
                raise Rejection("insufficient_funds", f"not enough {market.base} available")
        if order.tif == "post_only" and self._crosses(market, order.side, price):
            raise Rejection("post_only_would_cross", "a post-only order would trade on arrival")

        # Leaves its queue; a fresh object re-enters, so the dead queue entry stays dead.
        self._touch_level(market, order.side, order.price)
        market.book.remove(order)
        release(st, market, order)
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
        st.orders[fresh.order_id] = fresh
        st.account_orders[account][fresh.order_id] = fresh
        reserve(st, market, fresh)
        events.append(self._amended_event(fresh, priority_kept=False))
        self._take(market, fresh, False, events)

    def _amend_in_place(self, market: Market, order: Order, qty: int, events: list[dict]) -> None:
        st = self.state
        delta = order.remaining - qty
        level = market.book.level(order.side, order.price)
        assert level is not None
        if order.side == BUY:
            freed = market.buy_reserve(order.price, order.remaining) - market.buy_reserve(
                order.price, qty
            )
            bal = touch(st, order.account, market.quote)
        else:
            freed = delta * market.lot_size
            bal = touch(st, order.account, market.base)
        bal.available += freed
        bal.reserved -= freed
        self._touch_level(market, order.side, order.price)
        level.qty -= delta
        order.remaining = qty
        order.original -= delta
        events.append(self._amended_event(order, priority_kept=True))

    def _amended_event(self, order: Order, *, priority_kept: bool) -> dict:
        event = {
            "type": "amended",
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "account": order.account,
            "market": order.market,
            "price": order.price,
            "qty": order.remaining,
            "priority_kept": priority_kept,
        }
        return self._stamp(event)

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
        st = self.state
        book = market.book
        buy = taker.side == BUY
        best = book.best_ask if buy else book.best_bid
        end_reason = None
        if best is not None and (
            is_market or (best.price <= taker.price if buy else best.price >= taker.price)
        ):
            end_reason = self._match(market, taker, is_market, events)

        if taker.remaining == 0:
            if not is_market:
                self._drop_record(taker)
            events.append(self._filled_event(taker))
            return
        if end_reason is None and not is_market and taker.tif in _RESTING_TIFS:
            price = taker.price
            key = (market.name, taker.side, price)
            if key not in st.touched_levels:
                level = book.bids.get(-price) if buy else book.asks.get(price)
                st.touched_levels[key] = 0 if level is None else level.qty
            book.add(taker)
            st.orders[taker.order_id] = taker
            mine = st.account_orders.get(taker.account)
            if mine is None:
                mine = st.account_orders[taker.account] = {}
            mine[taker.order_id] = taker
            return
        if taker.tif == "fok":
            raise InvariantError("a FOK order passed its fill check but did not fill")
        if not is_market:
            release(st, market, taker)
            self._drop_record(taker)
        events.append(self._cancelled_event(taker, end_reason or "ioc"))

    def _match(
        self, market: Market, taker: Order, is_market: bool, events: list[dict]
    ) -> str | None:
        """Trade `taker` against the best opposite levels while they cross its price.

        Returns why matching ended early ("stp", "funds"), or None.
        """
        st = self.state
        book = market.book
        buy = taker.side == BUY
        maker_side = SELL if buy else BUY
        limit = taker.price
        account = taker.account
        stp = taker.stp
        stp_applies = stp != "none"
        mname = market.name
        quote = market.quote
        base = market.base
        lot_size = market.lot_size
        maker_bps = market.maker_bps
        taker_bps = market.taker_bps
        max_bps = market.max_bps
        budget_limited = buy and is_market  # a market buy spends at most its available quote
        touched_levels = st.touched_levels
        orders = st.orders
        account_orders = st.account_orders
        ts = st.last_ts
        cmd_index = st.cmd_index
        # The taker's and the fee account's balances, looked up at their first fill (the
        # order of first touches decides the order of `balance` events).
        taker_quote = taker_base = fees = None
        end_reason = None
        while taker.remaining:
            level = book.best_ask if buy else book.best_bid
            if level is None:
                break
            price = level.price
            if not is_market and (price > limit if buy else price < limit):
                break
            touched = (mname, maker_side, price)
            if touched not in touched_levels:
                touched_levels[touched] = level.qty
            while taker.remaining and level.count:
                queue = level.orders  # again each time: `level.kill` may compact the deque
                maker = queue[0]
                if not maker.alive:
                    queue.popleft()
                    level.dead -= 1
                    continue
                maker_account = maker.account
                if stp_applies and maker_account == account:
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
                    budget = available(st, account, quote)
                    fill = min(fill, affordable(budget, price, taker_bps))
                    if fill == 0:
                        end_reason = "funds"
                        break

                # Settle: `fill` lots at `price`. The buyer pays notional + fee in quote and
                # gets the base; the seller delivers the base and gets notional - fee. A
                # resting buy's reservation shrinks to the formula for its new remaining.
                notional = price * fill
                maker_fee = notional * maker_bps // 10000
                taker_fee = notional * taker_bps // 10000
                base_amount = fill * lot_size
                if buy:
                    if taker_quote is None:
                        taker_quote = touch(st, account, quote)
                        taker_base = touch(st, account, base)
                    if is_market:
                        taker_quote.available -= notional + taker_fee
                    else:
                        held = limit * taker.remaining
                        left = limit * (taker.remaining - fill)
                        freed = held + held * max_bps // 10000 - (left + left * max_bps // 10000)
                        taker_quote.reserved -= freed
                        taker_quote.available += freed - notional - taker_fee
                    taker_base.available += base_amount  # type: ignore[union-attr]
                    touch(st, maker_account, base).reserved -= base_amount
                    touch(st, maker_account, quote).available += notional - maker_fee
                else:
                    maker_quote = touch(st, maker_account, quote)
                    held = maker.price * maker.remaining
                    left = maker.price * (maker.remaining - fill)
                    freed = held + held * max_bps // 10000 - (left + left * max_bps // 10000)
                    maker_quote.reserved -= freed
                    maker_quote.available += freed - notional - maker_fee
                    touch(st, maker_account, base).available += base_amount
                    if taker_base is None:
                        taker_base = touch(st, account, base)
                        taker_quote = touch(st, account, quote)
                    if is_market:
                        taker_base.available -= base_amount
                    else:
                        taker_base.reserved -= base_amount
                    taker_quote.available += notional - taker_fee  # type: ignore[union-attr]
                if maker_fee or taker_fee:
                    if fees is None:
                        fees = touch(st, FEE_ACCOUNT, quote)
                    fees.available += maker_fee + taker_fee
                taker.remaining -= fill
                maker.remaining -= fill

                trade_id = st.next_trade_id
                st.next_trade_id = trade_id + 1
                st.seq += 1
                events.append(
                    {
                        "type": "trade",
                        "trade_id": trade_id,
                        "market": mname,
                        "price": price,
                        "qty": fill,
                        "maker_order_id": maker.order_id,
                        "taker_order_id": taker.order_id,
                        "maker_account": maker_account,
                        "taker_account": account,
                        "taker_side": taker.side,
                        "maker_fee": maker_fee,
                        "taker_fee": taker_fee,
                        "seq": st.seq,
                        "ts": ts,
                        "cmd_index": cmd_index,
                    }
                )
                level.qty -= fill
                if maker.remaining == 0:
                    maker.alive = False
                    queue.popleft()
                    level.count -= 1
                    del orders[maker.order_id]
                    mine = account_orders[maker_account]
                    del mine[maker.order_id]
                    if not mine:
                        del account_orders[maker_account]
                    events.append(self._filled_event(maker))
            if level.count == 0:
                book.drop(maker_side, -price if maker_side == BUY else price)
            if end_reason is not None:
                break
        return end_reason

    def _drop_record(self, order: Order) -> None:
        """An amended order that finishes re-entry is still indexed; unindex it."""
        st = self.state
        if st.orders.get(order.order_id) is order:
            del st.orders[order.order_id]
            self._forget(order)

    def _cancel_resting(
        self, market: Market, order: Order, reason: str, events: list[dict]
    ) -> None:
        st = self.state
        book = market.book
        price = order.price
        key = (market.name, order.side, price)  # `_touch_level`, inline: a third of all commands
        if key not in st.touched_levels:
            level = book.bids.get(-price) if order.side == BUY else book.asks.get(price)
            st.touched_levels[key] = 0 if level is None else level.qty
        book.remove(order)
        self._retire(market, order)
        events.append(self._cancelled_event(order, reason))

    def _retire(self, market: Market, order: Order) -> None:
        """Release a resting order's funds and unindex it (it has left its queue)."""
        st = self.state
        release(st, market, order)
        del st.orders[order.order_id]
        mine = st.account_orders[order.account]  # `_forget`, inline
        del mine[order.order_id]
        if not mine:
            del st.account_orders[order.account]

    def _forget(self, order: Order) -> None:
        st = self.state
        mine = st.account_orders[order.account]
        del mine[order.order_id]
        if not mine:
            del st.account_orders[order.account]

    def _touch_level(self, market: Market, side: str, price: int) -> None:
        """Record a level's quantity before this command changes it (call before the change)."""
        st = self.state
        key = (market.name, side, price)
        if key not in st.touched_levels:
            level = market.book.level(side, price)
            st.touched_levels[key] = 0 if level is None else level.qty

    def _cancelled_event(self, order: Order, reason: str) -> dict:
        st = self.state
        st.seq += 1
        return {
            "type": "cancelled",
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "account": order.account,
            "market": order.market,
            "reason": reason,
            "remaining": order.remaining,
            "seq": st.seq,
            "ts": st.last_ts,
            "cmd_index": st.cmd_index,
        }

    def _filled_event(self, order: Order) -> dict:
        st = self.state
        st.seq += 1
        return {
            "type": "filled",
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "account": order.account,
            "market": order.market,
            "seq": st.seq,
            "ts": st.last_ts,
            "cmd_index": st.cmd_index,
        }


__all__ = ["BUY", "SELL", "Balance", "Exchange", "ExchangeState", "Level", "Market"]
