"""What a checker returns: a verdict, the anomalies that justify it, and figures.

`valid` is True, False (at least one anomaly) or "unknown" (the checker could not decide:
no log to replay, a search that ran out of time). Anomalies are listed up to a limit per
kind; `stats["anomaly_counts"]` counts them all. An anomaly's `op_indexes` are history
indexes: for a completed op the index of its completion line (which names its invoke in
`invoke_index`), else of its invoke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..history import Op

Validity = bool | Literal["unknown"]
UNKNOWN: Literal["unknown"] = "unknown"
MAX_ANOMALIES = 20  # listed per kind; all are counted


@dataclass
class Result:
    name: str
    valid: Validity
    anomalies: list[dict] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "valid": self.valid,
            "anomalies": self.anomalies,
            "stats": self.stats,
        }

    def kinds(self) -> set[str]:
        return set(self.stats.get("anomaly_counts", {}))


def combine(verdicts: list[Validity]) -> Validity:
    """False if any is False, else "unknown" if any is unknown, else True."""
    if any(v is False for v in verdicts):
        return False
    if any(v == UNKNOWN for v in verdicts):
        return UNKNOWN
    return True


def ref(invoke: Op, completion: Op | None) -> int:
    """The history index an anomaly names for an op (see the module's docstring)."""
    return invoke.index if completion is None else completion.index


class Findings:
    """Collects one checker's anomalies, keeping at most `limit` of each kind."""

    def __init__(self, name: str, limit: int = MAX_ANOMALIES) -> None:
        self.name = name
        self.limit = limit
        self.anomalies: list[dict] = []
        self.counts: dict[str, int] = {}
        self.unknown_because: list[str] = []

    def add(self, kind: str, op_indexes: list[int], message: str) -> None:
        count = self.counts.get(kind, 0)
        self.counts[kind] = count + 1
        if count < self.limit:
            self.anomalies.append(
                {"kind": kind, "op_indexes": sorted(set(op_indexes)), "message": message}
            )

    def undecided(self, why: str) -> None:
        """The verdict cannot be True: say why (it stays False if an anomaly was found)."""
        self.unknown_because.append(why)

    def result(self, stats: dict[str, Any]) -> Result:
        if self.counts:
            valid: Validity = False
        elif self.unknown_because:
            valid = UNKNOWN
        else:
            valid = True
        stats = {**stats, "anomaly_counts": dict(sorted(self.counts.items()))}
        if self.unknown_because:
            stats["unknown_because"] = self.unknown_because
        return Result(self.name, valid, self.anomalies, stats)
