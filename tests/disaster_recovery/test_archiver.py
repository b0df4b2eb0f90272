"""Which node archives: one follower at a time, never the leader, never one without a leader."""

import pytest

from disaster_recovery.archiver import designated


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
