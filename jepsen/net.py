"""Every node in its own network namespace, so a nemesis can cut links between them.

One `Net` is one run's network. Its name RUN is `qbj` and 6 random hex digits; it owns:

    root namespace              namespace RUN (the hub)       namespace RUN-<node>
    RUN 10.a.b.254/24  <-veth->  uplink -- br0 -- p1  <-veth->  eth0 10.a.b.1/24  (1st node)
                                             `-- p2  <-veth->  eth0 10.a.b.2/24  (2nd node)

The harness and its clients stay in the root namespace and reach every node at its address;
nodes reach each other through the bridge; a node's command runs inside its namespace
through `wrap`. Partitions are iptables rules inside the node namespaces
(jepsen/nemesis/partition.py). The only thing of ours in the root namespace is the veth
end `RUN`: its firewall and sysctls are never touched.

Why the bridge has a namespace of its own: with br_netfilter loaded
(/proc/sys/net/bridge/bridge-nf-call-iptables = 1, as on our machines) frames between two
ports of a bridge pass the iptables/nftables FORWARD hooks of the bridge's namespace. In the
root namespace that is the machine's firewall (a Docker host's FORWARD policy is DROP): it
would cut node-to-node traffic while leaving root-to-node traffic alone, and switching the
sysctl off would change the machine for everyone. The hub's own ruleset is empty.

Where this cannot work (not Linux, no CAP_NET_ADMIN / CAP_SYS_ADMIN, no `ip` or `iptables`)
`Net.open` raises `NetUnavailable` naming every missing piece. A crashed run's leftovers are
removed by `cleanup_stale` (every `open` calls it): a run records its owner's pid and start
time in /run/qb-jepsen/RUN.json before it creates anything and deletes the file last.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "qbj"
STATE_DIR = Path("/run/qb-jepsen")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts a named namespace
RUN_NAME = re.compile(rf"{PREFIX}[0-9a-f]{{6}}")
NODE_ID = re.compile(r"[A-Za-z0-9_.]{1,32}")  # part of a namespace name
CLIENT_HOST = 254  # the root namespace's address in the run's /24
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
COMMAND_TIMEOUT_S = 30.0
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class NetUnavailable(RuntimeError):
    """The harness cannot build namespaces here; the message says what is missing."""


class NetError(RuntimeError):
    """A command that sets up, changes or removes the run's network failed."""


def tool(name: str) -> str | None:
    """The path of a system command, also found in /usr/sbin when PATH lacks it."""
    return shutil.which(name, path=_SEARCH_PATH)


def requirements_missing() -> list[str]:
    """What this machine lacks for `Net`, each with how to get it; empty when nothing."""
    if not sys.platform.startswith("linux"):
        return ["Linux (network namespaces, veth, bridge)"]
    missing = []
    caps = _effective_capabilities()
    if not caps >> CAP_NET_ADMIN & 1:
        missing.append("CAP_NET_ADMIN (run the harness as root)")
    if not caps >> CAP_SYS_ADMIN & 1:
        missing.append("CAP_SYS_ADMIN (`ip netns add` mounts under /run/netns; run as root)")
    if tool("ip") is None:
        missing.append("the `ip` command (Debian: apt-get install -y iproute2)")
    if tool("iptables") is None or tool("iptables-restore") is None:
        missing.append("`iptables` and `iptables-restore` (Debian: apt-get install -y iptables)")
    return missing


def check_available() -> None:
    missing = requirements_missing()
    if missing:
        raise NetUnavailable(
            "network namespaces for the Jepsen harness need: "
            + "; ".join(missing)
            + " (there is no TCP proxy mode yet)"
        )


