"""Sinks: where the agent's batches go. `send` returns only once the batch is safe.

A sink's one promise: when `send(batch)` returns, every event of the batch is durable
downstream (acknowledged by all in-sync Kafka replicas, or committed in PostgreSQL); when
it raises, the agent must assume nothing was delivered and send the batch again later.
Sending a batch twice is harmless: the store keeps one row per event id.

* `KafkaSink` seals each part of the batch (`agent.batch.seal_part`: AES-256-GCM, a fresh
  data key per message) and produces it with an idempotent, acks=all producer (gzip by
  default). Lineage leaves the process only as ciphertext; the message key is an opaque
  bucket (see `agent.batch`). The parts of one batch may land in different partitions;
  the batch counts as sent only when every part is acknowledged.
* `DirectSink` writes the events straight to the store in this process. Nothing leaves
  the machine, so nothing is encrypted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from agent.batch import EventBatch, seal_part
from agent.config import KafkaConfig
from agent.keys import KeyProvider
from agent.store.writer import StoreWriter

log = logging.getLogger(__name__)

__all__ = ["DirectSink", "KafkaSink", "Sink", "SinkError"]


class SinkError(Exception):
    """A batch was not acknowledged; the agent keeps it in the spool and tries again."""

    retriable = True


class Sink(Protocol):
    async def send(self, batch: EventBatch) -> None:
        """Deliver the batch durably, or raise."""
        ...

    async def close(self) -> None: ...


class KafkaSink:
    """Sealed batches to a Kafka topic; reconnects on the next send after any failure."""

    def __init__(self, config: KafkaConfig, provider: KeyProvider) -> None:
        self._config = config
        self._provider = provider
        self._producer: AIOKafkaProducer | None = None
        self.messages_sent = 0
        self.bytes_sent = 0

    @property
    def topic(self) -> str:
        return self._config.topic

    async def send(self, batch: EventBatch) -> None:
        if not batch.parts:
            return
        # Sealing first: a key provider failure must not leave half a batch produced.
        messages = [
            (
                part.key,
                await seal_part(
                    part,
                    batch_id=f"{batch.batch_id}.{index}",
                    topic=self._config.topic,
                    provider=self._provider,
                ),
            )
            for index, part in enumerate(batch.parts)
        ]
        try:
            async with asyncio.timeout(self._config.send_timeout):
                producer = await self._started_producer()
                # send() only queues; the futures resolve once the broker acknowledged.
                acknowledgements = [
                    await producer.send(self._config.topic, value=value, key=key)
                    for key, value in messages
                ]
                await asyncio.gather(*acknowledgements)
        except Exception as exc:
            # A producer that failed may hold half-sent requests; a new one starts clean
            # (its duplicates, if any, are absorbed by the store's event ids).
            await self._discard_producer()
            if isinstance(exc, TimeoutError):
                raise SinkError(
                    f"kafka did not acknowledge within {self._config.send_timeout}s"
                ) from exc
            raise SinkError(f"kafka send failed: {type(exc).__name__}: {exc}") from exc
        self.messages_sent += len(messages)
        self.bytes_sent += sum(len(value) for _, value in messages)

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def _started_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            config = self._config
            producer = AIOKafkaProducer(
                bootstrap_servers=config.bootstrap_servers,
                client_id=config.client_id,
                acks="all",
                enable_idempotence=True,
                compression_type=None if config.compression == "none" else config.compression,
                linger_ms=config.linger_ms,
                max_request_size=config.max_request_bytes,
                max_batch_size=min(config.max_request_bytes, 1 << 20),
                request_timeout_ms=int(config.request_timeout * 1000),
            )
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            # stop() flushes what is queued; against a dead broker that would wait for
            # the request timeout, so it is bounded: the batch is resent anyway.
            async with asyncio.timeout(5.0):
                await producer.stop()
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("kafka producer did not stop cleanly: %s", exc)


class DirectSink:
    """Events straight into the store, in process (`sink: direct`)."""

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer

    async def send(self, batch: EventBatch) -> None:
        if batch.events:
            # StoreError propagates; the agent retries the batch. The source names no batch:
            # after a restart the same events come again in a new batch, and an event the
            # store sets aside must still be one dead letter row ("direct:<event id>").
            await self._writer.write(batch.events, source="direct")

    async def close(self) -> None:
        await self._writer.close()
