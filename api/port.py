"""What the API needs from a node. `cluster/` implements it; `api/` never imports `cluster/`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from statemachine import Exchange


class NodeError(Exception):
    """What a node answers instead of a result. api/outcomes.py maps each kind to one HTTP
    answer (and the same answer over the WebSocket), for every route."""


class NotLeaderError(NodeError):
    """Definite: not applied. `leader_url` is where the leader's API is, if one is known."""

    def __init__(
        self, leader_url: str | None, message: str = "this node is not the leader"
    ) -> None:
        super().__init__(message)
        self.leader_url = leader_url


class OverloadedError(NodeError):
    """Definite: the node's submit queue is full; nothing was applied. Retry later."""


class UnencodableError(NodeError):
    """Definite: a value in the command cannot be carried by the log (400)."""


class OutcomeUnknownError(NodeError):
    """The command may or may not have been applied (timeout, leader change)."""


class NoQuorumError(NodeError):
    """A read barrier did not complete (no majority answered in time): nothing to apply,
    nothing read; retry."""


class MembershipBusyError(NodeError):
    """Definite: another membership change is not committed yet; nothing was changed. Retry
    shortly (409 membership_change_in_progress with Retry-After)."""


class RefusedError(NodeError):
    """Definite: the leader refused an admin request it understood (removing itself, a
    transfer to a node that is not caught up, an unknown node); nothing changed."""

    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class NotConfiguredError(NodeError):
    """This node's configuration lacks what the request needs (e.g. `api_master_file` to
    create keys). Not a leadership question: no other answer from this node will differ."""


class Subscription(Protocol):
    """Committed events as this node applies them, in `seq` order, from subscription on.

    `receive()` returns the events of one applied command (a non-empty list). When the
    subscriber falls more than its buffer behind, the subscription is closed and `receive()`
    raises `trio.EndOfChannel`; `overflowed` then says why (a slow consumer is cut, never
    buffered forever).
    """

    overflowed: bool

    async def receive(self) -> list[dict]: ...
    def close(self) -> None: ...


class NodePort(Protocol):
    node_id: str
    # The planted bug of the Jepsen harness ([api] unsafe_local_reads): linearizable reads
    # answered from this node's state, leader or not, without the read barrier.
    unsafe_local_reads: bool = False

    def is_leader(self) -> bool: ...
    def leader_url(self) -> str | None: ...
    async def status(self) -> dict:
        """health() plus the state hash, engine, peers and Raft counters (the hash is computed
        off the trio thread: it walks the whole state)."""

    def health(self) -> dict:
        """Cheap figures (no state hash), for /readyz and /metrics: node_id, role
        ("leader"|"follower"|"candidate"), leader (its id, or None when none is known),
        leader_connected (this node is the leader, or its link to the leader is up), term,
        commit_index, applied_index (Raft log) and cmd_index (state machine); optionally
        "log": the journal and its compaction (log_first_index, journal_bytes, dump_index,
        compaction_hold (None: no hold), compaction_holds_released)."""

    def histograms(self) -> dict:
        """{"qb_commit_latency_seconds", "qb_batch_size_entries", and the steps of a commit:
        "qb_raft_queue_seconds", "qb_raft_commit_seconds", "qb_raft_apply_seconds",
        "qb_raft_sync_seconds", "qb_commit_handoff_seconds"}: each {"buckets": [[upper bound,
        cumulative count], ...], "sum", "count"}. Metrics show the ones given."""

    async def submit(self, command: dict, request: tuple[str, int] | None = None) -> list[dict]:
        """Replicate one command; its events once committed and applied. `request`: the
        (hex signature, ts_ms) of the signed request it came from: the state machine keeps it
        in its replicated replay window and applies no second entry of the same request,
        which raises `api.auth.AuthError` ("replayed", or "expired" for a request older than
        the window; definite: nothing applied)."""

    def precheck(self, command: dict) -> dict | None:
        """The `rejected` event (without seq, ts, cmd_index) a trader command would get in any
        state, so it need not be logged; None: submit it. Exact: statemachine/precheck.py."""

    async def submit_many(
        self, commands: list[dict], request: tuple[str, int] | None = None
    ) -> list[list[dict]]:
        """Commands in order, committed together (all or none); each command's events. With
        a `request`, refused together as `submit` says."""

    async def read_barrier(self) -> None: ...
    async def change_membership(
        self, action: str, node_id: str, raft_addr: str, api_url: str
    ) -> str:
        """Add or remove one member, one change at a time; returns once it is committed:
        "added"/"removed", or "unchanged" if it already held (a retry is safe). Raises
        MembershipBusyError while another change is uncommitted, NotLeaderError (definite),
        OutcomeUnknownError."""

    async def transfer_leadership(self, node_id: str | None) -> None:
        """Ask the leader to hand over (to `node_id`, or the most caught-up peer)."""

    async def create_key(
        self, key_id: str, account: str, role: str, request: tuple[str, int] | None = None
    ) -> str:
        """Register an API key through the log; return its secret. With the signed `request`
        (signature, ts_ms), a replay of it is refused (AuthError replayed) like a command's."""

    async def assign_deposit_address(
        self, chain_id: int, address: str, account: str, request: tuple[str, int] | None = None
    ) -> str:
        """Assign an EVM chain's deposit address to an account through the log: "assigned",
        or "unchanged" if it was that account's already (a retry is safe). RefusedError
        `address_taken` (409) if another account has it; nothing changes."""

    def deposit_addresses(self, chain_id: int | None = None) -> list[tuple[int, str, str]]:
        """The deposit addresses applied on this node: (chain_id, address, account), sorted."""

    async def snapshot(self) -> dict:
        """This node's state at its applied index, for a backup: `{"blob": bytes (the node
        snapshot), "applied_index", "cmd_index", "seq", "state_hash", "role", "cluster_id"}`."""

    def subscribe(self, buffer: int = 10_000) -> Subscription:
        """Follow committed events from now on (must be called from the trio thread)."""

    def recent_trades(self, market: str, limit: int) -> list[dict]:
        """The last `limit` trades of a market this node has applied, oldest first."""

    def applied_seq(self) -> int:
        """The seq of the last event this node applied, without waiting for the apply thread
        (a single int: no lock, unlike `read`)."""

    def read(self, query: Callable[[Exchange], Any]) -> Any:
        """Run a read-only query against this node's applied state (stale unless after a barrier)."""
