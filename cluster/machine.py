"""The replicated state machine as the Raft adapter sees it: bytes in, bytes out.

Runs on pysyncobj's thread. It applies a batch to the `Exchange`, tells listeners (the
trio side) what was applied, and answers snapshot/restore with the exchange's own codec.

Besides the exchange it holds what the cluster replicates for the API: the member directory,
the key registry and the replay window, the signatures of the signed requests it applied
(`KIND_REQUEST` entries, cluster/batch.py). A request whose signature the window holds is not
applied again, and neither is one older than the window: every replica holds the same window
(it is pruned by the leader-stamped batch time, never by a local clock, and travels in the
snapshot), so every replica skips the same entries, and a captured request replayed to any
node, at any time, is never applied twice.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import threading
from collections.abc import Callable

import msgpack

from api.auth import WINDOW_MS
from api.sdk.snapshot import exchange_snapshot_of
from statemachine import Exchange
from statemachine.snapshot import gc_paused, stated_hash, written_by_this_build

from .batch import (
    KIND_ADDRESS,
    KIND_BARRIER,
    KIND_COMMAND,
    KIND_KEY,
    KIND_MEMBER,
    KIND_REQUEST,
    REFUSED_EXPIRED,
    REFUSED_REPLAYED,
    BatchError,
    decode_versioned_batch,
)
from .raft import bin_at

log = logging.getLogger(__name__)

# Called on pysyncobj's thread after each applied batch: (applied commands' events, exchange).
AppliedListener = Callable[[list[list[dict]], Exchange], None]

# Version 2 added the replay window; a version-1 snapshot restores with an empty one.
# Version 3 added the deposit addresses (older ones restore with none).
SNAPSHOT_VERSION = 3
RESTORABLE_VERSIONS = (1, 2, 3)

# How long past its own timestamp a request's signature stays in the replay window, by the
# window's clock. Safety does not depend on it: a request older than the window is refused as
# expired, so one whose signature was pruned can never apply again. It only decides when an
# honest request is refused so. The window's clock (batch format 3) is the highest timestamp
# of the requests applied: each was verified within WINDOW_MS of the clock of the leader that
# proposed it, so it runs ahead of real time only by a leader's skew that clients share, and
# the margin absorbs the difference between clients' clocks and the time a request waits for
# its batch. (Batches of format 2 moved it with the leader's batch `ts`, so a leader whose
# clock jumped ahead dragged it along, and every replica refused honest requests as expired
# until real time caught up: kept for the journals that hold such batches.)
REPLAY_RETENTION_MS = 4 * WINDOW_MS


class MachineSnapshotError(ValueError):
    """A node snapshot that is not ours or is damaged (the exchange blob is checked too)."""


def exchange_blob_of(blob: bytes) -> bytes:
    """The exchange's snapshot inside a node snapshot (`ExchangeMachine.snapshot`; the
    format is the admin API's, so the SDK reads it)."""
    try:
        return exchange_snapshot_of(blob)
    except ValueError as exc:
        raise MachineSnapshotError(str(exc)) from exc


def without_directory(blob: bytes) -> bytes:
    """A node snapshot with its directory of members emptied, its other fields (the exchange's
    bytes among them) as they are: a restored cluster's members are in its configs."""
    try:
        fields = msgpack.unpackb(blob, raw=False)
        fields[2] = []
    except Exception as exc:
        raise MachineSnapshotError(f"undecodable node snapshot: {exc}") from exc
    return msgpack.packb(fields, use_bin_type=True)


def _node_fields(blob: bytes) -> list:
    """`msgpack.unpackb(blob)` of a node snapshot, its exchange snapshot (field 1, nearly all
    of a large state's bytes) a view of `blob` rather than a copy: a node loading a million
    orders otherwise allocates and copies tens of MB once more. Any other layout than the one
    `snapshot` writes (an array of 4-6 fields, a small version, then a bin) is unpacked whole
    (and refused there if it is not msgpack)."""
    view = memoryview(blob)
    if len(view) > 3 and 0x94 <= view[0] <= 0x96 and view[1] < 0x80:
        with contextlib.suppress(ValueError):  # no bin, or cut short: unpackb says so below
            exchange, end = bin_at(view, 2)
            rest = bytes((0x90 | (view[0] & 0x0F) - 2,)) + view[end:]
            return [view[1], exchange, *msgpack.unpackb(rest, raw=False)]
    return msgpack.unpackb(blob, raw=False)


