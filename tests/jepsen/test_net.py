"""The harness's network: nodes in their own namespaces, partitions as iptables rules.

The shape tests are pure. The others build namespaces (root, iptables: `make test` installs
it) and leave nothing behind, which the fixtures assert even when a test fails.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.sdk import AdminClient, ClusterUnavailable, OutcomeUnknown
from cluster.launcher import LocalCluster
from cluster.workload import wait_for
from jepsen import net as netmod
from jepsen.nemesis import Context
from jepsen.nemesis.partition import (
    CLIENT,
    Partition,
    bridge,
    halves,
    hears,
    isolate,
    majorities_ring,
    one,
    rules,
    shape_grudge,
)
from jepsen.net import Net, NetUnavailable, ours, requirements_missing

MISSING = requirements_missing()
needs_net = pytest.mark.skipif(
    bool(MISSING), reason=f"network namespaces unavailable: {'; '.join(MISSING)}"
)


def deposit(i: int) -> dict:
    return {"op": "deposit", "account": f"k{i}", "asset": "USD", "amount": i + 1, "ref": f"r{i}"}


# ---------------------------------------------------------------------- shapes (pure)

SIZES = [3, 5]


def nodes_of(n: int) -> list[str]:
    return [f"n{i}" for i in range(1, n + 1)]


def assert_well_formed(grudge: dict, nodes: list[str]) -> None:
    assert set(grudge) <= set(nodes)
    for node, others in grudge.items():
        assert node not in others, f"{node} holds a grudge against itself"
        assert others <= set(nodes)


def symmetric(grudge: dict) -> bool:
    return all(node in grudge.get(other, ()) for node, others in grudge.items() for other in others)


@pytest.mark.parametrize("n", SIZES)
def test_halves_cut_a_random_minority_from_the_majority(n: int) -> None:
    nodes = nodes_of(n)
    seen = set()
    for seed in range(20):
        grudge = halves(nodes, random.Random(seed))
        assert_well_formed(grudge, nodes)
        assert symmetric(grudge)
        components = {frozenset(s) for s in hears(grudge, nodes).values()}
        assert sorted(len(c) for c in components) == [n // 2, n - n // 2]
        assert frozenset().union(*components) == set(nodes)
        seen |= components
    assert len(seen) > 2, "the split is random"
    assert halves(nodes, random.Random(7)) == halves(list(reversed(nodes)), random.Random(7))


@pytest.mark.parametrize("n", SIZES)
def test_isolating_one_node_cuts_it_both_ways(n: int) -> None:
    nodes = nodes_of(n)
    grudge = isolate(nodes, "n2")
    assert_well_formed(grudge, nodes)
    assert symmetric(grudge)
    heard = hears(grudge, nodes)
    assert heard["n2"] == {"n2"}
    assert all(heard[o] == set(nodes) - {"n2"} for o in nodes if o != "n2")
    picked = set()
    for seed in range(20):
        alone = [k for k, v in hears(one(nodes, random.Random(seed)), nodes).items() if len(v) == 1]
        assert len(alone) == 1
        picked.add(alone[0])
    assert len(picked) > 1, "the node is random"
    assert shape_grudge("leader", nodes, random.Random(0), "n3") == isolate(nodes, "n3")
    # No leader known: a random node instead, still one isolated node.
    lonely = shape_grudge("leader", nodes, random.Random(0), None)
    assert sum(len(v) == 1 for v in hears(lonely, nodes).values()) == 1


@pytest.mark.parametrize("n", SIZES)
def test_majorities_ring_each_node_hears_a_different_majority(n: int) -> None:
    nodes = nodes_of(n)
    for seed in range(10):
        grudge = majorities_ring(nodes, random.Random(seed))
        assert_well_formed(grudge, nodes)
        heard = hears(grudge, nodes)
        assert all(node in heard[node] for node in nodes)
        assert all(len(h) == n // 2 + 1 for h in heard.values()), heard
        assert len({frozenset(h) for h in heard.values()}) == n, "two nodes hear the same"
        # 5 nodes: a ring of neighbours (symmetric); 3: a one-way cycle (a hears b hears c).
        assert symmetric(grudge) == (n == 5)


@pytest.mark.parametrize("n", SIZES)
def test_bridge_joins_two_halves_through_one_node(n: int) -> None:
    nodes = nodes_of(n)
    for seed in range(10):
        grudge = bridge(nodes, random.Random(seed))
        assert_well_formed(grudge, nodes)
        assert symmetric(grudge)
        heard = hears(grudge, nodes)
        middle = [node for node, h in heard.items() if h == set(nodes)]
        assert len(middle) == 1
        sides = {frozenset(h - set(middle)) for node, h in heard.items() if node not in middle}
        assert len(sides) == 2
        a, b = sides
        assert not a & b and a | b == set(nodes) - set(middle)
        assert sorted([len(a), len(b)]) == [n // 2, n - n // 2 - 1]
        # The middle and the bigger side are a majority: a leader there can commit.
        assert (max(len(a), len(b)) + 1) * 2 > n


def test_shapes_need_enough_nodes() -> None:
    with pytest.raises(ValueError):
        majorities_ring(["n1", "n2"], random.Random(0))
    with pytest.raises(ValueError):
        bridge(["n1", "n2"], random.Random(0))
    with pytest.raises(ValueError):
        shape_grudge("spiral", nodes_of(3), random.Random(0))


def test_rules_drop_input_from_the_grudged_addresses_only() -> None:
    addresses = {"n1": "10.9.9.1", "n2": "10.9.9.2", "n3": "10.9.9.3"}
    texts = rules({"n1": {"n2", "n3"}, "n3": {CLIENT}}, addresses, "10.9.9.254")
    assert "-A INPUT -s 10.9.9.2/32 -j DROP\n-A INPUT -s 10.9.9.3/32 -j DROP\n" in texts["n1"]
    assert "-A " not in texts["n2"]  # a node the grudge omits hears everyone
    assert "-A INPUT -s 10.9.9.254/32 -j DROP" in texts["n3"]
    assert all("OUTPUT ACCEPT" in t and "-A OUTPUT" not in t for t in texts.values())
    healed = rules({}, addresses, "10.9.9.254")
    assert all("-A " not in t and t.endswith("COMMIT\n") for t in healed.values())
    with pytest.raises(ValueError):
        rules({"n4": {"n1"}}, addresses, "10.9.9.254")
    with pytest.raises(ValueError):
        rules({"n1": {"n1"}}, addresses, "10.9.9.254")


def test_net_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netmod, "_effective_capabilities", lambda: 0)
    monkeypatch.setattr(netmod, "tool", lambda name: None)
    with pytest.raises(NetUnavailable) as caught:
        Net(["n1", "n2"]).open()
    message = str(caught.value)
    for needed in ("CAP_NET_ADMIN", "CAP_SYS_ADMIN", "`ip`", "iptables"):
        assert needed in message


# ---------------------------------------------------------------------- namespaces


def root_rules() -> str:
    return subprocess.run(
        [netmod.require_tool("iptables"), "-w", "-S"], capture_output=True, text=True, check=True
    ).stdout


def assert_nothing_left(run: str, root_rules_before: str) -> None:
    left = {kind: [n for n in names if n.startswith(run)] for kind, names in ours().items()}
    assert left == {"namespaces": [], "links": [], "owners": []}, left
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert run not in links
    assert root_rules() == root_rules_before, "the root namespace's firewall changed"


@pytest.fixture
def netted(tmp_path: Path) -> Iterator[tuple[Net, LocalCluster, Partition]]:
    """A 3-node cluster, each node in its own namespace; torn down, and checked gone."""
    rules_before = root_rules()
    net = Net(["n1", "n2", "n3"])
    partition = Partition(net)
    cluster: LocalCluster | None = None
    try:
        net.open()
        cluster = LocalCluster.create(tmp_path / "cluster", 3, hosts=net.hosts())
        cluster.exit_with_launcher = True
        cluster.wrap = net.wrap
        cluster.start()
        cluster.wait_all_following(30)
        yield net, cluster, partition
    finally:
        try:
            partition.heal_all()
            if cluster is not None:
                cluster.stop_all()
        finally:
            net.close()
    assert_nothing_left(net.run, rules_before)


@pytest.mark.slow
@needs_net
def test_isolated_leader_steps_down_and_rejoins(netted) -> None:
    net, cluster, partition = netted
    assert all(n.config.api_host == net.address(nid) for nid, n in cluster.nodes.items())
    creds = cluster.admin_credentials()
    with AdminClient(cluster.api_urls(), creds) as client:  # from the root namespace
        assert client.submit([deposit(0)])[0]["events"][0]["type"] == "balance"
    old = cluster.wait_for_leader(10)
    majority = [n for n in net.nodes if n != old]

    partition.apply(isolate(net.nodes, old))
    assert partition.installed(old) == [
        f"-A INPUT -s {net.address(n)}/32 -j DROP" for n in majority
    ]
    new = cluster.wait_for_leader(15, exclude=(old,))
    assert new in majority
    wait_for(lambda: cluster.status(old)["role"] != "leader", 5, f"{old} to step down")
    # The old leader's side refuses a write, definitely (not applied, nothing unknown)...
    with (
        AdminClient([cluster.nodes[old].config.api_url], creds, deadline_s=2) as client,
        pytest.raises(ClusterUnavailable) as refused,
    ):
        client.submit([deposit(1)])
    assert not isinstance(refused.value, OutcomeUnknown)
    # ...while the majority takes one.
    urls = [cluster.nodes[n].config.api_url for n in majority]
    with AdminClient(urls, creds) as client:
        client.submit([deposit(2)])

    partition.heal()
    assert all(partition.installed(n) == [] for n in net.nodes)
    statuses = cluster.wait_converged(20)
    assert len(statuses) == 3
    assert {s["cmd_index"] for s in statuses.values()} == {2}  # deposits 0 and 2, not 1
    assert len({s["state_hash"] for s in statuses.values()}) == 1
    assert cluster.wait_all_following(10) in net.nodes


@pytest.mark.slow
@needs_net
def test_partition_nemesis_starts_and_heals_every_shape(netted) -> None:
    net, cluster, partition = netted
    ctx = Context(nodes=net.nodes, rng=random.Random(3), leader=lambda: cluster.wait_for_leader())
    for shape in ("halves", "one", "leader", "ring", "bridge"):
        partition.shapes = (shape,)
        done = partition.start(ctx)
        assert done["shape"] == shape
        for node, others in done["grudge"].items():
            assert len(partition.installed(node)) == len(others)
        assert partition.stop(ctx) == {"healed": done["grudge"]}
        assert all(partition.installed(n) == [] for n in net.nodes)
    cluster.wait_all_following(20)
    partition.heal_all()
    partition.heal_all()  # safe twice


@pytest.mark.slow
@needs_net
def test_a_crashed_runs_network_is_cleaned_up() -> None:
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from jepsen.net import Net; n = Net(['n1', 'n2']); n.open(); "
            "print(n.run, flush=True); os._exit(0)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert crashed in ours()["links"]
    assert crashed in Net.cleanup_stale()
    rules_before = root_rules()
    assert_nothing_left(crashed, rules_before)
    with Net(["n1"]) as live:  # a live run is never taken for a stale one
        assert live.run not in Net.cleanup_stale()
        assert live.run in ours()["owners"]
        assert live.has_namespace("n1")
    assert_nothing_left(live.run, rules_before)


_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = server.accept()
    size, first = 0, None
    while data := conn.recv(1 << 16):
        first = first or time.monotonic()
        size += len(data)
    conn.sendall(f"{size} {time.monotonic() - first}".encode())
    conn.close()
"""


