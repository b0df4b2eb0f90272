"""The indexer's PostgreSQL side (indexer/postgres.py) against the real embedded PostgreSQL.

A seeded session runs through `statemachine.Exchange` as a replica would apply committed log
entries; its events are written in batches of varied sizes, and the tables must then equal
the engine's own view (open orders, balances, markets) and its events (every seq once,
trades). Then the lease and fencing, the migrations, and a resync. Every seeded test names its
seed in its id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Iterator

import asyncpg
import orjson
import pytest

from indexer.events import Checkpoint, Entry, Fenced, Lease
from indexer.postgres import BatchError, MigrationError, PgSink, migrate, migrations
from statemachine import Exchange
from tests.statemachine.strategies import MARKETS, busy_session

ACCOUNTS = ("alice", "bob", "carol", "dave", "erin")
RICH = {"USD": 400_000, "BTC": 4_000, "ETH": 4_000}
POOR = {"USD": 300, "BTC": 4, "ETH": 3}  # carol: her market buys run out of funds


# ---------------------------------------------------------------------------- a fake log


class FakeLog:
    """A replica applying committed log entries: each entry a batch of commands (or none: a
    barrier, a membership change), numbered as the log numbers them."""

    def __init__(self) -> None:
        self.exchange = Exchange()
        self.raft_index = 0
        self.events: list[dict] = []  # every event so far

    def entry(self, commands: list[dict]) -> Entry:
        self.raft_index += 1
        events = [e for command in commands for e in self.exchange.apply(command)]
        self.events += events
        return Entry(self.raft_index, self.exchange.cmd_index, tuple(events))


class Traders:
    """Seeded commands with everything the projections must follow: resting, crossing and
    partly filled limit orders (gtc, ioc, fok, post_only), market orders (filled, cancelled
    ioc, out of funds), self-trade prevention, cancels by order_id and client_order_id,
    amends that keep or lose priority (and cross), cancel_all, deposits, withdrawals, and
    rejections of every kind on the way."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ts = 1_000
        self.coids = 0
        self.refs = 0

    def setup(self) -> list[dict]:
        cmds = [spec.create(self.ts) for spec in MARKETS]
        for account in ACCOUNTS:
            for asset, amount in (POOR if account == "carol" else RICH).items():
                cmds.append(self._transfer("deposit", account, asset, amount))
        return cmds

    def _transfer(self, op: str, account: str, asset: str, amount: int) -> dict:
        self.refs += 1
        return {
            "op": op,
            "ts": self.ts,
            "account": account,
            "asset": asset,
            "amount": amount,
            "ref": f"r{self.refs}",
        }

    def command(self, ex: Exchange) -> dict:
        rng = self.rng
        self.ts += rng.choice((0, 1, 1, 5))
        r = rng.random()
        if r < 0.50:
            return self._place(ex, "limit")
        if r < 0.58:
            return self._place(ex, "market")
        if r < 0.68:
            return self._cancel(ex)
        if r < 0.80:
            return self._amend(ex)
        if r < 0.81:
            cmd = {"op": "cancel_all", "ts": self.ts, "account": rng.choice(ACCOUNTS)}
            if rng.random() < 0.5:
                cmd["market"] = rng.choice(MARKETS).name
            return cmd
        if r < 0.91:
            account = rng.choice(ACCOUNTS)
            asset = rng.choice(("USD", "BTC", "ETH"))
            amount = rng.randint(1, 20_000 if asset == "USD" else 200)
            return self._transfer("deposit", account, asset, amount)
        if r < 0.97:
            account = rng.choice(ACCOUNTS)
            asset = rng.choice(("USD", "BTC", "ETH"))
            amount = rng.randint(1, 30_000 if asset == "USD" else 300)
            return self._transfer("withdraw", account, asset, amount)
        return rng.choice(
            (
                {"op": "launch", "ts": self.ts},
                {"op": "place", "ts": self.ts, "account": "bob", "market": "NOPE"},
                {"op": "cancel", "ts": self.ts, "account": "bob", "market": MARKETS[0].name,
                 "order_id": 10**9},
            )
        )  # fmt: skip

    def _place(self, ex: Exchange, kind: str) -> dict:
        rng = self.rng
        spec = rng.choice(MARKETS)
        cmd = {
            "op": "place",
            "ts": self.ts,
            # carol, nearly broke, places a good share of the market orders (`funds`).
            "account": "carol" if kind == "market" and rng.random() < 0.3 else rng.choice(ACCOUNTS),
            "market": spec.name,
            "side": rng.choice(("buy", "sell")),
            "type": kind,
            "qty": rng.randint(1, 6) if rng.random() < 0.8 else rng.randint(7, 25),
        }
        if kind == "limit":
            # Mostly on its own side of the mid (the book fills up), else anywhere near it.
            ticks = rng.randint(-4, 4)
            if rng.random() < 0.7:
                ticks = -rng.randint(0, 6) if cmd["side"] == "buy" else rng.randint(0, 6)
            cmd["price"] = max(spec.tick_size, spec.mid + ticks * spec.tick_size)
            tif = rng.choice(("gtc", "gtc", "gtc", "ioc", "fok", "post_only", None))
            if tif is not None:
                cmd["tif"] = tif
        stp = rng.choice(("cancel_taker", "cancel_maker", "cancel_both", "none", None))
        if stp is not None:
            cmd["stp"] = stp
        if rng.random() < 0.4:
            # Now and then an id used before: rejected duplicate_client_order_id.
            self.coids += rng.random() < 0.95
            cmd["client_order_id"] = f"c{self.coids}"
        return cmd

    def _resting(self, ex: Exchange) -> dict | None:
        orders = ex.open_orders()
        return self.rng.choice(orders) if orders else None

    def _cancel(self, ex: Exchange) -> dict:
        order = self._resting(ex)
        if order is None or self.rng.random() < 0.05:
            return {"op": "cancel", "ts": self.ts, "account": "dave",
                    "market": MARKETS[1].name, "order_id": 123_456}  # fmt: skip
        cmd = {"op": "cancel", "ts": self.ts, "account": order["account"],
               "market": order["market"]}  # fmt: skip
        if order["client_order_id"] is not None and self.rng.random() < 0.3:
            cmd["client_order_id"] = order["client_order_id"]
        else:
            cmd["order_id"] = order["order_id"]
        return cmd

    def _amend(self, ex: Exchange) -> dict:
        rng = self.rng
        order = self._resting(ex)
        if order is None:
            return self._place(ex, "limit")
        spec = next(m for m in MARKETS if m.name == order["market"])
        cmd = {"op": "amend", "ts": self.ts, "account": order["account"],
               "market": order["market"], "order_id": order["order_id"]}  # fmt: skip
        how = rng.choice(("down", "down", "up", "price", "both"))
        if how == "down" and order["remaining"] > 1:
            cmd["qty"] = rng.randint(1, order["remaining"] - 1)  # keeps its place
        elif how in ("up", "down"):
            cmd["qty"] = order["remaining"] + rng.randint(1, 5)
        if how in ("price", "both"):
            cmd["price"] = max(spec.tick_size, spec.mid + rng.randint(-4, 4) * spec.tick_size)
        if how == "both":
            cmd["qty"] = rng.randint(1, 8)
        return cmd


