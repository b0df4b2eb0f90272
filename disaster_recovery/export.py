"""`quorumbook backup log TARGET`: every command of the archived log, as the exchange applied
it: an audit trail, and what the Jepsen harness's checkers replay (`log.jsonl`).

The nodes compact their logs; the archive (`[archive]`: a follower ships every committed
entry, from the first) keeps them all. Its entries are replayed through the node's state
machine, and every command is written as the state machine applied it (with the `ts` the
leader stamped), one JSON line `{"cmd_index": n, "command": {...}}` per command, from 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.machine import ExchangeMachine
from cluster.raft import payload_of_entry

from . import segments
from .target import Target


class LogError(RuntimeError):
    """The archive does not hold the whole committed log from its first entry."""


class _Recorder:
    """The exchange, with every command it applies written down (the proxy the machine
    applies through: `ExchangeMachine.apply` stamps `ts` into the command first)."""

    def __init__(self, exchange: Any, out: list[dict]) -> None:
        self._exchange = exchange
        self._out = out

    def apply(self, command: dict) -> list[dict]:
        events = self._exchange.apply(command)
        self._out.append({"cmd_index": self._exchange.cmd_index, "command": dict(command)})
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._exchange, name)


def committed_commands(target: Target, upto_index: int | None = None) -> list[dict]:
    """Every command of the archived log from its first entry (up to log index `upto_index`,
    which must be archived), in order. Raises LogError if the archive starts later or stops
    short."""
    cluster_id = None
    machine = ExchangeMachine()
    out: list[dict] = []
    recorder = _Recorder(machine.exchange, out)
    machine.exchange = recorder  # type: ignore[assignment]
    index = 0
    for _first, _last, name in segments.chain(segments.listed(target), 0):
        segment = segments.read(target, name, cluster_id=cluster_id)
        cluster_id = segment.cluster_id
        for command, idx, _term, cmd_index in segment.entries:
            if idx <= index:
                continue
            if upto_index is not None and idx > upto_index:
                return out
            payload = payload_of_entry(command)
            if payload is not None:
                machine.apply(payload)
            if recorder.cmd_index != cmd_index:
                raise LogError(
                    f"{name}: the replay is at cmd_index {recorder.cmd_index} after log index "
                    f"{idx}, the archive recorded {cmd_index}"
                )
            index = idx
    if upto_index is not None and index < upto_index:
        raise LogError(f"the archive ends at log index {index}, before {upto_index}")
    return out


def write_log(path: Path, commands: list[dict]) -> None:
    with path.open("w") as file:
        for line in commands:
            file.write(json.dumps(line, separators=(",", ":")) + "\n")
