"""The Kafka side of the indexer against the real broker (indexer/kafka.py, indexer/consume.py).

A recorded stream (a seeded session applied to a real `Exchange`, its events grouped into log
entries) goes through `KafkaSink.publish` in batches; the example consumer must read every
`seq` back exactly once and in `seq` order per key, also when the sink published some of it
twice (a retry after a crash or a takeover).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from indexer.consume import EventReader, tail
from indexer.events import TOPIC_OF_TYPE, TOPICS, Entry
from indexer.kafka import KafkaSink, KafkaUnavailable
from indexer.services import Tansu
from statemachine import Exchange
from tests.statemachine.strategies import MARKETS

SEED = 20240610
COMMANDS = 3000
ACCOUNTS = [f"acct{i:02d}" for i in range(12)]
BATCH_EVENTS = 1000


def recorded_stream(seed: int = SEED, commands: int = COMMANDS) -> list[Entry]:
    """A seeded session through a real exchange: two markets, a dozen accounts, places,
    cancels, amends, transfers and malformed commands (rejected, no account), 1-4 commands
    per log entry, now and then an entry without events (a barrier)."""
    rng = random.Random(seed)
    ts = 1_000
    cmds: list[dict] = [spec.create(ts) for spec in MARKETS]
    for account in ACCOUNTS:
        for asset, amount in (("USD", 50_000), ("BTC", 400), ("ETH", 400)):
            cmd = {"op": "deposit", "ts": ts, "account": account, "asset": asset}
            cmds.append(cmd | {"amount": amount, "ref": f"init:{account}:{asset}"})
    placed: list[dict] = []  # account, market, client_order_id of each place so far
    for i in range(commands):
        ts += rng.randint(0, 3)
        spec, account, r = rng.choice(MARKETS), rng.choice(ACCOUNTS), rng.random()
        if r < 0.6 or not placed:
            cmd = {"op": "place", "account": account, "market": spec.name}
            cmd |= {"side": rng.choice(("buy", "sell")), "qty": rng.randint(1, 8)}
            if rng.random() < 0.15:
                cmd["type"] = "market"
            else:
                price = spec.mid + rng.randint(-4, 4) * spec.tick_size
                cmd |= {"type": "limit", "price": max(spec.tick_size, price)}
            cmd["client_order_id"] = f"c{i}"
            placed.append({k: cmd[k] for k in ("account", "market", "client_order_id")})
        elif r < 0.8:
            cmd = {"op": "cancel", **rng.choice(placed[-40:])}
        elif r < 0.9:
            cmd = {"op": "amend", **rng.choice(placed[-40:]), "qty": rng.randint(1, 8)}
        elif r < 0.97:
            cmd = {"op": rng.choice(("deposit", "withdraw")), "account": account}
            cmd |= {"asset": rng.choice(("USD", "BTC", "ETH")), "amount": rng.randint(1, 500)}
            cmd["ref"] = f"tx{i}"
        else:
            cmd = {"op": "place", "market": spec.name}  # malformed: rejected, no account
        cmds.append({**cmd, "ts": ts})
    ex = Exchange()
    entries: list[Entry] = []
    at = 0
    while at < len(cmds):
        if rng.random() < 0.02:
            entries.append(Entry(len(entries) + 1, ex.cmd_index))
            continue
        take = cmds[at : at + rng.randint(1, 4)]
        at += len(take)
        events = tuple(event for cmd in take for event in ex.apply(cmd))
        entries.append(Entry(len(entries) + 1, ex.cmd_index, events))
    ex.check_invariants()
    return entries


def batches_of(entries: list[Entry], events: int = BATCH_EVENTS) -> list[list[Entry]]:
    """Whole entries, about `events` events a batch (as the streamer would hand them over)."""
    batches: list[list[Entry]] = [[]]
    count = 0
    for entry in entries:
        if count >= events:
            batches.append([])
            count = 0
        batches[-1].append(entry)
        count += len(entry.events)
    return batches


def events_of(entries: list[Entry]) -> list[dict]:
    return [event for entry in entries for event in entry.events]


def key_of(event: dict) -> str:
    return event.get("market") or event.get("account") or ""


@pytest.fixture(scope="module")
def stream() -> list[Entry]:
    return recorded_stream()


async def read_events(bootstrap: str, prefix: str, **kw) -> tuple[list[dict], EventReader]:
    async with EventReader(bootstrap, prefix=prefix, **kw) as reader:
        return [event async for event in reader.events()], reader


async def read_raw(bootstrap: str, prefix: str) -> list:
    """Every record of the prefix's topics as it is in the log, copies included."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [
            TopicPartition(f"{prefix}.{name}", partition)
            for name in TOPICS
            for partition in consumer.partitions_for_topic(f"{prefix}.{name}") or ()
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        while fetched := await consumer.getmany(timeout_ms=1000):
            for batch in fetched.values():
                records += batch
        return records
    finally:
        await consumer.stop()


