"""The log archiver beside a node: `python -m disaster_recovery.archiver` (cluster/sidecar.py
starts it when the node's config has `[archive] target`).

One follower at a time ships the committed log to the target in segments
(disaster_recovery/segments.py), every `segment_max_s` or `segment_max_entries`, and backs the
state up every `backup_interval_s` from the node's own latest dump (the snapshot the node
writes anyway when it compacts its log: nothing is stalled to take it), keeping the newest
`keep_backups` and the segments they need. With the backups and the segments after them, a
cluster that lost every node is restored up to the last segment (disaster_recovery/restore.py).

Which follower: the one with the lowest node id among this node and the peers it sees
connected, the leader excepted. Two that disagree for a moment (a partition) both archive:
committed entries are the same bytes on every node, so their segments agree where they
overlap and a restore takes either.

Where it reads: like the indexer (ADR 0007), its own replica of the state machine, fed from
the node's dump and journal up to the applied index (every entry's `cmd_index` is recorded,
so a point-in-time restore knows where to stop). The replica starts from the newest state
the node keeps at or before the archive's end: its dump, the dump its compaction hold kept
(raft.dump.held), or the empty state while its journal starts at index 1.

The compaction hold (ADR 0008): every archiver, standing by too, reports where the archive
ends (`archived_index`; a standing-by one reads it from the target every few seconds), and
its node's compaction keeps the log after that point, so whichever node archives next finds
no gap. When the journal no longer holds the entry after the archive's end all the same (the
hold's bound was passed, or the node installed a snapshot), the archive has a gap: it is said
loudly, and a backup of the node's dump starts a new chain after it.

It talks to the node in JSON lines like the indexer: the node's view on stdin, its status
(the node status's `archive` object) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from cluster import collector
from cluster.machine import ExchangeMachine, exchange_blob_of
from cluster.raft import (
    HELD_DUMP,
    REBUILD_ATTEMPTS,
    JournalGap,
    JournalReader,
    RaftStorageError,
    file_identity,
    journal_holds,
    payload_of_entry,
    read_dump,
)
from statemachine.snapshot import stated_hash

from . import backup, segments
from .target import Target, TargetError, open_target

log = logging.getLogger("quorumbook.archive")

TARGET_ENV = "QB_ARCHIVE_TARGET"
STATUS_PERIOD_S = 0.5
STANDBY_READ_S = 5.0  # how often a standing-by archiver reads where the archive ends
STANDBY_FULL_READ_S = 60.0  # ... listing every segment; in between only the new ones
IDLE_S = 0.05
READ_MAX = 256  # log entries read and applied per step
PENDING_MAX = 50_000  # entries held while the target is down; beyond, start over from the end
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0


class Gap(RuntimeError):
    """The node's log no longer holds the entry after the archive's end."""


class Replica:
    """The node's state machine, at log index `index`, fed from its dump and journal."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.machine = ExchangeMachine()
        self.index = 0
        self.reader = JournalReader(data_dir / "raft.journal")

    @classmethod
    def at(cls, data_dir: Path, index: int, applied: int) -> Replica:
        """A replica at `index`: from the newest state the node keeps at or before it (its
        dump, its held dump, or the empty state), then its journal. Gap when the journal no
        longer holds what lies between.

        A compaction between reading a dump and opening the journal can leave a journal that
        does not follow the state read (the indexer's source met it: ADR 0007): a Gap while
        the node's dump changed is tried again, from the newer dump."""
        dump = data_dir / "raft.dump"
        attempt = 1
        while True:
            before = file_identity(dump)
            try:
                return cls._at(data_dir, index, applied)
            except Gap:
                if attempt == REBUILD_ATTEMPTS or file_identity(dump) == before:
                    raise
            attempt += 1

    @classmethod
    def _at(cls, data_dir: Path, index: int, applied: int) -> Replica:
        replica = cls(data_dir)
        try:
            past = None
            for name in ("raft.dump", HELD_DUMP):
                if not (data_dir / name).exists():
                    continue
                header, blob = read_dump(data_dir / name)
                if header.index <= index:
                    replica.machine.restore(blob)
                    replica.index = header.index
                    break
                past = header.index if past is None else past
            replica.reader.open()
            try:
                replica.reader.check_starts_by(replica.index + 1)
            except JournalGap as exc:
                raise Gap(str(exc)) from exc
            if (
                past is not None
                and replica.index == 0
                and not journal_holds(data_dir / "raft.journal", 1)
            ):
                # The empty state needs a journal that holds index 1, not merely an empty one.
                raise Gap("the journal does not hold log index 1")
            while replica.index < index:
                if not replica.read(min(index, applied), READ_MAX):
                    break
        except Gap as exc:
            replica.close()
            if past is not None and replica.index == 0:
                raise Gap(f"the node's snapshot is at log index {past}, past {index}") from exc
            raise
        except BaseException:
            replica.close()
            raise
        if replica.index != index:
            replica.close()
            raise Gap(f"the node has applied {applied}, not yet {index}")
        return replica

    def read(self, upto: int, max_entries: int) -> list[segments.Entry]:
        """Apply and return the next entries up to `upto` (each with its cmd_index after)."""
        if upto <= self.index:
            return []
        try:
            entries = self.reader.read(self.index + 1, upto, max_entries)
        except JournalGap as exc:
            raise Gap(str(exc)) from exc
        out = []
        for command, idx, term in entries:
            payload = payload_of_entry(command)
            if payload is not None:
                self.machine.apply(payload)
            self.index = idx
            out.append((command, idx, term, self.machine.exchange.cmd_index))
        return out

    def close(self) -> None:
        self.reader.close()


