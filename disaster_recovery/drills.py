"""The disaster drills: `quorumbook drill failover|membership|quorum-loss` (DESIGN.md
"Disaster recovery", "CLI"; runbooks in docs/operating/).

Each drill runs one scenario end to end against a local cluster under a steady order load and
returns a `DrillResult`: a verdict (`ok`), the reasons for a failure, warnings, and figures.
No click here: `disaster_recovery/cli_drills.py` is the command line.

The load is `quorumbook loadgen`'s seeded flow and set-up of the market, funded accounts and
trader keys (`cluster.workload`: `endless`, `set_up`): limit orders that rest, some that cross
and trade, IOC/post-only/market orders and cancels, each place with its own client_order_id,
sent through the SDK (`AsyncClient`, its one retry policy) by `workload.OrderLoad`, which
keeps every operation's outcome (when it was sent and answered, by which node, with which
order id). Here it runs until the drill stops it, and so tells which acknowledgement came
after a kill and from whom.

After the scenario the drill stops the load, commits a barrier, waits until every member
reports the same `cmd_index` and state hash, takes every member's snapshot (decoding it checks
its checksum and every book and balance invariant) and compares what each holds with what the
load was told (`check_orders`, pure):

- lost: an acknowledged order some member does not hold (RPO 0 means none);
- duplicated: an order id the exchange gave out that no client_order_id maps to. The exchange
  keeps each client_order_id with the order it was accepted as, forever; a place applied twice
  (its duplicate check bypassed) maps the id to the last copy and leaves the earlier one
  orphaned, whichever copy the client was told about;
- mismatched: an acknowledged order held under another order id than the one acknowledged;
- an unknown outcome resolves to "applied" (held by every member) or "not applied";
- a definite refusal or an exchange rejection that a member holds anyway is a failure too.

A drill on a throwaway cluster (`nodes=N`) starts it in a temporary directory and stops every
process it started, by pid, whatever happens (a failure, Ctrl-C, SIGTERM). On an existing
cluster (`manifest=DIR/cluster.json`, failover and membership only) the drill starts no node
itself but the one `membership` adds: a node it kills is restarted by the cluster's supervisor
(`quorumbook cluster up`, restarts on), whose new pid it reads from `cluster.json`. Two
launchers restarting one node would run two processes on one data directory.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.sdk import (
    AdminClient,
    ApiError,
    Client,
    ClusterUnavailable,
)
from cluster.launcher import LocalCluster
from cluster.machine import exchange_blob_of
from cluster.workload import (
    Ack,
    OrderLoad,
    Outcome,
    endless,
    market_spec,
    percentile,
    set_up,
    trader,
    wait_caught_up,
)
from statemachine.snapshot import decode, stated_hash

RTO_MEDIAN_TARGET_S = 0.5  # docs/operating/cluster.md: a new leader 0.2-0.5 s after a death
RTO_MAX_TARGET_S = 1.0
ACK_GAP_WARN_S = 0.5  # membership: a longer pause in acknowledgements is worth a warning...
ACK_GAP_MAX_S = 3.0  # ...and one this long means writes stopped: the verdict fails
MARKET = "DRILL-USD"
ACCOUNTS = 8
WORKERS = 8
STEADY_S = 1.0  # load acknowledged for this long before each fault, and after the last one
SUPERVISOR_WAIT_S = 45.0  # `cluster up` restarts a dead node after 1 s, doubling up to 30 s

Progress = Callable[[str], None]


# ---------------------------------------------------------------------- the check (pure)


@dataclass
class Holdings:
    """What one member's state holds of orders, from its snapshot: what `check_orders` reads."""

    coids: dict[str, dict[str, int]]  # account -> client_order_id -> the order accepted with it
    open_ids: set[int]  # the resting orders
    next_order_id: int  # the id the next accepted order gets (ids are given out 1, 2, ...)

    @classmethod
    def of(cls, state: Any) -> Holdings:
        return cls(state.coids, set(state.orders), state.next_order_id)

    def order_id(self, o: Outcome) -> int | None:
        return self.coids.get(o.account, {}).get(o.coid)

    def orphans(self, first: int) -> list[int]:
        """Order ids from `first` on that no client_order_id maps to."""
        mapped = {i for by_coid in self.coids.values() for i in by_coid.values()}
        return [i for i in range(first, self.next_order_id) if i not in mapped]


