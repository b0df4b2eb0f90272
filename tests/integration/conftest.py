"""Real node processes on free loopback ports; every process a test starts, it stops."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.sdk import AdminClient
from cluster.launcher import LocalCluster


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


def wait_for(predicate, timeout_s: float, what: str):
    """Poll `predicate` until it returns something true (returned), or fail after
    `timeout_s` naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
