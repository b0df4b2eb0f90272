"""Nemeses: the faults a run injects, each a package that also knows how to heal.

Every nemesis follows one protocol, so the run's schedule treats them alike:

- `name`: a short word (`partition`, `kill`, `pause`, `clock`, `membership`...), the
  history's `f` prefix.
- `start(ctx) -> dict`: inject one fault, chosen with `ctx.rng` only (same seed, same
  faults), and return what it did: a JSON-able dict (`{"shape": "halves", "grudge": {...}}`)
  that goes into the history as the nemesis event's value. Starting while a fault of its own
  is active replaces that fault.
- `stop(ctx) -> dict`: undo its fault (heal, resume, restart...) and return what it did.
  Stopping with nothing active is harmless (it may heal anyway, to be sure).
- `heal_all() -> None`: undo everything it may have done, needing nothing from a context:
  idempotent, safe before any `start`, after a `stop`, twice, and from the harness's
  `finally` after a crash. It raises only when a fault may remain (the run must not go on
  to its final reads and report "healed").

A run ends every nemesis with `stop` then `heal_all`, also when it fails (STYLE.md rule 10:
every fault package ends by healing). Nemeses do not read the history or check anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Control(Protocol):
    """How a nemesis acts on node processes (the launcher's cluster has these methods;
    jepsen does not import cluster/, it is handed one)."""

    def start(self, node_id: str | None = None) -> None: ...
    def stop(self, node_id: str, timeout_s: float = 10.0) -> None: ...
    def kill(self, node_id: str) -> None: ...
    def signal(self, node_id: str, signum: int) -> None: ...


def _no_leader() -> str | None:
    return None


@dataclass
class Context:
    """What the harness hands a nemesis at each `start` / `stop`."""

    nodes: Sequence[str]  # the current members' ids
    rng: random.Random  # the run's seeded generator
    leader: Callable[[], str | None] = field(default=_no_leader)  # who leads now, if anyone
    control: Control | None = None  # node processes, for the nemeses that need them


class Nemesis(Protocol):
    name: str

    def start(self, ctx: Context) -> dict: ...
    def stop(self, ctx: Context) -> dict: ...
    def heal_all(self) -> None: ...
