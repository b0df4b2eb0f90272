"""The Kafka side of the indexer: every event, at least once, to its topic.

`KafkaSink.publish(entries)` sends every event of the entries to `prefix.<topic>`
(`indexer.events.TOPIC_OF_TYPE`), keyed by its market (else its account, else empty), with
`seq`, `cmd_index`, `type` and (when the node has one) `cluster_id` in the headers: after a
restore, the restored cluster's events reuse the old `seq` numbers past the restore point, and
the header is how a consumer tells the two histories apart (indexer/consume.py). It returns only when the broker acknowledged
all of them (acks=all). It never writes PostgreSQL and keeps no checkpoint: the streamer
publishes what PostgreSQL committed, then records the last acked `seq`, so after a crash or a
takeover the same events may be published again. Consumers drop them by `seq`
(indexer/consume.py, docs/reference/indexer-kafka.md).

Why consumers can dedupe with one number per partition ("drop any seq <= the highest seen"):
in every partition, a record never lands after a record with a higher `seq` unless it is a
copy of one that landed before it. `publish` keeps that true by building its own batches: one
batch per partition per call (a batch lands whole or not at all), a second batch of the same
partition only after the first was acked, and a retry always starting from an acked point.
With `producer.send()` per event, a batch that expired while the broker was away could be
followed by a later batch that made it, leaving a gap that the retry fills *after* higher
seqs: that consumer rule would then drop events it never saw.

Broker notes (Tansu, the embedded broker; docs/reference/indexer-kafka.md): no idempotent or
transactional producer (so none here; Kafka transactions are not used), topics created by a
metadata request when missing (so we create ours before the producer asks for them), memory
storage only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from indexer.events import TOPIC_OF_TYPE, TOPICS, Entry

# One batch holds at most this many bytes (before compression): under the 1 MiB that brokers
# accept per batch by default (message.max.bytes), with room for the batch's own overhead.
BATCH_BYTES_MAX = 900 * 1024
TOPIC_EXISTS = 36  # the CreateTopics error code for "already exists": fine, we wanted it
TIMEOUT_S = 10.0


class KafkaUnavailable(RuntimeError):
    """Kafka did not take what we asked within the timeout (down, unreachable, refusing):
    nothing is known about events after the last call that returned. Back off and publish
    again from the last acknowledged `seq`; `str(error)` says what happened."""


class KafkaSink:
    """A producer for the indexer's topics. Make one with `await KafkaSink.connect(...)`,
    publish with one caller at a time, `await close()` at the end."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        bootstrap: str,
        prefix: str,
        partitions: int,
        replication_factor: int,
        timeout_s: float,
        cluster_id: str | None = None,
    ) -> None:
        self._producer = producer
        self._cluster_header = [("cluster_id", cluster_id.encode())] if cluster_id else []
        self.bootstrap = bootstrap
        self.prefix = prefix
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._timeout_s = timeout_s
        self._topic_of_type = {kind: f"{prefix}.{name}" for kind, name in TOPIC_OF_TYPE.items()}
        # murmur2, as the Java client's: a key lands in the partition other clients expect.
        self._partitioner = DefaultPartitioner()
        self._publishing = False
        self._ensure_topics = False  # after a failure: the broker may have come back empty

    @property
    def topics(self) -> list[str]:
        return [f"{self.prefix}.{name}" for name in TOPICS]

    @classmethod
    async def connect(
        cls,
        bootstrap: str,
        *,
        prefix: str = "qb",
        partitions: int = 1,
        replication_factor: int = 1,
        compression: str | None = None,
        timeout_s: float = TIMEOUT_S,
        cluster_id: str | None = None,
    ) -> KafkaSink:
        """Create the topics that are missing (`partitions` each; existing ones are kept as
        they are), then start the producer. `compression`: None or "gzip" (lz4, zstd and
        snappy need the optional `cramjam` package). `timeout_s` bounds every call.
        `cluster_id`: the node's, sent in every record's headers.
        Raises KafkaUnavailable when the broker cannot be reached."""
        if partitions < 1 or replication_factor < 1:
            raise ValueError("partitions and replication_factor must be >= 1")
        await _create_topics(
            bootstrap,
            [f"{prefix}.{name}" for name in TOPICS],
            partitions,
            replication_factor,
            timeout_s,
        )
        producer = await start_producer(
            bootstrap, timeout_s, compression_type=compression, max_batch_size=BATCH_BYTES_MAX
        )
        return cls(
            producer,
            bootstrap=bootstrap,
            prefix=prefix,
            partitions=partitions,
            replication_factor=replication_factor,
            timeout_s=timeout_s,
            cluster_id=cluster_id,
        )

    async def publish(self, entries: Sequence[Entry]) -> int:
        """Send every event of `entries` (in `seq` order) and wait until the broker acked all
        of them. Returns the last `seq` sent (0 when the entries carry no event). Raises
        KafkaUnavailable if that did not happen within the timeout: some of the events may
        have landed, and publishing them again is what the consumers expect."""
        if self._publishing:
            raise RuntimeError("KafkaSink.publish is not reentrant: one call at a time")
        self._publishing = True
        try:
            if self._ensure_topics:
                await _create_topics(
                    self.bootstrap,
                    self.topics,
                    self._partitions,
                    self._replication_factor,
                    self._timeout_s,
                )
                self._ensure_topics = False
            return await self._publish(entries)
        except (KafkaError, OSError, TimeoutError) as error:
            self._ensure_topics = True
            raise KafkaUnavailable(
                f"Kafka at {self.bootstrap}: {_describe(error, self._timeout_s)}"
            ) from error
        finally:
            self._publishing = False

    async def _publish(self, entries: Sequence[Entry]) -> int:
        batches, last_seq = await self._build(entries)
        # Round k sends the k-th batch of every partition: a round goes out together (one
        # request per broker), a partition's next batch only after its previous one was acked.
        round_no = 0
        while batches:
            # aiokafka fails a batch it could not deliver within the timeout; this bound is
            # for anything else that would hang (a metadata wait, a full queue).
            async with asyncio.timeout(self._timeout_s * 2):
                futures = [
                    await self._producer.send_batch(builders[round_no], topic, partition=partition)
                    for (topic, partition), builders in batches.items()
                ]
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            round_no += 1
            batches = {tp: builders for tp, builders in batches.items() if len(builders) > round_no}
        return last_seq

    async def _build(self, entries: Sequence[Entry]) -> tuple[dict[tuple[str, int], list], int]:
        """The events as closed batches per (topic, partition), in seq order, and the last
        seq."""
        batches: dict[tuple[str, int], list] = {}
        partition_of: dict[tuple[str, bytes], int] = {}
        now_ms = int(time.time() * 1000)  # the record time: when published (ts is in the value)
        last_seq = 0
        for entry in entries:
            for event in entry.events:
                seq = event["seq"]
                if seq <= last_seq:
                    raise AssertionError(f"events out of seq order: {seq} after {last_seq}")
                last_seq = seq
                kind = event["type"]
                topic = self._topic_of_type[kind]
                key = (event.get("market") or event.get("account") or "").encode()
                partition = partition_of.get((topic, key))
                if partition is None:
                    every = sorted(await self._producer.partitions_for(topic))
                    partition = partition_of[(topic, key)] = self._partitioner(key, every, every)
                headers = [
                    ("seq", b"%d" % seq),
                    ("cmd_index", b"%d" % event["cmd_index"]),
                    ("type", kind.encode()),
                    *self._cluster_header,
                ]
                value = orjson.dumps(event)
                builders = batches.setdefault((topic, partition), [])
                if not builders or _append(builders[-1], key, value, headers, now_ms) is None:
                    builders.append(self._producer.create_batch())
                    if _append(builders[-1], key, value, headers, now_ms) is None:
                        raise AssertionError(f"event seq {seq} does not fit in an empty batch")
        for builders in batches.values():
            for builder in builders:
                builder.close()  # closed: sent at once, no linger
        return batches, last_seq

    async def close(self) -> None:
        """Stop the producer (it first tries to deliver what is still queued, within the
        timeout)."""
        await self._producer.stop()


