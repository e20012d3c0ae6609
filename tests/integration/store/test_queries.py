"""Lineage API queries against the real PostgreSQL: graph walks, events, runs, access."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import msgspec
import pytest

from agent.derive.routes import DatasetRef
from agent.events import RunEvent
from agent.store.queries import Graph, LineageQueries
from agent.store.writer import StoreWriter
from tests.integration.store.factories import NS, T0, access_event, edge_run, run_event


def ref(name: str) -> DatasetRef:
    return DatasetRef(namespace=NS, name=name)


def names(graph: Graph | None) -> dict[str, int]:
    """Node name -> depth."""
    assert graph is not None
    return {node.name: node.depth for node in graph.nodes}


def edge_names(graph: Graph | None) -> set[tuple[str, str]]:
    assert graph is not None
    by_id = {node.id: node.name for node in graph.nodes}
    assert all(e.source in by_id and e.target in by_id for e in graph.edges)
    return {(by_id[e.source], by_id[e.target]) for e in graph.edges}


async def write_edges(writer: StoreWriter, edges: list[tuple[str, str]]) -> None:
    await writer.write(
        [edge_run(uuid.uuid5(uuid.NAMESPACE_OID, f"{s}->{t}"), [s], [t]) for s, t in edges]
    )


# raw -> clean -> report -> dashboard, and clean -> audit; lookup -> report.
PIPELINE = [
    ("raw", "clean"),
    ("clean", "report"),
    ("report", "dashboard"),
    ("clean", "audit"),
    ("lookup", "report"),
]


async def test_downstream_upstream_and_both_with_depth_limits(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    await write_edges(writer, PIPELINE)
    down = await queries.lineage_graph(ref("clean"), "down", depth=1)
    assert names(down) == {"clean": 0, "report": 1, "audit": 1}
    assert edge_names(down) == {("clean", "report"), ("clean", "audit")}
    assert down is not None
    assert not down.truncated

    down2 = await queries.lineage_graph(ref("clean"), "down", depth=2)
    assert names(down2) == {"clean": 0, "report": 1, "audit": 1, "dashboard": 2}

    up = await queries.lineage_graph(ref("report"), "up", depth=5)
    assert names(up) == {"report": 0, "clean": 1, "lookup": 1, "raw": 2}
    assert edge_names(up) == {("raw", "clean"), ("clean", "report"), ("lookup", "report")}

    both = await queries.lineage_graph(ref("report"), "both", depth=1)
    # lookup's sibling relation to clean does not pull in raw or audit at depth 1.
    assert names(both) == {"report": 0, "clean": 1, "lookup": 1, "dashboard": 1}

    only_root = await queries.lineage_graph(ref("report"), "both", depth=0)
    assert names(only_root) == {"report": 0}
    assert edge_names(only_root) == set()


async def test_cycles_terminate(writer: StoreWriter, queries: LineageQueries) -> None:
    await write_edges(writer, [("a", "b"), ("b", "a"), ("b", "c"), ("c", "c")])
    graph = await queries.lineage_graph(ref("a"), "both", depth=10)
    assert names(graph) == {"a": 0, "b": 1, "c": 2}
    assert edge_names(graph) == {("a", "b"), ("b", "a"), ("b", "c"), ("c", "c")}
    assert graph is not None
    assert not graph.truncated


async def test_max_nodes_keeps_the_nearest_and_says_truncated(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    fan = [("hub", f"leaf{i:02d}") for i in range(30)] + [("leaf00", "far")]
    await write_edges(writer, fan)
    graph = await queries.lineage_graph(ref("hub"), "down", depth=2, max_nodes=10)
    assert graph is not None
    assert graph.truncated
    assert len(graph.nodes) == 10
    assert graph.nodes[0].name == "hub"
    assert "far" not in names(graph)
    exact = await queries.lineage_graph(ref("hub"), "down", depth=2, max_nodes=32)
    assert exact is not None
    assert not exact.truncated
    assert len(exact.nodes) == 32


async def test_a_dataset_that_feeds_itself_is_not_called_truncated(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    # A job that reads and rewrites one table: the walk meets that node at every depth,
    # which must not pass for more nodes than the budget holds.
    await write_edges(writer, [("ledger", "ledger")])
    for direction in ("down", "up", "both"):
        graph = await queries.lineage_graph(ref("ledger"), direction, depth=3, max_nodes=1)
        assert names(graph) == {"ledger": 0}
        assert graph is not None
        assert not graph.truncated, direction
    await write_edges(writer, [("ledger", "report")])
    cut = await queries.lineage_graph(ref("ledger"), "down", depth=3, max_nodes=1)
    assert names(cut) == {"ledger": 0}
    assert cut is not None
    assert cut.truncated


async def test_a_long_chain_is_cut_at_the_depth(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    await write_edges(writer, [(f"n{i}", f"n{i + 1}") for i in range(15)])
    graph = await queries.lineage_graph(ref("n0"), "down", depth=10)
    assert names(graph) == {f"n{i}": i for i in range(11)}


async def test_unknown_dataset_has_no_graph(queries: LineageQueries) -> None:
    assert await queries.lineage_graph(ref("nowhere"), "both") is None


@pytest.mark.parametrize(
    ("direction", "depth", "max_nodes", "message"),
    [
        ("sideways", 1, 10, "direction"),
        ("up", 11, 10, "depth"),
        ("up", -1, 10, "depth"),
        ("up", 1, 0, "max_nodes"),
        ("up", 1, 5001, "max_nodes"),
    ],
)
async def test_out_of_bounds_graph_requests_are_refused(
    queries: LineageQueries, direction: str, depth: int, max_nodes: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await queries.lineage_graph(ref("a"), direction, depth, max_nodes)  # type: ignore[arg-type]


async def test_hostile_names_are_found_as_given(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    hostile = "x'); DROP TABLE lineage_edges; --" + "é" * 5000
    await write_edges(writer, [(hostile, "safe")])
    graph = await queries.lineage_graph(ref("safe"), "up", depth=1)
    assert names(graph) == {"safe": 0, hostile: 1}


async def test_get_event_returns_run_and_access_events_as_written(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    run = run_event(
        "COMPLETE",
        uuid.uuid4(),
        inputs=["a"],
        outputs=["b"],
        columns={"b": {"total": [("a", "amount")]}},
    )
    access = access_event(1, roles=("analyst", "sales-read"))
    await writer.write([run, access])
    assert await queries.get_event(run.event_id) == run
    assert await queries.get_event(access.event_id) == access
    assert await queries.get_event(uuid.uuid4()) is None


async def test_a_run_event_read_back_is_the_event_it_is_stored_as(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    # jsonb keeps object keys in an order of its own (shorter first): the columns of a
    # columnLineage facet must come back as written, or the event read back has another
    # id than its own, and writing it again (a replay, a copy to another store) doubles it.
    run = run_event(
        "COMPLETE",
        uuid.uuid4(),
        inputs=["a"],
        outputs=["b"],
        columns={"b": {"amount": [("a", "amt")], "id": [("a", "id")]}},
    )
    await writer.write([run])
    read = await queries.get_event(run.event_id)
    assert isinstance(read, RunEvent)
    assert read.event_id == run.event_id
    assert msgspec.json.encode(read) == msgspec.json.encode(run)
    again = await writer.write([read])
    assert (again.inserted, again.duplicates) == (0, 1)


async def test_run_returns_state_job_and_datasets(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    run_id = uuid.uuid4()
    await writer.write(
        [
            run_event(
                "COMPLETE", run_id, inputs=["b", "a"], outputs=["c"], at=T0 + timedelta(minutes=1)
            ),
            run_event("START", run_id, inputs=["a"], outputs=["c"]),
        ]
    )
    record = await queries.run(run_id)
    assert record is not None
    assert (record.state, record.started_at, record.ended_at) == (
        "COMPLETE",
        T0,
        T0 + timedelta(minutes=1),
    )
    assert (record.job_namespace, record.job_name) == ("lineage-sidecar", "nightly-etl")
    assert record.inputs == (ref("a"), ref("b"))
    assert record.outputs == (ref("c"),)
    assert await queries.run(uuid.uuid4()) is None


async def test_dataset_access_pages_by_time(
    writer: StoreWriter, queries: LineageQueries, db: asyncpg.Connection
) -> None:
    events = [access_event(i, at=T0 + timedelta(hours=i)) for i in range(6)]
    await writer.write([*events, access_event(1, dataset="other")])
    page = await queries.dataset_access(ref("sales.orders"), since=T0 + timedelta(hours=1), limit=3)
    assert [a.event_id for a in page] == [e.event_id for e in events[1:4]]
    assert page[0].roles == ("analyst",)
    rest = await queries.dataset_access(
        ref("sales.orders"), since=page[-1].time + timedelta(microseconds=1), limit=100
    )
    assert [a.event_id for a in rest] == [e.event_id for e in events[4:]]
    bounded = await queries.dataset_access(
        ref("sales.orders"), since=T0, until=T0 + timedelta(hours=2), limit=100
    )
    assert len(bounded) == 2
    assert await queries.dataset_access(ref("unknown"), since=T0) == []


async def test_dataset_access_pages_after_a_position_within_one_instant(
    writer: StoreWriter, queries: LineageQueries
) -> None:
    events = [msgspec.structs.replace(access_event(i), time=T0) for i in range(5)]
    await writer.write(events)
    listed: list[uuid.UUID] = []
    after = None
    for _ in range(3):
        page = await queries.dataset_access(ref("sales.orders"), since=T0, limit=2, after=after)
        listed.extend(a.event_id for a in page)
        after = (page[-1].time, page[-1].event_id)
    assert sorted(listed) == sorted(e.event_id for e in events)
    assert len(listed) == 5
    assert await queries.dataset_access(ref("sales.orders"), since=T0, after=after) == []


@pytest.mark.parametrize("limit", [0, 10_001])
async def test_dataset_access_limit_is_bounded(queries: LineageQueries, limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        await queries.dataset_access(ref("a"), since=T0, limit=limit)


async def test_dataset_access_needs_an_aware_time(queries: LineageQueries) -> None:
    with pytest.raises(ValueError, match="time zone"):
        await queries.dataset_access(ref("a"), since=T0.replace(tzinfo=None))


@pytest.mark.parametrize("name", ["nul\x00name", "\udcff", "x" * 100_000])
async def test_lookups_by_unstorable_names_find_nothing(
    writer: StoreWriter, queries: LineageQueries, name: str
) -> None:
    await write_edges(writer, [("a", "b")])
    assert await queries.lineage_graph(ref(name), "both") is None
    assert await queries.dataset_access(ref(name), since=T0) == []
    assert await queries.dataset_id(ref(name)) is None
