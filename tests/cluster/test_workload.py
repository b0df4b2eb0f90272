"""The shared workloads (cluster/workload.py): the seeded flows stay what they were (the pinned
digests were taken of the copies they replaced: loadgen's plan, bench/flow.py), and the
waiting helper and the figures do what their users rely on."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict

import pytest

from cluster.workload import (
    DEFAULT_MARKET,
    PROFILES,
    Mix,
    Operation,
    book_commands,
    book_flow,
    book_setup,
    command_of,
    endless,
    funding_commands,
    market_spec,
    percentile,
    plan,
    wait_for,
)


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- the seeded flows


def test_plan_is_loadgens_flow_as_it_was() -> None:
    ops = plan(7, 50.0, 20.0, 8, DEFAULT_MARKET)
    assert digest([asdict(op) for op in ops]) == "61f04ba0bb77a0c2"
    assert ops == plan(7, 50.0, 20.0, 8, DEFAULT_MARKET)
    assert ops != plan(8, 50.0, 20.0, 8, DEFAULT_MARKET)


def test_the_book_flow_is_the_benchmarks_flow_as_it_was() -> None:
    assert digest(asdict(book_flow(3000, seed=1))) == "05a443e331305f43"
    assert digest(asdict(book_flow(1000, PROFILES["deep"], seed=1))) == "a1038b5ae2030c9f"
    small = book_flow(1500, seed=3, warmup=1500, accounts=40)  # the indexer tests' session
    assert digest(asdict(small)) == "92cf9d849c417a3d"
    commands = book_setup(small.accounts) + book_commands(small.warmup + small.ops, 10)
    assert digest(commands) == "9e427168e1f5b041"


def test_endless_starts_as_plan_and_goes_on() -> None:
    ops = [op for _, op in zip(range(2500), endless(7, 50.0, 8, DEFAULT_MARKET), strict=False)]
    assert ops[:1000] == plan(7, 50.0, 1000 / 50.0, 8, DEFAULT_MARKET)
    assert [op.index for op in ops] == list(range(2500))
    assert all(op.at_s == pytest.approx(op.index / 50.0) for op in ops)
    places = {op.index for op in ops if op.op == "place"}
    cancels = [op for op in ops if op.op == "cancel"]
    assert all(op.target in places and op.target < op.index for op in cancels)
    assert any(op.index >= 2000 for op in cancels)


def test_a_mix_of_resting_orders_never_crosses() -> None:
    resting = Mix(0.0, 0.0, offset_ticks=(100, 149), limit_qty=(1, 1), tifs=("gtc",))
    ops = plan(1, 100.0, 5.0, 4, DEFAULT_MARKET, resting)
    mid = resting.mid_ticks * DEFAULT_MARKET["tick_size"]
    assert {op.op for op in ops} == {"place"}
    assert all(op.fields["tif"] == "gtc" and op.fields["qty"] == 1 for op in ops)
    assert all((op.fields["price"] < mid) == (op.fields["side"] == "buy") for op in ops)


def test_an_operation_as_a_raw_command() -> None:
    place = Operation(3, 0.0, 1, "place", {"market": "M", "side": "buy", "type": "market"})
    cancel = Operation(4, 0.0, 1, "cancel", {"market": "M"}, target=3)
    assert command_of(place, "bob", lambda i: f"o{i}") == {
        "op": "place", "account": "bob", "market": "M", "side": "buy", "type": "market",
        "client_order_id": "o3",
    }  # fmt: skip
    assert command_of(cancel, "bob", lambda i: f"o{i}") == {
        "op": "cancel", "account": "bob", "market": "M", "client_order_id": "o3",
    }  # fmt: skip


def test_funding_commands_create_then_fund_in_order() -> None:
    market = market_spec("ZZ-USD")
    assert (market["market"], market["base"]) == ("ZZ-USD", "ZZ")
    cmds = funding_commands([market], ["a", "b"], {"USD": 5, "ZZ": 7}, "{asset}-{i}", ts=9)
    assert cmds[0] == {"op": "create_market", "ts": 9, **market}
    assert [(c["account"], c["asset"], c["amount"], c["ref"]) for c in cmds[1:]] == [
        ("a", "USD", 5, "USD-0"),
        ("a", "ZZ", 7, "ZZ-0"),
        ("b", "USD", 5, "USD-1"),
        ("b", "ZZ", 7, "ZZ-1"),
    ]
    assert "ts" not in funding_commands([market], ["a"], {"USD": 1}, "{account}")[1]


# ---------------------------------------------------------------------- waiting and figures


def test_wait_for_returns_the_first_true_value() -> None:
    answers = iter([None, 0, [], "yes"])
    assert wait_for(lambda: next(answers), 5, "an answer", interval_s=0.001) == "yes"


def test_wait_for_names_what_it_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"after 0\.05 s waiting for the impossible"):
        wait_for(lambda: False, 0.05, "the impossible", interval_s=0.01)
    assert time.monotonic() - started >= 0.05


def test_wait_for_lets_the_predicate_end_the_wait() -> None:
    def broken() -> bool:
        raise RuntimeError("the load failed")

    with pytest.raises(RuntimeError, match="the load failed"):
        wait_for(broken, 5, "anything")


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) == 0.0
