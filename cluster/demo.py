"""`quorumbook demo`: a finite, seeded trading session through a local 3-node cluster.

It starts the embedded PostgreSQL and Kafka-protocol broker (indexer/services.py) and the
nodes, trades through the leader, SIGKILLs the leader half-way, measures the time to the next
acknowledged batch, restarts the killed node, checks that every replica holds the same state
hash, waits for the indexer to write every event to PostgreSQL and Kafka, counts the rows and
messages there, prints what happened and stops everything.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path

import click

from .workload import Mix, command_of, funding_commands, plan, wait_for

MARKET = {
    "market": "BTC-USD",
    "base": "BTC",
    "quote": "USD",
    "lot_size": 1_000_000,  # 0.01 BTC in satoshi
    "tick_size": 50,  # $0.50 per lot in cents
    "maker_fee_bps": 2,
    "taker_fee_bps": 5,
}
ACCOUNTS = 20
FUNDS = {"USD": 50_000_000, "BTC": 500_000_000}  # per trader: $500,000 and 5 BTC
# The session's orders: loadgen's kind of flow, with more cancels, bigger market orders, FOKs
# and prices that cross further, around $60,000 per BTC (1,200 ticks of a lot).
SESSION = Mix(
    cancel_share=0.15,
    market_share=0.10,
    market_qty=(1, 5),
    offset_ticks=(-8, 12),
    tifs=("gtc", "gtc", "gtc", "ioc", "post_only", "fok"),
    mid_ticks=1200,
)


def session(seed: int, orders: int) -> tuple[list[dict], list[dict]]:
    """The seeded session as raw commands: the set-up, then `orders` operations."""
    accounts = [f"trader{i:02d}" for i in range(ACCOUNTS)]
    setup = funding_commands([MARKET], accounts, FUNDS, "{asset}-{i}")
    ops = plan(seed, 1.0, orders, ACCOUNTS, MARKET, SESSION)  # sent in order, not at offsets
    flow = [command_of(op, accounts[op.account], lambda i: f"o{i}") for op in ops]
    return setup, flow


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

    setup, flow = session(seed, orders)
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

    indexers: dict[str, dict] = {}

    def caught_up() -> set | None:
        nonlocal indexers
        indexers = {n: (s or {}).get("indexer", {}) for n, s in cluster.statuses().items()}
        seqs = {ix.get("checkpoint_seq") for ix in indexers.values()}
        done = all(ix.get("lag_events") == 0 for ix in indexers.values()) and len(seqs) == 1
        return seqs if done else None

    try:
        seqs = wait_for(caught_up, 60, "the indexer", interval_s=0.2)
    except TimeoutError:
        raise click.ClickException(
            f"the indexer did not catch up within 60 s: {indexers}"
        ) from None
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
