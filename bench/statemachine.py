"""State machine benchmark: matching throughput against lightmatchingengine, and snapshots.

    .venv/bin/python -m bench.statemachine [--orders N] [--seed S] [--json]

1. Throughput, on three flows. One seeded flow per shape (`cluster.workload.book_flow`:
   one market, many funded accounts, passive GTC limits around a moving mid, ~30% cancels of
   live orders, aggressive limits that trade) runs through `statemachine.Exchange.apply` (validation,
   risk, events, as is) and through `lightmatchingengine.LightMatchingEngine` (the same limit
   orders, the same cancels). A warm-up stretch of the flow builds the book untimed in both
   engines first; the report prints the book's shape before and after the timed commands.

   - deep (judged, target: ours >= 3.0x lightmatchingengine's ops/s): a book like a real
     exchange's, ~40,000 resting orders from 5,000 accounts over ~1,200 price levels per side,
     dense near the mid. lightmatchingengine's cost grows with depth (a `min()` over every
     price level of the other side per incoming order, a list scan per cancel); ours barely.
   - shallow (judged, the same target): ~5,000 resting orders in ~100-200 levels per side,
     where that depth cost hardly shows and the per-command price of validation, risk checks
     and events decides.
   - cancels (judged, the same target): a shallow book under heavy cancelling, about 40% of
     the commands (market makers re-quoting; 30% in the other two).

   The timed loops do nothing but call the engine; a separate, untimed pass of each engine
   checks that both did the same work (same maker fills and traded quantity as the
   generator's own matcher, no rejection, no self-trade prevention, every cancel hits a live
   order, same resting orders at the end).
2. Snapshots. An exchange with 1,000,000 resting orders (non-crossing places over many levels
   and accounts, no client_order_id): snapshot bytes per resting order (target <= 100 B),
   `snapshot()` time, `Exchange.restore()` time (target <= 5 s; the restore checks every
   invariant as it builds the state; a separate `check_invariants()` walk of the restored
   state is timed for comparison, not part of it), and the same figures for 100k orders that
   carry a client_order_id.

`make bench-statemachine` measures the mypyc build of the engine (build/native, the one a
production node runs; docs/adr/0003-compiled-state-machine.md); `python -m bench.statemachine`
from the checkout measures the pure-Python sources. The report says which it imported.

gc runs as is in every timed section (the snapshot codec pauses it itself while it runs);
snapshot and restore are also timed with gc disabled by the caller, for information (the
targets are judged on the gc-as-is figures).
"""

from __future__ import annotations

if __package__ in (None, ""):
    # Run as a file, this module would shadow the `statemachine` package it measures.
    raise SystemExit("run it as a module from the repository root: python -m bench.statemachine")

import argparse
import gc
import json
import statistics
import sys
import time

from lightmatchingengine.lightmatchingengine import LightMatchingEngine

from cluster import workload as wl
from statemachine import Exchange

RATIO_TARGET = 3.0
BYTES_PER_ORDER_TARGET = 100
RESTORE_TARGET_S = 5.0
LME_BUY, LME_SELL = 1, 2
BOOK = wl.BOOK_MARKET["market"]


# ---------------------------------------------------------------- throughput


def _ours_prepare(flow: wl.BookFlow) -> tuple[Exchange, list[dict]]:
    """A funded exchange that has run the warm-up, and the timed commands."""
    ex = Exchange()
    setup = wl.book_setup(flow.accounts)
    warm = wl.book_commands(flow.warmup, ts_start=10)
    cmds = wl.book_commands(flow.ops, ts_start=warm[-1]["ts"] if warm else 10)
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


def _lme_prepare(flow: wl.BookFlow) -> tuple[LightMatchingEngine, list[tuple]]:
    lme = LightMatchingEngine()
    for kind, a, b, c in _lme_calls(flow.warmup):
        if kind:
            lme.add_order(BOOK, a, b, c)
        else:
            lme.cancel_order(a, BOOK)
    return lme, _lme_calls(flow.ops)