class Net:
    """The network of one run: `with Net(["n1", "n2", "n3"]) as net: ...`.

    `address(node)` is the node's IPv4 address (`hosts()` all of them, for
    `LocalCluster.create(hosts=...)`), `client_address` the root namespace's;
    `wrap(node, argv)` runs argv inside the node's namespace (`LocalCluster.wrap`);
    `exec(node, argv)` runs a command there and waits for it. `close()` removes everything
    `open()` made, and is safe to call twice or after a failed `open()`.
    """

    def __init__(self, node_ids: Sequence[str]) -> None:
        if len(set(node_ids)) != len(node_ids) or not 1 <= len(node_ids) < CLIENT_HOST - 1:
            raise ValueError(f"node ids must be distinct, 1 to 252 of them: {node_ids!r}")
        for node_id in node_ids:
            if not NODE_ID.fullmatch(node_id):
                raise ValueError(f"node id {node_id!r}: letters, digits, '_' and '.' only")
        self.nodes = tuple(node_ids)
        self.run = f"{PREFIX}{os.urandom(3).hex()}"
        self.subnet: ipaddress.IPv4Network | None = None
        self._opened = False

    # ------------------------------------------------------------------ names and addresses

    def namespace(self, node_id: str) -> str:
        self._known(node_id)
        return f"{self.run}-{node_id}"

    @property
    def hub(self) -> str:
        return self.run  # the hub namespace's name, and its uplink's root end's

    def namespaces(self) -> list[str]:
        return [self.hub, *(self.namespace(n) for n in self.nodes)]

    def address(self, node_id: str) -> str:
        self._known(node_id)
        return str(self._subnet()[self.nodes.index(node_id) + 1])

    def hosts(self) -> dict[str, str]:
        """Node id -> its address (`LocalCluster.create(hosts=...)`)."""
        return {node_id: self.address(node_id) for node_id in self.nodes}

    @property
    def client_address(self) -> str:
        """The root namespace's address, where the harness's clients connect from."""
        return str(self._subnet()[CLIENT_HOST])

    def wrap(self, node_id: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the node's namespace (same pid: `ip netns exec` execs it)."""
        return [_ip(), "netns", "exec", self.namespace(node_id), *argv]

    def exec(self, node_id: str, argv: Sequence[str], stdin: str | None = None) -> str:
        """Run a command inside the node's namespace; its stdout, or NetError."""
        return _run(self.wrap(node_id, argv), stdin)

    def has_namespace(self, node_id: str) -> bool:
        """Whether the node's namespace exists (not after `close`)."""
        return (NETNS_DIR / self.namespace(node_id)).exists()

    def _known(self, node_id: str) -> None:
        if node_id not in self.nodes:
            raise KeyError(f"{node_id!r} is not a node of {self.run} ({', '.join(self.nodes)})")

    def _subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise RuntimeError(f"{self.run} is not open")
        return self.subnet

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Net:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Build the run's namespaces, bridge and veths (after removing dead runs' ones)."""
        if self._opened:
            return
        check_available()
        with _state_lock():
            _cleanup_stale_locked()
            self.subnet = _free_subnet()
            _write_owner(self.run, {"subnet": str(self.subnet), "nodes": list(self.nodes)})
            self._opened = True
            try:
                self._build()
            except BaseException:
                self._remove()
                raise
        # Probed once here, not at the first partition: iptables needs kernel support
        # (nf_tables or ip_tables) that a namespace cannot load by itself.
        try:
            self.exec(self.nodes[0], [require_tool("iptables"), "-w", "-S", "INPUT"])
        except NetError as exc:
            self.close()
            raise NetUnavailable(f"iptables does not work in a network namespace: {exc}") from exc

    def _build(self) -> None:
        assert self.subnet is not None
        prefix = self.subnet.prefixlen
        for ns in self.namespaces():
            _run([_ip(), "netns", "add", ns])
        _ip_batch(
            None,
            [
                f"link add {self.run} type veth peer name uplink netns {self.hub}",
                f"addr add {self.client_address}/{prefix} dev {self.run}",
                f"link set {self.run} up",
            ],
        )
        hub = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        hub.append("link set uplink master br0 up")
        for i, node_id in enumerate(self.nodes, start=1):
            hub.append(f"link add p{i} type veth peer name eth0 netns {self.namespace(node_id)}")
            hub.append(f"link set p{i} master br0 up")
        _ip_batch(self.hub, hub)
        for node_id in self.nodes:
            _ip_batch(
                self.namespace(node_id),
                [
                    "link set lo up",
                    f"addr add {self.address(node_id)}/{prefix} dev eth0",
                    "link set eth0 up",
                ],
            )

    def add_node(self, node_id: str) -> str:
        """A namespace on the run's bridge for a node that joins an open run (the membership
        nemesis's newcomers); its address. `close` removes it with the others."""
        if node_id in self.nodes:
            return self.address(node_id)
        if not NODE_ID.fullmatch(node_id) or len(self.nodes) + 1 >= CLIENT_HOST - 1:
            raise ValueError(f"node id {node_id!r}: letters, digits, '_' and '.'; 252 at most")
        prefix = self._subnet().prefixlen
        with _state_lock():
            self.nodes = (*self.nodes, node_id)  # listed first: `close` removes what is made
            port = f"p{len(self.nodes)}"
            _run([_ip(), "netns", "add", self.namespace(node_id)])
            _ip_batch(
                self.hub,
                [
                    f"link add {port} type veth peer name eth0 netns {self.namespace(node_id)}",
                    f"link set {port} master br0 up",
                ],
            )
            _ip_batch(
                self.namespace(node_id),
                [
                    "link set lo up",
                    f"addr add {self.address(node_id)}/{prefix} dev eth0",
                    "link set eth0 up",
                ],
            )
        return self.address(node_id)

    # ------------------------------------------------------------------ slow links

    def limit_rate(self, node_id: str, kbit_per_s: int) -> None:
        """Deliver what is sent to `node_id` at most `kbit_per_s` (a token bucket on the
        bridge's port to it; what it sends is left alone). Messages then arrive spread out
        as over a slow link: a snapshot's chunks one by one, not in one read. `close`
        removes it with the run; `unlimit_rate` before."""
        if kbit_per_s < 8:
            raise ValueError(f"kbit_per_s {kbit_per_s}: at least 8")
        # burst: one full frame must fit the bucket; latency: how long a frame may queue.
        self._tc(["qdisc", "replace", "dev", self._port(node_id), "root", "tbf",
                  "rate", f"{kbit_per_s}kbit", "burst", "2kb", "latency", "10s"])  # fmt: skip

    def unlimit_rate(self, node_id: str) -> None:
        self._tc(["qdisc", "del", "dev", self._port(node_id), "root"], check=False)

    def _port(self, node_id: str) -> str:
        self._known(node_id)
        return f"p{self.nodes.index(node_id) + 1}"  # as _build and add_node name them

    def _tc(self, args: Sequence[str], *, check: bool = True) -> None:
        _run([_ip(), "netns", "exec", self.hub, require_tool("tc"), *args], check=check)

    def close(self) -> None:
        """Remove the namespaces, the bridge and every veth of this run (idempotent).

        Processes still running in a node's namespace keep it alive, unreachable: stop the
        nodes first."""
        if not self._opened:
            return
        with _state_lock():
            self._remove()

    def _remove(self) -> None:
        _remove_run(self.run, self.namespaces())
        self._opened = False

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Remove the namespaces and interfaces of runs whose owning process is gone;
        returns their names. Runs of live processes are left alone."""
        check_available()
        with _state_lock():
            return _cleanup_stale_locked()


# ---------------------------------------------------------------------- what exists


def ours() -> dict[str, list[str]]:
    """The harness's namespaces and root-namespace interfaces that exist now, and its owner
    files (tests assert that a closed run left none)."""
    netns = sorted(p.name for p in _listdir(NETNS_DIR) if RUN_NAME.match(p.name))
    links = sorted(p.name for p in _listdir(Path("/sys/class/net")) if RUN_NAME.fullmatch(p.name))
    owners = sorted(p.stem for p in _listdir(STATE_DIR) if RUN_NAME.fullmatch(p.stem))
    return {"namespaces": netns, "links": links, "owners": owners}


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except FileNotFoundError:
        return []


def _cleanup_stale_locked() -> list[str]:
    found = ours()
    runs: dict[str, list[str]] = {}
    for ns in found["namespaces"]:
        match = RUN_NAME.match(ns)
        assert match is not None  # ours() lists matching names only
        runs.setdefault(match.group(), []).append(ns)
    for name in found["links"] + found["owners"]:
        runs.setdefault(name, [])
    removed = []
    for run, namespaces in sorted(runs.items()):
        if _owner_alive(run):
            continue
        for ns in namespaces:
            pids = _run([_ip(), "netns", "pids", ns], check=False).split()
            if pids:
                log.warning("stale namespace %s still has processes %s", ns, " ".join(pids))
        try:
            _remove_run(run, namespaces)
        except NetError as exc:  # not ours to fix here; the next cleanup tries again
            log.warning("stale run %s not fully removed: %s", run, exc)
            continue
        removed.append(run)
    return removed


def _remove_run(run: str, namespaces: Sequence[str]) -> None:
    """Delete the root end of the uplink (its peer goes with it), then the namespaces (the
    hub takes the bridge and the node veths with it), then the owner file, each if present."""
    errors = []
    if Path("/sys/class/net", run).exists():
        try:
            _run([_ip(), "link", "del", run])
        except NetError as exc:
            errors.append(str(exc))
    for ns in namespaces:
        if (NETNS_DIR / ns).exists():
            try:
                _run([_ip(), "netns", "del", ns])
            except NetError as exc:
                errors.append(str(exc))
    if errors:  # the owner file stays: the next cleanup_stale tries again
        raise NetError("; ".join(errors))
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{run}.json").unlink()


# ---------------------------------------------------------------------- owners


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22; comm may contain spaces


def _write_owner(run: str, extra: dict) -> None:
    pid = os.getpid()
    owner = {"pid": pid, "start_time": _start_time(pid), **extra}
    tmp = STATE_DIR / f"{run}.json.tmp"
    tmp.write_text(json.dumps(owner) + "\n")
    os.replace(tmp, STATE_DIR / f"{run}.json")


def _owner_alive(run: str) -> bool:
    # No file: the run got as far as removing it (it is written before anything is made).
    try:
        owner = json.loads((STATE_DIR / f"{run}.json").read_text())
        pid, start_time = int(owner["pid"]), owner["start_time"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return start_time is not None and _start_time(pid) == start_time


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """One process at a time chooses a subnet, creates or removes a run."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- addresses


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.a.b.0/24 that overlaps no address on the machine and no route narrower
    than /8 (a /24 on our link only narrows a /8 or default route, for its own addresses)."""
    used = []
    for entry in json.loads(_run([_ip(), "-j", "-4", "addr", "show"]) or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", False))
    routes = json.loads(_run([_ip(), "-j", "-4", "route", "show", "table", "all"]) or "[]")
    for route in routes:
        dst = route.get("dst", "default")
        if dst != "default":
            network = ipaddress.ip_network(dst, strict=False)
            if network.prefixlen > 8:
                used.append(network)
    rng = random.SystemRandom()  # names and subnets need not repeat with the run's seed
    for _ in range(1000):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NetUnavailable("no free /24 in 10.0.0.0/8 for the harness's network")


# ---------------------------------------------------------------------- commands


def require_tool(name: str) -> str:
    """The path of a system command, or NetUnavailable naming what is missing."""
    path = tool(name)
    if path is None:
        check_available()  # names what is missing
        raise NetUnavailable(f"the `{name}` command is missing")
    return path


def _ip() -> str:
    return require_tool("ip")


def _ip_batch(netns: str | None, lines: Sequence[str]) -> None:
    """Several `ip` commands in one process (stops at the first failure)."""
    argv = [_ip(), *(["-n", netns] if netns else []), "-batch", "-"]
    _run(argv, "\n".join(lines) + "\n")


def _run(argv: Sequence[str], stdin: str | None = None, *, check: bool = True) -> str:
    what = " ".join(argv) + (f" <<< {stdin.strip()!r}" if stdin else "")
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetError(f"{what}: no exit within {COMMAND_TIMEOUT_S} s") from exc
    if check and done.returncode != 0:
        raise NetError(f"{what}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _effective_capabilities() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0
