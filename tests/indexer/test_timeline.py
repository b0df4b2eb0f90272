"""Whose history the indexer's database holds (indexer/timeline.py, indexer/adoption.py),
against the real embedded PostgreSQL (and broker, for the headers).

The story of a restore, with seeded sessions through `statemachine.Exchange`: an old cluster
streams past the restore point; a cluster restored at that point (its exchange restored from
the snapshot there, then its own commands) finds the old database: its streamer halts with
the alarm and writes nothing; the operator's adoption moves the old history past the point
aside and rolls the rest back to it, and the same streamer goes on with the new history, the
tables then equal to the new exchange, event for event. Around it: the rule itself, a fresh
database, a checkpoint ahead, an upgraded database, the refusals, the CLI, Kafka's headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Callable

import asyncpg
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import Metrics
from indexer import adoption
from indexer.adoption import AdoptError, orders_at
from indexer.consume import EventReader
from indexer.events import Checkpoint, Entry, EventsGone, ForeignTimeline
from indexer.kafka import KafkaSink
from indexer.port import NodeView
from indexer.postgres import PgSink
from indexer.streamer import Streamer
from indexer.timeline import CHECKPOINT_AHEAD, FOREIGN_TIMELINE, RestorePoint, check
from statemachine import Exchange
from tests.indexer.test_postgres import (
    FakeLog,
    Traders,
    _connect,
    assert_closed_orders_agree,
    assert_events_and_trades_match,
    assert_projections_match,
    batches,
    session_entries,
    table_dump,
)

OLD, NEW = "qb-0ld0ld0ld0ld", "qb-new0new0new0"


# ---------------------------------------------------------------------------- the rule


def test_the_rule_adopts_nothing_itself_and_stops_at_another_cluster_or_a_checkpoint_ahead():
    follower = NodeView(role="follower", applied_index=50, seq=400)
    at = Checkpoint(seq=300, cmd_index=90, raft_index=40, cluster_id=OLD)
    assert check(OLD, at, follower) is None
    assert check(OLD, dataclasses.replace(at, cluster_id=""), follower) is None  # unrecorded
    assert check("", dataclasses.replace(at, cluster_id=""), follower) is None
    # Another cluster: whatever the positions, even a checkpoint at the very start.
    for checkpoint in (at, Checkpoint(cluster_id=OLD), dataclasses.replace(at, seq=9_999)):
        alarm = check(NEW, checkpoint, follower)
        assert alarm is not None and alarm.reason == FOREIGN_TIMELINE
        assert OLD in alarm.message and NEW in alarm.message
        assert f"seq {checkpoint.seq}," in alarm.message and "seq 400," in alarm.message
    assert check("", at, follower).reason == FOREIGN_TIMELINE  # we cannot tell: never write
    # Ahead: this node applied the checkpoint's entry and has fewer events.
    ahead = dataclasses.replace(at, seq=401)
    assert check(OLD, ahead, follower).reason == CHECKPOINT_AHEAD
    assert check(OLD, dataclasses.replace(ahead, cluster_id=""), follower).reason == (
        CHECKPOINT_AHEAD
    )
    # Behind the checkpoint's log index, fewer events is lag, not a fork.
    assert check(OLD, dataclasses.replace(ahead, raft_index=51), follower) is None
    assert check(OLD, ahead, NodeView()) is None  # the node has not said where it is yet
    leader = NodeView(role="leader", applied_index=40, seq=300)
    assert check(OLD, at, leader) is None
    assert check(OLD, dataclasses.replace(at, seq=301), leader).reason == CHECKPOINT_AHEAD


def test_a_restore_point_is_one_point_of_a_new_cluster() -> None:
    doc = {"cluster_id": NEW, "from_cluster_id": OLD, "seq": 10, "cmd_index": 4, "log_index": 3}
    assert RestorePoint.of_restore(doc) == RestorePoint(NEW, OLD, 10, 4, 3)
    for bad in ({"cluster_id": OLD}, {"seq": 3, "cmd_index": 4}, {"seq": 0}, {"log_index": -1}):
        with pytest.raises(ValueError):
            RestorePoint.of_restore(doc | bad)
    with pytest.raises(ValueError, match="missing"):
        RestorePoint.of_restore({"cluster_id": NEW})


def test_orders_are_replayed_to_the_point_from_their_events() -> None:
    accepted = {"price": 100, "qty": 10}
    events = [
        {"order_id": 7, "seq": 3, "ts": 30, "type": "accepted", "body": accepted},
        {"order_id": 7, "seq": 9, "ts": 90, "type": "amended", "body": {"price": 90, "qty": 4}},
        {"order_id": 8, "seq": 10, "ts": 95, "type": "accepted", "body": accepted},
    ]
    trades = [
        {"seq": 5, "ts": 50, "qty": 3, "maker_order_id": 7, "taker_order_id": 99},
        {"seq": 11, "ts": 99, "qty": 2, "maker_order_id": 7, "taker_order_id": 8},
    ]
    assert orders_at([7, 8], events, trades) == [
        {"order_id": 7, "price": 90, "remaining": 2, "filled_qty": 5, "updated_seq": 11,
         "updated_ts": 99},
        {"order_id": 8, "price": 100, "remaining": 8, "filled_qty": 2, "updated_seq": 11,
         "updated_ts": 99},
    ]  # fmt: skip
    with pytest.raises(AdoptError, match="cancelled"):
        ended = {"order_id": 7, "seq": 12, "ts": 99, "type": "cancelled", "body": {}}
        orders_at([7], [*events[:2], ended], trades[:1])
    with pytest.raises(AdoptError, match="no accepted event"):
        orders_at([7, 8], events[:2], trades[:1])


# ---------------------------------------------------------------------------- a streamer


class FakeNode:
    """The node as the indexer process sees it (indexer.port.Node)."""

    def __init__(self, view: NodeView) -> None:
        self.current = view

    def view(self) -> NodeView:
        return self.current

    def set(self, **changes) -> None:
        self.current = dataclasses.replace(self.current, **changes)

    async def changed(self, timeout_s: float) -> None:
        await asyncio.sleep(min(timeout_s, 0.02))


class ListSource:
    """A replica whose log starts after a snapshot at (`raft_index`, `seq`) and holds
    `entries` after it (indexer.port.EntrySource), applied as far as the node says."""

    def __init__(self, node: FakeNode, raft_index: int, seq: int, entries: list[Entry]) -> None:
        self.node, self.base, self.base_seq, self.entries = node, raft_index, seq, entries
        self.next = 0

    async def seek(self, checkpoint: Checkpoint) -> None:
        while self.node.view().applied_index < checkpoint.raft_index:  # as cluster/'s does
            await self.node.changed(0.2)
        if checkpoint.raft_index < self.base:
            raise EventsGone(checkpoint.seq + 1, "before this replica's snapshot")
        done = [e for e in self.entries if e.raft_index <= checkpoint.raft_index]
        seq = max((ev["seq"] for e in done for ev in e.events), default=self.base_seq)
        if seq != checkpoint.seq:
            raise EventsGone(checkpoint.seq + 1, f"at its log index this replica is at {seq}")
        self.next = len(done)

    async def restart_at_snapshot(self):
        raise EventsGone(self.base_seq + 1, "no resync in these tests")

    async def read(self, max_events: int, timeout_s: float) -> list[Entry]:
        applied = self.node.view().applied_index
        out = [e for e in self.entries[self.next : self.next + 50] if e.raft_index <= applied]
        if not out:
            await asyncio.sleep(min(timeout_s, 0.02))
        self.next += len(out)
        return out


def streamer_of(pg_url: str, node: FakeNode, source: ListSource, cluster_id: str) -> Streamer:
    async def connect_pg() -> PgSink:
        return await PgSink.connect(pg_url, holder="n2", cluster_id=cluster_id)

    return Streamer(node, source, connect_pg=connect_pg, connect_kafka=None, cluster_id=cluster_id)


async def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class MetricsNode:
    """What api/metrics.py reads of a node, with an indexer status."""

    def __init__(self, indexer: dict) -> None:
        self.indexer = indexer

    def health(self) -> dict:
        return {"role": "follower", "leader": "n1", "leader_connected": True, "term": 2,
                "commit_index": 9, "applied_index": 9, "cmd_index": 9,
                "indexer": self.indexer}  # fmt: skip

    def histograms(self) -> dict:
        empty = {"buckets": [], "count": 0, "sum": 0.0}
        return {"qb_commit_latency_seconds": empty, "qb_batch_size_entries": empty}


def alarm_metrics(status: dict) -> dict[str, float]:
    text = Metrics(MetricsNode(status)).render().decode()
    return {
        sample.name + "".join(f"{{{k}={v}}}" for k, v in sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("qb_indexer_alarm")
    }


def more_entries(log: FakeLog, traders: Traders, commands: int) -> list[Entry]:
    """`commands` commands after the set-up, one or a few per entry."""
    out, rng = [], traders.rng
    while commands > 0:
        n = min(commands, rng.choice((1, 1, 1, 3)))
        commands -= n
        out.append(log.entry([traders.command(log.exchange) for _ in range(n)]))
    return out


@dataclasses.dataclass
class Restore:
    """An old cluster's history past a restore point, and a restored cluster's after it."""

    point: RestorePoint
    at_point: bytes  # the exchange's snapshot there
    head: list[Entry]  # the log up to the point
    old: FakeLog
    old_tail: list[Entry]
    new: FakeLog
    new_tail: list[Entry]


def restore_story(old_commands: int = 900, tail_commands: int = 400) -> Restore:
    old, traders = FakeLog(), Traders(41)
    head = list(session_entries(old, traders, commands=old_commands))
    assert head
    blob, ts = old.exchange.snapshot(), traders.ts
    point = RestorePoint(NEW, OLD, old.exchange.seq, old.exchange.cmd_index, old.raft_index)
    old_tail = more_entries(old, traders, tail_commands)
    # Past the point the old history also opened a market and an account the new never had.
    traders.ts += 1
    newcomer = {"op": "create_market", "ts": traders.ts, "market": "DOGE-USD", "base": "DOGE",
                "quote": "USD", "lot_size": 1, "tick_size": 1, "maker_fee_bps": 0,
                "taker_fee_bps": 0}  # fmt: skip
    old_tail.append(old.entry([newcomer, traders._transfer("deposit", "zed", "USD", 5)]))
    old_tail += more_entries(old, traders, 30)

    new = FakeLog()
    new.exchange, new.raft_index = Exchange.restore(blob), point.raft_index
    new.events = old.events[: point.seq]
    again = Traders(42)
    again.ts = ts
    new_tail = more_entries(new, again, tail_commands)
    assert new.events[point.seq] != old.events[point.seq], "the histories differ past the point"
    return Restore(point, blob, head, old, old_tail, new, new_tail)


async def write_all(sink: PgSink, entries: list[Entry], seed: int) -> Checkpoint:
    lease = await sink.try_acquire()
    assert lease is not None
    checkpoint = await sink.checkpoint()
    for batch in batches(iter(entries), random.Random(seed)):
        checkpoint = await sink.write(lease, checkpoint.seq, batch)
    return checkpoint


# ---------------------------------------------------------------------------- the story


def test_a_restored_cluster_halts_on_the_old_database_until_adopted_then_streams_its_own(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    story = restore_story()
    point = story.point
    caplog.set_level(logging.INFO, logger="quorumbook.indexer")

    async def go() -> None:
        old = await PgSink.connect(pg_url, holder="n1", lease_ttl_s=60, cluster_id=OLD)
        conn = await _connect(pg_url)
        streaming = None
        try:
            assert (await old.claim_fresh()).cluster_id == OLD  # the old cluster's first start
            old_lease = await old.try_acquire()
            old_end = await write_all(old, [*story.head, *story.old_tail], seed=5)
            assert old_end.seq == story.old.exchange.seq > point.seq
            before = await table_dump(pg_url)

            # The restored cluster's follower, its log at the restore point's snapshot.
            last = story.new_tail[-1]
            node = FakeNode(NodeView("follower", point.raft_index, point.seq))
            source = ListSource(node, point.raft_index, point.seq, story.new_tail)
            streamer = streamer_of(pg_url, node, source, NEW)
            streaming = asyncio.create_task(streamer.run())
            await wait_until(lambda: streamer.status.state == "halted", "the alarm")
            node.set(applied_index=last.raft_index, seq=story.new.exchange.seq)
            await asyncio.sleep(0.3)  # it has the events to write: it does not
            status = streamer.status.as_dict()
            assert status["timeline_alarm"] == FOREIGN_TIMELINE and not status["active"]
            assert (status["cluster_id"], status["db_cluster_id"]) == (NEW, OLD)
            assert status["events_written"] == 0 and status["lease_epoch"] == 0
            assert await table_dump(pg_url) == before, "nothing written"
            metrics = alarm_metrics(status)
            assert metrics["qb_indexer_alarm"] == 1
            assert metrics["qb_indexer_alarm_reason{reason=foreign_timeline}"] == 1
            assert metrics["qb_indexer_alarm_reason{reason=events_gone}"] == 0
            assert metrics["qb_indexer_alarm_reason{reason=checkpoint_ahead}"] == 0
            alarms = [r.getMessage() for r in caplog.records if "ALARM" in r.getMessage()]
            assert len(alarms) == 1, alarms  # once, not once per poll
            assert all(
                part in alarms[0]
                for part in (FOREIGN_TIMELINE, OLD, NEW, f"seq {old_end.seq},", f"seq {point.seq},")
            ), alarms[0]

            # The operator: a dry run changes nothing, then the adoption, while the node is
            # the leader (its indexer idle) so that the tables can be seen at the point.
            node.set(role="leader")
            dry = await adoption.run(pg_url, point, dry_run=True)
            assert dry["dry_run"] and "would adopt" in adoption.describe(dry)
            assert await table_dump(pg_url) == before
            record = await adoption.run(pg_url, point)
            old_events = story.old.events[point.seq :]
            assert (record["from_cluster_id"], record["to_cluster_id"]) == (OLD, NEW)
            assert record["events_orphaned"] == len(old_events)
            assert record["trades_orphaned"] == sum(e["type"] == "trade" for e in old_events)
            assert record["orders_orphaned"] == sum(e["type"] == "accepted" for e in old_events)
            assert record["orders_rolled_back"] > 0 and record["balances_rolled_back"] > 0
            assert (record["markets_orphaned"], record["balances_orphaned"]) == (1, 1)
            assert record["checkpoint_seq"] == old_end.seq
            checkpoint = await old.checkpoint()
            # (kafka_seq: no broker here; it never passes the point.)
            assert checkpoint == Checkpoint(
                point.seq, point.cmd_index, point.raft_index, 0, old_lease.epoch, NEW
            )
            at_point = Exchange.restore(story.at_point)
            await assert_projections_match(conn, at_point)
            await assert_events_and_trades_match(conn, story.old.events[: point.seq])
            await assert_closed_orders_agree(conn, story.old.events[: point.seq])
            orphaned = await conn.fetch(
                "SELECT adoption_id, cluster_id, body FROM events_orphaned ORDER BY seq"
            )
            assert [r["body"] for r in orphaned] == old_events
            assert {(r["adoption_id"], r["cluster_id"]) for r in orphaned} == {(record["id"], OLD)}
            # The old cluster, still up, can write nothing more.
            with pytest.raises(ForeignTimeline):
                await old.write(old_lease, point.seq, story.new_tail[:1])

            # The restored cluster's indexer goes on by itself, from the point.
            node.set(role="follower")
            await wait_until(
                lambda: streamer.status.checkpoint_seq == story.new.exchange.seq,
                "the new history written",
            )
            assert streamer.status.timeline_alarm is None and streamer.status.active
            assert streamer.status.db_cluster_id == NEW
            await assert_events_and_trades_match(conn, story.new.events)
            await assert_projections_match(conn, story.new.exchange)
            await assert_closed_orders_agree(conn, story.new.events)
            assert alarm_metrics(streamer.status.as_dict())["qb_indexer_alarm"] == 0

            with pytest.raises(AdoptError, match="already"):
                await adoption.run(pg_url, point)  # a second time cuts nothing
        finally:
            if streaming is not None:
                await stop(streaming)
            await conn.close()
            await old.close()

    asyncio.run(go())


def test_a_fresh_database_takes_the_cluster_of_the_first_indexer(pg_url: str) -> None:
    async def go() -> None:
        log = FakeLog()
        entries = list(session_entries(log, Traders(3), commands=200))
        node = FakeNode(NodeView("leader", 0, 0))
        streamer = streamer_of(pg_url, node, ListSource(node, 0, 0, entries), NEW)
        task = asyncio.create_task(streamer.run())
        other = await PgSink.connect(pg_url, holder="n3", cluster_id=OLD)
        try:
            await wait_until(lambda: streamer.status.db_cluster_id == NEW, "the claim")
            assert streamer.status.state == "idle" and streamer.status.timeline_alarm is None
            assert (await other.claim_fresh()).cluster_id == NEW  # the first one keeps it
            node.set(role="follower", applied_index=log.raft_index, seq=log.exchange.seq)
            await wait_until(lambda: streamer.status.checkpoint_seq == log.exchange.seq, "writes")
            assert (await other.checkpoint()).cluster_id == NEW
            lease = await other.try_acquire()
            assert lease is None  # n2 streams; and even with a lease, n3's cluster is refused:
            await stop(task)
            lease = await other.try_acquire()
            with pytest.raises(ForeignTimeline):
                await other.write(lease, log.exchange.seq, [])
        finally:
            await stop(task)
            await other.close()

    asyncio.run(go())


def test_a_checkpoint_ahead_of_the_cluster_halts_every_indexer_and_stays(pg_url: str) -> None:
    """The same cluster id, but a database that has more than the cluster at the checkpoint's
    log index (say the nodes' data was replaced by an older copy without a new id)."""

    async def go() -> None:
        log = FakeLog()
        entries = list(session_entries(log, Traders(5), commands=300))
        sink = await PgSink.connect(pg_url, holder="n1", cluster_id=OLD)
        try:
            written = await write_all(sink, entries, seed=1)
            before = await table_dump(pg_url)
            # The cluster's log now: fewer events at a later index.
            short = FakeLog()
            shorter = list(session_entries(short, Traders(5), commands=100))
            node = FakeNode(NodeView("follower", 1, 0))
            source = ListSource(node, 0, 0, shorter)
            streamer = streamer_of(pg_url, node, source, OLD)
            task = asyncio.create_task(streamer.run())
            try:
                await asyncio.sleep(0.3)
                assert streamer.status.timeline_alarm is None, "lag is no alarm"
                node.set(applied_index=written.raft_index + 5, seq=written.seq - 1)
                await wait_until(lambda: streamer.status.state == "halted", "the alarm")
                assert streamer.status.timeline_alarm == CHECKPOINT_AHEAD
                # Its seq passing the checkpoint's later does not clear it.
                node.set(applied_index=written.raft_index + 50, seq=written.seq + 7)
                await asyncio.sleep(0.3)
                assert streamer.status.timeline_alarm == CHECKPOINT_AHEAD
                metrics = alarm_metrics(streamer.status.as_dict())
                assert metrics["qb_indexer_alarm_reason{reason=checkpoint_ahead}"] == 1
                assert await table_dump(pg_url) == before
            finally:
                await stop(task)
        finally:
            await sink.close()

    asyncio.run(go())


def test_a_database_an_older_indexer_wrote_takes_the_cluster_of_the_first_write(pg_url) -> None:
    async def go() -> None:
        log = FakeLog()
        entries = list(session_entries(log, Traders(6), commands=200))
        unnamed = await PgSink.connect(pg_url, holder="n1")  # no cluster id: as before
        named = await PgSink.connect(pg_url, holder="n1", cluster_id=OLD)
        try:
            written = await write_all(unnamed, entries[:20], seed=2)
            assert written.cluster_id == ""
            assert (await named.claim_fresh()).cluster_id == "", "not fresh: not claimed"
            lease = await named.try_acquire()
            after = await named.write(lease, written.seq, entries[20:])
            assert after.cluster_id == OLD == (await named.checkpoint()).cluster_id
            with pytest.raises(ForeignTimeline):  # an indexer without an id cannot tell
                await unnamed.write(lease, after.seq, [])
        finally:
            await unnamed.close()
            await named.close()

    asyncio.run(go())


# ---------------------------------------------------------------------------- adoption


def test_an_adoption_refuses_what_would_mix_histories_and_changes_nothing(pg_url: str) -> None:
    story = restore_story(old_commands=300, tail_commands=100)
    point = story.point

    async def go() -> None:
        old = await PgSink.connect(pg_url, holder="n1", cluster_id=OLD)
        try:
            await write_all(old, [*story.head, *story.old_tail], seed=3)
            before = await table_dump(pg_url)
            wrong = (
                (dataclasses.replace(point, from_cluster_id="qb-other"), "not qb-other"),
                (dataclasses.replace(point, cmd_index=point.cmd_index - 1), "cmd_index"),
                (dataclasses.replace(point, seq=point.seq - 1), "not the end of command"),
            )
            for bad, message in wrong:
                with pytest.raises(AdoptError, match=message):
                    await adoption.run(pg_url, bad)
            assert await table_dump(pg_url) == before
            # A resync that skipped the restore point: the rows there are not known.
            conn = await asyncpg.connect(pg_url)
            try:
                await conn.execute(
                    "INSERT INTO indexer_resyncs (holder, epoch, skipped_from_seq, skipped_to_seq,"
                    " from_cmd_index, to_cmd_index, to_raft_index, state_hash, open_orders, "
                    "balances, orders_unknown) VALUES ('n1', 1, $1, $2, 0, 0, 0, '', 0, 0, 0)",
                    point.seq - 5,
                    point.seq + 5,
                )
            finally:
                await conn.close()
            with pytest.raises(AdoptError, match="fresh database"):
                await adoption.run(pg_url, point)
        finally:
            await old.close()

    asyncio.run(go())


def test_an_adoption_of_a_database_behind_the_point_only_names_the_new_cluster(
    pg_url: str,
) -> None:
    story = restore_story(old_commands=300, tail_commands=50)
    point = story.point

    async def go() -> None:
        old = await PgSink.connect(pg_url, holder="n1", cluster_id=OLD)
        try:
            head = story.head
            written = await write_all(old, head[: len(head) // 2], seed=4)
            before = await table_dump(pg_url)
            record = await adoption.run(pg_url, point)
            assert record["events_orphaned"] == 0 and "nothing past" in adoption.describe(record)
            after = await table_dump(pg_url)
            assert {k: v for k, v in after.items() if k != "indexer_checkpoint"} == {
                k: v for k, v in before.items() if k != "indexer_checkpoint"
            }
            checkpoint = await old.checkpoint()
            assert checkpoint == dataclasses.replace(written, cluster_id=NEW)
        finally:
            await old.close()

    asyncio.run(go())


def test_the_adopt_command_reads_the_restore_record(pg_url: str, tmp_path) -> None:
    from cluster.cli import main

    story = restore_story(old_commands=200, tail_commands=50)
    point = story.point

    async def prepare() -> None:
        old = await PgSink.connect(pg_url, holder="n1", cluster_id=OLD)
        try:
            await write_all(old, [*story.head, *story.old_tail], seed=6)
        finally:
            await old.close()

    asyncio.run(prepare())
    restore_json = tmp_path / "restore.json"
    restore_json.write_text(
        orjson.dumps(
            {"cluster_id": NEW, "from_cluster_id": OLD, "seq": point.seq,
             "cmd_index": point.cmd_index, "log_index": point.raft_index, "state_hash": "x"}
        ).decode()
    )  # fmt: skip
    args = ["indexer", "adopt", "--restore-json", str(restore_json), "--postgres-url", pg_url]
    dry = CliRunner().invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith(f"would adopt cluster {NEW} from seq {point.seq}")
    done = CliRunner().invoke(main, [*args, "--json"])
    assert done.exit_code == 0, done.output
    record = orjson.loads(done.output)
    assert (record["to_cluster_id"], record["at_seq"], record["dry_run"]) == (NEW, point.seq, False)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already" in again.output


# ---------------------------------------------------------------------------- Kafka


def test_kafka_records_name_their_cluster_and_the_consumer_follows_the_restored_one(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Kafka cannot be rewritten: the old history's events past the restore point stay in the
    topics. The cluster id header lets the example consumer start the restored history's count
    over (its seqs reuse the old ones) and drop late copies of the old."""
    story = restore_story(old_commands=300, tail_commands=150)
    head = story.head

    async def go() -> EventReader:
        old = await KafkaSink.connect(
            kafka_bootstrap, prefix=topic_prefix, partitions=2, cluster_id=OLD
        )
        new = await KafkaSink.connect(
            kafka_bootstrap, prefix=topic_prefix, partitions=2, cluster_id=NEW
        )
        try:
            await old.publish([*head, *story.old_tail])
            await new.publish(story.new_tail)
            await old.publish(story.old_tail[-3:])  # a late copy of the old history
            await new.publish(story.new_tail[-2:])  # a retry of the new one
        finally:
            await old.close()
            await new.close()
        reader = EventReader(kafka_bootstrap, prefix=topic_prefix)
        async with reader:
            reader.got = [event async for event in reader.events()]
        return reader

    reader = asyncio.run(go())
    want = [*story.old.events, *story.new.events[story.point.seq :]]
    assert Counter(orjson.dumps(e) for e in reader.got) == Counter(orjson.dumps(e) for e in want)
    copies = sum(len(e.events) for e in [*story.old_tail[-3:], *story.new_tail[-2:]])
    assert reader.duplicates + reader.retired_dropped == copies and reader.retired_dropped > 0
    assert reader.switches and all(
        (s["from"], s["to"]) == (OLD, NEW) and s["first_seq"] > story.point.seq
        for s in reader.switches
    )
    moved = [p for p in reader.positions().values() if p["retired"]]
    assert moved and all(p["cluster_id"] == NEW and p["retired"] == [OLD] for p in moved)
