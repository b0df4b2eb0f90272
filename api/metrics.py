"""Prometheus figures of one node, `GET /metrics` (docs/reference/api.md "Monitoring").

Every app has its own `CollectorRegistry` (several nodes may share a process in tests, and the
global default registry would mix them). HTTP figures are labelled by the route *template*
(`/v1/orders/<order_id>`, or `unmatched`), never the raw path, so the label set is bounded.
Node figures (role, term, indexes, commit latency and batch sizes) are read from the node
through `NodePort.health()` and `NodePort.histograms()` at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .port import NodePort

ROLES = ("leader", "follower", "candidate")
HTTP_LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _NodeCollector(Collector):
    """Reads the node's figures at each scrape (nothing is cached here)."""

    def __init__(self, node: NodePort) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        health = self.node.health()
        role = GaugeMetricFamily(
            "qb_raft_role", "1 for this node's current Raft role", labels=["role"]
        )
        for name in ROLES:
            role.add_metric([name], 1.0 if health["role"] == name else 0.0)
        yield role
        known = health["leader"] is not None and health["leader_connected"]
        yield GaugeMetricFamily(
            "qb_raft_leader_known",
            "1 when this node leads, or follows a leader it is linked to",
            value=1.0 if known else 0.0,
        )
        for key, doc in (
            ("term", "current Raft term"),
            ("commit_index", "highest Raft log index known to be committed"),
            ("applied_index", "highest Raft log index applied here"),
            ("cmd_index", "commands applied to this node's state machine"),
        ):
            yield GaugeMetricFamily(
                f"qb_raft_{key}" if key != "cmd_index" else "qb_cmd_index",
                doc,
                value=float(health[key]),
            )
        yield from _log_metrics(health.get("log") or {})
        indexer = health.get("indexer") or {}
        if indexer.get("configured"):
            for name, key, doc in (
                ("qb_indexer_active", "active", "1 while this node's indexer streams"),
                ("qb_indexer_checkpoint_seq", "checkpoint_seq", "last event seq in PostgreSQL"),
                ("qb_indexer_lag_events", "lag_events", "events applied here, not yet written"),
            ):
                yield GaugeMetricFamily(name, doc, value=float(indexer.get(key) or 0))
            # Counters of the indexer process: they start over when it restarts (rate() copes).
            for name, key, doc in (
                ("qb_indexer_events_written", "events_written",
                 "events this node's indexer wrote to PostgreSQL (throughput: rate())"),
                ("qb_indexer_fenced", "fenced", "writes refused because the lease was lost"),
                ("qb_indexer_resyncs", "resyncs", "operators' resyncs this node's indexer served"),
                ("qb_indexer_restarts", "restarts", "times the node restarted its indexer process"),
            ):  # fmt: skip
                yield CounterMetricFamily(name, doc, value=float(indexer.get(key) or 0))
            yield GaugeMetricFamily(
                "qb_indexer_lag_seconds",
                "age of the newest event written, against the newest applied, while behind",
                value=float(indexer.get("lag_ms") or 0) / 1000,
            )
            reasons = {
                "events_gone": indexer.get("gone_from_seq") is not None,
                "foreign_timeline": indexer.get("timeline_alarm") == "foreign_timeline",
                "checkpoint_ahead": indexer.get("timeline_alarm") == "checkpoint_ahead",
            }
            yield GaugeMetricFamily(
                "qb_indexer_alarm",
                "1 when this node's indexer raised an alarm (qb_indexer_alarm_reason says which; "
                "docs/operating/indexer.md)",
                value=1.0 if any(reasons.values()) else 0.0,
            )
            alarm = GaugeMetricFamily(
                "qb_indexer_alarm_reason",
                "1 for each alarm this node's indexer raised: events_gone (resync), "
                "foreign_timeline or checkpoint_ahead (nothing written; after a restore: adopt)",
                labels=["reason"],
            )
            for reason, raised in reasons.items():
                alarm.add_metric([reason], 1.0 if raised else 0.0)
            yield alarm
        archive = health.get("archive") or {}
        if archive.get("configured"):
            yield from _sidecar_metrics(archive, ARCHIVE_METRICS)
        chain = health.get("chain") or {}
        if chain.get("configured"):
            yield from _sidecar_metrics(chain, CHAIN_METRICS)
        histograms = self.node.histograms()
        for name, doc in (
            (
                "qb_commit_latency_seconds",
                "time from proposing a batch to its commit and apply on the leader",
            ),
            ("qb_batch_size_entries", "log entries (commands) per proposed batch"),
            # The steps of qb_commit_latency_seconds (docs/reference/metrics.md).
            ("qb_raft_queue_seconds", "a proposal waiting for the Raft thread to take it"),
            (
                "qb_raft_commit_seconds",
                "a proposal taken by the Raft thread until committed, applied and answered",
            ),
            ("qb_raft_apply_seconds", "the state machine applying one log entry (every node)"),
            ("qb_raft_sync_seconds", "one fdatasync of the Raft journal (every node)"),
            (
                "qb_commit_handoff_seconds",
                "a committed batch's answer, from the Raft thread to the API's thread",
            ),
        ):
            figures = histograms.get(name)
            if figures is None:
                continue
            buckets = [(_le(bound), float(count)) for bound, count in figures["buckets"]]
            buckets.append(("+Inf", float(figures["count"])))
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=figures["sum"])


