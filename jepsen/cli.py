"""`quorumbook jepsen run|check` (added to the CLI root through an entry point, pyproject.toml).

Exit status: 0 when the history is valid, 1 when it is not (or unknown: a checker could not
decide), 2 for a usage error.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import click


@click.group()
def jepsen() -> None:
    """The Jepsen-style harness: faults, histories, pure checkers, reports (docs/jepsen.md)."""


def _verdict_line(results: dict) -> str:
    valid = results.get("valid")
    word = {True: "VALID", False: "INVALID"}.get(valid, "UNKNOWN")
    parts = []
    for name, checker in results.get("checkers", {}).items():
        kinds = sorted({a["kind"] for a in checker.get("anomalies", [])})
        parts.append(f"{name} {checker.get('valid')}" + (f" ({', '.join(kinds)})" if kinds else ""))
    return f"{word}: " + "; ".join(parts)


def _exit(results: dict) -> None:
    sys.exit(0 if results.get("valid") is True else 1)


@jepsen.command("run")
@click.option("--nodes", type=click.Choice(["1", "3", "5"]), default="3", show_default=True)
@click.option("--time", "time_s", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds of load and faults, before healing and the final reads.")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=1), default=200.0, show_default=True,
              help="Operations per second, all clients together.")  # fmt: skip
@click.option("--nemesis", "nemeses", default="kill,pause,partition", show_default=True,
              help="Comma-separated: kill, pause, partition, restart-all, clock, membership, data; "
              "'none' for no faults.")  # fmt: skip
@click.option("--workload", type=click.Choice(["orders"]), default="orders", show_default=True)
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seeds the clients' operations and the fault schedule.")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(1, 200), default=None,
              help="Logical clients at once [default: 2 per node].")  # fmt: skip
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.5), default=4.0,
              show_default=True, help="A fault lasts, and the quiet between two lasts, up to this.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("store"),
              show_default=True, help="Each run writes OUT/<time>-s<seed>/.")  # fmt: skip
@click.option("--unsafe-local-reads", is_flag=True,
              help="PLANTED BUG: the nodes answer linearizable reads from their own state "
              "without the read barrier, so a deposed leader serves stale reads. A run with "
              "partitions must report it invalid.")  # fmt: skip
@click.option("--unsafe-raft-fixes-off", is_flag=True,
              help="PLANTED REGRESSION: the nodes run with the Raft adapter's safety fixes "
              "off (pysyncobj's own AppendEntries, snapshot and membership handling), which "
              "loses acknowledged writes under leader changes. A run with kill, partition or "
              "membership faults should report it invalid.")  # fmt: skip
@click.option("--raft", "raft_settings", multiple=True, metavar="KEY=VALUE",
              help="A [raft] key of the nodes' config (docs/reference/config.md), repeatable: "
              "compaction_min_entries=100 makes the nodes compact and install snapshots from "
              "the leader during the run, snapshot_chunk_bytes=4096 sends them in many "
              "chunks.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def run_command(nodes: str, nemeses: str, as_json: bool, **kwargs) -> None:
    """Start a fresh cluster, run the workload under faults, heal, check, report.

    Example: quorumbook jepsen run --nodes 3 --time 60 --rate 200 --nemesis kill,pause,partition
    """
    from .run import Options, run

    names = () if nemeses.strip() in ("", "none") else tuple(n.strip() for n in nemeses.split(","))
    kwargs["raft_settings"] = _raft_settings(kwargs["raft_settings"])
    opts = Options(nodes=int(nodes), nemeses=names, **kwargs)
    try:
        opts.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    results = run(opts, progress=None if as_json else lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(results, default=str))
    else:
        click.echo(_verdict_line(results))
        click.echo(f"report: {Path(results['dir']) / 'index.html'}")
    _exit(results)


@jepsen.command("check")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def check_command(run_dir: Path, as_json: bool) -> None:
    """Check a stored run again (its history.jsonl and log.jsonl) and rewrite its report.

    Example: quorumbook jepsen check store/20261202T120000Z-s1
    """
    from .checkers import check_all
    from .history import HistoryError
    from .report import write_report

    try:
        results = check_all(run_dir)
    except (HistoryError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    previous = run_dir / "results.json"
    if previous.exists():
        results["run"] = json.loads(previous.read_text()).get("run", {})
    previous.write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_report(run_dir, results=results)
    click.echo(json.dumps(results, default=str) if as_json else _verdict_line(results))
    _exit(results)


__all__ = ["jepsen"]


def _raft_settings(pairs: tuple[str, ...]) -> dict:
    """`KEY=VALUE` options, each value read as TOML reads it (100, 0.5, true)."""
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--raft {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise click.UsageError(f"--raft {pair!r}: {exc}") from exc
    return out
