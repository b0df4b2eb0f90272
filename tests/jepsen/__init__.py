"""A correct cluster, simulated, for the checker tests: real answers, real logs.

`Cluster` applies each command to one `Exchange`, in order, and answers the way the API does
(api/trading.py's `command_outcome`, reads as its routes compute them). Every op takes effect
at its own point of a line of time, 100 ns apart; its invoke comes a random margin before
that point and its completion a random margin after (`spread` bounds the margins, in
points), so ops overlap, and the history is linearizable by construction. `barrier()` puts a
point no op's window crosses. Processes are handed out as Jepsen's runner does: a free one
takes the next invoke; an info completion retires it.

Faults are planted by the tests on the result (or with `read(..., at=k)`: a read served from
the state after k commands, as a lagging follower would).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.trading import TRADER_OPS, command_outcome
from jepsen.history import NEMESIS, HistoryWriter, Op, write_log
from statemachine import Exchange

MARKET = "BTC-USD"
ACCOUNTS = ("alice", "bob", "carol")
STEP = 100  # ns between two points of the line of time
NODES = ("n1", "n2", "n3")


@dataclass
class SimOp:
    id: int
    f: str
    value: dict | None
    at: int  # the point at which it takes effect (or would have)
    type: str | None = "ok"  # completion: ok / fail / info, None: never completes
    result: dict | None = None
    error: dict | None = None
    cmd_index: int | None = None  # where the log has it (writes that took effect)
    logged_at: int | None = None  # where the log has it, rejected or not
    nemesis: bool = False
    invoke_time: int = 0
    complete_time: int = 0
    process: Any = None
    node: str | None = "n1"
    history: dict = field(default_factory=dict)  # "invoke"/"complete" -> its Op


class Cluster:
    def __init__(self, seed: int = 0, spread: int = 2) -> None:
        self.rng = random.Random(seed)
        self.spread = spread
        self.ex = Exchange()
        self.log: list[dict] = []
        self.ops: list[SimOp] = []
        self.barriers: list[int] = []
        self.point = 0
        self.ts = 1_000

    # ------------------------------------------------------------------ what clients do

    def _next_point(self) -> int:
        self.point += STEP
        return self.point

    def apply(self, command: dict) -> list[dict]:
        self.ts += 10
        command = {**command, "ts": self.ts}
        self.log.append(command)
        return self.ex.apply(command)

    def write(self, f: str, fields: dict, outcome: str = "ok") -> SimOp:
        """One write. outcome: "ok" (applied; if the exchange rejects it, an ok reporting the
        rejection, as jepsen/client.py records it), "fail" (not applied: not_leader), "info" (applied, unknown to the client), "lost" (not applied,
        unknown), "pending" (applied, never completes), "resend" (applied, resent after an
        unknown attempt: the log has a rejected duplicate, the answer is the SDK's
        look-up)."""
        op = SimOp(len(self.ops), f, dict(fields), self._next_point())
        self.ops.append(op)
        account = fields.get("account") if f in TRADER_OPS else None
        if outcome in ("fail", "lost"):
            op.type = "fail" if outcome == "fail" else "info"
            op.error = {"code": "not_leader", "message": "simulated"}
            return op
        events = self.apply({"op": f, **fields})
        op.cmd_index = op.logged_at = events[0]["cmd_index"]
        status, body = command_outcome(events, account)
        if outcome == "info":
            op.type, op.error = "info", {"code": "outcome_unknown", "message": "simulated"}
        elif outcome == "pending":
            op.type = None
        elif status != 200:  # rejected in the log: a definite result (jepsen/client.py)
            op.result = {"rejected": body["error"]["code"], "seq": body["seq"]}
        elif outcome == "resend":
            self.apply({"op": f, **fields})  # rejected: duplicate_client_order_id
            op.result = {
                **self._order(fields["account"], fields["client_order_id"]),
                "recovered": True,
            }
        else:
            op.result = body
        if status != 200:
            op.cmd_index = None  # in the log, but rejected: it took no effect
        return op

    def read(self, f: str, fields: dict, at: int | None = None) -> SimOp:
        """A linearizable read of the state now, or (a planted fault) after `at` commands."""
        op = SimOp(len(self.ops), f, dict(fields), self._next_point())
        self.ops.append(op)
        ex = self.ex
        if at is not None:
            ex = Exchange()
            for command in self.log[:at]:
                ex.apply(command)
        op.result = self.answer(ex, f, fields)
        return op

    @staticmethod
    def answer(ex: Any, f: str, fields: dict) -> dict:
        """What the API's read routes answer (api/trading.py)."""
        if f == "read_balance":
            rows = ex.balances(fields["account"])
            return {
                "account": fields["account"],
                "balances": [
                    {"asset": asset, "available": a, "reserved": r}
                    for (_, asset), (a, r) in rows.items()
                ],
            }
        if f == "read_order":
            return Cluster._order_of(ex, fields["account"], fields["client_order_id"])
        market, depth = fields["market"], fields.get("depth", 50)
        return {
            "market": market,
            "seq": ex.seq,
            "bids": [list(level) for level in ex.book_levels(market, "buy", depth)],
            "asks": [list(level) for level in ex.book_levels(market, "sell", depth)],
        }

    def _order(self, account: str, coid: str) -> dict:
        return self._order_of(self.ex, account, coid)

    @staticmethod
    def _order_of(ex: Any, account: str, coid: str) -> dict:
        order_id = ex.order_id_for(account, coid)
        if order_id is None:
            return {"client_order_id": coid, "status": "unknown"}
        live = ex.order(order_id)
        if live is not None:
            return {"status": "open", **live}
        return {"client_order_id": coid, "order_id": order_id, "status": "done"}

    def nemesis(self, f: str, phase: str, **more: Any) -> SimOp:
        op = SimOp(len(self.ops), f, {"phase": phase, **more}, self._next_point(), nemesis=True)
        op.type = "info"
        self.ops.append(op)
        return op

    def barrier(self) -> None:
        self.barriers.append(self._next_point())

    def final_reads(self, nodes: tuple[str, ...] = NODES) -> list[SimOp]:
        self.barrier()
        out = []
        for node in nodes:
            op = SimOp(len(self.ops), "read_final", {"node": node}, self._next_point(), node=node)
            op.result = {
                "node": node,
                "state_hash": self.ex.state_hash(),
                "cmd_index": self.ex.cmd_index,
                "balances": [
                    {"account": acct, "asset": asset, "available": a, "reserved": r}
                    for (acct, asset), (a, r) in self.ex.balances().items()
                ],
            }
            self.ops.append(op)
            out.append(op)
        return out

    # ------------------------------------------------------------------ a ready-made start

    def setup(
        self, accounts: tuple[str, ...] = ACCOUNTS, usd: int = 100_000, btc: int = 1_000
    ) -> None:
        self.write(
            "create_market",
            {
                "market": MARKET,
                "base": "BTC",
                "quote": "USD",
                "lot_size": 1,
                "tick_size": 1,
                "maker_fee_bps": 10,
                "taker_fee_bps": 20,
            },
        )
        for account in accounts:
            for asset, amount in (("USD", usd), ("BTC", btc)):
                self.write(
                    "deposit",
                    {
                        "account": account,
                        "asset": asset,
                        "amount": amount,
                        "ref": f"d-{account}-{asset}",
                    },
                )
        self.barrier()

    def place(
        self,
        account: str,
        side: str,
        price: int,
        qty: int,
        coid: str,
        outcome: str = "ok",
        **more: Any,
    ) -> SimOp:
        fields = {
            "account": account,
            "market": MARKET,
            "side": side,
            "type": "limit",
            "price": price,
            "qty": qty,
            "client_order_id": coid,
            **more,
        }
        return self.write("place", fields, outcome)

    def cancel(self, account: str, coid: str, outcome: str = "ok") -> SimOp:
        return self.write(
            "cancel", {"account": account, "market": MARKET, "client_order_id": coid}, outcome
        )

    # ------------------------------------------------------------------ the history

    def history(self) -> list[Op]:
        """The ops as a history: times from the windows, processes handed out in order."""
        rng = self.rng
        barriers = sorted(self.barriers)
        for op in self.ops:
            before = max((b for b in barriers if b < op.at), default=-(10**9))
            after = min((b for b in barriers if b > op.at), default=10**12)
            reach = max(1, self.spread * STEP)
            if op.nemesis:
                op.invoke_time = op.at
                continue
            op.invoke_time = max(op.at - rng.randint(1, reach), before + 1)
            op.complete_time = min(op.at + rng.randint(1, reach), after - 1)
        return self.render()

    def render(self) -> list[Op]:
        """The history from the ops' times as they stand (tests may move them first)."""
        lines: list[tuple[int, int, SimOp, str]] = []
        for op in self.ops:
            lines.append((op.invoke_time, 1 if op.nemesis else 0, op, "invoke"))
            if op.type is not None and not op.nemesis:
                lines.append((op.complete_time, 2, op, "complete"))
        lines.sort(key=lambda line: (line[0], line[1], line[2].id))
        start = min(0, lines[0][0]) if lines else 0
        busy: set[int] = set()
        retired: set[int] = set()
        out: list[Op] = []
        for time, _, op, what in lines:
            t = time - start
            if op.nemesis:
                out.append(
                    Op(index=len(out), type="info", process=NEMESIS, f=op.f, value=op.value, time=t)
                )
                continue
            if what == "invoke":
                process = 0
                while process in busy or process in retired:
                    process += 1
                busy.add(process)
                op.process = process
                line = Op(
                    index=len(out), type="invoke", process=process, f=op.f, value=op.value, time=t
                )
                op.history["invoke"] = line
            else:
                busy.discard(op.process)
                if op.type == "info":
                    retired.add(op.process)
                line = Op(
                    index=len(out),
                    type=op.type,
                    process=op.process,
                    f=op.f,
                    value=op.result,
                    time=t,
                    node=op.node if op.type == "ok" else None,
                    error=op.error,
                    invoke_index=op.history["invoke"].index,
                )
                op.history["complete"] = line
            out.append(line)
        return out

    def save(self, store: Path, history: list[Op]) -> Path:
        """Write `history` to history.jsonl (through HistoryWriter, its clock scripted) and
        the log to log.jsonl."""
        store.mkdir(parents=True, exist_ok=True)
        times = iter([0, *(op.time for op in history)])
        with HistoryWriter(store / "history.jsonl", clock=lambda: next(times)) as writer:
            invokes: dict[int, Op] = {}
            for op in history:
                if op.process == NEMESIS:
                    writer.nemesis(op.f, op.value)
                elif op.type == "invoke":
                    invokes[op.index] = writer.invoke(op.process, op.f, op.value, op.node)
                else:
                    writer.complete(invokes[op.invoke_index], op.type, op.value, op.node, op.error)
        write_log(store / "log.jsonl", self.log)
        return store
