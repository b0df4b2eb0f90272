"""Workloads, once (DESIGN.md "Layout"): the seeded order flows, the market and account set-up,
the deposit and order loads, and the waiting helpers that `quorumbook loadgen`, the demo, the
drills, the benchmarks and the tests all use.

It talks to a cluster only as a user does (the SDK, the local launcher), so the Jepsen harness
may use it too (tests/test_layering.py).

- Waiting: `wait_for(predicate, timeout_s, what)`, `wait_caught_up(cluster, node_id)`.
- Figures: `percentile` (nearest rank).
- Set-up: `funding_commands` (create_market, then one deposit per account and asset),
  `set_up` (the same through the admin API, idempotent, plus a trader key per account).
- The SDK order flow: `plan` (what loadgen sends; `Mix` shapes it), `endless` (the same
  without an end, for the drills), `command_of` (an operation as a raw admin command).
- The book flow: `book_flow` (engine-neutral, simulated as it is generated: what the
  benchmarks time and the indexer tests replay), `book_setup`, `book_commands`.
- Loads: `DepositLoad` (deposits with unique refs from a thread; `check_deposits`), and
  `OrderLoad` (a flow of operations through `AsyncClient`, every outcome kept: loadgen, the
  drills).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import math
import random
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import trio
from sortedcontainers import SortedDict

from api.sdk import (
    AdminClient,
    ApiError,
    AsyncClient,
    Client,
    ClusterUnavailable,
    Credentials,
    OutcomeUnknown,
)

if TYPE_CHECKING:
    from .launcher import LocalCluster

T = TypeVar("T")


# ---------------------------------------------------------------------- waiting


def wait_for(
    predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.05
) -> T:
    """Call `predicate` every `interval_s` until it returns something true, and return that;
    `TimeoutError` naming `what` once `timeout_s` has passed. The predicate may raise to end
    the wait early (a load that failed, a process that died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def wait_caught_up(cluster: LocalCluster, node_id: str, timeout_s: float = 60.0) -> float:
    """Seconds until `node_id` answers and has applied the leader's cmd_index, sampled once it
    answers. Under load the nodes never report the same index at one instant, so
    `LocalCluster.wait_converged` serves only once the load has stopped."""
    t0 = time.perf_counter()
    target: int | None = None

    def caught_up() -> bool:
        nonlocal target
        status = cluster.status(node_id, 1.0)
        if status is None:
            return False
        if target is None:
            statuses = cluster.statuses().values()
            leader = next((s for s in statuses if s and s["role"] == "leader"), None)
            target = leader["cmd_index"] if leader else None
        return target is not None and status["cmd_index"] >= target

    try:
        wait_for(caught_up, timeout_s, f"{node_id} to catch up")
    except TimeoutError:
        raise TimeoutError(f"{node_id} did not catch up within {timeout_s:.0f} s") from None
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- figures


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------- set-up

# loadgen's market (`market_spec` names others like it) and its funding: enough per account
# and asset that funds never run out in a bounded run.
DEFAULT_MARKET = {
    "market": "LG-USD",
    "base": "LG",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}
FUNDING = 10**15


def market_spec(name: str) -> dict:
    """`DEFAULT_MARKET` under another name; its base asset is the name's part before "-"."""
    base = name.split("-")[0] if "-" in name else DEFAULT_MARKET["base"]
    return {**DEFAULT_MARKET, "market": name, "base": base}


def trader(a: int) -> str:
    """The account name of trader `a` of `set_up`'s default accounts."""
    return f"lg{a:03d}"


def funding_commands(
    markets: Sequence[dict],
    accounts: Sequence[str],
    funds: Mapping[str, int],
    ref: str,
    *,
    ts: int | None = None,
) -> list[dict]:
    """`create_market` for each of `markets` (a market's fields), then for each account one
    deposit per asset of `funds` (asset -> amount, in its order). `ref` is formatted with
    `account`, `asset` and `i` (the account's index): unique refs make a rerun a no-op. With
    `ts`, every command carries it (for `Exchange.apply`; a node stamps its own)."""
    stamp = {} if ts is None else {"ts": ts}
    cmds = [{"op": "create_market", **stamp, **market} for market in markets]
    for i, account in enumerate(accounts):
        for asset, amount in funds.items():
            cmds.append(
                {
                    "op": "deposit",
                    **stamp,
                    "account": account,
                    "asset": asset,
                    "amount": amount,
                    "ref": ref.format(account=account, asset=asset, i=i),
                }
            )
    return cmds


def set_up(
    cluster: LocalCluster,
    market: dict,
    accounts: Sequence[str],
    funds: Mapping[str, int] | None = None,
    ref: str = "loadgen-{account}-{asset}",
) -> tuple[dict, list[Credentials]]:
    """Create `market` and fund `accounts` if missing (idempotent: an existing market and a
    known ref are fine), and a new trader key per account -> (the market as the cluster lists
    it, the keys). `funds` defaults to `FUNDING` of the market's base and quote."""
    urls, verify = cluster.api_urls(), cluster.verify
    if funds is None:
        funds = {market["base"]: FUNDING, market["quote"]: FUNDING}
    with AdminClient(urls, cluster.admin_credentials(), verify=verify) as admin:
        commands = funding_commands([market], accounts, funds, ref)
        for command, result in zip(commands, admin.submit(commands), strict=True):
            first = (result.get("events") or [{}])[0]
            if "error" in result or (
                first.get("type") == "rejected"
                and first.get("reason") not in ("market_exists", "duplicate_ref")
            ):
                raise RuntimeError(f"setup command {command['op']} failed: {result}")
        keys = [admin.create_key(account) for account in accounts]
    with Client(urls, None, verify=verify) as public:
        listed = next((m for m in public.markets() if m["market"] == market["market"]), None)
    if listed is None:
        raise RuntimeError(f"market {market['market']} missing after creation")
    return listed, keys


# ---------------------------------------------------------------------- the SDK order flow


@dataclass(frozen=True)
class Operation:
    index: int
    at_s: float  # offset from the start of the run
    account: int
    op: str  # "place" or "cancel"
    fields: dict  # place: order fields without client_order_id; cancel: {"market"}
    target: int | None = None  # cancel: index of the earlier place whose order to cancel


@dataclass(frozen=True)
class Mix:
    """What `plan` draws (the defaults: loadgen's flow). Per operation: a cancel of one of the
    account's last 20 places (`cancel_share`), a market IOC order (`market_share`), else a
    limit order `offset_ticks` from a fixed mid (negative: it crosses the spread)."""

    cancel_share: float = 0.10
    market_share: float = 0.10
    market_qty: tuple[int, int] = (1, 3)
    offset_ticks: tuple[int, int] = (-3, 12)
    limit_qty: tuple[int, int] = (1, 10)
    tifs: tuple[str, ...] = ("gtc", "gtc", "gtc", "gtc", "ioc", "post_only")
    mid_ticks: int = 2000


LOADGEN = Mix()


def plan(
    seed: int, rate: float, duration_s: float, accounts: int, market: dict, mix: Mix = LOADGEN
) -> list[Operation]:
    """The seeded flow: `int(rate * duration_s)` operations, one every `1 / rate` seconds; a
    pure function of its arguments."""
    rng = random.Random(seed)
    tick = market["tick_size"]
    mid = mix.mid_ticks * tick
    placed: dict[int, list[int]] = {a: [] for a in range(accounts)}
    ops = []
    for i in range(int(rate * duration_s)):
        account = rng.randrange(accounts)
        roll = rng.random()
        if roll < mix.cancel_share and placed[account]:
            target = rng.choice(placed[account][-20:])
            ops.append(
                Operation(i, i / rate, account, "cancel", {"market": market["market"]}, target)
            )
            continue
        side = rng.choice(("buy", "sell"))
        if roll < mix.cancel_share + mix.market_share:
            order = {
                "market": market["market"],
                "side": side,
                "type": "market",
                "tif": "ioc",
                "qty": rng.randint(*mix.market_qty),
            }
        else:
            offset = rng.randint(*mix.offset_ticks) * tick
            price = mid - offset if side == "buy" else mid + offset
            tif = rng.choice(mix.tifs)
            order = {
                "market": market["market"],
                "side": side,
                "type": "limit",
                "price": price,
                "qty": rng.randint(*mix.limit_qty),
                "tif": tif,
            }
        placed[account].append(i)
        ops.append(Operation(i, i / rate, account, "place", order))
    return ops


def endless(
    seed: int, rate: float, accounts: int, market: dict, mix: Mix = LOADGEN, block: int = 1000
) -> Iterator[Operation]:
    """`plan`'s flow without an end: planned `block` operations at a time (block k seeded
    `seed + k`, so the first block is `plan(seed, ...)`'s start), renumbered to follow on. A
    drill does not know its length up front, and one plan of an hour would hold
    `rate * 3600` operations in memory."""
    base = 0
    for k in itertools.count():
        ops = plan(seed + k, rate, block / rate, accounts, market, mix)
        for op in ops:
            yield dataclasses.replace(
                op,
                index=base + op.index,
                at_s=(base + op.index) / rate,
                target=None if op.target is None else base + op.target,
            )
        base += len(ops)


def command_of(op: Operation, account: str, coid: Callable[[int], str]) -> dict:
    """`op` as a raw state-machine command (`AdminClient.submit`) for `account`; `coid(index)`
    names the client_order_id of the place at `index` (a cancel names its target's)."""
    if op.op == "place":
        return {"op": "place", "account": account, **op.fields, "client_order_id": coid(op.index)}
    assert op.target is not None, "a cancel names the place it cancels"
    return {
        "op": "cancel",
        "account": account,
        "market": op.fields["market"],
        "client_order_id": coid(op.target),
    }


# ---------------------------------------------------------------------- the book flow
#
# `book_flow(n, profile, seed=...)` returns a `BookFlow`: one market, many funded accounts,
# and a list of ops: passive GTC limit orders some ticks from a random-walk mid price
# (exponential offset); ~10% aggressive limits that take the first 1-3 resting orders (a fifth
# of them with extra size that rests after the sweep); and ~30% cancels of uniformly chosen
# live orders (20% while the book holds fewer than `book_target` orders, 40% above, so the
# book hovers near that size instead of growing without bound). A warm-up stretch of the same
# flow builds the book first. All randomness comes from one `random.Random(seed)`, so the same
# arguments always give the same flow.
#
# Three shapes of flow (`PROFILES`):
#
# - `deep` (what a real exchange book looks like): ~40,000 resting orders from 5,000 accounts,
#   offsets with a mean of 300 ticks, so each side spreads over ~1,500 price levels, dense
#   near the mid and thinning out away from it;
# - `shallow`: ~5,000 resting orders from 1,000 accounts within ~100-200 levels per side (mean
#   offset 20 ticks): a toy book, where an engine's per-level costs hardly show;
# - `cancels`: a shallow book under heavy cancelling (40% of the commands while the book is
#   under its target size, 55% over it: about 40% in all; 4% take liquidity), as market
#   makers re-quoting make it.
#
# The generator runs its own tiny price-time matcher while it generates, so that:
#
# - every cancel names an order that is still resting at that point (in any correct engine);
# - no order would ever trade against a resting order of its own account (the account is
#   re-drawn until it owns none of the makers the order would hit), so self-trade prevention
#   never fires;
# - it knows what a correct engine must produce (maker fills, traded quantity, the resting
#   orders at the end), so a benchmark can check that the engines it times did the same work.
#
# Funds are ample (every account gets `DEPOSIT_BASE` / `DEPOSIT_QUOTE`), so no risk check ever
# rejects. Order numbers are 1-based in place order, which is the `order_id` both our exchange
# and lightmatchingengine assign when every place is accepted. It is engine-neutral, unlike
# `plan` (which sends what a client would and lets the exchange judge it): ops are tuples,
#
# - `("place", account, side, price, qty)`: a GTC limit order, `side` is "buy"/"sell";
# - `("cancel", account, order_no)`.

BOOK_MARKET = {
    "market": "BTC-USD",
    "base": "BTC",
    "quote": "USD",
    "lot_size": 1,
    "tick_size": 1,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}
START_MID = 1_000_000
DEPOSIT_BASE = 10**12
DEPOSIT_QUOTE = 10**14  # x accounts must stay under the 2**62 supply limit

P_CANCEL_BELOW = 0.20  # cancel share while the book is under its target size...
P_CANCEL_ABOVE = 0.40  # ...and over it: ~30% overall, and the book stays near the target
P_CROSS = 0.10
P_MID_STEP = 0.10  # chance the mid moves one tick before a place
PASSIVE_MAX_QTY = 100


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
    # The cancel share while the book is under its target size, and over it.
    p_cancel_below: float = P_CANCEL_BELOW
    p_cancel_above: float = P_CANCEL_ABOVE
    p_cross: float = P_CROSS  # the share of all commands that take liquidity


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
    "shallow": Profile("shallow", book_target=5000, mean_offset=20.0, warmup=30_000, accounts=1000),
    # Market makers re-quoting: about 40% of the commands cancel a live order (the shallow
    # flow: 30%), 4% take liquidity, the rest rest; a book of 2,000-2,500 orders.
    "cancels": Profile(
        "cancels",
        book_target=5000,
        mean_offset=20.0,
        warmup=30_000,
        accounts=1000,
        p_cancel_below=0.40,
        p_cancel_above=0.55,
        p_cross=0.04,
    ),
}


