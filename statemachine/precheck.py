"""Rejections a trader command gets whatever the exchange's state: found before it is logged.

The API asks this on the leader before it submits a command, so a malformed order is
answered at once and never enters the Raft log (where it would still be rejected, but only
after a round of replication, and would take a `seq`). It must never answer differently
from the log: a command it refuses is one that `Exchange.apply` would reject with the same
reason in any state that has the same markets (markets are never removed and their
parameters never change, so a market known now is known when the command applies).

How: the command runs through a *shadow* exchange that has the markets and nothing else.
There every check that looks something up (an order, a balance) fails with a state reason,
and a check that only says something is new (a client order id, say) passes. So a shadow
rejection with a reason outside `STATE_REASONS` was reached through checks that pass in
every state — exact, provided no handler checks a field's shape after a "new?" check; for
the trader ops that holds (the order of checks is in docs/reference/state-machine.md) and
tests/statemachine/test_precheck.py checks it against the real exchange in random states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .exchange import Exchange

# Reasons that depend on the exchange's state (or may at apply time): never answered early.
STATE_REASONS = frozenset(
    {
        "unknown_market",  # may be created by a command ahead in the log
        "unknown_order",
        "insufficient_funds",
        "duplicate_client_order_id",
        "duplicate_ref",
        "market_exists",
        "post_only_would_cross",
        "fok_unfillable",
        "no_open_orders",
        "no_change",
    }
)
# Only the trader ops: their handlers check every field's shape before any "is it new?".
CHECKED_OPS = frozenset({"place", "cancel", "amend", "cancel_all"})


class ShapeCheck:
    """One per thread that asks (not thread-safe); cheap when the markets have not changed."""

    def __init__(self) -> None:
        self._shadow: Exchange | None = None
        self._market_count = -1

    def rejection(
        self, command: Any, market_count: int, markets: Callable[[], list[dict]]
    ) -> dict | None:
        """The `rejected` event `command` gets in any state, or None (submit it).

        `market_count` is the real exchange's number of markets, `markets()` lists them
        (called only when the count changed). The event's `seq`, `ts` and `cmd_index` are
        the shadow's: meaningless, the command was never logged.
        """
        if type(command) is not dict or "ts" in command:
            return None
        op = command.get("op")
        if type(op) is not str or op not in CHECKED_OPS:
            return None
        shadow = self._shadow
        if shadow is None or market_count != self._market_count:
            shadow = self._build(markets())
            self._market_count = market_count
        events = shadow.apply({**command, "ts": shadow.last_ts})
        first = events[0]
        if first["type"] != "rejected":
            self._shadow = None  # it took effect in the shadow: start afresh next time
            return None
        return None if first["reason"] in STATE_REASONS else first

    def _build(self, markets: list[dict]) -> Exchange:
        shadow = Exchange()
        for market in markets:
            shadow.apply({"op": "create_market", "ts": 0, **market})
        self._shadow = shadow
        return shadow