async def publish_all(sink: KafkaSink, batches: list[list[Entry]]) -> list[tuple[int, float]]:
    """(events, seconds) per publish."""
    timings = []
    for batch in batches:
        started = time.perf_counter()
        last = await sink.publish(batch)
        timings.append((len(events_of(batch)), time.perf_counter() - started))
        assert last == max((e["seq"] for e in events_of(batch)), default=0)
    return timings


async def publish_until_it_works(sink: KafkaSink, entries: list[Entry], errors: list) -> int:
    """The streamer's loop: back off, publish again (each failure appended to `errors`)."""
    for _ in range(20):
        try:
            return await sink.publish(entries)
        except KafkaUnavailable as error:
            errors.append(str(error))
            await asyncio.sleep(0.5)
    pytest.fail(f"publish did not recover: {errors}")


def assert_each_seq_once_in_order_per_key(got: list[dict], expected: list[dict]) -> None:
    seqs = [event["seq"] for event in got]
    assert sorted(seqs) == [event["seq"] for event in expected], "every seq exactly once"
    by_seq = {event["seq"]: event for event in expected}
    assert all(event == by_seq[event["seq"]] for event in got)
    last_of_key: dict[tuple[str, str], int] = {}
    for event in got:
        key = (TOPIC_OF_TYPE[event["type"]], key_of(event))
        assert event["seq"] > last_of_key.get(key, 0), f"out of seq order for {key}"
        last_of_key[key] = event["seq"]


def test_every_seq_comes_back_once_in_seq_order_per_key(
    kafka_bootstrap: str, topic_prefix: str, stream: list[Entry]
) -> None:
    expected = events_of(stream)

    async def go() -> tuple[list, list[dict], EventReader, list]:
        sink = await KafkaSink.connect(kafka_bootstrap, prefix=topic_prefix, partitions=3)
        try:
            timings = await publish_all(sink, batches_of(stream))
            assert await sink.publish([Entry(1, 0)]) == 0  # nothing to send
        finally:
            await sink.close()
        got, reader = await read_events(kafka_bootstrap, topic_prefix)
        return timings, got, reader, await read_raw(kafka_bootstrap, topic_prefix)

    timings, got, reader, raw = asyncio.run(go())
    events = sum(n for n, _ in timings)
    seconds = sum(s for _, s in timings)
    per_batch = sorted(n / s for n, s in timings)
    print(
        f"\nKafkaSink.publish: {events} events in {len(timings)} calls of ~{BATCH_EVENTS}: "
        f"{events / seconds:,.0f} events/s overall, median call {per_batch[len(per_batch) // 2]:,.0f} events/s"
    )

    assert len(expected) > 10_000 and {e["type"] for e in expected} == set(TOPIC_OF_TYPE)
    assert_each_seq_once_in_order_per_key(got, expected)
    assert reader.duplicates == 0

    # The records themselves: topic, key, headers, compact JSON in the state machine's key
    # order, and one partition per key.
    assert len(raw) == len(expected)
    by_seq = {event["seq"]: event for event in expected}
    partition_of_key: dict[tuple[str, bytes], set[int]] = defaultdict(set)
    for record in raw:
        headers = dict(record.headers)
        event = by_seq[int(headers["seq"])]
        assert record.topic == f"{topic_prefix}.{TOPIC_OF_TYPE[event['type']]}"
        assert record.key == key_of(event).encode()
        assert headers == {
            "seq": str(event["seq"]).encode(),
            "cmd_index": str(event["cmd_index"]).encode(),
            "type": event["type"].encode(),
        }
        assert record.value == orjson.dumps(event)
        assert list(json.loads(record.value)) == list(event)
        partition_of_key[(record.topic, record.key)].add(record.partition)
    assert all(len(partitions) == 1 for partitions in partition_of_key.values())
    used = {(record.topic, record.partition) for record in raw}
    assert len({tp for tp in used if tp[0].endswith(".balances")}) > 1, "keys spread"
    assert (f"{topic_prefix}.orders", b"") in partition_of_key, "rejected without account"


