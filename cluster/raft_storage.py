"""Durable storage for the Raft adapter: the journal, its meta file, and the dump file.

Why not pysyncobj's own ``FileJournal`` (``pysyncobj/journal.py``)?

* It never fsyncs: the journal is an mmap synced only at clean shutdown (journal.py 345-351),
  and the meta file is written with flush + rename only (journal.py 366-370). A node can
  acknowledge an AppendEntries or grant a vote and forget it after a power loss.
* A corrupt or empty meta file is read as blank (journal.py 358-364): a restarted node forgets
  its term and vote and may vote twice in one term.
* Compaction rewrites the journal in place (journal.py 458-462: ``clear()`` then re-``add``):
  a crash in the middle loses the tail of the log, entries the node had acknowledged.

``DurableJournal`` keeps pysyncobj's record format (so the file is still a pysyncobj journal)
but writes with plain ``pwrite``/``ftruncate``, syncs on demand (the adapter calls
``sync()`` before every acknowledgement), writes the meta file atomically with fsync on every
term/vote change, refuses to start on a corrupt meta file or journal, and compacts by
writing a new file and renaming it over the old one.

The dump file is our own msgpack document (never pickle); see ``encode_dump``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
from pysyncobj.journal import Journal

from cluster import raft_pin  # noqa: F401  (refuses any pysyncobj but the pinned one)

logger = logging.getLogger(__name__)
# A journal sync longer than this is logged: it delays the leader's heartbeats.
SLOW_SYNC_S = 0.05

# Exit code when durable storage fails under a running node (disk full, EIO, ...). Carrying on
# would leave memory and disk disagreeing about the log, so the process stops instead.
EXIT_STORAGE_FAILED = 74


class RaftStorageError(RuntimeError):
    """The data directory cannot be used safely; the node must not start."""


def fatal_storage_failure(what: str, exc: BaseException) -> None:
    """Stop the process: a failed write leaves the log in memory and on disk out of step."""
    logger.critical(
        "raft storage failure while %s: %r; stopping the process (exit %d)",
        what,
        exc,
        EXIT_STORAGE_FAILED,
    )
    logging.shutdown()
    os._exit(EXIT_STORAGE_FAILED)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same directory, write, fsync, rename over ``path``, fsync the dir."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# Journal: pysyncobj's on-disk record format (journal.py 376-391), our own I/O discipline.
# ---------------------------------------------------------------------------------------------

_APP_NAME = b"PYSYNCOBJ"
_NAME_SIZE = 24
_VERSION_SIZE = 8
_JOURNAL_FORMAT_VERSION = 1
_FIRST_RECORD_OFFSET = _NAME_SIZE + _VERSION_SIZE + 4 + 4
_LAST_RECORD_OFFSET_OFFSET = _NAME_SIZE + _VERSION_SIZE + 4
_RECORD_HEAD = struct.Struct("<I")
_RECORD_IDS = struct.Struct("<QQ")
# A single record larger than this is treated as corruption, not as data.
_MAX_RECORD_BYTES = 256 * 1024 * 1024

_META_FORMAT = "quorumbook-raft-meta"
_META_VERSION = 1

Entry = tuple[bytes, int, int]  # (command, index, term), as pysyncobj stores them


def _journal_header(app_version: str) -> bytes:
    name = _APP_NAME + b"\0" * (_NAME_SIZE - len(_APP_NAME))
    version = app_version.encode() + b"\0" * (_VERSION_SIZE - len(app_version.encode()))
    return name + version + struct.pack("<II", _JOURNAL_FORMAT_VERSION, _FIRST_RECORD_OFFSET)


def _encode_record(entry: Entry) -> bytes:
    command, idx, term = entry
    body = _RECORD_IDS.pack(idx, term) + bytes(command)
    size = _RECORD_HEAD.pack(len(body))
    return size + body + size


class DurableJournal(Journal):
    """Raft log + persistent Raft state (currentTerm, votedFor, commit index hint).

    Not thread-safe: used only from the tick thread (and from the constructor before the tick
    thread starts). Every I/O failure after start-up stops the process (``EXIT_STORAGE_FAILED``).
    """

    def __init__(self, path: Path, *, app_version: str, fsync: bool = True):
        self._path = Path(path)
        self._meta_path = self._path.with_name(self._path.name + ".meta")
        self._fsync = fsync
        self._header = _journal_header(app_version)
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each record in _entries
        self._end = _FIRST_RECORD_OFFSET
        self._dirty = False
        self.sync_count = 0  # how many times data was made durable (observable by tests)
        # A 0-byte journal is one whose creation a crash interrupted before the header was
        # written: nothing in it was ever acknowledged, so it counts as new.
        existed = self._path.exists() and self._path.stat().st_size > 0
        if existed:
            self._load_records()
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        if not existed:
            os.pwrite(self._fd, self._header, 0)
            self._end = _FIRST_RECORD_OFFSET
            os.ftruncate(self._fd, self._end)
            self._durable_sync()
            fsync_dir(self._path.parent)
        self._meta = self._load_meta(journal_has_history=len(self._entries) > 1)
        self._meta_dirty = False

    # -- start-up ---------------------------------------------------------------------------

    def _load_records(self) -> None:
        raw = self._path.read_bytes()
        if len(raw) < _FIRST_RECORD_OFFSET or not raw.startswith(_APP_NAME):
            raise RaftStorageError(
                f"{self._path} is not a pysyncobj journal (bad header, {len(raw)} bytes); "
                "refusing to start. Move the data directory aside to resync this node from "
                "the leader, and only while the rest of the cluster holds a majority."
            )
        offset = _FIRST_RECORD_OFFSET
        torn_at = None
        while offset < len(raw):
            if offset + 4 > len(raw):
                torn_at = offset
                break
            (size,) = _RECORD_HEAD.unpack_from(raw, offset)
            end = offset + 4 + size + 4
            if size < _RECORD_IDS.size or size > _MAX_RECORD_BYTES or end > len(raw):
                torn_at = offset
                break
            (size_tail,) = _RECORD_HEAD.unpack_from(raw, end - 4)
            if size_tail != size:
                torn_at = offset
                break
            idx, term = _RECORD_IDS.unpack_from(raw, offset + 4)
            command = raw[offset + 4 + _RECORD_IDS.size : end - 4]
            if self._entries:
                prev_idx, prev_term = self._entries[-1][1], self._entries[-1][2]
                if idx != prev_idx + 1 or term < prev_term:
                    raise RaftStorageError(
                        f"{self._path}: record at byte {offset} has index {idx} term {term} "
                        f"after index {prev_idx} term {prev_term}; the journal is corrupt. "
                        "Refusing to start."
                    )
            self._entries.append((command, idx, term))
            self._offsets.append(offset)
            offset = end
        if torn_at is not None:
            # Records are appended at the end and the file is fsynced before any record is
            # acknowledged, so an unreadable tail is a write the crash interrupted before it
            # was ever acknowledged: drop it (Raft allows losing unacknowledged entries).
            logger.warning(
                "%s: dropping %d unreadable trailing bytes at offset %d (a write "
                "interrupted by a crash, never acknowledged)",
                self._path,
                len(raw) - torn_at,
                torn_at,
            )
            with open(self._path, "r+b") as f:
                f.truncate(torn_at)
                f.flush()
                os.fsync(f.fileno())
            offset = torn_at
        self._end = offset

    def _load_meta(self, *, journal_has_history: bool) -> dict:
        blank = {"term": 0, "voted_for": None, "commit": 1}
        if not self._meta_path.exists():
            if journal_has_history:
                # Entries are only ever appended at term >= 1, and a term is stored durably
                # before anything of that term is written: a journal with history and no meta
                # means the meta file was lost.
                raise RaftStorageError(
                    f"{self._meta_path} is missing but {self._path} holds log entries: this "
                    "node's current term and vote are lost. Refusing to start (a blank term "
                    "could let it vote twice in one term). Move the data directory aside to "
                    "resync from the leader, only while the rest of the cluster holds a "
                    "majority."
                )
            return blank
        raw = self._meta_path.read_bytes()
        try:
            meta = msgpack.unpackb(raw, raw=False)
            if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
                raise ValueError("not a quorumbook raft meta document")
            if meta.get("version") != _META_VERSION:
                raise ValueError(f"unsupported meta version {meta.get('version')!r}")
            term, voted_for, commit = meta["term"], meta["voted_for"], meta["commit"]
            if not (
                isinstance(term, int)
                and term >= 0
                and isinstance(commit, int)
                and commit >= 1
                and (voted_for is None or isinstance(voted_for, str))
            ):
                raise ValueError("bad field types")
        except Exception as exc:
            raise RaftStorageError(
                f"{self._meta_path} is corrupt or empty ({len(raw)} bytes: {exc}); refusing to "
                "start rather than read it as a blank term and vote (that could let this node "
                "vote twice in one term). Move the data directory aside to resync from the "
                "leader, only while the rest of the cluster holds a majority."
            ) from exc
        return {"term": term, "voted_for": voted_for, "commit": commit}

    # -- durability ---------------------------------------------------------------------------

    def _durable_sync(self) -> None:
        if self._fsync:
            started = time.monotonic()
            os.fdatasync(self._fd)
            took = time.monotonic() - started
            if took > SLOW_SYNC_S:  # the tick thread sends no heartbeat meanwhile
                logger.warning("fdatasync of the journal took %.0f ms", took * 1000)
        self.sync_count += 1

    def sync(self) -> None:
        """Make every appended/truncated record durable. Called before any acknowledgement."""
        if not self._dirty:
            return
        try:
            # Keep pysyncobj's LAST_RECORD_OFFSET header field right, so the file stays a
            # readable pysyncobj journal. We do not trust it on load (see _load_records).
            os.pwrite(self._fd, struct.pack("<I", self._end), _LAST_RECORD_OFFSET_OFFSET)
            self._durable_sync()
        except OSError as exc:
            fatal_storage_failure("syncing the journal", exc)
        self._dirty = False

    def _store_meta(self) -> None:
        doc = {
            "format": _META_FORMAT,
            "version": _META_VERSION,
            "term": self._meta["term"],
            "voted_for": self._meta["voted_for"],
            "commit": self._meta["commit"],
        }
        try:
            if self._fsync:
                write_file_atomically(self._meta_path, msgpack.packb(doc))
            else:
                tmp = self._meta_path.with_name(self._meta_path.name + ".tmp")
                tmp.write_bytes(msgpack.packb(doc))
                os.replace(tmp, self._meta_path)
        except OSError as exc:
            fatal_storage_failure("writing the raft meta file", exc)
        self.sync_count += 1
        self._meta_dirty = False

    # -- pysyncobj Journal interface ----------------------------------------------------------

    def add(self, command, idx, term):
        if self._entries:
            last_idx = self._entries[-1][1]
            if idx != last_idx + 1:
                raise AssertionError(f"journal append of index {idx} after {last_idx}")
        entry = (bytes(command), int(idx), int(term))
        record = _encode_record(entry)
        try:
            os.pwrite(self._fd, record, self._end)
        except OSError as exc:
            fatal_storage_failure("appending to the journal", exc)
        self._entries.append(entry)
        self._offsets.append(self._end)
        self._end += len(record)
        self._dirty = True

    def clear(self):
        self.reset([])

    def reset(self, entries: list[Entry]) -> None:
        """Replace the whole log atomically (new file, fsync, rename, fsync dir)."""
        entries = [(bytes(c), int(i), int(t)) for c, i, t in entries]
        tmp = self._path.with_name(self._path.name + ".rewrite")
        offsets = []
        chunks = [self._header]
        offset = _FIRST_RECORD_OFFSET
        for entry in entries:
            record = _encode_record(entry)
            offsets.append(offset)
            chunks.append(record)
            offset += len(record)
        data = bytearray(b"".join(chunks))
        struct.pack_into("<I", data, _LAST_RECORD_OFFSET_OFFSET, offset)
        try:
            if self._fsync:
                write_file_atomically(tmp, bytes(data))
            else:
                tmp.write_bytes(bytes(data))
            os.replace(tmp, self._path)
            if self._fsync:
                fsync_dir(self._path.parent)
            new_fd = os.open(self._path, os.O_RDWR)
        except OSError as exc:
            fatal_storage_failure("rewriting the journal", exc)
        os.close(self._fd)
        self._fd = new_fd
        self._entries = entries
        self._offsets = offsets
        self._end = offset
        self._dirty = False
        self.sync_count += 1

    def deleteEntriesFrom(self, entryFrom):
        """Truncate the log from list position ``entryFrom`` (physically: ftruncate)."""
        if entryFrom >= len(self._entries):
            return
        self._end = self._offsets[entryFrom]
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        try:
            os.ftruncate(self._fd, self._end)
        except OSError as exc:
            fatal_storage_failure("truncating the journal", exc)
        self._dirty = True

    def deleteEntriesTo(self, entryTo):
        """Compaction: drop list positions before ``entryTo`` by an atomic rewrite.

        pysyncobj rewrites in place (journal.py 458-462); a crash half-way loses the tail.
        """
        self.reset(self._entries[entryTo:])

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self):
        return len(self._entries)

    def _destroy(self):
        self.close()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.sync()
            if self._meta_dirty:
                self._store_meta()
        finally:
            os.close(self._fd)
            self._fd = -1

    def setRaftCommitIndex(self, raftCommitIndex):
        if raftCommitIndex != self._meta["commit"]:
            self._meta["commit"] = int(raftCommitIndex)
            self._meta_dirty = True

    def getRaftCommitIndex(self):
        return self._meta["commit"]

    def setCurrentTerm(self, term, votedForNodeId):
        # Raft: currentTerm and votedFor must be durable before any message that reflects
        # them (a vote, a request for votes) leaves the node. One fsync'd rename per change.
        self._meta["term"] = int(term)
        self._meta["voted_for"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self):
        return self._meta["term"]

    def getVotedForNodeId(self):
        return self._meta["voted_for"]

    def onOneSecondTimer(self):
        # The commit index is a hint (Raft keeps it volatile); store it at most once a second.
        if self._meta_dirty:
            self._store_meta()

    # -- helpers for the adapter --------------------------------------------------------------

    def first_index(self) -> int:
        return self._entries[0][1]

    def last_index(self) -> int:
        return self._entries[-1][1]

    def term_at(self, idx: int) -> int | None:
        """Term of the entry at log index ``idx``, or None if the log does not hold it."""
        if not self._entries:
            return None
        pos = idx - self._entries[0][1]
        if pos < 0 or pos >= len(self._entries):
            return None
        return self._entries[pos][2]


# ---------------------------------------------------------------------------------------------
# Dump file: msgpack, never pickle. Carries pysyncobj's raft data and our machine snapshot.
# ---------------------------------------------------------------------------------------------

_DUMP_FORMAT = "quorumbook-raft-dump"
_DUMP_VERSION = 1


@dataclass(frozen=True)
class DumpHeader:
    last: Entry  # the last log entry the snapshot covers (its index is the snapshot index)
    prev: Entry  # the entry before it (pysyncobj keeps both at the head of the log)
    cluster: tuple[str, ...]  # node addresses (membership at the snapshot)

    @property
    def index(self) -> int:
        return self.last[1]

    @property
    def term(self) -> int:
        return self.last[2]


def encode_dump(header: DumpHeader, machine_blob: bytes) -> bytes:
    body = msgpack.packb(
        {
            "last": list(header.last),
            "prev": list(header.prev),
            "cluster": sorted(header.cluster),
            "machine": bytes(machine_blob),
        },
        use_bin_type=True,
    )
    return msgpack.packb(
        {
            "format": _DUMP_FORMAT,
            "version": _DUMP_VERSION,
            "body": body,
            "sha256": hashlib.sha256(body).digest(),
        },
        use_bin_type=True,
    )


def decode_dump(raw: bytes, *, source: str) -> tuple[DumpHeader, bytes]:
    """Parse and verify a dump; raise ``RaftStorageError`` on anything unexpected."""
    try:
        outer = msgpack.unpackb(raw, raw=False)
        if not isinstance(outer, dict) or outer.get("format") != _DUMP_FORMAT:
            raise ValueError("not a quorumbook raft dump")
        if outer.get("version") != _DUMP_VERSION:
            raise ValueError(f"unsupported dump version {outer.get('version')!r}")
        body = outer["body"]
        if hashlib.sha256(body).digest() != outer["sha256"]:
            raise ValueError("checksum mismatch")
        doc = msgpack.unpackb(body, raw=False)

        def entry(value) -> Entry:
            command, idx, term = value
            if not (isinstance(command, bytes) and isinstance(idx, int) and isinstance(term, int)):
                raise ValueError("bad log entry in dump")
            return (command, idx, term)

        header = DumpHeader(
            last=entry(doc["last"]),
            prev=entry(doc["prev"]),
            cluster=tuple(str(a) for a in doc["cluster"]),
        )
        if header.prev[1] + 1 != header.last[1]:
            raise ValueError("dump head entries are not consecutive")
        machine = doc["machine"]
        if not isinstance(machine, bytes):
            raise ValueError("machine snapshot is not bytes")
    except Exception as exc:
        raise RaftStorageError(f"{source}: unreadable raft dump ({exc})") from exc
    return header, machine


def read_dump(path: Path) -> tuple[DumpHeader, bytes]:
    return decode_dump(Path(path).read_bytes(), source=str(path))
