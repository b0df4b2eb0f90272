"""Membership changes, one at a time (ADR 0002, fix 10), on pysyncobj's real handlers.

pysyncobj's guard against a second change before the first commits (syncobj.py 1356-1369)
checks ``__changeClusterIDx``, which nothing ever sets: a leader appends any number of changes
back to back, and its majority moves before any of them commits. And a restarted node takes
its configuration from the entries it *applies*, while Raft (section 6) says a server uses the
latest configuration in its log, committed or not. Same harness as test_raft_fixes.py:
``plain`` runs pysyncobj's ``SyncObj``, ``hardened`` ours, with the same script.
"""

from __future__ import annotations

import threading

import pytest
from pysyncobj.config import FAIL_REASON

from cluster.raft import RaftReplica, RaftSettings, SubmitErrorReason
from cluster.raft.storage import read_dump
from cluster.workload import wait_for

from .conftest import KINDS, KINDS_AND_UNSAFE, LOSSY, SimNet, free_port, sim_conf
from .test_raft_fixes import (
    DEADLINE_S,
    POLL_S,
    CountingMachine,
    call_and_wait,
    call_until_accepted,
    submit_and_wait,
)

# Plain pysyncobj's MetaStorer.getMeta leaks the meta file's handle (journal.py 361).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in.*_io\.FileIO name=[^>]*raft\.journal\.meta'"
    ":pytest.PytestUnraisableExceptionWarning"
)

ADDRS = [f"10.0.0.{i}:4321" for i in range(1, 6)]
A, B, C, D, E = ADDRS


def members(node) -> set[str]:
    """The node's configuration: itself and the peers it counts toward a majority."""
    return {node.addr} | {n.id for n in node.sync._SyncObj__otherNodes}


def conf_for(sim: SimNet, kind: str, addr: str):
    """Plain pysyncobj keeps its log in memory unless given files; give it the journal and
    dump a durable node has (ours always has them)."""
    if kind != "plain":
        return sim_conf(dynamicMembershipChange=True)
    data_dir = sim.tmp_path / addr.replace(":", "_")
    data_dir.mkdir(parents=True, exist_ok=True)
    return sim_conf(
        dynamicMembershipChange=True,
        journalFile=str(data_dir / "raft.journal"),
        fullDumpFile=str(data_dir / "raft.dump"),
    )


def five_addresses_three_members(sim: SimNet, kind: str):
    """A, B, C are the cluster; D and E are started, waiting to be added (as a launcher
    starts a new node with every member in its configuration before asking the leader)."""
    trio = [
        sim.add(kind, a, [p for p in (A, B, C) if p != a], conf=conf_for(sim, kind, a))
        for a in (A, B, C)
    ]
    newcomers = [
        sim.add(kind, a, [p for p in ADDRS if p != a], conf=conf_for(sim, kind, a)) for a in (D, E)
    ]
    return (*trio, *newcomers)


class Outcomes(dict):
    def callback(self, name):
        def done(result, reason):
            assert name not in self, f"{name}: callback fired twice"
            self[name] = reason

        return done


@pytest.mark.parametrize("kind", KINDS_AND_UNSAFE)
def test_two_changes_in_one_tick_lose_an_acknowledged_write_only_on_plain(sim: SimNet, kind):
    """A leads {A,B,C}; it accepts "add D" and "add E" in one tick while B and C are slow to
    hear from it. Plain: its majority is now 3 of 5, so A, D and E commit both changes and a
    write W (all acknowledged); A crashes; B wins with C under the old configuration and
    commits its own entry at W's index. W is gone, and index 3 holds different committed
    entries on D and on B. Ours refuses the second change (a definite outcome) until the first
    commits, and the first cannot commit without B or C: W is never acknowledged."""
    a, b, c, d, _e = five_addresses_three_members(sim, kind)
    sim.elect(a)
    sim.settle()
    sim.held |= {(A, B), (A, C)}  # B and C are slow to hear from A from here on

    outcomes = Outcomes()
    a.sync.addNodeToCluster(D, outcomes.callback("add D"))
    a.sync.addNodeToCluster(E, outcomes.callback("add E"))
    a.tick()  # both requests are handled in this one tick
    sim.settle()
    a.propose(b"W")
    sim.settle()

    if kind in LOSSY:
        assert outcomes == {"add D": FAIL_REASON.SUCCESS, "add E": FAIL_REASON.SUCCESS}
        assert a.acknowledged() == [b"W"]
    else:
        assert outcomes == {"add E": FAIL_REASON.REQUEST_DENIED}  # "add D" still uncommitted
        assert a.sync.membership_changes_refused == 1
        assert a.acknowledged() == []
        assert members(a) == {A, B, C, D}

    sim.crash(a)
    sim.held.clear()
    sim.elect(b)  # votes of C under {A, B, C}
    sim.settle()

    lost = [w for w in a.acknowledged() if w not in b.state or w not in c.state]
    if kind in LOSSY:
        assert lost == [b"W"]
        # Index 3 is committed on D (A's "add D", term 1) and on B (B's no-op, term 2).
        assert d.commit_index() >= 3 and b.commit_index() >= 3
        assert dict(d.log())[3] == 1 and dict(b.log())[3] == 2
    else:
        assert lost == []
        assert b.state == c.state


