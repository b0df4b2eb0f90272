"""`quorumbook indexer adopt`: move an indexer database to a restored cluster's history
(ADR 0007 "Restores"; docs/operating/indexer.md "After a restore").

The restored cluster's history equals the old one up to the restore point (event `seq` S,
command C) and differs after it. In one transaction, under the checkpoint's lock (so no
write of either cluster is in flight, and every later one sees the outcome):

1. the database must follow the cluster the restore came from, and hold S as the last event of
   command C (or be at or before S);
2. the old history past S leaves the live tables for the *_orphaned ones, tagged with the old
   cluster id and this adoption: events and trades after S, orders accepted after S, markets
   created after S;
3. orders and balances that changed after S go back to their state at S, computed from the
   events up to S (the old rows are kept in orders_orphaned / balances_orphaned): an order
   changed after S was open at S and is replayed from its `accepted` event; a balance takes
   its last `balance` event up to S, or goes if it had none;
4. the checkpoint is set to S (log index of the new cluster's), Kafka's to S, the cluster id to
   the new one; the lease's epoch goes up (any old writer is fenced on that too) and a pending
   resync request is void.

When the events cannot say what a row was at S (a resync skipped events before S and rebuilt
rows from a snapshot instead) it refuses, changing nothing: the way out is a fresh database.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .events import Checkpoint
from .timeline import RestorePoint


class AdoptError(RuntimeError):
    """An adoption refused, said in one line; nothing was changed."""


FRESH_DATABASE = (
    "point the restored cluster's [indexer] postgres_url at a fresh database instead "
    '(docs/operating/indexer.md "After a restore")'
)

_RECORD = """
INSERT INTO indexer_adoptions (from_cluster_id, to_cluster_id, at_seq, at_cmd_index,
    at_raft_index, checkpoint_seq, checkpoint_cmd_index, checkpoint_raft_index, kafka_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id"""
_COUNTS = """
UPDATE indexer_adoptions SET events_orphaned = $2, trades_orphaned = $3, orders_orphaned = $4,
    orders_rolled_back = $5, balances_rolled_back = $6, balances_orphaned = $7,
    markets_orphaned = $8, resyncs_orphaned = $9
WHERE id = $1"""
_SET_CHECKPOINT = """
UPDATE indexer_checkpoint SET seq = $1, cmd_index = $2, raft_index = $3,
    kafka_seq = LEAST(kafka_seq, $1), cluster_id = $4, updated_at = now()"""
# Whoever holds the lease loses it: a write in flight of the old history is fenced by the
# epoch as well as by the cluster id; a pending resync request was about the old history.
_FENCE_EVERYONE = "UPDATE indexer_lease SET epoch = epoch + 1, expires_at = '-infinity'"
_VOID_RESYNC_REQUEST = "UPDATE indexer_resync_request SET done_id = id"

# $1 adoption id, $2 the restore point's seq, $3 the old cluster id.
_ORPHAN_EVENTS = """
WITH moved AS (DELETE FROM events WHERE seq > $2 RETURNING *)
INSERT INTO events_orphaned SELECT $1, $3, moved.* FROM moved"""
_ORPHAN_TRADES = """
WITH moved AS (DELETE FROM trades WHERE seq > $2 RETURNING *)
INSERT INTO trades_orphaned SELECT $1, $3, moved.* FROM moved"""
# $4: rows with no creating event (a resync's, from its snapshot) are of a resync after S.
_ORPHAN_ORDERS = """
WITH moved AS (
    DELETE FROM orders
    WHERE created_seq > $2 OR (created_seq IS NULL AND updated_seq > $2 AND $4)
    RETURNING *)
INSERT INTO orders_orphaned SELECT $1, $3, moved.* FROM moved"""
_ORPHAN_MARKETS = """
WITH moved AS (
    DELETE FROM markets WHERE created_seq > $2 OR (created_seq IS NULL AND $4) RETURNING *)
INSERT INTO markets_orphaned SELECT $1, $3, moved.* FROM moved"""
_KEEP_OLD_ORDERS = """
INSERT INTO orders_orphaned SELECT $1, $3, o.* FROM orders o WHERE o.updated_seq > $2"""
_KEEP_OLD_BALANCES = """
INSERT INTO balances_orphaned SELECT $1, $3, b.* FROM balances b WHERE b.updated_seq > $2"""
_ORPHAN_RESYNCS = """
UPDATE indexer_resyncs SET orphaned_by = $1 WHERE skipped_to_seq > $2 AND orphaned_by IS NULL"""

_ORDER_EVENTS = """
SELECT order_id, seq, ts, type, body FROM events
WHERE order_id = ANY($1::bigint[]) AND seq <= $2 AND type <> 'rejected'"""
_ORDER_TRADES = """
SELECT seq, ts, qty, maker_order_id, taker_order_id FROM trades
WHERE (maker_order_id = ANY($1::bigint[]) OR taker_order_id = ANY($1::bigint[])) AND seq <= $2"""
_ROLL_BACK_ORDERS = """
UPDATE orders AS o SET price = d.price, remaining = d.remaining, filled_qty = d.filled_qty,
    status = 'open', cancel_reason = NULL, updated_seq = d.updated_seq, updated_ts = d.updated_ts
FROM json_to_recordset($1::json) AS d(order_id bigint, price bigint, remaining bigint,
    filled_qty bigint, updated_seq bigint, updated_ts bigint)
WHERE o.order_id = d.order_id"""
# Each balance's last event up to S, found backwards along (account, seq).
_LAST_BALANCE_EVENTS = """
SELECT k.account, k.asset, e.seq, e.ts, e.body
FROM json_to_recordset($1::json) AS k(account text, asset text)
LEFT JOIN LATERAL (
    SELECT seq, ts, body FROM events
    WHERE account = k.account AND type = 'balance' AND body->>'asset' = k.asset AND seq <= $2
    ORDER BY seq DESC LIMIT 1) AS e ON true"""
_ROLL_BACK_BALANCES = """
UPDATE balances AS b SET available = d.available, reserved = d.reserved,
    updated_seq = d.seq, updated_ts = d.ts
FROM json_to_recordset($1::json) AS d(account text, asset text, available bigint,
    reserved bigint, seq bigint, ts bigint)
WHERE b.account = d.account AND b.asset = d.asset"""
_DROP_BALANCES = """
DELETE FROM balances WHERE (account, asset) IN (
    SELECT account, asset FROM json_to_recordset($1::json) AS k(account text, asset text))"""


async def adopt(conn: asyncpg.Connection, before: Checkpoint, point: RestorePoint) -> dict:
    """Move the database to `point.cluster_id`'s history, in the caller's transaction, with
    the checkpoint (`before`) locked FOR UPDATE. Returns the indexer_adoptions row."""
    new, old = point.cluster_id, point.from_cluster_id
    if before.cluster_id == new:
        raise AdoptError(
            f"the database follows cluster {new} already (checkpoint at seq {before.seq}): "
            "nothing to do"
        )
    if before.cluster_id != old:
        hint = (
            f" (none is recorded: an older indexer wrote it; if you know it was {old}'s, "
            "give --from-cluster-id '')"
            if not before.cluster_id
            else ""
        )
        raise AdoptError(
            f"the database follows cluster {before.cluster_id or '(none recorded)'}, not "
            f"{old or '(none)'}, which {new} was restored from{hint}: its rows are not the "
            f"history {new} continues; {FRESH_DATABASE}"
        )
    adoption = await conn.fetchval(
        _RECORD, old, new, point.seq, point.cmd_index, point.raft_index, before.seq,
        before.cmd_index, before.raft_index, before.kafka_seq,
    )  # fmt: skip
    counts = [0] * 8
    if before.seq > point.seq:
        counts = await _roll_back(conn, adoption, point)
        checkpoint = (point.seq, point.cmd_index, point.raft_index)
    elif before.seq == point.seq:
        if before.cmd_index != point.cmd_index:
            raise AdoptError(
                f"the checkpoint is at seq {before.seq} of cmd_index {before.cmd_index}, the "
                f"restore point at seq {point.seq} of cmd_index {point.cmd_index}: not one "
                f"history; {FRESH_DATABASE}"
            )
        checkpoint = (point.seq, point.cmd_index, point.raft_index)
    else:
        if before.cmd_index > point.cmd_index:
            raise AdoptError(
                f"the checkpoint (seq {before.seq}, cmd_index {before.cmd_index}) and the "
                f"restore point (seq {point.seq}, cmd_index {point.cmd_index}) cannot be of "
                f"one history; {FRESH_DATABASE}"
            )
        # Behind the restore point: the rows are a prefix of the new history already. The
        # new cluster's log starts at S (its snapshot), so its indexer will report the events
        # up to S gone; the runbook's resync skips them.
        checkpoint = (before.seq, before.cmd_index, before.raft_index)
    await conn.execute(_SET_CHECKPOINT, *checkpoint, new)
    await conn.execute(_FENCE_EVERYONE)
    await conn.execute(_VOID_RESYNC_REQUEST)
    await conn.execute(_COUNTS, adoption, *counts)
    return dict(await conn.fetchrow("SELECT * FROM indexer_adoptions WHERE id = $1", adoption))


async def _roll_back(conn: asyncpg.Connection, adoption: int, point: RestorePoint) -> list[int]:
    """Steps 2 and 3 of the module's doc, for a checkpoint past the restore point."""
    seq, cmd_index, old = point.seq, point.cmd_index, point.from_cluster_id
    if seq > 0:
        at = await conn.fetchval("SELECT cmd_index FROM events WHERE seq = $1", seq)
        if at is None:
            raise AdoptError(
                f"event {seq} (the restore point) is not in the database: a resync skipped "
                f"it; {FRESH_DATABASE}"
            )
        if at != cmd_index:
            raise AdoptError(
                f"event {seq} is of cmd_index {at} here, the restore point says {cmd_index}: "
                f"not the history the restore came from; {FRESH_DATABASE}"
            )
    after = await conn.fetchval("SELECT cmd_index FROM events WHERE seq = $1", seq + 1)
    if after is not None and after == cmd_index:
        raise AdoptError(f"seq {seq} is not the end of command {cmd_index}: event {seq + 1} is too")
    resync_before, resync_after = await _resyncs(conn, seq)
    events = _count(await conn.execute(_ORPHAN_EVENTS, adoption, seq, old))
    trades = _count(await conn.execute(_ORPHAN_TRADES, adoption, seq, old))
    orders = _count(await conn.execute(_ORPHAN_ORDERS, adoption, seq, old, resync_after))
    markets = _count(await conn.execute(_ORPHAN_MARKETS, adoption, seq, old, resync_after))
    rolled_orders = await _roll_back_orders(conn, adoption, seq, old, resync_before)
    rolled_balances, dropped_balances = await _roll_back_balances(
        conn, adoption, seq, old, resync_before
    )
    resyncs = _count(await conn.execute(_ORPHAN_RESYNCS, adoption, seq))
    return [
        events, trades, orders, rolled_orders, rolled_balances, dropped_balances, markets, resyncs
    ]  # fmt: skip


async def _resyncs(conn: asyncpg.Connection, seq: int) -> tuple[int, bool]:
    """The resyncs of this history that skipped events: the last seq one rebuilt rows at, at
    or before `seq` (0: none), and whether one did after it. Rows a resync rebuilt from its
    snapshot have no events to replay; a resync whose skipped range holds `seq` refuses."""
    rows = await conn.fetch(
        "SELECT skipped_from_seq, skipped_to_seq FROM indexer_resyncs "
        "WHERE orphaned_by IS NULL AND skipped_from_seq <= skipped_to_seq"
    )
    for r in rows:
        if r["skipped_from_seq"] <= seq < r["skipped_to_seq"]:
            raise AdoptError(
                f"a resync skipped events {r['skipped_from_seq']}..{r['skipped_to_seq']}, the "
                f"restore point {seq} among them: the rows at {seq} are not known; "
                f"{FRESH_DATABASE}"
            )
    before = max((r["skipped_to_seq"] for r in rows if r["skipped_to_seq"] <= seq), default=0)
    after = any(r["skipped_from_seq"] > seq for r in rows)
    if before and after:
        # A row without a creating event could be either resync's: which to keep is unknown.
        raise AdoptError(
            f"resyncs skipped events both before and after the restore point {seq}: the rows "
            f"at {seq} are not known; {FRESH_DATABASE}"
        )
    return before, after


async def _roll_back_orders(
    conn: asyncpg.Connection, adoption: int, seq: int, old: str, resync_before: int
) -> int:
    rows = await conn.fetch("SELECT order_id, created_seq FROM orders WHERE updated_seq > $1", seq)
    if not rows:
        return 0
    for r in rows:
        if r["created_seq"] is None or r["created_seq"] <= resync_before:
            raise AdoptError(
                f"order {r['order_id']} changed after the restore point, and a resync at seq "
                f"{resync_before} rebuilt it from a snapshot: its state at {seq} is not in the "
                f"events; {FRESH_DATABASE}"
            )
    await conn.execute(_KEEP_OLD_ORDERS, adoption, seq, old)
    ids = [r["order_id"] for r in rows]
    events = await conn.fetch(_ORDER_EVENTS, ids, seq)
    trades = await conn.fetch(_ORDER_TRADES, ids, seq)
    orders = orders_at(ids, [dict(e) for e in events], [dict(t) for t in trades])
    updated = _count(await conn.execute(_ROLL_BACK_ORDERS, orders))
    assert updated == len(ids), f"{updated} of {len(ids)} orders rolled back"
    return updated


def orders_at(ids: list[int], events: list[dict], trades: list[dict]) -> list[dict]:
    """The rows of orders `ids` (all open at the point) from their events up to it (`order_id`,
    `seq`, `ts`, `type`, `body` of events; `seq`, `ts`, `qty`, `maker_order_id`,
    `taker_order_id` of trades), as _ROLL_BACK_ORDERS takes them. Pure."""
    wanted = set(ids)
    steps: list[tuple[int, int, str, int, Any]] = [
        (e["seq"], e["ts"], e["type"], e["order_id"], e["body"]) for e in events
    ]
    for t in trades:
        for order_id in {t["maker_order_id"], t["taker_order_id"]} & wanted:
            steps.append((t["seq"], t["ts"], "trade", order_id, t["qty"]))
    steps.sort(key=lambda step: (step[0], step[3]))
    rows: dict[int, dict] = {}
    for seq, ts, kind, order_id, detail in steps:
        if kind == "accepted":
            rows[order_id] = {"order_id": order_id, "price": detail["price"],
                              "remaining": detail["qty"], "filled_qty": 0}  # fmt: skip
        elif order_id not in rows:
            raise AdoptError(
                f"order {order_id}: a {kind} event at seq {seq} before it was accepted"
            )
        elif kind == "trade":
            rows[order_id]["remaining"] -= detail
            rows[order_id]["filled_qty"] += detail
        elif kind == "amended":
            rows[order_id]["price"] = detail["price"]
            rows[order_id]["remaining"] = detail["qty"]
        else:  # cancelled, filled: an order that changed after the point was open at it
            raise AdoptError(f"order {order_id} was {kind} at seq {seq} and changed after it")
        rows[order_id]["updated_seq"], rows[order_id]["updated_ts"] = seq, ts
        if rows[order_id]["remaining"] < 0:
            raise AdoptError(f"order {order_id} is overfilled by its events at seq {seq}")
    missing = wanted - rows.keys()
    if missing:
        raise AdoptError(f"no accepted event for orders {sorted(missing)[:5]} in the database")
    return [rows[order_id] for order_id in sorted(wanted)]


async def _roll_back_balances(
    conn: asyncpg.Connection, adoption: int, seq: int, old: str, resync_before: int
) -> tuple[int, int]:
    keys = [
        {"account": r["account"], "asset": r["asset"]}
        for r in await conn.fetch("SELECT account, asset FROM balances WHERE updated_seq > $1", seq)
    ]
    if not keys:
        return 0, 0
    await conn.execute(_KEEP_OLD_BALANCES, adoption, seq, old)
    back, drop = [], []
    for r in await conn.fetch(_LAST_BALANCE_EVENTS, keys, seq):
        key = {"account": r["account"], "asset": r["asset"]}
        if r["seq"] is None and not resync_before:
            drop.append(key)  # first seen after the point
            continue
        if r["seq"] is None or r["seq"] <= resync_before:
            raise AdoptError(
                f"the balance of {r['account']} in {r['asset']} changed after the restore "
                f"point, and a resync at seq {resync_before} may have rebuilt it: its value "
                f"at {seq} is not in the events; {FRESH_DATABASE}"
            )
        body = r["body"]
        back.append({**key, "available": body["available"], "reserved": body["reserved"],
                     "seq": r["seq"], "ts": r["ts"]})  # fmt: skip
    if back:
        await conn.execute(_ROLL_BACK_BALANCES, back)
    if drop:
        await conn.execute(_DROP_BALANCES, drop)
    return len(back), len(drop)


def _count(status: str) -> int:
    """The row count of a command status ("UPDATE 3", "INSERT 0 3")."""
    return int(status.rsplit(" ", 1)[1])


def describe(record: dict) -> str:
    """One line: what an adoption did (the indexer_adoptions row)."""
    moved = (
        f"events {record['at_seq'] + 1}..{record['checkpoint_seq']} of {record['from_cluster_id']} "
        f"moved to events_orphaned ({record['events_orphaned']} events, "
        f"{record['trades_orphaned']} trades, {record['orders_orphaned']} orders, "
        f"{record['markets_orphaned']} markets); {record['orders_rolled_back']} orders and "
        f"{record['balances_rolled_back']} balances rolled back to seq {record['at_seq']}, "
        f"{record['balances_orphaned']} balances removed"
        if record["checkpoint_seq"] > record["at_seq"]
        else f"nothing past the restore point (the checkpoint was at seq {record['checkpoint_seq']})"
    )
    return (
        f"{'would adopt' if record.get('dry_run') else 'adopted'} cluster "
        f"{record['to_cluster_id']} from seq {record['at_seq']} (cmd_index "
        f"{record['at_cmd_index']}, log index {record['at_raft_index']}): {moved}"
    )


async def run(
    postgres_url: str, point: RestorePoint, *, dry_run: bool = False, wait_s: float = 30.0
) -> dict:
    """The operator's command: adopt `point` (or, with `dry_run`, say what that would do and
    roll it back). `wait_s` bounds the wait for a write in flight to finish."""
    from .postgres import PgSink

    # "operator" never takes the lease; the ttl sets how long it waits for a lock.
    pg = await PgSink.connect(postgres_url, holder="operator", lease_ttl_s=wait_s)
    try:
        return await pg.adopt(point, dry_run=dry_run)
    finally:
        await pg.close()