def session_entries(log: FakeLog, traders: Traders, commands: int) -> Iterator[Entry]:
    """`commands` commands (after the set-up) as log entries: mostly one command, some
    leader batches of up to 6, and an empty entry now and then."""
    yield log.entry(traders.setup())
    rng = traders.rng
    left = commands
    while left > 0:
        r = rng.random()
        if r < 0.05:
            yield log.entry([])
            continue
        n = 1 if r < 0.75 else min(left, rng.randint(2, 6))
        left -= n
        yield log.entry([traders.command(log.exchange) for _ in range(n)])


def batches(entries: Iterator[Entry], rng: random.Random) -> Iterator[list[Entry]]:
    """Whole entries grouped into batches of varied sizes (a streamer's: one entry to a few
    thousand events)."""
    batch: list[Entry] = []
    events = 0
    target = 1
    for entry in entries:
        batch.append(entry)
        events += len(entry.events)
        if events >= target:
            yield batch
            batch, events = [], 0
            target = rng.choice((1, 3, 20, 100, 400, 1500))
    if batch:
        yield batch


# ---------------------------------------------------------------------------- reading back


async def _connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
    )  # fmt: skip
    return conn


async def assert_projections_match(conn: asyncpg.Connection, ex: Exchange) -> None:
    """Open orders field by field, non-zero balances and markets equal the engine's view."""
    rows = await conn.fetch(
        "SELECT order_id, client_order_id, account, market, side, price, remaining, "
        "filled_qty, qty, tif, stp, order_type FROM orders WHERE status = 'open'"
    )
    got = {
        r["order_id"]: {
            "order_id": r["order_id"],
            "client_order_id": r["client_order_id"],
            "account": r["account"],
            "market": r["market"],
            "side": r["side"],
            "price": r["price"],
            "remaining": r["remaining"],
            "filled": r["filled_qty"],
            "original": r["qty"],
            "tif": r["tif"],
            "stp": r["stp"],
        }
        for r in rows
    }
    assert {r["order_type"] for r in rows} <= {"limit"}
    assert got == {o["order_id"]: o for o in ex.open_orders()}
    balances = {
        (r["account"], r["asset"]): (r["available"], r["reserved"])
        for r in await conn.fetch("SELECT account, asset, available, reserved FROM balances")
    }
    assert {k: v for k, v in balances.items() if v != (0, 0)} == ex.balances()
    markets = await conn.fetch(
        "SELECT market, base, quote, lot_size, tick_size, maker_fee_bps, taker_fee_bps "
        "FROM markets ORDER BY market"
    )
    assert [dict(r) for r in markets] == ex.markets()


