"""One node of the plain-pysyncobj baseline that `bench/replication.py` starts three of.

    python bench/raw_pysyncobj_node.py --self 127.0.0.1:P1 --peers 127.0.0.1:P2,127.0.0.1:P3 \
        --duration 10 [--window 10000] [--payload-bytes 32] [--settle 1] [--max-lifetime 300]

The Raft password comes from the `RAW_PYSYNCOBJ_PASSWORD` environment variable (never the
command line). A plain `pysyncobj.SyncObj` subclass with one `@replicated` method that takes a
small payload: one op per replicated call, no batching of ours, journal off (in memory), the
same timings as our nodes (raftMinTimeout 0.15, raftMaxTimeout 0.30, appendEntriesPeriod
0.04), pysyncobj's own auto-tick thread.

Every process waits until the same leader has held the same term for `--settle` seconds with
every peer connected, and prints `ROLE leader|follower` on stdout. The leader pipelines async calls with callbacks (at most `--window` in flight, so
pysyncobj's command queue never overflows) for `--duration` seconds, then prints one line
`RESULT {json}` and exits (a progress line a second goes to stderr). Followers keep serving until the parent kills them; each process
also exits by itself after `--max-lifetime` seconds so that nothing outlives a crashed parent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

PASSWORD_ENV = "RAW_PYSYNCOBJ_PASSWORD"


class Counter(SyncObj):
    def __init__(self, self_addr: str, peers: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, peers, conf)
        self.applied = 0
        self.last = b""

    @replicated
    def op(self, payload: bytes) -> int:
        self.applied += 1
        self.last = payload
        return self.applied


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _watchdog(seconds: float) -> None:
    def die() -> None:
        time.sleep(seconds)
        os._exit(3)

    threading.Thread(target=die, daemon=True).start()


def drive(obj: Counter, duration_s: float, window: int, payload: bytes, progress) -> dict:
    """Pipeline async calls for `duration_s`; count those committed (SUCCESS) in that time."""
    slots = threading.Semaphore(window)  # a late outcome only returns its permit
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0, "ok_in_window": 0}
    failures: dict[str, int] = {}
    end = [float("inf")]
    reasons = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}

    def on_result(result: object, error: int) -> None:
        now = time.perf_counter()
        with lock:
            if error == FAIL_REASON.SUCCESS:
                counts["ok"] += 1
                if now <= end[0]:
                    counts["ok_in_window"] += 1
            else:
                counts["failed"] += 1
                name = reasons.get(error, str(error))
                failures[name] = failures.get(name, 0) + 1
        slots.release()

    def drain(limit_s: float) -> int:
        """Wait until nothing is in flight (or `limit_s`); return how many never came back."""
        give_up = time.perf_counter() + limit_s
        got = 0
        while got < window and slots.acquire(timeout=max(0.0, give_up - time.perf_counter())):
            got += 1
        for _ in range(got):
            slots.release()
        return window - got

    # Warm-up: a second of calls so connections and the leader's loop are steady.
    t_warm = time.perf_counter() + 1.0
    while time.perf_counter() < t_warm:
        if slots.acquire(timeout=1.0):
            obj.op(payload, callback=on_result)
    lost_in_warmup = drain(10.0)
    progress.write(f"warm-up done, {lost_in_warmup} calls without an outcome\n")
    with lock:
        counts.update(ok=0, failed=0, ok_in_window=0)
        failures.clear()

    submitted = 0
    t0 = time.perf_counter()
    end[0] = t0 + duration_s
    term0 = obj.raftCurrentTerm
    next_report = t0 + 1.0
    while (now := time.perf_counter()) < end[0]:
        if now >= next_report:
            next_report += 1.0
            with lock:
                progress.write(
                    f"progress t={now - t0:.1f} submitted={submitted} ok={counts['ok']} "
                    f"failed={counts['failed']} leader={obj._isLeader()} term={obj.raftCurrentTerm}\n"
                )
        if not slots.acquire(timeout=1.0):
            continue
        obj.op(payload, callback=on_result)
        submitted += 1
    t_end = time.perf_counter()
    in_flight_at_end = window - slots._value
    no_outcome = drain(10.0)  # every outstanding call's outcome (pysyncobj has no timeout)
    t_drained = time.perf_counter()
    with lock:
        return {
            "duration_s": t_end - t0,
            "submitted": submitted,
            "committed_in_window": counts["ok_in_window"],
            "committed_total": counts["ok"],
            "failed": counts["failed"],
            "failures": dict(failures),
            "in_flight_at_end": in_flight_at_end,
            "no_outcome_after_10s": no_outcome,
            "no_outcome_in_warmup": lost_in_warmup,
            "drain_s": t_drained - t_end,
            "ops_per_s": counts["ok_in_window"] / (t_end - t0),
            "applied_on_leader": obj.applied,
            "window": window,
            "term_changes": obj.raftCurrentTerm - term0,
            "still_leader": obj._isLeader(),
            "payload_bytes": len(payload),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--self", dest="self_addr", required=True)
    ap.add_argument("--peers", required=True, help="comma-separated raft addrs of the others")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--window", type=int, default=10_000, help="max calls in flight")
    ap.add_argument("--payload-bytes", type=int, default=32)
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    ap.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds the same leader and term must hold before the run",
    )
    ap.add_argument("--max-lifetime", type=float, default=300.0)
    args = ap.parse_args(argv)
    _watchdog(args.max_lifetime)
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        _emit(f"ERROR {PASSWORD_ENV} is not set")
        return 2
    conf = SyncObjConf(
        password=password,
        raftMinTimeout=0.15,
        raftMaxTimeout=0.30,
        appendEntriesPeriod=0.04,
        leaderFallbackTimeout=0.75,
        commandsQueueSize=max(100_000, 2 * args.window),
        # A long run must not pause for a compaction (no journal, no dump file).
        logCompactionMinEntries=10**9,
        logCompactionMinTime=10**9,
    )
    peers = [p for p in args.peers.split(",") if p]
    obj = Counter(args.self_addr, peers, conf)
    # Wait for a leader that has held the same term for `--settle` seconds and is connected
    # to both peers (a leader elected during start-up is often replaced a moment later).
    deadline = time.monotonic() + args.ready_timeout
    stable_since, seen = None, None
    while True:
        if time.monotonic() > deadline:
            _emit("ERROR no stable leader within ready timeout")
            return 1
        status = obj.getStatus()
        connected = all(v == 2 for k, v in status.items() if k.startswith("partner_node_status"))
        now_seen = (status["leader"], status["raft_term"]) if status["leader"] is not None else None
        if now_seen is None or not connected or now_seen != seen:
            seen, stable_since = now_seen, time.monotonic()
        elif time.monotonic() - stable_since >= args.settle:
            break
        time.sleep(0.02)
    leader = seen[0]
    is_leader = obj._isLeader()
    _emit("ROLE " + ("leader" if is_leader else "follower") + f" leader={leader}")
    if not is_leader:
        while True:  # serve until killed (or the watchdog fires)
            time.sleep(1)
    payload = os.urandom(args.payload_bytes)
    progress = sys.stderr
    result = drive(obj, args.duration, args.window, payload, progress)
    _emit("RESULT " + json.dumps(result, sort_keys=True))
    os._exit(0)  # do not wait on pysyncobj's threads


if __name__ == "__main__":
    sys.exit(main())