class NodeFeed:
    """The node's view, as its JSON lines on our stdin say (a thread reads them)."""

    def __init__(self) -> None:
        self.view: dict = {}
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        for line in sys.stdin:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    self.view = doc
        self.closed.set()


def designated(node_id: str, view: dict) -> bool:
    """Whether this node archives now: a follower with a leader, lowest id among itself and
    the peers it sees connected (the leader excepted)."""
    if view.get("role") != "follower" or not view.get("leader"):
        return False
    others = [p for p in view.get("connected", ()) if p != view["leader"]]
    return node_id <= min(others, default=node_id)


class Archiver:
    def __init__(self, opts: argparse.Namespace, target: Target, feed: NodeFeed) -> None:
        self.opts = opts
        self.target = target
        self.feed = feed
        self.data_dir = Path(opts.data_dir)
        self.end: int | None = None  # the archive's last index (a chain from an anchor)
        self.end_cmd_index = 0
        self.replica: Replica | None = None
        self.pending: list[segments.Entry] = []
        self.pending_since = 0.0
        self.behind_since: float | None = None
        self.last_backup_at: dt.datetime | None = None
        self.last_backup_index = -1
        self.next_backup_check = 0.0
        self.next_standby_read = 0.0
        self.standby_view: StandbyView | None = None
        self.status: dict = {
            "configured": True, "active": False, "state": "starting", "target": target.url,
            "archived_index": None, "archived_cmd_index": None, "lag_entries": None,
            "lag_s": 0.0, "segments_written": 0, "backups_written": 0, "last_backup": None,
            "gaps": 0, "last_error": None, "pid": os.getpid(),
        }  # fmt: skip

    # ------------------------------------------------------------------ the loop

    def step(self) -> float:
        """One round; how long to wait before the next."""
        view = self.feed.view
        if not designated(self.opts.node_id, view):
            self._stand_by()
            return 0.2
        self.status["active"] = True
        if self.end is None:
            self._open_archive()
        assert self.end is not None
        applied = int(view.get("applied_index", 0))
        if self.replica is None:
            self.replica = self._replica_at_end(applied)
        entries = self.replica.read(applied, READ_MAX)
        if entries:
            if not self.pending:
                self.pending_since = time.monotonic()
            self.pending += entries
        if self._segment_due():
            self._ship()
        self._maybe_back_up()
        self._report(applied)
        return 0.0 if entries else IDLE_S

    def _stand_by(self) -> None:
        if self.replica is not None:
            self.replica.close()
            self.replica = None
        self.pending = []
        self.end = None  # another may have archived meanwhile: read it again when active
        self.behind_since = None
        self.status.update(active=False, state="standby", lag_entries=None, lag_s=0.0)
        now = time.monotonic()
        if now >= self.next_standby_read:
            # Where the archive ends, for this node's compaction hold (read only: a standing-by
            # archiver never writes the target).
            self.next_standby_read = now + STANDBY_READ_S
            try:
                view = self.standby_view
                if view is None or now >= view.full_until:
                    if backup.target_cluster(self.target) not in (None, self.opts.cluster_id):
                        return
                    view = self.standby_view = StandbyView.read(self.target)
                    view.full_until = now + STANDBY_FULL_READ_S
                else:
                    view.read_new(self.target)
                self.status["archived_index"] = view.end
            except (TargetError, OSError, backup.BackupError, segments.SegmentError) as exc:
                log.debug("archive (standby): reading the archive's end failed: %s", exc)

    def _open_archive(self) -> None:
        backup.bind(self.target, self.opts.cluster_id)
        self.end, self.end_cmd_index, chain = reach(self.target)
        if chain:
            last = segments.read(self.target, chain[-1][2], cluster_id=self.opts.cluster_id)
            self.end_cmd_index = last.last_cmd_index
        newest = backup.complete_backups(self.target)
        if newest:
            self.last_backup_index = newest[-1].applied_index
            self.last_backup_at = _parse_time(newest[-1].created_at)
        log.info("archive %s: ends at log index %d", self.target.url, self.end)
        self.status.update(state="archiving", archived_index=self.end,
                           archived_cmd_index=self.end_cmd_index)  # fmt: skip

    def _replica_at_end(self, applied: int) -> Replica:
        assert self.end is not None
        try:
            return Replica.at(self.data_dir, self.end, applied)
        except Gap as exc:
            if self.end > applied:
                raise  # the archive is ahead of this node (it is catching up): wait
            # The log moved past the archive: a new chain from a backup of the node's dump.
            self.status["gaps"] += 1
            log.error(
                "archive GAP after log index %d (%s): backing up this node's snapshot to "
                "start a new chain; points in time in the gap cannot be restored",
                self.end,
                exc,
            )
            made = self._back_up_dump(reason="gap")
            self.end, self.end_cmd_index = made.applied_index, made.cmd_index
            return Replica.at(self.data_dir, self.end, applied)

    def _segment_due(self) -> bool:
        if not self.pending:
            return False
        return (
            len(self.pending) >= self.opts.segment_max_entries
            or time.monotonic() - self.pending_since >= self.opts.segment_max_s
        )

    def _ship(self) -> None:
        assert self.end is not None
        batch = self.pending[: self.opts.segment_max_entries]
        segment = segments.Segment(
            cluster_id=self.opts.cluster_id,
            first_cmd_index=self.end_cmd_index,
            created_at=_now_iso(),
            entries=tuple(batch),
        )
        self.target.put(segment.name, segments.encode(segment))
        self.pending = self.pending[len(batch) :]
        self.pending_since = time.monotonic()
        self.end, self.end_cmd_index = segment.last_index, segment.last_cmd_index
        self.status["segments_written"] += 1

    # ------------------------------------------------------------------ backups

    def _maybe_back_up(self) -> None:
        """A backup of the node's latest dump every `backup_interval_s` (if it is newer than
        the last backup: a quiet cluster does not compact, and gets no new backup)."""
        interval = self.opts.backup_interval_s
        if interval <= 0 or time.monotonic() < self.next_backup_check:
            return
        if self.last_backup_at is not None:
            elapsed = (dt.datetime.now(dt.UTC) - self.last_backup_at).total_seconds()
            if elapsed < interval:
                self.next_backup_check = time.monotonic() + interval - elapsed
                return
        dump = self.data_dir / "raft.dump"
        header, blob = read_dump(dump) if dump.exists() else (None, b"")
        if header is None or header.index <= self.last_backup_index:
            self.next_backup_check = time.monotonic() + min(interval, 60.0)
            return
        self._back_up(header.index, blob, reason="scheduled")

    def _back_up_dump(self, *, reason: str) -> backup.Manifest:
        header, blob = read_dump(self.data_dir / "raft.dump")
        return self._back_up(header.index, blob, reason=reason)

    def _back_up(self, index: int, blob: bytes, *, reason: str) -> backup.Manifest:
        machine = ExchangeMachine()
        machine.restore(blob)  # decoded in full: never store a snapshot that does not restore
        exchange = machine.exchange
        state = backup.State(
            blob=blob,
            applied_index=index,
            cmd_index=exchange.cmd_index,
            seq=exchange.seq,
            state_hash=stated_hash(exchange_blob_of(blob)),
            taken_from=f"dump:{self.opts.node_id}",
        )
        made = backup.write(self.target, self.opts.cluster_id, state)
        self.last_backup_at = dt.datetime.now(dt.UTC)
        self.last_backup_index = made.applied_index
        self.status["backups_written"] += 1
        self.status["last_backup"] = made.backup_id
        log.info("archive: backup %s (%s) at log index %d", made.backup_id, reason, index)
        self._prune()
        return made

    def _prune(self) -> None:
        """Keep the newest `keep_backups` backups, and the segments a restore from them needs."""
        kept = backup.complete_backups(self.target)
        if len(kept) <= self.opts.keep_backups:
            return
        old, kept = kept[: -self.opts.keep_backups], kept[-self.opts.keep_backups :]
        for manifest in old:
            backup.delete(self.target, manifest.backup_id)
        floor = kept[0].applied_index
        for _first, last, name in segments.listed(self.target):
            if last <= floor:
                self.target.delete(name)

    # ------------------------------------------------------------------ status

    def _report(self, applied: int) -> None:
        assert self.end is not None
        lag = max(0, applied - self.end)
        now = time.monotonic()
        if lag and self.behind_since is None:
            self.behind_since = now
        elif not lag:
            self.behind_since = None
        self.status.update(
            state="archiving",
            archived_index=self.end,
            archived_cmd_index=self.end_cmd_index,
            lag_entries=lag,
            lag_s=round(now - self.behind_since, 3) if self.behind_since is not None else 0.0,
            last_error=None,
        )

    def fail(self, exc: BaseException) -> None:
        """A round failed (the target down, a gap the node will close): keep the archive's
        end, drop what is held beyond the bound, try again later."""
        self.status.update(state="backoff", last_error=f"{type(exc).__name__}: {exc}")
        if len(self.pending) > PENDING_MAX or isinstance(exc, Gap):
            self.pending = []
            if self.replica is not None:
                self.replica.close()
                self.replica = None


