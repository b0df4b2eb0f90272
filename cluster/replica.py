"""The trio side of a node: batching, submission and the bridge from pysyncobj's thread.

Callers `await replica.submit(command)`. A batcher task proposes what is queued as one
replicated call (up to `batch_max` entries, stamped with one wall-clock `ts`, from `clock_ns`:
in a node, its `WallClock`, cluster/clock.py) as soon as the pipeline has room: at most
`max_in_flight` batches are proposed and not yet resolved. An idle node proposes a lone
command at once (no waiting window on the latency path); under load the commands that
arrive while the pipeline is full go out together, so batches grow with the load and the
per-batch costs (Raft messages, journal writes, hand-overs) do not.
`batch_window_s` > 0 adds a fixed wait for more commands before each proposal. pysyncobj reports the outcome on its own thread; the callback
only hands it to trio with `TrioToken.run_sync_soon`, so no trio code ever blocks on
pysyncobj. A caller gets events only once its command is committed and applied.

Outcomes a caller can see (STYLE 9):
- events (definite: applied; a `rejected` event is a definite "not applied");
- `NotLeader` (definite: not proposed, or proposed and refused before it entered the log);
- `OutcomeUnknown` (the command may or may not take effect: timeout, leader changed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .batch import (
    KIND_ADDRESS,
    KIND_BARRIER,
    KIND_COMMAND,
    KIND_KEY,
    KIND_MEMBER,
    KIND_REQUEST,
    REFUSED_EXPIRED,
    REFUSED_REPLAYED,
    encode_batch,
)
from .raft import STAGE_BUCKETS_S, Histogram

log = logging.getLogger(__name__)


class SubmitFailure(Protocol):
    definite: bool
    reason: str
    detail: str


class RaftPort(Protocol):
    """What the replica needs from the Raft adapter (`cluster.raft.RaftReplica`)."""

    def submit(self, payload: bytes, callback: Any) -> None: ...
    def is_leader(self) -> bool: ...
    def leader(self) -> str | None: ...
    def status(self) -> dict: ...
    def add_node(self, addr: str, callback: Any) -> None: ...
    def remove_node(self, addr: str, callback: Any) -> None: ...
    def transfer_leadership(self, addr: str | None, callback: Any) -> None: ...
    def read_between_ticks(self, query: Any, callback: Any) -> None: ...


class NotLeader(Exception):
    """Definite: the command was not applied. `leader` is the known leader's id, if any."""

    def __init__(self, leader: str | None, reason: str = "not leader") -> None:
        super().__init__(reason)
        self.leader = leader


class Overloaded(Exception):
    """Definite: the submit queue is full; nothing was proposed. Retry after a pause."""


class Unencodable(Exception):
    """Definite: the command holds a value the log cannot carry (e.g. an integer beyond
    64 bits); nothing was proposed."""


class OutcomeUnknown(Exception):
    """The command may or may not have been applied; a retry with the same
    client_order_id (or ref) settles it."""


