"""The `quorumbook` command line. Later issues attach more groups here."""

from __future__ import annotations

import os

import click


class _Commands(click.Group):
    """The command groups: ours, and those of the packages that build on cluster/ (backup,
    restore, drill: in disaster_recovery/), which this module may not import: they are entry
    points of the group `quorumbook.commands` (pyproject.toml), read only when a command is
    not one of ours (reading them costs ~25 ms, at every node's start if done at import)."""

    def _plugins(self) -> dict[str, click.Command]:
        from importlib.metadata import entry_points

        found = {}
        for entry in entry_points(group="quorumbook.commands"):
            if entry.name not in self.commands:
                found[entry.name] = entry.load()
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self._plugins()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        ours = self.commands.get(cmd_name)
        return ours if ours is not None else self._plugins().get(cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """quorumbook: a Raft-replicated, deterministic order-matching cluster."""


@main.command()
@click.option("--seed", default=7, show_default=True, help="Seed of the trading session.")
@click.option("--orders", default=3000, show_default=True, help="Number of order commands.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the cluster's files here (default: a temporary directory).",
)
@click.option(
    "--services/--no-services",
    default=True,
    show_default=True,
    help="Start the embedded PostgreSQL and broker, and show what the indexer wrote to them.",
)
def demo(seed: int, orders: int, data_dir: str | None, services: bool) -> None:
    """Start the embedded services and a local 3-node cluster, run a seeded session with one
    leader kill, print it (the indexer's rows and messages too).

    Example: quorumbook demo --seed 42 --orders 5000
    """
    from pathlib import Path

    from .demo import run_cluster

    run_cluster(seed, orders, Path(data_dir) if data_dir else None, services)


@main.group()
def node() -> None:
    """Run a single node (the production path)."""


@node.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Node TOML config (node id, raft addr, peers, api port, data dir).",
)
def node_run(config_path: str) -> None:
    """Run one node until SIGTERM/SIGINT.

    The Raft password comes from the config's password_file (mode 0600) or the
    QUORUMBOOK_RAFT_PASSWORD environment variable, never from the command line.
    QB_WS_<KEY> variables override the config's [ws] keys (docs/reference/config.md).

    Example: quorumbook node run --config /srv/qb/n1/node.toml
    """
    from pathlib import Path

    from .config import ConfigError, load, with_environment
    from .node import run

    try:
        config = with_environment(load(Path(config_path)))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        config.check()  # secrets and timings: refuse now, with one line, not at start-up
    except ConfigError as exc:
        raise click.ClickException(f"config {config_path}: {exc}") from exc
    run(config)


@main.group()
def cluster() -> None:
    """Start and inspect a local cluster."""


