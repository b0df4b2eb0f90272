"""The Raft adapter: the only package that imports pysyncobj (pinned to 0.3.17).

Its one public surface is what this module exports; the modules inside are private:
``adapter`` (``RaftReplica``, ``RaftSettings``, the outcomes), ``hardened`` (``HardenedSyncObj``:
pysyncobj's ``SyncObj`` with its safety bugs fixed), ``storage`` (the journal and the dump),
``transport`` (the TCP transport), ``pin`` (refuses any other pysyncobj). ``JournalReader``,
``read_dump``, ``payload_of_entry`` and ``HELD_DUMP`` let another process (the indexer, the log archiver)
follow what a node applies, from its data directory; ``seed_data_dirs`` starts a new cluster's
log at a restored state. Why each piece exists:
docs/adr/0002-pysyncobj-hardening.md.
"""

from .adapter import (
    EXIT_APPLY_FAILED,
    EXIT_ENTRY_UNREADABLE,
    EXIT_RESTORE_FAILED,
    EXIT_STARTUP_REFUSED,
    EXIT_STORAGE_FAILED,
    EXITS_NOT_TO_RESTART,
    PYSYNCOBJ_VERSION,
    RaftReplica,
    RaftSettings,
    RaftStartupError,
    StateMachinePort,
    SubmitError,
    SubmitErrorReason,
)
from .hardened import HELD_DUMP, entry_of_payload, payload_of_entry, seed_data_dirs
from .stats import STAGE_BUCKETS_S, Histogram
from .storage import (
    REBUILD_ATTEMPTS,
    JournalGap,
    JournalReader,
    RaftStorageError,
    file_identity,
    journal_holds,
    read_dump,
)
from .views import bin_at

__all__ = [
    "EXITS_NOT_TO_RESTART",
    "EXIT_APPLY_FAILED",
    "EXIT_ENTRY_UNREADABLE",
    "EXIT_RESTORE_FAILED",
    "EXIT_STARTUP_REFUSED",
    "EXIT_STORAGE_FAILED",
    "HELD_DUMP",
    "PYSYNCOBJ_VERSION",
    "REBUILD_ATTEMPTS",
    "STAGE_BUCKETS_S",
    "Histogram",
    "JournalGap",
    "JournalReader",
    "RaftReplica",
    "RaftSettings",
    "RaftStartupError",
    "RaftStorageError",
    "StateMachinePort",
    "SubmitError",
    "SubmitErrorReason",
    "bin_at",
    "entry_of_payload",
    "file_identity",
    "journal_holds",
    "payload_of_entry",
    "read_dump",
    "seed_data_dirs",
]
