"""Backups and segments as files, without a cluster: every damaged or foreign one is refused
with a message that says what is wrong, and a restore replays exactly what was archived."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from cluster.batch import KIND_COMMAND, encode_batch
from cluster.machine import ExchangeMachine, exchange_blob_of
from cluster.raft import entry_of_payload, payload_of_entry
from disaster_recovery import backup, restore, segments
from disaster_recovery.archiver import StandbyView, reach
from disaster_recovery.target import DirTarget
from statemachine.snapshot import stated_hash

CLUSTER = "qb-test0001"


def deposit(i: int) -> dict:
    return {"op": "deposit", "account": f"a{i % 5}", "asset": "USD", "amount": 100 + i,
            "ref": f"d{i}"}  # fmt: skip


def payload(i: int) -> bytes:
    return encode_batch(1_000 + i, [[KIND_COMMAND, deposit(i)]])


def command(i: int) -> bytes:
    """A log entry's command as the node's journal holds it (pysyncobj's envelope)."""
    entry = entry_of_payload(payload(i))
    assert payload_of_entry(entry) == payload(i)
    return entry


def state_at(n: int) -> ExchangeMachine:
    machine = ExchangeMachine()
    for i in range(1, n + 1):
        machine.apply(payload(i))
    return machine


def backup_state(machine: ExchangeMachine, index: int) -> backup.State:
    blob = machine.snapshot()
    ex = machine.exchange
    return backup.State(
        blob, index, ex.cmd_index, ex.seq, stated_hash(exchange_blob_of(blob)), "n2"
    )


def archive(target: DirTarget, first: int, last: int) -> None:
    """Segments of entries first..last, as an archiver writes them (one entry per deposit)."""
    machine = state_at(first - 1)
    entries = []
    for i in range(first, last + 1):
        machine.apply(payload(i))
        entries.append((command(i), i, 1, machine.exchange.cmd_index))
    seg = segments.Segment(CLUSTER, first - 1, "2026-12-02T00:00:00Z", tuple(entries))
    target.put(seg.name, segments.encode(seg))


@pytest.fixture
def target(tmp_path: Path) -> DirTarget:
    return DirTarget(tmp_path / "target")


@pytest.fixture
def made(target: DirTarget) -> backup.Manifest:
    return backup.write(target, CLUSTER, backup_state(state_at(20), 20))


def test_a_backup_round_trips_with_its_manifest(target, made) -> None:
    verified = backup.load(target, made.backup_id)
    assert verified.machine.exchange.state_hash() == state_at(20).exchange.state_hash()
    assert (made.applied_index, made.cmd_index, made.cluster_id) == (20, 20, CLUSTER)
    listed = backup.list_backups(target)
    assert [(x.backup_id, x.manifest is not None) for x in listed] == [(made.backup_id, True)]
    doc = json.loads(target.get(f"backups/{made.backup_id}/manifest.json"))
    assert {"format", "version", "cluster_id", "applied_index", "cmd_index", "state_hash",
            "created_at", "build", "files"} <= set(doc)  # fmt: skip
    assert doc["files"][0]["sha256"] and doc["files"][0]["size"] == made.size


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "truncated"),
        ("flip", "corrupted"),
        ("manifest_missing", "incomplete"),
        ("newer", "newer build"),
        ("foreign_manifest", "foreign backup"),
        ("not_json", "not JSON"),
        ("bad_snapshot", "does not decode"),
        ("wrong_hash", "is not the manifest's"),
    ],
)
def test_a_damaged_or_foreign_backup_is_refused_saying_why(target, made, damage, message):
    prefix = f"backups/{made.backup_id}/"
    state = target.get(prefix + "state.bin")
    manifest = json.loads(target.get(prefix + "manifest.json"))

    def rewrite(**changes) -> None:
        target.put(prefix + "manifest.json", json.dumps({**manifest, **changes}).encode())

    if damage == "truncate":
        target.put(prefix + "state.bin", state[:-10])
    elif damage == "flip":
        target.put(prefix + "state.bin", state[:100] + bytes([state[100] ^ 1]) + state[101:])
    elif damage == "manifest_missing":
        target.delete(prefix + "manifest.json")
    elif damage == "newer":
        rewrite(version=backup.VERSION + 1)
    elif damage == "foreign_manifest":
        rewrite(cluster_id="qb-other")
    elif damage == "not_json":
        target.put(prefix + "manifest.json", b"{not json")
    elif damage in ("bad_snapshot", "wrong_hash"):
        blob = b"junk" if damage == "bad_snapshot" else state_at(19).snapshot()
        target.put(prefix + "state.bin", blob)
        import hashlib

        rewrite(files=[{"name": "state.bin", "size": len(blob),
                        "sha256": hashlib.sha256(blob).hexdigest()}])  # fmt: skip
    with pytest.raises(backup.BackupError, match=message):
        backup.load(target, made.backup_id)


