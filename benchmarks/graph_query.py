"""Lineage store benchmark: depth-5 graph queries over a 100,000-edge graph, and writer
throughput, each against a baseline measured in the same run.

Run: `.venv/bin/python -m benchmarks.graph_query [--dsn DSN] [--quick]`
(default DSN: `$LS_PG_DSN`, else the test PostgreSQL on 127.0.0.1:55432).

The benchmark creates its own scratch database (`lineage_bench_<random>`) next to the DSN's
database, migrates it, and drops it at the end (`--keep` keeps it for a look).

**Graph.** A layered pipeline, the usual shape of lineage: `--layers` layers of datasets,
each dataset feeding `--fan-out` random datasets of the next layer; 5% of datasets also
feed one two layers down, and 0.5% feed one in an earlier layer (cycles, which real
lineage has: a report written back into a staging table). Rows are loaded with COPY, then
ANALYZE. Queries start from random datasets and ask for `direction=both`, `depth=5`,
`max_nodes=5000`: the heaviest request the API takes by default. The default shape
(fan-out 2) answers with about 90 nodes per query; `--fan-out 4 --width 1300` makes a
denser graph of the same size whose answers hold 1,500 nodes and more.

Measured, interleaved query by query on the same random roots:

* `cte`: `LineageQueries.lineage_graph`, the API's real call: dataset lookup, two
  recursive walks, names and edges of the result, in one read-only transaction;
* `cte-noindex`: the same call on a connection with index scans disabled
  (`enable_indexscan`, `enable_indexonlyscan`, `enable_bitmapscan` off), i.e. the same
  SQL without the store's indexes to walk on (fewer queries: it is slow);
* `naive-bfs`: breadth-first search in Python, one query per hop and direction
  (`WHERE source_id = ANY($frontier)`, indexes on), then names and edges: what one writes
  without a recursive query.

**Writer.** `StoreWriter.write` throughput in events/s for access events (batches of
`--batch`, spread over 3 days) and for run events (START + COMPLETE per run, two inputs,
one output, column lineage), each against a naive baseline: one `INSERT ... ON CONFLICT`
per access event (asyncpg `executemany`), in the same run.

The machine is shared: other processes compete for its 2 cores, so absolute figures vary
from run to run; the ratios within one run are the figures to read. The load average
before and after is printed. Writes `benchmarks/results/graph_query-<UTC time>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from agent.derive.routes import DatasetRef
from agent.events import (
    AccessEvent,
    ColumnLineageFacet,
    ColumnLineageField,
    DatasetFacets,
    InputDataset,
    InputField,
    Job,
    LineageEvent,
    OutputDataset,
    Run,
    RunEvent,
)
from agent.store.migrate import migrate
from agent.store.plan import identity_key
from agent.store.queries import LineageQueries
from agent.store.scratch import drop_scratch_database
from agent.store.writer import StoreWriter
from benchmarks._machine import loadavg

DEFAULT_DSN = "postgresql://lineage:lineage@127.0.0.1:55432/lineage"
NAMESPACE = "https://warehouse.internal:5432"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
NO_INDEX_SETTINGS = {
    "enable_indexscan": "off",
    "enable_indexonlyscan": "off",
    "enable_bitmapscan": "off",
}
T0 = datetime(2026, 11, 24, tzinfo=UTC)


@dataclass(frozen=True)
class GraphShape:
    layers: int
    width: int
    fan_out: int
    seed: int

    @property
    def datasets(self) -> int:
        return self.layers * self.width


def dataset_name(index: int, shape: GraphShape) -> str:
    return f"layer{index // shape.width:02d}.table{index % shape.width:05d}"


def build_edges(shape: GraphShape, target_edges: int) -> list[tuple[int, int]]:
    """Edges between dataset indexes (0-based), deduplicated, about `target_edges` of them."""
    rng = random.Random(shape.seed)  # noqa: S311 - a reproducible graph, not a secret
    edges: set[tuple[int, int]] = set()
    for layer in range(shape.layers - 1):
        for column in range(shape.width):
            source = layer * shape.width + column
            for _ in range(shape.fan_out):
                edges.add((source, (layer + 1) * shape.width + rng.randrange(shape.width)))
            if layer + 2 < shape.layers and rng.random() < 0.05:
                edges.add((source, (layer + 2) * shape.width + rng.randrange(shape.width)))
            if layer > 0 and rng.random() < 0.005:
                edges.add((source, rng.randrange(layer * shape.width)))
    ordered = sorted(edges)
    rng.shuffle(ordered)
    return ordered[:target_edges]


async def load_graph(dsn: str, shape: GraphShape, edges: list[tuple[int, int]]) -> None:
    """COPY the datasets and edges straight into the store's tables."""
    connection = await asyncpg.connect(dsn)
    try:
        job_id = await connection.fetchval(
            "INSERT INTO jobs (key, namespace, name, first_seen, last_seen)"
            " VALUES ($1, 'bench', 'loader', $2, $2) RETURNING id",
            identity_key("bench", "loader"),
            T0,
        )
        run_id = uuid.uuid4()
        await connection.execute(
            "INSERT INTO runs (run_id, job_id, state, state_rank, state_time, state_event_id)"
            " VALUES ($1, $2, 'COMPLETE', 3, $3, $1)",
            run_id,
            job_id,
            T0,
        )
        names = [dataset_name(i, shape) for i in range(shape.datasets)]
        await connection.copy_records_to_table(
            "datasets",
            records=[(identity_key(NAMESPACE, n), NAMESPACE, n, T0, T0) for n in names],
            columns=("key", "namespace", "name", "first_seen", "last_seen"),
        )
        ids = {
            row["name"]: row["id"]
            for row in await connection.fetch("SELECT id, name FROM datasets")
        }
        await connection.copy_records_to_table(
            "lineage_edges",
            records=[(ids[names[s]], ids[names[t]], T0, T0, 1, run_id) for s, t in edges],
            columns=(
                "source_id",
                "target_id",
                "first_seen",
                "last_seen",
                "run_count",
                "last_run_id",
            ),
        )
        await connection.execute("ANALYZE datasets; ANALYZE lineage_edges")
    finally:
        await connection.close()


