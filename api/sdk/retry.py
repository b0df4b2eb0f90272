"""The SDK's one retry policy: leader tracking and the classification of every answer.

Every REST call of `Client`, `AsyncClient` and `AdminClient` is a flow: a generator that
yields what to send (`_Send`) or how long to wait (`_Sleep`) and receives the answer (an
`httpx.Response`, or the transport exception). `_Core.request` is the policy, written once
with no I/O in it; `drive` and `adrive` are the two thin drivers that do the I/O (STYLE.md 2).

One attempt's answer, classified (STYLE.md 9; docs/reference/sdk.md "Outcomes"):

| the attempt got | applied? | the flow |
|---|---|---|
| `2xx`, or a `4xx` other than those below | the answer says | returns it (a 4xx becomes `ApiError`) |
| `307` + `X-Leader` | no | resends to that leader at once |
| `503 no_leader`, another `503` with `Retry-After`, `429`, a `4xx` with `Retry-After` (`409 membership_change_in_progress`), connection refused/connect timeout | no | backs off, resends |
| a `503` with a code and no `Retry-After` (`not_configured`: this node never can) | no | raises `ApiError` |
| `503 outcome_unknown`, another `5xx`, a read timeout, a connection reset or closed after sending | a write: maybe | backs off, resends the same request |
| `401 replayed` | a write: maybe (another copy of it got there first) | re-signs, resends at once |

When the deadline passes: `OutcomeUnknown` if some attempt of a write may have been applied,
else `ClusterUnavailable` (definite: nothing was).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx

from .codec import dumps, loads
from .errors import ApiError, ClusterUnavailable, OutcomeUnknown
from .signing import Credentials, signed_headers, signed_path


@dataclass
class _Send:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    timeout_s: float


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Reply:
    status: int
    body: Any
    url: str
    unknown_before: bool  # an earlier attempt of this call may have been applied


_Step = _Send | _Sleep
_Answer = httpx.Response | httpx.HTTPError | None
T = TypeVar("T")
_Flow = Generator[_Step, _Answer, T]

# Transport errors raised before any byte of the request can have reached the server.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


def _error_of(body: Any) -> dict:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return {}


def _api_error(reply: _Reply) -> ApiError:
    err = _error_of(reply.body)
    seq = reply.body.get("seq") if isinstance(reply.body, dict) else None
    return ApiError(
        reply.status,
        err.get("code", "http_error"),
        err.get("message", ""),
        err.get("order_id"),
        after_retry=reply.unknown_before,
        seq=seq if type(seq) is int else None,
    )


def _summary(answer: _Answer) -> str:
    """One attempt's answer in a few words, for the message of a deadline error."""
    if isinstance(answer, httpx.Response):
        try:
            code = _error_of(loads(answer.content)).get("code")
        except ValueError:
            code = None
        return f"{answer.status_code} {code}" if code else str(answer.status_code)
    return type(answer).__name__


