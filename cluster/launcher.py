"""A local cluster of separate node processes on free loopback ports.

Used by `quorumbook cluster up`, the demo, the tests, drills and the harness. Writes
`DIR/cluster.json` (DESIGN.md "CLI"), one `node.toml` per node, a Raft password and admin
credentials (both mode 0600). Every process it starts it stops, by pid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.auth import new_credentials
from api.sdk import (
    AdminClient,
    ApiError,
    ClusterUnavailable,
    OutcomeUnknown,
    read_credentials,
    tls_context,
    write_credentials,
)
from indexer.services import free_port

from .config import EXIT_WITH_PARENT_ENV, TABLES, NodeConfig, Peer, dump, load, make

# The keys of a node's `[raft]` table (docs/reference/config.md) a launcher may set, by name.
RAFT_KEYS = frozenset(TABLES["raft"].__struct_fields__) - {"addr"}


@dataclass
class NodeProcess:
    config_path: Path
    config: NodeConfig
    process: subprocess.Popen | None = None
    restarts: int = 0
    adopted_pid: int | None = None  # a node started by another launcher (from cluster.json)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self.adopted_pid

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self.adopted_pid is None:
            return False
        try:
            os.kill(self.adopted_pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


class LocalCluster:
    def __init__(self, root: Path, nodes: dict[str, NodeProcess]) -> None:
        self.root = root
        self.nodes = nodes
        # Tests, benchmarks and the demo set this: their nodes stop when this process is
        # gone, even killed without its cleanup running. `cluster up` leaves it off: its
        # nodes may be adopted by the next launcher (cluster.json).
        self.exit_with_launcher = False
        # The Jepsen harness sets this: (node_id, argv) -> the argv that runs the node inside
        # its network namespace (jepsen/net.py, Net.wrap). None: the node's argv as is.
        self.wrap: Callable[[str, list[str]], list[str]] | None = None

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls, root: Path, n: int = 3, *, hosts: Mapping[str, str] | None = None, **settings: object
    ) -> LocalCluster:
        """Write configs and secrets for a new cluster of `n` nodes under `root`; `settings`
        are config keys named without their table (`compaction_min_entries=20`, see
        `cluster.config.make`), the same on every node. `hosts` (node id -> IPv4 address,
        the Jepsen harness's namespaces) replaces 127.0.0.1 in each node's Raft and API
        addresses and in its peers' entries."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        password_file = root / "raft.password"
        if not password_file.exists():
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        api_master = root / "api.master"
        if not api_master.exists():
            fd = os.open(api_master, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        admin_key = root / "admin.key"
        if not admin_key.exists():
            write_credentials(admin_key, new_credentials("admin"))
        ids = [f"n{i}" for i in range(1, n + 1)]
        host = dict(hosts) if hosts is not None else dict.fromkeys(ids, "127.0.0.1")
        addrs = {i: (f"{host[i]}:{free_port()}", free_port()) for i in ids}
        settings = {"cluster_id": f"qb-{secrets.token_hex(6)}", **settings}
        scheme = "https" if settings.get("tls_cert_file") else "http"
        nodes = {}
        for node_id in ids:
            raft_addr, api_port = addrs[node_id]
            peers = tuple(
                Peer(other, addrs[other][0], f"{scheme}://{host[other]}:{addrs[other][1]}")
                for other in ids
                if other != node_id
            )
            config = make(
                node_id=node_id,
                addr=raft_addr,  # [raft] addr
                host=host[node_id],  # [api] host and port
                port=api_port,
                data_dir=root / node_id / "data",
                peers=peers,
                password_file=password_file,
                admin_key_file=admin_key,
                api_master_file=api_master,
                **settings,
            )
            path = root / node_id / "node.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump(config))
            nodes[node_id] = NodeProcess(path, config)
        cluster = cls(root, nodes)
        cluster.write_manifest()
        return cluster

    @classmethod
    def open(cls, manifest: Path) -> LocalCluster:
        """Attach to a cluster described by its `cluster.json` (pids are not adopted)."""
        raw = json.loads(Path(manifest).read_text())
        nodes = {}
        for entry in raw["nodes"]:
            path = Path(entry["config"])
            nodes[entry["id"]] = NodeProcess(path, load(path), adopted_pid=entry.get("pid"))
        return cls(Path(manifest).resolve().parent, nodes)

    @property
    def manifest_path(self) -> Path:
        return self.root / "cluster.json"

    @property
    def admin_key_path(self) -> Path:
        return self.root / "admin.key"

    def admin_credentials(self):
        return read_credentials(self.admin_key_path)

    def api_urls(self) -> list[str]:
        return [n.config.api_url for n in self.nodes.values()]

    @functools.cached_property
    def verify(self) -> object:
        """What an HTTPS client trusts here: the nodes' certificate (self-signed in a local
        cluster, so it is its own CA), or True (the system's CAs) over plain HTTP. Built once:
        the status polls call it many times a second."""
        config = next(iter(self.nodes.values())).config
        return tls_context(config.tls_cert_file) if config.tls else True

    def write_manifest(self) -> None:
        manifest = {
            "nodes": [
                {
                    "id": node_id,
                    "api_url": n.config.api_url,
                    "raft_addr": n.config.raft_addr,
                    "pid": n.pid,
                    "data_dir": str(n.config.data_dir),
                    "config": str(n.config_path),
                }
                for node_id, n in self.nodes.items()
            ],
            "admin_credentials": str(self.admin_key_path),
        }
        cluster_id = next(iter(self.nodes.values())).config.cluster_id
        if cluster_id:
            manifest["cluster_id"] = cluster_id
        indexer = next(iter(self.nodes.values())).config.indexer
        if indexer.postgres_url:  # the services the nodes stream to (DESIGN.md "CLI")
            manifest["postgres_url"] = indexer.postgres_url
            if indexer.kafka_bootstrap:
                manifest["kafka_bootstrap"] = indexer.kafka_bootstrap
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, self.manifest_path)

    # ------------------------------------------------------------------ membership

    def _rewrite_configs(self) -> None:
        """Every node's config lists every current member (for restarts)."""
        members = {nid: n.config for nid, n in self.nodes.items()}
        for node_id, node in self.nodes.items():
            peers = tuple(
                Peer(o, c.raft_addr, c.api_url) for o, c in members.items() if o != node_id
            )
            node.config = node.config.replace(peers=peers)
            # Whole or not at all: a newcomer started a moment ago may be reading its file
            # (a truncated one read mid-write: "node_id is missing", and the new member dies).
            tmp = node.config_path.with_suffix(".toml.tmp")
            tmp.write_text(dump(node.config))
            os.replace(tmp, node.config_path)

    def rewrite_configs(self) -> None:
        """Every node's config and cluster.json list the launcher's nodes: after membership
        changes sent by someone else (the Jepsen membership nemesis), once committed."""
        self._rewrite_configs()
        self.write_manifest()

    def next_node_id(self) -> str:
        """An id never used under this cluster's root. A removed node's directory (its data,
        its log) stays, and its id and data must not be reused (docs/operating/
        replace-a-node.md): one past the highest of the members' and the directories'."""
        used = set(self.nodes) | {p.name for p in self.root.iterdir() if p.is_dir()}
        numbers = [int(name[1:]) for name in used if name[:1] == "n" and name[1:].isdigit()]
        return f"n{max(numbers, default=0) + 1}"

    def new_node(self, host: str = "127.0.0.1", node_id: str | None = None) -> str:
        """Write the config of one more node and start it, not yet a member (`add_node` adds
        it). `host`: its Raft and API address (a harness namespace's, as `create(hosts=)`);
        `node_id`: one from `next_node_id` (a namespace may need it before the start)."""
        node_id = node_id or self.next_node_id()
        if node_id in self.nodes or (self.root / node_id).exists():
            raise ValueError(f"node id {node_id} is taken (a member, or a removed node's)")
        template = next(iter(self.nodes.values())).config
        members = [n.config for n in self.nodes.values()]
        # The newcomer knows every member; the members' own files change only once the change
        # has committed (a node's configuration is its log's; its node.toml peers are the
        # members it starts with, and must never name one the log does not).
        config = template.replace(
            node_id=node_id,
            addr=f"{host}:{free_port()}",  # [raft] addr
            host=host,  # [api] host
            port=free_port(),  # [api] port
            data_dir=self.root / node_id / "data",
            peers=tuple(Peer(c.node_id, c.raft_addr, c.api_url) for c in members),
        )
        path = self.root / node_id / "node.toml"
        path.parent.mkdir(parents=True)
        path.write_text(dump(config))
        self.nodes[node_id] = NodeProcess(path, config)
        self.start(node_id)  # through `self.wrap`, as every start
        return node_id

    def add_node(self, host: str = "127.0.0.1", node_id: str | None = None) -> str:
        """Start one more node and add it to the cluster through the leader."""
        urls = self.api_urls()
        node_id = self.new_node(host, node_id)
        config = self.nodes[node_id].config
        try:
            with AdminClient(urls, self.admin_credentials(), verify=self.verify) as client:
                client.change_membership("add", node_id, config.raft_addr, config.api_url)
        except BaseException as exc:
            definite = isinstance(exc, (ApiError, ClusterUnavailable))
            if definite and not isinstance(exc, OutcomeUnknown):
                # Refused, or no leader ever answered: the newcomer never became a member.
                self.stop(node_id)
                del self.nodes[node_id]
            else:
                # Outcome unknown: it may be a member now, and stopping it would cost the
                # cluster a vote. Keep it running and listed; `cluster status` tells.
                self.write_manifest()
            raise
        self._rewrite_configs()
        self.write_manifest()
        return node_id

    def transfer_leadership(
        self, to: str | None = None, *, away_from: str | None = None, attempts: int = 10
    ) -> str:
        """Move leadership (to `to`, or to any other node) and wait until it has moved.

        pysyncobj's transfer is best effort (Raft TimeoutNow: the target must be caught up and
        then win its election), so this retries and verifies rather than trusting the request.
        """
        for _ in range(attempts):
            leader = self.wait_for_leader(20)
            if (to is not None and leader == to) or (
                to is None and leader != (away_from or leader)
            ):
                return leader
            with (
                AdminClient(
                    [self.nodes[leader].config.api_url],
                    self.admin_credentials(),
                    verify=self.verify,
                ) as c,
                contextlib.suppress(ApiError, ClusterUnavailable),
            ):
                # Denied (target not caught up) or the leader moved meanwhile: check, retry.
                c.transfer_leader(to, deadline_s=5)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                status = self.status(leader, 1.0)
                if status is None or status["leader"] != leader:
                    break
                time.sleep(0.05)
        raise TimeoutError(f"leadership did not move in {attempts} attempts")

    def remove_node(self, node_id: str) -> None:
        """Remove a member through the leader, then stop its process."""
        config = self.nodes[node_id].config
        others = [n.config.api_url for nid, n in self.nodes.items() if nid != node_id]
        if self.wait_for_leader(20) == node_id:
            self.transfer_leadership(away_from=node_id)
        with AdminClient(others, self.admin_credentials(), verify=self.verify) as client:
            client.change_membership("remove", node_id, config.raft_addr, config.api_url)
        self.forget_node(node_id)

    def forget_node(self, node_id: str) -> None:
        """Stop a node that is not a member (removed, or never added) and drop it from the
        configs and cluster.json; its directory stays."""
        self.stop(node_id)
        del self.nodes[node_id]
        self._rewrite_configs()
        self.write_manifest()

    # ------------------------------------------------------------------ processes

    def adopt_from_manifest(self) -> list[str]:
        """Pick up nodes another launcher added to (or removed from) cluster.json."""
        raw = json.loads(self.manifest_path.read_text())
        listed = {entry["id"]: entry for entry in raw["nodes"]}
        changed = []
        for node_id, entry in listed.items():
            if node_id not in self.nodes:
                path = Path(entry["config"])
                self.nodes[node_id] = NodeProcess(path, load(path), adopted_pid=entry.get("pid"))
                changed.append(node_id)
        for node_id in [nid for nid in self.nodes if nid not in listed]:
            del self.nodes[node_id]
            changed.append(node_id)
        return changed

    def start(self, node_id: str | None = None) -> None:
        targets = [node_id] if node_id else list(self.nodes)
        for nid in targets:
            node = self.nodes[nid]
            if node.alive():
                continue
            log = open(node.config_path.parent / "node.log", "ab")  # noqa: SIM115 - owned by Popen
            env = dict(os.environ)
            if self.exit_with_launcher:
                env[EXIT_WITH_PARENT_ENV] = str(os.getpid())
            # -P: the working directory does not shadow PYTHONPATH (a mypyc build of the
            # state machine there is what the node runs; docs/adr/0003).
            argv = [
                sys.executable,
                "-P",
                "-m",
                "cluster",
                "node",
                "run",
                "--config",
                str(node.config_path),
            ]
            if self.wrap is not None:
                argv = self.wrap(nid, argv)
            node.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # our Ctrl-C reaches the launcher, which stops them in order
            )
            log.close()
        self.write_manifest()

    def signal(self, node_id: str, signum: int) -> None:
        node = self.nodes[node_id]
        if node.alive() and node.pid is not None:
            os.kill(node.pid, signum)

    def _wait_adopted(self, node: NodeProcess, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while node.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self, node_id: str) -> None:
        """SIGKILL and reap."""
        node = self.nodes[node_id]
        if node.process is None:
            self.signal(node_id, signal.SIGKILL)
            self._wait_adopted(node, 10)
            return
        if node.alive():
            node.process.kill()
        node.process.wait(timeout=10)

    def stop(self, node_id: str, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        node = self.nodes[node_id]
        if node.process is None:
            self.signal(node_id, signal.SIGTERM)
            if not self._wait_adopted(node, timeout_s):
                self.signal(node_id, signal.SIGKILL)
                self._wait_adopted(node, 10)
            return
        if node.alive():
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)
        node.process.wait(timeout=10)

    def stop_all(self) -> None:
        for node_id in self.nodes:
            if self.nodes[node_id].alive():
                self.signal(node_id, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node_id in self.nodes:
            node = self.nodes[node_id]
            if node.process is None:
                if not self._wait_adopted(node, max(0.1, deadline - time.monotonic())):
                    self.signal(node_id, signal.SIGKILL)
                    self._wait_adopted(node, 10)
                continue
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # ------------------------------------------------------------------ observation

    def status(self, node_id: str, timeout_s: float = 2.0) -> dict | None:
        url = self.nodes[node_id].config.api_url
        try:
            response = httpx.get(url + "/v1/cluster/status", timeout=timeout_s, verify=self.verify)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError):
            return None

    def statuses(self) -> dict[str, dict | None]:
        return {nid: (self.status(nid) if self.nodes[nid].alive() else None) for nid in self.nodes}

    def wait_for_leader(self, timeout_s: float = 30.0, exclude: tuple[str, ...] = ()) -> str:
        """Poll until one live node reports itself leader and a majority agrees."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            statuses = {k: v for k, v in self.statuses().items() if v and k not in exclude}
            leaders = [s["node_id"] for s in statuses.values() if s["role"] == "leader"]
            if len(leaders) == 1:
                agree = sum(1 for s in statuses.values() if s["leader"] == leaders[0])
                if agree * 2 > len(self.nodes):
                    return leaders[0]
            time.sleep(0.05)
        raise TimeoutError(f"no leader within {timeout_s} s: {self.statuses()}")

    def wait_all_following(self, timeout_s: float = 30.0) -> str:
        """Poll until every node answers and names the same leader (a fresh cluster's last
        node may still be starting when a majority already has one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            statuses = list(self.statuses().values())
            leaders = {s["leader"] if s else None for s in statuses}
            if len(leaders) == 1 and None not in leaders:
                return leaders.pop()
            time.sleep(0.05)
        raise TimeoutError(
            f"not every node follows one leader within {timeout_s} s: {self.statuses()}"
        )

    def wait_converged(self, timeout_s: float = 20.0, nodes: list[str] | None = None) -> dict:
        """Poll until the given live nodes report the same cmd_index and state hash."""
        targets = nodes or [nid for nid, n in self.nodes.items() if n.alive()]
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            last = {nid: self.status(nid) for nid in targets}
            if all(last.values()):
                hashes = {(s["cmd_index"], s["state_hash"]) for s in last.values()}  # type: ignore[index]
                if len(hashes) == 1:
                    return last
            time.sleep(0.05)
        raise TimeoutError(f"nodes did not converge within {timeout_s} s: {last}")
