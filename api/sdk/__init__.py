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
