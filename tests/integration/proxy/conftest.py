"""Real processes for the proxy tests: upstreams and the proxy started through its CLI.

The proxy runs as `lineage-sidecar proxy --config FILE` in a subprocess, once with
aiohttp's C HTTP parser and once with `AIOHTTP_NO_EXTENSIONS=1` (the pure-Python parser),
because request smuggling defences must hold for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lineage_sidecar.demo import make_sample_database, stop_process
from lineage_sidecar.ports import free_port
from proxy.tls import generate_dev_pair
from tests.integration.proxy.rawhttp import get

REPO = Path(__file__).resolve().parents[3]
CLI = str(Path(sys.executable).with_name("lineage-sidecar"))


def wait_for_readyz(admin_port: int, status: int, *needles: str) -> str:
    """The /readyz body once it has `status` and holds every needle (workers report about
    twice a second; the deadline is a safety net, not a timing requirement)."""
    deadline = time.monotonic() + 15
    while True:
        reply = get(admin_port, "/readyz")
        body = reply.body.decode()
        if reply.status == status and all(n in body for n in needles):
            return body
        assert time.monotonic() < deadline, (status, reply.status, body)
        time.sleep(0.1)


def wait_for(url: str, seconds: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds} s:\n{log.read_text()}")


@dataclass
class RunningProxy:
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]
    log: Path
    config_path: Path
    tls: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")


@contextlib.contextmanager
def run_proxy(
    tmp: Path,
    upstream: str | None,
    *,
    tls: dict[str, Any] | None = None,
    proxy: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    extra: dict[str, Any] | None = None,
    port: int | None = None,
) -> Iterator[RunningProxy]:
    """Start the proxy CLI on free ports; stop it (SIGTERM, drain) afterwards."""
    tmp.mkdir(parents=True, exist_ok=True)
    port, admin_port = port or free_port(), free_port()
    config: dict[str, Any] = {
        "proxy": {
            "listen": f"127.0.0.1:{port}",
            "upstream": upstream,
            "tls": tls if tls is not None else {"enabled": False},
            **(proxy or {}),
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"access_log": str(tmp / "access.log"), "level": "info"},
        **(extra or {}),
    }
    config_path = tmp / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp / "proxy.log"
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [CLI, "proxy", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=tmp,
        )
    running = RunningProxy(
        port, admin_port, process, log, config_path, tls=bool(tls and tls.get("enabled", True))
    )
    try:
        url = f"{running.admin_url}/readyz" if wait_ready else f"{running.admin_url}/healthz"
        wait_for(url, 30, process, log)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def echo_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_echo_upstream(tmp_path_factory.mktemp("echo")) as url:
        yield url


@contextlib.contextmanager
def running_echo_upstream(directory: Path) -> Iterator[str]:
    """The echo upstream (it answers with what it received), its URL while the block runs."""
    port_file = directory / "port"
    log = directory / "echo.log"
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.proxy.echo_upstream", str(port_file)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"echo upstream did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def datasette_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Datasette (a real third-party data service) serving a small SQLite database."""
    directory = tmp_path_factory.mktemp("datasette")
    database = directory / "sales.db"
    make_sample_database(database)
    port = free_port()
    log = directory / "datasette.log"
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "datasette", "serve", str(database),
                "--host", "127.0.0.1", "--port", str(port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/-/versions.json", 30, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


PARSERS = {"c-parser": {}, "python-parser": {"AIOHTTP_NO_EXTENSIONS": "1"}}


@pytest.fixture(scope="session", params=sorted(PARSERS))
def plain_proxy(
    request: pytest.FixtureRequest, echo_upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    """The proxy over plain HTTP in front of the echo upstream, once per HTTP parser."""
    directory = tmp_path_factory.mktemp(f"proxy-{request.param}")
    with run_proxy(
        directory,
        echo_upstream,
        proxy={
            "limits": {"max_body_bytes": 1_100_000_000, "max_headers": 50},
            "timeouts": {"read": 2.0, "client_body": 5.0},
        },
        env=PARSERS[request.param],
    ) as running:
        yield running


@dataclass
class TLSProxy:
    proxy: RunningProxy
    ca_file: Path
    cert_dir: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context


@pytest.fixture(scope="session")
def tls_proxy(
    datasette_upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TLSProxy]:
    """The proxy with TLS 1.3 and an explicit certificate pair, in front of Datasette."""
    directory = tmp_path_factory.mktemp("tls-proxy")
    paths = generate_dev_pair(directory / "certs")
    tls = {
        "cert_file": str(paths.cert_file),
        "key_file": str(paths.key_file),
        "reload_interval": 0.2,
    }
    with run_proxy(directory, datasette_upstream, tls=tls) as running:
        assert paths.ca_file is not None
        yield TLSProxy(running, paths.ca_file, directory / "certs")


def read_json(data: bytes) -> Any:
    return json.loads(data)
