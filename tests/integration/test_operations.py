"""A cluster served over HTTPS, watched the way an operator does: `/readyz`, `/metrics`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.sdk import AdminClient, Client, tls_context
from cluster.workload import wait_for
from tests.certs import self_signed


def samples(text: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_an_https_cluster_is_ready_measured_and_keys_are_created_over_tls(
    make_cluster, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path / "tls")
    cluster = make_cluster(3, tls_cert_file=cert, tls_key_file=key)
    urls = cluster.api_urls()
    manifest = json.loads(cluster.manifest_path.read_text())
    assert all(n["api_url"].startswith("https://127.0.0.1:") for n in manifest["nodes"])
    http = httpx.Client(verify=tls_context(cert), timeout=5)

    def all_ready() -> bool:
        try:  # a node may not listen yet: wait_for_leader needs only a majority
            answers = [http.get(url + "/readyz") for url in urls]
        except httpx.TransportError:
            return False
        return all(a.status_code == 200 and a.json()["ready"] for a in answers)

    try:
        wait_for(all_ready, 20, "every node ready")
        with pytest.raises(httpx.HTTPError):  # the API port speaks TLS only
            httpx.get(urls[0].replace("https://", "http://") + "/healthz", timeout=5)

        # A key through the CLI, over TLS, trusted via the cluster's certificate.
        made = subprocess.run(
            [
                sys.executable,
                "-m",
                "cluster",
                "keys",
                "create",
                "--account",
                "alice",
                "--cluster",
                str(cluster.manifest_path),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        raw = json.loads(made.stdout)
        from api.auth import Credentials

        alice = Credentials(raw["key_id"], raw["secret"], "trader", "alice")
        with AdminClient(urls, cluster.admin_credentials(), verify=cert) as admin:
            results = admin.submit(
                [
                    {
                        "op": "deposit",
                        "account": "alice",
                        "asset": "USD",
                        "amount": 500,
                        "ref": "tls-1",
                    }
                ]
            )
        assert "events" in results[0], results
        with Client(urls, alice, verify=cert) as client:
            assert client.balances()["USD"]["available"] == 500

        # The load generator trusts the cluster's certificate the same way.
        flow = subprocess.run(
            [
                sys.executable,
                "-m",
                "cluster",
                "loadgen",
                "--cluster",
                str(cluster.manifest_path),
                "--rate",
                "20",
                "--duration",
                "1",
                "--accounts",
                "2",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert flow.returncode == 0, flow.stderr
        report = json.loads(flow.stdout)
        assert report["sent"] == report["acked"] == 20 and report["failed"] == 0

        leader = cluster.wait_for_leader(20)
        figures = samples(http.get(cluster.nodes[leader].config.api_url + "/metrics").text)
        assert figures[("qb_raft_role", (("role", "leader"),))] == 1
        assert figures[("qb_commit_latency_seconds_count", ())] >= 2  # the key, the deposit
        # Its steps: every commit was queued, proposed, and answered back on the API's thread;
        # the leader's journal was synced and the entries applied.
        commits = figures[("qb_commit_latency_seconds_count", ())]
        for step in (
            "qb_raft_queue_seconds",
            "qb_raft_commit_seconds",
            "qb_commit_handoff_seconds",
        ):
            assert figures[(f"{step}_count", ())] >= commits, step
            assert figures[(f"{step}_sum", ())] > 0, step
        assert figures[("qb_raft_sync_seconds_count", ())] >= 1
        assert figures[("qb_raft_apply_seconds_count", ())] >= commits
        assert (
            figures[("qb_raft_queue_seconds_sum", ())] + figures[("qb_raft_commit_seconds_sum", ())]
            <= figures[("qb_commit_latency_seconds_sum", ())]
        )
        assert figures[("qb_batch_size_entries_sum", ())] >= 2
        assert figures[("qb_raft_commit_index", ())] >= figures[("qb_raft_applied_index", ())] > 0
        assert figures[("qb_raft_leader_known", ())] == 1
        assert figures[("qb_cmd_index", ())] >= 1
        assert (
            figures[
                (
                    "qb_http_requests_total",
                    (("method", "POST"), ("route", "/v1/admin/commands"), ("status", "200")),
                )
            ]
            >= 1
        )

        # Without a quorum nobody can serve: the last node standing stops being ready.
        survivor = next(nid for nid in cluster.nodes if nid != leader)
        for nid in cluster.nodes:
            if nid != survivor:
                cluster.kill(nid)
        url = cluster.nodes[survivor].config.api_url
        refusal = wait_for(
            lambda: (r := http.get(url + "/readyz")).status_code == 503 and r,
            20,
            "the survivor to report not ready",
        )
        assert refusal.json()["error"]["code"] == "not_ready"
        assert refusal.headers["Retry-After"] == "1"
        assert http.get(url + "/healthz").status_code == 200  # alive, though not ready
    finally:
        http.close()
