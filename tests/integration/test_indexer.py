"""The indexer end to end: a real 3-node cluster streaming to the real embedded PostgreSQL and
broker, under the faults of issue 10 (a streamer killed, paused past its lease, PostgreSQL
down, a leader change, the log compacted past the checkpoint)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.launcher import LocalCluster
from cluster.machine import ExchangeMachine
from cluster.raft import JournalReader, payload_of_entry, read_dump
from cluster.workload import DepositLoad, book_commands, book_flow, book_setup, wait_for
from indexer.consume import EventReader
from indexer.services import Services

from .conftest import admin

QB = [sys.executable, "-m", "cluster"]


def indexed(cluster: LocalCluster) -> dict[str, dict]:
    return {nid: (s or {}).get("indexer", {}) for nid, s in cluster.statuses().items()}


def streamer(cluster: LocalCluster, other_than: str | None = None) -> str | None:
    """A node whose indexer says it streams (other than `other_than`: a paused process's last
    word stays "active"), if one does."""
    return next(
        (nid for nid, ix in indexed(cluster).items() if ix.get("active") and nid != other_than),
        None,
    )


def fetch(url: str, sql: str, *args) -> list:
    async def go() -> list:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def caught_up(cluster: LocalCluster, pg_url: str, timeout_s: float = 60) -> int:
    """Wait until PostgreSQL holds every event the leader applied; return its last seq."""
    with admin(cluster) as client:
        client.barrier()

    def done() -> int | None:
        statuses = cluster.statuses()
        leader = next((s for s in statuses.values() if s and s["role"] == "leader"), None)
        if leader is None:
            return None
        seq = leader_seq(cluster)
        rows = fetch(pg_url, "SELECT seq FROM indexer_checkpoint")
        return seq if rows and rows[0]["seq"] == seq else None

    try:
        return wait_for(done, timeout_s, "the indexer to catch up")
    except TimeoutError as exc:
        checkpoint = fetch(pg_url, "SELECT * FROM indexer_checkpoint")
        raise AssertionError(
            f"{exc}: checkpoint {checkpoint}, indexers {indexed(cluster)}"
        ) from None


def leader_seq(cluster: LocalCluster) -> int:
    """The leader's last event seq (a stale read says the seq it reflects in X-QB-Seq)."""
    leader = cluster.wait_for_leader(20)
    url = cluster.nodes[leader].config.api_url
    return int(httpx.get(url + "/v1/markets?consistency=stale", timeout=5).headers["X-QB-Seq"])


def replica_exchange(data_dir: Path):
    """The state machine of a stopped node, rebuilt from its dump and journal: what the
    tables must equal."""
    machine = ExchangeMachine()
    next_index = 1
    if (data_dir / "raft.dump").exists():
        header, blob = read_dump(data_dir / "raft.dump")
        machine.restore(blob)
        next_index = header.index + 1
    reader = JournalReader(data_dir / "raft.journal")
    try:
        while entries := reader.read(next_index, 10**12, 1000):
            for command, index, _term in entries:
                payload = payload_of_entry(command)
                if payload is not None:
                    machine.apply(payload)
                next_index = index + 1
    finally:
        reader.close()
    return machine.exchange


