"""StoreWriter against the real PostgreSQL: exact rows, exactly once, any order."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from agent.events import LATEST_EVENT_TIME, AccessEvent, RunEvent, time_from_ns
from agent.store.writer import StoreError, StoreWriter, WriteResult
from tests.integration.store.conftest import empty_store
from tests.integration.store.factories import (
    T0,
    access_event,
    edge_run,
    run_event,
    snapshot,
    snapshot_by_name,
)

RUN = uuid.UUID("6a1c8f6e-0000-4000-8000-000000000001")
OTHER_RUN = uuid.UUID("6a1c8f6e-0000-4000-8000-000000000002")


def etl_events() -> list[RunEvent]:
    """A run that reads orders and customers and writes order_totals, with column lineage."""
    start = run_event("START", RUN, inputs=["sales.orders"], outputs=["sales.order_totals"])
    complete = run_event(
        "COMPLETE",
        RUN,
        inputs=["sales.customers", "sales.orders"],
        outputs=["sales.order_totals"],
        at=T0 + timedelta(seconds=42),
        columns={
            "sales.order_totals": {
                "total": [("sales.orders", "amount")],
                "region": [("sales.customers", "region")],
            }
        },
    )
    return [start, complete]


async def test_a_run_and_accesses_land_as_exact_rows(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    start, complete = etl_events()
    accesses = [access_event(i) for i in range(3)]
    result = await writer.write([start, complete, *accesses])
    assert result == WriteResult(inserted=5, duplicates=0, rejected=0)

    datasets = await db.fetch("SELECT name, first_seen, last_seen FROM datasets ORDER BY name")
    assert [tuple(r) for r in datasets] == [
        ("sales.customers", T0 + timedelta(seconds=42), T0 + timedelta(seconds=42)),
        ("sales.order_totals", T0, T0 + timedelta(seconds=42)),
        ("sales.orders", T0, T0 + timedelta(seconds=42)),
    ]
    run = await db.fetchrow("SELECT * FROM runs")
    assert run["run_id"] == RUN
    assert run["state"] == "COMPLETE"
    assert run["started_at"] == T0
    assert run["ended_at"] == T0 + timedelta(seconds=42)
    assert run["state_event_id"] == complete.event_id
    assert await db.fetchval("SELECT namespace || '/' || name FROM jobs") == (
        "lineage-sidecar/nightly-etl"
    )
    run_datasets = await db.fetch(
        "SELECT rd.direction, d.name FROM run_datasets rd JOIN datasets d ON d.id = rd.dataset_id"
        " ORDER BY 1, 2"
    )
    assert [tuple(r) for r in run_datasets] == [
        ("input", "sales.customers"),
        ("input", "sales.orders"),
        ("output", "sales.order_totals"),
    ]
    edges = await db.fetch(
        "SELECT s.name, t.name, e.run_count, e.first_seen, e.last_seen, e.last_run_id"
        " FROM lineage_edges e JOIN datasets s ON s.id = e.source_id"
        " JOIN datasets t ON t.id = e.target_id ORDER BY 1"
    )
    assert [tuple(r) for r in edges] == [
        (
            "sales.customers",
            "sales.order_totals",
            1,
            T0 + timedelta(seconds=42),
            T0 + timedelta(seconds=42),
            RUN,
        ),
        ("sales.orders", "sales.order_totals", 1, T0, T0 + timedelta(seconds=42), RUN),
    ]
    columns = await db.fetch(
        "SELECT t.name, c.target_column, s.name, c.source_column FROM column_edges c"
        " JOIN datasets s ON s.id = c.source_dataset_id"
        " JOIN datasets t ON t.id = c.target_dataset_id ORDER BY 2"
    )
    assert [tuple(r) for r in columns] == [
        ("sales.order_totals", "region", "sales.customers", "region"),
        ("sales.order_totals", "total", "sales.orders", "amount"),
    ]
    access = await db.fetch(
        "SELECT event_id, time, principal, roles, action, decision, request_id, status"
        " FROM access_events ORDER BY time"
    )
    assert [tuple(r) for r in access] == [
        (
            a.event_id,
            a.time,
            a.principal,
            list(a.roles),
            a.action,
            a.decision,
            a.request_id,
            a.status,
        )
        for a in accesses
    ]
    raw = await db.fetch("SELECT event_id, kind, event_type, payload::text FROM events_raw")
    assert {(r[0], r[1], r[2]) for r in raw} == {
        (start.event_id, "run", "START"),
        (complete.event_id, "run", "COMPLETE"),
    }
    for row in raw:
        # The stored JSON decodes back to the very event (same content, same id).
        assert msgspec.json.decode(row[3], type=RunEvent).event_id == row[0]
    assert await db.fetchval("SELECT count(*) FROM dead_letter") == 0


async def test_the_same_batch_twice_changes_nothing(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    batch: list[RunEvent | AccessEvent] = [*etl_events(), *(access_event(i) for i in range(50))]
    assert (await writer.write(batch)).inserted == 52
    before = await snapshot(db)
    assert await writer.write(batch) == WriteResult(inserted=0, duplicates=52, rejected=0)
    assert await snapshot(db) == before


async def test_overlapping_batches_store_each_event_once(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    start, complete = etl_events()
    accesses = [access_event(i) for i in range(10)]
    await writer.write([start, *accesses])
    result = await writer.write([start, complete, *accesses[5:], access_event(10)])
    assert result == WriteResult(inserted=2, duplicates=6, rejected=0)
    assert await db.fetchval("SELECT count(*) FROM access_events") == 11
    assert await db.fetchval("SELECT count(*) FROM events_raw") == 2
    # START and COMPLETE both carry orders -> order_totals: one run, counted once.
    assert await db.fetchval("SELECT max(run_count) FROM lineage_edges") == 1


async def test_an_event_twice_in_one_batch_is_stored_once(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    start, _ = etl_events()
    access = access_event(1)
    result = await writer.write([start, access, start, access])
    assert result == WriteResult(inserted=2, duplicates=2, rejected=0)
    assert await db.fetchval("SELECT count(*) FROM access_events") == 1


async def test_concurrent_writers_with_overlapping_batches(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    runs = [uuid.uuid5(RUN, str(i)) for i in range(20)]
    events: list[RunEvent | AccessEvent] = [
        edge_run(run, [f"src{i % 4}", "shared"], [f"dst{i % 3}"]) for i, run in enumerate(runs)
    ]
    events += [access_event(i, dataset=f"src{i % 4}") for i in range(200)]
    halves = [events[:150], events[60:], events[::-1]]
    results = await asyncio.gather(*(writer.write(b) for b in halves))
    assert sum(r.inserted for r in results) == len(events)
    assert await db.fetchval("SELECT count(*) FROM access_events") == 200
    assert await db.fetchval("SELECT count(*) FROM runs") == 20
    # Each run produced its edges once: 20 runs x 2 inputs.
    assert await db.fetchval("SELECT sum(run_count) FROM lineage_edges") == 40
    assert await db.fetchval("SELECT count(*) FROM lineage_edge_runs") == 40


async def test_edges_count_distinct_runs(writer: StoreWriter, db: asyncpg.Connection) -> None:
    await writer.write([edge_run(RUN, ["a"], ["c"])])
    await writer.write([edge_run(OTHER_RUN, ["a"], ["c"], at=T0 + timedelta(hours=1))])
    await writer.write([run_event("START", OTHER_RUN, inputs=["a"], outputs=["c"])])
    row = await db.fetchrow(
        "SELECT run_count, first_seen, last_seen, last_run_id FROM lineage_edges"
    )
    assert tuple(row) == (2, T0, T0 + timedelta(hours=1), OTHER_RUN)


@pytest.mark.parametrize(
    "arrival",
    [
        pytest.param([0, 1, 2], id="start-running-complete"),
        pytest.param([2, 0, 1], id="complete-first"),
        pytest.param([1, 2, 0], id="start-last"),
    ],
)
async def test_run_events_in_any_order_end_in_the_same_state(
    writer: StoreWriter, db: asyncpg.Connection, arrival: list[int]
) -> None:
    events = [
        run_event("START", RUN, inputs=["a"], outputs=["b"], at=T0),
        run_event("RUNNING", RUN, inputs=["a"], outputs=["b"], at=T0 + timedelta(seconds=5)),
        run_event("FAIL", RUN, inputs=["a", "z"], outputs=["b"], at=T0 + timedelta(seconds=9)),
    ]
    # One event per batch, as they would arrive from separate deliveries.
    for index in arrival:
        await writer.write([events[index]])
    run = await db.fetchrow("SELECT state, started_at, ended_at, state_event_id FROM runs")
    assert tuple(run) == ("FAIL", T0, T0 + timedelta(seconds=9), events[2].event_id)
    in_order = await snapshot_by_name(db)

    await empty_store(db)
    await writer.write([events[i] for i in (0, 1, 2)])
    assert await snapshot_by_name(db) == in_order


async def test_access_partitions_per_day_and_retention(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    days = [T0 - timedelta(days=n) for n in (0, 1, 2, 10, 30)]
    await writer.write([access_event(i, at=day) for i, day in enumerate(days)])
    partitions = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'access_events'::regclass ORDER BY 1"
    )
    assert [r[0] for r in partitions] == [
        "access_events_p20261021",
        "access_events_p20261110",
        "access_events_p20261118",
        "access_events_p20261119",
        "access_events_p20261120",
    ]
    # Keep 3 days as of the end of T0's day: the 18th ended 2 days before, so it stays.
    as_of = datetime(2026, 11, 21, tzinfo=UTC)
    dropped = await writer.drop_expired_access_partitions(3, as_of=as_of)
    assert dropped == ["access_events_p20261021", "access_events_p20261110"]
    times = await db.fetch("SELECT time FROM access_events ORDER BY time")
    assert [r[0].date() for r in times] == [d.date() for d in sorted(days)[2:]]
    assert await writer.drop_expired_access_partitions(3, as_of=as_of) == []
    # A late event for a dropped day gets its partition back instead of failing the batch.
    late = access_event(99, at=T0 - timedelta(days=30))
    assert (await writer.write([late])).inserted == 1


async def test_retention_refuses_a_negative_period(writer: StoreWriter) -> None:
    with pytest.raises(ValueError, match="keep_days"):
        await writer.drop_expired_access_partitions(-1)


async def test_dead_letter_row_is_written_once(writer: StoreWriter, db: asyncpg.Connection) -> None:
    payload = b"\x00\xffnot a batch"
    assert await writer.write_dead_letter("kafka:lineage/3@1234", "decrypt: bad tag", payload)
    assert not await writer.write_dead_letter("kafka:lineage/3@1234", "decrypt: bad tag", payload)
    rows = await db.fetch("SELECT source, reason, payload, received_at FROM dead_letter")
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("kafka:lineage/3@1234", "decrypt: bad tag", payload)
    ]
    assert rows[0][3] is not None


async def test_dead_letter_source_and_reason_with_nul_are_stored(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    assert await writer.write_dead_letter("src\x00", "bad \x00 \udcff", b"x")
    assert await db.fetchval("SELECT reason FROM dead_letter") == "bad \\x00 \\udcff"


HOSTILE_NAMES = [
    "o'brien\"; DROP TABLE datasets; --",
    "données/表/📊",
    "x" * 10_240,
    "\\N\t\n\r",
    "",
]


@pytest.mark.parametrize(
    "name", HOSTILE_NAMES, ids=["quotes", "unicode", "10kB", "copy-escapes", "empty"]
)
async def test_hostile_but_storable_names_round_trip(
    writer: StoreWriter, db: asyncpg.Connection, name: str
) -> None:
    run = edge_run(RUN, [name], [name + "-out"])
    access = access_event(1, dataset=name, principal=name, roles=(name, "r"))
    assert (await writer.write([run, access])).inserted == 2
    stored = await db.fetch("SELECT name FROM datasets ORDER BY length(name)")
    assert [r[0] for r in stored] == [name, name + "-out"]
    row = await db.fetchrow("SELECT principal, roles FROM access_events")
    assert tuple(row) == (name, [name, "r"])
    assert await db.fetchval("SELECT count(*) FROM lineage_edges") == 1


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(access_event(7, principal="ali\x00ce"), id="nul-principal"),
        pytest.param(access_event(7, dataset="orders\x00"), id="nul-dataset"),
        pytest.param(access_event(7, roles=("a", "b\x00")), id="nul-role"),
        pytest.param(access_event(7, principal="\ud800"), id="lone-surrogate"),
        pytest.param(access_event(7, status=2**40), id="status-out-of-range"),
        pytest.param(run_event("START", RUN, inputs=["a\x00"], outputs=["b"]), id="nul-run-input"),
        pytest.param(
            run_event("START", RUN, outputs=["b"], columns={"b": {"c\x00": [("a", "x")]}}),
            id="nul-column-key",
        ),
        pytest.param(run_event("START", RUN, outputs=["\udcff"]), id="run-surrogate"),
        # The calendar's last and first days, which asyncpg sends as +/-infinity.
        pytest.param(
            msgspec.structs.replace(access_event(7), time=datetime(9999, 12, 31, tzinfo=UTC)),
            id="access-time-9999",
        ),
        pytest.param(
            msgspec.structs.replace(access_event(7), time=datetime(1, 1, 1, tzinfo=UTC)),
            id="access-time-0001",
        ),
        pytest.param(
            run_event("START", RUN, outputs=["b"], at=datetime.max.replace(tzinfo=UTC)),
            id="run-time-max",
        ),
        pytest.param(
            run_event("START", RUN, outputs=["b"], columns={"b": {"c" * 10_000 + "\x00": []}}),
            id="nul-in-10kB-column",
        ),
    ],
)
async def test_unstorable_events_go_to_the_dead_letter_and_the_rest_is_written(
    writer: StoreWriter, db: asyncpg.Connection, bad: RunEvent | AccessEvent
) -> None:
    good = [access_event(i) for i in range(3)]
    result = await writer.write([good[0], bad, *good[1:]])
    assert result == WriteResult(inserted=3, duplicates=0, rejected=1)
    assert await db.fetchval("SELECT count(*) FROM access_events") == 3
    assert await db.fetchval("SELECT count(*) FROM runs") == 0
    row = await db.fetchrow("SELECT source, reason, payload FROM dead_letter")
    assert row["source"].startswith("event")
    assert any(word in row["reason"] for word in ("NUL", "Unicode", "out of range"))
    assert len(row["reason"]) < 2_100
    assert len(row["payload"]) > 0
    # Redelivery of the same batch adds nothing, not even a second dead letter.
    before = await snapshot(db)
    await writer.write([good[0], bad, *good[1:]])
    assert await snapshot(db) == before


async def test_an_unreachable_database_is_a_retriable_error() -> None:
    with pytest.raises(StoreError, match="unreachable") as caught:
        await StoreWriter.connect("postgresql://lineage:lineage@127.0.0.1:1/none")
    assert caught.value.retriable


async def test_a_connection_killed_mid_batch_fails_retriably_and_nothing_is_partial(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    batch: list[RunEvent | AccessEvent] = [*etl_events(), access_event(1)]
    await writer.write([access_event(0)])  # the day's partition exists: no DDL in the way
    # Hold the writer inside its transaction, after the run rows and before the access
    # rows (blocked on a lock), then kill its backend: what a PostgreSQL crash or
    # failover does to a batch in flight.
    async with db.transaction():
        await db.execute("LOCK TABLE access_events IN ACCESS EXCLUSIVE MODE")
        write = asyncio.create_task(writer.write(batch))
        blocked = None
        for _ in range(500):
            blocked = await db.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if blocked is not None:
                break
            await asyncio.sleep(0.01)
        assert blocked is not None, "the writer never reached the lock"
        await db.execute("SELECT pg_terminate_backend($1)", blocked)
    with pytest.raises(StoreError) as caught:
        await write
    assert caught.value.retriable
    assert await db.fetchval("SELECT count(*) FROM runs") == 0
    assert await db.fetchval("SELECT count(*) FROM events_raw") == 0
    assert await db.fetchval("SELECT count(*) FROM access_events") == 1
    assert (await writer.write(batch)).inserted == 3


async def test_a_batch_failing_midway_leaves_nothing(
    writer: StoreWriter, db: asyncpg.Connection, store_dsn: str
) -> None:
    # Make the last statement of the batch (the access insert) fail: a trigger that
    # raises stands in for the database failing in the middle of a write.
    await db.execute(
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON access_events
        FOR EACH ROW EXECUTE FUNCTION refuse();
        """
    )
    try:
        with pytest.raises(StoreError, match="disk on fire") as caught:
            await writer.write([*etl_events(), access_event(1)])
        assert not caught.value.retriable
        for table in ("runs", "datasets", "lineage_edges", "events_raw", "access_events"):
            assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    finally:
        await db.execute("DROP TRIGGER refuse ON access_events; DROP FUNCTION refuse()")
    assert (await writer.write([*etl_events(), access_event(1)])).inserted == 3


