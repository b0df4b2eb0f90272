"""`quorumbook demo`: a finite, seeded trading session through a local 3-node cluster.

It starts the embedded PostgreSQL and Kafka-protocol broker (indexer/services.py) and the
nodes, trades through the leader, SIGKILLs the leader half-way, measures the time to the next
acknowledged batch, restarts the killed node, checks that every replica holds the same state
hash, waits for the indexer to write every event to PostgreSQL and Kafka, counts the rows and
messages there, prints what happened and stops everything.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click

MARKET = "BTC-USD"


@dataclass
class Session:
    """A seeded flow of commands; `ts` advances by a fixed step so replays are identical."""

    seed: int
    accounts: int = 20
    ts: int = 1_700_000_000_000_000_000
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _stamp(self, command: dict) -> dict:
        self.ts += 1_000_000
        command["ts"] = self.ts
        return command

    def setup(self) -> list[dict]:
        cmds = [
            {
                "op": "create_market",
                "market": MARKET,
                "base": "BTC",
                "quote": "USD",
                "lot_size": 1_000_000,  # 0.01 BTC in satoshi
                "tick_size": 50,  # $0.50 per lot in cents
                "maker_fee_bps": 2,
                "taker_fee_bps": 5,
            }
        ]
        for i in range(self.accounts):
            acct = f"trader{i:02d}"
            cmds.append(
                {
                    "op": "deposit",
                    "account": acct,
                    "asset": "USD",
                    "amount": 50_000_000,
                    "ref": f"usd-{i}",
                }
            )
            cmds.append(
                {
                    "op": "deposit",
                    "account": acct,
                    "asset": "BTC",
                    "amount": 500_000_000,
                    "ref": f"btc-{i}",
                }
            )
        return [self._stamp(c) for c in cmds]

    def orders(self, count: int) -> list[dict]:
        rng = self.rng
        mid = 60_000
        cmds = []
        for n in range(count):
            acct = f"trader{rng.randrange(self.accounts):02d}"
            roll = rng.random()
            side = rng.choice(("buy", "sell"))
            if roll < 0.15:
                cmds.append({"op": "cancel_all", "account": acct, "market": MARKET})
            elif roll < 0.25:
                cmds.append(
                    {
                        "op": "place",
                        "account": acct,
                        "market": MARKET,
                        "side": side,
                        "type": "market",
                        "qty": rng.randint(1, 5),
                        "client_order_id": f"m{n}",
                    }
                )
            else:
                offset = rng.randint(-8, 12) * 50
                price = mid - offset if side == "buy" else mid + offset
                tif = rng.choice(("gtc", "gtc", "gtc", "ioc", "post_only", "fok"))
                cmds.append(
                    {
                        "op": "place",
                        "account": acct,
                        "market": MARKET,
                        "side": side,
                        "type": "limit",
                        "price": price,
                        "qty": rng.randint(1, 10),
                        "tif": tif,
                        "client_order_id": f"o{n}",
                    }
                )
        return [self._stamp(c) for c in cmds]


def _tally(results: list[dict], counts: Counter, reasons: Counter, trades: list) -> int:
    """Count events of acknowledged commands; return how many commands had no outcome."""
    unknown = 0
    for result in results:
        if "error" in result:
            unknown += 1
            continue
        for event in result["events"]:
            counts[event["type"]] += 1
            if event["type"] == "rejected":
                reasons[event["reason"]] += 1
            elif event["type"] == "trade":
                trades.append(event)
    return unknown


def run_cluster(seed: int, orders: int, data_dir: Path | None, services: bool = True) -> None:
    """Start the services and a local 3-node cluster, trade through it with one leader
    SIGKILL, and report (the indexer's rows and messages too, with `services`)."""
    from api.sdk import AdminClient

    from .launcher import LocalCluster

    session = Session(seed)
    setup = session.setup()
    flow = session.orders(orders)
    with contextlib.ExitStack() as stack:
        root = data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qb-demo-")))
        running = None
        if services:
            from indexer.services import Services

            running = stack.enter_context(Services.start(root / "services"))
            click.echo(
                f"services up: PostgreSQL {running.postgres.url}  Kafka {running.kafka.bootstrap}"
            )
        settings = running.urls() if running is not None else {}
        cluster = stack.enter_context(LocalCluster.create(root / "cluster", 3, **settings))
        cluster.exit_with_launcher = True
        cluster.start()
        leader = cluster.wait_for_leader(30)
        click.echo(f"quorumbook demo (seed {seed}): 3-node cluster up, leader {leader}")
        for node_id, proc in cluster.nodes.items():
            click.echo(
                f"  {node_id}: api {proc.config.api_url}  raft {proc.config.raft_addr}  pid {proc.pid}"
            )
        client = stack.enter_context(AdminClient(cluster.api_urls(), cluster.admin_credentials()))
        counts: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        trades: list[dict] = []
        unknown = _tally(client.submit(setup), counts, reasons, trades)
        chunk = 25
        kill_at = len(flow) // 2
        killed: str | None = None
        failover_s = None
        started = time.perf_counter()
        for i in range(0, len(flow), chunk):
            if killed is None and i >= kill_at:
                killed = cluster.wait_for_leader(10)
                cluster.kill(killed)
                t_kill = time.perf_counter()
                click.echo(f"  killed leader {killed} (SIGKILL) after {i} orders")
            results = client.submit(flow[i : i + chunk])
            if killed is not None and failover_s is None:
                failover_s = time.perf_counter() - t_kill
                click.echo(
                    f"  next acknowledged batch {failover_s * 1000:.0f} ms after the kill, "
                    f"new leader {cluster.wait_for_leader(10, exclude=(killed,))}"
                )
            unknown += _tally(results, counts, reasons, trades)
        elapsed = time.perf_counter() - started
        assert killed is not None
        cluster.start(killed)
        client.barrier()
        statuses = cluster.wait_converged(30)

        click.echo(
            f"  {len(setup) + len(flow)} commands in {elapsed:.1f} s through the leader "
            f"({unknown} without a known outcome)"
        )
        click.echo(f"  events: {dict(sorted(counts.items()))}")
        click.echo(f"  rejections by reason: {dict(sorted(reasons.items()))}")
        click.echo(
            f"  trades: {len(trades)}, volume {sum(t['qty'] for t in trades)} lots, "
            f"fees {sum(t['maker_fee'] + t['taker_fee'] for t in trades)} USD cents"
        )
        for t in trades[:3]:
            click.echo(
                f"    trade {t['trade_id']}: {t['qty']} lots @ {t['price']} "
                f"{t['taker_account']} ({t['taker_side']}) x {t['maker_account']}"
            )
        click.echo(f"  {killed} restarted from its data dir and caught up:")
        for node_id, st in statuses.items():
            click.echo(
                f"    {node_id}: {st['role']:9} term {st['term']} cmd_index {st['cmd_index']} "
                f"state {st['state_hash'][:24]} engine {st['engine']}"
            )
        if len({st["state_hash"] for st in statuses.values()}) != 1:
            raise click.ClickException("replicas diverged: state hashes differ")
        click.echo("  all replicas hold the same state hash")
        if running is not None:
            _report_indexer(cluster, running)
        click.echo("  stopping the cluster")


def _report_indexer(cluster, services) -> None:
    """Wait until the indexer wrote every event, then count what PostgreSQL and Kafka hold."""
    import asyncio

    deadline = time.monotonic() + 60
    while True:
        indexers = {n: (s or {}).get("indexer", {}) for n, s in cluster.statuses().items()}
        seqs = {ix.get("checkpoint_seq") for ix in indexers.values()}
        if all(ix.get("lag_events") == 0 for ix in indexers.values()) and len(seqs) == 1:
            break
        if time.monotonic() > deadline:
            raise click.ClickException(f"the indexer did not catch up within 60 s: {indexers}")
        time.sleep(0.2)
    streaming = [n for n, ix in indexers.items() if ix.get("active")]
    click.echo(
        f"  indexer: {', '.join(streaming) or 'nobody'} streaming; every event written "
        f"(checkpoint seq {seqs.pop()}); written per node: "
        + ", ".join(f"{n} {ix.get('events_written', 0)}" for n, ix in indexers.items())
    )
    rows, messages = asyncio.run(_count(services))
    click.echo("    PostgreSQL rows: " + ", ".join(f"{t} {n}" for t, n in rows.items()))
    click.echo(
        "    Kafka messages: "
        + ", ".join(f"{t} {n}" for t, n in messages.items())
        + f" ({sum(messages.values())} events, each seq once after dedupe)"
    )


async def _count(services) -> tuple[dict[str, int], dict[str, int]]:
    import asyncpg

    from indexer.consume import EventReader
    from indexer.events import TOPIC_OF_TYPE

    conn = await asyncpg.connect(services.postgres.url)
    try:
        rows = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("events", "orders", "trades", "balances", "markets")
        }
    finally:
        await conn.close()
    messages: Counter[str] = Counter()
    async with EventReader(services.kafka.bootstrap, prefix="qb") as reader:
        async for event in reader.events():
            messages[f"qb.{TOPIC_OF_TYPE[event['type']]}"] += 1
    return rows, dict(sorted(messages.items()))