def test_a_target_belongs_to_one_cluster(target, made) -> None:
    with pytest.raises(backup.BackupError, match=f"holds the backups and log of cluster {CLUSTER}"):
        backup.write(target, "qb-other", backup_state(state_at(3), 3))
    with pytest.raises(backup.BackupError, match="foreign backup"):
        backup.load(target, made.backup_id, cluster_id="qb-other")


def test_a_segment_that_is_damaged_newer_or_misnamed_is_refused(target) -> None:
    archive(target, 21, 30)
    name = segments.name_of(21, 30)
    raw = target.get(name)
    assert segments.read(target, name, cluster_id=CLUSTER).last_cmd_index == 30
    outer = msgspec.msgpack.decode(raw)
    body = bytearray(outer["body"])
    body[5] ^= 0xFF
    cases = {
        "corrupted": msgspec.msgpack.encode({**outer, "body": bytes(body)}),
        "truncated": raw[:-20],
        "newer build": msgspec.msgpack.encode({**outer, "version": segments.VERSION + 1}),
        "not a quorumbook log segment": msgspec.msgpack.encode({"format": "x"}),
    }
    for message, damaged in cases.items():
        target.put(name, damaged)
        with pytest.raises(segments.SegmentError, match=message):
            segments.read(target, name)
    target.put(segments.name_of(21, 29), raw)  # the right bytes under the wrong name
    with pytest.raises(segments.SegmentError, match="not what its name says"):
        segments.read(target, segments.name_of(21, 29))
    target.put(name, raw)
    with pytest.raises(segments.SegmentError, match="of cluster"):
        segments.read(target, name, cluster_id="qb-other")


def test_restore_replays_the_archive_from_the_best_backup_to_a_point_in_time(target, made):
    archive(target, 21, 40)
    archive(target, 35, 60)  # an overlap (two archivers raced): the chain takes either
    archive(target, 62, 70)  # after a gap: unreachable from the backup at 20
    chosen = restore.plan(target)
    assert (chosen.backup_id, chosen.archive_end) == (made.backup_id, 60)
    done = restore.replay(target, chosen)
    assert (done.index, done.cmd_index) == (60, 60)
    assert done.machine.exchange.state_hash() == state_at(60).exchange.state_hash()
    # A point in time: the newest entry whose commands end at or before it.
    at = restore.replay(target, restore.plan(target, 33), 33)
    assert (at.index, at.cmd_index) == (33, 33)
    assert at.machine.exchange.state_hash() == state_at(33).exchange.state_hash()
    # Before the backup: only the empty state with the log from its start could reach it.
    with pytest.raises(restore.RestoreError, match="no backup at or before cmd_index 10"):
        restore.plan(target, 10)


def test_a_replay_that_diverges_from_what_was_archived_stops_the_restore(target, made):
    machine = state_at(20)
    entries = []
    for i in range(21, 26):
        machine.apply(payload(i))
        entries.append((command(i), i, 1, machine.exchange.cmd_index + (i == 24)))
    seg = segments.Segment(CLUSTER, 20, "2026-12-02T00:00:00Z", tuple(entries))
    target.put(seg.name, segments.encode(seg))
    with pytest.raises(restore.RestoreError, match="diverged at log index 24"):
        restore.replay(target, restore.plan(target))


