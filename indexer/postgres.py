"""The indexer's PostgreSQL side: the schema, the lease, and exactly-once writes of events and
their projections (docs/reference/indexer-postgres.md).

`PgSink` is what a streamer drives. Every write is one transaction that:

1. locks the checkpoint row (FOR UPDATE), then the lease row (FOR SHARE), always in that
   order (no deadlock between writers and lease takers);
2. refuses (`Fenced`, nothing written) unless the lease is the writer's (holder, epoch) and
   unexpired on the database's clock, and the checkpoint is at the `seq` the writer expected;
   and refuses (`ForeignTimeline`) unless the checkpoint follows the writer's cluster (an
   unrecorded one is recorded as the writer's: indexer/timeline.py);
3. inserts the events and applies their effect on the projections (orders, trades, balances,
   markets), computed in Python beforehand as one final row per touched order or balance;
4. moves the checkpoint to the batch's last entry, and commits.

A takeover raises the lease's epoch with an UPDATE of the lease row, which waits for a write
holding it FOR SHARE: a write either commits before the takeover or sees the new epoch and is
fenced. A writer paused inside its transaction holds those locks until the server ends its
session (`idle_in_transaction_session_timeout`, set to the lease's ttl on our connections).
That is also why rows go in as parameters of ordinary statements and not by COPY: a COPY
whose client stalls mid-stream is active, not idle, and `statement_timeout` does not
interrupt it (measured on PostgreSQL 18), so a paused writer would block the takeover for good.

Rows go in set-based: one statement per table per batch, whatever its size, each carrying its
rows as one JSON document; an event batch never reads the projections back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
import orjson

from statemachine import Exchange
from statemachine.state import ExchangeState

from . import adoption
from .events import Checkpoint, Entry, Fenced, ForeignTimeline, Lease
from .timeline import RestorePoint

# pg_advisory_lock key held while migrating (any bigint; this one is ours: "qbindexr").
MIGRATION_LOCK_KEY = 0x7162_696E_6465_7872
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(RuntimeError):
    """The database's schema is not one this code can run on (newer, or a recorded migration
    differs from ours), or our migration files are misnumbered."""


class BatchError(AssertionError):
    """A batch that cannot be right: a bug upstream (a gap or repeat in `seq`, entries out of
    order, a batch that does not follow the checkpoint) or events the projections disagree
    with. Nothing was written."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """indexer/migrations/NNNN_name.sql, in order; versions must run 1, 2, 3... without gaps."""
    found = []
    for item in (resources.files(__package__) / "migrations").iterdir():
        if not item.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.match(item.name)
        if match is None:
            raise MigrationError(f"migration file {item.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), item.name.removesuffix(".sql"), item.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations the database lacks, each in its own transaction, under an advisory
    lock (two processes migrating at once: the second waits, then finds nothing to do).
    Returns the versions applied now."""
    known = migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_SCHEMA_MIGRATIONS)
        recorded = {
            row["version"]: row
            for row in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        }
        for version in sorted(recorded):
            if version > len(known):
                raise MigrationError(
                    f"the database has schema version {version}; this code knows up to "
                    f"{len(known)} (run the newer code, or a copy of the database)"
                )
            ours, theirs = known[version - 1], recorded[version]
            if (theirs["name"], theirs["checksum"]) != (ours.name, ours.checksum):
                raise MigrationError(
                    f"migration {version} in the database ({theirs['name']}) differs from "
                    f"ours ({ours.name}): a migration is never edited once applied; add one"
                )
        applied = []
        for migration in known:
            if migration.version in recorded:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied.append(migration.version)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


# ------------------------------------------------------------------------------ statements

_CHECKPOINT_COLUMNS = "seq, cmd_index, raft_index, kafka_seq, epoch, cluster_id"
_READ_CHECKPOINT = f"SELECT {_CHECKPOINT_COLUMNS} FROM indexer_checkpoint"
_LOCK_CHECKPOINT = _READ_CHECKPOINT + " FOR UPDATE"
_LOCK_LEASE = """
SELECT holder, epoch, expires_at > clock_timestamp() AS live FROM indexer_lease FOR SHARE"""

