"""Determinism and snapshots: the properties replication rests on.

Two replicas fed the same commands must hold the same state after every command; a replica
restored from a snapshot must continue exactly like one that never stopped; and `restore`
must refuse, with `SnapshotError` and without unpickling, anything that is not an intact
snapshot of ours.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from statemachine import Exchange, SnapshotError
from statemachine import snapshot as snapshot_codec

from .strategies import busy_session, sessions

MAGIC = b"QBOOKSNP"
HEADER_LEN = len(MAGIC) + 2 + 32  # magic | version u16 BE | sha256(body)

SETTINGS = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    # Fail fast: one bug at a time, and no line-tracing `explain` pass after shrinking.
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run(ex: Exchange, cmds: list[dict]) -> list[list[dict]]:
    return [ex.apply(cmd) for cmd in cmds]


def split(blob: bytes) -> tuple[bytes, int, bytes, bytes]:
    magic, body = blob[: len(MAGIC)], blob[HEADER_LEN:]
    (version,) = struct.unpack(">H", blob[len(MAGIC) : len(MAGIC) + 2])
    return magic, version, blob[len(MAGIC) + 2 : HEADER_LEN], body


def seal(body: bytes, *, version: int | None = None, magic: bytes = MAGIC) -> bytes:
    """A blob with a correct checksum around an arbitrary body."""
    if version is None:
        version = split(Exchange().snapshot())[1]
    return magic + struct.pack(">H", version) + hashlib.sha256(body).digest() + body


def no_ext(code: int, data: bytes) -> object:
    raise AssertionError(f"snapshot body uses msgpack ext type {code}")


def decode_body(blob: bytes) -> object:
    return msgpack.unpackb(split(blob)[3], ext_hook=no_ext, strict_map_key=False, raw=False)


@pytest.fixture(scope="module")
def busy_blob() -> bytes:
    """A snapshot with resting orders on both sides, fills, fees, refs and client order ids."""
    ex = Exchange()
    events = [ev for evs in run(ex, busy_session()) for ev in evs]
    assert {"trade", "amended", "filled", "cancelled"} <= {ev["type"] for ev in events}
    assert len(ex.open_orders()) >= 6
    ex.check_invariants()
    return ex.snapshot()


# ---------------------------------------------------------------- determinism


@SETTINGS
@given(sessions())
def test_two_replicas_agree_after_every_command(cmds: list[dict]) -> None:
    a, b = Exchange(), Exchange()
    for cmd in cmds:
        assert a.apply(cmd) == b.apply(cmd), cmd
        assert a.state_hash() == b.state_hash(), cmd
    assert a.snapshot() == b.snapshot()
    a.check_invariants()


@SETTINGS
@given(sessions(), st.data())
def test_restore_midway_continues_identically(cmds: list[dict], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(cmds)), label="cut")
    straight = Exchange()
    run(straight, cmds[:cut])

    stopped = Exchange()
    run(stopped, cmds[:cut])
    blob = stopped.snapshot()
    restored = Exchange.restore(blob)
    assert restored.snapshot() == blob, "snapshot of a restored exchange is the same bytes"
    assert restored.state_hash() == straight.state_hash()
    restored.check_invariants()
    assert (restored.seq, restored.cmd_index, restored.last_ts) == (
        straight.seq,
        straight.cmd_index,
        straight.last_ts,
    )

    for cmd in cmds[cut:]:
        assert restored.apply(cmd) == straight.apply(cmd), cmd
        assert restored.state_hash() == straight.state_hash(), cmd
    restored.check_invariants()
    assert restored.snapshot() == straight.snapshot()


def test_snapshot_of_fresh_exchange_round_trips() -> None:
    blob = Exchange().snapshot()
    assert Exchange.restore(blob).snapshot() == blob


def test_snapshot_round_trips_extreme_legal_values() -> None:
    """Largest documented values must survive msgpack (which stops at 64-bit ints)."""
    ex = Exchange()
    big_ts = 2**63 - 1  # the engine's ts ceiling (the doc states none)
    cmds = [
        {
            "op": "create_market",
            "ts": 1,
            "market": "X" * 32,
            "base": "B" * 16,
            "quote": "Q" * 16,
            "lot_size": 1,
            "tick_size": 1,
            "maker_fee_bps": 1000,
            "taker_fee_bps": 1000,
        },
        {
            "op": "deposit",
            "ts": 2,
            "account": "a" * 64,
            "asset": "Q" * 16,
            "amount": 2**62,
            "ref": "~" * 64,
        },
        {
            "op": "deposit",
            "ts": 3,
            "account": "b",
            "asset": "B" * 16,
            "amount": 2**62,
            "ref": "!" + "r" * 63,
        },
        {
            "op": "place",
            "ts": 4,
            "account": "b",
            "market": "X" * 32,
            "side": "sell",
            "type": "limit",
            "qty": 10**12,
            "price": 2**62 // 10**12,
            "client_order_id": "~" * 64,
        },
        {
            "op": "place",
            "ts": big_ts,
            "account": "a" * 64,
            "market": "X" * 32,
            "side": "buy",
            "type": "limit",
            "qty": 3,
            "price": 10**15,
        },
    ]
    for cmd in cmds:
        events = ex.apply(cmd)
        assert events[0]["type"] != "rejected", events
    ex.check_invariants()
    blob = ex.snapshot()
    again = Exchange.restore(blob)
    assert again.snapshot() == blob
    assert again.state_hash() == ex.state_hash()


# ---------------------------------------------------------------- format


def test_snapshot_format_is_header_plus_msgpack(busy_blob: bytes) -> None:
    magic, version, digest, body = split(busy_blob)
    assert magic == MAGIC
    assert version >= 1
    assert digest == hashlib.sha256(body).digest()
    assert Exchange.restore(busy_blob).state_hash() == hashlib.sha256(body).hexdigest()
    decoded = decode_body(busy_blob)  # raises on any ext type: no pickles smuggled in msgpack
    assert isinstance(decoded, list), "the body is a positional msgpack array"
    assert b"\x80\x04\x95" not in busy_blob and b"\x80\x05\x95" not in busy_blob, "pickle opcodes"


def test_state_hash_is_sha256_of_body(busy_blob: bytes) -> None:
    ex = Exchange.restore(busy_blob)
    assert ex.state_hash() == hashlib.sha256(split(ex.snapshot())[3]).hexdigest()


# ---------------------------------------------------------------- refusal


def assert_refused(blob: object) -> None:
    with pytest.raises(SnapshotError):
        Exchange.restore(blob)  # type: ignore[arg-type]


def assert_refused_or_consistent(blob: bytes) -> None:
    """`restore` refuses `blob` with SnapshotError (never another exception), or yields an
    exchange that passes `invariants.check` and snapshots to the same bytes."""
    try:
        ex = Exchange.restore(blob)
    except SnapshotError:
        return
    ex.check_invariants()
    assert ex.snapshot() == blob, "a restored snapshot re-encodes to the same bytes"


def test_restore_refuses_every_truncation(busy_blob: bytes) -> None:
    for length in range(len(busy_blob)):
        assert_refused(busy_blob[:length])


def test_restore_refuses_every_single_bit_flip(busy_blob: bytes) -> None:
    for i in range(len(busy_blob)):
        corrupt = bytearray(busy_blob)
        corrupt[i] ^= 1 << (i % 8)
        assert_refused(bytes(corrupt))


def test_restore_refuses_trailing_garbage(busy_blob: bytes) -> None:
    assert_refused(busy_blob + b"\x00")
    _, _, _, body = split(busy_blob)
    assert_refused(seal(body + b"\xc0"))  # a valid checksum over a body with extra bytes


def test_restore_refuses_wrong_magic_and_version(busy_blob: bytes) -> None:
    _, version, _, body = split(busy_blob)
    assert_refused(seal(body, magic=b"QBOOKSNQ"))
    assert_refused(seal(body, magic=b"\x00" * 8))
    for other in (0, version - 1, version + 1, 0xFFFF):
        if other != version:
            assert_refused(seal(body, version=other))


@SETTINGS
@given(st.binary(max_size=300))
def test_restore_refuses_random_bytes(noise: bytes) -> None:
    assert_refused(noise)
    assert_refused(MAGIC + noise)
    assert_refused(seal(noise))


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        0,
        "x",
        [1, 2, 3],
        [None] * 11,
        [[]] * 11,
        [{}] * 11,
    ],
)
def test_restore_refuses_foreign_bodies_with_valid_checksums(body: object) -> None:
    assert_refused(seal(msgpack.packb(body)))


def test_restore_refuses_reshaped_bodies(busy_blob: bytes) -> None:
    body = decode_body(busy_blob)
    assert isinstance(body, list)
    variants = [body[:-1], [*body, 0], body[1:], [body[0], *body]]
    for i in range(len(body)):
        variants.append([*body[:i], "not this", *body[i + 1 :]])
        variants.append([*body[:i], None, *body[i + 1 :]])
        variants.append([*body[:i], -1, *body[i + 1 :]])
    for variant in variants:
        assert_refused(seal(msgpack.packb(variant)))


def test_restore_refuses_non_bytes() -> None:
    for value in (None, "QBOOKSNP", 42, [MAGIC], bytearray(b"x")):
        assert_refused(value)


class _CreatesMarker:
    """Unpickling this object runs `open(path, "w")`, creating the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restore_never_unpickles(tmp_path: Path, busy_blob: bytes) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesMarker(str(probe)))).close()
    assert probe.exists(), "the payload really does act when unpickled"

    marker = tmp_path / "marker"
    payload = pickle.dumps(_CreatesMarker(str(marker)), protocol=pickle.HIGHEST_PROTOCOL)
    _, version, _, _ = split(busy_blob)
    for blob in (
        payload,
        MAGIC + payload,
        seal(payload),
        seal(payload, version=version),
        seal(msgpack.packb([payload])),
        seal(msgpack.packb([msgpack.ExtType(1, payload)])),
        pickle.dumps(busy_blob),
    ):
        assert_refused(blob)
    assert not marker.exists(), "restore ran a pickle"


