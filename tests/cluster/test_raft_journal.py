"""The journal's integrity rules (ADR 0002, fix 4; the runbook is docs/operating/raft-storage.md).

Everything before the synced end the journal's header records must parse, or the node refuses
to start naming the file and byte offset; only bytes past it (a write a crash interrupted,
never acknowledged) may be dropped, with a warning. The exhaustive tests damage every byte and
cut at every length of a small journal and open it as the node does at start-up: each must
either start with every synced entry or refuse. On the format 1 code (no checksums) 586 of
1028 such cases started with fewer entries, or with altered ones, and no error.

Offsets of records are taken from the file's size as it grows, so the tests do not depend on
the record layout, except where a test writes a format 1 file by hand.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest

from cluster.raft.storage import DurableJournal, RaftStorageError

APP_VERSION = "0.3.17"
# Synced in three batches, as the node syncs: the no-op entry at start-up, then two more.
SYNCED = [
    (b"", 1, 0),
    (b"A2", 2, 1),
    (b"order-3", 3, 1),
    (b"\x00\x01\x02", 4, 2),
    (b"X" * 20, 5, 2),
    (b"last-synced", 6, 3),
]
BATCHES = (SYNCED[:1], SYNCED[1:4], SYNCED[4:])
UNSYNCED = [(b"U7", 7, 3), (b"unsynced-8", 8, 3)]


def open_journal(path: Path, fsync: bool = False) -> DurableJournal:
    return DurableJournal(path, app_version=APP_VERSION, fsync=fsync)


def entries_in(path: Path) -> list:
    journal = open_journal(path)
    try:
        return list(journal[:])
    finally:
        journal.close()


def write_journal(path: Path, *, unsynced: list) -> tuple[bytes, list[int]]:
    """The file as a crash would leave it after ``SYNCED`` was synced and ``unsynced`` was
    appended (a closed journal when ``unsynced`` is empty), and each record's offset."""
    journal = open_journal(path)
    journal.setCurrentTerm(3, None)  # the meta file exists, as on any node that has history
    offsets = []
    for batch in BATCHES:
        for entry in batch:
            offsets.append(path.stat().st_size)
            journal.add(*entry)
        journal.sync()
    for entry in unsynced:
        offsets.append(path.stat().st_size)
        journal.add(*entry)
    raw = path.read_bytes()  # what the disk holds if the process dies now
    journal.close()
    return raw, offsets


def start(path: Path) -> tuple[str, object]:
    """Open the journal as the node does at start-up: ("refused", message) or ("loaded",
    entries). Any other exception is reported, not raised: it is a failure of its own."""
    try:
        journal = open_journal(path)
    except RaftStorageError as exc:
        return "refused", str(exc)
    except Exception as exc:  # counted as a failure by problem_with
        return "crashed", repr(exc)
    try:
        return "loaded", list(journal[:])
    finally:
        journal.close()


def problem_with(path: Path, outcome, written: list) -> str | None:
    kind, value = outcome
    if kind == "refused":
        return None if str(path) in value else f"the refusal does not name the file: {value}"
    if kind == "crashed":
        return f"failed with {value} instead of a clear refusal"
    if len(value) < len(SYNCED):
        return f"started with {len(value)} entries; {len(SYNCED)} were synced"
    if value != written[: len(value)]:
        return "started with entries that were never written"
    return None


def damaged_copies(raw: bytes):
    for pos in range(len(raw)):
        yield f"byte {pos} flipped", raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1 :]
    for length in range(len(raw)):
        yield f"cut to {length} bytes", raw[:length]


def failures_of_every_damage(tmp_path: Path, unsynced: list) -> tuple[int, list[str]]:
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    path = data_dir / "raft.journal"
    raw, _ = write_journal(path, unsynced=unsynced)
    written = SYNCED + unsynced
    failures, cases = [], 0
    for what, damaged in damaged_copies(raw):
        cases += 1
        path.write_bytes(damaged)
        outcome = start(path)
        problem = problem_with(path, outcome, written)
        if outcome[0] == "refused" and path.read_bytes() != damaged:
            problem = "a refused start changed the file (the evidence)"
        if outcome[0] == "loaded" and not problem and start(path) != outcome:
            # The restart reads what the first start repaired (a torn tail cut, the header
            # rewritten): it must start with the same log.
            problem = "a restart did not start with the same log"
        if problem:
            failures.append(f"{what}: {problem}")
    return cases, failures