def check_orders(
    outcomes: list[Outcome], held: dict[str, Holdings], first_order_id: int = 1
) -> dict:
    """What every member (`held`: node id -> its holdings, taken after they converged) holds
    of what the load sent, against what the load was told. `first_order_id`: the id the
    exchange was to give next when the load started."""
    nodes = sorted(held)
    places = [o for o in outcomes if o.op == "place"]
    out: dict[str, Any] = {
        "acked_orders": 0,
        "acked_as_duplicate": 0,
        "rejected_orders": 0,
        "refused_orders": 0,
        "unknown_orders": 0,
        "unknown_applied": 0,
        "unknown_not_applied": 0,
        "lost_orders": 0,
        "duplicated_orders": 0,
        "mismatched_orders": 0,
        "refused_but_present": 0,
        "rejected_but_present": 0,
        "lookups_disagree": 0,
        "acked_cancels": 0,
        "lost_cancels": 0,
        "lost_samples": [],
        "duplicated_samples": [],
    }
    for o in places:
        ids = [held[n].order_id(o) for n in nodes]
        present = [i is not None for i in ids]
        if len(set(ids)) > 1:
            out["lookups_disagree"] += 1
        if o.result == "acked":
            out["acked_orders"] += 1
            out["acked_as_duplicate"] += o.recovered
            if not all(present):
                out["lost_orders"] += 1
                if len(out["lost_samples"]) < 10:
                    missing = [n for n, p in zip(nodes, present, strict=True) if not p]
                    out["lost_samples"].append({"client_order_id": o.coid, "missing_on": missing})
            elif o.order_id is not None and set(ids) != {o.order_id}:
                out["mismatched_orders"] += 1
        elif o.result == "unknown":
            out["unknown_orders"] += 1
            if all(present):
                out["unknown_applied"] += 1
            elif not any(present):
                out["unknown_not_applied"] += 1
        elif o.result == "refused":
            out["refused_orders"] += 1
            out["refused_but_present"] += any(present)
        elif o.result == "rejected":
            out["rejected_orders"] += 1
            out["rejected_but_present"] += any(present)
    # Every order id given out since the load started maps back to one client_order_id (every
    # order of the load has one, and the load's are the only orders of a throwaway cluster):
    # an id none maps to is an extra copy of some order.
    orphans = {n: held[n].orphans(first_order_id) for n in nodes}
    worst = max(nodes, key=lambda n: len(orphans[n]))
    out["duplicated_orders"] = len(orphans[worst])
    out["duplicated_samples"] = [{"node": worst, "order_id": i} for i in orphans[worst][:10]]
    for o in outcomes:
        if o.op == "cancel" and o.result == "acked":
            out["acked_cancels"] += 1
            if any(held[n].order_id(o) in held[n].open_ids for n in nodes):
                out["lost_cancels"] += 1
    return out


def order_failures(found: dict) -> list[str]:
    """The verdict's items in `check_orders`' figures (empty: nothing wrong)."""
    failures = [
        f"{found[key]} {what}"
        for key, what in (
            ("lost_orders", "acknowledged orders lost"),
            ("duplicated_orders", "orders applied twice (order ids no client_order_id maps to)"),
            ("mismatched_orders", "acknowledged orders held under another order id"),
            ("lost_cancels", "acknowledged cancels whose order is still open"),
            ("refused_but_present", "orders refused definitely but applied"),
            ("rejected_but_present", "orders rejected by the exchange but held"),
            ("lookups_disagree", "orders the members disagree on"),
        )
        if found[key]
    ]
    unresolved = found["unknown_orders"] - found["unknown_applied"] - found["unknown_not_applied"]
    if unresolved:
        failures.append(f"{unresolved} unknown outcomes held by some members only")
    if found["acked_orders"] == 0:
        failures.append("no order was acknowledged: the drill proved nothing")
    return failures


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch of [start, end] without an acknowledgement (`times` ascending)."""
    inside = [t for t in times if start < t < end]
    edges = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(edges))


def load_figures(outcomes: list[Outcome]) -> dict:
    """The load's own counts (places and cancels) and the latency of its acknowledged calls."""
    by_result = Counter(o.result for o in outcomes)
    latencies = sorted((o.done_t - o.sent_t) * 1000 for o in outcomes if o.result == "acked")
    return {
        "ops_sent": len(outcomes),
        "ops_acked": by_result["acked"],
        "ops_rejected": by_result["rejected"],
        "ops_refused": by_result["refused"],
        "ops_unknown": by_result["unknown"],
        "trades": sum(o.trades for o in outcomes),
        "latency_ms_p50": round(percentile(latencies, 50), 1),
        "latency_ms_p99": round(percentile(latencies, 99), 1),
        "latency_ms_max": round(latencies[-1], 1) if latencies else 0.0,
    }


# ---------------------------------------------------------------------- the result


@dataclass
class DrillResult:
    drill: str
    ok: bool = False
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rto_s: float | None = None  # the drill's recovery time (each drill says what it measures)
    figures: dict = field(default_factory=dict)  # the drill's own figures, flattened in JSON
    state_hashes_equal: bool = False
    pids: list[int] = field(default_factory=list)  # every process the drill started
    pids_running: list[int] = field(default_factory=list)  # ... of which still run at the end

    def fail(self, reason: str) -> None:
        self.failures.append(reason)

    def as_json(self) -> dict:
        """DESIGN.md "CLI": the contract's keys first, then the drill's own figures."""
        first = {
            "drill": self.drill,
            "ok": self.ok,
            "rto_s": None if self.rto_s is None else round(self.rto_s, 3),
            "acked_orders": self.figures.get("acked_orders", 0),
            "lost_orders": self.figures.get("lost_orders", 0),
            "duplicated_orders": self.figures.get("duplicated_orders", 0),
            "state_hashes_equal": self.state_hashes_equal,
        }
        return {
            **first,
            **{k: v for k, v in self.figures.items() if k not in first},
            "failures": self.failures,
            "warnings": self.warnings,
            "pids": self.pids,
            "pids_running": self.pids_running,
        }


