"""Process-level settings of a node: what it logs about pauses that cost heartbeats."""

from __future__ import annotations

import gc
import logging

import pytest

from cluster import node


def test_a_slow_garbage_collection_is_logged(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    before = list(gc.callbacks)
    try:
        node._watch_gc_pauses()
        assert len(gc.callbacks) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger="quorumbook.node"):
            gc.collect(0)
            assert not caplog.records  # a young collection is far below the threshold
            monkeypatch.setattr(node, "SLOW_GC_S", -1.0)  # every collection is "slow"
            gc.collect(2)
        assert any("garbage collection of generation 2 took" in r.getMessage()
                   for r in caplog.records)
    finally:
        gc.callbacks[:] = before
