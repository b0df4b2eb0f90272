"""The archived log: committed Raft entries in checksummed segments, in the backup target.

`segments/<first>-<last>.seg` (indexes zero-padded to 20 digits, so names sort as the log
does) holds log entries `first`..`last` in order, each with the `cmd_index` the exchange
reached after it, so a restore knows where to stop for a point in time without applying
further. Committed entries are the same bytes on every node: two archivers that raced hold
the same entries under overlapping names, and a restore takes any chain that covers the
indexes it needs.

File: msgpack `{"format", "version", "body": zlib(msgpack(segment)), "sha256": of body}`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import msgpack

from .target import MissingObject, Target

FORMAT = "quorumbook-segment"
VERSION = 1
PREFIX = "segments/"
_NAME = re.compile(r"^segments/(\d{20})-(\d{20})\.seg$")

# (command bytes as the journal holds them, log index, term, cmd_index after the entry)
Entry = tuple[bytes, int, int, int]


class SegmentError(RuntimeError):
    """A segment that cannot be used: not one, a newer format, truncated or corrupted, another
    cluster's, or not the entries its name says."""


@dataclass(frozen=True)
class Segment:
    cluster_id: str
    first_cmd_index: int  # the exchange's cmd_index before the first entry
    created_at: str
    entries: tuple[Entry, ...]

    @property
    def first_index(self) -> int:
        return self.entries[0][1]

    @property
    def last_index(self) -> int:
        return self.entries[-1][1]

    @property
    def last_cmd_index(self) -> int:
        return self.entries[-1][3]

    @property
    def name(self) -> str:
        return name_of(self.first_index, self.last_index)


def name_of(first: int, last: int) -> str:
    return f"{PREFIX}{first:020d}-{last:020d}.seg"


def parse_name(name: str) -> tuple[int, int] | None:
    match = _NAME.match(name)
    return (int(match[1]), int(match[2])) if match else None


def encode(segment: Segment) -> bytes:
    if not segment.entries:
        raise ValueError("an empty segment")
    body = msgpack.packb(
        {
            "cluster_id": segment.cluster_id,
            "first_cmd_index": segment.first_cmd_index,
            "created_at": segment.created_at,
            "entries": [list(e) for e in segment.entries],
        },
        use_bin_type=True,
    )
    packed = zlib.compress(body, 1)
    return msgpack.packb(
        {"format": FORMAT, "version": VERSION, "body": packed,
         "sha256": hashlib.sha256(packed).digest()},
        use_bin_type=True,
    )  # fmt: skip


def decode(
    raw: bytes, *, source: str, name: str | None = None, cluster_id: str | None = None
) -> Segment:
    """Check and parse a segment file (`name`: the name it was stored under, checked against
    the entries it holds)."""
    try:
        outer = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise SegmentError(f"{source} is not a segment, or is truncated: {exc}") from exc
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise SegmentError(f"{source} is not a quorumbook log segment")
    version = outer.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SegmentError(
            f"{source} was written by a newer build (segment version {version}; this build "
            f"reads up to {VERSION})"
        )
    packed = outer.get("body")
    if not isinstance(packed, bytes) or hashlib.sha256(packed).digest() != outer.get("sha256"):
        raise SegmentError(f"{source} is corrupted (sha256 mismatch)")
    try:
        doc = msgpack.unpackb(zlib.decompress(packed), raw=False)
        entries = tuple(
            (bytes(c), int(i), int(t), int(k)) for c, i, t, k in doc["entries"]
        )  # fmt: skip
        segment = Segment(str(doc["cluster_id"]), int(doc["first_cmd_index"]),
                          str(doc["created_at"]), entries)  # fmt: skip
    except Exception as exc:
        raise SegmentError(f"{source} is malformed: {exc}") from exc
    if not entries:
        raise SegmentError(f"{source} holds no entries")
    indexes = [e[1] for e in entries]
    if indexes != list(range(indexes[0], indexes[0] + len(indexes))):
        raise SegmentError(f"{source}: its entries are not consecutive log indexes")
    named = parse_name(name) if name is not None else None
    if named is not None and named != (segment.first_index, segment.last_index):
        raise SegmentError(
            f"{source} holds entries {segment.first_index}..{segment.last_index}, not what "
            "its name says"
        )
    if cluster_id is not None and segment.cluster_id != cluster_id:
        raise SegmentError(f"{source} is of cluster {segment.cluster_id}, not {cluster_id}")
    return segment


def listed(target: Target, after: str | None = None) -> list[tuple[int, int, str]]:
    """(first, last, name) of every segment in the target (named after `after`), by first
    index."""
    out = []
    for name in target.list(PREFIX, after=after):
        span = parse_name(name)
        if span is not None:
            out.append((*span, name))
    return sorted(out)


def archived_end(target: Target, after: int = 0) -> int:
    """The last log index the archive holds without a gap from `after` + 1 (`after` when it
    holds nothing after it)."""
    end = after
    for _first, last, _name in chain(listed(target), after):
        end = last
    return end


def chain(spans: list[tuple[int, int, str]], after: int) -> list[tuple[int, int, str]]:
    """The segments that cover the log from `after` + 1 on without a gap, in order: at each
    step the one that starts at or before the next index wanted and reaches furthest. One pass
    over `spans` sorted by first index (as `listed` gives them): a week of 2 s segments is
    300,000 of them."""
    out: list[tuple[int, int, str]] = []
    wanted = after + 1
    best: tuple[int, int, str] | None = None
    for span in spans:
        while span[0] > wanted:  # past the index wanted: the best so far is the next link
            if best is None:
                return out
            out.append(best)
            wanted, best = best[1] + 1, None
        if span[1] >= wanted and (best is None or span[1] > best[1]):
            best = span
    if best is not None:
        out.append(best)
    return out


def read(target: Target, name: str, *, cluster_id: str | None = None) -> Segment:
    try:
        raw = target.get(name)
    except MissingObject:
        raise SegmentError(f"{target.url}/{name} is missing") from None
    return decode(raw, source=f"{target.url}/{name}", name=name, cluster_id=cluster_id)
