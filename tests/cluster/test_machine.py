"""The node's replicated state machine: the replay window of signed requests.

Every replica applies the same payloads; what they decide about a request (apply it, refuse
it as replayed or expired) and what their window holds must be the same everywhere, and the
exchange's own state must not see the window at all.
"""

from __future__ import annotations

import hashlib
import hmac

import msgpack
import pytest

from cluster.batch import (
    KIND_ADDRESS,
    KIND_BARRIER,
    KIND_COMMAND,
    KIND_KEY,
    KIND_REQUEST,
    REFUSED_EXPIRED,
    REFUSED_REPLAYED,
    BatchError,
    decode_batch,
    encode_batch,
)
from cluster.machine import (
    REPLAY_RETENTION_MS,
    ExchangeMachine,
    MachineSnapshotError,
    without_directory,
)

MARKET = {
    "op": "create_market",
    "market": "X-Y",
    "base": "X",
    "quote": "Y",
    "lot_size": 1,
    "tick_size": 1,
    "maker_fee_bps": 0,
    "taker_fee_bps": 0,
}
T0_MS = 1_700_000_000_000


def ns(ms: int) -> int:
    return ms * 1_000_000


def signature(n: int) -> bytes:
    return hmac.new(b"key", b"request %d" % n, hashlib.sha256).digest()


def deposit(ref: str, amount: int = 5) -> dict:
    return {"op": "deposit", "account": "a", "asset": "Y", "amount": amount, "ref": ref}


def order(n: int) -> dict:  # no client_order_id: nothing in the exchange would dedupe it
    return {
        "op": "place",
        "account": "a",
        "market": "X-Y",
        "side": "buy",
        "type": "limit",
        "price": 10,
        "qty": 1 + n % 3,
        "tif": "gtc",
    }


def request(n: int, ts_ms: int, *commands: dict) -> list:
    return [KIND_REQUEST, signature(n), ts_ms, list(commands)]


def setup() -> bytes:
    return encode_batch(
        ns(T0_MS), [[KIND_COMMAND, dict(MARKET)], [KIND_COMMAND, deposit("funding", 10**9)]]
    )


def feed(payloads: list[bytes]) -> tuple[ExchangeMachine, list[list]]:
    machine = ExchangeMachine()
    return machine, [machine.apply(p) for p in payloads]


def test_a_repeated_request_is_skipped_alike_on_every_replica() -> None:
    applied: list[list[list[dict]]] = []
    payloads = [
        setup(),
        encode_batch(ns(T0_MS + 10), [request(1, T0_MS + 5, order(1))]),
        # The same request again (a captured copy replayed to the next leader), next to a new
        # one in the same batch, and once more later.
        encode_batch(
            ns(T0_MS + 900), [request(1, T0_MS + 5, order(1)), request(2, T0_MS + 899, order(2))]
        ),
        encode_batch(ns(T0_MS + 4_000), [request(1, T0_MS + 5, order(1)), [KIND_BARRIER]]),
    ]
    one, results = feed(payloads)
    one.add_listener(lambda events, ex: applied.append(events))
    two, again = feed(payloads)
    assert results == again
    assert results[1][0][0][0]["type"] == "accepted"
    assert results[2][0] == REFUSED_REPLAYED and results[2][1][0][0]["type"] == "accepted"
    assert results[3] == [REFUSED_REPLAYED, None]
    assert one.exchange.cmd_index == 4  # market, deposit and the two distinct orders
    assert len(one.exchange.open_orders(account="a")) == 2
    assert one.snapshot() == two.snapshot()
    # A refused request produces no event: the feed (listeners) sees nothing of it.
    one.apply(encode_batch(ns(T0_MS + 4_001), [request(2, T0_MS + 899, order(2))]))
    assert applied == [[]]
    assert one.has_request(signature(2).hex()) and not one.has_request(signature(3).hex())
    assert not one.has_request("not hex")


def test_all_commands_of_a_request_are_applied_or_refused_together() -> None:
    batch = request(7, T0_MS + 1, order(1), order(2), deposit("d-7"))
    machine, _ = feed([setup()])
    first = machine.apply(encode_batch(ns(T0_MS + 2), [batch]))
    assert [events[0]["type"] for events in first[0]] == ["accepted", "accepted", "balance"]
    cmd_index = machine.exchange.cmd_index
    assert machine.apply(encode_batch(ns(T0_MS + 3), [batch])) == [REFUSED_REPLAYED]
    assert machine.exchange.cmd_index == cmd_index


