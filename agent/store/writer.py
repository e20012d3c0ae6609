"""Batched, idempotent writes of lineage and access events into PostgreSQL.

`StoreWriter.write(events)` stores one batch in ONE transaction and promises:

* exactly once by event id: writing a batch again, or batches that overlap, leaves every
  table as the first write left it (run events are gated by `events_raw`, access events by
  their own primary key; edge counts count distinct runs through `lineage_edge_runs`);
* order independence: a run's row ends in the same state whatever order its START,
  RUNNING and COMPLETE/FAIL events arrive in (see `agent.store.plan.STATE_RANK`);
* no poison batch: an event PostgreSQL cannot hold (NUL characters, invalid Unicode,
  out-of-range numbers) goes to `dead_letter` with the reason, and the rest is written;
* nothing partial: on any error the transaction rolls back and `StoreError` says whether
  trying again may help (the ingester then keeps its Kafka offsets uncommitted).

Access events are staged with binary COPY into a session temp table and inserted with
`ON CONFLICT DO NOTHING`; everything else goes through `unnest()` over array parameters,
one statement per table per batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from agent.events import LineageEvent, RunEvent
from agent.store.plan import (
    AccessPlan,
    Rejected,
    RunPlan,
    Sighting,
    identity_key,
    plan_access,
    plan_runs,
    screen,
    utc,
)

__all__ = ["StoreError", "StoreWriter", "WriteResult"]

# Deadlocks and serialization failures between concurrent writers are resolved by running
# the batch again; so is a partition dropped by retention between check and insert.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_NO_PARTITION_SQLSTATE = "23514"
_MAX_ATTEMPTS = 4

_CREATE_ACCESS_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS access_stage (
    event_id uuid, time timestamptz, principal text, roles text[], dataset_id bigint,
    action text, decision text, rule text, request_id text, status integer
) ON COMMIT DELETE ROWS
"""
_ACCESS_COLUMNS = (
    "event_id",
    "time",
    "principal",
    "roles",
    "dataset_id",
    "action",
    "decision",
    "rule",
    "request_id",
    "status",
)
_INSERT_ACCESS = """
WITH inserted AS (
    INSERT INTO access_events (event_id, time, principal, roles, dataset_id, action,
                               decision, rule, request_id, status)
    SELECT event_id, time, principal, roles, dataset_id, action, decision, rule,
           request_id, status
    FROM access_stage
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted
"""


def _upsert_named_sql(table: str) -> str:
    # Only touch the row when its span of sightings grows: fewer dead tuples for the
    # datasets every batch names.
    return f"""
INSERT INTO {table} (key, namespace, name, first_seen, last_seen)
SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
ON CONFLICT (key) DO UPDATE SET
    first_seen = least({table}.first_seen, excluded.first_seen),
    last_seen = greatest({table}.last_seen, excluded.last_seen)
WHERE excluded.first_seen < {table}.first_seen OR excluded.last_seen > {table}.last_seen
"""  # noqa: S608 - table is one of two constants


_UPSERT_DATASETS = _upsert_named_sql("datasets")
_UPSERT_JOBS = _upsert_named_sql("jobs")
_SELECT_DATASET_IDS = "SELECT key, id FROM datasets WHERE key = ANY($1::bytea[])"
_SELECT_JOB_IDS = "SELECT key, id FROM jobs WHERE key = ANY($1::bytea[])"

_INSERT_RAW = """
INSERT INTO events_raw (event_id, kind, event_type, event_time, payload)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::jsonb[])
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_RUN_WINS = (
    "(excluded.state_rank, excluded.state_time, excluded.state_event_id)"
    " > (runs.state_rank, runs.state_time, runs.state_event_id)"
)
_UPSERT_RUNS = f"""
INSERT INTO runs (run_id, job_id, state, state_rank, state_time, state_event_id,
                  started_at, ended_at, facets)
SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::int2[], $5::timestamptz[],
                     $6::uuid[], $7::timestamptz[], $8::timestamptz[], $9::jsonb[])
ON CONFLICT (run_id) DO UPDATE SET
    started_at = least(runs.started_at, excluded.started_at),
    {
    ", ".join(
        f"{c} = CASE WHEN {_RUN_WINS} THEN excluded.{c} ELSE runs.{c} END"
        for c in (
            "job_id",
            "state",
            "state_rank",
            "state_time",
            "state_event_id",
            "ended_at",
            "facets",
        )
    )
}
"""  # noqa: S608 - built from constants only

_INSERT_RUN_DATASETS = """
INSERT INTO run_datasets (run_id, direction, dataset_id)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[])
ON CONFLICT DO NOTHING
"""

_INSERT_EDGE_RUNS = """
INSERT INTO lineage_edge_runs (source_id, target_id, run_id)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::uuid[])
ON CONFLICT DO NOTHING
RETURNING source_id, target_id
"""

_EDGE_IS_LATER = (
    "(excluded.last_seen, excluded.last_run_id)"
    " > (lineage_edges.last_seen, lineage_edges.last_run_id)"
)
_UPSERT_EDGES = f"""
INSERT INTO lineage_edges (source_id, target_id, first_seen, last_seen, run_count,
                           last_run_id)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::timestamptz[],
                     $5::bigint[], $6::uuid[])
