"""The kill and pause nemeses record whether their target led when it was chosen (asked after
the fault, a killed or paused leader no longer answers as one: every kill read `false`)."""

from __future__ import annotations

import random
import signal

import pytest

from jepsen.nemesis import Context
from jepsen.nemesis.process import Kill, Pause


class Control:
    """Node processes as the harness's control sees them: n2 leads while it runs."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.calls: list[tuple] = []

    def leader(self) -> str | None:
        return None if "n2" in self.down else "n2"

    def kill(self, node: str) -> None:
        self.calls.append(("kill", node))
        self.down.add(node)

    def signal(self, node: str, signum: int) -> None:
        self.calls.append(("signal", node, signum))
        if signum == signal.SIGSTOP:
            self.down.add(node)
        else:
            self.down.discard(node)

    def start(self, node: str) -> None:
        self.calls.append(("start", node))
        self.down.discard(node)


@pytest.mark.parametrize("nemesis", [Kill, Pause])
def test_was_leader_is_who_led_when_the_target_was_chosen(nemesis) -> None:
    seen = {True: 0, False: 0}
    for seed in range(40):
        control = Control()
        ctx = Context(nodes=["n1", "n2", "n3"], rng=random.Random(seed),
                      leader=control.leader, control=control)  # fmt: skip
        fault = nemesis()
        did = fault.start(ctx)
        assert did["was_leader"] is (did["node"] == "n2"), did
        seen[did["was_leader"]] += 1
        fault.stop(ctx)
        assert control.down == set()
    assert seen[True] > 10 and seen[False] > 10  # the leader about half the time, or more
