"""Bank-style invariants of the replayed log, and the nodes' final states.

- `conservation`: per asset, the balances of every account (fee account included) sum to
  deposits minus withdrawals: after every command (by its balance events), in the replay's
  final state, and in each final read that carries balances;
- `negative_balance`: no balance event shows a negative amount;
- `duplicate_client_order_id`: no two accepted places share (account, client_order_id), in
  the log or among the ok answers;
- `crossed_book`: best bid < best ask after every command that changed a book, and in every
  ok `read_book` answer;
- `clock_backwards`: the exchange's clock never goes back along the log: each command's `ts`
  (as the state machine applied it) is at least the one before, and each event's at least
  the one of the event before it in `seq` (a leader's clock may jump back: the clock
  nemesis; the state machine gives every command `max(stamp, last ts)`);
- `final_not_converged`, `final_hash_mismatch`, `log_incomplete`: after healing, every node
  reports the same cmd_index and state hash (`read_final` ops: {node, state_hash, cmd_index,
  balances?}), each equal to the replay's hash at that cmd_index, which the log must reach.

It cannot see: money moved between accounts wrongly but conserved (the sequencer's replay
comparison catches that for the answers clients saw), or a node's state before the end.
"""

from __future__ import annotations

from typing import Any

from statemachine import Exchange

from ..history import OK, Op, pairs
from .replay import (
    FINAL_F,
    ExchangeFactory,
    History,
    Log,
    LogIndex,
    claim,
    load_history,
    load_log,
    replay,
    write_pairs,
)
from .result import MAX_ANOMALIES, Findings, Result

NAME = "bank"


