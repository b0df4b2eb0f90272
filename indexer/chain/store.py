"""The chain watcher's PostgreSQL side (tables: indexer/migrations/0003_chain_deposits.sql).

One transaction per poll writes what the scanner found (deposits seen, confirmed, orphaned)
with the scanner's window as the chain's checkpoint, so a watcher that restarts resumes where
the last write left it, with the deposits still waiting for confirmations. A credit is recorded
after the cluster applied it; a restart between the two resends the same `ref`, which the
exchange refuses as a duplicate (and that refusal is taken as the credit).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import orjson

from ..postgres import migrate
from .scanner import CONFIRMED, SEEN, Deposit, PollResult

DUST = "dust"
CREDITED = "credited"

_UPSERT = """
INSERT INTO chain_deposits (ref, chain_id, block_number, block_hash, tx_hash, log_index,
                            address, account, asset, amount, raw, dust, status)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                     $6::integer[], $7::text[], $8::text[], $9::text[], $10::bigint[],
                     $11::numeric[], $12::numeric[], $13::text[])
ON CONFLICT (ref) DO UPDATE SET
    block_number = EXCLUDED.block_number, block_hash = EXCLUDED.block_hash,
    status = EXCLUDED.status, updated_at = now()
WHERE chain_deposits.status NOT IN ('credited', 'dust')"""

# The lease (one watcher per chain), on the database's clock; `c.t` is read once per statement.
_ACQUIRE = """
INSERT INTO chain_leases AS l (chain_id, holder, epoch, expires_at, acquired_at, renewed_at)
SELECT $1, $2, 1, c.t + make_interval(secs => $3), c.t, c.t
FROM (SELECT clock_timestamp() AS t) AS c
ON CONFLICT (chain_id) DO UPDATE SET
    epoch = CASE WHEN l.holder = $2 AND l.expires_at > clock_timestamp() THEN l.epoch
                 ELSE l.epoch + 1 END,
    acquired_at = CASE WHEN l.holder = $2 AND l.expires_at > clock_timestamp() THEN l.acquired_at
                       ELSE clock_timestamp() END,
    holder = $2,
    expires_at = clock_timestamp() + make_interval(secs => $3),
    renewed_at = clock_timestamp()
WHERE l.expires_at <= clock_timestamp() OR l.holder = $2
RETURNING l.epoch"""
_RENEW = """
UPDATE chain_leases SET expires_at = clock_timestamp() + make_interval(secs => $4),
    renewed_at = clock_timestamp()
WHERE chain_id = $1 AND holder = $2 AND epoch = $3 AND expires_at > clock_timestamp()
RETURNING epoch"""
_RELEASE = """
UPDATE chain_leases SET expires_at = '-infinity' WHERE chain_id = $1 AND holder = $2 AND epoch = $3"""
_FENCE = """
SELECT holder = $2 AND epoch = $3 AND expires_at > clock_timestamp() FROM chain_leases
WHERE chain_id = $1 FOR SHARE"""

_CHECKPOINT = """
INSERT INTO chain_checkpoints (chain_id, blocks, indexed_to, head) VALUES ($1, $2, $3, $4)
ON CONFLICT (chain_id) DO UPDATE SET blocks = EXCLUDED.blocks,
    indexed_to = EXCLUDED.indexed_to, head = EXCLUDED.head, updated_at = now()"""


class Fenced(RuntimeError):
    """A write refused (nothing written): the writer's lease expired or was taken over."""


@dataclass(frozen=True)
class ChainLease:
    chain_id: int
    holder: str
    epoch: int


@dataclass(frozen=True)
class Resume:
    """Where a chain's watcher starts: the scanner's window and pending deposits."""

    blocks: dict[int, str]
    pending: list[Deposit]