@dataclass
class BookStats:
    """What a correct engine does on a stretch of the flow."""

    places: int = 0
    cancels: int = 0
    crossing: int = 0  # places that traded at least once
    maker_fills: int = 0  # one per (taker, maker) pair: our `trade` events
    level_sweeps: int = 0  # one per (taker, price level): lightmatchingengine's taker records
    traded_qty: int = 0


@dataclass
class BookFlow:
    seed: int
    accounts: list[str]
    warmup: list[tuple]  # ops to run untimed first
    ops: list[tuple]  # the measured ops
    warmup_stats: BookStats
    stats: BookStats
    resting_end: dict[int, int]  # order_no -> remaining, after all ops
    book_at_start: dict = field(default_factory=dict)  # shape after the warm-up
    book_at_end: dict = field(default_factory=dict)


class _BookSim:
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

    def place(self, account: str, side: str, price: int, qty: int, stats: BookStats) -> int:
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

    def cancel(self, no: int, stats: BookStats) -> None:
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


def book_accounts(n: int) -> list[str]:
    return [f"acct{i:05d}" for i in range(n)]


def book_flow(
    n: int,
    profile: Profile = PROFILES["shallow"],
    *,
    seed: int = 1,
    warmup: int | None = None,
    accounts: int | None = None,
) -> BookFlow:
    """The profile's warm-up ops (untimed, they build the book; or `warmup` of them) followed
    by `n` measured ops, over the profile's accounts (or `accounts`)."""
    warmup = profile.warmup if warmup is None else warmup
    accounts = profile.accounts if accounts is None else accounts
    book_target, mean_offset = profile.book_target, profile.mean_offset
    near_share, near_offset = profile.near_share, profile.near_offset
    rng = random.Random(seed)
    names = book_accounts(accounts)
    sim = _BookSim()
    mid = START_MID
    warm_stats, stats = BookStats(), BookStats()
    warm_ops: list[tuple] = []
    ops: list[tuple] = []
    book_at_start: dict = {}
    rand = rng.random
    for i in range(warmup + n):
        if i == warmup:
            book_at_start = sim.shape()
        out, st = (warm_ops, warm_stats) if i < warmup else (ops, stats)
        r = rand()
        p_cancel = profile.p_cancel_below if len(sim.live) < book_target else profile.p_cancel_above
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
        if rand() < profile.p_cross / (1 - p_cancel) and sim.best(opposite) is not None:
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
    return BookFlow(
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


def book_setup(accounts: Sequence[str], ts: int = 1) -> list[dict]:
    """`BOOK_MARKET` plus one base and one quote deposit per account, for `Exchange.apply`."""
    funds = {BOOK_MARKET["base"]: DEPOSIT_BASE, BOOK_MARKET["quote"]: DEPOSIT_QUOTE}
    return funding_commands([BOOK_MARKET], accounts, funds, "dep:{account}:{asset}", ts=ts)


def book_commands(ops: list[tuple], ts_start: int, ts_step: int = 1000) -> list[dict]:
    """`Exchange.apply` commands for `ops`, with strictly increasing `ts`."""
    market = BOOK_MARKET["market"]
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
                    "market": market,
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
                {"op": "cancel", "ts": ts, "account": account, "market": market, "order_id": no}
            )
    return cmds


