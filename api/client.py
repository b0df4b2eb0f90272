"""Python client for a quorumbook cluster.

Knows every node, finds the leader, follows `307` redirects and retries while there is no
leader. Imports nothing of ours but the wire format (`api.auth`'s signing).
The full SDK (orders, WebSockets, outcome look-ups) grows here with the API issue.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from .auth import Credentials, signed_headers


class ClusterUnavailable(Exception):
    """No node answered as leader before the deadline."""


class AdminClient:
    def __init__(self, urls: list[str], creds: Credentials, *, timeout_s: float = 10.0) -> None:
        self.urls = list(urls)
        self.creds = creds
        self.timeout_s = timeout_s
        self._http = httpx.Client(timeout=timeout_s)
        self._leader: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, url: str) -> dict:
        response = self._http.get(url + "/v1/cluster/status")
        response.raise_for_status()
        return response.json()

    def statuses(self) -> dict[str, dict | None]:
        out: dict[str, dict | None] = {}
        for url in self.urls:
            try:
                out[url] = self.status(url)
            except httpx.HTTPError:
                out[url] = None
        return out

    def _post(self, path: str, payload: Any, deadline_s: float) -> dict:
        body = json.dumps(payload).encode()
        deadline = time.monotonic() + deadline_s
        candidates = ([self._leader] if self._leader else []) + self.urls
        attempt = 0
        while True:
            url = candidates[attempt % len(candidates)]
            attempt += 1
            try:
                response = self._http.post(
                    url + path, content=body,
                    headers={"Content-Type": "application/json",
                             **signed_headers(self.creds, "POST", path, body)},
                )
            except httpx.HTTPError:
                response = None
            if response is not None:
                if response.status_code == 307 and response.headers.get("X-Leader"):
                    self._leader = response.headers["X-Leader"]
                    candidates = [self._leader, *self.urls]
                    attempt = 0
                    continue
                if response.status_code < 300:
                    self._leader = url
                    return response.json()
                if response.status_code not in (503, 307):
                    raise httpx.HTTPStatusError(
                        f"{response.status_code}: {response.text}", request=response.request,
                        response=response)
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"no leader answered {path} within {deadline_s} s")
            if attempt % len(candidates) == 0:
                time.sleep(0.05)

    def submit(self, commands: list[dict], *, deadline_s: float = 15.0) -> list[dict]:
        """Send commands to the leader; one result per command ({"events"} or {"error"})."""
        return self._post("/v1/admin/commands", {"commands": commands}, deadline_s)["results"]

    def balances(self, url: str, account: str | None = None) -> dict:
        """One node's applied balances (stale read, signed admin route)."""
        path = "/v1/admin/balances" + (f"?account={account}" if account else "")
        response = self._http.get(url + path, headers=signed_headers(self.creds, "GET", path, b""))
        response.raise_for_status()
        return response.json()

    def create_key(self, account: str, role: str = "trader", *, deadline_s: float = 15.0
                   ) -> Credentials:
        """Create an API key for `account`; the secret is only returned here."""
        raw = self._post("/v1/admin/keys", {"account": account, "role": role}, deadline_s)
        return Credentials(raw["key_id"], raw["secret"], raw["role"], raw["account"])

    def change_membership(self, action: str, node_id: str, raft_addr: str, api_url: str,
                          *, deadline_s: float = 30.0) -> dict:
        payload = {"action": action, "id": node_id, "raft_addr": raft_addr, "api_url": api_url}
        return self._post("/v1/admin/members", payload, deadline_s)

    def transfer_leader(self, to: str | None = None, *, deadline_s: float = 15.0) -> dict:
        return self._post("/v1/admin/transfer-leader", {"to": to} if to else {}, deadline_s)

    def barrier(self, *, deadline_s: float = 15.0) -> dict:
        """Linearizable point: returns the leader's status after a committed no-op."""
        return self._post("/v1/admin/barrier", {}, deadline_s)
