"""Every deposit the chain watcher observes, with each status it reaches, to Kafka: the topic
`<prefix>.chain-deposits`, keyed by the deposit's `ref` (so one deposit's records stay in one
partition, in order), the value the deposit as JSON with its `status`, `chain_id` in the
headers. At least once: the watcher publishes a poll's deposits before it records them in
PostgreSQL, and a credit before it records the credit, so a crash in between publishes them
again. A consumer keeps the last status per `ref` (statuses only move forward: seen ->
confirmed -> credited or dust; seen -> orphaned).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ..kafka import TIMEOUT_S, KafkaUnavailable, _create_topics, _describe, start_producer
from .scanner import Deposit

TOPIC = "chain-deposits"


class DepositTopic:
    def __init__(self, producer: AIOKafkaProducer, bootstrap: str, topic: str) -> None:
        self._producer = producer
        self.bootstrap = bootstrap
        self.topic = topic

    @classmethod
    async def connect(
        cls, bootstrap: str, *, prefix: str = "qb", timeout_s: float = TIMEOUT_S
    ) -> DepositTopic:
        topic = f"{prefix}.{TOPIC}"
        await _create_topics(bootstrap, [topic], 1, 1, timeout_s)
        return cls(await start_producer(bootstrap, timeout_s), bootstrap, topic)

    async def close(self) -> None:
        await self._producer.stop()

    async def publish(self, deposits: Sequence[Deposit], status: str | None = None) -> None:
        """Send them (with `status` instead of each one's own, when given) and wait until
        the broker acknowledged all; KafkaUnavailable otherwise (some may have landed)."""
        try:
            futures = []
            for deposit in deposits:
                body = dataclasses.asdict(deposit)
                # Chain units exceed 64 bits (wei): strings, as JSON numbers of that size are
                # not read exactly by most consumers.
                body["raw"], body["dust"] = str(deposit.raw), str(deposit.dust)
                if status is not None:
                    body["status"] = status
                futures.append(
                    await self._producer.send(
                        self.topic,
                        key=deposit.ref.encode(),
                        value=orjson.dumps(body),
                        headers=[("chain_id", str(deposit.chain_id).encode())],
                    )
                )
            if futures:
                async with asyncio.timeout(TIMEOUT_S * 2):
                    await asyncio.gather(*futures)
        except (KafkaError, OSError, TimeoutError) as error:
            raise KafkaUnavailable(f"Kafka at {self.bootstrap}: {_describe(error, 0)}") from error