# ---------------------------------------------------------------- rewritten bodies

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(-3, 3), max_size=3),
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, list):
        for i, child in enumerate(node):
            out += _paths(child, (*prefix, i))
    elif isinstance(node, dict):
        for key in sorted(node, key=repr):
            out += _paths(node[key], (*prefix, ("key", key)))
    return out


def _replace(node: object, path: tuple, value: object) -> object:
    if not path:
        return value
    step, rest = path[0], path[1:]
    if isinstance(step, tuple):  # a dict key
        assert isinstance(node, dict)
        return {**node, step[1]: _replace(node[step[1]], rest, value)}
    assert isinstance(node, list)
    return [*node[:step], _replace(node[step], rest, value), *node[step + 1 :]]


@settings(SETTINGS, max_examples=150)
@given(st.data())
def test_rewritten_body_is_refused_or_consistent(busy_blob: bytes, data: st.DataObject) -> None:
    """A body re-sealed with a valid checksum but one value changed: `restore` either refuses
    it with SnapshotError (never another exception) or yields a consistent exchange."""
    body = decode_body(busy_blob)
    paths = [p for p in _paths(body) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    assert_refused_or_consistent(
        seal(msgpack.packb(_replace(body, path, data.draw(_leaf, label="value"))))
    )


def _get(node: object, path: tuple) -> object:
    for step in path:
        node = node[step[1]] if isinstance(step, tuple) else node[step]  # type: ignore[index]
    return node


@settings(SETTINGS, max_examples=300)
@given(st.data())
def test_a_nudged_number_is_refused_or_consistent(busy_blob: bytes, data: st.DataObject) -> None:
    """`decode` checks the invariants as it builds the state, not by a walk of
    `invariants.check` afterwards (snapshot.py): whatever it accepts must pass that walk.
    One integer of the body (a price, a quantity, an order id, a balance, a counter) moved
    by a little, or one integer of the body put in the place of another, re-sealed."""
    body = decode_body(busy_blob)
    ints = [p for p in _paths(body) if p and type(_get(body, p)) is int]
    path = data.draw(st.sampled_from(ints), label="path")
    if data.draw(st.booleans(), label="swap"):
        value = _get(body, data.draw(st.sampled_from(ints), label="from"))
    else:
        value = _get(body, path) + data.draw(st.sampled_from([-2, -1, 1, 2]), label="by")
    assert_refused_or_consistent(seal(msgpack.packb(_replace(body, path, value))))


def test_a_crossed_book_is_refused(busy_blob: bytes) -> None:
    """A sell reserves its quantity whatever its price: its best ask moved down to the best
    bid leaves every balance right and the levels in order, and only the crossed-book rule
    refuses it."""
    body = decode_body(busy_blob)
    assert isinstance(body, list)
    books = body[-1]
    name, bids, asks = next(book for book in books if book[1][0] and book[2][0])
    ask_prices = column_values(asks[0])  # columns: the level prices first
    asks[0] = snapshot_codec.uints([column_values(bids[0])[0], *ask_prices[1:]])
    with pytest.raises(SnapshotError, match=f"{name}: crossed book"):
        Exchange.restore(seal(msgpack.packb(body)))


def column_values(column: bytes) -> list[int]:
    """The values of an integer column of a book side (snapshot_books.py)."""
    if not column:
        return []
    width = column[0]
    return [int.from_bytes(column[i : i + width], "little") for i in range(1, len(column), width)]


def _int_columns(body: list) -> list[tuple[int, int, int]]:
    """(book, side, column) of every non-empty integer column of a body's books."""
    return [
        (b, s, c) for b, book in enumerate(body[10]) for s in (1, 2) for c in range(7) if book[s][c]
    ]


@settings(SETTINGS, max_examples=300)
@given(st.data())
def test_a_changed_column_value_is_refused_or_consistent(
    busy_blob: bytes, data: st.DataObject
) -> None:
    """One value of an integer column of a book (an order id, an account number, a
    quantity, a price, a level's count, a flag) moved by a little, or set to another value
    of the body's columns, re-sealed: refused, or a consistent state that re-encodes to the
    same bytes."""
    body = decode_body(busy_blob)
    assert isinstance(body, list)
    b, s, c = data.draw(st.sampled_from(_int_columns(body)), label="column")
    values = column_values(body[10][b][s][c])
    i = data.draw(st.integers(0, len(values) - 1), label="at")
    if data.draw(st.booleans(), label="from another column"):
        ob, os_, oc = data.draw(st.sampled_from(_int_columns(body)), label="other")
        values[i] = data.draw(st.sampled_from(column_values(body[10][ob][os_][oc])))
    else:
        values[i] = max(0, values[i] + data.draw(st.sampled_from([-2, -1, 1, 2, 256])))
    body[10][b][s][c] = snapshot_codec.uints(values)
    assert_refused_or_consistent(seal(msgpack.packb(body)))


def test_a_column_is_refused_unless_written_as_this_build_writes_it(busy_blob: bytes) -> None:
    """Wider than its largest value needs, a width that is not 1, 2, 4 or 8, a length that
    is not a whole number of values, a width byte with no values, or not bytes at all."""
    body = decode_body(busy_blob)
    assert isinstance(body, list)
    b, s, c = next((b, s, c) for b, s, c in _int_columns(body) if body[10][b][s][c][0] == 1)
    column = body[10][b][s][c]
    values = column_values(column)
    wider = b"\x02" + b"".join(v.to_bytes(2, "little") for v in values)
    for bad, message in (
        (wider, "wider than its values need"),
        (b"\x03" + column[1:] * 3, "bad width or length"),
        (wider + b"\x00", "bad width or length"),
        (b"\x01", "bad width or length"),
        (values, "not bytes"),
    ):
        body[10][b][s][c] = bad
        with pytest.raises(SnapshotError, match=message):
            Exchange.restore(seal(msgpack.packb(body)))
    body[10][b][s][c] = column
    assert Exchange.restore(seal(msgpack.packb(body))).snapshot() == busy_blob


def _with_coid_history(ex: Exchange) -> bytes:
    """`ex` after two accounts each placed and cancelled two orders with client order ids:
    the index then holds ids of orders no longer resting, which version 2 writes in it (a
    resting order's own id is written with the order)."""
    ts = ex.state.last_ts
    for account in ("alice", "bob"):
        for n in (1, 2):
            ts += 1
            coid = f"{account}-gone-{n}"
            events = ex.apply(
                {"op": "place", "ts": ts, "account": account, "market": "BTC-USD",
                 "side": "buy", "type": "limit", "price": 5, "qty": 1, "client_order_id": coid}
            )  # fmt: skip
            assert events[0]["type"] == "accepted", events
            ts += 1
            events = ex.apply(
                {"op": "cancel", "ts": ts, "account": account, "market": "BTC-USD",
                 "client_order_id": coid}
            )  # fmt: skip
            assert events[0]["type"] == "cancelled", events
    return ex.snapshot()


def test_a_client_order_id_index_out_of_order_is_refused(busy_blob: bytes) -> None:
    """The index of client order ids is checked canonical as it is read (each account's ids
    in order, each once; the accounts in order), not by sorting and writing it again: two of
    its pairs swapped, or two of its accounts, must still be refused."""
    body = decode_body(_with_coid_history(Exchange.restore(busy_blob)))
    assert isinstance(body, list)
    coids = body[9]
    pairs = next(pairs for _acct, pairs in coids if len(pairs) >= 2)
    pairs[0], pairs[1] = pairs[1], pairs[0]
    with pytest.raises(SnapshotError, match="client order id entry is malformed or out of order"):
        Exchange.restore(seal(msgpack.packb(body)))
    pairs[0], pairs[1] = pairs[1], pairs[0]
    Exchange.restore(seal(msgpack.packb(body)))  # as it was: accepted
    assert len(coids) >= 2
    coids[0], coids[1] = coids[1], coids[0]
    with pytest.raises(SnapshotError, match="client order id accounts are out of order"):
        Exchange.restore(seal(msgpack.packb(body)))


def test_a_head_not_written_as_this_build_writes_it_is_refused(busy_blob: bytes) -> None:
    """The markets, balances, supply and refs are checked canonical as they are read (not by
    writing them again): two entries swapped, an entry twice, an empty balance, an account
    with none, a list written as a map: each refused; the body as written, accepted."""
    body = decode_body(busy_blob)
    assert isinstance(body, list)
    markets, balances, supply, refs = body[5], body[6], body[7], body[8]
    assets = next(rows for _acct, rows in balances if len(rows) >= 2)
    swaps = [markets, balances, assets, supply, refs]
    assert all(len(items) >= 2 for items in swaps)
    for items in swaps:
        items[0], items[1] = items[1], items[0]
        with pytest.raises(SnapshotError, match="not canonical: keys out of order"):
            Exchange.restore(seal(msgpack.packb(body)))
        items[0], items[1] = items[1], items[0]
        items.insert(1, items[0])
        with pytest.raises(SnapshotError, match="not canonical: keys out of order or repeated"):
            Exchange.restore(seal(msgpack.packb(body)))
        del items[1]
    row = assets[0]
    assets[0] = [row[0], 0, 0]
    with pytest.raises(SnapshotError, match="not canonical: an empty balance"):
        Exchange.restore(seal(msgpack.packb(body)))
    for bad in ([row[0], 1, False], [row[0], True, 0]):  # msgpack's booleans are ints to Python
        assets[0] = bad
        with pytest.raises(SnapshotError, match="not an integer"):
            Exchange.restore(seal(msgpack.packb(body)))
    assets[0] = dict(zip(("asset", "available", "reserved"), row, strict=True))
    with pytest.raises(SnapshotError, match="not a list"):
        Exchange.restore(seal(msgpack.packb(body)))
    assets[0] = row
    body[6] = [*balances, ["zzzz-nobody", []]]
    with pytest.raises(SnapshotError, match="an account with no balance"):
        Exchange.restore(seal(msgpack.packb(body)))
    body[6] = balances
    assert Exchange.restore(seal(msgpack.packb(body))).snapshot() == busy_blob


def test_a_resting_orders_client_order_id_is_written_once(busy_blob: bytes) -> None:
    """Version 2 writes a resting order's client order id with the order only: the same id
    also in the index (for that order or another), or an account listed with no id, is not
    what this build writes and is refused."""
    ex = Exchange.restore(busy_blob)
    blob = _with_coid_history(ex)
    body = decode_body(blob)
    assert isinstance(body, list)
    coids, books = body[9], body[10]
    written = [c for _acct, pairs in coids for c, _oid in pairs]
    assert all(not c.startswith(("a-", "b-", "c-")) for c in written), written  # only history
    resting = {o.client_order_id: o for o in ex.state.orders.values() if o.client_order_id}
    assert resting and {c for _n, b, a in books for c in (*b[7], *a[7]) if c} == set(resting)
    order = resting["a-bid"]
    alice = next(pairs for acct, pairs in coids if acct == order.account)
    for oid in (order.order_id, order.order_id + 1000):
        alice.insert(0, ["a-bid", oid])  # "a-bid" sorts before "alice-gone-*"
        with pytest.raises(SnapshotError, match="client_order_id used twice"):
            Exchange.restore(seal(msgpack.packb(body)))
        del alice[0]
    Exchange.restore(seal(msgpack.packb(body)))  # as it was: accepted
    body[9] = [*coids, ["zed", []]]
    with pytest.raises(SnapshotError, match="lists an account with none"):
        Exchange.restore(seal(msgpack.packb(body)))


# ---------------------------------------------------------------- version 1

V1_BUSY = Path(__file__).parent / "data" / "busy-session-v1.snapshot"


def test_a_version_1_snapshot_still_restores_to_the_same_state() -> None:
    """The previous build's snapshot of the busy session (written by it, kept as a file)
    restores to the state this build gets by running the session: this build's snapshot of
    it is the same bytes, and the restored exchange goes on the same way."""
    blob = V1_BUSY.read_bytes()
    assert split(blob)[1] == 1 and snapshot_codec.VERSION == 2
    assert not snapshot_codec.written_by_this_build(blob)
    old = Exchange.restore(blob)
    old.check_invariants()
    ran = Exchange()
    run(ran, busy_session())
    assert old.snapshot() == ran.snapshot()
    assert snapshot_codec.written_by_this_build(old.snapshot())
    later = _with_coid_history(old)
    assert later == _with_coid_history(ran)


def test_a_version_1_snapshot_is_checked_as_before() -> None:
    blob = V1_BUSY.read_bytes()
    for length in range(0, len(blob), 7):
        assert_refused(blob[:length])
    body = decode_body(blob)
    assert isinstance(body, list)
    name, bids, asks = next(book for book in body[10] if book[1] and book[2])
    asks[0][0] = bids[0][0]
    with pytest.raises(SnapshotError, match=f"{name}: crossed book"):
        Exchange.restore(seal(msgpack.packb(body), version=1))


# ---------------------------------------------------------------- packed in pieces


@pytest.mark.parametrize("n", [0, 1, 15, 16, 255, 256, 257, 65535, 65536, 70000])
def test_array_headers_are_the_ones_msgpack_writes(n: int) -> None:
    items = [None] * n
    assert snapshot_codec._header(n) == msgpack.packb(items)[: len(snapshot_codec._header(n))]
    out: list[bytes] = []
    snapshot_codec._runs(out, items)
    assert b"".join(out) == msgpack.packb(items)


def test_a_body_packed_in_pieces_is_byte_for_byte_one_packb() -> None:
    """Every list the pieces cut (a side's client order ids, refs, the index of client order
    ids, balances) longer than a run, with and without the counters (the snapshot and the
    state hash)."""
    ex = Exchange()
    ex.apply(
        {
            "op": "create_market",
            "market": "X-Y",
            "base": "X",
            "quote": "Y",
            "lot_size": 1,
            "tick_size": 1,
            "maker_fee_bps": 0,
            "taker_fee_bps": 0,
            "ts": 1,
        }
    )
    runs = snapshot_codec.RUN
    for i in range(runs + 40):
        for asset in ("X", "Y"):
            ex.apply(
                {
                    "op": "deposit",
                    "account": f"a{i}",
                    "asset": asset,
                    "amount": 10**9,
                    "ref": f"r{asset}{i}",
                    "ts": 2,
                }
            )
    for i in range(runs + 30):  # distinct prices: more levels per side than a run
        ex.apply(
            {
                "op": "place",
                "account": f"a{i}",
                "market": "X-Y",
                "side": "buy",
                "type": "limit",
                "price": 1000 - i,
                "qty": 1,
                "tif": "gtc",
                "client_order_id": f"b{i}",
                "ts": 3,
            }
        )
        ex.apply(
            {
                "op": "place",
                "account": "a0",
                "market": "X-Y",
                "side": "sell",
                "type": "limit",
                "price": 2000 + i,
                "qty": 1,
                "tif": "gtc",
                "client_order_id": f"s{i}",
                "ts": 3,
            }
        )
    for i in range(runs + 20):  # ids of orders gone: the index writes those
        ex.apply(
            {"op": "place", "account": "a1", "market": "X-Y", "side": "buy", "type": "limit",
             "price": 1, "qty": 1, "tif": "gtc", "client_order_id": f"g{i}", "ts": 4}
        )  # fmt: skip
        ex.apply(
            {"op": "cancel", "account": "a1", "market": "X-Y", "client_order_id": f"g{i}",
             "ts": 4}
        )  # fmt: skip
    fields = snapshot_codec.body_fields(ex.state)
    assert len(fields[-1][0][2][7]) > runs  # a side's client order ids
    assert len(fields[-3]) > runs and len(fields[-5]) > runs  # refs, balances
    assert max(len(pairs) for _, pairs in fields[-2]) > runs  # one account's client order ids
    for body in (fields, fields[snapshot_codec.COUNTER_FIELDS :]):
        assert snapshot_codec.pack_body(body) == msgpack.packb(body, use_bin_type=True)
    assert split(ex.snapshot())[3] == msgpack.packb(fields, use_bin_type=True)


def test_a_dropped_exchange_is_freed_without_the_cyclic_collector(busy_blob: bytes) -> None:
    """An exchange and its state hold no reference cycle, so dropping one (a node replacing
    its state with a snapshot) frees it at once: a node keeps its state out of the cyclic
    collector's sight (gc.freeze, cluster/machine.py), where a cycle would never be freed.
    (A table of the exchange's bound methods was such a cycle.)"""
    import gc
    import weakref

    def ran() -> Exchange:
        ex = Exchange()
        run(ex, busy_session())
        return ex

    for make in (ran, lambda: Exchange.restore(busy_blob)):
        ex = make()
        ex.check_invariants()
        # A book side (a SortedDict, which takes weak references) stands for the state.
        side = weakref.ref(next(iter(ex.state.markets.values())).book.bids)
        enabled = gc.isenabled()
        gc.disable()
        try:
            del ex  # the only reference
            assert side() is None, "a dropped exchange is held by a reference cycle"
        finally:
            if enabled:
                gc.enable()
