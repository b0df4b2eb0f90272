"""Backups: a node's state at a known log index, in a target, with a manifest that proves it.

Layout in a target (a directory or `s3://bucket/prefix`, disaster_recovery/target.py):

    quorumbook-target.json             which cluster the target belongs to
    backups/<backup_id>/state.bin      the node snapshot (`ExchangeMachine.snapshot()`)
    backups/<backup_id>/manifest.json  written last: a backup without one is incomplete
    segments/...                       the archived log (disaster_recovery/segments.py)

A target belongs to one cluster (its `cluster_id`, the same on every node): a restored cluster
gets a new id and archives to a new target, so two histories never mix. `verify` checks every
file's size and sha256, decodes the snapshot in full (every invariant of the book), recomputes
the state hash and compares it, the `cmd_index` and the `seq` with the manifest's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import platform
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from cluster.machine import ExchangeMachine, MachineSnapshotError, exchange_blob_of
from statemachine import SnapshotError
from statemachine.snapshot import stated_counters, stated_hash

from .target import MissingObject, Target

FORMAT = "quorumbook-backup"
VERSION = 1  # of the manifest and the files it lists; a newer one is refused, never guessed
MARKER = "quorumbook-target.json"
STATE_FILE = "state.bin"


class BackupError(RuntimeError):
    """A backup or target that cannot be used, said in one line (what, where, why)."""


class FileEntry(msgspec.Struct, frozen=True):
    name: str
    size: int
    sha256: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a backup holds and where it was taken (manifest.json)."""

    format: str = FORMAT
    version: int = VERSION
    cluster_id: str
    backup_id: str
    created_at: str  # ISO 8601, UTC
    taken_from: str  # node id (or "dump:<node id>" for a node's own compaction dump)
    applied_index: int  # the Raft log index the state is at (every entry up to it applied)
    cmd_index: int
    seq: int
    state_hash: str  # Exchange.state_hash() of the state
    build: dict[str, str]
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Marker(msgspec.Struct, frozen=True):
    format: str
    version: int
    cluster_id: str


def _prefix(backup_id: str) -> str:
    return f"backups/{backup_id}/"


def build_info() -> dict[str, str]:
    try:
        ours = importlib.metadata.version("quorumbook")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"quorumbook": ours, "python": platform.python_version()}


# ---------------------------------------------------------------------------------- the target


def target_cluster(target: Target) -> str | None:
    """The cluster a target belongs to, or None for a target nothing was written to."""
    try:
        raw = target.get(MARKER)
    except MissingObject:
        return None
    try:
        marker = msgspec.json.decode(raw, type=Marker)
    except msgspec.DecodeError as exc:
        raise BackupError(
            f"{target.url}/{MARKER} is not a quorumbook target marker: {exc}"
        ) from exc
    if marker.format != "quorumbook-target":
        raise BackupError(f"{target.url}/{MARKER} is not a quorumbook target marker")
    return marker.cluster_id


def bind(target: Target, cluster_id: str) -> None:
    """Make `target` this cluster's (first use), or refuse one of another cluster."""
    owner = target_cluster(target)
    if owner is None:
        doc = Marker("quorumbook-target", 1, cluster_id)
        target.put(MARKER, msgspec.json.encode(doc) + b"\n")
    elif owner != cluster_id:
        raise BackupError(
            f"{target.url} holds the backups and log of cluster {owner}, not {cluster_id}: "
            "give each cluster its own target (a restored cluster is a new cluster)"
        )


# ---------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class State:
    """A node's state to back up, and where it was taken."""

    blob: bytes  # ExchangeMachine.snapshot()
    applied_index: int
    cmd_index: int
    seq: int
    state_hash: str
    taken_from: str


def write(
    target: Target,
    cluster_id: str,
    state: State,
    *,
    now: dt.datetime | None = None,
) -> Manifest:
    """Store `state` as a new backup: the state file first, the manifest last (a crash in
    between leaves an incomplete backup that `list` shows and `verify` refuses, never one
    that looks whole)."""
    bind(target, cluster_id)
    created = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    backup_id = f"{created:%Y%m%dT%H%M%SZ}-{state.applied_index:012d}"
    target.put(_prefix(backup_id) + STATE_FILE, state.blob)
    manifest = Manifest(
        cluster_id=cluster_id,
        backup_id=backup_id,
        created_at=created.isoformat().replace("+00:00", "Z"),
        taken_from=state.taken_from,
        applied_index=state.applied_index,
        cmd_index=state.cmd_index,
        seq=state.seq,
        state_hash=state.state_hash,
        build=build_info(),
        files=(FileEntry(STATE_FILE, len(state.blob), hashlib.sha256(state.blob).hexdigest()),),
    )
    target.put(
        _prefix(backup_id) + "manifest.json", msgspec.json.format(msgspec.json.encode(manifest))
    )
    return manifest


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Listed:
    backup_id: str
    manifest: Manifest | None  # None: incomplete (no manifest) or unreadable
    problem: str | None = None