def test_a_key_created_by_a_signed_request_is_created_once() -> None:
    """POST /v1/admin/keys makes the key id on the leader: a replayed copy of that request
    would register a second key (and answer its secret). Inside a request entry, the copy is
    refused like any other."""
    key = [KIND_KEY, "add", "trade-1", "alice", "trader"]
    create = request(11, T0_MS + 1, key)
    machine, _ = feed([setup()])
    assert machine.apply(encode_batch(ns(T0_MS + 2), [create])) == [[None]]
    assert machine.key("trade-1") == ("alice", "trader")
    replayed = request(11, T0_MS + 1, [KIND_KEY, "add", "trade-2", "alice", "trader"])
    assert machine.apply(encode_batch(ns(T0_MS + 3), [replayed])) == [REFUSED_REPLAYED]
    assert machine.key("trade-2") is None


def test_the_window_is_pruned_by_the_requests_clock_and_a_pruned_request_never_applies() -> None:
    """Batch format 3: the window's clock is the highest timestamp of the requests applied
    (each verified by its leader), never a local clock nor the leader's batch stamp, and never
    goes back; what falls behind its horizon is forgotten, and a request that old is refused
    as expired, so forgetting it can never let it apply again."""
    machine, _ = feed([setup()])
    for n in range(10):  # one request every second
        machine.apply(
            encode_batch(ns(T0_MS + 1_000 * n), [request(n, T0_MS + 1_000 * n, deposit(f"d{n}"))])
        )
    assert machine.window_size() == 10 and machine.window_clock_ms == T0_MS + 9_000
    # A leader whose clock jumped an hour ahead stamps the next batch: honest requests in it
    # apply, and the window's clock follows them, not the stamp.
    ahead = machine.apply(
        encode_batch(ns(T0_MS + 3_600_000), [request(10, T0_MS + 10_000, deposit("d10"))])
    )
    assert ahead[0] != REFUSED_EXPIRED and machine.window_clock_ms == T0_MS + 10_000
    # A request stamped REPLAY_RETENTION_MS past request 3 moves the horizon: 0..2 are
    # forgotten, and refused as expired if they come again; 3 is still held (replayed).
    now = T0_MS + 3_000 + REPLAY_RETENTION_MS
    late = machine.apply(
        encode_batch(
            ns(T0_MS + 11_000),
            [
                request(11, now, deposit("d11")),
                request(2, T0_MS + 2_000, deposit("d2")),
                request(3, T0_MS + 3_000, deposit("d3")),
            ],
        )
    )
    assert late[1:] == [REFUSED_EXPIRED, REFUSED_REPLAYED]
    assert machine.window_clock_ms == now and machine.window_size() == 12 - 3
    assert not machine.has_request(signature(2).hex())
    # An older request later does not move the clock back.
    machine.apply(encode_batch(ns(T0_MS), [request(12, now - 1_000, deposit("d12"))]))
    assert machine.window_clock_ms == now


def test_format_2_batches_keep_their_rule_the_batch_stamp_moves_the_window() -> None:
    """A journal written before format 3 replays as it was applied: the window's clock is
    the leader-stamped batch ts, never a local clock, and never goes back."""
    machine, _ = feed([setup()])
    for n in range(10):  # one request every second
        machine.apply(
            encode_batch(
                ns(T0_MS + 1_000 * n),
                [request(n, T0_MS + 1_000 * n, deposit(f"d{n}"))],
                version=2,
            )
        )
    assert machine.window_size() == 10
    # The clock moves to REPLAY_RETENTION_MS past request 3: 0..2 are forgotten (< horizon).
    now = T0_MS + 3_000 + REPLAY_RETENTION_MS
    late = machine.apply(
        encode_batch(
            ns(now),
            [request(2, T0_MS + 2_000, deposit("d2")), request(3, T0_MS + 3_000, deposit("d3"))],
            version=2,
        )
    )
    assert late == [REFUSED_EXPIRED, REFUSED_REPLAYED]
    assert machine.window_size() == 7 and machine.window_clock_ms == now
    assert not machine.has_request(signature(2).hex())
    # A new leader whose clock is behind does not move the horizon back: request 2 stays
    # refused (expired), and the window keeps what it has.
    behind = machine.apply(
        encode_batch(
            ns(T0_MS),
            [request(2, T0_MS + 2_000, deposit("d2")), request(99, T0_MS, deposit("d99"))],
            version=2,
        )
    )
    assert behind == [REFUSED_EXPIRED, REFUSED_EXPIRED]
    assert machine.window_clock_ms == now and machine.window_size() == 7
    # Batches without a request leave the window alone (it depends on the log only).
    machine.apply(encode_batch(ns(now + 10 * REPLAY_RETENTION_MS), [[KIND_BARRIER]]))
    assert machine.window_clock_ms == now and machine.window_size() == 7


