"""Process-level settings of a node (and of its archiver and indexer): garbage collection that
pauses the Raft thread or the log's readers."""

from __future__ import annotations

import gc
import logging

import pytest

from cluster import collector


def test_slow_collections_are_logged_and_full_ones_freeze_the_survivors(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = list(gc.callbacks)
    thresholds = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    try:
        collector.tame(logging.getLogger("quorumbook.node"), freeze=True)
        assert len(gc.callbacks) == len(before) + 1
        assert gc.get_threshold() == collector.GC_THRESHOLDS
        gc.unfreeze()  # what tame() froze at once: this test counts what a collection freezes
        with caplog.at_level(logging.WARNING, logger="quorumbook.node"):
            gc.collect(0)
            assert not caplog.records  # a young collection is far below the threshold
            assert gc.get_freeze_count() == 0  # only a full collection freezes
            monkeypatch.setattr(collector, "SLOW_GC_S", -1.0)  # every collection is "slow"
            gc.collect(2)
        assert any(
            "garbage collection of generation 2 took" in r.getMessage() for r in caplog.records
        )
        assert gc.get_freeze_count() > 0  # what survived it is skipped from now on
    finally:
        gc.callbacks[:] = before
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def test_a_sidecar_takes_the_thresholds_and_the_logging_but_freezes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = list(gc.callbacks)
    thresholds = gc.get_threshold()
    try:
        collector.tame(logging.getLogger("quorumbook.archive"), freeze=False)
        assert gc.get_threshold() == collector.GC_THRESHOLDS
        monkeypatch.setattr(collector, "SLOW_GC_S", -1.0)
        with caplog.at_level(logging.WARNING, logger="quorumbook.archive"):
            gc.collect(2)
        assert any("generation 2 took" in r.getMessage() for r in caplog.records)
        assert gc.get_freeze_count() == 0  # its libraries' cycles stay collectable
    finally:
        gc.callbacks[:] = before
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def test_the_archiver_and_the_indexer_process_tame_the_collector_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # They apply the same log as their node: the node's thresholds and frozen full collections.
    from cluster import indexer_process
    from disaster_recovery import archiver

    tamed: list[str] = []
    monkeypatch.setattr(collector, "tame", lambda log, freeze: tamed.append((log.name, freeze)))
    monkeypatch.setattr(archiver, "parse", lambda argv: None)
    monkeypatch.setattr(archiver, "run", lambda opts: None)
    archiver.main([])
    monkeypatch.setattr(indexer_process, "parse", lambda argv: None)

    async def main(opts: object) -> None:
        return None

    monkeypatch.setattr(indexer_process, "main", main)
    indexer_process.run([])
    assert tamed == [("quorumbook.archive", False), ("quorumbook.indexer", False)]
