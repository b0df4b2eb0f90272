"""The node's wall clock (cluster/clock.py), and what a leader's clock jumping back and forth
does to the log: the offset file read cheaply and safely, every stamp taken from the clock,
the exchange's clock never back along seq, and the replay window's clock the requests'."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from cluster.clock import CHECK_INTERVAL_S, OFFSET_FILE, OFFSET_NS_MAX, WallClock
from cluster.machine import ExchangeMachine
from cluster.replica import Replica

S = 1_000_000_000  # ns
NOW = 1_800_000_000 * S  # the system's wall clock in these tests


class Fake:
    """A settable system clock and monotonic clock (ns)."""

    def __init__(self) -> None:
        self.wall = NOW
        self.mono = 0

    def system_ns(self) -> int:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono

    def later(self, seconds: float) -> None:
        self.wall += int(seconds * S)
        self.mono += int(seconds * S)


def clock_in(tmp_path: Path) -> tuple[WallClock, Fake, Path]:
    fake = Fake()
    clock = WallClock.of_data_dir(
        tmp_path, system_ns=fake.system_ns, monotonic_ns=fake.monotonic_ns
    )
    return clock, fake, tmp_path / OFFSET_FILE


def put(path: Path, text: str) -> None:
    """As the nemesis writes it: aside, then renamed over (a new inode every time)."""
    aside = path.with_name(".aside")
    aside.write_text(text)
    os.replace(aside, path)


def test_without_the_file_the_clock_is_the_systems(tmp_path: Path) -> None:
    clock, fake, _ = clock_in(tmp_path)
    assert clock.time_ns() == NOW
    fake.later(1)
    assert clock.time_ns() == NOW + S
    assert clock.offset_ns == 0
    plain = WallClock(None)
    before = time.time_ns()
    assert before <= plain.time_ns() <= time.time_ns()


def test_an_offset_is_read_at_once_and_changes_within_the_interval(tmp_path: Path) -> None:
    clock, fake, path = clock_in(tmp_path)
    put(path, "-60000000000\n")
    assert clock.time_ns() == NOW - 60 * S  # the first read looks at the file
    put(path, "+60000000000")
    fake.mono += int(CHECK_INTERVAL_S * S) - 1
    assert clock.time_ns() == NOW - 60 * S  # not looked at again yet
    fake.mono += 1
    assert clock.time_ns() == NOW + 60 * S
    path.unlink()
    fake.later(CHECK_INTERVAL_S)
    assert clock.time_ns() == fake.wall  # removed: the system's clock again


def test_the_file_is_stat_once_per_interval_and_read_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, fake, path = clock_in(tmp_path)
    put(path, "5")
    stats, reads = [], []
    real_stat, real_read = os.stat, Path.read_text
    monkeypatch.setattr("cluster.clock.os.stat", lambda p: stats.append(p) or real_stat(p))
    monkeypatch.setattr(Path, "read_text", lambda self: reads.append(self) or real_read(self))
    for _ in range(1000):
        clock.time_ns()
    assert (len(stats), len(reads)) == (1, 1)
    for _ in range(10):
        fake.later(CHECK_INTERVAL_S)
        clock.time_ns()
    assert (len(stats), len(reads)) == (11, 1)  # unchanged: never read again
    assert clock.time_ns() == fake.wall + 5


@pytest.mark.parametrize(
    "text",
    ["", "abc", "1.5", "1e9", "60 s", "--5", "٣", str(OFFSET_NS_MAX + 1), "9" * 40],
    ids=lambda t: repr(t[:12]),
)
def test_a_malformed_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    clock, fake, path = clock_in(tmp_path)
    put(path, "7")
    assert clock.time_ns() == NOW + 7
    put(path, text)
    fake.later(CHECK_INTERVAL_S)
    with caplog.at_level(logging.WARNING, logger="cluster.clock"):
        assert clock.time_ns() == fake.wall  # ignored: offset 0, no exception
        fake.later(CHECK_INTERVAL_S)
        clock.time_ns()
    warnings = [r for r in caplog.records if "ignoring the clock offset file" in r.message]
    assert len(warnings) == 1  # once per version of the file, not at every look
    put(path, "-3")
    fake.later(CHECK_INTERVAL_S)
    assert clock.time_ns() == fake.wall - 3  # a good file afterwards is taken


def test_an_unreadable_file_is_ignored_too(tmp_path: Path) -> None:
    clock, _, path = clock_in(tmp_path)
    path.write_bytes(b"\xff\xfe12")
    assert clock.time_ns() == NOW
    path.unlink()
    path.mkdir()  # a directory where the file should be
    clock.refresh()
    assert clock.time_ns() == NOW


def test_a_change_of_offset_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock, fake, path = clock_in(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cluster.clock"):
        clock.time_ns()
        assert not caplog.records  # no file, no news
        put(path, str(-60 * S))
        fake.later(CHECK_INTERVAL_S)
        clock.time_ns()
    assert "wall clock offset -60.000 s (was +0.000 s" in caplog.records[0].message


def test_reading_the_clock_costs_next_to_nothing(tmp_path: Path) -> None:
    """The figure the report gives: the extra cost of a clock read over time.time_ns(), with
    and without a file (the leader reads it once per batch, the API once per signed request).
    Best of five runs each, so that a busy machine does not make it flaky."""

    def best_ns(read, n: int = 100_000) -> float:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                read()
            runs.append((time.perf_counter() - started) / n * 1e9)
        return min(runs)

    for with_file in (False, True):
        if with_file:
            put(tmp_path / OFFSET_FILE, "1000")
        clock = WallClock.of_data_dir(tmp_path)
        plain, ours = best_ns(time.time_ns), best_ns(clock.time_ns)
        print(f"file={with_file}: time.time_ns {plain:.0f} ns, WallClock.time_ns {ours:.0f} ns")
        assert ours - plain < 2_000  # a one-command batch's encode and apply alone take ~10 us


# ---------------------------------------------------------------------- through the log


class MachineRaft:
    """A one-node RaftPort whose log is an ExchangeMachine: a proposal applies at once."""

    def __init__(self) -> None:
        self.machine = ExchangeMachine()
        self.stamps: list[int] = []

    def is_leader(self) -> bool:
        return True

    def leader(self) -> str | None:
        return None

    def status(self) -> dict:
        return {}

    def submit(self, payload: bytes, callback) -> None:
        from cluster.batch import decode_batch

        self.stamps.append(decode_batch(payload)[0])
        results = self.machine.apply(payload)
        threading.Thread(target=callback, args=(results, None)).start()


MARKET = {
    "op": "create_market",
    "market": "X-Y",
    "base": "X",
    "quote": "Y",
    "lot_size": 1,
    "tick_size": 1,
    "maker_fee_bps": 0,
    "taker_fee_bps": 0,
}


FUNDING = [
    {"op": "deposit", "account": "a", "asset": asset, "amount": 1_000, "ref": asset}
    for asset in ("X", "Y")
]


def order(i: int) -> dict:
    return {
        "op": "place",
        "account": "a",
        "market": "X-Y",
        "side": "buy" if i % 2 else "sell",
        "type": "limit",
        "price": 10,
        "qty": 1,
        "tif": "gtc",
        "client_order_id": f"c{i}",
    }


def test_a_jumping_leader_clock_never_sends_the_exchange_clock_back() -> None:
    """The leader stamps every batch from its clock, which jumps -60 s, +60 s, -3 s, +3 s...;
    each command gets max(stamp, last ts): event ts never go back along seq, and while the
    clock is behind they stand at the latest stamp."""
    raft = MachineRaft()
    offsets = [0, 0, -60, -60, +60, +60, 0, 0, -3, +3, -3, +3, -60, 0]
    stamps = iter([NOW + k * 10**7 + off * S for k, off in enumerate(offsets)])

    async def main() -> list[list[dict]]:
        replica = Replica(raft, clock_ns=lambda: next(stamps))
        out = []
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            out.append(await replica.submit(MARKET))
            funded = await replica.submit_many(FUNDING)  # one batch
            out.append([e for events in funded for e in events])
            for i in range(len(offsets) - 2):
                out.append(await replica.submit(order(i)))
            nursery.cancel_scope.cancel()
        return out

    answers = trio.run(main)
    assert raft.stamps == [NOW + k * 10**7 + off * S for k, off in enumerate(offsets)]
    events = [e for answer in answers for e in answer]
    assert all(e["type"] != "rejected" for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)  # never back along seq
    # Each command's ts is the highest stamp so far: the +60 s one holds until a later stamp.
    for answer, k in zip(answers, range(len(offsets)), strict=True):
        assert {e["ts"] for e in answer} == {max(raft.stamps[: k + 1])}
    assert raft.machine.exchange.last_ts == NOW + 5 * 10**7 + 60 * S


def test_a_leader_clock_ahead_leaves_the_replay_window_at_the_requests_time() -> None:
    """A request verified a moment before its leader's clock jumps 60 s ahead is stamped after
    the jump. The replay window's clock follows the requests' own timestamps (batch format 3),
    not the stamp: the request applies, and once the leader's clock is healed the next honest
    request does too. (With format 2 the stamp moved the window 60 s ahead and every replica
    refused honest requests as expired for 40 s; `test_machine.py` keeps that rule for old
    journals.)"""
    raft = MachineRaft()
    wall = [NOW]
    offset = [0]

    def leader_clock() -> int:
        return wall[0] + offset[0]

    def request(n: int) -> tuple[str, int]:
        return f"{n:064x}", wall[0] // 1_000_000  # an honest client: the real time

    async def main() -> dict:
        replica = Replica(raft, clock_ns=leader_clock)
        seen = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            await replica.submit(MARKET)
            await replica.submit_many(FUNDING)
            seen["before"] = await replica.submit(order(0), request=request(1))
            offset[0] = 60 * S  # verified a moment ago, stamped after the jump
            seen["at_jump"] = await replica.submit(order(1), request=request(2))
            offset[0] = 0  # healed
            wall[0] += 1 * S
            seen["healed_1s_later"] = await replica.submit(order(2), request=request(3))
            nursery.cancel_scope.cancel()
        return seen

    seen = trio.run(main)
    for name in ("before", "at_jump", "healed_1s_later"):
        assert seen[name][0]["type"] == "accepted", name
    assert raft.machine.window_clock_ms == (NOW + 1 * S) // 1_000_000
    # The exchange's clock is the stamps' (never back): the +60 s stamp holds it.
    assert raft.machine.exchange.last_ts == NOW + 60 * S