class ExchangeMachine:
    """`StateMachinePort` over a `statemachine.Exchange`."""

    def __init__(self, *, freeze_restored: bool = False) -> None:
        """`freeze_restored`: a node's machine (see `restore`; cluster/collector.py); a
        process that restores many states (tests, tools) leaves the collector alone."""
        self.freeze_restored = freeze_restored
        self.exchange = Exchange()
        # node_id -> (raft_addr, api_url): members added at run time, replicated like commands
        self.directory: dict[str, tuple[str, str]] = {}
        # key_id -> (account, role): API keys, replicated so every node accepts them
        self.keys: dict[str, tuple[str, str]] = {}
        # (chain_id, address) -> account: the chains' deposit addresses (KIND_ADDRESS)
        self.deposit_addresses: dict[tuple[int, str], str] = {}
        self.batches_applied = 0
        # The replay window: the signatures of the signed requests applied (a set, for the
        # look-up) and the same (ts_ms, signature) in the order applied (to prune from the
        # front), and its clock: the latest batch ts (ms) of a batch with a request in it.
        self.window_clock_ms = 0
        self._requests: set[bytes] = set()
        self._request_order: collections.deque[tuple[int, bytes]] = collections.deque()
        self._listeners: list[AppliedListener] = []
        self._lock = threading.Lock()  # apply/restore vs `read` queries from other threads
        # (cmd_index, state hash) of the exchange as last restored: its snapshot states the
        # hash, which `decode` checked against its bytes, and a restored state re-encodes to
        # those bytes; so a node that just loaded a large book need not hash it all again.
        # None after a snapshot of an older format (its stated hash is of other bytes).
        self.restored_hash: tuple[int, str] | None = None

    def add_listener(self, listener: AppliedListener) -> None:
        self._listeners.append(listener)

    def apply(self, payload: bytes) -> list:
        """One entry per batch entry: the command's events, a request's list of them or its
        refusal, or None (cluster/batch.py). Only the proposer reads it, in this process: the
        events are shared with the listeners, so nobody mutates them."""
        try:
            version, ts, entries = decode_versioned_batch(payload)
        except BatchError as exc:
            # Every replica sees the same bytes, so every replica skips it alike.
            log.error("skipping an undecodable batch: %s", exc)
            return []
        results: list = []
        applied: list[list[dict]] = []
        horizon_ms: int | None = None  # requests stamped before it are refused as expired
        with self._lock:
            ex = self.exchange
            for entry in entries:
                if (
                    type(entry) is list
                    and entry
                    and entry[0] == KIND_COMMAND
                    and len(entry) in (2, 3)
                ):  # 3: a version-1 entry; its request is ignored
                    command = entry[1]
                    if type(command) is dict:
                        command["ts"] = max(ts, ex.last_ts)
                    events = ex.apply(command)
                    results.append(events)
                    applied.append(events)
                elif type(entry) is list and len(entry) == 4 and entry[0] == KIND_REQUEST:
                    if version >= 3:  # the request's own timestamp (skipped if malformed)
                        stamp = entry[2] if type(entry[2]) is int else self.window_clock_ms
                        horizon_ms = self._advance_window(stamp)
                    elif horizon_ms is None:
                        horizon_ms = self._advance_window(ts // 1_000_000)
                    results.append(self._apply_request(ex, ts, entry, horizon_ms, applied))
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
                    self._apply_key(entry)
                    results.append(None)
                elif type(entry) is list and len(entry) == 4 and entry[0] == KIND_ADDRESS:
                    results.append(self._apply_address(entry))
                else:
                    results.append(None)
            self.batches_applied += 1
        for listener in self._listeners:
            listener(applied, ex)
        return results

    def _advance_window(self, clock_ms: int) -> int:
        """Move the window's clock to `clock_ms` (it never goes back), forget what is past the
        horizon, and return the horizon (ms). Called with each request's own timestamp
        before it is applied (batch format 3), or once per batch that holds a request with
        the batch's ts (format 2): it depends only on the log, the same on every replica.

        Pruned from the oldest-applied end while the oldest is past the horizon: a request
        applied after one stamped later may stay a little longer, never shorter."""
        clock = self.window_clock_ms = max(self.window_clock_ms, clock_ms)
        horizon_ms = clock - REPLAY_RETENTION_MS
        order, requests = self._request_order, self._requests
        while order and order[0][0] < horizon_ms:
            requests.discard(order.popleft()[1])
        return horizon_ms

    def _apply_request(
        self, ex: Exchange, ts: int, entry: list, horizon_ms: int, applied: list[list[dict]]
    ) -> list[list[dict]] | str | None:
        """A signed request's commands, unless the window refuses it (nothing applied)."""
        _, signature, ts_ms, commands = entry
        if type(signature) is not bytes or type(ts_ms) is not int or type(commands) is not list:
            return None  # not an entry we encode; skipped alike everywhere
        if ts_ms < horizon_ms:
            return REFUSED_EXPIRED  # its signature may have been pruned: never apply it
        if signature in self._requests:
            return REFUSED_REPLAYED
        self._requests.add(signature)
        self._request_order.append((ts_ms, signature))
        out: list = []
        for command in commands:
            if type(command) is list and len(command) == 5 and command[0] == KIND_KEY:
                # A key registry entry made by a signed admin request (POST /v1/admin/keys):
                # replayed, it would register a second key and hand its secret to whoever
                # replayed it.
                self._apply_key(command)
                out.append(None)
                continue
            if type(command) is list and len(command) == 4 and command[0] == KIND_ADDRESS:
                out.append(self._apply_address(command))
                continue
            if type(command) is dict:
                command["ts"] = max(ts, ex.last_ts)
            events = ex.apply(command)
            out.append(events)
            applied.append(events)
        return out

    def _apply_key(self, entry: list) -> None:
        _, action, key_id, account, role = entry
        if action == "add":
            self.keys[str(key_id)] = (str(account), str(role))
        elif action == "revoke":
            self.keys.pop(str(key_id), None)

    def _apply_address(self, entry: list) -> list | None:
        """None when the address is the account's (now, or already); `["taken", account]`
        when another account has it (nothing changes)."""
        _, chain_id, address, account = entry
        if type(chain_id) is not int or type(address) is not str or type(account) is not str:
            return ["malformed", ""]  # not an entry we encode; refused alike everywhere
        key = (chain_id, address.lower())
        holder = self.deposit_addresses.get(key)
        if holder is not None and holder != account:
            return ["taken", holder]
        self.deposit_addresses[key] = account
        return None

    def addresses(self, chain_id: int | None = None) -> list[tuple[int, str, str]]:
        """The deposit addresses applied here: (chain_id, address, account), sorted."""
        return sorted(
            (c, a, account)
            for (c, a), account in list(self.deposit_addresses.items())
            if chain_id is None or c == chain_id
        )

    def snapshot(self) -> bytes:
        """The node's state as bytes. Call it on the thread that applies (pysyncobj's): that
        thread is the only writer, so the state cannot change underneath, and readers on
        other threads are not held up for the hundreds of ms a large book takes to encode
        (the API's reads would stall the trio thread for that long behind `_lock`).

        The replay window goes in apply order, so equal windows encode to equal bytes."""
        directory = sorted([k, *v] for k, v in self.directory.items())
        keys = sorted([k, *v] for k, v in self.keys.items())
        window = [self.window_clock_ms, [[t, s] for t, s in self._request_order]]
        addresses = [list(row) for row in self.addresses()]
        return msgpack.packb(
            [SNAPSHOT_VERSION, self.exchange.snapshot(), directory, keys, window, addresses],
            use_bin_type=True,
        )

    def restore(self, blob: bytes) -> None:
        try:
            fields = _node_fields(blob)
            version = fields[0]
        except Exception as exc:
            raise MachineSnapshotError(f"undecodable node snapshot: {exc}") from exc
        if type(version) is not int or version not in RESTORABLE_VERSIONS:
            raise MachineSnapshotError(f"unsupported node snapshot version {version!r}")
        try:
            addresses: list = []  # before version 3: none
            if version == 1:  # before the replay window: it starts empty (cluster/batch.py)
                _, exchange_blob, directory, keys = fields
                clock, window = 0, []
            elif version == 2:
                _, exchange_blob, directory, keys, (clock, window) = fields
            else:
                _, exchange_blob, directory, keys, (clock, window), addresses = fields
            deposit_addresses = {(int(c), str(a)): str(acc) for c, a, acc in addresses}
            directory = {k: (a, u) for k, a, u in directory}
            keys = {k: (a, r) for k, a, r in keys}
            order = collections.deque((t, s) for t, s in window)
        except (TypeError, ValueError) as exc:
            raise MachineSnapshotError(f"malformed node snapshot: {exc}") from exc
        with gc_paused():
            exchange = Exchange.restore(exchange_blob)
            if self.freeze_restored:
                # The state is long-lived: out of the collector's way before it runs again
                # (so before the collector is back on), or its first collection walks every
                # order (400-600 ms per million resting orders, on every node that loads it,
                # at once). Its objects hold no cycles: reference counting frees them. (The
                # node also freezes after each full collection.)
                gc.freeze()
        restored_hash = None
        if written_by_this_build(exchange_blob):
            restored_hash = (exchange.cmd_index, stated_hash(exchange_blob))
        with self._lock:
            self.exchange = exchange
            self.restored_hash = restored_hash
            self.directory = directory
            self.keys = keys
            self.deposit_addresses = deposit_addresses
            self.window_clock_ms = clock
            self._request_order = order
            self._requests = {s for _, s in order}

    # key(), has_request() and members() run on the API's hot path (every signed request,
    # every redirect) and take no lock: a dict or set lookup or copy is one atomic step under
    # the GIL, and the apply thread only ever sets or pops single entries of these (restore
    # swaps them whole).

    def key(self, key_id: str) -> tuple[str, str] | None:
        return self.keys.get(key_id)

    def has_request(self, signature: str) -> bool:
        """Whether the replay window holds the request with this hex signature (the API's
        verifier asks, so that a replay of an applied request is refused before the log)."""
        try:
            return bytes.fromhex(signature) in self._requests
        except ValueError:
            return False

    def window_size(self) -> int:
        return len(self._request_order)

    def members(self) -> dict[str, tuple[str, str]]:
        return self.directory.copy()

    def read(self, fn: Callable[[Exchange], object]) -> object:
        """Run a read-only query against the exchange without racing the apply thread."""
        with self._lock:
            return fn(self.exchange)
