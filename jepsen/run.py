"""One run of the harness: `quorumbook jepsen run` (DESIGN.md "Jepsen harness").

A fresh local cluster (each node in its own network namespace when a partition nemesis is
asked for), the `orders` workload from concurrent logical clients (jepsen/client.py), faults
on a seeded schedule (jepsen/nemesis/), then: every fault healed, every node running, the
cluster settled, final reads from every node; the committed log taken from the run's log
archive (`quorumbook backup log`), every checker run (jepsen/checkers/), and a report
(jepsen/report.py). Everything lands in `OUT/<run>/`:

    history.jsonl   every op (invoke / ok / fail / info) and nemesis event
    log.jsonl       the committed commands, from cmd_index 1
    results.json    the checkers' verdicts and the run's options
    index.html      the report, with latency.png and throughput.png
    cluster/        the nodes' configs, data and logs; archive/: the log archive

Every process the run starts, it stops, and every fault it injects, it heals, on every path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from api.sdk import AdminClient, ApiError, ClusterUnavailable
from cluster.launcher import RAFT_KEYS, LocalCluster

from .checkers import FINAL_DIR, check_all
from .checkers.final import SUFFIX as SNAPSHOT_SUFFIX
from .client import Clients, setup_commands
from .history import HistoryWriter
from .nemesis import Context
from .report import write_report

NEMESES = ("kill", "pause", "partition", "restart-all", "clock", "membership", "data")
ACCOUNTS = 4
SETTLE_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 0.5

Progress = Callable[[str], None]


@dataclass
class Options:
    nodes: int = 3
    time_s: float = 30.0
    rate: float = 100.0
    nemeses: tuple[str, ...] = ("kill", "pause", "partition")
    workload: str = "orders"
    seed: int = 1
    out: Path = field(default_factory=lambda: Path("store"))
    concurrency: int | None = None  # default: 2 per node
    interval_s: float = 4.0  # a fault lasts, and the quiet between two lasts, up to this
    unsafe_local_reads: bool = False
    unsafe_raft_fixes_off: bool = False
    raft_settings: dict = field(default_factory=dict)  # [raft] keys of the nodes' config

    def check(self) -> None:
        unknown = sorted(set(self.nemeses) - set(NEMESES))
        if unknown:
            raise ValueError(f"unknown nemesis {', '.join(unknown)} (known: {', '.join(NEMESES)})")
        if self.workload != "orders":
            raise ValueError(f"unknown workload {self.workload!r} (known: orders)")
        if self.nodes not in (1, 3, 5):
            raise ValueError("--nodes must be 1, 3 or 5")
        for key in self.raft_settings:
            if key not in RAFT_KEYS:
                raise ValueError(f"--raft {key}: not a [raft] key of the node's config")


def _nemesis(name: str, net, cluster: LocalCluster):
    from .nemesis.process import Kill, Pause, RestartAll

    if name == "partition":
        from .nemesis.partition import Partition

        return Partition(net)
    if name == "clock":
        from .nemesis.clock import Clock

        return Clock(lambda node_id: cluster.nodes[node_id].config.data_dir)
    if name == "membership":
        from .nemesis.membership import Membership

        return Membership(cluster, net)
    if name == "data":
        from .nemesis.data import Data

        return Data(cluster)
    return {"kill": Kill, "pause": Pause, "restart-all": RestartAll}[name]()


class _Cluster:
    """The cluster as the nemeses and the run see it: control of the node processes, and who
    leads (asked of every live node, briefly, never waiting on a paused one for long)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.lock = threading.Lock()

    def start(self, node_id: str | None = None) -> None:
        with self.lock:
            self.cluster.start(node_id)

    def stop(self, node_id: str, timeout_s: float = 10.0) -> None:
        with self.lock:
            self.cluster.stop(node_id, timeout_s)

    def kill(self, node_id: str) -> None:
        with self.lock:
            self.cluster.kill(node_id)

    def signal(self, node_id: str, signum: int) -> None:
        with self.lock:
            self.cluster.signal(node_id, signum)

    def leader(self) -> str | None:
        for node_id, node in self.cluster.nodes.items():
            if node.alive():
                status = self.cluster.status(node_id, timeout_s=STATUS_TIMEOUT_S)
                if status and status.get("role") == "leader":
                    return node_id
        return None

    def node_of(self, url: str | None) -> str | None:
        # Looked up each time: the membership nemesis adds nodes during the run.
        url = (url or "").rstrip("/")
        return next((nid for nid, n in self.cluster.nodes.items() if n.config.api_url == url), None)


