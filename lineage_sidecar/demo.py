"""`lineage-sidecar demo`: the product on one machine, with embedded defaults.

Starts a real third-party data service (Datasette serving a small SQLite database of
sales data) on a free loopback port, puts the proxy in front of it with TLS from a
generated development CA, prints what to try, and writes the same facts as JSON to
`<state-dir>/endpoints.json`. Ctrl-C (or SIGTERM) stops everything. The lineage agent
runs in this process, with its admin listener on `127.0.0.1:9902` (on a free port when
that one is taken: `agent_admin_url` says where).

What the demo does not have yet is written as null in endpoints.json, not faked: the
lineage API (`api_url`), the policy directory and demo users arrive with the
authentication, authorization and lineage issues.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import msgspec
import uvloop
import yaml

from agent.admin import AdminListener, AdminListenError, bind_admin
from agent.agent import LineageAgent, open_sink
from agent.config import AgentProcessConfig
from agent.events import InputDataset, Job, LineageEvent, OutputDataset, Run, RunEvent
from agent.store.writer import StoreWriter
from lineage_sidecar.config import Config, from_mapping, parse_listen, read_mapping
from lineage_sidecar.ports import free_port
from proxy.supervisor import Proxy, configure_logging

SAMPLE_ROWS: dict[str, tuple[str, list[tuple[object, ...]]]] = {
    "customers": (
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, region TEXT)",
        [(1, "Acme Corp", "EMEA"), (2, "Globex", "AMER"), (3, "Initech", "APAC")],
    ),
    "secret": (
        "CREATE TABLE secret (id INTEGER PRIMARY KEY, customer_id INTEGER, credit_limit REAL)",
        [(1, 1, 50000.0), (2, 2, 12000.0), (3, 3, 250000.0)],
    ),
    "orders": (
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES "
        "customers(id), amount REAL NOT NULL, placed_at TEXT NOT NULL)",
        [
            (1, 1, 1200.0, "2026-11-01"),
            (2, 2, 830.5, "2026-11-02"),
            (3, 1, 99.9, "2026-11-03"),
            (4, 3, 4100.0, "2026-11-04"),
        ],
    ),
}


def make_sample_database(path: Path) -> None:
    """(Re)create the demo's SQLite database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        for create, rows in SAMPLE_ROWS.values():
            db.execute(create)
            table = create.split()[2]
            marks = ",".join("?" * len(rows[0]))
            db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)  # noqa: S608
        db.commit()


