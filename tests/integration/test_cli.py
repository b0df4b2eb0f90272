"""The operator's path: `quorumbook cluster up` in one process, admin commands in others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cluster.workload import wait_for

QB = [sys.executable, "-m", "cluster"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QB, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_cluster_up(up: subprocess.Popen, manifest: Path, pids: list[int]) -> str:
    """Ctrl-C to `cluster up`, its output; then SIGKILL any node it left (by pid)."""
    up.send_signal(signal.SIGINT)
    try:
        output, _ = up.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        up.kill()
        output, _ = up.communicate()
    raw = json.loads(manifest.read_text()) if manifest.exists() else {"nodes": []}
    for pid in pids + [n["pid"] for n in raw["nodes"]]:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return output


def test_cluster_up_status_membership_and_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "qb"
    up = subprocess.Popen(
        [*QB, "cluster", "up", "--nodes", "3", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    manifest = data / "cluster.json"
    pids: list[int] = []
    try:
        wait_for(
            lambda: (
                manifest.exists()
                and all(n["pid"] for n in json.loads(manifest.read_text())["nodes"])
            ),
            30,
            "cluster.json with pids",
        )
        raw = json.loads(manifest.read_text())
        assert {n["id"] for n in raw["nodes"]} == {"n1", "n2", "n3"}
        assert oct(os.stat(raw["admin_credentials"]).st_mode & 0o777) == "0o600"
        assert oct(os.stat(data / "raft.password").st_mode & 0o777) == "0o600"

        def leader_known():
            out = run("cluster", "status", "--cluster", str(manifest), "--json")
            nodes = json.loads(out.stdout)["nodes"] if out.returncode == 0 else {}
            roles = [s["role"] for s in nodes.values() if s]
            return nodes if roles.count("leader") == 1 and len(roles) == 3 else None

        wait_for(leader_known, 30, "a leader")
        plain = run("cluster", "status", "--cluster", str(manifest))
        assert plain.returncode == 0, plain.stderr
        lines = plain.stdout.splitlines()
        assert len(lines) == 3 and all(" MB" in line and "; journal " in line for line in lines)
        moved = run("cluster", "transfer-leader", "--cluster", str(manifest))
        assert moved.returncode == 0, moved.stderr
        assert "->" in moved.stdout

        added = run("cluster", "add-node", "--cluster", str(manifest))
        assert added.returncode == 0, added.stderr + added.stdout
        assert "added n4" in added.stdout
        raw = json.loads(manifest.read_text())
        assert {n["id"] for n in raw["nodes"]} == {"n1", "n2", "n3", "n4"}

        removed = run("cluster", "remove-node", "--cluster", str(manifest), "--node", "n2")
        assert removed.returncode == 0, removed.stderr + removed.stdout
        raw = json.loads(manifest.read_text())
        assert {n["id"] for n in raw["nodes"]} == {"n1", "n3", "n4"}
        status = wait_for(leader_known, 30, "a leader after the membership changes")
        assert set(status) == {"n1", "n3", "n4"}

        bad = run("cluster", "remove-node", "--cluster", str(manifest), "--node", "n9")
        assert bad.returncode != 0 and "no node 'n9'" in bad.stderr
        pids = [n["pid"] for n in raw["nodes"]]
    finally:
        output = stop_cluster_up(up, manifest, pids)
    assert up.returncode == 0, output
    assert "stopping cluster" in output
    assert not [pid for pid in pids if pid_alive(pid)], "cluster up left node processes behind"


def whoami(url: str, creds) -> dict:
    """The key's own balances route, signed with it: proves the key is live on the cluster."""
    from api.sdk import signed_headers

    path = "/v1/accounts/me/balances"
    response = httpx.get(url + path, headers=signed_headers(creds, "GET", path, b""), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_keys_create_prints_the_secret_once_or_writes_a_0600_file(
    make_cluster, tmp_path: Path
) -> None:
    from api.sdk import Credentials, read_credentials

    cluster = make_cluster(1)
    manifest = str(cluster.manifest_path)
    url = cluster.api_urls()[0]

    shown = run("keys", "create", "--account", "alice", "--cluster", manifest, "--json")
    assert shown.returncode == 0, shown.stderr
    raw = json.loads(shown.stdout)
    assert set(raw) == {"key_id", "secret", "account", "role"}
    assert (raw["account"], raw["role"]) == ("alice", "trader")
    assert (
        whoami(url, Credentials(raw["key_id"], raw["secret"], "trader", "alice"))["account"]
        == "alice"
    )

    out = tmp_path / "bob.key"
    written = run(
        "keys",
        "create",
        "--account",
        "bob",
        "--url",
        url,
        "--admin-key-file",
        str(cluster.admin_key_path),
        "--out",
        str(out),
    )
    assert written.returncode == 0, written.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    creds = read_credentials(out)
    assert (creds.account, creds.role) == ("bob", "trader")
    assert creds.secret not in written.stdout + written.stderr  # only the file holds it
    assert f"key_id: {creds.key_id}" in written.stdout
    assert whoami(url, creds)["account"] == "bob"

    again = run("keys", "create", "--account", "bob", "--cluster", manifest, "--out", str(out))
    assert again.returncode != 0 and "cannot create" in again.stderr
    assert read_credentials(out) == creds  # never overwritten

    admin = run(
        "keys", "create", "--account", "ops", "--role", "admin", "--cluster", manifest, "--json"
    )
    assert admin.returncode == 0 and json.loads(admin.stdout)["role"] == "admin"
    neither = run("keys", "create", "--account", "x")
    assert neither.returncode == 2 and "either --cluster or --url" in neither.stderr


def test_a_node_that_refuses_to_start_is_not_restarted_until_its_data_is_moved_aside(
    tmp_path: Path,
) -> None:
    """The runbook (docs/operating/raft-storage.md) end to end under `cluster up`: a follower's
    journal is damaged in its synced part while it is down; it refuses to start (exit 73, one
    CRITICAL line naming the file and offset), the launcher does not restart it in a loop, and
    once its data directory is moved aside the launcher starts it empty and it catches up."""
    from api.sdk import AdminClient, read_credentials

    data = tmp_path / "qb"
    up = subprocess.Popen(
        [*QB, "cluster", "up", "--nodes", "3", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    manifest = data / "cluster.json"
    raw: dict = {"nodes": []}
    try:
        wait_for(
            lambda: (
                manifest.exists()
                and all(n["pid"] for n in json.loads(manifest.read_text())["nodes"])
            ),
            30,
            "cluster.json with pids",
        )
        raw = json.loads(manifest.read_text())
        urls = [n["api_url"] for n in raw["nodes"]]

        def statuses() -> dict:
            out = run("cluster", "status", "--cluster", str(manifest), "--json")
            return json.loads(out.stdout)["nodes"] if out.returncode == 0 else {}

        nodes = wait_for(
            lambda: (
                (s := statuses())
                and [v and v["role"] for v in s.values()].count("leader") == 1
                and all(s.values())
                and s
            ),
            30,
            "a leader",
        )
        victim = next(nid for nid, s in nodes.items() if s["role"] == "follower")
        with AdminClient(urls, read_credentials(Path(raw["admin_credentials"]))) as client:
            client.submit(
                [
                    {
                        "op": "deposit",
                        "account": f"a{i}",
                        "asset": "USD",
                        "amount": 10,
                        "ref": f"r{i}",
                    }
                    for i in range(20)
                ]
            )
            client.barrier()
        entry = next(n for n in raw["nodes"] if n["id"] == victim)
        journal = Path(entry["data_dir"]) / "raft.journal"
        log = Path(entry["config"]).parent / "node.log"
        os.kill(entry["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(entry["pid"]), 10, "the follower to die")
        damaged = bytearray(journal.read_bytes())
        damaged[100] ^= 0xFF  # inside the first record: the synced part
        journal.write_bytes(bytes(damaged))

        refusals = lambda: log.read_text().count("refuses to start")  # noqa: E731
        wait_for(lambda: refusals() == 1, 30, "the restarted follower to refuse")
        assert "journal corrupt at byte offset" in log.read_text()
        assert "Traceback" not in log.read_text().split("refuses to start")[-1]
        # A restart loop would refuse again within its 2 s backoff; give it twice that.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            assert refusals() == 1, "the launcher restarted a node that refused to start"
            time.sleep(0.2)

        Path(entry["data_dir"]).rename(Path(entry["data_dir"]).with_name("data.damaged"))
        leader_cmd = max(s["cmd_index"] for s in nodes.values() if s)
        wait_for(
            lambda: (s := statuses().get(victim)) and s["cmd_index"] == leader_cmd + 20,
            60,
            "the follower to come back empty and catch up",
        )
        raw = json.loads(manifest.read_text())
    finally:
        output = stop_cluster_up(up, manifest, [n["pid"] for n in raw["nodes"]])
    assert f"{victim} exited (73): not restarting on the same data" in output, output


def test_services_up_prints_urls_that_work_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    import asyncio

    import asyncpg

    data = tmp_path / "services"
    up = subprocess.Popen(
        [*QB, "services", "up", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    manifest = data / "services.json"
    pids: list[int] = []
    try:
        raw = wait_for(
            lambda: manifest.exists() and json.loads(manifest.read_text()), 60, "services.json"
        )
        pids = [raw["postgres_pid"], raw["kafka_pid"]]

        async def ask() -> int:
            conn = await asyncpg.connect(raw["postgres_url"])
            try:
                return await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        assert asyncio.run(ask()) == 1
        host, port = raw["kafka_bootstrap"].rsplit(":", 1)
        import socket

        with socket.create_connection((host, int(port)), timeout=5):
            pass
    finally:
        up.send_signal(signal.SIGINT)
        try:
            output, _ = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            output, _ = up.communicate()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert up.returncode == 0, output
    assert f"postgres_url    {raw['postgres_url']}" in output
    assert f"kafka_bootstrap {raw['kafka_bootstrap']}" in output
    assert not [pid for pid in pids if pid_alive(pid)], "services up left a service behind"


def test_cluster_up_with_services_streams_and_indexer_tail_prints_each_event_once(
    tmp_path: Path,
) -> None:
    from api.sdk import AdminClient, read_credentials

    data = tmp_path / "qb"
    up = subprocess.Popen(
        [*QB, "cluster", "up", "--nodes", "3", "--data-dir", str(data), "--with-services"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    manifest = data / "cluster.json"
    services = data / "services" / "services.json"
    pids: list[int] = []
    try:
        raw = wait_for(
            lambda: (
                manifest.exists()
                and (doc := json.loads(manifest.read_text()))
                and all(n["pid"] for n in doc["nodes"])
                and doc
            ),
            60,
            "cluster.json with pids",
        )
        running = json.loads(services.read_text())
        pids = [running["postgres_pid"], running["kafka_pid"]]
        assert raw["postgres_url"] == running["postgres_url"]
        assert raw["kafka_bootstrap"] == running["kafka_bootstrap"]
        urls = [n["api_url"] for n in raw["nodes"]]
        with AdminClient(urls, read_credentials(Path(raw["admin_credentials"]))) as client:
            results = client.submit(
                [
                    {
                        "op": "deposit",
                        "account": f"a{i}",
                        "asset": "USD",
                        "amount": 10 + i,
                        "ref": f"d{i}",
                    }
                    for i in range(20)
                ]
            )
        last = results[-1]["events"][-1]["seq"]

        def indexed() -> dict | None:
            out = run("cluster", "status", "--cluster", str(manifest), "--json")
            nodes = json.loads(out.stdout)["nodes"] if out.returncode == 0 else {}
            ix = [(s or {}).get("indexer", {}) for s in nodes.values()]
            done = [i.get("active") for i in ix].count(True) == 1 and all(
                i.get("checkpoint_seq") == last for i in ix
            )
            return nodes if done else None

        wait_for(indexed, 60, "the indexer to write every event")
        tail = run("indexer", "tail", "--cluster", str(manifest), "--topic", "balances")
        assert tail.returncode == 0, tail.stderr
        events = [json.loads(line) for line in tail.stdout.splitlines()]
        assert [(e["account"], e["available"]) for e in events] == [
            (f"a{i}", 10 + i) for i in range(20)
        ]
        bad = run("indexer", "tail", "--cluster", str(manifest), "--topic", "nope")
        assert bad.returncode != 0 and "unknown topic 'nope'" in bad.stderr
        pids += [n["pid"] for n in raw["nodes"]]
    finally:
        output = stop_cluster_up(up, manifest, pids)
    assert up.returncode == 0, output
    assert "stopping services" in output
    assert not [pid for pid in pids if pid_alive(pid)], "cluster up left processes behind"


def test_the_demo_runs_to_the_end_and_reports_what_the_indexer_wrote() -> None:
    done = run("demo", "--orders", "400", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "all replicas hold the same state hash" in out
    rows = next(line for line in out.splitlines() if "PostgreSQL rows:" in line)
    counts = dict(part.rsplit(" ", 1) for part in rows.split(": ", 1)[1].split(", "))
    messages = next(line for line in out.splitlines() if "Kafka messages:" in line)
    assert int(counts["events"]) > 400 and int(counts["markets"]) == 1
    assert f"({counts['events']} events, each seq once after dedupe)" in messages
