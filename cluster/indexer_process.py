"""The indexer process beside a node (ADR 0007): `python -m cluster.indexer_process`.

The node starts it when its config has an `[indexer]` table, restarts it if it dies, and stops
it by closing its stdin. They talk in JSON lines: the node writes what the indexer needs to
know of it (`{"role", "applied_index", "seq", "ts_ms"}`, on every change and at least every
half second); the indexer writes its status (the `indexer` object of the node status) every
half second and whenever its state moves. The process runs asyncio (asyncpg and aiokafka are asyncio libraries) and has the
node's Raft thread and GIL to itself: nothing it does can delay a heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from indexer.port import NodeView
from indexer.streamer import Streamer

from . import collector
from .indexer_source import LogSource

log = logging.getLogger("quorumbook.indexer")

STATUS_PERIOD_S = 0.5


class ParentLink:
    """The node, as its JSON lines on our stdin say (indexer.port.Node)."""

    def __init__(self) -> None:
        self._view = NodeView()
        self._changed = asyncio.Event()
        self.closed = asyncio.Event()

    def view(self) -> NodeView:
        return self._view

    async def changed(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        self._changed.clear()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            try:
                doc = json.loads(line)
                view = NodeView(
                    role=doc.get("role"),
                    applied_index=int(doc.get("applied_index", 0)),
                    seq=int(doc.get("seq", 0)),
                    ts_ms=int(doc.get("ts_ms", 0)),
                )
            except (ValueError, TypeError):
                log.error("indexer: ignoring a malformed line from the node: %r", line[:200])
                continue
            if view != self._view:
                self._view = view
                self._changed.set()
        self.closed.set()  # the node closed our stdin (it stops, or is gone)


async def report(streamer: Streamer) -> None:
    """The status, every STATUS_PERIOD_S and at once when the state moves (a new leader's
    status says it stopped streaming as soon as it did)."""
    while True:
        streamer.status_changed.clear()
        sys.stdout.write(json.dumps(streamer.status.as_dict()) + "\n")
        sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(streamer.status_changed.wait(), STATUS_PERIOD_S)


async def main(opts: argparse.Namespace) -> None:
    from indexer.kafka import KafkaSink
    from indexer.postgres import PgSink

    link = ParentLink()
    source = LogSource(Path(opts.data_dir), link)

    async def connect_pg():
        return await PgSink.connect(
            opts.postgres_url,
            holder=opts.node_id,
            lease_ttl_s=opts.lease_ttl_s,
            cluster_id=opts.cluster_id,
        )

    async def connect_kafka():
        return await KafkaSink.connect(
            opts.kafka_bootstrap, prefix=opts.topic_prefix, cluster_id=opts.cluster_id
        )

    streamer = Streamer(
        link,
        source,
        connect_pg=connect_pg,
        connect_kafka=connect_kafka if opts.kafka_bootstrap else None,
        batch_max_events=opts.batch_max_events,
        lease_ttl_s=opts.lease_ttl_s,
        cluster_id=opts.cluster_id,
    )
    streamer.status.pid = os.getpid()
    tasks = [
        asyncio.create_task(t)
        for t in (link.run(), streamer.run(), report(streamer), source.follow_journal())
    ]
    await link.closed.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # the streamer releases its lease


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.indexer_process")
    ap.add_argument("--data-dir", required=True, help="the node's Raft data directory")
    ap.add_argument("--node-id", required=True, help="the lease holder's name")
    ap.add_argument(
        "--cluster-id",
        default="",
        help="the node's cluster_id: the only history this indexer writes (indexer/timeline.py; "
        "without it, only to a database that records none)",
    )
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get("QB_INDEXER_POSTGRES_URL"),
        help="default: $QB_INDEXER_POSTGRES_URL (how the node passes it: a password in the "
        "URL stays out of `ps`)",
    )
    ap.add_argument("--kafka-bootstrap", default=None)
    ap.add_argument("--topic-prefix", default="qb")
    ap.add_argument("--lease-ttl-s", type=float, default=3.0)
    ap.add_argument("--batch-max-events", type=int, default=5000)
    opts = ap.parse_args(argv)
    if not opts.postgres_url:
        ap.error("no --postgres-url and no $QB_INDEXER_POSTGRES_URL")
    return opts


def run(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    opts = parse(argv)
    collector.tame(log, freeze=False)  # it applies the log as a node does (cluster/collector.py)
    asyncio.run(main(opts))


if __name__ == "__main__":
    run()
