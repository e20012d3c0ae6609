"""Prometheus metrics of the agent and of the ingester, read from their counters when scraped.

Each process counts in plain integer attributes, which cost its loop nothing; a scrape asks
it for a stats snapshot (`AgentStats`, `IngestStats`) and `StatsCollector` turns that into
metric families following a `MetricTable`. Nothing is pushed per record, message or event,
so the metrics add no work to the hot loops however busy they are.

Every metric is declared once, in its table (`AGENT_METRICS`, `INGEST_METRICS`): the
exposition and the operations guide's tables (a test compares them) both follow it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True, slots=True)
class AgentStats:
    """What the agent has counted since it started, and where it stands now."""

    records_read: int = 0
    records_skipped: int = 0
    records_failed: int = 0
    records_quarantined: int = 0
    events_derived: int = 0
    events_set_aside: int = 0
    events_sent: int = 0
    batches_sent: int = 0
    send_failures: int = 0
    commits: int = 0
    lag_bytes: int = 0
    open_runs: int = 0
    spools_reading: int = 0
    spools_stopped: int = 0


@dataclass(frozen=True, slots=True)
class IngestStats:
    """What the ingester has counted since it started, and where it stands now."""

    messages: int = 0
    events_inserted: int = 0
    events_duplicate: int = 0
    events_rejected: int = 0
    dead_letters: int = 0
    store_failures: int = 0
    key_provider_failures: int = 0
    kafka_failures: int = 0
    commits: int = 0
    commit_failures: int = 0
    lag_messages: int = 0
    partitions_assigned: int = 0


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: the stats field it reads, its type and its help text."""

    field: str
    kind: Literal["counter", "gauge"]
    help: str


@dataclass(frozen=True, slots=True)
class MetricTable:
    """The metrics of one process, all named `prefix` + field."""

    prefix: str
    specs: tuple[MetricSpec, ...]

    def name(self, spec: MetricSpec) -> str:
        """The name in the exposition (counters end in `_total`)."""
        return self.prefix + spec.field + ("_total" if spec.kind == "counter" else "")

    def families(self, stats: object) -> Iterator[Metric]:
        """One family per spec, with its value from `stats`. Pure."""
        for spec in self.specs:
            value = getattr(stats, spec.field)
            name = self.prefix + spec.field
            if spec.kind == "counter":
                yield CounterMetricFamily(name, spec.help, value=value)
            else:
                yield GaugeMetricFamily(name, spec.help, value=value)


class StatsCollector(Collector):
    """Reads a process's stats at scrape time and exposes them by `table`."""

    def __init__(self, table: MetricTable, stats: Callable[[], object]) -> None:
        self._table = table
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        return self._table.families(self._stats())


AGENT_METRICS = MetricTable(
    "lineage_agent_",
    (
        MetricSpec("records_read", "counter", "Capture records read from the worker spools."),
        MetricSpec(
            "records_skipped",
            "counter",
            "Records read again after a restart that the checkpoint already covered (not resent).",
        ),
        MetricSpec(
            "records_failed",
            "counter",
            "Records whose lineage derivation raised; each is logged with its request id.",
        ),
        MetricSpec(
            "records_quarantined",
            "counter",
            "Records set aside in a spool's quarantine/ (undecodable or damaged) by this run.",
        ),
        MetricSpec("events_derived", "counter", "Lineage events derived from the records."),
        MetricSpec(
            "events_set_aside",
            "counter",
            "Events too large for any Kafka message, written to <spool_dir>/rejected/.",
        ),
        MetricSpec("events_sent", "counter", "Events the sink acknowledged."),
        MetricSpec("batches_sent", "counter", "Batches the sink acknowledged."),
        MetricSpec(
            "send_failures", "counter", "Failed batch sends (each is retried with backoff)."
        ),
        MetricSpec(
            "commits", "counter", "Checkpoints written and spool positions committed after a send."
        ),
        MetricSpec(
            "lag_bytes",
            "gauge",
            "Bytes of records in the spools after their committed positions: what is not "
            "delivered yet.",
        ),
        MetricSpec("open_runs", "gauge", "Runs begun and not yet completed."),
        MetricSpec("spools_reading", "gauge", "Worker spools being read."),
        MetricSpec(
            "spools_stopped",
            "gauge",
            "Worker spools no longer read because their data is of an unknown format; "
            "/readyz names them.",
        ),
    ),
)

INGEST_METRICS = MetricTable(
    "lineage_ingest_",
    (
        MetricSpec(
            "messages",
            "counter",
            "Kafka messages handled: their events stored, or the message dead-lettered.",
        ),
        MetricSpec("events_inserted", "counter", "Lineage events written to the store."),
        MetricSpec(
            "events_duplicate",
            "counter",
            "Events already in the store (a message delivered again), not written twice.",
        ),
        MetricSpec(
            "events_rejected",
            "counter",
            "Events the store screened out (recorded in dead_letter with the reason).",
        ),
        MetricSpec(
            "dead_letters",
            "counter",
            "Messages written to the dead_letter table (unreadable, tampered, refused).",
        ),
        MetricSpec(
            "store_failures",
            "counter",
            "Failed attempts to reach or write the lineage store (each is retried).",
        ),
        MetricSpec(
            "key_provider_failures",
            "counter",
            "Failed attempts to unwrap a batch key (each is retried, nothing dead-lettered).",
        ),
        MetricSpec(
            "kafka_failures",
            "counter",
            "Failed attempts to join the consumer group (each is retried).",
        ),
        MetricSpec("commits", "counter", "Offset commits after the store committed a fetch."),
        MetricSpec(
            "commit_failures",
            "counter",
            "Offset commits Kafka refused (usually a rebalance; the messages come again).",
        ),
        MetricSpec(
            "lag_messages",
            "gauge",
            "Messages on the assigned partitions after the last one stored, as of the "
            "latest fetch.",
        ),
        MetricSpec("partitions_assigned", "gauge", "Topic partitions assigned to this ingester."),
    ),
)