def time_ours(flow: wl.BookFlow) -> float:
    ex, cmds = _ours_prepare(flow)
    apply = ex.apply
    t0 = time.perf_counter()
    for cmd in cmds:
        apply(cmd)
    return time.perf_counter() - t0


def time_lme(flow: wl.BookFlow) -> float:
    lme, calls = _lme_prepare(flow)
    add = lme.add_order
    cancel = lme.cancel_order
    instmt = BOOK
    t0 = time.perf_counter()
    for kind, a, b, c in calls:
        if kind:
            add(instmt, a, b, c)
        else:
            cancel(a, instmt)
    return time.perf_counter() - t0


def check_ours(flow: wl.BookFlow) -> dict:
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


def check_lme(flow: wl.BookFlow) -> dict:
    """Untimed pass: tally lightmatchingengine's work, tracking its live orders from its trades.

    It reports one record for the taker per price level swept plus one per maker fill; it
    keeps filled orders in its id map, so liveness is tracked here from the trades it returns.
    """
    lme, calls = _lme_prepare(flow)
    book = lme.order_books[BOOK]
    # Orders live after the warm-up: those still in a depth level.
    live: dict[int, object] = {}
    for levels in (book.bids, book.asks):
        for queue in levels.values():
            for o in queue:
                live[o.order_id] = o
    tally = {"trades": 0, "traded_qty": 0, "taker_records": 0, "cancels_ok": 0, "dead_cancels": 0}
    for kind, a, b, c in calls:
        if kind:
            order, trades = lme.add_order(BOOK, a, b, c)
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
            if lme.cancel_order(a, BOOK) is None:
                raise SystemExit(f"lightmatchingengine refused to cancel live order {a}")
            del live[a]
            tally["cancels_ok"] += 1
    resting = {oid: o.leaves_qty for oid, o in live.items()}
    return {**tally, "resting": resting}


def throughput(flow: wl.BookFlow, profile: wl.Profile, *, judged: bool, repeat: int = 3) -> dict:
    """Time both engines on `flow` (best of `repeat` alternating rounds each)."""
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
    ratio = ours_ops / lme_ops
    return {
        "profile": profile.name,
        "judged": judged,
        "accounts": len(flow.accounts),
        "book_target": profile.book_target,
        "mean_offset_ticks": profile.mean_offset,
        "near_share": profile.near_share,
        "near_offset_ticks": profile.near_offset,
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
        "ratio": ratio,
        "ratio_of_medians": ratio_median,
        "ratio_target": RATIO_TARGET if judged else None,
        "ratio_pass": ratio >= RATIO_TARGET if judged else None,
    }


# ---------------------------------------------------------------- snapshots


