"""spool -> agent -> Kafka -> ingester -> PostgreSQL, on the real servers, with its faults.

Every test checks the store against what the traffic must give, exactly: every event
once (ids from a reference derivation), the access rows and lineage edges by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
from aiokafka import AIOKafkaProducer

from agent.agent import LineageAgent
from agent.batch import BATCH_SCHEMA_VERSION, BatchBuilder, seal_part
from agent.capture import CaptureRecord
from agent.config import AgentConfig, AgentProcessConfig, IngestConfig, KafkaConfig
from agent.crypto import decode_header, open_batch, seal_batch
from agent.events import AccessEvent, encode
from agent.ingest import Ingester
from agent.keys import LocalKeyring
from agent.sink import DirectSink, KafkaSink, Sink
from agent.spool import (
    POSITION_FILE,
    QUARANTINE_DIR,
    decode_quarantined,
    encode_frame,
    encode_segment_header,
    segment_name,
)
from agent.store.migrate import migrate
from agent.store.writer import StoreWriter
from tests.integration.agent.harness import (
    DERIVE,
    Gate,
    OffsetProbe,
    StoreSnapshot,
    create_topic,
    etl_records,
    event_ids,
    raw_messages,
    reference_events,
    snapshot,
    sql_records,
    wait_for,
    wait_for_events,
    write_spool,
)

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))

FAST_AGENT = AgentConfig(
    sink="kafka",
    linger=0.05,
    poll_interval=0.02,
    tick_interval=0.2,
    retry_initial=0.05,
    retry_max=0.5,
    max_batch_events=200,
)
FAST_INGEST = IngestConfig(poll_timeout=0.2, retry_initial=0.05, retry_max=0.5, max_poll_records=50)


def agent_config(
    spool: Path, bootstrap: str, topic: str, *, sink: str = "kafka"
) -> AgentProcessConfig:
    return AgentProcessConfig(
        agent=msgspec.structs.replace(FAST_AGENT, spool_dir=str(spool), sink=sink),
        derive=DERIVE,
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topic=topic, key_buckets=16),
    )


@contextlib.asynccontextmanager
async def running_agent(config: AgentProcessConfig, sink: Sink) -> AsyncIterator[LineageAgent]:
    agent = LineageAgent(config, sink)
    task = asyncio.create_task(agent.run(), name="test-agent")
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
        await sink.close()


@contextlib.asynccontextmanager
async def running_ingester(
    bootstrap: str, topic: str, keyring_path: Path, dsn: str, *, group: str | None = None
) -> AsyncIterator[Ingester]:
    ingester = Ingester(
        msgspec.structs.replace(FAST_INGEST, group_id=group or f"{topic}-ingest"),
        KafkaConfig(bootstrap_servers=bootstrap, topic=topic),
        provider=LocalKeyring(keyring_path),
        dsn=dsn,
    )
    task = asyncio.create_task(ingester.run(), name="test-ingester")
    try:
        yield ingester
    finally:
        ingester.stop()
        await asyncio.wait_for(task, 30)


def expected_edges(marker: str, runs: range) -> list[tuple[str, str, int]]:
    return sorted((f"src_{marker}_{r}", f"dst_{marker}_{r}", 1) for r in runs)


def assert_store_holds(snap: StoreSnapshot, *streams: list[CaptureRecord]) -> None:
    """Every event of the reference derivation once, and no other."""
    events = reference_events(*streams)
    run_ids, access_ids = event_ids(events)
    assert snap.run_event_ids == sorted(run_ids)
    assert snap.access_event_ids == sorted(access_ids)
    assert snap.access_rows == sorted(
        (e.principal, e.dataset_name, e.action, e.decision)
        for e in events
        if isinstance(e, AccessEvent)
    )


async def test_etl_lands_in_the_store_exactly_and_kafka_sees_only_ciphertext(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=3)
    first = etl_records(marker, runs=4, per_run=12)
    second = etl_records(marker, runs=3, per_run=12, first_run=4) + sql_records(marker)
    spool = tmp_path / "spool"
    write_spool(spool / "w0", first)
    write_spool(spool / "w1", second)
    expected = len(reference_events(first, second))

    config = agent_config(spool, kafka_bootstrap, topic)
    async with (
        running_agent(config, KafkaSink(config.kafka, keyring)) as agent,
        running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn) as ingester,
    ):
        await wait_for_events(store_dsn, expected)
        assert agent.spools == ("w0", "w1")

    snap = await snapshot(store_dsn)
    assert_store_holds(snap, first, second)
    # By hand: one edge per ETL run, the SQL run's table edge, every run complete with
    # all its requests (denied ones count as requests of the run, not as lineage).
    assert snap.edges == sorted(
        [
            *expected_edges(marker, range(7)),
            (f"wh_{marker}.orders_{marker}", f"wh_{marker}.report_{marker}", 1),
        ]
    )
    assert sorted(snap.run_requests.values()) == [1] + [12] * 7
    denied = [row for row in snap.access_rows if row[3] == "deny"]
    assert len(denied) == 7  # step 9 of each ETL run
    assert ingester.dead_letters == 0

    messages = await raw_messages(kafka_bootstrap, topic)
    assert messages
    # Names that only this run's lineage holds, so a chance match in random ciphertext
    # is out of reach (a 4-byte needle meets one in about 100,000 runs of this test).
    needles = [f"{prefix}{marker}".encode() for prefix in ("", "user_", "src_", "report_")]
    opened = b""
    for key, value in messages:
        assert key is not None
        assert re.fullmatch(rb"lb\d{5}", key)
        assert value is not None
        assert value.startswith(b"LSEB")
        for needle in needles:
            assert needle not in value
            assert needle not in key
        opened += (await open_batch(value, topic=topic, provider=keyring)).plaintext
    # The needles are what a leak would show: every one is in the plaintext.
    assert all(needle in opened for needle in needles)
    assert len({key for key, _ in messages}) > 1


async def test_direct_sink_writes_the_same_rows_without_kafka(
    tmp_path: Path, store_dsn: str, marker: str
) -> None:
    records = etl_records(marker, runs=3, per_run=6)
    write_spool(tmp_path / "spool" / "w0", records)
    config = agent_config(tmp_path / "spool", "127.0.0.1:9", "unused", sink="direct")
    writer = await StoreWriter.connect(store_dsn)
    async with running_agent(config, DirectSink(writer)):
        await wait_for_events(store_dsn, len(reference_events(records)))
    snap = await snapshot(store_dsn)
    assert_store_holds(snap, records)
    assert snap.edges == expected_edges(marker, range(3))


async def test_direct_sink_dead_letters_an_unstorable_event_once_across_a_resend(
    store_dsn: str, marker: str
) -> None:
    # An agent killed after the store committed but before its spool commit derives the
    # same events again after the restart, into a new batch (a new batch id): the event
    # PostgreSQL cannot hold must still be one dead letter row, as it is through Kafka.
    events = reference_events(etl_records(marker, runs=1, per_run=2))
    access = next(e for e in events if isinstance(e, AccessEvent))
    unstorable = msgspec.structs.replace(access, principal="nul\x00here")
    writer = await StoreWriter.connect(store_dsn)
    sink = DirectSink(writer)
    try:
        for _attempt in range(2):
            builder = BatchBuilder()
            builder.add(unstorable)
            await sink.send(builder.build())
    finally:
        await sink.close()
    connection = await asyncpg.connect(store_dsn)
    try:
        rows = await connection.fetch("SELECT source, reason FROM dead_letter")
    finally:
        await connection.close()
    assert len(rows) == 1, rows
    assert "NUL" in rows[0]["reason"]
    assert str(access.event_id) in rows[0]["source"]


async def test_rotating_the_active_key_mid_stream_loses_no_batch(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    before = etl_records(marker, runs=2, per_run=8)
    after = etl_records(marker, runs=2, per_run=8, first_run=2)
    spool = tmp_path / "spool" / "w0"
    write_spool(spool, before)
    old_key = keyring.active_key_id
    config = agent_config(tmp_path / "spool", kafka_bootstrap, topic)
    async with (
        running_agent(config, KafkaSink(config.kafka, keyring)),
        running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn),
    ):
        await wait_for_events(store_dsn, len(reference_events(before)))
        new_key = keyring.rotate()
        write_spool(spool, after)
        await wait_for_events(store_dsn, len(reference_events(before + after)))

    assert_store_holds(await snapshot(store_dsn), before + after)
    key_ids = {
        decode_header(value).key_id
        for _, value in await raw_messages(kafka_bootstrap, topic)
        if value
    }
    assert key_ids == {old_key, new_key}


async def test_a_rotation_by_the_keys_command_reaches_the_running_agent(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    # `lineage-sidecar keys rotate KEYRING` is another process: the running agent must
    # seal what it derives next under the new key, with no restart (docs/operations.md).
    before = etl_records(marker, runs=2, per_run=8)
    after = etl_records(marker, runs=2, per_run=8, first_run=2)
    spool = tmp_path / "spool" / "w0"
    write_spool(spool, before)
    old_key = keyring.active_key_id
    config = agent_config(tmp_path / "spool", kafka_bootstrap, topic)
    agent_keyring = LocalKeyring(keyring.path, create=False)
    async with (
        running_agent(config, KafkaSink(config.kafka, agent_keyring)),
        running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn),
    ):
        await wait_for_events(store_dsn, len(reference_events(before)))
        rotated = await asyncio.to_thread(
            subprocess.run,
            [CLI, "keys", "rotate", str(keyring.path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert rotated.returncode == 0, rotated.stderr
        new_key = LocalKeyring(keyring.path, create=False).active_key_id
        write_spool(spool, after)
        await wait_for_events(store_dsn, len(reference_events(before + after)))

    assert_store_holds(await snapshot(store_dsn), before + after)
    key_ids = {
        decode_header(value).key_id
        for _, value in await raw_messages(kafka_bootstrap, topic)
        if value
    }
    assert key_ids == {old_key, new_key}


async def test_corrupted_messages_are_dead_lettered_and_the_partition_goes_on(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    builder = BatchBuilder()
    for event in reference_events(etl_records(f"{marker}x", runs=1, per_run=2)):
        builder.add(event)
    part = builder.build().parts[0]
    good = await seal_part(part, batch_id="b1", topic=topic, provider=keyring)
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    other_topic = await seal_part(part, batch_id="b2", topic=f"{topic}-other", provider=keyring)
    garbage_body = await seal_batch(
        b"\xc1 not msgpack",
        topic=topic,
        batch_id="b3",
        schema_version=BATCH_SCHEMA_VERSION,
        provider=keyring,
    )
    future_schema = await seal_batch(
        part.plaintext(), topic=topic, batch_id="b4", schema_version=99, provider=keyring
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for value in (b"not a batch", tampered, other_topic, garbage_body, future_schema, b""):
            await producer.send_and_wait(topic, value=value, key=b"k")
    finally:
        await producer.stop()

    records = etl_records(marker, runs=2, per_run=4)
    write_spool(tmp_path / "spool" / "w0", records)
    config = agent_config(tmp_path / "spool", kafka_bootstrap, topic)
    async with (
        running_agent(config, KafkaSink(config.kafka, keyring)),
        running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn) as ingester,
    ):
        await wait_for_events(store_dsn, len(reference_events(records)))
    snap = await snapshot(store_dsn)
    assert_store_holds(snap, records)
    reasons = [reason.split(":")[0] for _, reason in snap.dead_letters]
    assert reasons == [
        "malformed",
        "tampered",
        "wrong_topic",
        "undecodable",
        "unknown_schema",
        "empty message",
    ]
    assert [source for source, _ in snap.dead_letters] == [
        f"kafka:{topic}/0@{offset}" for offset in range(6)
    ]
    assert ingester.dead_letters == 6


async def test_kafka_unreachable_records_wait_in_the_spool_then_are_delivered(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    host, _, port = kafka_bootstrap.partition(",")[0].rpartition(":")
    gate = Gate(host, int(port))
    await gate.start(up=False)
    records = etl_records(marker, runs=3, per_run=6)
    spool = tmp_path / "spool"
    write_spool(spool / "w0", records)
    config = agent_config(spool, gate.address, topic)

    async def failing(agent: LineageAgent) -> None:
        async def failed() -> bool:
            return agent.send_failures >= 3

        await wait_for(failed, what="failed sends")

    try:
        # An agent stopped while Kafka is away commits nothing: its records wait.
        async with running_agent(config, KafkaSink(config.kafka, keyring)) as agent:
            await failing(agent)
        assert agent.commits == 0
        assert agent.events_sent == 0
        assert not (spool / "w0" / POSITION_FILE).exists()

        async with (
            running_agent(config, KafkaSink(config.kafka, keyring)) as agent,
            running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn),
        ):
            await failing(agent)
            assert agent.commits == 0
            assert agent.lag_bytes > 0
            gate.open()
            await wait_for_events(store_dsn, len(reference_events(records)))
    finally:
        await gate.close()
    snap = await snapshot(store_dsn)
    assert_store_holds(snap, records)
    assert snap.edges == expected_edges(marker, range(3))
    assert (spool / "w0" / POSITION_FILE).exists()


async def test_store_unreachable_offsets_wait_then_everything_is_ingested(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    parts = urlsplit(store_dsn)
    assert parts.hostname is not None
    assert parts.port is not None
    gate = Gate(parts.hostname, parts.port)
    await gate.start(up=True)
    gated_dsn = urlunsplit(
        parts._replace(netloc=f"{parts.username}:{parts.password}@{gate.address}")
    )
    before = etl_records(marker, runs=2, per_run=6)
    after = etl_records(marker, runs=2, per_run=6, first_run=2)
    spool = tmp_path / "spool"
    write_spool(spool / "w0", before)
    group = f"{topic}-ingest"
    config = agent_config(spool, kafka_bootstrap, topic)
    probe = OffsetProbe(kafka_bootstrap, topic)
    await probe.start()
    try:
        async with (
            running_agent(config, KafkaSink(config.kafka, keyring)),
            running_ingester(
                kafka_bootstrap, topic, keyring.path, gated_dsn, group=group
            ) as ingester,
        ):
            await wait_for_events(store_dsn, len(reference_events(before)))

            async def all_committed() -> bool:
                return await probe.committed(group) == await probe.ends()

            await wait_for(all_committed, what="offsets of the first half committed")
            committed = await probe.committed(group)

            gate.shut()
            write_spool(spool / "w0", after)
            retries = ingester.retries

            async def retrying() -> bool:
                return ingester.retries >= retries + 2

            await wait_for(retrying, what="ingester retries")
            assert await probe.committed(group) == committed
            assert await probe.ends() != committed
            gate.open()
            await wait_for_events(store_dsn, len(reference_events(before + after)))
            await wait_for(all_committed, what="every offset committed")
    finally:
        await probe.close()
        await gate.close()
    snap = await snapshot(store_dsn)
    assert_store_holds(snap, before + after)
    assert snap.edges == expected_edges(marker, range(4))


async def test_messages_stay_under_the_size_limit_and_an_event_too_big_is_set_aside(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    hot = [
        msgspec.structs.replace(r, resource=f"dataset:hot_{marker}", traceparent=None)
        for r in etl_records(marker, runs=1, per_run=300)
    ]
    wide = [
        msgspec.structs.replace(
            r, resource=f"dataset:wide_{marker}_{r.request_id}_{'x' * 3000}", action="read"
        )
        for r in etl_records(f"{marker}w", runs=1, per_run=8)
    ]
    write_spool(tmp_path / "spool" / "w0", hot + wide)
    events = reference_events(hot + wide)
    too_big = [e for e in events if len(encode(e)) > 12 << 10]
    assert len(too_big) == 1  # the wide run's COMPLETE names all eight datasets
    config = agent_config(tmp_path / "spool", kafka_bootstrap, topic)
    config = msgspec.structs.replace(
        config,
        agent=msgspec.structs.replace(config.agent, max_batch_events=10_000, linger=1.0),
        kafka=msgspec.structs.replace(config.kafka, max_message_bytes=16 << 10),
    )
    async with (
        running_agent(config, KafkaSink(config.kafka, keyring)) as agent,
        running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn),
    ):
        await wait_for_events(store_dsn, len(events) - 1)
    assert agent.events_set_aside == 1
    set_aside = tmp_path / "spool" / "rejected" / f"{too_big[0].event_id}.json"
    assert set_aside.read_bytes() == encode(too_big[0])

    snap = await snapshot(store_dsn)
    run_ids, access_ids = event_ids(events)
    assert snap.run_event_ids == sorted(run_ids - {str(too_big[0].event_id)})
    assert snap.access_event_ids == sorted(access_ids)
    messages = await raw_messages(kafka_bootstrap, topic)
    assert len(messages) > 2
    assert all(value is not None and len(value) <= 16 << 10 for _, value in messages)


async def test_an_ingester_started_before_kafka_and_its_database_exist_waits_for_them(
    tmp_path: Path,
    pg_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    host, _, port = kafka_bootstrap.partition(",")[0].rpartition(":")
    gate = Gate(host, int(port))
    await gate.start(up=False)
    database = f"lineage_agent_test_{marker}"
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path="/" + database))
    records = etl_records(marker, runs=2, per_run=4)
    write_spool(tmp_path / "spool" / "w0", records)
    config = agent_config(tmp_path / "spool", kafka_bootstrap, topic)
    try:
        async with running_ingester(gate.address, topic, keyring.path, dsn) as ingester:

            async def retried(count: int) -> bool:
                return ingester.retries >= count

            # No database yet: the ingester waits for it.
            await wait_for(lambda: retried(2), what="retries while the database is missing")
            admin = await asyncpg.connect(pg_dsn)
            try:
                await admin.execute(f'CREATE DATABASE "{database}"')
            finally:
                await admin.close()
            await migrate(dsn)
            # Then no Kafka: it waits for that too.
            retries = ingester.retries
            await wait_for(lambda: retried(retries + 2), what="retries while Kafka is away")
            gate.open()
            async with running_agent(config, KafkaSink(config.kafka, keyring)):
                await wait_for_events(dsn, len(reference_events(records)))
        assert_store_holds(await snapshot(dsn), records)
    finally:
        await gate.close()
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_a_bad_record_is_set_aside_and_a_refused_spool_stops_alone(
    tmp_path: Path, store_dsn: str, marker: str
) -> None:
    spool = tmp_path / "spool"
    before = etl_records(marker, runs=2, per_run=6)
    after = etl_records(marker, runs=2, per_run=6, first_run=2)
    other = etl_records(marker, runs=2, per_run=6, first_run=4)
    # w0: records, an intact frame this reader cannot decode, a segment a crash left
    # without its header, more records.
    write_spool(spool / "w0", before)
    [first_segment] = sorted((spool / "w0").glob("*.seg"))
    bad = {"request_id": "bad", "time_ns": 1, "service": "s", "method": "GET", "path": "/"}
    with first_segment.open("ab") as segment:
        segment.write(encode_frame(msgspec.msgpack.encode({**bad, "status": "teapot"})))
    (spool / "w0" / segment_name(2)).write_bytes(b"")
    write_spool(spool / "w0", after)
    # w1: records, then a segment of a format this agent does not know.
    write_spool(spool / "w1", other)
    (spool / "w1" / segment_name(9)).write_bytes(encode_segment_header(9, format_version=7))

    config = agent_config(spool, "127.0.0.1:9", "unused", sink="direct")
    expected = reference_events(before + after, other)
    for start in range(2):  # a restart neither crashes nor doubles anything
        writer = await StoreWriter.connect(store_dsn)
        async with running_agent(config, DirectSink(writer)) as agent:
            await wait_for_events(store_dsn, len(expected))

            async def w1_stopped(agent: LineageAgent = agent) -> bool:
                return bool(agent.readiness())

            await wait_for(w1_stopped, what="w1 reported as stopped")
            assert agent.readiness() == [f"spool w1 stopped: {agent.stopped_spools['w1']}"]
            assert "unknown spool segment format version 7" in agent.stopped_spools["w1"]
            assert agent.spools == ("w0",)
            # Counted by the run that set it aside; a restart finds it already there.
            assert agent.records_quarantined == (1 if start == 0 else 0)
        assert_store_holds(await snapshot(store_dsn), before + after, other)

    [entry] = sorted((spool / "w0" / QUARANTINE_DIR).glob("*.json"))
    fields, raw = decode_quarantined(entry.read_bytes())
    assert msgspec.msgpack.decode(raw[8:])["status"] == "teapot"
    assert fields["segment"] == 1
    assert "undecodable capture record" in str(fields["reason"])
    assert not (spool / "w0" / segment_name(2)).exists()
