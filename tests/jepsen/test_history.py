"""The history file: what the runner writes, what the checkers read back."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from jepsen.history import (
    NEMESIS,
    HistoryError,
    HistoryWriter,
    LogEntry,
    Op,
    pairs,
    read_history,
    read_log,
    validate,
    write_log,
)


def ticking() -> itertools.count:
    return itertools.count(1_000, 7)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    clock = ticking()
    path = tmp_path / "history.jsonl"
    with HistoryWriter(path, clock=lambda: next(clock)) as history:
        placed = history.invoke(0, "place", {"account": "alice", "client_order_id": "c1"})
        history.nemesis("partition", {"phase": "start", "groups": [["n1"], ["n2", "n3"]]})
        read = history.invoke(1, "read_book", {"market": "BTC-USD", "depth": 5}, node="n2")
        history.complete(placed, "ok", {"order_id": 1, "events": []}, node="n1")
        history.complete(read, "fail", None, error={"code": "not_leader", "message": "no"})
        history.nemesis("partition", {"phase": "stop"})
    ops = read_history(path)
    assert [op.index for op in ops] == list(range(6))
    assert [op.type for op in ops] == ["invoke", "info", "invoke", "ok", "fail", "info"]
    assert [op.time for op in ops] == [7, 14, 21, 28, 35, 42]  # ns since the writer started
    assert ops[1].process == NEMESIS and ops[1].value["groups"] == [["n1"], ["n2", "n3"]]
    assert ops[3] == Op(
        index=3,
        type="ok",
        process=0,
        f="place",
        value={"order_id": 1, "events": []},
        time=28,
        node="n1",
        invoke_index=0,
    )
    assert ops[4].error == {"code": "not_leader", "message": "no"} and ops[4].invoke_index == 2
    # Every field is on every line, null or not: the format is the same for every reader.
    first = path.read_text().splitlines()[0]
    for name in ("index", "type", "process", "f", "value", "time", "node", "error", "invoke_index"):
        assert f'"{name}":' in first
    assert [(i.index, d.index if d else None) for i, d in pairs(ops)] == [(0, 3), (2, 4)]


def test_threads_write_one_consistent_history(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    with HistoryWriter(path) as history:

        def client(process: int) -> None:
            for n in range(200):
                op = history.invoke(process, "read_balance", {"account": f"a{process}"})
                history.complete(op, "ok" if n % 3 else "fail", {"n": n})

        threads = [threading.Thread(target=client, args=(p,)) for p in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ops = read_history(path)  # validates: indexes, time order, completions
    assert len(ops) == 8 * 200 * 2
    assert all(done is not None for _, done in pairs(ops))


def test_the_writer_keeps_jepsens_discipline(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "h.jsonl") as history:
        op = history.invoke(0, "place", {})
        with pytest.raises(ValueError, match="in flight"):
            history.invoke(0, "place", {})
        with pytest.raises(ValueError, match="ok, fail or info"):
            history.complete(op, "done")
        history.complete(op, "info", error={"code": "outcome_unknown", "message": ""})
        with pytest.raises(ValueError, match="not in flight"):
            history.complete(op, "ok")
        with pytest.raises(ValueError, match="retired"):
            history.invoke(0, "place", {})
        with pytest.raises(ValueError, match="int"):
            history.invoke("n1", "place", {})  # type: ignore[arg-type]
        history.invoke(1, "place", {})  # a new process takes over; never completed
    ops = read_history(tmp_path / "h.jsonl")
    assert [(i.index, d) for i, d in pairs(ops)][-1] == (2, None)
    with pytest.raises(FileExistsError):  # a history is never overwritten
        HistoryWriter(tmp_path / "h.jsonl")


def test_a_line_cut_short_by_a_crash_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path) as history:
        op = history.invoke(0, "place", {"a": 1})
        history.complete(op, "ok", {"b": 2})
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # the completion's line, half written
    ops = read_history(path)
    assert len(ops) == 1 and pairs(ops) == [(ops[0], None)]
    path.write_bytes(whole[:-1])  # only the newline missing: the line is whole, kept
    assert len(read_history(path)) == 2
    lines = whole.split(b"\n")
    path.write_bytes(lines[0][:-5] + b"\n" + lines[1] + b"\n")  # broken in the middle
    with pytest.raises(HistoryError, match=":1:"):
        read_history(path)


def _op(index: int, type: str, process: object, time: int, invoke_index: int | None = None) -> Op:
    return Op(index=index, type=type, process=process, f="x", time=time, invoke_index=invoke_index)


@pytest.mark.parametrize(
    ("ops", "problem"),
    [
        ([_op(1, "invoke", 0, 0)], "index 1 at position 0"),
        ([_op(0, "invoke", 0, 5), _op(1, "invoke", 1, 4)], "time goes back"),
        ([_op(0, "invoke", NEMESIS, 0)], "nemesis event is of type info"),
        ([_op(0, "invoke", "n1", 0)], "unknown process"),
        ([_op(0, "invoke", 0, 0), _op(1, "invoke", 0, 1)], "in flight"),
        ([_op(0, "ok", 0, 0, 0)], "matches no open invoke"),
        ([_op(0, "invoke", 0, 0), _op(1, "ok", 1, 1, 0)], "matches no open invoke"),
        ([_op(0, "invoke", 0, 0, 0)], "carries an invoke_index"),
    ],
)
def test_validate_names_what_is_broken(ops: list[Op], problem: str) -> None:
    with pytest.raises(HistoryError, match=problem):
        validate(ops)


def test_log_round_trip(tmp_path: Path) -> None:
    commands = [{"op": "deposit", "ts": 5, "account": "a", "asset": "USD", "amount": 1, "ref": "r"}]
    write_log(tmp_path / "log.jsonl", [*commands, LogEntry(7, {"op": "x", "ts": 6})])
    entries = read_log(tmp_path / "log.jsonl")
    assert entries == [LogEntry(1, commands[0]), LogEntry(7, {"op": "x", "ts": 6})]
    assert (tmp_path / "log.jsonl").read_text().splitlines()[0].startswith('{"cmd_index":1,')
