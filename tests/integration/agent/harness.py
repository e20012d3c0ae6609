"""Helpers for the agent pipeline tests: traffic, expectations, store snapshots, a gate.

The traffic is a small ETL: each run reads a source dataset and writes a target dataset
through the proxy, requests interleaved across runs, the last request of a run carrying
the configured end header. What the store must hold is computed two ways: by hand
(edges, access rows) and by feeding the same records to a fresh `Deriver` (event ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from agent.capture import CaptureRecord
from agent.derive import DeriveConfig, Deriver
from agent.derive.runs import RunConfig
from agent.events import AccessEvent, LineageEvent, RunEvent
from agent.spool import SpoolOptions, SpoolWriter
from tests.services import REPO_ROOT

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))
SERVICE = "https://warehouse.test:8001"
END_HEADER = "x-run-end"
# Runs end by their end header; the idle timeout is long so that the wall-clock tick of a
# drained spool never completes a test's run early (a slow machine must not change lineage).
DERIVE = DeriveConfig(runs=RunConfig(end_header=END_HEADER, idle_timeout_ns=3600 * 10**9))
# Small segments, so a test crosses segment boundaries and deletions.
SPOOL_OPTIONS = SpoolOptions(max_record_bytes=16 << 10, segment_bytes=64 << 10, max_bytes=64 << 20)
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


def traceparent(trace: int) -> str:
    return f"00-{trace:032x}-{1:016x}-01"


def etl_records(
    marker: str, *, runs: int, per_run: int, first_run: int = 0, t0: int | None = None
) -> list[CaptureRecord]:
    """`per_run` requests for each run, interleaved: even ones read `src_<marker>_<run>`,
    odd ones write `dst_<marker>_<run>`; the last one ends the run. Every tenth request
    of a run is denied (an access row, no lineage)."""
    start = time.time_ns() if t0 is None else t0
    records: list[CaptureRecord] = []
    for step in range(per_run):
        for run in range(first_run, first_run + runs):
            index = len(records)
            reading = step % 2 == 0
            denied = step % 10 == 9 and step != per_run - 1
            records.append(
                CaptureRecord(
                    request_id=f"{marker}-{run}-{step}",
                    time_ns=start + (run * per_run + step) * 1_000_000 + index,
                    service=SERVICE,
                    principal=f"user_{marker}_{run % 3}",
                    roles=("etl",),
                    method="GET" if reading else "POST",
                    path=f"/data/{run}",
                    route="datasets",
                    resource=f"dataset:{'src' if reading else 'dst'}_{marker}_{run}",
                    action="read" if reading else "write",
                    decision="deny" if denied else "allow",
                    rule="p, etl, dataset:*, *",
                    status=403 if denied else 200,
                    traceparent=traceparent(run + 1),
                    correlation={END_HEADER: "end"} if step == per_run - 1 else {},
                )
            )
    return records


def sql_records(marker: str) -> list[CaptureRecord]:
    """One run that moves data with SQL: table and column lineage from the body."""
    return [
        CaptureRecord(
            request_id=f"{marker}-sql-1",
            time_ns=time.time_ns(),
            service=SERVICE,
            principal=f"analyst_{marker}",
            method="POST",
            path="/wh/query",
            route="sql",
            resource=f"dataset:wh_{marker}",
            action="query",
            decision="allow",
            status=200,
            sql=f"INSERT INTO report_{marker} (id, total) SELECT id, amount FROM orders_{marker}",
            sql_dialect="postgres",
            correlation={END_HEADER: "end"},
        )
    ]


def write_spool(directory: Path, records: Iterable[CaptureRecord]) -> None:
    """Append records as the proxy would, and make them durable."""
    writer = SpoolWriter(directory, SPOOL_OPTIONS)
    try:
        for record in records:
            assert writer.append(record)
        writer.flush()
    finally:
        writer.close()


def reference_events(*streams: list[CaptureRecord]) -> list[LineageEvent]:
    """What the agent must derive: each stream (one worker spool) in order."""
    deriver = Deriver(DERIVE)
    events: list[LineageEvent] = []
    for stream in streams:
        for record in stream:
            events.extend(deriver.feed(record))
    events.extend(deriver.flush())
    return events


def event_ids(events: Iterable[LineageEvent]) -> tuple[set[str], set[str]]:
    """(run event ids, access event ids) as strings."""
    runs = {str(e.event_id) for e in events if isinstance(e, RunEvent)}
    accesses = {str(e.event_id) for e in events if isinstance(e, AccessEvent)}
    return runs, accesses


@dataclass(frozen=True)
class StoreSnapshot:
    run_event_ids: list[str]
    access_event_ids: list[str]
    access_rows: list[tuple[str | None, str, str, str]]
    edges: list[tuple[str, str, int]]
    run_requests: dict[str, int]
    dead_letters: list[tuple[str, str]]


async def snapshot(dsn: str) -> StoreSnapshot:
    connection = await asyncpg.connect(dsn)
    try:
        raw = await connection.fetch("SELECT event_id::text FROM events_raw")
        access = await connection.fetch(
            "SELECT a.event_id::text, a.principal, d.name, a.action, a.decision "
            "FROM access_events a JOIN datasets d ON d.id = a.dataset_id"
        )
        edges = await connection.fetch(
            "SELECT s.name, t.name, e.run_count FROM lineage_edges e "
            "JOIN datasets s ON s.id = e.source_id JOIN datasets t ON t.id = e.target_id"
        )
        runs = await connection.fetch(
            "SELECT run_id::text, state, (facets->'lineageSidecar'->>'requests')::int FROM runs"
        )
        dead = await connection.fetch("SELECT source, reason FROM dead_letter ORDER BY id")
    finally:
        await connection.close()
    return StoreSnapshot(
        run_event_ids=sorted(r[0] for r in raw),
        access_event_ids=sorted(r[0] for r in access),
        access_rows=sorted((r[1], r[2], r[3], r[4]) for r in access),
        edges=sorted((r[0], r[1], r[2]) for r in edges),
        run_requests={r[0]: r[2] for r in runs if r[1] in ("COMPLETE", "FAIL")},
        dead_letters=[(r[0], r[1]) for r in dead],
    )


async def stored_event_count(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(
            "SELECT (SELECT count(*) FROM events_raw) + (SELECT count(*) FROM access_events)"
        )
    finally:
        await connection.close()
    return count


def run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    """A command that is expected to end by itself (a refused start), its output kept."""
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )


async def execute(dsn: str, statement: str) -> None:
    """One statement on a connection of its own (DDL, database creation)."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def empty_store(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"TRUNCATE {', '.join(STORE_TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 30.0, what: str = "condition"
) -> None:
    """Poll until `condition` holds; fail after a generous deadline (not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s}s")
        await asyncio.sleep(0.05)


def start_process(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start quickly (fork and exec), output appended to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)


async def logged_admin_url(process: subprocess.Popen[bytes], log: Path, name: str) -> str:
    """The address `name` ("agent", "ingest") logged once its admin listener accepts (port
    0: the kernel's pick)."""
    listening_line = re.compile(rf"{name} admin listener on (http://\S+)")
    found: list[str] = []

    async def listening() -> bool:
        text = await asyncio.to_thread(log.read_text)
        assert process.poll() is None, text
        found.extend(listening_line.findall(text))
        return bool(found)

    await wait_for(listening, what=f"the {name} admin listener")
    return found[0]


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as reply:
        return reply.status, await reply.text()


def metric_samples(exposition: str) -> dict[str, float]:
    """Sample name -> value of a Prometheus text exposition."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


async def wait_for_events(dsn: str, expected: int, *, timeout_s: float = 60.0) -> None:
    async def arrived() -> bool:
        return await stored_event_count(dsn) >= expected

    await wait_for(arrived, timeout_s=timeout_s, what=f"{expected} events in the store")


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()


async def raw_messages(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) on the topic, read from the beginning without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [
                TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
            ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        messages: list[tuple[bytes | None, bytes | None]] = []
        for partition in partitions:
            while await consumer.position(partition) < ends[partition]:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for records in batch.values():
                    messages.extend((r.key, r.value) for r in records)
        return messages
    finally:
        await consumer.stop()


class OffsetProbe:
    """Reads a topic's end offsets and a group's committed offsets, from outside the group."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._topic = topic
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def committed(self, group: str) -> dict[int, int]:
        offsets = await self._admin.list_consumer_group_offsets(group)
        return {tp.partition: meta.offset for tp, meta in offsets.items()}

    async def ends(self) -> dict[int, int]:
        partitions = self._consumer.partitions_for_topic(self._topic)
        if not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self._topic) or set()
        ends = await self._consumer.end_offsets(
            [TopicPartition(self._topic, p) for p in partitions]
        )
        return {tp.partition: offset for tp, offset in ends.items()}


class Gate:
    """A TCP forwarder that can be shut: while down it refuses (accepts and closes) every
    connection and has cut the open ones. It stands in for a server that is stopped,
    without touching the shared server behind it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.up = False
        self.port = 0

    async def start(self, *, up: bool) -> None:
        self.up = up
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        self.up = True

    def shut(self) -> None:
        self.up = False
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def close(self) -> None:
        self.shut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, upstream_writer))
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink), name="gate-pump")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()
            self._pipes.discard(sink)
