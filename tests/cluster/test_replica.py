"""The trio side of a node: batching, per-caller results, definite vs unknown outcomes.

Against a real single-node RaftReplica (pysyncobj's own thread calls back) and, for the
outcomes a healthy node cannot produce on demand, a fake of our RaftPort interface.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from cluster.batch import decode_batch
from cluster.machine import ExchangeMachine
from cluster.raft import RaftReplica, RaftSettings
from cluster.replica import NotLeader, OutcomeUnknown, Replica, RequestRefused

from .conftest import free_port

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


def solo(data_dir: Path) -> tuple[ExchangeMachine, RaftReplica]:
    machine = ExchangeMachine()
    raft = RaftReplica(
        RaftSettings(
            self_addr=f"127.0.0.1:{free_port()}",
            peers=(),
            password="test-secret",
            data_dir=data_dir,
            fsync=False,
        ),
        machine,
    )
    return machine, raft


async def wait_leader(raft: RaftReplica) -> None:
    with trio.fail_after(10):
        while not raft.is_leader():
            await trio.sleep(0.01)


def test_concurrent_callers_share_batches_and_each_gets_its_own_events(tmp_path: Path) -> None:
    machine, raft = solo(tmp_path)
    threads_seen: set[str] = set()
    machine.add_listener(lambda applied, ex: threads_seen.add(threading.current_thread().name))

    async def main() -> None:
        await wait_leader(raft)
        replica = Replica(raft, batch_window_s=0.002, batch_max=100)
        results: dict[int, list[dict]] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            await replica.submit(MARKET)

            async def one(i: int) -> None:
                results[i] = await replica.submit(
                    {
                        "op": "deposit",
                        "account": f"a{i}",
                        "asset": "Y",
                        "amount": i + 1,
                        "ref": f"r{i}",
                    }
                )

            async with trio.open_nursery() as callers:
                for i in range(300):
                    callers.start_soon(one, i)
            await replica.read_barrier()
            nursery.cancel_scope.cancel()
        for i, events in results.items():
            assert [e["type"] for e in events] == ["balance"]
            assert events[0]["account"] == f"a{i}" and events[0]["available"] == i + 1
        # 301 commands went out in far fewer replicated calls, never more than batch_max each.
        assert replica.batches_proposed < 60
        assert replica.batch_sizes_total == 302  # 301 commands + 1 barrier
        assert machine.exchange.cmd_index == 301

    try:
        trio.run(main)
    finally:
        raft.destroy()
    assert threads_seen and threading.main_thread().name not in threads_seen


def test_the_leader_stamps_ts_and_it_never_goes_back(tmp_path: Path) -> None:
    _, raft = solo(tmp_path)

    async def main() -> None:
        await wait_leader(raft)
        replica = Replica(raft)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            first = await replica.submit({**MARKET, "ts": 4 * 10**18})  # a client ts is ignored
            second = await replica.submit({**MARKET, "market": "X-Z"})
            nursery.cancel_scope.cancel()
        assert first[0]["ts"] < 4 * 10**18
        assert second[0]["type"] == "market_created" and second[0]["ts"] >= first[0]["ts"]

    try:
        trio.run(main)
    finally:
        raft.destroy()


def test_reads_between_ticks_run_on_the_tick_thread_and_report_failures(tmp_path: Path) -> None:
    _, raft = solo(tmp_path)
    outcomes: queue.Queue = queue.Queue()
    try:
        raft.read_between_ticks(
            lambda: threading.current_thread().name,
            lambda result, error: outcomes.put((result, error)),
        )
        name, error = outcomes.get(timeout=10)
        assert error is None and name.startswith("raft-")  # the tick thread ran it
        raft.read_between_ticks(lambda: 1 / 0, lambda result, error: outcomes.put((result, error)))
        result, error = outcomes.get(timeout=10)
        assert result is None and error.definite and "ZeroDivisionError" in str(error)
    finally:
        raft.destroy()


def test_a_signed_request_applies_once_and_its_copies_are_refused(tmp_path: Path) -> None:
    """Through the real log: a second submit of the same signed request (a replay, the first
    copy already applied) is refused by the state machine, one command or a whole batch, and
    nothing of it is applied again."""
    machine, raft = solo(tmp_path)
    order = {
        "op": "place",
        "account": "a",
        "market": "X-Y",
        "side": "buy",
        "type": "limit",
        "price": 1,
        "qty": 1,
        "tif": "gtc",
    }
    deposit = {"op": "deposit", "account": "a", "asset": "Y", "amount": 100, "ref": "r1"}

    async def main() -> None:
        await wait_leader(raft)
        replica = Replica(raft)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            await replica.submit(MARKET)
            await replica.submit(deposit)
            now_ms = time.time_ns() // 1_000_000
            single, batch = ("ab" * 32, now_ms), ("cd" * 32, now_ms)
            first = await replica.submit(dict(order), request=single)
            assert first[0]["type"] == "accepted"
            placed = await replica.submit_many([dict(order), dict(order)], request=batch)
            assert [events[0]["type"] for events in placed] == ["accepted", "accepted"]
            cmd_index = machine.exchange.cmd_index
            with pytest.raises(RequestRefused) as refused:
                await replica.submit(dict(order), request=single)
            assert refused.value.code == "replayed"
            with pytest.raises(RequestRefused):
                await replica.submit_many([dict(order), dict(order)], request=batch)
            with pytest.raises(RequestRefused):  # the window is per request, not per kind
                await replica.submit_many([dict(order)], request=single)
            assert machine.exchange.cmd_index == cmd_index
            assert len(machine.exchange.open_orders(account="a")) == 3
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        raft.destroy()


class FakeRaft:
    """Our RaftPort, scripted: leader or not, and what the callback says (or never says)."""

    def __init__(self, *, leader: bool = True, outcome: str = "ok") -> None:
        self.leader_flag = leader
        self.outcome = outcome
        self.submitted: list[bytes] = []

    def is_leader(self) -> bool:
        return self.leader_flag

    def leader(self) -> str | None:
        return "127.0.0.1:1" if not self.leader_flag else None

    def status(self) -> dict:
        return {}

    def submit(self, payload: bytes, callback) -> None:
        self.submitted.append(payload)
        _, entries = decode_batch(payload)

        class Failure:
            def __init__(self, definite: bool, reason: str) -> None:
                self.definite = definite
                self.reason = reason

        def later() -> None:
            if self.outcome == "ok":
                callback([[{"type": "ok"}] for _ in entries], None)
            elif self.outcome == "leader_changed":
                callback(None, Failure(False, "leader_changed"))
            elif self.outcome == "not_leader":
                callback(None, Failure(True, "not_leader"))
            # "silent": never calls back

        threading.Thread(target=later).start()


@pytest.mark.parametrize(
    ("fake", "expected"),
    [
        (FakeRaft(leader=False), NotLeader),
        (FakeRaft(outcome="not_leader"), NotLeader),
        (FakeRaft(outcome="leader_changed"), OutcomeUnknown),
        (FakeRaft(outcome="silent"), OutcomeUnknown),
    ],
    ids=["follower", "refused", "leader-changed", "timeout"],
)
def test_every_failure_is_definite_or_unknown(fake: FakeRaft, expected: type) -> None:
    async def main() -> None:
        replica = Replica(fake, submit_timeout_s=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            with pytest.raises(expected):
                await replica.submit(MARKET)
            nursery.cancel_scope.cancel()

    trio.run(main)
    if expected is NotLeader and not fake.leader_flag:
        assert fake.submitted == []  # a follower proposes nothing


def test_a_late_result_after_a_timeout_is_harmless() -> None:
    fake = FakeRaft(outcome="silent")

    async def main() -> None:
        replica = Replica(fake, submit_timeout_s=0.1)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            with pytest.raises(OutcomeUnknown):
                await replica.submit(MARKET)
            fake.outcome = "ok"
            assert (await replica.submit(MARKET)) == [{"type": "ok"}]
            nursery.cancel_scope.cancel()

    trio.run(main)


class ManualRaft(FakeRaft):
    """A leader whose outcomes the test releases by hand, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: list = []

    def submit(self, payload: bytes, callback) -> None:
        self.submitted.append(payload)
        self.callbacks.append((len(decode_batch(payload)[1]), callback))

    def release(self) -> None:
        entries, callback = self.callbacks.pop(0)
        callback([[{"type": "ok"}] for _ in range(entries)], None)


