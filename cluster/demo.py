"""`quorumbook demo`: a finite, seeded trading session that prints what happened.

Until the cluster exists (issue 3) the session runs in-process against one `Exchange`; it
still shows what a replica guarantees: a replay of the same commands gives the same state
hash, and a snapshot restores to the same state.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

import click

from statemachine import Exchange

MARKET = "BTC-USD"


@dataclass
class Session:
    """A seeded flow of commands; `ts` advances by a fixed step so replays are identical."""

    seed: int
    accounts: int = 20
    ts: int = 1_700_000_000_000_000_000
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _stamp(self, command: dict) -> dict:
        self.ts += 1_000_000
        command["ts"] = self.ts
        return command

    def setup(self) -> list[dict]:
        cmds = [
            {
                "op": "create_market",
                "market": MARKET,
                "base": "BTC",
                "quote": "USD",
                "lot_size": 1_000_000,  # 0.01 BTC in satoshi
                "tick_size": 50,  # $0.50 per lot in cents
                "maker_fee_bps": 2,
                "taker_fee_bps": 5,
            }
        ]
        for i in range(self.accounts):
            acct = f"trader{i:02d}"
            cmds.append({"op": "deposit", "account": acct, "asset": "USD", "amount": 50_000_000, "ref": f"usd-{i}"})
            cmds.append({"op": "deposit", "account": acct, "asset": "BTC", "amount": 500_000_000, "ref": f"btc-{i}"})
        return [self._stamp(c) for c in cmds]

    def orders(self, count: int) -> list[dict]:
        rng = self.rng
        mid = 60_000
        cmds = []
        for n in range(count):
            acct = f"trader{rng.randrange(self.accounts):02d}"
            roll = rng.random()
            side = rng.choice(("buy", "sell"))
            if roll < 0.15:
                cmds.append({"op": "cancel_all", "account": acct, "market": MARKET})
            elif roll < 0.25:
                cmds.append({"op": "place", "account": acct, "market": MARKET, "side": side,
                             "type": "market", "qty": rng.randint(1, 5), "client_order_id": f"m{n}"})
            else:
                offset = rng.randint(-8, 12) * 50
                price = mid - offset if side == "buy" else mid + offset
                tif = rng.choice(("gtc", "gtc", "gtc", "ioc", "post_only", "fok"))
                cmds.append({"op": "place", "account": acct, "market": MARKET, "side": side,
                             "type": "limit", "price": price, "qty": rng.randint(1, 10),
                             "tif": tif, "client_order_id": f"o{n}"})
        return [self._stamp(c) for c in cmds]


def run(seed: int, orders: int) -> None:
    session = Session(seed)
    commands = session.setup() + session.orders(orders)
    ex = Exchange()
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    trades = []
    snapshot_at = len(commands) // 2
    blob = b""
    for i, command in enumerate(commands):
        for event in ex.apply(command):
            counts[event["type"]] += 1
            if event["type"] == "rejected":
                reasons[event["reason"]] += 1
            elif event["type"] == "trade":
                trades.append(event)
        if i + 1 == snapshot_at:
            blob = ex.snapshot()
    elapsed = time.perf_counter() - started
    ex.check_invariants()

    click.echo(f"quorumbook demo (seed {seed}): {len(commands)} commands in {elapsed * 1000:.0f} ms, in-process")
    click.echo("  (the replicated cluster arrives with the cluster issue; this is one replica's state machine)")
    click.echo(f"  events: {dict(sorted(counts.items()))}")
    click.echo(f"  rejections by reason: {dict(sorted(reasons.items()))}")
    click.echo(f"  trades: {len(trades)}, volume {sum(t['qty'] for t in trades)} lots, "
               f"fees {sum(t['maker_fee'] + t['taker_fee'] for t in trades)} USD cents")
    for t in trades[:5]:
        click.echo(f"    trade {t['trade_id']}: {t['qty']} lots @ {t['price']} "
                   f"{t['taker_account']} ({t['taker_side']}) x {t['maker_account']}")
    if len(trades) > 5:
        click.echo(f"    ... {len(trades) - 5} more")
    bids = ex.book_levels(MARKET, "buy", 3)
    asks = ex.book_levels(MARKET, "sell", 3)
    click.echo(f"  book {MARKET}: bids {bids}  asks {asks}")
    click.echo("  balances (available/reserved) of the first traders and the fee account:")
    balances = ex.balances()
    for acct in ("trader00", "trader01", "trader02", "_fees"):
        row = {asset: f"{a}/{r}" for (owner, asset), (a, r) in balances.items() if owner == acct}
        click.echo(f"    {acct}: {row}")

    replay = Exchange()
    for command in commands:
        replay.apply(command)
    resumed = Exchange.restore(blob)
    for command in commands[snapshot_at:]:
        resumed.apply(command)
    click.echo(f"  state hash            {ex.state_hash()}")
    click.echo(f"  replayed from scratch {replay.state_hash()}")
    click.echo(f"  snapshot at #{snapshot_at} + rest {resumed.state_hash()}")
    if not ex.state_hash() == replay.state_hash() == resumed.state_hash():
        raise click.ClickException("determinism check failed: state hashes differ")
    click.echo("  determinism: OK (all three hashes equal)")