ON CONFLICT (source_id, target_id) DO UPDATE SET
    first_seen = least(lineage_edges.first_seen, excluded.first_seen),
    last_seen = greatest(lineage_edges.last_seen, excluded.last_seen),
    run_count = lineage_edges.run_count + excluded.run_count,
    last_run_id = CASE WHEN {_EDGE_IS_LATER} THEN excluded.last_run_id
                       ELSE lineage_edges.last_run_id END
"""  # noqa: S608 - built from constants only

_COLUMN_IS_LATER = (
    "(excluded.last_seen, excluded.last_run_id)"
    " > (column_edges.last_seen, column_edges.last_run_id)"
)
_UPSERT_COLUMN_EDGES = f"""
INSERT INTO column_edges (key, target_dataset_id, target_column, source_dataset_id,
                          source_column, first_seen, last_seen, last_run_id)
SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::text[], $4::bigint[], $5::text[],
                     $6::timestamptz[], $7::timestamptz[], $8::uuid[])
ON CONFLICT (key) DO UPDATE SET
    first_seen = least(column_edges.first_seen, excluded.first_seen),
    last_seen = greatest(column_edges.last_seen, excluded.last_seen),
    last_run_id = CASE WHEN {_COLUMN_IS_LATER} THEN excluded.last_run_id
                       ELSE column_edges.last_run_id END
"""  # noqa: S608 - built from constants only

_INSERT_DEAD_LETTERS = """
INSERT INTO dead_letter (source, reason, payload, key)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[])
ON CONFLICT (key) DO NOTHING
"""


class StoreError(Exception):
    """A batch was not written. `retriable`: the same batch may succeed later (database
    unreachable, restarting, overloaded); otherwise it never will as it stands."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class WriteResult:
    """What one `write` did: events new to the store, events it already held (or that
    appeared twice in the batch), and events set aside into the dead letter table."""

    inserted: int
    duplicates: int
    rejected: int = 0


_MAX_LABEL_CHARS = 2_000


def _clean_text(value: str) -> str:
    # Dead-letter source and reason may quote hostile input (a 10 kB column name, a NUL);
    # they must still be storable, and short enough to read.
    if len(value) > _MAX_LABEL_CHARS:
        value = value[:_MAX_LABEL_CHARS] + "..."
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def dead_letter_key(source: str, payload: bytes) -> bytes:
    return identity_key(source, payload.hex())


