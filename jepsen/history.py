"""The history of a harness run, and the committed log the checkers replay it against.

A history is JSON lines, one `Op` per line, in the order things happened (Jepsen's model):
a client process `invoke`s an operation, then the same process completes it with `ok`
(done, with its result), `fail` (definitely not applied) or `info` (outcome unknown: the
process is retired and a new process number takes over; an invoke left without completion at
the end counts as `info`). Nemesis events are single `info` lines of process "nemesis", with
`value["phase"]` "start" or "stop". `time` is monotonic ns since the run's start and never
goes back along `index`.

    with HistoryWriter(store / "history.jsonl") as history:     # thread-safe
        op = history.invoke(process, "place", {"account": ..., "client_order_id": ...})
        history.complete(op, "ok", body, node="n1")              # or "fail"/"info", error=...
        history.nemesis("kill", {"phase": "start", "nodes": ["n2"]})
    ops = read_history(store / "history.jsonl")

The log (`log.jsonl`, extracted by the runner from the disaster-recovery log archive) has one
`{"cmd_index": n, "command": {...}}` line per committed command, in cmd_index order from 1,
each command exactly as the state machine applied it (with its `ts`): `read_log`, `write_log`.

Client operations: `f`, the invoke's value -> the ok completion's value (what the checkers
expect; any other `f` is carried along and ignored by them, except the register/counter ops
of the generic linearizability checker: write/read/cas, add/read).

| f | invoke value | ok value |
|---|---|---|
| place | {account, market, side, type, price?, qty, tif?, client_order_id} | the API's 201 body: {order_id, client_order_id, status, filled_qty, trades, events, seq}, or the SDK's recovered {status: open/done, order_id, recovered: true, ...} |
| cancel | {account, market, client_order_id} | {events, seq} |
| deposit, withdraw | {account, asset, amount, ref} | {events, seq} (admin: every event) |
| read_order | {account, client_order_id} | GET /v1/orders/by-client-id: {status: open/done/unknown, order_id?, remaining? ...} |
| read_book | {market, depth} | {market, seq, bids: [[price, qty]], asks} |
| read_balance | {account} | {account, balances: [{asset, available, reserved}]}, or the SDK's {asset: {available, reserved}} |
| read_final | {node} (one per node, after healing) | {node, state_hash, cmd_index, balances?: [{account, asset, available, reserved}]} |

A write the state machine rejected in the log (a 4xx whose body has a `seq`) took a cmd_index
and changed nothing else: it ends `ok` with {"rejected": reason, "seq": seq}, a result the
sequencer reproduces (jepsen/client.py). `fail` means definitely not applied, not even as a
rejection (refused before the log: not_leader, validation); a rejection recorded as `fail`
is accepted too. A write whose outcome the client could not learn is `info`; the SDK's resend
that settles it makes it `ok` (the recovered body).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec

NEMESIS = "nemesis"
INVOKE, OK, FAIL, INFO = "invoke", "ok", "fail", "info"
OpType = Literal["invoke", "ok", "fail", "info"]
COMPLETIONS = (OK, FAIL, INFO)


class HistoryError(ValueError):
    """A history or log file that breaks the format (never a finding about the cluster)."""


class Op(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a history."""

    index: int  # 0-based position in the history
    type: OpType
    process: int | str  # a logical client (int), or "nemesis"
    f: str  # the operation: "place", "read_book", ..., or the nemesis's "kill", "heal", ...
    value: dict | None = None
    time: int  # ns since the run's start (monotonic)
    node: str | int | None = None  # the node that answered, if one did
    error: dict | None = None  # {"code", "message"} of a fail or info
    invoke_index: int | None = None  # on a completion: the index of its invoke

    @property
    def is_client(self) -> bool:
        return self.process != NEMESIS


class LogEntry(msgspec.Struct, frozen=True):
    """One committed command, as the state machine applied it."""

    cmd_index: int
    command: dict


_op_decoder = msgspec.json.Decoder(Op)
_log_decoder = msgspec.json.Decoder(LogEntry)
_encoder = msgspec.json.Encoder()