class Refused(Exception):
    """Definite: the leader refused a membership change or a leadership transfer it
    understood (removing itself, a target that is not caught up); nothing changed. `code`
    names the kind for the API."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MembershipBusy(Exception):
    """Definite: another membership change is not committed yet (or this leader has not
    committed an entry of its term); nothing was proposed. Retry shortly."""


class RequestRefused(Exception):
    """Definite: none of the signed request's commands was applied, because the replicated
    replay window already holds its signature (`code` "replayed": the request itself was
    applied before, from an earlier copy) or its timestamp is older than the window
    ("expired")."""

    MESSAGES = {
        REFUSED_REPLAYED: "this request was already received (and applied)",
        REFUSED_EXPIRED: "the request's timestamp is older than the cluster's replay "
        "window (a node's clock is far off); sign it again",
    }

    def __init__(self, code: str) -> None:
        super().__init__(self.MESSAGES.get(code, code))
        self.code = code


COMMIT_LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@dataclass(eq=False)
class _Slot:
    """One caller's entries (one, or a whole request's worth); they commit together."""

    entries: list[list]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class Replica:
    def __init__(
        self,
        raft: RaftPort,
        *,
        batch_window_s: float = 0.0,
        batch_max: int = 1000,
        max_in_flight: int = 2,
        submit_timeout_s: float = 5.0,
        queue_max: int = 100_000,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.raft = raft
        # The wall clock the leader stamps batches with (a node's may carry an injected
        # offset). It may jump either way: the state machine never lets ts go back.
        self.clock_ns = clock_ns
        self.batch_window_s = batch_window_s
        self.batch_max = batch_max
        self.max_in_flight = max_in_flight
        self.submit_timeout_s = submit_timeout_s
        # Proposed batches without an outcome yet: token -> when proposed (perf_counter).
        self._in_flight: dict[object, float] = {}
        self._room = trio.Event()
        self._send, self._receive = trio.open_memory_channel[_Slot](queue_max)
        self._token: trio.lowlevel.TrioToken | None = None
        self.batches_proposed = 0
        self.batch_sizes_total = 0
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        # Proposal to commit-and-apply on this leader, for batches that committed.
        self.commit_latency_s = Histogram(COMMIT_LATENCY_BUCKETS_S)
        # The last step of it: from the Raft thread's callback to this (trio) thread.
        self.handoff_s = Histogram(STAGE_BUCKETS_S)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batcher; run it in the node's nursery with `nursery.start`."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        async with self._receive:
            while True:
                first = await self._receive.receive()
                await self._wait_for_room()
                batch = [first]
                size = len(first.entries)
                if self.batch_window_s > 0:
                    with trio.move_on_after(self.batch_window_s):
                        while size < self.batch_max:
                            slot = await self._receive.receive()
                            batch.append(slot)
                            size += len(slot.entries)
                while size < self.batch_max:
                    try:
                        slot = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(slot)
                    size += len(slot.entries)
                self._propose(batch)
                # Let resolved callers and new submitters run between batches.
                await trio.lowlevel.checkpoint()

    async def _wait_for_room(self) -> None:
        """Return once fewer than `max_in_flight` proposed batches await their outcome.

        A batch whose outcome has not come back within `submit_timeout_s` no longer counts
        (its callers have been answered OutcomeUnknown), so a callback that never comes
        cannot wedge the pipeline.
        """
        while len(self._in_flight) >= self.max_in_flight:
            now = time.perf_counter()
            horizon = now - self.submit_timeout_s
            for token, proposed in list(self._in_flight.items()):
                if proposed <= horizon:
                    del self._in_flight[token]
            if len(self._in_flight) < self.max_in_flight:
                return
            oldest = min(self._in_flight.values())
            self._room = trio.Event()
            with trio.move_on_after(max(0.0, oldest + self.submit_timeout_s - now)):
                await self._room.wait()

    def _propose(self, batch: list[_Slot]) -> None:
        if not self.raft.is_leader():
            error = NotLeader(self.raft.leader())
            for slot in batch:
                slot.error = error
                slot.done.set()
            return
        ts = self.clock_ns()
        try:
            payload = encode_batch(ts, [entry for slot in batch for entry in slot.entries])
        except (OverflowError, TypeError, ValueError):
            # Some caller sent a value msgpack cannot encode: fail those callers (definite),
            # never the batcher, and propose the rest.
            good = []
            for slot in batch:
                try:
                    encode_batch(ts, slot.entries)
                except (OverflowError, TypeError, ValueError) as exc:
                    slot.error = Unencodable(f"a value cannot be encoded: {exc}")
                    slot.done.set()
                else:
                    good.append(slot)
            if not good:
                return
            batch = good
            payload = encode_batch(ts, [entry for slot in batch for entry in slot.entries])
        entries = [entry for slot in batch for entry in slot.entries]
        self.batches_proposed += 1
        self.batch_sizes_total += len(entries)
        self.batch_sizes.observe(len(entries))
        token = self._token
        assert token is not None
        proposed = time.perf_counter()
        ticket = object()
        self._in_flight[ticket] = proposed

        def on_result(result: object, failure: SubmitFailure | None) -> None:
            # pysyncobj's thread (or ours, for an immediate failure): hand over, never block.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(
                    self._resolve, batch, result, failure, proposed, ticket, time.perf_counter()
                )

        self.raft.submit(payload, on_result)

    def _resolve(
        self,
        batch: list[_Slot],
        result: list | None,
        failure: Any,
        proposed: float,
        ticket: object,
        answered: float,
    ) -> None:
        if self._in_flight.pop(ticket, None) is not None:
            self._room.set()
        if failure is None:
            now = time.perf_counter()
            self.commit_latency_s.observe(now - proposed)
            self.handoff_s.observe(now - answered)
        if failure is not None:
            if failure.definite:
                error: BaseException = NotLeader(self.raft.leader(), failure.reason)
            else:
                error = OutcomeUnknown(failure.reason)
            for slot in batch:
                slot.error = error
                slot.done.set()
            return
        results = result
        if type(results) is not list or len(results) != sum(len(slot.entries) for slot in batch):
            # Cannot happen for a batch we encoded; never guess which caller got what.
            error = OutcomeUnknown("result count does not match the batch")
            for slot in batch:
                slot.error = error
                slot.done.set()
            return
        at = 0
        for slot in batch:
            slot.result = results[at : at + len(slot.entries)]
            at += len(slot.entries)
            slot.done.set()

    async def _submit_entry(self, entry: list, timeout_s: float | None) -> Any:
        return (await self._submit_entries([entry], timeout_s))[0]

    async def _submit_entries(self, entries: list[list], timeout_s: float | None) -> list:
        if not self.raft.is_leader():
            raise NotLeader(self.raft.leader())
        slot = _Slot(entries)
        try:
            self._send.send_nowait(slot)
        except trio.WouldBlock:
            raise Overloaded("submit queue full") from None
        timeout = self.submit_timeout_s if timeout_s is None else timeout_s
        with trio.move_on_after(timeout if timeout is not None else math.inf):
            await slot.done.wait()
        if not slot.done.is_set():
            raise OutcomeUnknown(f"no outcome within {timeout} s")
        if slot.error is not None:
            raise slot.error
        return slot.result

    async def submit(
        self,
        command: dict,
        *,
        timeout_s: float | None = None,
        request: tuple[str, int] | None = None,
    ) -> list[dict]:
        """Replicate one command; return its events once committed and applied.

        `request`: (hex signature, ts_ms) of the signed API request it came from. The entry
        then carries it, and the replicated replay window refuses it if that request was
        applied before (RequestRefused; cluster/batch.py)."""
        if request is None:
            return await self._submit_entry([KIND_COMMAND, command], timeout_s)
        return (await self._submit_request([command], request, timeout_s))[0]

    async def submit_many(
        self,
        commands: list[dict],
        *,
        timeout_s: float | None = None,
        request: tuple[str, int] | None = None,
    ) -> list[list[dict]]:
        """Replicate several commands in order, in one batch: all are applied or none.

        Returns each command's events. One slot for the whole list (no task per command):
        this is the fast path for batch requests. With a `request`, the commands travel in
        one request entry: the replay window applies or refuses them together.
        """
        if request is None:
            return await self._submit_entries([[KIND_COMMAND, c] for c in commands], timeout_s)
        return await self._submit_request(commands, request, timeout_s)

    async def _submit_request(
        self, commands: list[dict], request: tuple[str, int], timeout_s: float | None
    ) -> list[list[dict]]:
        signature, ts_ms = request
        # The hex digest the API verified: its 32 bytes are half the size in the log, the
        # window and the snapshot.
        entry = [KIND_REQUEST, bytes.fromhex(signature), ts_ms, commands]
        outcome = await self._submit_entry(entry, timeout_s)
        if type(outcome) is str:
            raise RequestRefused(outcome)
        if type(outcome) is not list or len(outcome) != len(commands):
            # Cannot happen for an entry we encoded; never guess what was applied.
            raise OutcomeUnknown("the request's result does not match its commands")
        return outcome

    async def read_barrier(self, *, timeout_s: float | None = None) -> None:
        """Return once a no-op entry proposed now is committed and applied here.

        Everything committed before the call is then applied locally, and a deposed leader
        cannot pass it (its entry never commits), so reads after it are linearizable.
        """
        await self._submit_entry([KIND_BARRIER], timeout_s)

    async def record_member(self, action: str, node_id: str, raft_addr: str, api_url: str) -> None:
        """Replicate a directory entry (where a member's API is) through the log."""
        await self._submit_entry([KIND_MEMBER, action, node_id, raft_addr, api_url], None)

    async def record_key(
        self,
        action: str,
        key_id: str,
        account: str,
        role: str,
        *,
        request: tuple[str, int] | None = None,
    ) -> None:
        """Replicate an API key registry entry (no secret) through the log; with the signed
        `request` it came from, inside that request's entry (replay window, as `submit`)."""
        entry = [KIND_KEY, action, key_id, account, role]
        if request is None:
            await self._submit_entry(entry, None)
        else:
            await self._submit_request([entry], request, None)

    async def record_address(
        self, chain_id: int, address: str, account: str, *, request: tuple[str, int] | None
    ) -> list | None:
        """Replicate a deposit address assignment (KIND_ADDRESS) through the log, inside the
        signed `request`'s entry when there is one; the state machine's answer: None
        (assigned, or already that account's) or `["taken", account]`."""
        entry = [KIND_ADDRESS, chain_id, address, account]
        if request is None:
            return await self._submit_entry(entry, None)
        [outcome] = await self._submit_request([entry], request, None)
        return outcome

    async def raft_admin(self, op: str, addr: str | None, *, timeout_s: float = 10.0) -> Any:
        """Membership change or leader transfer through pysyncobj, awaited without blocking.

        `op` is "add", "remove" or "transfer". A membership change returns once committed
        ("added"/"removed"), or at once ("unchanged") if it already holds. Raises NotLeader or
        OutcomeUnknown like submit, and MembershipBusy while another change is uncommitted.
        """
        if not self.raft.is_leader():
            raise NotLeader(self.raft.leader())
        call = {
            "add": self.raft.add_node,
            "remove": self.raft.remove_node,
            "transfer": self.raft.transfer_leadership,
        }[op]
        outcome = await self._called_back(lambda on_result: call(addr, on_result), timeout_s)
        if outcome is None:
            raise OutcomeUnknown(f"{op} {addr}: no outcome within {timeout_s} s")
        result, failure = outcome
        if failure is not None:
            what = f"{op} {addr}: {failure.reason}" + (
                f" ({failure.detail})" if failure.detail else ""
            )
            if failure.reason == "busy":
                raise MembershipBusy(f"{op} {addr}: {failure.detail}")
            if failure.reason in ("not_leader", "no_leader"):
                raise NotLeader(self.raft.leader(), what)
            if failure.definite:  # rejected, discarded, queue_full, shutdown before proposing
                code = "transfer_refused" if op == "transfer" else "membership_change_refused"
                raise Refused(code, what)
            raise OutcomeUnknown(f"{op} {addr}: {failure.reason}")
        return result

    async def read_between_ticks(self, query: Any, *, timeout_s: float = 60.0) -> Any:
        """`query()` run on the Raft thread between two ticks (a long read of the state
        machine: see RaftReplica.read_between_ticks), awaited without blocking. Raises
        OutcomeUnknown if it raised or did not run within `timeout_s`."""
        outcome = await self._called_back(
            lambda on_result: self.raft.read_between_ticks(query, on_result), timeout_s
        )
        if outcome is None:
            raise OutcomeUnknown(f"no read between ticks within {timeout_s} s")
        result, failure = outcome
        if failure is not None:
            raise OutcomeUnknown(f"read between ticks failed: {failure}")
        return result

    async def _called_back(self, start: Any, timeout_s: float) -> tuple[Any, Any] | None:
        """Start a Raft request with `start(callback)` and await its (result, failure), handed
        from pysyncobj's thread; None if it did not come within `timeout_s`."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        outcome: list[tuple[Any, Any]] = []

        def on_result(result: Any, failure: Any) -> None:
            def finish() -> None:
                outcome.append((result, failure))
                done.set()

            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finish)

        start(on_result)
        with trio.move_on_after(timeout_s):
            await done.wait()
        return outcome[0] if outcome else None
