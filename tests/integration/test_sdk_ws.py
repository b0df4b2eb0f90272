"""WebSocket subscriptions of the client SDK (api.sdk, api/sdk/subscription.py).

The channel logic on scripted messages first (no cluster), then a real 3-node cluster: the
SDK's book equals the REST book at the same seq while orders flow, through a SIGKILL of the
node serving the subscriptions, through a slow-consumer cut and a `prev_seq` gap; trades and
own orders come once each, in order, with any possible loss reported as a `Gap`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import socket
import threading
from typing import Any

import httpx
import trio

from api.sdk import AsyncClient, Book, Client, Credentials, Gap, Subscription
from api.sdk.subscription import _BookTracker, _EventTracker

from .conftest import admin

M = "BTC-USD"
MARKET = {
    "op": "create_market",
    "market": M,
    "base": "BTC",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}


def fund(cluster: Any, *accounts: str) -> dict[str, Credentials]:
    commands: list[dict] = [MARKET]
    for account in accounts:
        for asset in ("BTC", "USD"):
            commands.append(
                {
                    "op": "deposit",
                    "account": account,
                    "asset": asset,
                    "amount": 10**15,
                    "ref": f"{account}-{asset}",
                }
            )
    with admin(cluster) as client:
        assert all("events" in r for r in client.submit(commands))
        return {account: client.create_key(account) for account in accounts}


def rest_book(url: str) -> tuple[int, list, list]:
    """(seq, bids, asks) of one node's applied state."""
    response = httpx.get(f"{url}/v1/markets/{M}/book?depth=1000&consistency=stale", timeout=5)
    response.raise_for_status()
    body = response.json()
    return int(response.headers["X-QB-Seq"]), body["bids"], body["asks"]


def state_at(history: list[Book], seq: int) -> Book | None:
    """The book the subscription showed for `seq`, if the history pins it down: the last book
    at or before it, followed by one after it that is not a new snapshot (so no event in
    between went unseen)."""
    before = [i for i, book in enumerate(history) if book.seq <= seq]
    if not before:
        return None
    i = before[-1]
    if history[i].seq == seq:
        return history[i]
    if i + 1 >= len(history) or history[i + 1].snapshot:
        return None
    return history[i]


def check_against_rest(history: list[Book], reads: list[tuple[int, list, list]]) -> int:
    """Every REST read the history pins down is equal to it; returns how many were compared."""
    compared = 0
    for seq, bids, asks in reads:
        book = state_at(history, seq)
        if book is not None:
            assert (book.bids(), book.asks()) == (bids, asks), f"differs at seq {seq}"
            compared += 1
    return compared


# ---------------------------------------------------------------------- no cluster


