"""`quorumbook drill restore`: lose the whole cluster, restore it, prove what came back.

1. A throwaway local cluster whose followers archive the log to a target (`[archive]`).
2. Orders under load through the SDK (GTC limit orders that rest away from the market, each
   with its client order id and the time it was acknowledged), a backup taken on a follower
   (`backup create`) half-way.
3. Disaster: every node SIGKILLed while the load runs, every data directory deleted.
4. `restore` from the target into a new directory, with the old API master secret and admin
   key (so the traders' keys work), and the new cluster started.
5. Verdict (PASS or FAIL, with each failed check said, as the other drills print it:
   drills.py `DrillResult`): every node of the restored cluster reports the state hash the restore computed
   (its replay), before it takes any order; every acknowledged order whose event `seq` (in its
   acknowledgement) is at or before the restored state's `seq` is resting in the restored book,
   once; none after it is; the restored cluster takes a new order. Figures: RTO (from the
   disaster to the first order the restored cluster acknowledged, restore included), RPO (the
   orders acknowledged after the restored point, and the seconds between the oldest of them
   and the disaster), the restore's own time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cluster.workload import Mix, OrderLoad, endless, set_up, wait_for

from . import backup, restore, segments
from .drills import DrillLog, DrillResult, judge, reap
from .target import open_target

MARKET = {"market": "DR-USD", "base": "DR", "quote": "USD", "lot_size": 1, "tick_size": 1,
          "maker_fee_bps": 0, "taker_fee_bps": 0}  # fmt: skip
MID = 100_000
ACCOUNTS = 4
SEED = 7
DEADLINE_S = 2.0  # one call with its retries: the load stops soon after the disaster
# GTC limit orders of one lot that all rest, 100-149 ticks from the mid: every acknowledged
# order is in the book, and in the restored one if the restored point holds it.
RESTING = Mix(
    cancel_share=0.0,
    market_share=0.0,
    offset_ticks=(100, 149),
    limit_qty=(1, 1),
    tifs=("gtc",),
    mid_ticks=MID,
)


def _set_up(cluster) -> tuple[dict, list]:
    funds = {MARKET["base"]: 10**12, MARKET["quote"]: 10**12}
    return set_up(cluster, MARKET, [f"dr{a}" for a in range(ACCOUNTS)], funds, "dr-{i}-{asset}")


def run(
    *,
    nodes: int = 3,
    to: str | None = None,
    seconds: float = 6.0,
    rate: float = 100.0,
    seed: int = SEED,
    keep: bool = False,
    segment_max_s: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> DrillResult:
    """The drill (module doc). A step that cannot be done fails the verdict, saying why;
    Ctrl-C and SIGTERM stop every process it started and go on up."""
    result = DrillResult("restore")
    log = DrillLog(progress)
    result.figures.update(
        {"nodes": nodes, "cluster": None, "seed": seed, "rate": rate, "seconds": seconds}
    )
    root = Path(tempfile.mkdtemp(prefix="qb-drill-restore-"))

    def body() -> None:
        try:
            _scenario(result, log, root, nodes, to, seconds, rate, seed, segment_max_s)
        finally:
            reap(result)  # after the clusters' own stops (the scenario's clean-up)
            if keep:
                log(f"drill directory kept: {root} (node logs: */*/node.log)")
            else:
                shutil.rmtree(root, ignore_errors=True)

    return judge(result, log, body)


def _scenario(
    result: DrillResult,
    say: DrillLog,
    root: Path,
    nodes: int,
    to: str | None,
    seconds: float,
    rate: float,
    seed: int,
    segment_max_s: float,
) -> None:
    from api.sdk import Client
    from cluster.launcher import LocalCluster

    pids = result.pids
    with contextlib.ExitStack() as stack:
        target_url = to or str(root / "target")
        source = LocalCluster.create(
            root / "source", nodes, target=target_url, segment_max_s=segment_max_s,
            backup_interval_s=0,
        )  # fmt: skip
        source.exit_with_launcher = True
        stack.callback(source.stop_all)
        source.start()
        pids += [p.pid for p in source.nodes.values() if p.pid]
        source.wait_all_following(30)
        say(f"source cluster {source.nodes[next(iter(source.nodes))].config.cluster_id} up; "
            f"archiving to {target_url}")  # fmt: skip
        market, keys = _set_up(source)
        load = OrderLoad(
            source.api_urls(),
            keys,
            endless(seed, rate, ACCOUNTS, market, RESTING),
            deadline_s=DEADLINE_S,
            prefix="dr",
            workers=ACCOUNTS,
            verify=source.verify,
        )
        load.start()
        stack.callback(load.stop)
        time.sleep(seconds / 2)  # the load's own pace: half of it before the backup
        target = open_target(target_url)
        made = backup.take(str(source.manifest_path), target, verify=False)
        say(f"backup {made.backup_id} at log index {made.applied_index} from {made.taken_from}")
        time.sleep(seconds / 2)

        # The disaster: every node killed under load, every data directory gone.
        disaster, disaster_t = time.time(), time.perf_counter()
        for node_id in source.nodes:
            source.signal(node_id, signal.SIGKILL)
        load.stop()
        for node in source.nodes.values():
            shutil.rmtree(node.config.data_dir, ignore_errors=True)
        places = [o for o in load.snapshot() if o.op == "place"]
        acked = [o for o in places if o.result == "acked"]
        say(f"every node killed and its data deleted; {len(acked)} orders were acknowledged")

        started = time.perf_counter()
        restored = restore.restore(
            target,
            root / "restored",
            nodes=nodes,
            api_master_file=source.root / "api.master",
            admin_key_file=source.admin_key_path,
            progress=say,
        )
        restore_s = time.perf_counter() - started
        spans = segments.listed(target)
        last_segment = segments.read(target, spans[-1][2]) if spans else None
        cut_at = (
            dt.datetime.fromisoformat(last_segment.created_at.replace("Z", "+00:00")).timestamp()
            if last_segment is not None
            else 0.0
        )
        cluster = LocalCluster.open(Path(restored["manifest"]))
        cluster.exit_with_launcher = True
        stack.callback(cluster.stop_all)
        cluster.start()
        pids += [p.pid for p in cluster.nodes.values() if p.pid]
        leader = cluster.wait_for_leader(30)
        say(f"restored cluster started (leader {leader})")
        # Every node at the restored state, as the replay computed it, before any new order.
        at_start = wait_for(
            lambda: (s := cluster.statuses()) and all(s.values()) and s,
            30, "every restored node to answer", interval_s=0.1,
        )  # fmt: skip
        hashes_at_start = {nid: s["state_hash"] for nid, s in at_start.items()}
        with Client(cluster.api_urls(), keys[0], deadline_s=10.0) as client:
            first = client.place(market=MARKET["market"], side="buy", type="limit",
                                 price=MID - 5_000, qty=1, tif="gtc",
                                 client_order_id="dr-after-restore")  # fmt: skip
        rto_s = time.time() - disaster
        say(f"the restored cluster acknowledged a new order {rto_s:.2f} s after the disaster")
        statuses = wait_for(
            lambda: (s := cluster.statuses()) and all(s.values())
            and len({x["cmd_index"] for x in s.values()}) == 1 and s,
            30, "every restored node to apply the same log", interval_s=0.1,
        )  # fmt: skip
        hashes = {nid: s["state_hash"] for nid, s in statuses.items()}
        resting: dict[str, int] = {}
        for key in keys:
            with Client(cluster.api_urls(), key) as client:
                for order in client.open_orders(MARKET["market"]):
                    coid = order.get("client_order_id")
                    if coid:
                        resting[coid] = resting.get(coid, 0) + 1
        point = restored["seq"]
        # (An order settled by look-up after a resend carries no seq: it cannot be placed
        # against the restored point, so it counts on neither side.)
        archived = {o.coid: o.done_t for o in acked if o.seq is not None and o.seq <= point}
        after = {o.coid: o.done_t for o in acked if o.seq is not None and o.seq > point}
        lost = sorted(c for c in archived if c not in resting)
        beyond = sorted(c for c in after if c in resting)  # cannot be: the state is at `point`
        duplicated = sorted(c for c, n in resting.items() if n > 1)
        wrong_start = {n: h for n, h in hashes_at_start.items() if h != restored["state_hash"]}

    # The verdict: each check that failed, said.
    if wrong_start:
        result.fail(
            f"nodes reported another state hash than the restore's {restored['state_hash']} "
            f"before any new order: {wrong_start}"
        )
    if not first.get("order_id"):
        result.fail(f"the restored cluster did not take a new order: {first}")
    if lost:
        result.fail(
            f"{len(lost)} acknowledged orders at or before the restored seq {point} are not "
            f"in the restored book (first: {', '.join(lost[:5])})"
        )
    if beyond:
        result.fail(
            f"{len(beyond)} orders acknowledged after the restored seq {point} are in the "
            f"restored book (first: {', '.join(beyond[:5])})"
        )
    if duplicated:
        result.fail(f"{len(duplicated)} orders rest twice (first: {', '.join(duplicated[:5])})")
    result.state_hashes_equal = len(set(hashes.values())) == 1
    if not result.state_hashes_equal:
        result.fail(f"the restored nodes' state hashes differ: {hashes}")
    result.rto_s = rto_s
    result.figures.update(
        {
            "acked_orders": len(acked),
            "lost_orders": len(lost),
            "duplicated_orders": len(duplicated),
            "restore_s": round(restore_s, 3),
            "rpo_orders": len(after),
            "rpo_s": round(disaster_t - min(after.values()), 3) if after else 0.0,
            "unknown_orders": len(places) - len(acked),  # refused or unknown: never acked
            "orders_past_the_restore_point": len(beyond),
            "restored_hash_on_every_node": not wrong_start,
            "restored_state_hash": restored["state_hash"],
            "restored_cmd_index": restored["cmd_index"],
            "restored_seq": point,
            "backup_id": restored["backup_id"],
            "segments_read": restored["segments_read"],
            "last_segment_cut_before_disaster_s": round(disaster - cut_at, 3) if cut_at else None,
            "leader": leader,
            "target": target_url,
        }
    )