class DrillAborted(Exception):
    """A step of the scenario could not be done (no leader, no acknowledgement...)."""


# ---------------------------------------------------------------------- the cluster


def pid_alive(pid: int) -> bool:
    """A process that runs (a zombie awaiting its reaping counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def reap(result: DrillResult) -> None:
    """After a throwaway cluster's stop: SIGKILL any process the drill started that still runs
    (also any the launcher no longer lists), reap them, and fail the verdict for any still
    running 10 s later (`pids_running`)."""
    for pid in result.pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        for pid in result.pids:  # reap: a child of ours stays a zombie until then
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        running = [p for p in result.pids if pid_alive(p)]
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    result.pids_running = running
    if running:
        result.fail(f"processes still running after the clean-up: {running}")


class DrillLog:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        if self.progress is not None:
            self.progress(f"[{time.perf_counter() - self.t0:6.1f}s] {line}")


class Target:
    """The cluster a drill runs on: a throwaway one it owns (`nodes`), or the supervised local
    cluster of `manifest` (its nodes may be killed; its supervisor restarts them)."""

    def __init__(
        self, log: DrillLog, result: DrillResult, *, nodes: int, manifest: Path | None, keep: bool
    ) -> None:
        self.log = log
        self.result = result
        self.n = nodes
        self.manifest = manifest
        self.keep = keep
        self.owned = manifest is None
        self.root: Path | None = None
        self.cluster: LocalCluster = None  # type: ignore[assignment]
        self.held: dict[str, Holdings] = {}  # verify(): node id -> what its state holds
        self.first_order_id = 1  # load(): the order id the exchange was to give next

    # ------------------------------------------------------------------ set-up and clean-up

    def __enter__(self) -> Target:
        if self.manifest is not None:
            self.cluster = LocalCluster.open(self.manifest)
            dead = [nid for nid, n in self.cluster.nodes.items() if not n.alive()]
            if dead:
                raise DrillAborted(
                    f"nodes {', '.join(dead)} of {self.manifest} are not running: a drill "
                    "starts from a healthy cluster"
                )
            leader = self.cluster.wait_all_following(30)
            self.log(f"cluster {self.manifest}: {len(self.cluster.nodes)} nodes, leader {leader}")
            return self
        self.root = Path(tempfile.mkdtemp(prefix=f"qb-drill-{self.result.drill}-"))
        try:
            self.cluster = LocalCluster.create(self.root / "cluster", self.n)
            # Its nodes stop with this process even if it is killed before its clean-up runs.
            self.cluster.exit_with_launcher = True
            self.cluster.start()
            self._record(*self.cluster.nodes)
            leader = self.cluster.wait_all_following(60)
        except BaseException:
            self.__exit__()
            raise
        self.log(f"throwaway {self.n}-node cluster up in {self.root} (leader {leader})")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.owned:  # its supervisor restarts whatever the drill killed
            self.result.pids_running = [p for p in self.result.pids if pid_alive(p)]
            return
        if self.cluster is not None:
            self.cluster.stop_all()
        reap(self.result)
        if self.root is not None:
            if self.keep:
                self.log(f"cluster directory kept: {self.root} (node logs: */node.log)")
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    def _record(self, *node_ids: str) -> None:
        for node_id in node_ids:
            node = self.cluster.nodes[node_id]
            if node.process is not None and node.pid not in self.result.pids:
                self.result.pids.append(node.pid)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ nodes

    def url(self, node_id: str) -> str:
        return self.cluster.nodes[node_id].config.api_url

    def node_of(self, url: str | None) -> str | None:
        return next((nid for nid, n in self.cluster.nodes.items() if n.config.api_url == url), None)

    def kill(self, *node_ids: str) -> None:
        """SIGKILL them all first (together), then reap each."""
        for node_id in node_ids:
            self.cluster.signal(node_id, signal.SIGKILL)
        for node_id in node_ids:
            self.cluster.kill(node_id)

    def restart(self, node_id: str) -> None:
        """Bring back a node the drill killed, from its own data directory: start it (a
        throwaway cluster), or wait until the supervisor has and take its new pid."""
        if self.owned:
            self.cluster.start(node_id)
            self._record(node_id)
            return
        node = self.cluster.nodes[node_id]
        deadline = time.monotonic() + SUPERVISOR_WAIT_S
        while time.monotonic() < deadline:
            listed = LocalCluster.open(self.cluster.manifest_path).nodes.get(node_id)
            if listed is not None and listed.adopted_pid != node.pid and listed.alive():
                node.process, node.adopted_pid = None, listed.adopted_pid
                self.log(f"{node_id} restarted by its supervisor (pid {node.pid})")
                return
            time.sleep(0.1)
        raise DrillAborted(
            f"{node_id} was not restarted within {SUPERVISOR_WAIT_S:.0f} s: a drill on --cluster "
            "needs the cluster's supervisor to restart it (`quorumbook cluster up`, without "
            f"--no-restart); start {node_id} again before anything else"
        )

    def add_node(self) -> str:
        node_id = self.cluster.add_node()
        self._record(node_id)
        return node_id

    def admin(self, **kwargs: Any) -> AdminClient:
        return AdminClient(
            self.cluster.api_urls(),
            self.cluster.admin_credentials(),
            verify=self.cluster.verify,
            **kwargs,
        )

    def wait_caught_up(self, node_id: str, timeout_s: float = 60.0) -> float:
        """Seconds until `node_id` has applied the leader's cmd_index (`workload.wait_caught_up`)."""
        try:
            return wait_caught_up(self.cluster, node_id, timeout_s)
        except TimeoutError as exc:
            raise DrillAborted(str(exc)) from None

    # ------------------------------------------------------------------ the load

    def load(
        self,
        seed: int,
        rate: float,
        *,
        timeout_s: float,
        deadline_s: float,
        backoff_s: float = 0.01,
        backoff_max_s: float = 0.05,
    ) -> OrderLoad:
        """The order load (not started). A short back-off: the SDK's default (20 ms doubling
        to 250 ms) would quantize a ~0.3 s RTO."""
        market, keys = set_up(
            self.cluster, market_spec(MARKET), [trader(a) for a in range(ACCOUNTS)]
        )
        with self.admin() as admin:  # where the load's order ids start: the leader's state
            leader = admin.barrier()["node_id"]
            taken = admin.snapshot(self.url(leader), timeout_s=60)
        self.first_order_id = decode(exchange_blob_of(taken.blob)).next_order_id
        load = OrderLoad(
            self.cluster.api_urls(),
            keys,
            endless(seed, rate, ACCOUNTS, market),
            prefix="drill",
            workers=WORKERS,
            verify=self.cluster.verify,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self.log(f"order load: {rate:g} orders/s (seed {seed}) over {ACCOUNTS} accounts, {MARKET}")
        return load

    def wait_steady(self, load: OrderLoad, seconds: float, rate: float) -> None:
        """Let the load be acknowledged for `seconds` (at least a quarter of its rate)."""
        t0 = time.perf_counter()
        want = max(1, int(rate * seconds / 4))
        deadline = t0 + seconds + 30
        while time.perf_counter() < deadline:
            if load.error is not None:
                raise DrillAborted(f"the order load failed: {load.error!r}")
            if time.perf_counter() - t0 >= seconds and load.acks_since(t0) >= want:
                return
            time.sleep(0.02)
        raise DrillAborted(
            f"the load was not being acknowledged: {load.acks_since(t0)} acks in "
            f"{time.perf_counter() - t0:.0f} s ({dict(load.counts())})"
        )

    # ------------------------------------------------------------------ the end

    def verify(self, load: OrderLoad) -> None:
        """Stop the load, commit a barrier, wait until every member has the same state, take
        every member's snapshot and check what it holds: the figures and verdict items of
        `result`."""
        load.stop()
        outcomes = load.snapshot()
        result = self.result
        figures = load_figures(outcomes)
        result.figures.update(figures)
        self.log(
            f"load stopped: {figures['ops_sent']} operations sent, {figures['ops_acked']} acked, "
            f"{figures['ops_rejected']} rejected by the exchange, {figures['ops_refused']} "
            f"refused, {figures['ops_unknown']} unknown, {figures['trades']} trades"
        )
        members = sorted(self.cluster.nodes)
        result.figures["members"] = members
        with self.admin(deadline_s=30) as admin:
            result.figures["leader"] = admin.barrier()["node_id"]
            blobs = self._converged_snapshots(admin, members)
        hashes = {nid: stated_hash(blob) for nid, blob in blobs.items()}
        result.state_hashes_equal = len(set(hashes.values())) == 1
        result.figures["state_hash"] = hashes[members[0]] if result.state_hashes_equal else hashes
        if not result.state_hashes_equal:
            result.fail(f"the members' states differ: {hashes}")
        self.held, indexes = {}, {}
        for nid, blob in blobs.items():
            try:
                state = decode(blob)  # checks the checksum and every invariant
            except ValueError as exc:
                raise DrillAborted(f"{nid}'s state fails its checks: {exc}") from exc
            self.held[nid], indexes[nid] = Holdings.of(state), state.cmd_index
        one = set(indexes.values())
        result.figures["cmd_index"] = one.pop() if len(one) == 1 else indexes
        found = check_orders(outcomes, self.held, self.first_order_id)
        result.figures.update(found)
        self.log(
            f"{len(members)} members at cmd_index {result.figures['cmd_index']}, state hashes "
            f"equal: {result.state_hashes_equal}; {found['acked_orders']} orders acknowledged, "
            f"lost {found['lost_orders']}, duplicated {found['duplicated_orders']}; "
            f"{found['unknown_orders']} unknown: {found['unknown_applied']} applied, "
            f"{found['unknown_not_applied']} not"
        )
        for failure in order_failures(found):
            result.fail(failure)

    def _converged_snapshots(self, admin: AdminClient, members: list[str]) -> dict[str, bytes]:
        """Every member's exchange state (its snapshot, inside the node's), taken once they
        report the same one. A write cut by the load's stop may still commit while they are
        taken: then they are taken again. Members that never agree are taken as they are."""
        for _ in range(3):
            try:
                self.cluster.wait_converged(60, nodes=members)
            except TimeoutError:
                converged = False
            else:
                converged = True
            taken = {nid: admin.snapshot(self.url(nid), timeout_s=60) for nid in members}
            if not converged or len({(s.cmd_index, s.state_hash) for s in taken.values()}) == 1:
                break
        return {nid: exchange_blob_of(s.blob) for nid, s in taken.items()}


def _run(
    name: str,
    nodes: int,
    manifest: Path | None,
    keep: bool,
    progress: Progress | None,
    scenario: Callable[[Target, DrillResult], None],
) -> DrillResult:
    """The frame of the drills on a `Target` cluster: the cluster and its clean-up, then
    `judge`."""
    result = DrillResult(name)
    log = DrillLog(progress)
    result.figures["nodes"] = nodes if manifest is None else None
    result.figures["cluster"] = str(manifest) if manifest else None

    def body() -> None:
        with Target(log, result, nodes=nodes, manifest=manifest, keep=keep) as target:
            result.figures["nodes"] = len(target.cluster.nodes)
            scenario(target, result)

    return judge(result, log, body)


def judge(result: DrillResult, log: DrillLog, body: Callable[[], None]) -> DrillResult:
    """Run a drill's `body` (its scenario with its clean-up) and give the verdict: a step
    that cannot be done is a failure, saying why (Ctrl-C and SIGTERM are not: the body
    cleans up and they go on up); the wall time; PASS when nothing failed."""
    started = time.perf_counter()
    try:
        body()
    except Exception as exc:  # any step that could not be done fails the verdict, saying why
        reason = str(exc) if isinstance(exc, DrillAborted) else f"{type(exc).__name__}: {exc}"
        result.fail(f"aborted: {reason}")
        log(f"aborted: {reason}")
    result.figures["duration_s"] = round(time.perf_counter() - started, 1)
    result.ok = not result.failures
    log(f"verdict: {'PASS' if result.ok else 'FAIL'}")
    return result


def _wait_first_ack(load: OrderLoad, after: float, not_from: str | None, what: str) -> Ack:
    try:
        return load.wait_first_ack(after, not_from, timeout_s=30.0)
    except RuntimeError:
        raise DrillAborted(f"the order load failed: {load.error!r}") from None
    except TimeoutError:
        raise DrillAborted(f"no order acknowledged within 30 s of {what}") from None


# ---------------------------------------------------------------------- the drills


def failover(
    *,
    nodes: int = 3,
    manifest: Path | None = None,
    seed: int = 7,
    rate: float = 100.0,
    rounds: int = 3,
    interval_s: float = STEADY_S,
    keep: bool = False,
    progress: Progress | None = None,
) -> DrillResult:
    """SIGKILL the leader under load `rounds` times; a round's RTO = the kill -> the next order
    acknowledged by another node (`rto_s`: the worst round); restart the killed node and wait
    until it has caught up. At the end every acknowledged order is on every node exactly once
    and the state hashes are equal. RTO over its target is a warning, not the verdict."""

    def scenario(target: Target, result: DrillResult) -> None:
        log, cluster = target.log, target.cluster
        rto_rounds: list[float] = []
        result.figures.update({"seed": seed, "rate": rate, "rounds": []})
        load = target.load(seed, rate, timeout_s=2.0, deadline_s=10.0)
        with load:
            for n in range(1, rounds + 1):
                target.wait_steady(load, interval_s, rate)
                leader = cluster.wait_for_leader(20)
                before = cluster.status(leader)
                term = before["term"] if before else None
                log(
                    f"round {n}: SIGKILL leader {leader} (pid {cluster.nodes[leader].pid}, term {term})"
                )
                killed_url = target.url(leader)
                t_kill = time.perf_counter()
                target.kill(leader)
                ack = _wait_first_ack(load, t_kill, killed_url, f"killing {leader}")
                rto = ack.t - t_kill
                new_leader = target.node_of(ack.url)
                rto_rounds.append(rto)
                log(
                    f"round {n}: next order acknowledged by {new_leader} {rto * 1000:.0f} ms after the kill"
                )
                target.restart(leader)
                caught_up = target.wait_caught_up(leader)
                log(
                    f"round {n}: {leader} back (pid {cluster.nodes[leader].pid}), "
                    f"caught up in {caught_up:.2f} s"
                )
                after = cluster.status(new_leader) if new_leader else None
                result.figures["rounds"].append(
                    {
                        "round": n,
                        "killed": leader,
                        "term_before": term,
                        "new_leader": new_leader,
                        "term_after": after["term"] if after else None,
                        "rto_s": round(rto, 3),
                        "caught_up_s": round(caught_up, 2),
                    }
                )
            target.wait_steady(load, interval_s, rate)
        result.rto_s = max(rto_rounds)
        median = statistics.median(rto_rounds)
        result.figures.update(
            {
                "rto_median_s": round(median, 3),
                "rto_target_median_s": RTO_MEDIAN_TARGET_S,
                "rto_target_max_s": RTO_MAX_TARGET_S,
            }
        )
        if median > RTO_MEDIAN_TARGET_S or result.rto_s > RTO_MAX_TARGET_S:
            result.warnings.append(
                f"RTO median {median * 1000:.0f} ms, max {result.rto_s * 1000:.0f} ms: over the "
                f"target ({RTO_MEDIAN_TARGET_S * 1000:.0f} / {RTO_MAX_TARGET_S * 1000:.0f} ms)"
            )
        target.verify(load)

    return _run("failover", nodes, manifest, keep, progress, scenario)


def membership(
    *,
    nodes: int = 3,
    manifest: Path | None = None,
    seed: int = 7,
    rate: float = 100.0,
    keep: bool = False,
    progress: Progress | None = None,
) -> DrillResult:
    """Replace a node under load: add a new one (and wait until it caught up), then remove an
    old follower. The load must be acknowledged throughout (`rto_s`: the longest pause between
    acknowledgements meanwhile), nothing acknowledged lost, the final members' states equal,
    the removed node's process stopped."""

    def scenario(target: Target, result: DrillResult) -> None:
        log, cluster = target.log, target.cluster
        result.figures.update({"seed": seed, "rate": rate})
        load = target.load(seed, rate, timeout_s=2.0, deadline_s=10.0)
        with load:
            target.wait_steady(load, STEADY_S, rate)
            before = sorted(cluster.nodes)
            t_start = time.perf_counter()
            log("adding a node (cluster add-node)")
            added = target.add_node()
            t_added = time.perf_counter()
            log(f"added {added} (pid {cluster.nodes[added].pid}) in {t_added - t_start:.2f} s")
            caught_up = target.wait_caught_up(added)
            log(f"{added} caught up in {caught_up:.2f} s")
            leader = cluster.wait_for_leader(20)
            victim = next(nid for nid in before if nid != leader)
            victim_node = cluster.nodes[victim]
            victim_pid = victim_node.pid
            log(f"removing follower {victim} (pid {victim_pid}; cluster remove-node)")
            t_remove = time.perf_counter()
            cluster.remove_node(victim)
            t_removed = time.perf_counter()
            stopped = not victim_node.alive() and not (victim_pid and pid_alive(victim_pid))
            log(f"removed {victim} in {t_removed - t_remove:.2f} s; its process stopped: {stopped}")
            target.wait_steady(load, STEADY_S, rate)
            t_end = time.perf_counter()
            acks = [o.done_t for o in load.snapshot() if o.result == "acked"]
        gap = longest_gap(acks, t_start, t_end)
        result.rto_s = gap
        result.figures.update(
            {
                "added": added,
                "removed": victim,
                "removed_pid": victim_pid,
                "removed_process_stopped": stopped,
                "add_s": round(t_added - t_start, 2),
                "caught_up_s": round(caught_up, 2),
                "remove_s": round(t_removed - t_remove, 2),
                "ack_gap_limit_s": ACK_GAP_MAX_S,
            }
        )
        log(f"longest pause between acknowledgements meanwhile: {gap * 1000:.0f} ms")
        target.verify(load)
        expected = sorted((set(before) - {victim}) | {added})
        with target.admin() as admin:
            leader_status = admin.barrier()
        seen = sorted({p["id"] for p in leader_status["peers"]} | {leader_status["node_id"]})
        result.figures["leader_sees_members"] = seen
        if result.figures["members"] != expected or seen != expected:
            result.fail(f"members are {seen} (the leader's view), expected {expected}")
        if not stopped:
            result.fail(f"the removed node {victim}'s process (pid {victim_pid}) still runs")
        if gap > ACK_GAP_MAX_S:
            result.fail(f"no acknowledgement for {gap:.2f} s while the membership changed")
        elif gap > ACK_GAP_WARN_S:
            result.warnings.append(f"acknowledgements paused for {gap * 1000:.0f} ms")

    return _run("membership", nodes, manifest, keep, progress, scenario)


def quorum_loss(
    *,
    nodes: int = 3,
    seed: int = 7,
    rate: float = 100.0,
    outage_s: float = 3.0,
    keep: bool = False,
    progress: Progress | None = None,
) -> DrillResult:
    """On a throwaway cluster (a supervisor would end the outage by itself): SIGKILL a
    majority, all followers (the leader is left and must notice it lost its majority), for
    `outage_s`: no write attempted meanwhile may be acknowledged, nor any linearizable read
    answered. Then restart them: a leader, writes acknowledged again (`rto_s`: the restart ->
    the first acknowledgement), nothing acknowledged lost, every unknown outcome applied
    once or not at all."""

    def scenario(target: Target, result: DrillResult) -> None:
        log, cluster = target.log, target.cluster
        result.figures.update({"seed": seed, "rate": rate})
        # A short SDK deadline: a write attempted during the outage ends (refused, or unknown)
        # within it, rather than riding it out and being acknowledged after the recovery.
        write_deadline_s = min(1.0, outage_s / 2)
        load = target.load(seed, rate, timeout_s=write_deadline_s, deadline_s=write_deadline_s)
        with load:
            target.wait_steady(load, STEADY_S, rate)
            leader = cluster.wait_for_leader(20)
            members = sorted(cluster.nodes)
            majority = len(members) // 2 + 1
            victims = [nid for nid in members if nid != leader][:majority]
            survivors = [nid for nid in members if nid not in victims]
            log(
                f"SIGKILL {majority} of {len(members)} nodes: {', '.join(victims)}; "
                f"left: {', '.join(survivors)} (leader {leader})"
            )
            t_kill = time.perf_counter()
            target.kill(*victims)
            t_down = time.perf_counter()
            reads, answered_reads, stepped_down_s = _outage(target, leader, t_down, outage_s)
            log(
                f"outage: {reads} linearizable reads, {answered_reads} answered; {leader} "
                + (
                    f"stopped calling itself leader after {stepped_down_s:.2f} s"
                    if stepped_down_s is not None
                    else "still calls itself leader"
                )
            )
            t_restart = time.perf_counter()
            log(f"restarting {', '.join(victims)} from their data directories")
            for nid in victims:
                target.restart(nid)
            new_leader = cluster.wait_for_leader(30)
            elected_s = time.perf_counter() - t_restart
            ack = _wait_first_ack(load, t_restart, None, "the majority's restart")
            result.rto_s = ack.t - t_restart
            log(
                f"leader {new_leader} after {elected_s:.2f} s; writes acknowledged again "
                f"{result.rto_s:.2f} s after the restart"
            )
            for nid in victims:
                target.wait_caught_up(nid)
            target.wait_steady(load, STEADY_S, rate)
        target.verify(load)
        outcomes = load.snapshot()
        # Attempted during the outage: started once the majority was dead, ended before it came
        # back. (An answer to a write in flight at the kill may be an acknowledgement: its
        # commit can have happened just before.)
        during = [o for o in outcomes if o.sent_t >= t_down and o.done_t < t_restart]
        by_result = Counter(o.result for o in during)
        # An exchange rejection is an answer of the state machine: it needs a commit too.
        answered = by_result["acked"] + by_result["rejected"]
        held = list(target.held.values())
        unknown = [
            [h.order_id(o) is not None for h in held]
            for o in during
            if o.result == "unknown" and o.op == "place"
        ]
        acked_before = [
            o for o in outcomes if o.op == "place" and o.result == "acked" and o.done_t < t_kill
        ]
        result.figures.update(
            {
                "killed": victims,
                "survivors": survivors,
                "signal": "SIGKILL",
                "outage_s": round(t_restart - t_down, 2),
                "survivor_stepped_down_s": (
                    None if stepped_down_s is None else round(stepped_down_s, 2)
                ),
                "writes_during_outage": len(during),
                "refused_during_outage": by_result["refused"],
                "unknown_during_outage": by_result["unknown"],
                "acknowledged_during_outage": answered,
                "unknown_during_outage_applied": sum(all(h) for h in unknown),
                "unknown_during_outage_not_applied": sum(not any(h) for h in unknown),
                "in_flight_at_kill": sum(1 for o in outcomes if o.sent_t < t_down < o.done_t),
                "reads_during_outage": reads,
                "reads_answered_during_outage": answered_reads,
                "leader_after": new_leader,
                "leader_elected_s": round(elected_s, 2),
                "acked_before_outage": len(acked_before),
                "lost_before_outage": sum(
                    any(h.order_id(o) is None for h in held) for o in acked_before
                ),
            }
        )
        if answered:
            result.fail(f"{answered} writes acknowledged during the outage (split brain)")
        if answered_reads:
            result.fail(f"{answered_reads} linearizable reads answered during the outage")
        if not during:
            result.fail("no write was attempted during the outage: the drill proved nothing")

    return _run("quorum-loss", nodes, None, keep, progress, scenario)


def _outage(
    target: Target, leader: str, t_down: float, outage_s: float
) -> tuple[int, int, float | None]:
    """Until `outage_s` after `t_down`: linearizable reads (the book; a barrier) from a thread,
    which must not be answered, and a watch (every 50 ms) on the survivor that led, which must
    stop calling itself leader -> (reads, reads answered, seconds until it stepped down)."""
    cluster = target.cluster
    urls, verify = cluster.api_urls(), cluster.verify
    deadline_s = max(0.2, min(1.0, outage_s / 4))
    timing = {"timeout_s": deadline_s, "deadline_s": deadline_s}
    end = t_down + outage_s
    tally: Counter = Counter()

    def read() -> None:
        with (
            Client(urls, None, verify=verify, **timing) as public,
            AdminClient(urls, cluster.admin_credentials(), verify=verify, **timing) as admin,
        ):
            # Stop in time: a read that starts later could outlive the outage.
            while not tally["reads"] or time.perf_counter() + 2 * deadline_s <= end:
                for attempt in (lambda: public.book(MARKET), admin.barrier):
                    tally["reads"] += 1
                    try:
                        attempt()
                    except (ClusterUnavailable, ApiError):
                        continue
                    tally["answered"] += 1

    reader = threading.Thread(target=read, name="drill-reads", daemon=True)
    reader.start()
    stepped_down_s = None
    while time.perf_counter() < end or reader.is_alive():
        status = cluster.status(leader, 0.5)
        if stepped_down_s is None and status is not None and status["role"] != "leader":
            stepped_down_s = time.perf_counter() - t_down
        time.sleep(0.05)
    reader.join()
    return tally["reads"], tally["answered"], stepped_down_s


# ---------------------------------------------------------------------- the report


def format_report(data: dict) -> str:
    """The human form of a drill's `as_json()`."""
    drill = data["drill"]
    verdict = "PASS" if data["ok"] else "FAIL"
    where = data["cluster"] or f"a throwaway {data['nodes']}-node cluster"
    lines = [f"drill {drill}: {verdict} ({where}, {data.get('duration_s', '?')} s)"]
    if drill == "failover" and data["rto_s"] is not None:
        lines.append(
            f"  RTO {data['rto_s'] * 1000:.0f} ms (worst of {len(data['rounds'])} rounds; "
            f"target <= {RTO_MAX_TARGET_S * 1000:.0f}), median {data['rto_median_s'] * 1000:.0f} "
            f"ms (target <= {RTO_MEDIAN_TARGET_S * 1000:.0f})"
        )
    for r in data.get("rounds", []):
        lines.append(
            f"    round {r['round']}: killed {r['killed']} (term {r['term_before']}) -> "
            f"{r['new_leader']} (term {r['term_after']}) in {r['rto_s'] * 1000:.0f} ms; "
            f"{r['killed']} caught up in {r['caught_up_s']:.2f} s"
        )
    if drill == "membership" and "added" in data:
        lines.append(
            f"  added {data['added']} ({data['add_s']:.2f} s, caught up in "
            f"{data['caught_up_s']:.2f} s), removed {data['removed']} ({data['remove_s']:.2f} s, "
            f"process stopped: {data['removed_process_stopped']}); members "
            f"{', '.join(data.get('members', []))}"
        )
        lines.append(
            f"  RTO (longest pause between acknowledgements): {data['rto_s'] * 1000:.0f} ms "
            f"(limit {data['ack_gap_limit_s'] * 1000:.0f})"
        )
    if drill == "quorum-loss" and "killed" in data:
        stepped = data["survivor_stepped_down_s"]
        lines.append(
            f"  SIGKILLed {', '.join(data['killed'])} for {data['outage_s']:.1f} s; survivor "
            f"{', '.join(data['survivors'])} "
            + (f"stepped down after {stepped} s" if stepped is not None else "never stepped down")
        )
        lines.append(
            f"  during the outage: {data['writes_during_outage']} writes: "
            f"{data['refused_during_outage']} refused, {data['unknown_during_outage']} unknown, "
            f"{data['acknowledged_during_outage']} acknowledged; {data['reads_during_outage']} "
            f"linearizable reads, {data['reads_answered_during_outage']} answered"
        )
        lines.append(
            f"  after the restart: leader {data['leader_after']} in "
            f"{data['leader_elected_s']:.2f} s, writes acknowledged again after "
            f"{data['rto_s']:.2f} s (RTO)"
        )
    if drill == "restore" and "restore_s" in data:
        cut = data["last_segment_cut_before_disaster_s"]
        lines.append(
            f"  restored from backup {data['backup_id'] or '(none)'} and "
            f"{data['segments_read']} archived segments to cmd_index "
            f"{data['restored_cmd_index']} (seq {data['restored_seq']}) in "
            f"{data['restore_s']:.2f} s; RTO {data['rto_s']:.2f} s (the disaster -> the restored "
            "cluster's first acknowledgement)"
        )
        lines.append(
            f"  RPO {data['rpo_orders']} orders acknowledged after the restored point, the "
            f"oldest {data['rpo_s']:.2f} s before the disaster"
            + (
                f" (the last archived segment was cut {abs(cut):.2f} s "
                f"{'before' if cut >= 0 else 'after'} it)"
                if cut is not None
                else ""
            )
        )
        lines.append(
            f"  orders: {data['acked_orders']} acknowledged, {data['unknown_orders']} never "
            f"acknowledged; lost {data['lost_orders']}, past the restored point "
            f"{data['orders_past_the_restore_point']}, duplicated {data['duplicated_orders']}; "
            f"the restored hash on every node: {data['restored_hash_on_every_node']}, state "
            f"hashes equal: {data['state_hashes_equal']}"
        )
    if "unknown_orders" in data and "ops_sent" in data:
        lines.append(
            f"  orders: {data['acked_orders']} acknowledged ({data['acked_as_duplicate']} settled "
            f"as duplicates), {data['rejected_orders']} rejected by the exchange, "
            f"{data['refused_orders']} refused, {data['unknown_orders']} unknown "
            f"({data['unknown_applied']} applied, {data['unknown_not_applied']} not); "
            f"{data['trades']} trades, latency p50 {data['latency_ms_p50']} ms"
        )
        lines.append(
            f"  lost {data['lost_orders']}, duplicated {data['duplicated_orders']}, acknowledged "
            f"cancels undone {data['lost_cancels']}; state hashes equal: "
            f"{data['state_hashes_equal']} (cmd_index {data.get('cmd_index')})"
        )
    lines.append(
        f"  processes started: {len(data['pids'])}; still running: "
        f"{len(data['pids_running'])}" + (" (cluster members)" if data["cluster"] else "")
    )
    lines += [f"  warning: {w}" for w in data["warnings"]]
    lines += [f"  FAILED: {f}" for f in data["failures"]]
    return "\n".join(lines)