TRADE_FIELDS = (
    "trade_id", "seq", "cmd_index", "ts", "market", "price", "qty", "maker_order_id",
    "taker_order_id", "maker_account", "taker_account", "taker_side", "maker_fee", "taker_fee",
)  # fmt: skip


async def assert_events_and_trades_match(conn: asyncpg.Connection, events: list[dict]) -> None:
    rows = await conn.fetch(
        "SELECT seq, cmd_index, ts, type, market, account, order_id, body FROM events ORDER BY seq"
    )
    assert [r["seq"] for r in rows] == list(range(1, len(events) + 1))
    assert [r["body"] for r in rows] == events
    for r, e in zip(rows, events, strict=True):
        assert (r["cmd_index"], r["ts"], r["type"]) == (e["cmd_index"], e["ts"], e["type"])
        assert (r["market"], r["account"], r["order_id"]) == (
            e.get("market"),
            e.get("account"),
            e.get("order_id"),
        )
    trades = await conn.fetch(f"SELECT {', '.join(TRADE_FIELDS)} FROM trades ORDER BY trade_id")
    want = [{k: e[k] for k in TRADE_FIELDS} for e in events if e["type"] == "trade"]
    assert [dict(r) for r in trades] == want


async def assert_closed_orders_agree(conn: asyncpg.Connection, events: list[dict]) -> None:
    """Every accepted order has a row; filled ones are whole, cancelled ones say what their
    cancelled event said, and every row's filled_qty is the sum of its trades."""
    accepted = {e["order_id"]: e for e in events if e["type"] == "accepted"}
    last_end = {e["order_id"]: e for e in events if e["type"] in ("cancelled", "filled")}
    rows = {
        r["order_id"]: r
        for r in await conn.fetch(
            "SELECT order_id, status, remaining, filled_qty, qty, placed_qty, cancel_reason, "
            "price, order_type FROM orders"
        )
    }
    assert set(rows) == set(accepted)
    for order_id, row in rows.items():
        assert row["placed_qty"] == accepted[order_id]["qty"]
        assert row["order_type"] == accepted[order_id]["order_type"]
        end = last_end.get(order_id)
        if row["status"] == "open":
            continue
        assert end is not None and row["status"] == end["type"], order_id
        if end["type"] == "filled":
            assert row["remaining"] == 0 and row["filled_qty"] == row["qty"]
        else:
            assert (row["remaining"], row["cancel_reason"]) == (end["remaining"], end["reason"])
    mismatched = await conn.fetch(
        """
        SELECT o.order_id, o.filled_qty, t.traded FROM orders o
        LEFT JOIN (
            SELECT order_id, sum(qty) AS traded FROM (
                SELECT maker_order_id AS order_id, qty FROM trades
                UNION ALL SELECT taker_order_id, qty FROM trades) AS x
            GROUP BY order_id) AS t USING (order_id)
        WHERE o.filled_qty <> coalesce(t.traded, 0)"""
    )
    assert mismatched == []


