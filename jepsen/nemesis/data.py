"""The data nemesis: a stopped node's on-disk Raft state damaged, then the node started on it.

`start` picks a member (the leader half of the time), stops it (SIGTERM, a clean shutdown, or
SIGKILL), damages one file of its data directory (the formats: cluster/raft/storage.py and
docs/operating/raft-storage.md), starts it, and records what it did:

| kind | damage | what the node must do |
|---|---|---|
| `truncate` | cut the journal's tail (into the last record, or a few records back) | refuse (exit 73, `journal corrupt at byte offset N: the file ends at byte ...`) when the cut reaches into the synced part; start, dropping the rest, when it does not |
| `flip` | invert bytes inside a record in the middle of the journal's synced part | refuse (exit 73, `record checksum mismatch`) |
| `torn-tail` | append a partial record (random bytes) past the journal's end: a write a crash cut | start, with `WARNING ... dropping a torn tail` |
| `dump` | invert bytes in the middle of `raft.dump` (or `flip` when the node has no dump yet) | refuse (exit 73, `unreadable raft dump`) |
| `meta` | cut `raft.journal.meta` to 0 bytes | refuse (exit 73, `raft.journal.meta is corrupt or empty`) |
| `meta-flip` | set one bit of the commit index hint in `raft.journal.meta` | refuse (exit 73, `raft.journal.meta is corrupt or empty (... checksum mismatch)`; before ADR 0002 fix 18 the node applied an entry never committed) |

The record has the damage (file, offset, bytes, the journal's synced end), `expect` (what
the runbook says the node does), and what it did: `outcome` `refused` (with `exit_code` and
the `log` lines that say why) or `running` (with its status: `cmd_index`, `state_hash`), and,
while it runs, every time it reported a `cmd_index` another member reported too, whether the
state hashes agreed (`divergent` lists those that did not: a damaged node serving a state no
other node had). Nemeses do not judge: the tests and the checkers do.

`stop` heals as docs/operating/raft-storage.md says: a node that refused is resynced (its
data directory moved aside, `data.damaged-<time>`, kept for the post-mortem; the node started
empty catches up from the leader), and only while the others hold a majority with a leader
among them and have caught up to the leader's commit index (runbook checks 1 and 3); then it
waits until the node has caught up (`caught_up`, the leader's `cmd_index` at the heal) and
records the hash comparisons of that time. A node that started (a repaired torn tail) is
only watched until it has caught up; one that was never started on its damaged data (the
nemesis crashed in between) is started first, and resynced only if it refuses. A node that
served a state hash another member did not have at the same `cmd_index` is left as it is
(a bug for the run's checkers to see, not a fault to wipe away): `stop` says so, and
`heal_all` raises.

Never more than one damaged node (a new `start` heals the previous one first), and never a
node whose others are not all up and answering with a majority of the members: a resync
needs them (a 1-node cluster is never damaged).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import struct
import time
import zlib
from pathlib import Path

from cluster.launcher import LocalCluster

from . import Context

KINDS = ("truncate", "flip", "torn-tail", "dump", "meta", "meta-flip")
START_TIMEOUT_S = 20.0  # from the start to an exit or an answering API
WATCH_S = 1.5  # how long a node that started is watched before `start` returns
CATCH_UP_TIMEOUT_S = 60.0
EXIT_STARTUP_REFUSED = 73  # cluster.raft.EXIT_STARTUP_REFUSED (jepsen imports only the launcher)
EXIT_STORAGE_FAILED = 74

# The journal's format 2 (cluster/raft/storage.py): an 88-byte header whose two synced-end
# slots (at 40 and 64: seq u64, synced_end u64, crc32 u32, 4 zero bytes) say how far the file
# was synced; then records: crc u32, size u32, index u64, term u64, command (size bytes).
HEADER_SIZE = 88
_SLOT = struct.Struct("<QQI4x")
_SLOT_OFFSETS = (40, 64)
_RECORD_HEAD = struct.Struct("<IIQQ")
_LOG_MARKS = ("refuses to start", "torn tail", "synced-end slot", "CRITICAL", "storage")


def majority(n: int) -> int:
    return n // 2 + 1


def synced_end(raw: bytes) -> int | None:
    """The journal header's synced end (the valid slot with the highest seq), or None."""
    slots = []
    for offset in _SLOT_OFFSETS:
        if len(raw) < offset + _SLOT.size:
            return None
        seq, end, crc = _SLOT.unpack_from(raw, offset)
        if crc == zlib.crc32(struct.pack("<QQ", seq, end)):
            slots.append((seq, end))
    return max(slots)[1] if slots else None


