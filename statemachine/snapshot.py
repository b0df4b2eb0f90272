"""Snapshot codec: versioned, checksummed msgpack. Never pickle.

Layout: MAGIC | version (u16, big-endian) | sha256(body) | body. The body is a positional
msgpack array; every collection in it is written in a defined order (sorted keys, queue
order for books), so equal states give equal bytes and `state_hash` is the body's sha256.

Version 2 writes each side of a book as columns (snapshot_books.py): a resting order is its
id, its account as a number (its place among the body's balances), its remaining and filled
quantities, one small integer for its time in force and self-trade prevention (each an
integer column packed in a bin, `uints`), and its client order id, which the index of client
order ids then leaves out (it holds only the ids of orders no longer resting). About 32
bytes an order with a client order id, and a decode that makes no object per order besides
the state's own. Version 1 (an order as a list with its account and client order id written
out, every client order id written twice) is still read, so that a node of this build loads
the dumps and backups of the previous one; it is no longer written.

It reads and builds an `ExchangeState` (state.py) through its public attributes; `Exchange`
wraps the state that `decode` returns.
"""

from __future__ import annotations

import gc
import hashlib
import struct
import sys
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .errors import InvariantError, SnapshotError
from .invariants import check_funds
from .order_book import BUY, SELL, Level, Order
from .snapshot_books import (
    STP_CODES,
    STP_OF_CODE,
    TIF_CODES,
    TIF_OF_CODE,
    WIDTHS,
    build_books,
    width_for,
)
from .state import Balance, ExchangeState, Market
from .validation import FEE_ACCOUNT

MAGIC = b"QBOOKSNP"
VERSION = 2  # what this build writes
READABLE_VERSIONS = (1, 2)  # what it reads
_HEADER = struct.Struct(">8sH32s")
COUNTER_FIELDS = 3  # seq, cmd_index, last_ts: what a rejected command may change

_INTS = (int, int, int, int, int)
_NO_COIDS: dict[str, int] = {}  # what a missing index looks like (never written to)