def test_restore_refuses_a_data_dir_that_is_not_empty(target, made, tmp_path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("precious")
    with pytest.raises(restore.RestoreError, match="is not empty"):
        restore.restore(target, busy)
    assert (busy / "something").read_text() == "precious"


def test_a_standing_by_archiver_follows_the_archive_end_reading_only_what_is_new(target):
    """What a node's compaction hold is told (disaster_recovery/archiver.py StandbyView): the
    end of the archive, carried on from new segments and backups between full reads; a
    segment after a gap does not move it, a backup past it (a new anchor) does. A full read
    agrees."""
    archive(target, 1, 10)
    view = StandbyView.read(target)
    assert view.end == 10
    archive(target, 11, 20)
    view.read_new(target)
    assert view.end == 20
    archive(target, 25, 30)  # after a gap: the archive still ends at 20
    view.read_new(target)
    assert view.end == 20 == reach(target)[0]
    backup.write(target, CLUSTER, backup_state(state_at(40), 40))
    archive(target, 41, 50)
    view.read_new(target)
    assert view.end == 50 == reach(target)[0] == StandbyView.read(target).end
    listed: list = []
    real = target.list

    def counting(prefix: str = "", after: str | None = None) -> list[str]:
        names = real(prefix, after)
        listed.extend(n for n in names if n.startswith(segments.PREFIX))
        return names

    target.list = counting  # type: ignore[method-assign]
    view.read_new(target)
    assert listed == []  # nothing new: no segment listed again


def forged_backup(target: DirTarget, machine: ExchangeMachine, index: int) -> backup.Manifest:
    """A backup whose files match their checksums and whose snapshot states its own hash and
    counters rightly, but whose state breaks an invariant (funds reserved that no order
    holds): what only a full decode finds (a bug in the build that wrote it, or a crafted
    file)."""
    import hashlib

    import msgpack

    from statemachine import snapshot

    fields = snapshot.body_fields(machine.exchange.state)
    _acct, assets = fields[6][0]
    asset, available, reserved = assets[0]
    assets[0] = [asset, available - 7, reserved + 7]
    body = snapshot.pack_body(fields)
    exchange_blob = (
        snapshot._HEADER.pack(snapshot.MAGIC, snapshot.VERSION, hashlib.sha256(body).digest())
        + body
    )
    outer = msgpack.unpackb(machine.snapshot(), raw=False)
    outer[1] = exchange_blob
    blob = msgpack.packb(outer, use_bin_type=True)
    ex = machine.exchange
    state = backup.State(blob, index, ex.cmd_index, ex.seq, stated_hash(exchange_blob), "n2")
    return backup.write(target, CLUSTER, state)


def test_a_restore_copies_a_backup_nothing_changes_and_its_nodes_decode_it(target, tmp_path):
    """With no archived entry after the backup, restore checks the checksums and the manifest
    and copies the snapshot without decoding it (a million orders take seconds to decode;
    the nodes decode it anyway as they load it). A backup that passes the checksums but
    breaks an invariant is then refused by each node as it starts, and by `verify=True` (and
    `backup verify`) before anything is written."""
    from cluster.raft import RaftReplica, RaftSettings, RaftStartupError
    from tests.cluster.conftest import free_port

    good = backup.write(target, CLUSTER, backup_state(state_at(20), 20))
    chosen = restore.plan(target)
    assert (chosen.backup_id, chosen.chain) == (good.backup_id, ())
    copied = restore.replay(target, chosen)
    assert copied.machine is None  # not decoded
    assert (copied.index, copied.cmd_index, copied.seq) == (20, good.cmd_index, good.seq)
    assert copied.backup_blob == target.get(f"backups/{good.backup_id}/state.bin")
    verified = restore.replay(target, chosen, decode=True)  # --verify: decoded, still copied
    assert verified.machine is not None and verified.backup_blob == copied.backup_blob
    assert (verified.index, verified.cmd_index, verified.seq) == (20, good.cmd_index, good.seq)

    bad_target = DirTarget(tmp_path / "forged")
    forged = forged_backup(bad_target, state_at(20), 20)
    backup.check(bad_target, forged.backup_id)  # checksums, hash and counters all agree
    with pytest.raises(backup.BackupError, match=r"does not decode.*reserved"):
        backup.load(bad_target, forged.backup_id)
    with pytest.raises(restore.RestoreError, match="does not decode"):
        restore.restore(bad_target, tmp_path / "verified", nodes=1, verify=True)
    assert not (tmp_path / "verified").exists() or not any((tmp_path / "verified").iterdir())

    done = restore.restore(bad_target, tmp_path / "seeded", nodes=1)
    assert done["state_hash"] == forged.state_hash
    (data_dir,) = (tmp_path / "seeded").glob("*/data/raft.dump")
    with pytest.raises(RaftStartupError, match=r"reserved 7 != 0.*refusing to start"):
        settings = RaftSettings(
            self_addr=f"127.0.0.1:{free_port()}", peers=(), password="pw", data_dir=data_dir.parent
        )
        RaftReplica(settings, ExchangeMachine())


def test_a_backup_in_the_previous_snapshot_format_verifies_and_restores_rewritten(target, tmp_path):
    """A backup a node of the previous build took (its exchange snapshot in format version
    1) still verifies, and restores: the new cluster's nodes are seeded with the state
    written in this build's format, and the restore reports that format's hash, the one
    its nodes will report."""
    import msgpack

    from cluster.raft import read_dump
    from statemachine import Exchange
    from statemachine import snapshot as codec
    from tests.statemachine.strategies import busy_session

    v1 = (Path(__file__).parents[1] / "statemachine/data/busy-session-v1.snapshot").read_bytes()
    assert not codec.written_by_this_build(v1)
    ran = Exchange()
    for cmd in busy_session():
        ran.apply(cmd)
    machine = ExchangeMachine()
    outer = msgpack.unpackb(machine.snapshot(), raw=False)
    outer[1] = v1  # the node snapshot of the previous build, around its exchange snapshot
    blob = msgpack.packb(outer, use_bin_type=True)
    state = backup.State(blob, 7, ran.cmd_index, ran.seq, stated_hash(v1), "n2")
    made = backup.write(target, CLUSTER, state)

    verified = backup.load(target, made.backup_id)  # recomputes what it can: the counters
    assert verified.machine.exchange.snapshot() == ran.snapshot()
    done = restore.restore(target, tmp_path / "restored", nodes=1)
    assert done["state_hash"] == ran.state_hash() != made.state_hash
    (dump,) = (tmp_path / "restored").glob("*/data/raft.dump")
    _header, seeded = read_dump(dump)
    assert exchange_blob_of(seeded) == ran.snapshot()