def test_every_damage_to_a_synced_journal_starts_with_all_of_it_or_refuses(tmp_path, caplog):
    """A closed journal: every byte was synced and the header says so. Any flipped byte or
    cut must be refused (a flipped byte of a header slot may fall back to the other slot and
    still load everything). The old format dropped the rest of the log at a damaged size
    field (the issue's entries 2-6) and read damaged commands as data: 287 of 454 cases."""
    caplog.set_level(logging.ERROR)  # hundreds of expected warnings
    cases, failures = failures_of_every_damage(tmp_path, unsynced=[])
    assert cases > 400
    assert not failures, f"{len(failures)} of {cases} damaged journals: {failures[:8]}"


def test_every_damage_after_a_crash_keeps_every_synced_entry(tmp_path, caplog):
    """A crash after two entries were appended but not synced. Damage or a cut in the synced
    part is refused; in the unsynced tail it may cost those two entries (never acknowledged)
    but never a synced one, and nothing is read that was not written (old format: 299 of
    574 cases failed)."""
    caplog.set_level(logging.ERROR)
    cases, failures = failures_of_every_damage(tmp_path, unsynced=UNSYNCED)
    assert cases > 500
    assert not failures, f"{len(failures)} of {cases} damaged journals: {failures[:8]}"


def test_a_damaged_record_head_refuses_instead_of_dropping_later_entries(tmp_path):
    """The issue's case: the size field of record 2 was damaged and the old format dropped
    entries 2-6 (committed, acknowledged) with only a warning."""
    path = tmp_path / "raft.journal"
    raw, offsets = write_journal(path, unsynced=[])
    at = offsets[1]
    path.write_bytes(raw[:at] + b"\xff" * 8 + raw[at + 8 :])  # the head, size field included
    with pytest.raises(RaftStorageError) as refused:
        open_journal(path)
    assert f"{path}: journal corrupt at byte offset {at}:" in str(refused.value)
    assert "move its data directory aside" in str(refused.value)


def test_a_zeroed_sector_inside_a_synced_record_is_refused(tmp_path):
    """The issue's other case: a zeroed page in the middle of a record framed as before was
    accepted as data (and, since entries the follower holds in the same term are skipped,
    never rewritten)."""
    path = tmp_path / "raft.journal"
    journal = open_journal(path)
    journal.setCurrentTerm(1, None)
    offsets = []
    for idx in (1, 2, 3):
        offsets.append(path.stat().st_size)
        journal.add(os.urandom(3000), idx, 1)
    journal.close()
    raw = bytearray(path.read_bytes())
    raw[offsets[1] + 1024 : offsets[1] + 1536] = bytes(512)
    path.write_bytes(bytes(raw))
    with pytest.raises(RaftStorageError, match=f"journal corrupt at byte offset {offsets[1]}:"):
        open_journal(path)


@pytest.mark.parametrize("tear", ["partial record", "bad checksum", "zeroed tail"])
def test_a_torn_write_past_the_synced_end_is_dropped_with_a_warning(tmp_path, caplog, tear):
    path = tmp_path / "raft.journal"
    raw, offsets = write_journal(path, unsynced=UNSYNCED)
    last = offsets[-1]  # record 8, appended after the last sync
    if tear == "partial record":
        damaged = raw[:-3]
    elif tear == "bad checksum":
        damaged = raw[:-1] + bytes([raw[-1] ^ 0x01])
    else:  # its pages never reached the disk, the file's length did
        damaged = raw[:last] + bytes(len(raw) - last)
    path.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="cluster.raft.storage"):
        journal = open_journal(path, fsync=True)
    assert journal[:] == SYNCED + UNSYNCED[:1]
    journal.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (
        f"dropping a torn tail of {len(damaged) - last} bytes at byte offset {last}"
        in (warnings[0])
    )
    assert path.stat().st_size == last

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.raft.storage"):
        journal = open_journal(path, fsync=True)  # the repair holds: nothing left to drop
    assert journal[:] == SYNCED + UNSYNCED[:1]
    journal.close()
    assert not caplog.records


