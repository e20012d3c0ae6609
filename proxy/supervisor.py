"""Process model: one process for one worker, or a supervisor with N worker processes.

The supervisor binds the listening sockets itself (so a bad or busy address fails at once,
with a clear message, and the port is open before anyone reports ready), hands one
SO_REUSEPORT socket to each spawned worker, serves the admin listener, restarts a worker
that dies, and on SIGTERM/SIGINT asks the workers to drain and waits for them.
With `workers: 1` everything runs in one process, which is also what tests and the demo use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import tempfile
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import SynchronizedString
from pathlib import Path
from typing import cast

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prom_multiprocess

from lineage_sidecar.config import Config, parse_listen, parse_upstream
from proxy.admin import DEGRADED, ReadinessCheck, TCPProbe, admin_app
from proxy.authz.store import PolicyLoadError, load_snapshot
from proxy.listener import ProxyWorker, StartupError, bind_sockets
from proxy.metrics import ProxyMetrics
from proxy.tls import CertificatePaths, resolve_paths

# A worker's readiness reasons, in shared memory the supervisor reads.
SharedBytes = SynchronizedString

log = logging.getLogger(__name__)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def start_admin(
    config: Config, checks: list[ReadinessCheck], registry: CollectorRegistry | None
) -> web.AppRunner:
    runner = web.AppRunner(admin_app(checks, registry), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_listen(config.admin.listen)
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {config.admin.listen}: {exc.strerror}") from None
    return runner


def upstream_probe(config: Config) -> ReadinessCheck:
    if config.proxy.upstream is None:
        # The lineage API runs inside this process: nothing remote to probe.
        async def inside() -> list[str]:
            return []

        return inside
    upstream = parse_upstream(config.proxy.upstream)
    probe = TCPProbe("upstream", upstream.host, upstream.port)

    async def reachable() -> list[str]:
        problem = await probe()
        return [] if problem is None else [problem]

    return reachable


class Proxy:
    """A running single-process proxy; the unit tests and the demo drive this directly."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self.tls_paths: CertificatePaths | None = (
            resolve_paths(config.proxy.tls) if config.proxy.tls.enabled else None
        )
        self.worker: ProxyWorker | None = None
        self.admin: web.AppRunner | None = None
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        (sock,) = bind_sockets(self.config.proxy.listen, 1)
        self.port = sock.getsockname()[1]
        self.worker = ProxyWorker(self.config, self.metrics, self.tls_paths, sock)
        worker = self.worker

        async def worker_ready() -> list[str]:
            return worker.readiness()

        try:
            await self.worker.start()
            self.admin = await start_admin(
                self.config, [upstream_probe(self.config), worker_ready], self.registry
            )
        except BaseException:
            await self.stop()
            raise
        for site in self.admin.sites:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.admin_port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.cleanup()
        if self.worker is not None:
            await self.worker.stop()


async def _serve_single(config: Config) -> None:
    proxy = Proxy(config)
    await proxy.start()
    scheme = "https" if config.proxy.tls.enabled else "http"
    log.info(
        "proxy listening on %s://%s -> %s (admin on http://%s)",
        scheme,
        config.proxy.listen,
        config.proxy.upstream,
        config.admin.listen,
    )
    await _stop_event().wait()
    log.info("stopping: draining in-flight requests")
    await proxy.stop()


# How often a worker publishes why it is not ready, and how much of that fits.
STATUS_INTERVAL_S = 0.5
STATUS_BYTES = 2048


# Between a worker's reasons in its status (a reason never holds this control character).
STATUS_SEPARATOR = "\x1e"


def publish_status(status: SharedBytes, reasons: list[str]) -> None:
    """Write a worker's readiness reasons where the supervisor reads them ('' = ready)."""
    clean = [reason.replace(STATUS_SEPARATOR, " ") for reason in reasons]
    text = STATUS_SEPARATOR.join(clean).encode("utf-8", "replace")[: STATUS_BYTES - 1]
    # Array('c').value stops at the first NUL, so what was longer before does not linger.
    status.value = text


def read_status(status: SharedBytes) -> list[str]:
    text = status.value.decode("utf-8", "replace")
    return text.split(STATUS_SEPARATOR) if text else []


