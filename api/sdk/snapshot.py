"""The body of `GET /v1/admin/snapshot` (`AdminClient.snapshot`): a node snapshot, msgpack
`[version, exchange snapshot, directory, keys, replay window]`. Part of the wire format: the
node writes it (cluster/machine.py), backups store it, and a client that wants the exchange's
state out of it (the Jepsen harness's final checker) reads it here."""

from __future__ import annotations

import msgpack


def exchange_snapshot_of(blob: bytes) -> bytes:
    """The exchange's snapshot inside a node snapshot (`GET /v1/admin/snapshot`'s body, msgpack
    `[version, exchange snapshot, directory, keys, replay window]`), for
    `statemachine.Exchange.restore`. ValueError if the body is not one."""
    try:
        exchange = msgpack.unpackb(blob, raw=False)[1]
    except Exception as exc:
        raise ValueError(f"undecodable node snapshot: {exc}") from exc
    if not isinstance(exchange, bytes):
        raise ValueError("malformed node snapshot: no exchange snapshot in it")
    return exchange