@cluster.command("up")
@click.option("--nodes", "n", type=click.IntRange(1, 7), default=3, show_default=True)
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for configs, secrets, node data and cluster.json.",
)
@click.option(
    "--restart/--no-restart",
    default=True,
    show_default=True,
    help="Restart a node that dies (with backoff).",
)
@click.option(
    "--with-services",
    is_flag=True,
    help="Also start PostgreSQL and a Kafka-protocol broker (DIR/services) and stream every "
    "committed event to them from a follower (the indexer).",
)
@click.option(
    "--archive-to",
    default=None,
    help="A new cluster's [archive] target (a directory or s3://bucket/prefix): a follower "
    "ships the committed log there and takes scheduled backups "
    "(docs/operating/backup-restore.md).",
)
def cluster_up(
    n: int, data_dir: str, restart: bool, with_services: bool, archive_to: str | None
) -> None:
    """Start a local cluster of N node processes; stop them all on Ctrl-C.

    Example: quorumbook cluster up --nodes 3 --data-dir /tmp/qb --with-services
    """
    import math
    import signal
    import time
    from pathlib import Path

    from .launcher import LocalCluster
    from .raft import EXITS_NOT_TO_RESTART

    root = Path(data_dir)
    if archive_to and (root / "cluster.json").exists():
        raise click.UsageError(
            f"--archive-to sets up a new cluster; {root} holds one: set [archive] target in its "
            "nodes' node.toml"
        )
    services = None
    if with_services:
        from indexer.services import Services

        services = Services.start(root / "services")
        click.echo(f"services up: {services.postgres.url}  kafka {services.kafka.bootstrap}")
    try:
        cl = (
            LocalCluster.open(root / "cluster.json")
            if (root / "cluster.json").exists()
            else LocalCluster.create(
                root,
                n,
                **(services.urls() if services else {}),
                **({"target": archive_to} if archive_to else {}),
            )
        )
    except BaseException:
        if services is not None:
            services.stop()
        raise
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cl.start()
    try:
        leader = cl.wait_for_leader(30)
        click.echo(f"cluster of {len(cl.nodes)} up; leader {leader}; manifest {cl.manifest_path}")
        for node_id, proc in cl.nodes.items():
            click.echo(
                f"  {node_id}: api {proc.config.api_url}  raft {proc.config.raft_addr}  pid {proc.pid}"
            )
        click.echo(f"  admin credentials: {cl.admin_key_path}")
        backoff = {nid: 1.0 for nid in cl.nodes}
        next_try = {nid: 0.0 for nid in cl.nodes}
        refused_with: dict[str, tuple[int, int] | None] = {}
        while not stopping:
            time.sleep(0.2)
            for node_id in cl.adopt_from_manifest():  # add-node / remove-node from another shell
                click.echo(f"  membership changed: {node_id}")
                backoff.setdefault(node_id, 1.0)
                next_try.setdefault(node_id, 0.0)
            if not restart:
                continue
            for node_id, proc in cl.nodes.items():
                if node_id in refused_with and refused_with[node_id] != _identity(
                    proc.config.data_dir
                ):
                    del refused_with[node_id]  # its data directory was replaced: try again
                    next_try[node_id] = 1.0
                if proc.alive() or time.monotonic() < next_try[node_id]:
                    continue
                if proc.process is not None and next_try[node_id] == 0.0:
                    code = proc.process.returncode
                    if code in EXITS_NOT_TO_RESTART:
                        # The same data fails the same way: wait until an operator has moved
                        # the data directory aside (docs/operating/raft-storage.md).
                        refused_with[node_id] = _identity(proc.config.data_dir)
                        next_try[node_id] = math.inf
                        click.echo(
                            f"  {node_id} exited ({code}): not restarting on the same "
                            f"data; read {proc.config_path.parent / 'node.log'}"
                        )
                        continue
                    next_try[node_id] = time.monotonic() + backoff[node_id]
                    click.echo(f"  {node_id} exited ({code}); restart in {backoff[node_id]:.0f} s")
                    continue
                cl.start(node_id)
                proc.restarts += 1
                next_try[node_id] = 0.0
                backoff[node_id] = min(backoff[node_id] * 2, 30.0)
                click.echo(f"  {node_id} restarted (pid {proc.pid})")
    finally:
        click.echo("stopping cluster")
        cl.stop_all()
        if services is not None:
            click.echo("stopping services")
            services.stop()