def test_pruning_is_the_same_on_every_replica_whatever_the_batches() -> None:
    """Requests stamped out of order (clients' clocks differ) and a clock that jumps: two
    replicas fed the same log hold the same window, byte for byte, at every step."""
    payloads = [setup()]
    for n in range(60):
        ts_ms = T0_MS + 700 * n
        skew = (n * 7919) % 9_000 - 4_500  # a client clock up to 4.5 s off either way
        payloads.append(
            encode_batch(
                ns(ts_ms),
                [
                    request(n, ts_ms + skew, deposit(f"d{n}")),
                    request(n - 3, ts_ms + skew, order(n)),
                ],
            )
        )
    one, two = ExchangeMachine(), ExchangeMachine()
    sizes = []
    for payload in payloads:
        assert one.apply(payload) == two.apply(payload)
        assert one.snapshot() == two.snapshot()
        sizes.append(one.window_size())
    assert max(sizes) > sizes[-1] > 0  # it grew, and was pruned


def test_the_snapshot_carries_the_window_and_restores_it() -> None:
    machine, _ = feed(
        [
            setup(),
            encode_batch(ns(T0_MS + 10), [request(1, T0_MS + 9, order(1))]),
            encode_batch(ns(T0_MS + 20), [request(2, T0_MS + 19, order(2))]),
        ]
    )
    blob = machine.snapshot()
    installed = ExchangeMachine()  # a node that catches up by installing the snapshot
    assert installed.restored_hash is None
    installed.restore(blob)
    assert installed.snapshot() == blob
    # The hash its snapshot states is the hash of the state restored (a node uses it instead
    # of hashing a large book again).
    exchange = installed.exchange
    assert installed.restored_hash == (exchange.cmd_index, exchange.state_hash())
    assert installed.restored_hash == (machine.exchange.cmd_index, machine.exchange.state_hash())
    assert installed.window_clock_ms == T0_MS + 19  # the latest request's own timestamp
    replay = encode_batch(
        ns(T0_MS + 30), [request(1, T0_MS + 9, order(1)), request(3, T0_MS + 29, order(3))]
    )
    assert installed.apply(replay)[0] == REFUSED_REPLAYED
    assert machine.apply(replay)[0] == REFUSED_REPLAYED
    assert installed.snapshot() == machine.snapshot()


def test_the_window_is_not_part_of_the_exchange_state() -> None:
    """The same commands, signed or not: the exchange's snapshot and state hash are equal
    (only the node snapshot around it carries the window)."""
    commands = [order(1), deposit("d1"), order(2)]
    signed, _ = feed(
        [
            setup(),
            encode_batch(
                ns(T0_MS + 1), [request(n, T0_MS, dict(c)) for n, c in enumerate(commands)]
            ),
        ]
    )
    plain, _ = feed(
        [setup(), encode_batch(ns(T0_MS + 1), [[KIND_COMMAND, dict(c)] for c in commands])]
    )
    assert signed.exchange.snapshot() == plain.exchange.snapshot()
    assert signed.exchange.state_hash() == plain.exchange.state_hash()
    assert signed.snapshot() != plain.snapshot()


def test_version_1_payloads_and_snapshots_still_load() -> None:
    """A journal and a dump written by the build before the window: a version-1 command entry
    carried its request (hex signature, ts) only for the old per-node memory; it applies as a
    plain command and the window starts empty, on every replica alike."""
    v1_entry = [KIND_COMMAND, order(1), [signature(1).hex(), T0_MS]]
    v1_batch = msgpack.packb([1, ns(T0_MS + 1), [v1_entry, v1_entry]], use_bin_type=True)
    machine, results = feed([setup(), v1_batch])
    assert [events[0]["type"] for events in results[1]] == ["accepted", "accepted"]
    assert machine.window_size() == 0 and machine.window_clock_ms == 0
    v1_snapshot = msgpack.packb([1, machine.exchange.snapshot(), [], []], use_bin_type=True)
    restored = ExchangeMachine()
    restored.restore(v1_snapshot)
    assert restored.exchange.state_hash() == machine.exchange.state_hash()
    assert restored.snapshot() == machine.snapshot()


def test_foreign_versions_are_refused_clearly() -> None:
    with pytest.raises(BatchError, match="unsupported batch version 4"):
        decode_batch(msgpack.packb([4, 1, []]))
    with pytest.raises(MachineSnapshotError, match="unsupported node snapshot version 9"):
        ExchangeMachine().restore(msgpack.packb([9, b"", [], [], [0, []]]))
    with pytest.raises(MachineSnapshotError, match="malformed"):
        ExchangeMachine().restore(msgpack.packb([2, b"", [], []]))


def test_without_directory_is_the_snapshot_of_the_state_without_members() -> None:
    machine, _ = feed([setup(), encode_batch(ns(T0_MS + 10), [request(1, T0_MS + 9, order(1))])])
    machine.directory = {"n1": ("127.0.0.1:1", "http://127.0.0.1:2"), "n2": ("a:1", "http://b")}
    blob = machine.snapshot()
    machine.directory = {}
    assert without_directory(blob) == machine.snapshot() != blob