def test_a_retry_publishes_again_and_the_consumer_drops_the_copies(
    kafka_bootstrap: str, topic_prefix: str, stream: list[Entry], tmp_path: Path
) -> None:
    """The streamer crashes after publishing but before recording it, so the next one starts
    from an older `seq`; a consumer tailing with stored positions prints each event once,
    across its own restarts too."""
    batches = batches_of(stream)
    half = len(batches) // 2
    state = tmp_path / "positions.json"
    expected = events_of(stream)

    async def go() -> tuple[list[str], list[dict], EventReader, int]:
        printed = []
        sink = await KafkaSink.connect(kafka_bootstrap, prefix=topic_prefix, partitions=2)
        try:
            await publish_all(sink, batches[:half])
            out = io.StringIO()
            await tail(kafka_bootstrap, prefix=topic_prefix, state=state, out=out)
            printed.append(out.getvalue())
            # The takeover: the last two batches again, then on to the end; then the whole
            # stream once more (the worst case: everything again).
            await publish_all(sink, batches[half - 2 :])
            await publish_all(sink, batches)
        finally:
            await sink.close()
        for _ in range(2):  # the second run finds nothing new
            out = io.StringIO()
            await tail(kafka_bootstrap, prefix=topic_prefix, state=state, out=out)
            printed.append(out.getvalue())
        got, reader = await read_events(kafka_bootstrap, topic_prefix)  # from the beginning
        return printed, got, reader, len(await read_raw(kafka_bootstrap, topic_prefix))

    printed, got, reader, raw_count = asyncio.run(go())
    first, second, third = ([json.loads(line) for line in text.splitlines()] for text in printed)
    assert first and second and not third
    assert_each_seq_once_in_order_per_key(first + second, expected)
    assert max(e["seq"] for e in first) < min(e["seq"] for e in second)

    republished = [entry for batch in batches[half - 2 : half] for entry in batch]
    copies = len(expected) + len(events_of(republished))  # the whole stream, and two batches
    assert raw_count == len(expected) + copies, "the copies are in the topics"
    assert_each_seq_once_in_order_per_key(got, expected)
    assert reader.duplicates == copies
    assert set(json.loads(state.read_text())) == {
        f"{topic_prefix}.{name}:{partition}" for name in TOPICS for partition in (0, 1)
    }


def test_connect_creates_the_missing_topics_and_keeps_existing_ones(
    kafka_bootstrap: str, topic_prefix: str, stream: list[Entry]
) -> None:
    wanted = {f"{topic_prefix}.{name}" for name in TOPICS}
    kept = f"{topic_prefix}.trades"

    async def partitions() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            names = [name for name in await admin.list_topics() if name in wanted]
            described = await admin.describe_topics(names) if names else []
            return {topic["topic"]: len(topic["partitions"]) for topic in described}
        finally:
            await admin.close()

    async def go() -> tuple[dict, dict, dict, list[dict]]:
        before = await partitions()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(kept, 1, 1)])
        finally:
            await admin.close()
        sink = await KafkaSink.connect(kafka_bootstrap, prefix=topic_prefix, partitions=3)
        await sink.close()
        created = await partitions()
        sink = await KafkaSink.connect(kafka_bootstrap, prefix=topic_prefix, partitions=5)
        try:
            await sink.publish(stream[:50])
        finally:
            await sink.close()
        got, _ = await read_events(kafka_bootstrap, topic_prefix)
        return before, created, await partitions(), got

    before, created, again, got = asyncio.run(go())
    assert before == {}
    assert created == {name: 1 if name == kept else 3 for name in wanted}
    assert again == created, "an existing topic is left as it is"
    assert_each_seq_once_in_order_per_key(got, events_of(stream[:50]))


