"""Snapshot codec: versioned, checksummed msgpack. Never pickle.

Layout: MAGIC | version (u16, big-endian) | sha256(body) | body. The body is a positional
msgpack array; every collection in it is written in a defined order (sorted keys, queue
order for books), so equal states give equal bytes and `state_hash` is the body's sha256.
A resting order costs about 20-40 bytes: it is written inside its price level, without the
fields the level already says (market, side, price).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

from .errors import InvariantError, SnapshotError
from .order_book import BUY, SELL, Order

MAGIC = b"QBOOKSNP"
VERSION = 1
_HEADER = struct.Struct(">8sH32s")
COUNTER_FIELDS = 3  # seq, cmd_index, last_ts: what a rejected command may change

_TIF_CODES = {"gtc": 0, "post_only": 1}
_TIFS = {code: tif for tif, code in _TIF_CODES.items()}
_STP_CODES = {"cancel_taker": 0, "cancel_maker": 1, "cancel_both": 2, "none": 3}
_STPS = {code: stp for stp, code in _STP_CODES.items()}


def pack(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _side(levels) -> list:
    return [
        [
            level.price,
            [
                [
                    o.order_id,
                    o.account,
                    o.remaining,
                    o.original,
                    o.client_order_id,
                    _TIF_CODES[o.tif],
                    _STP_CODES[o.stp],
                ]
                for o in level.orders
                if o.alive
            ],
        ]
        for level in levels.values()
    ]


def body_fields(ex: Any) -> list:
    markets = ex._markets
    return [
        ex._seq,
        ex._cmd_index,
        ex._last_ts,
        ex._next_order_id,
        ex._next_trade_id,
        [
            [m.name, m.base, m.quote, m.lot_size, m.tick_size, m.maker_bps, m.taker_bps]
            for m in (markets[name] for name in sorted(markets))
        ],
        [
            [acct, [[asset, *bal] for asset, bal in sorted(assets.items()) if bal[0] or bal[1]]]
            for acct, assets in sorted(ex._balances.items())
            if any(bal[0] or bal[1] for bal in assets.values())
        ],
        sorted([asset, amount] for asset, amount in ex._supply.items()),
        sorted(ex._refs),
        [[acct, sorted([coid, oid] for coid, oid in coids.items())] for acct, coids in sorted(ex._coids.items())],
        [
            [name, _side(markets[name].book.bids), _side(markets[name].book.asks)]
            for name in sorted(markets)
        ],
    ]


def encode(ex: Any) -> bytes:
    body = pack(body_fields(ex))
    return _HEADER.pack(MAGIC, VERSION, hashlib.sha256(body).digest()) + body


def decode(blob: bytes) -> Any:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotError("a snapshot must be bytes")
    blob = bytes(blob)
    if len(blob) < _HEADER.size:
        raise SnapshotError("snapshot truncated: shorter than its header")
    magic, version, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError("not a quorumbook snapshot (bad magic)")
    if version != VERSION:
        raise SnapshotError(f"unsupported snapshot version {version} (this build reads {VERSION})")
    body = blob[_HEADER.size :]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("snapshot checksum mismatch: truncated or corrupted")
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
        ex = _build(fields)
        ex.check_invariants()
    except SnapshotError:
        raise
    except (InvariantError, ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
        raise SnapshotError(f"snapshot body is malformed: {exc}") from exc
    return ex


def _build(fields: list) -> Any:
    from .exchange import Exchange, Market

    if type(fields) is not list or len(fields) != 11:
        raise SnapshotError("snapshot body has the wrong shape")
    (seq, cmd_index, last_ts, next_order_id, next_trade_id, markets, balances, supply, refs,
     coids, books) = fields
    ex = Exchange()
    ex._seq, ex._cmd_index, ex._last_ts = _int(seq), _int(cmd_index), _int(last_ts)
    ex._next_order_id, ex._next_trade_id = _int(next_order_id), _int(next_trade_id)
    for name, base, quote, lot, tick, maker, taker in markets:
        ex._markets[name] = Market(name, base, quote, _int(lot), _int(tick), _int(maker), _int(taker))
    for acct, assets in balances:
        ex._balances[acct] = {asset: [_int(avail), _int(reserved)] for asset, avail, reserved in assets}
    ex._supply = {asset: _int(amount) for asset, amount in supply}
    ex._refs = set(refs)
    ex._coids = {acct: {coid: _int(oid) for coid, oid in pairs} for acct, pairs in coids}
    orders = ex._orders
    account_orders = ex._account_orders
    for name, bids, asks in books:
        book = ex._markets[name].book
        for side, levels in ((BUY, bids), (SELL, asks)):
            for price, entries in levels:
                for oid, acct, remaining, original, coid, tif, stp in entries:
                    order = Order(oid, acct, name, side, price, remaining, _TIFS[tif], _STPS[stp], coid)
                    order.original = original
                    book.add(order)
                    orders[oid] = order
                    mine = account_orders.get(acct)
                    if mine is None:
                        mine = account_orders[acct] = {}
                    mine[oid] = order
    # Restored index order must match insertion order (order_id order) for cancel_all determinism.
    for acct, mine in account_orders.items():
        account_orders[acct] = dict(sorted(mine.items()))
    return ex


def _int(value: Any) -> int:
    if type(value) is not int:
        raise SnapshotError("snapshot field is not an integer")
    return value
