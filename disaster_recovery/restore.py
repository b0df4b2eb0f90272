"""`quorumbook restore`: a new cluster from a target's backups and archived log.

The state at the newest point the target holds (or at the newest log entry whose commands end
at or before `--to-cmd-index N`) is rebuilt here, offline: the newest backup that gets there
(its checksums and manifest checked; decoded in full when an entry is applied to it, or with
`--verify`; otherwise each seeded node decodes it in full as it loads it), then the archived
segments after it, each entry applied to the state
machine and its `cmd_index` checked against the one the archiver recorded (a replay that
diverges stops the restore). The result seeds the data directory of every member of a new
local cluster (`cluster.raft.seed_data_dirs`): its log starts at that state, its nodes all
report its state hash, and it accepts orders.

The new cluster is a new history: a new `cluster_id`, its own archive target (the old one
stays the record of the old history), an indexer database that is reconciled, never shared
(docs/operating/backup-restore.md). Secrets are not in backups: the API master secret (which
derives every trader key's secret) and the admin key are carried over only when given.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.machine import ExchangeMachine, exchange_blob_of, without_directory
from cluster.raft import payload_of_entry, seed_data_dirs
from statemachine.snapshot import gc_paused, stated_hash, written_by_this_build

from . import backup, segments
from .target import Target


class RestoreError(RuntimeError):
    """A restore that cannot be done, said in one line."""


@dataclass(frozen=True)
class Plan:
    backup_id: str | None  # None: from the empty state at log index 0 (nothing compacted yet)
    anchor_index: int
    anchor_cmd_index: int
    chain: tuple[tuple[int, int, str], ...]  # the segments to read, in order
    archive_end: int  # the last log index the chain reaches


def plan(target: Target, to_cmd_index: int | None = None) -> Plan:
    """Where to start: of the backups at or before `to_cmd_index` (and the empty state, if
    the archive starts at the log's first entry), the one whose segment chain reaches
    furthest (the newest of those)."""
    cluster_id = backup.target_cluster(target)
    if cluster_id is None:
        raise RestoreError(f"{target.url} holds no quorumbook backup or archived log")
    anchors: list[tuple[str | None, int, int]] = [(None, 0, 0)]
    for m in backup.complete_backups(target):
        if to_cmd_index is None or m.cmd_index <= to_cmd_index:
            anchors.append((m.backup_id, m.applied_index, m.cmd_index))
    spans = segments.listed(target)
    best: Plan | None = None
    for backup_id, index, cmd_index in anchors:
        chain = tuple(segments.chain(spans, index))
        if backup_id is None and not chain:
            continue  # the empty state with nothing after it
        candidate = Plan(backup_id, index, cmd_index, chain, chain[-1][1] if chain else index)
        if best is None or (candidate.archive_end, index) > (best.archive_end, best.anchor_index):
            best = candidate
    if best is None:
        point = "" if to_cmd_index is None else f" at or before cmd_index {to_cmd_index}"
        raise RestoreError(
            f"{target.url} holds no backup{point} and no archived log from its start"
        )
    return best


@dataclass
class Restored:
    machine: ExchangeMachine | None  # None: the backup's, not decoded (no entry changed it)
    index: int
    cmd_index: int
    seq: int
    segments_read: int
    backup_blob: bytes | None = None  # the backup's snapshot, while no entry changed the state


def replay(
    target: Target,
    chosen: Plan,
    to_cmd_index: int | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    decode: bool = False,
) -> Restored:
    """The state at the plan's end (or at `to_cmd_index`'s entry boundary).

    The backup is checked (every file's sha256, its snapshot's stated hash, cmd_index and
    seq against the manifest) and decoded only when an archived entry must be applied to it
    (or `decode`): a state no entry changes is copied as it is, and every node it seeds
    decodes it in full (every invariant) as it loads it and refuses to start on a bad one."""
    say = progress or (lambda _line: None)
    cluster_id = backup.target_cluster(target)
    checked: backup.Checked | None = None
    machine: ExchangeMachine | None = None
    unchanged: bytes | None = None  # the backup's snapshot, while no entry changed the state
    if chosen.backup_id is not None:
        say(f"backup {chosen.backup_id}: log index {chosen.anchor_index}, cmd_index "
            f"{chosen.anchor_cmd_index}; checking")  # fmt: skip
        try:
            checked = backup.check(target, chosen.backup_id, cluster_id=cluster_id)
        except backup.BackupError as exc:
            raise RestoreError(str(exc)) from exc
        seq, unchanged = checked.manifest.seq, checked.blob
        if not written_by_this_build(exchange_blob_of(checked.blob)):
            # An older snapshot format: decoded and written again in this build's, so that
            # the new nodes start from (and report the hash of) the format they write.
            say("the backup's snapshot is in an older format: decoding it to rewrite it")
            decode, unchanged = True, None
    else:
        say("no backup before the archive's start: from the empty state")
        machine, seq = ExchangeMachine(), 0

    def decoded() -> ExchangeMachine:
        nonlocal machine
        if machine is None:
            assert checked is not None
            say(f"decoding the backup's {len(checked.blob):,} bytes (every invariant)")
            try:
                machine = backup.decode_checked(checked, recompute_hash=False).machine
            except backup.BackupError as exc:
                raise RestoreError(str(exc)) from exc
        return machine

    if decode:
        decoded()
    index, cmd_at, read = chosen.anchor_index, chosen.anchor_cmd_index, 0

    def done() -> Restored:
        if machine is None:
            return Restored(None, index, cmd_at, seq, read, unchanged)
        ex = machine.exchange
        return Restored(machine, index, ex.cmd_index, ex.seq, read, unchanged)

    for _first, _last, name in chosen.chain:
        try:
            segment = segments.read(target, name, cluster_id=cluster_id)
        except segments.SegmentError as exc:
            raise RestoreError(
                f"{exc}; the archive cannot be replayed past log index {index}"
            ) from exc
        read += 1
        for command, idx, _term, cmd_index in segment.entries:
            if idx <= index:
                continue  # an overlap with the segment before
            if idx != index + 1:
                raise RestoreError(f"{name}: log index {idx} follows {index}")
            if to_cmd_index is not None and cmd_index > to_cmd_index:
                say(f"stopped before log index {idx} (its commands end at cmd_index {cmd_index})")
                return done()
            payload = payload_of_entry(command)
            if payload is not None:
                applied = decoded()
                applied.apply(payload)
                cmd_at, unchanged = applied.exchange.cmd_index, None
            if cmd_at != cmd_index:
                raise RestoreError(
                    f"the replay diverged at log index {idx}: cmd_index {cmd_at} here, "
                    f"{cmd_index} when it was archived"
                )
            index = idx
        if read % 50 == 0:
            say(f"  {read} of {len(chosen.chain)} segments, log index {index}")
    return done()


def restore(
    target: Target,
    data_dir: Path,
    *,
    nodes: int = 3,
    to_cmd_index: int | None = None,
    force: bool = False,
    api_master_file: Path | None = None,
    admin_key_file: Path | None = None,
    archive_to: str | None = None,
    verify: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build a new local cluster of `nodes` members under `data_dir` at the restored state;
    returns what was restored (also written to `data_dir`/restore.json). `verify`: decode the
    backup in full here even when no archived entry needs it (`quorumbook backup verify`
    does the same without restoring), rather than leave that to the nodes as they start."""
    from cluster.launcher import LocalCluster

    say = progress or (lambda _line: None)
    data_dir = Path(data_dir)
    if nodes not in (1, 3, 5):
        raise RestoreError(f"--nodes must be 1, 3 or 5, not {nodes}")
    if data_dir.exists() and any(data_dir.iterdir()):
        if not force:
            raise RestoreError(
                f"{data_dir} is not empty: restore builds a new cluster there (give --force to "
                "delete what it holds first)"
            )
        shutil.rmtree(data_dir)
    old_cluster = backup.target_cluster(target)
    chosen = plan(target, to_cmd_index)
    # The collector stays off while a state is decoded, replayed and encoded again: it would
    # walk every object the decode made three times over (the young generation, then each
    # older one: 1.2 s of a 5.7 s restore of a million orders), and none is garbage.
    with gc_paused():
        restored = replay(target, chosen, to_cmd_index, say, decode=verify)
        machine = restored.machine
        # The old members' directory goes: the new cluster's are in its configs. A state no
        # entry changed keeps the backup's exchange bytes (no second encode of a large state).
        if restored.backup_blob is not None:
            blob = without_directory(restored.backup_blob)
        else:
            assert machine is not None
            machine.directory = {}
            blob = machine.snapshot()
        # What the result says, kept; the state freed here, while the collector is still off.
        index = max(restored.index, 2)  # a seeded log starts at index 2 at the earliest
        segments_read, cmd_index, seq = restored.segments_read, restored.cmd_index, restored.seq
        del restored, machine
    state_hash = stated_hash(exchange_blob_of(blob))
    new_id = f"qb-{secrets.token_hex(6)}"
    data_dir.mkdir(parents=True, exist_ok=True)
    for source, name in ((api_master_file, "api.master"), (admin_key_file, "admin.key")):
        if source is not None:
            shutil.copyfile(source, data_dir / name)
            (data_dir / name).chmod(0o600)
    settings: dict = {"cluster_id": new_id}
    if archive_to:
        settings["target"] = archive_to  # [archive] target
    cluster = LocalCluster.create(data_dir, nodes, **settings)
    members = [n.config.raft_addr for n in cluster.nodes.values()]
    seed_data_dirs([node.config.data_dir for node in cluster.nodes.values()], blob, index, members)
    result = {
        "restored_from": target.url,
        "from_cluster_id": old_cluster,
        "cluster_id": new_id,
        "backup_id": chosen.backup_id,
        "segments_read": segments_read,
        "archive_end_index": chosen.archive_end,
        "log_index": index,
        "cmd_index": cmd_index,
        "seq": seq,
        "state_hash": state_hash,
        "requested_cmd_index": to_cmd_index,
        "nodes": nodes,
        "manifest": str(cluster.manifest_path),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    (data_dir / "restore.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
