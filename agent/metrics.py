"""The agent's Prometheus metrics, read from its counters when scraped.

The agent counts in plain integer attributes, which cost its loop nothing; a scrape asks it
for an `AgentStats` snapshot and turns that into metric families here. Nothing is pushed
per record or per event, so the metrics add no work to the hot loop however busy it is.

Every metric is declared once, in `METRICS`: the exposition and the operations guide's
table (a test compares them) both follow it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "lineage_agent_"


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
class MetricSpec:
    field: str
    kind: Literal["counter", "gauge"]
    help: str

    @property
    def name(self) -> str:
        """The name in the exposition (counters end in `_total`)."""
        return PREFIX + self.field + ("_total" if self.kind == "counter" else "")


METRICS = (
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
    MetricSpec("send_failures", "counter", "Failed batch sends (each is retried with backoff)."),
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
)


def metric_families(stats: AgentStats) -> Iterator[Metric]:
    """One family per entry of `METRICS`, with its value from `stats`. Pure."""
    for spec in METRICS:
        value = getattr(stats, spec.field)
        name = PREFIX + spec.field
        if spec.kind == "counter":
            yield CounterMetricFamily(name, spec.help, value=value)
        else:
            yield GaugeMetricFamily(name, spec.help, value=value)


class AgentCollector(Collector):
    """Reads the agent's stats at scrape time."""

    def __init__(self, stats: Callable[[], AgentStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        return metric_families(self._stats())
