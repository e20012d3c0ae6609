"""The admin listener of the lineage agent and of the ingester: liveness, readiness with
reasons, and Prometheus metrics.

The same contract as the proxy's admin listener, on a port of each process's own
(`agent.admin_listen`, default `127.0.0.1:9902`; `ingest.admin_listen`, default
`127.0.0.1:9903`): `GET /healthz` answers 200 while the process runs; `GET /readyz` answers
200 `{"ready": true, "reasons": []}` when the process reports nothing wrong, else 503 with
its reasons (a stopped spool; a store, Kafka or key provider that keeps failing); `GET
/metrics` is the text exposition of its counters, read when scraped, by its `MetricTable`.
Any other path is 404. The handlers decide nothing: the reasons and the values come from
the process.

The socket is bound by `bind_admin` before the process opens its sink or store, so an
address in use ends the start at once (`AdminListenError`, one line naming the field)
instead of after a database migration.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import parse_listen
from agent.metrics import AGENT_METRICS, MetricTable, StatsCollector

log = logging.getLogger(__name__)

FIELD = "agent.admin_listen"


class AdminListenError(Exception):
    """The admin listener cannot be bound; the message is one line naming the field."""


class Observed(Protocol):
    """What the admin listener reads from the agent or the ingester."""

    def stats(self) -> object: ...

    def readiness(self) -> list[str]: ...


class Readiness(msgspec.Struct):
    ready: bool
    reasons: list[str]


def admin_app(
    readiness: Callable[[], list[str]], stats: Callable[[], object], metrics: MetricTable
) -> web.Application:
    """`/healthz`, `/readyz` from `readiness()`, `/metrics` from `stats()` by `metrics`."""
    encoder = msgspec.json.Encoder()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(metrics, stats))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        reasons = readiness()
        body = encoder.encode(Readiness(ready=not reasons, reasons=reasons))
        return web.Response(
            status=200 if not reasons else 503, body=body, content_type="application/json"
        )

    async def exposition(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", exposition)
    return app


def bind_admin(listen: str, field: str = FIELD) -> socket.socket:
    """A listening socket on `listen` (validated at load), or AdminListenError naming
    `field`, the configuration field it came from."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a restart is not refused by the last run's connections in
        # TIME_WAIT. No SO_REUSEPORT: a second process on the same port must fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise AdminListenError(
            f"{field}: cannot listen on {listen}: {exc.strerror or exc}"
        ) from None
    return sock


class AdminListener:
    """The admin listener of one process, on a socket from `bind_admin`."""

    def __init__(
        self, observed: Observed, sock: socket.socket, metrics: MetricTable = AGENT_METRICS
    ) -> None:
        app = admin_app(observed.readiness, observed.stats, metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._socket = sock
        host, self.port = sock.getsockname()[:2]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket).start()

    async def stop(self) -> None:
        """Stop accepting and close the connections (a scrape in flight ends first)."""
        await self._runner.cleanup()
        self._socket.close()  # when it never started; a no-op once the site closed it


async def run_until_signalled(
    name: str,
    service: Coroutine[Any, Any, None],
    stop: Callable[[], None],
    admin: AdminListener | None,
) -> None:
    """Run `service` (the agent's or the ingester's `run()`), and `admin` when given, until
    the service ends or SIGTERM or SIGINT arrives.

    Stop order: the admin listener stops accepting, then `stop()` asks the service to
    finish, and its end is awaited (its errors are raised here)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    running = asyncio.create_task(service, name=f"lineage-{name}")
    signalled = asyncio.create_task(stopping.wait(), name=f"lineage-{name}-stop-signal")
    try:
        if admin is not None:
            await admin.start()
            log.info("%s admin listener on %s", name, admin.url)
        await asyncio.wait((running, signalled), return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        if admin is not None:
            await admin.stop()
        stop()
        await running
