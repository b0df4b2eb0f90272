"""Every acknowledged write is in every node's final state: a check that needs no log.

After the faults are healed and the nodes have converged, the harness saves each node's state
(`GET /v1/admin/snapshot`: the node snapshot at its applied index) as `final/<node>.snapshot`.
The exchange keeps every client order id it accepted (`coids`: account -> client_order_id ->
order_id), resting or long done, and its resting orders. So, on every node's final state:

- an acknowledged `place` (ok, not a rejection in the log) has its client order id, with the
  order id its answer gave: else `lost_write` (the id unknown: the order was acknowledged and
  is gone) or `replaced_write` (another order holds that client order id);
- an acknowledged `cancel` leaves its order not resting: else `lost_write` (the cancel is
  gone: the order rests again).

The sequencer says the same and more from the committed log; this one still decides when the
log cannot be had (an archive with gaps, or with two different entries at one index, which a
cluster that lost committed entries leaves behind), and looks at what the nodes serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from api.sdk.snapshot import exchange_snapshot_of
from statemachine import Exchange

from ..history import OK
from .replay import History, load_history, rejection, write_pairs
from .result import MAX_ANOMALIES, Findings, Result, ref

NAME = "final"
SUFFIX = ".snapshot"


def read_snapshots(directory: str | Path) -> dict[str, bytes]:
    """`final/<node>.snapshot` files: node id -> node snapshot blob."""
    return {
        p.name[: -len(SUFFIX)]: p.read_bytes() for p in sorted(Path(directory).glob("*" + SUFFIX))
    }


def check(
    history: History,
    snapshots: Mapping[str, bytes] | None,
    *,
    max_anomalies: int = MAX_ANOMALIES,
) -> Result:
    ops = load_history(history)
    found = Findings(NAME, max_anomalies)
    acked = [
        (invoke, done)
        for invoke, done in write_pairs(ops)
        if done is not None and done.type == OK and rejection(done) is None
    ]
    stats: dict[str, Any] = {"acknowledged_writes": len(acked), "nodes": sorted(snapshots or {})}
    if not snapshots:
        found.undecided("no final node states saved")
        return found.result(stats)
    for node, blob in sorted(snapshots.items()):
        state = Exchange.restore(exchange_snapshot_of(blob)).state
        for invoke, done in acked:
            value = invoke.value if isinstance(invoke.value, dict) else {}
            account, coid = value.get("account"), value.get("client_order_id")
            if account is None or coid is None:
                continue
            order_id = state.coids.get(account, {}).get(coid)
            answer = done.value if isinstance(done.value, dict) else {}
            what = f"{invoke.f} {account}/{coid}"
            if invoke.f == "place":
                if order_id is None:
                    found.add(
                        "lost_write",
                        [ref(invoke, done)],
                        f"{what} was acknowledged (order {answer.get('order_id')}) and is "
                        f"unknown to {node}'s final state",
                    )
                elif answer.get("order_id") not in (None, order_id):
                    found.add(
                        "replaced_write",
                        [ref(invoke, done)],
                        f"{what} was acknowledged as order {answer.get('order_id')}; {node}'s "
                        f"final state has order {order_id} for it",
                    )
            elif invoke.f == "cancel" and order_id is not None and order_id in state.orders:
                found.add(
                    "lost_write",
                    [ref(invoke, done)],
                    f"{what} was acknowledged and order {order_id} rests in {node}'s final state",
                )
    return found.result(stats)
