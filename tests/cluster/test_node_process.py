"""Process-level settings of a node: garbage collection that pauses the Raft thread."""

from __future__ import annotations

import gc
import logging

import pytest

from cluster import node


def test_slow_collections_are_logged_and_full_ones_freeze_the_survivors(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = list(gc.callbacks)
    assert gc.get_freeze_count() == 0
    try:
        node._tame_gc()
        assert len(gc.callbacks) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger="quorumbook.node"):
            gc.collect(0)
            assert not caplog.records  # a young collection is far below the threshold
            assert gc.get_freeze_count() == 0  # only a full collection freezes
            monkeypatch.setattr(node, "SLOW_GC_S", -1.0)  # every collection is "slow"
            gc.collect(2)
        assert any(
            "garbage collection of generation 2 took" in r.getMessage() for r in caplog.records
        )
        assert gc.get_freeze_count() > 0  # what survived it is skipped from now on
    finally:
        gc.callbacks[:] = before
        gc.unfreeze()
