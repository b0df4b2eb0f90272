"""The harness's checkers: pure functions of a run's files (STYLE.md 10). No network, no
processes: each reads a history (jepsen/history.py) and, where it replays, the committed log,
and returns a `Result`.

    sequencer.check(history, log)    every acknowledged write reproduced, real-time order,
                                     failed writes absent, each write applied at most once
    reads.check(history, log)        linearizable reads; stale and impossible ones
    bank.check(history, log)         conservation, no duplicate client_order_id, no crossed
                                     book, converged final state hashes
    linearizable.check(history, model=register() | counter())
                                     Wing & Gong / Porcupine search for simple workloads
    final.check(history, snapshots)  every acknowledged write in every node's final state
                                     (store_dir/final/<node>.snapshot): needs no log
    check_all(store_dir)             all of them on store_dir/history.jsonl + log.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..history import read_history, read_log
from . import bank, final, linearizable, reads, sequencer
from .result import MAX_ANOMALIES, UNKNOWN, Result, combine

HISTORY_FILE = "history.jsonl"
LOG_FILE = "log.jsonl"
FINAL_DIR = "final"


def check_all(
    store_dir: str | Path, *, max_anomalies: int = MAX_ANOMALIES, time_limit_s: float = 30.0
) -> dict[str, Any]:
    """Every checker on a stored run: {"valid", "checkers": {name: Result.as_dict()}}.

    Without log.jsonl the replaying checkers say "unknown". The linearizability search runs
    for a model only when the history has its ops (register: write/cas; counter: add).
    """
    store = Path(store_dir)
    history = read_history(store / HISTORY_FILE)
    log_path = store / LOG_FILE
    log = read_log(log_path) if log_path.exists() else None
    results: list[Result] = [
        sequencer.check(history, log, max_anomalies=max_anomalies),
        reads.check(history, log, max_anomalies=max_anomalies),
        bank.check(history, log, max_anomalies=max_anomalies),
    ]
    if (store / FINAL_DIR).is_dir():  # runs stored before the final states were saved: none
        snapshots = final.read_snapshots(store / FINAL_DIR)
        results.append(final.check(history, snapshots, max_anomalies=max_anomalies))
    fs = {op.f for op in history}
    for model, marks in (
        (linearizable.register(), {"write", "cas"}),
        (linearizable.counter(), {"add"}),
    ):
        if fs & marks:
            result = linearizable.check(
                history, model=model, time_limit_s=time_limit_s, max_anomalies=max_anomalies
            )
            result.name = f"{linearizable.NAME}-{model.name}"
            results.append(result)
    return {
        "valid": combine([r.valid for r in results]),
        "checkers": {r.name: r.as_dict() for r in results},
    }


__all__ = [
    "UNKNOWN",
    "Result",
    "bank",
    "check_all",
    "combine",
    "linearizable",
    "reads",
    "sequencer",
]
