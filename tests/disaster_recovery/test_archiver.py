"""Which node archives (one follower at a time, never the leader, never one without a
leader), and which segments a restore reads."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disaster_recovery.archiver import designated
from disaster_recovery.segments import chain, name_of


@pytest.mark.parametrize(
    "node, view, expected",
    [
        ("n2", {"role": "follower", "leader": "n1", "connected": ["n1", "n3"]}, True),
        ("n3", {"role": "follower", "leader": "n1", "connected": ["n1", "n2"]}, False),
        ("n1", {"role": "follower", "leader": "n3", "connected": ["n2", "n3"]}, True),
        # n3 is cut off from n2: it cannot know whether n2 archives, so it does (a race of
        # two archivers writes the same entries: segments agree where they overlap).
        ("n3", {"role": "follower", "leader": "n1", "connected": ["n1"]}, True),
        ("n1", {"role": "leader", "leader": "n1", "connected": ["n2", "n3"]}, False),
        ("n2", {"role": "candidate", "leader": None, "connected": ["n3"]}, False),
        ("n2", {"role": "follower", "leader": None, "connected": []}, False),
        ("n2", {}, False),  # the node has said nothing yet
    ],
)
def test_designated(node, view, expected):
    assert designated(node, view) is expected


def chain_by_definition(spans, after):
    """At each step, of the segments holding the next index wanted, the one reaching furthest."""
    out, wanted = [], after + 1
    while True:
        holding = [s for s in spans if s[0] <= wanted <= s[1]]
        if not holding:
            return out
        best = max(holding, key=lambda s: s[1])
        out.append(best)
        wanted = best[1] + 1


@given(
    st.lists(
        st.tuples(st.integers(1, 60), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1])),
        max_size=30,
        unique=True,
    ),
    st.integers(0, 60),
)
def test_chain_is_the_furthest_reaching_cover(pairs, after):
    spans = sorted((first, last, name_of(first, last)) for first, last in pairs)
    assert chain(spans, after) == chain_by_definition(spans, after)