def test_at_most_max_in_flight_batches_and_the_rest_go_out_together() -> None:
    """An idle replica proposes a command at once; while the pipeline is full, what arrives
    waits and then goes out as one batch."""
    raft = ManualRaft()

    async def main() -> None:
        replica = Replica(raft, max_in_flight=1)
        results: list = []

        async def one(i: int) -> None:
            results.append((i, await replica.submit({**MARKET, "market": f"M{i}"})))

        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            nursery.start_soon(one, 0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(raft.submitted) == 1  # proposed at once, no window
            for i in range(1, 6):
                nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(raft.submitted) == 1  # the pipeline is full: they wait
            raft.release()
            await trio.testing.wait_all_tasks_blocked()
            assert len(raft.submitted) == 2
            assert sorted(e[1]["market"] for e in decode_batch(raft.submitted[1])[1]) == [
                f"M{i}" for i in range(1, 6)
            ]
            raft.release()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(i for i, _ in results) == list(range(6))
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_batch_that_never_resolves_does_not_wedge_the_pipeline() -> None:
    raft = ManualRaft()

    async def main() -> None:
        replica = Replica(raft, max_in_flight=1, submit_timeout_s=0.2)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            with pytest.raises(OutcomeUnknown):
                await replica.submit(MARKET)  # its callback never comes
            async with trio.open_nursery() as inner:
                outcome: list = []

                async def second() -> None:
                    outcome.append(await replica.submit({**MARKET, "market": "X-Z"}))

                inner.start_soon(second)
                with trio.fail_after(5):
                    while len(raft.submitted) < 2:
                        await trio.sleep(0.01)
                raft.callbacks.pop(0)  # the lost one
                raft.release()
            assert outcome == [[{"type": "ok"}]]
            nursery.cancel_scope.cancel()

    trio.run(main)
