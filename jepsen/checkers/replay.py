"""What the checkers share: the log's replay, and what ties a history's ops to its commands.

A write op and the commands it became are tied by the command's idempotency key (`write_key`):
(account, client_order_id) for a place, its ref for a deposit or withdrawal, the order it
names for a cancel. A command is *effective* when the state machine did not reject it; a
client's resend of an applied command is rejected as a duplicate, so one op has at most one
effective command. `claim` gives each ok write its command (and each info write one that
nobody else accounts for) and says what is left over.

The answers the API gave are rebuilt with the SDK's `private_view` and `summarize`
(api/sdk/answers.py), the functions the node builds them with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.sdk.answers import private_view, summarize
from statemachine import Exchange

from ..history import FAIL, INFO, OK, LogEntry, Op, pairs, read_history, read_log

WRITE_FS = ("place", "cancel", "amend", "cancel_all", "deposit", "withdraw", "create_market")
TRADER_FS = ("place", "cancel", "amend", "cancel_all")  # answered in the account's view
READ_FS = ("read_order", "read_book", "read_balance")
FINAL_F = "read_final"

History = list[Op] | str | Path
Log = Sequence[LogEntry | dict] | str | Path | None
ExchangeFactory = Callable[[], Any]  # -> an object with Exchange's surface


def load_history(history: History) -> list[Op]:
    return history if isinstance(history, list) else read_history(history)


def load_log(log: Log) -> list[LogEntry] | None:
    """Entries from a file or a list; plain commands are numbered from 1."""
    if log is None:
        return None
    if isinstance(log, (str, Path)):
        return read_log(log)
    entries: list[LogEntry] = []
    for n, item in enumerate(log, 1):
        entries.append(item if isinstance(item, LogEntry) else LogEntry(n, item))
    return entries


def write_key(op: str, fields: Any) -> tuple | None:
    """The idempotency key of a write (an op's invoke value, or a logged command)."""
    if not isinstance(fields, dict):
        return None
    if op == "place":
        coid = fields.get("client_order_id")
        return None if coid is None else ("place", fields.get("account"), coid)
    if op == "cancel":
        target = fields.get("client_order_id", fields.get("order_id"))
        return ("cancel", fields.get("account"), fields.get("market"), target)
    if op in ("deposit", "withdraw"):
        return ("ref", fields.get("ref"))
    if op == "create_market":
        return ("market", fields.get("market"))
    return None  # amend, cancel_all: no key; only their reported cmd_index ties them


def account_of(op: str, fields: Any) -> str | None:
    """Whose view a write's answer is in: the trader's, or None (an admin's: every event)."""
    if op in TRADER_FS and isinstance(fields, dict):
        return fields.get("account")
    return None


def reported_cmd_index(value: Any) -> int | None:
    """The cmd_index an ok write's answer names (its events'), if it carries events."""
    if isinstance(value, dict):
        events = value.get("events")
        if isinstance(events, list) and events and isinstance(events[0], dict):
            found = events[0].get("cmd_index")
            if isinstance(found, int):
                return found
    return None


@dataclass(frozen=True)
class Step:
    """One command of the replay: its events, and the exchange just after it."""

    position: int  # 1-based place in the log: the cmd_index the replay gives it
    logged_index: int  # the cmd_index the log file says
    command: dict
    events: list[dict]

    @property
    def effective(self) -> bool:
        return bool(self.events) and self.events[0]["type"] != "rejected"

    @property
    def key(self) -> tuple | None:
        return write_key(self.command.get("op", ""), self.command)


def replay(
    log: list[LogEntry], exchange_factory: ExchangeFactory = Exchange
) -> Iterator[tuple[Step, Any]]:
    """Apply the log in order; yield each step with the exchange after it."""
    exchange = exchange_factory()
    for position, entry in enumerate(log, 1):
        events = exchange.apply(entry.command)
        yield Step(position, entry.cmd_index, entry.command, events), exchange


def rejection(done: Op | None) -> dict | None:
    """The value of an ok that reports a rejection in the log, `{"rejected": reason, "seq"}`
    (jepsen/client.py): a definite result, with a cmd_index, that changed nothing."""
    if done is not None and done.type == OK and isinstance(done.value, dict):
        return done.value if "rejected" in done.value else None
    return None


class LogIndex:
    """What tying ops to commands needs from a replay, gathered step by step."""

    def __init__(self) -> None:
        self.effective: dict[tuple, list[int]] = {}  # key -> cmd_indexes that took effect
        self.rejections: dict[int, Step] = {}  # seq of a rejected event -> its step
        self.end = 0

    def add(self, step: Step) -> None:
        self.end = step.position
        if step.effective:
            key = step.key
            if key is not None:
                self.effective.setdefault(key, []).append(step.position)
        elif step.events and "seq" in step.events[0]:
            self.rejections[step.events[0]["seq"]] = step


@dataclass
class Claims:
    """How a history's writes and the log's commands account for each other."""

    # invoke index -> cmd_index: each ok write's command (a rejection's too), and each
    # applied info write's.
    positions: dict[int, int] = field(default_factory=dict)
    lost: list[tuple[Op, Op]] = field(default_factory=list)  # ok, no effective command
    # (ops with that key, its effective cmd_indexes no ok or info op accounts for)
    unaccounted: list[tuple[list[tuple[Op, Op | None]], list[int]]] = field(default_factory=list)
    # oks reporting a rejection the log does not have at their seq: (invoke, done, what is)
    unreproduced: list[tuple[Op, Op, Step | None]] = field(default_factory=list)
    unkeyed: int = 0  # writes without an idempotency key (only a reported cmd_index ties them)


def write_pairs(history: list[Op]) -> list[tuple[Op, Op | None]]:
    return [(i, c) for i, c in pairs(history) if i.f in WRITE_FS]


def claim(writes: list[tuple[Op, Op | None]], index: LogIndex) -> Claims:
    """Tie writes to commands (see the module's docstring).

    An ok write takes the effective command its answer names if that one has its key, else
    the first free one; info writes take free ones in invoke order. Effective commands left
    over were applied more often than ok + info writes allow. An ok reporting a rejection
    takes the rejected command its seq names, if that one is its own.
    """
    claims = Claims()
    by_key: dict[tuple, list[tuple[Op, Op | None]]] = {}
    for invoke, done in writes:
        key = write_key(invoke.f, invoke.value)
        rejected = rejection(done)
        if rejected is not None and done is not None:
            seq = rejected.get("seq")
            step = index.rejections.get(seq) if isinstance(seq, int) else None
            if (
                step is not None
                and step.events[0].get("reason") == rejected["rejected"]
                and step.command.get("op") == invoke.f
                and step.key == key
            ):
                claims.positions[invoke.index] = step.position
            else:
                claims.unreproduced.append((invoke, done, step))
        if key is None:
            claims.unkeyed += 1
            reported = reported_cmd_index(done.value) if done and done.type == OK else None
            if rejected is None and reported is not None and 1 <= reported <= index.end:
                claims.positions[invoke.index] = reported
            continue
        by_key.setdefault(key, []).append((invoke, done))
    for key, ops in by_key.items():
        free = list(index.effective.get(key, ()))
        for invoke, done in ops:
            if done is None or done.type != OK or rejection(done) is not None:
                continue
            reported = reported_cmd_index(done.value)
            if reported in free:
                chosen = reported
            elif free:
                chosen = free[0]
            else:
                claims.lost.append((invoke, done))
                continue
            free.remove(chosen)
            claims.positions[invoke.index] = chosen
        for invoke, done in ops:
            if free and (done is None or done.type == INFO):
                claims.positions[invoke.index] = free.pop(0)
        if free:
            claims.unaccounted.append((ops, free))
    return claims


def kinds_of(ops: list[tuple[Op, Op | None]]) -> set[str]:
    """The completion types of `ops` (never completed counts as info, a rejection as fail)."""
    return {
        INFO if done is None else FAIL if rejection(done) is not None else done.type
        for _, done in ops
    }


__all__ = [
    "FAIL",
    "FINAL_F",
    "READ_FS",
    "TRADER_FS",
    "WRITE_FS",
    "Claims",
    "LogIndex",
    "Step",
    "account_of",
    "claim",
    "kinds_of",
    "load_history",
    "load_log",
    "private_view",
    "rejection",
    "replay",
    "reported_cmd_index",
    "summarize",
    "write_key",
    "write_pairs",
]
