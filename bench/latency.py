"""Commit latency benchmark (issue 14, target 2): one order at a time through the SDK on an idle
3-node cluster, against the HTTP floor of this machine, and where the time goes.

    .venv/bin/python -P -m bench.latency [--orders N] [--runs R]

(`make bench-latency` runs it with the compiled state machine on the nodes, as users run them.)
In one run, alternating, `--runs` times:

1. Floor: `POST /echo` on `bench/trivial_app.py` (a Quart-trio app on Hypercorn configured as a
   node's API: it reads a JSON order body and answers 201 with a small JSON object), one
   request at a time over one keep-alive connection of the HTTP client the SDK uses (httpx).
2. Orders: `Client.place` of the SDK (signed `POST /v1/orders` to the leader, keep-alive), one
   order at a time, `--orders` GTC limit orders that rest (buys far below sells: nothing
   trades), on a local 3-node cluster (journal fsync on, the node's default batching).
Target: order p50 <= floor p50 + 3 ms, and p99 <= floor p99 + 10 ms (the medians of the
runs' percentiles).

The breakdown: the leader's own histograms (docs/reference/api.md, metrics), scraped before
and after the orders, as means per order: the time the API took to answer
(`qb_http_request_duration_seconds` of `POST /v1/orders`), of which the commit
(`qb_commit_latency_seconds`: proposed by the node's batcher until the answer is back on the
API's thread), of which the steps `qb_raft_queue_seconds` (waiting for the Raft thread),
`qb_raft_commit_seconds` (proposal to committed, applied and answered: the leader's append and
fdatasync, the followers' append and fdatasync and their answers, the apply) and
`qb_commit_handoff_seconds` (the answer back to the API's thread); `qb_raft_sync_seconds` and
`qb_raft_apply_seconds` are the fdatasyncs and applies inside it. Then this process's own CPU
per order (`time.process_time`: the SDK, its signature, httpx, JSON; and the floor's httpx
alone), and what is left of the client's time: the HTTP hops and the server's framework outside
the route (the floor measures that pair with no work).

Every process started here is stopped by pid on every path (`LocalCluster`, the baseline by
`Popen.kill`); the temp dir is removed unless `--keep`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from api.sdk import Client
from bench.api import MARKET, setup_cluster, trivial_app
from cluster.launcher import LocalCluster

WARMUP = 50
P50_MARGIN_S = 0.003
P99_MARGIN_S = 0.010
STAGES = (
    ("API: POST /v1/orders answered", "qb_http_request_duration_seconds", 'route="/v1/orders"'),
    ("  commit (batcher to answer back)", "qb_commit_latency_seconds", ""),
    ("    queue for the Raft thread", "qb_raft_queue_seconds", ""),
    ("    Raft: proposed to applied", "qb_raft_commit_seconds", ""),
    ("      journal fdatasync (each)", "qb_raft_sync_seconds", ""),
    ("      apply (each entry)", "qb_raft_apply_seconds", ""),
    ("    hand-off to the API thread", "qb_commit_handoff_seconds", ""),
)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def floor_run(url: str, n: int) -> list[float]:
    latencies = []
    with httpx.Client() as http:
        for i in range(WARMUP + n):
            body = b'{"market":"BENCH-USD","side":"buy","type":"limit","price":900000,' + (
                b'"qty":1,"tif":"gtc","client_order_id":"f%d"}' % i
            )
            started = time.perf_counter()
            response = http.post(url + "/echo", content=body,
                                 headers={"content-type": "application/json"})  # fmt: skip
            response.read()
            took = time.perf_counter() - started
            if response.status_code != 201:
                raise RuntimeError(f"/echo answered {response.status_code}")
            if i >= WARMUP:
                latencies.append(took)
    return latencies


def order_run(client: Client, n: int, tag: str) -> list[float]:
    latencies = []
    for i in range(WARMUP + n):
        buy = i % 2 == 0
        started = time.perf_counter()
        placed = client.place(market=MARKET, side="buy" if buy else "sell", type="limit",
                              price=900_000 - i % 100 if buy else 1_100_000 + i % 100, qty=1,
                              tif="gtc", client_order_id=f"{tag}-{i}")  # fmt: skip
        took = time.perf_counter() - started
        if placed["status"] != "resting":
            raise RuntimeError(f"an order did not rest: {placed}")
        if i >= WARMUP:
            latencies.append(took)
    return latencies


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(metric sample name, labels): value} of the `_sum` and `_count` samples."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        if name.endswith(("_sum", "_count")):
            out[(name, labels)] = float(value)
    return out


def stage_means(before: dict, after: dict, orders: int) -> list[tuple[str, float, float]]:
    """(label, mean seconds per observation, observations per order) of each stage."""

    def total(metric: str, label_filter: str, kind: str, snapshot: dict) -> float:
        return sum(v for (name, labels), v in snapshot.items()
                   if name == f"{metric}_{kind}" and label_filter in labels)  # fmt: skip

    rows = []
    for label, metric, label_filter in STAGES:
        count = total(metric, label_filter, "count", after) - total(
            metric, label_filter, "count", before
        )
        seconds = total(metric, label_filter, "sum", after) - total(
            metric, label_filter, "sum", before
        )
        rows.append((label, seconds / count if count else 0.0, count / orders))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.latency")
    ap.add_argument("--orders", type=int, default=500, help="orders per run (after a warm-up)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qb-bench-latency-"))
    print(f"bench.latency: {args.runs} runs of {args.orders} orders, one at a time; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    floors, orders, breakdowns = [], [], []
    floor_cpu: list[float] = []  # this process's CPU seconds per request, per run
    order_cpu: list[float] = []
    cluster = LocalCluster.create(root / "cluster", 3)
    cluster.exit_with_launcher = True
    try:
        with trivial_app(root) as baseline:
            cluster.start()
            cluster.wait_all_following(30)
            (trader,) = setup_cluster(cluster, 1)
            leader = cluster.wait_for_leader()
            leader_url = cluster.nodes[leader].config.api_url
            engine = (cluster.status(leader) or {}).get("engine")
            print(f"  cluster: 3 nodes, leader {leader}, engine {engine}")
            with Client(cluster.api_urls(), trader.creds) as client:
                for run in range(args.runs):
                    cpu = time.process_time()
                    floors.append(floor_run(baseline, args.orders))
                    floor_cpu.append((time.process_time() - cpu) / (WARMUP + args.orders))
                    before = scrape(leader_url)
                    cpu = time.process_time()
                    orders.append(order_run(client, args.orders, f"r{run}"))
                    order_cpu.append((time.process_time() - cpu) / (WARMUP + args.orders))
                    after = scrape(leader_url)
                    breakdowns.append(stage_means(before, after, WARMUP + args.orders))
                    f, o = floors[-1], orders[-1]
                    print(f"  run {run + 1}: floor p50 {percentile(f, 50) * 1e3:.2f} ms "
                          f"p99 {percentile(f, 99) * 1e3:.2f} ms; order p50 "
                          f"{percentile(o, 50) * 1e3:.2f} ms p99 {percentile(o, 99) * 1e3:.2f} ms "
                          f"(mean {statistics.fmean(o) * 1e3:.2f} ms)")  # fmt: skip
    finally:
        cluster.stop_all()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    floor50 = med(percentile(f, 50) for f in floors)
    floor99 = med(percentile(f, 99) for f in floors)
    order50 = med(percentile(o, 50) for o in orders)
    order99 = med(percentile(o, 99) for o in orders)
    order_mean = med(statistics.fmean(o) for o in orders)
    ok50 = order50 <= floor50 + P50_MARGIN_S
    ok99 = order99 <= floor99 + P99_MARGIN_S
    print(f"floor (POST /echo, trivial Quart-trio app): p50 {floor50 * 1e3:.2f} ms, "
          f"p99 {floor99 * 1e3:.2f} ms")  # fmt: skip
    print(f"order (SDK place, 3-node cluster):          p50 {order50 * 1e3:.2f} ms, "
          f"p99 {order99 * 1e3:.2f} ms, mean {order_mean * 1e3:.2f} ms")  # fmt: skip
    print(f"  p50 over the floor {(order50 - floor50) * 1e3:+.2f} ms   target <= +3 ms: "
          f"{'met' if ok50 else 'MISSED'}")  # fmt: skip
    print(f"  p99 over the floor {(order99 - floor99) * 1e3:+.2f} ms   target <= +10 ms: "
          f"{'met' if ok99 else 'MISSED'}")  # fmt: skip
    print("where an order's time goes (leader's histograms, means; medians of the runs):")
    print(f"  {'client total (SDK, HTTP both ways, the API)':<44} {order_mean * 1e3:7.2f} ms")
    for i, (label, _mean, _per) in enumerate(breakdowns[0]):
        mean = med(b[i][1] for b in breakdowns)
        per = med(b[i][2] for b in breakdowns)
        note = f"  ({per:.1f} per order)" if abs(per - 1) > 0.05 else ""
        print(f"  {label:<44} {mean * 1e3:7.2f} ms{note}")
    answered = med(b[0][1] for b in breakdowns)
    client_cpu = med(order_cpu)
    print(f"  {'client CPU (SDK, signing, httpx, JSON)':<44} {client_cpu * 1e3:7.2f} ms"
          f"  (the floor's httpx alone: {med(floor_cpu) * 1e3:.2f} ms)")  # fmt: skip
    print(f"  {'the rest (HTTP both ways, server framework)':<44} "
          f"{(order_mean - answered - client_cpu) * 1e3:7.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
