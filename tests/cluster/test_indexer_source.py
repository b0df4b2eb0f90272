"""The indexer's LogSource on a real journal and dump: the events it emits are the node's, from
any checkpoint the log still holds; a compacted log raises EventsGone, and a checkpoint moved
past the gap (a resync) is followed from the node's dump."""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path

import pytest

from cluster import indexer_source
from cluster.batch import KIND_COMMAND, encode_batch
from cluster.indexer_source import LogSource
from cluster.machine import ExchangeMachine
from cluster.raft import HELD_DUMP
from cluster.raft.storage import (
    DumpHeader,
    DurableJournal,
    JournalReader,
    encode_dump,
    write_file_atomically,
)
from indexer.events import Checkpoint, EventsGone
from indexer.port import NodeView

ENTRIES = 10


class FakeNode:
    def __init__(self, applied_index: int) -> None:
        self.applied_index = applied_index

    def view(self) -> NodeView:
        return NodeView(role="follower", applied_index=self.applied_index)

    async def changed(self, timeout_s: float) -> None:
        await asyncio.sleep(min(timeout_s, 0.01))


def deposit(i: int) -> dict:
    return {
        "op": "deposit",
        "account": f"a{i % 3}",
        "asset": "USD",
        "amount": 10 + i,
        "ref": f"d{i}",
    }


def command_of(i: int) -> bytes:
    """A log entry's command as the adapter writes it: one batch with one deposit."""
    payload = encode_batch(1000 + i, [[KIND_COMMAND, deposit(i)]])
    return bytes([0]) + pickle.dumps((0, (payload,)))


def node_state(upto: int) -> ExchangeMachine:
    machine = ExchangeMachine()
    for i in range(1, upto + 1):
        machine.apply(encode_batch(1000 + i, [[KIND_COMMAND, deposit(i)]]))
    return machine


def write_journal(data_dir: Path, first: int, last: int) -> None:
    """The journal holding entries `first`..`last` (a new file, as at a compaction or a
    snapshot install)."""
    journal = DurableJournal(data_dir / "raft.journal", app_version="test", fsync=False)
    journal.setCurrentTerm(1, None)  # as a node stores its term before appending in it
    journal.reset([(command_of(i), i, 1) for i in range(first, last + 1)])
    journal.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_journal(tmp_path, 1, ENTRIES)
    return tmp_path


def compact(data_dir: Path, upto: int, *, keep_from: int | None = None) -> Checkpoint:
    """What a node does at a snapshot (or when it installs the leader's): a dump at `upto`,
    and a new journal from `upto` + 1. Returns the checkpoint a resync from that dump writes.
    `keep_from`: under a log hold, the journal is kept from there instead (a dump at
    `keep_from` - 1 kept as the held dump, or none when it is 1: the empty state)."""
    write_dump(data_dir / "raft.dump", upto)
    if keep_from is not None and keep_from > 1:
        write_dump(data_dir / HELD_DUMP, keep_from - 1)
    write_journal(data_dir, keep_from or upto + 1, ENTRIES)
    return checkpoint_at(upto)


def write_dump(path: Path, upto: int) -> None:
    header = DumpHeader(
        last=(command_of(upto), upto, 1), prev=(command_of(upto - 1), upto - 1, 1), cluster=()
    )
    write_file_atomically(path, encode_dump(header, node_state(upto).snapshot()))


def checkpoint_at(index: int) -> Checkpoint:
    """The checkpoint of an indexer that wrote entries 1..`index`."""
    ex = node_state(index).exchange
    return Checkpoint(seq=ex.seq, cmd_index=ex.cmd_index, raft_index=index)


def read_all(source: LogSource) -> list:
    out = []
    while entries := asyncio.run(source.read(1000, timeout_s=0.05)):
        out.extend(entries)
    return out


def read_once(source: LogSource) -> list:
    return asyncio.run(source.read(1000, timeout_s=0.05))


def test_the_events_are_the_nodes_from_any_checkpoint(data_dir: Path) -> None:
    expected = node_state(ENTRIES).exchange.seq
    source = LogSource(data_dir, FakeNode(ENTRIES))
    asyncio.run(source.seek(Checkpoint()))
    entries = read_all(source)
    assert [e.raft_index for e in entries] == list(range(1, ENTRIES + 1))
    seqs = [event["seq"] for e in entries for event in e.events]
    assert seqs == list(range(1, expected + 1))
    # From a checkpoint in the middle (a takeover): the rest, nothing twice.
    middle = entries[3]
    resumed = LogSource(data_dir, FakeNode(ENTRIES))
    asyncio.run(
        resumed.seek(
            Checkpoint(seq=middle.events[-1]["seq"], cmd_index=middle.cmd_index, raft_index=4)
        )
    )
    assert [e.events for e in read_all(resumed)] == [e.events for e in entries[4:]]


