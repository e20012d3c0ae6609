"""The agent as a real process (`python -m agent.agent`): kill -9 mid-stream, restart, SIGTERM.

Runs are interleaved across the whole stream, so every kill lands while runs are open:
the restarted agent must continue them from its checkpoint, neither cutting a run in two
nor emitting a run event twice with different content.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from agent.agent import uncommitted_bytes
from agent.keys import LocalKeyring
from agent.sink import KafkaSink
from agent.spool import read_committed_position
from tests.integration.agent.harness import (
    END_HEADER,
    create_topic,
    etl_records,
    reference_events,
    snapshot,
    start_process,
    stored_event_count,
    wait_for,
    wait_for_events,
    write_spool,
)
from tests.integration.agent.test_pipeline import (
    agent_config,
    assert_store_holds,
    expected_edges,
    running_agent,
    running_ingester,
)
from tests.services import REPO_ROOT

RUNS = 12
PER_RUN = 40


def write_config(path: Path, spool: Path, bootstrap: str, topic: str, keyring: Path) -> Path:
    config = {
        "agent": {
            "spool_dir": str(spool),
            "sink": "kafka",
            "read_records": 50,
            "max_batch_events": 40,
            "linger": 0.02,
            "poll_interval": 0.02,
            "tick_interval": 0.2,
            "retry_initial": 0.05,
            "retry_max": 0.5,
            "admin_listen": "127.0.0.1:0",
        },
        "derive": {"runs": {"end_header": END_HEADER, "idle_timeout_ns": 3600 * 10**9}},
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "key_buckets": 8},
        "keys": {"keyring": str(keyring)},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return start_process([sys.executable, "-m", "agent.agent", "--config", str(config)], log)


async def wait_exit(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    code = await asyncio.to_thread(process.wait, timeout_s)
    return code


async def test_kill_9_mid_stream_and_restart_store_every_event_exactly_once(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    records = etl_records(marker, runs=RUNS, per_run=PER_RUN)
    chunks = [records[i : i + len(records) // 4] for i in range(0, len(records), len(records) // 4)]
    spool = tmp_path / "spool"
    worker = spool / "w0"
    config = write_config(tmp_path / "agent.yaml", spool, kafka_bootstrap, topic, keyring.path)
    log = tmp_path / "agent.log"
    processes: list[subprocess.Popen[bytes]] = []

    async def progressed_beyond(count: int) -> bool:
        return await stored_event_count(store_dsn) > count

    try:
        async with running_ingester(kafka_bootstrap, topic, keyring.path, store_dsn):
            write_spool(worker, chunks[0])
            for chunk in chunks[1:3]:
                agent = start_agent(config, log)
                processes.append(agent)
                stored = await stored_event_count(store_dsn)
                await wait_for(
                    lambda stored=stored: progressed_beyond(stored),  # type: ignore[misc]
                    what="the agent delivering a batch",
                )
                # New records arrive, and the agent dies while it is working on them.
                write_spool(worker, chunk)
                agent.send_signal(signal.SIGKILL)
                assert await wait_exit(agent) == -signal.SIGKILL
                assert uncommitted_bytes(worker, read_committed_position(worker)) > 0

            agent = start_agent(config, log)
            processes.append(agent)
            write_spool(worker, chunks[3])
            await wait_for_events(store_dsn, len(reference_events(records)), timeout_s=90)
            agent.send_signal(signal.SIGTERM)
            assert await wait_exit(agent) == 0, log.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    # Graceful stop committed everything it had delivered.
    assert uncommitted_bytes(worker, read_committed_position(worker)) == 0
    snap = await snapshot(store_dsn)
    assert_store_holds(snap, records)
    assert snap.edges == expected_edges(marker, range(RUNS))
    # Each run spanned both kills and still ended as one run with all its requests.
    assert sorted(snap.run_requests.values()) == [PER_RUN] * RUNS


def test_a_bad_config_exits_non_zero_with_one_line_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("agent:\n  max_batch_events: 0\n")
    completed = subprocess.run(
        [sys.executable, "-m", "agent.agent", "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "agent.max_batch_events" in lines[0]


async def test_kill_9_the_ingester_mid_stream_and_restart_loses_nothing(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    keyring: LocalKeyring,
    marker: str,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    records = etl_records(marker, runs=RUNS, per_run=PER_RUN)
    third = len(records) // 3
    chunks = [records[:third], records[third : 2 * third], records[2 * third :]]
    spool = tmp_path / "spool"
    ingest_config = tmp_path / "ingest.yaml"
    ingest_config.write_text(
        yaml.safe_dump(
            {
                "ingest": {
                    "group_id": f"{topic}-ingest",
                    # Static membership: the restarted ingester gets its partitions back
                    # without waiting out the dead one's session.
                    "instance_id": "ingester-1",
                    "max_poll_records": 3,
                    "poll_timeout": 0.1,
                    "retry_initial": 0.05,
                    "admin_listen": "127.0.0.1:0",
                },
                "kafka": {"bootstrap_servers": kafka_bootstrap, "topic": topic},
                "keys": {"keyring": str(keyring.path)},
                "store": {"dsn": store_dsn, "migrate": False},
            }
        )
    )
    command = [sys.executable, "-m", "agent.ingest", "--config", str(ingest_config)]
    log = tmp_path / "ingest.log"
    config = agent_config(spool, kafka_bootstrap, topic)
    expected = len(reference_events(records))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        async with running_agent(config, KafkaSink(config.kafka, keyring)):
            for chunk in chunks[:2]:
                # Each ingester gets new traffic to be killed in the middle of.
                stored = await stored_event_count(store_dsn)
                write_spool(spool / "w0", chunk)
                ingester = start_process(command, log)
                processes.append(ingester)
                await wait_for(
                    lambda stored=stored: _more_than(store_dsn, stored),  # type: ignore[misc]
                    what="the ingester storing a batch",
                )
                ingester.send_signal(signal.SIGKILL)
                assert await wait_exit(ingester) == -signal.SIGKILL
            write_spool(spool / "w0", chunks[2])
            ingester = start_process(command, log)
            processes.append(ingester)
            await wait_for_events(store_dsn, expected, timeout_s=90)
            ingester.send_signal(signal.SIGTERM)
            assert await wait_exit(ingester) == 0, log.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    snap = await snapshot(store_dsn)
    assert_store_holds(snap, records)
    assert snap.edges == expected_edges(marker, range(RUNS))


async def _more_than(dsn: str, count: int) -> bool:
    return await stored_event_count(dsn) > count
