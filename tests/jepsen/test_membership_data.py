"""The membership and data nemeses on real 3-node clusters (loopback, no namespaces) under a
small steady write load through the SDK: every start/stop cycle leaves the cluster converged
(one cmd_index and state hash on every member) with every acknowledged write on every member;
racing membership requests are serialised or one is refused; a node with damaged data refuses
to start or repairs a torn tail, never serves another state, and is resynced; `heal_all`
restores the cluster after a nemesis crashed in the middle of a fault. The last two tests are
bugs the nemeses found, fixed (ADR 0002, fixes 17 and 18)."""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest

from api.sdk import AdminClient, ApiError, ClusterUnavailable, OutcomeUnknown
from cluster.launcher import LocalCluster
from jepsen.nemesis import Context
from jepsen.nemesis.data import Data, _raise_commit_hint
from jepsen.nemesis.membership import Membership

pytestmark = pytest.mark.slow

CHANGES = {"added", "removed", "unchanged"}
REFUSALS = {"membership_change_in_progress", "membership_change_refused"}


def deposit(i: int) -> dict:
    return {"op": "deposit", "account": f"k{i}", "asset": "USD", "amount": i + 1, "ref": f"r{i}"}


class Deposits:
    """One deposit every `period_s` through the SDK, from a thread, to the cluster's first
    URLs (those of removed nodes stay in the list, as in the harness); what was
    acknowledged, and what may have been applied."""

    def __init__(self, cluster: LocalCluster, period_s: float = 0.04) -> None:
        self.urls = cluster.api_urls()
        self.creds = cluster.admin_credentials()
        self.period_s = period_s
        self.acked: dict[int, int] = {}
        self.unknown: set[int] = set()
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with AdminClient(self.urls, self.creds) as client:
            for i in itertools.count():
                if self.halt.wait(self.period_s):
                    return
                try:
                    result = client.submit([deposit(i)], deadline_s=10)[0]
                except OutcomeUnknown:
                    self.unknown.add(i)
                    continue
                except (ApiError, ClusterUnavailable):
                    continue  # definite: not applied
                events = result.get("events") or [{}]
                if events[0].get("type") == "balance" or events[0].get("reason") == "duplicate_ref":
                    self.acked[i] = i + 1
                else:
                    self.unknown.add(i)

    def wait_more(self, count: int = 5, timeout_s: float = 20) -> None:
        """`count` more acknowledgements: the clients keep working."""
        want = len(self.acked) + count
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < want:
            assert time.monotonic() < deadline, f"writes stalled at {len(self.acked)} acked"
            time.sleep(0.02)

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    made = LocalCluster.create(tmp_path / "cluster", 3, compaction_min_entries=40)
    made.exit_with_launcher = True
    try:
        made.start()
        made.wait_all_following(30)
        yield made
    finally:
        made.stop_all()


@pytest.fixture
def load(cluster: LocalCluster) -> Iterator[Deposits]:
    deposits = Deposits(cluster)
    deposits.thread.start()
    try:
        deposits.wait_more(5)
        yield deposits
    finally:
        deposits.stop()


def context(cluster: LocalCluster, seed: int) -> Context:
    def leader() -> str | None:
        for node_id in list(cluster.nodes):
            status = cluster.status(node_id, 0.5)
            if status and status["role"] == "leader":
                return node_id
        return None

    return Context(nodes=list(cluster.nodes), rng=random.Random(seed), leader=leader)


def assert_converged(cluster: LocalCluster, load: Deposits) -> dict:
    """Load stopped: every member runs, at one cmd_index and state hash, the leader lists
    exactly the members, and every acknowledged deposit is on every member as acknowledged."""
    load.stop()
    assert all(n.alive() for n in cluster.nodes.values()), cluster.statuses()
    statuses = cluster.wait_converged(30, nodes=list(cluster.nodes))
    leader = next(s for s in statuses.values() if s["role"] == "leader")
    assert {leader["node_id"], *(p["id"] for p in leader["peers"])} == set(cluster.nodes)
    with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as client:
        for node_id, node in cluster.nodes.items():
            rows = client.balances(node.config.api_url)["balances"]
            have = {int(r["account"][1:]): r["available"] for r in rows if r["account"][0] == "k"}
            lost = [i for i, amount in load.acked.items() if have.get(i) != amount]
            assert not lost, f"{node_id} lost acknowledged deposits {lost[:10]}"
            extra = [i for i in have if i not in load.acked and i not in load.unknown]
            assert not extra, f"{node_id} holds deposits never sent {extra[:10]}"
    return statuses


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(url + "/v1/cluster/status", timeout=2)
    except httpx.ConnectError:
        return True
    return False


