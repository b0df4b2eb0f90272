"""`quorumbook backup|restore|drill` (added to the CLI root through entry points, pyproject.toml).

Imports of the work are inside the commands: `quorumbook --help` stays quick.
"""

from __future__ import annotations

import json
import sys

import click

from .cli_drills import drill


def _say(line: str) -> None:
    click.echo(line, err=True)


def _target(url: str):
    from .target import TargetError, open_target

    try:
        return open_target(url)
    except (ValueError, TargetError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def backup() -> None:
    """Backups of a cluster's state in a directory or an S3-compatible target."""


@backup.command("create")
@click.option(
    "--cluster",
    "manifest",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="cluster.json of the cluster to back up.",
)
@click.option("--to", "to", required=True, help="A directory, or s3://bucket/prefix.")
@click.option("--node", default=None, help="Take it on this node (default: a caught-up follower).")
@click.option("--no-verify", is_flag=True, help="Do not read the backup back to verify it.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object.")
def backup_create(manifest: str, to: str, node: str | None, no_verify: bool, as_json: bool) -> None:
    """Back the cluster's state up at a follower's applied index, with a manifest (index,
    cmd_index, state hash, sizes and sha256 of every file, time, build), then verify it.

    S3 credentials and endpoint come from the usual AWS variables (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL).

    Example: quorumbook backup create --cluster /tmp/qb/cluster.json --to /srv/qb-backups
    """
    import msgspec

    from .backup import BackupError, take
    from .target import TargetError

    target = _target(to)
    try:
        made = take(
            manifest, target, node=node, verify=not no_verify, progress=None if as_json else _say
        )
    except (BackupError, TargetError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(msgspec.json.encode(made).decode())
    else:
        click.echo(
            f"backup {made.backup_id}: log index {made.applied_index}, cmd_index "
            f"{made.cmd_index}, state {made.state_hash[:16]}, {made.size:,} bytes, from "
            f"{made.taken_from}{'' if no_verify else ', verified'}"
        )


@backup.command("verify")
@click.argument("to")
@click.option("--backup", "backup_id", default=None, help="Only this backup (default: all).")
@click.option("--cluster-id", default=None, help="Refuse backups of any other cluster.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def backup_verify(to: str, backup_id: str | None, cluster_id: str | None, as_json: bool) -> None:
    """Check every backup in TARGET: checksums, the snapshot decoded in full, the state hash
    recomputed. Exits 1 if any fails, saying why.

    Example: quorumbook backup verify s3://qb-backups/prod
    """
    from .backup import BackupError, backup_ids, load
    from .target import TargetError

    target = _target(to)
    try:
        ids = [backup_id] if backup_id else backup_ids(target)
    except TargetError as exc:
        raise click.ClickException(str(exc)) from exc
    results = []
    for one in ids:
        try:
            verified = load(target, one, cluster_id=cluster_id, progress=None)
            m = verified.manifest
            results.append({"backup_id": one, "ok": True, "applied_index": m.applied_index,
                            "cmd_index": m.cmd_index, "state_hash": m.state_hash})  # fmt: skip
        except (BackupError, TargetError) as exc:
            results.append({"backup_id": one, "ok": False, "error": str(exc)})
    ok = bool(results) and all(r["ok"] for r in results)
    if as_json:
        click.echo(json.dumps({"ok": ok, "target": target.url, "backups": results}))
    else:
        for r in results:
            if r["ok"]:
                click.echo(
                    f"ok    {r['backup_id']}  cmd_index {r['cmd_index']}  state {r['state_hash'][:16]}"
                )
            else:
                click.echo(f"FAIL  {r['backup_id']}  {r['error']}")
        if not results:
            click.echo(f"no backups in {target.url}")
    sys.exit(0 if ok else 1)


@backup.command("list")
@click.argument("to")
@click.option(
    "--segments",
    "all_segments",
    is_flag=True,
    help="Also every archived segment (log indexes, cmd_index range, when it was cut): "
    "where to stop a point-in-time restore.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def backup_list(to: str, all_segments: bool, as_json: bool) -> None:
    """What TARGET holds: its cluster, its backups (index, cmd_index, size, time) and the
    archived log (its first and last segment; every one with --segments).

    Example: quorumbook backup list /srv/qb-backups --segments
    """
    from . import segments
    from .backup import BackupError, list_backups, target_cluster
    from .target import TargetError

    target = _target(to)
    try:
        owner = target_cluster(target)
        listed = list_backups(target)
        spans = segments.listed(target)
        shown = spans if all_segments else spans[:1] + spans[-1:] if len(spans) > 1 else spans
        described = []
        for first, last, name in shown:
            seg = segments.read(target, name, cluster_id=owner)
            described.append({"name": name, "first_index": first, "last_index": last,
                              "first_cmd_index": seg.first_cmd_index,
                              "last_cmd_index": seg.last_cmd_index,
                              "created_at": seg.created_at})  # fmt: skip
    except (BackupError, TargetError, segments.SegmentError) as exc:
        raise click.ClickException(str(exc)) from exc
    archive = {
        "segments": len(spans),
        "first_index": spans[0][0] if spans else None,
        "last_index": max(last for _first, last, _name in spans) if spans else None,
        "listed": described,
    }
    rows = [
        {"backup_id": item.backup_id, "complete": item.manifest is not None,
         **({"created_at": item.manifest.created_at, "applied_index": item.manifest.applied_index,
             "cmd_index": item.manifest.cmd_index, "size": item.manifest.size,
             "taken_from": item.manifest.taken_from} if item.manifest else
            {"problem": item.problem})}
        for item in listed
    ]  # fmt: skip
    if as_json:
        click.echo(json.dumps({"target": target.url, "cluster_id": owner, "backups": rows,
                               "archive": archive}))  # fmt: skip
        return
    click.echo(f"{target.url}: cluster {owner or '(none yet)'}, {len(rows)} backups")
    for r in rows:
        if r["complete"]:
            click.echo(
                f"  {r['backup_id']}  index {r['applied_index']}  cmd_index {r['cmd_index']}  "
                f"{r['size']:,} bytes  from {r['taken_from']}"
            )
        else:
            click.echo(f"  {r['backup_id']}  INCOMPLETE: {r['problem']}")
    click.echo(
        f"archived log: {archive['segments']} segments"
        + (f", log index {archive['first_index']}..{archive['last_index']}" if spans else "")
    )
    for d in described:
        click.echo(
            f"  {d['name']}  cmd_index {d['first_cmd_index']}..{d['last_cmd_index']}  "
            f"cut {d['created_at']}"
        )


@backup.command("log")
@click.argument("to")
@click.option(
    "--to-index",
    type=click.IntRange(1),
    default=None,
    help="Up to this log index, which must be archived (default: everything archived).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the JSON lines to this file (default: standard output).",
)
def backup_log(to: str, to_index: int | None, out: str | None) -> None:
    """Every command of TARGET's archived log, from the first, as the exchange applied it
    (with its ts): one JSON line {"cmd_index", "command"} each. Exits 1 if the archive does
    not hold the log from its first entry (or up to --to-index).

    Example: quorumbook backup log /srv/qb-backups --out /tmp/commands.jsonl
    """
    from pathlib import Path

    from .export import LogError, committed_commands, write_log
    from .segments import SegmentError
    from .target import TargetError

    target = _target(to)
    try:
        commands = committed_commands(target, to_index)
    except (LogError, SegmentError, TargetError) as exc:
        raise click.ClickException(str(exc)) from exc
    if out is not None:
        write_log(Path(out), commands)
        _say(f"{len(commands)} commands to {out}")
    else:
        for line in commands:
            click.echo(json.dumps(line, separators=(",", ":")))


@click.command()
@click.option(
    "--from", "source", required=True, help="The target: a directory or s3://bucket/prefix."
)
@click.option(
    "--to-cmd-index",
    type=click.IntRange(0),
    default=None,
    help="A point in time: the newest log entry whose commands end at or before it "
    "(default: everything archived).",
)
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where the new cluster's files go (must be empty, unless --force).",
)
@click.option("--nodes", type=click.Choice(["1", "3", "5"]), default="3", show_default=True)
@click.option("--force", is_flag=True, help="Delete what --data-dir holds first.")
@click.option(
    "--api-master-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The old cluster's API master secret (its trader keys keep working); not in backups.",
)
@click.option(
    "--admin-key-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The old cluster's admin key, to keep using it; not in backups.",
)
@click.option("--archive-to", default=None, help="A NEW target for the restored cluster's archive.")
@click.option(
    "--verify",
    is_flag=True,
    help="Decode the backup in full (every invariant) before seeding, as `backup verify` "
    "does. Without it a backup no archived entry changes is checked by its checksums and "
    "manifest here, and decoded in full by every node as it starts.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def restore(
    source: str,
    to_cmd_index: int | None,
    data_dir: str,
    nodes: str,
    force: bool,
    api_master_file: str | None,
    admin_key_file: str | None,
    archive_to: str | None,
    verify: bool,
    as_json: bool,
) -> None:
    """Build the data directories of a new cluster from the newest backup at or before the
    point asked for, plus the archived log up to it; every member starts at that state.
    Start it with `quorumbook cluster up --data-dir DIR`: every node must then report the
    state hash printed here.

    Example: quorumbook restore --from s3://qb-backups/prod --data-dir /srv/qb-restored
    """
    from pathlib import Path

    from .backup import BackupError
    from .restore import RestoreError
    from .restore import restore as run_restore
    from .segments import SegmentError
    from .target import TargetError

    try:
        done = run_restore(
            _target(source),
            Path(data_dir),
            nodes=int(nodes),
            to_cmd_index=to_cmd_index,
            force=force,
            api_master_file=Path(api_master_file) if api_master_file else None,
            admin_key_file=Path(admin_key_file) if admin_key_file else None,
            archive_to=archive_to,
            verify=verify,
            progress=None if as_json else _say,
        )
    except (RestoreError, BackupError, SegmentError, TargetError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(done))
        return
    click.echo(
        f"restored cluster {done['cluster_id']} (from {done['from_cluster_id']}) in {data_dir}: "
        f"log index {done['log_index']}, cmd_index {done['cmd_index']}, state "
        f"{done['state_hash']}\n  from backup {done['backup_id'] or '(none: the log from its start)'}"
        f" and {done['segments_read']} archived segments\n  start it: quorumbook cluster up "
        f"--data-dir {data_dir}; every node must report that state hash"
    )


__all__ = ["backup", "drill", "restore"]