class StandbyView:
    """Where the archive ends, as a standing-by archiver follows it: a full read (`reach`),
    then, between full reads, only the segments named after the last one seen (a listing of
    what is new: on S3, a week of 2 s segments is 300 pages to list in full) and the
    backups, carrying the end on while they chain on from it."""

    def __init__(self, end: int, after: str | None) -> None:
        self.end = end
        self.after = after  # the last segment name seen
        self.full_until = 0.0

    @classmethod
    def read(cls, target: Target) -> StandbyView:
        spans = segments.listed(target)
        end, _cmd_index, _chain = reach(target, spans)
        return cls(end, spans[-1][2] if spans else None)

    def read_new(self, target: Target) -> None:
        # A backup past the end is an anchor of its own (one taken after a gap).
        for manifest in backup.complete_backups(target):
            self.end = max(self.end, manifest.applied_index)
        for first, last, name in segments.listed(target, after=self.after):
            if first <= self.end + 1:
                self.end = max(self.end, last)
            self.after = name


def reach(
    target: Target, spans: list[tuple[int, int, str]] | None = None
) -> tuple[int, int, list[tuple[int, int, str]]]:
    """Where the archive ends: the end of the longest chain of segments (`spans`, the
    target's listing unless given) from an anchor (a complete backup, or the log's start),
    the anchor's cmd_index, and the chain."""
    anchors = [(0, 0)] + [(m.applied_index, m.cmd_index) for m in backup.complete_backups(target)]
    if spans is None:
        spans = segments.listed(target)
    chains = {}
    for index, cmd_index in anchors:
        chain = segments.chain(spans, index)
        chains[index] = (chain[-1][1] if chain else index, cmd_index, chain)
    return chains[max(chains, key=lambda i: (chains[i][0], i))]


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _emit(status: dict) -> None:
    sys.stdout.write(json.dumps(status) + "\n")
    sys.stdout.flush()