def start_datasette(database: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start Datasette on loopback and wait until it answers (or raise RuntimeError)."""
    log_file = log_path.open("ab")
    process = subprocess.Popen(  # noqa: S603 (our own interpreter, fixed arguments)
        [
            sys.executable, "-m", "datasette", "serve", str(database),
            "--host", "127.0.0.1", "--port", str(port),
            "--setting", "sql_time_limit_ms", "2000",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log_file.close()
    deadline = time.monotonic() + 30
    url = f"http://127.0.0.1:{port}/-/versions.json"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Datasette exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"Datasette did not answer on port {port} within 30 s; see {log_path}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
DEMO_USERS = (("alice", ("analyst",)), ("bob", ("engineer",)), ("carol", ("admin",)))


@dataclass(frozen=True)
class DemoUser:
    name: str
    password: str
    roles: tuple[str, ...]


def make_users(path: Path) -> list[DemoUser]:
    """Demo accounts with fresh random passwords (bcrypt cost 10: quick to try by hand)."""
    users = [DemoUser(name, secrets.token_urlsafe(12), roles) for name, roles in DEMO_USERS]
    document = {
        "users": [
            {
                "name": user.name,
                "password_hash": bcrypt.hashpw(user.password.encode(), bcrypt.gensalt(10)).decode(),
                "roles": list(user.roles),
            }
            for user in users
        ]
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return users


def demo_config(
    listen: str, admin: str, upstream: str, state_dir: Path, overrides: dict[str, Any]
) -> Config:
    host, port = parse_listen(listen)
    raw: dict[str, Any] = {
        "proxy": {
            "listen": listen,
            "upstream": upstream,
            "tls": {"self_signed_dir": str(state_dir / "tls")},
        },
        "admin": {"listen": admin},
        "log": {"access_log": str(state_dir / "access.log")},
        "auth": {
            "idp": {
                "issuer": f"https://{host}:{port}/_sidecar",
                "audience": "lineage-sidecar-demo",
                "users_file": str(state_dir / "users.yaml"),
                "key_file": str(state_dir / "idp-signing-keys.pem"),
            }
        },
        "policy": {
            "model": str(POLICY_DIR / "model.conf"),
            "policies": [str(POLICY_DIR / "policy.csv")],
            "routes": str(POLICY_DIR / "routes.yaml"),
            "audit_log": str(state_dir / "audit.jsonl"),
        },
        "capture": {"spool_dir": str(state_dir / "spool"), "service": NS_SALES},
    }
    return from_mapping(merge_config(raw, overrides), source="demo", environ=os.environ)


def merge_config(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, at any depth: where both hold a mapping, the
    override's keys replace or add to the base's one by one; any other value (a list, a
    scalar, null) replaces the base's. Neither argument is changed."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge_config(dict(current), value)
        else:
            merged[key] = value
    return merged


def endpoints(config: Config, proxy: Proxy, upstream: str, users: list[DemoUser]) -> dict[str, Any]:
    host, _ = parse_listen(config.proxy.listen)
    admin_host, _ = parse_listen(config.admin.listen)
    scheme = "https" if config.proxy.tls.enabled else "http"
    ca = proxy.tls_paths.ca_file if proxy.tls_paths is not None else None
    return {
        "proxy_url": f"{scheme}://{host}:{proxy.port}",
        "admin_url": f"http://{admin_host}:{proxy.admin_port}",
        "api_url": None,
        "upstream_url": upstream,
        "ca_cert": str(ca.resolve()) if ca is not None else None,
        "policy_dir": str(POLICY_DIR),
        "users": [{"name": u.name, "password": u.password, "roles": list(u.roles)} for u in users],
    }


def print_try_lines(facts: dict[str, Any]) -> None:
    proxy = facts["proxy_url"]
    cacert = f"--cacert {facts['ca_cert']} " if facts["ca_cert"] else ""
    users = {user["name"]: user for user in facts["users"]}
    alice = users["alice"]
    login = (
        f"  TOKEN=$(curl -s {cacert}-X POST {proxy}/_sidecar/auth/login "
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"username": "alice", "password": "{alice["password"]}"}}\' '
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')"
    )
    auth = '-H "Authorization: Bearer $TOKEN" '
    lines = [
        "",
        "Lineage Sidecar demo is running.",
        "Users (name / password / roles):",
        *(f"  {u['name']:6} {u['password']}  {','.join(u['roles'])}" for u in facts["users"]),
        "",
        "Try, as alice (analyst: reads sales datasets, never sales.secret, writes nothing):",
        login,
        f"  curl {cacert}{auth}{proxy}/sales/orders.json",
        f"  curl {cacert}{auth}'{proxy}/sales.json?sql=select+name,+sum(amount)+from+orders+join+"
        "customers+on+customers.id=customer_id+group+by+name'",
        f"  curl {cacert}{proxy}/sales/orders.json            # 401: no token",
        f"  curl {cacert}{auth}{proxy}/sales/secret.json      # 403: deny rule",
        "",
        f"Lineage, from the API at {facts['api_url']} with the same token:",
        f"  curl {cacert}{auth}'{facts['api_url']}/lineage/graph?node={NS_SALES}:sales.dashboard"
        "&direction=up&depth=3'   # sales.secret appears only as a hidden node",
        f"  curl {cacert}{auth}'{facts['api_url']}/datasets/sales.orders/access"
        f"?namespace={NS_SALES}'   # who read it (the queries above)",
        "",
        f"  curl {facts['admin_url']}/readyz",
        f"  curl {facts['admin_url']}/metrics",
        f"  curl {facts['agent_admin_url']}/metrics   # the lineage agent's",
        "  .venv/bin/lineage-sidecar policy explain --as alice GET /sales/secret.json",
        f"  .venv/bin/lineage-sidecar audit verify {facts['audit_log']}",
        "",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), flush=True)


REPO = Path(__file__).resolve().parents[1]
SAMPLE_NAMESPACE = "etl://nightly"


def store_dsn(state_dir: Path) -> str:
    """The lineage store: LS_PG_DSN if set, else the checkout's own PostgreSQL on loopback
    (started with scripts/services, which installs it if needed)."""
    dsn = os.environ.get("LS_PG_DSN")
    if dsn:
        return dsn
    services = REPO / "scripts" / "services"
    if not services.exists():
        raise RuntimeError("no lineage store: set LS_PG_DSN to a PostgreSQL DSN")
    subprocess.run(["bash", str(services), "up", "pg"], check=True)  # noqa: S603, S607
    for line in (REPO / "var" / "services" / "env").read_text().splitlines():
        if line.startswith("export LS_PG_DSN="):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise RuntimeError("scripts/services did not report LS_PG_DSN")


def api_config(api_listen: str, state_dir: Path, issuer: str, audience: str) -> Config:
    raw: dict[str, Any] = {
        "proxy": {"listen": api_listen, "tls": {"self_signed_dir": str(state_dir / "tls")}},
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"access_log": str(state_dir / "api-access.log")},
        "auth": {
            "jwt_issuers": [
                {
                    "issuer": issuer,
                    "audiences": [audience],
                    "key_file": str(state_dir / "idp-jwks.json"),
                    "roles_claim": "roles",
                }
            ]
        },
        "policy": {
            "model": str(POLICY_DIR / "model.conf"),
            "policies": [str(POLICY_DIR / "policy.csv")],
            "routes": str(POLICY_DIR / "api-routes.yaml"),
            "audit_log": str(state_dir / "api-audit.jsonl"),
        },
        "api": {"store_dsn": f"file:{state_dir / 'store-dsn'}"},
    }
    return from_mapping(raw, source="demo-api", environ={})


def agent_config(state_dir: Path) -> AgentProcessConfig:
    return msgspec.convert(
        {
            "agent": {"spool_dir": str(state_dir / "spool"), "sink": "direct", "linger": 0.2},
            "store": {"dsn": f"file:{state_dir / 'store-dsn'}"},
        },
        AgentProcessConfig,
    )


def sample_lineage() -> list[LineageEvent]:
    """What a nightly ETL job would report: two pipelines, one reading the secret table."""
    when = datetime.datetime.now(datetime.UTC)

    def run(name: str, inputs: list[str], outputs: list[str]) -> RunEvent:
        return RunEvent(
            event_type="COMPLETE",
            event_time=when,
            run=Run(run_id=uuid.uuid5(uuid.NAMESPACE_URL, f"demo-{name}")),
            job=Job(namespace=SAMPLE_NAMESPACE, name=name),
            inputs=tuple(InputDataset(namespace=NS_SALES, name=n) for n in inputs),
            outputs=tuple(OutputDataset(namespace=NS_SALES, name=n) for n in outputs),
        )

    return [
        run("daily_revenue", ["sales.orders", "sales.customers"], ["sales.daily_revenue"]),
        run("risk_scores", ["sales.secret", "sales.customers"], ["sales.risk_scores"]),
        run("exec_dashboard", ["sales.daily_revenue", "sales.risk_scores"], ["sales.dashboard"]),
    ]


NS_SALES = "demo-sales"


def agent_admin_socket(process: AgentProcessConfig) -> socket.socket:
    """The agent's admin listener: on its usual port (9902) when free, else on any free
    one; endpoints.json says which."""
    listen = process.agent.admin_listen or "127.0.0.1:0"
    try:
        return bind_admin(listen)
    except AdminListenError as exc:
        host, _ = parse_listen(listen)
        print(f"{exc}; the agent's admin listener takes a free port instead", flush=True)
        return bind_admin(f"{host}:0")


async def _run(
    config: Config,
    state_dir: Path,
    upstream: str,
    users: list[DemoUser],
    api_listen: str,
) -> None:
    proxy = Proxy(config)
    await proxy.start()
    api: Proxy | None = None
    agent: LineageAgent | None = None
    agent_task: asyncio.Task[None] | None = None
    agent_admin: AdminListener | None = None
    sink = None
    try:
        assert proxy.worker is not None
        assert proxy.worker.idp is not None
        idp = proxy.worker.idp
        # The API proxy trusts the demo's identity provider through its public keys.
        (state_dir / "idp-jwks.json").write_bytes(idp.keys.jwks_document)
        assert config.auth is not None
        assert config.auth.idp is not None
        api = Proxy(
            api_config(api_listen, state_dir, config.auth.idp.issuer, config.auth.idp.audience)
        )
        await api.start()
        writer = await StoreWriter.connect((state_dir / "store-dsn").read_text())
        try:
            await writer.write(sample_lineage())
        finally:
            await writer.close()
        process = agent_config(state_dir)
        sink = await open_sink(process)
        agent = LineageAgent(process, sink)
        agent_task = asyncio.get_running_loop().create_task(agent.run(), name="lineage-agent")
        agent_admin = AdminListener(agent, agent_admin_socket(process))
        await agent_admin.start()

        facts = endpoints(config, proxy, upstream, users)
        facts["api_url"] = f"https://{parse_listen(api_listen)[0]}:{api.port}"
        facts["agent_admin_url"] = agent_admin.url
        facts["audit_log"] = config.policy.audit_log if config.policy is not None else None
        path = state_dir / "endpoints.json"
        path.write_text(json.dumps(facts, indent=2) + "\n")
        print(f"endpoints written to {path}")
        print_try_lines(facts)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping the demo ...", flush=True)
    finally:
        # Stop order: stop taking requests, then let the agent deliver what they left.
        await proxy.stop()
        if agent_admin is not None:
            await agent_admin.stop()
        if agent is not None and agent_task is not None:
            agent.stop()
            await agent_task
        if sink is not None:
            await sink.close()
        if api is not None:
            await api.stop()


def run_demo(
    *, listen: str, admin: str, api_listen: str, state_dir: str, config_path: str | None
) -> int:
    configure_logging("info")
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {}
    if config_path is not None:
        overrides = read_mapping(config_path)
    host, listen_port = parse_listen(listen)
    if listen_port == 0:
        # The identity provider's issuer URL names the port: fix it before starting.
        listen = f"{host}:{free_port()}"
    database = state / "sales.db"
    make_sample_database(database)
    users = make_users(state / "users.yaml")
    dsn_file = state / "store-dsn"
    dsn_file.write_text(store_dsn(state))
    dsn_file.chmod(0o600)
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    config = demo_config(listen, admin, upstream, state, overrides)
    datasette = start_datasette(database, port, state / "datasette.log")
    try:
        uvloop.run(_run(config, state, upstream, users, api_listen))
    finally:
        stop_process(datasette)
        (state / "endpoints.json").unlink(missing_ok=True)
    return 0