def record_offsets(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of every record that frames (checksums not checked)."""
    out = []
    offset = HEADER_SIZE
    while offset + _RECORD_HEAD.size <= len(raw):
        _crc, size, _idx, _term = _RECORD_HEAD.unpack_from(raw, offset)
        end = offset + _RECORD_HEAD.size + size
        if end > len(raw):
            break
        out.append((offset, end))
        offset = end
    return out


def _invert(path: Path, offset: int, count: int) -> bytes:
    """Invert `count` bytes at `offset`; the bytes as they were."""
    with path.open("r+b") as f:
        f.seek(offset)
        before = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in before))
    return before


def _raise_commit_hint(meta: Path, ctx: Context) -> dict:
    """Set one clear bit of the `commit` value in raft.journal.meta (a msgpack map: the key
    `commit`, then a positive fixint or a uint8/16/32/64): a one-bit flip that raises the
    node's commit index hint. What was changed."""
    raw = bytearray(meta.read_bytes())
    at = raw.index(b"\xa6commit") + len(b"\xa6commit")
    tag = raw[at]
    if tag < 0x80:  # positive fixint: bits 0-6 of the tag byte itself
        offsets, bits = [at], range(7)
    else:
        width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[tag]
        offsets, bits = list(range(at + 1, at + 1 + width)), range(8)
    clear = [(o, b) for o in offsets for b in bits if not raw[o] >> b & 1]
    offset, bit = ctx.rng.choice(clear)
    before = raw[offset]
    raw[offset] |= 1 << bit
    meta.write_bytes(bytes(raw))
    return {"offset": offset, "bit": bit, "was": f"{before:02x}", "now": f"{raw[offset]:02x}"}


class Data:
    """`Data(cluster)`: `cluster` the run's `LocalCluster` (data directories, node logs, exit
    codes, statuses); `kinds` the damages to choose from; `watch_s` how long `start` watches
    a node that started on damaged data."""

    name = "data"

    def __init__(
        self, cluster: LocalCluster, *, kinds: tuple[str, ...] = KINDS, watch_s: float = WATCH_S
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"unknown damage kinds {sorted(unknown)}; known: {KINDS}")
        self.cluster = cluster
        self.kinds = tuple(kinds)
        self.watch_s = watch_s
        self.damaged: str | None = None  # the node whose data was damaged and not yet healed
        self._moved = 0
        self._started = True

    # ------------------------------------------------------------------ the protocol

    def start(self, ctx: Context) -> dict:
        healed = self._heal(CATCH_UP_TIMEOUT_S) if self.damaged else None
        if self.damaged:  # could not heal the previous one: never two at once
            return {"skipped": "the previous damaged node is not healed", "healed_first": healed}
        members = sorted(self.cluster.nodes)
        leader = ctx.leader()
        lead = leader in members and ctx.rng.random() < 0.5
        node = leader if lead else ctx.rng.choice(members)
        others = [m for m in members if m != node]
        up = [m for m in others if self.cluster.nodes[m].alive() and self.cluster.status(m, 1.0)]
        if len(up) < majority(len(members)) or len(up) < len(others):
            return {"skipped": f"others up {sorted(up)} of {others}: no safe resync", "node": node}
        how = ctx.rng.choice(("SIGTERM", "SIGKILL"))
        did: dict = {"node": node, "was_leader": node == leader, "stop": how}
        if healed:
            did["healed_first"] = healed
        self.damaged = node  # from here on, heal_all has something to do
        self._started = False  # not yet started on the damaged data
        proc = self.cluster.nodes[node]
        if how == "SIGTERM":
            self.cluster.stop(node)
        else:
            self.cluster.kill(node)
        did["exit_on_stop"] = proc.process.returncode if proc.process is not None else None
        did["damage"] = self._damage(node, ctx)
        did.update(self._start_and_watch(node, others))
        return did

    def stop(self, ctx: Context) -> dict:
        if self.damaged is None:
            return {"healed": None}
        return self._heal(CATCH_UP_TIMEOUT_S)

    def heal_all(self) -> None:
        """The damaged node resynced (or watched until caught up); raises if it cannot be
        (the others have no majority or no leader: then no node may be wiped)."""
        if self.damaged is None:
            return
        done = self._heal(CATCH_UP_TIMEOUT_S)
        if self.damaged is not None:
            raise RuntimeError(f"the node with damaged data is not healed: {done}")

    # ------------------------------------------------------------------ damage

    def _damage(self, node: str, ctx: Context) -> dict:
        data = self.cluster.nodes[node].config.data_dir
        journal, dump, meta = data / "raft.journal", data / "raft.dump", data / "raft.journal.meta"
        kind = ctx.rng.choice(self.kinds)
        if kind == "dump" and not (dump.exists() and dump.stat().st_size > 64):
            kind = "flip"  # no dump yet (no compaction): damage the journal instead
        raw = journal.read_bytes() if journal.exists() else b""
        records = record_offsets(raw)
        end = synced_end(raw)
        out: dict = {"kind": kind, "synced_end": end, "size": len(raw), "records": len(records)}
        if kind in ("truncate", "flip") and len(records) < 3:
            kind = out["kind"] = "torn-tail"  # too short a journal to cut into meaningfully
        if kind == "truncate":
            # Into the last record, or back to a record boundary up to 3 records back, or into
            # one of those: every cut below the synced end must be refused.
            start, stop = ctx.rng.choice(records[-3:])
            cut = ctx.rng.choice((start, ctx.rng.randrange(start + 1, stop)))
            os.truncate(journal, cut)
            out.update(file="raft.journal", cut_to=cut, cut_bytes=len(raw) - cut)
            out["expect"] = "refuse" if end is None or cut < end else "start"
        elif kind == "flip":
            synced = [r for r in records if end is not None and r[1] <= end] or records
            middle = len(synced) // 2 + (ctx.rng.randrange(-1, 2) if len(synced) > 2 else 0)
            start, stop = synced[middle]
            offset = ctx.rng.randrange(start, stop)
            count = min(ctx.rng.randint(1, 4), stop - offset)
            before = _invert(journal, offset, count)
            out.update(file="raft.journal", offset=offset, bytes=count, was=before.hex())
            out["expect"] = "refuse"
        elif kind == "torn-tail":
            garbage = os.urandom(ctx.rng.randint(1, 60))
            with journal.open("ab") as f:
                f.write(garbage)
            out.update(file="raft.journal", appended=len(garbage), at=len(raw))
            out["expect"] = "start"
        elif kind == "dump":
            size = dump.stat().st_size
            offset = ctx.rng.randrange(size // 4, 3 * size // 4)
            count = min(ctx.rng.randint(1, 4), size - offset)
            before = _invert(dump, offset, count)
            out.update(file="raft.dump", offset=offset, bytes=count, was=before.hex(), size=size)
            out["expect"] = "refuse"
        elif kind == "meta-flip":
            out.update(file="raft.journal.meta", **_raise_commit_hint(meta, ctx))
            out["expect"] = "refuse"
        else:
            size = meta.stat().st_size if meta.exists() else None
            os.truncate(meta, 0)
            out.update(file="raft.journal.meta", cut_to=0, size=size)
            out["expect"] = "refuse"
        return out

    # ------------------------------------------------------------------ watching

    def _log_size(self, node: str) -> int:
        with contextlib.suppress(OSError):
            return (self.cluster.nodes[node].config_path.parent / "node.log").stat().st_size
        return 0

    def _log_lines(self, node: str, since: int) -> list[str]:
        path = self.cluster.nodes[node].config_path.parent / "node.log"
        try:
            with path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return [line[:600] for line in text.splitlines() if any(m in line for m in _LOG_MARKS)]

    def _start_and_watch(self, node: str, others: list[str]) -> dict:
        since = self._log_size(node)
        self.cluster.start(node)
        self._started = True
        proc = self.cluster.nodes[node]
        deadline = time.monotonic() + START_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            if not proc.alive():
                break
            status = self.cluster.status(node, 0.5)
            if status is not None:
                break
            time.sleep(0.05)
        out: dict = {}
        if status is not None:
            comparisons = self._compare(node, others, self.watch_s)
            out.update(comparisons)
        if not proc.alive():
            code = proc.process.returncode if proc.process is not None else None
            refused = code in (EXIT_STARTUP_REFUSED, EXIT_STORAGE_FAILED)
            out.update(outcome="refused" if refused else "exited")
            out["exit_code"] = code
        elif status is None:
            out["outcome"] = "silent"  # neither exited nor answering within START_TIMEOUT_S
        else:
            out["outcome"] = "running"
            out["status"] = {k: status.get(k) for k in ("role", "cmd_index", "state_hash")}
        out["log"] = self._log_lines(node, since)
        return out

    def _compare(
        self, node: str, others: list[str], watch_s: float, *, catch_up_to: int | None = None
    ) -> dict:
        """Sample every member's (cmd_index, state_hash) for `watch_s`; each cmd_index the
        node reported that another member reported too, whether the hashes agree. With
        `catch_up_to`: stop early once the node reached that cmd_index and one comparison
        was made (`caught_up`)."""
        seen: dict[int, dict[str, str]] = {}
        compared: set[int] = set()
        divergent: dict[int, dict[str, str]] = {}
        caught = False
        deadline = time.monotonic() + watch_s
        while time.monotonic() < deadline and self.cluster.nodes[node].alive():
            for member in [node, *others]:
                status = self.cluster.status(member, 0.5)
                if status is None:
                    continue
                hashes = seen.setdefault(status["cmd_index"], {})
                hashes[member] = status["state_hash"]
                if node in hashes and len(hashes) > 1:
                    compared.add(status["cmd_index"])
                    if len(set(hashes.values())) > 1:
                        divergent[status["cmd_index"]] = dict(hashes)
                if member == node and catch_up_to is not None:
                    caught = caught or status["cmd_index"] >= catch_up_to
            if caught and compared:
                break
            time.sleep(0.01)
        out: dict = {"compared": len(compared), "divergent_count": len(divergent),
                     "divergent": [{"cmd_index": c, "hashes": h}
                                   for c, h in sorted(divergent.items())[:5]]}  # fmt: skip
        if catch_up_to is not None:
            out["caught_up"] = caught
        return out

    # ------------------------------------------------------------------ healing

    def _heal(self, timeout_s: float) -> dict:
        node = self.damaged
        assert node is not None
        out: dict = {"node": node}
        proc = self.cluster.nodes[node]
        others = [m for m in sorted(self.cluster.nodes) if m != node]
        deadline = time.monotonic() + timeout_s
        try:
            leader = self.cluster.wait_for_leader(timeout_s, exclude=(node,))
        except TimeoutError as exc:
            out["why"] = f"no leader among the others: {str(exc)[:300]}"
            return out
        out["leader"] = leader
        if not proc.alive() and not self._started:
            # Damaged, but never started on it (a crash in between): start it first; the
            # runbook's resync is for a node that refuses.
            out["start"] = self._start_and_watch(node, others)
        if not proc.alive():
            out["exit_code"] = proc.process.returncode if proc.process is not None else None
            # Runbook check 1: the others, up, hold a majority with a leader among them;
            # check 3: every one of them has the leader's commit index of now.
            commit = (self.cluster.status(leader) or {}).get("commit_index")
            while True:
                up = {m: s for m in others if (s := self.cluster.status(m, 1.0))}
                if (
                    commit is not None
                    and len(up) >= majority(len(self.cluster.nodes))
                    and all(s["commit_index"] >= commit for s in up.values())
                ):
                    break
                if time.monotonic() > deadline:
                    out["why"] = f"the others {sorted(up)} did not reach commit index {commit}"
                    return out
                time.sleep(0.05)
                if commit is None:
                    commit = (self.cluster.status(leader) or {}).get("commit_index")
            data = proc.config.data_dir
            if data.exists():
                self._moved += 1
                stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
                aside = data.with_name(f"data.damaged-{stamp}-{self._moved}")
                data.rename(aside)  # aside, not deleted (the runbook's post-mortem)
                out["moved_to"] = str(aside)
            self.cluster.start(node)
            out["resynced"] = True
        target = (self.cluster.status(leader) or {}).get("cmd_index", 0)
        out["target_cmd_index"] = target
        started = time.monotonic()
        out.update(
            self._compare(node, others, max(1.0, deadline - time.monotonic()), catch_up_to=target)
        )
        out["caught_up_s"] = round(time.monotonic() - started, 3)
        if not proc.alive():
            out["exit_code_after"] = proc.process.returncode if proc.process else None
            out["log"] = self._log_lines(node, 0)[-5:]
        elif out["caught_up"] and out["compared"] and not out["divergent_count"]:
            self.damaged = None
        return out
