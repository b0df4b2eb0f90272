"""Soak: a 3-node cluster under steady order load for minutes; does a node's memory grow beyond
its state?

    .venv/bin/python -m bench.soak [--minutes 10] [--rate 300] [--sample-s 30] [--json] [--keep]

A local 3-node cluster (`LocalCluster` in a temp dir, real node processes, the compiled engine
with `make soak`) takes `quorumbook loadgen`'s seeded flow (`cluster.loadgen.run`: places that
rest and trade, cancels, through the SDK) at `--rate` orders/s for `--minutes`. Every
`--sample-s` seconds it prints each node's resident memory (VmRSS) and CPU seconds (all its
threads, from /proc; not the node's status, whose state hash walks the whole state).

Then the question a long-running exchange must answer: how much of a running node's memory is
its state? The load stops, the cluster converges, and one follower is restarted from its own
data directory: it loads the same state (its dump and journal) and nothing else, so the running
nodes' RSS minus the restarted node's is what running added beside the state (the allocator's
fragmentation, the windows a node keeps that are not replicated: recent trades, replayed
requests, signatures; and anything that leaks). Printed with its growth between the first and
the second half of the run: a figure that grows with the commands applied, run after run, is a
leak to chase. The verdict is only that the state hashes are equal and that no order's outcome
stayed unknown or was refused; memory has no target here, the figures are for reading
(docs/operating/cluster.md, "Memory over time").

Every process started here is stopped by pid on every path (`LocalCluster.stop_all`).
"""

from __future__ import annotations

if __package__ in (None, ""):
    raise SystemExit("run it as a module from the repository root: python -m bench.soak")

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from cluster import loadgen
from cluster.launcher import LocalCluster
from cluster.workload import wait_caught_up

TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, every thread


def sample(cluster: LocalCluster, t0: float) -> dict:
    nodes = {
        nid: {"rss_mb": round(rss_mb(node.pid), 1), "cpu_s": round(cpu_s(node.pid), 2)}
        for nid, node in cluster.nodes.items()
        if node.pid is not None
    }
    return {"t_s": round(time.perf_counter() - t0, 1), "nodes": nodes}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.soak")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=300.0, help="orders per second of load")
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    args = ap.parse_args()
    say = (lambda _line: None) if args.json else (lambda line: print(line, flush=True))
    root = Path(tempfile.mkdtemp(prefix="qb-soak-"))
    cluster = LocalCluster.create(root / "cluster", 3)
    cluster.exit_with_launcher = True
    samples: list[dict] = []
    report: dict = {}
    failure: list[BaseException] = []
    try:
        cluster.start()
        cluster.wait_all_following(30)
        say(f"bench.soak: 3 nodes, {args.rate:g} orders/s for {args.minutes:g} min, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")  # fmt: skip

        def drive() -> None:
            try:
                report.update(
                    loadgen.run(cluster.manifest_path, args.rate, args.minutes * 60, args.seed)
                )
            except BaseException as exc:  # reported after the sampling stops
                failure.append(exc)

        load = threading.Thread(target=drive, name="soak-load")
        t0 = time.perf_counter()
        load.start()
        while load.is_alive():
            samples.append(sample(cluster, t0))
            s = samples[-1]
            say(f"  {s['t_s']:7.0f} s  " + "  ".join(
                f"{nid} {n['rss_mb']:6.1f} MB {n['cpu_s']:7.1f} s cpu" for nid, n in s["nodes"].items()
            ))  # fmt: skip
            load.join(args.sample_s)
        if failure:
            raise failure[0]
        statuses = cluster.wait_converged(60)
        hashes = {nid: s["state_hash"] for nid, s in statuses.items()}
        leader = cluster.wait_for_leader()
        running = {nid: rss_mb(n.pid) for nid, n in cluster.nodes.items() if n.pid}
        restarted = next(nid for nid in sorted(cluster.nodes) if nid != leader)
        cluster.stop(restarted)
        cluster.start(restarted)
        caught_up_s = wait_caught_up(cluster, restarted, 120)
        pid = cluster.nodes[restarted].pid
        assert pid is not None
        state_mb = rss_mb(pid)
        beyond = {nid: round(mb - state_mb, 1) for nid, mb in running.items() if nid != restarted}
        half = samples[len(samples) // 2] if samples else None
        result = {
            "minutes": args.minutes,
            "rate": args.rate,
            "acked": report.get("acked"),
            "unknown": report.get("unknown"),
            "failed": report.get("failed"),
            "acked_per_s": report.get("acked_per_s"),
            "state_hashes_equal": len(set(hashes.values())) == 1,
            "cmd_index": statuses[leader]["cmd_index"],
            "start_rss_mb": {nid: n["rss_mb"] for nid, n in samples[0]["nodes"].items()},
            "half_rss_mb": {nid: n["rss_mb"] for nid, n in half["nodes"].items()} if half else {},
            "end_rss_mb": {nid: round(mb, 1) for nid, mb in running.items()},
            "restarted": restarted,
            "restarted_caught_up_s": round(caught_up_s, 2),
            "restarted_rss_mb": round(state_mb, 1),
            "beyond_state_mb": beyond,
            "samples": samples,
        }
        ok = result["state_hashes_equal"] and not result["unknown"] and not result["failed"]
        result["ok"] = ok
    finally:
        cluster.stop_all()
        if args.keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        commands = result["cmd_index"]
        print(f"load: {result['acked']:,} orders acknowledged ({result['acked_per_s']}/s), "
              f"{result['unknown']} unknown, {result['failed']} failed; cmd_index {commands:,}; "
              f"state hashes equal: {result['state_hashes_equal']}")  # fmt: skip
        print("resident memory, MB: " + "; ".join(
            f"{nid} {result['start_rss_mb'].get(nid)} -> {result['half_rss_mb'].get(nid)} "
            f"(half-way) -> {mb}" for nid, mb in result["end_rss_mb"].items()
        ))  # fmt: skip
        print(f"{restarted} restarted from its data (caught up in "
              f"{result['restarted_caught_up_s']} s): {result['restarted_rss_mb']} MB, its state alone")  # fmt: skip
        print("running beyond the state: " + ", ".join(
            f"{nid} {mb:+.1f} MB ({mb * 1e6 / max(commands, 1):.0f} B per command applied)"
            for nid, mb in beyond.items()
        ) + "   (for reading: no target; a figure per command that grows run after run is a leak)")  # fmt: skip
        print(f"verdict: {'PASS' if ok else 'FAIL'} (hashes equal, nothing unknown or failed)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
