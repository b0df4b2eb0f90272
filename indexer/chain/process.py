"""The chain watcher beside a node: `python -m indexer.chain.process` (cluster/sidecar.py starts
it when the node's config has `[chain] rpc_url`, restarts it if it dies, and stops it by closing
its stdin). It runs `Watcher.run` under the chain's lease (one watcher per chain among the
nodes) and writes its status (the `chain` object of the node status) as a JSON line every half
second. A deep reorganization stops the watcher: the process stays up and reports the alarm
(status `alarm`) until an operator acts (docs/reference/chain.md); it does not restart into
the same alarm in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys

from api.sdk import AdminClient, read_credentials

from ..kafka import KafkaUnavailable
from .publish import DepositTopic
from .rpc import EthRpc
from .scanner import Asset, DeepReorg
from .store import ChainStore
from .watcher import Chain, Watcher

log = logging.getLogger("quorumbook.chain")

POSTGRES_URL_ENV = "QB_INDEXER_POSTGRES_URL"
RPC_URL_ENV = "QB_CHAIN_RPC_URL"
STATUS_PERIOD_S = 0.5


def chain_of(doc: dict) -> tuple[Chain, float, float]:
    """The `[chain]` table (as JSON) as a `Chain`, its poll interval and lease ttl."""
    assets = tuple(
        Asset(
            a["asset"],
            a["decimals"],
            a["asset_decimals"],
            (a.get("token") or None) and a["token"].lower(),
        )
        for a in doc.get("assets", [])
    )
    chain = Chain(doc.get("chain_id", 1), doc.get("confirmations", 12), assets,
                  doc.get("start_block", 0))  # fmt: skip
    return chain, float(doc.get("poll_interval_s", 2.0)), float(doc.get("watcher_lease_ttl_s", 6.0))


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():  # the node's view: not needed by the watcher
        pass


async def main(opts: argparse.Namespace) -> None:
    chain, poll_s, ttl_s = chain_of(json.loads(opts.chain))
    stop = asyncio.Event()
    status: dict = {"configured": True, "active": False, "state": "starting",
                    "chain_id": chain.chain_id, "pid": os.getpid()}  # fmt: skip

    async def report(watcher: Watcher | None) -> None:
        while True:
            current = {**status, **(watcher.status if watcher else {}), "pid": os.getpid()}
            sys.stdout.write(json.dumps(current) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(STATUS_PERIOD_S)

    async def watch_stdin() -> None:
        await stdin_closed()
        stop.set()

    stdin_task = asyncio.create_task(watch_stdin())
    reporter = asyncio.create_task(report(None))
    store = topic = None
    rpc = EthRpc(os.environ[RPC_URL_ENV])
    admin = AdminClient([opts.api_url], read_credentials(opts.admin_key_file))
    try:
        store = await ChainStore.connect(os.environ[POSTGRES_URL_ENV])
        if opts.kafka_bootstrap:
            while topic is None and not stop.is_set():
                try:
                    topic = await DepositTopic.connect(
                        opts.kafka_bootstrap, prefix=opts.topic_prefix
                    )
                except KafkaUnavailable as exc:
                    status.update(state="retrying", last_error=str(exc))
                    await asyncio.sleep(1.0)
        watcher = Watcher(rpc, store, admin, opts.api_url, chain, topic)
        reporter.cancel()
        reporter = asyncio.create_task(report(watcher))
        try:
            await watcher.run(opts.node_id, stop, poll_s=poll_s, lease_ttl_s=ttl_s)
        except DeepReorg as exc:
            log.critical("chain %s: %s; the watcher stops (docs/reference/chain.md)",
                         chain.chain_id, exc)  # fmt: skip
            await stop.wait()  # report the alarm until the node stops us
    finally:
        with contextlib.suppress(Exception):
            await asyncio.sleep(STATUS_PERIOD_S)  # one last status line
        reporter.cancel()
        stdin_task.cancel()
        if topic is not None:
            await topic.close()
        if store is not None:
            await store.close()
        admin.close()
        rpc.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m indexer.chain.process")
    ap.add_argument("--node-id", required=True, help="the lease holder's name")
    ap.add_argument("--api-url", required=True, help="this node's API (deposit addresses, credits)")
    ap.add_argument("--admin-key-file", required=True)
    ap.add_argument("--chain", required=True, help="the [chain] table as JSON")
    ap.add_argument("--topic-prefix", default="qb")
    ap.add_argument("--kafka-bootstrap", default=None)
    return ap.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    asyncio.run(main(parse()))