@pytest.mark.parametrize("kind", ["hardened"])
def test_the_next_change_is_accepted_once_the_previous_one_commits(sim: SimNet, kind):
    a, b, c, d, e = five_addresses_three_members(sim, kind)
    sim.elect(a)
    sim.settle()
    outcomes = Outcomes()
    a.sync.addNodeToCluster(D, outcomes.callback("add D"))
    sim.settle()
    assert outcomes == {"add D": FAIL_REASON.SUCCESS}
    assert a.sync.membership_change_busy() is None
    a.sync.addNodeToCluster(E, outcomes.callback("add E"))
    sim.settle()
    assert outcomes["add E"] == FAIL_REASON.SUCCESS
    assert members(a) == members(b) == members(d) == members(e) == set(ADDRS)
    a.propose(b"W")
    sim.settle()
    assert all(node.state == [b"W"] for node in (a, b, c, d, e))


def test_a_new_leader_refuses_a_change_until_it_commits_in_its_term(sim: SimNet):
    """Upstream's own rule (syncobj.py 1357), kept: before the leader's no-op commits, a change
    could be decided against a configuration an older leader was still changing."""
    a, _b, _c, _d, _e = five_addresses_three_members(sim, "hardened")
    a.force_election_timeout()
    a.tick()
    for voter in (B, C):
        sim.deliver(A, voter)  # the vote requests
    for voter in (B, C):
        sim.deliver(voter, A, count=1)  # the votes: A leads; its no-op waits on the links
    assert a.is_leader()
    assert a.sync.membership_change_busy() == (
        "this leader has not yet committed an entry of its own term"
    )
    outcomes = Outcomes()
    a.sync.addNodeToCluster(D, outcomes.callback("add D"))
    a.tick()
    assert outcomes == {"add D": FAIL_REASON.REQUEST_DENIED}
    sim.settle()
    assert a.sync.membership_change_busy() is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_restarted_follower_keeps_the_uncommitted_configuration_in_its_log(
    sim: SimNet, kind, tmp_path
):
    """B holds "add D" (not yet committed) when it restarts. Raft (section 6): a server uses
    the latest configuration in its log, committed or not. Plain takes configuration entries
    only as it applies them, so the restarted B counts a majority of {A, B, C} while its log
    says {A, B, C, D}; ours reads the configuration from the log at start-up."""
    a, b, _c, _d, _e = five_addresses_three_members(sim, kind)
    sim.elect(a)
    sim.settle()
    sim.held |= {(B, A), (C, A), (D, A)}  # the acks of "add D" never reach A: it stays uncommitted
    a.sync.addNodeToCluster(D, None)
    sim.settle()
    assert any(idx == 3 for idx, _term in b.log())
    assert b.commit_index() < 3
    assert members(b) == {A, B, C, D}  # taken when appended, by both

    sim.crash(b)
    restarted = sim.add(kind, B, [A, C], conf=conf_for(sim, kind, B), data_dir=b.data_dir)
    assert any(idx == 3 for idx, _term in restarted.log())
    if kind == "plain":
        assert members(restarted) == {A, B, C}  # "add D" is in its log, not in its majority
    else:
        assert members(restarted) == {A, B, C, D}


