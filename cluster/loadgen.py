"""`quorumbook loadgen`: a steady, seeded order flow through the client SDK.

The flow (which account, side, type, price, quantity, time in force, which earlier order to
cancel, and when) is a pure function of `(seed, rate, duration, accounts, market params)`:
`cluster.workload.plan` returns it and two runs with the same arguments send the same
operations at the same offsets. Only the client order ids carry a per-run prefix, so a rerun
against the same cluster is not answered `duplicate_client_order_id`.

`run()` sets the cluster up (market, funded accounts, trader keys: idempotent), then several
trio tasks send the plan through `api.sdk.AsyncClient` at the planned offsets
(`workload.OrderLoad`), and the report counts what came back:

- acked: a definite answer from the exchange: accepted, or rejected by its rules (404/409/422:
  `insufficient_funds`, `unknown_order`, `post_only_would_cross`, ... counted in `rejections`);
- failed: definite but not an exchange answer (other 4xx, or no leader before the SDK's
  deadline: not applied);
- unknown: no outcome: the SDK's deadline passed after an attempt that may have applied (a
  cancel resent after such an attempt included), or the run's hard stop cut the call.

Bounded: `rate * duration` operations at most, and a hard stop `grace_s` after the last one.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import trio

from .workload import DEFAULT_MARKET, OrderLoad, market_spec, percentile, plan, set_up, trader


def tally(load: OrderLoad) -> dict:
    """The report's counts of what came back so far (`sent`: operations begun)."""
    outcomes = load.snapshot()
    by_result = Counter(o.result for o in outcomes)
    return {
        "sent": load.started,
        "acked": by_result["acked"] + by_result["rejected"],
        "rejected": by_result["rejected"],
        "failed": by_result["refused"],
        "unknown": by_result["unknown"],
        "trades": sum(o.trades for o in outcomes),
    }


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
    from .launcher import LocalCluster

    if rate <= 0 or duration_s <= 0 or accounts < 1 or workers < 1:
        raise ValueError("rate, duration, accounts and workers must be positive")
    cluster = LocalCluster.open(Path(manifest))
    market_params, keys = set_up(cluster, market_spec(market), [trader(a) for a in range(accounts)])
    ops = plan(seed, rate, duration_s, accounts, market_params)
    load = OrderLoad(
        cluster.api_urls(),
        keys,
        ops,
        prefix="lg",
        workers=workers,
        verify=cluster.verify,
    )
    hard_stop_s = (ops[-1].at_s if ops else 0.0) + grace_s
    started = time.perf_counter()
    trio.run(lambda: load.run(hard_stop_s=hard_stop_s, progress=progress))
    elapsed = time.perf_counter() - started
    outcomes = load.snapshot()
    answered = [o for o in outcomes if o.result in ("acked", "rejected")]
    lat = sorted((o.done_t - o.sent_t) * 1000 for o in answered)
    counts = tally(load)
    return {
        "seed": seed,
        "rate": rate,
        "duration_s": duration_s,
        "accounts": accounts,
        "workers": workers,
        "market": market,
        "run_id": load.run_id,
        "planned": len(ops),
        **counts,
        "latency_ms_p50": round(percentile(lat, 50), 3),
        "latency_ms_p90": round(percentile(lat, 90), 3),
        "latency_ms_p99": round(percentile(lat, 99), 3),
        "latency_ms_max": round(lat[-1], 3) if lat else 0.0,
        "elapsed_s": round(elapsed, 3),
        "acked_per_s": round(counts["acked"] / elapsed, 1) if elapsed else 0.0,
        "behind_s_max": round(max([0.0, *(o.behind_s for o in outcomes)]), 3),
        "rejections": dict(
            sorted(Counter(o.code for o in outcomes if o.result == "rejected").items())
        ),
        "failures": dict(
            sorted(Counter(o.code for o in outcomes if o.result == "refused").items())
        ),
        "sdk": {
            k: load.stats[k]
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


def progress_line(load: OrderLoad) -> str:
    counts = tally(load)
    return (
        f"  sent {counts['sent']} acked {counts['acked']} failed {counts['failed']} "
        f"unknown {counts['unknown']} trades {counts['trades']}"
    )
