"""The ingester: sealed batches from Kafka into the PostgreSQL lineage store.

A member of a Kafka consumer group (auto-commit off). For each fetch: open every message
(`agent.batch.open_message`: decrypt, authenticate, decode), write all their events in one
store transaction (`StoreWriter.write`, idempotent by event id), and only then commit the
offsets. What it promises:

- Nothing lost: an offset is committed only after the events before it are committed in
  PostgreSQL. If the ingester dies in between, the messages are fetched again and their
  events are found already stored (nothing doubled).
- No poison message: a message that cannot be opened or read (`DecryptError`,
  `BatchFormatError`, an empty or oversized value) goes to the dead letter table with the
  reason and its bytes, and the partition moves on.
- Transient failures wait: when the store is unreachable (`StoreError.retriable`) or the
  key provider cannot answer (`KeyProviderError`), the same messages are tried again with
  exponential backoff and no offset moves. The consumer is not polled meanwhile, so Kafka
  keeps the messages.
- A batch the store refuses for good is split per message, and the message it cannot
  take is dead-lettered: one bad message does not hold the others back.

Counters (`messages`, `events_inserted`, `dead_letters`, `commits`, ...) are plain
attributes, read only when `stats()` is asked for (by a scrape of the admin listener's
`/metrics`, `agent.admin`); `readiness()` gives the reasons the ingester is not fully
working, from its own retry state: not consuming yet, or the store, Kafka or the key
provider failing since its last success. The admin listener's `/readyz` reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from agent.admin import AdminListener, bind_admin, run_until_signalled
from agent.batch import BatchFormatError, open_message
from agent.config import IngestConfig, IngestProcessConfig, KafkaConfig
from agent.crypto import DecryptError
from agent.events import LineageEvent
from agent.keys import KeyProvider, KeyProviderError, open_key_provider
from agent.metrics import INGEST_METRICS, IngestStats
from agent.process import module_main, resolve_dsn
from agent.store.migrate import migrate
from agent.store.writer import StoreError, StoreWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a failure is counted against, and named by in `readiness()`.
STORE = "lineage store"
KAFKA = "kafka"
KEY_PROVIDER = "key provider"

__all__ = ["Ingester", "main", "message_source", "run_ingester"]


def message_source(topic: str, partition: int, offset: int) -> str:
    """How a message is named in the dead letter table."""
    return f"kafka:{topic}/{partition}@{offset}"


@dataclass(frozen=True, slots=True)
class _Opened:
    source: str
    payload: bytes
    events: list[LineageEvent]


@dataclass(frozen=True, slots=True)
class _Unreadable:
    source: str
    payload: bytes
    reason: str


class Ingester:
    """Consumes until `stop()`; see the module docstring for what it promises."""

    def __init__(
        self,
        ingest: IngestConfig,
        kafka: KafkaConfig,
        *,
        provider: KeyProvider,
        dsn: str,
        max_connections: int = 4,
    ) -> None:
        ingest.check()
        self._config = ingest
        self._kafka = kafka
        self._provider = provider
        self._dsn = dsn
        self._max_connections = max_connections
        self._stopping = asyncio.Event()
        # Counters for metrics.
        self.messages = 0
        self.events_inserted = 0
        self.events_duplicate = 0
        self.events_rejected = 0
        self.dead_letters = 0
        self.commits = 0
        self.commit_failures = 0
        # Failed attempts per component since the start, and in a row since its last
        # success (with the last error): the readiness reasons.
        self._failures: Counter[str] = Counter()
        self._failing: dict[str, tuple[int, str]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        # Per partition, the offset after the last message stored (updated per fetch).
        self._stored_up_to: dict[TopicPartition, int] = {}

    @property
    def retries(self) -> int:
        """Failed attempts, of any component, that were tried again."""
        return self._failures.total()

    def stop(self) -> None:
        self._stopping.set()

    def stats(self) -> IngestStats:
        """The counters and gauges as they stand now (for the metrics endpoint)."""
        assigned: set[TopicPartition] = set()
        lag = 0
        if self._consumer is not None:
            assigned = self._consumer.assignment()
            for partition in assigned:
                highwater = self._consumer.highwater(partition)
                stored = self._stored_up_to.get(partition)
                if highwater is not None and stored is not None:
                    lag += max(0, highwater - stored)
        return IngestStats(
            messages=self.messages,
            events_inserted=self.events_inserted,
            events_duplicate=self.events_duplicate,
            events_rejected=self.events_rejected,
            dead_letters=self.dead_letters,
            store_failures=self._failures[STORE],
            key_provider_failures=self._failures[KEY_PROVIDER],
            kafka_failures=self._failures[KAFKA],
            commits=self.commits,
            commit_failures=self.commit_failures,
            lag_messages=lag,
            partitions_assigned=len(assigned),
        )

    def readiness(self) -> list[str]:
        """Reasons the ingester is not fully working, empty when it is."""
        reasons = [
            f"{component} failing ({count} attempts in a row): {error}"
            for component, (count, error) in sorted(self._failing.items())
        ]
        if self._consumer is None:
            reasons.append("not consuming from kafka yet")
        return reasons

    def _failed(self, component: str, exc: BaseException) -> None:
        """An attempt failed and will be retried: counted, and `component` is failing."""
        self._failures[component] += 1
        self._mark_failing(component, exc)

    def _mark_failing(self, component: str, exc: BaseException) -> None:
        count = self._failing.get(component, (0, ""))[0] + 1
        self._failing[component] = (count, str(exc) or type(exc).__name__)

    def _succeeded(self, *components: str) -> None:
        for component in components:
            self._failing.pop(component, None)

    async def run(self) -> None:
        writer = await self._retrying(STORE, "connecting to the lineage store", self._connect)
        if writer is None:
            return
        try:
            consumer = await self._retrying(KAFKA, "connecting to kafka", self._start_consumer)
            if consumer is None:
                return
            self._consumer = consumer
            try:
                while not self._stopping.is_set():
                    fetched = await consumer.getmany(
                        timeout_ms=int(self._config.poll_timeout * 1000),
                        max_records=self._config.max_poll_records,
                    )
                    if fetched:
                        await self._ingest(consumer, writer, fetched)
            finally:
                self._consumer = None
                with contextlib.suppress(KafkaError, OSError):
                    await consumer.stop()
        finally:
            await writer.close()

    async def _connect(self) -> StoreWriter:
        try:
            return await StoreWriter.connect(self._dsn, max_connections=self._max_connections)
        except asyncpg.PostgresError as exc:
            # E.g. the database does not exist yet: an operator may be creating it.
            raise StoreError(f"lineage store unusable: {exc}", retriable=True) from exc

    async def _start_consumer(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            self._kafka.topic,
            bootstrap_servers=self._kafka.bootstrap_servers,
            client_id=f"{self._kafka.client_id}-ingest",
            group_id=self._config.group_id,
            group_instance_id=self._config.instance_id,
            session_timeout_ms=int(self._config.session_timeout * 1000),
            enable_auto_commit=False,
            auto_offset_reset=self._config.auto_offset_reset,
            max_partition_fetch_bytes=max(1 << 20, self._config.max_message_bytes),
            fetch_max_bytes=max(50 << 20, self._config.max_message_bytes),
        )
        try:
            await consumer.start()
        except BaseException:
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()
            raise
        return consumer

    async def _retrying(
        self, component: str, what: str, attempt: Callable[[], Awaitable[T]]
    ) -> T | None:
        """Call `attempt` until it succeeds or the ingester stops (then None)."""
        delay = self._config.retry_initial
        while not self._stopping.is_set():
            try:
                result = await attempt()
            except (StoreError, KafkaError, OSError) as exc:
                if isinstance(exc, StoreError) and not exc.retriable:
                    raise
                self._failed(component, exc)
                log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
            else:
                self._succeeded(component)
                return result
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self._config.retry_max)
        return None

    async def _ingest(
        self,
        consumer: AIOKafkaConsumer,
        writer: StoreWriter,
        fetched: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    ) -> None:
        """Store one fetch, retrying transient failures, then commit its offsets."""
        records = [record for batch in fetched.values() for record in batch]
        delay = self._config.retry_initial
        while True:
            try:
                await self._store(writer, records)
                break
            except (StoreError, KeyProviderError) as exc:
                if isinstance(exc, StoreError) and not exc.retriable:
                    raise
                self._failed(STORE if isinstance(exc, StoreError) else KEY_PROVIDER, exc)
                log.warning(
                    "storing %d messages failed, offsets held, retrying in %.1fs: %s",
                    len(records),
                    delay,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return
                delay = min(delay * 2, self._config.retry_max)
        self._succeeded(STORE, KEY_PROVIDER)
        self.messages += len(records)
        offsets = {partition: batch[-1].offset + 1 for partition, batch in fetched.items() if batch}
        self._stored_up_to.update(offsets)
        try:
            await consumer.commit(offsets)
            self.commits += 1
            self._succeeded(KAFKA)
        except KafkaError as exc:
            # Usually a rebalance: the partition moved to another member, which will fetch
            # these messages again and find their events already stored.
            self.commit_failures += 1
            self._mark_failing(KAFKA, exc)
            log.warning("committing offsets failed (they will be redelivered): %s", exc)

    async def _store(
        self, writer: StoreWriter, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> None:
        opened: list[_Opened] = []
        unreadable: list[_Unreadable] = []
        for record in records:
            source = message_source(record.topic, record.partition, record.offset)
            payload = record.value or b""
            result = await self._open(source, payload)
            if isinstance(result, _Opened):
                opened.append(result)
            else:
                unreadable.append(result)
        for bad in unreadable:
            await self._dead_letter(writer, bad.source, bad.reason, bad.payload)
        events = [event for message in opened for event in message.events]
        if not events:
            return
        try:
            await self._write(writer, events, f"kafka:{self._kafka.topic}")
        except StoreError as exc:
            if exc.retriable or len(opened) == 0:
                raise
            # Refused for good: find the message(s) the store cannot take, keep the rest.
            for message in opened:
                try:
                    await self._write(writer, message.events, message.source)
                except StoreError as single:
                    if single.retriable:
                        raise
                    await self._dead_letter(
                        writer, message.source, f"store refused: {single}", message.payload
                    )

    async def _open(self, source: str, payload: bytes) -> _Opened | _Unreadable:
        if not payload:
            return _Unreadable(source, payload, "empty message")
        if len(payload) > self._config.max_message_bytes:
            return _Unreadable(
                source,
                payload,
                f"too_large: {len(payload)} bytes, limit {self._config.max_message_bytes}",
            )
        try:
            events = await open_message(
                payload,
                topic=self._kafka.topic,
                provider=self._provider,
                max_blob_bytes=self._config.max_message_bytes,
            )
        except DecryptError as exc:
            return _Unreadable(source, payload, f"{exc.reason}: {exc}")
        except BatchFormatError as exc:
            return _Unreadable(source, payload, f"{exc.reason}: {exc}")
        return _Opened(source, payload, events)

    async def _write(self, writer: StoreWriter, events: list[LineageEvent], source: str) -> None:
        result = await writer.write(events, source=source)
        self.events_inserted += result.inserted
        self.events_duplicate += result.duplicates
        self.events_rejected += result.rejected

    async def _dead_letter(
        self, writer: StoreWriter, source: str, reason: str, payload: bytes
    ) -> None:
        log.error("dead-lettering %s: %s", source, reason)
        if await writer.write_dead_letter(source, reason, payload):
            self.dead_letters += 1


# ---- process entry point -----------------------------------------------------------------


async def run_ingester(config: IngestProcessConfig) -> None:
    """Run the ingester, and its admin listener when configured, until SIGTERM or SIGINT.

    Stop order: the admin listener stops accepting, then the ingester finishes the fetch
    in hand (stored and committed, or left for the next run), leaves the group and closes
    the store."""
    listen = config.ingest.admin_listen
    # Bound first: an address in use ends the start before the key provider, the store or
    # a migration is touched.
    admin_socket = bind_admin(listen, "ingest.admin_listen") if listen is not None else None
    try:
        provider = open_key_provider(config.keys)
        dsn = resolve_dsn(config.store.dsn)
        if config.store.migrate:
            await migrate(dsn)
    except BaseException:
        if admin_socket is not None:
            admin_socket.close()
        raise
    ingester = Ingester(
        config.ingest,
        config.kafka,
        provider=provider,
        dsn=dsn,
        max_connections=config.store.max_connections,
    )
    admin = (
        AdminListener(ingester, admin_socket, INGEST_METRICS) if admin_socket is not None else None
    )
    await run_until_signalled("ingest", ingester.run(), ingester.stop, admin)


def main(argv: list[str] | None = None) -> int:
    return module_main(
        argv,
        prog="python -m agent.ingest",
        description=__doc__,
        kind=IngestProcessConfig,
        run=run_ingester,
    )


if __name__ == "__main__":
    sys.exit(main())
