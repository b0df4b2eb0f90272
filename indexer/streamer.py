"""The streaming loop: one follower at a time writes every committed event to PostgreSQL
(exactly once) and Kafka (at least once).

A streamer runs beside every node (in the node's indexer process, ADR 0007) and is mostly in
one of three states (the others: docs/reference/indexer.md, "Status"):

* idle: its node is not a follower (a leader never streams; a candidate waits);
* standby: a follower without the lease; it keeps its source at the checkpoint, so that it can
  take over at once;
* active: a follower holding the lease. Each round: read the next whole entries after the
  checkpoint, publish them to Kafka (acknowledged), then write them to PostgreSQL in one
  transaction with the checkpoint, under the lease's epoch. A write that finds the lease lost
  or the checkpoint moved is refused (Fenced) and changes nothing: the streamer goes back to
  standby. So PostgreSQL gets every event once, in seq order; Kafka may get an event again
  (a crash between the publish and the commit, a paused streamer waking up) and its
  consumers dedupe by seq.

PostgreSQL or Kafka down: the round fails, the streamer backs off (0.2 s doubling to 5 s) and
starts over from the checkpoint, so nothing is skipped or written twice. Events this replica
no longer holds (EventsGone): a loud alarm in the status and the log; the lease is released
so another follower can go on from the checkpoint, and this one bids for it again only once
its replica holds the events after the checkpoint, or to serve an operator's resync request
(`quorumbook indexer resync`): the tables rebuilt from this node's snapshot, then streaming
on from there.

Another history (indexer/timeline.py): every round starts by reading the checkpoint and
checking that it follows this node's cluster and is not ahead of this node's history, and every
write checks the cluster again in its transaction (`ForeignTimeline`, nothing written). A
database of another cluster (a restored cluster pointed at the old one's database), or a
checkpoint ahead of the cluster, halts the streamer: a loud alarm in the status and the log,
nothing written, no resync served, until an operator moves the database
(`quorumbook indexer adopt`) or points the indexer at another one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import timeline
from .events import Checkpoint, Entry, EventsGone, Fenced, ForeignTimeline, Lease
from .port import EntrySource, Node, NodeView

log = logging.getLogger("quorumbook.indexer")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
STANDBY_POLL_S = 0.5


@dataclass
class Status:
    """The `indexer` object of the node status (docs/reference/indexer.md)."""

    configured: bool = True
    active: bool = False  # this node's streamer holds the lease and streams
    # idle | standby | active | resync | backoff | gone | halted | error
    state: str = "starting"
    checkpoint_seq: int = 0
    # The checkpoint's log index once read from a database that follows this cluster (None:
    # not known): the node's compaction keeps the log after it (ADR 0007).
    checkpoint_raft_index: int | None = None
    lag_events: int = 0
    lag_ms: int = 0
    events_written: int = 0
    lease_epoch: int = 0
    fenced: int = 0  # writes refused because the lease was lost
    resyncs: int = 0  # operators' resyncs this process served
    gone_from_seq: int | None = None  # the alarm: events from here are no longer here
    cluster_id: str | None = None  # this node's cluster, the only history it writes
    db_cluster_id: str | None = None  # the one the database's checkpoint follows ("": none)
    # The alarm, state "halted": "foreign_timeline" or "checkpoint_ahead" (indexer/timeline.py);
    # nothing is written until an operator acts.
    timeline_alarm: str | None = None
    last_error: str | None = None
    pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Streamer:
    def __init__(
        self,
        node: Node,
        source: EntrySource,
        *,
        connect_pg: Callable[[], Awaitable[Any]],
        connect_kafka: Callable[[], Awaitable[Any]] | None,
        batch_max_events: int = 5000,
        lease_ttl_s: float = 3.0,
        cluster_id: str = "",
    ) -> None:
        self.node = node
        self.source = source
        self._connect_pg = connect_pg
        self._connect_kafka = connect_kafka
        self.batch_max_events = batch_max_events
        self.lease_ttl_s = lease_ttl_s
        self.cluster_id = cluster_id
        self.status = Status(cluster_id=cluster_id)
        self.status_changed = asyncio.Event()  # the state moved: report it now
        self._checkpoint = Checkpoint()
        self._checkpoint_read = False  # _checkpoint came from the database
        self._last_ts_ms = 0  # the newest event written: for lag_ms
        # A checkpoint_ahead alarm holds while the checkpoint stays where it was raised: the
        # node's seq may pass the checkpoint's later, on its own history.
        self._ahead: tuple[Checkpoint, timeline.Alarm] | None = None
        self._logged_alarm: tuple[str, str, int] | None = None

    # ----------------------------------------------------------------------------- loop

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self._session()
                backoff = BACKOFF_MIN_S
            except asyncio.CancelledError:
                raise
            except AssertionError as exc:  # postgres.BatchError: a bug, never written
                self._set_state("error", False)
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.critical(
                    "indexer: refused an inconsistent batch (a bug; nothing was written): %s", exc
                )
                await asyncio.sleep(BACKOFF_MAX_S)
            except Exception as exc:  # a service down or failing: back off, start over
                self._set_state("backoff", False)
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("indexer: %s; retrying in %.1f s", self.status.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        pg = await self._connect_pg()
        kafka = None
        try:
            if self._connect_kafka is not None:
                kafka = await self._connect_kafka()
            self.status.last_error = None
            while True:
                view = self.node.view()
                if await self._halted(pg, view):
                    await self.node.changed(STANDBY_POLL_S)
                    continue
                if not view.follower:
                    self._set_state("idle", False)
                    self._report()
                    await self.node.changed(STANDBY_POLL_S)
                    continue
                try:
                    if self.status.gone_from_seq is not None:
                        # The alarm: no bid for the lease until this replica holds the events
                        # after the checkpoint again (another follower streamed on), unless
                        # an operator asked for a resync (`quorumbook indexer resync`).
                        request = await pg.pending_resync()
                        if request is not None and (lease := await pg.try_acquire()):
                            await self._under(pg, lease, self._resync(pg, kafka, lease, request))
                        else:
                            await self._standby(pg)
                        continue
                    lease = await pg.try_acquire()
                    if lease is None:
                        await self._standby(pg)
                        continue
                    await self._under(pg, lease, self._stream(pg, kafka, lease))
                except EventsGone as exc:
                    self._alarm(exc)
                    await self.node.changed(STANDBY_POLL_S)
                except ForeignTimeline as exc:
                    # The database moved to another history under us (an operator's adopt):
                    # nothing was written; the check above raises the alarm.
                    log.warning("indexer: write refused: %s", exc)
        finally:
            if kafka is not None:
                await _quietly(kafka.close())
            await _quietly(pg.close())

    def _alarm(self, exc: EventsGone) -> None:
        self._set_state("gone", False)
        self.status.last_error = str(exc)
        if self.status.gone_from_seq != exc.seq:  # once per gap, not once per retry
            self.status.gone_from_seq = exc.seq
            log.error(
                "indexer ALARM: %s; another follower may go on from the checkpoint, "
                "else run `quorumbook indexer resync`",
                exc,
            )

    async def _halted(self, pg: Any, view: NodeView) -> bool:
        """Read the checkpoint (a fresh database takes our cluster) and check whose history it
        is (indexer/timeline.py); True, with the alarm raised, when this node must not write."""
        checkpoint = await pg.checkpoint()
        if not checkpoint.cluster_id and checkpoint.seq == 0 and self.cluster_id:
            checkpoint = await pg.claim_fresh()
        self._checkpoint, self._checkpoint_read = checkpoint, True
        self.status.db_cluster_id = checkpoint.cluster_id
        alarm = timeline.check(self.cluster_id, checkpoint, view)
        if alarm is not None and alarm.reason == timeline.CHECKPOINT_AHEAD:
            self._ahead = (checkpoint, alarm)
        elif alarm is None and self._ahead is not None:
            if self._ahead[0] == checkpoint:
                alarm = self._ahead[1]
            else:
                self._ahead = None  # an operator moved the checkpoint
        self._report()
        if alarm is None:
            if self.status.timeline_alarm is not None:
                log.warning(
                    "indexer: the database follows this cluster (%s) again at seq %d; the "
                    "%s alarm is over",
                    self.cluster_id, checkpoint.seq, self.status.timeline_alarm,
                )  # fmt: skip
                self.status.timeline_alarm = None
                self.status.last_error = None
                self._logged_alarm = None
            return False
        self._set_state("halted", False)
        self.status.gone_from_seq = None  # of a checkpoint that is not of our history: moot
        self.status.timeline_alarm = alarm.reason
        self.status.checkpoint_raft_index = None  # another history's: nothing to keep for it
        self.status.last_error = alarm.message
        once = (alarm.reason, checkpoint.cluster_id, checkpoint.seq)
        if self._logged_alarm != once:
            self._logged_alarm = once
            log.error(
                "indexer ALARM %s: %s; nothing is written until an operator acts: "
                "`quorumbook indexer adopt` after a restore, else a fresh database "
                '(docs/operating/indexer.md "After a restore")',
                alarm.reason,
                alarm.message,
            )
        return True

    async def _under(self, pg: Any, lease: Lease, work: Awaitable[None]) -> None:
        """Run `work` (streaming, a resync) under `lease`."""
        try:
            await work
        except Fenced as exc:
            self.status.fenced += 1
            log.warning("indexer: fenced (%s); back to standby", exc)
        except BaseException:
            # Stopped, a service failing, events gone: let another follower take over now
            # rather than after the lease's expiry (best effort: it expires anyway).
            await _quietly(pg.release(lease))
            raise
        finally:
            self._set_state("standby", False)

    async def _refresh(self, pg: Any) -> None:
        self._checkpoint, self._checkpoint_read = await pg.checkpoint(), True
        self.status.db_cluster_id = self._checkpoint.cluster_id
        self._report()

    async def _standby(self, pg: Any) -> None:
        """Keep the source at the checkpoint (a cheap step forward each time), so that a
        takeover starts at once."""
        await self._refresh(pg)
        await self.source.seek(self._checkpoint)
        self.status.gone_from_seq = None  # only once this replica holds the events again
        self._set_state("standby", False)
        await self.node.changed(STANDBY_POLL_S)

    async def _resync(self, pg: Any, kafka: Any, lease: Lease, request: int) -> None:
        """Serve an operator's resync: the tables rebuilt from this node's newest snapshot,
        the checkpoint moved there, and streaming on from it at once (the replica is there,
        with the journal after it open: a compaction meanwhile cannot take it away)."""
        self._set_state("resync", False)
        await self._refresh(pg)
        exchange, raft_index = await self.source.restart_at_snapshot()
        if exchange.seq <= self._checkpoint.seq:
            # This snapshot is not past the checkpoint: nothing to skip from here; stream on
            # if the log holds the rest (else the alarm stays, for another follower).
            await self._stream(pg, kafka, lease)
            return
        before = self._checkpoint
        self._checkpoint = await pg.resync(
            lease, exchange, exchange.seq, exchange.cmd_index, raft_index, request_id=request
        )
        self.status.resyncs += 1
        log.warning(
            "indexer: resync (request %d): the tables rebuilt from this node's snapshot at seq "
            "%d (log index %d); events %d..%d skipped, recorded in indexer_resyncs",
            request, exchange.seq, raft_index, before.seq + 1, exchange.seq,
        )  # fmt: skip
        await self._stream(pg, kafka, lease)

    async def _stream(self, pg: Any, kafka: Any, lease: Lease) -> None:
        await self._refresh(pg)
        await self.source.seek(self._checkpoint)  # EventsGone: not ours to stream
        self._set_state("active", True)
        self.status.lease_epoch = lease.epoch
        self.status.gone_from_seq = None
        log.info(
            "indexer: streaming from seq %d (lease epoch %d)", self._checkpoint.seq, lease.epoch
        )
        renewed = time.monotonic()
        while self.node.view().follower:
            if time.monotonic() - renewed > self.lease_ttl_s / 3:
                if not await pg.renew(lease):
                    raise Fenced("the lease expired or was taken over")
                renewed = time.monotonic()
            entries = await self.source.read(self.batch_max_events, timeout_s=self.lease_ttl_s / 6)
            if not entries:
                self._report()
                continue
            if kafka is not None:
                await kafka.publish(entries)
            self._checkpoint = await pg.write(
                lease, self._checkpoint.seq, entries, published=kafka is not None
            )
            self.status.events_written += sum(len(e.events) for e in entries)
            self._note_written(entries)
            self._report()
        log.info("indexer: node is no longer a follower; releasing the lease")
        await pg.release(lease)

    # ----------------------------------------------------------------------------- status

    def _note_written(self, entries: list[Entry]) -> None:
        for entry in reversed(entries):
            if entry.events:
                self._last_ts_ms = entry.events[-1]["ts"] // 1_000_000
                return

    def _set_state(self, state: str, active: bool) -> None:
        if (state, active) != (self.status.state, self.status.active):
            self.status.state, self.status.active = state, active
            self.status_changed.set()

    def _report(self) -> None:
        view = self.node.view()
        status = self.status
        status.checkpoint_seq = self._checkpoint.seq
        status.checkpoint_raft_index = (
            self._checkpoint.raft_index
            if self._checkpoint_read and status.timeline_alarm is None
            else None
        )
        status.lag_events = max(0, view.seq - self._checkpoint.seq)
        status.lag_ms = (
            max(0, view.ts_ms - self._last_ts_ms) if status.lag_events and self._last_ts_ms else 0
        )


async def _quietly(closing: Awaitable[Any]) -> None:
    try:
        await asyncio.wait_for(closing, 5.0)
    except Exception:
        log.debug("indexer: closing a sink failed", exc_info=True)
