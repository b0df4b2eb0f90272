"""A deposit workload for fault tests: unique refs, one account per deposit, amount i + 1."""

from __future__ import annotations

import itertools
import threading
import time

from api.sdk import ApiError, ClusterUnavailable
from cluster.launcher import LocalCluster

from .conftest import admin


def deposit(i: int) -> dict:
    return {"op": "deposit", "account": f"k{i}", "asset": "USD", "amount": i + 1, "ref": f"r{i}"}


class DepositLoad:
    """Submits deposits with unique refs from a thread; records what was acknowledged."""

    def __init__(self, cluster: LocalCluster, per_request: int = 5) -> None:
        self.client = admin(cluster)
        self.per_request = per_request
        self.acked: dict[int, int] = {}  # i -> amount
        self.unknown: set[int] = set()
        self.resent = 0  # acknowledged as duplicate_ref: the resend itself took a cmd_index
        self.counter = itertools.count()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            batch = [next(self.counter) for _ in range(self.per_request)]
            try:
                results = self.client.submit([deposit(i) for i in batch], deadline_s=10)
            except (ApiError, ClusterUnavailable):  # definite ones too: unknown only allows more
                self.unknown.update(batch)
                continue
            for i, result in zip(batch, results, strict=True):
                events = result.get("events")
                if events and events[0]["type"] == "balance":
                    self.acked[i] = i + 1
                elif events and events[0].get("reason") == "duplicate_ref":
                    # The client resent a request whose first copy was applied before the
                    # leader died: the ref says it is in the log, exactly once.
                    self.acked[i] = i + 1
                    self.resent += 1
                elif result.get("error", {}).get("code") == "outcome_unknown":
                    self.unknown.add(i)

    def __enter__(self) -> DepositLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()

    def wait_acked(self, n: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} acked"
            time.sleep(0.02)


def assert_acked_present(cluster: LocalCluster, acked: dict[int, int], unknown: set[int]) -> None:
    """Every acknowledged deposit is in every live node's state, exactly as acknowledged."""
    with admin(cluster) as client:
        for node_id, proc in cluster.nodes.items():
            if not proc.alive():
                continue
            rows = client.balances(proc.config.api_url)["balances"]
            have = {
                int(r["account"][1:]): r["available"] for r in rows if r["account"].startswith("k")
            }
            missing = [i for i in acked if have.get(i) != acked[i]]
            assert not missing, f"{node_id} lost acknowledged deposits {missing[:10]}"
            extra = [i for i in have if i not in acked and i not in unknown]
            assert not extra, f"{node_id} holds deposits never submitted: {extra[:10]}"
