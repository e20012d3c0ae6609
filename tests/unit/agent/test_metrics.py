"""The agent's metrics: what a Prometheus scrape of its admin listener reads."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.agent import LineageAgent
from agent.batch import EventBatch
from agent.config import AgentConfig, AgentProcessConfig
from agent.derive import DeriveConfig, Deriver
from agent.derive.runs import RunConfig
from agent.metrics import (
    AGENT_METRICS,
    INGEST_METRICS,
    AgentStats,
    IngestStats,
    MetricTable,
    StatsCollector,
)
from agent.spool import SpoolOptions, SpoolWriter, encode_segment_header, segment_name
from tests.unit.agent.factories import SECOND, make_record, traceparent

REPO = Path(__file__).resolve().parents[3]
END = "x-run-end"
DERIVE = DeriveConfig(runs=RunConfig(end_header=END, idle_timeout_ns=3600 * SECOND))


def scrape(table: MetricTable, stats: object) -> dict[str, tuple[str, str, float]]:
    """metric family name -> (type, help, value), as Prometheus would read it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(table, lambda: stats))
    text = generate_latest(registry).decode()
    families: dict[str, tuple[str, str, float]] = {}
    for family in text_string_to_metric_families(text):
        [sample] = family.samples
        families[sample.name] = (family.type, family.documentation, sample.value)
    return families


@pytest.mark.parametrize(
    ("table", "kind", "gauges"),
    [
        (
            AGENT_METRICS,
            AgentStats,
            {"lag_bytes", "open_runs", "spools_reading", "spools_stopped"},
        ),
        (INGEST_METRICS, IngestStats, {"lag_messages", "partitions_assigned"}),
    ],
)
def test_every_stat_is_exposed_once_with_its_type_help_and_value(
    table: MetricTable, kind: type[AgentStats] | type[IngestStats], gauges: set[str]
) -> None:
    names = [field.name for field in dataclasses.fields(kind)]
    # A distinct value per field, so a metric wired to the wrong counter shows.
    stats = kind(**{name: 1000 + index for index, name in enumerate(names)})
    families = scrape(table, stats)
    assert len(families) == len(names) == len(table.specs)
    for index, name in enumerate(names):
        [spec] = [spec for spec in table.specs if spec.field == name]
        exposed = table.prefix + name + ("_total" if spec.kind == "counter" else "")
        assert table.name(spec) == exposed
        kind_exposed, help_text, value = families[exposed]
        assert (kind_exposed, value) == (spec.kind, 1000 + index)
        assert help_text == spec.help
        assert help_text
    exposed_gauges = {name for name, (kind_, _, _) in families.items() if kind_ == "gauge"}
    assert exposed_gauges == {table.prefix + name for name in gauges}


def test_a_scrape_reads_the_stats_as_they_stand_then() -> None:
    current = [AgentStats(events_derived=3)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(AGENT_METRICS, lambda: current[0]))
    assert b"lineage_agent_events_derived_total 3.0" in generate_latest(registry)
    current[0] = AgentStats(events_derived=7)
    assert b"lineage_agent_events_derived_total 7.0" in generate_latest(registry)


@pytest.mark.parametrize("table", [AGENT_METRICS, INGEST_METRICS], ids=["agent", "ingest"])
def test_the_operations_guide_lists_every_metric(table: MetricTable) -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    names = [table.name(spec) for spec in table.specs]
    missing = [name for name in names if f"`{name}`" not in guide]
    assert not missing, f"docs/operations.md does not describe {missing}"


class ListSink:
    """Acknowledges every batch and keeps it (no IO)."""

    def __init__(self) -> None:
        self.batches: list[EventBatch] = []

    async def send(self, batch: EventBatch) -> None:
        self.batches.append(batch)

    async def close(self) -> None:
        return None


async def drained(agent: LineageAgent) -> AgentStats:
    """The stats once everything was delivered and committed, the lag measured since, and
    the refused spool stopped (polled: the agent has no event to wait on)."""
    for _ in range(3000):
        stats = agent.stats()
        if stats.commits and not stats.lag_bytes and stats.spools_stopped:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"the agent did not drain its spool: {agent.stats()}")


async def test_a_running_agent_reports_what_it_did(tmp_path: Path) -> None:
    now = time.time_ns()  # the wall-clock tick must not find the open run idle
    # Run 1 ends with its third request; run 2 is still open when the spool is drained.
    records = [
        make_record(
            f"r{run}-{step}",
            time_ns=now + step,
            path=f"/sales/t{run}",
            resource=f"dataset:sales.t{run}",
            action="read" if step % 2 == 0 else "write",
            traceparent=traceparent(run),
            correlation={END: "end"} if (run, step) == (1, 2) else {},
        )
        for run, steps in ((1, 3), (2, 2))
        for step in range(steps)
    ]
    writer = SpoolWriter(tmp_path / "w0", SpoolOptions())
    try:
        for record in records:
            assert writer.append(record)
        writer.flush()
    finally:
        writer.close()
    # w1 holds a segment of a format this agent does not know: it is stopped, and counted.
    (tmp_path / "w1").mkdir()
    (tmp_path / "w1" / segment_name(1)).write_bytes(encode_segment_header(1, format_version=9))
    deriver = Deriver(DERIVE)
    expected = [event for record in records for event in deriver.feed(record)]
    config = AgentProcessConfig(
        agent=AgentConfig(
            spool_dir=str(tmp_path), poll_interval=0.01, linger=0.01, tick_interval=0.05
        ),
        derive=DERIVE,
    )
    sink = ListSink()
    agent = LineageAgent(config, sink)
    task = asyncio.create_task(agent.run(), name="test-agent")
    try:
        stats = await drained(agent)
    finally:
        agent.stop()
        await task
    sent = sum(len(batch.events) for batch in sink.batches)
    assert (stats.records_read, stats.events_derived, stats.events_sent) == (
        len(records),
        len(expected),
        sent,
    )
    assert stats.batches_sent == len([b for b in sink.batches if b.events])
    assert (stats.spools_reading, stats.spools_stopped) == (1, 1)
    assert stats.open_runs == deriver.open_runs == 1
    assert stats.send_failures == stats.records_failed == stats.records_quarantined == 0