@cluster.command("status")
@click.option(
    "--cluster",
    "manifest",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Path of the cluster's cluster.json.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cluster_status(manifest: str, as_json: bool) -> None:
    """Print every node's role, term, indexes, state hash and journal (with the log hold),
    and its indexer and archiver when it has them.

    Example: quorumbook cluster status --cluster /tmp/qb/cluster.json --json
    """
    import json
    from pathlib import Path

    from .launcher import LocalCluster

    cl = LocalCluster.open(Path(manifest))
    statuses = {nid: cl.status(nid) for nid in cl.nodes}
    if as_json:
        click.echo(json.dumps({"nodes": statuses}, indent=2))
        return
    for nid, s in statuses.items():
        click.echo(_status_line(nid, s))


def _status_line(nid: str, s: dict | None) -> str:
    """One node's status in a line (the fields: docs/reference/api.md, docs/reference/indexer.md,
    docs/operating/backup-restore.md)."""
    if s is None:
        return f"{nid}: unreachable"
    line = (
        f"{nid}: {s['role']:9} term {s['term']} commit {s['commit_index']} "
        f"applied {s['applied_index']} cmd {s['cmd_index']} hash {s['state_hash'][:16]}"
    )
    raft = s.get("raft") or {}
    if type(raft.get("journal_bytes")) is int:
        line += f"; journal {raft['journal_bytes'] / 1e6:.1f} MB"
        if raft.get("compaction_hold") is not None:
            line += f", held after {raft['compaction_hold']}"
    indexer = s.get("indexer") or {}
    if indexer.get("configured"):
        alarm = indexer.get("timeline_alarm") or (
            "gone" if indexer.get("gone_from_seq") is not None else None
        )
        line += f"; indexer {indexer.get('state')} lag {indexer.get('lag_events')}"
        line += f" ALARM {alarm}" if alarm else ""
    archive = s.get("archive") or {}
    if archive.get("configured"):
        lag = archive.get("lag_entries")
        line += f"; archive {archive.get('state')} lag {'-' if lag is None else lag}"
        line += f" gaps {archive['gaps']}" if archive.get("gaps") else ""
    return line


def _identity(path) -> tuple[int, int] | None:
    """(device, inode) of a directory, None if absent: tells that it was moved aside."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _open(manifest: str):
    from pathlib import Path

    from .launcher import LocalCluster

    return LocalCluster.open(Path(manifest))


_cluster_option = click.option(
    "--cluster",
    "manifest",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Path of the cluster's cluster.json.",
)


@cluster.command("add-node")
@_cluster_option
def cluster_add_node(manifest: str) -> None:
    """Start one more node and add it through the leader (one change at a time).

    Example: quorumbook cluster add-node --cluster /tmp/qb/cluster.json
    """
    cl = _open(manifest)
    node_id = cl.add_node()
    click.echo(
        f"added {node_id}: api {cl.nodes[node_id].config.api_url} "
        f"raft {cl.nodes[node_id].config.raft_addr} pid {cl.nodes[node_id].pid}"
    )


@cluster.command("remove-node")
@_cluster_option
@click.option("--node", "node_id", required=True, help="Id of the node to remove, e.g. n2.")
def cluster_remove_node(manifest: str, node_id: str) -> None:
    """Remove a node through the leader (moving leadership away first), then stop it.

    Example: quorumbook cluster remove-node --cluster /tmp/qb/cluster.json --node n2
    """
    cl = _open(manifest)
    if node_id not in cl.nodes:
        raise click.ClickException(
            f"no node {node_id!r} in {manifest} (have {', '.join(cl.nodes)})"
        )
    cl.remove_node(node_id)
    click.echo(f"removed {node_id}; members now {', '.join(cl.nodes)}")


@cluster.command("transfer-leader")
@_cluster_option
@click.option("--to", "target", default=None, help="Node id to hand over to (default: any other).")
def cluster_transfer_leader(manifest: str, target: str | None) -> None:
    """Move leadership and wait until it has moved.

    Example: quorumbook cluster transfer-leader --cluster /tmp/qb/cluster.json --to n3
    """
    cl = _open(manifest)
    before = cl.wait_for_leader(20)
    after = cl.transfer_leadership(target, away_from=before)
    click.echo(f"leader {before} -> {after}")


@main.command()
@_cluster_option
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=100.0,
    show_default=True,
    help="Operations per second (places and some cancels).",
)
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds of flow; the run stops by itself.",
)
@click.option("--seed", default=7, show_default=True, help="Seed of the order flow.")
@click.option(
    "--accounts",
    type=click.IntRange(1, 1000),
    default=8,
    show_default=True,
    help="Trader accounts (funded once, a new key each run).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 1000),
    default=16,
    show_default=True,
    help="Concurrent requests at most.",
)
@click.option(
    "--market", default="LG-USD", show_default=True, help="Market to trade (created if missing)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def loadgen(
    manifest: str,
    rate: float,
    duration_s: float,
    seed: int,
    accounts: int,
    workers: int,
    market: str,
    as_json: bool,
) -> None:
    """Send a steady seeded order flow through the client SDK and report what came back.

    Prints sent/acked/failed/unknown counts, trades and latency percentiles.

    Example: quorumbook loadgen --cluster /tmp/qb/cluster.json --rate 200 --duration 30 --json
    """
    import json
    from pathlib import Path

    from .loadgen import format_report, progress_line, run

    progress = None if as_json else (lambda tally: click.echo(progress_line(tally), err=True))
    try:
        report = run(
            Path(manifest),
            rate,
            duration_s,
            seed=seed,
            accounts=accounts,
            workers=workers,
            market=market,
            progress=progress,
        )
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report) if as_json else format_report(report))


@main.group()
def keys() -> None:
    """Manage API keys (through the admin API of a running cluster)."""


@keys.command("create")
@click.option("--account", required=True, help="Account the key trades for, e.g. alice.")
@click.option("--role", type=click.Choice(["trader", "admin"]), default="trader", show_default=True)
@click.option(
    "--cluster",
    "manifest",
    type=click.Path(exists=True, dir_okay=False),
    help="Path of the cluster's cluster.json (node URLs and admin credentials).",
)
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="A node's API URL (repeat for every node); instead of --cluster.",
)
@click.option(
    "--admin-key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Admin credentials (JSON, mode 0600); with --url.",
)
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificate to trust for https:// URLs (default: the system's CAs).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the key (JSON, mode 0600) to this new file instead of printing it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def keys_create(
    account: str,
    role: str,
    manifest: str | None,
    urls: tuple[str, ...],
    admin_key_file: str | None,
    ca_file: str | None,
    out: str | None,
    as_json: bool,
) -> None:
    """Create an API key; its secret is shown once (or written to --out) and never stored.

    Example: quorumbook keys create --account alice --cluster /tmp/qb/cluster.json --out alice.key
    """
    import json
    import os
    from pathlib import Path

    from api.sdk import AdminClient, ApiError, AuthError, ClusterUnavailable, read_credentials

    if bool(manifest) == bool(urls):
        raise click.UsageError("give either --cluster or --url (with --admin-key-file)")
    try:
        if manifest:
            cl = _open(manifest)
            node_urls, admin_creds = cl.api_urls(), cl.admin_credentials()
            verify = ca_file or cl.verify
        else:
            if not admin_key_file:
                raise click.UsageError("--url needs --admin-key-file")
            node_urls, admin_creds = list(urls), read_credentials(Path(admin_key_file))
            verify = ca_file or True
    except AuthError as exc:
        raise click.ClickException(exc.message) from exc
    out_fd = None
    if out:  # created before the key, so a bad path costs no key
        try:
            out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise click.ClickException(f"cannot create {out}: {exc.strerror}") from exc
    try:
        with AdminClient(node_urls, admin_creds, verify=verify) as client:
            creds = client.create_key(account, role)
    except (ApiError, ClusterUnavailable) as exc:
        if out_fd is not None:
            os.close(out_fd)
            os.unlink(out)
        raise click.ClickException(f"key not created: {exc}") from exc
    summary = {"key_id": creds.key_id, "account": creds.account, "role": creds.role}
    if out_fd is not None:
        with os.fdopen(out_fd, "w") as f:
            f.write(creds.to_json() + "\n")
        summary["file"] = str(Path(out).resolve())
    else:
        summary["secret"] = creds.secret
    if as_json:
        click.echo(json.dumps(summary))
        return
    for name, value in summary.items():
        click.echo(f"{name}: {value}")
    if out_fd is None:
        click.echo("the secret is shown only now: store it (mode 0600)", err=True)


@main.group()
def services() -> None:
    """Embedded PostgreSQL and a Kafka-protocol broker (for the indexer)."""


@services.command("up")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the database and the broker's log (services.json says where they are).",
)
def services_up(data_dir: str) -> None:
    """Start PostgreSQL and the broker on free loopback ports; stop them on Ctrl-C.

    Example: quorumbook services up --data-dir /tmp/qb-services
    """
    import signal
    import threading
    from pathlib import Path

    from indexer.services import Services

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    running = Services.start(Path(data_dir))
    try:
        click.echo(f"postgres_url    {running.postgres.url}")
        click.echo(f"kafka_bootstrap {running.kafka.bootstrap}")
        click.echo(f"(also in {running.manifest_path}; Ctrl-C stops both)")
        stop.wait()
    finally:
        click.echo("stopping services")
        running.stop()


@main.group()
def indexer() -> None:
    """The event indexer (PostgreSQL and Kafka): resync, adopt, tail."""


@indexer.command("resync")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A node.toml: its [indexer] postgres_url.",
)
@click.option("--postgres-url", default=None, help="Default: the config's [indexer] postgres_url.")
@click.option(
    "--wait-s", default=60.0, show_default=True, help="How long to wait for an indexer to do it."
)
def indexer_resync(config_path: str | None, postgres_url: str | None, wait_s: float) -> None:
    """Let the indexer skip the events no follower's log holds any more (the alarm,
    docs/operating/indexer.md): a follower that raised the alarm rebuilds the orders and
    balances tables from its own snapshot and streams on from there. The skipped range is
    recorded in indexer_resyncs.

    Example: quorumbook indexer resync --config /tmp/qb/n2/node.toml
    """
    import asyncio
    from pathlib import Path

    from .config import ConfigError, load
    from .indexer_resync import resync

    url = postgres_url
    if url is None and config_path is not None:
        try:
            url = load(Path(config_path)).indexer.postgres_url
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    if not url:
        raise click.ClickException("give --postgres-url, or --config of a node with [indexer]")
    try:
        done = asyncio.run(resync(url, wait_s=wait_s))
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(done)


@indexer.command("adopt")
@click.option(
    "--restore-json",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="The restore's record (NEWDIR/restore.json): the clusters and the restore point.",
)
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A node.toml of the restored cluster: its [indexer] postgres_url and cluster_id.",
)
@click.option("--postgres-url", default=None, help="Default: the config's [indexer] postgres_url.")
@click.option(
    "--cluster-id", default=None, help="The restored cluster's (default: restore.json's)."
)
@click.option(
    "--from-cluster-id", default=None, help="The old cluster's (default: restore.json's)."
)
@click.option("--at-seq", type=int, default=None, help="The restore point's seq.")
@click.option("--at-cmd-index", type=int, default=None, help="The restore point's cmd_index.")
@click.option("--at-log-index", type=int, default=None, help="Its log index in the new cluster.")
@click.option("--dry-run", is_flag=True, help="Say what it would do, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the indexer_adoptions row.")
def indexer_adopt(
    restore_json: str | None,
    config_path: str | None,
    postgres_url: str | None,
    cluster_id: str | None,
    from_cluster_id: str | None,
    at_seq: int | None,
    at_cmd_index: int | None,
    at_log_index: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Move the indexer's database to a restored cluster's history (the foreign_timeline
    alarm, docs/operating/indexer.md "After a restore"): the old history's rows past the
    restore point go to the *_orphaned tables, the rest is rolled back to it, and the restored
    cluster's indexer streams on from there. Refuses, changing nothing, when that cannot be
    done without mixing the two histories.

    Example: quorumbook indexer adopt --restore-json /tmp/qb2/restore.json --config /tmp/qb2/n1/node.toml
    """
    import asyncio
    import json
    from pathlib import Path

    from indexer.adoption import AdoptError, describe, run
    from indexer.timeline import RestorePoint

    from .config import ConfigError, load

    doc: dict = json.loads(Path(restore_json).read_text()) if restore_json else {}
    for key, value in (
        ("cluster_id", cluster_id),
        ("from_cluster_id", from_cluster_id),
        ("seq", at_seq),
        ("cmd_index", at_cmd_index),
        ("log_index", at_log_index),
    ):
        if value is not None:
            doc[key] = value
    url = postgres_url
    if config_path is not None:
        try:
            config = load(Path(config_path))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        url = url or config.indexer.postgres_url
        doc.setdefault("cluster_id", config.cluster_id)
        if doc["cluster_id"] != config.cluster_id:
            raise click.ClickException(
                f"{config_path} is of cluster {config.cluster_id}, not {doc['cluster_id']}"
            )
    if not url:
        raise click.ClickException("give --postgres-url, or --config of a node with [indexer]")
    try:
        point = RestorePoint.of_restore(doc)
    except ValueError as exc:
        raise click.ClickException(
            f"{exc} (give --restore-json, or --cluster-id, --from-cluster-id, --at-seq, "
            "--at-cmd-index and --at-log-index)"
        ) from exc
    try:
        record = asyncio.run(run(str(url), point, dry_run=dry_run))
    except (AdoptError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(record, default=str))
    else:
        click.echo(describe(record))


