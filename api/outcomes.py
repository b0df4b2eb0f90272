"""The one mapping from what a node answers (api.port's errors, a replay refusal) to HTTP.

Every REST route raises, the app's error handler answers through `answer()`, and WebSocket
order entry answers through the same function, so a given outcome reads the same everywhere:

| raised | status | code | definite? |
|---|---|---|---|
| NotLeaderError, a leader known | 307 + `Location`, `X-Leader` | not_leader | yes: nothing applied |
| NotLeaderError, no leader | 503 + `Retry-After` | no_leader | yes |
| OverloadedError | 503 + `Retry-After` | overloaded | yes |
| NoQuorumError | 503 + `Retry-After` | no_quorum | yes (a read, nothing applied) |
| OutcomeUnknownError | 503 + `Retry-After` | outcome_unknown | no: resend to settle it |
| UnencodableError | 400 | wrong_type | yes |
| MembershipBusyError | 409 + `Retry-After` | membership_change_in_progress | yes |
| RefusedError | its status (409, 404) | its code | yes |
| NotConfiguredError | 503 | not_configured | yes: this node cannot, ever |
| AuthError (replay window) | 401 | replayed / expired | yes |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .auth import AuthError
from .port import (
    MembershipBusyError,
    NoQuorumError,
    NotConfiguredError,
    NotLeaderError,
    OutcomeUnknownError,
    OverloadedError,
    RefusedError,
    UnencodableError,
)

RETRY_AFTER = {"Retry-After": "1"}


@dataclass(frozen=True)
class Answer:
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    leader_url: str | None = None  # for a 307: where the leader's API is

    def body(self) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.leader_url is not None:
            error["leader_url"] = self.leader_url
        return {"error": error}


def not_leader(leader_url: str | None) -> Answer:
    """Writes (and linearizable reads) go to the leader; without one, retry shortly."""
    if leader_url is None:
        return Answer(503, "no_leader", "no leader elected yet; retry", RETRY_AFTER)
    return Answer(
        307, "not_leader", "this goes to the leader", {"X-Leader": leader_url}, leader_url
    )


def answer(exc: BaseException, leader_url: str | None = None) -> Answer:
    """The answer to `exc` (see the table above); `leader_url`: the node's current idea of
    the leader, used when the error carries none. Raises TypeError for anything else: an
    unexpected exception is a bug, never a 4xx."""
    if isinstance(exc, NotLeaderError):
        return not_leader(exc.leader_url or leader_url)
    if isinstance(exc, OverloadedError):
        return Answer(503, "overloaded", f"{exc}; nothing was applied, retry", RETRY_AFTER)
    if isinstance(exc, NoQuorumError):
        return Answer(503, "no_quorum", f"{exc}; nothing was read, retry", RETRY_AFTER)
    if isinstance(exc, OutcomeUnknownError):
        return Answer(
            503,
            "outcome_unknown",
            f"{exc}; it may or may not have been applied: resend the same command (same "
            "client_order_id or ref) to settle it",
            RETRY_AFTER,
        )
    if isinstance(exc, UnencodableError):
        return Answer(400, "wrong_type", f"{exc}; integers must fit in 64 bits")
    if isinstance(exc, MembershipBusyError):
        return Answer(
            409,
            "membership_change_in_progress",
            f"{exc}; one membership change at a time: retry once it commits",
            RETRY_AFTER,
        )
    if isinstance(exc, RefusedError):
        return Answer(exc.status, exc.code, str(exc))
    if isinstance(exc, NotConfiguredError):
        return Answer(503, "not_configured", str(exc))
    if isinstance(exc, AuthError):
        return Answer(401, exc.code, exc.message)
    raise TypeError(f"no HTTP answer for {type(exc).__name__}") from exc