# One reading of the database's clock per statement (`c.t`), so the WHERE and the SET agree.
_ACQUIRE = """
UPDATE indexer_lease AS l SET
    epoch = CASE WHEN l.holder = $1 AND l.expires_at > c.t THEN l.epoch ELSE l.epoch + 1 END,
    acquired_at = CASE WHEN l.holder = $1 AND l.expires_at > c.t THEN l.acquired_at ELSE c.t END,
    holder = $1,
    expires_at = c.t + make_interval(secs => $2),
    renewed_at = c.t
FROM (SELECT clock_timestamp() AS t) AS c
WHERE l.expires_at <= c.t OR l.holder = $1
RETURNING l.epoch"""
_RENEW = """
UPDATE indexer_lease AS l SET expires_at = c.t + make_interval(secs => $3), renewed_at = c.t
FROM (SELECT clock_timestamp() AS t) AS c
WHERE l.holder = $1 AND l.epoch = $2 AND l.expires_at > c.t
RETURNING l.epoch"""
_RELEASE = "UPDATE indexer_lease SET expires_at = '-infinity' WHERE holder = $1 AND epoch = $2"

_ADVANCE = f"""
UPDATE indexer_checkpoint SET seq = $1, cmd_index = $2, raft_index = $3, epoch = $4,
    kafka_seq = CASE WHEN $5 THEN $1 ELSE kafka_seq END, updated_at = now()
RETURNING {_CHECKPOINT_COLUMNS}"""

# Rows go in as one JSON document per table and statement, the events and projection rows as
# they are (json_to_recordset picks the columns it names, ignores other keys): one encode
# call in Python, one parse on the server. (Arrays per column, unnest()ed, spent a third of
# the write's time in asyncpg's per-element type checks.)
_INSERT_EVENTS = """
INSERT INTO events (seq, cmd_index, ts, type, market, account, order_id, body)
SELECT (e->>'seq')::bigint, (e->>'cmd_index')::bigint, (e->>'ts')::bigint, e->>'type',
    e->>'market', e->>'account', (e->>'order_id')::bigint, e
FROM jsonb_array_elements($1::jsonb) AS e"""
_INSERT_MARKETS = """
INSERT INTO markets (market, base, quote, lot_size, tick_size, maker_fee_bps, taker_fee_bps,
    created_seq)
SELECT * FROM json_to_recordset($1::json) AS m(market text, base text, quote text,
    lot_size bigint, tick_size bigint, maker_fee_bps bigint, taker_fee_bps bigint, seq bigint)"""
_INSERT_TRADES = """
INSERT INTO trades (trade_id, seq, cmd_index, ts, market, price, qty, maker_order_id,
    taker_order_id, maker_account, taker_account, taker_side, maker_fee, taker_fee)
SELECT * FROM json_to_recordset($1::json) AS t(trade_id bigint, seq bigint, cmd_index bigint,
    ts bigint, market text, price bigint, qty bigint, maker_order_id bigint,
    taker_order_id bigint, maker_account text, taker_account text, taker_side text,
    maker_fee bigint, taker_fee bigint)"""
_INSERT_ORDERS = """
INSERT INTO orders (order_id, account, market, side, order_type, price, placed_qty, remaining,
    filled_qty, status, cancel_reason, client_order_id, tif, stp, created_seq, created_ts,
    updated_seq, updated_ts)
SELECT * FROM json_to_recordset($1::json) AS o(order_id bigint, account text, market text,
    side text, order_type text, price bigint, placed_qty bigint, remaining bigint,
    filled_qty bigint, status text, cancel_reason text, client_order_id text, tif text,
    stp text, created_seq bigint, created_ts bigint, updated_seq bigint, updated_ts bigint)"""
# An order accepted before the batch: only an open one changes, and when the batch knows what
# its remaining must have been (a cancel or fill after only trades), that is checked too.
_UPDATE_ORDERS = """
UPDATE orders AS o SET
    price = COALESCE(d.price, o.price),
    remaining = COALESCE(d.remaining, o.remaining - d.traded),
    filled_qty = o.filled_qty + d.traded,
    status = COALESCE(d.status, o.status),
    cancel_reason = COALESCE(d.cancel_reason, o.cancel_reason),
    updated_seq = d.updated_seq,
    updated_ts = d.updated_ts
FROM json_to_recordset($1::json) AS d(order_id bigint, price bigint, remaining bigint,
    traded bigint, status text, cancel_reason text, updated_seq bigint, updated_ts bigint,
    remaining_before bigint)
WHERE o.order_id = d.order_id AND o.status = 'open'
    AND (d.remaining_before IS NULL OR o.remaining = d.remaining_before)"""
_BALANCE_ROWS = """json_to_recordset($1::json) AS b(account text, asset text, available bigint,
    reserved bigint, seq bigint, ts bigint)"""