def assert_tables_equal_the_state(pg_url: str, exchange) -> None:
    seqs = [r["seq"] for r in fetch(pg_url, "SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, exchange.seq + 1)), "events not exactly once and contiguous"
    rows = fetch(pg_url, "SELECT account, asset, available, reserved FROM balances")
    tables = {(r["account"], r["asset"]): (r["available"], r["reserved"]) for r in rows}
    assert tables == {k: v for k, v in exchange.balances().items()}
    open_rows = fetch(pg_url, "SELECT order_id, remaining, price FROM orders WHERE status = 'open'")
    assert {r["order_id"]: (r["remaining"], r["price"]) for r in open_rows} == {
        o["order_id"]: (o["remaining"], o["price"]) for o in exchange.open_orders()
    }
    trades = fetch(pg_url, "SELECT count(*) AS n, coalesce(sum(qty), 0) AS q FROM trades")[0]
    events = fetch(
        pg_url,
        "SELECT count(*) AS n, coalesce(sum((body->>'qty')::bigint), 0) AS q FROM events "
        "WHERE type = 'trade'",
    )[0]
    assert (trades["n"], trades["q"]) == (events["n"], events["q"])


def metric_values(api_url: str) -> dict[str, float]:
    """The node's /metrics samples without labels, by name."""
    text = httpx.get(api_url + "/metrics", timeout=5).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def every_event_once(cluster: LocalCluster, pg_url: str) -> int:
    """Wait until PostgreSQL caught up; every event is there once, in order: its last seq."""
    seq = caught_up(cluster, pg_url)
    assert [r["seq"] for r in fetch(pg_url, "SELECT seq FROM events ORDER BY seq")] == list(
        range(1, seq + 1)
    )
    return seq


def kill_followers_indexers(cluster: LocalCluster) -> None:
    """SIGKILL the followers' indexer processes (their nodes start them again)."""
    for nid, ix in indexed(cluster).items():
        if nid != cluster.wait_for_leader():
            os.kill(ix["pid"], signal.SIGKILL)


def kafka_seqs(bootstrap: str, prefix: str) -> list[int]:
    async def go() -> list[int]:
        async with EventReader(bootstrap, prefix=prefix) as reader:
            return sorted([event["seq"] async for event in reader.events()])

    return asyncio.run(go())


@pytest.fixture
def indexed_cluster(make_cluster, services: Services, pg_url: str, topic_prefix: str):
    def make(**settings) -> LocalCluster:
        return make_cluster(
            3,
            postgres_url=pg_url,
            kafka_bootstrap=services.kafka.bootstrap,
            topic_prefix=topic_prefix,
            lease_ttl_s=1.5,
            **settings,
        )

    return make


def submit_session(cluster: LocalCluster, orders: int, seed: int = 3) -> None:
    flow = book_flow(orders, seed=seed, warmup=orders, accounts=40)
    commands = book_setup(flow.accounts) + book_commands(flow.warmup + flow.ops, 10)
    for command in commands:
        command.pop("ts", None)
    with admin(cluster) as client:
        for i in range(0, len(commands), 200):
            client.submit(commands[i : i + 200])


def test_a_session_lands_exactly_once_and_the_tables_equal_the_state(
    indexed_cluster, services, pg_url, topic_prefix
) -> None:
    cluster = indexed_cluster()
    submit_session(cluster, 1500)
    seq = caught_up(cluster, pg_url)
    assert seq > 3000
    leader = cluster.wait_for_leader()
    statuses = wait_for(
        lambda: (
            (s := indexed(cluster))
            and all(ix.get("checkpoint_seq") == seq for ix in s.values())
            and s
        ),
        20,
        "every indexer to report the checkpoint",
    )
    assert not statuses[leader]["active"], "a leader never streams"
    assert [ix["active"] for ix in statuses.values()].count(True) == 1, statuses
    assert all(ix["lag_events"] == 0 for ix in statuses.values()), statuses
    assert kafka_seqs(services.kafka.bootstrap, topic_prefix) == list(range(1, seq + 1))
    active = next(nid for nid, ix in statuses.items() if ix["active"])
    # The URL (a password in it) is not on the indexer's command line, which `ps` shows.
    cmdline = Path(f"/proc/{statuses[active]['pid']}/cmdline").read_bytes().decode()
    assert "cluster.indexer_process" in cmdline and pg_url not in cmdline
    metrics = metric_values(cluster.nodes[active].config.api_url)
    assert metrics["qb_indexer_active"] == 1 and metrics["qb_indexer_alarm"] == 0
    assert metrics["qb_indexer_checkpoint_seq"] == seq and metrics["qb_indexer_lag_events"] == 0
    # Each event written by one commit of one streamer (no fault here to lose a reply).
    assert sum(ix["events_written"] for ix in statuses.values()) == seq
    assert metrics["qb_indexer_events_written_total"] == statuses[active]["events_written"] > 0
    follower = next(nid for nid in cluster.nodes if nid != leader)
    data_dir = cluster.nodes[follower].config.data_dir
    cluster.stop_all()
    assert_tables_equal_the_state(pg_url, replica_exchange(data_dir))


def test_a_killed_streamer_is_replaced_and_nothing_is_written_twice(
    indexed_cluster, services, pg_url, topic_prefix
) -> None:
    cluster = indexed_cluster()
    with DepositLoad.on(cluster, per_request=20) as load:
        load.wait_acked(200)
        active = wait_for(lambda: streamer(cluster), 30, "a streamer")
        indexer_pid = indexed(cluster)[active]["pid"]
        cluster.kill(active)  # the node, and its indexer process with it
        os.kill(indexer_pid, signal.SIGKILL)
        other = wait_for(
            lambda: streamer(cluster, other_than=active),
            30,
            "another follower to take over",
        )
        assert other != active
        load.wait_acked(len(load.acked) + 300)
        # The killed node restarts and is the only other follower: once the streamer that
        # took over is killed too, it must go on from the checkpoint, from its own log.
        cluster.start(active)
        wait_for(lambda: indexed(cluster)[active].get("state") == "standby", 30, "its standby")
        other_pid = indexed(cluster)[other]["pid"]
        cluster.kill(other)
        os.kill(other_pid, signal.SIGKILL)
        wait_for(lambda: streamer(cluster, other_than=other) == active, 30, "its takeover")
        load.wait_acked(len(load.acked) + 300)
        cluster.start(other)
    seq = caught_up(cluster, pg_url)
    assert kafka_seqs(services.kafka.bootstrap, topic_prefix) == list(range(1, seq + 1))
    rows = fetch(pg_url, "SELECT seq FROM events ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, seq + 1))


def test_a_streamer_paused_past_its_lease_never_writes_again(indexed_cluster, pg_url) -> None:
    cluster = indexed_cluster()
    with DepositLoad.on(cluster, per_request=10) as load:
        load.wait_acked(100)
        paused = wait_for(lambda: streamer(cluster), 30, "a streamer")
        pid = indexed(cluster)[paused]["pid"]
        epoch = fetch(pg_url, "SELECT epoch FROM indexer_lease")[0]["epoch"]
        os.kill(pid, signal.SIGSTOP)
        try:
            taker = wait_for(
                lambda: streamer(cluster, other_than=paused),
                30,
                "a takeover while the streamer is paused",
            )
            load.wait_acked(len(load.acked) + 200)
            holder = fetch(pg_url, "SELECT holder, epoch FROM indexer_lease")[0]
            assert holder["holder"] == taker and holder["epoch"] > epoch
        finally:
            os.kill(pid, signal.SIGCONT)
        # Awake, it has a batch in hand from before the pause: its write must be refused.
        wait_for(
            lambda: (
                indexed(cluster)[paused].get("fenced", 0) >= 1
                or not indexed(cluster)[paused].get("active")
            ),
            20,
            "the zombie to stand down",
        )
        load.wait_acked(len(load.acked) + 100)
    every_event_once(cluster, pg_url)
    writers = fetch(pg_url, "SELECT holder FROM indexer_lease")[0]["holder"]
    assert writers != paused or indexed(cluster)[paused]["active"]


def test_postgres_down_for_a_while_then_the_indexer_catches_up(
    indexed_cluster, services, pg_url
) -> None:
    cluster = indexed_cluster()
    with DepositLoad.on(cluster, per_request=10) as load:
        load.wait_acked(100)
        wait_for(lambda: streamer(cluster), 30, "a streamer")
        services.postgres.stop()
        try:
            load.wait_acked(len(load.acked) + 300)
            wait_for(
                lambda: any(ix.get("last_error") for ix in indexed(cluster).values()),
                20,
                "the indexer to notice",
            )
        finally:
            services.postgres.run()
        load.wait_acked(len(load.acked) + 100)
    every_event_once(cluster, pg_url)


def test_a_leader_change_while_streaming_keeps_exactly_once(indexed_cluster, pg_url) -> None:
    """The streaming follower becomes the leader (a transfer: pysyncobj's needs its target
    fully caught up, so the load pauses for it): it stops streaming, and the other follower
    goes on from the checkpoint."""
    cluster = indexed_cluster()
    with DepositLoad.on(cluster, per_request=10) as load:
        load.wait_acked(300)
    active = wait_for(lambda: streamer(cluster), 30, "a streamer")
    cluster.transfer_leadership(active)
    with DepositLoad.on(cluster, per_request=10) as load:
        load.counter = iter(range(10_000, 20_000))  # new refs: not duplicates of the first load
        wait_for(
            lambda: streamer(cluster, other_than=active), 30, "the other follower to take over"
        )
        load.wait_acked(200)
    assert cluster.wait_for_leader() == active
    lease = fetch(pg_url, "SELECT holder FROM indexer_lease")[0]
    assert lease["holder"] != active, "the new leader must not hold the lease"
    assert not indexed(cluster)[active]["active"], "the new leader's status must say so"
    every_event_once(cluster, pg_url)


def resync_command(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    config = cluster.nodes[next(iter(cluster.nodes))].config_path
    return subprocess.run(
        [*QB, "indexer", "resync", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_log_hold_keeps_the_events_through_an_outage_and_indexer_restarts(
    indexed_cluster, services, pg_url
) -> None:
    """PostgreSQL down while every node compacts past the checkpoint, and the followers'
    indexer processes restarted meanwhile (their open journal files gone with them): the log
    hold at the checkpoint (`[indexer] log_hold_mb`) kept a state before it and the journal
    after it on every node, so the indexer goes on with no alarm and no resync, every event
    once. Without the hold this is the scenario of the next test."""
    cluster = indexed_cluster(compaction_min_entries=50, compaction_min_time_s=0.5)
    wait_for(lambda: streamer(cluster), 30, "a streamer")
    with DepositLoad.on(cluster, per_request=5) as load:
        load.wait_acked(50)
        # A node holds at its indexer's checkpoint once that indexer has read it, and before
        # that at the state it started with (ADR 0007): the database goes down after every
        # indexer read one (a clean clone stopped it first once, and the hold stayed put).
        wait_for(
            lambda: all(
                type(ix.get("checkpoint_raft_index")) is int for ix in indexed(cluster).values()
            ),
            30,
            "every indexer to read its checkpoint",
        )
        services.postgres.stop()
        try:
            load.wait_acked(len(load.acked) + 2000)

            def held_past_the_dump(status: dict | None) -> bool:
                """The node compacted past its indexer's checkpoint and kept the log after it."""
                raft = status and status["raft"]
                hold = raft and raft["compaction_hold"]
                return bool(
                    hold is not None
                    and hold == status["indexer"]["checkpoint_raft_index"]
                    and raft["log_first_index"] <= hold + 1 < raft["dump_index"]
                )

            def holds() -> dict:
                keys = ("compaction_hold", "log_first_index", "dump_index")
                return {
                    nid: {
                        "checkpoint": (s or {}).get("indexer", {}).get("checkpoint_raft_index"),
                        **{k: (s or {}).get("raft", {}).get(k) for k in keys},
                    }
                    for nid, s in cluster.statuses().items()
                }

            try:
                wait_for(
                    lambda: all(held_past_the_dump(s) for s in cluster.statuses().values()),
                    30,
                    "every node to compact past the checkpoint, keeping the log after it",
                )
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {holds()}") from exc
            for nid, node in cluster.nodes.items():
                figures = metric_values(node.config.api_url)
                raft = cluster.status(nid)["raft"]
                assert figures["qb_raft_compaction_hold"] == raft["compaction_hold"]
                assert figures["qb_raft_dump_index"] > raft["compaction_hold"]
            kill_followers_indexers(cluster)
        finally:
            services.postgres.run()
        load.wait_acked(len(load.acked) + 200)
    every_event_once(cluster, pg_url)
    assert fetch(pg_url, "SELECT * FROM indexer_resyncs") == []
    assert all(ix["gone_from_seq"] is None for ix in indexed(cluster).values())


def test_events_compacted_away_raise_the_alarm_and_resync_rebuilds_the_tables(
    indexed_cluster, services, pg_url, topic_prefix
) -> None:
    # Without the log hold (or past its bound): see the next test for the hold.
    cluster = indexed_cluster(compaction_min_entries=50, compaction_min_time_s=0.5, log_hold_mb=0)
    # Streaming before the load: with dumps every 50 entries, a load that started first could
    # compact the log past the (empty) checkpoint before any indexer connected.
    wait_for(lambda: streamer(cluster), 30, "a streamer")
    # No alarm, nobody serves a resync: the command gives up and withdraws its request.
    refused = resync_command(cluster, "--wait-s", "1")
    assert refused.returncode == 1 and "withdrawn" in refused.stderr, refused
    with DepositLoad.on(cluster, per_request=5) as load:
        load.wait_acked(50)
        services.postgres.stop()
        try:
            load.wait_acked(len(load.acked) + 2000)  # every member compacts past the checkpoint
            # A streamer keeps the journal files its node compacts into while it runs
            # (tests/cluster/test_indexer_source.py): the events are gone for one that
            # restarts meanwhile. Its node starts it again.
            kill_followers_indexers(cluster)
        finally:
            services.postgres.run()
        wait_for(
            lambda: all(
                ix.get("gone_from_seq")
                for nid, ix in indexed(cluster).items()
                if nid != cluster.wait_for_leader()
            ),
            60,
            "the alarm",
        )
        done = resync_command(cluster)  # under load: the logs compact on meanwhile
        assert done.returncode == 0, done.stderr
        assert "resynced at seq" in done.stdout
        load.wait_acked(len(load.acked) + 200)
    (resync,) = fetch(pg_url, "SELECT * FROM indexer_resyncs")
    assert resync["request_id"] == 2  # the first request was withdrawn, never served
    seq = caught_up(cluster, pg_url)
    skipped = range(resync["skipped_from_seq"], resync["skipped_to_seq"] + 1)
    assert len(skipped) > 0
    expected = [s for s in range(1, seq + 1) if s not in skipped]
    assert [r["seq"] for r in fetch(pg_url, "SELECT seq FROM events ORDER BY seq")] == expected
    # Kafka has every event PostgreSQL has; the skipped range may have a batch published
    # before PostgreSQL went down (at least once: they are real events, never written twice).
    published = set(kafka_seqs(services.kafka.bootstrap, topic_prefix))
    assert published >= set(expected) and published - set(expected) <= set(skipped)
    assert all(
        ix["state"] in ("active", "standby", "idle") and ix["resyncs"] == (nid == resync["holder"])
        for nid, ix in indexed(cluster).items()
    ), indexed(cluster)
    follower = next(nid for nid in cluster.nodes if nid != cluster.wait_for_leader())
    data_dir = cluster.nodes[follower].config.data_dir
    cluster.stop_all()
    exchange = replica_exchange(data_dir)
    assert exchange.seq == seq
    rows = fetch(pg_url, "SELECT account, asset, available, reserved FROM balances")
    assert {(r["account"], r["asset"]): (r["available"], r["reserved"]) for r in rows} == dict(
        exchange.balances()
    )
