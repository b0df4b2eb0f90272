"""Read the indexer's Kafka topics, each event once: the example for downstream consumers.

    python -m indexer.consume --bootstrap 127.0.0.1:9092 --prefix qb            # all, then exit
    python -m indexer.consume --bootstrap ... --topic trades --follow --state pos.json

The indexer publishes at least once (docs/reference/indexer-kafka.md): after a crash or a
takeover, events are published again. Within one partition a record never comes after a
record with a higher `seq` unless it is a copy of one that came before, so one number per
partition is enough to drop every copy: the highest `seq` delivered from it. Everything here
is what a consumer in another language does too:

- no consumer group: partitions are assigned by hand (a group join takes seconds on the
  embedded broker, and the position is ours to keep anyway);
- start from the beginning, or from stored positions: per partition, the next offset to read
  and the highest `seq` delivered (store both, atomically with what you did with the events,
  for effectively-once processing);
- `seq` from the `seq` header (no need to parse the value to drop a copy);
- a restore starts a new history (a new `cluster_id` header) whose events reuse the `seq`
  numbers after the restore point: a partition's first record of a new cluster id starts the
  count over (it is not a copy), records of a cluster id the partition has left are dropped
  (late copies of the old history), and `switches` lists each change, so that the application
  can undo what it did with the old history's events past the restore point
  (docs/operating/indexer.md "After a restore"). A record without the header (an older
  indexer) counts as the partition's current history;
- a bounded read stops at the first empty fetch, not at `end_offsets()`, which the embedded
  broker under-reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition

from indexer.events import TOPICS

IDLE_MS = 1000  # a fetch that brings nothing for this long ends a bounded read


@dataclass
class Position:
    """Where a partition was read to: the next offset, and the highest seq delivered, of the
    history of `cluster_id` ("": none named yet); `retired`: histories it has left."""

    offset: int = 0
    seq: int = 0
    cluster_id: str = ""
    retired: list[str] = field(default_factory=list)


class EventReader:
    """Reads `prefix.<topic>` for each topic (every partition that exists when it starts) and
    yields each event once, as the dict the state machine produced.

        async with EventReader(bootstrap, prefix="qb") as reader:
            async for event in reader.events():
                handle(event)
            save(reader.positions())  # {"qb.trades:0": {"offset": 812, "seq": 40211, "cluster_id": ..., "retired": [...]}, ...}
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str = "qb",
        topics: Iterable[str] = TOPICS,
        positions: dict[str, dict] | None = None,
        idle_ms: int = IDLE_MS,
    ) -> None:
        self.topics = [f"{prefix}.{name}" for name in topics]
        self.idle_ms = idle_ms
        self.duplicates = 0  # copies dropped: a count, for the curious
        self.retired_dropped = 0  # records of a history a partition has left
        # Each move of a partition to another cluster's history: {"partition", "from", "to",
        # "first_seq"}; the events after the restore point that came before it are not part
        # of the history that goes on.
        self.switches: list[dict] = []
        self._stored = positions or {}
        self._positions: dict[TopicPartition, Position] = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    async def __aenter__(self) -> EventReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._consumer.start()
        try:
            known = await self._consumer.topics()  # a metadata request that creates nothing
            for topic in self.topics:
                if topic not in known:
                    continue  # nothing published there yet
                for partition in sorted(self._consumer.partitions_for_topic(topic) or ()):
                    tp = TopicPartition(topic, partition)
                    stored = self._stored.get(f"{topic}:{partition}")
                    self._positions[tp] = Position(**stored) if stored else Position()
            self._consumer.assign(list(self._positions))
            for tp, position in self._positions.items():
                self._consumer.seek(tp, position.offset)
        except BaseException:
            await self._consumer.stop()
            raise

    async def stop(self) -> None:
        await self._consumer.stop()

    def positions(self) -> dict[str, dict]:
        """Where every partition was read to (JSON-able; give it back as `positions=`). An
        event counts as read once it was yielded."""
        return {f"{tp.topic}:{tp.partition}": asdict(p) for tp, p in self._positions.items()}

    async def events(self, *, follow: bool = False) -> AsyncIterator[dict]:
        """Each event not delivered before, partition by partition in log order (so in `seq`
        order per key). Ends at the first fetch that brings nothing within `idle_ms`, unless
        `follow`."""
        while True:
            fetched = await self._consumer.getmany(timeout_ms=self.idle_ms)
            if not fetched:
                if follow:
                    continue
                return
            for tp, records in fetched.items():
                position = self._positions[tp]
                for record in records:
                    position.offset = record.offset + 1
                    headers = dict(record.headers)
                    seq = int(headers["seq"])
                    cluster = headers.get("cluster_id", b"").decode()
                    if cluster and cluster != position.cluster_id:
                        if cluster in position.retired:
                            self.retired_dropped += 1
                            continue
                        if position.cluster_id:  # a restored cluster's history: count anew
                            position.retired.append(position.cluster_id)
                            position.seq = 0
                            self.switches.append({
                                "partition": f"{tp.topic}:{tp.partition}",
                                "from": position.cluster_id, "to": cluster, "first_seq": seq,
                            })  # fmt: skip
                        position.cluster_id = cluster
                    if seq <= position.seq:
                        self.duplicates += 1  # published again after a crash or a takeover
                        continue
                    position.seq = seq
                    yield json.loads(record.value)


async def tail(
    bootstrap: str,
    *,
    prefix: str = "qb",
    topics: Iterable[str] = TOPICS,
    follow: bool = False,
    state: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print each event once, as a JSON line, and return how many were printed. With `state`
    (a JSON file), start from the positions it holds and save them every 1,000 events and at
    the end:
    a restart prints only what it did not print before (a crash between printing and saving
    prints some again: at least once, like any consumer that stores its position apart from
    its output)."""
    stored = json.loads(state.read_text()) if state is not None and state.exists() else None
    printed = 0
    async with EventReader(bootstrap, prefix=prefix, topics=topics, positions=stored) as reader:
        try:
            async for event in reader.events(follow=follow):
                out.write(json.dumps(event, separators=(",", ":")) + "\n")
                printed += 1
                if state is not None and printed % 1000 == 0:
                    out.flush()
                    _save(state, reader.positions())
        finally:
            out.flush()
            if state is not None:
                _save(state, reader.positions())
    return printed


def _save(path: Path, positions: dict[str, dict]) -> None:
    """Write-then-rename: a crash leaves the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(positions, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m indexer.consume",
        description="Print the indexer's events from Kafka as JSON lines, each once.",
        epilog="example: python -m indexer.consume --bootstrap 127.0.0.1:9092 --topic trades",
    )
    parser.add_argument("--bootstrap", required=True, help="host:port of a Kafka broker")
    parser.add_argument("--prefix", default="qb", help="topic prefix (default: qb)")
    parser.add_argument(
        "--topic",
        action="append",
        choices=TOPICS,
        help="a topic without its prefix; repeat for more (default: all)",
    )
    parser.add_argument("--follow", action="store_true", help="keep reading; Ctrl-C to stop")
    parser.add_argument("--state", type=Path, help="a JSON file that keeps the positions")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a --follow: not an error
        asyncio.run(
            tail(
                args.bootstrap,
                prefix=args.prefix,
                topics=args.topic or TOPICS,
                follow=args.follow,
                state=args.state,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