async def table_dump(url: str) -> dict:
    """Everything the indexer writes, to compare before and after a refused write."""
    conn = await asyncpg.connect(url)
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1")]
            for table in (
                "events", "orders", "trades", "balances", "markets", "indexer_checkpoint",
                "indexer_resyncs",
            )
        }  # fmt: skip
    finally:
        await conn.close()


async def execute(url: str, sql: str, *args: object) -> str:
    conn = await asyncpg.connect(url)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


def rested_takers(events: list[dict]) -> int:
    """Orders that traded as takers (new or amended across the book) and rested the rest."""
    takers: dict[int, set[int]] = {}
    ended: dict[int, set[int]] = {}
    for e in events:
        if e["type"] == "trade":
            takers.setdefault(e["cmd_index"], set()).add(e["taker_order_id"])
        elif e["type"] in ("filled", "cancelled"):
            ended.setdefault(e["cmd_index"], set()).add(e["order_id"])
    return sum(len(ids - ended.get(cmd, set())) for cmd, ids in takers.items())


def coverage(events: list[dict]) -> set[str]:
    """What a session exercised, by name."""
    seen = set()
    for e in events:
        kind = e["type"]
        seen.add(kind)
        if kind == "cancelled":
            seen.add(f"cancelled:{e['reason']}")
        elif kind == "amended":
            seen.add(f"amended:{'kept' if e['priority_kept'] else 'lost'}")
        elif kind == "accepted":
            seen.add(f"accepted:{e['order_type']}:{e['tif']}")
        elif kind == "rejected":
            seen.add(f"rejected:{e['reason']}")
    return seen


# ---------------------------------------------------------------------------- the session


@pytest.mark.parametrize("seed", [11, 12])
def test_a_seeded_session_lands_exactly_once_and_the_tables_equal_the_engine(
    pg_url: str, seed: int
) -> None:
    async def go() -> None:
        sink = await PgSink.connect(pg_url, holder="n2")
        conn = await _connect(pg_url)
        try:
            lease = await sink.try_acquire()
            assert lease == Lease("n2", 1)
            log = FakeLog()
            traders = Traders(seed)
            checkpoint = await sink.checkpoint()
            assert checkpoint == Checkpoint()
            entries = session_entries(log, traders, commands=4000)
            for batch in batches(entries, random.Random(seed)):
                checkpoint = await sink.write(lease, checkpoint.seq, batch)
                ex = log.exchange
                assert checkpoint == Checkpoint(
                    ex.seq, ex.cmd_index, log.raft_index, kafka_seq=0, epoch=1
                )
                await assert_projections_match(conn, ex)  # at every checkpoint
            assert await sink.checkpoint() == checkpoint
            await assert_projections_match(conn, log.exchange)
            await assert_events_and_trades_match(conn, log.events)
            await assert_closed_orders_agree(conn, log.events)
            seen = coverage(log.events)
            wanted = {
                "trade", "filled", "cancelled:user", "cancelled:cancel_all", "cancelled:ioc",
                "cancelled:stp", "cancelled:funds", "amended:kept", "amended:lost",
                "accepted:market:ioc", "accepted:limit:fok", "accepted:limit:post_only",
                "accepted:limit:ioc", "rejected:fok_unfillable", "rejected:insufficient_funds",
                "rejected:duplicate_client_order_id", "rejected:unknown_op", "balance", "book",
            }  # fmt: skip
            assert wanted <= seen, f"seed {seed} did not exercise {sorted(wanted - seen)}"
            assert rested_takers(log.events) > 0
        finally:
            await conn.close()
            await sink.close()

    asyncio.run(go())


@pytest.mark.parametrize("per_batch", ["all", "one"])
def test_the_busy_session_in_one_batch_or_one_entry_per_batch(pg_url: str, per_batch) -> None:
    """The state machine tests' fixed session (partial fills both ways, fees, amends, STP and
    funds cancellations, withdrawals): one command per entry, written at once or one entry per
    write; a taker's remaining after trading in its own command must come out right."""

    async def go() -> None:
        sink = await PgSink.connect(pg_url, holder="n2")
        conn = await _connect(pg_url)
        try:
            lease = await sink.try_acquire()
            log = FakeLog()
            entries = [log.entry([command]) for command in busy_session()]
            seq = 0
            for batch in [entries] if per_batch == "all" else [[e] for e in entries]:
                seq = (await sink.write(lease, seq, batch)).seq
            await assert_projections_match(conn, log.exchange)
            await assert_events_and_trades_match(conn, log.events)
            await assert_closed_orders_agree(conn, log.events)
        finally:
            await conn.close()
            await sink.close()

    asyncio.run(go())


