"""Each test module gets its own scratch database on the shared test PostgreSQL.

The database is named `lineage_test_<random>`, migrated once per module, emptied before
every test and dropped at the end; the shared `lineage` database is never touched.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from agent.store.migrate import migrate
from agent.store.queries import LineageQueries
from agent.store.scratch import drop_scratch_database
from agent.store.writer import StoreWriter

# Every table the writer fills, in an order TRUNCATE accepts with CASCADE anyway.
STORE_TABLES = (
    "lineage_edge_runs",
    "lineage_edges",
    "column_edges",
    "run_datasets",
    "runs",
    "jobs",
    "access_events",
    "datasets",
    "events_raw",
    "dead_letter",
)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def _create_database(admin_dsn: str, name: str) -> None:
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    connection = await asyncpg.connect(admin_dsn)
    try:
        await drop_scratch_database(connection, name)
    finally:
        await connection.close()


def scratch_database(admin_dsn: str) -> tuple[str, str]:
    """Create an empty uniquely named database; returns (name, DSN)."""
    name = f"lineage_test_{secrets.token_hex(6)}"
    asyncio.run(_create_database(admin_dsn, name))
    return name, with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    asyncio.run(_drop_database(admin_dsn, name))


@pytest.fixture
def empty_dsn(pg_dsn: str) -> Iterator[str]:
    """A fresh database with no schema at all, for migration tests."""
    name, dsn = scratch_database(pg_dsn)
    try:
        yield dsn
    finally:
        drop_database(pg_dsn, name)


@pytest.fixture(scope="module")
def store_dsn(pg_dsn: str) -> Iterator[str]:
    """A migrated scratch database shared by one test module."""
    name, dsn = scratch_database(pg_dsn)
    try:
        asyncio.run(migrate(dsn))
        yield dsn
    finally:
        drop_database(pg_dsn, name)


async def empty_store(connection: asyncpg.Connection) -> None:
    await connection.execute(f"TRUNCATE {', '.join(STORE_TABLES)} RESTART IDENTITY CASCADE")
    partitions = await connection.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'access_events'::regclass"
    )
    for row in partitions:
        await connection.execute(f'DROP TABLE "{row[0]}"')


@pytest.fixture
async def db(store_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's store, emptied first."""
    connection = await asyncpg.connect(store_dsn)
    try:
        await empty_store(connection)
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def writer(store_dsn: str, db: asyncpg.Connection) -> AsyncIterator[StoreWriter]:
    store_writer = await StoreWriter.connect(store_dsn, max_connections=3)
    try:
        yield store_writer
    finally:
        await store_writer.close()


@pytest.fixture
async def queries(db: asyncpg.Connection) -> LineageQueries:
    return LineageQueries(db)
