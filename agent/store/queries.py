"""Read side of the lineage store: what the lineage API asks of PostgreSQL.

Every query is parameterized and bounded (graph depth at most `MAX_DEPTH`, at most
`MAX_NODES` nodes, access rows at most `MAX_ACCESS_ROWS`); arguments out of range raise
`ValueError` with a message fit for a 400 response.

Permissions are NOT applied here. A `Graph` names every dataset it contains (namespace
and name) and its edges refer to nodes by the store's internal id; the caller filters:
the lineage API asks its authorization callable about every node and replaces each one
the caller may not read with an anonymous placeholder (keeping the edges, dropping the
name and the id), so a restricted dataset is never disclosed through the graph.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
import msgspec

from agent.derive.routes import DatasetRef
from agent.events import AccessEvent, RunEvent, with_sorted_columns
from agent.store.plan import identity_key

__all__ = [
    "MAX_ACCESS_ROWS",
    "MAX_DEPTH",
    "MAX_NODES",
    "AccessRecord",
    "Direction",
    "Graph",
    "GraphEdge",
    "GraphNode",
    "LineageQueries",
    "RunRecord",
]

MAX_DEPTH = 10
MAX_NODES = 5_000
MAX_ACCESS_ROWS = 10_000

Direction = Literal["up", "down", "both"]

# Breadth-first walk. Rows are (node, depth); UNION (not UNION ALL) drops a row already
# produced, and the depth bound stops the recursion, so cycles (A -> B -> A) terminate
# after at most `depth` rounds. PostgreSQL evaluates the working table round by round, so
# rows come out in depth order and the LIMIT keeps the nearest ones when a walk is huge.
_WALK = """
WITH RECURSIVE walk(node_id, depth) AS (
    SELECT $1::bigint, 0
  UNION
    SELECT e.{next}, w.depth + 1
    FROM walk w
    JOIN lineage_edges e ON e.{this} = w.node_id
    WHERE w.depth < $2
),
capped AS (SELECT node_id, depth FROM walk LIMIT $3)
SELECT node_id, min(depth) AS depth, (SELECT count(*) FROM capped) AS walked
FROM capped
GROUP BY node_id
ORDER BY depth, node_id
LIMIT $4
"""
_WALK_DOWN = _WALK.format(this="source_id", next="target_id")
_WALK_UP = _WALK.format(this="target_id", next="source_id")

# Every edge among the kept nodes. The source side is an index probe per node (or a scan
# when the planner finds that cheaper); the target side a hashed semi-join, not a linear
# `= ANY` per row.
_EDGES_AMONG = """
SELECT e.source_id, e.target_id, e.run_count, e.first_seen, e.last_seen, e.last_run_id
FROM lineage_edges e
WHERE e.source_id = ANY($1::bigint[])
  AND EXISTS (SELECT 1 FROM unnest($1::bigint[]) AS kept(id) WHERE kept.id = e.target_id)