def test_journal_drops_a_torn_tail_and_refuses_corruption(tmp_path):
    """Moved from test_raft_fixes.py. A torn tail is now a write past the synced end; a cut
    inside the synced part, which the old format also dropped, is refused."""
    path = tmp_path / "raft.journal"
    journal = open_journal(path)
    journal.setCurrentTerm(1, None)
    for idx in range(1, 5):
        journal.add(b"\x01", idx, 1)
    journal.sync()
    journal.add(b"\x01", 5, 1)
    raw = path.read_bytes()
    journal.close()
    path.write_bytes(raw[:-3])  # a crash in the middle of the last, unsynced, write
    journal = open_journal(path)
    assert [e[1] for e in journal[:]] == [1, 2, 3, 4]
    journal.close()
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])  # the same cut, now into a synced record
    with pytest.raises(RaftStorageError, match=r"the file ends inside this record|was cut short"):
        open_journal(path)
    data = bytearray(raw)
    data[-9:-1] = (99).to_bytes(8, "little")  # the last record's term field claims term 99
    path.write_bytes(bytes(data))
    with pytest.raises(RaftStorageError, match="corrupt"):
        open_journal(path)


def test_intact_records_out_of_order_are_refused(tmp_path):
    """Checksums hold, so this is what was written (a bug, not a crash): never trust it."""
    path = tmp_path / "raft.journal"
    journal = open_journal(path)
    journal.setCurrentTerm(2, None)
    journal.add(b"", 1, 0)
    journal.add(b"a", 2, 2)
    journal.add(b"b", 3, 1)  # the term goes back
    journal.close()
    with pytest.raises(RaftStorageError, match="index 3 term 1 after index 2 term 2"):
        open_journal(path)


def test_an_interrupted_truncation_never_yields_a_log_that_was_not_written(tmp_path):
    """A follower deletes entries 4-6 (term 3, from a deposed leader) and appends 4', 5'
    (term 2, the new leader's), then crashes before syncing. Whatever part of the cut and the
    new writes reached the disk, the restart reads either log, never a splice: with the cut
    lost and the new records written over the old ones, old record 6 still sits where 6 was,
    right after 5' and in a later term. Without a running checksum it would be read back, a
    log in which 6 (term 3) follows 4', 5' (term 2), matching no leader's."""
    path = tmp_path / "raft.journal"
    journal = open_journal(path)
    journal.setCurrentTerm(3, None)
    old = [(b"", 1, 0), (b"a2", 2, 1), (b"a3", 3, 1), (b"o4", 4, 3), (b"o5", 5, 3), (b"o6", 6, 3)]
    for entry in old:
        journal.add(*entry)
    journal.sync()
    raw_old = path.read_bytes()
    journal.deleteEntriesFrom(3)
    raw_cut = path.read_bytes()
    new = [(b"n4", 4, 2), (b"n5", 5, 2)]  # the same sizes as o4, o5
    for entry in new:
        journal.add(*entry)
    raw_new = path.read_bytes()
    journal.close()

    images = {
        "the cut reached the disk": (raw_cut, old[:3]),
        "the cut was lost": (raw_cut + raw_old[len(raw_cut) :], old),
        "the cut was lost, the new records were written": (
            raw_new + raw_old[len(raw_new) :],
            old[:3] + new,
        ),
    }
    for what, (image, expected) in images.items():
        path.write_bytes(image)
        journal = open_journal(path)
        assert journal[:] == expected, what
        journal.close()


