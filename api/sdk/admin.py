"""`AdminClient`: the operator's client (admin commands, keys, membership, leadership).

Its writes go through the trader SDK's retry policy (`api.sdk.retry`), with the same
outcomes: a returned value or `ApiError` (a 4xx) is definite, `ClusterUnavailable` is
definite (nothing was applied), `OutcomeUnknown` is not (some attempt may have been applied;
resend to settle it: deposits and withdrawals are idempotent by `ref`, a membership change
answers `unchanged`). docs/reference/sdk.md, "AdminClient".
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .client import _query, tls_context
from .codec import loads
from .errors import ApiError, ClusterUnavailable
from .retry import T, _api_error, _Core, _Flow, _Reply, drive
from .signing import Credentials


@dataclass(frozen=True)
class NodeSnapshot:
    """A node's state at `applied_index` (`AdminClient.snapshot`): the node snapshot bytes,
    and where they were taken."""

    node_id: str
    cluster_id: str | None  # None: the node's config names none
    role: str
    applied_index: int
    cmd_index: int
    seq: int
    state_hash: str
    blob: bytes


class AdminClient:
    """`AdminClient(urls, admin_creds)`: every node's API URL and an admin key.

    `timeout_s` bounds one HTTP attempt, `deadline_s` one call with all its retries (each
    method takes its own `deadline_s` too); `transport` and `verify` as for `Client`.
    """

    def __init__(
        self,
        urls: list[str],
        creds: Credentials,
        *,
        timeout_s: float = 10.0,
        deadline_s: float = 15.0,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
        backoff_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        self._core = _Core(
            urls,
            creds,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
        self._http = httpx.Client(
            transport=transport, timeout=timeout_s, verify=tls_context(verify)
        )

    def _run(self, flow: _Flow[T]) -> T:
        return drive(self._http, flow)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        """The nodes this client knows; setting them forgets a leader that is not among them."""
        return self._core.urls

    @urls.setter
    def urls(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("give at least one node URL")
        self._core.urls = [u.rstrip("/") for u in urls]
        if self._core.leader not in self._core.urls:
            self._core.leader = None

    @property
    def creds(self) -> Credentials:
        assert self._core.creds is not None
        return self._core.creds

    @property
    def leader(self) -> str | None:
        """The URL of the node that last answered as leader (None before the first write)."""
        return self._core.leader

    @property
    def stats(self) -> collections.Counter[str]:
        """The retry counters of `Client.stats` (retries, redirects, busy, unknown, ...)."""
        return self._core.stats

    # ------------------------------------------------------------------ one node's own state

    def status(self, url: str) -> dict:
        """That node's `GET /v1/cluster/status` (one attempt: `ClusterUnavailable` if it does
        not answer)."""
        return self._run(self._core.probe(url, "/v1/cluster/status", signed=False))

    def readiness(self, url: str) -> dict | None:
        """That node's `GET /readyz` answer (`ready`, `role`, `leader`, `lag_entries`; cheap:
        no walk of the state, unlike the status), or None if it is not ready or silent."""
        try:
            return self._run(self._core.probe(url, "/readyz", signed=False))
        except (ClusterUnavailable, ApiError):
            return None

    def statuses(self) -> dict[str, dict | None]:
        """Every node's status; None for a node that did not answer."""
        out: dict[str, dict | None] = {}
        for url in self.urls:
            try:
                out[url] = self.status(url)
            except (ClusterUnavailable, ApiError):
                out[url] = None
        return out

    def snapshot(
        self,
        url: str,
        *,
        on_progress: Callable[[int, int | None], None] | None = None,
        timeout_s: float = 300.0,
    ) -> NodeSnapshot:
        """That node's state at its applied index (`GET /v1/admin/snapshot`, one attempt),
        for a backup: ask a follower. Streamed; `on_progress(bytes_so_far, total)` after each
        chunk. `ClusterUnavailable` if the node does not answer, `ApiError` for a 4xx."""
        path = "/v1/admin/snapshot"
        url = url.rstrip("/")
        headers = self._core._headers("GET", path, b"", json=False, signed=True)
        chunks: list[bytes] = []
        try:
            with self._http.stream("GET", url + path, headers=headers, timeout=timeout_s) as r:
                if r.status_code >= 300:
                    r.read()
                    try:
                        payload = loads(r.content)
                    except ValueError:
                        payload = None
                    if r.status_code >= 500:
                        raise ClusterUnavailable(f"GET {url}{path}: {r.status_code} {payload}")
                    raise _api_error(_Reply(r.status_code, payload, url, False))
                total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                got = 0
                for chunk in r.iter_bytes(1 << 20):
                    chunks.append(chunk)
                    got += len(chunk)
                    if on_progress is not None:
                        on_progress(got, total)
                h = r.headers
                return NodeSnapshot(
                    node_id=h["X-QB-Node-Id"],
                    cluster_id=h.get("X-QB-Cluster-Id") or None,
                    role=h["X-QB-Role"],
                    applied_index=int(h["X-QB-Applied-Index"]),
                    cmd_index=int(h["X-QB-Cmd-Index"]),
                    seq=int(h["X-QB-Seq"]),
                    state_hash=h["X-QB-State-Hash"],
                    blob=b"".join(chunks),
                )
        except httpx.HTTPError as exc:
            raise ClusterUnavailable(f"GET {url}{path}: {type(exc).__name__}: {exc}") from exc

    def balances(self, url: str, account: str | None = None) -> dict:
        """That node's applied balances (a stale read, signed admin route; one attempt)."""
        path = "/v1/admin/balances" + _query(account=account)
        return self._run(self._core.probe(url, path, signed=True))

    # ------------------------------------------------------------------ through the leader

    def submit(self, commands: list[dict], *, deadline_s: float | None = None) -> list[dict]:
        """Send commands to the leader; one result per command: `{"events": [...]}`, or
        `{"error": {"code": "not_leader"|"outcome_unknown"}}` when the leader could not
        commit them (not applied / unknown). Resent after an unknown attempt, like every write:
        a deposit or withdrawal that the first attempt applied then answers `duplicate_ref`."""
        return self.submit_reply(commands, deadline_s=deadline_s)["results"]

    def submit_reply(self, commands: list[dict], *, deadline_s: float | None = None) -> dict:
        """`submit`, returning the whole reply: `{"results", "elapsed_ms"}` (the node's time
        from the first submit to the last command's events), plus `"after_retry": True` after
        an unknown attempt."""
        return self._run(
            self._core.command("/v1/admin/commands", {"commands": commands}, deadline_s=deadline_s)
        )

    def create_key(
        self, account: str, role: str = "trader", *, deadline_s: float | None = None
    ) -> Credentials:
        """Create an API key for `account`; the secret is only returned here. (A resend after
        an unknown attempt may leave a first key behind, whose secret nobody saw.)"""
        raw = self._run(
            self._core.command(
                "/v1/admin/keys", {"account": account, "role": role}, deadline_s=deadline_s
            )
        )
        return Credentials(raw["key_id"], raw["secret"], raw["role"], raw["account"])

    def change_membership(
        self, action: str, node_id: str, raft_addr: str, api_url: str, *, deadline_s: float = 30.0
    ) -> dict:
        """Add or remove one member; returns the leader's status once the change is committed
        (`change`: "added"/"removed", or "unchanged" if it already held, which makes a retry
        after an unknown outcome safe). While another change is uncommitted the leader answers
        `409 membership_change_in_progress` with `Retry-After`: the retry policy waits for it,
        until `deadline_s` (then `ClusterUnavailable`, or `OutcomeUnknown` if an earlier
        attempt may have been applied). `ApiError(409, "membership_change_refused")` is a
        definite refusal."""
        payload = {"action": action, "id": node_id, "raft_addr": raft_addr, "api_url": api_url}
        return self._run(self._core.command("/v1/admin/members", payload, deadline_s=deadline_s))

    def transfer_leader(self, to: str | None = None, *, deadline_s: float | None = None) -> dict:
        """Ask the leader to hand over (to `to`, or the most caught-up peer): best effort, so
        check who leads afterwards. `ApiError(409, "transfer_refused")` when it refused."""
        body = {"to": to} if to else {}
        return self._run(
            self._core.command("/v1/admin/transfer-leader", body, deadline_s=deadline_s)
        )

    def assign_deposit_address(
        self, account: str, chain_id: int, address: str, *, deadline_s: float | None = None
    ) -> str:
        """Assign an EVM chain's deposit address to `account` (replicated); "assigned", or
        "unchanged" if it was that account's already (so a resend after a lost answer is
        safe). `ApiError(409, "address_taken")` if another account has it."""
        body = {"account": account, "chain_id": chain_id, "address": address}
        raw = self._run(
            self._core.command("/v1/admin/deposit-addresses", body, deadline_s=deadline_s)
        )
        return raw["change"]

    def deposit_addresses(self, url: str, chain_id: int | None = None) -> list[dict]:
        """That node's applied deposit addresses, `[{chain_id, address, account}]` (a stale
        read, signed admin route; one attempt)."""
        path = "/v1/admin/deposit-addresses" + _query(chain_id=chain_id)
        return self._run(self._core.probe(url, path, signed=True))["addresses"]

    def barrier(self, *, deadline_s: float | None = None) -> dict:
        """Linearizable point: returns the leader's status after a committed no-op. It changes
        nothing, so a lost answer is simply resent (never `OutcomeUnknown`)."""
        return self._run(
            self._core.command("/v1/admin/barrier", {}, write=False, deadline_s=deadline_s)
        )
