"""Linearizable reads: each ok read shows the replayed state at some point of its window.

A read's window is a range of cmd_indexes (the state after that many commands): from the
largest cmd_index of the writes that completed before the read was invoked (and of the book
reads, each pinned to one cmd_index by its `seq`, that completed before it), to one less than
the smallest cmd_index of the writes invoked after the read completed (info writes the log
shows applied included), else the log's end. Writes get their cmd_index from the log (see
`replay.claim`), so a lost write bounds nothing.

One replay pass records, for every key a read asks about, the cmd_indexes where its answer
changed: `read_balance` (account -> its non-zero balances), `read_order` ((account,
client_order_id) -> status, order id, remaining while open). A book read names its `seq`,
which pins it to the one command after which the log stood at that seq; the book is compared
there. Then each read is judged:

- `stale_read`: it matches only states before its window (the message names the newest);
- `impossible_read`: it matches no state of its window nor before it (a value never held,
  or held only later: a read from the future).

It cannot see: a read whose window is empty because writes around it are out of real-time
order (the sequencer reports those; counted in `stats["unjudged"]`); fields of a read_order
answer beyond status, order_id and remaining; reads that failed or ended info.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

from statemachine import Exchange

from ..history import OK, Op, pairs
from .replay import (
    READ_FS,
    ExchangeFactory,
    History,
    Log,
    LogIndex,
    claim,
    load_history,
    load_log,
    replay,
    write_pairs,
)
from .result import MAX_ANOMALIES, Findings, Result

NAME = "reads"
DEFAULT_DEPTH = 50  # the API's, when a book read names none
_ANY = object()  # a read_order answer without `remaining`: any remaining matches


@dataclass
class Read:
    invoke: Op
    done: Op
    key: tuple  # ("balance", account) | ("order", account, coid) | ("book", market, depth)
    want: Any  # the answer in the canonical form of its key's values
    lo: int = 0
    hi: int = 0
    pinned: int | None = None  # book reads: the cmd_index their seq names, if any
    same_book: bool = False  # ... and whether the book there is the one read


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
    reads: list[Read] = []
    for invoke, done in pairs(ops):
        if invoke.f in READ_FS and done is not None and done.type == OK:
            read = _parse(invoke, done)
            if read is None:
                found.add(
                    "impossible_read", [done.index], f"{invoke.f} answer is malformed: {done.value}"
                )
            else:
                reads.append(read)
    stats: dict[str, Any] = {"reads": len(reads), "unjudged": 0}
    if entries is None:
        found.undecided("no log to replay")
        return found.result(stats)

    tracker = _Tracker(reads)
    tracker.start(exchange_factory())
    index = LogIndex()
    for step, exchange in replay(entries, exchange_factory):
        index.add(step)
        tracker.step(step.position, step.events, exchange)
    end = len(entries)
    stats["log_commands"] = end

    writes = write_pairs(ops)
    positions = claim(writes, index).positions
    points = [
        (invoke.time, None if done is None or done.type != OK else done.time, p, True)
        for invoke, done in writes
        if (p := positions.get(invoke.index)) is not None
    ]
    # First the windows from writes alone, to judge the book reads; then the book reads
    # that hold up raise the start of the windows of the reads invoked after them.
    _windows(reads, points, end)
    points += [
        (r.invoke.time, r.done.time, r.pinned, False)
        for r in reads
        if r.key[0] == "book" and r.same_book and r.pinned is not None and r.lo <= r.pinned <= r.hi
    ]
    _windows(reads, points, end)

    histories = tracker.intervals(end)
    for read in reads:
        if read.lo > read.hi:
            stats["unjudged"] += 1
            continue
        _judge(found, read, histories.get(read.key, {}))
    return found.result(stats)


def _parse(invoke: Op, done: Op) -> Read | None:
    asked = invoke.value or {}
    got = done.value
    want: Any
    if not isinstance(got, dict):
        return None
    try:
        if invoke.f == "read_balance":
            rows = got.get("balances")
            if not isinstance(rows, list):  # the SDK's shape: {asset: {available, reserved}}
                rows = [{"asset": asset, **row} for asset, row in got.items()]
            want = tuple(
                sorted(
                    (b["asset"], b["available"], b["reserved"])
                    for b in rows
                    if b["available"] or b["reserved"]
                )
            )
            return Read(invoke, done, ("balance", asked["account"]), want)
        if invoke.f == "read_order":
            status = got["status"]
            remaining = got.get("remaining", _ANY) if status == "open" else None
            want = (status, got.get("order_id"), remaining)
            return Read(invoke, done, ("order", asked["account"], asked["client_order_id"]), want)
        # read_book
        depth = asked.get("depth", DEFAULT_DEPTH)
        want = (
            got["market"],
            [list(level) for level in got["bids"]],
            [list(level) for level in got["asks"]],
            got["seq"],
        )
        return Read(invoke, done, ("book", asked["market"], depth), want)
    except (KeyError, TypeError):
        return None


class _Tracker:
    """Follows, through the replay, the answers every read's key would get."""

    def __init__(self, reads: list[Read]) -> None:
        self.changes: dict[tuple, list[tuple[int, Any]]] = {}
        self.balance_keys: dict[str, tuple] = {}
        self.order_keys: dict[tuple[str, str], tuple] = {}
        self.order_ids: dict[int, tuple] = {}  # order id -> its read key
        self.book_reads: dict[int, list[Read]] = {}  # seq -> the book reads naming it
        for read in reads:
            kind = read.key[0]
            if kind == "balance":
                self.balance_keys[read.key[1]] = read.key
            elif kind == "order":
                self.order_keys[read.key[1:]] = read.key
            else:
                self.book_reads.setdefault(read.want[3], []).append(read)

    def start(self, exchange: Any) -> None:
        for key in [*self.balance_keys.values(), *self.order_keys.values()]:
            self.changes[key] = [(0, self._answer(key, exchange))]
        self._books(0, exchange)

    def step(self, position: int, events: list[dict], exchange: Any) -> None:
        dirty: set[tuple] = set()
        for e in events:
            kind = e["type"]
            if kind == "balance":
                key = self.balance_keys.get(e["account"])
                if key is not None:
                    dirty.add(key)
            elif kind == "trade":
                for order_id in (e["maker_order_id"], e["taker_order_id"]):
                    key = self.order_ids.get(order_id)
                    if key is not None:
                        dirty.add(key)
            elif "order_id" in e:
                key = self.order_ids.get(e["order_id"])
                if key is None and kind == "accepted":
                    key = self.order_keys.get((e["account"], e["client_order_id"]))
                    if key is not None:
                        self.order_ids[e["order_id"]] = key
                if key is not None:
                    dirty.add(key)
        for key in dirty:
            answer = self._answer(key, exchange)
            changes = self.changes[key]
            if changes[-1][1] != answer:
                changes.append((position, answer))
        self._books(position, exchange)

    def _books(self, position: int, exchange: Any) -> None:
        for read in self.book_reads.pop(exchange.seq, ()):
            _, market, depth = read.key
            now = (
                market,
                [list(level) for level in exchange.book_levels(market, "buy", depth)],
                [list(level) for level in exchange.book_levels(market, "sell", depth)],
                exchange.seq,
            )
            read.pinned = position
            read.same_book = now == read.want

    @staticmethod
    def _answer(key: tuple, exchange: Any) -> Any:
        """The canonical answer the API would give (api/trading.py's queries)."""
        if key[0] == "balance":
            return tuple(
                sorted((asset, a, r) for (_, asset), (a, r) in exchange.balances(key[1]).items())
            )
        _, account, coid = key
        order_id = exchange.order_id_for(account, coid)
        if order_id is None:
            return ("unknown", None, None)
        live = exchange.order(order_id)
        if live is not None:
            return ("open", order_id, live["remaining"])
        return ("done", order_id, None)

    def intervals(self, end: int) -> dict[tuple, dict[Any, list[tuple[int, int]]]]:
        """key -> answer -> the [first, last] cmd_index ranges in which it held."""
        out: dict[tuple, dict[Any, list[tuple[int, int]]]] = {}
        for key, changes in self.changes.items():
            spans: dict[Any, list[tuple[int, int]]] = {}
            for i, (start, answer) in enumerate(changes):
                last = changes[i + 1][0] - 1 if i + 1 < len(changes) else end
                spans.setdefault(answer, []).append((start, last))
            out[key] = spans
        return out