class _Schedule(threading.Thread):
    """Faults one at a time: quiet, start one (seeded choice), hold, stop it; until stopped."""

    def __init__(self, nemeses: list, ctx: Context, history: HistoryWriter, interval_s: float):
        super().__init__(name="nemesis", daemon=True)
        self.nemeses = nemeses
        self.ctx = ctx
        self.history = history
        self.interval_s = interval_s
        self.halt = threading.Event()
        self.active = None
        self.error: BaseException | None = None
        self.faults = 0

    def run(self) -> None:
        try:
            while not self.halt.wait(self.ctx.rng.uniform(0.5, self.interval_s)):
                nemesis = self.ctx.rng.choice(self.nemeses)
                did = nemesis.start(self.ctx)
                self.active = nemesis
                self.faults += 1
                self.history.nemesis(nemesis.name, {"phase": "start", **did})
                self.halt.wait(self.ctx.rng.uniform(1.0, self.interval_s))
                self._stop_active()
        except BaseException as exc:  # reported by the run, which heals everything anyway
            self.error = exc

    def _stop_active(self) -> None:
        if self.active is not None:
            nemesis, self.active = self.active, None
            did = nemesis.stop(self.ctx)
            self.history.nemesis(nemesis.name, {"phase": "stop", **did})

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        self._stop_active()


def run(opts: Options, progress: Progress | None = None) -> dict:
    """Run, check, report; the results (`valid`, `checkers`, `run`, `dir`)."""
    opts.check()
    say = progress or (lambda _line: None)
    started = dt.datetime.now(dt.UTC)
    run_dir = Path(opts.out) / f"{started:%Y%m%dT%H%M%SZ}-s{opts.seed}"
    run_dir.mkdir(parents=True, exist_ok=False)
    concurrency = opts.concurrency or 2 * opts.nodes
    rng = random.Random(opts.seed)
    meta = {**asdict(opts), "out": str(opts.out), "concurrency": concurrency,
            "started_at": started.isoformat(timespec="seconds")}  # fmt: skip
    (run_dir / "options.json").write_text(json.dumps(meta, indent=2) + "\n")
    node_ids = [f"n{i}" for i in range(1, opts.nodes + 1)]
    with contextlib.ExitStack() as stack:
        net = None
        if "partition" in opts.nemeses:
            from .net import Net

            net = stack.enter_context(Net(node_ids))
            meta["net"] = net.run  # its namespaces are named after it
        settings: dict = {"target": str(run_dir / "archive"), "segment_max_s": 0.5,
                          "backup_interval_s": 0}  # fmt: skip
        if opts.unsafe_local_reads:
            settings["unsafe_local_reads"] = True
        if opts.unsafe_raft_fixes_off:
            settings["unsafe_raft_fixes_off"] = True
        settings.update(opts.raft_settings)
        cluster = LocalCluster.create(
            run_dir / "cluster", opts.nodes, hosts=net.hosts() if net else None, **settings
        )
        if net is not None:
            cluster.wrap = net.wrap
        cluster.exit_with_launcher = True
        stack.callback(cluster.stop_all)
        control = _Cluster(cluster)
        nemeses = [_nemesis(name, net, cluster) for name in opts.nemeses]
        for nemesis in nemeses:  # last in, first out: healed before the cluster stops
            stack.callback(nemesis.heal_all)
        cluster.start()
        cluster.wait_all_following(60)
        say(f"cluster of {opts.nodes} up in {run_dir / 'cluster'}"
            + (f", nodes in network namespaces {net.run}-*" if net else ""))  # fmt: skip
        accounts = [f"a{i}" for i in range(ACCOUNTS)]
        with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
            admin.submit(setup_commands(accounts), deadline_s=30)
            keys = {a: admin.create_key(a) for a in accounts}
        history = stack.enter_context(HistoryWriter(run_dir / "history.jsonl"))
        ctx = Context(nodes=node_ids, rng=rng, leader=control.leader, control=control)
        clients = Clients(cluster.api_urls(), keys, history, rate=opts.rate,
                          concurrency=concurrency, seed=opts.seed,
                          node_of=control.node_of)  # fmt: skip
        schedule = _Schedule(nemeses, ctx, history, opts.interval_s)
        clients.start()
        stack.callback(clients.halt)
        if nemeses:
            schedule.start()
        deadline = time.monotonic() + opts.time_s
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            say(f"  {time.monotonic() - deadline + opts.time_s:5.1f} s: {history_counts(run_dir)}"
                f"; faults {schedule.faults}")  # fmt: skip
        say("time is up: stopping the clients and every fault")
        clients.halt()
        if nemeses:
            schedule.finish()
        for nemesis in nemeses:
            nemesis.heal_all()
        if schedule.error is not None:
            raise RuntimeError(f"a nemesis failed: {schedule.error!r}") from schedule.error
        if clients.errors:
            raise RuntimeError("the harness's clients failed: " + "; ".join(clients.errors))
        cluster.start()  # any node still down
        final = _settle(cluster, history, say)
        _save_final_states(cluster, run_dir, say)
        say("taking the committed log from the archive")
        try:
            _export_log(cluster, final, run_dir)
            log_problem = None
        except RuntimeError as exc:
            # A cluster that lost committed entries can leave an archive with gaps, or with two
            # different entries at one index: the checkers that replay the log then say
            # "unknown", and the final states still show what was lost.
            log_problem = str(exc)
            say(f"no committed log: {log_problem}")
    say("checking")
    results = check_all(run_dir)
    if log_problem is not None:
        results["log_unavailable"] = log_problem
    results["run"] = {**meta, "dir": str(run_dir), "faults": schedule.faults,
                      "retired_processes": clients.retired}  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_report(run_dir, results=results)
    results["dir"] = str(run_dir)
    return results