def test_channel_logic_on_scripted_messages() -> None:
    stats: collections.Counter[str] = collections.Counter()
    book = _BookTracker(M, stats)
    book.connected()
    ch = f"book:{M}"

    def feed(tracker: Any, *messages: dict) -> list[tuple[list, bool]]:
        return [tracker.handle(m) for m in messages]

    ((items, resub),) = feed(
        book,
        {"type": "snapshot", "channel": ch, "seq": 10, "bids": [[995, 2]], "asks": [[1000, 5]]},
    )
    assert not resub and items[0].seq == 10 and items[0].snapshot
    ((items, _),) = feed(
        book,
        {
            "type": "delta",
            "channel": ch,
            "seq": 12,
            "prev_seq": 10,
            "side": "sell",
            "price": 1000,
            "level_qty": 3,
        },
    )
    assert items[0].asks() == [[1000, 3]] and items[0].seq == 12 and not items[0].snapshot
    ((items, _),) = feed(book, {"type": "heartbeat", "seq": 20})
    assert items[0].seq == 20  # complete through the heartbeat's seq
    # A break in the chain: nothing handed out, a resubscription asked for, and the deltas of
    # the old chain still in flight are ignored until the new snapshot.
    assert feed(
        book,
        {
            "type": "delta",
            "channel": ch,
            "seq": 25,
            "prev_seq": 22,
            "side": "buy",
            "price": 995,
            "level_qty": 0,
        },
    ) == [([], True)]
    assert feed(
        book,
        {
            "type": "delta",
            "channel": ch,
            "seq": 26,
            "prev_seq": 25,
            "side": "buy",
            "price": 990,
            "level_qty": 1,
        },
        {"type": "heartbeat", "seq": 30},
    ) == [([], False), ([], False)]
    ((items, _),) = feed(
        book, {"type": "snapshot", "channel": ch, "seq": 31, "bids": [], "asks": [[1000, 3]]}
    )
    assert items[0].snapshot and items[0].seq == 31 and items[0].bids() == []
    # Reconnected to a node that trails: its older snapshot is not handed out (seq never goes
    # back) until the book is at least as new as the last one shown.
    book.connected()
    assert feed(
        book, {"type": "snapshot", "channel": ch, "seq": 28, "bids": [], "asks": [[1000, 4]]}
    ) == [([], False)]
    ((items, _),) = feed(
        book,
        {
            "type": "delta",
            "channel": ch,
            "seq": 29,
            "prev_seq": 28,
            "side": "sell",
            "price": 1000,
            "level_qty": 3,
        },
        {"type": "heartbeat", "seq": 31},
    )[1:]
    assert items[0].seq == 31 and items[0].snapshot and items[0].asks() == [[1000, 3]]
    assert stats["ws_seq_gaps"] == 1 and stats["ws_resnapshots"] == 2

    events = _EventTracker("trades:BTC-USD", stats)
    tch = "trades:BTC-USD"

    def trade(seq: int, prev: int) -> dict:
        return {"type": "trade", "channel": tch, "seq": seq, "prev_seq": prev}

    events.connected()
    out = [
        i
        for r in feed(
            events,
            {"type": "subscribed", "channel": tch, "seq": 5},
            trade(7, 5),
            trade(9, 7),
            {"type": "heartbeat", "seq": 12},
        )
        for i in r[0]
    ]
    assert [m["seq"] for m in out] == [7, 9]
    # Reconnected to a node that trails (subscribed at 8): 9 again is dropped, 11 is new.
    events.connected()
    out = [
        i
        for r in feed(
            events, {"type": "subscribed", "channel": tch, "seq": 8}, trade(9, 8), trade(13, 9)
        )
        for i in r[0]
    ]
    assert [m["seq"] for m in out] == [13] and stats["ws_duplicates"] == 1
    # Reconnected to a node that is ahead: what happened in between may be lost, and is said.
    events.connected()
    out = [
        i
        for r in feed(
            events, {"type": "subscribed", "channel": tch, "seq": 20}, trade(21, 20), trade(30, 25)
        )
        for i in r[0]
    ]
    assert out[0] == Gap(tch, 13, 20, "reconnect") and out[1]["seq"] == 21
    assert out[2] == Gap(tch, 21, 25, "prev_seq") and out[3]["seq"] == 30


# ---------------------------------------------------------------------- a real cluster


