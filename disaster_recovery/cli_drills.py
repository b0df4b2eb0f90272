"""`quorumbook drill ...`: one command per drill, each printing a verdict and its figures.

The scenarios are `disaster_recovery/drills.py` and `drill_restore.py`; this module only reads
the options, shows the progress (stderr) and prints the result: with `--json` one object,
DESIGN.md's drill contract `{"drill", "ok", "rto_s", "acked_orders", "lost_orders",
"duplicated_orders", "state_hashes_equal", ...}` then the drill's own figures
(docs/operating/failover.md, replace-a-node.md, lost-quorum.md, backup-restore.md say what
each means). Exit code 0 when the verdict is a pass, 1 when it is a failure (or the drill
could not run), 2 for a usage error, 130 after Ctrl-C or SIGTERM (every process the drill
started is stopped first).
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.group()
def drill() -> None:
    """Disaster drills: each runs one scenario end to end and prints a verdict (--json).

    Example: quorumbook drill failover --nodes 3 --rounds 3 --json
    """


def _common(*, cluster: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every drill takes (`--cluster` only where the drill can run on one)."""
    options = [
        click.option(
            "--nodes",
            type=click.Choice(["3", "5"]),
            default=None,
            help="Run on a throwaway local cluster of this size, in a temporary directory, "
            "stopped at the end  [default: 3]",
        ),
        click.option("--seed", default=7, show_default=True, help="Seed of the order flow."),
        click.option(
            "--rate",
            type=click.FloatRange(min=1, max=5000),
            default=100.0,
            show_default=True,
            help="Orders per second of load.",
        ),
        click.option(
            "--keep",
            is_flag=True,
            help="Keep the throwaway cluster's directory (node logs) and print where it is.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    if cluster:
        options.insert(
            0,
            click.option(
                "--cluster",
                "manifest",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                default=None,
                help="Run on this local cluster (its cluster.json), started by `quorumbook "
                "cluster up` with restarts on: the drill kills nodes, the cluster restarts them.",
            ),
        )

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _run(run: Callable[..., Any], nodes: str | None, **kwargs: Any) -> None:
    """Run a drill function and report: the exit code is the verdict."""
    import json

    from .drills import format_report

    as_json = kwargs.pop("as_json")
    manifest = kwargs.get("manifest")
    if manifest is not None and nodes is not None:
        raise click.UsageError("give --cluster or --nodes, not both")
    if manifest is not None and kwargs.get("keep"):
        raise click.UsageError("--keep is for a throwaway cluster (--nodes)")
    progress = None if as_json else functools.partial(click.echo, err=True)

    def on_sigterm(signum: int, frame: object) -> None:
        # The same clean-up as Ctrl-C, once: a second SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = run(nodes=int(nodes or 3), progress=progress, **kwargs)
    except KeyboardInterrupt:
        click.echo("drill interrupted; every process it started is stopped", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    data = result.as_json()
    click.echo(json.dumps(data) if as_json else format_report(data))
    sys.exit(0 if result.ok else 1)


@drill.command()
@_common(cluster=True)
@click.option(
    "--rounds",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Leader kills, one after the other.",
)
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=0.2, max=600),
    default=1.0,
    show_default=True,
    help="Seconds of acknowledged load before each kill.",
)
def failover(nodes: str | None, **kwargs: Any) -> None:
    """SIGKILL the leader under load, ROUNDS times; prove no acknowledged order was lost.

    Each round: SIGKILL the leader, measure its RTO (the kill -> the next order acknowledged
    by another node), restart the killed node from its data (on --cluster: wait for the
    cluster's supervisor to) and wait until it caught up. Then every acknowledged order must
    be on every node exactly once, and the state hashes equal. rto_s is the worst round; the
    RTO target (median <= 0.5 s, max <= 1 s) is a warning, not the verdict.

    Example: quorumbook drill failover --cluster /tmp/qb/cluster.json --rounds 5 --json
    """
    from .drills import failover as run

    _run(run, nodes, **kwargs)


@drill.command()
@_common(cluster=True)
def membership(nodes: str | None, **kwargs: Any) -> None:
    """Replace a node under load: add one, wait until it caught up, remove an old follower.

    The load must be acknowledged throughout (rto_s: the longest pause between
    acknowledgements; 3 s fails), nothing acknowledged lost, the final members' state hashes equal, the removed node's process
    stopped. With --cluster the cluster keeps the new member in place of the removed one.

    Example: quorumbook drill membership --nodes 5 --rate 200
    """
    from .drills import membership as run

    _run(run, nodes, **kwargs)


@drill.command("quorum-loss")
@_common(cluster=False)
@click.option(
    "--outage",
    "outage_s",
    type=click.FloatRange(min=1, max=600),
    default=3.0,
    show_default=True,
    help="Seconds the majority stays down.",
)
def quorum_loss(nodes: str | None, **kwargs: Any) -> None:
    """SIGKILL a majority under load; prove the survivors acknowledge nothing, then recover.

    The followers are killed (the leader is left alone and must notice). During the outage
    no write may be acknowledged and no linearizable read answered; after the restart a
    leader is elected, writes are acknowledged again (rto_s: the restart -> the first
    acknowledgement), nothing acknowledged before was lost, and each unknown outcome was
    applied once or not at all. A throwaway cluster only: a supervisor would end the outage.

    Example: quorumbook drill quorum-loss --nodes 5 --outage 5 --json
    """
    from .drills import quorum_loss as run

    _run(run, nodes, **kwargs)


@drill.command("restore")
@_common(cluster=False)
@click.option(
    "--to",
    default=None,
    help="The target to archive and back up to (a directory or s3://bucket/prefix; default: "
    "a directory in the drill's temporary one).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1, max=600),
    default=6.0,
    show_default=True,
    help="Seconds of load before the disaster (the backup is taken half-way).",
)
def restore(nodes: str | None, **kwargs: Any) -> None:
    """Lose the whole cluster under load and restore it from its backup and archived log.

    A throwaway cluster archives its log; a backup is taken half-way through the load; every
    node is SIGKILLed and its data deleted; `restore` builds a new cluster, which must report
    the restored state hash on every node, hold every order acknowledged up to the restored
    point once and none after it, and take a new order. rto_s: the disaster -> the restored
    cluster's first acknowledgement (restore and start included); rpo_orders, rpo_s: what
    was acknowledged after the restored point (docs/operating/backup-restore.md).

    Example: quorumbook drill restore --nodes 3 --seconds 6 --json
    """
    from .drill_restore import run

    _run(run, nodes, **kwargs)