def test_the_synced_end_is_written_only_over_durable_bytes(tmp_path, monkeypatch):
    """The order every rule above rests on. A sync is one fdatasync, then the header's slot
    (durable with the next fdatasync): a slot written first could reach the disk before the
    records it vouches for. A cut into synced entries first lowers both slots, each made
    durable before the next is written (else a restart finds the file shorter than the
    header's claim, or a torn slot write spoils both); a cut of unsynced entries needs no
    sync."""
    events = []
    path = tmp_path / "raft.journal"
    journal = open_journal(path, fsync=True)
    journal.setCurrentTerm(1, None)
    header_size = path.stat().st_size  # an empty journal is its header
    real_fdatasync, real_ftruncate, real_pwrite = os.fdatasync, os.ftruncate, os.pwrite

    def pwrite(fd, data, offset):
        if offset < header_size:
            events.append("slot")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (events.append("fdatasync"), real_fdatasync(fd))
    )
    monkeypatch.setattr(
        os, "ftruncate", lambda fd, n: (events.append("ftruncate"), real_ftruncate(fd, n))
    )
    for idx in range(1, 5):
        journal.add(b"x", idx, 1)
    assert events == []
    journal.sync()
    assert events == ["fdatasync", "slot"]
    journal.add(b"y", 5, 1)
    events.clear()
    journal.deleteEntriesFrom(4)  # entry 5: never synced
    assert events == ["ftruncate"]
    events.clear()
    journal.deleteEntriesFrom(2)  # entries 3-4: synced
    assert events == ["slot", "fdatasync", "slot", "fdatasync", "ftruncate"]
    journal.close()
    assert [e[1] for e in entries_in(path)] == [1, 2]


def test_an_idle_journal_makes_its_synced_end_durable_within_two_timer_calls(tmp_path, monkeypatch):
    """The synced end written after a sync's fdatasync becomes durable with the next one. On
    a busy node that is the next batch's; on an idle node the one-second timer does it once,
    so the last batch is not left to its checksums alone."""
    calls = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real_fdatasync(fd)))
    path = tmp_path / "raft.journal"
    journal = open_journal(path, fsync=True)
    journal.add(b"", 1, 0)
    journal.sync()
    calls.clear()
    journal.onOneSecondTimer()  # a sync happened during this period: more may follow
    assert calls == []
    journal.onOneSecondTimer()  # a whole period without one: idle
    assert len(calls) == 1
    journal.onOneSecondTimer()
    journal.onOneSecondTimer()
    assert len(calls) == 1  # nothing pending any more
    journal.add(b"a", 2, 1)
    journal.sync()
    calls.clear()
    journal.close()  # the last synced end, durable before the file is closed
    assert len(calls) == 1


def _format_1_journal(entries) -> bytes:
    """pysyncobj's layout (journal.py 180-185), as our earlier builds wrote it."""
    header = b"PYSYNCOBJ".ljust(24, b"\0") + b"0.3.17".ljust(8, b"\0")
    records = b""
    for command, idx, term in entries:
        body = struct.pack("<QQ", idx, term) + command
        records += struct.pack("<I", len(body)) + body + struct.pack("<I", len(body))
    return header + struct.pack("<II", 1, 40 + len(records)) + records


@pytest.mark.parametrize("torn", [False, True])
def test_a_format_1_journal_is_converted_at_start_up(tmp_path, caplog, torn):
    path = tmp_path / "raft.journal"
    write_journal(path, unsynced=[])  # for its meta file
    raw = _format_1_journal(SYNCED)
    path.write_bytes(raw[:-3] if torn else raw)
    old_inode = tmp_path / "journal-before-conversion"
    os.link(path, old_inode)
    expected = SYNCED[:-1] if torn else SYNCED  # format 1 keeps its own torn-tail rule

    with caplog.at_level(logging.INFO, logger="cluster.raft.storage"):
        journal = open_journal(path)
    assert journal[:] == expected
    journal.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "converted journal format 1" in m and f"{len(expected)} entries" in m for m in messages
    )
    assert any("dropping 3" in m for m in messages) == torn
    assert path.read_bytes()[:23] == b"quorumbook-raft-journal"
    assert old_inode.read_bytes() == (raw[:-3] if torn else raw)  # renamed over, not rewritten

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cluster.raft.storage"):
        journal = open_journal(path)
    assert journal[:] == expected
    journal.close()
    assert not caplog.records  # converted once
    # From now on the checksums guard it: damage that format 1 read as data is refused.
    converted = bytearray(path.read_bytes())
    converted[-1] ^= 0xFF
    path.write_bytes(bytes(converted))
    with pytest.raises(RaftStorageError, match="checksum mismatch"):
        open_journal(path)