_UPSERT_BALANCES = f"""
INSERT INTO balances (account, asset, available, reserved, updated_seq, updated_ts)
SELECT * FROM {_BALANCE_ROWS}
ON CONFLICT (account, asset) DO UPDATE SET
    available = EXCLUDED.available, reserved = EXCLUDED.reserved,
    updated_seq = EXCLUDED.updated_seq, updated_ts = EXCLUDED.updated_ts"""

# Resync: open orders and balances as a snapshot has them (`Exchange.open_orders()` and
# `balances()` rows), stamped with the snapshot's seq and ts ($2, $3); rows it leaves as they
# were keep their updated_seq.
_SNAPSHOT_ORDERS = """json_to_recordset($1::json) AS s(order_id bigint, account text,
    market text, side text, price bigint, remaining bigint, filled bigint,
    client_order_id text, tif text, stp text)"""
_RESYNC_LOST_ORDERS = f"""
UPDATE orders SET status = 'unknown', updated_seq = $2, updated_ts = $3
WHERE status = 'open' AND order_id NOT IN (SELECT order_id FROM {_SNAPSHOT_ORDERS})"""
_RESYNC_ORDERS = f"""
INSERT INTO orders (order_id, account, market, side, order_type, price, remaining,
    filled_qty, status, client_order_id, tif, stp, updated_seq, updated_ts)
SELECT order_id, account, market, side, 'limit', price, remaining, filled, 'open',
    client_order_id, tif, stp, $2, $3
FROM {_SNAPSHOT_ORDERS}
ON CONFLICT (order_id) DO UPDATE SET
    price = EXCLUDED.price, remaining = EXCLUDED.remaining, filled_qty = EXCLUDED.filled_qty,
    status = 'open', cancel_reason = NULL,
    updated_seq = EXCLUDED.updated_seq, updated_ts = EXCLUDED.updated_ts
WHERE (orders.price, orders.remaining, orders.filled_qty, orders.status)
    IS DISTINCT FROM (EXCLUDED.price, EXCLUDED.remaining, EXCLUDED.filled_qty, 'open')"""
_RESYNC_ZERO_BALANCES = f"""
UPDATE balances SET available = 0, reserved = 0, updated_seq = $2, updated_ts = $3
WHERE (available <> 0 OR reserved <> 0)
    AND (account, asset) NOT IN (SELECT account, asset FROM {_BALANCE_ROWS})"""
_RESYNC_BALANCES = f"""
INSERT INTO balances (account, asset, available, reserved, updated_seq, updated_ts)
SELECT * FROM {_BALANCE_ROWS}
ON CONFLICT (account, asset) DO UPDATE SET
    available = EXCLUDED.available, reserved = EXCLUDED.reserved,
    updated_seq = EXCLUDED.updated_seq, updated_ts = EXCLUDED.updated_ts
WHERE (balances.available, balances.reserved)
    IS DISTINCT FROM (EXCLUDED.available, EXCLUDED.reserved)"""
_RESYNC_MARKETS = _INSERT_MARKETS + " ON CONFLICT (market) DO NOTHING"
_RECORD_RESYNC = """
INSERT INTO indexer_resyncs (holder, epoch, skipped_from_seq, skipped_to_seq, from_cmd_index,
    to_cmd_index, to_raft_index, state_hash, open_orders, balances, orders_unknown, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"""
_REQUEST_RESYNC = """
UPDATE indexer_resync_request SET id = id + 1, requested_by = $1, requested_at = now(),
    expires_at = now() + make_interval(secs => $2)
RETURNING id"""
_PENDING_RESYNC = """
SELECT id FROM indexer_resync_request WHERE id > done_id AND expires_at > now()"""
_SERVE_RESYNC = """
UPDATE indexer_resync_request SET done_id = $1 WHERE id = $1 AND done_id < $1
    AND expires_at > now()
RETURNING id"""
_WITHDRAW_RESYNC = """
UPDATE indexer_resync_request SET done_id = $1 WHERE id = $1 AND done_id < $1 RETURNING id"""
_RESYNC_CHECKPOINT = f"""
UPDATE indexer_checkpoint SET seq = $1, cmd_index = $2, raft_index = $3, kafka_seq = $1,
    epoch = $4, updated_at = now()
RETURNING {_CHECKPOINT_COLUMNS}"""
# A fresh database (nothing written, no cluster recorded) takes the first indexer's cluster.
_CLAIM_FRESH = f"""
UPDATE indexer_checkpoint SET cluster_id = $1, updated_at = now()
WHERE cluster_id = '' AND seq = 0
RETURNING {_CHECKPOINT_COLUMNS}"""