@pytest.mark.slow
@needs_net
def test_a_limited_link_delivers_at_the_rate_asked_and_unlimited_at_once() -> None:
    """24 KB sent to a node behind a 256 kbit/s limit (32 KB/s, a 2 KB burst) take over
    0.6 s to arrive; unlimited, a fraction of that. Only the traffic to the node is slowed."""
    rules_before = root_rules()
    with Net(["n1", "n2"]) as net:
        receiver = subprocess.Popen(
            net.wrap("n1", [sys.executable, "-c", _RECEIVER, net.address("n1"), "2"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(receiver.stdout.readline())

            def spread_s() -> float:
                """Seconds from the first to the last byte of 24 KB, at the receiver."""
                with socket.create_connection((net.address("n1"), port), timeout=10) as conn:
                    conn.sendall(b"x" * 24_000)
                    conn.shutdown(socket.SHUT_WR)
                    size, spread = conn.recv(100).split()
                assert int(size) == 24_000
                return float(spread)

            net.limit_rate("n1", 256)
            limited = spread_s()
            net.unlimit_rate("n1")
            unlimited = spread_s()
        finally:
            receiver.kill()
            receiver.wait()
            receiver.stdout.close()
    assert limited > 0.5, limited  # (24 - 2) KB at 32 KB/s: 0.69 s
    assert unlimited < limited / 3, (unlimited, limited)
    with pytest.raises(ValueError):
        Net(["n1"]).limit_rate("n1", 1)
    assert_nothing_left(net.run, rules_before)
