"""One node of our replication layer with a no-op state machine, three of which
`bench/replication.py` starts beside the raw pysyncobj baseline (bench/raw_pysyncobj_node.py).

    python -m bench.noop_replica_node --self 127.0.0.1:P1 --peers 127.0.0.1:P2,127.0.0.1:P3 \
        --data-dir DIR --duration 10 [--window 4000] [--payload-bytes 32] [--settle 1]

What a node replicates, without the exchange: `cluster.raft.RaftReplica` (the hardened
adapter: password, journal with fdatasync, the node's Raft timings) under
`cluster.replica.Replica` (the node's batcher: one log entry per batch of up to 1000
commands, at most 2 in flight), with the node's GC and switch-interval settings. The machine
decodes each committed batch and applies nothing. The Raft password comes from the
`RAW_PYSYNCOBJ_PASSWORD` environment variable, as the baseline's does.

The same protocol as the baseline's node: every process waits for a leader that has held the
same term for `--settle` seconds, prints `ROLE leader|follower`; the leader keeps `--window`
submissions in flight (trio tasks calling `Replica.submit` with one command of a
`--payload-bytes` payload, or `submit_many` with `--per-submit` of them) for `--duration`
seconds after a second of warm-up, then prints `RESULT {json}` and exits. Followers serve until killed; every process exits by itself after
`--max-lifetime` seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.raw_pysyncobj_node import PASSWORD_ENV, _emit, _watchdog
from cluster.batch import decode_versioned_batch
from cluster.collector import GC_THRESHOLDS
from cluster.node import SWITCH_INTERVAL_S
from cluster.raft import RaftReplica, RaftSettings
from cluster.replica import Replica


class NoopMachine:
    """Decodes each batch (to answer each command of it) and applies nothing."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, payload: bytes) -> list:
        _version, _ts, entries = decode_versioned_batch(payload)
        self.applied += len(entries)
        return [None] * len(entries)

    def snapshot(self) -> bytes:
        return self.applied.to_bytes(8, "big")

    def restore(self, blob: bytes) -> None:
        self.applied = int.from_bytes(blob, "big")


async def _stable_leader(raft: RaftReplica, settle_s: float, timeout_s: float) -> str | None:
    """The leader once the same one has held the same term for `settle_s`, every peer
    connected; None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        status = raft.status()
        connected = all(p.get("connected") for p in status["peers"])
        now_seen = (status["leader"], status["term"]) if status["leader"] else None
        if now_seen is None or not connected or now_seen != seen:
            seen, since = now_seen, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return seen[0]
        await trio.sleep(0.02)
    return None


async def drive(replica: Replica, raft: RaftReplica, duration_s: float, window: int,
                payload: str, per_submit: int) -> dict:  # fmt: skip
    """`window` tasks, each submitting `per_submit` commands at a time (`Replica.submit` for
    one, `submit_many` for more, as the bulk API does); count those committed in the
    measured window."""
    counts = {"ok": 0, "failed": 0, "ok_in_window": 0, "submitted": 0}
    failures: dict[str, int] = {}
    t_from, t_to = float("inf"), float("inf")

    async def submitter(stop: trio.Event) -> None:
        command = {"op": "noop", "p": payload}
        commands = [command] * per_submit
        while not stop.is_set():
            counts["submitted"] += per_submit
            try:
                if per_submit == 1:
                    await replica.submit(command, timeout_s=10.0)
                else:
                    await replica.submit_many(commands, timeout_s=10.0)
            except Exception as exc:  # counted by kind; the run goes on
                counts["failed"] += per_submit
                name = type(exc).__name__
                failures[name] = failures.get(name, 0) + per_submit
                continue
            counts["ok"] += per_submit
            if t_from <= time.perf_counter() <= t_to:
                counts["ok_in_window"] += per_submit

    stop = trio.Event()
    term0 = raft.term()
    async with trio.open_nursery() as nursery:
        for _ in range(window):
            nursery.start_soon(submitter, stop)
        await trio.sleep(1.0)  # warm-up
        t_from = time.perf_counter()
        t_to = t_from + duration_s
        await trio.sleep(duration_s)
        stop.set()
    return {
        "duration_s": duration_s,
        "submitted": counts["submitted"],
        "committed_in_window": counts["ok_in_window"],
        "committed_total": counts["ok"],
        "failed": counts["failed"],
        "failures": failures,
        "ops_per_s": counts["ok_in_window"] / duration_s,
        "window": window,
        "per_submit": per_submit,
        "term_changes": raft.term() - term0,
        "still_leader": raft.is_leader(),
        "no_outcome_after_10s": 0,  # every submission ends within its 10 s timeout
        "payload_bytes": len(payload),
        "batches": replica.batches_proposed,
        "commands_per_batch": replica.batch_sizes_total / max(1, replica.batches_proposed),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--self", dest="self_addr", required=True)
    ap.add_argument("--peers", required=True, help="comma-separated raft addrs of the others")
    ap.add_argument("--data-dir", default=None, help="default: a new temp dir")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--window", type=int, default=4000, help="submissions in flight")
    ap.add_argument("--per-submit", type=int, default=1, help="commands per submission")
    ap.add_argument("--payload-bytes", type=int, default=32)
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--max-lifetime", type=float, default=300.0)
    args = ap.parse_args(argv)
    _watchdog(args.max_lifetime)
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        _emit(f"ERROR {PASSWORD_ENV} is not set")
        return 2
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="qb-noop-node-"))
    peers = tuple(p for p in args.peers.split(",") if p)
    settings = RaftSettings(
        self_addr=args.self_addr, peers=peers, password=password, data_dir=data_dir,
        compaction_min_entries=10**9, compaction_min_time_s=10**9,
    )  # fmt: skip
    raft = RaftReplica(settings, NoopMachine())
    replica = Replica(raft)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            leader = await _stable_leader(raft, args.settle, args.ready_timeout)
            if leader is None:
                _emit("ERROR no stable leader within ready timeout")
                os._exit(1)
            is_leader = raft.is_leader()
            _emit("ROLE " + ("leader" if is_leader else "follower") + f" leader={leader}")
            if not is_leader:
                await trio.sleep_forever()
            payload = os.urandom(args.payload_bytes // 2 + 1).hex()[: args.payload_bytes]
            result = await drive(
                replica, raft, args.duration, args.window, payload, args.per_submit
            )
            _emit("RESULT " + json.dumps(result, sort_keys=True))
            os._exit(0)  # do not wait on the Raft threads

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
