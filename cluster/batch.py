"""The one payload that goes through Raft: a versioned msgpack batch.

`[VERSION, ts, entries]` where each entry is `[KIND_COMMAND, command]` (or `[KIND_COMMAND,
command, [signature, ts_ms]]`: the signed API request it came from, which every node's replay
memory learns when it applies the entry; it is not part of the exchange's state), `[KIND_BARRIER]` or
`[KIND_MEMBER, "add" | "remove", node_id, raft_addr, api_url]` (the replicated directory
that tells every node where each member's API is) or `[KIND_KEY, "add" | "revoke", key_id,
account, role]` (the API key registry; it holds no secret: a key's secret is derived from the
cluster's API master secret and the key id, see `api/auth.py`).
The leader stamps one wall-clock `ts` per batch; the apply side gives every command
`max(ts, exchange.last_ts)`, which is the same on every replica, so a new leader whose clock
is behind can never make commands fail for going back in time.
The result of a batch is a list with one entry per input entry: the command's events, or
`None` for a barrier. Only the proposing node reads it, in its own process: it is handed over
as Python objects, never encoded.
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1
KIND_COMMAND = 0
KIND_BARRIER = 1
KIND_MEMBER = 2
KIND_KEY = 3


class BatchError(ValueError):
    """A payload that is not a batch this build understands."""


def encode_batch(ts: int, entries: list[list[Any]]) -> bytes:
    return msgpack.packb([VERSION, ts, entries], use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[int, list[list[Any]]]:
    try:
        version, ts, entries = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # any malformed payload is one clear error
        raise BatchError(f"undecodable batch: {exc}") from exc
    if version != VERSION:
        raise BatchError(f"unsupported batch version {version!r}")
    if type(ts) is not int or type(entries) is not list:
        raise BatchError("malformed batch")
    return ts, entries


