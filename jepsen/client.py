"""The harness's clients: logical processes that run the `orders` workload through the SDK and
write every operation to the history (invoke, then ok / fail / info), as Jepsen's do.

Each process is a thread with its own `Client` (the SDK's leader tracking and retry policy)
for one trader account, and a second one for its reads that starts at the process's home
node, as Jepsen binds each client to a node: a follower redirects a linearizable read to the
leader (the SDK follows), so reads stay linearizable, unless a node answers them itself
(the planted bug `--unsafe-local-reads`: then a partitioned node's stale answers reach the
history). An operation whose outcome is unknown (`OutcomeUnknown`, or a refusal
after an attempt with an unknown outcome) ends `info`, and its process is retired: the thread
goes on as a new process number (`process + concurrency`), so that no process ever has two
operations open, which the checkers rely on.

What `fail` means: definitely not applied, not even as a rejection in the log. A command the
exchange rejected in the log (`ApiError.seq` set) took a `cmd_index`: it ends `ok` with
`{"rejected": code, "seq": seq}`, which the sequencer check reproduces like any other result.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from api.sdk import ApiError, Client, ClusterUnavailable, Credentials, OutcomeUnknown
from cluster.workload import funding_commands

MARKET = {"market": "JP-USD", "base": "JP", "quote": "USD", "lot_size": 1, "tick_size": 1,
          "maker_fee_bps": 1, "taker_fee_bps": 2}  # fmt: skip
MID = 10_000
FUNDS = {"JP": 10**9, "USD": 10**12}
DEADLINE_S = 3.0
# The mix of operations: (f, weight).
MIX = (("place", 50), ("cancel", 15), ("read_order", 15), ("read_book", 10), ("read_balance", 10))


def setup_commands(accounts: list[str]) -> list[dict]:
    """The market and every account's funds (admin commands, before the run's clock starts)."""
    return funding_commands([MARKET], accounts, FUNDS, "setup-{account}-{asset}")


@dataclass
class Process:
    """One logical client: its number, its account, the client order ids it placed."""

    number: int
    account: str
    placed: list[str] = field(default_factory=list)  # acknowledged client order ids
    counter: int = 0


class Clients:
    """`concurrency` threads running the workload at `rate` operations/s in all, until stopped."""

    def __init__(
        self,
        urls: list[str],
        keys: dict[str, Credentials],
        history,
        *,
        rate: float,
        concurrency: int,
        seed: int,
        node_of: Callable[[str | None], str | None],
        verify=True,
    ) -> None:
        self.urls = urls
        self.keys = keys
        self.history = history
        self.period_s = concurrency / rate
        self.concurrency = concurrency
        self.seed = seed
        self.node_of = node_of
        self.verify = verify
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.retired = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        accounts = sorted(self.keys)
        for slot in range(self.concurrency):
            account = accounts[slot % len(accounts)]
            thread = threading.Thread(
                target=self._run, args=(slot, account), name=f"client-{slot}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def halt(self, timeout_s: float = DEADLINE_S + 5) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout_s)

    # ------------------------------------------------------------------ one thread

    def _run(self, slot: int, account: str) -> None:
        try:
            self._loop(slot, account)
        except BaseException as exc:  # a harness bug: the run must not pass as valid
            with self._lock:
                self.errors.append(f"client {slot}: {type(exc).__name__}: {exc}")
            raise

    def _loop(self, slot: int, account: str) -> None:
        rng = random.Random(self.seed * 1_000 + slot)
        process = Process(slot, account)
        home = self.urls[slot % len(self.urls)]
        key = self.keys[account]
        with (
            Client(self.urls, key, deadline_s=DEADLINE_S, verify=self.verify) as c,
            Client([home], key, deadline_s=DEADLINE_S, verify=self.verify) as reader,
        ):
            next_at = time.monotonic() + rng.uniform(0, self.period_s)
            while not self.stop.is_set():
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    return
                next_at += self.period_s * rng.uniform(0.5, 1.5)
                f = rng.choices([f for f, _ in MIX], [w for _, w in MIX])[0]
                if f == "cancel" and not process.placed:
                    f = "place"
                outcome = self._operate(reader if f.startswith("read") else c, process, f, rng)
                if outcome == "info":  # retired: this thread goes on as a new process
                    with self._lock:
                        self.retired += 1
                    process = Process(process.number + self.concurrency, account, process.placed)

    def _operate(self, client: Client, process: Process, f: str, rng: random.Random) -> str:
        value, call = self._op(client, process, f, rng)
        invoked = self.history.invoke(process.number, f, value)
        try:
            result = call()
        except OutcomeUnknown as exc:
            self._complete(client, invoked, "info", error=("outcome_unknown", str(exc)))
            return "info"
        except ApiError as exc:
            if exc.seq is not None and not exc.after_retry:  # rejected in the log: a result
                if f == "cancel":  # the order is no longer open (filled, or cancelled)
                    process.placed.remove(value["client_order_id"])
                self._complete(client, invoked, "ok", {"rejected": exc.code, "seq": exc.seq})
                return "ok"
            kind = "info" if exc.after_retry else "fail"
            self._complete(client, invoked, kind, error=(exc.code, exc.message))
            return kind
        except ClusterUnavailable as exc:  # definite: no attempt reached a leader
            self._complete(client, invoked, "fail", error=("cluster_unavailable", str(exc)))
            return "fail"
        if f == "place" and result.get("status") == "resting":
            process.placed.append(value["client_order_id"])
        elif f == "cancel":
            process.placed.remove(value["client_order_id"])
        self._complete(client, invoked, "ok", result)
        return "ok"

    def _complete(self, client: Client, invoked, type_: str, value=None, error=None) -> None:
        node = self.node_of(client.leader)
        err = {"code": error[0], "message": error[1]} if error else None
        self.history.complete(invoked, type_, value, node=node, error=err)

    def _op(self, client: Client, process: Process, f: str, rng: random.Random):
        """(the invoke's value, the call that performs it)."""
        market = MARKET["market"]
        if f == "place":
            process.counter += 1
            coid = f"p{process.number}-{process.counter}"
            side = rng.choice(("buy", "sell"))
            # Mostly near the mid, so that orders rest and some cross and trade.
            offset = rng.randint(-5, 20)
            price = MID - offset if side == "buy" else MID + offset
            order = {"market": market, "side": side, "type": "limit", "price": price,
                     "qty": rng.randint(1, 5), "tif": rng.choice(("gtc", "gtc", "ioc")),
                     "client_order_id": coid}  # fmt: skip
            return {"account": process.account, **order}, lambda: client.place(**order)
        if f == "cancel":
            coid = rng.choice(process.placed)
            value = {"account": process.account, "market": market, "client_order_id": coid}
            return value, lambda: client.cancel(market=market, client_order_id=coid)
        if f == "read_order":
            coid = rng.choice(process.placed) if process.placed else f"p{process.number}-0"
            value = {"account": process.account, "client_order_id": coid}
            return value, lambda: client.order_by_client_id(coid)
        if f == "read_book":
            return {"market": market, "depth": 20}, lambda: client.book(market, depth=20)
        if f == "read_balance":
            return {"account": process.account}, client.balances
        raise ValueError(f"unknown operation {f!r}")
