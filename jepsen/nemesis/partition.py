"""The partition nemesis: cut links between nodes with iptables DROP rules in their namespaces.

A grudge (Jepsen's model) maps each node to the nodes it must not hear from. Node A's grudge
against B is one rule in A's namespace: `-A INPUT -s B -j DROP`. Only INPUT, as Jepsen does:
- a rule says who A does not hear, so a one-way grudge stays one-way (the 3-node
  majorities ring is one: a hears b, b hears c, c hears a, and no more); a rule on OUTPUT too
  would make every grudge symmetric;
- a symmetric grudge puts a rule at both ends, so nothing crosses either way: both sides of
  an open TCP connection just see silence, as in a real partition, and each node's own
  timeouts must notice (an OUTPUT DROP would add nothing: TCP retransmits through it as
  through a lost packet). Along a one-way cut a connection carries at most the first
  segments before its ACKs go missing, which is what TCP does over such a link.
No rule names the root namespace's address: the harness's clients reach every node's API
through any partition (a shape may add `CLIENT` to a grudge to cut them off too).

The shape functions are pure (nodes and a seeded `random.Random` in, a grudge out);
`rules` turns a grudge into each node's iptables-restore text; `Partition` applies it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

from ..net import Net, NetError, require_tool
from . import Context

Grudge = dict[str, frozenset[str]]

CLIENT = "client"  # the root namespace (the harness's clients), as a grudge member
SHAPES = ("halves", "one", "leader", "ring", "bridge")


# ---------------------------------------------------------------------- shapes (pure)


def complete_grudge(components: Iterable[Iterable[str]]) -> Grudge:
    """Each node hears only the nodes of its own component."""
    parts = [frozenset(c) for c in components]
    everyone = frozenset().union(*parts)
    return {node: everyone - part for part in parts for node in part}


def bisect(nodes: Sequence[str]) -> tuple[list[str], list[str]]:
    """The first floor(n/2) nodes and the rest (the majority when n is odd)."""
    half = len(nodes) // 2
    return list(nodes[:half]), list(nodes[half:])


def _shuffled(nodes: Iterable[str], rng: random.Random) -> list[str]:
    order = sorted(nodes)  # the same seed gives the same shape whatever order nodes came in
    rng.shuffle(order)
    return order


def halves(nodes: Iterable[str], rng: random.Random) -> Grudge:
    """A random minority and majority that do not hear each other."""
    return complete_grudge(bisect(_shuffled(nodes, rng)))


def isolate(nodes: Iterable[str], node: str) -> Grudge:
    """`node` hears nobody and nobody hears it; the others hear each other."""
    nodes = list(nodes)
    if node not in nodes:
        raise ValueError(f"{node!r} is not one of {nodes}")
    return complete_grudge([[node], [n for n in nodes if n != node]])


def one(nodes: Iterable[str], rng: random.Random) -> Grudge:
    """A random node, isolated."""
    nodes = sorted(nodes)
    return isolate(nodes, rng.choice(nodes))


def majorities_ring(nodes: Iterable[str], rng: random.Random) -> Grudge:
    """Every node hears a majority (itself included), and no two nodes the same one:
    nodes in a random ring, each hearing the window of `majority` nodes centred on itself
    (Jepsen's majorities-ring; with 3 nodes one-way: each hears one neighbour)."""
    ring = _shuffled(nodes, rng)
    n = len(ring)
    if n < 3:
        raise ValueError(f"a majorities ring needs at least 3 nodes, not {n}")
    m = n // 2 + 1
    everyone = frozenset(ring)
    grudge = {}
    for start in range(n):
        window = [ring[(start + k) % n] for k in range(m)]
        grudge[window[m // 2]] = everyone - frozenset(window)
    return grudge


def bridge(nodes: Iterable[str], rng: random.Random) -> Grudge:
    """Two halves that do not hear each other, and one node of the majority that hears and
    is heard by both (Jepsen's bridge)."""
    minority, majority = bisect(_shuffled(nodes, rng))
    if not minority or len(majority) < 2:
        raise ValueError("a bridge needs at least 3 nodes")
    middle = majority[0]
    grudge = {n: others - {middle} for n, others in complete_grudge([minority, majority]).items()}
    grudge[middle] = frozenset()
    return grudge


def shape_grudge(
    shape: str, nodes: Sequence[str], rng: random.Random, leader: str | None = None
) -> Grudge:
    """The grudge of a named shape; `leader` is for `leader` (a random node when None)."""
    if shape == "halves":
        return halves(nodes, rng)
    if shape == "one" or (shape == "leader" and leader is None):
        return one(nodes, rng)
    if shape == "leader":
        return isolate(nodes, leader)
    if shape == "ring":
        return majorities_ring(nodes, rng)
    if shape == "bridge":
        return bridge(nodes, rng)
    raise ValueError(f"unknown partition shape {shape!r} (one of {', '.join(SHAPES)})")


def hears(grudge: Mapping[str, Iterable[str]], nodes: Iterable[str]) -> dict[str, frozenset[str]]:
    """Who each node hears, itself included (the complement of its grudge)."""
    everyone = frozenset(nodes)
    return {n: everyone - frozenset(grudge.get(n, ())) for n in everyone}


def as_json(grudge: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    return {node: sorted(others) for node, others in sorted(grudge.items())}


# ---------------------------------------------------------------------- rules (pure)


def rules(
    grudge: Mapping[str, Iterable[str]], addresses: Mapping[str, str], client: str
) -> dict[str, str]:
    """Each node's whole filter table as iptables-restore text: applying it replaces every
    rule of ours at once (an empty grudge heals). `addresses`: node -> address."""
    unknown = set(grudge) - set(addresses)
    if unknown:
        raise ValueError(f"grudge names nodes that are not in the net: {sorted(unknown)}")
    texts = {}
    for node in addresses:
        lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        for other in sorted(grudge.get(node, ())):
            if other == node:
                raise ValueError(f"{node} cannot hold a grudge against itself")
            source = client if other == CLIENT else addresses.get(other)
            if source is None:
                raise ValueError(f"{node}'s grudge names {other!r}, not in the net")
            lines.append(f"-A INPUT -s {source}/32 -j DROP")
        lines.append("COMMIT")
        texts[node] = "\n".join(lines) + "\n"
    return texts


# ---------------------------------------------------------------------- the nemesis


class Partition:
    """`start` cuts the network into one of `shapes` (picked with the run's rng), `stop` and
    `heal_all` heal it. `apply(grudge)` and `heal()` are the direct controls."""

    name = "partition"

    def __init__(self, net: Net, shapes: Sequence[str] = SHAPES) -> None:
        unknown = set(shapes) - set(SHAPES)
        if unknown or not shapes:
            raise ValueError(f"partition shapes: {sorted(unknown) or 'none'}; known: {SHAPES}")
        self.net = net
        self.shapes = tuple(shapes)
        self.grudge: Grudge = {}  # what is applied now

    def apply(self, grudge: Mapping[str, Iterable[str]]) -> None:
        """Replace the rules of every node with this grudge's (nodes it omits hear all)."""
        texts = rules(grudge, self.net.hosts(), self.net.client_address)
        self.grudge = {n: frozenset(o) for n, o in grudge.items()}
        self._install(texts)

    def heal(self) -> None:
        """Flush every node's filter table: everything hears everything."""
        self.apply({})

    def heal_all(self) -> None:
        """`heal`, skipping nodes whose namespace is gone (after `Net.close` nothing is left
        to heal, and before `Net.open` nothing was cut); NetError if a flush failed."""
        if self.net.subnet is not None:
            texts = rules({}, self.net.hosts(), self.net.client_address)
            self._install({n: t for n, t in texts.items() if self.net.has_namespace(n)})
        self.grudge = {}

    def _install(self, texts: Mapping[str, str]) -> None:
        """Each node's table at once (iptables-restore replaces it); tries every node."""
        restore = require_tool("iptables-restore")
        failed = []
        for node, text in texts.items():
            try:
                self.net.exec(node, [restore, "-w"], stdin=text)
            except NetError as exc:
                failed.append(str(exc))
        if failed:
            raise NetError("partition rules not installed: " + "; ".join(failed))

    def installed(self, node: str) -> list[str]:
        """The rules in the node's namespace now (`iptables -S`, policies left out)."""
        out = self.net.exec(node, [require_tool("iptables"), "-w", "-S"])
        return [line for line in out.splitlines() if not line.startswith("-P ")]

    def start(self, ctx: Context) -> dict:
        shape = ctx.rng.choice(self.shapes)
        leader = ctx.leader() if shape == "leader" else None
        grudge = shape_grudge(shape, list(ctx.nodes), ctx.rng, leader)
        self.apply(grudge)
        done = {"shape": shape, "grudge": as_json(grudge)}
        if shape == "leader":
            done["leader"] = leader
        return done

    def stop(self, ctx: Context) -> dict:
        had = as_json(self.grudge)
        self.heal()
        return {"healed": had}
