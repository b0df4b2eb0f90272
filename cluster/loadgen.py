"""`quorumbook loadgen`: a steady, seeded order flow through the client SDK.

The flow (which account, side, type, price, quantity, time in force, which earlier order to
cancel, and when) is a pure function of `(seed, rate, duration, accounts, market params)`:
`plan()` returns it and two runs with the same arguments send the same operations at the same
offsets. Only the client order ids carry a per-run prefix, so a rerun against the same cluster
is not answered `duplicate_client_order_id`.

`run()` sets the cluster up (market, funded accounts, trader keys: idempotent), then several
trio tasks send the plan through `api.sdk.AsyncClient` at the planned offsets, and the
report counts what came back:

- acked: a definite answer from the exchange: accepted, or rejected by its rules (404/409/422:
  `insufficient_funds`, `unknown_order`, `post_only_would_cross`, ... counted in `rejections`);
- failed: definite but not an exchange answer (other 4xx, or no leader before the SDK's
  deadline: not applied);
- unknown: no outcome: the SDK's deadline passed after an attempt that may have applied, or
  the run's hard stop cut the call.

Bounded: `rate * duration` operations at most, and a hard stop `grace_s` after the last one.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from api.sdk import (
    AdminClient,
    ApiError,
    AsyncClient,
    Client,
    ClusterUnavailable,
    Credentials,
    OutcomeUnknown,
)

DEFAULT_MARKET = {
    "market": "LG-USD",
    "base": "LG",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}
FUNDING = 10**15  # per account and asset: enough that funds never run out in a bounded run
# Exchange rejections: a definite answer to a well-formed request, counted as acked.
EXCHANGE_STATUSES = (404, 409, 422)


@dataclass(frozen=True)
class Operation:
    index: int
    at_s: float  # offset from the start of the run
    account: int
    op: str  # "place" or "cancel"
    fields: dict  # place: order fields without client_order_id; cancel: {"market"}
    target: int | None = None  # cancel: index of the earlier place whose order to cancel


def plan(seed: int, rate: float, duration_s: float, accounts: int, market: dict) -> list[Operation]:
    """The seeded flow: `int(rate * duration_s)` operations, one every `1 / rate` seconds."""
    rng = random.Random(seed)
    tick = market["tick_size"]
    mid = 2000 * tick
    placed: dict[int, list[int]] = {a: [] for a in range(accounts)}
    ops = []
    for i in range(int(rate * duration_s)):
        account = rng.randrange(accounts)
        roll = rng.random()
        if roll < 0.10 and placed[account]:
            target = rng.choice(placed[account][-20:])
            ops.append(
                Operation(i, i / rate, account, "cancel", {"market": market["market"]}, target)
            )
            continue
        side = rng.choice(("buy", "sell"))
        if roll < 0.20:
            order = {
                "market": market["market"],
                "side": side,
                "type": "market",
                "tif": "ioc",
                "qty": rng.randint(1, 3),
            }
        else:
            offset = rng.randint(-3, 12) * tick  # negative: crosses the spread and trades
            price = mid - offset if side == "buy" else mid + offset
            tif = rng.choice(("gtc", "gtc", "gtc", "gtc", "ioc", "post_only"))
            order = {
                "market": market["market"],
                "side": side,
                "type": "limit",
                "price": price,
                "qty": rng.randint(1, 10),
                "tif": tif,
            }
        placed[account].append(i)
        ops.append(Operation(i, i / rate, account, "place", order))
    return ops


@dataclass
class Tally:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    trades: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rejections: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    behind_s_max: float = 0.0  # how late the worst operation started against its schedule


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def setup(
    manifest: Path, accounts: int, market_name: str
) -> tuple[list[str], dict, list[Credentials], object]:
    """Create the market and fund the accounts if missing (idempotent refs); new trader keys.
    Also returns what HTTPS clients trust for this cluster (its certificate, or True)."""
    from .launcher import LocalCluster

    cluster = LocalCluster.open(Path(manifest))
    urls, admin_creds, verify = cluster.api_urls(), cluster.admin_credentials(), cluster.verify
    spec = {
        **DEFAULT_MARKET,
        "market": market_name,
        "base": market_name.split("-")[0] if "-" in market_name else DEFAULT_MARKET["base"],
    }
    with AdminClient(urls, admin_creds, verify=verify) as admin:
        commands = [{"op": "create_market", **spec}]
        for a in range(accounts):
            for asset in (spec["base"], spec["quote"]):
                commands.append(
                    {
                        "op": "deposit",
                        "account": account_name(a),
                        "asset": asset,
                        "amount": FUNDING,
                        "ref": f"loadgen-{account_name(a)}-{asset}",
                    }
                )
        for command, result in zip(commands, admin.submit(commands), strict=True):
            first = (result.get("events") or [{}])[0]
            if "error" in result or (
                first.get("type") == "rejected"
                and first.get("reason") not in ("market_exists", "duplicate_ref")
            ):
                raise RuntimeError(f"setup command {command['op']} failed: {result}")
        keys = [admin.create_key(account_name(a)) for a in range(accounts)]
    with Client(urls, None, verify=verify) as public:
        market = next((m for m in public.markets() if m["market"] == market_name), None)
    if market is None:
        raise RuntimeError(f"market {market_name} missing after creation")
    return urls, market, keys, verify


def account_name(a: int) -> str:
    return f"lg{a:03d}"


async def drive(
    urls: list[str],
    keys: list[Credentials],
    ops: list[Operation],
    *,
    workers: int,
    run_id: str,
    grace_s: float,
    progress=None,
    verify: object = True,
) -> tuple[Tally, Counter]:
    """Send `ops` at their offsets from `workers` tasks; stop by itself (hard stop included)."""
    tally = Tally()
    clients = [AsyncClient(urls, key, verify=verify) for key in keys]
    coid = [f"lg-{run_id}-{op.index}" for op in ops]
    send, receive = trio.open_memory_channel[Operation](workers)
    start = trio.current_time()
    hard_stop = start + (ops[-1].at_s if ops else 0.0) + grace_s

    async def execute(op: Operation) -> None:
        client = clients[op.account]
        started = time.perf_counter()
        tally.behind_s_max = max(tally.behind_s_max, trio.current_time() - start - op.at_s)
        tally.sent += 1
        try:
            if op.op == "place":
                result = await client.place(**op.fields, client_order_id=coid[op.index])
                tally.trades += len(result.get("trades", ()))
            else:
                await client.cancel(op.fields["market"], client_order_id=coid[op.target])
        except ApiError as exc:
            if exc.status in EXCHANGE_STATUSES:
                tally.rejections[exc.code] += 1
            else:
                tally.failed += 1
                tally.failures[exc.code] += 1
                return
        except OutcomeUnknown:
            tally.unknown += 1
            return
        except ClusterUnavailable:
            tally.failed += 1
            tally.failures["cluster_unavailable"] += 1
            return
        except trio.Cancelled:
            tally.unknown += 1  # cut by the hard stop mid-call: it may have been applied
            raise
        tally.acked += 1
        tally.latencies_ms.append((time.perf_counter() - started) * 1000)

    async def scheduler() -> None:
        async with send:
            for op in ops:
                await trio.sleep_until(start + op.at_s)
                await send.send(op)  # waits while every worker is busy: the flow falls behind

    async def worker(ops_in: trio.MemoryReceiveChannel[Operation]) -> None:
        async with ops_in:
            async for op in ops_in:
                await execute(op)

    async def report_progress() -> None:
        while True:
            await trio.sleep(1)
            progress(tally)

    try:
        with trio.move_on_at(hard_stop):
            async with trio.open_nursery() as nursery:
                if progress is not None:
                    nursery.start_soon(report_progress)
                async with trio.open_nursery() as senders:
                    senders.start_soon(scheduler)
                    async with receive:
                        for _ in range(workers):
                            senders.start_soon(worker, receive.clone())
                nursery.cancel_scope.cancel()  # every operation answered: stop the progress
    finally:
        stats: Counter = Counter()
        for client in clients:
            stats.update(client.stats)
            with trio.CancelScope(shield=True):
                await client.aclose()
    return tally, stats


def run(
    manifest: Path,
    rate: float,
    duration_s: float,
    seed: int = 7,
    accounts: int = 8,
    workers: int = 16,
    market: str = DEFAULT_MARKET["market"],
    grace_s: float = 20.0,
    progress=None,
) -> dict:
    """Set up, drive the seeded flow, and return the report (one JSON-able dict)."""
    if rate <= 0 or duration_s <= 0 or accounts < 1 or workers < 1:
        raise ValueError("rate, duration, accounts and workers must be positive")
    urls, market_params, keys, verify = setup(manifest, accounts, market)
    ops = plan(seed, rate, duration_s, accounts, market_params)
    run_id = secrets.token_hex(4)
    started = time.perf_counter()
    tally, stats = trio.run(
        lambda: drive(
            urls,
            keys,
            ops,
            workers=workers,
            run_id=run_id,
            grace_s=grace_s,
            progress=progress,
            verify=verify,
        )
    )
    elapsed = time.perf_counter() - started
    lat = sorted(tally.latencies_ms)
    return {
        "seed": seed,
        "rate": rate,
        "duration_s": duration_s,
        "accounts": accounts,
        "workers": workers,
        "market": market,
        "run_id": run_id,
        "planned": len(ops),
        "sent": tally.sent,
        "acked": tally.acked,
        "rejected": sum(tally.rejections.values()),
        "failed": tally.failed,
        "unknown": tally.unknown,
        "trades": tally.trades,
        "latency_ms_p50": round(percentile(lat, 50), 3),
        "latency_ms_p90": round(percentile(lat, 90), 3),
        "latency_ms_p99": round(percentile(lat, 99), 3),
        "latency_ms_max": round(lat[-1], 3) if lat else 0.0,
        "elapsed_s": round(elapsed, 3),
        "acked_per_s": round(tally.acked / elapsed, 1) if elapsed else 0.0,
        "behind_s_max": round(max(0.0, tally.behind_s_max), 3),
        "rejections": dict(sorted(tally.rejections.items())),
        "failures": dict(sorted(tally.failures.items())),
        "sdk": {
            k: stats[k]
            for k in (
                "retries",
                "redirects",
                "transport_errors",
                "busy",
                "replayed",
                "unknown",
                "recovered",
            )
        },
    }


def format_report(report: dict) -> str:
    lines = [
        f"loadgen seed {report['seed']}: {report['rate']:g}/s for {report['duration_s']:g} s, "
        f"{report['accounts']} accounts, {report['workers']} workers, market {report['market']}",
        f"  sent {report['sent']} of {report['planned']} planned: acked {report['acked']} "
        f"(rejected by the exchange {report['rejected']}), failed {report['failed']}, "
        f"unknown {report['unknown']}",
        f"  trades {report['trades']}; {report['acked_per_s']} acked/s over {report['elapsed_s']} s"
        f" (worst start {report['behind_s_max'] * 1000:.0f} ms behind schedule)",
        f"  latency ms: p50 {report['latency_ms_p50']:.2f}  p90 {report['latency_ms_p90']:.2f}  "
        f"p99 {report['latency_ms_p99']:.2f}  max {report['latency_ms_max']:.2f}",
        f"  SDK: {report['sdk']['retries']} retries, {report['sdk']['redirects']} redirects, "
        f"{report['sdk']['unknown']} unknown attempts, {report['sdk']['recovered']} settled by look-up",
    ]
    if report["rejections"]:
        lines.append(f"  rejections: {report['rejections']}")
    if report["failures"]:
        lines.append(f"  failures: {report['failures']}")
    return "\n".join(lines)


def progress_line(tally: Tally) -> str:
    return (
        f"  sent {tally.sent} acked {tally.acked} failed {tally.failed} "
        f"unknown {tally.unknown} trades {tally.trades}"
    )
