"""The admin listener: liveness, readiness with reasons, and Prometheus metrics.

`/healthz` answers 200 while the process runs. `/readyz` runs every readiness check and
answers with the reasons as JSON, so an operator (or a Kubernetes probe's log) sees *why*:
503 when one of them means requests cannot be served (the upstream unreachable, a worker
down, Redis unreachable, the audit log refusing), 200 when every reason is only a
degradation the proxy serves through (`degraded: ...`: policy files that do not load while
the last good policy is in force, a full spool under `fail_open`). Taking every replica out
of a Service for one bad policy edit, or for a lineage outage, would turn a degradation
into an outage of the data service. `/metrics` is the Prometheus text exposition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from proxy.metrics import render

# A readiness check returns the reasons the process is not fully serving, [] when it is.
ReadinessCheck = Callable[[], Awaitable[list[str]]]
# A reason that starts so is a degradation served through, not a reason to take traffic away.
DEGRADED = "degraded: "


def serving(reasons: list[str]) -> bool:
    """Whether requests can be served despite these reasons (all are degradations)."""
    return all(reason.startswith(DEGRADED) for reason in reasons)


class Readiness(msgspec.Struct):
    ready: bool
    reasons: list[str]


class TCPProbe:
    """Is something accepting connections at host:port? Cached briefly to spare it."""

    def __init__(self, name: str, host: str, port: int, *, ttl: float = 1.0) -> None:
        self._name = name
        self._host = host
        self._port = port
        self._ttl = ttl
        self._checked_at = -1e9
        self._last: str | None = None

    async def __call__(self) -> str | None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < self._ttl:
            return self._last
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(self._host, self._port)
            writer.close()
            self._last = None
        except (OSError, TimeoutError) as exc:
            detail = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            self._last = f"{self._name} {self._host}:{self._port} unreachable: {detail}"
        self._checked_at = loop.time()
        return self._last


class RedisProbe:
    """Does Redis answer a PING within `timeout`? Its own connection, not the request
    pool's: a probe must neither wait behind requests nor hold a connection they need."""

    def __init__(self, url: str, password: str | None, *, timeout: float = 0.5) -> None:
        self._password = password
        self._timeout = timeout
        self._client = Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def __call__(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            detail = str(exc) or "timed out"
            if self._password:
                # redis-py names host and port, never the password; make sure of it.
                detail = detail.replace(self._password, "***")
            return f"redis unreachable: {detail}"
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def admin_app(checks: list[ReadinessCheck], registry: CollectorRegistry | None) -> web.Application:
    encoder = msgspec.json.Encoder()

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        results = await asyncio.gather(*(check() for check in checks))
        reasons = [reason for result in results for reason in result]
        ready = serving(reasons)
        body = encoder.encode(Readiness(ready=ready, reasons=reasons))
        return web.Response(
            status=200 if ready else 503, body=body, content_type="application/json"
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=render(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
