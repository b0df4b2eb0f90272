"""Nemeses that act on node processes: kill (SIGKILL, restart later), pause (SIGSTOP, the
classic long-GC leader; SIGCONT to heal), restart-all (stop and restart the whole cluster).

Targets are chosen with the context's seeded generator: the leader (when one is known) or a
random node, as Jepsen's `node-start-stopper` does with `:primaries` and `:one`.
"""

from __future__ import annotations

import contextlib
import signal

from . import Context


def _target(ctx: Context, leader_share: float = 0.5) -> tuple[str, bool]:
    """(the node, whether it led when chosen): asked before the fault, which changes it."""
    leader = ctx.leader()
    if leader is not None and ctx.rng.random() < leader_share:
        return leader, True
    node = ctx.rng.choice(sorted(ctx.nodes))
    return node, node == leader


class Kill:
    """SIGKILL a node (the leader half of the time); `stop` starts it again from its data."""

    name = "kill"

    def __init__(self) -> None:
        self.killed: list[str] = []
        self._control = None

    def start(self, ctx: Context) -> dict:
        assert ctx.control is not None
        self._control = ctx.control
        node, was_leader = _target(ctx)
        ctx.control.kill(node)
        if node not in self.killed:
            self.killed.append(node)
        return {"node": node, "was_leader": was_leader}

    def stop(self, ctx: Context) -> dict:
        assert ctx.control is not None
        started = list(self.killed)
        for node in started:
            ctx.control.start(node)
        self.killed.clear()
        return {"restarted": started}

    def heal_all(self) -> None:
        if self._control is not None:
            for node in list(self.killed):
                self._control.start(node)
            self.killed.clear()


class Pause:
    """SIGSTOP a node (the leader half of the time): it holds its sockets and its belief that
    it leads, then resumes as if nothing happened. `stop` sends SIGCONT."""

    name = "pause"

    def __init__(self) -> None:
        self.paused: list[str] = []
        self._control = None

    def start(self, ctx: Context) -> dict:
        assert ctx.control is not None
        self._control = ctx.control
        node, was_leader = _target(ctx)
        ctx.control.signal(node, signal.SIGSTOP)
        if node not in self.paused:
            self.paused.append(node)
        return {"node": node, "was_leader": was_leader}

    def stop(self, ctx: Context) -> dict:
        resumed = list(self.paused)
        self.heal_all()
        return {"resumed": resumed}

    def heal_all(self) -> None:
        if self._control is not None:
            for node in list(self.paused):
                with contextlib.suppress(ProcessLookupError):  # killed meanwhile: none to resume
                    self._control.signal(node, signal.SIGCONT)
            self.paused.clear()


class RestartAll:
    """Stop every node (SIGKILL: no clean shutdown), then, at `stop`, start them all again."""

    name = "restart-all"

    def __init__(self) -> None:
        self.down: list[str] = []
        self._control = None

    def start(self, ctx: Context) -> dict:
        assert ctx.control is not None
        self._control = ctx.control
        for node in sorted(ctx.nodes):
            ctx.control.kill(node)
            self.down.append(node)
        return {"nodes": list(self.down)}

    def stop(self, ctx: Context) -> dict:
        started = list(self.down)
        self.heal_all()
        return {"restarted": started}

    def heal_all(self) -> None:
        if self._control is not None:
            for node in list(self.down):
                self._control.start(node)
            self.down.clear()
