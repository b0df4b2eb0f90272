"""The node's Raft replica: the only way into pysyncobj for the rest of the project.

``RaftReplica`` replicates opaque ``bytes`` payloads through a hardened pysyncobj 0.3.17
(``cluster.raft.hardened``) and applies them, in log order, to a ``StateMachinePort``. It runs
pysyncobj on a thread it owns (so ticking never stops because some other thread exited), and
every callback it makes runs on that thread, exactly once.

Only this package (``cluster/raft/``) imports pysyncobj; the rest of the project uses what
``cluster.raft`` exports (this module's ``__all__``). Why each
piece exists: docs/adr/0002-pysyncobj-hardening.md.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pysyncobj import syncobj as _upstream
from pysyncobj.config import FAIL_REASON, SyncObjConf
from pysyncobj.encryptor import HAS_CRYPTO
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.syncobj import SyncObjException

from . import pin
from .hardened import (
    EXIT_APPLY_FAILED,
    EXIT_ENTRY_UNREADABLE,
    EXIT_RESTORE_FAILED,
    HardenedSyncObj,
)
from .stats import STAGE_BUCKETS_S, Histogram
from .storage import EXIT_STORAGE_FAILED, RaftStorageError
from .transport import HardenedTCPTransport

logger = logging.getLogger(__name__)

PYSYNCOBJ_VERSION = pin.PYSYNCOBJ_VERSION

__all__ = [
    "EXITS_NOT_TO_RESTART",
    "EXIT_APPLY_FAILED",
    "EXIT_ENTRY_UNREADABLE",
    "EXIT_RESTORE_FAILED",
    "EXIT_STARTUP_REFUSED",
    "EXIT_STORAGE_FAILED",
    "PYSYNCOBJ_VERSION",
    "RaftReplica",
    "RaftSettings",
    "RaftStartupError",
    "StateMachinePort",
    "SubmitError",
    "SubmitErrorReason",
]

# The node process exits with this when the replica refuses to start (RaftStartupError: a
# damaged journal, a missing dump, a busy port...). Restarting it changes nothing.
EXIT_STARTUP_REFUSED = 73
# Exits a supervisor must not answer with a restart loop: the same data gives the same exit
# (an operator has to act, see docs/operating/cluster.md).
EXITS_NOT_TO_RESTART = frozenset({EXIT_APPLY_FAILED, EXIT_ENTRY_UNREADABLE, EXIT_STARTUP_REFUSED})

# A log entry is pickle((method id, (payload,))) plus one type byte; leave room for that.
_ENTRY_OVERHEAD_BYTES = 1024


class RaftStartupError(RuntimeError):
    """The replica cannot start (bad data directory, port in use, missing dependency)."""


@dataclass(frozen=True)
class RaftSettings:
    self_addr: str  # "127.0.0.1:PORT"
    peers: tuple[str, ...]  # other nodes' raft addrs
    password: str  # mandatory; empty/None -> ValueError
    data_dir: pathlib.Path  # raft.journal, raft.journal.meta, raft.dump
    # The next six are the node config's [raft] keys too, with these defaults (cluster/config.py
    # reads them from here; docs/reference/config.md lists them).
    election_timeout_min_s: float = 0.15
    election_timeout_max_s: float = 0.30
    append_entries_period_s: float = 0.04
    leader_fallback_timeout_s: float = 0.75  # a cut-off leader steps down within ~1 s
    compaction_min_entries: int = 5000
    compaction_min_time_s: float = 300.0
    dynamic_membership: bool = True
    bind_addr: str | None = None  # default: self_addr (never 0.0.0.0 unless asked)
    tick_period_s: float = 0.01  # longest the tick thread sleeps with nothing to do
    connection_timeout_s: float = 1.0  # no bytes from a peer for this long: reconnect
    connection_retry_s: float = 0.25  # between attempts to reach a peer that is down
    # A proposal (a batch or a membership change) without an outcome after this is failed
    # UNKNOWN and forgotten. Not the node's [batch] submit_timeout_s, which is how long a
    # caller of Replica waits (5 s); this one bounds that wait and raft_admin's (10 s).
    proposal_timeout_s: float = 10.0
    max_payload_bytes: int = 1024 * 1024
    append_entries_batch_bytes: int = 2 * 1024 * 1024
    snapshot_chunk_bytes: int = 1024 * 1024
    max_frame_bytes: int = 16 * 1024 * 1024
    commands_queue_size: int = 100_000
    bind_retries: int = 20  # x 0.1 s, then RaftStartupError
    fsync: bool = True  # False only for throwaway test clusters
    # The compaction hold for a node with a log archiver or an indexer (ADR 0007, 0008,
    # set_compaction_hold): at most this many bytes of journal kept past a compaction; 0: none.
    compaction_hold_max_bytes: int = 0
    # Test-only: the safety fixes of ADR 0002 (1-3, 10, 11) switched off, for the Jepsen
    # harness to show what plain pysyncobj loses (`jepsen run --unsafe-raft-fixes-off`); and
    # fix 20, which would answer a deposed leader's callers before plain pysyncobj
    # acknowledges the entries fix 2 is about.
    unsafe_raft_fixes_off: bool = False

    def __post_init__(self):
        if not self.password or not isinstance(self.password, str):
            raise ValueError(
                "RaftSettings.password is mandatory: without it anyone who reaches "
                "the Raft port can run code on this node (pysyncobj speaks pickle)"
            )
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "data_dir", pathlib.Path(self.data_dir))
        if self.self_addr in self.peers:
            raise ValueError("peers must not contain self_addr")
        if not self.election_timeout_min_s > 3 * self.append_entries_period_s:
            raise ValueError("election_timeout_min_s must exceed 3 x append_entries_period_s")
        if not self.election_timeout_max_s > self.election_timeout_min_s:
            raise ValueError("election_timeout_max_s must exceed election_timeout_min_s")
        if not self.leader_fallback_timeout_s > self.append_entries_period_s:
            raise ValueError("leader_fallback_timeout_s must exceed append_entries_period_s")
        if not self.connection_timeout_s >= self.election_timeout_max_s:
            raise ValueError("connection_timeout_s must be >= election_timeout_max_s")
        if self.append_entries_batch_bytes <= self.max_payload_bytes + _ENTRY_OVERHEAD_BYTES:
            # pysyncobj sends an entry of batch size or more in pieces (syncobj.py 1275-1296),
            # a path with a chunking bug; payloads are capped so it is never taken.
            raise ValueError("append_entries_batch_bytes must exceed max_payload_bytes + 1 KiB")
        if self.max_frame_bytes < 2 * self.append_entries_batch_bytes + self.snapshot_chunk_bytes:
            raise ValueError("max_frame_bytes is too small for the batch and chunk sizes")
        if self.tick_period_s <= 0 or self.proposal_timeout_s <= 0:
            raise ValueError("tick_period_s and proposal_timeout_s must be positive")

    def compaction_thresholds(self) -> tuple[int, float]:
        """(log entries, seconds) after which this node compacts: the configured minimums,
        raised by rank/n of themselves for the node's rank among the members' addresses.

        Members hold logs of the same length and start together, so with equal thresholds
        all of them wrote their dump at once. A node writing a dump reads no Raft messages
        (a large book: over a second); two followers at once leave the leader without a
        majority's answers, and it steps down after leader_fallback_timeout_s. Staggered,
        the others answer meanwhile.
        """
        members = sorted((self.self_addr, *self.peers))
        rank, n = members.index(self.self_addr), len(members)
        return (
            self.compaction_min_entries + self.compaction_min_entries * rank // n,
            self.compaction_min_time_s * (n + rank) / n,
        )

    def to_syncobj_conf(self) -> SyncObjConf:
        """The pysyncobj configuration; HardenedSyncObj fills in the storage hooks."""
        compact_entries, compact_time_s = self.compaction_thresholds()
        return SyncObjConf(
            password=self.password,
            autoTick=False,
            raftMinTimeout=self.election_timeout_min_s,
            raftMaxTimeout=self.election_timeout_max_s,
            appendEntriesPeriod=self.append_entries_period_s,
            leaderFallbackTimeout=self.leader_fallback_timeout_s,
            connectionTimeout=self.connection_timeout_s,
            connectionRetryTime=self.connection_retry_s,
            logCompactionMinEntries=compact_entries,
            logCompactionMinTime=compact_time_s,
            logCompactionBatchSize=self.snapshot_chunk_bytes,
            appendEntriesBatchSizeBytes=self.append_entries_batch_bytes,
            # Send a new entry to the followers as soon as it is in the log, and the new
            # commit index as soon as it is applied, instead of at the next
            # appendEntriesPeriod (up to 40 ms later). Entries are our batches already.
            appendEntriesUseBatch=False,
            commandsQueueSize=self.commands_queue_size,
            # A command that finds no leader fails at once (a definite outcome) instead of
            # waiting in pysyncobj's queue to be forwarded later.
            commandsWaitLeader=False,
            dynamicMembershipChange=self.dynamic_membership,
            bindAddress=self.bind_addr or self.self_addr,
            bindRetryTime=0.1,
            maxBindRetries=self.bind_retries,
        )


class StateMachinePort(Protocol):
    def apply(self, payload: bytes) -> object:
        """Apply one committed payload. The result goes, as is, to the callback of the node
        that proposed it (in this process; never serialized, never replicated)."""

    def snapshot(self) -> bytes: ...
    def restore(self, blob: bytes) -> None: ...


class SubmitErrorReason(enum.StrEnum):
    """A ``str``: ``SubmitError.reason == "not_leader"`` holds."""

    # definite: the command did not and will not take effect
    NOT_LEADER = "not_leader"
    NO_LEADER = "no_leader"
    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"
    REJECTED = "rejected"
    DISCARDED = "discarded"
    BUSY = "busy"  # a membership change while another one is not committed yet: retry
    # unknown: the command may or may not take effect
    LEADER_CHANGED = "leader_changed"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"
    # definite or unknown, depending on whether the command had been proposed
    SHUTDOWN = "shutdown"


class SubmitError(Exception):
    """Why a submission has no result. ``definite`` is True when it certainly did not apply."""

    def __init__(
        self,
        reason: SubmitErrorReason,
        *,
        definite: bool,
        leader: str | None = None,
        detail: str = "",
    ):
        self.reason = reason
        self.definite = definite
        self.leader = leader
        self.detail = detail
        outcome = "not applied" if definite else "outcome unknown"
        text = f"{reason.value} ({outcome})"
        if leader:
            text += f", leader {leader}"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def outcome(self) -> str:
        return "definite" if self.definite else "unknown"


# pysyncobj's FAIL_REASON (config.py 2-10) -> ours. PYSYNCOBJ.md: only LEADER_CHANGED, UNKNOWN
# and timeouts are ambiguous; every other reason means the command did not take effect.
_FAIL_REASONS = {
    FAIL_REASON.QUEUE_FULL: (SubmitErrorReason.QUEUE_FULL, True),
    FAIL_REASON.MISSING_LEADER: (SubmitErrorReason.NO_LEADER, True),
    FAIL_REASON.DISCARDED: (SubmitErrorReason.DISCARDED, True),
    FAIL_REASON.NOT_LEADER: (SubmitErrorReason.NOT_LEADER, True),
    FAIL_REASON.LEADER_CHANGED: (SubmitErrorReason.LEADER_CHANGED, False),
    FAIL_REASON.REQUEST_DENIED: (SubmitErrorReason.REJECTED, True),
    FAIL_REASON.UNKNOWN_OUTCOME: (SubmitErrorReason.UNKNOWN, False),
}

Callback = Callable[[object, SubmitError | None], None]


def _ignore_outcome(result: object, error: SubmitError | None) -> None:
    if error is not None:
        logger.info("raft request without a callback failed: %s", error)


class _Pending:
    """One submission's callback, fired at most once, always on the tick thread."""

    __slots__ = ("callback", "deadline", "enqueued", "fired", "handled", "proposed")

    def __init__(self, callback: Callback, deadline: float):
        self.callback = callback
        self.deadline = deadline
        self.fired = False
        self.proposed = False
        self.enqueued = time.perf_counter()  # submitted (any thread)
        self.handled = 0.0  # handed to pysyncobj (the tick thread)

    def fire(self, result: object, error: SubmitError | None) -> None:
        if self.fired:
            return
        self.fired = True
        try:
            self.callback(result, error)
        except Exception:
            # A raising callback must not reach pysyncobj: inside its apply loop (syncobj.py
            # 714-725) it would leave lastApplied unmoved and the entry would be applied again.
            logger.exception("a raft submit callback raised; ignored")

    def membership_result(self, done: str):
        """A pysyncobj callback for a membership change: ``done`` on success (upstream passes
        None), and a refusal at append time (REQUEST_DENIED) reads as BUSY: the change in
        progress that made ``HardenedSyncObj`` refuse it arrived after ``_handle`` looked."""

        def callback(result, fail_reason) -> None:
            if fail_reason == FAIL_REASON.SUCCESS:
                self.fire(done, None)
            elif fail_reason == FAIL_REASON.REQUEST_DENIED:
                self.fire(
                    None,
                    SubmitError(
                        SubmitErrorReason.BUSY,
                        definite=True,
                        detail="another membership change is in progress",
                    ),
                )
            else:
                self.on_pysyncobj_result(result, fail_reason)

        return callback

    def on_pysyncobj_result(self, result, fail_reason) -> None:
        if fail_reason == FAIL_REASON.SUCCESS:
            self.fire(result, None)
            return
        reason, definite = _FAIL_REASONS.get(fail_reason, (SubmitErrorReason.UNKNOWN, False))
        self.fire(
            None,
            SubmitError(reason, definite=definite, detail=f"pysyncobj fail reason {fail_reason}"),
        )


