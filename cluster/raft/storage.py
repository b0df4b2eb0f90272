"""Durable storage for the Raft adapter: the journal, its meta file, and the dump file.

Why not pysyncobj's own ``FileJournal`` (``pysyncobj/journal.py``)?

* It never fsyncs: the journal is an mmap synced only at clean shutdown (journal.py 345-351),
  and the meta file is written with flush + rename only (journal.py 366-370). A node can
  acknowledge an AppendEntries or grant a vote and forget it after a power loss.
* A corrupt or empty meta file is read as blank (journal.py 358-364): a restarted node forgets
  its term and vote and may vote twice in one term.
* Compaction rewrites the journal in place (journal.py 458-462: ``clear()`` then re-``add``):
  a crash in the middle loses the tail of the log, entries the node had acknowledged.
* Its records carry no checksum (journal.py 180-185), so a damaged record is either read as
  data or, when its size field is hit, ends the log there: every later entry is lost.

``DurableJournal`` writes its own record format (format 2, below: a checksum per record and
a header that says how far the file was synced) with plain ``pwrite``/``ftruncate``, syncs on
demand (the adapter calls ``sync()`` before every acknowledgement), writes the meta file
atomically with fsync on every term/vote change, refuses to start on a corrupt meta file or a
damaged synced part of the journal, and compacts by writing a new file and renaming it over
the old one. Journals in pysyncobj's format (format 1, written by earlier builds) are read once
and converted at start-up. The recovery from a refusal is in docs/operating/raft-storage.md.

The dump file is our own msgpack document (never pickle); see ``encode_dump``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
from pysyncobj.journal import Journal

from . import pin  # noqa: F401  (refuses any pysyncobj but the pinned one)
from .stats import STAGE_BUCKETS_S, Histogram
from .views import unpack as views_unpack

logger = logging.getLogger(__name__)
# A journal sync longer than this is logged: a follower acknowledges nothing meanwhile (the
# leader's heartbeats go on: the helper stands in while it syncs).
SLOW_SYNC_S = 0.05

# Exit code when durable storage fails under a running node (disk full, EIO, ...). Carrying on
# would leave memory and disk disagreeing about the log, so the process stops instead.
EXIT_STORAGE_FAILED = 74


class RaftStorageError(RuntimeError):
    """The data directory cannot be used safely; the node must not start."""


# Said by every refusal that only a resync can cure.
RESYNC_HINT = (
    "Recovery (docs/operating/raft-storage.md): stop this node, move its data directory "
    "aside and start it empty so it catches up from the leader, only while the other nodes "
    "hold a majority."
)


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
# Journal
#
# Format 2 (ours). Header, 88 bytes:
#     0  name, 24 bytes NUL-padded: b"quorumbook-raft-journal"
#    24  pysyncobj version that wrote it, 8 bytes NUL-padded (forensics only)
#    32  format version, u32 = 2
#    36  crc32 of bytes 0-35
#    40  synced-end slot 0: seq u64, synced_end u64, crc32 of (seq, synced_end) u32, 4 zero bytes
#    64  synced-end slot 1, the same
# then records, from byte 88, each:
#     crc u32 | size u32 | index u64 | term u64 | command (size bytes)
# where crc = crc32(size .. end of command) seeded with the previous record's crc (0 for the
# first record of the file): a running checksum, as etcd's WAL does, so a record is valid only
# right after the record it was written after.
#
# The synced end. ``sync()`` fdatasyncs the appended records, then writes their end into the
# older of the two slots (a higher seq than the other); that write becomes durable with the
# next fdatasync (the next sync, the idle flush in ``onOneSecondTimer``, or ``close()``). So a
# slot never claims bytes that were not durable before it was written, and a write of one
# slot that a power loss tears leaves the other slot whole. At start-up the valid slot with
# the highest seq gives the synced end: every byte before it must parse (otherwise the node
# refuses to start: those records held acknowledged entries); records after it are kept while
# their checksums (and index/term order) hold, and the first bad one is where the torn tail
# starts: it and everything after it are dropped with a WARNING (never acknowledged, or the
# synced end would be past them). What this cannot tell apart: after a power loss, the header
# may lag by the last batch (acknowledged, its slot write not yet durable); damage inside that
# batch reads as a torn tail and drops it. The idle flush bounds that window to the last batch
# under load and about two seconds when idle.
#
# Format 1 (pysyncobj's, journal.py 180-185, written by our earlier builds): a 40-byte header
# (name b"PYSYNCOBJ", version, u32 format 1, u32 last-record offset), then records
# size u32 | index u64 | term u64 | command | size u32, no checksum. Read once and converted
# to format 2 atomically. A record that does not frame ends the log, as it always did, unless
# it lies before the header's last-record offset within the file (refused, see _read_v1).
# ---------------------------------------------------------------------------------------------

_NAME = b"quorumbook-raft-journal"
_NAME_SIZE = 24
_VERSION_SIZE = 8
_FORMAT_VERSION = 2
_FIXED = struct.Struct("<24s8sI")  # name, app version, format version
_FIXED_CRC_OFFSET = _FIXED.size  # 36
_SLOT = struct.Struct("<QQI4x")  # seq, synced_end, crc
_SLOT_OFFSETS = (40, 40 + _SLOT.size)
_HEADER_SIZE = 40 + 2 * _SLOT.size  # 88: the first record
_CRC = struct.Struct("<I")
_RECORD_HEAD = struct.Struct("<IIQQ")  # crc, size, index, term
_RECORD_BODY_HEAD = struct.Struct("<IQQ")  # size, index, term: the first bytes the crc covers
# A single record larger than this is treated as corruption, not as data.
_MAX_RECORD_BYTES = 256 * 1024 * 1024

_V1_NAME = b"PYSYNCOBJ"
_V1_HEADER_SIZE = 40
_V1_FORMAT_OFFSET = 32
_V1_SIZE = struct.Struct("<I")
_V1_IDS = struct.Struct("<QQ")

_META_FORMAT = "quorumbook-raft-meta"
# Version 2 carries a crc32 of its fields (fix 18: a flipped bit in the commit index hint made
# a node apply an entry that was never committed). Version 1 (no crc) is still read, and is
# rewritten as version 2 with the next term, vote or commit change.
_META_VERSION = 2
_META_VERSIONS = (1, 2)

Entry = tuple[bytes, int, int]  # (command, index, term), as pysyncobj stores them


def _meta_crc(term: int, voted_for: str | None, commit: int) -> int:
    return zlib.crc32(msgpack.packb([_META_FORMAT, term, voted_for, commit]))


def _slot_bytes(seq: int, synced_end: int) -> bytes:
    return _SLOT.pack(seq, synced_end, zlib.crc32(struct.pack("<QQ", seq, synced_end)))


def _slot_offset(seq: int) -> int:
    # Consecutive seqs alternate between the slots: each write replaces the older one.
    return _SLOT_OFFSETS[seq % 2]


def _journal_header(app_version: str, synced_end: int) -> bytes:
    fixed = _FIXED.pack(_NAME, app_version.encode()[:_VERSION_SIZE], _FORMAT_VERSION)
    header = bytearray(fixed + _CRC.pack(zlib.crc32(fixed)) + bytes(2 * _SLOT.size))
    # Both slots agree on a new file; seqs 1 and 2 keep "the highest seq wins" unambiguous.
    for seq in (1, 2):
        header[_slot_offset(seq) : _slot_offset(seq) + _SLOT.size] = _slot_bytes(seq, synced_end)
    return bytes(header)


def _encode_record(entry: Entry, seed: int) -> tuple[bytes, int]:
    """The record's bytes and its running crc (the next record's seed)."""
    command, idx, term = entry
    body = _RECORD_BODY_HEAD.pack(len(command), idx, term) + command
    crc = zlib.crc32(body, seed)
    return _CRC.pack(crc) + body, crc


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    # pwrite may write less than asked (a full disk): a record half on disk and half assumed
    # would be acknowledged as whole.
    written = os.pwrite(fd, data, offset)
    while written < len(data):
        more = os.pwrite(fd, memoryview(data)[written:], offset + written)
        if more == 0:
            raise OSError(f"pwrite wrote nothing at offset {offset + written}")
        written += more


class DurableJournal(Journal):
    """Raft log + persistent Raft state (currentTerm, votedFor, commit index hint).

    Not thread-safe: used only from the tick thread (and from the constructor before the tick
    thread starts). Every I/O failure after start-up stops the process (``EXIT_STORAGE_FAILED``).
    """

    def __init__(self, path: Path, *, app_version: str, fsync: bool = True):
        self._path = Path(path)
        self._meta_path = self._path.with_name(self._path.name + ".meta")
        self._fsync = fsync
        self._app_version = app_version
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each record in _entries
        self._crcs: list[int] = []  # running crc after each record in _entries
        self._end = _HEADER_SIZE
        self._dirty = False  # records appended or truncated since the last fdatasync
        self._header_seq = 2  # seq of the newest synced-end slot
        self._header_end = _HEADER_SIZE  # what the newest slot says (neither slot says more)
        self._header_pending = False  # a slot was written after the last fdatasync
        self._synced_since_timer = False
        self._fd = -1
        self.sync_count = 0  # how many times data was made durable (observable by tests)
        self.sync_s = Histogram(STAGE_BUCKETS_S)  # each fdatasync
        size = self._path.stat().st_size if self._path.exists() else None
        if not size:
            # A journal is created whole (temp file, rename) before the meta file is ever
            # written, and our earlier builds, which created it in place, wrote the meta file
            # only after the header was synced. So a meta file beside a missing or empty journal
            # means the journal was lost, not that it is new.
            if self._meta_path.exists():
                state = "missing" if size is None else "empty (0 bytes)"
                raise RaftStorageError(
                    f"{self._path}: journal {state} but {self._meta_path} exists: this node's "
                    f"log is lost. Refusing to start. {RESYNC_HINT}"
                )
            # Absent, or 0 bytes: a creation (by an earlier build) that a crash interrupted
            # before the header was written; nothing in it was ever acknowledged.
            self._write_new_file([])
            repair = None
        else:
            repair = self._load()
        self._meta = self._load_meta(journal_has_history=len(self._entries) > 1)
        self._meta_dirty = False
        # Written only once every check passed: a refused start leaves the files as it found
        # them, for whoever looks into why.
        if repair is not None:
            repair()
        elif self._fd < 0:
            self._fd = os.open(self._path, os.O_RDWR)

    # -- start-up ---------------------------------------------------------------------------

    def _refuse(self, offset: int, problem: str) -> RaftStorageError:
        return RaftStorageError(
            f"{self._path}: journal corrupt at byte offset {offset}: {problem}. Refusing to "
            f"start. {RESYNC_HINT}"
        )

    def _load(self) -> Callable[[], None] | None:
        """Parse the file; return what must be written to repair it, if anything."""
        raw = self._path.read_bytes()
        if raw.startswith(_V1_NAME):
            return self._read_v1(raw)
        if len(raw) < _HEADER_SIZE or not raw.startswith(_NAME + b"\0"):
            raise self._refuse(
                0, f"not a quorumbook raft journal (bad header, {len(raw)} bytes in the file)"
            )
        (fixed_crc,) = _CRC.unpack_from(raw, _FIXED_CRC_OFFSET)
        if zlib.crc32(raw[:_FIXED_CRC_OFFSET]) != fixed_crc:
            raise self._refuse(0, "the header's checksum does not match")
        _name, _app, version = _FIXED.unpack_from(raw, 0)
        if version != _FORMAT_VERSION:
            raise self._refuse(
                _NAME_SIZE + _VERSION_SIZE,
                f"unsupported journal format {version} (written by a newer build?)",
            )
        slots = []
        for slot_offset in _SLOT_OFFSETS:
            seq, end, crc = _SLOT.unpack_from(raw, slot_offset)
            if crc == zlib.crc32(struct.pack("<QQ", seq, end)):
                slots.append((seq, end))
            else:
                # A slot write torn by a power loss, or damage: the other slot still holds an
                # earlier synced end, which is never more than what was durable.
                logger.warning(
                    "%s: synced-end slot at byte %d is unreadable (an interrupted header "
                    "write, or damage); using the other slot",
                    self._path,
                    slot_offset,
                )
        if not slots:
            raise self._refuse(_SLOT_OFFSETS[0], "both synced-end slots of the header are bad")
        seq, synced_end = max(slots)
        if synced_end < _HEADER_SIZE:
            raise self._refuse(_SLOT_OFFSETS[0], f"the header's synced end {synced_end} is bad")

        view = memoryview(raw)
        offset, crc = _HEADER_SIZE, 0
        torn: str | None = None  # why the first bad record past the synced end is bad
        while offset < len(raw):
            bad = None
            if offset + _RECORD_HEAD.size > len(raw):
                bad = "the file ends inside this record's head"
            else:
                stored_crc, size, idx, term = _RECORD_HEAD.unpack_from(raw, offset)
                end = offset + _RECORD_HEAD.size + size
                if size > _MAX_RECORD_BYTES:
                    bad = f"its size field says {size} bytes, over the {_MAX_RECORD_BYTES} limit"
                elif end > len(raw):
                    bad = f"the file ends inside this record (its size field says {size} bytes)"
                elif zlib.crc32(view[offset + _CRC.size : end], crc) != stored_crc:
                    bad = "record checksum mismatch"
            if bad is not None:
                if offset < synced_end:
                    raise self._refuse(
                        offset,
                        f"{bad}, in the part of the file the header says was synced (up to "
                        f"byte {synced_end}): this record held entries the node had "
                        f"acknowledged ({len(self._entries)} entries before it are intact)",
                    )
                torn = bad
                break
            if self._entries:
                prev_idx, prev_term = self._entries[-1][1], self._entries[-1][2]
                if idx != prev_idx + 1 or term < prev_term:
                    # The checksum holds, so this is what was written: a bug, not a crash.
                    raise self._refuse(
                        offset,
                        f"record has index {idx} term {term} after index {prev_idx} term "
                        f"{prev_term}",
                    )
            if offset < synced_end < end:
                raise self._refuse(
                    offset, f"the header's synced end {synced_end} falls inside this record"
                )
            self._entries.append((bytes(view[offset + _RECORD_HEAD.size : end]), idx, term))
            self._offsets.append(offset)
            crc = stored_crc
            self._crcs.append(crc)
            offset = end
        if offset < synced_end:
            raise self._refuse(
                offset,
                f"the file ends at byte {len(raw)} but the header says it was synced up to "
                f"byte {synced_end}: the file was cut short and acknowledged entries are "
                "missing",
            )
        self._end = offset
        self._header_seq, self._header_end = seq, synced_end
        if torn is not None:
            # Nothing past the synced end was acknowledged before the synced end moved past
            # it, so a bad record there is a write that a crash interrupted: drop it and
            # everything after it (Raft allows losing unacknowledged entries).
            logger.warning(
                "%s: dropping a torn tail of %d bytes at byte offset %d (%s), past the synced "
                "end %d: a write a crash interrupted, never acknowledged; keeping %d entries",
                self._path,
                len(raw) - offset,
                offset,
                torn,
                synced_end,
                len(self._entries),
            )
        if torn is not None or offset != synced_end or len(slots) < 2:
            return lambda: self._repair_at_start(drop_tail=torn is not None)
        return None

    def _repair_at_start(self, *, drop_tail: bool) -> None:
        """Cut the torn tail and make the header cover every record we kept.

        Records kept past the synced end may never have been fdatasynced (a process crash
        leaves them in the page cache): make them durable before a slot claims them.
        """
        try:
            self._fd = os.open(self._path, os.O_RDWR)
            if drop_tail:
                os.ftruncate(self._fd, self._end)
            self._fdatasync()
            self._set_both_slots(self._end)
        except OSError as exc:
            raise RaftStorageError(f"{self._path}: repairing the journal failed: {exc}") from exc

    def _convert_v1(self) -> None:
        entries = self._entries
        self._write_new_file(entries)
        logger.info(
            "%s: converted journal format 1 (pysyncobj's, no checksums) to format 2: "
            "%d entries, log index %s",
            self._path,
            len(entries),
            f"{entries[0][1]}-{entries[-1][1]}" if entries else "none",
        )

    def _read_v1(self, raw: bytes) -> Callable[[], None]:
        # Format 1 has no checksum: it is read with the rules it always had, then converted.
        if len(raw) < _V1_HEADER_SIZE or _V1_SIZE.unpack_from(raw, _V1_FORMAT_OFFSET)[0] != 1:
            raise self._refuse(0, "a pysyncobj journal header of an unknown format")
        entries: list[Entry] = []
        offset = _V1_HEADER_SIZE
        torn_at = None
        while offset < len(raw):
            if offset + 4 > len(raw):
                torn_at = offset
                break
            (size,) = _V1_SIZE.unpack_from(raw, offset)
            end = offset + 4 + size + 4
            if size < _V1_IDS.size or size > _MAX_RECORD_BYTES or end > len(raw):
                torn_at = offset
                break
            (size_tail,) = _V1_SIZE.unpack_from(raw, end - 4)
            if size_tail != size:
                torn_at = offset
                break
            idx, term = _V1_IDS.unpack_from(raw, offset + 4)
            if entries:
                prev_idx, prev_term = entries[-1][1], entries[-1][2]
                if idx != prev_idx + 1 or term < prev_term:
                    raise self._refuse(
                        offset,
                        f"format 1 record has index {idx} term {term} after index {prev_idx} "
                        f"term {prev_term}",
                    )
            entries.append((raw[offset + 4 + _V1_IDS.size : end - 4], idx, term))
            offset = end
        if torn_at is not None:
            # Our earlier builds kept the header's last-record offset at the synced end and
            # stopped the node cleanly for an upgrade, so an unreadable record before it, in a
            # file long enough to hold it, is damage to acknowledged entries: refuse rather
            # than convert a shortened log. A header past the end of the file is what a crash
            # leaves (a cut not yet synced, records that never reached the disk): format 1
            # cannot tell that from damage, and keeps its old torn-tail rule there.
            (claimed_end,) = _V1_SIZE.unpack_from(raw, _V1_HEADER_SIZE - 4)
            if torn_at < claimed_end <= len(raw):
                raise self._refuse(
                    torn_at,
                    f"a format 1 record that does not frame, before the end its header records "
                    f"(byte {claimed_end}); not converting a log shortened by damage",
                )
            logger.warning(
                "%s: format 1 journal: dropping %d unreadable trailing bytes at byte offset %d "
                "(a write interrupted by a crash, never acknowledged; format 1 cannot tell "
                "that from damage)",
                self._path,
                len(raw) - torn_at,
                torn_at,
            )
        self._entries = entries
        return self._convert_v1

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
                    f"could let it vote twice in one term). {RESYNC_HINT}"
                )
            return blank
        raw = self._meta_path.read_bytes()
        try:
            meta = msgpack.unpackb(raw, raw=False)
            if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
                raise ValueError("not a quorumbook raft meta document")
            version = meta.get("version")
            if version not in _META_VERSIONS:
                raise ValueError(f"unsupported meta version {version!r}")
            term, voted_for, commit = meta["term"], meta["voted_for"], meta["commit"]
            if not (
                isinstance(term, int)
                and term >= 0
                and isinstance(commit, int)
                and commit >= 1
                and (voted_for is None or isinstance(voted_for, str))
            ):
                raise ValueError("bad field types")
            if version >= 2 and meta.get("crc") != _meta_crc(term, voted_for, commit):
                raise ValueError("checksum mismatch")
        except Exception as exc:
            raise RaftStorageError(
                f"{self._meta_path} is corrupt or empty ({len(raw)} bytes: {exc}); refusing to "
                "start rather than read it as a blank term and vote (that could let this node "
                f"vote twice in one term). {RESYNC_HINT}"
            ) from exc
        return {"term": term, "voted_for": voted_for, "commit": commit}

    # -- durability ---------------------------------------------------------------------------

    def _fdatasync(self) -> None:
        """Make every byte written so far durable, the synced-end slots included."""
        if self._fsync:
            started = time.monotonic()
            os.fdatasync(self._fd)
            took = time.monotonic() - started
            self.sync_s.observe(took)
            if took > SLOW_SYNC_S:  # a follower acknowledges nothing meanwhile
                logger.warning("fdatasync of the journal took %.0f ms", took * 1000)
        self._header_pending = False
        self._synced_since_timer = True
        self.sync_count += 1

    def _write_slot(self, synced_end: int) -> None:
        """Overwrite the older slot. ``synced_end`` must not exceed what is already durable."""
        self._header_seq += 1
        _pwrite_all(
            self._fd, _slot_bytes(self._header_seq, synced_end), _slot_offset(self._header_seq)
        )
        self._header_end = synced_end
        self._header_pending = True

    def _set_both_slots(self, synced_end: int) -> None:
        """Both slots say ``synced_end``, durably. One at a time, each synced before the next
        is written: a power loss tears at most the one being written, never both."""
        for _ in range(2):
            self._write_slot(synced_end)
            self._fdatasync()

    @property
    def dirty(self) -> bool:
        """Records were appended or truncated since the last `sync`."""
        return self._dirty

    def sync(self) -> None:
        """Make every appended/truncated record durable. Called before any acknowledgement."""
        if not self._dirty:
            return
        try:
            self._fdatasync()
            # The records are durable now, so the header may say so; this slot write is
            # itself durable at the next fdatasync (no second fdatasync on the hot path).
            self._write_slot(self._end)
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
            "crc": _meta_crc(self._meta["term"], self._meta["voted_for"], self._meta["commit"]),
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

    def _write_new_file(self, entries: list[Entry]) -> None:
        """Replace the journal file with one holding ``entries`` (temp file, fsync, rename,
        fsync dir): a crash leaves either the old file or the new one, whole."""
        offsets, crcs, chunks = [], [], []
        offset, crc = _HEADER_SIZE, 0
        for entry in entries:
            record, crc = _encode_record(entry, crc)
            offsets.append(offset)
            crcs.append(crc)
            chunks.append(record)
            offset += len(record)
        data = _journal_header(self._app_version, offset) + b"".join(chunks)
        try:
            if self._fsync:
                write_file_atomically(self._path, data)
            else:
                tmp = self._path.with_name(self._path.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, self._path)
            new_fd = os.open(self._path, os.O_RDWR)
        except OSError as exc:
            if self._fd < 0:  # start-up: refuse rather than exit
                raise RaftStorageError(f"{self._path}: writing the journal failed: {exc}") from exc
            fatal_storage_failure("rewriting the journal", exc)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = new_fd
        self._entries = entries
        self._offsets = offsets
        self._crcs = crcs
        self._end = offset
        self._dirty = False
        self._header_seq, self._header_end, self._header_pending = 2, offset, False
        self.sync_count += 1

    # -- pysyncobj Journal interface ----------------------------------------------------------

    def add(self, command, idx, term):
        if self._entries:
            last_idx = self._entries[-1][1]
            if idx != last_idx + 1:
                raise AssertionError(f"journal append of index {idx} after {last_idx}")
        entry = (bytes(command), int(idx), int(term))
        record, crc = _encode_record(entry, self._crcs[-1] if self._crcs else 0)
        try:
            _pwrite_all(self._fd, record, self._end)
        except OSError as exc:
            fatal_storage_failure("appending to the journal", exc)
        self._entries.append(entry)
        self._offsets.append(self._end)
        self._crcs.append(crc)
        self._end += len(record)
        self._dirty = True

    def clear(self):
        self.reset([])

    def reset(self, entries: list[Entry]) -> None:
        """Replace the whole log atomically (new file, fsync, rename, fsync dir)."""
        self._write_new_file([(bytes(c), int(i), int(t)) for c, i, t in entries])

    def deleteEntriesFrom(self, entryFrom):
        """Truncate the log from list position ``entryFrom`` (physically: ftruncate)."""
        if entryFrom >= len(self._entries):
            return
        new_end = self._offsets[entryFrom]
        try:
            if new_end < self._header_end:
                # A slot claiming bytes past the cut would make a restart refuse (the file is
                # shorter than "synced") or, once new records fill the space, vouch for bytes
                # it never saw. Lower both slots durably before the cut can reach the disk.
                # Conflicting entries are rare (a follower after a leader change): two extra
                # fdatasyncs then, none on the append path.
                self._set_both_slots(new_end)
            os.ftruncate(self._fd, new_end)
        except OSError as exc:
            fatal_storage_failure("truncating the journal", exc)
        # If the cut is lost in a crash, the old records come back past the synced end: whole,
        # they are the log as it was before the cut (never acknowledged as gone); cut into by
        # new records, the running crc rejects the first old one there.
        self._end = new_end
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]
        del self._crcs[entryFrom:]
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
            if self._header_pending:
                # The last slot write, durable: a restart then trusts the whole file.
                try:
                    self._fdatasync()
                except OSError as exc:
                    fatal_storage_failure("syncing the journal", exc)
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
        # The last sync's slot write becomes durable with the next fdatasync; under load that
        # is the next batch's. When no fdatasync has happened for a whole timer period (an
        # idle node), make it durable now, so the last batch is not left protected by its
        # checksums alone (see the format notes above). At most one fdatasync per idle spell.
        if self._header_pending and not self._synced_since_timer:
            try:
                self._fdatasync()
            except OSError as exc:
                fatal_storage_failure("syncing the journal header", exc)
        self._synced_since_timer = False
        # The commit index is a hint (Raft keeps it volatile); store it at most once a second.
        if self._meta_dirty:
            self._store_meta()

    # -- helpers for the adapter --------------------------------------------------------------

    def first_index(self) -> int:
        return self._entries[0][1]

    def last_index(self) -> int:
        return self._entries[-1][1]

    def bytes_from(self, idx: int) -> int:
        """Bytes the journal file holds from the entry at log index ``idx`` to its end."""
        pos = min(max(idx - self._entries[0][1], 0), len(self._entries))
        return self._end - (self._offsets[pos] if pos < len(self._offsets) else self._end)

    def term_at(self, idx: int) -> int | None:
        """Term of the entry at log index ``idx``, or None if the log does not hold it."""
        if not self._entries:
            return None
        pos = idx - self._entries[0][1]
        if pos < 0 or pos >= len(self._entries):
            return None
        return self._entries[pos][2]


# A replica rebuilt from a node's dump and journal (the indexer's, the archiver's) starts over
# at most this many times when the node compacts between its reading the one and the other.
REBUILD_ATTEMPTS = 5


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """The file as it is now (a new dump is a new inode, by rename), or None if absent: two
    equal identities around a read mean the node did not replace it meanwhile."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def journal_holds(path: Path, index: int) -> bool:
    """Whether the journal at `path` holds log index `index` now (a reader of its own: a read
    moves a reader on). False if it cannot be read."""
    probe = JournalReader(path)
    try:
        return bool(probe.read(index, index, 1))
    except (OSError, RaftStorageError):
        return False
    finally:
        probe.close()