# ---------------------------------------------------------------------- loads


@dataclass(frozen=True)
class Ack:
    t: float  # perf_counter when the answer arrived
    url: str | None  # the node that sent it (None: not known)


class _Acks:
    """The acknowledgements of a load, in the order they came (one thread appends), so a
    caller can ask for the first one after a moment (a kill) and from which node it came."""

    def __init__(self) -> None:
        self.acks: list[Ack] = []
        self._ack_times: list[float] = []
        self._lock = threading.Lock()

    def _ack(self, t: float, url: str | None) -> None:
        """Record one (the caller holds the lock)."""
        self.acks.append(Ack(t, url))
        self._ack_times.append(t)

    def failure(self) -> BaseException | None:
        """What stopped the load, if anything did."""
        return None

    def acks_since(self, t: float) -> int:
        with self._lock:
            return len(self._ack_times) - bisect.bisect_right(self._ack_times, t)

    def first_ack_after(self, t: float, not_from: str | None = None) -> Ack | None:
        """The first acknowledgement after `t` from a known node other than `not_from` (an
        answer the dead leader wrote before it died may arrive after its death)."""
        with self._lock:
            start = bisect.bisect_right(self._ack_times, t)
            later = itertools.islice(self.acks, start, None)
            return next((a for a in later if a.url and a.url != not_from), None)

    def wait_first_ack(
        self, after: float, not_from: str | None = None, timeout_s: float = 30.0
    ) -> Ack:
        """`first_ack_after`, polled every 2 ms until `timeout_s` after `after` (perf_counter):
        `TimeoutError`, or `RuntimeError` if the load failed meanwhile."""

        def found() -> Ack | None:
            if (error := self.failure()) is not None:
                raise RuntimeError(f"the load failed: {error!r}")
            return self.first_ack_after(after, not_from)

        remaining = max(0.0, after + timeout_s - time.perf_counter())
        return wait_for(found, remaining, "an acknowledgement", interval_s=0.002)


