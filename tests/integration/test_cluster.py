"""A real 3-node cluster: replication, leader SIGKILL, restarts, compaction, isolation."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.sdk import ClusterUnavailable
from cluster.config import load
from cluster.workload import DepositLoad, deposit

from .conftest import admin, assert_acked_present

MARKET = {
    "op": "create_market",
    "market": "BTC-USD",
    "base": "BTC",
    "quote": "USD",
    "lot_size": 100,
    "tick_size": 5,
    "maker_fee_bps": 1,
    "taker_fee_bps": 2,
}


def test_commands_reach_every_node_with_equal_state(make_cluster) -> None:
    cluster = make_cluster(3)
    with admin(cluster) as client:
        results = client.submit([MARKET] + [deposit(i) for i in range(50)])
        assert all("events" in r for r in results)
        assert results[0]["events"][0]["type"] == "market_created"
        client.barrier()
    statuses = cluster.wait_converged(20)
    assert {s["cmd_index"] for s in statuses.values()} == {51}
    assert len({s["state_hash"] for s in statuses.values()}) == 1
    roles = sorted(s["role"] for s in statuses.values())
    assert roles == ["follower", "follower", "leader"]
    assert_acked_present(cluster, {i: i + 1 for i in range(50)}, set())


def test_follower_redirects_writes_to_the_leader(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    with admin(cluster) as client:
        client.urls = [cluster.nodes[follower].config.api_url]  # only the follower is known
        results = client.submit([deposit(1)])
        assert results[0]["events"][0]["type"] == "balance"
        assert client.leader == cluster.nodes[leader].config.api_url


def test_leader_sigkill_under_load_loses_nothing_acknowledged(make_cluster) -> None:
    cluster = make_cluster(3)
    with DepositLoad.on(cluster) as load:
        load.wait_acked(200)
        old_leader = cluster.wait_for_leader()
        cluster.kill(old_leader)
        killed_at = len(load.acked)
        new_leader = cluster.wait_for_leader(20, exclude=(old_leader,))
        assert new_leader != old_leader
        load.wait_acked(killed_at + 200)
    # The killed node restarts from its data dir and catches up.
    cluster.start(old_leader)
    with admin(cluster) as client:
        client.barrier()
    statuses = cluster.wait_converged(30)
    assert len({s["state_hash"] for s in statuses.values()}) == 1
    assert_acked_present(cluster, load.acked, load.unknown)
    # Nothing applied twice: every command in the log is one cmd_index (a client resend of a
    # command whose first copy was applied is a second, rejected, command).
    applied = next(iter(statuses.values()))["cmd_index"]
    floor = len(load.acked) + load.resent
    assert floor <= applied <= floor + len(load.unknown)


def test_whole_cluster_restart_keeps_every_acknowledged_command(make_cluster) -> None:
    cluster = make_cluster(3)
    with admin(cluster) as client:
        results = client.submit([MARKET] + [deposit(i) for i in range(100)])
        acked = {i: i + 1 for i, r in enumerate(results[1:]) if "events" in r}
    assert len(acked) == 100
    for node_id in cluster.nodes:
        cluster.kill(node_id)
    cluster.start()
    cluster.wait_for_leader(30)
    with admin(cluster) as client:
        client.barrier()
    statuses = cluster.wait_converged(30)
    assert {s["cmd_index"] for s in statuses.values()} == {101}
    assert_acked_present(cluster, acked, set())


def test_follower_restarted_after_compaction_restores_from_snapshot(make_cluster) -> None:
    cluster = make_cluster(3, compaction_min_entries=20, compaction_min_time_s=0.2)
    leader = cluster.wait_for_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    had = cluster.status(follower)["applied_index"]
    cluster.stop(follower)
    with admin(cluster) as client:
        for chunk in range(20):
            client.submit([deposit(chunk * 10 + j) for j in range(10)])
        client.barrier()
    # Compaction runs on the leader's own schedule: wait until its log starts past what the
    # follower holds, so the follower can only catch up from the snapshot.
    deadline = time.monotonic() + 30
    while cluster.status(leader)["raft"]["log_first_index"] <= had + 1:
        assert time.monotonic() < deadline, "the leader did not compact"
        time.sleep(0.05)
    dumps = [p for n in cluster.nodes.values() for p in n.config.data_dir.glob("*dump*")]
    assert dumps, "no snapshot was written"
    cluster.start(follower)
    statuses = cluster.wait_converged(30)
    assert {s["cmd_index"] for s in statuses.values()} == {200}
    # The leader compacted past what the follower had, so it caught up from a snapshot.
    assert statuses[follower]["raft"]["snapshots_installed"] >= 1
    assert statuses[leader]["raft"]["log_first_index"] > 1
    assert_acked_present(cluster, {i: i + 1 for i in range(200)}, set())


def test_read_barrier_on_a_leader_cut_off_from_the_majority_does_not_return(make_cluster) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_for_leader()
    followers = [n for n in cluster.nodes if n != leader]
    with admin(cluster) as client:
        client.submit([deposit(0)])
        for f in followers:
            cluster.signal(f, signal.SIGSTOP)
        try:
            client.urls = [cluster.nodes[leader].config.api_url]
            with pytest.raises((ClusterUnavailable, httpx.HTTPError)):
                client.barrier(deadline_s=3)
            # And it stops calling itself leader within about a second (leaderFallbackTimeout).
            deadline = time.monotonic() + 3
            while cluster.status(leader)["role"] == "leader":
                assert time.monotonic() < deadline, "cut-off leader still claims leadership"
                time.sleep(0.05)
        finally:
            for f in followers:
                cluster.signal(f, signal.SIGCONT)
    cluster.wait_for_leader(20)


def test_add_a_fourth_node_then_remove_one_keeps_serving(make_cluster) -> None:
    cluster = make_cluster(3)
    with admin(cluster) as client:
        client.submit([deposit(i) for i in range(20)])
    new = cluster.add_node()
    assert len(cluster.nodes) == 4
    statuses = cluster.wait_converged(30)
    assert statuses[new]["cmd_index"] >= 20
    config = cluster.nodes[new].config
    for node_id, node in cluster.nodes.items():  # rewritten once the change had committed
        listed = {p.id for p in load(node.config_path).peers}
        assert listed == set(cluster.nodes) - {node_id}, node_id
    with admin(cluster) as client:  # a retry after a lost answer changes nothing
        again = client.change_membership("add", new, config.raft_addr, config.api_url)
        assert again["change"] == "unchanged"
    with admin(cluster) as client:
        client.submit([deposit(i) for i in range(20, 40)])
        leader_status = client.barrier()
        assert len(leader_status["peers"]) == 3  # the leader sees three peers
    # Remove the current leader: it hands over first, then leaves.
    victim = cluster.wait_for_leader()
    cluster.remove_node(victim)
    assert victim not in cluster.nodes
    with admin(cluster) as client:
        client.submit([deposit(i) for i in range(40, 60)])
        leader_status = client.barrier()
        assert len(leader_status["peers"]) == 2
    statuses = cluster.wait_converged(30)
    assert {s["cmd_index"] for s in statuses.values()} == {60}
    assert_acked_present(cluster, {i: i + 1 for i in range(60)}, set())


LAUNCHER = """
import sys, time
from pathlib import Path
from cluster.launcher import LocalCluster
cluster = LocalCluster.create(Path(sys.argv[1]), 3)
cluster.exit_with_launcher = True
cluster.start()
print(" ".join(str(n.pid) for n in cluster.nodes.values()), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by init) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


def test_nodes_stop_when_their_launcher_is_killed(tmp_path: Path) -> None:
    """A test or benchmark SIGKILLed mid-way (no cleanup runs) leaves no node process."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "c")], stdout=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        launcher.kill()
        launcher.wait(10)
        launcher.stdout.close()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
