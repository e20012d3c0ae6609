"""Small builders of run and access events for the store tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from agent.events import (
    AccessEvent,
    ColumnLineageFacet,
    ColumnLineageField,
    DatasetFacets,
    EventType,
    InputDataset,
    InputField,
    Job,
    OutputDataset,
    Run,
    RunEvent,
)

NS = "https://sales-db.internal:8001"
T0 = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)


def run_event(
    event_type: EventType,
    run_id: uuid.UUID,
    *,
    inputs: Iterable[str] = (),
    outputs: Iterable[str] = (),
    at: datetime = T0,
    job: str = "nightly-etl",
    columns: dict[str, dict[str, list[tuple[str, str]]]] | None = None,
    namespace: str = NS,
) -> RunEvent:
    """`columns` maps output dataset -> output column -> [(input dataset, input column)]."""
    columns = columns or {}
    outs = []
    for name in outputs:
        facets = DatasetFacets()
        if name in columns:
            facets = DatasetFacets(
                column_lineage=ColumnLineageFacet(
                    fields={
                        column: ColumnLineageField(
                            input_fields=tuple(
                                InputField(namespace=namespace, name=source, field=field)
                                for source, field in sources
                            )
                        )
                        for column, sources in columns[name].items()
                    }
                )
            )
        outs.append(OutputDataset(namespace=namespace, name=name, facets=facets))
    return RunEvent(
        event_type=event_type,
        event_time=at,
        run=Run(run_id=run_id),
        job=Job(namespace="lineage-sidecar", name=job),
        inputs=tuple(InputDataset(namespace=namespace, name=n) for n in inputs),
        outputs=tuple(outs),
    )


def edge_run(
    run_id: uuid.UUID, inputs: Iterable[str], outputs: Iterable[str], at: datetime = T0
) -> RunEvent:
    return run_event("COMPLETE", run_id, inputs=inputs, outputs=outputs, at=at)


def access_event(
    index: int,
    *,
    dataset: str = "sales.orders",
    at: datetime = T0,
    principal: str | None = "alice@example.com",
    roles: tuple[str, ...] = ("analyst",),
    action: str = "read",
    status: int = 200,
    namespace: str = NS,
) -> AccessEvent:
    return AccessEvent(
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"test-access-{index}-{dataset}"),
        time=at + timedelta(milliseconds=index),
        principal=principal,
        roles=roles,
        dataset_namespace=namespace,
        dataset_name=dataset,
        action=action,
        decision="allow",
        rule="p, analyst, dataset:sales.*, read",
        request_id=f"req-{index}",
        status=status,
    )


# Columns that differ between otherwise equal states for reasons outside the writer
# (insert wall-clock time), left out of snapshots.
_VOLATILE = {"received_at"}
SNAPSHOT_TABLES = (
    "datasets",
    "jobs",
    "runs",
    "run_datasets",
    "lineage_edges",
    "lineage_edge_runs",
    "column_edges",
    "access_events",
    "events_raw",
    "dead_letter",
)


async def snapshot(connection: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every store table, in a stable order, comparable with ==."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    for table in SNAPSHOT_TABLES:
        rows = await connection.fetch(f"SELECT * FROM {table}")
        tables[table] = sorted(
            (tuple(v for k, v in row.items() if k not in _VOLATILE) for row in rows),
            key=repr,
        )
    return tables


async def snapshot_by_name(connection: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Table contents with ids replaced by names, for comparing two stores whose
    identity columns were assigned in a different order."""
    queries = {
        "runs": """SELECT r.run_id, j.name, r.state, r.state_time, r.state_event_id,
                          r.started_at, r.ended_at, r.facets
                   FROM runs r JOIN jobs j ON j.id = r.job_id""",
        "run_datasets": """SELECT rd.run_id, rd.direction, d.name
                           FROM run_datasets rd JOIN datasets d ON d.id = rd.dataset_id""",
        "lineage_edges": """SELECT s.name, t.name, e.first_seen, e.last_seen, e.run_count,
                                   e.last_run_id
                            FROM lineage_edges e JOIN datasets s ON s.id = e.source_id
                            JOIN datasets t ON t.id = e.target_id""",
        "column_edges": """SELECT t.name, c.target_column, s.name, c.source_column,
                                  c.first_seen, c.last_seen, c.last_run_id
                           FROM column_edges c JOIN datasets s ON s.id = c.source_dataset_id
                           JOIN datasets t ON t.id = c.target_dataset_id""",
        "datasets": "SELECT namespace, name, first_seen, last_seen FROM datasets",
        "events_raw": "SELECT event_id, kind, event_type, event_time, payload FROM events_raw",
    }
    return {
        table: sorted((tuple(row.values()) for row in await connection.fetch(sql)), key=repr)
        for table, sql in queries.items()
    }
