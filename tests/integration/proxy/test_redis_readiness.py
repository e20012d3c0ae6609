"""/readyz and Redis: with a `redis` section, every authenticated request fails closed
(503) while Redis is down, so readiness probes must see the outage, and its end."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lineage_sidecar.ports import free_port
from tests.integration.proxy.conftest import run_proxy, wait_for_readyz
from tests.integration.proxy.rawhttp import get

PASSWORD = "probe-secret-7f3a"
# Nothing written to disk: a restarted server starts empty, as after a crash.
REDIS_OPTIONS = (
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
    "--requirepass",
    PASSWORD,
)


@contextlib.contextmanager
def redis_server(port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Our own redis-server on `port` (never the shared one: this test stops it)."""
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), *REDIS_OPTIONS],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield process
    finally:
        kill(process)


def kill(process: subprocess.Popen[bytes]) -> None:
    """Gone at once, as in a crash: no goodbye to the proxy's connections."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("workers", [1, 2])
def test_readyz_follows_redis_down_and_back(
    echo_upstream: str, tmp_path: Path, workers: int
) -> None:
    redis_port = free_port()
    extra: dict[str, Any] = {
        "auth": {
            "jwt_issuers": [
                {"issuer": "https://idp.test", "audiences": ["a"], "shared_secret": "s" * 48}
            ]
        },
        "redis": {
            "url": f"redis://127.0.0.1:{redis_port}/0",
            "password": "env:LS_TEST_REDIS_PASSWORD",
        },
    }
    env = {"LS_TEST_REDIS_PASSWORD": PASSWORD}
    # With several workers the supervisor answers /readyz, with each worker's reasons.
    down = ["redis unreachable"] + [f"worker {i}: " for i in range(workers) if workers > 1]
    with (
        redis_server(redis_port, tmp_path / "redis-1.log") as redis,
        run_proxy(
            tmp_path, echo_upstream, proxy={"workers": workers}, extra=extra, env=env
        ) as proxy,
    ):
        assert get(proxy.admin_port, "/readyz").status == 200
        kill(redis)
        body = wait_for_readyz(proxy.admin_port, 503, *down)
        assert PASSWORD not in body
        # Liveness is not readiness: the process is fine, restarting it would not help.
        assert get(proxy.admin_port, "/healthz").status == 200
        with redis_server(redis_port, tmp_path / "redis-2.log"):
            assert "redis" not in wait_for_readyz(proxy.admin_port, 200)
