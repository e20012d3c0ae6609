"""A proxy restarted while its spool holds undelivered records loses none of them: the
agent, started only afterwards, delivers the records of both proxy lifetimes exactly once."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml
from authlib.jose import JsonWebKey

from tests.integration.proxy.conftest import run_proxy
from tests.integration.proxy.rawhttp import get
from tests.integration.proxy.test_gate import AUDIENCE, ISSUER, MODEL, POLICY, ROUTES, Issuer

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))


async def _admin(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _reads(dsn: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT a.request_id FROM access_events a JOIN datasets d ON d.id = a.dataset_id "
            "WHERE d.name = 'sales.orders'"
        )
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await connection.close()
    return [row["request_id"] for row in rows]


def _agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [CLI, "agent", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )


def test_restart_with_undelivered_spool_loses_nothing(
    pg_dsn: str, echo_upstream: str, tmp_path: Path
) -> None:
    name = f"lineage_restart_{secrets.token_hex(6)}"
    asyncio.run(_admin(pg_dsn, f'CREATE DATABASE "{name}"'))
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path="/" + name))
    try:
        key = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "k1"})
        keyset = tmp_path / "jwks.json"
        keyset.write_text(json.dumps({"keys": [key.as_dict(is_private=False)]}))
        for file, text in (("model.conf", MODEL), ("policy.csv", POLICY), ("routes.yaml", ROUTES)):
            (tmp_path / file).write_text(text)
        spool = tmp_path / "spool"
        extra: dict[str, Any] = {
            "auth": {
                "jwt_issuers": [
                    {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "key_file": str(keyset),
                        "roles_claim": "roles",
                    }
                ]
            },
            "policy": {
                "model": str(tmp_path / "model.conf"),
                "policies": [str(tmp_path / "policy.csv")],
                "routes": str(tmp_path / "routes.yaml"),
                "audit_log": str(tmp_path / "audit.jsonl"),
            },
            "capture": {"spool_dir": str(spool), "service": "http://sales.test"},
        }
        token = Issuer(key).token("alice", ["analyst"])
        auth = f"Authorization: Bearer {token}\r\n"
        sent: list[str] = []
        for lifetime in ("first", "second"):
            with run_proxy(tmp_path / lifetime, echo_upstream, extra=extra) as proxy:
                for _ in range(15):
                    reply = get(proxy.port, "/sales/orders.json", headers=auth)
                    assert reply.status == 200
                    sent.append(_request_id(reply.json()))
            # run_proxy stops the proxy with SIGTERM: the spool is flushed and closed.
        assert len(set(sent)) == 30

        agent_config = tmp_path / "agent.yaml"
        (tmp_path / "dsn").write_text(dsn)
        agent_config.write_text(
            yaml.safe_dump(
                {
                    "agent": {
                        "spool_dir": str(spool),
                        "sink": "direct",
                        "linger": 0.1,
                        "admin_listen": "127.0.0.1:0",
                    },
                    "store": {"dsn": f"file:{tmp_path / 'dsn'}"},
                }
            )
        )
        for round_ in range(2):  # the second agent must find nothing new to deliver
            agent = _agent(agent_config, tmp_path / "agent.log")
            try:
                deadline = time.monotonic() + 30
                delivered: list[str] = []
                while time.monotonic() < deadline and len(delivered) < 30:
                    delivered = asyncio.run(_reads(dsn))
                    time.sleep(0.2)
                if round_ == 1:
                    # Let the second agent really start (and read the spool) before asking
                    # it to stop: it must find everything already committed.
                    log = tmp_path / "agent.log"
                    while (
                        time.monotonic() < deadline and log.read_text().count("reading spool") < 2
                    ):
                        time.sleep(0.1)
                    time.sleep(0.5)
                    delivered = asyncio.run(_reads(dsn))
            finally:
                agent.send_signal(signal.SIGTERM)
                assert agent.wait(timeout=30) == 0, (tmp_path / "agent.log").read_text()
            assert sorted(delivered) == sorted(sent)
    finally:
        asyncio.run(_admin(pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _request_id(seen: dict[str, Any]) -> str:
    for header, value in seen["headers"]:
        if header.lower() == "x-request-id":
            return str(value)
    raise AssertionError("the upstream saw no X-Request-Id")