def test_a_batch_that_cannot_be_right_is_refused_whole(pg_url: str) -> None:
    async def go() -> None:
        sink = await PgSink.connect(pg_url, holder="n2")
        try:
            lease = await sink.try_acquire()
            log = FakeLog()
            traders = Traders(3)
            entries = list(session_entries(log, traders, commands=40))
            checkpoint = await sink.write(lease, 0, entries[:3])
            rest = entries[3:]
            before = await table_dump(pg_url)
            gap = [rest[1], *rest[2:5]]  # rest[0]'s events are missing
            with pytest.raises(BatchError, match="gap or a repeat"):
                await sink.write(lease, checkpoint.seq, gap)
            with pytest.raises(BatchError, match="raft_index"):
                await sink.write(lease, checkpoint.seq, [rest[0], rest[0]])
            # Events that follow on in seq but from a later entry than the checkpoint's next
            # one (the cmd_index does not follow): refused inside the transaction.
            shifted = [
                Entry(e.raft_index, e.cmd_index + 1,
                      tuple({**ev, "cmd_index": ev["cmd_index"] + 1} for ev in e.events))
                for e in rest[:2]
            ]  # fmt: skip
            with pytest.raises(BatchError, match="cmd_index"):
                await sink.write(lease, checkpoint.seq, shifted)
            assert await table_dump(pg_url) == before
            # And the right batch still goes in.
            assert (await sink.write(lease, checkpoint.seq, rest)).seq == log.exchange.seq
        finally:
            await sink.close()

    asyncio.run(go())


# ---------------------------------------------------------------------------- lease, fencing


EXPIRE_LEASE = "UPDATE indexer_lease SET expires_at = now() - interval '1 second'"


def test_a_lost_lease_fences_the_old_writer_and_release_hands_over_at_once(pg_url) -> None:
    """n2 streams; its lease expires (simulated: expires_at moved into the past on the
    database, which is the clock the lease runs on); n3 takes over in the next epoch and
    writes; every write, Kafka checkpoint and resync of n2 is refused and changes nothing."""

    async def go() -> None:
        n2 = await PgSink.connect(pg_url, holder="n2", lease_ttl_s=30)
        n3 = await PgSink.connect(pg_url, holder="n3", lease_ttl_s=30)
        try:
            log = FakeLog()
            entries = list(session_entries(log, Traders(5), commands=120))
            parts = [entries[:10], entries[10:20], entries[20:30], entries[30:40], entries[40:]]
            lease2 = await n2.try_acquire()
            assert lease2 == Lease("n2", 1)
            assert await n2.try_acquire() == lease2  # holding it: renewed, same epoch
            assert await n3.try_acquire() is None
            assert await n2.renew(lease2)
            cp0 = cp = await n2.write(lease2, 0, parts[0])
            await n2.set_kafka_seq(lease2, cp.seq - 1)

            await execute(pg_url, EXPIRE_LEASE)
            assert not await n2.renew(lease2)
            lease3 = await n3.try_acquire()
            assert lease3 == Lease("n3", 2)
            cp = await n3.write(lease3, cp.seq, parts[1])
            assert cp.epoch == 2 and cp.kafka_seq == parts[0][-1].events[-1]["seq"] - 1

            before = await table_dump(pg_url)
            for attempt in (
                n2.write(lease2, cp0.seq, parts[1]),  # what it would write next
                n2.write(lease2, cp.seq, parts[2]),  # even at the right seq
                n2.set_kafka_seq(lease2, cp.seq),
                n2.resync(lease2, log.exchange.snapshot(), log.exchange.seq,
                          log.exchange.cmd_index, log.raft_index),
            ):  # fmt: skip
                with pytest.raises(Fenced, match="n3"):
                    await attempt
            assert not await n2.renew(lease2)
            # The holder, at a seq the checkpoint is no longer at: refused as well.
            with pytest.raises(Fenced, match="checkpoint is at seq"):
                await n3.write(lease3, cp0.seq, parts[1])
            assert await table_dump(pg_url) == before

            # A release lets n2 in at once, in a new epoch; n3 is fenced from then on.
            await n3.release(lease3)
            lease2b = await n2.try_acquire()
            assert lease2b == Lease("n2", 3)
            cp = await n2.write(lease2b, cp.seq, parts[2])
            with pytest.raises(Fenced):
                await n3.write(lease3, cp.seq, parts[3])
            # An expired lease taken again by its own holder is a new epoch too.
            await execute(pg_url, EXPIRE_LEASE)
            assert await n2.try_acquire() == Lease("n2", 4)
            with pytest.raises(Fenced):
                await n2.write(lease2b, cp.seq, parts[3])
        finally:
            await n2.close()
            await n3.close()

    asyncio.run(go())