def test_a_checkpoint_that_does_not_match_the_replica_is_refused(data_dir: Path) -> None:
    source = LogSource(data_dir, FakeNode(ENTRIES))
    with pytest.raises(EventsGone, match="the checkpoint at"):
        asyncio.run(source.seek(Checkpoint(seq=1, cmd_index=1, raft_index=4)))


def test_a_compacted_log_raises_the_alarm_and_a_resync_checkpoint_is_followed(
    data_dir: Path,
) -> None:
    resync = compact(data_dir, 6)
    source = LogSource(data_dir, FakeNode(ENTRIES))
    with pytest.raises(EventsGone, match="snapshot is at seq"):
        asyncio.run(source.seek(Checkpoint()))
    asyncio.run(source.seek(resync))
    assert [e.raft_index for e in read_all(source)] == [7, 8, 9, 10]


def test_a_source_cut_off_mid_stream_follows_a_resync_from_the_dump(tmp_path: Path) -> None:
    """The source read entries 1..3, all its journal file held; the node then replaced the
    journal with a snapshot at 6 (installed from the leader): reading raises the alarm, and
    once a resync moved the checkpoint to the dump, the source starts over there."""
    write_journal(tmp_path, 1, 3)
    node = FakeNode(3)
    source = LogSource(tmp_path, node)
    asyncio.run(source.seek(Checkpoint()))
    assert [e.raft_index for e in read_all(source)] == [1, 2, 3]
    resync = compact(tmp_path, 6)
    node.applied_index = ENTRIES
    with pytest.raises(EventsGone, match="log entry 4 is no longer in the journal"):
        read_all(source)
    with pytest.raises(EventsGone):  # still gone from where it was
        asyncio.run(source.seek(Checkpoint(seq=3, cmd_index=3, raft_index=3)))
    asyncio.run(source.seek(resync))
    assert [e.raft_index for e in read_all(source)] == [7, 8, 9, 10]


def test_a_dump_past_the_checkpoint_is_decoded_once(data_dir: Path, monkeypatch) -> None:
    """A replica in the alarm retries at every checkpoint move: the same dump, still past the
    checkpoint, is not decoded again (a large book takes seconds to restore)."""
    compact(data_dir, 6)
    decoded = []
    real = indexer_source.read_dump
    monkeypatch.setattr(indexer_source, "read_dump", lambda p: decoded.append(p) or real(p))
    source = LogSource(data_dir, FakeNode(ENTRIES))
    for seq in (0, 1, 2):
        with pytest.raises(EventsGone, match="snapshot is at seq"):
            asyncio.run(source.seek(Checkpoint(seq=seq, cmd_index=seq, raft_index=seq)))
    assert len(decoded) == 1
    resync = compact(data_dir, 8)  # a new dump: read again
    asyncio.run(source.seek(resync))
    assert len(decoded) == 2
    assert [e.raft_index for e in read_all(source)] == [9, 10]


def test_a_source_behind_two_compactions_reads_every_entry(tmp_path: Path) -> None:
    """The node compacted twice while the streamer was writing (PostgreSQL slow): the journal
    file after the one being read starts past what the source still needs. Following the
    files as they appear keeps every entry; without it, the alarm."""
    for follow in (False, True):
        data_dir = tmp_path / f"follow-{follow}"
        data_dir.mkdir()
        write_journal(data_dir, 1, 4)
        node = FakeNode(2)
        source = LogSource(data_dir, node)
        asyncio.run(source.seek(Checkpoint()))
        assert [e.raft_index for e in read_all(source)] == [1, 2]
        write_journal(data_dir, 4, 6)  # a compaction at 3: the entries after it, and two more
        if follow:
            source.follow()
        write_journal(data_dir, 7, ENTRIES)  # and at 6
        if follow:
            source.follow()
        node.applied_index = ENTRIES
        if follow:
            entries = read_all(source)
            assert [e.raft_index for e in entries] == list(range(3, ENTRIES + 1))
            assert entries[-1].events[-1]["seq"] == node_state(ENTRIES).exchange.seq
        else:
            with pytest.raises(EventsGone, match="log entry 5 is no longer in the journal"):
                read_all(source)