async def naive_bfs(
    connection: asyncpg.Connection, node: DatasetRef, depth: int, max_nodes: int
) -> int:
    """Baseline: one query per hop and direction. Returns the number of nodes found."""
    root = await connection.fetchval(
        "SELECT id FROM datasets WHERE key = $1", identity_key(node.namespace, node.name)
    )
    found = {root}
    for this, other in (("source_id", "target_id"), ("target_id", "source_id")):
        seen, frontier = {root}, [root]
        for _ in range(depth):
            if not frontier or len(seen) > max_nodes:
                break
            rows = await connection.fetch(
                f"SELECT DISTINCT {other} FROM lineage_edges WHERE {this} = ANY($1::bigint[])",  # noqa: S608
                frontier,
            )
            frontier = [r[0] for r in rows if r[0] not in seen]
            seen.update(frontier)
        found |= seen
    kept = list(found)[:max_nodes]
    await connection.fetch("SELECT id, namespace, name FROM datasets WHERE id = ANY($1)", kept)
    await connection.fetch(
        "SELECT source_id, target_id FROM lineage_edges"
        " WHERE source_id = ANY($1) AND target_id = ANY($1)",
        kept,
    )
    return len(kept)


@dataclass
class Series:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return {"name": self.name, "queries": 0}
        return {
            "name": self.name,
            "queries": len(ordered),
            "p50_ms": round(percentile(ordered, 50), 2),
            "p99_ms": round(percentile(ordered, 99), 2),
            "max_ms": round(ordered[-1], 2),
            "mean_ms": round(statistics.fmean(ordered), 2),
            "nodes_p50": percentile(sorted(self.sizes), 50),
            "nodes_max": max(self.sizes),
        }


