"""The membership nemesis: members removed and added while the clients run, one change at a
time or two at once (two operators racing), as docs/operating/replace-a-node.md does them.

`start` makes one change, chosen with the run's rng:

- `remove`: a member (the leader a third of the time: the launcher moves leadership away
  first, as an operator must), through `LocalCluster.remove_node`, which stops its process.
- `grow`: one more member, through `LocalCluster.add_node` (a new id, an empty data
  directory: it catches up from the leader).
- `race`: two changes sent at the same moment from two threads, each an operator with its own
  `AdminClient` and its own order of node URLs (so one of them usually lands on a follower
  and is redirected): `add+add`, `add+remove`, the same `remove` twice, or two different
  removes (5 nodes). The cluster must serialise them (both answered, one after the other) or
  refuse one (`409 membership_change_in_progress` while the other is uncommitted, `409
  membership_change_refused` for a leader asked to remove itself). Every HTTP answer each
  request got is recorded (`answers`), with its final outcome.

`stop` restores the original member count: a removed member is replaced by a new node (a new
id and data directory: the runbook forbids reusing a removed node's id or data, and the
launcher never does), an extra one is removed (any member, chosen with the rng: over a run
the original members are replaced one by one). `heal_all` does the same with no context
(the newest members go first), after reconciling the launcher with the cluster.

Safety of the schedule itself: no change ever leaves fewer members than a majority of the
original count (a 3-node cluster loses at most one member, a 5-node cluster two), so the
last node is never removed, and the members left can always elect a leader once the other
faults are healed. Racing removes are only sent when both may succeed within that bound.
The last `keep_original` (1) of the original members is never removed: the run's clients
were given the original URLs only, and through a live one of them they reach whichever node
leads (a follower redirects); with every original replaced they would reach nobody.

Reconciling: after every change (and in `heal_all`) the leader's view, read after a
committed barrier (so every change sent before it is committed or gone), is the truth. A node
the launcher runs that is not a member (removed by a racing request, or a newcomer whose add
was refused or lost) is stopped and dropped from the launcher, so `cluster.statuses()`,
`wait_converged` and the run's final reads count the members only; the members' `node.toml`
and `cluster.json` are rewritten; a member whose process died (a newcomer that failed at its
start) is started again and named in `restarted`. Then every member must apply the
leader's commit index, as the runbook asks before the next change (a newcomer installs a
snapshot first); one that does not within 30 s is named in `lagging`, and a heal with a
lagging member is no heal (`heal_all` raises). Only the racing operators skip that wait.
The removed nodes' URLs stay in the clients' lists: their processes are stopped, so the SDK
gets a refused connection and tries the next URL.

`ctx.nodes` is the current members (jepsen/nemesis/__init__.py): when the run hands a list,
this nemesis keeps it current in place, so the other nemeses act on members only.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Sequence

import httpx

from api.sdk import AdminClient, ApiError, ClusterUnavailable, OutcomeUnknown
from cluster.launcher import LocalCluster

from . import Context

ACTIONS = ("remove", "grow", "race")
RACES = ("add+add", "add+remove", "remove+remove-same", "remove+remove")
CHANGE_DEADLINE_S = 30.0  # one membership request with its retries (the SDK's default)
SETTLE_TIMEOUT_S = 30.0  # a leader, and a barrier committed, after a change
CATCH_UP_TIMEOUT_S = 30.0  # every member at the leader's commit index, after a change
SDK_ERRORS = (ApiError, ClusterUnavailable, OutcomeUnknown, TimeoutError)


def majority(n: int) -> int:
    return n // 2 + 1


def _number(node_id: str) -> tuple[int, str]:
    digits = node_id.lstrip("n")
    return (int(digits), node_id) if digits.isdigit() else (1 << 30, node_id)


def _error(exc: BaseException) -> dict:
    out: dict = {"type": type(exc).__name__, "message": str(exc)[:300]}
    if isinstance(exc, ApiError):
        out.update(status=exc.status, code=exc.code)
    return out


class _Recording(httpx.HTTPTransport):
    """Every HTTP answer an operator's client got: status and error code, or the transport
    error (the SDK's retries hide them; the history should not)."""

    def __init__(self, verify: object) -> None:
        super().__init__(verify=verify)  # type: ignore[arg-type]
        self.answers: list[dict] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        try:
            response = super().handle_request(request)
        except httpx.TransportError as exc:
            self.answers.append({"url": url, "error": type(exc).__name__})
            raise
        response.read()
        code = None
        with contextlib.suppress(ValueError, AttributeError):
            error = json.loads(response.content).get("error")
            code = error.get("code") if isinstance(error, dict) else None
        answer: dict = {"url": url, "status": response.status_code}
        if code:
            answer["code"] = code
        elif response.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError):
                answer["change"] = json.loads(response.content).get("change")
        self.answers.append(answer)
        return response