@indexer.command("tail")
@click.option(
    "--cluster",
    "manifest",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="cluster.json of a cluster started --with-services (its kafka_bootstrap).",
)
@click.option(
    "--bootstrap", default=None, help="host:port of a Kafka broker (instead of --cluster)."
)
@click.option("--prefix", default="qb", show_default=True, help="Topic prefix.")
@click.option("--topic", "topics", multiple=True, help="A topic without its prefix (default: all).")
@click.option("--follow", is_flag=True, help="Keep waiting for new events.")
@click.option(
    "--state",
    default=None,
    type=click.Path(dir_okay=False),
    help="A file keeping the positions: a rerun prints only what it did not print before.",
)
def indexer_tail(
    manifest: str | None,
    bootstrap: str | None,
    prefix: str,
    topics: tuple[str, ...],
    follow: bool,
    state: str | None,
) -> None:
    """Print the events from Kafka as JSON lines, each once (deduplicated by seq): the
    consumer example of docs/reference/indexer-kafka.md.

    Example: quorumbook indexer tail --cluster /tmp/qb/cluster.json --topic trades
    """
    import asyncio
    import json
    from pathlib import Path

    from indexer.consume import tail
    from indexer.events import TOPICS

    if bootstrap is None and manifest is not None:
        bootstrap = json.loads(Path(manifest).read_text()).get("kafka_bootstrap")
    if not bootstrap:
        raise click.ClickException("give --bootstrap, or --cluster of a cluster with services")
    for topic in topics:
        if topic not in TOPICS:
            raise click.ClickException(f"unknown topic {topic!r} (one of {', '.join(TOPICS)})")
    asyncio.run(
        tail(
            bootstrap,
            prefix=prefix,
            topics=topics or TOPICS,
            follow=follow,
            state=Path(state) if state else None,
        )
    )
