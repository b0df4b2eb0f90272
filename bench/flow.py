"""A seeded, engine-neutral order flow for benchmarks and demos.

`generate(n, seed=..., profile=...)` returns a `Flow`: one market, many funded accounts, and
a list of ops: passive GTC limit orders some ticks from a random-walk mid price (exponential
offset); ~10% aggressive limits that take the first 1-3 resting orders (a fifth of them with
extra size that rests after the sweep); and ~30% cancels of uniformly chosen live orders (20%
while the book holds fewer than `book_target` orders, 40% above, so the book hovers near that
size instead of growing without bound). A warm-up stretch of the same flow builds the book
first. All randomness comes from one `random.Random(seed)`, so the same arguments always give
the same flow.

Two shapes of book (`PROFILES`):

- `deep` (what a real exchange book looks like): ~40,000 resting orders from 5,000 accounts,
  offsets with a mean of 300 ticks, so each side spreads over ~1,500 price levels, dense near
  the mid and thinning out away from it;
- `shallow`: ~5,000 resting orders from 1,000 accounts within ~100-200 levels per side (mean
  offset 20 ticks): a toy book, where an engine's per-level costs hardly show.

The generator runs its own tiny price-time matcher while it generates, so that:

- every cancel names an order that is still resting at that point (in any correct engine);
- no order would ever trade against a resting order of its own account (the account is
  re-drawn until it owns none of the makers the order would hit), so self-trade prevention
  never fires;
- it knows what a correct engine must produce (maker fills, traded quantity, the resting
  orders at the end), so a benchmark can check that the engines it times did the same work.

Funds are ample (every account gets `DEPOSIT_BASE` / `DEPOSIT_QUOTE`), so no risk check ever
rejects. Order numbers are 1-based in place order, which is the `order_id` both our exchange
and lightmatchingengine assign when every place is accepted.

Ops are tuples:

- `("place", account, side, price, qty)` — a GTC limit order, `side` is "buy"/"sell";
- `("cancel", account, order_no)`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

MARKET = "BTC-USD"
BASE = "BTC"
QUOTE = "USD"
LOT_SIZE = 1
TICK_SIZE = 1
MAKER_FEE_BPS = 1
TAKER_FEE_BPS = 2
START_MID = 1_000_000
DEPOSIT_BASE = 10**12
DEPOSIT_QUOTE = 10**14  # x accounts must stay under the 2**62 supply limit

P_CANCEL_BELOW = 0.20  # cancel share while the book is under its target size...
P_CANCEL_ABOVE = 0.40  # ...and over it: ~30% overall, and the book stays near the target
P_CROSS = 0.10
P_MID_STEP = 0.10  # chance the mid moves one tick before a place
PASSIVE_MEAN_OFFSET = 20.0  # ticks from the mid, exponential (the shallow profile's)
PASSIVE_MAX_QTY = 100
BOOK_TARGET = 5000  # resting orders the flow hovers around (the shallow profile's)


@dataclass(frozen=True)
class Profile:
    """The shape of book a flow builds and keeps."""

    name: str
    book_target: int  # resting orders the flow hovers around
    mean_offset: float  # mean distance of a passive order from the mid, in ticks
    warmup: int  # untimed ops that build the book first
    accounts: int
    # A share of the passive orders placed close to the mid instead (mean `near_offset`
    # ticks): the dense inside of a real book, which keeps the spread tight.
    near_share: float = 0.0
    near_offset: float = 0.0


PROFILES = {
    "deep": Profile(
        "deep",
        book_target=40_000,
        mean_offset=250.0,
        warmup=130_000,
        accounts=5000,
        near_share=0.3,
        near_offset=15.0,
    ),
    "shallow": Profile(
        "shallow",
        book_target=BOOK_TARGET,
        mean_offset=PASSIVE_MEAN_OFFSET,
        warmup=30_000,
        accounts=1000,
    ),
}


@dataclass
class Stats:
    """What a correct engine does on a stretch of the flow."""

    places: int = 0
    cancels: int = 0
    crossing: int = 0  # places that traded at least once
    maker_fills: int = 0  # one per (taker, maker) pair: our `trade` events
    level_sweeps: int = 0  # one per (taker, price level): lightmatchingengine's taker records
    traded_qty: int = 0


@dataclass
class Flow:
    seed: int
    accounts: list[str]
    warmup: list[tuple]  # ops to run untimed first
    ops: list[tuple]  # the measured ops
    warmup_stats: Stats
    stats: Stats
    resting_end: dict[int, int]  # order_no -> remaining, after all ops
    book_at_start: dict = field(default_factory=dict)  # shape after the warm-up
    book_at_end: dict = field(default_factory=dict)


class _Sim:
    """Minimal price-time matcher: levels are deques of [order_no, account, remaining]."""

    def __init__(self) -> None:
        self.bids: SortedDict = SortedDict()  # -price -> deque
        self.asks: SortedDict = SortedDict()  # price -> deque
        self.orders: dict[int, tuple[list, str, int]] = {}  # order_no -> (entry, side, price)
        self.live: list[int] = []  # for uniform random choice; swap-remove
        self.pos: dict[int, int] = {}
        self.next_no = 1

    def best(self, side: str) -> int | None:
        levels = self.bids if side == "buy" else self.asks
        if not levels:
            return None
        key = levels.peekitem(0)[0]
        return -key if side == "buy" else key

    def _walk(self, side: str, price: int, qty: int):
        """Yield (level_price, entry, fill) an incoming order would get, without mutating."""
        levels = self.asks if side == "buy" else self.bids
        for key, queue in levels.items():
            lp = key if side == "buy" else -key
            if (lp > price) if side == "buy" else (lp < price):
                return
            for entry in queue:
                fill = min(qty, entry[2])
                yield lp, entry, fill
                qty -= fill
                if qty == 0:
                    return

    def touched_accounts(self, side: str, price: int, qty: int) -> set[str]:
        return {entry[1] for _, entry, _ in self._walk(side, price, qty)}

    def makers_ahead(self, side: str, k: int) -> list[tuple[int, int]]:
        """(level price, remaining) of the first `k` resting orders an incoming `side` would hit."""
        levels = self.asks if side == "buy" else self.bids
        out = []
        for key, queue in levels.items():
            lp = key if side == "buy" else -key
            for entry in queue:
                out.append((lp, entry[2]))
                if len(out) == k:
                    return out
        return out

    def place(self, account: str, side: str, price: int, qty: int, stats: Stats) -> int:
        no = self.next_no
        self.next_no += 1
        stats.places += 1
        levels = self.asks if side == "buy" else self.bids
        traded = False
        last_level = None
        while qty and levels:
            key, queue = levels.peekitem(0)
            lp = key if side == "buy" else -key
            if (lp > price) if side == "buy" else (lp < price):
                break
            if lp != last_level:
                stats.level_sweeps += 1
                last_level = lp
            while qty and queue:
                entry = queue[0]
                assert entry[1] != account, "generator bug: self-trade"
                fill = min(qty, entry[2])
                entry[2] -= fill
                qty -= fill
                stats.maker_fills += 1
                stats.traded_qty += fill
                traded = True
                if entry[2] == 0:
                    queue.popleft()
                    self._unlive(entry[0])
            if not queue:
                del levels[key]
        if traded:
            stats.crossing += 1
        if qty:
            own = self.bids if side == "buy" else self.asks
            key = -price if side == "buy" else price
            queue = own.get(key)
            if queue is None:
                queue = own[key] = deque()
            entry = [no, account, qty]
            queue.append(entry)
            self.orders[no] = (entry, side, price)
            self.pos[no] = len(self.live)
            self.live.append(no)
        return no

    def cancel(self, no: int, stats: Stats) -> None:
        entry, side, price = self.orders[no]
        own = self.bids if side == "buy" else self.asks
        key = -price if side == "buy" else price
        queue = own[key]
        queue.remove(entry)
        if not queue:
            del own[key]
        self._unlive(no)
        stats.cancels += 1

    def _unlive(self, no: int) -> None:
        del self.orders[no]
        i = self.pos.pop(no)
        last = self.live.pop()
        if last != no:
            self.live[i] = last
            self.pos[last] = i

    def shape(self) -> dict:
        def depth(levels):
            return sum(len(q) for q in levels.values())

        return {
            "resting_orders": len(self.live),
            "bid_levels": len(self.bids),
            "ask_levels": len(self.asks),
            "resting_bids": depth(self.bids),
            "resting_asks": depth(self.asks),
            "best_bid": self.best("buy"),
            "best_ask": self.best("sell"),
        }


def account_names(n: int) -> list[str]:
    return [f"acct{i:05d}" for i in range(n)]


def generate(
    n: int,
    *,
    seed: int = 1,
    warmup: int = 30_000,
    accounts: int = 1000,
    book_target: int = BOOK_TARGET,
    mean_offset: float = PASSIVE_MEAN_OFFSET,
    near_share: float = 0.0,
    near_offset: float = 0.0,
) -> Flow:
    """`warmup` ops (untimed, they build the book) followed by `n` measured ops.

    The defaults are the shallow profile; `generate_profile` takes a `Profile`.
    """
    rng = random.Random(seed)
    names = account_names(accounts)
    sim = _Sim()
    mid = START_MID
    warm_stats, stats = Stats(), Stats()
    warm_ops: list[tuple] = []
    ops: list[tuple] = []
    book_at_start: dict = {}
    rand = rng.random
    for i in range(warmup + n):
        if i == warmup:
            book_at_start = sim.shape()
        out, st = (warm_ops, warm_stats) if i < warmup else (ops, stats)
        r = rand()
        p_cancel = P_CANCEL_BELOW if len(sim.live) < book_target else P_CANCEL_ABOVE
        if r < p_cancel and sim.live:
            no = sim.live[int(rand() * len(sim.live))]
            account = sim.orders[no][0][1]
            sim.cancel(no, st)
            out.append(("cancel", account, no))
            continue
        if rand() < P_MID_STEP:
            mid += 1 if rand() < 0.5 else -1
        side = "buy" if rand() < 0.5 else "sell"
        opposite = "sell" if side == "buy" else "buy"
        if rand() < P_CROSS / (1 - p_cancel) and sim.best(opposite) is not None:
            # Aggressive: take the first 1-3 resting orders (the last one maybe partly),
            # sometimes with extra size that rests at the limit after sweeping.
            ahead = sim.makers_ahead(side, rng.randint(1, 3))
            qty = sum(q for _, q in ahead[:-1]) + rng.randint(1, ahead[-1][1])
            price = ahead[-1][0]
            if rand() < 0.2:
                qty += rng.randint(1, PASSIVE_MAX_QTY)
        else:
            # (No extra draw without a near share: the shallow flow stays what it was.)
            near = near_share > 0 and rand() < near_share
            offset = 1 + int(rng.expovariate(1.0 / (near_offset if near else mean_offset)))
            price = mid - offset if side == "buy" else mid + offset
            qty = rng.randint(1, PASSIVE_MAX_QTY)
        price = max(price, 1)
        hit = sim.touched_accounts(side, price, qty)
        account = names[int(rand() * accounts)]
        while account in hit:
            account = names[int(rand() * accounts)]
        sim.place(account, side, price, qty, st)
        out.append(("place", account, side, price, qty))
    if not book_at_start:
        book_at_start = sim.shape()
    resting = {no: entry[2] for no, (entry, _, _) in sim.orders.items()}
    return Flow(
        seed=seed,
        accounts=names,
        warmup=warm_ops,
        ops=ops,
        warmup_stats=warm_stats,
        stats=stats,
        resting_end=resting,
        book_at_start=book_at_start,
        book_at_end=sim.shape(),
    )


def generate_profile(n: int, profile: Profile, *, seed: int = 1) -> Flow:
    """`generate` with the warm-up, accounts and book shape of `profile`."""
    return generate(
        n,
        seed=seed,
        warmup=profile.warmup,
        accounts=profile.accounts,
        book_target=profile.book_target,
        mean_offset=profile.mean_offset,
        near_share=profile.near_share,
        near_offset=profile.near_offset,
    )


# ---------------------------------------------------------------- translation to our exchange


def setup_commands(accounts: list[str], ts: int = 1) -> list[dict]:
    """create_market plus one base and one quote deposit per account."""
    cmds: list[dict] = [
        {
            "op": "create_market",
            "ts": ts,
            "market": MARKET,
            "base": BASE,
            "quote": QUOTE,
            "lot_size": LOT_SIZE,
            "tick_size": TICK_SIZE,
            "maker_fee_bps": MAKER_FEE_BPS,
            "taker_fee_bps": TAKER_FEE_BPS,
        }
    ]
    for acct in accounts:
        for asset, amount in ((BASE, DEPOSIT_BASE), (QUOTE, DEPOSIT_QUOTE)):
            cmds.append(
                {
                    "op": "deposit",
                    "ts": ts,
                    "account": acct,
                    "asset": asset,
                    "amount": amount,
                    "ref": f"dep:{acct}:{asset}",
                }
            )
    return cmds


def exchange_commands(ops: list[tuple], ts_start: int, ts_step: int = 1000) -> list[dict]:
    """`Exchange.apply` commands for `ops`, with strictly increasing `ts`."""
    cmds: list[dict] = []
    ts = ts_start
    for op in ops:
        ts += ts_step
        if op[0] == "place":
            _, account, side, price, qty = op
            cmds.append(
                {
                    "op": "place",
                    "ts": ts,
                    "account": account,
                    "market": MARKET,
                    "side": side,
                    "type": "limit",
                    "price": price,
                    "qty": qty,
                    "tif": "gtc",
                }
            )
        else:
            _, account, no = op
            cmds.append(
                {"op": "cancel", "ts": ts, "account": account, "market": MARKET, "order_id": no}
            )
    return cmds