def _check_bindable(addr: str) -> None:
    """Fail fast on a busy port: pysyncobj retries by spinning in ``SyncObj.__init__``
    (syncobj.py 289-291) and leaks one socket per failed attempt (tcp_server.py 338-346)."""
    host, port = addr.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pysyncobj binds
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise RaftStartupError(f"cannot bind the raft port {addr}: {exc}") from exc


class RaftReplica:
    """One Raft member. Thread-safe; callbacks run on the replica's own tick thread."""

    def __init__(self, settings: RaftSettings, machine: StateMachinePort):
        if not isinstance(settings, RaftSettings):
            raise TypeError("settings must be RaftSettings")
        if not HAS_CRYPTO:
            raise RaftStartupError(
                "the 'cryptography' package is required: the Raft port is always password-protected"
            )
        self._settings = settings
        self._lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()
        self._closed = False
        self._stopping = False
        self._in_flight: collections.deque[_Pending] = collections.deque()
        self.step_down_unknowns = 0  # proposals answered UNKNOWN when this node stepped down
        # The stages of a submission on this node (docs/reference/metrics.md): waiting for the
        # tick thread to take it, then proposal to applied and answered.
        self.queue_s = Histogram(STAGE_BUCKETS_S)
        self.commit_s = Histogram(STAGE_BUCKETS_S)
        self._thread: threading.Thread | None = None
        _check_bindable(settings.bind_addr or settings.self_addr)
        transport_class = HardenedTCPTransport.factory(max_frame_bytes=settings.max_frame_bytes)
        try:
            self._obj = HardenedSyncObj(
                settings.self_addr,
                settings.peers,
                settings.to_syncobj_conf(),
                machine,
                settings.data_dir,
                transport_class=transport_class,
                fsync=settings.fsync,
                pre_vote=True,
                raft_fixes=not settings.unsafe_raft_fixes_off,
                compaction_hold_max_bytes=settings.compaction_hold_max_bytes,
            )
        except RaftStorageError as exc:
            raise RaftStartupError(str(exc)) from exc
        except SyncObjException as exc:
            raise RaftStartupError(
                f"cannot bind the raft port {settings.self_addr}: {exc.errorCode}"
            ) from exc
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._obj._poller.subscribe(self._wake_r, self._on_wake, POLL_EVENT_TYPE.READ)
        self._status = self._obj.raft_status()
        # Sends the leader's heartbeats while the tick thread is inside machine.apply()
        # (HardenedSyncObj.run_heartbeat_helper); idle otherwise.
        self._helper = threading.Thread(
            target=self._obj.run_heartbeat_helper,
            name=f"raft-heartbeat-{settings.self_addr}",
            daemon=True,
        )
        self._helper.start()
        self._thread = threading.Thread(
            target=self._run, name=f"raft-{settings.self_addr}", daemon=True
        )
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------

    def submit(self, payload: bytes, callback: Callback) -> None:
        """Replicate ``payload``; ``callback(result, None)`` once applied, else ``(None, err)``.

        Non-blocking and thread-safe. The callback runs exactly once, on the replica's thread.
        A submission on a node that is not the leader fails with a definite NOT_LEADER.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError("payload must be bytes")
        self._enqueue(("submit", bytes(payload)), callback)

    def add_node(self, addr: str, callback: Callback | None = None) -> None:
        """Add a member, one change at a time. The callback's result is ``"added"`` once the
        change is committed, or ``"unchanged"`` at once if ``addr`` already is a member (so a
        retry after an unknown outcome is safe); ``SubmitError(BUSY)`` (definite) while
        another change is uncommitted."""
        self._enqueue(("add", addr), callback)

    def remove_node(self, addr: str, callback: Callback | None = None) -> None:
        """Remove a member; as ``add_node`` (``"removed"`` / ``"unchanged"`` / BUSY)."""
        self._enqueue(("remove", addr), callback)

    def transfer_leadership(self, addr: str | None, callback: Callback | None = None) -> None:
        """Ask the leader to hand over to ``addr`` (None: the most caught-up peer).

        Success means the request was sent; watch ``leader()`` for the change.
        """
        self._enqueue(("transfer", addr), callback)

    def force_compaction(self) -> None:
        self._enqueue(("compact", None), None)

    def set_compaction_hold(self, archived_index: int) -> None:
        """The log's readers (the archive, the indexer: ``cluster.sidecar.LogHolds``) need
        the entries after ``archived_index``: compaction keeps what they need to go on from
        there (with ``compaction_hold_max_bytes`` set; ADR 0007, 0008).
        Thread-safe: one attribute the tick thread reads when it compacts."""
        if self._settings.compaction_hold_max_bytes:
            self._obj.compaction_hold = int(archived_index)

    def read_between_ticks(self, query: Callable[[], object], callback: Callback) -> None:
        """Run ``query()`` on the tick thread between ticks; ``callback(result, None)`` (or
        ``(None, SubmitError)`` if it raised), on that thread.

        For long reads of the state machine (a state hash of a large book): nothing applies
        meanwhile, so the read is consistent without the machine's lock, and the heartbeat
        helper keeps a leader's AppendEntries going. Thread-safe, non-blocking.
        """
        self._enqueue(("read", query), callback)

    def stage_histograms(self) -> dict[str, Histogram]:
        """How long the steps of a commit take on this node: `queue` (a submission waiting
        for the tick thread), `commit` (proposed to applied and answered, on the leader),
        `apply` (the state machine, per log entry) and `sync` (each journal fdatasync, on
        every node)."""
        obj = self._obj
        return {
            "queue": self.queue_s,
            "commit": self.commit_s,
            "apply": obj.apply_s,
            "sync": obj.sync_s,
        }

    def status(self) -> dict:
        """role, leader, term, commit_index, applied_index, peers[{id, match_index, connected}]

        A copy of what the tick thread published at the end of its last tick.
        """
        status = dict(self._status)
        status["peers"] = [dict(p) for p in status["peers"]]
        status["self"] = self._settings.self_addr
        return status

    def is_leader(self) -> bool:
        return self._status["role"] == "leader"

    def leader(self) -> str | None:
        return self._status["leader"]

    def term(self) -> int:
        return self._status["term"]

    def destroy(self) -> None:
        """Stop ticking, fail what is pending, close sockets and files. Idempotent."""
        with self._lock:
            self._stopping = True
            self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- tick thread ---------------------------------------------------------------------------

    def _enqueue(self, item, callback: Callback | None) -> None:
        pending = None
        if item[0] != "compact":
            pending = _Pending(callback or _ignore_outcome, 0.0)
        with self._lock:
            if self._closed or self._stopping:
                raise RuntimeError("the raft replica has been destroyed")
            self._inbox.append((item, pending))
            self._wake()

    def _wake(self) -> None:
        # Called with self._lock held, so it cannot race _shutdown closing the pipe (a closed
        # descriptor number may already belong to another file).
        if self._closed:
            return
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is already pending
            os.write(self._wake_w, b"\0")

    def _on_wake(self, _fd, _event) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _run(self) -> None:
        obj = self._obj
        leading = False
        try:
            while not self._stopping:
                self._drain_inbox()
                try:
                    obj._onTick(self._settings.tick_period_s)
                except Exception:
                    # Upstream's autoTick loop logs and carries on (syncobj.py 592-597).
                    logger.exception("raft tick failed")
                if leading and not obj._isLeader() and not self._settings.unsafe_raft_fixes_off:
                    self._fail_in_flight_at_step_down()
                leading = obj._isLeader()
                self._expire()
                status = obj.raft_status()
                status["step_down_unknowns"] = self.step_down_unknowns
                self._status = status
        finally:
            self._shutdown()

    def _fail_in_flight_at_step_down(self) -> None:
        """This node stopped leading: what it proposed and has not seen commit is answered
        UNKNOWN now. Upstream keeps the callbacks until the entries are applied or replaced,
        which a deposed leader cut off from the rest learns only when it hears the next
        leader (or at proposal_timeout_s): its callers, and the clients behind them, would
        wait that long before resending to the new leader. They may still commit (the next
        leader may hold them), hence unknown, never definite: a resend with the same
        idempotency key (client order id, deposit ref) settles it. Upstream's own answer, if
        it comes later, is ignored (a pending fires once)."""
        failed = 0
        for pending in self._in_flight:
            if not pending.fired:
                failed += 1
                pending.fire(
                    None,
                    SubmitError(
                        SubmitErrorReason.LEADER_CHANGED,
                        definite=False,
                        detail="this node stopped leading before the outcome was known",
                    ),
                )
        self._in_flight.clear()
        self.step_down_unknowns += failed
        if failed:
            logger.warning(
                "stepped down with %d proposals in flight: answered as outcome unknown", failed
            )

    def _drain_inbox(self) -> None:
        while self._inbox:
            item, pending = self._inbox.popleft()
            try:
                self._handle(item, pending)
            except Exception as exc:
                logger.exception("raft request %s failed", item[0])
                if pending is not None:
                    pending.fire(
                        None,
                        SubmitError(SubmitErrorReason.REJECTED, definite=True, detail=repr(exc)),
                    )

    def _handle(self, item, pending: _Pending | None) -> None:
        kind, arg = item
        obj = self._obj
        if kind == "compact":
            obj.forceLogCompaction()
            return
        if kind == "read":
            pending.fire(obj.run_between_ticks(arg), None)
            return
        if kind == "submit" and len(arg) > self._settings.max_payload_bytes:
            pending.fire(
                None,
                SubmitError(
                    SubmitErrorReason.TOO_LARGE,
                    definite=True,
                    detail=f"{len(arg)} bytes > max_payload_bytes {self._settings.max_payload_bytes}",
                ),
            )
            return
        if not obj._isLeader():
            leader = obj._getLeader()
            leader_id = leader.id if leader is not None else None
            reason = SubmitErrorReason.NOT_LEADER if leader_id else SubmitErrorReason.NO_LEADER
            pending.fire(None, SubmitError(reason, definite=True, leader=leader_id))
            return
        if kind in ("add", "remove") and self._membership_settled(kind, arg, pending):
            return
        pending.proposed = True
        pending.deadline = _upstream.monotonicTime() + self._settings.proposal_timeout_s
        self._in_flight.append(pending)
        if kind == "submit":
            pending.handled = now = time.perf_counter()
            self.queue_s.observe(now - pending.enqueued)
            obj.propose(arg, self._timed(pending))
        elif kind == "add":
            obj.addNodeToCluster(arg, pending.membership_result("added"))
        elif kind == "remove":
            obj.removeNodeFromCluster(arg, pending.membership_result("removed"))
        elif kind == "transfer":
            obj.transferLeadership(arg, pending.on_pysyncobj_result)
        else:
            raise ValueError(f"unknown request {kind!r}")

    def _timed(self, pending: _Pending) -> Callable:
        """pysyncobj's callback for a submission: its time from the proposal to this answer
        (appended, replicated to a majority, committed, applied here) when it succeeded."""

        def callback(result, fail_reason) -> None:
            if fail_reason == FAIL_REASON.SUCCESS:
                self.commit_s.observe(time.perf_counter() - pending.handled)
            pending.on_pysyncobj_result(result, fail_reason)

        return callback

    def _membership_settled(self, kind: str, addr: str, pending: _Pending) -> bool:
        """Answer a membership request that needs no log entry (True), on the leader."""
        obj = self._obj
        busy = obj.membership_change_busy()
        if busy is not None:  # checked again when the entry is appended (the authority)
            pending.fire(None, SubmitError(SubmitErrorReason.BUSY, definite=True, detail=busy))
            return True
        if kind == "remove" and addr == self._settings.self_addr:
            pending.fire(
                None,
                SubmitError(
                    SubmitErrorReason.REJECTED,
                    definite=True,
                    detail="the leader cannot remove itself: transfer leadership first",
                ),
            )
            return True
        # No change pending, so the configuration is committed: asking for what already holds
        # (a retry after an unknown outcome, say) is answered without a log entry.
        if (addr in obj.configuration()) == (kind == "add"):
            pending.fire("unchanged", None)
            return True
        return False

    def _expire(self) -> None:
        now = _upstream.monotonicTime()
        in_flight = self._in_flight
        while in_flight and (in_flight[0].fired or in_flight[0].deadline <= now):
            pending = in_flight.popleft()
            if not pending.fired:
                pending.fire(
                    None,
                    SubmitError(
                        SubmitErrorReason.TIMEOUT,
                        definite=False,
                        detail=f"no outcome within {self._settings.proposal_timeout_s} s",
                    ),
                )

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            leftovers = list(self._inbox)
            self._inbox.clear()
            self._obj._poller.unsubscribe(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
        for _item, pending in leftovers:
            if pending is not None:
                pending.fire(
                    None,
                    SubmitError(
                        SubmitErrorReason.SHUTDOWN,
                        definite=True,
                        detail="the replica stopped before proposing",
                    ),
                )
        while self._in_flight:
            pending = self._in_flight.popleft()
            pending.fire(
                None,
                SubmitError(
                    SubmitErrorReason.SHUTDOWN,
                    definite=False,
                    detail="the replica stopped after proposing",
                ),
            )
        self._obj.stop_heartbeat_helper()
        self._helper.join()
        try:
            self._obj._doDestroy()  # transport (sockets), consumers, journal
        finally:
            self._obj.close_storage()
            self._status = dict(self._status, role="follower", leader=None)