def test_a_dump_records_the_configuration_at_its_own_index(sim: SimNet):
    """The dump replaces the log up to its index; entries past it stay in the journal and are
    read again at start-up. Upstream writes the *current* configuration into the dump, which
    includes changes past the dump's index that may never commit."""
    a, b, _c, _d, _e = five_addresses_three_members(sim, "hardened")
    sim.elect(a)
    a.propose(b"X1")
    sim.settle()
    sim.held |= {(B, A), (C, A), (D, A)}
    a.sync.addNodeToCluster(D, None)  # appended at 4, never committed
    sim.settle()
    assert members(b) == {A, B, C, D} and b.commit_index() == 3
    b.sync.forceLogCompaction()
    sim.settle()
    header, _blob = read_dump(b.data_dir / "raft.dump")
    assert header.index == 3
    assert set(header.cluster) == {A, B, C}
    assert members(b) == {A, B, C, D}


def test_real_replicas_serialise_changes_and_answer_retries(tmp_path):
    """Three ``RaftReplica`` on loopback. Two adds asked for back to back (two operators
    racing): one is committed, the other refused with a definite BUSY, then accepted once the
    first has committed. Asking again for what already holds answers "unchanged" without a log
    entry (a retry after an unknown outcome is safe); the leader refuses to remove itself."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(5)]
    members, newcomers = addrs[:3], addrs[3:]

    def replica(addr, peers):
        settings = RaftSettings(
            self_addr=addr,
            peers=tuple(p for p in peers if p != addr),
            password="pw",
            data_dir=tmp_path / addr.split(":")[1],
            fsync=False,
        )
        return RaftReplica(settings, CountingMachine())

    replicas = {a: replica(a, members) for a in members}
    replicas.update({a: replica(a, addrs) for a in newcomers})
    try:
        leader_addr = wait_for(
            lambda: next((a for a in members if replicas[a].is_leader()), None),
            DEADLINE_S,
            "a leader",
            interval_s=POLL_S,
        )
        leader = replicas[leader_addr]
        wait_for(
            lambda: leader.status()["membership_busy"] is None,
            DEADLINE_S,
            "the leader's no-op",
            interval_s=POLL_S,
        )

        outcomes, done = {}, threading.Event()

        def record(addr):
            def callback(result, error):
                outcomes[addr] = (result, error)
                if len(outcomes) == 2:
                    done.set()

            return callback

        for addr in newcomers:
            leader.add_node(addr, record(addr))
        assert done.wait(DEADLINE_S)
        results = sorted(
            repr((r, e.reason if e else None, e.definite if e else None))
            for r, e in outcomes.values()
        )
        assert results == [repr(("added", None, None)), repr((None, SubmitErrorReason.BUSY, True))]
        refused = next(a for a, (_r, e) in outcomes.items() if e is not None)

        result, error = call_until_accepted(leader.add_node, refused)
        assert (result, error) == ("added", None)
        assert {p["id"] for p in leader.status()["peers"]} == set(addrs) - {leader_addr}
        assert call_and_wait(leader.add_node, refused) == ("unchanged", None)

        _r, error = call_and_wait(leader.remove_node, leader_addr)
        assert error.reason == SubmitErrorReason.REJECTED and error.definite
        assert "transfer leadership first" in error.detail

        assert call_until_accepted(leader.remove_node, refused) == ("removed", None)
        assert call_and_wait(leader.remove_node, refused) == ("unchanged", None)
        _r, error, _t = submit_and_wait(leader, b"after the changes")
        assert error is None
    finally:
        for r in replicas.values():
            r.destroy()


def three_members(sim: SimNet, kind: str):
    return [
        sim.add(kind, a, [p for p in (A, B, C) if p != a], conf=conf_for(sim, kind, a))
        for a in (A, B, C)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_a_deposed_leader_with_an_uncommitted_removal_follows_the_new_leader(sim: SimNet, kind):
    """A leads {A, B, C}; C is cut off; A appends "remove B", which cannot commit without C,
    and stops sending to B (it is not in A's latest configuration). A stalls (a long pause);
    B wins term 2 with C, which never saw the removal, and commits W2. A resumes.

    Raft (thesis 4.1): a server accepts AppendEntries from a leader that is not in its latest
    configuration; B's entries replace the uncommitted removal and A's configuration goes back
    to {A, B, C}. Plain pysyncobj's transport refuses connections from addresses outside the
    latest configuration (transport.py 353-358) and never connects to them: A never hears B,
    never truncates the removal, and is cut off from the cluster for good (across restarts: the
    removal is in its log)."""
    a, b, c = three_members(sim, kind)
    sim.elect(a)
    a.propose(b"W1")
    sim.settle()
    assert c.state == [b"W1"]

    sim.isolate(C)
    outcomes = Outcomes()
    a.sync.removeNodeFromCluster(B, outcomes.callback("remove B"))
    sim.settle()
    removal = a.log()[-1]
    assert members(a) == {A, C} and removal not in b.log()
    assert a.commit_index() < removal[0]

    stalled = (a,)
    sim.held |= {(B, A), (C, A)}
    sim.heal(C)
    b.force_election_timeout()
    b.tick()
    sim.step(stalled=stalled)
    assert b.is_leader() and b.term() == 2
    b.propose(b"W2")
    for _ in range(6):
        sim.step(stalled=stalled)
    assert b.acknowledged() == [b"W2"] and c.state == [b"W1", b"W2"]

    sim.held.clear()  # A resumes
    sim.settle(20)
    if kind == "plain":
        assert a.log()[-1] == removal  # never replaced
        assert a.state == [b"W1"] and members(a) == {A, C}
    else:
        assert a.log() == b.log()
        assert a.state == [b"W1", b"W2"]
        assert members(a) == members(b) == {A, B, C}
        assert outcomes == {"remove B": FAIL_REASON.DISCARDED}  # replaced: a definite failure


def test_a_removed_peer_keeps_its_links_until_the_removal_commits(sim: SimNet):
    """Fix 17's other half: once the removal commits, the removed node is refused and not
    dialled (upstream's behaviour, now at commit instead of at append)."""
    a, _b, c = three_members(sim, "hardened")
    sim.elect(a)
    sim.settle()
    sim.held |= {(C, A)}  # C's acknowledgements wait: the removal cannot commit yet
    a.sync.removeNodeFromCluster(B, None)
    sim.settle()
    assert members(a) == {A, C}
    assert a.sync.lingering_peers() == [B] and B in a.transport.known
    assert a.sync.raft_status()["lingering_peers"] == [B]
    sim.held.clear()
    sim.settle()
    assert a.commit_index() == a.log()[-1][0]
    assert a.sync.lingering_peers() == [] and B not in a.transport.known
    assert c.sync.lingering_peers() == [] and B not in c.transport.known


def test_a_deposed_leader_restarted_with_the_removal_in_its_log_follows_the_new_leader(
    sim: SimNet,
):
    """The same as the test above, with A restarted (its `node.toml` still lists B: the
    launcher rewrites peers only once a change commits) before it hears the new leader. Its
    configuration comes from its log ({A, C}), and B's link from the removal not committed."""
    a, b, _c = three_members(sim, "hardened")
    sim.elect(a)
    a.propose(b"W1")
    sim.settle()
    sim.isolate(C)
    a.sync.removeNodeFromCluster(B, None)
    sim.settle()
    sim.crash(a)
    sim.heal(C)
    sim.elect(b)
    b.propose(b"W2")
    sim.settle()
    assert b.acknowledged() == [b"W2"]

    restarted = sim.add(
        "hardened", A, [B, C], conf=conf_for(sim, "hardened", A), data_dir=a.data_dir
    )
    assert members(restarted) == {A, C} and restarted.sync.lingering_peers() == [B]
    sim.settle()
    assert restarted.log() == b.log()
    assert restarted.state == [b"W1", b"W2"]
    assert members(restarted) == {A, B, C} and restarted.sync.lingering_peers() == []


def test_a_vote_from_a_lingering_peer_counts_toward_no_majority(sim: SimNet):
    """A crafted vote: B is linked (its removal is not committed) but out of A's
    configuration {A, C}; A, a candidate, needs C's vote and B's must not stand in for it."""
    a, b, c = three_members(sim, "hardened")
    sim.elect(a)
    sim.settle()
    sim.isolate(C)
    a.sync.removeNodeFromCluster(B, None)
    sim.settle()
    sim.step(1001.0, stalled=(b, c))  # A hears no member for leaderFallbackTimeout: steps down
    assert a.role() == "follower"
    a.force_election_timeout()
    a.tick()
    assert a.role() == "candidate"
    dropped = a.sync.non_member_answers_dropped
    a.transport.receive(B, {"type": "response_vote", "term": a.term()})
    a.tick()
    assert a.role() == "candidate"
    assert a.sync.non_member_answers_dropped == dropped + 1
