"""What one captured request says about datasets: reads, writes, column edges, access.

Naming follows OpenLineage's rule for datasets (namespace = the datasource as
`scheme://authority`, name = the dataset's path within it): the namespace is the data
service behind the proxy (`CaptureRecord.service`, e.g. `https://sales-db.internal:8001`)
and the name is the route's resource without its `dataset:` prefix (`sales.orders`).

Tables named in the request's SQL live in the same namespace. An unqualified table takes
the route's dataset (or, for a resource `database:<db>`, that database) as its database
(`/sales.json` with resource `database:sales` and `SELECT * FROM orders` reads
`sales.orders`); a qualified one is taken as written, except SQLite's `main.orders`, which
is that same database's `orders`.

Only requests the upstream actually served contribute lineage: decided `allow` (or not
subject to a decision) and answered without a 4xx. Every request that names a dataset,
denied ones included, yields access facts: that is what an auditor asks about.
"""

from __future__ import annotations

import msgspec

from agent.capture import CaptureRecord
from agent.derive.sql import DEFAULT_MAX_SQL_BYTES, SqlLineage, TableName, tables_and_columns
from agent.events import AccessEvent, access_event_id, time_from_ns

DATASET_PREFIX = "dataset:"
# A route whose resource names a whole database (`database:sales`, e.g. a SQL endpoint)
# is no dataset itself, but it is the database of the unqualified tables in its SQL.
DATABASE_PREFIX = "database:"
READ_ACTIONS = frozenset({"read", "select", "get", "list", "query"})
WRITE_ACTIONS = frozenset({"write", "insert", "update", "delete", "create", "append", "upsert"})


class DatasetRef(msgspec.Struct, frozen=True, order=True):
    namespace: str
    name: str


class ColumnLink(msgspec.Struct, frozen=True, order=True):
    """`output.output_column` is computed from `input.input_column`."""

    output: DatasetRef
    output_column: str
    input: DatasetRef
    input_column: str


class DatasetAccess(msgspec.Struct, frozen=True, order=True):
    dataset: DatasetRef
    action: str


class RequestLineage(msgspec.Struct, frozen=True):
    """The lineage facts of one request, empty when the upstream did not serve it."""

    reads: tuple[DatasetRef, ...] = ()
    writes: tuple[DatasetRef, ...] = ()
    columns: tuple[ColumnLink, ...] = ()
    # Why the request's SQL gave no (or only partial) lineage; recorded, never dropped.
    sql_problems: tuple[str, ...] = ()
    # Every dataset the request asked for, with the action, whether served or not.
    accesses: tuple[DatasetAccess, ...] = ()

    @property
    def has_lineage(self) -> bool:
        return bool(self.reads or self.writes or self.sql_problems)


def route_dataset(record: CaptureRecord) -> DatasetRef | None:
    """The dataset the route's resource names, if it names one."""
    resource = record.resource
    if resource is None or not resource.startswith(DATASET_PREFIX):
        return None
    name = resource[len(DATASET_PREFIX) :]
    return DatasetRef(namespace=record.service, name=name) if name else None


def served(record: CaptureRecord) -> bool:
    """Whether the upstream did the work: allowed through, and not refused by it."""
    return record.decision in ("allow", "none") and not 400 <= record.status < 500


# Refused before anyone was identified: no credentials, bad credentials, a malformed request.
_UNVOUCHED = frozenset({"unauthenticated", "error"})


def request_lineage(
    record: CaptureRecord, *, max_sql_bytes: int = DEFAULT_MAX_SQL_BYTES
) -> RequestLineage:
    """Lineage facts of one (already redacted) capture record."""
    route = route_dataset(record)
    action = (record.action or "unknown").lower()
    accesses: set[DatasetAccess] = set()
    if route is not None:
        accesses.add(DatasetAccess(dataset=route, action=action))

    # SQL from a caller nobody vouched for is not analysed: parsing costs the agent about
    # 15 us per byte, so an anonymous client could keep it busy with refused requests
    # (8 KiB of query string, 120 ms each). A denied caller is known and audited, and
    # which tables it tried to reach is what an access review asks.
    sql_result = (
        None
        if record.sql is None or record.decision in _UNVOUCHED
        else tables_and_columns(record.sql, record.sql_dialect, max_bytes=max_sql_bytes)
    )
    if isinstance(sql_result, SqlLineage):
        reads, writes, columns = _sql_facts(
            record.service, _sql_database(record), sql_result, record.sql_dialect
        )
        accesses.update(DatasetAccess(dataset=d, action="read") for d in reads)
        accesses.update(DatasetAccess(dataset=d, action="write") for d in writes)
        problems = sql_result.skipped
    else:
        # No SQL, or SQL we could not read: the route's own read or write is what we know.
        reads = {route} if route is not None and action in READ_ACTIONS else set()
        writes = {route} if route is not None and action in WRITE_ACTIONS else set()
        columns = set()
        problems = () if sql_result is None else (sql_result.reason,)

    ordered_accesses = tuple(sorted(accesses))
    if not served(record):
        return RequestLineage(accesses=ordered_accesses)
    return RequestLineage(
        reads=tuple(sorted(reads)),
        writes=tuple(sorted(writes)),
        columns=tuple(sorted(columns)),
        sql_problems=problems,
        accesses=ordered_accesses,
    )


def _sql_database(record: CaptureRecord) -> str | None:
    """The database unqualified SQL tables belong to: the route's dataset or database."""
    resource = record.resource or ""
    for prefix in (DATASET_PREFIX, DATABASE_PREFIX):
        if resource.startswith(prefix) and len(resource) > len(prefix):
            return resource[len(prefix) :]
    return None


def _sql_facts(
    service: str, database: str | None, sql: SqlLineage, dialect: str | None
) -> tuple[set[DatasetRef], set[DatasetRef], set[ColumnLink]]:
    def dataset(table: TableName) -> DatasetRef:
        parts = table.parts
        if dialect == "sqlite" and len(parts) == 2 and parts[0] == "main":
            # SQLite's `main` is the database the statement runs in: main.orders is orders.
            parts = parts[1:]
        if len(parts) == 1 and database is not None:
            return DatasetRef(namespace=service, name=f"{database}.{parts[0]}")
        return DatasetRef(namespace=service, name=".".join(parts))

    reads = {dataset(t) for t in sql.inputs}
    writes = {dataset(t) for t in sql.outputs}
    columns = {
        ColumnLink(
            output=dataset(edge.output_table),
            output_column=edge.output_column,
            input=dataset(edge.input_table),
            input_column=edge.input_column,
        )
        for edge in sql.columns
    }
    return reads, writes, columns


def access_events(record: CaptureRecord, lineage: RequestLineage) -> list[AccessEvent]:
    """One access event per dataset the request named, whatever was decided."""
    time = time_from_ns(record.time_ns)
    return [
        AccessEvent(
            event_id=access_event_id(
                record.service,
                record.request_id,
                access.dataset.namespace,
                access.dataset.name,
                access.action,
            ),
            time=time,
            principal=record.principal,
            roles=record.roles,
            dataset_namespace=access.dataset.namespace,
            dataset_name=access.dataset.name,
            action=access.action,
            decision=record.decision,
            rule=record.rule,
            request_id=record.request_id,
            status=record.status,
        )
        for access in lineage.accesses
    ]
