"""State machine benchmark: matching throughput against lightmatchingengine, and snapshots.

    .venv/bin/python bench/statemachine.py [--orders N] [--seed S] [--json]

1. Throughput. One seeded flow (bench/flow.py: one market, 1000 funded accounts, passive GTC
   limits near a moving mid, ~30% cancels of live orders, aggressive limits that trade) runs
   through `statemachine.Exchange.apply` (validation, risk, events, as is) and through
   `lightmatchingengine.LightMatchingEngine` (the same limit orders, the same cancels). A
   warm-up stretch of the flow builds the book untimed in both engines first. The timed loops
   do nothing but call the engine; a separate, untimed pass of each engine checks that both
   did the same work (same maker fills and traded quantity as the generator's own matcher, no
   rejection, no self-trade prevention, every cancel hits a live order, same resting orders at
   the end). Target: ours >= 3.0x lightmatchingengine's ops/s.
2. Snapshots. An exchange with 1,000,000 resting orders (non-crossing places over many levels
   and accounts, no client_order_id): snapshot bytes per resting order (target <= 100 B),
   `snapshot()` time, `Exchange.restore()` time (target <= 5 s; restore includes a full
   `check_invariants()`, timed alone too), and the same figures for 100k orders that carry a
   client_order_id.

gc runs as is in every timed section; snapshot and restore are also timed with gc disabled,
for information (the targets are judged on the gc-as-is figures).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

# Run as a script, sys.path[0] is bench/, where this file would shadow the `statemachine`
# package; put the repository root there instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lightmatchingengine.lightmatchingengine import LightMatchingEngine  # noqa: E402

from bench import flow as fl  # noqa: E402
from statemachine import Exchange  # noqa: E402

RATIO_TARGET = 3.0
BYTES_PER_ORDER_TARGET = 100
RESTORE_TARGET_S = 5.0
LME_BUY, LME_SELL = 1, 2


# ---------------------------------------------------------------- throughput


def _ours_prepare(flow: fl.Flow) -> tuple[Exchange, list[dict]]:
    """A funded exchange that has run the warm-up, and the timed commands."""
    ex = Exchange()
    setup = fl.setup_commands(flow.accounts)
    warm = fl.exchange_commands(flow.warmup, ts_start=10)
    cmds = fl.exchange_commands(flow.ops, ts_start=warm[-1]["ts"] if warm else 10)
    for cmd in setup + warm:
        events = ex.apply(cmd)
        if events[0]["type"] == "rejected":
            raise SystemExit(f"setup/warm-up command rejected: {events[0]}")
    return ex, cmds


def _lme_calls(ops: list[tuple]) -> list[tuple]:
    """(1, price, qty, side) for add_order, (0, order_id, 0, 0) for cancel_order."""
    out = []
    for op in ops:
        if op[0] == "place":
            _, _, side, price, qty = op
            out.append((1, price, qty, LME_BUY if side == "buy" else LME_SELL))
        else:
            out.append((0, op[2], 0, 0))
    return out


def _lme_prepare(flow: fl.Flow) -> tuple[LightMatchingEngine, list[tuple]]:
    lme = LightMatchingEngine()
    for kind, a, b, c in _lme_calls(flow.warmup):
        if kind:
            lme.add_order(fl.MARKET, a, b, c)
        else:
            lme.cancel_order(a, fl.MARKET)
    return lme, _lme_calls(flow.ops)


def time_ours(flow: fl.Flow) -> float:
    ex, cmds = _ours_prepare(flow)
    apply = ex.apply
    t0 = time.perf_counter()
    for cmd in cmds:
        apply(cmd)
    return time.perf_counter() - t0


def time_lme(flow: fl.Flow) -> float:
    lme, calls = _lme_prepare(flow)
    add = lme.add_order
    cancel = lme.cancel_order
    instmt = fl.MARKET
    t0 = time.perf_counter()
    for kind, a, b, c in calls:
        if kind:
            add(instmt, a, b, c)
        else:
            cancel(a, instmt)
    return time.perf_counter() - t0


def check_ours(flow: fl.Flow) -> dict:
    """Untimed pass: tally what our exchange did on the measured ops."""
    ex, cmds = _ours_prepare(flow)
    tally = {"trades": 0, "traded_qty": 0, "rejected": 0, "stp": 0, "cancels_ok": 0}
    for cmd in cmds:
        for e in ex.apply(cmd):
            t = e["type"]
            if t == "trade":
                tally["trades"] += 1
                tally["traded_qty"] += e["qty"]
            elif t == "rejected":
                tally["rejected"] += 1
            elif t == "cancelled":
                if e["reason"] == "stp":
                    tally["stp"] += 1
                elif e["reason"] == "user":
                    tally["cancels_ok"] += 1
    ex.check_invariants()
    resting = {o["order_id"]: o["remaining"] for o in ex.open_orders()}
    return {**tally, "resting": resting}


def check_lme(flow: fl.Flow) -> dict:
    """Untimed pass: tally lightmatchingengine's work, tracking its live orders from its trades.

    It reports one record for the taker per price level swept plus one per maker fill; it
    keeps filled orders in its id map, so liveness is tracked here from the trades it returns.
    """
    lme, calls = _lme_prepare(flow)
    book = lme.order_books[fl.MARKET]
    # Orders live after the warm-up: those still in a depth level.
    live: dict[int, object] = {}
    for levels in (book.bids, book.asks):
        for queue in levels.values():
            for o in queue:
                live[o.order_id] = o
    tally = {"trades": 0, "traded_qty": 0, "taker_records": 0, "cancels_ok": 0, "dead_cancels": 0}
    for kind, a, b, c in calls:
        if kind:
            order, trades = lme.add_order(fl.MARKET, a, b, c)
            for tr in trades:
                if tr.order_id == order.order_id:
                    tally["taker_records"] += 1
                    continue
                tally["trades"] += 1
                tally["traded_qty"] += tr.trade_qty
                maker = live[tr.order_id]
                if maker.leaves_qty == 0:
                    del live[tr.order_id]
            if order.leaves_qty:
                live[order.order_id] = order
        else:
            if a not in live:
                tally["dead_cancels"] += 1
                continue
            if lme.cancel_order(a, fl.MARKET) is None:
                raise SystemExit(f"lightmatchingengine refused to cancel live order {a}")
            del live[a]
            tally["cancels_ok"] += 1
    resting = {oid: o.leaves_qty for oid, o in live.items()}
    return {**tally, "resting": resting}


def throughput(flow: fl.Flow, repeat: int = 3) -> dict:
    n = len(flow.ops)
    ours = check_ours(flow)
    lme = check_lme(flow)
    st = flow.stats
    problems = []
    if ours["rejected"] or ours["stp"]:
        problems.append(f"ours: {ours['rejected']} rejections, {ours['stp']} STP cancels")
    if lme["dead_cancels"]:
        problems.append(f"lightmatchingengine: {lme['dead_cancels']} cancels of dead orders")
    for name, got in (("ours", ours), ("lightmatchingengine", lme)):
        if (got["trades"], got["traded_qty"]) != (st.maker_fills, st.traded_qty):
            problems.append(
                f"{name}: {got['trades']} trades / {got['traded_qty']} lots, flow expects "
                f"{st.maker_fills} / {st.traded_qty}"
            )
        if got["cancels_ok"] != st.cancels:
            problems.append(f"{name}: {got['cancels_ok']} cancels done, flow has {st.cancels}")
        if got["resting"] != flow.resting_end:
            problems.append(f"{name}: resting orders at the end differ from the flow's")
    if problems:
        raise SystemExit("engines did not do equivalent work:\n  " + "\n  ".join(problems))

    # Alternate the engines; keep each one's best round (the machine may be shared).
    ours_runs, lme_runs = [], []
    for _ in range(repeat):
        ours_runs.append(time_ours(flow))
        lme_runs.append(time_lme(flow))
    ours_s = min(ours_runs)
    lme_s = min(lme_runs)
    ours_ops = n / ours_s
    lme_ops = n / lme_s
    ratio_median = statistics.median(lme_runs) / statistics.median(ours_runs)
    return {
        "commands": n,
        "warmup_commands": len(flow.warmup),
        "places": st.places,
        "cancels": st.cancels,
        "crossing_places": st.crossing,
        "book_at_start": flow.book_at_start,
        "book_at_end": flow.book_at_end,
        "ours_trades": ours["trades"],
        "ours_traded_qty": ours["traded_qty"],
        "lme_trades": lme["trades"],
        "lme_traded_qty": lme["traded_qty"],
        "lme_taker_records": lme["taker_records"],
        "repeat": repeat,
        "ours_seconds": ours_s,
        "lme_seconds": lme_s,
        "ours_seconds_all": ours_runs,
        "lme_seconds_all": lme_runs,
        "ours_ops_per_s": ours_ops,
        "lme_ops_per_s": lme_ops,
        "ours_us_per_op": 1e6 / ours_ops,
        "lme_us_per_op": 1e6 / lme_ops,
        "ratio": ours_ops / lme_ops,
        "ratio_of_medians": ratio_median,
        "ratio_target": RATIO_TARGET,
        "ratio_pass": ours_ops / lme_ops >= RATIO_TARGET,
    }


# ---------------------------------------------------------------- snapshots


def build_resting(n: int, *, client_order_ids: bool, accounts: int = 1000, levels: int = 5000):
    """An exchange with `n` resting orders: buys below the mid, sells above, none crossing."""
    ex = Exchange()
    names = fl.account_names(accounts)
    ts = 1
    for cmd in fl.setup_commands(names):
        ex.apply(cmd)
    apply = ex.apply
    mid = fl.START_MID
    t0 = time.perf_counter()
    for i in range(n):
        ts += 1
        step = (i * 7919) % levels  # spread over `levels` prices per side
        buy = i % 2 == 0
        cmd = {
            "op": "place",
            "ts": ts,
            "account": names[(i * 31) % accounts],
            "market": fl.MARKET,
            "side": "buy" if buy else "sell",
            "type": "limit",
            "price": mid - 1 - step if buy else mid + 1 + step,
            "qty": 1 + (i * 13) % 100,
        }
        if client_order_ids:
            cmd["client_order_id"] = f"cli-{i:09d}"
        events = apply(cmd)
        if events[0]["type"] != "accepted" or events[1]["type"] != "book":  # rested, no trade
            raise SystemExit(f"resting-book build: unexpected events {events}")
    build_s = time.perf_counter() - t0
    return ex, build_s


def snapshot_figures(n: int, *, client_order_ids: bool) -> dict:
    ex, build_s = build_resting(n, client_order_ids=client_order_ids)
    resting = len(ex._orders)
    assert resting == n, (resting, n)

    t0 = time.perf_counter()
    blob = ex.snapshot()
    snap_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    restored = Exchange.restore(blob)
    restore_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    restored.check_invariants()
    inv_s = time.perf_counter() - t0

    if restored.snapshot() != blob:
        raise SystemExit("restore(snapshot()) does not snapshot to the same bytes")
    del restored
    gc.collect()

    gc.disable()
    try:
        t0 = time.perf_counter()
        ex.snapshot()
        snap_nogc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = Exchange.restore(blob)
        restore_nogc_s = time.perf_counter() - t0
    finally:
        gc.enable()
    del again, ex
    gc.collect()

    per_order = len(blob) / n
    return {
        "resting_orders": n,
        "client_order_ids": client_order_ids,
        "build_seconds": build_s,
        "build_places_per_s": n / build_s,
        "snapshot_bytes": len(blob),
        "bytes_per_order": per_order,
        "bytes_per_order_target": BYTES_PER_ORDER_TARGET,
        "bytes_per_order_pass": per_order <= BYTES_PER_ORDER_TARGET,
        "snapshot_seconds": snap_s,
        "snapshot_seconds_gc_disabled": snap_nogc_s,
        "restore_seconds": restore_s,
        "restore_check_invariants_seconds": inv_s,
        "restore_decode_build_seconds": restore_s - inv_s,
        "restore_seconds_gc_disabled": restore_nogc_s,
        "restore_target_seconds": RESTORE_TARGET_S,
        "restore_pass": restore_s <= RESTORE_TARGET_S,
    }


# ---------------------------------------------------------------- report


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_report(res: dict) -> None:
    tp = res["throughput"]
    print(f"quorumbook state machine benchmark  (seed {res['seed']}, Python {res['python']})")
    print()
    print(
        f"flow: {tp['commands']:,} timed commands after {tp['warmup_commands']:,} warm-up "
        f"commands, {res['accounts']} accounts, 1 market"
    )
    print(
        f"      {tp['places']:,} limit places ({tp['crossing_places']:,} trade on arrival), "
        f"{tp['cancels']:,} cancels of live orders"
    )
    for label, key in (("start", "book_at_start"), ("end", "book_at_end")):
        b = tp[key]
        print(
            f"      book at {label:<5}: {b['resting_orders']:,} resting orders, "
            f"{b['bid_levels']} bid / {b['ask_levels']} ask levels, "
            f"spread {b['best_bid']}..{b['best_ask']}"
        )
    print(
        f"work: ours {tp['ours_trades']:,} trades / {tp['ours_traded_qty']:,} lots; "
        f"lightmatchingengine {tp['lme_trades']:,} maker fills / {tp['lme_traded_qty']:,} lots "
        f"(+{tp['lme_taker_records']:,} taker records)  -> equal, no rejection, no STP"
    )
    print()
    print(
        f"ours (Exchange.apply)  : {tp['ours_ops_per_s']:>10,.0f} ops/s  "
        f"({tp['ours_us_per_op']:.2f} us/op, {tp['ours_seconds']:.2f} s)"
    )
    print(
        f"lightmatchingengine    : {tp['lme_ops_per_s']:>10,.0f} ops/s  "
        f"({tp['lme_us_per_op']:.2f} us/op, {tp['lme_seconds']:.2f} s)"
    )
    print(
        f"ratio ours/lme         : {tp['ratio']:>10.2f}x   target >= {RATIO_TARGET:.1f}x   "
        f"{_verdict(tp['ratio_pass'])}"
    )
    print(
        f"  (best of {tp['repeat']} alternating rounds each; ratio of the medians "
        f"{tp['ratio_of_medians']:.2f}x)"
    )
    for snap in res["snapshots"]:
        print()
        coid = "with" if snap["client_order_ids"] else "no"
        print(
            f"snapshot, {snap['resting_orders']:,} resting orders, {coid} client_order_id "
            f"(built in {snap['build_seconds']:.1f} s, "
            f"{snap['build_places_per_s']:,.0f} places/s)"
        )
        print(
            f"  size     : {snap['snapshot_bytes']:>12,} B = {snap['bytes_per_order']:.1f} B/order"
            f"   target <= {BYTES_PER_ORDER_TARGET}   {_verdict(snap['bytes_per_order_pass'])}"
        )
        print(
            f"  snapshot : {snap['snapshot_seconds']:.2f} s"
            f"   (with gc disabled {snap['snapshot_seconds_gc_disabled']:.2f} s)"
        )
        print(
            f"  restore  : {snap['restore_seconds']:.2f} s   target <= {RESTORE_TARGET_S:.0f} s   "
            f"{_verdict(snap['restore_pass'])}"
        )
        print(
            f"             check_invariants alone {snap['restore_check_invariants_seconds']:.2f} s,"
            f" decode + build ~{snap['restore_decode_build_seconds']:.2f} s;"
            f" restore with gc disabled {snap['restore_seconds_gc_disabled']:.2f} s"
        )
    print()
    print(f"overall: {_verdict(res['all_pass'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, default=200_000, help="timed commands (default 200000)")
    ap.add_argument("--warmup", type=int, default=30_000, help="untimed warm-up commands")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per engine (best kept)")
    ap.add_argument(
        "--book-target",
        type=int,
        default=fl.BOOK_TARGET,
        help=f"resting orders the flow hovers around (default {fl.BOOK_TARGET})",
    )
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--snapshot-orders", type=int, default=1_000_000)
    ap.add_argument("--coid-orders", type=int, default=100_000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    flow = fl.generate(
        args.orders,
        seed=args.seed,
        warmup=args.warmup,
        accounts=args.accounts,
        book_target=args.book_target,
    )
    tp = throughput(flow, repeat=max(1, args.repeat))
    del flow
    gc.collect()
    snaps = [snapshot_figures(args.snapshot_orders, client_order_ids=False)]
    if args.coid_orders:
        snaps.append(snapshot_figures(args.coid_orders, client_order_ids=True))
    res = {
        "seed": args.seed,
        "python": sys.version.split()[0],
        "accounts": args.accounts,
        "throughput": tp,
        "snapshots": snaps,
        "all_pass": tp["ratio_pass"]
        and all(s["bytes_per_order_pass"] and s["restore_pass"] for s in snaps),
        "wall_seconds": time.perf_counter() - t_start,
    }
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print_report(res)
        print(f"(wall time {res['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