class Membership:
    """`Membership(cluster, net)`: `cluster` the run's `LocalCluster` (its nodes are changed
    through it), `net` the run's `jepsen.net.Net` when nodes live in namespaces (a newcomer
    gets one), else None. The original member count is the cluster's at construction.
    `actions` and `races`: what `start` chooses from; `keep_original`: how many of the
    original members are never removed."""

    name = "membership"

    def __init__(
        self,
        cluster: LocalCluster,
        net=None,
        *,
        actions: Sequence[str] = ACTIONS,
        races: Sequence[str] = RACES,
        change_deadline_s: float = CHANGE_DEADLINE_S,
        keep_original: int = 1,
    ) -> None:
        unknown = (set(actions) - set(ACTIONS)) | (set(races) - set(RACES))
        if unknown or not actions:
            raise ValueError(f"unknown membership actions {sorted(unknown)}")
        self.cluster = cluster
        self.net = net
        self.size = len(cluster.nodes)  # what every heal restores
        self.originals = frozenset(cluster.nodes)
        self.keep_original = keep_original  # original members never removed, at least
        self.floor = majority(self.size)  # never fewer members than this
        self.actions = tuple(actions)
        self.races = tuple(races)
        self.change_deadline_s = change_deadline_s
        self.dirty = False  # a change may have left the count or the launcher off
        self._nodes_view: list | None = None  # the run's ctx.nodes, kept current
        self._seen: dict[str, tuple[str, str]] = {}  # every node's (raft_addr, api_url)
        self.restarted: list[str] = []  # members found dead by a reconcile, and started
        self.lagging: list[str] = []  # members that did not catch up after the last change

    # ------------------------------------------------------------------ the protocol

    def start(self, ctx: Context) -> dict:
        self._remember(ctx)
        healed = self._restore(ctx.rng) if self.dirty else None  # replaces a fault of ours
        members = self.members()
        choices = [a for a in self.actions if self._feasible(a, len(members))]
        if not choices:
            return {"action": None, "members": members, "why": "no change allowed"}
        action = ctx.rng.choice(choices)
        self.dirty = True
        if action == "remove":
            leader = ctx.leader()
            pool = self._removable(1)
            target = leader if leader in pool and ctx.rng.random() < 1 / 3 else None
            target = target or ctx.rng.choice(pool)
            did: dict = {"action": "remove", "node": target, "was_leader": target == leader}
            did.update(self._remove(target))
        elif action == "grow":
            did = {"action": "grow", **self._add()}
        else:
            race = ctx.rng.choice([r for r in self.races if self._race_ok(r, len(members))])
            did = {"action": "race", "race": race, **self._race(race, ctx)}
        if healed:
            did["healed_first"] = healed
        did["members"] = self._reconcile()
        self._publish()
        if self.restarted:
            did["restarted"], self.restarted = self.restarted, []
        if self.lagging:
            did["lagging"] = self.lagging
        return did

    def stop(self, ctx: Context) -> dict:
        self._remember(ctx)
        return self._restore(ctx.rng)

    def heal_all(self) -> None:
        """Back to the original member count, the launcher matching the cluster's members;
        raises if that cannot be done (no leader, a change that keeps failing)."""
        if not self.dirty:
            return
        done = self._restore(None)
        if self.dirty:
            raise RuntimeError(f"membership not restored: {done}")

    # ------------------------------------------------------------------ what is allowed

    def members(self) -> list[str]:
        return sorted(self.cluster.nodes, key=_number)

    def _removable(self, k: int) -> list[str]:
        """The members a change removing `k` may pick from: any, but never the last
        `keep_original` original members (the run's clients know only the original URLs;
        while one of them is a member, every client reaches the leader through it)."""
        members = self.members()
        originals = [m for m in members if m in self.originals]
        spare = len(originals) - self.keep_original
        if spare >= k:
            return members
        return [m for m in members if m not in self.originals] + originals[: max(spare, 0)]

    def _feasible(self, action: str, count: int) -> bool:
        if action == "remove":
            return count - 1 >= self.floor and bool(self._removable(1))
        if action == "grow":
            return True
        return any(self._race_ok(r, count) for r in self.races)

    def _race_ok(self, race: str, count: int) -> bool:
        # Both requests may succeed, in either order: the worst case must keep a majority.
        removes = {"add+add": 0, "add+remove": 1, "remove+remove-same": 1, "remove+remove": 2}
        if count - removes[race] < max(self.floor, 1):
            return False
        return len(self._removable(removes[race])) >= removes[race]

    # ------------------------------------------------------------------ changes

    def _remove(self, node_id: str) -> dict:
        started = time.monotonic()
        try:
            self.cluster.remove_node(node_id)
        except SDK_ERRORS as exc:  # reconciled below: the leader's view says what happened
            return {"error": _error(exc), "took_s": round(time.monotonic() - started, 3)}
        return {"removed": node_id, "took_s": round(time.monotonic() - started, 3)}

    def _host(self, node_id: str) -> str:
        return self.net.add_node(node_id) if self.net is not None else "127.0.0.1"

    def _add(self) -> dict:
        started = time.monotonic()
        node_id = self.cluster.next_node_id()
        try:
            self.cluster.add_node(self._host(node_id), node_id)
        except SDK_ERRORS as exc:
            return {"node": node_id, "error": _error(exc),
                    "took_s": round(time.monotonic() - started, 3)}  # fmt: skip
        return {"node": node_id, "added": node_id, "took_s": round(time.monotonic() - started, 3)}

    def _race(self, race: str, ctx: Context) -> dict:
        """Two requests at once from two operators; what each got."""
        members = self.members()
        leader = ctx.leader()
        requests: list[tuple[str, str]] = []
        if race == "add+add":
            requests = [("add", self._newcomer()), ("add", self._newcomer())]
        elif race == "add+remove":
            target = ctx.rng.choice(self._removable(1))
            requests = [("add", self._newcomer()), ("remove", target)]
        elif race == "remove+remove-same":
            target = ctx.rng.choice(self._removable(1))
            requests = [("remove", target), ("remove", target)]
        else:
            first, second = ctx.rng.sample(self._removable(2), 2)
            requests = [("remove", first), ("remove", second)]
        urls = [self.cluster.nodes[m].config.api_url for m in members]
        orders = [ctx.rng.sample(urls, len(urls)) for _ in requests]
        results: list[dict] = [{} for _ in requests]
        gate = threading.Barrier(len(requests))
        threads = [
            threading.Thread(
                target=self._operator,
                args=(i, action, node_id, orders[i], gate, results),
                name=f"membership-operator-{i}",
                daemon=True,
            )
            for i, (action, node_id) in enumerate(requests)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.change_deadline_s + 15)
        return {"leader": leader, "requests": results}

    def _newcomer(self) -> str:
        """A new node, started but not yet a member (the race's add sends the change)."""
        node_id = self.cluster.next_node_id()
        return self.cluster.new_node(self._host(node_id), node_id)

    def _operator(
        self, i: int, action: str, node_id: str, urls: list[str], gate, results: list[dict]
    ) -> None:
        config = self.cluster.nodes[node_id].config
        transport = _Recording(self.cluster.verify)
        out: dict = {"operator": i, "action": action, "node": node_id, "first_url": urls[0]}
        try:
            with AdminClient(urls, self.cluster.admin_credentials(), transport=transport) as op:
                gate.wait(10)
                started = time.monotonic()
                try:
                    answer = op.change_membership(
                        action, node_id, config.raft_addr, config.api_url,
                        deadline_s=self.change_deadline_s,
                    )  # fmt: skip
                    out["change"] = answer.get("change")
                except SDK_ERRORS as exc:
                    out["error"] = _error(exc)
                out["took_s"] = round(time.monotonic() - started, 3)
        except BaseException as exc:  # recorded: the thread must not die silently
            out["error"] = _error(exc)
        out["answers"] = transport.answers
        results[i] = out

    # ------------------------------------------------------------------ healing

    def _restore(self, rng) -> dict:
        """Reconcile, then add or remove members until the original count; what was done."""
        done: dict = {"added": [], "removed": [], "errors": []}
        try:
            self._reconcile()
            for _attempt in range(3 * self.size + 3):
                members = self.members()
                if len(members) == self.size:
                    break
                if len(members) < self.size:
                    did = self._add()
                    key = "added"
                else:
                    # The newest first without a context; a random one (originals too) with it.
                    pool = self._removable(1)
                    victim = pool[-1] if rng is None else rng.choice(pool)
                    did = self._remove(victim)
                    key = "removed"
                if "error" in did:
                    done["errors"].append(did)
                else:
                    done[key].append(did.get("added") or did.get("removed"))
                self._reconcile()
            members = self._reconcile()
        except SDK_ERRORS as exc:
            done["errors"].append(_error(exc))
            members = self.members()
        done["members"] = members
        if self.restarted:
            done["restarted"], self.restarted = self.restarted, []
        if self.lagging:
            done["lagging"] = self.lagging
        if len(members) == self.size and not done["errors"] and not self.lagging:
            self.dirty = False
        self._publish()
        return done

    def _reconcile(self) -> list[str]:
        """Make the launcher run exactly the members the leader lists after a committed
        barrier; the members."""
        self._seen.update(
            {nid: (n.config.raft_addr, n.config.api_url) for nid, n in self.cluster.nodes.items()}
        )
        status = self._barrier()
        by_addr = {n.config.raft_addr: nid for nid, n in self.cluster.nodes.items()}
        listed = {status["node_id"]} | {p["id"] for p in status.get("peers", [])}
        members = {by_addr.get(m, m) for m in listed}
        for node_id in sorted(members - set(self.cluster.nodes)):
            # A member the launcher no longer runs (an add it gave up on that committed after
            # all): a vote that never answers. Remove it, with the address it was added with.
            if node_id not in self._seen:
                raise RuntimeError(f"{node_id} is a member the launcher does not know")
            raft_addr, api_url = self._seen[node_id]
            with AdminClient(
                self.cluster.api_urls(), self.cluster.admin_credentials(),
                verify=self.cluster.verify,
            ) as admin:  # fmt: skip
                admin.change_membership(
                    "remove", node_id, raft_addr, api_url, deadline_s=self.change_deadline_s
                )
        for node_id in [n for n in self.cluster.nodes if n not in members]:
            self.cluster.forget_node(node_id)  # stopped: no longer a member, no longer counted
        self.cluster.rewrite_configs()
        for node_id, node in self.cluster.nodes.items():
            if not node.alive():  # a member whose process died (a newcomer at its start)
                self.cluster.start(node_id)
                self.restarted.append(node_id)
        self._wait_caught_up(status.get("commit_index", 0))
        return self.members()

    def _wait_caught_up(self, index: int) -> None:
        """Every member applied the leader's commit index of the barrier, as the runbook
        asks before the next change (a newcomer installs a snapshot first). A member that
        does not within CATCH_UP_TIMEOUT_S is named in `lagging`."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        waiting = set(self.cluster.nodes)
        while waiting and time.monotonic() < deadline:
            for node_id in sorted(waiting):
                status = self.cluster.status(node_id, 1.0)
                if status is not None and status.get("applied_index", 0) >= index:
                    waiting.discard(node_id)
            if waiting:
                time.sleep(0.05)
        self.lagging = sorted(waiting)

    def _barrier(self) -> dict:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            try:
                with AdminClient(
                    self.cluster.api_urls(), self.cluster.admin_credentials(),
                    verify=self.cluster.verify,
                ) as admin:  # fmt: skip
                    return admin.barrier(deadline_s=10)
            except (ApiError, ClusterUnavailable):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # ------------------------------------------------------------------ ctx.nodes

    def _remember(self, ctx: Context) -> None:
        if isinstance(ctx.nodes, list):
            self._nodes_view = ctx.nodes

    def _publish(self) -> None:
        if self._nodes_view is not None:
            self._nodes_view[:] = self.members()