def check(
    history: History,
    log: Log = None,
    *,
    max_anomalies: int = MAX_ANOMALIES,
    exchange_factory: ExchangeFactory = Exchange,
) -> Result:
    ops = load_history(history)
    entries = load_log(log)
    found = Findings(NAME, max_anomalies)
    done_pairs = [(i, d) for i, d in pairs(ops) if d is not None and d.type == OK]
    finals = [(d, _final(d)) for i, d in done_pairs if i.f == FINAL_F]
    stats: dict[str, Any] = {"final_reads": len(finals)}
    _answers(found, done_pairs)
    _convergence(found, finals)
    if entries is None:
        found.undecided("no log to replay")
        return found.result(stats)

    wanted = {f["cmd_index"] for _, f in finals if isinstance(f.get("cmd_index"), int)}
    hashes: dict[int, str] = {}
    supply_at: dict[int, dict[str, int]] = {}
    supply: dict[str, int] = {}  # asset -> deposits - withdrawals, from the commands
    held: dict[tuple[str, str], int] = {}  # (account, asset) -> available + reserved
    totals: dict[str, int] = {}  # asset -> sum of `held`
    broken: set[str] = set()  # assets whose conservation is broken right now
    coids: dict[tuple[str, str], int] = {}  # (account, coid) -> first cmd_index accepted
    index = LogIndex()
    # Log-level findings, tied to ops once the replay has placed the writes.
    at_command: list[tuple[str, int, str]] = []

    exchange = exchange_factory()
    if 0 in wanted:
        hashes[0] = exchange.state_hash()
        supply_at[0] = {}
    clock = _Clock()
    for step, exchange in replay(entries, exchange_factory):
        position = step.position
        index.add(step)
        command = step.command
        for message in clock.step(position, command, step.events):
            at_command.append(("clock_backwards", position, message))
        if step.effective and command.get("op") in ("deposit", "withdraw"):
            amount = command["amount"] if command["op"] == "deposit" else -command["amount"]
            supply[command["asset"]] = supply.get(command["asset"], 0) + amount
        touched_assets: set[str] = set()
        markets: set[str] = set()
        for e in step.events:
            kind = e["type"]
            if kind == "balance":
                asset = e["asset"]
                now = e["available"] + e["reserved"]
                if e["available"] < 0 or e["reserved"] < 0:
                    at_command.append(
                        (
                            "negative_balance",
                            position,
                            f"{e['account']} {asset}: available {e['available']}, reserved "
                            f"{e['reserved']} after cmd_index {position}",
                        )
                    )
                before = held.get((e["account"], asset), 0)
                held[(e["account"], asset)] = now
                totals[asset] = totals.get(asset, 0) + now - before
                touched_assets.add(asset)
            elif kind == "book":
                markets.add(e["market"])
            elif kind == "accepted" and e.get("client_order_id") is not None:
                first = coids.setdefault((e["account"], e["client_order_id"]), position)
                if first != position:
                    at_command.append(
                        (
                            "duplicate_client_order_id",
                            position,
                            f"{e['account']} client_order_id {e['client_order_id']!r} "
                            f"accepted at cmd_index {first} and again at {position}",
                        )
                    )
        if command.get("op") in ("deposit", "withdraw") and isinstance(command.get("asset"), str):
            touched_assets.add(command["asset"])
        for asset in sorted(touched_assets):
            if totals.get(asset, 0) != supply.get(asset, 0):
                if asset not in broken:  # report where it breaks, not every command after
                    broken.add(asset)
                    at_command.append(
                        (
                            "conservation",
                            position,
                            f"{asset}: balances sum to {totals.get(asset, 0)} after cmd_index "
                            f"{position} (by its events), deposits - withdrawals are "
                            f"{supply.get(asset, 0)}",
                        )
                    )
            else:
                broken.discard(asset)
        for market in sorted(markets):
            bid = exchange.book_levels(market, "buy", 1)
            ask = exchange.book_levels(market, "sell", 1)
            if bid and ask and bid[0][0] >= ask[0][0]:
                at_command.append(
                    (
                        "crossed_book",
                        position,
                        f"{market}: best bid {bid[0][0]} >= best ask {ask[0][0]} after cmd_index "
                        f"{position}",
                    )
                )
        if position in wanted:
            hashes[position] = exchange.state_hash()
            supply_at[position] = dict(supply)
    end = len(entries)
    stats["log_commands"] = end

    writes = write_pairs(ops)
    done_of = {i.index: d for i, d in writes}
    op_at: dict[int, int] = {}
    for invoke_index, position in claim(writes, index).positions.items():
        done = done_of[invoke_index]
        op_at[position] = invoke_index if done is None else done.index
    for kind, position, message in at_command:
        found.add(kind, [op_at[position]] if position in op_at else [], message)

    # The final state of the replay, counted from scratch rather than from the events.
    final_totals: dict[str, int] = {}
    for (_, asset), (available, reserved) in exchange.balances().items():
        final_totals[asset] = final_totals.get(asset, 0) + available + reserved
    for asset in sorted(set(final_totals) | set(supply)):
        if final_totals.get(asset, 0) != supply.get(asset, 0):
            found.add(
                "conservation",
                [],
                f"{asset}: the replay's final balances sum to {final_totals.get(asset, 0)}, "
                f"deposits - withdrawals are {supply.get(asset, 0)}",
            )
    stats["supply"] = dict(sorted(supply.items()))

    for done, final in finals:
        at = final.get("cmd_index")
        if not isinstance(at, int):
            continue
        if at > end:
            found.add(
                "log_incomplete",
                [done.index],
                f"node {final.get('node')} is at cmd_index {at}, beyond the log's end {end}",
            )
            continue
        if final.get("state_hash") != hashes.get(at):
            found.add(
                "final_hash_mismatch",
                [done.index],
                f"node {final.get('node')} at cmd_index {at} has state hash "
                f"{final.get('state_hash')}, the replay {hashes.get(at)}",
            )
        rows = final.get("balances")
        if isinstance(rows, list):
            sums: dict[str, int] = {}
            for row in rows:
                sums[row["asset"]] = sums.get(row["asset"], 0) + row["available"] + row["reserved"]
            expected = supply_at.get(at, {})
            for asset in sorted(set(sums) | set(expected)):
                if sums.get(asset, 0) != expected.get(asset, 0):
                    found.add(
                        "conservation",
                        [done.index],
                        f"node {final.get('node')}: {asset} balances sum to "
                        f"{sums.get(asset, 0)}, deposits - withdrawals are "
                        f"{expected.get(asset, 0)}",
                    )
    return found.result(stats)


