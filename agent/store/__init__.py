"""The lineage store of record: PostgreSQL schema, batched idempotent writes, queries.

* `migrate` — versioned SQL migrations (`python -m agent.store.migrate --dsn DSN`); not
  imported here, so that `python -m` runs it cleanly.
* `plan` — pure: which rows a batch of events adds or changes, and which events cannot be
  stored at all (they go to the dead letter table).
* `writer` — `StoreWriter.write(events)`: one transaction per batch, exactly once by event id.
* `queries` — `LineageQueries`: lineage graph (bounded recursive walk), events, runs, access.
"""

from agent.store.queries import Graph, GraphEdge, GraphNode, LineageQueries
from agent.store.writer import StoreError, StoreWriter, WriteResult

__all__ = [
    "Graph",
    "GraphEdge",
    "GraphNode",
    "LineageQueries",
    "StoreError",
    "StoreWriter",
    "WriteResult",
]