def backup_ids(target: Target) -> list[str]:
    ids = {name.split("/")[1] for name in target.list("backups/") if name.count("/") >= 2}
    return sorted(ids)


def read_manifest(target: Target, backup_id: str) -> Manifest:
    where = f"{target.url}/{_prefix(backup_id)}manifest.json"
    try:
        raw = target.get(_prefix(backup_id) + "manifest.json")
    except MissingObject:
        raise BackupError(f"backup {backup_id} is incomplete: {where} is missing") from None
    try:
        head = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BackupError(f"{where} is not JSON: {exc}") from exc
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise BackupError(f"{where} is not a quorumbook backup manifest")
    version = head.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise BackupError(
            f"backup {backup_id} was written by a newer build (format version {version}; this "
            f"build reads up to {VERSION}): use a newer quorumbook to read it"
        )
    try:
        return msgspec.json.decode(raw, type=Manifest)
    except msgspec.ValidationError as exc:
        raise BackupError(f"{where} is malformed: {exc}") from exc


def delete(target: Target, backup_id: str) -> None:
    """Remove a backup: its manifest first (so it is never a complete backup with a file
    missing), then its files."""
    prefix = _prefix(backup_id)
    target.delete(prefix + "manifest.json")
    for name in target.list(prefix):
        target.delete(name)


def list_backups(target: Target) -> list[Listed]:
    out = []
    for backup_id in backup_ids(target):
        try:
            out.append(Listed(backup_id, read_manifest(target, backup_id)))
        except BackupError as exc:
            out.append(Listed(backup_id, None, str(exc)))
    return out


def complete_backups(target: Target) -> list[Manifest]:
    """Every backup with a readable manifest, oldest first (by log index)."""
    found = [item.manifest for item in list_backups(target) if item.manifest is not None]
    return sorted(found, key=lambda m: (m.applied_index, m.backup_id))


@dataclass(frozen=True)
class Checked:
    """A backup whose files are the bytes its manifest lists, whose snapshot is a quorumbook
    snapshot of this format, and whose header and head state the manifest's hash, cmd_index
    and seq; its body not decoded yet."""

    manifest: Manifest
    blob: bytes  # the node snapshot as stored


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    machine: ExchangeMachine
    blob: bytes  # the node snapshot as stored


def check(target: Target, backup_id: str, *, cluster_id: str | None = None) -> Checked:
    """Read one backup and check everything that needs no decode: the manifest (complete,
    this format, this cluster), every file's size and sha256, and the snapshot's own header
    and head against the manifest (the hash its body's sha256 must be, its cmd_index, its
    seq). What a restore that only copies the backup checks; each node it seeds then decodes
    the snapshot in full as it loads it, and refuses to start on one that does not decode."""
    manifest = read_manifest(target, backup_id)
    owner = target_cluster(target)
    for expected, what in ((owner, "this target"), (cluster_id, "the cluster you named")):
        if expected is not None and manifest.cluster_id != expected:
            raise BackupError(
                f"backup {backup_id} is of cluster {manifest.cluster_id}, but {what} is "
                f"cluster {expected}: a foreign backup"
            )
    blobs = {}
    for entry in manifest.files:
        name = _prefix(backup_id) + entry.name
        try:
            data = target.get(name)
        except MissingObject:
            raise BackupError(f"backup {backup_id}: {entry.name} is missing") from None
        if len(data) != entry.size:
            raise BackupError(
                f"backup {backup_id}: {entry.name} is truncated or padded: {len(data)} bytes, "
                f"the manifest says {entry.size}"
            )
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BackupError(f"backup {backup_id}: {entry.name} is corrupted (sha256 mismatch)")
        blobs[entry.name] = data
    if STATE_FILE not in blobs:
        raise BackupError(f"backup {backup_id}: the manifest lists no {STATE_FILE}")
    blob = blobs[STATE_FILE]
    try:
        exchange_blob = exchange_blob_of(blob)
        seq, cmd_index = stated_counters(exchange_blob)
        stated = stated_hash(exchange_blob)
    except (MachineSnapshotError, SnapshotError) as exc:
        raise BackupError(f"backup {backup_id}: the snapshot does not decode: {exc}") from exc
    _compare(manifest, (stated, cmd_index, seq))
    return Checked(manifest, blob)


def _compare(manifest: Manifest, got: tuple[str, int, int]) -> None:
    want = (manifest.state_hash, manifest.cmd_index, manifest.seq)
    if got != want:
        raise BackupError(
            f"backup {manifest.backup_id}: the snapshot's state (hash {got[0][:16]}, cmd_index "
            f"{got[1]}, seq {got[2]}) is not the manifest's (hash {want[0][:16]}, cmd_index "
            f"{want[1]}, seq {want[2]})"
        )


