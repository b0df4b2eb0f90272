"""What the indexer needs from a node (cluster/ implements it; indexer/ never imports cluster/).

The node's side is two small things: a view of the node (its Raft role, how far it applied
the log, its exchange's `seq`), and a source of committed log entries as events, that can
start right after any checkpoint this replica still holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .events import Checkpoint, Entry


@dataclass(frozen=True)
class NodeView:
    """The node as it last reported itself. `seq`: its exchange's last event; `ts_ms`: that
    event's time (the leader's clock, ms)."""

    role: str | None = None  # "leader", "follower", "candidate"; None until the node says
    applied_index: int = 0
    seq: int = 0
    ts_ms: int = 0

    @property
    def follower(self) -> bool:
        return self.role == "follower"


class Node(Protocol):
    def view(self) -> NodeView: ...

    async def changed(self, timeout_s: float) -> None:
        """Return when the view changed, or after `timeout_s`."""


class EntrySource(Protocol):
    """Committed log entries, as this replica's state machine turns them into events."""

    async def seek(self, checkpoint: Checkpoint) -> None:
        """Make the next `read` start right after `checkpoint` (an entry boundary: its
        `raft_index`, with `seq` the last event before it). Raises EventsGone if this
        replica can no longer produce the events after it. A checkpoint at a boundary inside
        what the last `read` returned (its write failed) makes the next `read` return those
        entries again from there."""

    async def restart_at_snapshot(self) -> tuple[Any, int]:
        """Start over from the node's newest snapshot, for a resync: the replica's exchange
        (a `statemachine.Exchange`, read it before the next `read`) and the log index it
        covers; the next `read` starts right after it. EventsGone without a usable one."""

    async def read(self, max_events: int, timeout_s: float) -> list[Entry]:
        """The next whole entries (an entry is never split; about `max_events` events at
        most), as soon as at least one is applied on the node, or [] after `timeout_s`.
        Raises EventsGone if the log moved past them meanwhile."""
