"""The ingester's admin listener, on the real `lineage-sidecar ingest` process, Kafka and
PostgreSQL.

What an operator scraping or probing the ingester sees: it is alive, its metrics follow
what it stores and dead-letters, `/readyz` answers 503 naming the store while it cannot
reach it, and a listener it cannot open stops it with one line.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from agent.batch import BatchBuilder, seal_part
from agent.keys import LocalKeyring
from tests.integration.agent.harness import (
    CLI,
    create_topic,
    etl_records,
    http_get,
    logged_admin_url,
    metric_samples,
    reference_events,
    run_command,
    snapshot,
    start_process,
    stored_event_count,
    wait_for,
)


def write_config(
    path: Path, *, bootstrap: str, topic: str, keyring: Path, dsn: str, admin_listen: str
) -> Path:
    config = {
        "ingest": {
            "group_id": f"{topic}-ingest",
            "poll_timeout": 0.1,
            "retry_initial": 0.05,
            "retry_max": 0.5,
            "admin_listen": admin_listen,
        },
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic},
        "keys": {"keyring": str(keyring)},
        "store": {"dsn": dsn, "migrate": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_ingester(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return start_process([CLI, "ingest", "--config", str(config)], log)


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, and the ingester ends cleanly (blocking: run it in a thread)."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()[-3000:]


async def produce_sealed(bootstrap: str, topic: str, keyring: LocalKeyring, marker: str) -> int:
    """Sealed batches of a small ETL's events, then one corrupted message; the event count."""
    events = reference_events(etl_records(marker, runs=2, per_run=4))
    builder = BatchBuilder()
    for event in events:
        builder.add(event)
    parts = builder.build().parts
    sealed = [
        await seal_part(part, batch_id=f"b{index}", topic=topic, provider=keyring)
        for index, part in enumerate(parts)
    ]
    tampered = sealed[0][:-1] + bytes([sealed[0][-1] ^ 1])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in [*sealed, tampered]:
            await producer.send_and_wait(topic, value=value, key=b"k")
    finally:
        await producer.stop()
    return len(events)


async def test_the_ingester_reports_health_readiness_and_metrics(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    expected = await produce_sealed(kafka_bootstrap, topic, keyring, marker)
    config = write_config(
        tmp_path / "ingest.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        keyring=keyring.path,
        dsn=store_dsn,
        admin_listen="127.0.0.1:0",
    )
    log = tmp_path / "ingest.log"
    process = start_ingester(config, log)
    try:
        admin = await logged_admin_url(process, log, "ingest")
        async with aiohttp.ClientSession() as session:
            assert await http_get(session, f"{admin}/healthz") == (200, "ok\n")

            async def metrics() -> dict[str, float]:
                status, text = await http_get(session, f"{admin}/metrics")
                assert status == 200
                return metric_samples(text)

            async def ingested() -> bool:
                now = await metrics()
                return (
                    now["lineage_ingest_events_inserted_total"] == expected
                    and now["lineage_ingest_dead_letters_total"] == 1
                    and now["lineage_ingest_commits_total"] >= 1
                )

            await wait_for(ingested, what=f"{expected} events stored and one dead letter")
            assert await stored_event_count(store_dsn) == expected
            [(source, reason)] = (await snapshot(store_dsn)).dead_letters
            assert reason.startswith("tampered")
            now = await metrics()
            sealed_messages = int(source.rsplit("@", 1)[1])  # the corrupted one came last
            assert now["lineage_ingest_messages_total"] == sealed_messages + 1
            assert now["lineage_ingest_events_duplicate_total"] == 0
            assert now["lineage_ingest_store_failures_total"] == 0
            assert now["lineage_ingest_partitions_assigned"] == 1
            assert now["lineage_ingest_lag_messages"] == 0
            status, body = await http_get(session, f"{admin}/readyz")
            assert (status, body) == (200, '{"ready":true,"reasons":[]}')
            assert (await http_get(session, f"{admin}/nothing-here"))[0] == 404
        await asyncio.to_thread(stop, process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Stopped: the port no longer accepts.
    host, port = admin.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 5):
        pass


async def test_readiness_names_a_store_that_keeps_failing(
    tmp_path: Path, kafka_bootstrap: str, topic: str, keyring: LocalKeyring
) -> None:
    config = write_config(
        tmp_path / "ingest.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        keyring=keyring.path,
        dsn="postgresql://unused@127.0.0.1:1/unused",  # nothing listens there
        admin_listen="127.0.0.1:0",
    )
    log = tmp_path / "ingest.log"
    process = start_ingester(config, log)
    try:
        admin = await logged_admin_url(process, log, "ingest")
        async with aiohttp.ClientSession() as session:

            async def failed_twice() -> bool:
                text = (await http_get(session, f"{admin}/metrics"))[1]
                return metric_samples(text)["lineage_ingest_store_failures_total"] >= 2

            await wait_for(failed_twice, what="two failed store connections")
            status, body = await http_get(session, f"{admin}/readyz")
            assert status == 503
            reasons = yaml.safe_load(body)["reasons"]
            assert any(reason.startswith("lineage store failing (") for reason in reasons)
            assert "not consuming from kafka yet" in reasons
            assert (await http_get(session, f"{admin}/healthz"))[0] == 200
        await asyncio.to_thread(stop, process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


COMMANDS = {
    "cli": [CLI, "ingest", "--config"],
    "module": [sys.executable, "-m", "agent.ingest", "--config"],
}


@pytest.mark.parametrize("entry", sorted(COMMANDS))
def test_an_admin_port_in_use_stops_the_start_with_one_line(tmp_path: Path, entry: str) -> None:
    # Nothing listens at this store or broker: the listener is bound before either is used.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write_config(
            tmp_path / "ingest.yaml",
            bootstrap="127.0.0.1:1",
            topic="unused",
            keyring=tmp_path / "keyring.json",
            dsn="postgresql://unused@127.0.0.1:1/unused",
            admin_listen=listen,
        )
        result = run_command([*COMMANDS[entry], str(config)])
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    prog = "lineage-sidecar" if entry == "cli" else "python -m agent.ingest"
    assert line == f"{prog}: ingest.admin_listen: cannot listen on {listen}: Address already in use"


@pytest.mark.parametrize("entry", sorted(COMMANDS))
def test_a_bad_admin_listen_exits_non_zero_with_one_line_naming_it(
    tmp_path: Path, entry: str
) -> None:
    config = write_config(
        tmp_path / "ingest.yaml",
        bootstrap="127.0.0.1:1",
        topic="unused",
        keyring=tmp_path / "keyring.json",
        dsn="unused",
        admin_listen="localhost:99999",
    )
    result = run_command([*COMMANDS[entry], str(config)])
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "ingest.admin_listen: port 99999 is out of range" in line