def test_the_lease_expires_on_the_database_clock(pg_url: str) -> None:
    """Real time, short ttl: n3 polls until the lease of n2 (never renewed) runs out."""

    async def go() -> None:
        n2 = await PgSink.connect(pg_url, holder="n2", lease_ttl_s=0.4)
        n3 = await PgSink.connect(pg_url, holder="n3", lease_ttl_s=0.4)
        try:
            lease2 = await n2.try_acquire()
            started = time.monotonic()
            assert await n3.try_acquire() is None
            lease3 = None
            while lease3 is None and time.monotonic() - started < 10:
                await asyncio.sleep(0.05)
                lease3 = await n3.try_acquire()
            waited = time.monotonic() - started
            assert lease3 == Lease("n3", lease2.epoch + 1)
            assert 0.3 <= waited < 5, waited
            assert not await n2.renew(lease2)
            assert await n3.renew(lease3)
        finally:
            await n2.close()
            await n3.close()

    asyncio.run(go())


def test_two_writers_with_the_same_lease_and_seq_one_wins(pg_url: str) -> None:
    """Two processes of one holder (a restart while the old one still runs) share an epoch;
    the checkpoint row lock makes one of two identical writes win and fences the other."""

    async def go() -> None:
        a = await PgSink.connect(pg_url, holder="n2")
        b = await PgSink.connect(pg_url, holder="n2")
        try:
            lease = await a.try_acquire()
            assert await b.try_acquire() == lease
            log = FakeLog()
            entries = list(session_entries(log, Traders(9), commands=300))
            results = await asyncio.gather(
                a.write(lease, 0, entries), b.write(lease, 0, entries), return_exceptions=True
            )
            assert sorted(type(r).__name__ for r in results) == ["Checkpoint", "Fenced"]
            conn = await _connect(pg_url)
            try:
                await assert_events_and_trades_match(conn, log.events)
                await assert_projections_match(conn, log.exchange)
            finally:
                await conn.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_a_takeover_waits_for_a_write_in_flight(pg_url: str) -> None:
    """A write holds the lease row FOR SHARE until it commits: the epoch cannot go up under
    it. (Here a plain connection holds the row as a write would, past the lease's expiry.)"""

    async def go() -> None:
        n2 = await PgSink.connect(pg_url, holder="n2", lease_ttl_s=0.3)
        n3 = await PgSink.connect(pg_url, holder="n3", lease_ttl_s=0.3)
        writer = await asyncpg.connect(pg_url)
        try:
            lease2 = await n2.try_acquire()
            transaction = writer.transaction()
            await transaction.start()
            await writer.execute("SELECT * FROM indexer_lease FOR SHARE")
            await asyncio.sleep(0.5)  # the lease has expired, the "write" is still in flight
            started = time.monotonic()
            assert await n3.try_acquire() is None
            assert time.monotonic() - started >= 0.9  # it waited for the row (lock_timeout 1 s)
            await transaction.commit()
            assert await n3.try_acquire() == Lease("n3", lease2.epoch + 1)
        finally:
            await writer.close()
            await n2.close()
            await n3.close()

    asyncio.run(go())


def test_the_kafka_checkpoint_only_goes_up_and_never_past_the_events(pg_url: str) -> None:
    async def go() -> None:
        sink = await PgSink.connect(pg_url, holder="n2")
        try:
            lease = await sink.try_acquire()
            log = FakeLog()
            written = await sink.write(lease, 0, list(session_entries(log, Traders(8), 30)))
            await sink.set_kafka_seq(lease, written.seq - 3)
            await sink.set_kafka_seq(lease, written.seq - 7)  # an older ack: no change
            assert (await sink.checkpoint()).kafka_seq == written.seq - 3
            with pytest.raises(ValueError, match="pass the checkpoint"):
                await sink.set_kafka_seq(lease, written.seq + 1)
            await sink.set_kafka_seq(lease, written.seq)
            assert await sink.checkpoint() == dataclasses.replace(written, kafka_seq=written.seq)
        finally:
            await sink.close()

    asyncio.run(go())


