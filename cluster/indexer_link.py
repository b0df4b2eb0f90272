"""The node's side of its indexer process (cluster/indexer_process.py, ADR 0007).

A trio task in the node's nursery starts the process, tells it what it needs to know of the
node (role, applied index, the exchange's last `seq` and its time) as JSON lines on its stdin,
reads its status lines from its stdout (the node status's `indexer` object), and restarts it
(after 1 s, doubling to 30 s) if it dies. Stopping the node closes the process's stdin: it
releases its lease and exits; after 5 s it is killed.

Nothing here touches the Raft thread: the figures are ints the node publishes anyway.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable

import trio

from .config import Indexer

log = logging.getLogger("quorumbook.indexer")

POSTGRES_URL_ENV = "QB_INDEXER_POSTGRES_URL"
FEED_PERIOD_S = 0.02  # how often the node's figures are compared and sent when changed
FEED_HEARTBEAT_S = 0.5  # sent at least this often
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
STOP_TIMEOUT_S = 5.0


class IndexerLink:
    def __init__(
        self, settings: Indexer, node_id: str, data_dir: str, view: Callable[[], dict]
    ) -> None:
        self._settings = settings
        self._node_id = node_id
        self._data_dir = data_dir
        self._view = view  # -> {"role", "applied_index", "seq", "ts_ms"}
        self.status: dict = {"configured": True, "active": False, "state": "starting"}
        self.restarts = 0

    def command(self) -> list[str]:
        s = self._settings
        argv = [
            sys.executable, "-P", "-m", "cluster.indexer_process",
            "--data-dir", self._data_dir, "--node-id", self._node_id,
            "--topic-prefix", s.topic_prefix,
            "--lease-ttl-s", str(s.lease_ttl_s), "--batch-max-events", str(s.batch_max_events),
        ]  # fmt: skip
        if s.kafka_bootstrap:
            argv += ["--kafka-bootstrap", s.kafka_bootstrap]
        return argv

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = RESTART_MIN_S
        while True:
            started = trio.current_time()
            code = await self._run_once()
            self.status = {**self.status, "active": False, "state": "restarting",
                           "last_error": f"the indexer process exited ({code})"}  # fmt: skip
            if trio.current_time() - started > 60:
                backoff = RESTART_MIN_S  # it had been running a while: not a crash loop
            log.warning("indexer process exited (%s); restarting in %.0f s", code, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX_S)
            self.restarts += 1

    async def _run_once(self) -> int | None:
        # The URL may carry a password: in the environment (readable by this user only),
        # never on the command line (which `ps` shows to everyone).
        env = {**os.environ, POSTGRES_URL_ENV: str(self._settings.postgres_url)}
        process = await trio.lowlevel.open_process(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
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

    async def _stop(self, process: trio.Process) -> None:
        if process.returncode is not None:
            return
        if process.stdin is not None:
            await process.stdin.aclose()  # EOF: the process releases its lease and exits
        with trio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
            return
        process.kill()
        await process.wait()