def _windows(reads: list[Read], points: list[tuple[int, int | None, int, bool]], end: int) -> None:
    """Set each read's [lo, hi] from `points`: (invoked, completed or None, cmd_index, is a
    write). An op completed before the read was invoked raises `lo` to its cmd_index; a write
    invoked after the read completed lowers `hi` to its cmd_index - 1. (A book read invoked
    after it does not lower `hi`: of two reads out of order, the later one is the stale one.)"""
    done = sorted((completed, p) for _, completed, p, _ in points if completed is not None)
    done_times = [t for t, _ in done]
    prefix_max = []
    best = 0
    for _, p in done:
        best = max(best, p)
        prefix_max.append(best)
    later = sorted((invoked, p - 1) for invoked, _, p, is_write in points if is_write)
    later_times = [t for t, _ in later]
    suffix_min = [end] * (len(later) + 1)
    for i in range(len(later) - 1, -1, -1):
        suffix_min[i] = min(suffix_min[i + 1], later[i][1])
    for read in reads:
        n = bisect_left(done_times, read.invoke.time)
        read.lo = prefix_max[n - 1] if n else 0
        read.hi = suffix_min[bisect_right(later_times, read.done.time)]


def _judge(found: Findings, read: Read, spans: dict[Any, list[tuple[int, int]]]) -> None:
    f = read.invoke.f
    where = f"{f} {_show_key(read.key)}"
    window = f"window [{read.lo}, {read.hi}]"
    if read.key[0] == "book":
        at = read.pinned
        if at is None:
            found.add(
                "impossible_read",
                [read.done.index],
                f"{where}: seq {read.want[3]} is no point between commands of the log",
            )
        elif not read.same_book:
            found.add(
                "impossible_read",
                [read.done.index],
                f"{where}: the book after cmd_index {at} (its seq) is not the one read",
            )
        elif at < read.lo:
            found.add(
                "stale_read",
                [read.done.index],
                f"{where}: shows the state at cmd_index {at} (its seq), before its {window}",
            )
        elif at > read.hi:
            found.add(
                "impossible_read",
                [read.done.index],
                f"{where}: shows the state at cmd_index {at} (its seq), after its {window}",
            )
        return
    matching = _matching(read.want, spans)
    if not matching:
        found.add(
            "impossible_read",
            [read.done.index],
            f"{where} answered {_show(read.want)}, which it never was ({window})",
        )
        return
    starts = [s for s, _ in matching]
    i = bisect_right(starts, read.hi) - 1
    if i >= 0 and matching[i][1] >= read.lo:
        return
    if i >= 0:  # the newest match up to the window's end ends before it opens
        found.add(
            "stale_read",
            [read.done.index],
            f"{where} answered {_show(read.want)}: the state up to cmd_index "
            f"{matching[i][1]}, before its {window}",
        )
    else:
        found.add(
            "impossible_read",
            [read.done.index],
            f"{where} answered {_show(read.want)}: only from cmd_index {matching[0][0]} on, "
            f"after its {window}",
        )


def _matching(want: Any, spans: dict[Any, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    if len(want) == 3 and want[2] is _ANY:
        found = [span for answer, s in spans.items() if answer[:2] == want[:2] for span in s]
        return sorted(found)
    return spans.get(want, [])


def _show_key(key: tuple) -> str:
    return " ".join(str(k) for k in key[1:] if k is not None)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
