"""A node's helper processes (ADR 0007): the indexer (`cluster/indexer_process.py`), the chain
watcher (`indexer/chain/process.py`) and the log archiver (`disaster_recovery/archiver.py`, found through the `quorumbook.sidecars` entry
point: cluster/ runs it, never imports it).

A trio task in the node's nursery starts the process, tells it what it needs to know of the
node (role, applied index, the exchange's last `seq` and its time, the leader and which peers
are connected) as JSON lines on its stdin, reads its status lines from its stdout (an object
of the node status), and restarts it (after 1 s, doubling to 30 s) if it dies. Stopping the
node closes the process's stdin: it finishes what it holds (releases a lease) and exits; after
5 s it is killed.

Nothing here touches the Raft thread: the figures are ones the node publishes anyway.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

import msgspec
import trio

from .config import Indexer, NodeConfig

log = logging.getLogger("quorumbook.sidecar")

POSTGRES_URL_ENV = "QB_INDEXER_POSTGRES_URL"
FEED_PERIOD_S = 0.02  # how often the node's figures are compared and sent when changed
FEED_HEARTBEAT_S = 0.5  # sent at least this often
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
STOP_TIMEOUT_S = 5.0


class Sidecar:
    """One helper process: `argv` run with `env` added to the node's environment, fed
    `view()`; `status` is what it last reported (`configured` and `restarts` added)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        view: Callable[[], dict],
        *,
        env: dict[str, str] | None = None,
        on_status: Callable[[dict], None] | None = None,
    ) -> None:
        self.name = name
        self._argv = argv
        self._env = env or {}
        self._view = view
        self._on_status = on_status
        self.status: dict = {"configured": True, "active": False, "state": "starting"}
        self.restarts = 0

    def command(self) -> list[str]:
        return list(self._argv)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = RESTART_MIN_S
        while True:
            started = trio.current_time()
            code = await self._run_once()
            self.status = {**self.status, "active": False, "state": "restarting",
                           "last_error": f"the {self.name} process exited ({code})"}  # fmt: skip
            if trio.current_time() - started > 60:
                backoff = RESTART_MIN_S  # it had been running a while: not a crash loop
            log.warning("%s process exited (%s); restarting in %.0f s", self.name, code, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX_S)
            self.restarts += 1

    async def _run_once(self) -> int | None:
        process = await trio.lowlevel.open_process(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **self._env},
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._feed, process)
                await self._read_status(process)  # until the process closes its stdout
                nursery.cancel_scope.cancel()
            return await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop(process)

    async def _feed(self, process: trio.Process) -> None:
        last: dict | None = None
        last_sent = 0.0
        assert process.stdin is not None
        while True:
            view = self._view()
            now = trio.current_time()
            if view != last or now - last_sent >= FEED_HEARTBEAT_S:
                try:
                    await process.stdin.send_all(json.dumps(view).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                last, last_sent = view, now
            await trio.sleep(FEED_PERIOD_S)

    async def _read_status(self, process: trio.Process) -> None:
        assert process.stdout is not None
        pending = b""
        while True:
            data = await process.stdout.receive_some(1 << 16)
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    status = json.loads(line)
                except ValueError:
                    continue
                if isinstance(status, dict):
                    self.status = {**status, "restarts": self.restarts}
                    if self._on_status is not None:
                        self._on_status(status)

    async def _stop(self, process: trio.Process) -> None:
        if process.returncode is not None:
            return
        if process.stdin is not None:
            await process.stdin.aclose()  # EOF: the process finishes and exits
        with trio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
            return
        process.kill()
        await process.wait()


class LogHolds:
    """Where the node's compaction keeps the log from (ADR 0007, 0008): the lowest position
    of the helpers that hold it (`NodeConfig.log_holds`: the archive's end, the indexer's
    checkpoint), once each has said where it is; until then the hold stays where the node
    started (it keeps what it has). A helper without a hold is not waited for."""

    def __init__(self, sources: Iterable[str], hold: Callable[[int], None]) -> None:
        self._positions: dict[str, int | None] = dict.fromkeys(sources)
        self._hold = hold

    def of(self, source: str) -> Callable[[int], None]:
        """What `source` calls with its position (a no-op if it holds nothing)."""

        def report(index: int) -> None:
            if source not in self._positions:
                return
            self._positions[source] = index
            known = [i for i in self._positions.values() if i is not None]
            if len(known) == len(self._positions):
                self._hold(min(known))

        return report


def indexer_sidecar(
    settings: Indexer,
    node_id: str,
    data_dir: str,
    view: Callable[[], dict],
    *,
    cluster_id: str | None = None,
    hold: Callable[[int], None] | None = None,
) -> Sidecar:
    """The indexer process (cluster/indexer_process.py) for an `[indexer]` table. `cluster_id`:
    the node's; the indexer writes no other cluster's history (indexer/timeline.py).
    `hold(index)` is called with the log index of the database's checkpoint whenever the
    indexer reports it: the node's compaction keeps the log after it (ADR 0007)."""
    argv = [
        sys.executable, "-P", "-m", "cluster.indexer_process",
        "--data-dir", data_dir, "--node-id", node_id,
        "--cluster-id", cluster_id or "",
        "--topic-prefix", settings.topic_prefix,
        "--lease-ttl-s", str(settings.lease_ttl_s),
        "--batch-max-events", str(settings.batch_max_events),
    ]  # fmt: skip
    if settings.kafka_bootstrap:
        argv += ["--kafka-bootstrap", settings.kafka_bootstrap]
    # The URL may carry a password: in the environment (readable by this user only), never
    # on the command line (which `ps` shows to everyone).
    env = {POSTGRES_URL_ENV: str(settings.postgres_url)}

    def on_status(status: dict) -> None:
        index = status.get("checkpoint_raft_index")
        if hold is not None and type(index) is int:
            hold(index)

    return Sidecar("indexer", argv, view, env=env, on_status=on_status)


def chain_sidecar(config: NodeConfig, view: Callable[[], dict]) -> Sidecar:
    """The chain watcher (indexer/chain/process.py) for a `[chain]` table."""
    chain = config.chain
    argv = [
        sys.executable, "-P", "-m", "indexer.chain.process",
        "--node-id", config.node_id, "--api-url", config.api_url,
        "--admin-key-file", str(config.admin_key_file),
        "--chain", json.dumps(msgspec.to_builtins(chain)),
        "--topic-prefix", config.indexer.topic_prefix,
    ]  # fmt: skip
    if config.indexer.kafka_bootstrap:
        argv += ["--kafka-bootstrap", config.indexer.kafka_bootstrap]
    # The chain node's URL may carry an API key, and the database's a password: not in argv.
    env = {POSTGRES_URL_ENV: str(config.indexer.postgres_url), RPC_URL_ENV: str(chain.rpc_url)}
    return Sidecar("chain", argv, view, env=env)


RPC_URL_ENV = "QB_CHAIN_RPC_URL"
ARCHIVER_ENTRY_POINT = ("quorumbook.sidecars", "archive")


def archive_sidecar(
    config: NodeConfig, view: Callable[[], dict], hold: Callable[[int], None]
) -> Sidecar:
    """The log archiver for an `[archive]` table: the module the `quorumbook.sidecars` entry
    point `archive` names (disaster_recovery/archiver.py), run with `-m`. `hold(index)` is
    called with the archive's end whenever the archiver reports it (archiving or standing
    by): the node's compaction keeps the log after it (ADR 0008)."""
    from importlib.metadata import entry_points

    group, name = ARCHIVER_ENTRY_POINT
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        raise RuntimeError(
            f"[archive] is configured but no {group} entry point {name!r} is installed "
            "(reinstall quorumbook)"
        )
    s = config.archive
    argv = [
        sys.executable, "-P", "-m", found[0].value,
        "--data-dir", str(config.data_dir), "--node-id", config.node_id,
        "--cluster-id", str(config.cluster_id),
        "--segment-max-s", str(s.segment_max_s),
        "--segment-max-entries", str(s.segment_max_entries),
        "--backup-interval-s", str(s.backup_interval_s),
        "--keep-backups", str(s.keep_backups),
    ]  # fmt: skip

    # A target URL may hold no secret (S3 credentials come from AWS_* variables), but keep it
    # beside them all the same.
    def on_status(status: dict) -> None:
        end = status.get("archived_index")
        if type(end) is int:
            hold(end)

    return Sidecar("archive", argv, view, env={TARGET_ENV: str(s.target)}, on_status=on_status)


TARGET_ENV = "QB_ARCHIVE_TARGET"