def deposit(i: int) -> dict:
    """Deposit `i`: its own account `k{i}`, `i + 1` USD, the unique ref `r{i}`."""
    return {"op": "deposit", "account": f"k{i}", "asset": "USD", "amount": i + 1, "ref": f"r{i}"}


class DepositLoad(_Acks):
    """One thread of continuous `deposit` requests (`per_request` deposits each) through the
    `AdminClient` (its one retry policy: a lost answer is resent, and a deposit the first
    attempt applied answers `duplicate_ref`). Records what was acknowledged and what may have
    been applied: `check_deposits` then says what each node lost or holds unasked."""

    def __init__(
        self,
        urls: list[str],
        creds: Credentials,
        per_request: int = 5,
        *,
        verify: object = True,
        timeout_s: float = 10.0,
        deadline_s: float = 10.0,
        **client_args: float,
    ) -> None:
        super().__init__()
        self.client = AdminClient(
            urls, creds, verify=verify, timeout_s=timeout_s, deadline_s=deadline_s, **client_args
        )
        self.per_request = per_request
        self.acked: dict[int, int] = {}  # i -> amount
        self.unknown: set[int] = set()  # may or may not have been applied
        self.resent = 0  # acknowledged as duplicate_ref: the resend itself took a cmd_index
        self.errors: list[str] = []  # calls that failed as a whole
        self.counter = itertools.count()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="deposit-load", daemon=True)

    @classmethod
    def on(cls, cluster: LocalCluster, per_request: int = 5, **client_args: float) -> DepositLoad:
        return cls(
            cluster.api_urls(),
            cluster.admin_credentials(),
            per_request,
            verify=cluster.verify,
            **client_args,
        )

    def _run(self) -> None:
        while not self.stop.is_set():
            batch = [next(self.counter) for _ in range(self.per_request)]
            try:
                reply = self.client.submit_reply([deposit(i) for i in batch])
            except (ApiError, ClusterUnavailable) as exc:
                # Definite ones too: counting them unknown only allows more.
                with self._lock:
                    self.unknown.update(batch)
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t = time.perf_counter()
            url = self.client.leader
            any_ack = False
            with self._lock:
                for i, result in zip(batch, reply["results"], strict=True):
                    events = result.get("events")
                    if events and events[0]["type"] == "balance":
                        self.acked[i] = i + 1
                        any_ack = True
                    elif events and events[0].get("reason") == "duplicate_ref":
                        # The client resent a request whose first copy was applied before the
                        # leader died: the ref says it is in the log, exactly once.
                        self.acked[i] = i + 1
                        self.resent += 1
                        any_ack = True
                    elif result.get("error", {}).get("code") != "not_leader":
                        # outcome_unknown (or anything unforeseen): maybe in the log.
                        # not_leader is definite: not applied.
                        self.unknown.add(i)
                if any_ack:
                    self._ack(t, url)

    def __enter__(self) -> DepositLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()

    def wait_acked(self, n: int, timeout_s: float = 30) -> None:
        """Until `n` deposits are acknowledged in all."""
        try:
            wait_for(lambda: len(self.acked) >= n, timeout_s, f"{n} acked", interval_s=0.02)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: only {len(self.acked)} acked") from None


