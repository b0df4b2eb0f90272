"""Whose history the indexer's database holds, and when an indexer must not write to it
(issue 11; ADR 0007 "Restores"; docs/operating/indexer.md "After a restore").

A restore builds a new cluster with a new `cluster_id` (disaster_recovery/restore.py): its
history equals the old cluster's up to the restore point (`seq` S, `cmd_index` C) and is its
own after it, with the same `seq` numbers for other events. The checkpoint records the
cluster whose events the rows are, so an indexer can tell, before every write, that it would
continue the same history. The rule, conservative on purpose:

* the database records no cluster: a fresh one (nothing written) takes ours at once; one an
  older indexer wrote takes ours with our first write, made only after our replica reproduced
  the checkpoint (the same `seq` at the same log index);
* it records ours: go on, unless the checkpoint is ahead of this node's history: this node
  applied the checkpoint's log entry and has fewer events than the checkpoint (on one history
  `seq` only grows along the log, so this cannot be lag). Reason `checkpoint_ahead`;
* it records another cluster: never write, whatever the positions. A checkpoint at or before
  the restore point may well be a prefix of our history, but only the operator knows which
  cluster ours was restored from and where: `quorumbook indexer adopt` says so, and moves the
  database (indexer/adoption.py). Reason `foreign_timeline`.

While no node applied up to the checkpoint's log index, "ahead" cannot be told from "behind":
the followers wait at the checkpoint and write nothing, and as soon as one gets there, either
this rule or the replica's own check (the seq at that index must be the checkpoint's) stops it.
Restores never get that far: they change the cluster id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .events import Checkpoint
from .port import NodeView

FOREIGN_TIMELINE = "foreign_timeline"
CHECKPOINT_AHEAD = "checkpoint_ahead"


@dataclass(frozen=True)
class Alarm:
    reason: str  # FOREIGN_TIMELINE or CHECKPOINT_AHEAD
    message: str  # one line, both clusters and both positions


def check(ours: str, checkpoint: Checkpoint, view: NodeView) -> Alarm | None:
    """None when this node's indexer may write after `checkpoint` (as far as whose history it
    is goes); else why not. `ours`: this node's cluster id ("" when not configured)."""
    theirs = checkpoint.cluster_id
    where = (
        f"the database's checkpoint: cluster {theirs or '(none recorded)'}, seq "
        f"{checkpoint.seq}, cmd_index {checkpoint.cmd_index}, log index "
        f"{checkpoint.raft_index}; this node: cluster {ours or '(not configured)'}, seq "
        f"{view.seq}, log index {view.applied_index} applied"
    )
    if theirs and theirs != ours:
        return Alarm(FOREIGN_TIMELINE, f"the database follows another cluster's history ({where})")
    if view.role is None:
        return None  # the node has not said where it is yet
    if checkpoint.raft_index <= view.applied_index and view.seq < checkpoint.seq:
        return Alarm(
            CHECKPOINT_AHEAD,
            f"the checkpoint is ahead of this cluster's history: at its log index this node "
            f"has fewer events ({where})",
        )
    return None


@dataclass(frozen=True)
class RestorePoint:
    """Where a restored cluster (`cluster_id`) left the history of `from_cluster_id`: after the
    event `seq`, the last of command `cmd_index`, at log index `raft_index` of the new
    cluster's log. A restore writes it in restore.json."""

    cluster_id: str
    from_cluster_id: str
    seq: int
    cmd_index: int
    raft_index: int

    def __post_init__(self) -> None:
        if not self.cluster_id:
            raise ValueError("the restored cluster's id is missing")
        if self.cluster_id == self.from_cluster_id:
            raise ValueError(f"a restored cluster has a new id, not {self.cluster_id}'s own")
        for name in ("seq", "cmd_index", "raft_index"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if (self.seq == 0) != (self.cmd_index == 0) or self.cmd_index > self.seq:
            raise ValueError(
                f"seq {self.seq} and cmd_index {self.cmd_index} cannot be one point (every "
                "command yields at least one event)"
            )

    @classmethod
    def of_restore(cls, doc: dict[str, Any]) -> RestorePoint:
        """From restore.json (disaster_recovery/restore.py writes it into the new cluster's
        data directory)."""
        try:
            return cls(
                cluster_id=str(doc["cluster_id"]),
                from_cluster_id=str(doc.get("from_cluster_id") or ""),
                seq=int(doc["seq"]),
                cmd_index=int(doc["cmd_index"]),
                raft_index=int(doc["log_index"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a restore.json: {exc!r} is missing or wrong") from exc
