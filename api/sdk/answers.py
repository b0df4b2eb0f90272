"""The answer to a command, from its events: what its account may see of them, and the summary
of an accepted or amended order (order id, status, filled quantity, its trades).

The node builds its REST answers with these (api/trading.py), and anyone holding the events
(the Jepsen checkers replaying the committed log) rebuilds the exact answer a client got.
"""

from __future__ import annotations

from typing import Any


def private_view(events: list[dict], account: str | None) -> list[dict]:
    """The command's events as `account` may see them: its own balances and order events,
    public book events, and trades without the other party's account or fee."""
    if account is None:  # admin
        return events
    out = []
    for e in events:
        if e["type"] == "trade":
            mine = {
                k: v
                for k, v in e.items()
                if k not in ("maker_account", "taker_account", "maker_fee", "taker_fee")
            }
            if e["taker_account"] == account:
                mine["taker_fee"] = e["taker_fee"]
            if e["maker_account"] == account:
                mine["maker_fee"] = e["maker_fee"]
            out.append(mine)
        elif e.get("account", account) == account:
            out.append(e)
    return out


def summarize(events: list[dict], account: str | None = None) -> dict:
    """What a client wants to know about its command, from the command's events."""
    first = events[0]
    out: dict[str, Any] = {"seq": events[-1]["seq"], "events": private_view(events, account)}
    if first["type"] in ("accepted", "amended"):
        order_id = first["order_id"]
        trades = [
            e
            for e in out["events"]
            if e["type"] == "trade" and order_id in (e["taker_order_id"], e["maker_order_id"])
        ]
        status = "resting"
        for e in events:
            if e["type"] == "filled" and e["order_id"] == order_id:
                status = "filled"
            elif e["type"] == "cancelled" and e["order_id"] == order_id:
                status = "cancelled"
        out.update(
            order_id=order_id,
            client_order_id=first.get("client_order_id"),
            status=status,
            filled_qty=sum(t["qty"] for t in trades),
            trades=trades,
        )
    return out
