"""Proof that the harness bites on what plain pysyncobj loses: with the adapter's Raft fixes
switched off (`[raft] unsafe_raft_fixes_off`, `jepsen run --unsafe-raft-fixes-off`), the
harness's final checker reports acknowledged writes that are gone.

Random faults reach plain pysyncobj's snapshot-chunk bug (ADR 0002, fix 2) rarely (five
`jepsen run --unsafe-raft-fixes-off` runs under kill and partition faults, 7.5 minutes of faults
in all, showed the bug's other symptoms, hundreds of `truncating already-applied log entries`,
but no loss the checkers could prove), so this test drives the harness's own parts (its
network namespaces and partitions, its history, its checker) through the schedule that
reaches it, on real node processes: the leader A is cut off from its peers (not from the
clients) while clients' orders to it wait in its log; the others elect a leader, commit and
compact past A's log; the partition heals; the new leader sends A its snapshot in chunks, and
plain pysyncobj's commit step on the first chunk commits A's own entries: A acknowledges the
orders, then installs the snapshot, which does not have them. With the fixes on, the same
schedule leaves those orders unacknowledged (the node answers them as outcome unknown) and
the checker finds nothing.

Two timings decide whether A acknowledges anything, and the schedule pins both (it used to
reach the loss in about one pass of three, and the test skipped when five passes missed):

- The partition is healed only once A and the new leader have each dropped their link to the
  other (`connected` false in both statuses). A link that outlives the partition delivers,
  at the heal, the AppendEntries the new leader sent into it when it was elected: entries A
  matches, so it truncates its own and never acknowledges them (upstream's other path).
- What the new leader sends A is slowed to 256 kbit/s from the heal on (`Net.limit_rate`),
  so the snapshot's chunks (about 1.5 KB each on the wire) arrive tens of ms apart. Upstream
  commits A's own entries on the first chunk and applies them at its next tick; unslowed,
  the chunks were often read in one go, and the last one installed the snapshot before that
  tick came.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from api.sdk import AdminClient, ApiError, Client, ClusterUnavailable, OutcomeUnknown
from cluster.launcher import LocalCluster
from jepsen.checkers import final
from jepsen.client import MARKET, setup_commands
from jepsen.history import HistoryWriter, read_history
from jepsen.nemesis.partition import Partition, isolate
from jepsen.net import Net, requirements_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(requirements_missing()), reason="partitions need root and iptables"),
]

ORDERS = 8  # sent to the cut-off leader


def wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def cut_off_leader_acknowledges(tmp_path: Path, fixes: str) -> tuple[list, list[str], object]:
    """One pass of the schedule (the module's docstring): (the history's ops, the client order
    ids the old leader acknowledged from its own log, the final checker's result)."""
    nodes = ["n1", "n2", "n3"]
    with Net(nodes) as net, contextlib.ExitStack() as stack:
        partition = Partition(net)
        cluster = LocalCluster.create(
            tmp_path / "cluster",
            3,
            hosts=net.hosts(),
            unsafe_raft_fixes_off=fixes == "off",
            compaction_min_entries=20,
            snapshot_chunk_bytes=1024,
            # Plain pysyncobj's default: a cut-off leader goes on leading (and appending).
            leader_fallback_timeout_s=30.0,
            submit_timeout_s=30.0,
        )
        cluster.wrap = net.wrap
        cluster.exit_with_launcher = True
        stack.callback(cluster.stop_all)
        stack.callback(partition.heal_all)
        cluster.start()
        cluster.wait_all_following(30)
        accounts = [f"a{i}" for i in range(ORDERS)]
        with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
            admin.submit(setup_commands(accounts), deadline_s=30)
            keys = {a: admin.create_key(a) for a in accounts}
        old = cluster.wait_for_leader(10)
        others = [n for n in nodes if n != old]
        history = HistoryWriter(tmp_path / "history.jsonl")
        stack.callback(history.close)

        partition.apply(isolate(nodes, old))
        old_url = cluster.nodes[old].config.api_url
        status = cluster.status(old)
        before, cmd_before = status["raft"]["log_last_index"], status["cmd_index"]

        def place(n: int) -> None:
            order = {"market": MARKET["market"], "side": "buy", "type": "limit", "price": 90,
                     "qty": 1, "tif": "gtc", "client_order_id": f"o{n}"}  # fmt: skip
            op = history.invoke(n, "place", {"account": accounts[n], **order})
            with Client([old_url], keys[accounts[n]], deadline_s=40) as client:
                try:
                    answer = client.place(**order)
                except (OutcomeUnknown, ApiError, ClusterUnavailable) as exc:
                    history.complete(op, "info", error={"code": type(exc).__name__,
                                                        "message": str(exc)})  # fmt: skip
                    return
            history.complete(op, "ok", answer, node=old)

        threads = [threading.Thread(target=place, args=(n,)) for n in range(ORDERS)]
        for thread in threads:
            thread.start()
        wait(lambda: cluster.status(old)["raft"]["log_last_index"] > before, 10,
             "the cut-off leader appending orders")  # fmt: skip

        # The others elect a leader, commit, and compact past the old leader's log.
        new = cluster.wait_for_leader(20, exclude=(old,))
        with AdminClient([cluster.nodes[n].config.api_url for n in others],
                         cluster.admin_credentials()) as admin:  # fmt: skip
            for i in range(60):  # one log entry each
                deposit = {"op": "deposit", "account": "a0", "asset": "USD", "amount": 1}
                admin.submit([{**deposit, "ref": f"d{i}"}])
        wait(lambda: cluster.status(new)["raft"]["log_first_index"] > before + ORDERS, 20,
             "the new leader compacting its log")  # fmt: skip

        # A fresh link after the heal (the module's docstring), and the chunks spread out.
        def links_down() -> bool:
            new_hears = {p["id"]: p["connected"] for p in cluster.status(new)["peers"]}
            old_hears = [p["connected"] for p in cluster.status(old)["peers"]]
            return not new_hears[old] and not any(old_hears)

        wait(links_down, 10, "the links between the old and the new leader dropping")
        net.limit_rate(old, 256)
        partition.heal()
        for thread in threads:
            thread.join(45)
        assert not any(t.is_alive() for t in threads)
        cluster.wait_converged(30)
        snapshots = {}
        with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
            for node_id, node in cluster.nodes.items():
                snapshots[node_id] = admin.snapshot(node.config.api_url).blob

    ops = read_history(tmp_path / "history.jsonl")
    # Answers from the old leader's own log: the cmd_indexes it gave while cut off (the new
    # leader's log has the 60 deposits there).
    own = [
        op.value["events"][0]["client_order_id"]
        for op in ops
        if op.type == "ok" and op.value["events"][0]["cmd_index"] <= cmd_before + ORDERS
    ]
    return ops, own, final.check(ops, snapshots)


def test_with_the_fixes_off_the_final_checker_reports_the_lost_acknowledged_orders(
    tmp_path: Path,
):
    """The old leader acknowledges orders from its own log (18 passes of 18 here with both
    timings pinned, 4 of them beside two busy loops) and the checker reports exactly those
    lost, on every node. A second pass only in case a loaded machine stretched the old
    leader's tick past the gap between two chunks."""
    for attempt in range(2):
        ops, own, result = cut_off_leader_acknowledges(tmp_path / f"pass{attempt}", "off")
        if own:
            break
    else:
        answered = sorted(op.value["events"][0]["cmd_index"] for op in ops if op.type == "ok")
        pytest.fail(f"the old leader acknowledged nothing from its own log: {answered}")
    assert result.kinds() == {"lost_write"}, result.anomalies
    # An anomaly names the op's completion, which names its invoke.
    lost = {
        ops[ops[i].invoke_index].value["client_order_id"]
        for anomaly in result.anomalies
        for i in anomaly["op_indexes"]
    }
    assert lost == set(own)
    assert result.stats["anomaly_counts"]["lost_write"] == 3 * len(own)  # on every node


def test_with_the_fixes_on_the_same_schedule_loses_nothing(tmp_path: Path):
    _ops, own, result = cut_off_leader_acknowledges(tmp_path, "on")
    assert own == []  # never acknowledged: they were never committed
    assert result.valid is True, result.anomalies
    assert result.stats["acknowledged_writes"] > 0  # resent to the new leader, and answered