class JournalGap(RaftStorageError):
    """The journal no longer holds the entry asked for (compacted into a dump, or replaced by
    an installed snapshot)."""

    def __init__(self, index: int, first: int) -> None:
        super().__init__(f"log entry {index} is no longer in the journal (it starts at {first})")
        self.index = index
        self.first = first


class JournalReader:
    """Reads the journal a running node writes, from another process (the indexer), never
    writing it: entries by index, in order, as far as the caller says they are applied.

    The node appends in place, truncates only uncommitted entries, and replaces the whole file
    (a new inode, by rename) when it compacts or installs a snapshot. The reader keeps the file
    it opened until it has read everything it needs from it (an unlinked file stays readable),
    and then moves to the new one: entries are found by index, so nothing is missed or read
    twice; if the new file starts past the next index wanted, the entry is gone (JournalGap).
    Only entries up to an index the node reports applied are read: those are committed and
    whole, never truncated.

    A reader that lags behind more than one compaction would find, once through its file, a
    newer file starting past what it still needs; `follow` (called by every `read`, and often
    by an owner that may pause between reads) opens each new file as soon as it appears and
    keeps it until the files before it are read. A compaction's file starts at or before the
    end of the one it replaces (it drops only entries the node applied), so that chain has no
    gap; a snapshot install's may start past it (JournalGap, as above). At most
    GENERATIONS_MAX files are kept open (the unlinked ones keep their disk space meanwhile).
    """

    _CHUNK = 1 << 20
    GENERATIONS_MAX = 32

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self._offset = _HEADER_SIZE
        self._crc = 0
        self._next_in_file: int | None = None  # index of the record at _offset, once seen
        self._newer: list[tuple[int, tuple[int, int]]] = []  # files that replaced it, in order

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for fd, _ino in self._newer:
            os.close(fd)
        self._newer.clear()

    def open(self) -> None:
        """Open the journal now rather than at the first read: right after reading the dump,
        this keeps the entries after it readable even if the node compacts again meanwhile.
        No journal yet (a node that never wrote one): the first read opens it."""
        if self._fd < 0:
            with contextlib.suppress(FileNotFoundError):
                self._open_current()

    def follow(self) -> None:
        """Open the journal's current file if the node replaced the newest one we have (one
        stat when it did not): it is read once the files before it are."""
        if self._fd < 0 or len(self._newer) >= self.GENERATIONS_MAX:
            return
        newest = self._newer[-1][1] if self._newer else self._ino
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return  # between an unlink and a rename: look again next time
        if (st.st_dev, st.st_ino) != newest:
            self._newer.append(self._open_file())

    def _open_current(self) -> None:
        self.close()
        self._adopt(*self._open_file())

    def _next_file(self) -> None:
        """Move to the file that replaced the one read to its end."""
        if not self._newer:
            self._open_current()
            return
        os.close(self._fd)
        self._adopt(*self._newer.pop(0))

    def _adopt(self, fd: int, ino: tuple[int, int]) -> None:
        self._fd, self._ino = fd, ino
        self._offset, self._crc, self._next_in_file = _HEADER_SIZE, 0, None

    def _open_file(self) -> tuple[int, tuple[int, int]]:
        """The journal's current file, opened and its header checked."""
        fd = os.open(self._path, os.O_RDONLY)
        try:
            header = os.pread(fd, _HEADER_SIZE, 0)
            if len(header) < _HEADER_SIZE or not header.startswith(_NAME + b"\0"):
                raise RaftStorageError(f"{self._path}: not a quorumbook raft journal")
            if (
                zlib.crc32(header[:_FIXED_CRC_OFFSET])
                != _CRC.unpack_from(header, _FIXED_CRC_OFFSET)[0]
            ):
                raise RaftStorageError(
                    f"{self._path}: the journal header's checksum does not match"
                )
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, (st.st_dev, st.st_ino)

    def _replaced(self) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False  # between an unlink and a rename: look again next time
        return (st.st_dev, st.st_ino) != self._ino

    def read(self, first: int, last: int, max_entries: int = 10_000) -> list[Entry]:
        """Entries `first`..`last` (at most `max_entries`; fewer if the file does not hold
        them yet), in order. JournalGap if `first` is no longer in the journal."""
        if self._fd < 0:
            self._open_current()
        self.follow()
        out: list[Entry] = []
        want = first
        while want <= last and len(out) < max_entries:
            got = self._read_from_file(want, last, max_entries - len(out), out)
            want += got
            if want > last or len(out) >= max_entries:
                break
            if not self._newer and not self._replaced():
                break  # the file holds no more yet
            self._next_file()
            self._peek_first(want)
        return out

    def check_starts_by(self, index: int) -> None:
        """JournalGap if the journal `open` opened starts after log index `index`: entries
        from there on cannot all be read (nothing to check if there was no journal yet)."""
        if self._fd >= 0:
            self._peek_first(index)

    def _peek_first(self, want: int) -> None:
        """In a file just opened: the first record's index must not be past `want`."""
        head = os.pread(self._fd, _RECORD_HEAD.size, _HEADER_SIZE)
        if len(head) < _RECORD_HEAD.size:
            return  # empty so far
        _crc, _size, idx, _term = _RECORD_HEAD.unpack(head)
        if idx > want:
            raise JournalGap(want, idx)

    def _read_from_file(self, want: int, last: int, room: int, out: list[Entry]) -> int:
        """Append entries `want`.. (to `last`, at most `room`) from the open file; return how
        many. Records before `want` are stepped over."""
        count = 0
        while count < room:
            raw = os.pread(self._fd, self._CHUNK, self._offset)
            view = memoryview(raw)
            pos = 0
            progressed = False
            while count < room and pos + _RECORD_HEAD.size <= len(raw):
                stored_crc, size, idx, term = _RECORD_HEAD.unpack_from(raw, pos)
                end = pos + _RECORD_HEAD.size + size
                if size > _MAX_RECORD_BYTES:
                    break  # a torn tail past what the node applied: not ours to read
                if end > len(raw):
                    if _RECORD_HEAD.size + size > self._CHUNK and pos == 0:
                        raw = os.pread(self._fd, _RECORD_HEAD.size + size, self._offset)
                        view = memoryview(raw)
                        if end > len(raw):
                            break
                    else:
                        break
                if idx > want + count:
                    raise JournalGap(want + count, idx)
                if idx > last:
                    self._offset += pos
                    return count
                if zlib.crc32(view[pos + _CRC.size : end], self._crc) != stored_crc:
                    if idx <= last:
                        raise RaftStorageError(
                            f"{self._path}: log entry {idx} (byte {self._offset + pos}) fails its "
                            "checksum although the node applied it"
                        )
                    break
                if idx == want + count:
                    out.append((bytes(view[pos + _RECORD_HEAD.size : end]), idx, term))
                    count += 1
                self._crc = stored_crc
                pos = end
                progressed = True
            self._offset += pos
            if not progressed or pos == 0 or len(raw) < self._CHUNK:
                return count
        return count


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