# ---------------------------------------------------------------------- membership


def test_membership_changes_under_load_leave_the_members_converged(cluster, load):
    nemesis = Membership(cluster, actions=("remove", "grow"))
    ctx = context(cluster, seed=5)
    every = dict(cluster.nodes)  # every node process ever started, by id
    actions = set()
    for _cycle in range(4):
        did = nemesis.start(ctx)
        every.update(cluster.nodes)
        actions.add(did["action"])
        assert "error" not in did, did
        assert did["members"] == ctx.nodes == nemesis.members()  # ctx.nodes kept current
        assert len(did["members"]) in (2, 4)  # never below a majority of 3
        if did["action"] == "remove":
            gone = every[did["node"]]
            assert not gone.alive() and refuses_connections(gone.config.api_url)
        load.wait_more()  # the clients keep working with a member removed or added
        healed = nemesis.stop(ctx)
        every.update(cluster.nodes)
        assert not healed["errors"] and len(healed["members"]) == 3 == len(ctx.nodes), healed
        assert not nemesis.dirty, healed  # "lagging": a member that did not catch up in 30 s
        load.wait_more()
    assert actions == {"remove", "grow"}
    nemesis.heal_all()  # nothing left to heal: harmless
    assert_converged(cluster, load)
    # Removed nodes are stopped, and never counted: the launcher lists the members only.
    assert all(not p.alive() for nid, p in every.items() if nid not in cluster.nodes)
    assert len(every) > 3 and sorted(cluster.statuses()) == sorted(cluster.nodes)


def test_racing_membership_requests_are_serialised_or_one_refused(cluster, load):
    ctx = context(cluster, seed=11)
    outcomes = {}
    for race in ("add+add", "add+remove", "remove+remove-same"):
        nemesis = Membership(cluster, actions=("race",), races=(race,))
        before = set(ctx.nodes)
        did = nemesis.start(ctx)
        assert did["race"] == race
        requests = did["requests"]
        assert len(requests) == 2
        for request in requests:
            # Each operator's request ends in a change or a definite refusal, and every
            # answer on the way was a redirect, a refusal (retried when busy) or the change.
            assert request.get("change") in CHANGES or request["error"]["code"] in REFUSALS, did
            for answer in request["answers"]:
                assert (
                    answer.get("status") == 200
                    or answer.get("code") in REFUSALS | {"not_leader", "no_leader"}
                    or answer.get("error") == "ConnectError"  # a newcomer not listening yet
                ), request
        # The members are what the answered changes made, one after the other.
        added = {r["node"] for r in requests if r.get("change") == "added"}
        removed = {r["node"] for r in requests if r.get("change") == "removed"}
        assert set(did["members"]) == (before | added) - removed == set(cluster.nodes)
        outcomes[race] = sorted(r.get("change") or r["error"]["code"] for r in requests)
        load.wait_more()
        healed = nemesis.stop(ctx)
        assert len(healed["members"]) == 3 and not healed["errors"], healed
    assert outcomes["add+add"] == ["added", "added"]
    # The same remove twice: one removes it, the other finds it done (or is refused).
    same = outcomes["remove+remove-same"]
    assert same.count("removed") <= 1 and set(same) <= {"removed", "unchanged"} | REFUSALS
    assert_converged(cluster, load)


