"""Fixtures for the pipeline tests: a scratch store per module, a topic and keyring per test.

Each module gets its own database `lineage_agent_test_<random>` on the shared test
PostgreSQL, migrated once and dropped at the end; it is emptied before every test. Topics
and consumer groups are named uniquely per test, so nothing is shared with other suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from agent.keys import LocalKeyring
from agent.store.migrate import migrate
from tests.integration.agent.harness import empty_store, execute


@pytest.fixture(scope="module")
def agent_store_dsn(pg_dsn: str) -> Iterator[str]:
    """A migrated scratch database for one test module."""
    name = f"lineage_agent_test_{secrets.token_hex(6)}"
    asyncio.run(execute(pg_dsn, f'CREATE DATABASE "{name}"'))
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path="/" + name))
    try:
        asyncio.run(migrate(dsn))
        yield dsn
    finally:
        asyncio.run(execute(pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def store_dsn(agent_store_dsn: str) -> str:
    """The module's store, emptied for this test."""
    await empty_store(agent_store_dsn)
    return agent_store_dsn


@pytest.fixture
def marker() -> str:
    """A unique token in every name of a test's traffic (also its plaintext canary)."""
    return f"mk{secrets.token_hex(5)}"


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A topic name no one else uses; the topic (if the test made one) is deleted after."""
    name = f"lineage-test-{secrets.token_hex(6)}"
    yield name
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(KafkaError):
            await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring(tmp_path / "keys" / "keyring.json")