def _append(builder, key: bytes, value: bytes, headers: list, now_ms: int) -> object:
    return builder.append(key=key, value=value, timestamp=now_ms, headers=headers)


async def start_producer(bootstrap: str, timeout_s: float, **options) -> AIOKafkaProducer:
    """A started producer with acks=all: KafkaUnavailable if the broker cannot be reached."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        # The broker refuses InitProducerId (issue 10): at least once, deduped by the consumer.
        enable_idempotence=False,
        # A batch not acked within this is failed (the sender retries until then).
        request_timeout_ms=int(timeout_s * 1000),
        **options,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await producer.start()
    except (KafkaError, OSError, TimeoutError) as error:
        await producer.stop()
        raise KafkaUnavailable(f"Kafka at {bootstrap}: {_describe(error, timeout_s)}") from error
    return producer


async def _create_topics(
    bootstrap: str, topics: list[str], partitions: int, replication_factor: int, timeout_s: float
) -> None:
    """Create the topics that do not exist; an existing topic is left as it is."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            response = await admin.create_topics(
                [NewTopic(name, partitions, replication_factor) for name in topics]
            )
    except (KafkaError, OSError, TimeoutError) as error:
        raise KafkaUnavailable(f"Kafka at {bootstrap}: {_describe(error, timeout_s)}") from error
    finally:
        await admin.close()
    failed = [
        f"{topic}: error {code} {message or ''}".strip()
        for topic, code, message in response.topic_errors
        if code not in (0, TOPIC_EXISTS)
    ]
    if failed:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not create topics: {'; '.join(failed)}")


def _describe(error: BaseException, timeout_s: float) -> str:
    text = str(error)
    if isinstance(error, TimeoutError) and not text:
        return f"no answer in time (timeout_s={timeout_s:g})"
    name = type(error).__name__
    return text if text.startswith(name) else f"{name}: {text}"  # aiokafka's name themselves
