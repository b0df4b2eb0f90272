"""The cyclic garbage collector's settings for a process that holds a replica of the state:
a node, and beside it its archiver and its indexer, which apply the same log.

The exchange's state (orders, levels, balances, events) holds no reference cycles, so
reference counting frees it; the collector only has to find the cycles of libraries
(tracebacks, trio tasks, asyncio futures). With the default gen0 threshold (700) a replica
collects dozens of times per batch of commands, each time walking the young objects a batch
makes (a batch of 250 commands: apply 16.6 ms with the defaults, 7.9 ms with these, 6.8 ms
with gc off, measured in a node; 1.62-1.70 against 1.33-1.35 ms on a shallow book, in one
process). Fewer, larger young collections instead.

A full (generation 2) collection holds the GIL and walks every tracked object, the book's
orders, levels and maps most of them (a replica of ~100k resting orders: 400-570 ms): in a
node the Raft thread sends no heartbeat meanwhile, in an archiver or indexer the log waits.
After each full collection the survivors are frozen (`gc.freeze()`: moved to the permanent
generation, which collections skip), so the next one walks only what was allocated since.
Frozen objects are still freed by reference counting; what is lost is only the collection
of cycles among them, and the state machine's objects hold no cycles (orders do not point at
their levels; tests/statemachine/test_snapshot.py checks a dropped exchange is freed without
the collector). In such a process a state loaded from a snapshot is frozen as it is loaded
(cluster/machine.py), or its first full collection would walk all of it.
"""

from __future__ import annotations

import gc
import logging
import time

GC_THRESHOLDS = (50_000, 20, 100)
SLOW_GC_S = 0.05  # a collection longer than this is logged (WARNING)
_tamed = False


def tamed() -> bool:
    """Whether this process runs with these settings: then a state a machine loads is frozen
    as it is loaded (cluster/machine.py). Not in a process that did not ask (a test run, a
    one-shot command): freezing keeps every object of the process from the collector."""
    return _tamed


def tame(log: logging.Logger) -> None:
    """Set the thresholds, freeze what start-up made (modules, config: never garbage), freeze
    the survivors of every full collection, and log every collection over SLOW_GC_S on `log`
    as a WARNING: it tells an SRE why an election happened or the archive fell behind."""
    global _tamed
    _tamed = True
    gc.set_threshold(*GC_THRESHOLDS)
    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took > SLOW_GC_S:
            log.warning(
                "garbage collection of generation %d took %.0f ms (%d collected)",
                info["generation"],
                took * 1000,
                info["collected"],
            )
        if info["generation"] == 2:
            gc.freeze()

    gc.callbacks.append(callback)
    gc.freeze()