def pack(fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


# Items per msgpack call when a body is packed in pieces (pack_body): 256 book levels (or refs,
# accounts, client order id pairs) take about a millisecond.
RUN = 256


def _header(n: int) -> bytes:
    """The msgpack array header msgpack writes for n items (always the shortest form)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _runs(out: list[bytes], items: list) -> None:
    """Append the bytes of `items` as one msgpack array: its header, then RUN items per call
    (each call's own array header cut off)."""
    out.append(_header(len(items)))
    for at in range(0, len(items), RUN):
        run = items[at : at + RUN]
        out.append(pack(run)[len(_header(len(run))) :])


def pack_body(fields: list) -> bytes:
    """`pack(fields)` for a body (`body_fields`, with or without its counters), byte for byte,
    packed in pieces.

    One msgpack call over a whole body holds the GIL from start to end (160 ms for 60k
    resting orders with client order ids): on a node that is longer than the followers'
    election timeout, with no heartbeat leaving meanwhile. Between pieces, other threads run.
    """
    *head, balances, supply, refs, coids, books = fields
    out = [_header(len(fields)), pack(head)[len(_header(len(head))) :]]
    _runs(out, balances)
    out.append(pack(supply))
    _runs(out, refs)
    out.append(_header(len(coids)))
    for account, pairs in coids:
        out += [_header(2), pack(account)]
        _runs(out, pairs)
    out.append(_header(len(books)))
    for market, bids, asks in books:
        out += [_header(3), pack(market)]
        for *ints, coids in (bids, asks):
            out.append(_header(len(ints) + 1))
            out += [pack(column) for column in ints]
            _runs(out, coids)
    return b"".join(out)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector while a snapshot is written or read.

    Both directions allocate a few small objects per resting order (a million orders make
    millions of lists, orders and dict entries), none of which is garbage; left running, the
    collector would walk the growing heap again and again for nothing (about a third of the
    restore time of 1M orders). The previous state is put back however we leave.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _side(levels, numbers: dict[str, int]) -> list:
    """A side's columns (snapshot_books.py): level prices, order counts, then per order."""
    prices: list[int] = []
    counts: list[int] = []
    live: list[Order] = []
    for level in levels.values():
        orders = [o for o in level.orders if o.alive] if level.dead else level.orders
        prices.append(level.price)
        counts.append(len(orders))
        live.extend(orders)
    return [
        uints(prices),
        uints(counts),
        uints([o.order_id for o in live]),
        uints([numbers[o.account] for o in live]),
        uints([o.remaining for o in live]),
        uints([o.original - o.remaining for o in live]),
        uints([TIF_CODES[o.tif] << 2 | STP_CODES[o.stp] for o in live]),
        [o.client_order_id for o in live],
    ]


# array's codes for 1, 2, 4 and 8 bytes, checked where this build runs.
_CODES = {array(code).itemsize: code for code in "BHIQ"}
assert sorted(_CODES) == list(WIDTHS), _CODES


def uints(values: list[int]) -> bytes:
    """A column of integers >= 0 as snapshot_books.py reads it: empty, or its width (the
    least that holds the largest value) and the values unsigned little-endian."""
    if not values:
        return b""
    width = width_for(max(values))
    column = array(_CODES[width], values)
    if sys.byteorder == "big":
        column.byteswap()
    return bytes((width,)) + column.tobytes()


def body_fields(state: ExchangeState) -> list:
    head = _head_but_coids(state)
    # An order's account is written as its place among the balances: an account with a
    # resting order holds a reservation, so it is there.
    numbers = {acct: number for number, (acct, _assets) in enumerate(head[6])}
    return [*head, _coid_fields(state), _books(state, numbers)]


def _books(state: ExchangeState, numbers: dict[str, int]) -> list:
    markets = state.markets
    return [
        [name, _side(markets[name].book.bids, numbers), _side(markets[name].book.asks, numbers)]
        for name in sorted(markets)
    ]


def _head_but_coids(state: ExchangeState) -> list:
    """Everything but the books and the client order id index: small, so `decode` checks it
    is canonical by writing it again."""
    markets = state.markets
    return [
        state.seq,
        state.cmd_index,
        state.last_ts,
        state.next_order_id,
        state.next_trade_id,
        [
            [m.name, m.base, m.quote, m.lot_size, m.tick_size, m.maker_bps, m.taker_bps]
            for m in (markets[name] for name in sorted(markets))
        ],
        [
            [
                acct,
                [
                    [asset, bal.available, bal.reserved]
                    for asset, bal in sorted(assets.items())
                    if bal.available or bal.reserved
                ],
            ]
            for acct, assets in sorted(state.balances.items())
            if any(bal.available or bal.reserved for bal in assets.values())
        ],
        sorted([asset, amount] for asset, amount in state.supply.items()),
        sorted(state.refs),
    ]


def _coid_fields(state: ExchangeState) -> list:
    """The index of client order ids, but for the resting orders' own (their orders carry
    them): each account with any left, and its (client order id, order id) pairs, sorted."""
    orders = state.orders
    fields = []
    for acct, coids in sorted(state.coids.items()):
        pairs = []
        for coid, oid in coids.items():
            order = orders.get(oid)
            if order is None or order.client_order_id != coid or order.account != acct:
                pairs.append([coid, oid])
        if pairs:
            pairs.sort()
            fields.append([acct, pairs])
    return fields


def encode(state: ExchangeState) -> bytes:
    with gc_paused():
        body = pack_body(body_fields(state))
    return _HEADER.pack(MAGIC, VERSION, hashlib.sha256(body).digest()) + body


def state_hash(state: ExchangeState, *, counters: bool = True) -> str:
    """Hex sha256 of the body `encode` would write; `counters=False` leaves out the counters
    a rejected command changes (seq, cmd_index, last_ts)."""
    with gc_paused():
        fields = body_fields(state)
        if not counters:
            fields = fields[COUNTER_FIELDS:]
        digest = hashlib.sha256(pack_body(fields)).hexdigest()
        del fields  # freed while the collector is still held
    return digest


def stated_hash(blob: bytes | memoryview) -> str:
    """The state hash a snapshot's header states (the sha256 of its body, which is what
    `state_hash` computes for the state it holds), read without decoding the body; `decode`
    checks both. A snapshot of an older version states the hash of its own body, not the
    one this build computes for the same state (`written_by_this_build`)."""
    return _header_digest(blob).hex()


def written_by_this_build(blob: bytes | memoryview) -> bool:
    """Whether a snapshot is in the version this build writes (so its stated hash is the
    state's hash here, and its bytes what `encode` gives for the state it holds)."""
    return _read_header(blob)[0] == VERSION


def stated_counters(blob: bytes) -> tuple[int, int]:
    """(seq, cmd_index) of a snapshot, read from the head of its body without decoding the
    rest (a restore that only copies a checksummed backup compares them with its manifest);
    `decode` checks the whole body."""
    _header_digest(blob)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(bytes(memoryview(blob)[_HEADER.size : _HEADER.size + 32]))
    try:
        if unpacker.read_array_header() != 11:
            raise SnapshotError("snapshot body has the wrong shape")
        return _int(unpacker.unpack()), _int(unpacker.unpack())
    except (msgpack.UnpackException, ValueError) as exc:
        raise SnapshotError(f"snapshot body is malformed: {exc}") from exc


def _header_digest(blob: bytes | memoryview) -> bytes:
    """The body's sha256 the header states, once the header is checked."""
    return _read_header(blob)[1]


def _read_header(blob: bytes | memoryview) -> tuple[int, bytes]:
    """(version, the body's sha256) of a snapshot whose header this build reads."""
    if len(blob) < _HEADER.size:
        raise SnapshotError("snapshot truncated: shorter than its header")
    magic, version, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError("not a quorumbook snapshot (bad magic)")
    if version not in READABLE_VERSIONS:
        raise SnapshotError(
            f"unsupported snapshot version {version} (this build reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    return version, digest


def decode(blob: Any) -> ExchangeState:
    """The state a blob holds, checked in full (shape, canonical order, every invariant).

    The invariants (invariants.py) are checked as the state is built, not by a second walk
    over it: most hold by construction here (every order indexed by id and account, in the
    level of its market, side and price, counts and quantities summed, best levels set), and
    the rest are checked inline (see `_build` and snapshot_books.py): on a million resting
    orders the separate walk was more than half of the decode.
    `tests/statemachine/test_determinism.py` checks that whatever this accepts passes
    `invariants.check`."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotError("a snapshot must be bytes")
    view = memoryview(blob)  # never copied: tens of MB for a large book
    version, digest = _read_header(view)
    build = _build if version == VERSION else _build_v1
    body = view[_HEADER.size :]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("snapshot checksum mismatch: truncated or corrupted")
    try:
        with gc_paused():
            fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
            state, reserved = build(fields)
            del fields
            check_funds(state, reserved)
    except SnapshotError:
        raise
    except (
        InvariantError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        msgpack.UnpackException,
    ) as exc:
        raise SnapshotError(f"snapshot body is malformed: {exc}") from exc
    return state


def _head(fields: list) -> tuple[ExchangeState, list, list]:
    """The state but its books and client order ids, from a body of either version, its
    scalars checked; and the body's client order id index and books, unread."""
    if type(fields) is not list or len(fields) != 11:
        raise SnapshotError("snapshot body has the wrong shape")
    (
        seq,
        cmd_index,
        last_ts,
        next_order_id,
        next_trade_id,
        markets,
        balances,
        supply,
        refs,
        coids,
        books,
    ) = fields
    state = ExchangeState()
    # A body whose checksum is right can still be shaped wrongly (another build, a bug, a
    # crafted file): every scalar is type- and range-checked here, cheaply, before use, and
    # every collection must be what this build writes (lists, sorted, each key once, no
    # empty balance), so that the state encodes to the same bytes (checked as it is read:
    # writing the head again to compare was a tenth of a million-order decode).
    state.seq, state.cmd_index, state.last_ts = _int(seq), _int(cmd_index), _int(last_ts)
    state.next_order_id, state.next_trade_id = _int(next_order_id, 1), _int(next_trade_id, 1)
    previous: str | None = None
    for market in _list(markets):
        name, base, quote, lot, tick, maker, taker = _list(market)
        previous = _after(previous, name)
        state.markets[name] = Market(
            name, _str(base), _str(quote), _int(lot, 1), _int(tick, 1), _int(maker), _int(taker)
        )
    previous = None
    for entry in _list(balances):
        acct, assets = _list(entry)
        previous = _after(previous, acct)
        held: dict[str, Balance] = {}
        last: str | None = None
        for row in _list(assets):
            asset, available, reserved = _list(row)
            last = _after(last, asset)
            if not (_int(available) | _int(reserved)):  # both checked: no short circuit
                raise SnapshotError("snapshot body is not canonical: an empty balance")
            held[last] = Balance(acct, last, available, reserved)
        if not held:
            raise SnapshotError("snapshot body is not canonical: an account with no balance")
        state.balances[acct] = held
    previous = None
    for entry in _list(supply):
        asset, amount = _list(entry)
        previous = _after(previous, asset)
        state.supply[asset] = _int(amount)
    previous = None
    for ref in _list(refs):
        previous = _after(previous, ref)
        state.refs.add(ref)
    state.coids = {}
    previous_acct = ""
    for acct, pairs in coids:
        if _str(acct) <= previous_acct:
            raise SnapshotError("snapshot client order id accounts are out of order")
        state.coids[acct] = _coid_index(pairs)
        previous_acct = acct
    return state, coids, books


def _build(fields: list) -> tuple[ExchangeState, dict[tuple[str, str], int]]:
    """The state, and what its resting orders hold per (account, asset). The books are
    built and checked by snapshot_books.build_books; the index of client order ids here
    holds the ids of orders no longer resting, so no account is written without one."""
    state, coids, books = _head(fields)
    if any(not pairs for _acct, pairs in coids):
        raise SnapshotError("snapshot client order id index lists an account with none")
    # The accounts in the order of the balances: what an order's account number points at.
    reserved = build_books(state, books, list(state.balances))
    if FEE_ACCOUNT in state.account_orders:
        raise SnapshotError("the fee account has orders")
    return state, reserved


def _build_v1(fields: list) -> tuple[ExchangeState, dict[tuple[str, str], int]]:
    """Version 1: the state, and what its resting orders hold per (account, asset). Checks,
    besides the shape: levels best first, on the tick, none empty; each order's fields,
    0 < remaining <= original, its client order id recorded, its id used once; no crossed
    book; the fee account rests nothing."""
    state, _coids, books = _head(fields)
    orders = state.orders
    account_orders = state.account_orders
    coids_of = state.coids
    tifs, stps = TIF_OF_CODE, STP_OF_CODE
    reserved: dict[tuple[str, str], int] = {}
    # Per account with resting orders: its string, its orders by id, its client order ids.
    accounts: dict[str, tuple[str, dict[int, Order], dict[str, int]]] = {}
    placed = 0  # order entries read: more than the index holds if an id came twice
    if [entry[0] for entry in books] != sorted(state.markets):
        raise SnapshotError("snapshot books do not match its markets")
    for name, bids, asks in books:
        market = state.markets[name]
        book = market.book
        tick, lot_size, max_bps = market.tick_size, market.lot_size, market.max_bps
        for side, levels in ((BUY, bids), (SELL, asks)):
            buy = side == BUY
            book_side = book.bids if buy else book.asks
            # What this side's orders hold, by account (`Market.buy_reserve` for a buy, the
            # quantity in lots of the base for a sell), added to `reserved` at the end.
            held: dict[str, int] = {}
            previous = None
            for price, entries in levels:
                # Canonical: levels best first, each price once, none empty, on the tick.
                if (
                    type(price) is not int
                    or price < 1
                    or not entries
                    or (previous is not None and (price >= previous if buy else price <= previous))
                    or price % tick
                ):
                    raise SnapshotError("snapshot book levels are out of order, empty or off tick")
                previous = price
                # One level in one go: no per-order book lookups or method calls.
                level = book_side[-price if side == BUY else price] = Level(price)
                append = level.orders.append
                qty = 0
                for oid, acct, remaining, original, coid, tif, stp in entries:
                    # (One tuple compare for the five integers: fewer steps than five `is`.)
                    if (
                        (type(oid), type(remaining), type(original), type(tif), type(stp)) != _INTS
                        or type(acct) is not str
                        or (coid is not None and type(coid) is not str)
                        or oid < 1
                        or not 0 < remaining <= original
                    ):
                        raise SnapshotError("snapshot order is malformed")
                    # One lookup by the unpacked string (a new object for every order: its
                    # hash computed, its bytes compared), then the account's own string,
                    # whose hash is cached and which compares by identity, for the rest.
                    seen = accounts.get(acct)
                    if seen is None:
                        seen = accounts[acct] = (acct, {}, coids_of.get(acct, _NO_COIDS))
                    acct, mine, recorded = seen
                    if coid is not None and recorded.get(coid) != oid:
                        raise SnapshotError(f"order {oid}: client_order_id not recorded")
                    if buy:
                        notional = price * remaining
                        amount = notional + notional * max_bps // 10000
                    else:
                        amount = remaining * lot_size
                    held[acct] = held.get(acct, 0) + amount
                    order = Order(
                        oid, acct, name, side, price, remaining, tifs[tif], stps[stp], coid
                    )
                    order.original = original
                    append(order)
                    qty += remaining
                    orders[oid] = order
                    mine[oid] = order
                level.qty = qty
                level.count = len(entries)
                placed += len(entries)
            asset = market.quote if buy else market.base
            for acct, amount in held.items():
                reserved[(acct, asset)] = reserved.get((acct, asset), 0) + amount
        book.reset_best()
        best_bid, best_ask = book.best(BUY), book.best(SELL)
        if best_bid is not None and best_ask is not None and best_bid >= best_ask:
            raise SnapshotError(f"{name}: crossed book at rest (bid {best_bid} >= ask {best_ask})")
    for acct, mine, _recorded in accounts.values():
        account_orders[acct] = mine
    if len(orders) != placed or sum(len(m) for m in account_orders.values()) != placed:
        raise SnapshotError("snapshot books hold an order id twice")
    if FEE_ACCOUNT in account_orders:
        raise SnapshotError("the fee account has orders")
    # No re-sorting of the per-account indexes: their order means nothing (cancel_all sorts
    # the order ids itself), only their contents are state.
    return state, reserved


def _coid_index(pairs: list) -> dict[str, int]:
    """One account's client_order_id -> order_id (one entry per order ever placed with one,
    so inline checks rather than a call per value), in the canonical order: by id, each
    once."""
    index = {}
    previous = ""
    for coid, oid in pairs:
        if type(coid) is not str or type(oid) is not int or oid < 1 or coid <= previous:
            raise SnapshotError("snapshot client order id entry is malformed or out of order")
        index[coid] = oid
        previous = coid
    return index


def _list(value: Any) -> list:
    if type(value) is not list:
        raise SnapshotError("snapshot field is not a list")
    return value


def _after(previous: str | None, key: Any) -> str:
    """`key`, a string that sorts after `previous` (canonical: sorted, each once)."""
    if type(key) is not str or (previous is not None and key <= previous):
        raise SnapshotError("snapshot body is not canonical: keys out of order or repeated")
    return key


def _int(value: Any, lo: int = 0) -> int:
    if type(value) is not int or value < lo:
        raise SnapshotError(f"snapshot field is not an integer >= {lo}")
    return value


def _str(value: Any) -> str:
    if type(value) is not str:
        raise SnapshotError("snapshot field is not a string")
    return value