def build_resting(n: int, *, client_order_ids: bool, accounts: int = 1000, levels: int = 5000):
    """An exchange with `n` resting orders: buys below the mid, sells above, none crossing."""
    ex = Exchange()
    names = wl.book_accounts(accounts)
    ts = 1
    for cmd in wl.book_setup(names):
        ex.apply(cmd)
    apply = ex.apply
    mid = wl.START_MID
    t0 = time.perf_counter()
    for i in range(n):
        ts += 1
        step = (i * 7919) % levels  # spread over `levels` prices per side
        buy = i % 2 == 0
        cmd = {
            "op": "place",
            "ts": ts,
            "account": names[(i * 31) % accounts],
            "market": BOOK,
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


def snapshot_figures(n: int, *, client_order_ids: bool, repeat: int = 3) -> dict:
    """Snapshot and restore `repeat` times each (best kept, every round reported)."""
    ex, build_s = build_resting(n, client_order_ids=client_order_ids)
    resting = len(ex.state.orders)
    assert resting == n, (resting, n)

    snap_runs, restore_runs, inv_runs, snap_nogc_runs, restore_nogc_runs = [], [], [], [], []
    blob = b""
    for round_no in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        blob = ex.snapshot()
        snap_runs.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        restored = Exchange.restore(blob)
        restore_runs.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        restored.check_invariants()
        inv_runs.append(time.perf_counter() - t0)

        if round_no == 0 and restored.snapshot() != blob:
            raise SystemExit("restore(snapshot()) does not snapshot to the same bytes")
        del restored
        gc.collect()

        gc.disable()
        try:
            t0 = time.perf_counter()
            ex.snapshot()
            snap_nogc_runs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = Exchange.restore(blob)
            restore_nogc_runs.append(time.perf_counter() - t0)
        finally:
            gc.enable()
        del again
    del ex
    gc.collect()

    per_order = len(blob) / n
    restore_s = min(restore_runs)
    inv_s = min(inv_runs)
    return {
        "resting_orders": n,
        "client_order_ids": client_order_ids,
        "build_seconds": build_s,
        "build_places_per_s": n / build_s,
        "snapshot_bytes": len(blob),
        "bytes_per_order": per_order,
        "bytes_per_order_target": BYTES_PER_ORDER_TARGET,
        "bytes_per_order_pass": per_order <= BYTES_PER_ORDER_TARGET,
        "repeat": repeat,
        "snapshot_seconds": min(snap_runs),
        "snapshot_seconds_all": snap_runs,
        "snapshot_seconds_gc_disabled": min(snap_nogc_runs),
        "restore_seconds": restore_s,
        "restore_seconds_all": restore_runs,
        "check_invariants_walk_seconds": inv_s,
        "restore_seconds_gc_disabled": min(restore_nogc_runs),
        "restore_target_seconds": RESTORE_TARGET_S,
        "restore_pass": restore_s <= RESTORE_TARGET_S,
    }


# ---------------------------------------------------------------- report


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _print_throughput(tp: dict) -> None:
    if tp["judged"]:
        title = f"judged: target ours/lme >= {RATIO_TARGET:.1f}x"
    else:
        title = "for information, not judged"
    print(f"{tp['profile']} book ({title})")
    near = (
        f", {tp['near_share']:.0%} of them near the mid (mean {tp['near_offset_ticks']:.0f} ticks)"
        if tp["near_share"]
        else ""
    )
    print(
        f"  flow : {tp['commands']:,} timed commands after {tp['warmup_commands']:,} warm-up "
        f"commands, {tp['accounts']:,} accounts, 1 market; passive orders a mean "
        f"{tp['mean_offset_ticks']:.0f} ticks from the mid{near}"
    )
    print(
        f"         {tp['places']:,} limit places ({tp['crossing_places']:,} trade on arrival), "
        f"{tp['cancels']:,} cancels of live orders"
    )
    for label, key in (("start", "book_at_start"), ("end", "book_at_end")):
        b = tp[key]
        print(
            f"  book at {label:<5}: {b['resting_orders']:,} resting orders "
            f"({b['resting_bids']:,} bids / {b['resting_asks']:,} asks) over "
            f"{b['bid_levels']:,} bid / {b['ask_levels']:,} ask price levels, "
            f"spread {b['best_bid']}..{b['best_ask']}"
        )
    print(
        f"  work : ours {tp['ours_trades']:,} trades / {tp['ours_traded_qty']:,} lots; "
        f"lightmatchingengine {tp['lme_trades']:,} maker fills / {tp['lme_traded_qty']:,} lots "
        f"(+{tp['lme_taker_records']:,} taker records)  -> equal, no rejection, no STP"
    )
    print(
        f"  ours (Exchange.apply)  : {tp['ours_ops_per_s']:>10,.0f} ops/s  "
        f"({tp['ours_us_per_op']:.2f} us/op, {tp['ours_seconds']:.2f} s)"
    )
    print(
        f"  lightmatchingengine    : {tp['lme_ops_per_s']:>10,.0f} ops/s  "
        f"({tp['lme_us_per_op']:.2f} us/op, {tp['lme_seconds']:.2f} s)"
    )
    verdict = (
        f"   target >= {RATIO_TARGET:.1f}x   {_verdict(tp['ratio_pass'])}"
        if tp["judged"]
        else "   (not judged)"
    )
    print(f"  ratio ours/lme         : {tp['ratio']:>10.2f}x{verdict}")
    print(
        f"    (best of {tp['repeat']} alternating rounds each; ratio of the medians "
        f"{tp['ratio_of_medians']:.2f}x)"
    )


def engine_build() -> str:
    """Which statemachine this process imported: the mypyc build (make native) or the sources."""
    from statemachine import exchange

    where = exchange.__file__ or "?"
    return f"compiled with mypyc ({where})" if where.endswith(".so") else f"pure Python ({where})"


def print_report(res: dict) -> None:
    print(f"quorumbook state machine benchmark  (seed {res['seed']}, Python {res['python']})")
    print(f"engine: {res['engine_build']}")
    print()
    print("1. matching throughput: statemachine.Exchange.apply vs lightmatchingengine")
    for tp in res["throughput"]:
        print()
        _print_throughput(tp)
    for snap in res["snapshots"]:
        print()
        coid = "with" if snap["client_order_ids"] else "no"
        print(
            f"2. snapshot, {snap['resting_orders']:,} resting orders, {coid} client_order_id "
            f"(built in {snap['build_seconds']:.1f} s, "
            f"{snap['build_places_per_s']:,.0f} places/s)"
        )
        print(
            f"  size     : {snap['snapshot_bytes']:>12,} B = {snap['bytes_per_order']:.1f} B/order"
            f"   target <= {BYTES_PER_ORDER_TARGET}   {_verdict(snap['bytes_per_order_pass'])}"
        )
        rounds = " / ".join(f"{t:.2f}" for t in snap["restore_seconds_all"])
        print(
            f"  snapshot : {snap['snapshot_seconds']:.2f} s"
            f"   (with gc disabled {snap['snapshot_seconds_gc_disabled']:.2f} s)"
        )
        print(
            f"  restore  : {snap['restore_seconds']:.2f} s   target <= {RESTORE_TARGET_S:.0f} s   "
            f"{_verdict(snap['restore_pass'])}   (best of {snap['repeat']}: {rounds} s)"
        )
        print(
            f"             restore with gc disabled {snap['restore_seconds_gc_disabled']:.2f} s;"
            f" check_invariants() walked over the restored state {snap['check_invariants_walk_seconds']:.2f} s"
            " (not part of the restore, which checks as it builds)"
        )
    print()
    print(f"overall: {_verdict(res['all_pass'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--orders", type=int, default=100_000, help="timed commands per book (default 100000)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed rounds per engine, and of snapshot/restore (best kept; default 3)",
    )
    ap.add_argument(
        "--books",
        default="deep,shallow,cancels",
        help="book profiles to run, from cluster.workload.PROFILES (default all; each judged)",
    )
    ap.add_argument("--snapshot-orders", type=int, default=1_000_000)
    ap.add_argument("--coid-orders", type=int, default=100_000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    tps = []
    for name in args.books.split(","):
        profile = wl.PROFILES[name]
        flow = wl.book_flow(args.orders, profile, seed=args.seed)
        tps.append(throughput(flow, profile, judged=True, repeat=max(1, args.repeat)))
        del flow
        gc.collect()
    snaps = []
    repeat = max(1, args.repeat)
    if args.snapshot_orders:
        snaps.append(snapshot_figures(args.snapshot_orders, client_order_ids=False, repeat=repeat))
    if args.coid_orders:
        snaps.append(snapshot_figures(args.coid_orders, client_order_ids=True, repeat=repeat))
    res = {
        "seed": args.seed,
        "python": sys.version.split()[0],
        "engine_build": engine_build(),
        "throughput": tps,
        "snapshots": snaps,
        "all_pass": all(tp["ratio_pass"] for tp in tps if tp["judged"])
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