def test_deposit_addresses_are_one_accounts_and_travel_in_the_snapshot() -> None:
    """KIND_ADDRESS (issue 13): assigned once, a repeat changes nothing, another account is
    refused with the holder named; alike on every replica, and in the node snapshot (version
    3; a version-2 snapshot restores with none)."""
    addr = "0x" + "ab" * 20
    payloads = [
        setup(),
        encode_batch(ns(T0_MS + 1), [[KIND_ADDRESS, 1, addr.upper().replace("0X", "0x"), "alice"]]),
        encode_batch(
            ns(T0_MS + 2), [[KIND_ADDRESS, 1, addr, "alice"], [KIND_ADDRESS, 1, addr, "bob"]]
        ),
        encode_batch(
            ns(T0_MS + 3), [[KIND_ADDRESS, 5, addr, "bob"], [KIND_ADDRESS, "1", addr, "x"]]
        ),
    ]
    one, results = feed(payloads)
    two, again = feed(payloads)
    assert results == again
    assert results[1:] == [[None], [None, ["taken", "alice"]], [None, ["malformed", ""]]]
    assert one.addresses() == [(1, addr, "alice"), (5, addr, "bob")]
    assert one.addresses(5) == [(5, addr, "bob")]
    assert one.snapshot() == two.snapshot()
    restored = ExchangeMachine()
    restored.restore(one.snapshot())
    assert restored.addresses() == one.addresses()
    fields = msgpack.unpackb(one.snapshot(), raw=False)
    older = ExchangeMachine()
    older.restore(msgpack.packb([2, *fields[1:5]], use_bin_type=True))
    assert older.addresses() == [] and older.exchange.state_hash() == one.exchange.state_hash()


def test_a_node_snapshot_is_read_with_its_exchange_snapshot_as_a_view() -> None:
    """`restore` reads the exchange's snapshot in place (cluster/machine.py `_node_fields`:
    not a copy of a large state's bytes); the other fields as msgpack gives them; any other
    layout through msgpack, as before."""
    from cluster.machine import _node_fields

    machine = ExchangeMachine()
    machine.apply(encode_batch(1, [[KIND_COMMAND, {"op": "deposit", "account": "a",
                                                   "asset": "USD", "amount": 5, "ref": "r"}]]))  # fmt: skip
    blob = machine.snapshot()
    fields = _node_fields(blob)
    assert isinstance(fields[1], memoryview) and fields[1].obj is blob
    assert [fields[0], fields[1].tobytes(), *fields[2:]] == msgpack.unpackb(blob, raw=False)
    for other in ([3, "not bin", [], [], [0, []], []], [1, b"x" * 70_000, [], []]):
        packed = msgpack.packb(other, use_bin_type=True)
        got = _node_fields(packed)
        assert [bytes(f) if isinstance(f, memoryview) else f for f in got] == other
    again = ExchangeMachine()
    again.restore(blob)
    assert again.snapshot() == blob


def test_a_node_that_restores_again_frees_the_state_it_replaces() -> None:
    """A node's machine freezes each state it loads out of the cyclic collector's sight;
    the state a later snapshot replaces must then be freed by reference counting alone, or
    every snapshot a follower installs would leak the whole book before it (it did, while
    the exchange held a table of its own bound methods)."""
    import gc
    import weakref

    source = ExchangeMachine()
    market = {"op": "create_market", "market": "X-Y", "base": "X", "quote": "Y",
              "lot_size": 1, "tick_size": 1, "maker_fee_bps": 0, "taker_fee_bps": 0}  # fmt: skip
    commands = [[KIND_COMMAND, market]]
    commands += [[KIND_COMMAND, {"op": "deposit", "account": "a", "asset": "Y",
                                 "amount": 10**12, "ref": "r"}]]  # fmt: skip
    place = {"op": "place", "account": "a", "market": "X-Y", "side": "buy", "type": "limit",
             "qty": 1, "tif": "gtc"}  # fmt: skip
    commands += [
        [KIND_COMMAND, {**place, "price": 1000 - i % 500, "client_order_id": f"c{i}"}]
        for i in range(2000)
    ]
    source.apply(encode_batch(1, commands))
    blob = source.snapshot()
    machine = ExchangeMachine(freeze_restored=True)
    try:
        machine.restore(blob)
        # A book side (a SortedDict, which takes weak references) stands for the state.
        side = weakref.ref(machine.exchange.state.markets["X-Y"].book.bids)
        machine.restore(blob)
        assert side() is None, "the replaced state is held by a reference cycle, frozen"
        assert machine.snapshot() == blob
    finally:
        gc.unfreeze()