def check_deposits(cluster: LocalCluster, acked: dict[int, int], unknown: set[int]) -> dict:
    """What every running node holds of the `deposit`s: `missing`, acknowledged but not held
    exactly as acknowledged; `extra`, held but neither acknowledged nor of unknown outcome
    (never sent, or refused definitely). `lost`: deposits missing on some node."""
    out: dict = {"nodes": {}, "lost": 0, "extra": 0}
    lost_any: set[int] = set()
    urls, creds = cluster.api_urls(), cluster.admin_credentials()
    with AdminClient(urls, creds, timeout_s=30, verify=cluster.verify) as client:
        for node_id, proc in cluster.nodes.items():
            if not proc.alive():
                continue
            rows = client.balances(proc.config.api_url)["balances"]
            have = {
                int(r["account"][1:]): r["available"]
                for r in rows
                if r["account"].startswith("k") and r["account"][1:].isdigit()
            }
            missing = [i for i, amount in acked.items() if have.get(i) != amount]
            extra = [i for i in have if i not in acked and i not in unknown]
            lost_any.update(missing)
            out["nodes"][node_id] = {
                "deposits": len(have),
                "missing": missing[:20],
                "extra": extra[:20],
                "extra_count": len(extra),
            }
            out["extra"] = max(out["extra"], len(extra))
    out["lost"] = len(lost_any)
    return out