ORDER BY e.source_id, e.target_id
"""

_DATASETS_BY_ID = "SELECT id, namespace, name FROM datasets WHERE id = ANY($1::bigint[])"
_DATASET_ID = "SELECT id FROM datasets WHERE key = $1"


class GraphNode(msgspec.Struct, frozen=True):
    """A dataset in a lineage graph. `id` is the store's internal id, which edges use;
    `depth` is the number of hops from the requested node (0 for that node)."""

    id: int
    namespace: str
    name: str
    depth: int


class GraphEdge(msgspec.Struct, frozen=True):
    """`source` feeds `target` (node ids); seen in `run_count` distinct runs."""

    source: int
    target: int
    run_count: int
    first_seen: datetime
    last_seen: datetime
    last_run_id: uuid.UUID


class Graph(msgspec.Struct, frozen=True):
    """The nodes within the requested depth, nearest first, and every edge among them.

    `truncated` is True when more nodes were within reach than `max_nodes` allowed; the
    nodes kept are then the nearest ones.
    """

    root: int
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]
    truncated: bool


class AccessRecord(msgspec.Struct, frozen=True):
    event_id: uuid.UUID
    time: datetime
    principal: str | None
    roles: tuple[str, ...]
    action: str
    decision: str
    rule: str | None
    request_id: str
    status: int


class RunRecord(msgspec.Struct, frozen=True):
    run_id: uuid.UUID
    job_namespace: str
    job_name: str
    state: str
    state_time: datetime
    started_at: datetime | None
    ended_at: datetime | None
    facets: dict[str, Any]
    inputs: tuple[DatasetRef, ...]
    outputs: tuple[DatasetRef, ...]


@dataclass(frozen=True)
class _Walked:
    depths: dict[int, int]
    truncated: bool


def check_graph_bounds(direction: str, depth: int, max_nodes: int) -> None:
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction must be up, down or both, not {direction!r}")
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be between 0 and {MAX_DEPTH}, not {depth}")
    if not 1 <= max_nodes <= MAX_NODES:
        raise ValueError(f"max_nodes must be between 1 and {MAX_NODES}, not {max_nodes}")


class LineageQueries:
    """The store's read queries over a connection pool (or a single connection)."""

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection) -> None:
        self._pool = pool

    async def dataset_id(self, dataset: DatasetRef) -> int | None:
        found: int | None = await self._pool.fetchval(
            _DATASET_ID, identity_key(dataset.namespace, dataset.name)
        )
        return found

    async def lineage_graph(
        self,
        node: DatasetRef,
        direction: Direction = "both",
        depth: int = 3,
        max_nodes: int = 1_000,
    ) -> Graph | None:
        """The lineage around `node`; None when the store has never seen that dataset.

        `up` follows edges towards sources (what feeds the node), `down` towards targets
        (what the node feeds), `both` does both walks and merges them (depth is the
        shorter of the two distances). Nodes reached only by going up then down (siblings)
        are not included, as in Marquez.
        """
        check_graph_bounds(direction, depth, max_nodes)
        async with (
            _connection(self._pool) as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            root = await connection.fetchval(_DATASET_ID, identity_key(node.namespace, node.name))
            if root is None:
                return None
            walks = []
            if direction in ("down", "both"):
                walks.append(await _walk(connection, _WALK_DOWN, root, depth, max_nodes))
            if direction in ("up", "both"):
                walks.append(await _walk(connection, _WALK_UP, root, depth, max_nodes))
            depths: dict[int, int] = {}
            for walk in walks:
                for node_id, distance in walk.depths.items():
                    depths[node_id] = min(distance, depths.get(node_id, distance))
            truncated = any(w.truncated for w in walks) or len(depths) > max_nodes
            kept = sorted(depths, key=lambda n: (depths[n], n))[:max_nodes]
            names = {
                row["id"]: (row["namespace"], row["name"])
                for row in await connection.fetch(_DATASETS_BY_ID, kept)
            }
            edges = await connection.fetch(_EDGES_AMONG, kept)
        return Graph(
            root=root,
            nodes=tuple(
                GraphNode(id=n, namespace=names[n][0], name=names[n][1], depth=depths[n])
                for n in kept
            ),
            edges=tuple(
                GraphEdge(
                    source=e["source_id"],
                    target=e["target_id"],
                    run_count=e["run_count"],
                    first_seen=e["first_seen"],
                    last_seen=e["last_seen"],
                    last_run_id=e["last_run_id"],
                )
                for e in edges
            ),
            truncated=truncated,
        )

    async def get_event(self, event_id: uuid.UUID) -> RunEvent | AccessEvent | None:
        """A stored event as it was written: run events from `events_raw`, access events
        rebuilt from `access_events` (None once retention dropped their day)."""
        async with _connection(self._pool) as connection:
            payload = await connection.fetchval(
                "SELECT payload::text FROM events_raw WHERE event_id = $1", event_id
            )
            if payload is not None:
                return with_sorted_columns(msgspec.json.decode(payload, type=RunEvent))
            row = await connection.fetchrow(
                """
                SELECT a.*, d.namespace, d.name
                FROM access_events a JOIN datasets d ON d.id = a.dataset_id
                WHERE a.event_id = $1
                LIMIT 1
                """,
                event_id,
            )
        if row is None:
            return None
        return msgspec.convert(
            {
                "event_id": row["event_id"],
                "time": row["time"],
                "principal": row["principal"],
                "roles": tuple(row["roles"]),
                "dataset_namespace": row["namespace"],
                "dataset_name": row["name"],
                "action": row["action"],
                "decision": row["decision"],
                "rule": row["rule"],
                "request_id": row["request_id"],
                "status": row["status"],
            },
            type=AccessEvent,
        )

    async def dataset_access(
        self,
        dataset: DatasetRef,
        since: datetime,
        limit: int = 100,
        until: datetime | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[AccessRecord]:
        """Access events for one dataset at or after `since` (and before `until`), oldest
        first, ordered by (time, event_id); page on by passing the last row's
        `(time, event_id)` as `after`, which continues right after it even when many
        events share that time."""
        if not 1 <= limit <= MAX_ACCESS_ROWS:
            raise ValueError(f"limit must be between 1 and {MAX_ACCESS_ROWS}, not {limit}")
        if (
            since.tzinfo is None
            or (until is not None and until.tzinfo is None)
            or (after is not None and after[0].tzinfo is None)
        ):
            raise ValueError("since, until and after must carry a time zone")
        rows = await self._pool.fetch(
            """
            SELECT a.event_id, a.time, a.principal, a.roles, a.action, a.decision, a.rule,
                   a.request_id, a.status
            FROM access_events a
            WHERE a.dataset_id = (SELECT id FROM datasets WHERE key = $1)
              AND a.time >= $2 AND ($3::timestamptz IS NULL OR a.time < $3)
              AND ($5::timestamptz IS NULL OR (a.time, a.event_id) > ($5, $6::uuid))
            ORDER BY a.time, a.event_id
            LIMIT $4
            """,
            identity_key(dataset.namespace, dataset.name),
            since,
            until,
            limit,
            None if after is None else after[0],
            None if after is None else after[1],
        )
        return [
            AccessRecord(
                event_id=r["event_id"],
                time=r["time"],
                principal=r["principal"],
                roles=tuple(r["roles"]),
                action=r["action"],
                decision=r["decision"],
                rule=r["rule"],
                request_id=r["request_id"],
                status=r["status"],
            )
            for r in rows
        ]

    async def run(self, run_id: uuid.UUID) -> RunRecord | None:
        """A run's current state, job, inputs and outputs; None when unknown."""
        async with (
            _connection(self._pool) as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await connection.fetchrow(
                """
                SELECT r.run_id, j.namespace, j.name, r.state, r.state_time, r.started_at,
                       r.ended_at, r.facets::text AS facets
                FROM runs r JOIN jobs j ON j.id = r.job_id
                WHERE r.run_id = $1
                """,
                run_id,
            )
            if row is None:
                return None
            datasets = await connection.fetch(
                """
                SELECT rd.direction, d.namespace, d.name
                FROM run_datasets rd JOIN datasets d ON d.id = rd.dataset_id
                WHERE rd.run_id = $1
                ORDER BY d.namespace, d.name
                """,
                run_id,
            )
        return RunRecord(
            run_id=row["run_id"],
            job_namespace=row["namespace"],
            job_name=row["name"],
            state=row["state"],
            state_time=row["state_time"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            facets=msgspec.json.decode(row["facets"]),
            inputs=tuple(
                DatasetRef(d["namespace"], d["name"]) for d in datasets if d["direction"] == "input"
            ),
            outputs=tuple(
                DatasetRef(d["namespace"], d["name"])
                for d in datasets
                if d["direction"] == "output"
            ),
        )


async def _walk(
    connection: asyncpg.Connection, sql: str, root: int, depth: int, max_nodes: int
) -> _Walked:
    # Each node can appear once per depth, and only the root at depth 0, so a walk over at
    # most max_nodes nodes has at most 1 + max_nodes * depth rows: reaching this cap proves
    # more nodes were within reach, and the result is marked truncated. (A cap of
    # max_nodes * (depth + 1) was reached by one node that feeds itself, max_nodes 1.)
    row_cap = max_nodes * depth + 2
    rows = await connection.fetch(sql, root, depth, row_cap, max_nodes + 1)
    depths = {row["node_id"]: row["depth"] for row in rows[:max_nodes]}
    walked = rows[0]["walked"] if rows else 0
    return _Walked(depths, truncated=len(rows) > max_nodes or walked >= row_cap)


@asynccontextmanager
async def _connection(source: Any) -> AsyncIterator[Any]:
    """A connection from a pool for the duration of a block, or the connection itself."""
    if isinstance(source, asyncpg.Pool):
        async with source.acquire() as connection:
            yield connection
    else:
        yield source