def test_a_damaged_format_1_journal_is_refused_not_converted_short(tmp_path):
    """Format 1 has no checksum, but our earlier builds kept its header's last-record offset
    at the synced end: a record that does not frame before it, in a file that long, is damage
    (the issue's size field of record 2), not a torn write."""
    path = tmp_path / "raft.journal"
    write_journal(path, unsynced=[])  # for its meta file
    raw = bytearray(_format_1_journal(SYNCED))
    record_2 = 40 + 4 + 16 + 4  # after the header and record 1 (an empty command)
    raw[record_2 : record_2 + 4] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(raw))
    with pytest.raises(RaftStorageError, match=f"journal corrupt at byte offset {record_2}:"):
        open_journal(path)
    assert path.read_bytes() == bytes(raw)  # not converted


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_lost_journal_beside_its_meta_file_is_refused(tmp_path, state):
    """The old code took a missing or 0-byte journal for a new one and started with an empty
    log, keeping its term: every entry it had acknowledged, silently gone."""
    path = tmp_path / "raft.journal"
    write_journal(path, unsynced=[])
    if state == "missing":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(RaftStorageError, match=f"journal {state}.*meta exists"):
        open_journal(path)


def test_journal_whose_creation_was_interrupted_counts_as_new(tmp_path):
    """Moved from test_raft_fixes.py. No meta file yet: nothing was ever acknowledged."""
    (tmp_path / "raft.journal").write_bytes(b"")
    journal = open_journal(tmp_path / "raft.journal")
    assert len(journal) == 0
    journal.close()


def test_compaction_and_reset_write_a_journal_that_reads_back(tmp_path):
    path = tmp_path / "raft.journal"
    journal = open_journal(path)
    journal.setCurrentTerm(3, None)
    for entry in SYNCED:
        journal.add(*entry)
    journal.sync()
    journal.deleteEntriesTo(3)  # compaction: keep entries 4-6
    journal.add(*UNSYNCED[0])
    journal.close()
    assert entries_in(path) == SYNCED[3:] + UNSYNCED[:1]
    journal = open_journal(path)
    journal.reset([(b"p", 9, 4), (b"q", 10, 4)])  # a snapshot install
    journal.close()
    assert entries_in(path) == [(b"p", 9, 4), (b"q", 10, 4)]


def test_seeded_members_share_one_dump_until_each_writes_its_own(tmp_path: Path) -> None:
    """A restore seeds every member's data directory with the same dump: written once and
    hard-linked; a node that later writes a dump (a new file renamed over its own) leaves
    the others' as they were."""
    from cluster.raft import seed_data_dirs
    from cluster.raft.storage import read_dump, write_file_atomically

    dirs = [tmp_path / f"n{i}" for i in range(3)]
    seed_data_dirs(dirs, b"state", 7, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    stats = [(d / "raft.dump").stat() for d in dirs]
    assert len({s.st_ino for s in stats}) == 1 and stats[0].st_nlink == 3
    header, blob = read_dump(dirs[0] / "raft.dump")
    assert (header.index, blob) == (7, b"state")
    write_file_atomically(dirs[0] / "raft.dump", b"newer")
    assert (dirs[0] / "raft.dump").read_bytes() == b"newer"
    for d in dirs[1:]:
        assert read_dump(d / "raft.dump")[1] == b"state"
        assert (d / "raft.dump").stat().st_nlink == 2