class HistoryWriter:
    """Appends ops to a new history file; safe to call from several client threads.

    It enforces Jepsen's discipline, so a runner bug fails loudly instead of making a history
    the checkers misread: a process has at most one operation in flight, completes only its
    own invoke, and never invokes again once an op of it ended `info`.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.path = Path(path)
        self._file = open(self.path, "xb")  # noqa: SIM115 (closed by close()); never overwrite
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._next_index = 0
        self._in_flight: dict[int | str, Op] = {}  # process -> its invoke
        self._retired: set[int | str] = set()

    def invoke(self, process: int, f: str, value: dict | None, node: str | int | None = None) -> Op:
        if isinstance(process, bool) or not isinstance(process, int):
            raise ValueError(f"a client process is an int, not {process!r}")
        with self._lock:
            if process in self._retired:
                raise ValueError(f"process {process} was retired by an info op; use a new one")
            if process in self._in_flight:
                raise ValueError(f"process {process} already has an op in flight")
            op = self._write(type=INVOKE, process=process, f=f, value=value, node=node)
            self._in_flight[process] = op
            return op

    def complete(
        self,
        invoke_op: Op,
        type: str,
        value: dict | None = None,
        node: str | int | None = None,
        error: dict | None = None,
    ) -> Op:
        """Complete `invoke_op` with "ok", "fail" or "info" (the last retires its process)."""
        if type not in COMPLETIONS:
            raise ValueError(f"a completion is ok, fail or info, not {type!r}")
        with self._lock:
            if self._in_flight.get(invoke_op.process) is not invoke_op:
                raise ValueError(f"op {invoke_op.index} is not in flight")
            del self._in_flight[invoke_op.process]
            if type == INFO:
                self._retired.add(invoke_op.process)
            return self._write(
                type=type,
                process=invoke_op.process,
                f=invoke_op.f,
                value=value,
                node=node,
                error=error,
                invoke_index=invoke_op.index,
            )

    def nemesis(self, f: str, value: dict | None) -> Op:
        """A fault event: `value["phase"]` is "start" or "stop", plus what it did."""
        with self._lock:
            return self._write(type=INFO, process=NEMESIS, f=f, value=value)

    def _write(self, **fields: Any) -> Op:
        # Index and time are taken under the lock: the file's order is the index order, and
        # time never goes back along it.
        op = Op(index=self._next_index, time=self._clock() - self._start, **fields)
        self._file.write(_encoder.encode(op) + b"\n")
        self._file.flush()  # what was written survives a crash of the runner
        self._next_index += 1
        return op

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decoded(path: str | Path, decoder: msgspec.json.Decoder) -> list[Any]:
    """Decode each line; a last line without its newline that does not decode was cut short
    by a crash of the writer, and is dropped (its op then counts as never completed)."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    unterminated = lines.pop()  # b"" when the file ends with a newline
    out = []
    for number, line in enumerate([*lines, unterminated], 1):
        if not line.strip():
            continue
        try:
            out.append(decoder.decode(line))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if number == len(lines) + 1:
                break
            raise HistoryError(f"{path}:{number}: {exc}") from None
    return out


def read_history(path: str | Path) -> list[Op]:
    """The ops of a history file, checked for the format (HistoryError if broken)."""
    ops: list[Op] = _decoded(path, _op_decoder)
    validate(ops, str(path))
    return ops


def validate(ops: list[Op], where: str = "history") -> None:
    """Raise HistoryError unless `ops` is well formed: indexes are positions, time never goes
    back, each completion follows the open invoke of its own process, nemesis lines are info."""
    in_flight: dict[int | str, Op] = {}
    last_time = None
    for position, op in enumerate(ops):
        problem = None
        if op.index != position:
            problem = f"index {op.index} at position {position}"
        elif last_time is not None and op.time < last_time:
            problem = "time goes back"
        elif op.process == NEMESIS:
            if op.type != INFO:
                problem = "a nemesis event is of type info"
        elif isinstance(op.process, str):
            problem = f"unknown process {op.process!r}"
        elif op.type == INVOKE:
            if op.process in in_flight:
                problem = f"process {op.process} invokes with an op in flight"
            elif op.invoke_index is not None:
                problem = "an invoke carries an invoke_index"
            in_flight[op.process] = op
        else:
            invoke = in_flight.pop(op.process, None)
            if invoke is None or op.invoke_index != invoke.index or op.f != invoke.f:
                problem = f"completion of process {op.process} matches no open invoke"
        if problem is not None:
            raise HistoryError(f"{where}: op {position}: {problem}")
        last_time = op.time


def pairs(history: list[Op]) -> list[tuple[Op, Op | None]]:
    """Every client op as (invoke, completion or None), in invoke order."""
    done = {op.invoke_index: op for op in history if op.invoke_index is not None}
    return [(op, done.get(op.index)) for op in history if op.type == INVOKE]


def read_log(path: str | Path) -> list[LogEntry]:
    """The committed log's entries as written (gaps and disorder are the checkers' to report)."""
    return _decoded(path, _log_decoder)


def write_log(path: str | Path, commands: Iterable[dict | LogEntry], first: int = 1) -> None:
    """Write a log file: LogEntry items as they are, plain commands numbered from `first`."""
    with open(path, "wb") as out:
        for n, item in enumerate(commands, first):
            entry = item if isinstance(item, LogEntry) else LogEntry(n, item)
            out.write(_encoder.encode(entry) + b"\n")


__all__ = [
    "FAIL",
    "INFO",
    "INVOKE",
    "NEMESIS",
    "OK",
    "HistoryError",
    "HistoryWriter",
    "LogEntry",
    "Op",
    "pairs",
    "read_history",
    "read_log",
    "validate",
    "write_log",
]