# ---------------------------------------------------------------------------- migrations


def test_migrations_are_versioned_idempotent_and_safe_to_run_at_once(pg_url: str) -> None:
    async def go() -> None:
        sinks = await asyncio.gather(*(PgSink.connect(pg_url, holder=f"n{i}") for i in range(4)))
        for sink in sinks:
            await sink.close()
        known = migrations()
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch(
                "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
            )
            assert [tuple(r) for r in rows] == [(m.version, m.name, m.checksum) for m in known]
            assert await migrate(conn) == []  # nothing left to do
            assert await conn.fetchval("SELECT count(*) FROM indexer_checkpoint") == 1
            assert await conn.fetchval("SELECT count(*) FROM indexer_lease") == 1

            await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
            with pytest.raises(MigrationError, match="never edited"):
                await PgSink.connect(pg_url, holder="n2")
            await conn.execute(
                "UPDATE schema_migrations SET checksum = $1 WHERE version = 1", known[0].checksum
            )
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, 'x', 'x')",
                len(known) + 1,
            )
            with pytest.raises(MigrationError, match="knows up to"):
                await PgSink.connect(pg_url, holder="n2")
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_fresh_database_gets_version_1_first(pg_url: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            assert await migrate(conn) == [m.version for m in migrations()]
            assert migrations()[0].version == 1
        finally:
            await conn.close()

    asyncio.run(go())


# ---------------------------------------------------------------------------- resync


def test_a_resync_rebuilds_the_projections_records_the_gap_and_streaming_goes_on(
    pg_url: str,
) -> None:
    async def go() -> None:
        sink = await PgSink.connect(pg_url, holder="n2")
        conn = await _connect(pg_url)
        try:
            lease = await sink.try_acquire()
            log = FakeLog()
            traders = Traders(21)
            entries = session_entries(log, traders, commands=3000)
            head = [next(entries) for _ in range(400)]
            written = await sink.write(lease, 0, head)
            written_events = list(log.events)
            await sink.set_kafka_seq(lease, written.seq - 10)
            lost = [next(entries) for _ in range(600)]  # the events no replica kept
            ex = log.exchange
            assert lost and ex.seq > written.seq
            skipped_to = ex.seq

            # A snapshot blob, as `quorumbook indexer resync` would fetch it.
            checkpoint = await sink.resync(
                lease, ex.snapshot(), ex.seq, ex.cmd_index, log.raft_index
            )
            assert checkpoint == Checkpoint(ex.seq, ex.cmd_index, log.raft_index, ex.seq, 1)
            assert await sink.checkpoint() == checkpoint
            await assert_projections_match(conn, ex)
            record = await conn.fetchrow("SELECT * FROM indexer_resyncs")
            assert (record["skipped_from_seq"], record["skipped_to_seq"]) == (
                written.seq + 1,
                skipped_to,
            )
            assert (record["from_cmd_index"], record["to_cmd_index"]) == (
                written.cmd_index,
                ex.cmd_index,
            )
            assert record["state_hash"] == ex.state_hash()
            assert record["open_orders"] == len(ex.open_orders())
            # Open orders that left the book in the skipped range are marked, not guessed.
            unknown = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'unknown'")
            assert unknown == record["orders_unknown"] > 0
            # Nothing from the skipped range in events or trades; what came before stays.
            assert await conn.fetchval("SELECT max(seq) FROM events") == written.seq
            await assert_events_and_trades_match(conn, written_events)

            # Streaming goes on from the snapshot's seq.
            rest = list(entries)
            for batch in batches(iter(rest), random.Random(4)):
                checkpoint = await sink.write(lease, checkpoint.seq, batch)
            assert checkpoint.seq == log.exchange.seq
            await assert_projections_match(conn, log.exchange)
            seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM events ORDER BY seq")]
            want = [*range(1, written.seq + 1), *range(skipped_to + 1, log.exchange.seq + 1)]
            assert seqs == want

            # A resync from the state itself, with nothing skipped: a rebuild.
            ex = log.exchange
            rebuilt = await sink.resync(lease, ex.state, ex.seq, ex.cmd_index, log.raft_index)
            assert rebuilt == Checkpoint(ex.seq, ex.cmd_index, log.raft_index, ex.seq, 1)
            await assert_projections_match(conn, ex)
            last = await conn.fetchrow("SELECT * FROM indexer_resyncs ORDER BY id DESC LIMIT 1")
            assert last["skipped_from_seq"] == ex.seq + 1 and last["skipped_to_seq"] == ex.seq

            with pytest.raises(ValueError, match="not"):
                await sink.resync(lease, ex.state, ex.seq + 1, ex.cmd_index, log.raft_index)
            early = Exchange()
            for command in traders.setup():
                early.apply(command)
            with pytest.raises(ValueError, match="cannot go back"):
                await sink.resync(lease, early.snapshot(), early.seq, early.cmd_index, 1)
        finally:
            await conn.close()
            await sink.close()

    asyncio.run(go())


def test_a_resync_request_is_served_once_and_never_after_it_was_withdrawn(pg_url: str) -> None:
    """The operator's request (`quorumbook indexer resync`): served by one resync, in its
    transaction; a withdrawn or expired request authorizes nothing."""

    async def go() -> None:
        sink = await PgSink.connect(pg_url, holder="n2")
        operator = await PgSink.connect(pg_url, holder="operator")
        try:
            lease = await sink.try_acquire()
            log = FakeLog()
            entries = session_entries(log, Traders(5), commands=300)
            for _ in range(50):
                next(entries)
            ex = log.exchange
            assert await sink.pending_resync() is None

            withdrawn = await operator.request_resync(ttl_s=30)
            assert await sink.pending_resync() == withdrawn
            assert await operator.withdraw_resync(withdrawn)
            assert await sink.pending_resync() is None
            with pytest.raises(ValueError, match="withdrawn or expired"):
                await sink.resync(
                    lease, ex.state, ex.seq, ex.cmd_index, log.raft_index, request_id=withdrawn
                )
            assert await sink.checkpoint() == Checkpoint()  # nothing written
            assert await operator.resync_record(withdrawn) is None

            expired = await operator.request_resync(ttl_s=0.2)
            await asyncio.sleep(0.4)
            assert await sink.pending_resync() is None
            with pytest.raises(ValueError, match="withdrawn or expired"):
                await sink.resync(
                    lease, ex.state, ex.seq, ex.cmd_index, log.raft_index, request_id=expired
                )

            served = await operator.request_resync(ttl_s=30)
            assert served > expired > withdrawn
            checkpoint = await sink.resync(
                lease, ex.state, ex.seq, ex.cmd_index, log.raft_index, request_id=served
            )
            assert checkpoint.seq == ex.seq
            assert await sink.pending_resync() is None
            record = await operator.resync_record(served)
            assert record is not None and record["holder"] == "n2"
            assert (record["skipped_from_seq"], record["skipped_to_seq"]) == (1, ex.seq)
            assert not await operator.withdraw_resync(served)  # too late: it was served
            with pytest.raises(ValueError, match="withdrawn or expired"):  # served once only
                await sink.resync(
                    lease, ex.state, ex.seq, ex.cmd_index, log.raft_index, request_id=served
                )
        finally:
            await operator.close()
            await sink.close()

    asyncio.run(go())


def test_a_nul_character_in_an_event_is_stored_as_a_replacement_character(pg_url) -> None:
    """PostgreSQL's jsonb cannot hold U+0000, and a rejected command's `op` (a client's raw
    string) is in its event: one such event must not stop the indexer forever."""
    import asyncio

    from indexer.events import Entry
    from indexer.postgres import PgSink

    rejected = {"type": "rejected", "seq": 1, "ts": 1, "cmd_index": 1, "op": "pl\x00ce",
                "reason": "unknown_op", "message": "unknown op 'pl\\x00ce'",
                "client_order_id": None, "account": None}  # fmt: skip

    async def go() -> str:
        sink = await PgSink.connect(pg_url, holder="n2")
        try:
            lease = await sink.try_acquire()
            assert lease is not None
            await sink.write(lease, 0, [Entry(1, 1, (rejected,))])
            async with sink._pool.acquire() as conn:
                return await conn.fetchval("SELECT body->>'op' FROM events WHERE seq = 1")
        finally:
            await sink.close()

    assert asyncio.run(go()) == "pl\ufffdce"
