"""The wire format of authentication: credentials, their files, and request signatures.

Headers: `X-QB-Key` (key id), `X-QB-Timestamp` (Unix ms), `X-QB-Signature` (hex).
The signed message is `"{timestamp}\\n{METHOD}\\n{path?query}\\n"` followed by the raw body,
where `path` is percent-decoded and the query is as sent (`signed_path`). A WebSocket
connection authenticates with the same signature over `WS`, `/v1/ws` and the nonce of its
`hello` (`ws_auth`). The node checks them with `api.auth.Verifier`, which imports these
definitions: this module is the one place both sides agree on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

KEY_HEADER = "X-QB-Key"
TS_HEADER = "X-QB-Timestamp"
SIG_HEADER = "X-QB-Signature"
WS_METHOD = "WS"  # what a WebSocket `auth` signs in place of the HTTP method...
WS_PATH = "/v1/ws"  # ...and path; the body is the connection's nonce


class AuthError(Exception):
    """An authentication failure and its wire code: a node's refusal (`unauthenticated`,
    `expired`, `replayed`) or a credentials file others can read (`insecure_credentials`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Credentials:
    key_id: str
    secret: str
    role: str = "admin"
    account: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "key_id": self.key_id,
                "secret": self.secret,
                "role": self.role,
                "account": self.account,
            }
        )


def write_credentials(path: Path, creds: Credentials) -> None:
    """Write with mode 0600 from the start (no window where others can read it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds.to_json())


def read_secret_file(path: Path, what: str = "secret file") -> str:
    """The text of a file that holds a secret, refused unless only its owner can read it.

    The one mode check for every secret file: credentials here, and a node's password_file,
    api_master_file, admin_key_file and tls_key_file (cluster/config.py). `what` names the
    file in the refusal: "password_file /srv/qb/raft.password is mode 0644: ...".
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise AuthError("missing_credentials", f"{what} {path} does not exist") from None
    if mode & 0o077:
        raise AuthError(
            "insecure_credentials",
            f"{what} {path} is mode {mode:04o}: it must not be readable by group or others "
            f"(chmod 600 {path})",
        )
    return path.read_text().strip()


def read_credentials(path: Path) -> Credentials:
    """A credentials file as `write_credentials` (or `quorumbook keys create --out`) wrote it;
    `AuthError("insecure_credentials")` if others may read it."""
    raw = json.loads(read_secret_file(path, "credentials file"))
    return Credentials(raw["key_id"], raw["secret"], raw.get("role", "admin"), raw.get("account"))


def sign(secret: str, timestamp_ms: int, method: str, path: str, body: bytes) -> str:
    message = f"{timestamp_ms}\n{method.upper()}\n{path}\n".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_path(path: str) -> str:
    """What the node verifies for `path?query` as sent: the percent-decoded path, the query
    as it is."""
    route, sep, query = path.partition("?")
    return unquote(route) + (sep + query if query else "")


class Signer:
    """Signs requests so that no two requests of this process ever share a signature.

    The server rejects a signature it has already seen inside its window (`401 replayed`).
    Two requests with the same key, method, path and body in the same millisecond (two reads
    from two threads, a fast resend) would sign identically, so the timestamp is bumped by a
    millisecond until the signature is new.
    """

    def __init__(self, window_ms: int = 10_000, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._lock = threading.Lock()
        self._recent: set[bytes] = set()
        # (when signed, ident) in signing order: the expired ones leave from the left, so a
        # signature costs O(1) at any request rate (rebuilding the set once it held 4,096
        # cost O(window) per request: 1.4 ms of CPU each at 1,500 requests/s).
        self._signed: deque[tuple[int, bytes]] = deque()
        self._window_ms = window_ms
        self._clock_ns = clock_ns

    def __len__(self) -> int:
        """Signatures remembered (those of the last window)."""
        return len(self._recent)

    def headers(self, creds: Credentials, method: str, path: str, body: bytes) -> dict[str, str]:
        digest = hashlib.sha256(body).digest()
        now = self._clock_ns() // 1_000_000
        with self._lock:
            cutoff = now - self._window_ms
            signed = self._signed
            while signed and signed[0][0] < cutoff:
                self._recent.discard(signed.popleft()[1])
            ts = now
            while True:
                ident = hashlib.sha256(
                    f"{creds.key_id}\n{ts}\n{method}\n{path}\n".encode() + digest
                ).digest()
                if ident not in self._recent:
                    break
                ts += 1
            self._recent.add(ident)
            signed.append((now, ident))
        return {
            KEY_HEADER: creds.key_id,
            TS_HEADER: str(ts),
            SIG_HEADER: sign(creds.secret, ts, method, path, body),
        }


SIGNER = Signer()  # one per process: the SDK's clients, subscriptions and benches share it


def signed_headers(creds: Credentials, method: str, path: str, body: bytes) -> dict[str, str]:
    """The three signature headers for one request (`path` as the node verifies it:
    `signed_path`); never the same signature twice in this process."""
    return SIGNER.headers(creds, method, path, body)


def ws_auth(creds: Credentials, nonce: str) -> dict:
    """The `auth` message of a WebSocket connection whose `hello` carried `nonce`."""
    headers = SIGNER.headers(creds, WS_METHOD, WS_PATH, nonce.encode())
    return {
        "op": "auth",
        "key_id": headers[KEY_HEADER],
        "timestamp": int(headers[TS_HEADER]),
        "signature": headers[SIG_HEADER],
    }
