"""Session fixtures that hand tests the real PostgreSQL, Redis and Kafka.

Each fixture takes its address from the environment (``LS_PG_DSN``, ``LS_REDIS_URL``,
``LS_KAFKA_BOOTSTRAP``), else from ``var/services/env`` written by ``scripts/services up``,
else from the fixed loopback defaults. For those defaults the fixture runs
``scripts/services up <service>`` once per session: a no-op of a fraction of a second when the
service is up, and the one place that checks it is really ours and usable (credentials,
PING, a Kafka Metadata answer), not merely that something listens on the port. An address
set by hand is only checked for a listening port.

A service that cannot be had FAILS the test, with the reason; it never skips. A suite that
quietly skips its integration tests passes while the product is broken.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICES_SCRIPT = REPO_ROOT / "scripts" / "services"
ENV_FILE = REPO_ROOT / "var" / "services" / "env"
# A cold start resolves the Kafka jars with Maven before the broker boots.
START_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Service:
    """One backing service: the script's name for it, its variable and its default address."""

    name: str
    env_var: str
    default: str

    def address(self, env_file: Path = ENV_FILE) -> str:
        """The configured address: environment first, then the env file, then the default."""
        configured = os.environ.get(self.env_var)
        if configured:
            return configured
        return read_env_file(env_file).get(self.env_var, self.default)


POSTGRES = Service("pg", "LS_PG_DSN", "postgresql://lineage:lineage@127.0.0.1:55432/lineage")
REDIS = Service("redis", "LS_REDIS_URL", "redis://127.0.0.1:56379/0")
KAFKA = Service("kafka", "LS_KAFKA_BOOTSTRAP", "127.0.0.1:59092")


def read_env_file(path: Path) -> dict[str, str]:
    """Parse the ``export NAME=value`` lines that ``scripts/services up`` writes."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.strip():
            values[name.strip()] = value.strip().strip("'\"")
    return values


def host_port(address: str) -> tuple[str, int]:
    """Where to connect for a DSN/URL (``scheme://user@host:port/...``) or ``host:port,...``."""
    if "://" in address:
        parts = urlsplit(address)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"no host:port in {address!r}")
        return parts.hostname, parts.port
    host, sep, port = address.split(",")[0].strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host, int(port)


def reachable(address: str) -> bool:
    """True when something accepts TCP connections at the address."""
    try:
        with socket.create_connection(host_port(address), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class StartOutcome:
    """What ``scripts/services up`` said, and whether it succeeded."""

    ok: bool
    output: str


_start_outcomes: dict[str, StartOutcome] = {}


def start_service(service: Service) -> StartOutcome:
    """Run ``scripts/services up <name>`` at most once per session."""
    if service.name not in _start_outcomes:
        try:
            completed = subprocess.run(
                ["bash", str(SERVICES_SCRIPT), "up", service.name],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
            outcome = StartOutcome(
                ok=completed.returncode == 0,
                output=completed.stdout + completed.stderr,
            )
        except subprocess.TimeoutExpired:
            outcome = StartOutcome(
                ok=False,
                output=f"scripts/services up {service.name} still running after {START_TIMEOUT_S}s",
            )
        _start_outcomes[service.name] = outcome
    return _start_outcomes[service.name]


def require(service: Service) -> str:
    """The address of a usable service, starting it if needed; fails the test if impossible."""
    address = service.address()
    if address != service.default:
        if not reachable(address):
            pytest.fail(
                f"{service.env_var}={address} is not reachable; start that server or unset "
                f"{service.env_var} to use scripts/services",
                pytrace=False,
            )
        return address
    outcome = start_service(service)
    if not outcome.ok:
        pytest.fail(
            f"`scripts/services up {service.name}` could not provide {service.name} "
            f"at {address}:\n{outcome.output}",
            pytrace=False,
        )
    return address


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of the test PostgreSQL; role ``lineage`` owns the database and may create others."""
    return require(POSTGRES)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis (database 0, no persistence)."""
    return require(REDIS)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of the single-node test Kafka (topics are auto-created)."""
    return require(KAFKA)
