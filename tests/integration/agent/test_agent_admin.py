"""The agent's admin listener, on the real `lineage-sidecar agent` process and PostgreSQL.

What an operator scraping or probing the agent sees: it is alive, its metrics follow what
it delivers, a worker spool it has to stop turns `/readyz` to 503 naming that spool while
the other spools go on, and a listener it cannot open stops it with one line.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.spool import encode_segment_header, segment_name
from tests.integration.agent.harness import (
    CLI,
    END_HEADER,
    etl_records,
    execute,
    http_get,
    logged_admin_url,
    metric_samples,
    reference_events,
    run_command,
    start_process,
    stored_event_count,
    wait_for,
    wait_for_events,
    write_spool,
)


def write_config(path: Path, spool: Path, dsn: str, admin_listen: str) -> Path:
    config = {
        "agent": {
            "spool_dir": str(spool),
            "sink": "direct",
            "linger": 0.02,
            "poll_interval": 0.02,
            "tick_interval": 0.1,
            "retry_initial": 0.05,
            "retry_max": 0.5,
            "admin_listen": admin_listen,
        },
        "derive": {"runs": {"end_header": END_HEADER, "idle_timeout_ns": 3600 * 10**9}},
        "store": {"dsn": dsn, "migrate": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return start_process([CLI, "agent", "--config", str(config)], log)


async def test_the_agent_reports_health_readiness_and_metrics(
    tmp_path: Path, store_dsn: str, marker: str
) -> None:
    spool = tmp_path / "spool"
    first = etl_records(marker, runs=3, per_run=8)
    second = etl_records(marker, runs=2, per_run=8, first_run=3)
    write_spool(spool / "w0", first)
    config = write_config(tmp_path / "agent.yaml", spool, store_dsn, "127.0.0.1:0")
    log = tmp_path / "agent.log"
    process = start_agent(config, log)
    try:
        admin = await logged_admin_url(process, log, "agent")
        async with aiohttp.ClientSession() as session:

            async def metrics() -> dict[str, float]:
                status, text = await http_get(session, f"{admin}/metrics")
                assert status == 200
                return metric_samples(text)

            async def delivered(count: int) -> bool:
                now = await metrics()
                return (
                    now["lineage_agent_events_derived_total"] == count
                    and now["lineage_agent_events_sent_total"] == count
                    and now["lineage_agent_lag_bytes"] == 0
                )

            assert await http_get(session, f"{admin}/healthz") == (200, "ok\n")
            expected = len(reference_events(first))
            await wait_for(lambda: delivered(expected), what=f"{expected} events sent")
            assert await stored_event_count(store_dsn) == expected
            status, body = await http_get(session, f"{admin}/readyz")
            assert (status, json.loads(body)) == (200, {"ready": True, "reasons": []})

            # A worker spool of a segment format this agent does not know appears.
            (spool / "w1").mkdir(mode=0o700)
            bad = spool / "w1" / segment_name(1)
            bad.write_bytes(encode_segment_header(1, format_version=7))

            async def not_ready() -> bool:
                return (await http_get(session, f"{admin}/readyz"))[0] == 503

            await wait_for(not_ready, what="/readyz reporting the stopped spool")
            status, body = await http_get(session, f"{admin}/readyz")
            readiness: dict[str, Any] = json.loads(body)
            assert readiness["ready"] is False
            [reason] = readiness["reasons"]
            assert reason.startswith(f"spool w1 stopped: {bad}: ")
            assert "unknown spool segment format version 7" in reason

            # The other spool keeps being delivered, and the metrics follow.
            write_spool(spool / "w0", second)
            expected = len(reference_events(first + second))
            await wait_for(lambda: delivered(expected), what=f"{expected} events sent")
            assert await stored_event_count(store_dsn) == expected
            now = await metrics()
            assert now["lineage_agent_records_read_total"] == len(first) + len(second)
            assert now["lineage_agent_spools_reading"] == 1
            assert now["lineage_agent_spools_stopped"] == 1
            assert now["lineage_agent_send_failures_total"] == 0
            assert (await http_get(session, f"{admin}/readyz"))[0] == 503
            assert (await http_get(session, f"{admin}/nothing-here"))[0] == 404

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Stopped: the port no longer accepts.
    host, port = admin.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 5):
        pass


async def test_a_sink_that_keeps_failing_turns_readyz_to_503_until_a_send_goes_through(
    tmp_path: Path, store_dsn: str, marker: str
) -> None:
    # PostgreSQL itself refuses every run event (a constraint no row meets) until the
    # constraint goes: what an operator sees meanwhile is a 503 naming the sink.
    refuse = "ALTER TABLE events_raw ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"
    allow = "ALTER TABLE events_raw DROP CONSTRAINT IF EXISTS refuse_all"
    records = etl_records(marker, runs=2, per_run=8)
    expected = len(reference_events(records))
    spool = tmp_path / "spool"
    write_spool(spool / "w0", records)
    config = write_config(tmp_path / "agent.yaml", spool, store_dsn, "127.0.0.1:0")
    log = tmp_path / "agent.log"
    await execute(store_dsn, refuse)
    process = start_agent(config, log)
    try:
        admin = await logged_admin_url(process, log, "agent")
        async with aiohttp.ClientSession() as session:

            async def readiness() -> tuple[int, dict[str, Any]]:
                status, body = await http_get(session, f"{admin}/readyz")
                return status, json.loads(body)

            async def failing_twice() -> bool:
                status, body = await readiness()
                return status == 503 and any(
                    r.startswith("sink failing (") and "attempts in a row" in r
                    and int(r.split("(")[1].split()[0]) >= 2
                    for r in body["reasons"]
                )  # fmt: skip

            await wait_for(failing_twice, what="/readyz naming the failing sink")
            status, body = await readiness()
            assert status == 503
            [reason] = body["reasons"]
            assert "refuse_all" in reason, reason
            _, text = await http_get(session, f"{admin}/metrics")
            assert metric_samples(text)["lineage_agent_send_failures_total"] >= 2
            assert await stored_event_count(store_dsn) == 0

            await execute(store_dsn, allow)

            async def ready() -> bool:
                return (await readiness())[0] == 200

            await wait_for(ready, what="/readyz ready again once a send went through")
            assert await readiness() == (200, {"ready": True, "reasons": []})
            await wait_for_events(store_dsn, expected)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()[-3000:]
    finally:
        await execute(store_dsn, allow)
        if process.poll() is None:
            process.kill()
            process.wait()


COMMANDS = {
    "cli": [CLI, "agent", "--config"],
    "module": [sys.executable, "-m", "agent.agent", "--config"],
}


@pytest.mark.parametrize("entry", sorted(COMMANDS))
def test_an_admin_port_in_use_stops_the_start_with_one_line(tmp_path: Path, entry: str) -> None:
    # Nothing listens at this store: the listener is bound before the sink is opened.
    unreachable = "postgresql://unused@127.0.0.1:1/unused"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = write_config(tmp_path / "agent.yaml", tmp_path / "spool", unreachable, listen)
        result = run_command([*COMMANDS[entry], str(config)])
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    prog = "lineage-sidecar" if entry == "cli" else "python -m agent.agent"
    assert line == f"{prog}: agent.admin_listen: cannot listen on {listen}: Address already in use"


@pytest.mark.parametrize("entry", sorted(COMMANDS))
def test_a_bad_admin_listen_exits_non_zero_with_one_line_naming_it(
    tmp_path: Path, entry: str
) -> None:
    config = write_config(tmp_path / "agent.yaml", tmp_path / "spool", "unused", "localhost:99999")
    result = run_command([*COMMANDS[entry], str(config)])
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "agent.admin_listen: port 99999 is out of range" in line
