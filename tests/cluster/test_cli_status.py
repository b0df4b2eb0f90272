"""`quorumbook cluster status` without --json: one line per node, with what an operator
checks in a drill (the journal and its log hold, the indexer, the archiver)."""

from __future__ import annotations

from cluster.cli import _status_line

BASE = {
    "role": "follower",
    "term": 4,
    "commit_index": 120,
    "applied_index": 120,
    "cmd_index": 3990,
    "state_hash": "ab" * 32,
    "raft": {"journal_bytes": 2_500_000, "compaction_hold": None},
    "indexer": {"configured": False},
    "archive": {"configured": False},
}


def test_a_node_without_helpers_shows_its_journal() -> None:
    assert _status_line("n2", BASE) == (
        "n2: follower  term 4 commit 120 applied 120 cmd 3990 hash abababababababab; journal 2.5 MB"
    )
    assert _status_line("n3", None) == "n3: unreachable"


def test_the_hold_the_indexer_and_the_archiver_and_their_alarms() -> None:
    status = {
        **BASE,
        "raft": {"journal_bytes": 40_000_000, "compaction_hold": 88},
        "indexer": {"configured": True, "state": "gone", "lag_events": 900, "gone_from_seq": 51},
        "archive": {"configured": True, "state": "standby", "lag_entries": None, "gaps": 2},
    }
    assert _status_line("n1", status).endswith(
        "; journal 40.0 MB, held after 88; indexer gone lag 900 ALARM gone; "
        "archive standby lag - gaps 2"
    )
    indexer = {**status["indexer"], "state": "halted", "gone_from_seq": None}
    halted = {**status, "indexer": {**indexer, "timeline_alarm": "foreign_timeline"}}
    assert "indexer halted lag 900 ALARM foreign_timeline;" in _status_line("n1", halted)