def percentile(ordered: list[float] | list[int], pct: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, round(pct / 100 * len(ordered) + 0.5) - 1 + 1)
    return float(ordered[min(len(ordered), rank) - 1])


async def timed(call: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    start = time.perf_counter()
    size = await call()
    return (time.perf_counter() - start) * 1000, size


async def measure_queries(
    dsn: str, shape: GraphShape, queries: int, noindex_queries: int, depth: int
) -> list[Series]:
    rng = random.Random(shape.seed + 1)  # noqa: S311 - reproducible query roots
    roots = [
        DatasetRef(NAMESPACE, dataset_name(rng.randrange(shape.datasets), shape))
        for _ in range(queries)
    ]
    indexed = await asyncpg.connect(dsn)
    plain = await asyncpg.connect(dsn, server_settings=NO_INDEX_SETTINGS)
    series = {name: Series(name) for name in ("cte", "cte-noindex", "naive-bfs")}
    try:
        api, api_noindex = LineageQueries(indexed), LineageQueries(plain)

        async def cte(store: LineageQueries, node: DatasetRef) -> int:
            graph = await store.lineage_graph(node, "both", depth=depth, max_nodes=5_000)
            assert graph is not None
            return len(graph.nodes)

        # Warm-up: plans and caches, not measured.
        for node in roots[:5]:
            await cte(api, node)
            await naive_bfs(indexed, node, depth, 5_000)
        for index, node in enumerate(roots):
            steps: list[tuple[str, Callable[[], Awaitable[int]]]] = [
                ("cte", lambda n=node: cte(api, n)),  # type: ignore[misc]
                ("naive-bfs", lambda n=node: naive_bfs(indexed, n, depth, 5_000)),  # type: ignore[misc]
            ]
            if index < noindex_queries:
                steps.append(("cte-noindex", lambda n=node: cte(api_noindex, n)))  # type: ignore[misc]
            # Rotate the order so a slow moment of the machine hits every method alike.
            rotation = index % len(steps)
            for name, call in steps[rotation:] + steps[:rotation]:
                latency, size = await timed(call)
                series[name].latencies_ms.append(latency)
                series[name].sizes.append(size)
    finally:
        await indexed.close()
        await plain.close()
    return list(series.values())


def access_batch(start: int, count: int) -> list[LineageEvent]:
    return [
        AccessEvent(
            event_id=uuid.uuid5(uuid.NAMESPACE_OID, f"bench-access-{i}"),
            time=T0 + timedelta(days=i % 3, milliseconds=i),
            principal=f"user{i % 50}@example.com",
            roles=("analyst", "sales-read"),
            dataset_namespace=NAMESPACE,
            dataset_name=f"sales.table{i % 200}",
            action="read",
            decision="allow",
            rule="p, analyst, dataset:sales.*, read",
            request_id=f"req-{i:012d}",
            status=200,
        )
        for i in range(start, start + count)
    ]


def run_batch(start: int, count: int) -> list[LineageEvent]:
    """count/2 runs, each a START and a COMPLETE."""
    events: list[LineageEvent] = []
    for i in range(start, start + count // 2):
        run_id = uuid.uuid5(uuid.NAMESPACE_OID, f"bench-run-{i}")
        inputs = (
            InputDataset(namespace=NAMESPACE, name=f"raw.table{i % 300}"),
            InputDataset(namespace=NAMESPACE, name=f"ref.table{i % 20}"),
        )
        lineage = ColumnLineageFacet(
            fields={
                "amount": ColumnLineageField(
                    input_fields=(InputField(NAMESPACE, f"raw.table{i % 300}", "amount"),)
                ),
                "region": ColumnLineageField(
                    input_fields=(InputField(NAMESPACE, f"ref.table{i % 20}", "region"),)
                ),
            }
        )
        output = OutputDataset(
            namespace=NAMESPACE,
            name=f"mart.table{i % 100}",
            facets=DatasetFacets(column_lineage=lineage),
        )
        job = Job(namespace="lineage-sidecar", name=f"job{i % 40}")
        at = T0 + timedelta(seconds=i)
        events.append(RunEvent("START", at, Run(run_id), job, inputs, (output,)))
        events.append(
            RunEvent("COMPLETE", at + timedelta(seconds=3), Run(run_id), job, inputs, (output,))
        )
    return events


async def measure_writer(
    dsn: str, make: Callable[[int, int], list[LineageEvent]], total: int, batch: int
) -> dict[str, Any]:
    writer = await StoreWriter.connect(dsn, max_connections=1)
    batches = [make(start, batch) for start in range(0, total, batch)]
    events = sum(len(b) for b in batches)
    try:
        start = time.perf_counter()
        inserted = 0
        for events_batch in batches:
            inserted += (await writer.write(events_batch)).inserted
        elapsed = time.perf_counter() - start
        # Redelivery of the first batch: the exactly-once path.
        start = time.perf_counter()
        again = await writer.write(batches[0])
        redelivery = time.perf_counter() - start
    finally:
        await writer.close()
    return {
        "events": events,
        "inserted": inserted,
        "batch": batch,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "redelivered_batch_events_per_s": round(len(batches[0]) / redelivery),
        "redelivered_duplicates": again.duplicates,
    }


async def measure_naive_access(dsn: str, total: int) -> dict[str, Any]:
    """Baseline: one INSERT ... ON CONFLICT per access event, dataset id looked up per row."""
    connection = await asyncpg.connect(dsn)
    events = [e for e in access_batch(10_000_000, total) if isinstance(e, AccessEvent)]
    try:
        await connection.execute(
            "SELECT ensure_access_partitions(ARRAY[$1::date, $2::date, $3::date])",
            *(T0.date() + timedelta(days=d) for d in range(3)),
        )
        start = time.perf_counter()
        async with connection.transaction():
            await connection.executemany(
                """
                WITH d AS (
                    INSERT INTO datasets (key, namespace, name, first_seen, last_seen)
                    VALUES ($11, $5, $6, $2, $2)
                    ON CONFLICT (key) DO UPDATE
                    SET last_seen = greatest(datasets.last_seen, excluded.last_seen)
                    RETURNING id
                )
                INSERT INTO access_events (event_id, time, principal, roles, dataset_id, action,
                                           decision, rule, request_id, status)
                SELECT $1, $2, $3, $4, d.id, $7, $8, $9, $10, $12 FROM d
                ON CONFLICT DO NOTHING
                """,
                [
                    (
                        e.event_id,
                        e.time,
                        e.principal,
                        list(e.roles),
                        e.dataset_namespace,
                        e.dataset_name,
                        e.action,
                        e.decision,
                        e.rule,
                        e.request_id,
                        identity_key(e.dataset_namespace, e.dataset_name),
                        e.status,
                    )
                    for e in events
                ],
            )
        elapsed = time.perf_counter() - start
    finally:
        await connection.close()
    return {"events": total, "seconds": round(elapsed, 3), "events_per_s": round(total / elapsed)}


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    database = f"lineage_bench_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(args.dsn)
    try:
        server_version = await admin.fetchval("SHOW server_version")
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    dsn = with_database(args.dsn, database)
    shape = GraphShape(layers=args.layers, width=args.width, fan_out=args.fan_out, seed=args.seed)
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "loadavg_at_start": loadavg(),
            "postgresql": server_version,
            "python": sys.version.split()[0],
            "asyncpg": asyncpg.__version__,
        },
    }
    try:
        await migrate(dsn)
        edges = build_edges(shape, args.edges)
        start = time.perf_counter()
        await load_graph(dsn, shape, edges)
        report["graph"] = {
            "datasets": shape.datasets,
            "edges": len(edges),
            "layers": shape.layers,
            "fan_out": shape.fan_out,
            "load_seconds": round(time.perf_counter() - start, 2),
        }
        print(f"graph: {shape.datasets} datasets, {len(edges)} edges", file=sys.stderr)
        series = await measure_queries(dsn, shape, args.queries, args.noindex_queries, args.depth)
        report["graph_queries"] = {
            "direction": "both",
            "depth": args.depth,
            "max_nodes": 5_000,
            "series": [s.summary() for s in series],
        }
        print("graph queries measured; writer next", file=sys.stderr)
        report["writer"] = {
            "access": await measure_writer(dsn, access_batch, args.access_events, args.batch),
            "access_naive_executemany": await measure_naive_access(dsn, args.naive_events),
            "run": await measure_writer(dsn, run_batch, args.run_events, args.run_batch),
        }
    finally:
        report["machine"]["loadavg_at_end"] = loadavg()
        if args.keep:
            print(f"kept database {database}", file=sys.stderr)
        else:
            admin = await asyncpg.connect(args.dsn)
            try:
                await drop_scratch_database(admin, database)
            finally:
                await admin.close()
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Graph: {report['graph']['datasets']} datasets, {report['graph']['edges']} edges; "
        f"queries direction=both depth={report['graph_queries']['depth']} max_nodes=5000",
        "",
        "| method | queries | p50 ms | p99 ms | max ms | nodes p50 | nodes max | p99 vs cte |",
        "|---|---|---|---|---|---|---|---|",
    ]
    series = report["graph_queries"]["series"]
    base = next(s for s in series if s["name"] == "cte")
    for s in series:
        if not s["queries"]:
            continue
        lines.append(
            f"| {s['name']} | {s['queries']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} "
            f"| {s['nodes_p50']:.0f} | {s['nodes_max']} | {s['p99_ms'] / base['p99_ms']:.1f}x |"
        )
    writer = report["writer"]
    access, naive, runs = writer["access"], writer["access_naive_executemany"], writer["run"]
    machine = report["machine"]
    lines += [
        "",
        "| writer | events | batch | events/s | redelivered batch events/s |",
        "|---|---|---|---|---|",
        f"| StoreWriter, access events | {access['events']} | {access['batch']} "
        f"| {access['events_per_s']} | {access['redelivered_batch_events_per_s']} |",
        f"| baseline: executemany INSERT per access event | {naive['events']} "
        f"| 1 | {naive['events_per_s']} | |",
        f"| StoreWriter, run events | {runs['events']} | {runs['batch']} "
        f"| {runs['events_per_s']} | {runs['redelivered_batch_events_per_s']} |",
        "",
        f"Load average: {machine['loadavg_at_start']} at start, {machine['loadavg_at_end']} "
        f"at end (shared {machine['nproc']}-core machine: compare within a run).",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.graph_query",
        description="Lineage store: graph query latency and writer throughput.",
    )
    parser.add_argument("--dsn", default=os.environ.get("LS_PG_DSN", DEFAULT_DSN))
    parser.add_argument("--edges", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--width", type=int, default=2_600)
    parser.add_argument("--fan-out", type=int, default=2)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--noindex-queries", type=int, default=40)
    parser.add_argument("--access-events", type=int, default=100_000)
    parser.add_argument("--naive-events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--run-events", type=int, default=20_000)
    parser.add_argument("--run-batch", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--quick", action="store_true", help="small graph and counts: a smoke test of seconds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.edges, args.layers, args.width = 2_000, 8, 150
        args.queries, args.noindex_queries = 20, 5
        args.access_events, args.naive_events, args.run_events = 2_000, 500, 400
        args.batch, args.run_batch = 500, 100
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    table = markdown(report)
    print(table)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"graph_query-{stamp}.json"
    path.write_text(json.dumps({**report, "markdown": table}, indent=2) + "\n", encoding="utf-8")
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
