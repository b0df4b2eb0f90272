"""One node process: the Raft replica, the trio bridge and the HTTP API.

`quorumbook node run --config FILE` calls `run(config)`. The process is trio in the main
thread; pysyncobj ticks on its own thread, created here by the main thread (if the thread
that created it exits, pysyncobj stops ticking silently).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from api.app import create_app
from api.auth import AuthError, Credentials, Verifier, derive_secret
from api.port import (
    MembershipBusyError,
    NoQuorumError,
    NotConfiguredError,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    RefusedError,
    UnencodableError,
)
from api.rate_limit import RateLimiter, RateLimits
from statemachine import exchange as _exchange_module
from statemachine.precheck import ShapeCheck
from statemachine.snapshot import stated_hash

from . import collector
from .clock import WallClock
from .config import EXIT_WITH_PARENT_ENV, NodeConfig, Peer
from .machine import ExchangeMachine, exchange_blob_of
from .raft import EXIT_STARTUP_REFUSED, RaftReplica, RaftStartupError
from .replica import (
    MembershipBusy,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    Refused,
    Replica,
    RequestRefused,
    Unencodable,
)
from .sidecar import LogHolds, Sidecar, archive_sidecar, chain_sidecar, indexer_sidecar

# What health() says of the Raft log and its compaction (api/metrics.py shows them).
LOG_FIGURES = (
    "log_first_index",
    "journal_bytes",
    "dump_index",
    "compaction_hold",
    "compaction_holds_released",
)

# Which build of the state machine this process runs (docs/adr/0003-compiled-state-machine.md).
ENGINE = "compiled" if (_exchange_module.__file__ or "").endswith(".so") else "pure"

log = logging.getLogger("quorumbook.node")


class _Subscription:
    """A bounded trio channel of applied events (see api.port.Subscription)."""

    def __init__(self, buffer: int, registry: set) -> None:
        self._send, self._receive = trio.open_memory_channel[list[dict]](buffer)
        self._registry = registry
        self.overflowed = False

    def offer(self, events: list[dict]) -> bool:
        try:
            self._send.send_nowait(events)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
            return False
        except trio.ClosedResourceError:
            return False
        return True

    async def receive(self) -> list[dict]:
        return await self._receive.receive()

    def close(self) -> None:
        self._registry.discard(self)
        self._send.close()
        self._receive.close()


class Node:
    """Implements `api.port.NodePort` on top of a `Replica`."""

    def __init__(
        self, config: NodeConfig, machine: ExchangeMachine, raft: RaftReplica, replica: Replica
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self.machine = machine
        self.raft = raft
        self.replica = replica
        self._hash_cache: tuple[int, str] = (-1, "")
        self._hash_lock = trio.Lock()
        self._membership_lock = trio.Lock()
        self.indexer: Sidecar | None = None  # set by _serve when [indexer] is configured
        self.archive: Sidecar | None = None  # set by _serve when [archive] is configured
        self.chain: Sidecar | None = None  # set by _serve when [chain] is configured
        self.api_master = config.read_api_master()
        self._trades: dict[str, collections.deque] = {}
        self._trades_lock = threading.Lock()
        machine.add_listener(self._on_applied)
        self._token: trio.lowlevel.TrioToken | None = None
        self._subscribers: set[_Subscription] = set()
        self._shape_check = ShapeCheck()  # used from the trio thread only

    def _on_applied(self, applied: list[list[dict]], exchange: object) -> None:
        """pysyncobj's thread: keep the recent trades of every market (derived, not replicated)."""
        with self._trades_lock:
            for events in applied:
                for event in events:
                    if event["type"] == "trade":
                        ring = self._trades.get(event["market"])
                        if ring is None:
                            ring = self._trades[event["market"]] = collections.deque(maxlen=1000)
                        ring.append(event)
        # Only while someone listens (a follower usually has nobody): each hand-off wakes
        # the trio thread. A subscriber that comes after this check missed nothing: it reads
        # the state after subscribing (api/ws.py), and that state holds what was just applied.
        if self._subscribers:
            self._hand_to_trio(self._fan_out, applied)

    # -------------------------------------------------------------- committed-event feed

    def start_feed(self) -> None:
        """Call from the trio thread: applied events are handed to trio from here on."""
        self._token = trio.lowlevel.current_trio_token()

    def _hand_to_trio(self, fn: Callable[..., object], *args: object) -> None:
        """pysyncobj's thread: run `fn(*args)` on the trio thread (FIFO), once it serves."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn, *args)

    def _fan_out(self, applied: list[list[dict]]) -> None:
        """Trio thread, in apply order (run_sync_soon is FIFO)."""
        for sub in list(self._subscribers):
            for events in applied:
                if events and not sub.offer(events):
                    self._subscribers.discard(sub)
                    break

    def subscribe(self, buffer: int = 10_000) -> _Subscription:
        sub = _Subscription(buffer, self._subscribers)
        self._subscribers.add(sub)
        return sub

    def recent_trades(self, market: str, limit: int) -> list[dict]:
        with self._trades_lock:
            ring = self._trades.get(market, ())
            return list(ring)[-limit:]

    def lookup_key(self, key_id: str) -> Credentials | None:
        entry = self.machine.key(key_id)
        if entry is None or self.api_master is None:
            return None
        account, role = entry
        return Credentials(key_id, derive_secret(self.api_master, key_id), role, account)

    async def create_key(
        self, key_id: str, account: str, role: str, request: tuple[str, int] | None = None
    ) -> str:
        if self.api_master is None:
            # Not a leadership question: redirecting (as this once did) sent the caller back
            # here, and the admin client looped until its deadline.
            raise NotConfiguredError(
                f"node {self.node_id} has no api_master_file configured: it cannot create API "
                "keys (set the same api_master_file on every node)"
            )
        with self._outcomes():
            try:
                await self.replica.record_key("add", key_id, account, role, request=request)
            except RequestRefused as exc:  # a replayed key creation: no second key
                raise AuthError(exc.code, str(exc)) from None
        return derive_secret(self.api_master, key_id)

    async def assign_deposit_address(
        self, chain_id: int, address: str, account: str, request: tuple[str, int] | None = None
    ) -> str:
        address = address.lower()
        before = self.machine.deposit_addresses.get((chain_id, address))
        with self._outcomes():
            try:
                outcome = await self.replica.record_address(
                    chain_id, address, account, request=request
                )
            except RequestRefused as exc:  # a replayed assignment
                raise AuthError(exc.code, str(exc)) from None
        if isinstance(outcome, list) and outcome[:1] == ["taken"]:
            raise RefusedError(
                "address_taken",
                f"chain {chain_id} address {address} is account {outcome[1]}'s deposit address",
            )
        return "unchanged" if before == account else "assigned"

    def deposit_addresses(self, chain_id: int | None = None) -> list[tuple[int, str, str]]:
        return self.machine.addresses(chain_id)

    def _members(self) -> dict[str, Peer]:
        """raft_addr -> member: the static config, overlaid by the replicated directory."""
        members = {p.raft_addr: p for p in self.config.peers}
        members[self.config.raft_addr] = Peer(
            self.node_id, self.config.raft_addr, self.config.api_url
        )
        for node_id, (raft_addr, api_url) in sorted(self.machine.members().items()):
            members[raft_addr] = Peer(node_id, raft_addr, api_url)
        return members

    def _peer_id(self, raft_addr: str | None) -> str | None:
        if raft_addr is None:
            return None
        peer = self._members().get(raft_addr)
        return peer.id if peer else raft_addr

    @contextlib.contextmanager
    def _outcomes(self) -> Iterator[None]:
        """The replica's outcomes as the API's exceptions (api/ never imports cluster/)."""
        try:
            yield
        except NotLeader as exc:
            raise NotLeaderError(self.leader_url(), str(exc)) from None
        except OutcomeUnknown as exc:
            raise OutcomeUnknownError(str(exc)) from None
        except Overloaded as exc:
            raise OverloadedError(str(exc)) from None
        except Unencodable as exc:
            raise UnencodableError(str(exc)) from None
        except MembershipBusy as exc:
            raise MembershipBusyError(str(exc)) from None
        except Refused as exc:
            raise RefusedError(exc.code, str(exc)) from None

    def is_leader(self) -> bool:
        return self.raft.is_leader()

    def leader_url(self) -> str | None:
        leader = self.raft.leader()
        if leader is None:
            return None
        peer = self._members().get(leader)
        return peer.api_url if peer else None

    def precheck(self, command: dict) -> dict | None:
        exchange = self.machine.exchange  # markets only grow: a count is enough to see a change
        event = self._shape_check.rejection(
            command, exchange.market_count, lambda: self.machine.read(lambda ex: ex.markets())
        )
        if event is None:
            return None
        return {k: v for k, v in event.items() if k not in ("seq", "ts", "cmd_index")}

    async def submit(self, command: dict, request: tuple[str, int] | None = None) -> list[dict]:
        with self._outcomes():
            try:
                return await self.replica.submit(command, request=request)
            except RequestRefused as exc:  # the replicated replay window: nothing applied
                raise AuthError(exc.code, str(exc)) from None

    async def submit_many(
        self, commands: list[dict], request: tuple[str, int] | None = None
    ) -> list[list[dict]]:
        with self._outcomes():
            try:
                return await self.replica.submit_many(commands, request=request)
            except RequestRefused as exc:
                raise AuthError(exc.code, str(exc)) from None

    @property
    def unsafe_local_reads(self) -> bool:
        return self.config.api.unsafe_local_reads

    async def read_barrier(self) -> None:
        with self._outcomes():
            try:
                await self.replica.read_barrier()
            except OutcomeUnknown as exc:  # a barrier applies nothing: no majority answered
                raise NoQuorumError(str(exc)) from None

    async def change_membership(
        self, action: str, node_id: str, raft_addr: str, api_url: str
    ) -> str:
        # One change at a time from this node's API (two operators racing); the Raft adapter
        # refuses a change while another is uncommitted anyway, from wherever it came.
        async with self._membership_lock:
            busy = self.raft.status().get("membership_busy")
            if busy:  # checked before the directory entry, which would otherwise be orphaned
                raise MembershipBusyError(busy)
            with self._outcomes():
                if action == "add":
                    # Directory first, so every node can redirect to the new member at once.
                    await self.replica.record_member("add", node_id, raft_addr, api_url)
                    return await self.replica.raft_admin("add", raft_addr)
                done = await self.replica.raft_admin("remove", raft_addr)
                await self.replica.record_member("remove", node_id, raft_addr, api_url)
                return done

    async def transfer_leadership(self, node_id: str | None) -> None:
        addr = None
        if node_id is not None:
            addr = next((a for a, p in self._members().items() if p.id == node_id), None)
            if addr is None:
                raise RefusedError("unknown_node", f"unknown node {node_id!r}", status=404)
        with self._outcomes():
            await self.replica.raft_admin("transfer", addr)

    def applied_seq(self) -> int:
        return self.machine.exchange.seq

    def read(self, query):  # see api.port.NodePort.read
        return self.machine.read(query)

    async def _state(self) -> tuple[int, str]:
        """(cmd_index, state hash), cached per cmd_index.

        Hashing walks the whole state (hundreds of ms on a large book), so it runs on the
        Raft thread between ticks (nothing applies meanwhile, so no lock is needed, and the
        heartbeat helper keeps a leader's AppendEntries going), never on the trio thread
        under the machine's lock: there it stalled every request and held the apply thread
        back long enough for the followers to stand for election (status polled on a node
        catching up). One computation at a time; callers that queue behind it reuse it.
        """
        async with self._hash_lock:
            cached = self._hash_cache
            if cached[0] == self.machine.exchange.cmd_index:
                return cached
            restored = self.machine.restored_hash
            if restored is not None and restored[0] == self.machine.exchange.cmd_index:
                # Nothing applied since the state was loaded: its snapshot states the hash.
                self._hash_cache = restored
                return restored

            def read(ex=None) -> tuple[int, str]:  # the applied exchange, or the one given
                exchange = self.machine.exchange if ex is None else ex
                return exchange.cmd_index, exchange.state_hash()

            try:
                result = await self.replica.read_between_ticks(read)
            except (OutcomeUnknown, RuntimeError):  # RuntimeError: the replica is stopping
                result = self.machine.read(read)
            self._hash_cache = result
            return result

    def health(self) -> dict:
        # An int read needs no lock (the exchange object is swapped whole on restore).
        raft = self.raft.status()
        return {
            **self._summary(raft, self.machine.exchange.cmd_index),
            "log": {k: raft.get(k) for k in LOG_FIGURES},
            "indexer": self.indexer_status(),
            "archive": self.archive_status(),
            "chain": self.chain_status(),
        }

    async def snapshot(self) -> dict:
        """This node's state at its applied index, for a backup: `{"blob", "applied_index",
        "cmd_index", "seq", "state_hash", "role"}`. Taken on the Raft thread between ticks
        (nothing applies meanwhile, and the heartbeat helper stands in for a leader's
        AppendEntries): consistent without a lock, and it holds up only this node's apply,
        which is why a backup asks a follower."""

        def read() -> dict:
            raft = self.raft.status()  # published after the last tick: nothing applied since
            exchange = self.machine.exchange
            blob = self.machine.snapshot()
            return {
                "blob": blob,
                "applied_index": raft["applied_index"],
                "cmd_index": exchange.cmd_index,
                "seq": exchange.seq,
                "state_hash": stated_hash(exchange_blob_of(blob)),
                "role": raft["role"],
                "cluster_id": self.config.cluster_id,
            }

        return await self.replica.read_between_ticks(read)

    def indexer_status(self) -> dict:
        """The `indexer` object of the status: what this node's indexer process last said."""
        if self.indexer is None:
            return {"configured": False, "active": False}
        return self.indexer.status

    def archive_status(self) -> dict:
        """The `archive` object of the status: what this node's log archiver last said."""
        if self.archive is None:
            return {"configured": False, "active": False}
        return self.archive.status

    def chain_status(self) -> dict:
        """The `chain` object of the status: what this node's chain watcher last said."""
        if self.chain is None:
            return {"configured": False, "active": False}
        return self.chain.status

    def sidecar_view(self) -> dict:
        """What the helper processes need to know of this node (cluster/sidecar.py): figures
        the node publishes anyway, read without a lock."""
        raft = self.raft.status()
        exchange = self.machine.exchange
        return {
            "role": raft["role"],
            "applied_index": raft["applied_index"],
            "seq": exchange.seq,
            "ts_ms": exchange.last_ts // 1_000_000,
            "leader": self._peer_id(raft["leader"]),
            "connected": sorted(
                self._peer_id(p["id"]) for p in raft.get("peers", []) if p.get("connected")
            ),
        }

    def _summary(self, raft: dict, cmd_index: int) -> dict:
        """What /readyz, /metrics and the status share, from one read of the Raft status."""
        return {
            "node_id": self.node_id,
            "role": raft["role"],
            "leader": self._peer_id(raft["leader"]),
            # pysyncobj keeps a follower's last leader while it is connected to no one (it
            # does not even stand for election then): only a live link makes that leader real.
            "leader_connected": raft["role"] == "leader"
            or any(p["id"] == raft["leader"] and p.get("connected") for p in raft.get("peers", [])),
            "term": raft["term"],
            "commit_index": raft["commit_index"],
            "applied_index": raft["applied_index"],
            "cmd_index": cmd_index,
        }

    def histograms(self) -> dict:
        stages = self.raft.stage_histograms()
        return {
            "qb_commit_latency_seconds": self.replica.commit_latency_s.figures(),
            "qb_batch_size_entries": self.replica.batch_sizes.figures(),
            "qb_raft_queue_seconds": stages["queue"].figures(),
            "qb_raft_commit_seconds": stages["commit"].figures(),
            "qb_raft_apply_seconds": stages["apply"].figures(),
            "qb_raft_sync_seconds": stages["sync"].figures(),
            "qb_commit_handoff_seconds": self.replica.handoff_s.figures(),
        }

    async def status(self) -> dict:
        cmd_index, state_hash = await self._state()
        raft = self.raft.status()
        return {
            **self._summary(raft, cmd_index),
            "cluster_id": self.config.cluster_id,
            "state_hash": state_hash,
            "engine": ENGINE,
            "peers": [
                {
                    "id": self._peer_id(p["id"]),
                    "match_index": p.get("match_index"),
                    "connected": p.get("connected"),
                }
                for p in raft.get("peers", [])
            ],
            # Peers an uncommitted membership entry removed: not counted, still linked.
            "lingering_peers": [self._peer_id(a) for a in raft.get("lingering_peers", [])],
            "batches_proposed": self.replica.batches_proposed,
            "raft": {
                k: raft[k]
                for k in (
                    "log_first_index",
                    "log_last_index",
                    "journal_bytes",
                    "dump_index",
                    "compaction_hold",
                    "held_dump_index",
                    "compaction_holds_released",
                    "refused_truncations",
                    "snapshots_ignored",
                    "snapshots_installed",
                    "elections_averted",
                    "step_downs_averted",
                    "pre_votes_refused",
                    "membership_changes_refused",
                    "stale_replies_dropped",
                    "non_member_answers_dropped",
                    "step_down_unknowns",
                    "transport",
                )
                if k in raft
            },
            "indexer": self.indexer_status(),
            "archive": self.archive_status(),
            "chain": self.chain_status(),
        }


async def _serve(config: NodeConfig) -> None:
    if config.api.unsafe_local_reads:
        log.warning(
            "UNSAFE: [api] unsafe_local_reads is set: every node answers linearizable reads "
            "from its own state, without the leader's read barrier "
            "(a planted bug for the Jepsen harness; never in production)"
        )
    if config.raft.unsafe_raft_fixes_off:
        log.warning(
            "UNSAFE: [raft] unsafe_raft_fixes_off is set: the Raft safety fixes are off, as in "
            "plain pysyncobj; acknowledged writes can be lost (for the Jepsen harness; never "
            "in production)"
        )
    password = config.read_password()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    machine = ExchangeMachine(freeze_restored=True)
    raft = RaftReplica(config.raft_settings(password), machine)
    # The state restored from the dump is long-lived: out of the collector's way from the
    # start (otherwise the first full collection walks all of it: 400-600 ms on ~100k orders).
    gc.freeze()
    # Every protocol read of wall time (the leader's batch ts, signed requests' window) goes
    # through one clock: the system's, plus DATA_DIR/clock-offset-ns if a fault injector
    # wrote one (cluster/clock.py).
    clock = WallClock.of_data_dir(config.data_dir)
    replica = Replica(
        raft,
        batch_window_s=config.batch.batch_window_s,
        batch_max=config.batch.batch_max,
        max_in_flight=config.batch.batch_max_in_flight,
        submit_timeout_s=config.batch.submit_timeout_s,
        clock_ns=clock.time_ns,
    )
    node = Node(config, machine, raft, replica)
    admin_key = config.read_admin_key()
    keys = [admin_key] if admin_key is not None else []
    limiter = RateLimiter(
        RateLimits(
            per_s=config.api.rate_limit_per_s,
            burst=config.api.rate_limit_burst,
            admin_per_s=config.api.admin_rate_limit_per_s,
            admin_burst=config.api.admin_rate_limit_burst,
        )
    )
    # Replays: this node's own memory first, then the replicated window of applied requests
    # (which also refuses them when the log is applied, on every node).
    verifier = Verifier(
        keys, lookup=node.lookup_key, applied=machine.has_request, clock_ns=clock.time_ns
    )
    app = create_app(
        node,
        verifier,
        limiter=limiter,
        ready_max_lag_entries=config.api.ready_max_lag_entries,
        ws_settings=config.ws,
    )
    hconfig = HypercornConfig()
    hconfig.bind = [f"{config.api_host}:{config.api_port}"]
    if config.tls:  # HTTPS and wss on the API port
        hconfig.certfile = str(config.tls_cert_file)
        hconfig.keyfile = str(config.tls_key_file)
    hconfig.keep_alive_max_requests = 1_000_000
    hconfig.accesslog = None
    hconfig.errorlog = "-"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            node.start_feed()
            holds = LogHolds(config.log_holds(), node.raft.set_compaction_hold)
            if config.indexer.postgres_url:
                node.indexer = indexer_sidecar(
                    config.indexer,
                    config.node_id,
                    str(config.data_dir),
                    node.sidecar_view,
                    cluster_id=config.cluster_id,
                    hold=holds.of("indexer"),
                )
                await nursery.start(node.indexer.run)
            if config.archive.target:
                node.archive = archive_sidecar(config, node.sidecar_view, holds.of("archive"))
                await nursery.start(node.archive.run)
            if config.chain.rpc_url:
                node.chain = chain_sidecar(config, node.sidecar_view)
                await nursery.start(node.chain.run)
            stop = trio.Event()

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("node %s: signal %d, stopping", config.node_id, signum)
                        stop.set()
                        return

            nursery.start_soon(watch_signals)
            nursery.start_soon(lambda: serve(app, hconfig, shutdown_trigger=stop.wait))
            log.info("node %s: raft %s, api %s", config.node_id, config.raft_addr, config.api_url)
            await stop.wait()
            nursery.cancel_scope.cancel()
    finally:
        raft.destroy()


# The Raft thread does a syscall every few steps (poll, send, fdatasync) and must take the GIL
# back after each; with the default 5 ms switch interval a busy trio thread makes it wait up
# to 5 ms every time (the GIL convoy effect), and under a burst of requests the leader's
# heartbeats fall past the followers' election timeout. 0.5 ms keeps its ticks short.
SWITCH_INTERVAL_S = 0.0005


def _exit_with_parent(parent_pid: int) -> None:
    """Stop (SIGTERM to ourselves: the orderly path) once `parent_pid` is no longer our
    parent: the test or benchmark that started this node is gone, cleanup or not."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        log.warning("launcher %d is gone; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run(config: NodeConfig) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parent = os.environ.get(EXIT_WITH_PARENT_ENV)
    if parent and parent.isdigit():
        _exit_with_parent(int(parent))
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    collector.tame(log, freeze=True)  # thresholds; full collections frozen and logged
    try:
        trio.run(_serve, config)
    except RaftStartupError as exc:
        # One line that says why, not a traceback, and an exit code the launcher does not
        # answer with a restart loop (the same data refuses the same way).
        log.critical("node %s refuses to start: %s", config.node_id, exc)
        logging.shutdown()
        sys.exit(EXIT_STARTUP_REFUSED)