class ChainStore:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, url: str) -> ChainStore:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        return cls(conn)

    async def close(self) -> None:
        await self.conn.close()

    async def resume(self, chain_id: int) -> Resume:
        row = await self.conn.fetchrow(
            "SELECT blocks FROM chain_checkpoints WHERE chain_id = $1", chain_id
        )
        pending = [
            _deposit(r)
            for r in await self.conn.fetch(
                "SELECT * FROM chain_deposits WHERE chain_id = $1 AND status = $2 "
                "ORDER BY block_number, ref",
                chain_id,
                SEEN,
            )
        ]
        if row is None:
            return Resume({}, pending)
        blocks = {int(h): str(v) for h, v in orjson.loads(row["blocks"]).items()}
        return Resume(blocks, pending)

    # -- the lease ------------------------------------------------------------------------

    async def try_acquire(self, chain_id: int, holder: str, ttl_s: float) -> ChainLease | None:
        """The chain's lease for `holder` (kept, or taken over once expired), or None."""
        epoch = await self.conn.fetchval(_ACQUIRE, chain_id, holder, float(ttl_s))
        return None if epoch is None else ChainLease(chain_id, holder, epoch)

    async def renew(self, lease: ChainLease, ttl_s: float) -> bool:
        epoch = await self.conn.fetchval(
            _RENEW, lease.chain_id, lease.holder, lease.epoch, float(ttl_s)
        )
        return epoch is not None

    async def release(self, lease: ChainLease) -> None:
        await self.conn.execute(_RELEASE, lease.chain_id, lease.holder, lease.epoch)

    async def _fence(self, lease: ChainLease) -> None:
        """Inside a write's transaction: the lease row held FOR SHARE (a takeover waits for
        the write, or the write sees the new epoch), and it must be the writer's."""
        ours = await self.conn.fetchval(_FENCE, lease.chain_id, lease.holder, lease.epoch)
        if not ours:
            raise Fenced(
                f"chain {lease.chain_id}: the lease of {lease.holder} (epoch {lease.epoch}) "
                "expired or was taken over"
            )

    # -- writes, each fenced ----------------------------------------------------------------

    async def record(self, lease: ChainLease, result: PollResult, blocks: dict[int, str]) -> None:
        """One poll, atomically: its deposits (orphaned and confirmed update the seen rows;
        rows already credited are never touched) and the checkpoint."""
        chain_id = lease.chain_id
        # One row per ref, the poll's last word on it: a deposit seen and confirmed in the
        # same poll is confirmed; one orphaned and seen again (its transaction in the new
        # fork's block) is seen.
        rows = list(
            {d.ref: d for d in (*result.orphaned, *result.seen, *result.confirmed)}.values()
        )
        async with self.conn.transaction():
            await self._fence(lease)
            if rows:
                columns = list(zip(*(_row(d) for d in rows), strict=True))
                await self.conn.execute(_UPSERT, *columns)
            await self.conn.execute(
                _CHECKPOINT,
                chain_id,
                orjson.dumps({str(h): v for h, v in sorted(blocks.items())}).decode(),
                result.indexed_to,
                result.head,
            )

    async def to_credit(self, chain_id: int) -> list[Deposit]:
        return [
            _deposit(r)
            for r in await self.conn.fetch(
                "SELECT * FROM chain_deposits WHERE chain_id = $1 AND status = $2 "
                "ORDER BY block_number, ref",
                chain_id,
                CONFIRMED,
            )
        ]

    async def credited(self, lease: ChainLease, ref: str, seq: int | None) -> None:
        """The cluster applied the credit (`seq`: its event's), or had it already (None)."""
        await self._settle(lease, ref, CREDITED, seq)

    async def dust_only(self, lease: ChainLease, ref: str) -> None:
        """Confirmed, but nothing to credit: below the asset's exchange precision."""
        await self._settle(lease, ref, DUST, None)

    async def _settle(self, lease: ChainLease, ref: str, status: str, seq: int | None) -> None:
        async with self.conn.transaction():
            await self._fence(lease)
            await self.conn.execute(
                "UPDATE chain_deposits SET status = $2, credit_seq = $3, updated_at = now() "
                "WHERE ref = $1 AND status = 'confirmed'",
                ref,
                status,
                seq,
            )

    async def deposits(self, chain_id: int) -> list[dict]:
        """Every deposit row of a chain, for status pages and tests."""
        rows = await self.conn.fetch(
            "SELECT * FROM chain_deposits WHERE chain_id = $1 ORDER BY block_number, ref",
            chain_id,
        )
        return [dict(r) for r in rows]


def _row(d: Deposit) -> tuple:
    return (d.ref, d.chain_id, d.block_number, d.block_hash, d.tx_hash, d.log_index, d.address,
            d.account, d.asset, d.amount, d.raw, d.dust, d.status)  # fmt: skip


def _deposit(r: asyncpg.Record) -> Deposit:
    return Deposit(
        ref=r["ref"],
        chain_id=r["chain_id"],
        block_number=r["block_number"],
        block_hash=r["block_hash"],
        tx_hash=r["tx_hash"],
        log_index=r["log_index"],
        address=r["address"],
        account=r["account"],
        asset=r["asset"],
        amount=r["amount"],
        dust=int(r["dust"]),
        raw=int(r["raw"]),
        status=r["status"],
    )