def _log_metrics(log: dict) -> Iterator[Metric]:
    """The Raft journal and its compaction: what a log hold (the archive's end, the indexer's
    checkpoint) keeps on disk, to alert on before its bound is reached."""
    for name, key, doc in (
        ("qb_raft_log_first_index", "log_first_index", "first log index the journal holds"),
        ("qb_raft_journal_bytes", "journal_bytes", "bytes of the Raft journal on disk"),
        ("qb_raft_dump_index", "dump_index", "log index of this node's snapshot (0: none)"),
        (
            "qb_raft_compaction_hold",
            "compaction_hold",
            "log index compaction keeps the log after (the archive's end, the indexer's "
            "checkpoint); absent without a hold",
        ),
    ):
        if type(log.get(key)) is int:
            yield GaugeMetricFamily(name, doc, value=float(log[key]))
    if type(log.get("compaction_holds_released")) is int:
        yield CounterMetricFamily(
            "qb_raft_compaction_holds_released",
            "times a log hold was released at its bound (its reader may find a gap)",
            value=float(log["compaction_holds_released"]),
        )


# A sidecar's status (cluster/sidecar.py) as metrics: (name, status key, help) for gauges and
# for counters (they start over when the process restarts; rate() copes). A text-valued key
# (an error, an alarm) is a 0/1 gauge: 1 while it is set.
_FLAGS = ("last_error", "alarm")
ARCHIVE_METRICS = (
    (
        ("qb_archive_active", "active", "1 while this node archives the log (one follower does)"),
        ("qb_archive_index", "archived_index", "last log index in the archive"),
        ("qb_archive_cmd_index", "archived_cmd_index", "cmd_index at the archive's end"),
        ("qb_archive_lag_entries", "lag_entries", "log entries applied here, not yet archived"),
        ("qb_archive_lag_seconds", "lag_s", "how long the archive has been behind, while it is"),
        ("qb_archive_failing", "last_error", "1 while the archiver's last round failed"),
    ),
    (
        ("qb_archive_segments_written", "segments_written", "segments this node shipped"),
        ("qb_archive_backups_written", "backups_written", "scheduled backups this node took"),
        ("qb_archive_gaps", "gaps", "times the log moved past the archive (a loud gap)"),
    ),
)  # the log archiver's (disaster_recovery/archiver.py; docs/operating/backup-restore.md)
CHAIN_METRICS = (
    (
        ("qb_chain_active", "active", "1 while this node's watcher holds the chain's lease"),
        ("qb_chain_head", "head", "the chain's head block, as the watcher last saw it"),
        ("qb_chain_indexed_height", "indexed_to", "the highest block the watcher indexed"),
        ("qb_chain_waiting_deposits", "waiting", "deposits seen, not yet deep enough"),
        ("qb_chain_uncredited_deposits", "to_credit", "confirmed deposits, credit not settled"),
        ("qb_chain_failing", "last_error", "1 while the chain node, the cluster or Kafka fails"),
        ("qb_chain_alarm", "alarm", "1 after a deep reorganization stopped the watcher"),
    ),
    (
        ("qb_chain_deposits_credited", "credited", "deposits this node's watcher credited"),
        ("qb_chain_deposits_orphaned", "orphaned", "deposits a reorganization orphaned"),
        ("qb_chain_reorgs", "reorgs", "reorganizations the watcher followed"),
    ),
)  # the chain watcher's (indexer/chain/; docs/reference/chain.md)


def _sidecar_metrics(status: dict, table: tuple) -> Iterator[Metric]:
    gauges, counters = table
    for name, key, doc in gauges:
        value = status.get(key)
        if key in _FLAGS:
            value = 1.0 if value else 0.0
        yield GaugeMetricFamily(name, doc, value=float(value or 0))
    for name, key, doc in counters:
        yield CounterMetricFamily(name, doc, value=float(status.get(key) or 0))


def _le(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """One node's registry and the HTTP instruments the app updates."""

    def __init__(self, node: NodePort) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "qb_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "qb_http_request_duration_seconds",
            "time to answer an HTTP request",
            ["route", "method"],
            buckets=HTTP_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "qb_rate_limited",
            "requests refused with 429 rate_limited",
            ["role"],
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(node))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
