"""`quorumbook indexer resync`: the operator's word that the events the indexer lacks may be
skipped (docs/operating/indexer.md).

The command does not rebuild anything itself: it leaves a request in PostgreSQL, and a
follower whose indexer raised the alarm serves it from its own newest snapshot, under the
lease, and streams on from there at once (its replica is at the snapshot and holds the journal
after it: a compaction in between cannot open a new gap, as one could if the tables were
rebuilt from a dump read here and the streamers found it later). The command waits for the
resync's record and prints it; if no indexer serves the request in time, it withdraws it, so
that it cannot authorize a later, unseen gap.
"""

from __future__ import annotations

import asyncio
import time

HOLDER = "operator"


async def resync(postgres_url: str, *, wait_s: float = 60.0) -> str:
    """Request a resync and wait for it; returns what was done, in one line. RuntimeError if
    nobody served it within `wait_s` (the request is withdrawn)."""
    from indexer.postgres import PgSink

    pg = await PgSink.connect(postgres_url, holder=HOLDER)
    try:
        # The request outlives the wait a little: a resync that began just before the
        # deadline may still commit (then the record says so), never one begun after it.
        request = await pg.request_resync(ttl_s=wait_s + 5.0)
        deadline = time.monotonic() + wait_s
        while (record := await pg.resync_record(request)) is None:
            if time.monotonic() > deadline:
                if await pg.withdraw_resync(request):
                    raise RuntimeError(
                        f"no indexer served the resync request within {wait_s:g} s, so it is "
                        "withdrawn. A resync is served by a follower whose indexer reports the "
                        "alarm (node status: indexer.state 'gone'); is one? Are the nodes' "
                        "indexers running (indexer.pid)?"
                    )
                record = await pg.resync_record(request)
                if record is None:
                    raise RuntimeError("a newer resync request replaced this one")
                break
            await asyncio.sleep(0.2)
    finally:
        await pg.close()
    skipped = (
        f"events {record['skipped_from_seq']}..{record['skipped_to_seq']} skipped (recorded in "
        "indexer_resyncs)"
        if record["skipped_from_seq"] <= record["skipped_to_seq"]
        else "no events skipped"
    )
    return (
        f"resynced at seq {record['skipped_to_seq']} (cmd_index {record['to_cmd_index']}, log "
        f"index {record['to_raft_index']}) by {record['holder']} from its snapshot: "
        f"{record['open_orders']} open orders and {record['balances']} balances rebuilt, "
        f"{record['orders_unknown']} orders now 'unknown'; {skipped}"
    )