# ------------------------------------------------------------------------------ the sink


class PgSink:
    """One streamer's connection to PostgreSQL (a pool of two: a write and a lease renewal may
    run at once). `holder` names the node in the lease; `cluster_id` its cluster ("": not
    configured), the only history it writes."""

    def __init__(
        self, pool: asyncpg.Pool, holder: str, lease_ttl_s: float, cluster_id: str = ""
    ) -> None:
        self._pool = pool
        self.holder = holder
        self.lease_ttl_s = lease_ttl_s
        self.cluster_id = cluster_id

    @classmethod
    async def connect(
        cls, url: str, *, holder: str, lease_ttl_s: float = 3.0, cluster_id: str | None = None
    ) -> PgSink:
        """Connect and bring the schema up to date (migrations are idempotent)."""
        if not holder:
            raise ValueError("a lease holder needs a name")
        if not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be > 0, not {lease_ttl_s}")
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        # A session paused inside a transaction (SIGSTOP, a partition) holds the lease row and
        # the checkpoint; the server ends it after the lease's ttl so a takeover can proceed.
        # Lock waits are bounded the same way (a takeover blocked by such a session gives up
        # and tries again).
        timeout_ms = str(max(1000, round(lease_ttl_s * 1000)))
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=2,
            init=_init_connection,
            reset=_reset_connection,
            server_settings={
                "application_name": f"quorumbook-indexer {holder}"[:63],
                "idle_in_transaction_session_timeout": timeout_ms,
                "lock_timeout": timeout_ms,
                # Every commit durable before the next batch: a downstream reader never sees
                # rows that a crash of the database would take back (the streamer would write
                # them again, but someone may have acted on them meanwhile).
                "synchronous_commit": "on",
            },
        )
        return cls(pool, holder, lease_ttl_s, cluster_id or "")

    async def close(self) -> None:
        await self._pool.close()

    async def checkpoint(self) -> Checkpoint:
        return Checkpoint(*await self._pool.fetchrow(_READ_CHECKPOINT))

    async def claim_fresh(self) -> Checkpoint:
        """Record our cluster in a fresh database (nothing written, no cluster recorded: any
        history agrees with an empty one); the checkpoint as it is now either way."""
        if self.cluster_id:
            row = await self._pool.fetchrow(_CLAIM_FRESH, self.cluster_id)
            if row is not None:
                return Checkpoint(*row)
        return await self.checkpoint()

    # ------------------------------------------------------------------ the lease

    async def try_acquire(self) -> Lease | None:
        """Take the lease if it is free or expired (a new epoch), or renew it if we hold it
        (the same epoch). None: another holds it, or a write in flight holds its row."""
        try:
            epoch = await self._pool.fetchval(_ACQUIRE, self.holder, float(self.lease_ttl_s))
        except asyncpg.LockNotAvailableError:
            return None
        return None if epoch is None else Lease(self.holder, epoch)

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by its ttl from now. False: it expired or was taken over (the
        holder must stop writing; `try_acquire` may give it a new epoch)."""
        epoch = await self._pool.fetchval(
            _RENEW, lease.holder, lease.epoch, float(self.lease_ttl_s)
        )
        return epoch is not None

    async def release(self, lease: Lease) -> None:
        """Give the lease up at once (another may take it without waiting for the expiry)."""
        await self._pool.execute(_RELEASE, lease.holder, lease.epoch)

    # ------------------------------------------------------------------ writes

    async def write(
        self, lease: Lease, expected_seq: int, entries: list[Entry], *, published: bool = False
    ) -> Checkpoint:
        """Write whole log entries, the first event of which is `expected_seq + 1`, and their
        effect on the projections, and move the checkpoint to the last entry: all or nothing.
        `published`: Kafka acknowledged these entries already (the streamer publishes first),
        so `kafka_seq` moves with `seq` in the same statement.
        Raises `Fenced` (nothing written) if the lease is not ours or the checkpoint is not at
        `expected_seq`; `BatchError` (nothing written) for a batch that cannot be right."""
        batch = _Batch(entries, expected_seq)
        async with self._pool.acquire() as conn, conn.transaction():
            before = await _fence(conn, lease, self.cluster_id)
            if before.seq != expected_seq:
                raise Fenced(
                    f"the checkpoint is at seq {before.seq}, not {expected_seq}: "
                    "another writer moved it"
                )
            if not entries:
                return before
            batch.check_follows(before)
            await batch.apply(conn)
            row = await conn.fetchrow(
                _ADVANCE,
                batch.last_seq,
                batch.last_cmd_index,
                batch.last_raft_index,
                lease.epoch,
                published,
            )
        return Checkpoint(*row)

    async def set_kafka_seq(self, lease: Lease, seq: int) -> None:
        """Record that Kafka acknowledged every event up to `seq` (<= the checkpoint's seq). It
        only goes up: a lower `seq` changes nothing. Fenced like `write`."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await _fence(conn, lease, self.cluster_id)
            if seq > before.seq:
                raise ValueError(f"kafka_seq {seq} would pass the checkpoint's seq {before.seq}")
            if seq > before.kafka_seq:
                await conn.execute("UPDATE indexer_checkpoint SET kafka_seq = $1", seq)

    # ------------------------------------------------------------------ resync requests

    async def request_resync(self, ttl_s: float) -> int:
        """An operator's request for a resync, void after `ttl_s` unless served (a newer one
        replaces it). Returns its id, for `withdraw_resync` and `resync_record`."""
        return await self._pool.fetchval(_REQUEST_RESYNC, self.holder, float(ttl_s))

    async def pending_resync(self) -> int | None:
        """The id of a request nobody served yet, if one is live."""
        return await self._pool.fetchval(_PENDING_RESYNC)

    async def withdraw_resync(self, request_id: int) -> bool:
        """Void a request nobody served. False: it was served (see `resync_record`) or a
        newer request replaced it."""
        return await self._pool.fetchval(_WITHDRAW_RESYNC, request_id) is not None

    async def resync_record(self, request_id: int) -> dict | None:
        """The indexer_resyncs row of the resync that served `request_id`, once there is one."""
        row = await self._pool.fetchrow(
            "SELECT * FROM indexer_resyncs WHERE request_id = $1", request_id
        )
        return None if row is None else dict(row)

    async def resync(
        self,
        lease: Lease,
        state: ExchangeState | Exchange | bytes,
        seq: int,
        cmd_index: int,
        raft_index: int,
        *,
        request_id: int | None = None,
    ) -> Checkpoint:
        """Rebuild the open orders, balances and markets from a state machine snapshot (a blob
        from `Exchange.snapshot()`, or the state) taken at `seq` / `cmd_index` (which the
        state must agree with) of log entry `raft_index`, and move the checkpoint there
        (kafka_seq too). The events from the old checkpoint to `seq` are skipped: recorded in
        indexer_resyncs, never in events or trades. Open orders that are not in the snapshot
        left the book in that range: their status becomes 'unknown'. Fenced like `write`.
        With `request_id`, it serves that operator's request, in the same transaction; a
        request withdrawn or void meanwhile refuses it (ValueError, nothing written)."""
        exchange = _exchange_of(state)
        if (exchange.seq, exchange.cmd_index) != (seq, cmd_index):
            raise ValueError(
                f"the snapshot is at seq {exchange.seq}, cmd_index {exchange.cmd_index}, "
                f"not {seq}, {cmd_index}"
            )
        ts = exchange.last_ts
        orders = exchange.open_orders()
        balances = [
            {"account": account, "asset": asset, "available": available, "reserved": reserved,
             "seq": seq, "ts": ts}
            for (account, asset), (available, reserved) in exchange.balances().items()
        ]  # fmt: skip
        state_hash = exchange.state_hash()
        async with self._pool.acquire() as conn, conn.transaction():
            # An operator's command: when it says done, it is on disk.
            await conn.execute("SET LOCAL synchronous_commit = on")
            before = await _fence(conn, lease, self.cluster_id)
            if seq < before.seq:
                raise ValueError(
                    f"a resync cannot go back: the checkpoint is at seq {before.seq}, "
                    f"the snapshot at {seq}"
                )
            if request_id is not None and await conn.fetchval(_SERVE_RESYNC, request_id) is None:
                raise ValueError(f"resync request {request_id} was withdrawn or expired")
            unknown = _count(await conn.execute(_RESYNC_LOST_ORDERS, orders, seq, ts))
            await conn.execute(_RESYNC_ORDERS, orders, seq, ts)
            await conn.execute(_RESYNC_ZERO_BALANCES, balances, seq, ts)
            await conn.execute(_RESYNC_BALANCES, balances)
            await conn.execute(_RESYNC_MARKETS, exchange.markets())
            await conn.execute(
                _RECORD_RESYNC, lease.holder, lease.epoch, before.seq + 1, seq,
                before.cmd_index, cmd_index, raft_index, state_hash, len(orders),
                len(balances), unknown, request_id,
            )  # fmt: skip
            row = await conn.fetchrow(_RESYNC_CHECKPOINT, seq, cmd_index, raft_index, lease.epoch)
        return Checkpoint(*row)

    # ------------------------------------------------------------------ restores

    async def adopt(self, point: RestorePoint, *, dry_run: bool = False) -> dict:
        """Move the database to a restored cluster's history (indexer/adoption.py), all or
        nothing; with `dry_run`, do it and roll it back. Returns the indexer_adoptions row
        (`dry_run` added). Raises adoption.AdoptError (nothing changed) when it cannot be
        done without mixing the two histories."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # An operator's command: when it says done, it is on disk.
                await conn.execute("SET LOCAL synchronous_commit = on")
                before = Checkpoint(*await conn.fetchrow(_LOCK_CHECKPOINT))
                record = await adoption.adopt(conn, before, point)
                if dry_run:
                    raise _RolledBack(record)
        except _RolledBack as done:
            return {**done.record, "dry_run": True}
        return {**record, "dry_run": False}


class _RolledBack(Exception):
    def __init__(self, record: dict) -> None:
        super().__init__("a dry run")
        self.record = record


async def _init_connection(conn: asyncpg.Connection) -> None:
    """json and jsonb parameters are Python values, encoded by orjson (dataclasses too)."""
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, schema="pg_catalog", encoder=_json, decoder=orjson.loads)


def _json(value: object) -> str:
    text = orjson.dumps(value).decode()
    if "\\u0000" in text:
        # PostgreSQL's json/jsonb cannot hold U+0000 (a client can put one in a rejected
        # command's `op`, which the event repeats): it becomes U+FFFD here, and only here
        # (Kafka carries the event as it is). An escaped backslash before "u0000" is text.
        text = _NUL_ESCAPE.sub(r"\1\\ufffd", text)
    return text


_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Nothing: asyncpg rolls back an open transaction before calling this, and we create no
    other session state (its default reset costs a round trip per pool use)."""


async def _fence(conn: asyncpg.Connection, lease: Lease, cluster_id: str) -> Checkpoint:
    """Lock the checkpoint, then the lease (this order, always), and check the lease is
    `lease`, unexpired, and the checkpoint follows `cluster_id`'s history. Returns the
    checkpoint; raises Fenced or ForeignTimeline.

    A checkpoint with no cluster recorded (a database an older indexer wrote) is recorded as
    ours here, in the write's transaction: a streamer writes only after its replica reproduced
    the checkpoint (the same `seq` at the same log index), the best evidence there is that the
    rows are of its history (indexer/timeline.py)."""
    checkpoint = Checkpoint(*await conn.fetchrow(_LOCK_CHECKPOINT))
    if checkpoint.cluster_id != cluster_id:
        if checkpoint.cluster_id or not cluster_id:
            raise ForeignTimeline(checkpoint.cluster_id, cluster_id, checkpoint)
        await conn.execute("UPDATE indexer_checkpoint SET cluster_id = $1", cluster_id)
        checkpoint = dataclasses.replace(checkpoint, cluster_id=cluster_id)
    holder, epoch, live = await conn.fetchrow(_LOCK_LEASE)
    if (holder, epoch) != (lease.holder, lease.epoch):
        raise Fenced(
            f"the lease is {holder!r}'s in epoch {epoch}, not {lease.holder!r}'s in {lease.epoch}"
        )
    if not live:
        raise Fenced(f"the lease of {lease.holder!r} in epoch {lease.epoch} expired")
    return checkpoint


def _exchange_of(state: ExchangeState | Exchange | bytes) -> Exchange:
    if isinstance(state, Exchange):
        return state
    if isinstance(state, ExchangeState):
        return Exchange(state)
    if isinstance(state, bytes | bytearray | memoryview):
        return Exchange.restore(bytes(state))
    raise TypeError(f"a snapshot blob or an ExchangeState, not {type(state).__name__}")


def _count(status: str) -> int:
    """The row count of a command status ("UPDATE 3", "INSERT 0 3")."""
    return int(status.rsplit(" ", 1)[1])


# ------------------------------------------------------------------------------ projections


@dataclass(slots=True)
class _Order:
    """An order accepted in this batch: its whole row as of the batch's end (the field names
    are the columns'; orjson encodes it as one object of the batch's JSON document)."""

    order_id: int
    account: str
    market: str
    side: str
    order_type: str
    price: int | None
    placed_qty: int
    remaining: int
    filled_qty: int
    status: str
    cancel_reason: str | None
    client_order_id: str | None
    tif: str
    stp: str
    created_seq: int
    created_ts: int
    updated_seq: int
    updated_ts: int

    @classmethod
    def accepted(cls, e: dict) -> _Order:
        qty, seq, ts = e["qty"], e["seq"], e["ts"]
        return cls(
            e["order_id"], e["account"], e["market"], e["side"], e["order_type"], e["price"],
            qty, qty, 0, "open", None, e["client_order_id"], e["tif"], e["stp"], seq, ts, seq,
            ts,
        )  # fmt: skip


@dataclass(slots=True)
class _Change:
    """What the batch does to an order accepted before it. `remaining` is None while only
    trades (deltas) touched it; an amend, cancel or fill sets it. `remaining_before` is what
    the row's remaining must be (known when a cancel or fill follows only trades)."""

    order_id: int
    price: int | None = None
    remaining: int | None = None
    traded: int = 0
    status: str | None = None
    cancel_reason: str | None = None
    updated_seq: int = 0
    updated_ts: int = 0
    remaining_before: int | None = None


class _Batch:
    """Entries checked for order and gaps, and the rows they write: every event, and the final
    state of each market, trade, order and balance they touch. Pure: no I/O."""

    def __init__(self, entries: list[Entry], expected_seq: int) -> None:
        self.events = events = _checked_events(entries, expected_seq)
        self.first_raft_index = entries[0].raft_index if entries else 0
        self.last_raft_index = entries[-1].raft_index if entries else 0
        self.last_cmd_index = entries[-1].cmd_index if entries else 0
        self.last_seq = expected_seq + len(events)
        # The checkpoint's cmd_index this batch must follow.
        if not entries:
            self.start_cmd_index = 0
        elif entries[0].events:
            self.start_cmd_index = entries[0].events[0]["cmd_index"] - 1
        else:
            self.start_cmd_index = entries[0].cmd_index
        self.markets: list[dict] = []  # market_created events
        self.trades: list[dict] = []  # trade events
        self.new_orders: dict[int, _Order] = {}
        self.changes: dict[int, _Change] = {}
        self.balances: dict[tuple[str, str], dict] = {}  # the last balance event of each
        self._project()

    def check_follows(self, checkpoint: Checkpoint) -> None:
        if self.start_cmd_index != checkpoint.cmd_index:
            raise BatchError(
                f"the batch starts after cmd_index {self.start_cmd_index}, the checkpoint is "
                f"at {checkpoint.cmd_index}"
            )
        if self.first_raft_index <= checkpoint.raft_index:
            raise BatchError(
                f"the batch starts at raft_index {self.first_raft_index}, not after the "
                f"checkpoint's {checkpoint.raft_index}"
            )

    def _project(self) -> None:
        new_orders = self.new_orders
        balances = self.balances
        for e in self.events:
            kind = e["type"]
            if kind == "book" or kind == "rejected":
                continue  # in the events table only
            if kind == "balance":
                balances[(e["account"], e["asset"])] = e
            elif kind == "trade":
                self.trades.append(e)
                qty = e["qty"]
                for order_id in (e["maker_order_id"], e["taker_order_id"]):
                    order = new_orders.get(order_id)
                    if order is not None:
                        _check_open(order.status, e)
                        order.remaining -= qty
                        order.filled_qty += qty
                        if order.remaining < 0:
                            raise BatchError(f"order {order_id} overfilled at seq {e['seq']}")
                        order.updated_seq = e["seq"]
                        order.updated_ts = e["ts"]
                    else:
                        change = self._change(order_id, e)
                        change.traded += qty
                        if change.remaining is not None:
                            change.remaining -= qty
                            if change.remaining < 0:
                                raise BatchError(f"order {order_id} overfilled at seq {e['seq']}")
            elif kind == "accepted":
                order_id = e["order_id"]
                if order_id in new_orders or order_id in self.changes:
                    raise BatchError(f"order {order_id} accepted again at seq {e['seq']}")
                new_orders[order_id] = _Order.accepted(e)
            elif kind == "cancelled" or kind == "filled":
                self._end(e, kind)
            elif kind == "amended":
                order_id = e["order_id"]
                order = new_orders.get(order_id)
                if order is not None:
                    _check_open(order.status, e)
                    order.price = e["price"]
                    order.remaining = e["qty"]
                    order.updated_seq = e["seq"]
                    order.updated_ts = e["ts"]
                else:
                    change = self._change(order_id, e)
                    change.price = e["price"]
                    change.remaining = e["qty"]
            elif kind == "market_created":
                self.markets.append(e)
            else:
                raise BatchError(f"unknown event type {kind!r} at seq {e['seq']}")

    def _end(self, e: dict, kind: str) -> None:
        """A cancelled or filled event: the order's last."""
        status = "cancelled" if kind == "cancelled" else "filled"
        remaining = e["remaining"] if kind == "cancelled" else 0
        order_id = e["order_id"]
        order = self.new_orders.get(order_id)
        if order is not None:
            _check_open(order.status, e)
            known = order.remaining
        else:
            change = self._change(order_id, e)
            known = change.remaining
            if known is None:
                change.remaining_before = remaining + change.traded
        if known is not None and known != remaining:
            raise BatchError(
                f"order {order_id} has {known} remaining by the events, {remaining} by the "
                f"{kind} event at seq {e['seq']}"
            )
        row = order if order is not None else change
        row.remaining = remaining
        row.status = status
        row.cancel_reason = e.get("reason")
        row.updated_seq = e["seq"]
        row.updated_ts = e["ts"]

    def _change(self, order_id: int, e: dict) -> _Change:
        change = self.changes.get(order_id)
        if change is None:
            change = self.changes[order_id] = _Change(order_id)
        else:
            _check_open(change.status, e)
        change.updated_seq = e["seq"]
        change.updated_ts = e["ts"]
        return change

    async def apply(self, conn: asyncpg.Connection) -> None:
        if self.events:
            await conn.execute(_INSERT_EVENTS, self.events)
        if self.markets:
            await conn.execute(_INSERT_MARKETS, self.markets)
        if self.trades:
            await conn.execute(_INSERT_TRADES, self.trades)
        if self.new_orders:
            await conn.execute(_INSERT_ORDERS, list(self.new_orders.values()))
        if self.changes:
            changes = list(self.changes.values())
            updated = _count(await conn.execute(_UPDATE_ORDERS, changes))
            if updated != len(changes):
                raise BatchError(await _explain_changes(conn, changes))
        if self.balances:
            await conn.execute(_UPSERT_BALANCES, list(self.balances.values()))


def _check_open(status: str | None, e: dict) -> None:
    if status is not None and status != "open":
        raise BatchError(f"an event for a {status} order at seq {e['seq']}")


def _checked_events(entries: list[Entry], expected_seq: int) -> list[dict]:
    """All the entries' events, after checking that they run on from `expected_seq` without a
    gap or a repeat, that entries go up in raft_index, and that each entry's cmd_index is that
    of its last command (every command yields at least one event)."""
    events: list[dict] = []
    seq = expected_seq
    raft_index = cmd_index = None
    for entry in entries:
        if raft_index is not None and entry.raft_index <= raft_index:
            raise BatchError(f"raft_index {entry.raft_index} after {raft_index}")
        raft_index = entry.raft_index
        first = True  # an entry starts with a new command; its next events may share one
        for e in entry.events:
            seq += 1
            if e["seq"] != seq:
                raise BatchError(
                    f"event seq {e['seq']} where {seq} was due (a gap or a repeat upstream)"
                )
            steps = (1,) if first else (0, 1)
            if cmd_index is not None and e["cmd_index"] - cmd_index not in steps:
                raise BatchError(f"cmd_index {e['cmd_index']} after {cmd_index} at seq {seq}")
            cmd_index = e["cmd_index"]
            first = False
        if cmd_index is not None and entry.cmd_index != cmd_index:
            raise BatchError(
                f"entry {entry.raft_index} says cmd_index {entry.cmd_index}, its events {cmd_index}"
            )
        cmd_index = entry.cmd_index
        events.extend(entry.events)
    return events


async def _explain_changes(conn: asyncpg.Connection, changes: list[_Change]) -> str:
    """Why the UPDATE of earlier orders missed some: the first order that was not open or
    whose remaining differed from what the events imply."""
    found = {
        r["order_id"]: r
        for r in await conn.fetch(
            "SELECT order_id, status, remaining FROM orders WHERE order_id = ANY($1::bigint[])",
            [change.order_id for change in changes],
        )
    }
    for change in changes:
        row, order_id, seq = found.get(change.order_id), change.order_id, change.updated_seq
        if row is None:
            return f"an event at seq {seq} names order {order_id}, which is not indexed"
        if row["status"] != "open":
            return f"an event at seq {seq} changes order {order_id}, {row['status']}"
        if change.remaining_before is not None and row["remaining"] != change.remaining_before:
            return (
                f"order {order_id} has {row['remaining']} remaining indexed, the events up to "
                f"seq {seq} imply {change.remaining_before}"
            )
    return "the orders an event batch changes do not match the indexed ones"
