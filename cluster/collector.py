"""The cyclic garbage collector's settings for a process that holds a replica of the state:
a node, and beside it its archiver and its indexer, which apply the same log.

The exchange's state (orders, levels, balances, events) holds no reference cycles, so
reference counting frees it; the collector only has to find the cycles of libraries
(tracebacks, trio tasks, asyncio futures, botocore). With the default gen0 threshold (700) a
replica collects dozens of times per batch of commands, each time walking the young objects
a batch makes (a batch of 250 commands: apply 16.6 ms with the defaults, 7.9 ms with these,
6.8 ms with gc off, measured in a node; 1.62-1.70 against 1.33-1.35 ms on a shallow book, in
one process). Fewer, larger young collections instead, in every such process.

A full (generation 2) collection holds the GIL and walks every tracked object, the book's
orders, levels and maps most of them (a replica of ~100k resting orders: 400-570 ms). In a
node the Raft thread sends no heartbeat meanwhile, so a node (`freeze=True`) also freezes the
survivors of each full collection (`gc.freeze()`: moved to the permanent generation, which
collections skip) and the state it loads (cluster/machine.py, `freeze_restored`), so the
next one walks only what was allocated since. Frozen objects are still freed by reference
counting, and the state machine's objects hold no cycles (tests/statemachine); what is lost
is the collection of cycles among frozen objects that later become garbage: a library's
objects made before a freeze and dropped after it, in a cycle, are never freed. A node
accepts that for its heartbeats. The archiver and the indexer (`freeze=False`) have no
heartbeat to keep and use more cycle-making libraries (botocore, aiokafka, asyncpg): they
take the thresholds and the logging only, and a full collection there costs the log's
readers a pause, which they tolerate (rare: a full collection waits until a quarter of the
long-lived objects are new).
"""

from __future__ import annotations

import gc
import logging
import time

GC_THRESHOLDS = (50_000, 20, 100)
SLOW_GC_S = 0.05  # a collection longer than this is logged (WARNING)


def tame(log: logging.Logger, *, freeze: bool) -> None:
    """Set the thresholds and log every collection over SLOW_GC_S on `log` as a WARNING (it
    tells an SRE why an election happened or the archive fell behind). With `freeze`, also
    freeze what start-up made (modules, config: never garbage) and the survivors of every
    full collection (see the module's doc for what that costs)."""
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
        if freeze and info["generation"] == 2:
            gc.freeze()

    gc.callbacks.append(callback)
    if freeze:
        gc.freeze()