def test_async_subscriptions_follow_the_flow_through_a_node_sigkill(
    make_cluster, monkeypatch
) -> None:
    monkeypatch.setenv("QB_WS_HEARTBEAT_S", "0.3")
    cluster = make_cluster(3)
    keys = fund(cluster, "alice", "bob")
    leader = cluster.wait_for_leader()
    leader_url = cluster.nodes[leader].config.api_url
    # The leader first: the subscriptions start there, and its death is also a leader loss.
    urls = sorted(cluster.api_urls(), key=lambda u: u != leader_url)
    rng = random.Random(3)
    history: list[Book] = []
    trades: list[Any] = []
    orders: list[Any] = []
    accepted: dict[int, int] = {}  # seq of alice's `accepted` events -> order id
    reads: list[tuple[int, list, list]] = []
    starts: list[int] = []  # the seq each subscription started at: book, trades, orders

    async def main() -> None:
        async with (
            AsyncClient(urls, keys["alice"]) as alice,
            AsyncClient(urls, keys["bob"]) as bob,
            AsyncClient(urls, keys["alice"]) as market_data,
        ):
            book_sub = market_data.subscribe_book(M)
            trades_sub = market_data.subscribe_trades(M)
            orders_sub = alice.subscribe_orders()
            placed = 0
            stop_flow = trio.Event()

            async def collect(sub: Any, into: list, copy: bool = False) -> None:
                async for item in sub:
                    into.append(item.copy() if copy else item)

            async def flow() -> None:
                nonlocal placed
                while not stop_flow.is_set():
                    price = 5 * rng.randint(195, 205)
                    side = rng.choice(("buy", "sell"))
                    result = await bob.place(M, side, "limit", rng.randint(1, 4), price=price)
                    other = "sell" if side == "buy" else "buy"
                    result = await alice.place(
                        M, other, "limit", rng.randint(1, 4), price=price + rng.choice((-5, 0, 5))
                    )
                    if "events" in result:
                        first = result["events"][0]
                        assert first["type"] == "accepted"
                        accepted[first["seq"]] = result["order_id"]
                    if rng.random() < 0.3 and result.get("status") == "resting":
                        with contextlib.suppress(Exception):
                            await alice.cancel(M, result["order_id"])
                    placed += 1

            async def read_rest(n: int) -> None:
                for _ in range(n):
                    await trio.sleep(0.1)
                    reads.append(
                        await trio.to_thread.run_sync(
                            rest_book, rng.choice([u for u in urls if u != killed.get("url")])
                        )
                    )

            async def wait(predicate: Any, timeout_s: float, what: str) -> None:
                with trio.move_on_after(timeout_s):
                    while not predicate():
                        await trio.sleep(0.02)
                    return
                raise AssertionError(f"timed out waiting for {what}")

            killed: dict[str, str] = {}
            for sub in (book_sub, trades_sub, orders_sub):
                starts.append(await sub.wait_subscribed())
            assert book_sub.url == trades_sub.url == orders_sub.url == leader_url
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, book_sub, history, True)
                nursery.start_soon(collect, trades_sub, trades)
                nursery.start_soon(collect, orders_sub, orders)
                nursery.start_soon(flow)
                await read_rest(15)
                await wait(lambda: placed >= 20, 30, "the flow")

                # SIGKILL the node serving all three: they go on elsewhere.
                killed["url"] = book_sub.url
                before = len(history)
                await trio.to_thread.run_sync(cluster.kill, leader)
                await wait(
                    lambda: (
                        book_sub.url not in (None, leader_url)
                        and any(b.snapshot for b in history[before:])
                    ),
                    30,
                    "a new snapshot from another node",
                )
                target = placed + 20
                await read_rest(15)
                await wait(lambda: placed >= target, 30, "the flow after the kill")
                stop_flow.set()
                await wait(
                    lambda: (
                        trades_sub.url not in (None, leader_url)
                        and orders_sub.url not in (None, leader_url)
                    ),
                    30,
                    "the event subscriptions to reconnect",
                )

                # Quiet now: the book catches up with the node's final state.
                final = await trio.to_thread.run_sync(rest_book, book_sub.url)
                reads.append(final)
                await wait(lambda: history[-1].seq >= final[0], 20, "the book to reach the end")
                nursery.cancel_scope.cancel()
            for sub in (book_sub, trades_sub, orders_sub):
                await sub.aclose()
            assert market_data.stats["ws_reconnects"] >= 2  # book and trades both moved
            assert market_data.stats["ws_resnapshots"] >= 1
            assert alice.stats["ws_reconnects"] >= 1

    trio.run(main)

    compared = check_against_rest(history, reads)
    assert compared >= 10, f"only {compared} of {len(reads)} REST reads could be compared"
    assert state_at(history, reads[-1][0]) is not None  # the final state was compared
    assert all(a.seq <= b.seq for a, b in itertools.pairwise(history))

    # Trades: once each, in seq order; every trade after the start came, or lies in a Gap.
    with Client(cluster.api_urls(), None) as client:
        expected = {t["seq"]: t["trade_id"] for t in client.trades(M, limit=1000)}
    check_events(trades, expected, starts[1])
    # Own orders: alice's acceptances likewise (other event types are checked for order).
    check_events(
        [e for e in orders if isinstance(e, Gap) or e["type"] == "accepted"],
        accepted,
        starts[2],
        key="order_id",
    )
    assert all(
        isinstance(e, Gap) or e["type"] != "accepted" or e["account"] == "alice" for e in orders
    )


def check_events(
    items: list[Any], expected: dict[int, int], start: int, key: str = "trade_id"
) -> None:
    """Once each, in seq order, and every expected event after `start` came or is in a Gap."""
    events = [e for e in items if not isinstance(e, Gap)]
    gaps = [g for g in items if isinstance(g, Gap)]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "out of order or duplicated"
    assert events, "nothing came"
    got = {e["seq"]: e[key] for e in events}
    for seq, ident in expected.items():
        if seq <= start:
            continue
        if seq in got:
            assert got[seq] == ident
        else:
            assert any(g.after_seq < seq <= g.until_seq for g in gaps), f"lost {seq} silently"