class _Core:
    """Leader tracking and the retry policy, shared by `Client`, `AsyncClient` and
    `AdminClient`."""

    def __init__(
        self,
        urls: list[str],
        creds: Credentials | None,
        *,
        timeout_s: float,
        deadline_s: float,
        backoff_s: float = 0.02,
        backoff_max_s: float = 0.25,
    ) -> None:
        if not urls:
            raise ValueError("give at least one node URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.creds = creds
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.leader: str | None = None
        # retries: attempts after the first; redirects: 307s followed; transport_errors;
        # busy: 503/429/5xx answers, and 4xx with Retry-After; replayed: 401 replayed
        # (re-signed); unknown: attempts with an unknown outcome; recovered: places settled by
        # the outcome look-up.
        self.stats: collections.Counter[str] = collections.Counter()

    def _next_url(self, after: str | None) -> str:
        if after in self.urls:
            return self.urls[(self.urls.index(after) + 1) % len(self.urls)]
        return self.urls[0]

    def _headers(self, method: str, path: str, raw: bytes, *, json: bool, signed: bool) -> dict:
        headers = {"Content-Type": "application/json"} if json else {}
        if signed:
            if self.creds is None:
                raise ValueError("this route needs credentials")
            headers.update(signed_headers(self.creds, method, signed_path(path), raw))
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        signed: bool = True,
        write: bool = False,
        leader_only: bool = True,
        deadline_s: float | None = None,
    ) -> _Flow[_Reply]:
        """Send until a node answers definitely (2xx/4xx); re-signed on every attempt.

        `path` is the path and query exactly as sent (already percent-encoded); what is signed
        is what the server verifies, `signed_path(path)`. `write`: the request changes state,
        so a lost answer leaves its outcome unknown (the module's table).
        """
        raw = dumps(body) if body is not None else b""
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        url = self.leader or self.urls[0]
        unknown = False
        backoff = self.backoff_s
        attempts = 0
        redirects_in_row = 0
        while True:
            headers = self._headers(method, path, raw, json=body is not None, signed=signed)
            remaining = deadline - time.monotonic()
            if attempts:
                self.stats["retries"] += 1
            attempts += 1
            answer = yield _Send(
                method, url + path, headers, raw, max(0.05, min(self.timeout_s, remaining))
            )
            wait = True
            if not (isinstance(answer, httpx.Response) and answer.status_code == 307):
                redirects_in_row = 0
            if isinstance(answer, httpx.HTTPError):
                self.stats["transport_errors"] += 1
                if not isinstance(answer, _NOT_SENT) and write:
                    unknown = True
                    self.stats["unknown"] += 1
                if self.leader == url:
                    self.leader = None
                url = self._next_url(url)
            else:
                assert isinstance(answer, httpx.Response)
                try:
                    payload = loads(answer.content)
                except ValueError:
                    payload = None
                status = answer.status_code
                code = _error_of(payload).get("code")
                if status == 307 and answer.headers.get("X-Leader"):
                    self.stats["redirects"] += 1
                    target = answer.headers["X-Leader"].rstrip("/")
                    self.leader = target
                    # A leader that redirects to itself (its submit queue is full) is busy; nodes
                    # that point at each other (mid-election) are given time to agree.
                    redirects_in_row += 1
                    wait = target == url or redirects_in_row > len(self.urls)
                    url = target
                elif status == 401 and code == "replayed":
                    # This copy was not applied, but this client never sends a signature
                    # twice: another copy of the same attempt (duplicated on the way) reached
                    # the cluster first and may have been applied. Re-signed below.
                    self.stats["replayed"] += 1
                    if write:
                        unknown = True
                        self.stats["unknown"] += 1
                    wait = False
                elif status == 429 or (400 <= status < 500 and answer.headers.get("Retry-After")):
                    # Rate limited, or busy (one membership change at a time): not applied,
                    # and the node asks for a resend later. Back off and resend.
                    self.stats["busy"] += 1
                elif (
                    status == 503
                    and code not in (None, "outcome_unknown")
                    and not answer.headers.get("Retry-After")
                ):
                    # A node's definite refusal that no resend can change (`not_configured`):
                    # every "try again" answer of the node carries Retry-After.
                    return _Reply(status, payload, url, unknown)
                elif status >= 500 or status == 307:
                    self.stats["busy"] += 1
                    if write and (code == "outcome_unknown" or (status >= 500 and status != 503)):
                        unknown = True
                        self.stats["unknown"] += 1
                    if code == "no_leader" or status == 307:
                        if self.leader == url:
                            self.leader = None
                        url = self._next_url(url)
                else:
                    # Only a success proves leadership: a follower answers auth and body
                    # errors itself, before it would redirect.
                    if leader_only and status < 300:
                        self.leader = url
                    return _Reply(status, payload, url, unknown)
            now = time.monotonic()
            if now >= deadline:
                what = f"{method} {path.split('?')[0]}"
                last = _summary(answer)
                if unknown:
                    raise OutcomeUnknown(
                        f"{what}: outcome unknown after {attempts} attempts (last: {last}); "
                        "resend it (same client_order_id or ref) to settle it"
                    )
                raise ClusterUnavailable(
                    f"{what}: no leader answered within the deadline "
                    f"({attempts} attempts, last: {last}); not applied"
                )
            if wait:
                yield _Sleep(min(backoff, deadline - now))
                backoff = min(backoff * 2, self.backoff_max_s)

    def command(
        self, path: str, body: dict, *, write: bool = True, deadline_s: float | None = None
    ) -> _Flow[dict]:
        """A POST resent after an unknown attempt; a result or `ApiError` after such a resend
        says so (`after_retry`), see docs/reference/sdk.md."""
        reply = yield from self.request("POST", path, body, write=write, deadline_s=deadline_s)
        if reply.status >= 300:
            raise _api_error(reply)
        if reply.unknown_before:
            return {**reply.body, "after_retry": True}
        return reply.body

    def get(
        self, path: str, *, signed: bool = True, leader_only: bool = True, key: str | None = None
    ) -> _Flow[Any]:
        reply = yield from self.request("GET", path, signed=signed, leader_only=leader_only)
        if reply.status >= 300:
            raise _api_error(reply)
        return reply.body if key is None else reply.body[key]

    def probe(self, url: str, path: str, *, signed: bool) -> _Flow[Any]:
        """One read of one given node's own state (its status, its applied balances): no
        leader to find and nothing to settle, so one attempt. `ClusterUnavailable` when the
        node does not answer (or answers 5xx), `ApiError` for a 4xx."""
        url = url.rstrip("/")
        headers = self._headers("GET", path, b"", json=False, signed=signed)
        answer = yield _Send("GET", url + path, headers, b"", self.timeout_s)
        if isinstance(answer, httpx.HTTPError) or answer is None or answer.status_code >= 500:
            raise ClusterUnavailable(f"GET {url}{path.split('?')[0]}: {_summary(answer)}")
        try:
            payload = loads(answer.content)
        except ValueError:
            payload = None
        if answer.status_code >= 300:
            raise _api_error(_Reply(answer.status_code, payload, url, False))
        return payload


# ---------------------------------------------------------------------- the two drivers


def drive(http: httpx.Client, flow: _Flow[T]) -> T:
    """Perform a flow's steps with blocking I/O; its return value."""
    answer: _Answer = None
    try:
        while True:
            step = flow.send(answer)
            if isinstance(step, _Sleep):
                time.sleep(max(0.0, step.seconds))
                answer = None
                continue
            try:
                answer = http.request(
                    step.method,
                    step.url,
                    content=step.body,
                    headers=step.headers,
                    timeout=step.timeout_s,
                )
            except httpx.HTTPError as exc:
                answer = exc
    except StopIteration as stop:
        return stop.value


async def adrive(http: httpx.AsyncClient, flow: _Flow[T]) -> T:
    """The same with awaited I/O, under trio or asyncio."""
    answer: _Answer = None
    try:
        while True:
            step = flow.send(answer)
            if isinstance(step, _Sleep):
                # anyio (httpx's own dependency) sleeps on whichever loop runs: trio or asyncio.
                await anyio.sleep(max(0.0, step.seconds))
                answer = None
                continue
            try:
                answer = await http.request(
                    step.method,
                    step.url,
                    content=step.body,
                    headers=step.headers,
                    timeout=step.timeout_s,
                )
            except httpx.HTTPError as exc:
                answer = exc
    except StopIteration as stop:
        return stop.value