def load(
    target: Target,
    backup_id: str,
    *,
    cluster_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    recompute_hash: bool = True,
) -> Verified:
    """Read and verify one backup; the state machine it holds. BackupError says what is wrong:
    incomplete, newer format, another cluster's, a file truncated or corrupted, a snapshot
    that does not decode or whose state hash, cmd_index or seq differ from the manifest's.

    `recompute_hash=False` compares the manifest's hash with the one the snapshot states
    (whose body decode checked against it, and found canonical) instead of walking the whole
    state again to recompute it (about 1.5 s per million orders)."""
    say = progress or (lambda _line: None)
    checked = check(target, backup_id, cluster_id=cluster_id)
    say(f"backup {backup_id}: checksums match; decoding {len(checked.blob):,} bytes")
    return decode_checked(checked, recompute_hash=recompute_hash)


def decode_checked(checked: Checked, *, recompute_hash: bool = True) -> Verified:
    """The state machine a checked backup holds, decoded in full (every invariant)."""
    manifest = checked.manifest
    machine = ExchangeMachine()
    try:
        machine.restore(checked.blob)
    except (MachineSnapshotError, SnapshotError, ValueError) as exc:
        raise BackupError(
            f"backup {manifest.backup_id}: the snapshot does not decode: {exc}"
        ) from exc
    exchange = machine.exchange
    # A backup in an older snapshot format states the hash of its own body (which the decode
    # checked, with every invariant, and `check` against the manifest): this build hashes
    # the same state in its own format, so only the counters are compared.
    recompute = recompute_hash and machine.restored_hash is not None  # this build's format
    got = exchange.state_hash() if recompute else manifest.state_hash
    _compare(manifest, (got, exchange.cmd_index, exchange.seq))
    return Verified(manifest, machine, checked.blob)


# ---------------------------------------------------------------------------------- taking one


def take(
    manifest_path: str,
    target: Target,
    *,
    node: str | None = None,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Back a running cluster up (`quorumbook backup create`): its state at a follower's
    applied index, taken on that follower (never the leader, unless `node` names it), stored
    in `target`, then read back and verified."""
    import json
    from pathlib import Path

    from api.sdk import AdminClient, ApiError, ClusterUnavailable, read_credentials

    say = progress or (lambda _line: None)
    doc = json.loads(Path(manifest_path).read_text())
    urls = {n["id"]: n["api_url"] for n in doc["nodes"]}
    creds = read_credentials(Path(doc["admin_credentials"]))
    with AdminClient(list(urls.values()), creds) as client:
        # /readyz, not the status: a status walks the whole state to hash it, on the leader too.
        readies = {nid: client.readiness(url) for nid, url in urls.items()}
        source = node or _pick_follower(readies)
        if source not in urls:
            raise BackupError(f"no node {source!r} in {manifest_path}")
        say(f"taking the state of {source} (role {(readies.get(source) or {}).get('role')})")
        last = [0.0]

        def on_progress(got: int, total: int | None) -> None:
            if got - last[0] >= 8 << 20 or got == total:
                last[0] = got
                of = f" of {total / 1e6:,.1f}" if total else ""
                say(f"  {got / 1e6:,.1f}{of} MB")

        try:
            snap = client.snapshot(urls[source], on_progress=on_progress)
        except (ApiError, ClusterUnavailable) as exc:
            raise BackupError(f"{source} did not give its state: {exc}") from exc
    cluster_id = snap.cluster_id
    if not cluster_id:
        raise BackupError(
            f"{snap.node_id} has no cluster_id (set the same `cluster_id` in every node.toml): "
            "backups and the archived log are tied to it"
        )
    if doc.get("cluster_id") not in (None, cluster_id):
        raise BackupError(
            f"{snap.node_id} is of cluster {cluster_id}, but {manifest_path} names cluster "
            f"{doc['cluster_id']}"
        )
    state = State(
        blob=snap.blob,
        applied_index=snap.applied_index,
        cmd_index=snap.cmd_index,
        seq=snap.seq,
        state_hash=snap.state_hash,
        taken_from=snap.node_id,
    )
    say(f"writing {len(snap.blob):,} bytes at log index {snap.applied_index} to {target.url}")
    manifest = write(target, cluster_id, state)
    if verify:
        say("reading it back to verify it")
        load(target, manifest.backup_id, cluster_id=cluster_id, progress=say)
    return manifest


def _pick_follower(readies: dict[str, dict | None]) -> str:
    """The ready follower (a live link to a leader, caught up) least behind the commit index,
    the lowest id of those (a leader is never asked)."""
    followers = [
        (s.get("lag_entries", 0), nid)
        for nid, s in readies.items()
        if s and s.get("role") == "follower"
    ]
    if not followers:
        answered = {nid: (s or {}).get("role", "not ready") for nid, s in readies.items()}
        raise BackupError(
            f"no follower with a live leader answered ({answered}): a backup is taken on a "
            "follower so that it never holds up the leader (name one with --node to insist)"
        )
    return min(followers)[1]