def read_through(sub: Subscription, history: list[Book], seq: int) -> None:
    """Take books until one reflects `seq` (heartbeats move it on while nothing changes)."""
    while history[-1].seq < seq:
        history.append(next(sub).copy())


class SmallWindowClient(Client):
    """Its subscriptions read through a 4 KiB receive buffer, so that a caller who stops
    asking for books makes the node's outbox fill up quickly."""

    def _subscription(self, stream: Any) -> Subscription:
        class Small(Subscription):
            def _open_socket(self, host: str, port: int, timeout_s: float) -> socket.socket:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(timeout_s)
                sock.connect((host, port))
                return sock

        return Small(stream, self._ssl)


def test_slow_consumer_cut_and_seq_gap_lead_to_a_resnapshot(make_cluster, monkeypatch) -> None:
    monkeypatch.setenv("QB_WS_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("QB_WS_MAX_QUEUE_BYTES", str(64 << 10))
    monkeypatch.setenv("QB_WS_FEED_BUFFER", "1500")
    cluster = make_cluster(3)
    fund(cluster, "a", "b")
    urls = cluster.api_urls()

    def burst(client: Any, rounds: int, offset: int) -> None:
        for round_ in range(rounds):
            commands = []
            for i in range(400):  # crossing pairs: a sell rests, a buy takes it
                price = 5 * (100 + (offset + round_ * 400 + i) % 50)
                commands.append(
                    {
                        "op": "place",
                        "account": "a",
                        "market": M,
                        "side": "sell",
                        "type": "limit",
                        "price": price,
                        "qty": 2,
                    }
                )
                commands.append(
                    {
                        "op": "place",
                        "account": "b",
                        "market": M,
                        "side": "buy",
                        "type": "limit",
                        "price": price,
                        "qty": 1,
                    }
                )
            client.submit(commands)

    with (
        admin(cluster) as operator,
        SmallWindowClient(urls, None) as client,
        client.subscribe_book(M) as sub,
    ):
        first = next(sub)
        assert first.snapshot and sub.url == urls[0]
        # The caller stops asking while 6,400 commands are applied. The node's outbox and the
        # kernels' buffers fill up, its feed falls behind: the node cuts the connection, which
        # shows once the caller reads again.
        burst(operator, 8, 0)
        history: list[Book] = [first.copy()]
        for book in sub:
            history.append(book.copy())
            if book.snapshot and client.stats["ws_closed_1008"]:
                break
        assert client.stats["ws_closed_1008"] == 1 and client.stats["ws_resnapshots"] == 1
        assert sub.url == urls[1]  # it went on with the next node
        end = rest_book(sub.url)
        read_through(sub, history, end[0])
        assert check_against_rest(history, [end]) == 1

        # A lost message (dropped here before the channel logic sees it): the chain breaks
        # at the next delta, and the subscription asks for a new snapshot on the same
        # connection.
        tracker = sub._stream.tracker
        handle, deltas = tracker.handle, []

        def lossy(m: dict) -> Any:
            if m.get("type") == "delta":
                deltas.append(m["seq"])
                if len(deltas) == 3:
                    return [], False
            return handle(m)

        tracker.handle = lossy
        url, resnapshots = sub.url, client.stats["ws_resnapshots"]
        flow = threading.Thread(target=burst, args=(operator, 1, 7))
        flow.start()
        try:
            for book in sub:
                history.append(book.copy())
                if client.stats["ws_resnapshots"] > resnapshots:
                    break
        finally:
            flow.join()
        assert client.stats["ws_seq_gaps"] == 1 and client.stats["ws_resubscribes"] == 1
        assert sub.url == url  # a gap needs no reconnection
        # No book was handed out between the lost delta and the new snapshot.
        assert next(b for b in history if b.seq >= deltas[2]).snapshot
        end = rest_book(url)
        read_through(sub, history, end[0])
        assert check_against_rest(history, [end]) == 1

    # The async client runs under asyncio too.
    async def under_asyncio() -> Book:
        async with AsyncClient(urls, None) as aclient, aclient.subscribe_book(M) as asub:
            return (await asub.__anext__()).copy()

    snapshot = asyncio.run(under_asyncio())
    assert snapshot.snapshot and snapshot.seq == end[0]  # the cluster is quiet now
    assert (snapshot.bids(), snapshot.asks()) == (end[1], end[2])
