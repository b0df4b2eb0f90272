"""Property: a history of a correct cluster (sequential execution, random concurrency windows,
every kind of outcome) is always valid; the same history with one planted fault never is."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jepsen.checkers import bank, combine, reads, sequencer
from jepsen.checkers.replay import WRITE_FS, write_key
from statemachine import Exchange

from . import ACCOUNTS, MARKET, Cluster

OUTCOMES = ("ok", "ok", "ok", "ok", "fail", "info", "lost", "pending")

actions = st.one_of(
    st.tuples(
        st.just("place"),
        st.sampled_from(ACCOUNTS),
        st.sampled_from(("buy", "sell")),
        st.integers(95, 105),
        st.integers(1, 6),
        st.sampled_from((*OUTCOMES, "resend")),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 50), st.sampled_from(OUTCOMES)),
    st.tuples(
        st.sampled_from(("deposit", "withdraw")),
        st.sampled_from(ACCOUNTS),
        st.sampled_from(("USD", "BTC")),
        st.integers(1, 500),
        st.sampled_from(OUTCOMES),
    ),
    st.tuples(st.just("read_balance"), st.sampled_from(ACCOUNTS)),
    st.tuples(st.just("read_order"), st.integers(0, 50)),
    st.tuples(st.just("read_book"), st.integers(1, 5)),
    st.tuples(st.just("nemesis"), st.sampled_from(("kill", "pause", "partition"))),
)
workloads = st.tuples(
    st.integers(0, 2**32),  # seed of the windows
    st.integers(0, 6),  # spread: how far windows reach, in ops
    st.lists(actions, min_size=1, max_size=40),
)


def simulate(seed: int, spread: int, script: list[tuple]) -> Cluster:
    c = Cluster(seed, spread)
    c.setup(usd=2_000, btc=20)
    placed: list[tuple[str, str]] = []
    for n, action in enumerate(script):
        kind = action[0]
        if kind == "place":
            _, account, side, price, qty, outcome = action
            c.place(account, side, price, qty, f"o{n}", outcome)
            placed.append((account, f"o{n}"))
        elif kind == "cancel" and placed:
            account, coid = placed[action[1] % len(placed)]
            c.cancel(account, coid, action[2])
        elif kind in ("deposit", "withdraw"):
            _, account, asset, amount, outcome = action
            fields = {"account": account, "asset": asset, "amount": amount, "ref": f"r{n}"}
            c.write(kind, fields, outcome)
        elif kind == "read_balance":
            c.read("read_balance", {"account": action[1]})
        elif kind == "read_order" and placed:
            account, coid = placed[action[1] % len(placed)]
            c.read("read_order", {"account": account, "client_order_id": coid})
        elif kind == "read_book":
            c.read("read_book", {"market": MARKET, "depth": action[1]})
        elif kind == "nemesis":
            c.nemesis(action[1], "start")
            c.nemesis(action[1], "stop")
    c.read("read_balance", {"account": "alice"})
    return c


def verdicts(c: Cluster, history: Any) -> dict[str, Any]:
    return {m.NAME: m.check(history, c.log) for m in (sequencer, reads, bank)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_a_correct_cluster_is_always_valid(workload: tuple) -> None:
    c = simulate(*workload)
    c.final_reads()
    results = verdicts(c, c.history())
    assert combine([r.valid for r in results.values()]) is True, {
        name: r.anomalies for name, r in results.items() if r.valid is not True
    }


FAULTS = (
    "lost_write",
    "result_mismatch",
    "realtime_violation",
    "failed_write_present",
    "stale_read",
    "impossible_read",
    "final_hash_mismatch",
    "conservation",
)
CAUGHT_BY = {
    "lost_write": "sequencer",
    "result_mismatch": "sequencer",
    "realtime_violation": "sequencer",
    "failed_write_present": "sequencer",
    "stale_read": "reads",
    "impossible_read": "reads",
    "final_hash_mismatch": "bank",
    "conservation": "bank",
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads, st.sampled_from(FAULTS), st.randoms(use_true_random=False))
def test_one_planted_fault_is_always_caught(workload: tuple, fault: str, rng: Any) -> None:
    c = simulate(*workload)
    if fault == "stale_read":
        _plant_stale_read(c, rng)
    finals = c.final_reads()
    history = c.history()
    acked = [op for op in c.ops if op.type == "ok" and op.result and "events" in op.result]
    applied = [op for op in acked if op.cmd_index is not None]
    if fault == "lost_write":
        # A write whose command is the only one with its key (a second cancel of the same
        # order, rejected, would take effect in its place: a result_mismatch, also caught).
        keys = Counter(write_key(command["op"], command) for command in c.log)
        victim = rng.choice([op for op in applied if keys[write_key(op.f, op.value)] == 1])
        del c.log[victim.cmd_index - 1]
    elif fault == "result_mismatch":
        rng.choice(acked).result["seq"] += 1
    elif fault == "realtime_violation":
        a, b = sorted(rng.sample(applied, 2), key=lambda op: op.cmd_index)
        a.invoke_time = b.complete_time + 1
        a.complete_time = a.invoke_time + 1
    elif fault == "failed_write_present":
        # A write no other op shares a key with (an info cancel of the same order could be
        # the one that took effect).
        ops_by_key = Counter(write_key(op.f, op.value) for op in c.ops if op.f in WRITE_FS)
        victim = rng.choice([op for op in applied if ops_by_key[write_key(op.f, op.value)] == 1])
        victim.type, victim.result = "fail", None
        victim.error = {"code": "no_leader", "message": "planted"}
    elif fault == "impossible_read":
        read = rng.choice([op for op in c.ops if op.f == "read_balance"])
        read.result["balances"].append({"asset": "XYZ", "available": 1, "reserved": 0})
    elif fault == "final_hash_mismatch":
        rng.choice(finals).result["state_hash"] = "f" * 64
    elif fault == "conservation":
        row = rng.choice(rng.choice(finals).result["balances"])
        row["available"] += rng.choice((-1, 1))
    history = c.render()
    results = verdicts(c, history)
    caught = results[CAUGHT_BY[fault]]
    assert caught.valid is False
    assert fault in caught.kinds(), caught.anomalies


def _plant_stale_read(c: Cluster, rng: Any) -> None:
    """A read served, between two quiet points, from a state older than the last acknowledged
    write, whose answer no state since then gives. (Info writes may take effect after their
    info line: the read's window runs from the last ok write to the log's end.)"""
    start = max(op.logged_at for op in c.ops if op.type == "ok" and op.logged_at is not None)
    candidates = []
    for account in ACCOUNTS:
        answers = []
        replayed = Exchange()
        for command in [None, *c.log]:
            if command is not None:
                replayed.apply(command)
            answers.append(Cluster.answer(replayed, "read_balance", {"account": account}))
        window = answers[start:]
        candidates += [(account, m) for m in range(start) if answers[m] not in window]
    assert candidates  # every account's state 0 (no balance) is gone after its deposits
    account, m = rng.choice(candidates)
    c.barrier()
    c.read("read_balance", {"account": account}, at=m)
    c.barrier()