async def test_a_partition_dropped_by_another_process_is_recreated(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    old_day = T0 - timedelta(days=40)
    await writer.write([access_event(0, at=old_day)])  # the writer now knows the partition
    dropped = await db.fetch("SELECT drop_access_partitions(7, $1)", T0)
    assert [r[0] for r in dropped] == ["access_events_p20261011"]
    assert (await writer.write([access_event(1, at=old_day)])).inserted == 1
    assert await db.fetchval("SELECT count(*) FROM access_events") == 1


async def test_an_empty_batch_writes_nothing(writer: StoreWriter, db: asyncpg.Connection) -> None:
    assert await writer.write([]) == WriteResult(inserted=0, duplicates=0, rejected=0)
    assert all(rows == [] for rows in (await snapshot(db)).values())


async def test_naive_times_are_taken_as_utc(writer: StoreWriter, db: asyncpg.Connection) -> None:
    naive = T0.replace(tzinfo=None)
    access = msgspec.structs.replace(access_event(1), time=naive)
    run = run_event("START", RUN, inputs=["a"], outputs=["b"], at=naive)
    assert (await writer.write([access, run])).inserted == 2
    assert await db.fetchval("SELECT time FROM access_events") == T0
    assert await db.fetchval("SELECT started_at FROM runs") == T0
    assert await db.fetchval("SELECT event_time FROM events_raw") == T0


async def test_events_from_a_clock_far_in_the_future_are_stored_at_the_latest_time(
    writer: StoreWriter, db: asyncpg.Connection
) -> None:
    # Derivation clamps a broken clock's time; the writer must store it, not stall on it.
    clamped = time_from_ns(2**80)
    access = msgspec.structs.replace(access_event(1), time=clamped)
    run = run_event("START", RUN, inputs=["a"], outputs=["b"], at=clamped)
    assert await writer.write([access, run]) == WriteResult(inserted=2, duplicates=0)
    assert await db.fetchval("SELECT time FROM access_events") == LATEST_EVENT_TIME
    assert await db.fetchval("SELECT event_time::text FROM events_raw") != "infinity"
    assert await db.fetchval("SELECT event_time FROM events_raw") == LATEST_EVENT_TIME
    assert await db.fetchval("SELECT count(*) FROM dead_letter") == 0
