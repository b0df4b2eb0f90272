"""The node's side of request signing: verifying signatures, keys, the replay window.

The wire format (headers, the signed message, `Credentials` and their files) is the SDK's,
`api.sdk.signing`, imported here: the node and its clients cannot disagree on it. A request
outside the timestamp window, or whose signature was already seen inside it, is rejected, so
a captured request cannot be replayed. "Seen" is this node's own memory plus, through
`applied`, the requests the replicated state machine applied (cluster/machine.py), which also
refuses a repeated signature when it applies the log: the check that holds on every node,
whatever the timing.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

from .sdk.signing import (
    KEY_HEADER,
    SIG_HEADER,
    TS_HEADER,
    AuthError,
    Credentials,
    read_secret_file,
    sign,
)

__all__ = [
    "KEY_HEADER",
    "SIG_HEADER",
    "TS_HEADER",
    "WINDOW_MS",
    "AuthError",
    "Credentials",
    "UnknownKeyError",
    "Verifier",
    "derive_secret",
    "new_credentials",
    "new_key_id",
    "read_secret_file",
    "sign",
]

WINDOW_MS = 5_000


class UnknownKeyError(AuthError):
    """The key id is not (yet) known to this node."""

    def __init__(self) -> None:
        super().__init__("unauthenticated", "unknown key")


def new_credentials(role: str = "admin", account: str | None = None) -> Credentials:
    return Credentials(f"{role}-{secrets.token_hex(6)}", secrets.token_hex(32), role, account)


def derive_secret(master: str, key_id: str) -> str:
    """A registry key's secret: HMAC of the cluster's API master secret and the key id.

    The replicated key registry then holds no secret at all (key id, account, role), and
    every node that has the master file can verify any key.
    """
    return hmac.new(master.encode(), f"qb-api-key:{key_id}".encode(), hashlib.sha256).hexdigest()


def new_key_id(role: str) -> str:
    return f"{role[:5]}-{secrets.token_hex(8)}"


KeyLookup = Callable[[str], "Credentials | None"]
AppliedLookup = Callable[[str], bool]


class Verifier:
    """Checks signatures against known keys and remembers recent signatures (replays).

    `keys` are static (the bootstrap admin key); `lookup` finds the rest (the replicated
    registry, secrets derived from the master secret). `applied(signature)` says whether the
    replicated state machine applied a request with this signature (its replay window): a
    replay is then refused before it is proposed. Without it, the state machine still
    refuses the replay when it applies it; this is the fast path.
    """

    def __init__(
        self,
        keys: list[Credentials],
        window_ms: int = WINDOW_MS,
        lookup: KeyLookup | None = None,
        applied: AppliedLookup | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._keys = {k.key_id: k for k in keys}
        # The node's wall clock (cluster/clock.py: with an injected offset, if any), the one
        # its leader stamps batches with: a skewed host skews both.
        self.clock_ns = clock_ns
        self._lookup = lookup
        self._applied = applied
        self.window_ms = window_ms
        # Signatures seen within the window, and a heap of (timestamp, signature) to forget
        # them in timestamp order: O(log n) per request at any rate.
        self._seen: dict[str, int] = {}
        self._expiry: list[tuple[int, str]] = []

    def verify(
        self,
        headers: Mapping[str, str],
        method: str,
        path: str,
        body: bytes,
        now_ms: int | None = None,
    ) -> Credentials:
        key_id = headers.get(KEY_HEADER)
        ts_text = headers.get(TS_HEADER)
        signature = headers.get(SIG_HEADER)
        if not key_id or not ts_text or not signature:
            raise AuthError("unauthenticated", "missing signature headers")
        creds = self._keys.get(key_id)
        if creds is None and self._lookup is not None:
            creds = self._lookup(key_id)
        if creds is None:
            raise UnknownKeyError()
        # ASCII digits only: str.isdigit() is also true for a superscript two (U+00B2), which
        # int() refuses, and for other scripts' digits, which int() reads.
        if not (ts_text.isascii() and ts_text.isdigit()) or len(ts_text) > 16:
            raise AuthError("unauthenticated", "bad timestamp")
        ts = int(ts_text)
        now = self.clock_ns() // 1_000_000 if now_ms is None else now_ms
        if abs(now - ts) > self.window_ms:
            raise AuthError("expired", "timestamp outside the allowed window")
        expected = sign(creds.secret, ts, method, path, body)
        # compare_digest raises on non-ASCII text: such a signature is simply a wrong one.
        if not (signature.isascii() and hmac.compare_digest(expected, signature)):
            raise AuthError("unauthenticated", "bad signature")
        self._forget_before(now - self.window_ms)
        if signature in self._seen or (self._applied is not None and self._applied(signature)):
            raise AuthError("replayed", "this request was already received")
        self._seen[signature] = ts
        heapq.heappush(self._expiry, (ts, signature))
        return creds

    def _forget_before(self, cutoff_ms: int) -> None:
        """A request stamped before the cutoff is refused as expired: its signature can go."""
        expiry, seen = self._expiry, self._seen
        while expiry and expiry[0][0] < cutoff_ms:
            del seen[heapq.heappop(expiry)[1]]
