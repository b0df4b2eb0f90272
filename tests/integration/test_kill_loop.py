"""Kill the leader 40 times under load (journal and dump on, compaction frequent).

The three pysyncobj failover bugs (PYSYNCOBJ.md) showed up in exactly this loop: lost
acknowledged writes, diverged replicas, commands applied twice. With the hardened adapter
none may happen. QB_KILLS overrides the number of kills (e.g. for a longer soak).
"""

from __future__ import annotations

import os
import re

from cluster.workload import DepositLoad

from .conftest import admin, assert_acked_present

KILLS = int(os.environ.get("QB_KILLS", "40"))


def test_forty_leader_kills_lose_nothing_diverge_nowhere_apply_nothing_twice(make_cluster) -> None:
    # Small compaction thresholds so snapshots are taken and installed during the loop.
    cluster = make_cluster(3, compaction_min_entries=50, compaction_min_time_s=0.5)
    leaders = []
    with DepositLoad.on(cluster, per_request=10) as load:
        for _ in range(KILLS):
            load.wait_acked(len(load.acked) + 50, timeout_s=30)
            leader = cluster.wait_for_leader(20)
            leaders.append(leader)
            cluster.kill(leader)
            cluster.wait_for_leader(20, exclude=(leader,))
            cluster.start(leader)  # back from its data dir, as a follower
        load.wait_acked(len(load.acked) + 50, timeout_s=30)
    with admin(cluster) as client:
        client.barrier()
    statuses = cluster.wait_converged(60)
    assert len({s["state_hash"] for s in statuses.values()}) == 1, statuses
    assert_acked_present(cluster, load.acked, load.unknown)
    applied = next(iter(statuses.values()))["cmd_index"]
    floor = len(load.acked) + load.resent
    assert floor <= applied <= floor + len(load.unknown), (floor, applied, len(load.unknown))
    assert len(set(leaders)) >= 2  # leadership really moved around
    compacted = [s["raft"]["log_first_index"] for s in statuses.values()]
    assert max(compacted) > 1, f"no log compaction happened: {compacted}"
    for node_id, node in cluster.nodes.items():
        log = (node.config_path.parent / "node.log").read_text(errors="replace")
        assert not re.search(r"CRITICAL|may have diverged|Traceback", log), (
            f"{node_id}: {log[-2000:]}"
        )
