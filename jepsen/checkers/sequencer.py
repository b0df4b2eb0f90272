"""Sequencer: does the committed log account for every write the clients saw?

Replays the log through the exchange and checks:

- `log_gap`: the log's cmd_indexes run 1, 2, 3, ... with nothing missing or out of place;
- `lost_write`: every ok write has an effective command in the log (by its key);
- `result_mismatch`: that command, replayed, gives exactly the answer the client got (order
  id, status, filled quantity, trades, events in the same private view, seq), at the
  cmd_index the answer names; an ok reporting a rejection in the log (`{"rejected": reason,
  "seq"}`, jepsen/client.py) finds that rejection of its own command at that seq;
- `realtime_violation`: if write A completed before write B was invoked, A's cmd_index <
  B's (rejections included; B may also be an info write the log shows applied);
- `failed_write_present`: a write that failed (definitely not applied) took no effect;
- `info_applied_twice`, `duplicate_write`: a write took effect at most once.

It cannot see: writes without an idempotency key that ended fail or info (amend, cancel_all);
an ok answer recovered by the SDK's outcome look-up (no events: only its order id is
compared, counted in `stats["recovered"]`); anything about reads (see `reads.py`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from statemachine import Exchange

from ..history import FAIL, OK, Op
from .replay import (
    ExchangeFactory,
    History,
    Log,
    LogIndex,
    account_of,
    claim,
    kinds_of,
    load_history,
    load_log,
    rejection,
    replay,
    reported_cmd_index,
    summarize,
    write_pairs,
)
from .result import MAX_ANOMALIES, Findings, Result, ref

NAME = "sequencer"
COMPARED = ("order_id", "client_order_id", "status", "filled_qty", "trades", "events", "seq")


def check(
    history: History,
    log: Log = None,
    *,
    max_anomalies: int = MAX_ANOMALIES,
    exchange_factory: ExchangeFactory = Exchange,
) -> Result:
    ops = load_history(history)
    entries = load_log(log)
    found = Findings(NAME, max_anomalies)
    writes = write_pairs(ops)
    stats: dict[str, Any] = {
        "writes": len(writes),
        "ok": sum(1 for _, d in writes if d is not None and d.type == OK),
        "rejected_in_log": sum(1 for _, d in writes if rejection(d) is not None),
        "fail": sum(1 for _, d in writes if d is not None and d.type == FAIL),
        "info": sum(1 for _, d in writes if d is None or d.type not in (OK, FAIL)),
    }
    if entries is None:
        found.undecided("no log to replay")
        return found.result(stats)

    # The replay: each command's events; which took effect, by key; the rejections, by seq.
    steps = []
    index = LogIndex()
    for step, _ in replay(entries, exchange_factory):
        if step.logged_index != step.position:
            found.add(
                "log_gap",
                [],
                f"log line {step.position} has cmd_index {step.logged_index}, expected "
                f"{step.position}",
            )
        steps.append(step)
        index.add(step)
    stats["log_commands"] = len(steps)

    claims = claim(writes, index)
    stats["unkeyed_writes"] = claims.unkeyed
    stats["recovered"] = 0
    for invoke, acked in claims.lost:
        reported = reported_cmd_index(acked.value)
        where = "" if reported is None else f" (its answer names cmd_index {reported})"
        found.add(
            "lost_write",
            [acked.index],
            f"{invoke.f} {_describe(invoke)} was acknowledged{where} but the log has no "
            "effective command for it",
        )
    for ops_of_key, extra in claims.unaccounted:
        kinds = kinds_of(ops_of_key)
        indexes = [ref(i, d) for i, d in ops_of_key]
        what = _describe(ops_of_key[0][0])
        if FAIL in kinds:
            kind, why = "failed_write_present", "failed (definitely not applied) but"
        elif "info" in kinds:
            kind, why = "info_applied_twice", "had an unknown outcome and"
        else:
            kind, why = "duplicate_write", "was acknowledged and"
        found.add(
            kind,
            indexes,
            f"{ops_of_key[0][0].f} {what} {why} took effect at cmd_index "
            f"{', '.join(map(str, extra))} beyond what its ok/info ops account for",
        )

    for invoke, said, rejected in claims.unreproduced:
        value = said.value or {}
        there = (
            "no rejection there"
            if rejected is None
            else f"{rejected.command.get('op')} {rejected.events[0].get('reason')} at "
            f"cmd_index {rejected.position}"
        )
        found.add(
            "result_mismatch",
            [said.index],
            f"{invoke.f} {_describe(invoke)} was rejected ({value.get('rejected')}) at seq "
            f"{value.get('seq')}; the log has {there}",
        )

    # Each ok write's answer against the replay at its command.
    lost = {invoke.index for invoke, _ in claims.lost}
    for invoke, done in writes:
        if done is None or done.type != OK or rejection(done) is not None:
            continue
        position = claims.positions.get(invoke.index)
        if position is None:
            reported = reported_cmd_index(done.value)
            if invoke.index not in lost and reported is not None:
                found.add(
                    "lost_write",
                    [done.index],
                    f"{invoke.f} was acknowledged at cmd_index {reported}, beyond the log's "
                    f"end {len(steps)}",
                )
            continue
        _compare(found, stats, invoke, done, steps[position - 1])

    _realtime(found, writes, claims.positions)
    return found.result(stats)


def _describe(invoke: Op) -> str:
    value = invoke.value or {}
    shown = {
        k: value[k]
        for k in ("account", "market", "client_order_id", "ref", "asset", "amount")
        if k in value
    }
    return " ".join(f"{k}={v}" for k, v in shown.items())


def _compare(found: Findings, stats: dict, invoke: Op, done: Op, step: Any) -> None:
    got = done.value if isinstance(done.value, dict) else {}
    reported = reported_cmd_index(got)
    if reported is not None and reported != step.position:
        found.add(
            "result_mismatch",
            [done.index],
            f"{invoke.f} {_describe(invoke)} was acknowledged at cmd_index {reported}, but the "
            f"log applied it at {step.position}",
        )
        return
    if step.command.get("op") != invoke.f:
        found.add(
            "result_mismatch",
            [done.index],
            f"{invoke.f} was acknowledged at cmd_index {step.position}, which is a "
            f"{step.command.get('op')!r} in the log",
        )
        return
    if not step.effective:
        found.add(
            "result_mismatch",
            [done.index],
            f"{invoke.f} {_describe(invoke)} was acknowledged, but the log's command at "
            f"cmd_index {step.position} replays as rejected ({step.events[0].get('reason')})",
        )
        return
    expected = summarize(step.events, account_of(invoke.f, invoke.value))
    if "events" not in got:
        # An answer recovered by the outcome look-up: all it says is the order's id.
        stats["recovered"] += 1
        fields = [k for k in ("order_id",) if k in got]
    else:
        fields = [k for k in COMPARED if k in expected]
    differ = [k for k in fields if got.get(k, _MISSING) != expected[k]]
    if differ:
        details = "; ".join(
            f"{k}: acknowledged {_short(got.get(k, '<missing>'))}, log gives {_short(expected[k])}"
            for k in differ
        )
        found.add(
            "result_mismatch",
            [done.index],
            f"{invoke.f} {_describe(invoke)} at cmd_index {step.position}: {details}",
        )


_MISSING = object()


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _realtime(
    found: Findings, writes: list[tuple[Op, Op | None]], positions: dict[int, int]
) -> None:
    """A write that completed before another was invoked has the smaller cmd_index.

    One sweep: writes by invoke time, against the ok writes completed before it (the one
    with the largest cmd_index among them is the witness)."""
    completed = sorted(
        (
            (done.time, positions[invoke.index], invoke, done)
            for invoke, done in writes
            if done is not None and done.type == OK and invoke.index in positions
        ),
        key=lambda c: c[:2],
    )
    times = [c[0] for c in completed]
    applied = sorted(
        (
            (invoke.time, positions[invoke.index], invoke, done)
            for invoke, done in writes
            if invoke.index in positions
        ),
        key=lambda c: c[:2],
    )
    best: tuple[int, Op, Op] | None = None  # (cmd_index, invoke, done) of the max so far
    taken = 0
    for invoked_at, position, invoke, done in applied:
        upto = bisect_left(times, invoked_at)  # completions strictly before this invoke
        while taken < upto:
            _, earlier, a_invoke, a_done = completed[taken]
            if best is None or earlier > best[0]:
                best = (earlier, a_invoke, a_done)
            taken += 1
        if best is not None and best[0] > position:
            earlier, a_invoke, a_done = best
            found.add(
                "realtime_violation",
                [a_done.index, ref(invoke, done)],
                f"{a_invoke.f} (op {a_done.index}) completed before {invoke.f} (op "
                f"{invoke.index}) was invoked, yet has cmd_index {earlier} > {position}",
            )
