"""The indexer's source of events: a replica of the node's state machine in the indexer
process, fed from the node's own data directory (ADR 0007).

It restores the node's dump, reads the journal (`cluster.raft.JournalReader`, read-only) up to
the index the node reports applied, and applies each entry to its own `ExchangeMachine`: the
state machine is deterministic, so it produces the very events the node produced, with the
same `seq`. The node's Raft path pays nothing for it (no hand-off, no queue to fill), and a
streamer can resume from any checkpoint the node's log still holds, after its own restart
too. Events older than the node's dump are gone from this replica (EventsGone).

Two things keep a streamer that falls behind the node's compactions going while its process
lives: the journal reader keeps every file the node compacts into until it has read it
(`JournalReader.follow`, called every FOLLOW_S), and the entries of the last `read` are kept
until the next one, so a write that failed (PostgreSQL or Kafka down, the lease lost) is
retried from them after `seek` instead of from a dump that may be past the checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from indexer.events import Checkpoint, Entry, EventsGone
from indexer.port import Node

from .machine import ExchangeMachine
from .raft import (
    HELD_DUMP,
    REBUILD_ATTEMPTS,
    JournalGap,
    JournalReader,
    RaftStorageError,
    file_identity,
    journal_holds,
    payload_of_entry,
    read_dump,
)

log = logging.getLogger("quorumbook.indexer")

# Log entries read and applied at a time: each is a batch of up to 1000 commands, and all of
# them are applied (the journal reader has moved past them). Small enough that the event loop
# (lease renewals, the status) is never held up long.
READ_ENTRIES_MAX = 16
FOLLOW_S = 0.05  # how often `follow` looks for a journal file the node compacted into


class LogSource:
    def __init__(self, data_dir: Path, node: Node) -> None:
        self._data_dir = Path(data_dir)
        self._node = node
        self._machine: ExchangeMachine | None = None
        self._reader: JournalReader | None = None
        self._next_index = 0  # the next log entry to apply
        self._captured: list[list[dict]] = []
        # What the last `read` returned, each entry with the seq before it (for a write that
        # failed, see seek), and what a seek back into it left to return again.
        self._last_read: list[tuple[int, Entry]] = []
        self._again: list[Entry] = []
        # The dump last restored: (file identity, its seq, its log index).
        self._past: tuple[tuple[int, int, int], int, int] | None = None
        # The held dump last read (file identity, its log index).
        self._held_index: tuple[tuple[int, int, int], int] | None = None

    # ------------------------------------------------------------------------ position

    @property
    def seq(self) -> int:
        return self._machine.exchange.seq if self._machine is not None else -1

    async def seek(self, checkpoint: Checkpoint) -> None:
        # The replica can only move forward: past the checkpoint, it goes back into the last
        # read's entries (a write that failed), else starts over from the dump. A replica that
        # hit a gap starts over too: a resync may have moved the checkpoint past it, to where
        # this node's dump begins.
        self._again = []
        if self._machine is not None and self._machine.exchange.seq > checkpoint.seq:
            self._again = self._read_again_from(checkpoint)
            if self._again:
                return
            self._rebuild(checkpoint)
        elif self._machine is None:
            self._rebuild(checkpoint)
        try:
            await self._advance_to(checkpoint)
        except EventsGone:
            self._machine = None
            raise

    def _read_again_from(self, checkpoint: Checkpoint) -> list[Entry]:
        """The last read's entries after `checkpoint`, if it is one of their boundaries."""
        for i, (seq_before, entry) in enumerate(self._last_read):
            if entry.raft_index == checkpoint.raft_index + 1 and seq_before == checkpoint.seq:
                return [e for _seq, e in self._last_read[i:]]
        return []

    def follow(self) -> None:
        """Keep the journal files the node compacts into (see the module's docstring)."""
        if self._reader is not None:
            self._reader.follow()

    async def follow_journal(self) -> None:
        """`follow` every FOLLOW_S, for the indexer process's life."""
        while True:
            self.follow()
            await asyncio.sleep(FOLLOW_S)

    async def restart_at_snapshot(self) -> tuple[Any, int]:
        if not (self._data_dir / "raft.dump").exists():
            raise EventsGone(self.seq + 1, "this node has no snapshot to resync from")
        self._rebuild(None)
        assert self._machine is not None
        return self._machine.exchange, self._next_index - 1

    def _rebuild(self, checkpoint: Checkpoint | None) -> None:
        """A fresh replica from the newest state the node keeps that is not past `checkpoint`
        (any, if None): its dump, else the dump its log hold kept (ADR 0007), else the empty
        state while the journal still starts at index 1."""
        gone_from = (checkpoint.seq if checkpoint is not None else max(self.seq, 0)) + 1
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._machine = None
        self._last_read, self._again = [], []
        # The dump and the journal are two files the node replaces at every compaction: one
        # between reading the dump and opening the journal leaves a journal that does not
        # follow the state read (seen under load: a replica at log index 859, a journal from
        # 922). Start over from the newer dump then; a few times at most.
        for attempt in range(1, REBUILD_ATTEMPTS + 1):
            try:
                self._rebuild_once(checkpoint, gone_from)
            except _CompactedMeanwhile as exc:
                if attempt == REBUILD_ATTEMPTS:
                    raise EventsGone(
                        gone_from,
                        f"the node compacted its log {attempt} times while this replica was "
                        f"rebuilt from it ({exc})",
                    ) from None
                log.info("indexer source: the node compacted during the rebuild (%s); again", exc)
                continue
            return

    def _rebuild_once(self, checkpoint: Checkpoint | None, gone_from: int) -> None:
        machine = self._new_machine()
        next_index = 1
        past: tuple[int, int] | None = None  # (seq, log index) of a dump past the checkpoint
        dump = self._data_dir / "raft.dump"
        identity = file_identity(dump)
        if identity is not None:
            cached = self._past
            if cached and cached[0] == identity and checkpoint and cached[1] > checkpoint.seq:
                past = cached[1], cached[2]  # the same dump, still past: not decoded again
            else:
                header, blob = _read_dump(dump, gone_from)
                machine.restore(blob)
                self._past = (identity, machine.exchange.seq, header.index)
                if checkpoint is not None and machine.exchange.seq > checkpoint.seq:
                    past = machine.exchange.seq, header.index
                    machine = self._new_machine()
                else:
                    next_index = header.index + 1
        reader = JournalReader(self._data_dir / "raft.journal")
        try:
            if past is not None:
                assert checkpoint is not None
                next_index = self._held_state(machine, checkpoint, gone_from)
                if next_index is None:
                    raise _past_the_checkpoint(gone_from, *past)
            reader.open()
            if past is None and file_identity(dump) != identity:
                # The state came from the dump: a new one may have a journal after it (a
                # state the log hold kept is checked by the journal's first entry alone).
                raise _CompactedMeanwhile("a new dump")
            reader.check_starts_by(next_index)
        except JournalGap as exc:
            reader.close()
            if file_identity(dump) != identity:
                raise _CompactedMeanwhile(str(exc)) from exc
            raise (
                _past_the_checkpoint(gone_from, *past) if past else EventsGone(gone_from, str(exc))
            ) from exc
        except (OSError, RaftStorageError) as exc:
            reader.close()
            raise EventsGone(gone_from, f"the journal cannot be read ({exc})") from exc
        except BaseException:
            reader.close()
            raise
        self._machine, self._reader, self._next_index = machine, reader, next_index
        log.info(
            "indexer source: replica rebuilt at log index %d, seq %d",
            next_index - 1,
            machine.exchange.seq,
        )

    def _held_state(
        self, machine: ExchangeMachine, checkpoint: Checkpoint, gone_from: int
    ) -> int | None:
        """Restore into `machine` the state the node's log hold kept at or before the
        checkpoint (its held dump, or the empty state if the journal starts at index 1);
        the log index to read on from, or None if it kept none."""
        held = self._data_dir / HELD_DUMP
        identity = file_identity(held)
        if identity is not None:
            cached = self._held_index
            if cached is None or cached[0] != identity or cached[1] <= checkpoint.raft_index:
                header, blob = _read_dump(held, gone_from)
                self._held_index = (identity, header.index)  # past it: not read again
                if header.index <= checkpoint.raft_index:
                    machine.restore(blob)
                    return header.index + 1
        # The empty state: the journal must hold index 1 (not merely be empty).
        return 1 if journal_holds(self._data_dir / "raft.journal", 1) else None

    def _new_machine(self) -> ExchangeMachine:
        machine = ExchangeMachine()
        machine.add_listener(lambda applied, _exchange: self._captured.extend(applied))
        return machine

    async def _advance_to(self, checkpoint: Checkpoint) -> None:
        """Apply entries up to the checkpoint's without emitting them: they are written."""
        while self._next_index <= checkpoint.raft_index:
            applied = self._node.view().applied_index
            if applied < self._next_index:
                await self._node.changed(0.2)
                continue
            last = min(applied, checkpoint.raft_index)
            self._apply_entries(self._next_index, last, emit=False)
            await asyncio.sleep(0)  # let the status and the node link run
        assert self._machine is not None
        if self._machine.exchange.seq != checkpoint.seq:
            # The checkpoint does not match this replica at its log index: never guess.
            raise EventsGone(
                checkpoint.seq + 1,
                f"at log index {checkpoint.raft_index} this replica is at seq "
                f"{self._machine.exchange.seq}, the checkpoint at {checkpoint.seq}",
            )

    # ------------------------------------------------------------------------ reading

    async def read(self, max_events: int, timeout_s: float) -> list[Entry]:
        if self._machine is None:
            raise RuntimeError("read() before seek()")
        if self._again:
            again, self._again = self._again, []
            return again
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._node.view().applied_index < self._next_index:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return []
            await self._node.changed(left)
        applied = self._node.view().applied_index
        return self._apply_entries(self._next_index, applied, emit=True, max_events=max_events)

    def _apply_entries(
        self, first: int, last: int, *, emit: bool, max_events: int = 0
    ) -> list[Entry]:
        """Apply entries `first`..`last` (those the journal holds, at most READ_ENTRIES_MAX;
        about one per 50 of `max_events`), and return them with their events."""
        assert self._machine is not None and self._reader is not None
        out: list[Entry] = []
        if emit:
            self._last_read = []
        try:
            entries = self._reader.read(
                first,
                last,
                max(1, min(READ_ENTRIES_MAX, max_events // 50)) if emit else READ_ENTRIES_MAX,
            )
        except JournalGap as exc:
            seq = self.seq
            self._machine = None  # the next seek starts over from the dump
            raise EventsGone(seq + 1, str(exc)) from exc
        for command, index, _term in entries:
            payload = payload_of_entry(command)
            self._captured.clear()
            seq_before = self._machine.exchange.seq
            if payload is not None:
                self._machine.apply(payload)
            self._next_index = index + 1
            if emit:
                events = tuple(event for events in self._captured for event in events)
                entry = Entry(index, self._machine.exchange.cmd_index, events)
                out.append(entry)
                self._last_read.append((seq_before, entry))
        return out


def _read_dump(path: Path, gone_from: int) -> tuple[Any, bytes]:
    try:
        return read_dump(path)
    except (OSError, RaftStorageError) as exc:
        raise EventsGone(gone_from, f"the dump cannot be read ({exc})") from exc


class _CompactedMeanwhile(Exception):
    """The node compacted while a replica was being rebuilt from its files."""


def _past_the_checkpoint(gone_from: int, seq: int, index: int) -> EventsGone:
    return EventsGone(
        gone_from,
        f"this node's snapshot is at seq {seq} (log index {index}): the events before it are "
        "not in its log any more",
    )