def history_counts(run_dir: Path) -> str:
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError), (run_dir / "history.jsonl").open() as file:
        for line in file:
            kind = json.loads(line).get("type")
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _settle(cluster: LocalCluster, history: HistoryWriter, say: Progress) -> dict:
    """Wait for one leader, commit a barrier, then every node at the same cmd_index and state
    hash; record every node's final read. Returns the leader's status."""
    leader = cluster.wait_for_leader(SETTLE_TIMEOUT_S)
    with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            try:
                barrier = admin.barrier(deadline_s=10)
                break
            except (ApiError, ClusterUnavailable):
                if time.monotonic() > deadline:
                    raise
    try:
        statuses = cluster.wait_converged(SETTLE_TIMEOUT_S)
        say(f"settled: leader {leader}, cmd_index {barrier.get('cmd_index')}")
    except TimeoutError:
        # Recorded as they stand: the bank checker judges nodes that never converge.
        statuses = {nid: s for nid, s in cluster.statuses().items() if s}
        say(f"the nodes did not converge within {SETTLE_TIMEOUT_S:.0f} s: "
            + ", ".join(f"{n}@{s['cmd_index']}" for n, s in sorted(statuses.items())))  # fmt: skip
    process = 1_000_000  # the final reads' own processes, one per node
    for node_id, status in sorted(statuses.items()):
        op = history.invoke(process, "read_final", {"node": node_id})
        history.complete(op, "ok", {"node": node_id, "state_hash": status["state_hash"],
                                    "cmd_index": status["cmd_index"]}, node=node_id)  # fmt: skip
        process += 1
    return statuses[leader] if leader in statuses else next(iter(statuses.values()))


def _save_final_states(cluster: LocalCluster, run_dir: Path, say: Progress) -> None:
    """Every answering node's state as it serves it, for the `final` checker."""
    out = run_dir / FINAL_DIR
    out.mkdir(exist_ok=True)
    with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
        for node_id, node in sorted(cluster.nodes.items()):
            if not node.alive():
                continue
            try:
                snapshot = admin.snapshot(node.config.api_url, timeout_s=60)
            except (ApiError, ClusterUnavailable) as exc:
                say(f"  {node_id}: no final state ({exc})")
                continue
            (out / f"{node_id}{SNAPSHOT_SUFFIX}").write_bytes(snapshot.blob)


def _export_log(cluster: LocalCluster, final: dict, run_dir: Path) -> None:
    """Wait until the archive holds every applied entry, then `quorumbook backup log`."""
    applied = final["applied_index"]
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        archived = [
            (s.get("archive") or {}).get("archived_index") or 0
            for s in cluster.statuses().values()
            if s
        ]
        if archived and max(archived) >= applied:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the archive did not reach log index {applied}: {archived}")
        time.sleep(0.1)
    done = subprocess.run(
        [sys.executable, "-P", "-m", "cluster", "backup", "log", str(run_dir / "archive"),
         "--to-index", str(applied), "--out", str(run_dir / "log.jsonl")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"backup log failed: {done.stderr.strip()}")
