"""The one payload that goes through Raft: a versioned msgpack batch.

`[VERSION, ts, entries]` where each entry is one of
- `[KIND_COMMAND, command]`: one command for the exchange;
- `[KIND_REQUEST, signature, ts_ms, [command, ...]]`: the commands of one signed API request
  (one for `POST /v1/orders`, all of a `POST /v1/orders/batch`), with that request's
  signature (the 32 bytes of its HMAC-SHA256) and timestamp (Unix ms). The state machine keeps
  the signatures of the requests it applied in its replicated replay window
  (cluster/machine.py): a request it already holds is not applied (`REFUSED_REPLAYED`), nor
  one older than the window (`REFUSED_EXPIRED`), alike on every replica. The window is part
  of the node's state and snapshot, not of the exchange's;
- `[KIND_BARRIER]`;
- `[KIND_MEMBER, "add" | "remove", node_id, raft_addr, api_url]` (the replicated directory
  that tells every node where each member's API is);
- `[KIND_KEY, "add" | "revoke", key_id, account, role]` (the API key registry; it holds no
  secret: a key's secret is derived from the cluster's API master secret and the key id, see
  `api/auth.py`).
- `[KIND_ADDRESS, chain_id, address, account]`: a deposit address of an EVM chain assigned
  to an account (issue 13: the chain watcher credits what is sent there to that account). An
  address is one account's for good: assigning it again to the same account changes nothing,
  to another is refused (`["taken", account]`, nothing applied), alike on every replica.
The leader stamps one wall-clock `ts` (ns) per batch; the apply side gives every command
`max(ts, exchange.last_ts)`, which is the same on every replica, so a new leader whose clock
is behind can never make commands fail for going back in time.
The result of a batch is a list with one entry per input entry: the command's events; for a
request, the list of its commands' events, or the refusal (`REFUSED_REPLAYED` /
`REFUSED_EXPIRED`: none of its commands applied); `None` for the other kinds. Only the
proposing node reads it, in its own process: it is handed over as Python objects, never
encoded.

Versions: 3 moves the replay window's clock with the requests' own (verified) timestamps
instead of the batch `ts` (cluster/machine.py; the entries are as in version 2): a leader
whose clock jumps ahead no longer drags the replicated window ahead with it. 2 added
`KIND_REQUEST`. Version 1 carried a request as a third element of a command
entry (`[KIND_COMMAND, command, [signature_hex, ts_ms]]`, on the first command of a batch
request), which only taught each node's own replay memory; it is still decoded, so a journal
written by a version-1 build replays after the upgrade, and that third element is ignored
(the replicated window starts empty and learns from version-2 entries only, so every replica
holds the same window whatever point its dump was taken at). A build that knows only version
1 skips a version-2 batch whole, with an error in its log: nodes of mixed builds are not
supported (docs/operating/cluster.md, "Upgrades").
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 3
DECODABLE_VERSIONS = (1, 2, 3)
KIND_COMMAND = 0
KIND_BARRIER = 1
KIND_MEMBER = 2
KIND_KEY = 3
KIND_REQUEST = 4
KIND_ADDRESS = 5
# The result of a request entry that was not applied.
REFUSED_REPLAYED = "replayed"
REFUSED_EXPIRED = "expired"


class BatchError(ValueError):
    """A payload that is not a batch this build understands."""


def encode_batch(ts: int, entries: list[list[Any]], version: int = VERSION) -> bytes:
    """`version`: tests write the older formats a journal may still hold."""
    return msgpack.packb([version, ts, entries], use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[int, list[list[Any]]]:
    _version, ts, entries = decode_versioned_batch(payload)
    return ts, entries


def decode_versioned_batch(payload: bytes) -> tuple[int, int, list[list[Any]]]:
    try:
        version, ts, entries = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # any malformed payload is one clear error
        raise BatchError(f"undecodable batch: {exc}") from exc
    if type(version) is not int or version not in DECODABLE_VERSIONS:
        raise BatchError(f"unsupported batch version {version!r}")
    if type(ts) is not int or type(entries) is not list:
        raise BatchError("malformed batch")
    return version, ts, entries