# Exchange rejections: a definite answer of the state machine to a well-formed request.
EXCHANGE_STATUSES = (404, 409, 422)


@dataclass(slots=True)
class Outcome:
    """One operation of an `OrderLoad` and what came back."""

    index: int
    op: str  # "place" or "cancel"
    account: str
    coid: str  # place: its client_order_id; cancel: the client_order_id of the order cancelled
    sent_t: float  # perf_counter when the call started (all its retries included)
    done_t: float  # ... and when it ended
    # acked: applied (a place: accepted, with its order id; a 409 duplicate_client_order_id
    # proves the first copy applied); rejected: applied and refused by the exchange's rules
    # (404/409/422); refused: definitely not applied (no leader before the deadline, another
    # 4xx); unknown: maybe applied (the SDK's OutcomeUnknown, or cut by the load's stop)
    result: str
    order_id: int | None = None
    url: str | None = None  # the node that acknowledged it
    code: str | None = None  # the error code of a rejection or refusal
    recovered: bool = False  # a resend found the first copy applied (duplicate_client_order_id)
    trades: int = 0
    seq: int | None = None  # a place: the seq of its last event (None when settled by look-up)
    behind_s: float = 0.0  # how late it started against its planned offset


class OrderLoad(_Acks):
    """`ops` sent through `AsyncClient` (one per key; an operation's `account` indexes `keys`)
    at their offsets, from `workers` trio tasks; every outcome kept, in the order the answers
    came. Each place carries its own client_order_id, `{prefix}-{run_id}-{index}`: a rerun
    against the same cluster is not answered `duplicate_client_order_id`.

    Two ways to run it: `run()` in the caller's trio (until every operation is answered, or a
    hard stop), or `start()`/`stop()` (or `with`), in a thread of its own until stopped.
    `deadline_s` bounds one call with its retries (None: the SDK's default); the other
    `client_args` are `AsyncClient`'s too.
    """

    def __init__(
        self,
        urls: list[str],
        keys: list[Credentials],
        ops: Iterable[Operation],
        *,
        deadline_s: float | None = None,
        prefix: str = "load",
        workers: int = 8,
        verify: object = True,
        **client_args: float,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.keys = keys
        self.ops = ops
        self.workers = workers
        self.prefix = prefix
        self.run_id = secrets.token_hex(4)
        self.deadline_s = deadline_s
        self._client_args = {"verify": verify, **client_args}
        if deadline_s is not None:
            self._client_args["deadline_s"] = deadline_s
        self.outcomes: list[Outcome] = []
        self.started = 0  # operations begun (answered or in flight)
        self.stats: Counter = Counter()  # the clients' SDK counters, summed once it ended
        self.error: BaseException | None = None
        self._start = 0.0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._schedule_scope = trio.CancelScope()
        self._all_scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._thread_main, name="order-load", daemon=True)

    def coid(self, index: int) -> str:
        return f"{self.prefix}-{self.run_id}-{index}"

    # ------------------------------------------------------------------ in a thread of its own

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the order load did not start")
        if self.error is not None:
            raise RuntimeError(f"the order load failed: {self.error!r}")

    def _call(self, fn: Callable[[], object]) -> None:
        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(fn, trio_token=self._token)

    def stop(self, *, cut: bool = False) -> None:
        """Send nothing more; wait for the calls in flight to end (each within the SDK's
        deadline), then cut what is left (counted unknown). `cut`: at once (interrupted)."""
        if not self._thread.is_alive():
            return
        self._call(self._schedule_scope.cancel)
        if not cut:  # (without a deadline of its own: as long as the SDK's takes)
            self._thread.join(None if self.deadline_s is None else self.deadline_s + 10)
        if self._thread.is_alive() and self._all_scope is not None:
            self._call(self._all_scope.cancel)
            self._thread.join(10)

    def __enter__(self) -> OrderLoad:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(cut=exc_type is not None)

    def _thread_main(self) -> None:
        try:
            trio.run(self.run)
        except BaseException as exc:  # reported to the caller (start(), failure()), never lost
            self.error = exc
        finally:
            self._ready.set()

    # ------------------------------------------------------------------ questions (any thread)

    def failure(self) -> BaseException | None:
        return self.error

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def counts(self) -> Counter:
        with self._lock:
            return Counter(o.result for o in self.outcomes)

    # ------------------------------------------------------------------ the trio side

    async def run(
        self,
        *,
        hard_stop_s: float = math.inf,
        progress: Callable[[OrderLoad], object] | None = None,
    ) -> None:
        """Send every operation at its offset; return once each is answered, or `hard_stop_s`
        after the start (what is in flight then is cut). `progress(self)` every second."""
        clients = [AsyncClient(self.urls, key, **self._client_args) for key in self.keys]
        try:
            with trio.move_on_after(hard_stop_s):
                async with trio.open_nursery() as nursery:
                    self._all_scope = nursery.cancel_scope
                    if progress is not None:
                        nursery.start_soon(self._report, progress)
                    async with trio.open_nursery() as senders:
                        send, receive = trio.open_memory_channel[Operation](0)
                        self._start = trio.current_time()
                        senders.start_soon(self._schedule, send)
                        async with receive:
                            for _ in range(self.workers):
                                senders.start_soon(self._work, clients, receive.clone())
                        self._token = trio.lowlevel.current_trio_token()
                        self._ready.set()
                    nursery.cancel_scope.cancel()  # every operation answered: stop reporting
        finally:
            with trio.CancelScope(shield=True):
                for client in clients:
                    self.stats.update(client.stats)
                    await client.aclose()

    async def _report(self, progress: Callable[[OrderLoad], object]) -> None:
        while True:
            await trio.sleep(1)
            progress(self)

    async def _schedule(self, send: trio.MemorySendChannel[Operation]) -> None:
        async with send:
            with self._schedule_scope:
                for op in self.ops:
                    await trio.sleep_until(self._start + op.at_s)
                    await send.send(op)  # waits while every worker is busy: the flow falls behind

    async def _work(
        self, clients: list[AsyncClient], ops: trio.MemoryReceiveChannel[Operation]
    ) -> None:
        async with ops:
            async for op in ops:
                await self._execute(clients[op.account], op)

    async def _execute(self, client: AsyncClient, op: Operation) -> None:
        place = op.op == "place"
        coid = self.coid(op.index if place else op.target)  # type: ignore[arg-type]
        account = self.keys[op.account].account
        behind_s = trio.current_time() - self._start - op.at_s
        out = Outcome(op.index, op.op, account, coid, time.perf_counter(), 0.0, "unknown")
        out.behind_s = behind_s
        self.started += 1
        try:
            if place:
                reply = await client.place(**op.fields, client_order_id=coid)
                out.url = client.leader  # no checkpoint since the flow set it: this answer's node
                out.order_id = reply.get("order_id")
                out.seq = reply.get("seq")
                out.recovered = bool(reply.get("recovered"))
                out.trades = len(reply.get("trades", ()))
            else:
                await client.cancel(op.fields["market"], client_order_id=coid)
                out.url = client.leader
            out.result = "acked"
        except ApiError as exc:
            out.code = exc.code
            if place and exc.code == "duplicate_client_order_id":
                # This id was applied before (a first copy): acknowledged, exactly once.
                out.result, out.order_id, out.recovered = "acked", exc.order_id, True
            elif not place and exc.after_retry:
                out.result = "unknown"  # a cancel resent after an unknown attempt (sdk.md)
            elif exc.status in EXCHANGE_STATUSES:
                out.result = "rejected"
            else:
                out.result = "refused"
        except OutcomeUnknown:
            out.result = "unknown"
        except ClusterUnavailable:
            out.result, out.code = "refused", "cluster_unavailable"
        except trio.Cancelled:
            out.result, out.code = "unknown", "cut"
            raise
        finally:
            out.done_t = time.perf_counter()
            with self._lock:
                self.outcomes.append(out)
                if out.result == "acked":
                    self._ack(out.done_t, out.url)
