"""`lineage-sidecar agent` and `ingest` with `keys.provider: vault`: the whole path, for real.

spool -> agent process -> Kafka -> ingester process -> PostgreSQL, both processes started
through the console script from one shared configuration file, their data keys wrapped by a
real Vault Transit server (OpenBao in dev mode, tests/vault.py). Each process has the least
privilege its role needs: the agent's token may only encrypt, the ingester's (an environment
override of the same file) only decrypt. `lineage-sidecar keys rotate` with an operator's
token rotates the Transit key while both run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from agent.crypto import decode_header
from tests.integration.agent.harness import (
    END_HEADER,
    create_topic,
    etl_records,
    raw_messages,
    reference_events,
    snapshot,
    wait_for_events,
    write_spool,
)
from tests.integration.agent.test_pipeline import assert_store_holds, expected_edges
from tests.vault import MOUNT, DevServer, agent_token, create_key, operator_token

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))
RUNS = 3
PER_RUN = 10


def shared_config(
    path: Path, *, spool: Path, bootstrap: str, topic: str, dsn: str, vault: dict[str, object]
) -> Path:
    config = {
        "agent": {
            "spool_dir": str(spool),
            "sink": "kafka",
            "max_batch_events": 25,
            "linger": 0.02,
            "poll_interval": 0.02,
            "tick_interval": 0.2,
            "retry_initial": 0.05,
            "retry_max": 0.5,
            "admin_listen": "127.0.0.1:0",
        },
        "derive": {"runs": {"end_header": END_HEADER, "idle_timeout_ns": 3600 * 10**9}},
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "key_buckets": 8},
        "keys": {"provider": "vault", "vault": vault},
        "store": {"dsn": dsn, "migrate": False},
        "ingest": {
            "group_id": f"{topic}-ingest",
            "poll_timeout": 0.1,
            "retry_initial": 0.05,
            "admin_listen": "127.0.0.1:0",
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start(command: str, config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [CLI, command, "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


async def wrapped_keys(bootstrap: str, topic: str) -> dict[bytes, bytes]:
    """Every message on the topic -> the wrapped data key in its header."""
    messages = await raw_messages(bootstrap, topic)
    assert all(value is not None for _, value in messages)
    return {value: decode_header(value).wrapped_key for _, value in messages if value}


async def test_agent_and_ingest_commands_seal_with_vault_and_store_every_event(
    tmp_path: Path,
    store_dsn: str,
    kafka_bootstrap: str,
    topic: str,
    marker: str,
    vault_server: DevServer,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    key = create_key(vault_server)
    tokens = {
        "agent": agent_token(vault_server, key, ("encrypt",)),
        "ingester": agent_token(vault_server, key, ("decrypt",)),
        "operator": operator_token(vault_server, key),
    }
    for name, token in tokens.items():
        (tmp_path / f"{name}-token").write_text(token + "\n")
    spool = tmp_path / "spool"
    config = shared_config(
        tmp_path / "sidecar.yaml",
        spool=spool,
        bootstrap=kafka_bootstrap,
        topic=topic,
        dsn=store_dsn,
        vault={
            "address": vault_server.url,
            "token": f"file:{tmp_path / 'agent-token'}",
            "mount": MOUNT,
            "key_name": key,
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEAGE_SIDECAR_")}
    ingester_env = {
        **env,
        "LINEAGE_SIDECAR_KEYS__VAULT__TOKEN": f"file:{tmp_path / 'ingester-token'}",
    }
    first = etl_records(marker, runs=RUNS, per_run=PER_RUN)
    second = etl_records(marker, runs=RUNS, per_run=PER_RUN, first_run=RUNS)
    log = tmp_path / "processes.log"
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        write_spool(spool / "w0", first)
        processes["ingest"] = start("ingest", config, log, ingester_env)
        processes["agent"] = start("agent", config, log, env)
        await wait_for_events(store_dsn, len(reference_events(first)), timeout_s=90)

        before = await wrapped_keys(kafka_bootstrap, topic)
        assert before
        for value, wrapped in before.items():
            assert decode_header(value).key_id == f"vault:{MOUNT}/{key}"
            assert wrapped.startswith(b"vault:v1:")
            for plaintext in (marker.encode(), b"src_", b"user_"):
                assert plaintext not in value

        # Rotate the Transit key while both run; neither is told.
        operator = f"file:{tmp_path / 'operator-token'}"
        rotated = await asyncio.to_thread(
            subprocess.run,
            [CLI, "keys", "rotate", "--config", str(config), "--vault-token", operator],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert rotated.returncode == 0, rotated.stderr
        assert "v2" in rotated.stdout
        write_spool(spool / "w0", second)
        await wait_for_events(store_dsn, len(reference_events(first + second)), timeout_s=90)

        after = await wrapped_keys(kafka_bootstrap, topic)
        new = {value: wrapped for value, wrapped in after.items() if value not in before}
        assert new
        assert all(wrapped.startswith(b"vault:v2:") for wrapped in new.values())

        for name in ("agent", "ingest"):
            processes[name].send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(processes[name].wait, 30)
            assert code == 0, log.read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    snap = await snapshot(store_dsn)
    assert snap.dead_letters == []
    assert_store_holds(snap, first + second)
    assert snap.edges == expected_edges(marker, range(2 * RUNS))
    assert sorted(snap.run_requests.values()) == [PER_RUN] * (2 * RUNS)


def test_an_unresolvable_vault_token_stops_agent_and_ingest_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "agent": {
                    "spool_dir": str(tmp_path / "spool"),
                    "sink": "kafka",
                    "admin_listen": "127.0.0.1:0",
                },
                "ingest": {"admin_listen": "127.0.0.1:0"},
                "keys": {
                    "provider": "vault",
                    "vault": {
                        "address": "http://127.0.0.1:1",
                        "token": "env:LINEAGE_TEST_NO_SUCH_VAULT_TOKEN",
                    },
                },
                "store": {"dsn": "postgresql://unused@127.0.0.1:1/unused"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "LINEAGE_TEST_NO_SUCH_VAULT_TOKEN"}
    # The module entry points the benchmarks use end the same way (each reads only its
    # own sections).
    sections = yaml.safe_load(config.read_text())
    for module, drop in (("agent.agent", ("store", "ingest")), ("agent.ingest", ("agent",))):
        own = tmp_path / f"{module}.yaml"
        own.write_text(yaml.safe_dump({k: v for k, v in sections.items() if k not in drop}))
        result = subprocess.run(
            [sys.executable, "-m", module, "--config", str(own)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert result.returncode == 1, (module, result.stderr)
        assert result.stderr.strip().splitlines()[-1] == (
            f"python -m {module}: keys.vault.token: environment variable "
            "'LINEAGE_TEST_NO_SUCH_VAULT_TOKEN' is not set"
        )
        assert "Traceback" not in result.stderr
    for command in ("agent", "ingest"):
        checked = subprocess.run(
            [CLI, command, "--config", str(config), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        result = subprocess.run(
            [CLI, command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.strip().splitlines()[-1] == (
            "lineage-sidecar: keys.vault.token: environment variable "
            "'LINEAGE_TEST_NO_SUCH_VAULT_TOKEN' is not set"
        )
        assert "Traceback" not in result.stderr
