"""``HardenedSyncObj``: pysyncobj 0.3.17's ``SyncObj`` with its Raft safety bugs fixed.

Everything here overrides upstream's private, name-mangled methods (``_SyncObj__name``) and
reads its private state. Line numbers are those of ``pysyncobj/syncobj.py`` 0.3.17; the pin is
enforced by ``cluster.raft.pin``. Each fix is described, with its test, in
``docs/adr/0002-pysyncobj-hardening.md``.

1. Truncation on overlap (upstream 982-1019): a follower deletes only from the first entry
   whose term differs from the leader's, never an entry at or below its commit index or last
   applied index (it refuses and logs CRITICAL instead), and keeps its log when a resend only
   overlaps it.
2. Commit index (upstream 1027-1035): an AppendEntries never lowers the commit index and never
   advances it past ``prevLogIdx + len(entries)``, the part of the log it just verified; a
   snapshot chunk (1022-1025) never advances it from ``leaderCommit`` at all.
3. Stale snapshots (upstream 1023-1025, 1472-1511): a completed snapshot whose index this node
   has already applied, or whose last entry this node's log already holds, is not installed;
   ``lastApplied`` never moves backwards and no entry is applied twice. An incoming snapshot is
   written beside the dump, not over it, until it is accepted.
4. Crash windows: the journal is our ``DurableJournal`` (fsync before every acknowledgement,
   atomic compaction, strict meta file); at start-up the dump and journal are reconciled
   without dropping entries the journal holds past the dump, and a journal whose prefix has
   no dump is refused.
5. Long ticks (upstream 611-706): a follower whose election deadline passed reads what is
   waiting in its sockets before deciding to stand (upstream checks the deadline at the top
   of a tick, before reading the AppendEntries that arrived while its previous tick was busy);
   and a leader keeps sending heartbeats while the state machine applies a command
   (upstream sends nothing until everything committed has been applied, 688-692, so one
   slow batch made every follower start an election).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pysyncobj import pickle as _pickle
from pysyncobj import syncobj as _upstream
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE, SyncObjConf
from pysyncobj.node import Node as _Node
from pysyncobj.serializer import Serializer
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE, SyncObj, replicated

from . import pin
from .stats import STAGE_BUCKETS_S, Histogram
from .storage import (
    DumpHeader,
    DurableJournal,
    RaftStorageError,
    decode_dump,
    encode_dump,
    fatal_storage_failure,
    fsync_dir,
    read_dump,
    write_file_atomically,
)

logger = logging.getLogger(__name__)

# Process exit codes (distinct, so a supervisor can tell why a node stopped).
EXIT_APPLY_FAILED = 70  # the state machine's apply() raised or broke its contract
EXIT_ENTRY_UNREADABLE = 71  # a committed log entry this build cannot decode or dispatch
EXIT_RESTORE_FAILED = 72  # an accepted snapshot could not be restored into the state machine

# A dump this node keeps for its log archiver while compaction is held (ADR 0008).
HELD_DUMP = "raft.dump.held"
_NO_OP = bytes([_COMMAND_TYPE.NO_OP])
_MEMBERSHIP = bytes([_COMMAND_TYPE.MEMBERSHIP])
# Answers that count toward a majority of ours: only members' count (fix 17).
_MEMBER_ANSWERS = frozenset({"next_node_idx", "response_vote", "pre_vote_response"})
_ROLES = {
    _RAFT_STATE.FOLLOWER: "follower",
    _RAFT_STATE.CANDIDATE: "candidate",
    _RAFT_STATE.LEADER: "leader",
}


def _now() -> float:
    # Looked up on pysyncobj's module at call time so a test that installs a fake clock there
    # moves our timing and upstream's together.
    return _upstream.monotonicTime()


def entry_of_payload(payload: bytes) -> bytes:
    """A log entry's command holding `payload`, as the node's one replicated method writes it
    (what `payload_of_entry` reads): for tools that write log entries themselves (a
    benchmark's archived segments, tests)."""
    return bytes([_COMMAND_TYPE.REGULAR]) + _pickle.dumps((0, (payload,)))


def payload_of_entry(command: bytes) -> bytes | None:
    """Our payload in a log entry's command, or None for pysyncobj's own entries (the no-op a
    leader appends, membership and code-version changes). The envelope is pysyncobj's
    (`type byte + pickle((method id, (payload,)))`): the journal is ours, written by the
    cluster's members only (docs/adr/0002-pysyncobj-hardening.md)."""
    if command[:1] != bytes([_COMMAND_TYPE.REGULAR]):
        return None
    call = _pickle.loads(command[1:])
    _method, args = call[0], call[1]
    payload = args[0]
    if not isinstance(payload, bytes):
        raise ValueError("a log entry whose payload is not bytes")
    return payload


def seed_data_dirs(
    data_dirs: list[Path], machine_blob: bytes, index: int, members: list[str]
) -> None:
    """Make each of `data_dirs` the data directory of a member of a NEW cluster whose log
    starts with the state `machine_blob` at log `index` (a restore, disaster_recovery/
    restore.py): a dump whose head entries are no-ops of term 1 at `index` - 1 and `index`,
    naming `members` (raft addresses). The node reconciles its empty journal with it at start
    (fix 4), applies nothing up to `index`, and the cluster's first leader appends after it.

    The members' dumps are the same bytes: encoded once, written once and hard-linked into
    the other directories (a node only ever replaces its dump by renaming a new file over
    it, never writes into it, so the links part at its first new dump); where a link cannot
    be made (another filesystem), written again."""
    if index < 2:
        raise ValueError(f"a seeded log starts at index 2 or later, not {index}")
    dirs = [Path(d) for d in data_dirs]
    for data_dir in dirs:
        data_dir.mkdir(parents=True, exist_ok=True)
        if any(data_dir.iterdir()):
            raise FileExistsError(f"{data_dir} is not empty")
    header = DumpHeader(
        last=(_NO_OP, index, 1), prev=(_NO_OP, index - 1, 1), cluster=tuple(members)
    )
    dump = encode_dump(header, machine_blob)
    if not dirs:
        return
    first = dirs[0] / "raft.dump"
    write_file_atomically(first, dump)
    for data_dir in dirs[1:]:
        try:
            os.link(first, data_dir / "raft.dump")
        except OSError:
            write_file_atomically(data_dir / "raft.dump", dump)
        else:
            fsync_dir(data_dir)


class HardenedSerializer(Serializer):
    """pysyncobj's ``Serializer`` with the snapshot-transfer side replaced.

    * An incoming snapshot is written to ``incoming_path`` (fsynced) and left there; upstream
      renames it over the node's own dump before anyone decides to install it
      (serializer.py 176-202), which lets a stale snapshot replace a newer dump.
    * Outgoing transfers close their files (upstream drops them unclosed at 55, 40, 154, 206).
    * A read error ends the transfer with ``None``; upstream returns ``False`` (149), which
      the receiver cannot unpack.
    Writing and reading the dump itself stays upstream's (``serialize``/``deserialize`` with
    the ``serializer``/``deserializer`` hooks of ``SyncObjConf``).
    """

    def __init__(self, conf: SyncObjConf, incoming_path: Path):
        super().__init__(
            conf.fullDumpFile,
            conf.logCompactionBatchSize,
            False,
            conf.serializer,
            conf.deserializer,
            conf.serializeChecker,
        )
        self._dump_path = Path(conf.fullDumpFile)
        self._chunk_bytes = conf.logCompactionBatchSize
        self._incoming_path = Path(incoming_path)
        self._incoming = None
        self._outgoing: dict = {}

    def checkSerializing(self):
        state, ident = super().checkSerializing()
        if state == SERIALIZER_STATE.SUCCESS:
            # A new dump replaced the file: transfers in progress restart from the new one.
            self._close_outgoing()
        return state, ident

    def getTransmissionData(self, transmissionID):
        if self._Serializer__pid != 0:  # a dump is being written
            return None
        handle = self._outgoing.get(transmissionID)
        if handle is None:
            try:
                handle = open(self._dump_path, "rb")  # noqa: SIM115 (kept open across ticks)
            except OSError:
                logger.exception("cannot open %s to send a snapshot", self._dump_path)
                return None
            self._outgoing[transmissionID] = handle
        is_first = handle.tell() == 0
        try:
            data = handle.read(self._chunk_bytes)
        except OSError:
            logger.exception("cannot read %s to send a snapshot", self._dump_path)
            self.cancelTransmisstion(transmissionID)
            return None
        is_last = len(data) == 0
        if is_last:
            self.cancelTransmisstion(transmissionID)
        return data, is_first, is_last

    def cancelTransmisstion(self, id):  # upstream's spelling
        handle = self._outgoing.pop(id, None)
        if handle is not None:
            handle.close()

    def setTransmissionData(self, data):
        """Store one incoming chunk; True when a complete snapshot sits in ``incoming_path``."""
        if data is None:
            return False
        try:
            chunk, is_first, is_last = data
            chunk = bytes(chunk)
        except (TypeError, ValueError):
            logger.error("ignoring a malformed snapshot chunk")
            return False
        try:
            if is_first:
                self._close_incoming()
                self._incoming = open(self._incoming_path, "wb")  # noqa: SIM115
            elif self._incoming is None:
                return False  # a chunk of a transfer whose start we did not see
            self._incoming.write(chunk)
            if not is_last:
                return False
            self._incoming.flush()
            os.fsync(self._incoming.fileno())
            self._close_incoming()
            return True
        except OSError:
            logger.exception("cannot store an incoming snapshot in %s", self._incoming_path)
            self._close_incoming()
            return False

    def _close_incoming(self) -> None:
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None

    def _close_outgoing(self) -> None:
        for handle in self._outgoing.values():
            handle.close()
        self._outgoing.clear()

    def close(self) -> None:
        self._close_incoming()
        self._close_outgoing()


class HardenedSyncObj(SyncObj):
    """A ``SyncObj`` with one replicated method (``bytes`` in, ``bytes`` out) and the fixes.

    Always ``autoTick=False``: the owner drives ``_onTick`` from its own thread (see
    ``cluster.raft.RaftReplica``) or, in tests, by hand.
    """

    def __init__(
        self,
        self_addr: str,
        peers,
        conf: SyncObjConf,
        machine,
        data_dir: Path,
        *,
        transport=None,
        transport_class=None,
        fsync: bool = True,
        pre_vote: bool = False,
        raft_fixes: bool = True,
        compaction_hold_max_bytes: int = 0,
    ):
        data_dir = Path(data_dir)
        # False only for the Jepsen harness's proof that it bites (`[raft]
        # unsafe_raft_fixes_off`): pysyncobj's own AppendEntries handling (fixes 1 and 2 off),
        # every completed snapshot installed (fix 3), answers of any term counted (fix 11), any
        # number of membership changes at once (fix 10). Storage, transport and timing fixes
        # stay: they are not what loses acknowledged writes in the safety bugs.
        self._raft_fixes = raft_fixes
        # Pre-vote (Raft thesis 9.6), on for real nodes, off by default so the scripted-timing
        # tests of the fixes keep upstream's election messages.
        self._pre_vote = pre_vote
        self._pre_vote_term: int | None = None  # the term a pre-vote round asks about
        self._pre_vote_grants: set = set()
        self._pre_vote_won = False
        self._leader_contact = float("-inf")  # when an AppendEntries of our leader last came
        self.pre_votes_refused = 0  # pre-votes this node refused: elections it did not allow
        data_dir.mkdir(parents=True, exist_ok=True)
        self._machine = machine
        self._journal_path = data_dir / "raft.journal"
        self._dump_path = data_dir / "raft.dump"
        self._incoming_path = data_dir / "raft.dump.incoming"
        self._fsync = fsync
        # The compaction hold (ADR 0008): while the log archive ends at `compaction_hold`
        # (set by the owner from what the archiver reports), compaction keeps the journal from
        # a state at or before it (the dump it replaces, kept as raft.dump.held, or the empty
        # state when the journal still starts at index 1), so an archiver on this node can
        # carry the archive on without a gap. Bounded: past `compaction_hold_max_bytes` of
        # journal kept, the hold is released (and said). 0: no hold (no [archive]).
        self._held_path = data_dir / HELD_DUMP
        self._hold_max_bytes = compaction_hold_max_bytes
        self._dump_index = 0  # the index of raft.dump (0: none yet)
        self._held_index: int | None = None  # the index of raft.dump.held, if there is one
        self._hold_floor: int | None = None  # where the compaction under way keeps the journal from
        self.compaction_hold: int | None = None
        self.compaction_holds_released = 0
        self._decoded_dump: tuple[Path, DumpHeader, bytes] | None = None
        self._last_refusal_log = 0.0
        # Counters for status and tests.
        self.refused_truncations = 0  # AppendEntries refused for contradicting committed entries
        self.snapshots_ignored = 0  # completed snapshots not installed (already passed / held)
        self.snapshots_installed = 0
        self.elections_averted = 0  # deadline passed, but a message waiting in a socket reset it
        # AppendEntries rounds the heartbeat helper sent while the tick thread was busy in
        # apply(), writing a dump, or in a long read (run_between_ticks).
        self.heartbeats_lent = {"apply": 0, "dump": 0, "read": 0, "sync": 0}
        self.apply_s = Histogram(STAGE_BUCKETS_S)  # the state machine's apply, per entry
        self.step_downs_averted = 0  # answers read just before the leader would step down
        self.membership_changes_refused = 0  # a change asked for while another was uncommitted
        self.stale_replies_dropped = 0  # AppendEntries answers sent in another term (fix 11)
        # Fix 17. Peers a membership entry not yet committed removed: out of the configuration
        # (they count toward no majority, get no entries from us as leader), but the transport
        # keeps their links until the removal commits, since one of them may win instead.
        self._lingering: set = set()
        self.non_member_answers_dropped = 0  # votes and acknowledgements from outside it
        # Fix 5. Whoever runs pysyncobj code holds the tick lock: the tick thread, except while
        # it is inside machine.apply(), when the heartbeat helper (run_heartbeat_helper) may
        # take it to send the leader's AppendEntries. pysyncobj is not thread-safe; this lock
        # makes the two threads take turns.
        self._tick_lock = threading.Lock()
        self._apply_cond = threading.Condition(self._tick_lock)
        self._in_tick = False
        self._busy: str | None = None  # "apply" / "dump": the tick thread lent its lock
        self._helper_stopped = False

        conf.autoTick = False
        conf.useFork = False
        conf.fullDumpFile = str(self._dump_path)
        conf.serializer = self._write_dump_hook
        conf.deserializer = self._read_dump_hook
        # syncobj.py 166 would open pysyncobj's FileJournal here; we open our own right after.
        conf.journalFile = None
        kwargs = {}
        if transport is not None:
            kwargs["transport"] = transport
        elif transport_class is not None:
            kwargs["transportClass"] = transport_class
        try:
            super().__init__(self_addr, list(peers), conf, **kwargs)
        except BaseException:
            transport = getattr(self, "_SyncObj__transport", None)
            if transport is not None:
                transport.destroy()  # closes the listening socket, if one was bound
            raise
        conf.journalFile = str(self._journal_path)

        journal = None
        try:
            journal = DurableJournal(
                self._journal_path, app_version=pin.PYSYNCOBJ_VERSION, fsync=fsync
            )
            if len(journal) == 0:
                journal.add(_NO_OP, 1, 0)  # syncobj.py 167-168
                journal.sync()
            self._journal = journal
            self.sync_s = journal.sync_s  # each fdatasync of the journal
            self._SyncObj__raftLog = journal
            # syncobj.py 174-176, against the real journal.
            self._SyncObj__raftCurrentTerm = max(journal.getCurrentTerm(), journal[-1][2])
            self._SyncObj__votedForNodeId = journal.getVotedForNodeId()
            self._SyncObj__raftCommitIndex = journal.getRaftCommitIndex()
            self._SyncObj__serializer = HardenedSerializer(conf, self._incoming_path)
            if self._incoming_path.exists():
                self._incoming_path.unlink()  # a transfer a crash interrupted; never accepted
            self._load_dump_at_start()
            self._load_held_at_start()
            # syncobj.py 624-627 would load the dump lazily on the first tick, swallowing any
            # error (1510-1511); it is loaded above instead, and errors stop the start.
            self._SyncObj__needLoadDumpFile = False
            self._adopt_logged_configuration()
        except BaseException:
            self._SyncObj__transport.destroy()
            if journal is not None:
                journal.close()
            raise

    # -- the one replicated method --------------------------------------------------------------

    @replicated
    def _apply_payload(self, payload):
        return self._apply_guarded(payload)

    def _apply_guarded(self, payload: bytes) -> bytes:
        # A replicated method that raises is retried forever by syncobj.py 708-729 and every
        # later command times out. A state machine that cannot apply a committed command
        # cannot go on either: stop the process loudly.
        index = self._SyncObj__raftLastApplied + 1
        # Fix 5: apply() touches only the state machine, so pysyncobj is free meanwhile: let
        # the heartbeat helper in (upstream's leader is silent until it has applied all it
        # committed, and one large batch outlasts the followers' election timeout).
        try:
            started = time.perf_counter()
            with self._heartbeats_meanwhile("apply"):
                result = self._machine.apply(payload)
            self.apply_s.observe(time.perf_counter() - started)
        except BaseException:
            logger.critical(
                "state machine apply() failed on committed log index %d; stopping "
                "the process (exit %d) instead of retrying it forever",
                index,
                EXIT_APPLY_FAILED,
                exc_info=True,
            )
            logging.shutdown()
            os._exit(EXIT_APPLY_FAILED)
        return result

    def run_between_ticks(self, query):
        """``query()`` on the tick thread outside a tick, with the heartbeat helper standing in
        (a long read of the state machine: nothing of pysyncobj's is touched)."""
        with self._tick_lock:
            self._in_tick = True
            try:
                with self._heartbeats_meanwhile("read"):
                    return query()
            finally:
                self._in_tick = False

    @contextlib.contextmanager
    def _heartbeats_meanwhile(self, busy: str, *, wake_helper: bool = True) -> Iterator[None]:
        """Run the body without the tick lock, the heartbeat helper standing in for the tick.

        For work on the tick thread that touches only the state machine and our own files
        (apply, writing a dump, syncing the journal): pysyncobj's state is left alone
        meanwhile, so the helper may send the leader's AppendEntries while it runs. Outside a
        tick (tests drive apply by hand) there is no lock to hand over.
        """
        hand_over = self._in_tick
        if hand_over:
            self._busy = busy
            if wake_helper:
                self._apply_cond.notify()
            self._tick_lock.release()
        try:
            yield
        finally:
            if hand_over:
                self._tick_lock.acquire()
                self._busy = None

    def propose(self, payload: bytes, callback) -> None:
        """Queue ``payload`` for replication; ``callback(result, FAIL_REASON)`` on tick thread."""
        self._apply_payload(payload, callback=callback)

    # -- dump hooks (SyncObjConf.serializer / deserializer) -------------------------------------

    def _write_dump_hook(self, path, data) -> None:
        # Called by Serializer.serialize (serializer.py 84-93) on the tick thread with
        # data = (last entry, entry before it, set of Node) (syncobj.py 1469-1470); upstream
        # renames ``path`` over the dump afterwards. We fsync the file here and the directory
        # before the journal is trimmed (_SyncObj__deleteEntriesTo).
        last, prev, _current = data
        # Upstream records the current configuration (1469), which includes membership
        # entries past the dump's index that may never commit; the journal keeps those
        # entries, and they are read again at start-up (_adopt_logged_configuration).
        header = DumpHeader(
            last=tuple(last),
            prev=tuple(prev),
            cluster=tuple(sorted(self._configuration_at(last[1]))),
        )
        self._hold_floor = self._plan_hold(header.index)
        started = time.perf_counter()
        try:
            # Encoding a large book takes hundreds of ms (60k resting orders: ~0.4 s) and the
            # fsync more: longer than the followers' election timeout. Like apply(), it touches
            # only the state machine (which nothing else writes: apply runs on this thread)
            # and our file, so the heartbeat helper keeps the leader's AppendEntries going.
            with self._heartbeats_meanwhile("dump"):
                blob = self._machine.snapshot()
                if not isinstance(blob, bytes):
                    raise TypeError(f"snapshot() returned {type(blob).__name__}, not bytes")
                raw = encode_dump(header, blob)
                with open(path, "wb") as handle:
                    handle.write(raw)
                    handle.flush()
                    if self._fsync:
                        os.fsync(handle.fileno())
        except Exception:
            # Upstream swallows the exception (serializer.py 98-102); say what it was.
            logger.exception("writing the raft dump at index %d failed", header.index)
            raise
        logger.info(
            "raft dump at log index %d written: %.1f MB in %.0f ms",
            header.index,
            len(raw) / 1e6,
            (time.perf_counter() - started) * 1000,
        )

    def _read_dump_hook(self, path):
        # Called by Serializer.deserialize (serializer.py 110-111), which returns
        # (None,) + our tuple, the shape syncobj.py 1472-1511 expects.
        cached, self._decoded_dump = self._decoded_dump, None
        if cached is not None and cached[0] == Path(path):
            header, blob = cached[1], cached[2]
        else:
            header, blob = decode_dump(Path(path).read_bytes(), source=str(path), views=True)
        self._machine.restore(blob)
        return header.last, header.prev, list(header.cluster)

    # -- start-up: reconcile dump and journal (fix 4) --------------------------------------------

    def _SyncObj__loadDumpFile(self, clearJournal):
        # Replaces syncobj.py 1472-1511. Upstream calls it lazily on the first tick (626) and on
        # snapshot install (1024); we call _load_dump_at_start from __init__ and install
        # snapshots in _install_snapshot, so any other call is a bug.
        raise AssertionError("HardenedSyncObj loads dumps itself")

    def _load_dump_at_start(self) -> None:
        journal = self._journal
        if not self._dump_path.exists():
            if journal.first_index() > 1:
                # Window (a): the journal was trimmed after a compaction but the dump it relied
                # on is gone. Upstream starts, never applies again, and keeps voting and
                # acknowledging (its lastApplied stays 1 while the log starts later).
                raise RaftStorageError(
                    f"{self._journal_path} starts at log index {journal.first_index()} but "
                    f"{self._dump_path} is missing: the state before that index is lost. "
                    "Refusing to start. Restore the dump, or move the data directory aside to "
                    "resync from the leader (only while the rest of the cluster holds a "
                    "majority)."
                )
            return
        header, blob = decode_dump(
            self._dump_path.read_bytes(), source=str(self._dump_path), views=True
        )
        our_term = journal.term_at(header.index)
        if our_term == header.term:
            # The journal holds the dump's last entry: keep every entry, including those past
            # the dump. Window (b): a crash between writing the dump and trimming the journal
            # leaves an untrimmed journal, and upstream cut it back to the dump's two entries
            # (1489-1495), dropping entries this node had acknowledged.
            pass
        elif our_term is not None or journal.last_index() < header.index:
            # The journal either ends before the dump or disagrees with it at the dump's index
            # (a snapshot install that a crash interrupted): the dump is the committed history,
            # nothing in the journal past the disagreement can be committed.
            journal.reset([header.prev, header.last])
        else:
            raise RaftStorageError(
                f"{self._dump_path} covers log index {header.index} but {self._journal_path} "
                f"starts at {journal.first_index()}: the entries between are lost. Refusing to "
                "start. Move the data directory aside to resync from the leader (only while "
                "the rest of the cluster holds a majority)."
            )
        self._decoded_dump = (self._dump_path, header, blob)
        self._dump_index = header.index
        try:
            data = self._SyncObj__serializer.deserialize()
        except Exception as exc:
            raise RaftStorageError(
                f"restoring the state machine from {self._dump_path} (index {header.index}) "
                f"failed: {exc!r}; refusing to start"
            ) from exc
        self._after_dump_loaded(data[1][1], data[3])
        if self._SyncObj__raftCommitIndex > journal.last_index():
            # Same clamp as syncobj.py 1499-1505.
            self._SyncObj__raftCommitIndex = journal.last_index()
        journal.setRaftCommitIndex(self._SyncObj__raftCommitIndex)

    def _after_dump_loaded(self, index: int, cluster) -> None:
        self._SyncObj__raftLastApplied = index
        # The dump's last entry was applied, hence committed.
        self._SyncObj__raftCommitIndex = max(self._SyncObj__raftCommitIndex, index)
        if self._SyncObj__conf.dynamicMembershipChange:
            self_node = self._SyncObj__selfNode
            self._SyncObj__updateClusterConfiguration(
                [node for node in cluster if node != self_node.id]
            )
        self._SyncObj__onSetCodeVersion(0)

    # -- membership: one change at a time, the log's latest configuration (fix 10) ------------

    def membership_change_busy(self) -> str | None:
        """Why this leader cannot start a membership change now, or None if it can.

        Raft's single-server changes are safe only one at a time: the next may start once the
        previous one is committed (Ongaro's thesis, 4.1). Upstream checks a field that nothing
        ever sets (syncobj.py 1361-1367) and appends any number of changes back to back.
        """
        if not self._raft_fixes:
            return None  # upstream's check looks at a field nothing sets (1361-1367)
        noop = self._SyncObj__noopIDx
        if noop is None or self._SyncObj__raftLastApplied < noop:
            # Upstream's own rule (1357): until an entry of its term commits, a new leader may
            # hold an older leader's uncommitted change it does not know is one.
            return "this leader has not yet committed an entry of its own term"
        pending = self._pending_membership_index()
        if pending is not None:
            return f"the membership change at log index {pending} is not committed yet"
        return None

    def _pending_membership_index(self) -> int | None:
        journal = self._journal
        first = journal.first_index()
        start = max(self._SyncObj__raftCommitIndex + 1, first)
        for command, idx, _term in journal[start - first :]:
            if command[:1] == _MEMBERSHIP:
                return idx
        return None

    def _SyncObj__changeCluster(self, request):
        # Replaces syncobj.py 1356-1369, called when the leader appends a membership entry
        # (528); False makes upstream answer the caller REQUEST_DENIED (a definite outcome).
        busy = self.membership_change_busy()
        if busy is not None:
            self.membership_changes_refused += 1
            logger.warning("refusing a membership change (%s %s): %s", request[0], request[1], busy)
            return False
        return self._SyncObj__doChangeCluster(request)

    def _adopt_logged_configuration(self) -> None:
        """At start-up: the configuration is the latest one in the log, committed or not
        (Raft, section 6). Upstream takes a configuration entry again only when it applies
        it, so a node restarted with an uncommitted "add D" in its log counts a majority
        without D while its log (and every peer that holds the same entry) counts D."""
        if not self._SyncObj__conf.dynamicMembershipChange:
            return
        # Entries up to lastApplied are in the dump's configuration (or, without a dump, the
        # journal starts at index 1 and the configured peers are the bootstrap members).
        applied = self._SyncObj__raftLastApplied
        first = self._journal.first_index()
        adopted = 0
        for command, _idx, _term in self._journal[max(applied + 1, first) - first :]:
            request = self._SyncObj__parseChangeClusterRequest(command)
            if request is not None:
                self._SyncObj__doChangeCluster(request)
                adopted += 1
        self._settle_links()
        if adopted:
            logger.info(
                "configuration from the log: %d membership entries past index %d; members %s",
                adopted,
                applied,
                sorted(self.configuration()),
            )

    def _SyncObj__doChangeCluster(self, request, reverse=False):
        """Upstream 1374-1412 (take a membership entry into the configuration, or undo it when
        the entry is truncated), except for the transport (fix 17).

        Upstream drops a removed peer's links at once: its transport then refuses the peer's
        connections (transport.py 353-358) and never dials it. But a removal that is not
        committed may never be: if the removed peer wins an election under the configuration
        that held before, it is the leader, and its AppendEntries are the only thing that can
        replace the removal in our log (Raft thesis 4.1: a server accepts AppendEntries from a
        leader outside its latest configuration). Dropped, we never hear it, never truncate,
        and stay cut off from the cluster for good, across restarts (the removal is in our log).
        So the peer leaves the configuration now (Raft, section 6) and its links stay until
        the removal commits (``_settle_links``).
        """
        kind = request[0]
        if kind not in ("add", "rem"):
            return False
        node = request[2] if len(request) >= 3 else request[1]
        if not isinstance(node, _Node):
            node = self._SyncObj__nodeClass(node)
        others = self._SyncObj__otherNodes
        if node == self._SyncObj__selfNode:
            return False  # upstream never removes or re-adds the node itself (1394, 1405)
        if (kind == "add") != reverse:
            if node in others:
                return False
            others.add(node)
            self._SyncObj__raftNextIndex[node] = self._SyncObj__getCurrentLogIndex() + 1
            self._SyncObj__raftMatchIndex[node] = 0
            if self._isLeader():
                self._SyncObj__lastResponseTime[node] = _now()
            if node in self._lingering:
                self._lingering.discard(node)  # its links are up already
            else:
                self._SyncObj__transport.addNode(node)
            return True
        if node not in others:
            return False
        others.discard(node)
        self._SyncObj__raftNextIndex.pop(node, None)
        self._SyncObj__raftMatchIndex.pop(node, None)
        self._lingering.add(node)
        if reverse:
            # An "add" being truncated (it is still in the journal, past the commit index):
            # never committed, so its links go now. A removal being appended is not in the
            # journal yet: it is settled when it commits.
            self._settle_links()
        return True

    def _SyncObj__updateClusterConfiguration(self, newNodes):
        # Upstream 1513-1526 (a dump's configuration, at start-up or on a snapshot install: a
        # committed one), with the lingering links of fix 17 settled against it.
        new = {n if isinstance(n, _Node) else self._SyncObj__nodeClass(n) for n in newNodes}
        transport = self._SyncObj__transport
        lingering, self._lingering = self._lingering, set()
        for node in self._SyncObj__otherNodes - new:
            self._SyncObj__raftNextIndex.pop(node, None)
            self._SyncObj__raftMatchIndex.pop(node, None)
            transport.dropNode(node)
        for node in lingering - new:
            transport.dropNode(node)
        added = new - self._SyncObj__otherNodes
        self._SyncObj__otherNodes = new
        for node in added:
            if node not in lingering:
                transport.addNode(node)
            self._SyncObj__raftNextIndex[node] = self._SyncObj__getCurrentLogIndex() + 1
            self._SyncObj__raftMatchIndex[node] = 0

    def _settle_links(self) -> None:
        """Drop the links of lingering peers whose removal has committed (fix 17)."""
        if not self._lingering:
            return
        committed = self._configuration_at(self._SyncObj__raftCommitIndex)
        for node in [n for n in self._lingering if n.id not in committed]:
            self._lingering.discard(node)
            self._SyncObj__transport.dropNode(node)
            logger.info("the removal of %s is committed: closing its links", node.id)

    def lingering_peers(self) -> list[str]:
        """Peers removed by an entry not yet committed, whose links stay up (fix 17)."""
        return sorted(n.id for n in self._lingering)

    def configuration(self) -> set[str]:
        """The members' addresses this node counts (this node included): the log's latest
        configuration, committed or not."""
        return {self._SyncObj__selfNode.id} | {n.id for n in self._SyncObj__otherNodes}

    def _configuration_at(self, index: int) -> set[str]:
        """The configuration as of log index ``index``: the current one with the membership
        entries after ``index`` undone (they are taken when appended, see above)."""
        members = self.configuration()
        self_id = self._SyncObj__selfNode.id
        first = self._journal.first_index()
        for command, _idx, _term in reversed(self._journal[max(index + 1, first) - first :]):
            request = self._SyncObj__parseChangeClusterRequest(command)
            if request is None or request[1] == self_id:
                continue  # upstream never removes or re-adds the node itself (1394, 1405)
            if request[0] == "add":
                members.discard(request[1])
            elif request[0] == "rem":
                members.add(request[1])
        return members

    def _SyncObj__doApplyCommand(self, command):
        # Upstream 870-907, called by the apply loop (708-729) for every committed entry.
        if command[:1] == _MEMBERSHIP:
            # Already taken when appended (or at start-up, from the log). Upstream takes it
            # again here, which is harmless only without later changes: a restarted node
            # replaying "add D" then "remove D" would count D between the two. Committed now:
            # a removed peer's links can go (fix 17).
            self._settle_links()
            return None
        try:
            return super()._SyncObj__doApplyCommand(command)
        except BaseException:
            # Not the state machine (its failures stop the process in _apply_guarded): the
            # entry's envelope did not unpickle, names a method this build does not have, or
            # asks for a code version it lacks. Upstream logs (or not) and retries the same
            # entry on every tick forever while the node keeps voting and acknowledging.
            index = self._SyncObj__raftLastApplied + 1
            logger.critical(
                "committed log entry %d cannot be applied by this build (%d bytes, type %d); "
                "stopping the process (exit %d). A newer build wrote it, or the log is "
                "corrupt: see docs/operating/cluster.md",
                index,
                len(command),
                command[0] if command else -1,
                EXIT_ENTRY_UNREADABLE,
                exc_info=True,
            )
            logging.shutdown()
            os._exit(EXIT_ENTRY_UNREADABLE)

    # -- message handling --------------------------------------------------------------------

    def _SyncObj__onMessageReceived(self, node, message):
        # Upstream 909-1083. AppendEntries (945-1035) is handled by _on_append_entries; every
        # other message type goes to upstream unchanged (its AppendEntries branch is then never
        # entered, and the branches after it do not look at append_entries messages).
        if not isinstance(message, dict) or "type" not in message:
            logger.error("ignoring a malformed raft message from %s", node)
            return
        kind = message["type"]
        if kind in _MEMBER_ANSWERS and node not in self._SyncObj__otherNodes:
            # Fix 17: a lingering peer's links are up, but it is not in our configuration: its
            # vote counts toward no majority of ours, and upstream's acknowledgement handling
            # (1078-1083) indexes per-member tables it is not in.
            self.non_member_answers_dropped += 1
            return
        if kind == "append_entries":
            self._on_append_entries(node, message)
            return
        if kind == "pre_vote":
            self._on_pre_vote(node, message)
            return
        if kind == "pre_vote_response":
            self._on_pre_vote_response(node, message)
            return
        if kind == "next_node_idx" and not self._current_term_reply(node, message):
            return
        super()._SyncObj__onMessageReceived(node, message)

    # -- terms on every answer (fixes 11 and 12) ---------------------------------------------

    def _current_term_reply(self, node, message) -> bool:
        """Whether an AppendEntries answer belongs to our current term (upstream 1070-1083
        applies it whatever term it was sent in).

        A reply delayed from an earlier term of ours can set a match index the follower no
        longer holds: it acknowledged entries a later leader made it delete. Counting it
        commits entries that only a minority holds. Raft (Figure 2): a reply of another term
        is dropped, and a higher term makes us a follower of that term.
        """
        if not self._raft_fixes:
            return True  # upstream (1070-1083): counted whatever its term
        term = message.get("term")
        current = self._SyncObj__raftCurrentTerm
        if type(term) is int and term > current:
            self._adopt_higher_term(term, node, "an AppendEntries answer")
            return False
        if term != current:
            # An older term's answer, or one without a term (an older build: the whole
            # cluster is upgraded at once, docs/operating/cluster.md).
            self.stale_replies_dropped += 1
            return False
        return True

    def _adopt_higher_term(self, term: int, node, seen_in: str) -> None:
        # As upstream does for a vote request of a higher term (918-921).
        logger.info(
            "term %d seen in %s from %s (ours %d): following that term",
            term,
            seen_in,
            node,
            self._SyncObj__raftCurrentTerm,
        )
        self._SyncObj__setCurrentTerm(term, None)
        self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        self._SyncObj__raftLeader = None
        self._pre_vote_term = None

    # -- pre-vote (Raft thesis 9.6) -------------------------------------------------------------

    def _maybe_pre_vote(self) -> None:
        """Called at the top of a tick. Upstream stands for election (term + 1, which deposes
        the leader wherever the vote request arrives) as soon as its deadline has passed
        (syncobj.py 634-650). A follower that merely missed heartbeats — its own tick or
        process starved of CPU — would then depose a healthy leader. Instead, first ask the
        others whether they would vote (without changing any term): only a majority that has
        not heard from a leader within the minimum election timeout lets the election go on.
        """
        if not self._pre_vote or self._SyncObj__selfNode is None:
            return
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            self._pre_vote_term = None
            return
        if self._pre_vote_won:
            self._pre_vote_won = False
            return  # upstream stands in this tick
        if self._SyncObj__transferInProgress:
            return  # the leader asked for this election (TimeoutNow): no pre-vote
        now = _now()
        if self._SyncObj__raftElectionDeadline >= now or not self._SyncObj__connectedToAnyone():
            return
        # The deadline passed: hold upstream's election back and ask first.
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        self._pre_vote_term = self._SyncObj__raftCurrentTerm + 1
        self._pre_vote_grants = {self._SyncObj__selfNode}
        message = {
            "type": "pre_vote",
            "term": self._pre_vote_term,
            "last_log_index": self._SyncObj__getCurrentLogIndex(),
            "last_log_term": self._SyncObj__getCurrentLogTerm(),
        }
        for other in self._SyncObj__otherNodes:
            self._SyncObj__transport.send(other, message)
        self._count_pre_votes()

    def _on_pre_vote(self, node, message) -> None:
        # Grant only if this node would vote: no leader heard from recently (a leader itself
        # never grants), the term is newer, the candidate's log as up to date as ours.
        term, last_index, last_term = (
            message.get(k) for k in ("term", "last_log_index", "last_log_term")
        )
        if not all(type(v) is int for v in (term, last_index, last_term)):
            return
        recent = _now() - self._leader_contact < self._SyncObj__conf.raftMinTimeout
        our_term = self._SyncObj__getCurrentLogTerm()
        up_to_date = last_term > our_term or (
            last_term == our_term and last_index >= self._SyncObj__getCurrentLogIndex()
        )
        granted = (
            self._SyncObj__raftState != _RAFT_STATE.LEADER
            and not recent
            and term > self._SyncObj__raftCurrentTerm
            and up_to_date
        )
        if granted:
            # Give the asker one election timeout to stand and win before we stand too: two
            # followers whose timers ran out together each granted the other's pre-vote, both
            # stood in the same term and split the vote (a failover measured ~200 ms longer).
            self._SyncObj__raftElectionDeadline = max(
                self._SyncObj__raftElectionDeadline, _now() + self._SyncObj__generateRaftTimeout()
            )
        else:
            self.pre_votes_refused += 1
        # "current_term" lets an asker whose term is behind ours catch up (fix 12): without it,
        # a node can ask for a term we have already passed, forever.
        self._SyncObj__transport.send(
            node,
            {
                "type": "pre_vote_response",
                "term": term,
                "granted": granted,
                "current_term": self._SyncObj__raftCurrentTerm,
            },
        )

    def _on_pre_vote_response(self, node, message) -> None:
        current_term = message.get("current_term")
        if (
            message.get("granted") is not True
            and type(current_term) is int
            and current_term > self._SyncObj__raftCurrentTerm
        ):
            self._adopt_higher_term(current_term, node, "a pre-vote refusal")
            return
        if (
            self._pre_vote_term is None
            or message.get("term") != self._pre_vote_term
            or message.get("granted") is not True
        ):
            return
        self._pre_vote_grants.add(node)
        self._count_pre_votes()

    def _count_pre_votes(self) -> None:
        if self._pre_vote_term != self._SyncObj__raftCurrentTerm + 1:
            return  # the term moved on meanwhile: this round is stale
        if len(self._pre_vote_grants) * 2 > len(self._SyncObj__otherNodes) + 1:
            self._pre_vote_term = None
            self._pre_vote_won = True
            self._SyncObj__raftElectionDeadline = 0  # upstream stands on the next tick

    def _on_append_entries(self, node, message) -> None:
        term = message["term"]
        if term < self._SyncObj__raftCurrentTerm:
            # Upstream (945) ignores it. Fix 12: answer with our term, so a leader of an older
            # term steps down. A node whose term rose while it was cut off would otherwise
            # drop the leader's messages unanswered for as long as the leader lives, and be
            # refused by pre-vote every time it stands (the other followers hear the leader):
            # out of the cluster indefinitely on a quiet cluster (as etcd's raft answers a
            # lower-term MsgApp when pre-vote or check-quorum is on).
            self._SyncObj__sendNextNodeIdx(node, reset=False, success=False)
            return
        self._leader_contact = _now()  # a current leader exists: refuse pre-votes a while
        # Upstream 946-961, unchanged: follow this leader.
        if term > self._SyncObj__raftCurrentTerm:
            self._SyncObj__transferInProgress = False
        if not self._SyncObj__transferInProgress:
            self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()
        if self._SyncObj__raftLeader != node:
            self._SyncObj__onLeaderChanged()
        self._SyncObj__raftLeader = node
        if term > self._SyncObj__raftCurrentTerm:
            self._SyncObj__setCurrentTerm(term, None)
        self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        leader_commit = message["commit_index"]
        self._SyncObj__leaderCommitIndex = leader_commit

        if not self._raft_fixes:
            self._upstream_append_entries(node, message, leader_commit)
            return
        if "prevLogIdx" in message:
            self._on_log_entries(node, message, leader_commit)
        elif message.get("serialized") is not None:
            self._on_snapshot_chunk(node, message["serialized"])
        # Upstream 1027-1035 then set commitIndex = min(leaderCommit, last log index) for every
        # kind of AppendEntries, snapshot chunks included (fix 2). Ours moves it only in
        # _on_log_entries, over entries it has just verified.

    def _upstream_append_entries(self, node, message, leader_commit: int) -> None:
        """Upstream 981-1035 as shipped, against our journal: the unsafe mode
        (``raft_fixes=False``). Truncates from ``prevLogIdx + 1`` whenever any later entry is
        held, whatever its term (fix 1 off); every kind of AppendEntries, snapshot chunks
        included, then sets commitIndex = min(leaderCommit, last log index) (fix 2 off)."""
        journal = self._journal
        if "prevLogIdx" in message:
            prev_idx, prev_term = message["prevLogIdx"], message["prevLogTerm"]
            entries = message.get("entries", [])
            held = self._SyncObj__getEntries(prev_idx)
            if not held:
                self._SyncObj__sendNextNodeIdx(node, success=False, reset=True)
                return
            if held[0][2] != prev_term:
                self._SyncObj__sendNextNodeIdx(
                    node, nextNodeIdx=prev_idx, success=False, reset=True
                )
                return
            if len(held) > 1:
                for entry in reversed(held[1:]):
                    request = self._SyncObj__parseChangeClusterRequest(entry[0])
                    if request is not None:
                        self._SyncObj__doChangeCluster(request, reverse=True)
                if prev_idx + 1 <= self._SyncObj__raftLastApplied:
                    logger.critical(
                        "truncating already-applied log entries from index %d (last applied: "
                        "%d) - state machine may have diverged (unsafe_raft_fixes_off)",
                        prev_idx + 1,
                        self._SyncObj__raftLastApplied,
                    )
                self._SyncObj__deleteEntriesFrom(prev_idx + 1)
            for entry in entries:
                journal.add(*entry)
            for entry in entries:
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request)
            next_idx = entries[-1][1] + 1 if entries else prev_idx + 1
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=next_idx, success=True)
        elif message.get("serialized") is not None:
            self._on_snapshot_chunk(node, message["serialized"])
        last = journal.last_index()
        commit = min(self._SyncObj__raftCommitIndex, last)
        if leader_commit > commit:
            commit = min(leader_commit, last)
        self._SyncObj__raftCommitIndex = commit
        journal.setRaftCommitIndex(commit)

    def _on_log_entries(self, node, message, leader_commit: int) -> None:
        entries = message.get("entries", [])
        transmission = message.get("transmission")
        if transmission is not None:
            # Upstream 965-980: one large entry sent in pieces. The adapter caps payloads below
            # appendEntriesBatchSizeBytes so the leader never uses this path; kept for
            # completeness, with the type checks upstream lacks.
            data = message.get("data")
            if not isinstance(data, bytes):
                return
            if transmission == "start":
                self._SyncObj__recvTransmission = data
            elif transmission in ("process", "finish"):
                if not isinstance(self._SyncObj__recvTransmission, bytes):
                    return  # the start of this entry was not seen
                self._SyncObj__recvTransmission += data
            else:
                logger.error("ignoring an unknown transmission type %r", transmission)
                return
            if transmission != "finish":
                self._SyncObj__sendNextNodeIdx(node, success=False, reset=False)
                return
            try:
                entries = [_pickle.loads(self._SyncObj__recvTransmission)]
            except Exception:
                logger.exception("dropping a large log entry that did not decode")
                self._SyncObj__recvTransmission = ""
                self._SyncObj__sendNextNodeIdx(node, success=False, reset=False)
                return
            self._SyncObj__recvTransmission = ""

        journal = self._journal
        prev_idx = message["prevLogIdx"]
        prev_term = message["prevLogTerm"]
        applied = self._SyncObj__raftLastApplied
        committed_floor = max(self._SyncObj__raftCommitIndex, applied)

        if prev_idx is None:
            # The leader has no entry before the nextIndex it holds for us (it rewound to a
            # log end we reported past its own). Upstream answers "our last + 1" (984-987),
            # which the leader turns into the same message again, forever. Point it at our
            # committed prefix, which it holds.
            self._SyncObj__sendNextNodeIdx(
                node, nextNodeIdx=committed_floor + 1, success=False, reset=True
            )
            return
        first_idx, last_idx = journal.first_index(), journal.last_index()
        if prev_idx < first_idx:
            # Compacted into our dump, hence applied and committed: it matches the leader's
            # entry by Raft's Leader Completeness. Upstream treats it as missing (985-987).
            if first_idx - 1 > applied:
                logger.error(
                    "log starts at %d past last applied %d; refusing AppendEntries",
                    first_idx,
                    applied,
                )
                return
        elif prev_idx > last_idx:
            self._SyncObj__sendNextNodeIdx(node, success=False, reset=True)  # upstream 985-987
            return
        elif journal.term_at(prev_idx) != prev_term:
            if prev_idx <= committed_floor:
                self._log_refusal(
                    "leader %s has term %s at committed log index %d, ours is %s",
                    node,
                    prev_term,
                    prev_idx,
                    journal.term_at(prev_idx),
                )
            # upstream 988-990: walk nextIndex back
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=prev_idx, success=False, reset=True)
            return

        for offset, entry in enumerate(entries):
            if entry[1] != prev_idx + 1 + offset:
                logger.error("ignoring AppendEntries from %s with non-consecutive indexes", node)
                return

        # Fix 1 (upstream 991-1006): skip entries we already hold with the same term; delete
        # only from the first entry whose term differs, and never a committed/applied one.
        append_from = len(entries)
        for offset, (_command, idx, entry_term) in enumerate(entries):
            if idx < first_idx:
                continue  # compacted: committed, matches
            if idx > last_idx:
                append_from = offset
                break
            our_term = journal.term_at(idx)
            if our_term == entry_term:
                continue
            if idx <= committed_floor:
                self._log_refusal(
                    "refusing to truncate log entries from index %d (commit index %d, last "
                    "applied %d): leader %s sends term %d there, our entry has term %d",
                    idx,
                    self._SyncObj__raftCommitIndex,
                    applied,
                    node,
                    entry_term,
                    our_term,
                )
                self._SyncObj__sendNextNodeIdx(node, success=False, reset=False)
                return
            self._truncate_from(idx)
            append_from = offset
            break
        new_entries = entries[append_from:]
        for entry in new_entries:
            journal.add(*entry)
        if self._SyncObj__conf.dynamicMembershipChange:  # upstream 1008-1013, new entries only
            for entry in new_entries:
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request)

        # Everything up to here now matches the leader's log.
        verified_idx = prev_idx + len(entries)
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=verified_idx + 1, success=True)

        # Fix 1/2 (upstream 1027-1035): commitIndex = min(leaderCommit, last *verified* entry),
        # and only ever upwards. Our log may hold entries past verified_idx that the leader has
        # not vouched for.
        new_commit = min(leader_commit, verified_idx)
        if new_commit > self._SyncObj__raftCommitIndex:
            self._SyncObj__raftCommitIndex = new_commit
            journal.setRaftCommitIndex(new_commit)

    def _truncate_from(self, idx: int) -> None:
        journal = self._journal
        doomed = journal[idx - journal.first_index() :]
        if self._SyncObj__conf.dynamicMembershipChange:  # upstream 992-997
            for entry in reversed(doomed):
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request, reverse=True)
        logger.info(
            "deleting %d uncommitted log entries from index %d (leader's term differs)",
            len(doomed),
            idx,
        )
        self._SyncObj__deleteEntriesFrom(idx)

    def _log_refusal(self, msg: str, *args) -> None:
        self.refused_truncations += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            logger.critical(msg, *args)

    def _on_snapshot_chunk(self, node, serialized) -> None:
        # Upstream 1022-1025; fix 2: no commit step for chunks; fix 3: stale snapshots ignored.
        if not self._SyncObj__serializer.setTransmissionData(serialized):
            return
        try:
            header, blob = decode_dump(
                self._incoming_path.read_bytes(), source=f"snapshot from {node}", views=True
            )
        except (OSError, RaftStorageError):
            logger.exception("dropping a snapshot from %s", node)
            self._discard_incoming()
            return
        applied = self._SyncObj__raftLastApplied
        if not self._raft_fixes:
            self._install_snapshot(node, header, blob)  # always, as upstream (fix 3 off)
            return
        if header.index <= applied:
            # Upstream installs it anyway (1497): lastApplied moves back and the entries after
            # it are applied a second time.
            logger.info(
                "ignoring a snapshot at index %d from %s: already applied up to %d",
                header.index,
                node,
                applied,
            )
            self.snapshots_ignored += 1
            self._discard_incoming()
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=header.index + 1, success=True)
            return
        if self._journal.term_at(header.index) == header.term:
            # Our log already holds the snapshot's last entry, which is committed: keep our log
            # (Raft, Figure 13, step 6) and let the apply loop catch up from it.
            logger.info(
                "snapshot at index %d from %s: our log holds it, applying from the log",
                header.index,
                node,
            )
            self.snapshots_ignored += 1
            self._discard_incoming()
            if header.index > self._SyncObj__raftCommitIndex:
                self._SyncObj__raftCommitIndex = header.index
                self._journal.setRaftCommitIndex(header.index)
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=header.index + 1, success=True)
            return
        self._install_snapshot(node, header, blob)

    def _install_snapshot(self, node, header: DumpHeader, blob: bytes | memoryview) -> None:
        try:
            os.replace(self._incoming_path, self._dump_path)
            if self._fsync:
                fsync_dir(self._dump_path.parent)
        except OSError as exc:
            fatal_storage_failure("installing a snapshot", exc)
        # From here the dump on disk is the leader's: a crash now is reconciled at start-up
        # (the journal disagrees with the dump at its index, so it is reset to the dump).
        self._decoded_dump = (self._dump_path, header, blob)
        try:
            data = self._SyncObj__serializer.deserialize()
        except BaseException:
            logger.critical(
                "restoring the state machine from the leader's snapshot at index %d "
                "failed; stopping the process (exit %d)",
                header.index,
                EXIT_RESTORE_FAILED,
                exc_info=True,
            )
            logging.shutdown()
            os._exit(EXIT_RESTORE_FAILED)
        self._journal.reset([header.prev, header.last])
        self._dump_index = header.index
        self._drop_held()  # the journal no longer reaches back to it
        self._after_dump_loaded(data[1][1], data[3])
        self._journal.setRaftCommitIndex(self._SyncObj__raftCommitIndex)
        # Commands proposed here and waiting for an index the snapshot covers will never see
        # it applied locally: their outcome is unknown (upstream leaves them waiting forever).
        waiting = self._SyncObj__commandsWaitingCommit
        for idx in sorted(i for i in waiting if i <= header.index):
            for _term, callback in waiting.pop(idx):
                callback(None, FAIL_REASON.UNKNOWN_OUTCOME)
        self.snapshots_installed += 1
        logger.info(
            "installed a snapshot at index %d (term %d) from %s", header.index, header.term, node
        )
        self._SyncObj__sendNextNodeIdx(node, success=True)  # upstream 1025

    def _discard_incoming(self) -> None:
        try:
            self._incoming_path.unlink(missing_ok=True)
        except OSError:
            logger.exception("cannot remove %s", self._incoming_path)

    # -- durability ordering -------------------------------------------------------------------

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):
        # Replaces upstream 1098-1106. An acknowledgement tells the leader our log holds
        # entries; make them durable first (upstream never syncs the journal). Fix 11: the
        # answer carries our term (upstream's carries none; see _current_term_reply).
        if success:
            self._journal.sync()
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        self._SyncObj__transport.send(
            node,
            {
                "type": "next_node_idx",
                "next_node_idx": nextNodeIdx,
                "reset": reset,
                "success": success,
                "term": self._SyncObj__raftCurrentTerm,
            },
        )

    def _onTick(self, timeToWait=0.0):
        with self._tick_lock:
            self._in_tick = True
            try:
                # The leader appends its own entries in _checkCommandsToApply (syncobj.py 528)
                # and counts itself toward their commit on the next tick (655-672): sync in
                # between. A slow disk must not silence the leader (an fdatasync can take
                # longer than the election timeout on a shared one): the helper stands in
                # meanwhile. Sending entries before they are durable here is safe, since the
                # leader counts itself toward a commit only after this sync (Raft thesis 10.2.1).
                if self._journal.dirty:
                    # Usually a fraction of a ms: the helper is not woken for it, but a
                    # leader's wakes when the next AppendEntries is due (_heartbeat_step).
                    with self._heartbeats_meanwhile("sync", wake_helper=False):
                        self._journal.sync()
                self._read_before_standing()
                self._read_before_stepping_down()
                self._maybe_pre_vote()
                state, term = self._SyncObj__raftState, self._SyncObj__raftCurrentTerm
                super()._onTick(timeToWait)
                self._log_role_change(state, term)
                if state != _RAFT_STATE.LEADER and self._SyncObj__raftState == _RAFT_STATE.LEADER:
                    self._apply_cond.notify()  # a leader's helper keeps time (_heartbeat_step)
            finally:
                self._in_tick = False

    def _log_role_change(self, state, term: int) -> None:
        """One line per role change, so an SRE can tell why an election happened."""
        now_state, now_term = self._SyncObj__raftState, self._SyncObj__raftCurrentTerm
        if now_state == state and now_term == term:
            return
        if now_state == _RAFT_STATE.CANDIDATE and state != _RAFT_STATE.CANDIDATE:
            logger.info(
                "standing for election in term %d: no AppendEntries from a leader "
                "within the election timeout (term was %d)",
                now_term,
                term,
            )
        elif state == _RAFT_STATE.LEADER and now_state != _RAFT_STATE.LEADER:
            reason = (
                "a higher term was seen"
                if now_term > term
                else "no answer from a majority within leaderFallbackTimeout"
            )
            logger.info("stepped down as leader (term %d -> %d): %s", term, now_term, reason)
        elif now_state == _RAFT_STATE.LEADER and state == _RAFT_STATE.FOLLOWER:
            # Stood and won within one tick (the votes arrive in the tick's final poll).
            logger.info(
                "stood for election (no AppendEntries from a leader within the "
                "election timeout) and became leader in term %d",
                now_term,
            )
        elif now_state == _RAFT_STATE.LEADER and state != _RAFT_STATE.LEADER:
            logger.info("became leader in term %d", now_term)

    # -- timing (fix 5) --------------------------------------------------------------------------

    def _read_before_standing(self) -> None:
        # Upstream 634-650 starts an election as soon as the deadline has passed, at the top of
        # the tick, and reads its sockets only at the end of the tick (706). After a tick that
        # ran long (a large batch applied, the GIL held by another thread), the leader's
        # AppendEntries is often already waiting: read it first; it resets the deadline.
        if self._SyncObj__raftState == _RAFT_STATE.LEADER or self._SyncObj__selfNode is None:
            return
        if self._SyncObj__raftElectionDeadline >= _now():
            return
        self._poller.poll(0)
        if self._SyncObj__raftElectionDeadline >= _now():
            self.elections_averted += 1

    def _read_before_stepping_down(self) -> None:
        # The leader's counterpart of _read_before_standing. Upstream steps down when fewer
        # than a majority answered within leaderFallbackTimeout (syncobj.py 678-686), judged
        # at the top of the tick, before the tick reads its sockets. After the tick thread
        # was busy longer than that (a large apply, a dump, a state hash between ticks) the
        # followers' answers are waiting unread: read them first.
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return
        deadline = _now() - self._SyncObj__conf.leaderFallbackTimeout
        answered = 1 + sum(
            1
            for node in self._SyncObj__otherNodes
            if self._SyncObj__lastResponseTime.get(node, 0) > deadline
        )
        if answered * 2 > len(self._SyncObj__otherNodes) + 1:
            return
        self._poller.poll(0)
        answered = 1 + sum(
            1
            for node in self._SyncObj__otherNodes
            if self._SyncObj__lastResponseTime.get(node, 0) > deadline
        )
        if answered * 2 > len(self._SyncObj__otherNodes) + 1:
            self.step_downs_averted += 1

    def _heartbeat_step(self) -> float | None:
        # Called with the tick lock held. While the tick thread is inside apply() (or a dump,
        # a read, a journal sync) on the leader, send AppendEntries whenever one is due (the
        # same call the tick makes at 690-692); return the seconds until the next one, or
        # None on a follower (nothing to do until woken). An idle leader's helper still wakes
        # when the next one is due: a journal sync hands over without waking it.
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return None
        due_in = self._SyncObj__newAppendEntriesTime - _now()
        if self._busy is None:
            return due_in if due_in > 0 else self._SyncObj__conf.appendEntriesPeriod
        if due_in > 0:
            return due_in
        self._SyncObj__sendAppendEntries()
        self.heartbeats_lent[self._busy] += 1
        return max(self._SyncObj__newAppendEntriesTime - _now(), 0.001)

    def heartbeat_if_due(self) -> None:
        """One step of the heartbeat helper (tests call it to stand for the helper thread)."""
        with self._apply_cond:
            self._heartbeat_step()

    def run_heartbeat_helper(self) -> None:
        """Body of the owner's heartbeat helper thread; returns after ``stop_heartbeat_helper``.

        It sleeps until the tick thread enters apply() and then, if this node leads, sends
        AppendEntries every ``appendEntriesPeriod`` until apply() returns. It holds the tick
        lock whenever it is awake, so it never runs pysyncobj code alongside the tick thread.
        """
        with self._apply_cond:
            while not self._helper_stopped:
                try:
                    wait = self._heartbeat_step()
                except Exception:
                    # As upstream's tick loop (592-597): log and carry on; the tick thread
                    # sends the next heartbeat once apply() returns anyway.
                    logger.exception("sending heartbeats during apply failed")
                    wait = None
                self._apply_cond.wait(wait)

    def stop_heartbeat_helper(self) -> None:
        with self._apply_cond:
            self._helper_stopped = True
            self._apply_cond.notify_all()

    def _SyncObj__deleteEntriesTo(self, toIDx):
        # Upstream 1208-1213, called once a new dump is written (1425-1428) at index toIDx + 1.
        # The dump's rename must be durable before the journal forgets the entries the dump
        # replaces. The compaction hold keeps the journal from an earlier index.
        if self._fsync:
            fsync_dir(self._dump_path.parent)
        self._dump_index = toIDx + 1
        if self._hold_floor is not None:
            toIDx = min(toIDx, max(self._hold_floor, 1))
        if toIDx > self._journal.first_index():
            # The journal is rewritten (atomically, DurableJournal.deleteEntriesTo): a few
            # entries normally, up to compaction_hold_mb of them under a hold. The helper may
            # send the leader's AppendEntries meanwhile: it reads the journal, which holds the
            # old entries until the new file replaces it in one step.
            with self._heartbeats_meanwhile("dump"):
                super()._SyncObj__deleteEntriesTo(toIDx)

    # -- the compaction hold (ADR 0008) ---------------------------------------------------------

    def _load_held_at_start(self) -> None:
        journal = self._journal
        if self._held_path.exists():
            try:
                held = read_dump(self._held_path)[0].index if self._hold_max_bytes else None
            except RaftStorageError as exc:
                logger.warning("dropping %s: %s", self._held_path, exc)
                held = None
            if held is not None and journal.first_index() <= held + 1 and held <= self._dump_index:
                self._held_index = held
            else:
                self._drop_held()
        if self._hold_max_bytes:
            # Until the archiver says where the archive ends: keep what this node has.
            self.compaction_hold = (
                self._held_index if self._held_index is not None else self._dump_index
            )

    def _plan_hold(self, new_index: int) -> int | None:
        """Called as a dump at `new_index` is about to replace the current one: the log index
        from which the journal is kept (the index of a state the node keeps), or None."""
        hold = self.compaction_hold
        if not self._hold_max_bytes or hold is None or hold >= new_index:
            self._drop_held()
            return None
        journal = self._journal
        current = self._dump_index if 0 < self._dump_index <= hold else None
        held = (
            self._held_index if self._held_index is not None and self._held_index <= hold else None
        )
        empty = 0 if journal.first_index() <= 1 else None
        floor = max((i for i in (current, held, empty) if i is not None), default=None)
        if floor is None:
            self._drop_held()
            return None  # the node compacted past the hold before: nothing to keep
        kept = journal.bytes_from(floor)
        if kept > self._hold_max_bytes:
            self.compaction_holds_released += 1
            logger.warning(
                "compaction hold released: keeping the log after index %d for the archive or "
                "the indexer (the lower of the archive's end and the indexer's checkpoint: %d) "
                "would keep %.1f MB of journal, over the %.1f MB bound; they may find a gap "
                "(docs/operating/backup-restore.md, docs/operating/indexer.md)",
                floor,
                hold,
                kept / 1e6,
                self._hold_max_bytes / 1e6,
            )
            self._drop_held()
            return None
        if floor == current:
            # The current dump is about to be renamed over: keep its inode as the held state.
            tmp = self._held_path.with_name(HELD_DUMP + ".tmp")
            try:
                tmp.unlink(missing_ok=True)
                os.link(self._dump_path, tmp)
                os.replace(tmp, self._held_path)
                if self._fsync:
                    fsync_dir(self._held_path.parent)
            except OSError as exc:
                logger.warning("compaction hold: keeping %s failed (%s)", self._held_path, exc)
                self._drop_held()
                return None
            self._held_index = floor
        elif floor == empty:
            self._drop_held()
        return floor

    def _drop_held(self) -> None:
        self._held_index = None
        try:
            self._held_path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove %s: %s", self._held_path, exc)

    # -- introspection for the adapter and tests -----------------------------------------------

    def close_storage(self) -> None:
        """Release files. Call only once ticking has stopped (after ``_doDestroy``)."""
        self._SyncObj__serializer.close()

    def raft_status(self) -> dict:
        leader = self._SyncObj__raftLeader
        state = self._SyncObj__raftState
        match = self._SyncObj__raftMatchIndex if state == _RAFT_STATE.LEADER else {}
        peers = []
        for peer in sorted(self._SyncObj__otherNodes, key=lambda n: n.id):
            peers.append(
                {
                    "id": peer.id,
                    "match_index": match.get(peer),
                    "connected": self.isNodeConnected(peer),
                }
            )
        return {
            "role": _ROLES[state],
            "leader": leader.id if leader is not None else None,
            # Only the leader decides membership changes (and its uncommitted tail is short;
            # a follower catching up may hold a long one).
            "raft_fixes": self._raft_fixes,
            "membership_busy": (
                self.membership_change_busy() if state == _RAFT_STATE.LEADER else None
            ),
            "term": self._SyncObj__raftCurrentTerm,
            "commit_index": self._SyncObj__raftCommitIndex,
            "applied_index": self._SyncObj__raftLastApplied,
            "log_first_index": self._journal.first_index(),
            "journal_bytes": self._journal.bytes_from(self._journal.first_index()),
            "dump_index": self._dump_index,
            "compaction_hold": self.compaction_hold,
            "held_dump_index": self._held_index,
            "compaction_holds_released": self.compaction_holds_released,
            "log_last_index": self._journal.last_index(),
            "peers": peers,
            # Removed by an entry not yet committed: out of the majority, links kept (fix 17).
            "lingering_peers": self.lingering_peers(),
            "refused_truncations": self.refused_truncations,
            "snapshots_ignored": self.snapshots_ignored,
            "snapshots_installed": self.snapshots_installed,
            "elections_averted": self.elections_averted,
            "step_downs_averted": self.step_downs_averted,
            **{f"heartbeats_during_{busy}": n for busy, n in self.heartbeats_lent.items()},
            "pre_votes_refused": self.pre_votes_refused,
            "membership_changes_refused": self.membership_changes_refused,
            "stale_replies_dropped": self.stale_replies_dropped,
            "non_member_answers_dropped": self.non_member_answers_dropped,
            "transport": self._transport_counters(),
        }

    def _transport_counters(self) -> dict:
        counters = getattr(self._SyncObj__transport, "counters", None)  # tests' transports lack it
        return counters() if counters is not None else {}


__all__ = [
    "EXIT_APPLY_FAILED",
    "EXIT_ENTRY_UNREADABLE",
    "EXIT_RESTORE_FAILED",
    "HardenedSerializer",
    "HardenedSyncObj",
    "write_file_atomically",
]
