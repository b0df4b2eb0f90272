"""Which node archives (one follower at a time, never the leader, never one without a
leader), and which segments a restore reads."""

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pysyncobj.syncobj import _COMMAND_TYPE

from cluster.machine import ExchangeMachine
from cluster.raft import PYSYNCOBJ_VERSION, seed_data_dirs
from cluster.raft.storage import DurableJournal, JournalReader
from disaster_recovery.archiver import Gap, Replica, designated
from disaster_recovery.segments import chain, name_of


@pytest.mark.parametrize(
    "node, view, expected",
    [
        ("n2", {"role": "follower", "leader": "n1", "connected": ["n1", "n3"]}, True),
        ("n3", {"role": "follower", "leader": "n1", "connected": ["n1", "n2"]}, False),
        ("n1", {"role": "follower", "leader": "n3", "connected": ["n2", "n3"]}, True),
        # n3 is cut off from n2: it cannot know whether n2 archives, so it does (a race of
        # two archivers writes the same entries: segments agree where they overlap).
        ("n3", {"role": "follower", "leader": "n1", "connected": ["n1"]}, True),
        ("n1", {"role": "leader", "leader": "n1", "connected": ["n2", "n3"]}, False),
        ("n2", {"role": "candidate", "leader": None, "connected": ["n3"]}, False),
        ("n2", {"role": "follower", "leader": None, "connected": []}, False),
        ("n2", {}, False),  # the node has said nothing yet
    ],
)
def test_designated(node, view, expected):
    assert designated(node, view) is expected


def chain_by_definition(spans, after):
    """At each step, of the segments holding the next index wanted, the one reaching furthest."""
    out, wanted = [], after + 1
    while True:
        holding = [s for s in spans if s[0] <= wanted <= s[1]]
        if not holding:
            return out
        best = max(holding, key=lambda s: s[1])
        out.append(best)
        wanted = best[1] + 1


@given(
    st.lists(
        st.tuples(st.integers(1, 60), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])),
        max_size=30,
        unique=True,
    ),
    st.integers(0, 60),
)
def test_chain_is_the_furthest_reaching_cover(pairs, after):
    spans = sorted((first, last, name_of(first, last)) for first, last in pairs)
    assert chain(spans, after) == chain_by_definition(spans, after)


NO_OP = bytes([_COMMAND_TYPE.NO_OP])  # pysyncobj's no-op entry: nothing for the machine


def data_dir_at(path, dump_index: int, journal_first: int, last: int):
    """A node's data directory: a dump of an empty exchange at `dump_index`, a journal of
    no-op entries `journal_first`..`last`."""
    seed_data_dirs([path], ExchangeMachine().snapshot(), dump_index, ["127.0.0.1:1"])
    journal = DurableJournal(path / "raft.journal", app_version=PYSYNCOBJ_VERSION, fsync=False)
    journal.reset([(NO_OP, i, 1) for i in range(journal_first, last + 1)])
    journal.close()
    return path


@pytest.mark.parametrize("end", [0, 10])
def test_a_replica_where_the_journal_no_longer_reaches_is_a_gap(tmp_path, end):
    """The archive ends before the node's dump and its journal starts after the archive's
    end (an empty archive, end 0, included): a gap, found when the replica is made (the
    archiver then starts a new chain from a backup of the dump)."""
    data_dir = data_dir_at(tmp_path / "node", 50, 49, 60)
    with pytest.raises(Gap, match="snapshot is at log index 50, past"):
        Replica.at(data_dir, end, applied=60)
    replica = Replica.at(data_dir, 55, applied=60)  # past the dump: the journal has it
    assert replica.index == 55
    replica.close()


@pytest.mark.parametrize("end", [0, 10])
def test_a_journal_kept_from_the_start_carries_an_archive_behind_the_dump(tmp_path, end):
    """The compaction hold kept the journal from index 1 (the empty state): a replica at the
    archive's end is rebuilt from it, though the dump is past that end."""
    data_dir = data_dir_at(tmp_path / "node", 50, 1, 60)
    replica = Replica.at(data_dir, end, applied=60)
    assert replica.index == end
    assert [idx for _c, idx, _t, _ci in replica.read(60, 100)] == list(range(end + 1, 61))
    replica.close()


def test_an_empty_journal_beside_a_dump_past_the_end_is_the_gap(tmp_path):
    """A journal holding nothing yet (all in the dump) is not one kept from index 1: the gap,
    said as such (not "the node has applied 50, not yet 10")."""
    data_dir = data_dir_at(tmp_path / "node", 50, 51, 50)
    with pytest.raises(Gap, match="snapshot is at log index 50, past 10"):
        Replica.at(data_dir, 10, applied=50)


def test_a_compaction_while_the_replica_is_made_is_followed_to_the_newer_dump(
    tmp_path, monkeypatch
):
    """The node compacts between the replica's reading its dump and opening its journal (the
    indexer's source met it under load, ADR 0007): not a gap, after which the archiver would
    start a new chain and call the points in between lost, but the newer dump, still at or
    before the archive's end."""
    data_dir = data_dir_at(tmp_path / "node", 50, 51, 70)
    newer = data_dir_at(tmp_path / "newer", 53, 54, 70)  # the node's files after it compacts
    real_open = JournalReader.open

    def open_after_a_compaction(self):
        if (newer / "raft.dump").exists():  # the first open only: the node renames its files
            os.replace(newer / "raft.dump", data_dir / "raft.dump")
            os.replace(newer / "raft.journal", data_dir / "raft.journal")
        real_open(self)

    monkeypatch.setattr(JournalReader, "open", open_after_a_compaction)
    replica = Replica.at(data_dir, 55, applied=70)
    assert replica.index == 55
    assert [idx for _c, idx, _t, _ci in replica.read(70, 100)] == list(range(56, 71))
    replica.close()