class StoreWriter:
    """Writes event batches; safe to share between tasks (each write takes a connection
    from the pool) and between processes (concurrent writers serialise on row locks,
    taken in sorted order, and retry on deadlock)."""

    def __init__(self, pool: asyncpg.Pool, *, owns_pool: bool = False) -> None:
        self._pool = pool
        self._owns_pool = owns_pool
        # UTC days whose access partition is known to exist.
        self._partitions: set[date] = set()

    @classmethod
    async def connect(cls, dsn: str, *, max_connections: int = 4) -> StoreWriter:
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_connections)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise StoreError(
                f"lineage store unreachable: {type(exc).__name__}: {exc}", retriable=True
            ) from exc
        return cls(pool, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
            await self._pool.close()

    async def write(self, events: Sequence[LineageEvent], *, source: str = "event") -> WriteResult:
        """Store a batch in one transaction. `source` prefixes the dead-letter source of
        rejected events (the ingester passes its topic/partition/offset)."""
        screened = screen(events)
        access = plan_access(screened.access_events)
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with self._pool.acquire() as connection:
                    await self._ensure_partitions(connection, access.days)
                    async with connection.transaction():
                        inserted = await self._write_batch(
                            connection, screened.run_events, access, screened.rejected, source
                        )
            except asyncpg.PostgresError as exc:
                sqlstate = getattr(exc, "sqlstate", None)
                if sqlstate == _NO_PARTITION_SQLSTATE:
                    self._partitions.clear()
                if attempt < _MAX_ATTEMPTS and (
                    sqlstate in _RETRY_SQLSTATES or sqlstate == _NO_PARTITION_SQLSTATE
                ):
                    continue
                raise _store_error(exc) from exc
            except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
                # The connection broke. Whether COMMIT got through is unknown; writing the
                # batch again is safe either way, which is the point of event ids.
                raise StoreError(
                    f"lineage store unreachable: {type(exc).__name__}: {exc}", retriable=True
                ) from exc
            storable = len(screened.run_events) + len(screened.access_events)
            return WriteResult(
                inserted=inserted,
                duplicates=storable - inserted + screened.repeats,
                rejected=len(screened.rejected),
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def write_dead_letter(self, source: str, reason: str, payload: bytes) -> bool:
        """Record a message that could not be ingested. Returns False when the same payload
        from the same source is already there (a redelivery)."""
        source, reason = _clean_text(source), _clean_text(reason)
        try:
            status: str = await self._pool.execute(
                _INSERT_DEAD_LETTERS,
                [source],
                [reason],
                [payload],
                [dead_letter_key(source, payload)],
            )
        except asyncpg.PostgresError as exc:
            raise _store_error(exc) from exc
        except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            raise StoreError(f"lineage store unreachable: {exc}", retriable=True) from exc
        return status.endswith(" 1")

    async def drop_expired_access_partitions(
        self, keep_days: int, *, as_of: datetime | None = None
    ) -> list[str]:
        """Drop access partitions whose day ended more than `keep_days` days ago."""
        if keep_days < 0:
            raise ValueError(f"keep_days must be zero or more, got {keep_days}")
        if as_of is None:
            rows = await self._pool.fetch("SELECT drop_access_partitions($1)", keep_days)
        else:
            rows = await self._pool.fetch("SELECT drop_access_partitions($1, $2)", keep_days, as_of)
        self._partitions.clear()
        return [row[0] for row in rows]

    async def _ensure_partitions(self, connection: asyncpg.Connection, days: list[date]) -> None:
        missing = [day for day in days if day not in self._partitions]
        if missing:
            # Outside the batch transaction: DDL takes a strong lock on access_events,
            # which must not be held for the length of a batch.
            await connection.execute("SELECT ensure_access_partitions($1::date[])", missing)
            self._partitions.update(missing)

    async def _write_batch(
        self,
        connection: asyncpg.Connection,
        run_events: list[tuple[RunEvent, uuid.UUID, str]],
        access: AccessPlan,
        rejected: list[Rejected],
        source: str,
    ) -> int:
        new_run_events = []
        if run_events:
            rows = await connection.fetch(
                _INSERT_RAW,
                [event_id for _, event_id, _ in run_events],
                ["run"] * len(run_events),
                [event.event_type for event, _, _ in run_events],
                [utc(event.event_time) for event, _, _ in run_events],
                [payload for _, _, payload in run_events],
            )
            new_ids = {row[0] for row in rows}
            new_run_events = [(e, i) for e, i, _ in run_events if i in new_ids]
        runs = plan_runs(new_run_events)

        dataset_ids = await _upsert_named(
            connection,
            _UPSERT_DATASETS,
            _SELECT_DATASET_IDS,
            {**access.datasets, **_merge(access.datasets, runs.datasets)},
        )
        inserted = len(new_run_events)
        if new_run_events:
            job_ids = await _upsert_named(connection, _UPSERT_JOBS, _SELECT_JOB_IDS, runs.jobs)
            await _write_runs(connection, runs, dataset_ids, job_ids)
        if access.rows:
            inserted += await _write_access(connection, access, dataset_ids)
        if rejected:
            sources = [
                _clean_text(f"{source}:{r.event_id}" if r.event_id else source) for r in rejected
            ]
            await connection.execute(
                _INSERT_DEAD_LETTERS,
                sources,
                [_clean_text(r.reason) for r in rejected],
                [r.payload for r in rejected],
                [dead_letter_key(s, r.payload) for s, r in zip(sources, rejected, strict=True)],
            )
        return inserted


def _merge(first: dict[bytes, Sighting], second: dict[bytes, Sighting]) -> dict[bytes, Sighting]:
    """`second` with each sighting widened by the same key's sighting in `first`."""
    merged: dict[bytes, Sighting] = {}
    for key, sighting in second.items():
        other = first.get(key)
        if other is None:
            merged[key] = sighting
        else:
            merged[key] = Sighting(
                sighting.namespace,
                sighting.name,
                min(sighting.first_seen, other.first_seen),
                max(sighting.last_seen, other.last_seen),
            )
    return merged


async def _upsert_named(
    connection: asyncpg.Connection, upsert: str, select: str, sightings: dict[bytes, Sighting]
) -> dict[bytes, int]:
    """Upsert datasets or jobs (sorted by key, the lock order) and return their ids."""
    if not sightings:
        return {}
    keys = sorted(sightings)
    await connection.execute(
        upsert,
        keys,
        [sightings[k].namespace for k in keys],
        [sightings[k].name for k in keys],
        [sightings[k].first_seen for k in keys],
        [sightings[k].last_seen for k in keys],
    )
    rows = await connection.fetch(select, keys)
    return {bytes(row[0]): row[1] for row in rows}


async def _write_runs(
    connection: asyncpg.Connection,
    plan: RunPlan,
    dataset_ids: dict[bytes, int],
    job_ids: dict[bytes, int],
) -> None:
    runs = plan.runs
    await connection.execute(
        _UPSERT_RUNS,
        [r.run_id for r in runs],
        [job_ids[r.job_key] for r in runs],
        [r.state for r in runs],
        [r.rank for r in runs],
        [r.state_time for r in runs],
        [r.state_event_id for r in runs],
        [r.started_at for r in runs],
        [r.ended_at for r in runs],
        [r.facets_json for r in runs],
    )
    if plan.run_datasets:
        await connection.execute(
            _INSERT_RUN_DATASETS,
            [run_id for run_id, _, _ in plan.run_datasets],
            [direction for _, direction, _ in plan.run_datasets],
            [dataset_ids[key] for _, _, key in plan.run_datasets],
        )
    if plan.edges:
        await _write_edges(connection, plan, dataset_ids)
    if plan.column_edges:
        columns = plan.column_edges
        await connection.execute(
            _UPSERT_COLUMN_EDGES,
            [c.key for c in columns],
            [dataset_ids[c.target_key] for c in columns],
            [c.target_column for c in columns],
            [dataset_ids[c.source_key] for c in columns],
            [c.source_column for c in columns],
            [c.first_seen for c in columns],
            [c.last_seen for c in columns],
            [c.last_run_id for c in columns],
        )


async def _write_edges(
    connection: asyncpg.Connection, plan: RunPlan, dataset_ids: dict[bytes, int]
) -> None:
    triples = sorted(
        (dataset_ids[e.source_key], dataset_ids[e.target_key], e.run_id, e) for e in plan.edges
    )
    # Counting only the (edge, run) pairs that are new here keeps run_count exact under
    # redelivery and concurrent writers (the insert waits for a competing one to commit).
    new_rows = await connection.fetch(
        _INSERT_EDGE_RUNS,
        [t[0] for t in triples],
        [t[1] for t in triples],
        [t[2] for t in triples],
    )
    new_runs: dict[tuple[int, int], int] = {}
    for row in new_rows:
        pair = (row[0], row[1])
        new_runs[pair] = new_runs.get(pair, 0) + 1

    # One row per (source, target): the span over this batch and the latest run.
    edges: dict[tuple[int, int], tuple[datetime, datetime, uuid.UUID]] = {}
    for source_id, target_id, run_id, sighting in triples:
        pair = (source_id, target_id)
        known = edges.get(pair)
        if known is None:
            edges[pair] = (sighting.first_seen, sighting.last_seen, run_id)
            continue
        first, last, last_run = known
        if (sighting.last_seen, run_id.bytes) > (last, last_run.bytes):
            last, last_run = sighting.last_seen, run_id
        edges[pair] = (min(first, sighting.first_seen), last, last_run)
    pairs = sorted(edges)
    await connection.execute(
        _UPSERT_EDGES,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        [edges[p][0] for p in pairs],
        [edges[p][1] for p in pairs],
        [new_runs.get(p, 0) for p in pairs],
        [edges[p][2] for p in pairs],
    )


async def _write_access(
    connection: asyncpg.Connection, plan: AccessPlan, dataset_ids: dict[bytes, int]
) -> int:
    await connection.execute(_CREATE_ACCESS_STAGE)
    await connection.copy_records_to_table(
        "access_stage",
        records=[
            (
                event.event_id,
                utc(event.time),
                event.principal,
                list(event.roles),
                dataset_ids[key],
                event.action,
                event.decision,
                event.rule,
                event.request_id,
                event.status,
            )
            for event, key in plan.rows
        ],
        columns=_ACCESS_COLUMNS,
    )
    count: int = await connection.fetchval(_INSERT_ACCESS)
    return count


def _store_error(exc: asyncpg.PostgresError) -> StoreError:
    sqlstate = getattr(exc, "sqlstate", "") or ""
    # Class 08 connection, 53 insufficient resources, 57 operator intervention (shutdown),
    # 40 transaction rollback: conditions that pass.
    retriable = sqlstate[:2] in {"08", "53", "57", "40"}
    return StoreError(
        f"lineage store rejected the batch: {type(exc).__name__} ({sqlstate}): {exc}",
        retriable=retriable,
    )
