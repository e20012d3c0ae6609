"""The real services from scripts/services do what the product relies on them for.

PostgreSQL answers the ``lineage`` role over scram, Redis keeps and returns values, and Kafka
takes an idempotent ``acks=all`` compressed batch and hands it to a consumer group whose
manual commit is honoured by the next member. If one of these fails, every integration test
above it would fail for an unrelated-looking reason; this file names the real one.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

pytestmark = pytest.mark.services

ROUND_TRIP_TIMEOUT_S = 60.0


async def test_postgres_serves_the_lineage_role(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        major = conn.get_server_version().major
        await conn.execute("CREATE TEMP TABLE probe (dataset text PRIMARY KEY, reads int)")
        await conn.execute("INSERT INTO probe VALUES ($1, $2)", "sales.orders", 3)
        reads = await conn.fetchval("SELECT reads FROM probe WHERE dataset = $1", "sales.orders")
        user = await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
    assert major >= 15
    assert reads == 3
    assert user == "lineage"


async def test_redis_returns_what_was_stored(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    key = f"test-services:{uuid.uuid4().hex}"
    try:
        await client.set(key, b"principal:alice", px=60_000)
        stored = await client.get(key)
        await client.delete(key)
        after_delete = await client.get(key)
    finally:
        await client.aclose()
    assert stored == b"principal:alice"
    assert after_delete is None


async def _consume(consumer: AIOKafkaConsumer, count: int) -> list[bytes]:
    """Read exactly ``count`` values, in partition order."""
    values: list[bytes] = []
    while len(values) < count:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            values.extend(record.value for record in records)
    return values


async def test_kafka_idempotent_produce_and_group_commit(kafka_bootstrap: str) -> None:
    topic = f"test-services-{uuid.uuid4().hex}"
    group = f"test-services-{uuid.uuid4().hex}"
    partition = TopicPartition(topic, 0)
    first_batch = [f"event-{n}".encode() for n in range(5)]

    async def produce(values: list[bytes]) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type="gzip",
        )
        await producer.start()
        try:
            for value in values:
                # One key keeps every event on partition 0, so order is observable.
                await producer.send_and_wait(topic, value, key=b"dataset")
        finally:
            await producer.stop()

    def group_member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    async with asyncio.timeout(ROUND_TRIP_TIMEOUT_S):
        await produce(first_batch)

        first = group_member()
        await first.start()
        try:
            received = await _consume(first, len(first_batch))
            await first.commit()
            committed = await first.committed(partition)
        finally:
            await first.stop()

        # A new member of the same group resumes after the commit: it sees only new events.
        await produce([b"event-late"])
        second = group_member()
        await second.start()
        try:
            resumed = await _consume(second, 1)
        finally:
            await second.stop()

    assert received == first_batch
    assert committed == len(first_batch)
    assert resumed == [b"event-late"]
