"""A real lineage API over a real PostgreSQL: one scratch database per test module.

The database is named `lineage_api_test_<random>`, migrated once per module and dropped at
the end; each test starts from empty tables. The API is served by a real aiohttp server
on an ephemeral loopback port, with an in-test authorizer: a set of grants.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.api import SERVER_SETTINGS, Caller, lineage_api
from agent.store.migrate import migrate
from agent.store.queries import LineageQueries
from agent.store.writer import StoreWriter

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


async def _admin(admin_dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def api_store_dsn(pg_dsn: str) -> Iterator[str]:
    """A migrated scratch database for one test module."""
    name = f"lineage_api_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(pg_dsn, f'CREATE DATABASE "{name}"'))
    try:
        dsn = urlunsplit(urlsplit(pg_dsn)._replace(path="/" + name))
        asyncio.run(migrate(dsn))
        yield dsn
    finally:
        asyncio.run(_admin(pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Grants:
    """The in-test authorizer: (principal, resource, action) triples that are allowed.

    Counts its calls, so tests can see that a graph is decided in one batch.
    """

    allowed_triples: set[tuple[str, str, str]] = field(default_factory=set)
    batches: int = 0

    def grant(self, principal: str, action: str, *resources: str) -> None:
        self.allowed_triples.update((principal, r, action) for r in resources)

    def allowed(self, caller: Caller, resource: str, action: str) -> bool:
        return (caller.id, resource, action) in self.allowed_triples

    def allowed_many(self, caller: Caller, resources: Sequence[str], action: str) -> list[bool]:
        self.batches += 1
        return [self.allowed(caller, r, action) for r in resources]


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    writer: StoreWriter
    grants: Grants
    connection: asyncpg.Connection

    def as_user(self, principal: str, *roles: str) -> dict[str, str]:
        headers = {"X-Auth-Request-User": principal}
        if roles:
            headers["X-Auth-Request-Roles"] = ",".join(quote(r, safe="") for r in roles)
        return headers


async def empty_store(connection: asyncpg.Connection) -> None:
    await connection.execute(f"TRUNCATE {', '.join(STORE_TABLES)} RESTART IDENTITY CASCADE")


@pytest.fixture
async def api(api_store_dsn: str) -> AsyncIterator[Api]:
    """The lineage API on an empty store, served on a real loopback socket."""
    connection = await asyncpg.connect(api_store_dsn)
    await empty_store(connection)
    pool = await asyncpg.create_pool(api_store_dsn, min_size=1, max_size=3)
    writer = StoreWriter(pool)
    grants = Grants()
    app = lineage_api(LineageQueries(pool), writer, grants, max_graph_nodes=200)
    server = TestServer(app)
    await server.start_server(**SERVER_SETTINGS)
    client: TestClient[web.Request, web.Application] = TestClient(server)
    await client.start_server()
    try:
        yield Api(client=client, writer=writer, grants=grants, connection=connection)
    finally:
        await client.close()
        await pool.close()
        await connection.close()