def test_heal_all_after_a_crash_in_the_middle_of_a_removal(cluster, load, monkeypatch):
    nemesis = Membership(cluster, actions=("remove",))
    ctx = context(cluster, seed=2)
    every = dict(cluster.nodes)
    forget = cluster.forget_node

    def crash(node_id: str) -> None:
        raise RuntimeError("the nemesis crashed after the change committed")

    # The removal commits, then the nemesis dies before the process is stopped: the launcher
    # still runs (and lists) a node that is no longer a member.
    monkeypatch.setattr(cluster, "forget_node", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        nemesis.start(ctx)
    assert len(cluster.nodes) == 3 and nemesis.dirty
    monkeypatch.setattr(cluster, "forget_node", forget)
    load.wait_more()
    nemesis.heal_all()
    nemesis.heal_all()  # idempotent
    every.update(cluster.nodes)
    assert len(cluster.nodes) == 3 and not nemesis.dirty
    assert all(not p.alive() for nid, p in every.items() if nid not in cluster.nodes)
    assert_converged(cluster, load)


# ---------------------------------------------------------------------- data


def test_damaged_data_is_refused_or_repaired_never_served_and_resynced(cluster, load):
    nemesis = Data(cluster, watch_s=1.0)
    ctx = context(cluster, seed=3)
    seen = []
    for kind in ("truncate", "torn-tail", "flip", "dump", "meta"):
        nemesis.kinds = (kind,)
        did = nemesis.start(ctx)
        assert "skipped" not in did, did
        damage = did["damage"]
        seen.append((damage["kind"], did["outcome"]))
        if damage["expect"] == "refuse":
            assert did["outcome"] == "refused" and did["exit_code"] == 73, did
            assert any("refuses to start" in line for line in did["log"]), did
        else:  # damage past the synced end only: dropped, and the node runs
            assert did["outcome"] == "running", did
            assert did["divergent_count"] == 0, did  # never a state no other member had
        if damage["kind"] == "torn-tail":
            assert any("dropping a torn tail" in line for line in did["log"]), did
        load.wait_more()  # the others serve meanwhile
        healed = nemesis.stop(ctx)
        assert healed["caught_up"] and healed["compared"] >= 1, healed
        assert healed["divergent_count"] == 0 and nemesis.damaged is None, healed
        assert healed.get("resynced", False) == (did["outcome"] == "refused"), healed
    assert ("torn-tail", "running") in seen and ("meta", "refused") in seen
    assert {k for k, _ in seen} >= {"truncate", "flip", "meta"}
    assert_converged(cluster, load)


def test_heal_all_after_a_crash_with_a_node_s_data_damaged(cluster, load, monkeypatch):
    nemesis = Data(cluster, kinds=("flip",), watch_s=1.0)
    ctx = context(cluster, seed=8)
    start = cluster.start

    def crash(node_id: str | None = None) -> None:
        raise RuntimeError("the nemesis crashed after damaging the data")

    monkeypatch.setattr(cluster, "start", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        nemesis.start(ctx)
    damaged = nemesis.damaged
    assert damaged is not None and not cluster.nodes[damaged].alive()
    monkeypatch.setattr(cluster, "start", start)
    nemesis.heal_all()
    nemesis.heal_all()
    assert nemesis.damaged is None and cluster.nodes[damaged].alive()
    moved = list(cluster.nodes[damaged].config.data_dir.parent.glob("data.damaged-*"))
    assert len(moved) == 1  # kept aside for the post-mortem
    assert_converged(cluster, load)


def test_a_flipped_commit_hint_is_refused_not_applied(tmp_path):
    """Found by the data nemesis; fixed in ADR 0002, fix 18 (SimNet scenario:
    tests/cluster/test_raft_fixes.py). raft.journal.meta had no checksum: a one-bit flip that
    raised its commit index hint made the node apply an entry that was never committed, and
    serve that state."""
    cluster = LocalCluster.create(tmp_path / "cluster", 3)
    cluster.exit_with_launcher = True
    try:
        cluster.start()
        cluster.wait_all_following(30)
        with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as client:
            client.submit([deposit(i) for i in range(5)])
        old = cluster.wait_for_leader(10)
        followers = [n for n in cluster.nodes if n != old]
        time.sleep(1.2)  # the commit hint is stored at most once a second
        for node_id in followers:
            cluster.kill(node_id)
        # An entry the old leader appends (and syncs) but can never commit.
        with AdminClient([cluster.nodes[old].config.api_url], cluster.admin_credentials()) as c:
            try:
                c.submit([deposit(100)], deadline_s=1.5)
            except OutcomeUnknown:
                pass
            except ClusterUnavailable:
                pytest.skip("the old leader stepped down before it appended the entry")
        status = cluster.status(old) or {}
        if not status.get("raft", {}).get("log_last_index", 0) > status.get("commit_index", 0):
            pytest.skip(f"no uncommitted entry in the old leader's log: {status}")
        cluster.kill(old)
        meta = cluster.nodes[old].config.data_dir / "raft.journal.meta"
        before = msgpack.unpackb(meta.read_bytes())
        _raise_commit_hint(meta, Context(nodes=[old], rng=random.Random(1)))
        assert msgpack.unpackb(meta.read_bytes())["commit"] > before["commit"]
        for node_id in followers:
            cluster.start(node_id)
        cluster.wait_for_leader(30, exclude=(old,))
        with AdminClient(
            [cluster.nodes[n].config.api_url for n in followers], cluster.admin_credentials()
        ) as client:
            client.submit([deposit(200)])  # the entry the cluster commits at that index
        cluster.start(old)
        process = cluster.nodes[old].process
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with AdminClient(cluster.api_urls(), cluster.admin_credentials()) as client:
                rows = client.balances(cluster.nodes[old].config.api_url)["balances"]
            # The uncommitted deposit must never be part of a state the node serves.
            assert "k100" not in {r["account"] for r in rows}, rows
            raise AssertionError("the node started on a damaged meta file") from None
        assert code == 73  # refused, as for any other damaged Raft file
    finally:
        cluster.stop_all()


def test_a_deposed_leader_with_an_uncommitted_removal_follows_the_new_leader(tmp_path):
    """Found by the membership nemesis; fixed in ADR 0002, fix 17 (SimNet scenario:
    tests/cluster/test_raft_membership.py). A leader that appended a removal of X it could not
    commit, and lost the leadership to X (which never got the entry), refused X's connections
    (pysyncobj drops peers absent from its latest configuration, transport.py 353-358): it
    never heard the new leader, never truncated the entry, and stayed cut off."""
    cluster = LocalCluster.create(tmp_path / "cluster", 3)
    cluster.exit_with_launcher = True
    try:
        cluster.start()
        cluster.wait_all_following(30)
        old = cluster.wait_for_leader(10)
        target, witness = sorted(n for n in cluster.nodes if n != old)
        config = cluster.nodes[target].config
        cluster.kill(witness)  # the removal cannot commit without it, nor reach it

        def remove() -> None:
            with (
                AdminClient([cluster.nodes[old].config.api_url], cluster.admin_credentials()) as c,
                contextlib.suppress(ApiError, ClusterUnavailable, OutcomeUnknown),
            ):
                c.change_membership("remove", target, config.raft_addr, config.api_url,
                                    deadline_s=3)  # fmt: skip

        operator = threading.Thread(target=remove, daemon=True)
        operator.start()
        status = wait_status(cluster, old, lambda s: s["role"] != "leader")  # stepped down
        if target in {p["id"] for p in status["peers"]}:
            pytest.skip(f"{old} did not append the removal: {status}")
        cluster.signal(old, signal.SIGSTOP)  # the target stands while the old leader sleeps
        cluster.start(witness)
        # The removed target must lead (the witness may win the election first: then it hands
        # the leadership over, the old leader still asleep).
        for _attempt in range(5):
            status = wait_status(cluster, witness, lambda s: s["leader"] in (target, witness))
            if status["leader"] == target:
                break
            with (
                AdminClient(
                    [cluster.nodes[witness].config.api_url], cluster.admin_credentials()
                ) as c,
                contextlib.suppress(ApiError, ClusterUnavailable),
            ):
                c.transfer_leader(target, deadline_s=5)
            wait_status(cluster, witness, lambda s: s["leader"] != witness, timeout_s=2, fail=False)
        else:
            pytest.fail(f"the leadership did not move to {target}: {cluster.status(witness)}")
        cluster.signal(old, signal.SIGCONT)
        operator.join(10)
        with AdminClient(
            [cluster.nodes[n].config.api_url for n in (target, witness)],
            cluster.admin_credentials(),
        ) as client:
            client.submit([deposit(1)])
        commit = cluster.status(target)["commit_index"]
        # The deposed leader hears the new one, drops its uncommitted entry, and catches up.
        caught_up = wait_status(
            cluster, old, lambda s: s["commit_index"] >= commit, timeout_s=5, fail=False
        )
        assert caught_up is not None, {n: cluster.status(n) for n in cluster.nodes}
    finally:
        for node_id in cluster.nodes:
            with contextlib.suppress(ProcessLookupError):
                cluster.signal(node_id, signal.SIGCONT)
        cluster.stop_all()


def wait_status(cluster: LocalCluster, node_id: str, predicate, *, timeout_s: float = 10,
                fail: bool = True) -> dict | None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster.status(node_id, 0.5)
        if status is not None and predicate(status):
            return status
        time.sleep(0.05)
    if fail:
        raise TimeoutError(f"{node_id}: {cluster.status(node_id)}")
    return None
