"""The exchange checkers (sequencer, reads, bank) on hand-made histories: a correct run passes,
and each anomaly is caught on a minimal history that has it. Answers are real: the simulated
cluster (tests/jepsen/__init__.py) applies every command to an `Exchange`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api import trading
from api.sdk import answers
from jepsen.checkers import UNKNOWN, bank, check_all, reads, replay, sequencer
from jepsen.history import LogEntry, Op, read_history
from statemachine import Exchange
from statemachine.order_book import Order

from . import MARKET, Cluster, SimOp

HISTORIES = Path(__file__).parent / "histories"


def run(history: list[Op], log: Any, **options: Any) -> dict[str, Any]:
    return {m.NAME: m.check(history, log, **options) for m in (sequencer, reads, bank)}


def kinds(history: list[Op], log: Any, **options: Any) -> dict[str, set[str]]:
    return {name: r.kinds() for name, r in run(history, log, **options).items()}


def assert_valid(history: list[Op], log: Any) -> None:
    for name, result in run(history, log).items():
        assert result.valid is True, (name, result.anomalies)


def trading_run(
    seed: int = 0, spread: int = 2, *, final: bool = True
) -> tuple[Cluster, dict[str, SimOp]]:
    """Trades, reads, a cancel, and every kind of outcome a client can see."""
    c = Cluster(seed, spread)
    c.setup()
    ops = {
        "sell": c.place("alice", "sell", 100, 5, "a1"),
        "buy": c.place("bob", "buy", 101, 3, "b1"),  # trades 3 at 100
        "book": c.read("read_book", {"market": MARKET, "depth": 10}),
        "balance": c.read("read_balance", {"account": "bob"}),
        "order": c.read("read_order", {"account": "alice", "client_order_id": "a1"}),
        "rest": c.place("carol", "buy", 90, 4, "c1"),
    }
    c.nemesis("kill", "start", nodes=["n2"])
    ops.update(
        cancel=c.cancel("alice", "a1"),
        info=c.place("bob", "buy", 95, 1, "b2", outcome="info"),
        lost=c.place("bob", "buy", 94, 1, "b3", outcome="lost"),
        fail=c.place("bob", "buy", 93, 1, "b4", outcome="fail"),
        rejected=c.place("carol", "buy", 10**6, 10**3, "c2"),  # insufficient funds
        resend=c.place("carol", "sell", 120, 2, "c3", outcome="resend"),
        pending=c.place("alice", "sell", 130, 1, "a2", outcome="pending"),
        deposit=c.write(
            "deposit", {"account": "carol", "asset": "USD", "amount": 5, "ref": "late"}
        ),
        withdraw=c.write(
            "withdraw", {"account": "alice", "asset": "BTC", "amount": 2, "ref": "out"}
        ),
        after=c.read("read_order", {"account": "alice", "client_order_id": "a1"}),
    )
    c.nemesis("kill", "stop", nodes=["n2"])
    if final:
        c.final_reads()
    return c, ops


def minimal() -> tuple[Cluster, SimOp]:
    c = Cluster(spread=1)
    c.setup(accounts=("alice", "bob"))
    return c, c.place("alice", "sell", 100, 5, "a1")


def completion(op: SimOp) -> int:
    return op.history["complete"].index


# ---------------------------------------------------------------------- a correct run


@pytest.mark.parametrize("spread", [0, 1, 3, 8])
def test_a_correct_run_is_valid(spread: int) -> None:
    for seed in range(5):
        c, _ = trading_run(seed, spread)
        assert_valid(c.history(), c.log)


def test_the_stats_count_what_was_checked() -> None:
    c, _ = trading_run()
    results = run(c.history(), c.log)
    s = results["sequencer"].stats
    assert (s["ok"], s["fail"], s["info"]) == (15, 1, 3)  # fail / info, lost, pending
    assert s["rejected_in_log"] == 1
    assert s["recovered"] == 1 and s["log_commands"] == len(c.log)
    assert results["reads"].stats["reads"] == 4
    assert results["bank"].stats["supply"] == {"BTC": 3000 - 2, "USD": 300_005}


def test_without_a_log_the_replaying_checks_say_unknown() -> None:
    c, _ = trading_run()
    for name, result in run(c.history(), None).items():
        assert result.valid == UNKNOWN, name
        assert result.stats["unknown_because"] == ["no log to replay"]


def test_the_checkers_rebuild_answers_with_the_functions_the_api_uses() -> None:
    """One implementation of an answer's shape (api/sdk/answers.py), for the node and for the
    replay: what the checkers expect is what the node answers."""
    assert replay.private_view is answers.private_view
    assert replay.summarize is answers.summarize is trading.summarize
    for seed in range(3):
        c, _ = trading_run(seed)
        ex = Exchange()
        for command in c.log:
            events = ex.apply(command)
            for account in (None, "alice", "bob", "carol"):
                if events[0]["type"] != "rejected":
                    status, body = trading.command_outcome(events, account)
                    assert (status, body) == (200, replay.summarize(events, account))


# ---------------------------------------------------------------------- sequencer


def test_a_lost_acknowledged_write() -> None:
    c, placed = minimal()
    history = c.history()
    found = sequencer.check(history, c.log[:-1])
    assert found.kinds() == {"lost_write"}
    assert found.anomalies[0]["op_indexes"] == [completion(placed)]


def test_an_acknowledged_result_the_log_does_not_reproduce() -> None:
    c, placed = minimal()
    buy = c.place("bob", "buy", 100, 2, "b1")
    buy.result["filled_qty"] = 3
    found = sequencer.check(c.history(), c.log)
    assert found.kinds() == {"result_mismatch"}
    assert "filled_qty: acknowledged 3, log gives 2" in found.anomalies[0]["message"]

    c, placed = minimal()
    placed.result["events"][1]["ts"] += 1  # one event differs, nothing else
    assert sequencer.check(c.history(), c.log).kinds() == {"result_mismatch"}


def test_an_answer_that_names_another_cmd_index() -> None:
    c, placed = minimal()
    for event in placed.result["events"]:
        event["cmd_index"] -= 1
    found = sequencer.check(c.history(), c.log)
    assert found.kinds() == {"result_mismatch"}
    assert "log applied it at" in found.anomalies[0]["message"]


def test_a_recovered_answer_is_checked_by_its_order_id() -> None:
    c, _ = minimal()
    resent = c.place("bob", "buy", 90, 1, "b1", outcome="resend")
    assert_valid(c.history(), c.log)
    resent.result["order_id"] += 5
    assert sequencer.check(c.history(), c.log).kinds() == {"result_mismatch"}


def test_a_realtime_order_violation() -> None:
    c, first = minimal()
    second = c.place("bob", "buy", 90, 1, "b1")
    c.history()
    # The first write (cmd_index n) now starts only after the second (n + 1) completed.
    first.invoke_time = second.complete_time + 10
    first.complete_time = first.invoke_time + 10
    found = sequencer.check(c.render(), c.log)
    assert found.kinds() == {"realtime_violation"}
    assert found.anomalies[0]["op_indexes"] == sorted([completion(first), completion(second)])


def test_an_applied_info_write_is_held_to_realtime_order_too() -> None:
    c, _ = minimal()
    unsure = c.place("bob", "buy", 90, 1, "b1", outcome="info")  # applied at cmd_index n
    later = c.place("alice", "sell", 200, 1, "a2")  # n + 1
    assert_valid(c.history(), c.log)
    unsure.invoke_time = later.complete_time + 1  # invoked after n + 1 completed
    unsure.complete_time = unsure.invoke_time + 10
    found = sequencer.check(c.render(), c.log)
    assert found.kinds() == {"realtime_violation"}
    assert found.anomalies[0]["op_indexes"] == sorted([completion(later), completion(unsure)])


def test_a_failed_write_present_in_the_log() -> None:
    c, placed = minimal()
    placed.type, placed.result = "fail", None
    placed.error = {"code": "not_leader", "message": "said no, did it anyway"}
    found = sequencer.check(c.history(), c.log)
    assert found.kinds() == {"failed_write_present"}
    assert found.anomalies[0]["op_indexes"] == [completion(placed)]


def test_a_rejection_in_the_log_is_a_result_checked_by_its_seq() -> None:
    c, _ = minimal()
    broke = c.place("bob", "buy", 10**6, 10**3, "b1")
    assert broke.result == {"rejected": "insufficient_funds", "seq": broke.result["seq"]}
    assert_valid(c.history(), c.log)
    broke.result["rejected"] = "post_only_would_cross"
    found = sequencer.check(c.history(), c.log)
    assert found.kinds() == {"result_mismatch"}
    assert "the log has place insufficient_funds at cmd_index" in found.anomalies[0]["message"]
    broke.result.update(rejected="insufficient_funds", seq=1)  # the seq of another command
    assert sequencer.check(c.history(), c.log).kinds() == {"result_mismatch"}


def test_a_rejection_recorded_as_a_fail_is_not_a_failed_write_present() -> None:
    """A runner may also record a rejection as fail: it changed nothing, so it is one."""
    c, _ = minimal()
    broke = c.place("bob", "buy", 10**6, 10**3, "b1")
    broke.type, broke.result = "fail", None
    broke.error = {"code": "insufficient_funds", "message": "not enough USD available"}
    assert_valid(c.history(), c.log)


def test_a_rejection_is_held_to_realtime_order() -> None:
    c, _ = minimal()
    broke = c.place("bob", "buy", 10**6, 10**3, "b1")  # rejected at cmd_index n
    later = c.place("alice", "sell", 200, 1, "a2")  # n + 1
    c.history()
    broke.invoke_time = later.complete_time + 1
    broke.complete_time = broke.invoke_time + 10
    found = sequencer.check(c.render(), c.log)
    assert found.kinds() == {"realtime_violation"}


class Forgetful:
    """An exchange that loses its idempotency records before every command (a planted bug):
    a resent place or deposit is applied again."""

    def __init__(self) -> None:
        self.exchange = Exchange()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exchange, name)

    def apply(self, command: dict) -> list[dict]:
        self.exchange.state.coids.clear()
        self.exchange.state.refs.clear()
        return self.exchange.apply(command)


def test_an_info_write_applied_twice() -> None:
    c, _ = minimal()
    unsure = c.place("bob", "buy", 90, 1, "b1", outcome="info")
    c.apply(c.log[-1])  # the resend: a duplicate, rejected by a correct exchange
    assert_valid(c.history(), c.log)
    found = sequencer.check(c.history(), c.log, exchange_factory=Forgetful)
    assert found.kinds() == {"info_applied_twice"}
    assert found.anomalies[0]["op_indexes"] == [completion(unsure)]


def test_an_acknowledged_write_applied_twice() -> None:
    c, _ = minimal()
    c.write("deposit", {"account": "bob", "asset": "USD", "amount": 7, "ref": "r1"})
    c.apply(c.log[-1])
    found = sequencer.check(c.history(), c.log, exchange_factory=Forgetful)
    assert found.kinds() == {"duplicate_write"}


def test_a_gap_in_the_log() -> None:
    c, _ = minimal()
    entries = [LogEntry(n if n < 3 else n + 1, cmd) for n, cmd in enumerate(c.log, 1)]
    found = sequencer.check(c.history(), entries)
    assert found.kinds() == {"log_gap"}
    assert found.stats["anomaly_counts"] == {"log_gap": len(c.log) - 2}


def test_anomalies_are_listed_up_to_a_limit_and_all_counted() -> None:
    c, _ = minimal()
    for n in range(6):
        c.place("bob", "buy", 90 - n, 1, f"b{n}")
    found = sequencer.check(c.history(), c.log[:-6], max_anomalies=2)
    assert found.stats["anomaly_counts"] == {"lost_write": 6}
    assert len(found.anomalies) == 2


# ---------------------------------------------------------------------- reads


def test_a_stale_read() -> None:
    c, _ = minimal()
    c.place("bob", "buy", 100, 2, "b1")  # trades: bob's balances change
    c.barrier()
    stale = c.read("read_balance", {"account": "bob"}, at=len(c.log) - 1)
    c.barrier()
    found = reads.check(c.history(), c.log)
    assert found.kinds() == {"stale_read"}
    assert found.anomalies[0]["op_indexes"] == [completion(stale)]
    assert f"up to cmd_index {len(c.log) - 1}, before its window" in found.anomalies[0]["message"]


def test_a_stale_order_and_book_read() -> None:
    c, _ = minimal()
    c.barrier()
    c.read("read_order", {"account": "alice", "client_order_id": "a1"}, at=len(c.log) - 1)
    c.read("read_book", {"market": MARKET, "depth": 5}, at=len(c.log) - 1)
    c.barrier()
    found = reads.check(c.history(), c.log)
    assert found.kinds() == {"stale_read"}
    assert found.stats["anomaly_counts"] == {"stale_read": 2}


def test_an_impossible_read() -> None:
    c, _ = minimal()
    read = c.read("read_balance", {"account": "alice"})
    read.result["balances"].append({"asset": "ETH", "available": 1, "reserved": 0})
    found = reads.check(c.history(), c.log)
    assert found.kinds() == {"impossible_read"}
    assert "which it never was" in found.anomalies[0]["message"]


def test_a_balance_read_in_the_sdks_shape() -> None:
    c, _ = minimal()
    c.place("bob", "buy", 100, 2, "b1")
    read = c.read("read_balance", {"account": "bob"})
    c.barrier()
    stale = c.read("read_balance", {"account": "bob"}, at=len(c.log) - 1)
    for op in (read, stale):  # as api.sdk's Client.balances() returns it
        op.result = {
            row["asset"]: {"available": row["available"], "reserved": row["reserved"]}
            for row in op.result["balances"]
        }
    found = reads.check(c.history(), c.log)
    assert found.kinds() == {"stale_read"}
    assert found.anomalies[0]["op_indexes"] == [completion(stale)]


def test_a_read_from_the_future() -> None:
    c, placed = minimal()
    read = c.read("read_order", {"account": "alice", "client_order_id": "a1"})
    book = c.read("read_book", {"market": MARKET})
    c.history()
    for op in (read, book):  # both done before the order was even placed
        op.invoke_time, op.complete_time = placed.invoke_time - 20, placed.invoke_time - 10
    found = reads.check(c.render(), c.log)
    assert found.kinds() == {"impossible_read"}
    assert found.stats["anomaly_counts"] == {"impossible_read": 2}
    assert "after its window" in found.anomalies[0]["message"]


def test_a_book_read_whose_seq_and_book_disagree() -> None:
    c, _ = minimal()
    book = c.read("read_book", {"market": MARKET})
    book.result["asks"] = [[100, 4]]
    assert reads.check(c.history(), c.log).kinds() == {"impossible_read"}
    book.result["asks"], book.result["seq"] = [[100, 5]], book.result["seq"] + 1
    assert reads.check(c.history(), c.log).kinds() == {"impossible_read"}


@pytest.mark.parametrize("sees_the_write", [False, True])
def test_a_read_concurrent_with_a_write_may_see_it_or_not(sees_the_write: bool) -> None:
    c, _ = minimal()
    buy = c.place("bob", "buy", 100, 1, "b1")
    read = c.read("read_balance", {"account": "bob"}, at=None if sees_the_write else len(c.log) - 1)
    c.history()
    read.invoke_time, read.complete_time = buy.invoke_time - 5, buy.complete_time + 5
    assert reads.check(c.render(), c.log).valid is True
    read.invoke_time = buy.complete_time + 1  # after the write: it must see it
    assert reads.check(c.render(), c.log).valid is sees_the_write


def test_a_book_read_bounds_the_reads_after_it() -> None:
    """A book read is pinned to one cmd_index; a later read may not go back before it."""
    c, _ = minimal()
    c.place("bob", "buy", 90, 1, "b1", outcome="info")  # no ack: only the book read tells
    c.barrier()
    c.read("read_book", {"market": MARKET})
    c.barrier()
    c.read("read_balance", {"account": "bob"}, at=len(c.log) - 1)
    c.barrier()
    assert reads.check(c.history(), c.log).kinds() == {"stale_read"}


def test_of_two_book_reads_out_of_order_the_later_is_stale() -> None:
    c, _ = minimal()
    c.barrier()
    placed = c.place("bob", "buy", 90, 1, "b1")
    first = c.read("read_book", {"market": MARKET})  # sees it
    second = c.read("read_book", {"market": MARKET}, at=len(c.log) - 1)  # does not
    c.history()
    # Both reads are concurrent with the place, the second starts after the first ended.
    placed.invoke_time, placed.complete_time = 10**6 - 5, 10**6 + 40
    first.invoke_time, first.complete_time = 10**6, 10**6 + 10
    second.invoke_time, second.complete_time = 10**6 + 20, 10**6 + 30
    found = reads.check(c.render(), c.log)
    assert found.kinds() == {"stale_read"}
    assert [a["op_indexes"] for a in found.anomalies] == [[completion(second)]]


# ---------------------------------------------------------------------- bank


class Leaky:
    """An exchange that, on its `at`-th command, credits alice 1 USD from nowhere."""

    def __init__(self, at: int) -> None:
        self.exchange = Exchange()
        self.at = at

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exchange, name)

    def apply(self, command: dict) -> list[dict]:
        events = self.exchange.apply(command)
        if self.exchange.cmd_index == self.at:
            self.exchange.state.balances["alice"]["USD"].available += 1
        return events


def test_broken_conservation() -> None:
    c, _ = minimal()
    found = bank.check(c.history(), c.log, exchange_factory=lambda: Leaky(len(c.log) - 1))
    assert found.kinds() == {"conservation"}
    assert "USD: the replay's final balances sum to 200001" in found.anomalies[0]["message"]


def test_broken_conservation_in_a_final_read() -> None:
    c, _ = minimal()
    (final, *_) = c.final_reads()
    final.result["balances"][0]["reserved"] += 1
    found = bank.check(c.history(), c.log)
    assert found.kinds() == {"conservation"}
    assert found.anomalies[0]["op_indexes"] == [completion(final)]


class Negative:
    """An exchange whose last command reports a negative balance (events only)."""

    def __init__(self) -> None:
        self.exchange = Exchange()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exchange, name)

    def apply(self, command: dict) -> list[dict]:
        events = self.exchange.apply(command)
        if command["op"] == "place":
            for e in events:
                if e["type"] == "balance":
                    e["available"] = -1
        return events


def test_a_negative_balance_breaks_conservation_too() -> None:
    c, placed = minimal()
    found = bank.check(c.history(), c.log, exchange_factory=Negative)
    assert found.kinds() == {"negative_balance", "conservation"}
    assert all(a["op_indexes"] == [completion(placed)] for a in found.anomalies[:2])


class Crossing:
    """An exchange that slips a resting bid above the best ask into the book (a planted bug)."""

    def __init__(self) -> None:
        self.exchange = Exchange()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exchange, name)

    def apply(self, command: dict) -> list[dict]:
        events = self.exchange.apply(command)
        if command["op"] == "place" and command["client_order_id"] == "a1":
            bid = Order(999, "bob", MARKET, "buy", 150, 1, "gtc", "none", None)
            self.exchange.state.markets[MARKET].book.add(bid)
        return events


def test_a_crossed_book() -> None:
    c, placed = minimal()
    found = bank.check(c.history(), c.log, exchange_factory=Crossing)
    assert found.kinds() == {"crossed_book"}
    assert found.anomalies[0]["op_indexes"] == [completion(placed)]
    assert "best bid 150 >= best ask 100" in found.anomalies[0]["message"]


def test_a_crossed_book_read() -> None:
    c, _ = minimal()
    book = c.read("read_book", {"market": MARKET})
    book.result["bids"] = [[100, 1]]
    assert bank.check(c.history(), c.log).kinds() == {"crossed_book"}
    assert reads.check(c.history(), c.log).kinds() == {"impossible_read"}


def test_a_client_order_id_accepted_twice() -> None:
    c, _ = minimal()
    c.place("alice", "sell", 110, 1, "a1")  # the same id: rejected as a duplicate
    c.apply(c.log[-1])
    found = bank.check(c.history(), c.log, exchange_factory=Forgetful)
    assert found.kinds() == {"duplicate_client_order_id"}

    c, placed = minimal()
    again = c.place("alice", "sell", 110, 1, "a1")
    again.type, again.error = "ok", None
    again.result = {**placed.result, "order_id": placed.result["order_id"] + 1}
    found = bank.check(c.history(), c.log)
    assert found.kinds() == {"duplicate_client_order_id"}
    assert found.anomalies[0]["op_indexes"] == [completion(placed), completion(again)]


def test_final_state_hashes() -> None:
    c, _ = minimal()
    one, two, three = c.final_reads()
    assert_valid(c.history(), c.log)
    three.result["state_hash"] = "0" * 64
    found = bank.check(c.history(), c.log)
    assert found.kinds() == {"final_hash_mismatch"}
    # One node differs from the others, and from the replay:
    assert [a["op_indexes"] for a in found.anomalies] == [
        [completion(one), completion(two), completion(three)],
        [completion(three)],
    ]


def test_a_node_behind_is_not_converged_and_a_node_ahead_outruns_the_log() -> None:
    c, _ = minimal()
    behind = Exchange()
    for command in c.log[:-1]:
        behind.apply(command)
    _, _, three = c.final_reads()
    three.result.update(cmd_index=behind.cmd_index, state_hash=behind.state_hash())
    three.result.pop("balances")
    assert bank.check(c.history(), c.log).kinds() == {"final_not_converged"}
    found = bank.check(c.history(), c.log[:-2])
    assert found.kinds() == {"final_not_converged", "log_incomplete"}


# ---------------------------------------------------------------------- check_all and files


def test_check_all_on_a_stored_run(tmp_path: Path) -> None:
    c, ops = trading_run(seed=3)
    history = c.history()
    c.save(tmp_path / "ok", history)
    assert read_history(tmp_path / "ok" / "history.jsonl") == history
    verdict = check_all(tmp_path / "ok")
    assert verdict["valid"] is True
    assert set(verdict["checkers"]) == {"sequencer", "reads", "bank"}
    json.dumps(verdict)  # the report stores it as results.json

    (tmp_path / "ok" / "log.jsonl").unlink()
    assert check_all(tmp_path / "ok")["valid"] == UNKNOWN

    ops["buy"].result["seq"] += 1
    c.save(tmp_path / "bad", c.render())
    verdict = check_all(tmp_path / "bad")
    assert verdict["valid"] is False
    assert verdict["checkers"]["sequencer"]["valid"] is False
    assert verdict["checkers"]["bank"]["valid"] is True


def _fixture_runs() -> dict[str, tuple[Cluster, list[Op]]]:
    """The recorded histories (tests/jepsen/histories/): made by the simulated cluster."""
    runs = {}
    c, _ = trading_run(seed=11, spread=4, final=False)
    for n in range(12):  # a little more trading, across accounts
        account = ("alice", "bob", "carol")[n % 3]
        c.place(account, ("buy", "sell")[n % 2], 95 + n, 1 + n % 4, f"x{n}")
        c.read("read_balance", {"account": account})
    c.final_reads()
    runs["healthy"] = (c, c.history())

    # A follower serving "linearizable" reads from its own lagging state.
    c, _ = trading_run(seed=12, spread=2)
    for n in range(6):
        c.place("bob", "buy", 80 + n, 1, f"y{n}")
        c.barrier()
        c.read("read_balance", {"account": "bob"}, at=len(c.log) - 1)
        c.barrier()
    runs["lagging-reads"] = (c, c.history())

    # A leader that acknowledged writes it never committed: the log lost its tail.
    c, _ = trading_run(seed=13, spread=2, final=False)
    for n in range(4):
        c.place("carol", "sell", 140 + n, 1, f"z{n}")
    history = c.history()
    del c.log[-4:]
    runs["lost-tail"] = (c, history)
    return runs


def _verdict(store: Path) -> dict:
    verdict = check_all(store)
    return {
        "valid": verdict["valid"],
        "anomaly_counts": {
            name: r["stats"]["anomaly_counts"] for name, r in verdict["checkers"].items()
        },
    }


@pytest.mark.parametrize("name", ["healthy", "lagging-reads", "lost-tail"])
def test_recorded_histories(name: str) -> None:
    store = HISTORIES / name
    expected = json.loads((store / "expected.json").read_text())
    assert _verdict(store) == expected


def rewrite_histories() -> None:
    """`python -m tests.jepsen.test_checkers`: record the histories again (review the diff)."""
    import shutil

    for name, (c, history) in _fixture_runs().items():
        store = HISTORIES / name
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        c.save(store, history)
        (store / "expected.json").write_text(json.dumps(_verdict(store), indent=2) + "\n")


def test_recorded_histories_are_what_the_simulation_makes() -> None:
    for name, (c, history) in _fixture_runs().items():
        assert read_history(HISTORIES / name / "history.jsonl") == history, name
        logged = [e.command for e in replay.load_log(HISTORIES / name / "log.jsonl") or []]
        assert logged == c.log, name


if __name__ == "__main__":
    rewrite_histories()