def _worker_main(
    config: Config,
    tls_paths: CertificatePaths | None,
    sock: socket.socket,
    ready: multiprocessing.synchronize.Event,
    status: SharedBytes,
    index: int,
    workers: int,
) -> None:
    """Entry point of a worker process (spawned, so it imports everything afresh)."""
    configure_logging(config.log.level)

    async def serve() -> None:
        worker = ProxyWorker(
            config, ProxyMetrics(None), tls_paths, sock, index=index, workers=workers
        )
        stop = _stop_event()
        await worker.start()
        publish_status(status, worker.readiness())
        ready.set()
        # The supervisor's /readyz reports each worker's own reasons (a policy edit this
        # worker refused, its spool full): they live in this process, so it publishes them.
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=STATUS_INTERVAL_S)
            publish_status(status, worker.readiness())
        await worker.stop()

    uvloop.run(serve())


class _WorkerSlot:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.process: BaseProcess | None = None
        self.ready: multiprocessing.synchronize.Event | None = None
        self.status: SharedBytes | None = None


async def _serve_workers(config: Config, metrics_dir: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    tls_paths = resolve_paths(config.proxy.tls) if config.proxy.tls.enabled else None
    slots = [
        _WorkerSlot(i, s)
        for i, s in enumerate(bind_sockets(config.proxy.listen, config.proxy.workers))
    ]

    def spawn(slot: _WorkerSlot) -> None:
        slot.ready = ctx.Event()
        slot.status = cast(SharedBytes, ctx.Array("c", STATUS_BYTES))
        slot.process = ctx.Process(
            target=_worker_main,
            args=(config, tls_paths, slot.sock, slot.ready, slot.status, slot.index, len(slots)),
            name=f"lineage-sidecar-worker-{slot.index}",
            daemon=False,
        )
        slot.process.start()

    async def workers_ready() -> list[str]:
        down = [
            s.index
            for s in slots
            if s.process is None
            or not s.process.is_alive()
            or s.ready is None
            or not s.ready.is_set()
        ]
        reasons = [f"workers not serving: {down}"] if down else []
        for s in slots:
            if s.index in down or s.status is None:
                continue
            for reason in read_status(s.status):
                # The worker's reason keeps its own kind: "degraded: worker 1: ...".
                if reason.startswith(DEGRADED):
                    reasons.append(f"{DEGRADED}worker {s.index}: {reason[len(DEGRADED) :]}")
                else:
                    reasons.append(f"worker {s.index}: {reason}")
        return reasons

    for slot in slots:
        spawn(slot)
    admin = await start_admin(config, [upstream_probe(config), workers_ready], None)
    log.info(
        "proxy listening on %s with %d workers -> %s (admin on http://%s)",
        config.proxy.listen,
        len(slots),
        config.proxy.upstream,
        config.admin.listen,
    )
    stop = _stop_event()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        for slot in slots:
            if not stop.is_set() and slot.process is not None and not slot.process.is_alive():
                log.error(
                    "worker %d exited with code %s; starting a new one",
                    slot.index,
                    slot.process.exitcode,
                )
                prom_multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    slot.process.pid or 0, metrics_dir
                )
                spawn(slot)
    log.info("stopping: asking %d workers to drain", len(slots))
    for slot in slots:
        if slot.process is not None and slot.process.is_alive() and slot.process.pid:
            os.kill(slot.process.pid, signal.SIGTERM)
    deadline = config.proxy.timeouts.shutdown + 5.0
    loop = asyncio.get_running_loop()
    for slot in slots:
        if slot.process is not None:
            await loop.run_in_executor(None, slot.process.join, deadline)
            if slot.process.is_alive():
                log.error("worker %d did not stop in time; killing it", slot.index)
                slot.process.kill()
    await admin.cleanup()
    for slot in slots:
        slot.sock.close()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


def run(config: Config) -> None:
    """Run the proxy until SIGINT/SIGTERM (the `lineage-sidecar proxy` command)."""
    configure_logging(config.log.level)
    if config.proxy.workers == 1:
        uvloop.run(_serve_single(config))
        return
    if config.policy is not None:
        # Workers load the policy themselves; check it here first, so a broken policy
        # stops the command with one line instead of workers dying and being restarted.
        try:
            load_snapshot(
                Path(config.policy.model),
                [Path(p) for p in config.policy.policies],
                Path(config.policy.routes),
            )
        except PolicyLoadError as exc:
            raise StartupError(f"policy: {exc}") from None
    metrics_dir = tempfile.mkdtemp(prefix="lineage-sidecar-metrics-")
    # Must be in the environment before prometheus_client is imported by the workers.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvloop.run(_serve_workers(config, metrics_dir))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
