"""The node's wall clock: the system's, plus an offset that a fault injector can set at run time.

The node reads wall time for two protocol purposes, both through one `WallClock`: the leader
stamps each batch with it (cluster/replica.py: the exchange's `ts`, the replay window's
clock), and the API checks a signed request's timestamp against it (api/auth.py `Verifier`).
A real skewed host skews both, so the offset applies to both. Everything else the node times
(Raft, timeouts, rate limits, latencies) runs on monotonic clocks, which a wall-clock step
does not move, and log lines, backup names and the archive's schedule keep the system's time.

The offset is an integer of nanoseconds in `DATA_DIR/clock-offset-ns` (`OFFSET_FILE`),
written by the Jepsen harness's clock nemesis (jepsen/nemesis/clock.py) without restarting
the node and from outside its network namespace. Without the file the offset is 0: the
node reads exactly the system's clock. The file is looked at no more than every
`CHECK_INTERVAL_S` (a `stat`; it is read only when its inode, mtime or size changed), so a
read of the clock costs a monotonic read and a comparison more than `time.time_ns()`. A
file that does not hold a sane integer is ignored (offset 0) with a warning: a fault
injector's typo must not stop a node, nor push its `ts` beyond 64 bits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

OFFSET_FILE = "clock-offset-ns"  # in the node's data_dir; jepsen/nemesis/clock.py writes it
CHECK_INTERVAL_S = 0.1
# An offset beyond a year either way is a mistake, not a skew: ignored.
OFFSET_NS_MAX = 366 * 86_400 * 1_000_000_000

_ABSENT = ("absent",)  # the file's signature while there is no file


class WallClock:
    """`time_ns()`: the system's wall clock plus the offset in `offset_path` (None: none).

    Called from the node's trio thread (the batcher and the API); a second thread would at
    worst look at the file twice."""

    def __init__(
        self,
        offset_path: Path | None,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        system_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.offset_path = offset_path
        self.offset_ns = 0
        self._check_every_ns = int(check_interval_s * 1_000_000_000)
        self._system_ns = system_ns
        self._monotonic_ns = monotonic_ns
        self._next_check_ns = monotonic_ns()  # the first read looks at the file
        self._seen: tuple = _ABSENT

    @classmethod
    def of_data_dir(cls, data_dir: Path | str, **options: object) -> WallClock:
        return cls(Path(data_dir) / OFFSET_FILE, **options)  # type: ignore[arg-type]

    def time_ns(self) -> int:
        if self._monotonic_ns() >= self._next_check_ns:
            self.refresh()
        return self._system_ns() + self.offset_ns

    def refresh(self) -> int:
        """Look at the file now (the clock does every `check_interval_s`); the offset."""
        self._next_check_ns = self._monotonic_ns() + self._check_every_ns
        path = self.offset_path
        if path is None:
            return 0
        try:
            st = os.stat(path)
        except FileNotFoundError:
            seen: tuple = _ABSENT
        except OSError as exc:
            seen = ("error", str(exc))
        else:
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return self.offset_ns
        self._seen = seen
        if seen is _ABSENT:
            self._set(0, "no offset file")
            return 0
        try:
            text = path.read_text() if seen[0] != "error" else None
        except (OSError, UnicodeDecodeError) as exc:
            text, seen = None, ("error", str(exc))
        offset = _parse(text)
        if offset is None:
            shown = seen[1] if seen[0] == "error" else repr((text or "")[:40])
            log.warning(
                "ignoring the clock offset file %s (%s): it must hold one integer of "
                "nanoseconds within a year either way; the offset is 0",
                path,
                shown,
            )
            self._set(0, "ignored")
            return 0
        self._set(offset, str(path))
        return offset

    def _set(self, offset_ns: int, source: str) -> None:
        if offset_ns != self.offset_ns:
            log.warning(
                "wall clock offset %+.3f s (was %+.3f s; %s): this node's batch ts and its "
                "check of signed requests' timestamps follow it",
                offset_ns / 1e9,
                self.offset_ns / 1e9,
                source,
            )
        self.offset_ns = offset_ns


def _parse(text: str | None) -> int | None:
    """The offset a file holds, or None if it holds no sane one."""
    if text is None:
        return None
    text = text.strip()
    body = text[1:] if text[:1] in "+-" else text
    if not (body.isascii() and body.isdigit()) or len(body) > 19:
        return None
    value = int(text)
    return value if abs(value) <= OFFSET_NS_MAX else None
