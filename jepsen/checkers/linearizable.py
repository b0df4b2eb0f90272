"""A generic linearizability checker: Wing & Gong's search with Lowe's memoization, split
into independent partitions (Porcupine's P-compositionality), under a time budget.

A `Model` is a pure step function over hashable states: `step(state, f, input, output)`
returns the next state, or `NO` when the op cannot have returned `output` in `state`.
`output` is None for an op whose outcome is unknown (info, or never completed): such an op
may take effect at any point after its invoke, or never. Failed ops never took effect and
are left out.

The search (per partition): entries are the ops' calls and returns in time order, in a
linked list. Walking from the head, a call is tried: if the model accepts it, and the pair
(set of ops linearized, state) was not met before, it is linearized (lifted out of the
list, with its return) and the walk starts again from the head; reaching a return whose op
is not linearized means the choices so far are wrong, so the last one is undone and the walk
goes on after it. Success is every ok op linearized; exhausting the choices proves the
partition not linearizable; the budget running out makes the verdict "unknown".

Models here: `register()` (read / write / cas, keyed by `value["key"]` if given) and
`counter()` (add / read).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from ..history import FAIL, OK, Op, pairs
from .replay import History, Log, load_history
from .result import MAX_ANOMALIES, Findings, Result

NAME = "linearizable"
_CHECK_EVERY = 256  # search steps between looks at the clock

Step = Callable[[Hashable, str, Any, Any], Any]  # -> the next state, or NO


@dataclass(frozen=True)
class Model:
    name: str
    fs: frozenset[str]  # the ops (`f`) it models; others in the history are ignored
    init: Hashable
    step: Step
    partition: Callable[[Op], Hashable] = lambda op: None
    describe: Callable[[Hashable], str] = repr


NO = object()  # what a step returns to refuse (None may be a legal state)


def register(initial: Any = None) -> Model:
    """A register per `value["key"]` (one if absent): write {value}, read -> {value},
    cas {from, to} (an ok cas swapped; a cas that did not swap is a fail)."""

    def step(state: Any, f: str, given: Any, got: Any) -> Any:
        given = given or {}
        if f == "write":
            return given.get("value")
        if f == "read":
            if got is None or got.get("value") == state:
                return state
            return NO
        if f == "cas":
            # Ok: it swapped. Unknown: if it took effect here, it swapped (a cas that
            # does not swap changes nothing, the same as not taking effect).
            return given.get("to") if state == given.get("from") else NO
        return NO

    return Model(
        "register",
        frozenset(("read", "write", "cas")),
        initial,
        step,
        partition=lambda op: (op.value or {}).get("key"),
    )


def counter(initial: int = 0) -> Model:
    """A counter per `value["key"]`: add {delta}, read -> {value}."""

    def step(state: Any, f: str, given: Any, got: Any) -> Any:
        if f == "add":
            return state + (given or {}).get("delta", 0)
        if f == "read":
            return state if got is None or got.get("value") == state else NO
        return NO

    return Model(
        "counter",
        frozenset(("add", "read")),
        initial,
        step,
        partition=lambda op: (op.value or {}).get("key"),
    )


class _Entry:
    """A call (its `match` is its return, or None for an op that never returned) or a
    return, in the doubly linked list of a partition."""

    __slots__ = ("call", "id", "match", "next", "op", "prev")

    def __init__(self, id: int, op: Any, call: bool) -> None:
        self.id = id
        self.op = op
        self.call = call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


@dataclass
class _Op:
    invoke: Op
    done: Op | None
    output: Any  # None: unknown

    @property
    def ref(self) -> int:
        return self.invoke.index if self.done is None else self.done.index


class _OutOfTime(Exception):
    pass


def check(
    history: History,
    log: Log = None,
    *,
    model: Model | None = None,
    time_limit_s: float = 10.0,
    max_anomalies: int = MAX_ANOMALIES,
) -> Result:
    """Is the history of `model.fs` ops linearizable? (`log` is not used: the model is the
    specification.) The time limit is shared by all partitions."""
    model = register() if model is None else model
    ops = load_history(history)
    found = Findings(NAME, max_anomalies)
    parts: dict[Hashable, list[_Op]] = {}
    for invoke, done in pairs(ops):
        if invoke.f not in model.fs or (done is not None and done.type == FAIL):
            continue
        output = done.value if done is not None and done.type == OK else None
        if output is None and done is not None and done.type == OK:
            output = {}
        parts.setdefault(model.partition(invoke), []).append(_Op(invoke, done, output))
    deadline = time.monotonic() + time_limit_s
    stats: dict[str, Any] = {
        "model": model.name,
        "ops": sum(len(p) for p in parts.values()),
        "partitions": len(parts),
        "states_explored": 0,
    }
    for key, part in sorted(parts.items(), key=lambda kv: repr(kv[0])):
        try:
            ok, explored, witness = _search(model, part, deadline)
        except _OutOfTime:
            found.undecided(f"time limit of {time_limit_s} s reached in partition {key!r}")
            break
        stats["states_explored"] += explored
        if not ok:
            assert witness is not None
            stuck, linearized, state = witness
            found.add(
                "nonlinearizable",
                [stuck.ref, *(o.ref for o in part if _concurrent(o, stuck))],
                f"partition {key!r}: after the longest linearization found ({linearized} ops, "
                f"state {model.describe(state)}), op {stuck.ref} ({stuck.invoke.f} "
                f"{stuck.invoke.value} -> {stuck.output}) cannot take effect",
            )
    return found.result(stats)


def _concurrent(a: _Op, b: _Op) -> bool:
    a_end = a.done.time if a.done is not None and a.output is not None else float("inf")
    b_end = b.done.time if b.done is not None and b.output is not None else float("inf")
    return a is not b and a.invoke.time <= b_end and b.invoke.time <= a_end


def _search(
    model: Model, part: list[_Op], deadline: float
) -> tuple[bool, int, tuple[_Op, int, Hashable] | None]:
    """(linearizable?, states explored, on failure: the op stuck at the deepest point)."""
    events: list[tuple[int, int, int, _Entry]] = []
    for i, op in enumerate(part):
        call = _Entry(i, op, True)
        events.append((op.invoke.time, 0, i, call))
        if op.output is not None:
            assert op.done is not None
            ret = _Entry(i, op, False)
            call.match = ret
            # At equal times calls go first: the two ops then count as concurrent.
            events.append((op.done.time, 1, i, ret))
    events.sort(key=lambda e: e[:3])
    head = _Entry(-1, None, True)
    last = head
    for *_, linked in events:
        last.next = linked
        linked.prev = last
        last = linked

    must = sum(1 for op in part if op.output is not None)
    done_count = 0
    state: Hashable = model.init
    linearized = 0  # bitset of op ids
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Entry, Hashable]] = []
    deepest: tuple[_Op, int, Hashable] | None = None
    steps = 0
    entry: _Entry | None = head.next
    while done_count < must:
        steps += 1
        if steps % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _OutOfTime
        if entry is None:
            # Every entry left is the call of an op with an unknown outcome (a return would
            # have stopped the walk), so every ok op is linearized: cannot happen here.
            break
        if entry.call:
            op = entry.op
            after = model.step(state, op.invoke.f, op.invoke.value, op.output)
            if after is not NO:
                key = (linearized | (1 << entry.id), after)
                if key not in seen:
                    seen.add(key)
                    stack.append((entry, state))
                    state = after
                    linearized |= 1 << entry.id
                    if op.output is not None:
                        done_count += 1
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # A return whose op is not linearized yet: this branch is dead.
        if deepest is None or len(stack) > deepest[1]:
            deepest = (entry.op, len(stack), state)
        if not stack:
            return False, len(seen), deepest
        entry, state, linearized, done_count = _undo(stack, linearized, done_count)
        entry = entry.next
    if done_count == must:
        return True, len(seen), None
    return False, len(seen), deepest


def _undo(
    stack: list[tuple[_Entry, Hashable]], linearized: int, done_count: int
) -> tuple[_Entry, Hashable, int, int]:
    entry, state = stack.pop()
    linearized &= ~(1 << entry.id)
    if entry.op.output is not None:
        done_count -= 1
    _unlift(entry)
    return entry, state, linearized, done_count


def _lift(entry: _Entry) -> None:
    entry.prev.next = entry.next  # type: ignore[union-attr]
    if entry.next is not None:
        entry.next.prev = entry.prev
    ret = entry.match
    if ret is not None:
        ret.prev.next = ret.next  # type: ignore[union-attr]
        if ret.next is not None:
            ret.next.prev = ret.prev


def _unlift(entry: _Entry) -> None:
    ret = entry.match
    if ret is not None:
        ret.prev.next = ret  # type: ignore[union-attr]
        if ret.next is not None:
            ret.next.prev = ret
    entry.prev.next = entry  # type: ignore[union-attr]
    if entry.next is not None:
        entry.next.prev = entry
