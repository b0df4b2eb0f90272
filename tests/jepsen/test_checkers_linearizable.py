"""The generic linearizability checker: known-good and known-bad histories of a register and a
counter, and agreement with a dumb search over every order (STYLE.md 6) on small ones."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from jepsen.checkers import UNKNOWN, check_all, linearizable
from jepsen.checkers.linearizable import NO, Model, counter, register
from jepsen.history import Op, write_log

INF = 10**18

# An op as a test writes it: (process, f, input, output, invoked, completed, type).
Spec = tuple[int, str, Any, Any, int, int | None, str]


def history(*specs: Spec) -> list[Op]:
    """Ops from (process, f, input, output, invoked, completed or None, ok|info|fail)."""
    lines = []
    for n, (process, f, given_, got, start, end, kind) in enumerate(specs):
        lines.append((start, 0, n, "invoke", process, f, given_, None))
        if end is not None:
            lines.append((end, 1, n, kind, process, f, got if kind == "ok" else None, None))
    lines.sort(key=lambda line: line[:3])
    out: list[Op] = []
    invokes: dict[int, int] = {}
    for t, _, n, kind, process, f, value, _ in lines:
        if kind == "invoke":
            invokes[n] = len(out)
        out.append(
            Op(
                index=len(out),
                type=kind,
                process=process,
                f=f,
                value=value,
                time=t,
                invoke_index=None if kind == "invoke" else invokes[n],
            )
        )
    return out


def w(p: int, v: Any, start: int, end: int | None, kind: str = "ok", key: Any = None) -> Spec:
    given_ = {"value": v} if key is None else {"key": key, "value": v}
    return (p, "write", given_, {}, start, end, kind)


def r(p: int, v: Any, start: int, end: int, key: Any = None) -> Spec:
    return (p, "read", None if key is None else {"key": key}, {"value": v}, start, end, "ok")


def cas(p: int, old: Any, new: Any, start: int, end: int | None, kind: str = "ok") -> Spec:
    return (p, "cas", {"from": old, "to": new}, {}, start, end, kind)


def verdict(specs: list[Spec] | tuple[Spec, ...], model: Model | None = None) -> Any:
    return linearizable.check(history(*specs), model=model).valid


# ---------------------------------------------------------------------- register


def test_sequential_register() -> None:
    assert verdict([w(0, 1, 0, 1), r(0, 1, 2, 3), w(0, 2, 4, 5), r(0, 2, 6, 7)]) is True
    assert verdict([r(0, None, 0, 1)]) is True  # the initial value
    assert verdict([]) is True


def test_a_value_never_written() -> None:
    result = linearizable.check(history(w(0, 1, 0, 1), r(1, 3, 2, 3)))
    assert result.valid is False
    assert result.kinds() == {"nonlinearizable"}
    assert result.anomalies[0]["op_indexes"] == [3]  # the read's completion
    assert "cannot take effect" in result.anomalies[0]["message"]


def test_a_stale_read_and_a_concurrent_one() -> None:
    # The write completed before the read began: the read must see it.
    assert verdict([w(0, 1, 0, 1), w(0, 2, 2, 3), r(1, 1, 4, 5)]) is False
    # Overlapping the second write, either value will do.
    assert verdict([w(0, 1, 0, 1), w(0, 2, 2, 6), r(1, 1, 4, 5)]) is True
    assert verdict([w(0, 1, 0, 1), w(0, 2, 2, 6), r(1, 2, 4, 5)]) is True
    # Two reads in a row cannot go back: new, then old.
    assert verdict([w(0, 1, 0, 1), w(0, 2, 2, 9), r(1, 2, 3, 4), r(2, 1, 5, 6)]) is False


def test_an_info_write_may_or_may_not_have_taken_effect() -> None:
    base = [w(0, 1, 0, 1), w(1, 2, 2, 3, kind="info")]
    assert verdict([*base, r(2, 1, 10, 11)]) is True  # it never took effect
    assert verdict([*base, r(2, 2, 10, 11)]) is True  # it did
    assert verdict([*base, r(2, 2, 10, 11), r(2, 1, 12, 13)]) is False  # not both
    # An invoke never completed is the same as info, and takes effect only after its invoke.
    assert verdict([w(0, 1, 0, 1), w(1, 2, 5, None), r(2, 2, 6, 7)]) is True
    assert verdict([w(0, 1, 0, 1), r(2, 2, 2, 3), w(1, 2, 5, None)]) is False


def test_a_failed_write_never_took_effect() -> None:
    assert verdict([w(0, 1, 0, 1), w(1, 2, 2, 3, kind="fail"), r(2, 1, 4, 5)]) is True
    assert verdict([w(0, 1, 0, 1), w(1, 2, 2, 3, kind="fail"), r(2, 2, 4, 5)]) is False


def test_compare_and_set() -> None:
    assert verdict([w(0, 1, 0, 1), cas(0, 1, 2, 2, 3), r(0, 2, 4, 5)]) is True
    assert verdict([w(0, 1, 0, 1), cas(0, 3, 2, 2, 3)]) is False  # swapped from a 3?
    # Two concurrent cas from the same value cannot both succeed.
    assert verdict([w(0, 1, 0, 1), cas(1, 1, 2, 2, 5), cas(2, 1, 3, 2, 5)]) is False
    assert verdict([w(0, 1, 0, 1), cas(1, 1, 2, 2, 5), cas(2, 2, 3, 2, 5)]) is True
    # An unknown cas: it swapped, or it did not.
    assert verdict([w(0, 1, 0, 1), cas(1, 1, 2, 2, 3, kind="info"), r(2, 2, 4, 5)]) is True
    assert verdict([w(0, 1, 0, 1), cas(1, 1, 2, 2, 3, kind="info"), r(2, 1, 4, 5)]) is True


def test_keys_are_independent_partitions() -> None:
    # Per key each is fine; taken as one register it would not be.
    specs = [w(0, 1, 0, 1, key="x"), w(1, 2, 0, 1, key="y"), r(0, 1, 2, 3, key="x")]
    result = linearizable.check(history(*specs, r(1, 2, 2, 3, key="y")))
    assert result.valid is True and result.stats["partitions"] == 2
    result = linearizable.check(history(*specs, r(1, 1, 2, 3, key="y")))
    assert result.valid is False and "partition 'y'" in result.anomalies[0]["message"]


# ---------------------------------------------------------------------- counter


def add(p: int, delta: int, start: int, end: int | None, kind: str = "ok") -> Spec:
    return (p, "add", {"delta": delta}, {}, start, end, kind)


def test_counter() -> None:
    c = counter()
    base = [add(0, 1, 0, 1), add(1, 2, 2, 3, kind="info")]
    assert verdict([*base, r(2, 1, 4, 5)], c) is True
    assert verdict([*base, r(2, 3, 4, 5)], c) is True
    assert verdict([*base, r(2, 2, 4, 5)], c) is False  # no subset of the adds makes 2
    assert verdict([*base, r(2, 3, 4, 5), r(2, 1, 6, 7)], c) is False
    # Concurrent adds: a read in the middle may see either, or both.
    concurrent = [add(0, 1, 0, 10), add(1, 10, 0, 10)]
    for seen in (0, 1, 10, 11):
        assert verdict([*concurrent, r(2, seen, 1, 2)], c) is True
    assert verdict([*concurrent, r(2, 5, 1, 2)], c) is False


def test_a_custom_model() -> None:
    """Any pure step function: a set with add / contains."""

    def step(state: Any, f: str, given_: Any, got: Any) -> Any:
        if f == "add":
            return state | {given_["x"]}
        return state if got is None or got["yes"] == (given_["x"] in state) else NO

    model = Model("set", frozenset(("add", "contains")), frozenset(), step)
    ok = [
        (0, "add", {"x": 1}, {}, 0, 1, "ok"),
        (1, "contains", {"x": 1}, {"yes": True}, 2, 3, "ok"),
    ]
    assert verdict(ok, model) is True
    bad = [ok[0], (1, "contains", {"x": 1}, {"yes": False}, 2, 3, "ok")]
    assert verdict(bad, model) is False


# ---------------------------------------------------------------------- budget and size


def test_the_time_budget_gives_unknown() -> None:
    """Many concurrent writes and a read of a value none wrote: refuting it means trying
    every order of the writes, far more than the budget allows."""
    writes = [w(p, p, 0, 100) for p in range(24)]
    started = time.monotonic()
    result = linearizable.check(history(*writes, r(99, 999, 1, 99)), time_limit_s=0.2)
    assert time.monotonic() - started < 2
    assert result.valid == UNKNOWN
    assert "time limit" in result.stats["unknown_because"][0]


def test_a_long_valid_history_is_checked_quickly() -> None:
    """A simulated register: 3000 overlapping ops, a few of them info."""
    rng = random.Random(5)
    specs: list[Spec] = []
    value, now = None, 0
    for n in range(3000):
        start = now - rng.randint(0, 40)
        end = now + rng.randint(1, 40)
        now += 10
        kind = "info" if rng.random() < 0.03 else "ok"
        if rng.random() < 0.5:
            value = n
            specs.append(w(1000 + n, n, start, end if kind == "ok" else None, kind))
        else:
            specs.append(r(1000 + n, value, start, end))
    started = time.monotonic()
    assert verdict(specs) is True
    assert time.monotonic() - started < 5


def test_check_all_runs_it_for_register_histories(tmp_path: Path) -> None:
    ops = history(w(0, 1, 0, 1), r(1, 2, 2, 3))
    with open(tmp_path / "history.jsonl", "wb") as out:
        for op in ops:
            out.write(msgspec.json.encode(op) + b"\n")
    write_log(tmp_path / "log.jsonl", [])
    verdict_ = check_all(tmp_path)
    assert verdict_["valid"] is False
    assert verdict_["checkers"]["linearizable-register"]["valid"] is False
    assert verdict_["checkers"]["sequencer"]["valid"] is True


# ---------------------------------------------------------------------- against a dumb search


def brute_force(specs: list[Spec], model: Model) -> bool:
    """Every subset of the unknown ops, in every order that respects real time."""
    known = [s for s in specs if s[6] == "ok"]
    unknown = [s for s in specs if s[6] == "info"]
    for k in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, k):
            ops = known + list(chosen)
            for order in itertools.permutations(ops):
                if _legal(order, model):
                    return True
    return not known and not unknown


def _legal(order: tuple[Spec, ...], model: Model) -> bool:
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            b_end = INF if b[6] != "ok" or b[5] is None else b[5]
            if b_end < a[4]:  # b completed before a began, yet comes after it
                return False
    state = model.init
    for _, f, given_, got, _, _, kind in order:
        state = model.step(state, f, given_, got if kind == "ok" else None)
        if state is NO:
            return False
    return True


@st.composite
def small_histories(draw: st.DrawFn, fs: tuple[str, ...]) -> list[Spec]:
    specs = []
    for p in range(draw(st.integers(1, 6))):
        f = draw(st.sampled_from(fs))
        start = draw(st.integers(0, 12))
        end = start + draw(st.integers(1, 8))
        kind = draw(st.sampled_from(("ok", "ok", "ok", "info", "fail")))
        v = draw(st.integers(0, 2))
        if f == "read":
            seen = draw(
                st.sampled_from((None, 0, 1, 2, 3)) if fs[0] == "write" else st.integers(0, 4)
            )
            specs.append((p, "read", None, {"value": seen}, start, end, "ok"))
        elif f == "write":
            specs.append(w(p, v, start, end, kind))
        elif f == "cas":
            specs.append(cas(p, draw(st.sampled_from((None, 0, 1, 2))), v, start, end, kind))
        else:
            specs.append(add(p, v + 1, start, end, kind))
    return specs


@settings(max_examples=300, deadline=None)
@given(small_histories(("write", "read", "cas")))
def test_register_agrees_with_a_dumb_search(specs: list[Spec]) -> None:
    model = register()
    kept = [s for s in specs if s[6] != "fail"]
    assert verdict(specs, model) is brute_force(kept, model)


@settings(max_examples=200, deadline=None)
@given(small_histories(("add", "read")))
def test_counter_agrees_with_a_dumb_search(specs: list[Spec]) -> None:
    model = counter()
    kept = [s for s in specs if s[6] != "fail"]
    assert verdict(specs, model) is brute_force(kept, model)