def test_publish_fails_clearly_while_the_broker_is_down_and_works_when_it_is_back(
    tmp_path: Path, topic_prefix: str, stream: list[Entry]
) -> None:
    """The embedded broker keeps its data in memory: after the restart its topics are gone,
    so this checks the producer's error and recovery, not the data of before."""
    batches = batches_of(stream)
    broker = Tansu.start(tmp_path / "tansu.log")
    timeout_s = 2.0

    async def go() -> tuple[float, list[str], int, list[dict]]:
        sink = await KafkaSink.connect(broker.bootstrap, prefix=topic_prefix, timeout_s=timeout_s)
        try:
            await sink.publish(batches[0])
            broker.stop()
            started = time.monotonic()
            with pytest.raises(KafkaUnavailable) as raised:
                await sink.publish(batches[1])
            failed_after_s = time.monotonic() - started
            with pytest.raises(KafkaUnavailable):
                await KafkaSink.connect(broker.bootstrap, prefix=topic_prefix, timeout_s=1.0)
            errors = [str(raised.value)]
            broker.run()  # the same port, empty
            last = await publish_until_it_works(sink, batches[1], errors)
            assert last == events_of(batches[1])[-1]["seq"]
            await sink.publish(batches[2])
        finally:
            await sink.close()
        got, _ = await read_events(broker.bootstrap, topic_prefix)
        return failed_after_s, errors, len(errors) - 1, got

    try:
        failed_after_s, errors, attempts, got = asyncio.run(go())
    finally:
        broker.stop()
    print(f"\nbroker down: publish raised after {failed_after_s:.1f} s: {errors[0]}")
    print(f"broker back: published after {attempts} failed attempts: {errors[1:]}")
    assert broker.bootstrap in errors[0]
    assert failed_after_s < 3 * timeout_s
    assert_each_seq_once_in_order_per_key(got, events_of(batches[1] + batches[2]))


def test_a_publish_that_timed_out_lands_late_and_its_retry_still_gives_each_seq_once(
    tmp_path: Path, topic_prefix: str, stream: list[Entry]
) -> None:
    """The broker paused (SIGSTOP) past the timeout: publish raises, but what it had sent is
    still in the broker's socket and lands when the broker resumes, after or around the
    streamer's retry. The broker keeps its data here, so the reader must drop those copies
    and miss nothing."""
    batches = batches_of(stream, 300)[:6]
    broker = Tansu.start(tmp_path / "tansu.log")

    async def go() -> tuple[list[str], list[dict], EventReader, int]:
        sink = await KafkaSink.connect(broker.bootstrap, prefix=topic_prefix, timeout_s=1.0)
        errors = []
        try:
            await sink.publish(batches[0])
            os.kill(broker.pid, signal.SIGSTOP)
            for batch in (batches[1], batches[1] + batches[2]):  # a retry while still paused
                with pytest.raises(KafkaUnavailable) as raised:
                    await sink.publish(batch)
                errors.append(str(raised.value))
            os.kill(broker.pid, signal.SIGCONT)
            await publish_until_it_works(sink, batches[1] + batches[2], errors)
            for batch in batches[3:]:
                await sink.publish(batch)
        finally:
            await sink.close()
        got, reader = await read_events(broker.bootstrap, topic_prefix)
        return errors, got, reader, len(await read_raw(broker.bootstrap, topic_prefix))

    try:
        errors, got, reader, raw_count = asyncio.run(go())
    finally:
        broker.stop()
    print(f"\nbroker paused: {errors}; copies in the topics: {reader.duplicates}")
    expected = events_of([entry for batch in batches for entry in batch])
    assert_each_seq_once_in_order_per_key(got, expected)
    assert raw_count == len(expected) + reader.duplicates


def test_gzip_batches_read_back(
    kafka_bootstrap: str, topic_prefix: str, stream: list[Entry]
) -> None:
    """The broker takes gzip (the only codec aiokafka has without the `cramjam` package)."""

    async def go() -> list[dict]:
        sink = await KafkaSink.connect(kafka_bootstrap, prefix=topic_prefix, compression="gzip")
        try:
            for batch in batches_of(stream[:400], 500):
                await sink.publish(batch)
        finally:
            await sink.close()
        return (await read_events(kafka_bootstrap, topic_prefix))[0]

    assert_each_seq_once_in_order_per_key(asyncio.run(go()), events_of(stream[:400]))
