"""The clock nemesis: a node's wall clock jumps, the leader's half of the time, back and forth.

The leader stamps each batch's `ts` with its wall clock, and every node checks a signed
request's timestamp against its own (cluster/clock.py). A fault writes an offset (ns) to the
chosen node's `DATA_DIR/clock-offset-ns`: the node adds it to every such read of its clock
within 0.1 s, without a restart, and a file is seen from inside a network namespace as from
outside. `stop` removes the file: the node's clock is the system's again (a jump back too).

The offset (seeded: `offset_ns`) has a random sign and one of three sizes:
- `small` (0.1 to 4.5 s): signed requests still pass the skewed node's window (5 s), so a
  skewed leader's stamps go back and forth under load; the state machine must absorb it
  (every command gets `max(stamp, last ts)`; the bank checker's `clock_backwards`);
- `medium` (5 to 30 s): the skewed node refuses every signed request sent to it as
  `401 expired`, definite: on the leader, no signed write or read passes anywhere;
- `large` (60 to 120 s), one fault in ten.
A forward jump of more than 20 s on the leader also moves the replicated replay window's
clock (it follows the batches' stamps and never goes back, cluster/machine.py): requests
already verified when the jump came are refused as expired, and so is every signed write
on the whole cluster until real time catches up, about (jump - 20 s) after it, healed or not.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path

from . import Context
from .process import _target

# cluster/clock.py's OFFSET_FILE (jepsen imports nothing of the cluster but its launcher;
# tests/jepsen/test_clock.py holds the two equal).
OFFSET_FILE = "clock-offset-ns"

# (name, share, smallest, largest) in ms.
SIZES = (
    ("small", 0.35, 100, 4_500),
    ("medium", 0.55, 5_000, 30_000),
    ("large", 0.10, 60_000, 120_000),
)

DataDirs = Mapping[str, "str | Path"] | Callable[[str], "str | Path"]


def offset_ns(rng: random.Random, sizes: tuple = SIZES) -> tuple[str, int]:
    """(its size's name, a signed offset in whole ms, as ns), from the seeded generator."""
    name, _, low, high = rng.choices(sizes, [share for _, share, _, _ in sizes])[0]
    sign = rng.choice((-1, 1))
    return name, sign * rng.randint(low, high) * 1_000_000


def write_offset(path: Path, offset: int) -> None:
    """The whole file at once (written aside, then renamed over): a node never reads half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    aside.write_text(f"{offset}\n")
    os.replace(aside, path)


class Clock:
    """`Clock(data_dirs)`: `data_dirs` maps a node id to its data directory (a mapping, or a
    function, for nodes added during the run): `cluster.nodes[nid].config.data_dir`.
    `sizes` replaces `SIZES`."""

    name = "clock"

    def __init__(self, data_dirs: DataDirs, *, sizes: tuple = SIZES) -> None:
        self._data_dir = data_dirs if callable(data_dirs) else data_dirs.__getitem__
        self.sizes = sizes
        self.skewed: dict[str, Path] = {}  # node -> its offset file, while we may have set one

    def start(self, ctx: Context) -> dict:
        node, was_leader = _target(ctx)
        size, offset = offset_ns(ctx.rng, self.sizes)
        self._reset([n for n in self.skewed if n != node])  # one fault at a time: replace it
        path = Path(self._data_dir(node)) / OFFSET_FILE
        self.skewed[node] = path
        write_offset(path, offset)
        return {"node": node, "was_leader": was_leader, "size": size,
                "offset_ms": offset // 1_000_000}  # fmt: skip

    def stop(self, ctx: Context) -> dict:
        reset = sorted(self.skewed)
        self.heal_all()
        return {"reset": reset}

    def heal_all(self) -> None:
        """Remove every offset file this nemesis wrote; raises if one cannot be removed."""
        self._reset(list(self.skewed))

    def _reset(self, nodes: list[str]) -> None:
        for node in nodes:
            self.skewed[node].unlink(missing_ok=True)
            del self.skewed[node]