def test_entries_whose_write_failed_are_read_again_after_the_node_compacted(
    data_dir: Path,
) -> None:
    """The source read entries 1..4 and the write failed (Kafka down); the node has compacted
    at 6 meanwhile, so its dump is past the checkpoint. A seek back to the checkpoint returns
    the same entries again, then the rest, instead of raising the alarm."""
    node = FakeNode(4)
    source = LogSource(data_dir, node)
    asyncio.run(source.seek(Checkpoint()))
    first = read_all(source)
    assert [e.raft_index for e in first] == [1, 2, 3, 4]
    compact(data_dir, 6)
    node.applied_index = ENTRIES
    asyncio.run(source.seek(Checkpoint()))
    assert read_once(source) == first
    # A write of part of them went through (then the connection broke): from its boundary.
    second = first[1]
    asyncio.run(
        source.seek(
            Checkpoint(seq=second.events[-1]["seq"], cmd_index=second.cmd_index, raft_index=2)
        )
    )
    assert read_once(source) == first[2:]
    assert [e.raft_index for e in read_all(source)] == list(range(5, ENTRIES + 1))
    # Not a boundary of what it read: the replica cannot go back; the dump is past it: alarm.
    with pytest.raises(EventsGone, match="snapshot is at seq"):
        asyncio.run(source.seek(Checkpoint(seq=1, cmd_index=1, raft_index=1)))


def test_a_reader_keeps_at_most_its_bound_of_journal_files_and_closes_them(
    tmp_path: Path,
) -> None:
    """A streamer stuck for long while the node compacts on: the files it keeps are bounded
    (past the bound the gap is found and alarmed as before), and all are closed with it."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    write_journal(tmp_path, 1, 2)
    before = open_fds()
    reader = JournalReader(tmp_path / "raft.journal")
    reader.open()
    for i in range(JournalReader.GENERATIONS_MAX + 8):
        write_journal(tmp_path, 3 + i, 3 + i)
        reader.follow()
    assert open_fds() - before == 1 + JournalReader.GENERATIONS_MAX
    reader.close()
    assert open_fds() == before


def test_the_state_a_log_hold_kept_serves_a_checkpoint_before_the_dump(data_dir: Path) -> None:
    """The node compacted at 8 while the indexer's checkpoint was at 4 (its database down, its
    process restarted): the hold kept the dump at 3 and the journal from 4, so a new source
    goes on from the checkpoint; a checkpoint before the held dump is gone."""
    uncompacted = data_dir.parent / "uncompacted"
    uncompacted.mkdir()
    write_journal(uncompacted, 1, ENTRIES)
    expected = LogSource(uncompacted, FakeNode(ENTRIES))
    asyncio.run(expected.seek(checkpoint_at(4)))
    compact(data_dir, 8, keep_from=4)
    source = LogSource(data_dir, FakeNode(ENTRIES))
    asyncio.run(source.seek(checkpoint_at(4)))
    assert read_all(source) == read_all(expected)
    with pytest.raises(EventsGone, match="snapshot is at seq"):
        asyncio.run(LogSource(data_dir, FakeNode(ENTRIES)).seek(checkpoint_at(2)))


def test_a_hold_from_the_empty_state_serves_any_checkpoint(data_dir: Path) -> None:
    """A hold whose floor is the empty state (the indexer never wrote; the journal still
    starts at index 1) keeps no held dump: the source starts from the empty state."""
    compact(data_dir, 8, keep_from=1)
    source = LogSource(data_dir, FakeNode(ENTRIES))
    asyncio.run(source.seek(Checkpoint()))
    assert [e.raft_index for e in read_all(source)] == list(range(1, ENTRIES + 1))


def test_an_empty_journal_is_not_taken_for_the_empty_state(data_dir: Path) -> None:
    """A dump past the checkpoint and a journal that holds nothing yet (everything is in the
    dump): the alarm, not a replica at index 0 waiting for entries no file holds."""
    compact(data_dir, ENTRIES)
    source = LogSource(data_dir, FakeNode(ENTRIES))
    with pytest.raises(EventsGone, match="snapshot is at seq"):
        asyncio.run(asyncio.wait_for(source.seek(checkpoint_at(2)), 5))  # never a hang


@pytest.mark.parametrize("new_dump_at", [8, ENTRIES])  # ENTRIES: the new journal is empty
def test_a_compaction_while_the_replica_is_rebuilt_is_followed_to_the_newer_dump(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, new_dump_at: int
) -> None:
    """The node compacts between the source's reading its dump and opening its journal (a
    resync under load in a clean clone: replica rebuilt at log index 859, the journal it
    opened starting at 922, so the resync's first read raised the alarm again): the source
    starts over from the newer dump, never from a journal that does not follow its state."""
    compact(data_dir, 5)
    real_open = JournalReader.open
    compacted: list[Checkpoint] = []

    def open_after_a_compaction(self: JournalReader) -> None:
        if not compacted:
            compacted.append(compact(data_dir, new_dump_at))
        real_open(self)

    monkeypatch.setattr(JournalReader, "open", open_after_a_compaction)
    source = LogSource(data_dir, FakeNode(ENTRIES))
    exchange, raft_index = asyncio.run(source.restart_at_snapshot())
    assert (raft_index, exchange.seq) == (new_dump_at, compacted[0].seq)
    assert [e.raft_index for e in read_all(source)] == list(range(new_dump_at + 1, ENTRIES + 1))
