"""What the indexer moves, and the words its parts share.

A replica turns each committed log entry into events (the state machine's, with a global,
gap-free `seq`: docs/reference/state-machine.md "Events"). The indexer writes them, in `seq`
order, to PostgreSQL (exactly once: the rows and the checkpoint commit in one transaction) and
to Kafka (at least once: consumers dedupe by `seq`). One follower at a time does it, under a
lease kept in PostgreSQL; every write names the lease's epoch, so a streamer that lost the
lease (paused, partitioned) can never write after another took over.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """The events of one committed log entry (a batch of commands, or none: a barrier, a
    membership change). `cmd_index` is the exchange's count after the entry."""

    raft_index: int
    cmd_index: int
    events: tuple[dict, ...] = field(default=())


@dataclass(frozen=True)
class Checkpoint:
    """How far the indexer got. `seq`: the last event in PostgreSQL (0: none yet), with the
    `cmd_index` and `raft_index` of the last log entry whose events are all in; `kafka_seq`:
    the last event Kafka acknowledged (never past `seq`); `epoch`: the lease epoch that wrote
    it; `cluster_id`: the cluster whose history the rows are ("": none recorded yet, a fresh
    database or one an older indexer wrote; indexer/timeline.py)."""

    seq: int = 0
    cmd_index: int = 0
    raft_index: int = 0
    kafka_seq: int = 0
    epoch: int = 0
    cluster_id: str = ""


@dataclass(frozen=True)
class Lease:
    """The right to stream, held by `holder` (a node id) in `epoch` (raised at every
    takeover) until its expiry (kept in PostgreSQL, renewed by the holder)."""

    holder: str
    epoch: int


class Fenced(RuntimeError):
    """A write refused because its lease was lost (expired, taken over) or the checkpoint was
    not where the writer expected: the writer must stop and start over as a candidate."""


class ForeignTimeline(RuntimeError):
    """A write refused (nothing written) because the database follows another cluster's
    history than the writer's (`db_cluster_id` against `ours`): a restored cluster pointed at
    the old cluster's database, or the old cluster after an operator moved the database to the
    restored one. Only `quorumbook indexer adopt` moves a database to another history
    (docs/operating/indexer.md "After a restore")."""

    def __init__(self, db_cluster_id: str, ours: str, checkpoint: Checkpoint) -> None:
        super().__init__(
            f"the database follows cluster {db_cluster_id or '(none)'!s}, this indexer "
            f"{ours or '(none)'!s} (checkpoint seq {checkpoint.seq}): nothing written"
        )
        self.db_cluster_id = db_cluster_id
        self.ours = ours
        self.checkpoint = checkpoint


class EventsGone(RuntimeError):
    """The events from `seq` on are no longer available to this replica (its log starts past
    them: compacted into a snapshot, or replaced by one). Another replica may still have them;
    else `quorumbook indexer resync` rebuilds the tables from a snapshot."""

    def __init__(self, seq: int, detail: str) -> None:
        super().__init__(f"events from seq {seq} are no longer available here: {detail}")
        self.seq = seq


# Kafka topics, by event type (prefix + "." + name): every event goes to exactly one.
TOPIC_OF_TYPE = {
    "accepted": "orders",
    "rejected": "orders",
    "cancelled": "orders",
    "amended": "orders",
    "filled": "orders",
    "trade": "trades",
    "book": "book",
    "balance": "balances",
    "market_created": "markets",
}
TOPICS = tuple(sorted(set(TOPIC_OF_TYPE.values())))
