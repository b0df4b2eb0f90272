"""Terms on every answer (ADR 0002, fixes 11 and 12), on pysyncobj's real handlers.

pysyncobj's AppendEntries answer (``next_node_idx``, syncobj.py 1098-1106) carries no term,
and the leader applies it whatever term it was sent in (1070-1083); a follower drops an
AppendEntries of a lower term without answering (945). Same harness as test_raft_fixes.py.
"""

from __future__ import annotations

import pytest

from .conftest import KINDS_AND_UNSAFE, LOSSY, SimNet

W = [b"W1", b"W2"]


@pytest.mark.parametrize("kind", KINDS_AND_UNSAFE)
def test_a_stale_term_acknowledgement_never_counts_toward_commit(sim: SimNet, kind):
    """Five nodes. In term 1, B acknowledges A's entries 3..7; the answer is delayed. C wins
    term 2 (with D and E) and A's uncommitted entries are replaced by C's. A wins term 3 (with
    D and E); then B's term-1 answer arrives: plain sets matchIndex[B] = 7 although B still
    holds term-1 entries there, and commits W1, W2 with A, D and the phantom B (acknowledged).
    A crashes; C wins term 4 with B and E, whose logs W1, W2 never reached: they are lost.
    Ours drops the answer of another term: W1, W2 wait for a real majority."""
    a, b, c, d, e = sim.cluster(kind, size=5)
    A, B, C, D, E = (n.addr for n in (a, b, c, d, e))
    sim.elect(a)
    sim.settle()

    # Term 1: A's batch reaches only B, and B's answers are delayed on the way back.
    sim.held |= {(A, C), (A, D), (A, E), (B, A)}
    for i in range(5):
        a.propose(b"X%d" % i)
    sim.settle()
    assert b.log()[-1] == (7, 1) and a.commit_index() == 2
    delayed = sim.queued(B, A)
    assert any(
        m["type"] == "next_node_idx" and m["next_node_idx"] == 8 and m["success"] for m in delayed
    )
    for dst in (C, D, E):
        sim.drop(A, dst)

    # Term 2: C wins with D and E; A steps down and its entries 3..7 are replaced by C's.
    # B hears nothing of term 2.
    sim.held = {(B, A), (C, B), (B, C), (A, B)}
    sim.elect(c)
    sim.settle()
    assert a.log()[-1] == (3, 2) and b.log()[-1] == (7, 1)

    # Term 3: A wins with D and E; only D receives anything from A afterwards.
    sim.held = {(B, A), (A, B), (B, C), (C, B), (A, C), (A, E)}
    a.force_election_timeout()
    a.tick()
    for voter in (D, E):
        sim.deliver(A, voter, count=1)
        sim.deliver(voter, A)
    assert a.is_leader() and a.term() == 3
    sim.drop(A, E)
    sim.drop(A, C)
    sim.deliver(B, A)  # B's term-1 answers arrive at last
    for payload in W:
        a.propose(payload)
    for _ in range(4):
        sim.step()
        sim.drop(A, E)
        sim.drop(A, C)
    assert dict(d.log()).get(6) == 3  # W2 reached D

    if kind in LOSSY:
        assert a.acknowledged() == W
    else:
        assert a.acknowledged() == []
        assert a.sync.stale_replies_dropped >= 1

    # Term 4: A crashes; C wins with B and E.
    sim.crash(a)
    sim.held = {(C, D), (D, C), (E, D), (D, E), (B, D), (D, B)}
    c.force_election_timeout()
    c.tick()
    sim.deliver_all()
    assert c.is_leader()
    sim.settle()
    lost = [w for w in a.acknowledged() if w not in c.state or w not in b.state]
    if kind in LOSSY:
        assert lost == W
    else:
        assert lost == []


def _timed_cluster(sim: SimNet):
    """Three nodes with the real timing (RaftSettings' defaults); A leads, then pre-vote is on
    (as for every real node)."""
    nodes = sim.cluster(
        "hardened",
        raftMinTimeout=0.15,
        raftMaxTimeout=0.3,
        appendEntriesPeriod=0.04,
        leaderFallbackTimeout=0.75,
    )
    sim.elect(nodes[0])
    for node in nodes:
        node.sync._pre_vote = True
    return nodes


def _run(sim: SimNet, seconds: float, until=None, step_s: float = 0.02) -> float:
    """Step the whole network; return the time it took ``until()`` to hold (or ``seconds``)."""
    waited = 0.0
    while waited < seconds:
        if until is not None and until():
            return waited
        sim.step(step_s)
        waited += step_s
    return waited


def _term_rises_while_cut_off(sim: SimNet):
    """How a follower's term rises although pre-vote is on (found by a randomized run of this
    harness: per-link cuts, tick stalls, delivery delays).

    The partition is applied one link at a time, as per-link proxies (or firewall rules) do.
    C is cut from the leader A first and still reaches B. A stalls (a long GC, a starved
    process) and B stops hearing it; after the minimum election timeout B grants C's
    pre-vote (it would vote: no leader heard recently, C's log as good as its own). C stands
    in term T+1, and the B-C link is cut before C's RequestVote crosses it. A recovers and B
    follows it again in term T: C is alone, one term ahead."""
    a, b, c = _timed_cluster(sim)
    _run(sim, 0.5)
    term = a.term()
    sim.cut(a.addr, c.addr)  # the first link of "isolate C"
    _run(sim, 0.1)
    sim.clock.advance(0.16)  # A stalls: no heartbeat for longer than the minimum timeout
    c.force_election_timeout()  # C has not heard A since the cut: its timer runs out
    c.tick()  # C asks for a pre-vote
    sim.deliver(c.addr, b.addr)
    sim.deliver(b.addr, c.addr)  # B has not heard A for 0.16 s: it grants
    assert c.sync._pre_vote_won
    sim.cut(b.addr, c.addr)  # the second link, before C's RequestVote crosses it
    c.tick()  # C stands in term T+1, alone
    _run(sim, 0.2)  # A is back: B follows it in term T
    assert a.is_leader() and b.sync._SyncObj__raftLeader is not None
    assert (a.term(), b.term(), c.term()) == (term, term, term + 1)
    return a, b, c


def test_how_a_cut_off_follower_moves_ahead_of_the_leader_term(sim: SimNet):
    _term_rises_while_cut_off(sim)


def test_a_node_whose_term_is_ahead_rejoins_the_cluster(sim: SimNet):
    """After the heal, the leader's AppendEntries carry a lower term than C's. Before fix 12,
    C dropped them without a word, the leader never learned of the higher term, and C's own
    elections were refused by pre-vote (B hears the leader): C stayed out for as long as the
    leader lived (11.5 s in the run that found it). Now C answers with its term, the leader
    steps down, and the next election includes C."""
    a, b, c = _term_rises_while_cut_off(sim)
    a.propose(b"while C was away")
    _run(sim, 0.3)
    sim.mend(a.addr, c.addr)
    sim.mend(b.addr, c.addr)

    def c_follows_and_caught_up() -> bool:
        leaders = [n for n in (a, b, c) if n.is_leader()]
        return (
            len(leaders) == 1
            and c.sync._SyncObj__raftLeader is not None
            and c.last_applied() == leaders[0].last_applied()
            and b"while C was away" in c.state
        )

    took = _run(sim, 5.0, c_follows_and_caught_up)
    assert c_follows_and_caught_up(), (
        f"C still out after {took:.2f} s (terms {a.term()}, "
        f"{b.term()}, {c.term()}; roles {a.role()}, {b.role()}, {c.role()})"
    )
    assert took < 1.5