def run(opts: argparse.Namespace) -> None:
    feed = NodeFeed()
    feed.start()
    target = open_target(opts.target)
    archiver = Archiver(opts, target, feed)
    backoff = BACKOFF_MIN_S
    last_emit = 0.0
    while not feed.closed.is_set():
        try:
            wait = archiver.step()
            backoff = BACKOFF_MIN_S
        except (TargetError, Gap, RaftStorageError, OSError, backup.BackupError,
                segments.SegmentError) as exc:  # fmt: skip
            log.warning("archive: %s: %s; retrying in %.1f s", type(exc).__name__, exc, backoff)
            archiver.fail(exc)
            wait, backoff = backoff, min(backoff * 2, BACKOFF_MAX_S)
        now = time.monotonic()
        if now - last_emit >= STATUS_PERIOD_S:
            _emit(archiver.status)
            last_emit = now
        if wait:
            feed.closed.wait(wait)
    # The node is stopping: ship what is held (a clean stop loses nothing archived so far).
    with contextlib.suppress(Exception):
        while archiver.pending and archiver.status["active"]:
            archiver._ship()
    _emit(archiver.status)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m disaster_recovery.archiver")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--cluster-id", required=True)
    ap.add_argument("--target", default=os.environ.get(TARGET_ENV))
    ap.add_argument("--segment-max-s", type=float, default=2.0)
    ap.add_argument("--segment-max-entries", type=int, default=2000)
    ap.add_argument("--backup-interval-s", type=float, default=3600.0)
    ap.add_argument("--keep-backups", type=int, default=7)
    opts = ap.parse_args(argv)
    if not opts.target:
        ap.error(f"no --target and no ${TARGET_ENV}")
    return opts


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    collector.tame(log, freeze=False)  # it applies the log as a node does (cluster/collector.py)
    run(parse(argv))


if __name__ == "__main__":
    main()
