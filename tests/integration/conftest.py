"""Real node processes on free loopback ports; every process a test starts, it stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.sdk import AdminClient
from cluster.launcher import LocalCluster
from cluster.workload import check_deposits


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator:
    made: list[LocalCluster] = []

    def make(n: int = 3, **settings: object) -> LocalCluster:
        cluster = LocalCluster.create(tmp_path / f"cluster{len(made)}", n, **settings)
        made.append(cluster)
        cluster.exit_with_launcher = True  # a test run killed mid-way leaves no node behind
        cluster.start()
        cluster.wait_all_following(30)  # every node up, every API port listening
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop_all()


def admin(cluster: LocalCluster) -> AdminClient:
    return AdminClient(cluster.api_urls(), cluster.admin_credentials())


def assert_acked_present(cluster: LocalCluster, acked: dict[int, int], unknown: set[int]) -> None:
    """Every acknowledged `deposit` is in every live node's state, exactly as acknowledged,
    and none that was neither acknowledged nor of unknown outcome (`check_deposits`)."""
    found = check_deposits(cluster, acked, unknown)
    for node_id, held in found["nodes"].items():
        assert not held["missing"], f"{node_id} lost acknowledged deposits {held['missing'][:10]}"
        assert not held["extra_count"], (
            f"{node_id} holds deposits never submitted: {held['extra'][:10]}"
        )