class _Clock:
    """The exchange's clock along the log: each command's `ts` against the latest before it,
    and its events' against the latest event's (in `seq` order); one message for each."""

    def __init__(self) -> None:
        self.command: tuple[int, int] | None = None  # (cmd_index, ts): the latest ts so far
        self.event: tuple[int, int] | None = None  # (seq, ts): the latest event ts so far

    def step(self, position: int, command: dict, events: list[dict]) -> list[str]:
        out = []
        ts = command.get("ts")
        if type(ts) is int:
            if self.command is not None and ts < self.command[1]:
                out.append(
                    f"cmd_index {position} has ts {ts}, {self.command[1] - ts} ns before "
                    f"cmd_index {self.command[0]}'s"
                )
            else:
                self.command = (position, ts)
        went_back = None
        for e in events:
            seq, ts = e.get("seq"), e.get("ts")
            if type(seq) is not int or type(ts) is not int:
                continue
            if self.event is not None and ts < self.event[1]:
                went_back = went_back or (
                    f"event seq {seq} (cmd_index {position}) has ts {ts}, "
                    f"{self.event[1] - ts} ns before seq {self.event[0]}'s"
                )
            else:
                self.event = (seq, ts)
        if went_back:
            out.append(went_back)
        return out


def _final(done: Op) -> dict:
    value = dict(done.value) if isinstance(done.value, dict) else {}
    value.setdefault("node", done.node)
    return value


def _answers(found: Findings, done_pairs: list[tuple[Op, Op]]) -> None:
    """What the clients saw: one order per client_order_id, and no crossed book."""
    orders: dict[tuple[Any, str], tuple[int, Op]] = {}
    for invoke, done in done_pairs:
        value = done.value if isinstance(done.value, dict) else {}
        asked = invoke.value or {}
        if invoke.f == "place" and "order_id" in value and asked.get("client_order_id"):
            key = (asked.get("account"), asked["client_order_id"])
            first = orders.setdefault(key, (value["order_id"], done))
            if first[0] != value["order_id"]:
                found.add(
                    "duplicate_client_order_id",
                    [first[1].index, done.index],
                    f"{key[0]} client_order_id {key[1]!r} acknowledged as order "
                    f"{first[0]} and as order {value['order_id']}",
                )
        elif invoke.f == "read_book":
            bids, asks = value.get("bids") or [], value.get("asks") or []
            if bids and asks and bids[0][0] >= asks[0][0]:
                found.add(
                    "crossed_book",
                    [done.index],
                    f"read_book {value.get('market')} at seq {value.get('seq')}: best bid "
                    f"{bids[0][0]} >= best ask {asks[0][0]}",
                )


def _convergence(found: Findings, finals: list[tuple[Op, dict]]) -> None:
    """After healing every node stands at the same cmd_index with the same hash."""
    if not finals:
        return
    at = {f.get("cmd_index") for _, f in finals}
    indexes = [d.index for d, _ in finals]
    shown = ", ".join(
        f"{f.get('node')}@{f.get('cmd_index')}:{str(f.get('state_hash'))[:12]}" for _, f in finals
    )
    if len(at) > 1:
        found.add("final_not_converged", indexes, f"nodes stand at different cmd_index: {shown}")
    by_index: dict[Any, set] = {}
    for _, f in finals:
        by_index.setdefault(f.get("cmd_index"), set()).add(f.get("state_hash"))
    if any(len(hashes) > 1 for hashes in by_index.values()):
        found.add(
            "final_hash_mismatch", indexes, f"nodes at one cmd_index differ in state: {shown}"
        )
