"""Backups, the log archive and restores of real clusters, through the operator's commands
(`quorumbook backup|restore|drill`), on a directory target and on an S3-protocol server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.sdk import AdminClient, Client
from cluster.launcher import LocalCluster
from cluster.workload import wait_for
from disaster_recovery import archiver, backup, segments
from disaster_recovery.target import open_target
from statemachine import Exchange

pytestmark = pytest.mark.slow

QB = [sys.executable, "-m", "cluster"]
MARKET = {"market": "BK-USD", "base": "BK", "quote": "USD", "lot_size": 1, "tick_size": 1,
          "maker_fee_bps": 0, "taker_fee_bps": 0}  # fmt: skip


def qb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*QB, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator:
    """Start a cluster (new, or from a restore's manifest); every one is stopped at the end."""
    made: list[LocalCluster] = []

    def start(manifest: Path | None = None, n: int = 3, **settings: object) -> LocalCluster:
        if manifest is None:
            cluster = LocalCluster.create(tmp_path / f"cluster{len(made)}", n, **settings)
        else:
            cluster = LocalCluster.open(manifest)
        made.append(cluster)
        cluster.exit_with_launcher = True
        cluster.start()
        cluster.wait_all_following(30)
        return cluster

    try:
        yield start
    finally:
        for cluster in made:
            cluster.stop_all()


def set_up(cluster: LocalCluster):
    with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as admin:
        admin.submit([{"op": "create_market", **MARKET}]
                     + [{"op": "deposit", "account": "bk", "asset": asset, "amount": 10**12,
                         "ref": f"bk-{asset}"} for asset in ("BK", "USD")])  # fmt: skip
        return admin.create_key("bk")


def place_resting(cluster: LocalCluster, key, first: int, n: int) -> list[str]:
    """`n` GTC limit orders that rest (buys below, sells above 100,000); their client ids."""
    coids = []
    with Client(cluster.api_urls(), key) as client:
        for i in range(first, first + n):
            side = "buy" if i % 2 else "sell"
            price = 99_000 - i if side == "buy" else 101_000 + i
            coid = f"bk-{i}"
            placed = client.place(market=MARKET["market"], side=side, type="limit",
                                  price=price, qty=1 + i % 3, tif="gtc", client_order_id=coid)  # fmt: skip
            assert placed["status"] == "resting"
            coids.append(coid)
    return coids


def resting(cluster: LocalCluster, key) -> list[str]:
    with Client(cluster.api_urls(), key) as client:
        return sorted(o["client_order_id"] for o in client.open_orders(MARKET["market"]))


def converged(cluster: LocalCluster) -> dict:
    """Every node at one cmd_index and state hash: that pair."""
    statuses = cluster.wait_converged(30)
    first = next(iter(statuses.values()))
    return {"cmd_index": first["cmd_index"], "state_hash": first["state_hash"]}


def start_restored(clusters, restored: dict) -> LocalCluster:
    """Start the restored cluster; every node must report the restored state before any
    command (the state the restore's replay computed)."""
    cluster = clusters(Path(restored["manifest"]))
    at_start = converged(cluster)
    assert at_start == {"cmd_index": restored["cmd_index"], "state_hash": restored["state_hash"]}
    return cluster


def test_backup_verify_list_and_restore_from_a_backup(clusters, tmp_path):
    source = clusters()
    key = set_up(source)
    placed = place_resting(source, key, 0, 30)
    leader = source.wait_for_leader()
    before = converged(source)
    to = tmp_path / "backups"

    made = qb("backup", "create", "--cluster", str(source.manifest_path), "--to", str(to), "--json")
    assert made.returncode == 0, made.stderr
    manifest = json.loads(made.stdout)
    assert manifest["taken_from"] != leader  # never from the leader
    assert (manifest["cmd_index"], manifest["state_hash"]) == (
        before["cmd_index"],
        before["state_hash"],
    )
    assert manifest["cluster_id"] == json.loads(source.manifest_path.read_text())["cluster_id"]
    assert {f["name"] for f in manifest["files"]} and all(f["sha256"] for f in manifest["files"])

    verified = qb("backup", "verify", str(to), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert [b["ok"] for b in json.loads(verified.stdout)["backups"]] == [True]
    listed = json.loads(qb("backup", "list", str(to), "--json").stdout)
    assert [b["backup_id"] for b in listed["backups"]] == [manifest["backup_id"]]

    source.stop_all()  # the disaster
    new = tmp_path / "restored"
    done = qb("restore", "--from", str(to), "--data-dir", str(new), "--nodes", "3",
              "--api-master-file", str(source.root / "api.master"),
              "--admin-key-file", str(source.admin_key_path), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    restored = json.loads(done.stdout)
    assert restored["backup_id"] == manifest["backup_id"]
    assert restored["cluster_id"] != manifest["cluster_id"]  # a new history

    again = qb("restore", "--from", str(to), "--data-dir", str(new))
    assert again.returncode == 1
    assert "is not empty" in again.stderr and "--force" in again.stderr

    cluster = start_restored(clusters, restored)
    assert resting(cluster, key) == sorted(placed)  # the trader's key works: same master
    place_resting(cluster, key, 1000, 1)  # and the restored cluster takes orders
    assert resting(cluster, key) == sorted([*placed, "bk-1000"])
    converged(cluster)


def test_a_damaged_backup_fails_verify_and_restore_with_a_clear_message(clusters, tmp_path):
    source = clusters()
    key = set_up(source)
    place_resting(source, key, 0, 5)
    to = tmp_path / "backups"
    made = qb("backup", "create", "--cluster", str(source.manifest_path), "--to", str(to), "--json")
    assert made.returncode == 0, made.stderr
    manifest = json.loads(made.stdout)
    state = to / "backups" / manifest["backup_id"] / "state.bin"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))

    verified = qb("backup", "verify", str(to))
    assert verified.returncode == 1
    assert "FAIL" in verified.stdout and "sha256" in verified.stdout
    failed = qb("restore", "--from", str(to), "--data-dir", str(tmp_path / "restored"))
    assert failed.returncode == 1
    assert "sha256" in failed.stderr
    assert not any((tmp_path / "restored").glob("*/raft.dump"))  # nothing half-built


def test_archive_to_s3_and_restore_to_any_point_in_time(clusters, tmp_path, s3_url):
    """Followers ship the log to S3 while orders come; the whole cluster is lost; a restore
    rebuilds the newest state archived, or any earlier point, exactly."""
    source = clusters(target=s3_url, segment_max_s=0.2, backup_interval_s=0)
    key = set_up(source)
    points = []
    for phase in range(3):
        place_resting(source, key, phase * 100, 15)
        points.append(converged(source))
    target = open_target(s3_url)

    def archived() -> dict | None:
        archives = [s["archive"] for s in source.statuses().values() if s]
        active = [a for a in archives if a.get("active")]
        if len(active) == 1 and active[0]["archived_cmd_index"] == points[-1]["cmd_index"]:
            return active[0]
        return None

    status = wait_for(archived, 30, "the archive to reach the last command")
    assert status["lag_entries"] == 0 and status["segments_written"] >= 1
    assert status["target"] == target.url
    leader = source.wait_for_leader()
    assert not source.status(leader)["archive"]["active"]  # a follower archives
    metrics = qb_metrics(
        source, next(n for n, s in source.statuses().items() if s and s["archive"]["active"])
    )
    assert "qb_archive_lag_entries 0.0" in metrics and "qb_archive_active 1.0" in metrics
    assert segments.listed(target) and backup.target_cluster(target) is not None

    listed = json.loads(qb("backup", "list", s3_url, "--segments", "--json").stdout)
    archive = listed["archive"]
    assert archive["segments"] == len(archive["listed"]) >= 1
    assert archive["listed"][-1]["last_cmd_index"] == points[-1]["cmd_index"]
    assert all(
        a["last_cmd_index"] == b["first_cmd_index"] and a["last_index"] + 1 == b["first_index"]
        for a, b in zip(archive["listed"], archive["listed"][1:], strict=False)
    )  # one chain, nothing missing (one archiver: no overlaps)

    for node_id in source.nodes:  # the disaster: every node, no clean stop
        source.kill(node_id)
    # The newest state, from the archived log alone (no backup was ever taken).
    latest = restore_cli(s3_url, tmp_path / "latest")
    assert latest["backup_id"] is None and latest["segments_read"] >= 1
    assert {k: latest[k] for k in points[-1]} == points[-1]
    # A point in time: the end of the first phase.
    early = restore_cli(s3_url, tmp_path / "early", "--to-cmd-index", str(points[0]["cmd_index"]),
                        "--api-master-file", str(source.root / "api.master"))  # fmt: skip
    assert {k: early[k] for k in points[0]} == points[0]
    cluster = start_restored(clusters, early)
    assert resting(cluster, key) == sorted(f"bk-{i}" for i in range(15))


def qb_metrics(cluster: LocalCluster, node_id: str) -> str:
    import httpx

    return httpx.get(cluster.nodes[node_id].config.api_url + "/metrics", timeout=5).text


def restore_cli(url: str, data_dir: Path, *args: str) -> dict:
    done = qb("restore", "--from", url, "--data-dir", str(data_dir), "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_scheduled_backups_keep_the_newest_and_the_log_they_need(clusters, tmp_path):
    """A follower backs the state up on a schedule (from its own snapshot) and keeps the newest
    `keep_backups`, with the segments after the oldest kept; a restore needs nothing else."""
    to = tmp_path / "target"
    source = clusters(target=str(to), segment_max_s=0.2, backup_interval_s=0.3, keep_backups=2,
                      compaction_min_entries=20)  # fmt: skip
    key = set_up(source)
    target = open_target(str(to))
    for round_ in range(6):
        place_resting(source, key, round_ * 100, 25)  # enough for a compaction, a new dump
        time.sleep(0.35)  # the schedule's own pace (an interval, not a synchronisation)
    last = converged(source)

    def settled():
        kept = backup.complete_backups(target)
        spans = segments.listed(target)
        done = spans and spans[-1][1] >= 1 and len(kept) == 2
        return (kept, spans) if done else None

    kept, spans = wait_for(settled, 30, "two backups kept")
    written = max(s["archive"]["backups_written"] for s in source.statuses().values() if s)
    assert written > 2  # older ones were taken, then deleted
    assert all(last_index > kept[0].applied_index for _first, last_index, _name in spans)
    for node_id in source.nodes:
        source.kill(node_id)
    # The schedule may have written a newer one since (the nodes compact on their own pace):
    # the restore starts from the newest complete backup there is.
    newest = backup.complete_backups(target)[-1]
    assert newest.applied_index >= kept[-1].applied_index
    restored = restore_cli(str(to), tmp_path / "restored")
    assert restored["backup_id"] == newest.backup_id
    assert {k: restored[k] for k in last} == last


def test_drill_restore(tmp_path):
    """The whole drill, short: every acknowledged order up to the restored point is back,
    once; every process it started is gone."""
    done = qb("drill", "restore", "--seconds", "3", "--rate", "60", "--json", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["drill"] == "restore"
    assert result["lost_orders"] == 0 and result["duplicated_orders"] == 0
    assert result["orders_past_the_restore_point"] == 0
    assert result["restored_hash_on_every_node"] and result["state_hashes_equal"]
    assert result["acked_orders"] > 0 and result["rto_s"] > result["restore_s"] > 0
    assert len(result["pids"]) == 6
    assert result["failures"] == [] and result["pids_running"] == []

    def all_gone():
        return not any(Path(f"/proc/{pid}").exists() for pid in result["pids"])

    wait_for(all_gone, 10, "the drill's processes to be gone")


def test_a_drill_restore_that_cannot_run_fails_saying_why_and_leaves_nothing_running():
    """A step that cannot be done (here the target cannot be created) is a FAIL with its
    reason, in the same form as every drill's verdict, not a traceback; exit 1."""
    done = qb("drill", "restore", "--seconds", "1", "--to", "/dev/null/target", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("drill restore: FAIL (a throwaway 3-node cluster")
    assert "FAILED: aborted: TargetError: /dev/null/target" in done.stdout
    assert "still running: 0" in done.stdout
    assert "verdict: FAIL" in done.stderr and "Traceback" not in done.stderr


def archiving(cluster: LocalCluster) -> dict[str, dict]:
    """{node id: archive status} of the nodes archiving now."""
    return {
        nid: s["archive"]
        for nid, s in cluster.statuses().items()
        if s and s["archive"].get("active")
    }


def test_the_archive_survives_its_node_and_its_target_failing(clusters, tmp_path):
    """The archiving follower is SIGKILLed: another takes over where the archive ends. The
    target fails: the archiver says so (status, metric), retries, and catches up with no gap.
    A restore from the archive alone is the cluster's final state."""
    to = tmp_path / "target"
    source = clusters(target=str(to), segment_max_s=0.2, backup_interval_s=0)
    key = set_up(source)
    place_resting(source, key, 0, 10)
    first = wait_for(lambda: archiving(source), 20, "an archiving follower")
    (archiver,) = first
    source.kill(archiver)
    place_resting(source, key, 100, 10)
    second = wait_for(lambda: archiving(source), 20, "another follower to archive")
    assert archiver not in second

    hidden = tmp_path / "hidden"
    to.rename(hidden)
    to.write_bytes(b"")  # a file where the directory was: every put fails
    place_resting(source, key, 200, 10)

    def failing():
        return [a for a in archiving(source).values() if a["state"] == "backoff"]

    (status,) = wait_for(failing, 20, "the archiver to report the failing target")
    assert "put" in status["last_error"] and status["lag_entries"] > 0
    assert "qb_archive_failing 1.0" in qb_metrics(source, next(iter(archiving(source))))
    to.unlink()
    hidden.rename(to)
    source.start(archiver)  # back as a follower: it may archive again, from the archive's end
    last = converged(source)

    def caught_up():
        now = archiving(source)
        return len(now) == 1 and next(iter(now.values()))["archived_cmd_index"] == last["cmd_index"]

    wait_for(caught_up, 30, "the archive to catch up")
    assert all(s["archive"].get("gaps", 0) == 0 for s in source.statuses().values() if s)
    for node_id in source.nodes:
        source.kill(node_id)
    restored = restore_cli(str(to), tmp_path / "restored")
    assert {k: restored[k] for k in last} == last

    # The archived log, command by command, replays to the final state.
    exported = qb("backup", "log", str(to))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["cmd_index"] for line in lines] == list(range(1, last["cmd_index"] + 1))
    exchange = Exchange()
    for line in lines:
        exchange.apply(line["command"])
    assert exchange.state_hash() == last["state_hash"]


@pytest.mark.parametrize("hold_mb", [256, 0], ids=["hold", "no-hold"])
def test_the_archiver_that_takes_over_finds_no_gap_where_its_node_compacted(
    clusters, tmp_path, hold_mb
):
    """The gap the Jepsen matrix found: the archiving follower falls behind (here its
    archiver is SIGSTOPped), the other follower compacts past the archive's end, then the
    archiving node dies. With the compaction hold (ADR 0008) the follower that takes over
    carries the archive on from its end: no gap, the whole log exported. Without it
    (`compaction_hold_mb = 0`) the gap is found and said, as before."""
    to = tmp_path / "target"
    source = clusters(target=str(to), segment_max_s=0.2, backup_interval_s=0,
                      compaction_min_entries=20, compaction_hold_mb=hold_mb)  # fmt: skip
    key = set_up(source)
    place_resting(source, key, 0, 5)
    ((first, status),) = wait_for(lambda: list(archiving(source).items()), 20, "an archiver")
    leader = source.wait_for_leader()
    (other,) = set(source.nodes) - {first, leader}

    def raft(field: str) -> int | None:
        return (source.status(other) or {}).get("raft", {}).get(field)

    os.kill(status["pid"], signal.SIGSTOP)
    try:
        end = archiver.reach(open_target(str(to)))[0]
        # Every other node reads where the archive ends (a standing-by archiver, every 5 s).
        wait_for(
            lambda: not hold_mb or raft("compaction_hold") == end,
            20,
            "the other follower to hold compaction at the archive's end",
        )
        place_resting(source, key, 100, 60)  # every node compacts (threshold 20-33 entries)
        wait_for(lambda: (raft("dump_index") or 0) > end + 1, 30,
                 "the other follower to compact past the archive's end")  # fmt: skip
        source.kill(first)
    finally:
        os.kill(status["pid"], signal.SIGKILL)  # its node is gone: nobody else stops it
    wait_for(lambda: other in archiving(source), 20, "the other follower to archive")
    if not hold_mb:
        wait_for(
            lambda: (source.status(other) or {}).get("archive", {}).get("gaps") == 1, 20, "the gap"
        )
        return
    last = converged(source)

    def caught_up():
        now = archiving(source)
        return other in now and now[other]["archived_cmd_index"] == last["cmd_index"]

    wait_for(caught_up, 30, "the archive to catch up")
    assert all(s["archive"].get("gaps", 0) == 0 for s in source.statuses().values() if s)
    exported = qb("backup", "log", str(to))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["cmd_index"] for line in lines] == list(range(1, last["cmd_index"] + 1))
