"""The Python client SDK of a quorumbook cluster (docs/reference/sdk.md).

`Client` / `AsyncClient` for traders, `AdminClient` for operators, their WebSocket
subscriptions, and the wire format they share with the node: request signing and credentials
files (`api.sdk.signing`) and the JSON codec (`api.sdk.codec`). The SDK imports nothing of
the server side (tests/test_layering.py); the node imports the wire format from here.

Every call ends definitely (a value; `ApiError`, a 4xx; `ClusterUnavailable`, nothing
applied) or with `OutcomeUnknown` (maybe applied: resend to settle it), by one retry policy
(`api.sdk.retry`) for trader and admin calls alike.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .admin import AdminClient, NodeSnapshot
    from .client import MAX_BATCH_ORDERS, AsyncClient, Client, new_client_order_id, tls_context
    from .errors import ApiError, ClusterUnavailable, OutcomeUnknown
    from .signing import (
        KEY_HEADER,
        SIG_HEADER,
        TS_HEADER,
        AuthError,
        Credentials,
        read_credentials,
        sign,
        signed_headers,
        signed_path,
        write_credentials,
        ws_auth,
    )
    from .subscription import AsyncSubscription, Book, Gap, Subscription

# Where each public name lives, imported at first use (PEP 562): a node imports the wire
# format (`api.sdk.codec`, `api.sdk.signing`) through this package, and importing the
# clients here would load httpx and websockets into every node for nothing (~45 ms of a
# node's start, a third of it httpx's command line).
_HOME = {
    "AdminClient": "admin",
    "NodeSnapshot": "admin",
    "MAX_BATCH_ORDERS": "client",
    "AsyncClient": "client",
    "Client": "client",
    "new_client_order_id": "client",
    "tls_context": "client",
    "ApiError": "errors",
    "ClusterUnavailable": "errors",
    "OutcomeUnknown": "errors",
    "KEY_HEADER": "signing",
    "SIG_HEADER": "signing",
    "TS_HEADER": "signing",
    "AuthError": "signing",
    "Credentials": "signing",
    "read_credentials": "signing",
    "sign": "signing",
    "signed_headers": "signing",
    "signed_path": "signing",
    "write_credentials": "signing",
    "ws_auth": "signing",
    "AsyncSubscription": "subscription",
    "Book": "subscription",
    "Gap": "subscription",
    "Subscription": "subscription",
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = [
    "KEY_HEADER",
    "MAX_BATCH_ORDERS",
    "SIG_HEADER",
    "TS_HEADER",
    "AdminClient",
    "ApiError",
    "AsyncClient",
    "AsyncSubscription",
    "AuthError",
    "Book",
    "Client",
    "ClusterUnavailable",
    "Credentials",
    "Gap",
    "NodeSnapshot",
    "OutcomeUnknown",
    "Subscription",
    "new_client_order_id",
    "read_credentials",
    "sign",
    "signed_headers",
    "signed_path",
    "tls_context",
    "write_credentials",
    "ws_auth",
]
