"""The replicated state machine as the Raft adapter sees it: bytes in, bytes out.

Runs on pysyncobj's thread. It applies a batch to the `Exchange`, tells listeners (the
trio side) what was applied, and answers snapshot/restore with the exchange's own codec.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import msgpack

from statemachine import Exchange

from .batch import (
    KIND_BARRIER,
    KIND_COMMAND,
    KIND_KEY,
    KIND_MEMBER,
    BatchError,
    decode_batch,
)

log = logging.getLogger(__name__)

# Called on pysyncobj's thread after each applied batch: (applied commands' events, exchange).
AppliedListener = Callable[[list[list[dict]], Exchange], None]

SNAPSHOT_VERSION = 1


class MachineSnapshotError(ValueError):
    """A node snapshot that is not ours or is damaged (the exchange blob is checked too)."""


class ExchangeMachine:
    """`StateMachinePort` over a `statemachine.Exchange`."""

    def __init__(self) -> None:
        self.exchange = Exchange()
        # node_id -> (raft_addr, api_url): members added at run time, replicated like commands
        self.directory: dict[str, tuple[str, str]] = {}
        # key_id -> (account, role): API keys, replicated so every node accepts them
        self.keys: dict[str, tuple[str, str]] = {}
        self.batches_applied = 0
        self._listeners: list[AppliedListener] = []
        # Called on pysyncobj's thread after each batch with the [signature, ts_ms] of the
        # signed API requests its commands came from (the API's replay memory, every node).
        self.on_requests_applied: Callable[[list[list]], None] | None = None
        self._lock = threading.Lock()  # apply/restore vs `read` queries from other threads

    def add_listener(self, listener: AppliedListener) -> None:
        self._listeners.append(listener)

    def apply(self, payload: bytes) -> list:
        """One entry per batch entry: the command's events, or None. Only the proposer reads
        it, in this process: the events are shared with the listeners, so nobody mutates them."""
        try:
            ts, entries = decode_batch(payload)
        except BatchError as exc:
            # Every replica sees the same bytes, so every replica skips it alike.
            log.error("skipping an undecodable batch: %s", exc)
            return []
        results: list = []
        applied: list[list[dict]] = []
        requests: list[list] = []
        with self._lock:
            ex = self.exchange
            for entry in entries:
                if (type(entry) is list and entry and entry[0] == KIND_COMMAND
                        and len(entry) in (2, 3)):
                    command = entry[1]
                    if len(entry) == 3:
                        requests.append(entry[2])
                    if type(command) is dict:
                        command["ts"] = max(ts, ex.last_ts)
                    events = ex.apply(command)
                    results.append(events)
                    applied.append(events)
                elif type(entry) is list and entry == [KIND_BARRIER]:
                    results.append(None)
                elif type(entry) is list and len(entry) == 5 and entry[0] == KIND_MEMBER:
                    _, action, node_id, raft_addr, api_url = entry
                    if action == "add":
                        self.directory[str(node_id)] = (str(raft_addr), str(api_url))
                    elif action == "remove":
                        self.directory.pop(str(node_id), None)
                    results.append(None)
                elif type(entry) is list and len(entry) == 5 and entry[0] == KIND_KEY:
                    _, action, key_id, account, role = entry
                    if action == "add":
                        self.keys[str(key_id)] = (str(account), str(role))
                    elif action == "revoke":
                        self.keys.pop(str(key_id), None)
                    results.append(None)
                else:
                    results.append(None)
            self.batches_applied += 1
        for listener in self._listeners:
            listener(applied, ex)
        if requests and self.on_requests_applied is not None:
            self.on_requests_applied(requests)
        return results

    def snapshot(self) -> bytes:
        """The node's state as bytes. Call it on the thread that applies (pysyncobj's): that
        thread is the only writer, so the state cannot change underneath, and readers on
        other threads are not held up for the hundreds of ms a large book takes to encode
        (the API's reads would stall the trio thread for that long behind `_lock`)."""
        directory = sorted([k, *v] for k, v in self.directory.items())
        keys = sorted([k, *v] for k, v in self.keys.items())
        return msgpack.packb([SNAPSHOT_VERSION, self.exchange.snapshot(), directory, keys],
                             use_bin_type=True)

    def restore(self, blob: bytes) -> None:
        try:
            version, exchange_blob, directory, keys = msgpack.unpackb(blob, raw=False)
        except Exception as exc:
            raise MachineSnapshotError(f"undecodable node snapshot: {exc}") from exc
        if version != SNAPSHOT_VERSION:
            raise MachineSnapshotError(f"unsupported node snapshot version {version!r}")
        exchange = Exchange.restore(exchange_blob)
        with self._lock:
            self.exchange = exchange
            self.directory = {k: (a, u) for k, a, u in directory}
            self.keys = {k: (a, r) for k, a, r in keys}

    # key() and members() run on the API's hot path (every signed request, every redirect)
    # and take no lock: a dict lookup or copy is one atomic step under the GIL, and the apply
    # thread only ever sets or pops single entries of these dicts.

    def key(self, key_id: str) -> tuple[str, str] | None:
        return self.keys.get(key_id)

    def members(self) -> dict[str, tuple[str, str]]:
        return self.directory.copy()

    def read(self, fn: Callable[[Exchange], object]) -> object:
        """Run a read-only query against the exchange without racing the apply thread."""
        with self._lock:
            return fn(self.exchange)
