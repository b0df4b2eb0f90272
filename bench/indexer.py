"""Indexer benchmark: events/s into PostgreSQL and into Kafka, and commit-to-row lag through a
real cluster.

    .venv/bin/python -m bench.indexer [--orders N] [--rate EVENTS_PER_S] [--lag-seconds S]

One run, on this machine, against the embedded PostgreSQL and broker it starts itself
(indexer/services.py; stopped by pid on every path):

0. A recorded event stream: `cluster.workload.book_flow`, the seeded order flow (a warm-up
   book, then `--orders` orders and cancels), applied to an `Exchange` in log entries of
   `ENTRY_COMMANDS` commands, with each entry's events: what a replica hands the streamer.
1. PostgreSQL: `PgSink.write`, the streamer's own write path (the events, trades, orders and
   balances rows and the checkpoint in one transaction per batch, fenced by the lease,
   `synchronous_commit` on), batches of ~`batch_max_events` (the config's default). Peer,
   same run, same events: asyncpg's `copy_records_to_table` of one row per event (seq, type,
   JSON body) into a bare table, encoding included: the database's ceiling for the events
   alone. Target: >= 50,000 events/s.
2. Kafka: `KafkaSink.publish` of the same batches (topic per kind, key per market, seq header,
   acks=all, every batch acknowledged before the next). Peer: aiokafka's producer the plain
   way, `send()` per record of the same JSON to one topic, acknowledged once at the end (no
   per-batch wait): what the sink's own batching is measured against.
3. Lag: a local 3-node cluster whose nodes run the indexer on these services. After the
   set-up, an admin client submits the flow's commands open loop at `--rate` events/s (batch
   i scheduled at t0 + i * period; `SENDERS` threads take them in turn; the command rate is
   the rate over the stream's events per command). A poller reads the PostgreSQL checkpoint
   every `POLL_S`. For each acknowledged batch, the lag of its last event to its row:
   * from the acknowledgement: the time the checkpoint first reached the event's seq minus
     the time the client read the answer. The entry was committed before the answer left the
     leader, so this is a lower bound of commit-to-row (short by the answer's way back);
   * from the leader's stamp: the same minus the event's `ts` (the leader's clock, stamped
     when it proposed the batch; same machine, same clock): an upper bound, which includes
     the replication round itself.
   Target: p99 <= 200 ms (commit-to-row lies between the two; the target is judged on the
   upper bound).

The machine's two cores are shared by the services, the three nodes, their indexers and this
client: the report prints the CPU count and load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import orjson

from bench.replication import _percentile
from cluster import workload
from cluster.config import Indexer
from indexer.events import Entry
from indexer.services import Services

ENTRY_COMMANDS = 100  # commands per log entry (the node batches a busy queue in such runs)
POLL_S = 0.002
SENDERS = 4
PERIOD_S = 0.02  # one submitted batch per period, at the target rate


# ------------------------------------------------------------------------------ the stream


def commands(orders: int, seed: int) -> list[dict]:
    flow = workload.book_flow(orders, seed=seed, warmup=orders // 5, accounts=300)
    return [
        *workload.book_setup(flow.accounts),
        *workload.book_commands(flow.warmup + flow.ops, ts_start=10),
    ]


def record(cmds: list[dict]) -> list[Entry]:
    from statemachine import Exchange

    exchange = Exchange()
    entries = []
    for index, start in enumerate(range(0, len(cmds), ENTRY_COMMANDS), start=1):
        events = [e for c in cmds[start : start + ENTRY_COMMANDS] for e in exchange.apply(dict(c))]
        entries.append(Entry(index, exchange.cmd_index, tuple(events)))
    return entries


def batches_of(entries: list[Entry], events_max: int) -> list[list[Entry]]:
    out: list[list[Entry]] = [[]]
    count = 0
    for entry in entries:
        if out[-1] and count + len(entry.events) > events_max:
            out.append([])
            count = 0
        out[-1].append(entry)
        count += len(entry.events)
    return out


def events_in(batches: list[list[Entry]]) -> int:
    return sum(len(e.events) for b in batches for e in b)


# ------------------------------------------------------------------------------ PostgreSQL


async def new_database(url: str, name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.rsplit("/", 1)[0] + f"/{name}"


async def pg_write(url: str, batches: list[list[Entry]]) -> tuple[int, float]:
    from indexer.postgres import PgSink

    sink = await PgSink.connect(url, holder="bench", lease_ttl_s=600)  # no renewal needed
    try:
        lease = await sink.try_acquire()
        assert lease is not None
        warm, timed = batches[:2], batches[2:]
        seq = 0
        for batch in warm:  # statements prepared, the set-up's rows written
            seq = (await sink.write(lease, seq, batch)).seq
        started = time.perf_counter()
        for batch in timed:
            seq = (await sink.write(lease, seq, batch)).seq
        return events_in(timed), time.perf_counter() - started
    finally:
        await sink.close()


async def pg_copy(url: str, batches: list[list[Entry]]) -> tuple[int, float]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE bench_events (seq bigint PRIMARY KEY, type text NOT NULL, "
            "body jsonb NOT NULL)"
        )
        timed = batches[2:]
        started = time.perf_counter()
        for batch in timed:
            rows = [
                (e["seq"], e["type"], orjson.dumps(e).decode())
                for entry in batch
                for e in entry.events
            ]
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "bench_events", records=rows, columns=["seq", "type", "body"]
                )
        return events_in(timed), time.perf_counter() - started
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ Kafka


async def kafka_publish(bootstrap: str, batches: list[list[Entry]]) -> tuple[int, float]:
    from indexer.kafka import KafkaSink

    sink = await KafkaSink.connect(bootstrap, prefix="bench")
    try:
        await sink.publish(batches[0])
        timed = batches[2:]
        started = time.perf_counter()
        for batch in timed:
            await sink.publish(batch)
        return events_in(timed), time.perf_counter() - started
    finally:
        await sink.close()


async def kafka_raw(bootstrap: str, batches: list[list[Entry]]) -> tuple[int, float]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=900 * 1024, linger_ms=5
    )
    await producer.start()
    try:
        await (await producer.send("bench-raw", b"warm"))
        timed = batches[2:]
        started = time.perf_counter()
        for batch in timed:
            for entry in batch:
                for e in entry.events:
                    await producer.send(
                        "bench-raw", orjson.dumps(e), key=str(e.get("market", "")).encode()
                    )
        await producer.flush()
        return events_in(timed), time.perf_counter() - started
    finally:
        await producer.stop()


# ------------------------------------------------------------------------------ lag


class CheckpointPoller:
    """Reads the checkpoint every POLL_S in its own thread: (time, seq) at every change."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, int]] = [(0.0, 0)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not self._stop.is_set():
                seq = await conn.fetchval("SELECT seq FROM indexer_checkpoint")
                if seq is not None and seq != self.seen[-1][1]:
                    self.seen.append((time.time(), seq))
                await asyncio.sleep(POLL_S)
        finally:
            await conn.close()

    def reached(self, seq: int) -> float | None:
        """When the checkpoint first reached `seq` (binary search over the changes)."""
        lo, hi = 0, len(self.seen)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.seen[mid][1] >= seq:
                hi = mid
            else:
                lo = mid + 1
        return self.seen[lo][0] if lo < len(self.seen) else None

    def __enter__(self) -> CheckpointPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_lag(
    root: Path,
    services: Services,
    cmds: list[dict],
    per_command: float,
    rate: float,
    seconds: float,
) -> dict:
    """`per_command`: the flow's events per command (from the recorded stream)."""
    from api.sdk import AdminClient
    from cluster.launcher import LocalCluster

    url = asyncio.run(new_database(services.postgres.url, "bench_lag"))
    for command in cmds:
        command.pop("ts", None)
    setup = [c for c in cmds if c["op"] in ("create_market", "deposit")]
    flow = [c for c in cmds if c["op"] not in ("create_market", "deposit")]
    per_batch = max(1, round(rate * PERIOD_S / per_command))
    defaults = Indexer()
    cluster = LocalCluster.create(
        root / "cluster",
        3,
        postgres_url=url,
        kafka_bootstrap=services.kafka.bootstrap,
        topic_prefix="lag",
        lease_ttl_s=defaults.lease_ttl_s,
    )
    cluster.exit_with_launcher = True
    try:
        cluster.start()
        cluster.wait_all_following(60)
        deadline = time.monotonic() + 60  # a streamer up: the tables exist, the lease is held
        while not any(
            (st or {}).get("indexer", {}).get("active") for st in cluster.statuses().values()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no indexer streams after 60 s: {cluster.statuses()}")
            time.sleep(0.1)
        credentials = cluster.admin_credentials()
        with AdminClient(cluster.api_urls(), credentials) as client:
            for i in range(0, len(setup), 500):
                client.submit(setup[i : i + 500])
        batches = [flow[i : i + per_batch] for i in range(0, len(flow), per_batch)]
        wanted = min(len(batches), int(seconds / PERIOD_S))
        acks: list[tuple[float, int, int, int]] = []  # (ack time, last seq, its ts ns, events)
        lock = threading.Lock()
        cursor = iter(range(wanted))
        t0 = time.time() + 0.5
        errors: list[str] = []

        def sender() -> None:
            with AdminClient(cluster.api_urls(), credentials) as client:
                while True:
                    with lock:
                        i = next(cursor, None)
                    if i is None:
                        return
                    delay = t0 + i * PERIOD_S - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    try:
                        results = client.submit(batches[i], deadline_s=10)
                    except Exception as exc:  # counted, printed: a benchmark never hides one
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    acked = time.time()
                    events = [e for r in results for e in r.get("events", ())]
                    if events:
                        with lock:
                            acks.append((acked, events[-1]["seq"], events[-1]["ts"], len(events)))

        with CheckpointPoller(url) as poller:
            threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            last = max(seq for _, seq, _, _ in acks)
            deadline = time.monotonic() + 30
            while poller.seen[-1][1] < last and time.monotonic() < deadline:
                time.sleep(0.05)
        sent_s = max(a for a, _, _, _ in acks) - t0
        from_ack, from_stamp = [], []
        for acked, seq, ts_ns, _ in acks:
            row = poller.reached(seq)
            if row is None:
                continue
            from_ack.append(max(0.0, row - acked) * 1000)
            from_stamp.append((row - ts_ns / 1e9) * 1000)
        return {
            "events": sum(n for _, _, _, n in acks),
            "seconds": sent_s,
            "batches": len(acks),
            "commands_per_batch": per_batch,
            "errors": errors,
            "unreached": len(acks) - len(from_ack),
            "from_ack": from_ack,
            "from_stamp": from_stamp,
        }
    finally:
        cluster.stop_all()


# ------------------------------------------------------------------------------ report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=10_000.0, help="events/s for the lag run")
    ap.add_argument("--lag-seconds", type=float, default=20.0)
    opts = ap.parse_args()

    cmds = commands(opts.orders, opts.seed)
    entries = record(cmds)
    batch_max = Indexer().batch_max_events
    batches = batches_of(entries, batch_max)
    print(
        f"indexer benchmark: {len(cmds)} commands -> {sum(len(e.events) for e in entries)} "
        f"events in {len(entries)} entries of {ENTRY_COMMANDS} commands; batches of "
        f"<= {batch_max} events; {os.cpu_count()} CPUs"
    )
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qb-bench-ix-")))
        services = stack.enter_context(Services.start(root / "services"))
        print(f"  services: {services.postgres.url}  kafka {services.kafka.bootstrap}")

        async def throughput() -> dict:
            ours = await new_database(services.postgres.url, "bench_write")
            peer = await new_database(services.postgres.url, "bench_copy")
            return {
                "pg": await pg_write(ours, batches),
                "pg_copy": await pg_copy(peer, batches),
                "kafka": await kafka_publish(services.kafka.bootstrap, batches),
                "kafka_raw": await kafka_raw(services.kafka.bootstrap, batches),
            }

        figures = asyncio.run(throughput())

        def rate(key: str) -> float:
            events, seconds = figures[key]
            return events / seconds

        print(
            f"1. PostgreSQL  PgSink.write {rate('pg'):>9,.0f} events/s   "
            f"peer COPY of the events alone {rate('pg_copy'):>9,.0f} rows/s   "
            f"ratio {rate('pg') / rate('pg_copy'):.2f}   target >= 50,000: "
            f"{'met' if rate('pg') >= 50_000 else 'MISSED'}"
        )
        print(
            f"2. Kafka       KafkaSink.publish {rate('kafka'):>9,.0f} events/s   "
            f"peer aiokafka send() per record {rate('kafka_raw'):>9,.0f} events/s   "
            f"ratio {rate('kafka') / rate('kafka_raw'):.2f}"
        )
        setup = sum(1 for c in cmds if c["op"] in ("create_market", "deposit"))
        per_command = (sum(len(e.events) for e in entries) - setup) / (len(cmds) - setup)
        lag = run_lag(root, services, cmds, per_command, opts.rate, opts.lag_seconds)
        load = os.getloadavg()
        achieved = lag["events"] / lag["seconds"] if lag["seconds"] > 0 else 0.0
        print(
            f"3. Lag at {opts.rate:,.0f} events/s wanted ({lag['commands_per_batch']} commands "
            f"per batch every {PERIOD_S * 1000:.0f} ms): {achieved:,.0f} events/s acknowledged "
            f"over {lag['seconds']:.1f} s, {lag['batches']} batches, {len(lag['errors'])} "
            f"errors, {lag['unreached']} never reached the checkpoint"
        )
        for name, values in (
            ("from the ack", lag["from_ack"]),
            ("from the stamp", lag["from_stamp"]),
        ):
            print(
                f"   commit-to-row {name:15} p50 {_percentile(values, 0.5):6.1f} ms   "
                f"p99 {_percentile(values, 0.99):6.1f} ms   max {max(values, default=0):6.1f} ms"
            )
        p99 = _percentile(lag["from_stamp"], 0.99)
        print(
            f"   target p99 <= 200 ms (upper bound): {'met' if p99 <= 200 else 'MISSED'}; "
            f"load average {load[0]:.2f} {load[1]:.2f}"
        )
        for error in lag["errors"][:5]:
            print(f"   error: {error}")


if __name__ == "__main__":
    main()