def decode_dump(
    raw: bytes, *, source: str, views: bool = False
) -> tuple[DumpHeader, bytes | memoryview]:
    """Parse and verify a dump; raise ``RaftStorageError`` on anything unexpected. `views`:
    the machine's snapshot is a view of `raw`, not a copy (views.py; for a caller
    that only decodes it: a large state is tens of MB)."""
    unpack = views_unpack if views else functools.partial(msgpack.unpackb, raw=False)
    try:
        outer = unpack(raw)
        if not isinstance(outer, dict) or outer.get("format") != _DUMP_FORMAT:
            raise ValueError("not a quorumbook raft dump")
        if outer.get("version") != _DUMP_VERSION:
            raise ValueError(f"unsupported dump version {outer.get('version')!r}")
        body = outer["body"]
        if hashlib.sha256(body).digest() != outer["sha256"]:
            raise ValueError("checksum mismatch")
        doc = unpack(body)

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
        if not isinstance(machine, bytes | memoryview):
            raise ValueError("machine snapshot is not bytes")
    except Exception as exc:
        raise RaftStorageError(f"{source}: unreadable raft dump ({exc})") from exc
    return header, machine


def read_dump(path: Path) -> tuple[DumpHeader, bytes]:
    return decode_dump(Path(path).read_bytes(), source=str(path))
