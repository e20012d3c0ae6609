"""The proxy listener: aiohttp's low-level HTTP server on a SO_REUSEPORT socket.

One `ProxyWorker` runs in each worker process: it owns the listening socket, the TLS
context and its reloader, the upstream pool, the access log, and the order in which they
start and stop. Stopping drains: the socket stops accepting, in-flight requests get up
to `timeouts.shutdown` seconds, then the pool and logs are closed.

aiohttp answers parse errors itself; the handler class here maps "headers too large" to
431 (aiohttp says 400) and answers every parse error with the same JSON shape as the
proxy's own errors.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from lineage_sidecar.config import Config, parse_listen
from proxy.accesslog import AccessLog
from proxy.forward import UNSUPPORTED_VERSION, ErrorBody, Forwarder, encode_error
from proxy.metrics import ProxyMetrics
from proxy.tls import CertificatePaths, CertificateReloader, server_context

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The proxy cannot start (address in use, bad certificate); one line for operators."""


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler with the proxy's error answers and connection gauge."""

    metrics: ProxyMetrics | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.metrics is not None:
            self.metrics.active_connections.inc()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.metrics is not None:
            self.metrics.active_connections.dec()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
        ):
            status, error = 431, "headers_too_large"
            text = "request header fields are too large"
        elif isinstance(exc, BadHttpMessage):
            status, error = 400, "bad_request"
            text = exc.message if isinstance(exc.message, str) else "malformed request"
        elif status >= 500:
            log.error("error handling request", exc_info=exc)
            return super().handle_error(request, status, exc, message)
        else:
            error, text = "bad_request", message or "bad request"
        if self.metrics is not None:
            self.metrics.rejected.labels(str(status)).inc()
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        body = ErrorBody(error=error, message=text[:200], request_id="")
        response = web.Response(
            status=status,
            body=encode_error(body),
            headers={"Content-Type": "application/json"},
        )
        response.force_close()
        return response


class ProxyServer(web.Server):
    """`web.Server` that builds `ProxyRequestHandler`s."""

    def __init__(self, handler: Any, metrics: ProxyMetrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = metrics

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if message.version in (HttpVersion10, HttpVersion11):
            return web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        # HTTP/0.9 (C parser) or HTTP/2.0 and 9.9 (Python parser) in a request line: answer
        # with a 1.1 status line the client can read, and have the handler refuse it.
        message = message._replace(version=HttpVersion11, should_close=True)
        request = web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        request[UNSUPPORTED_VERSION] = True
        return request

    def __call__(self) -> RequestHandler:
        handler = ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.metrics = self._metrics
        return handler


def bind_sockets(listen: str, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address; SO_REUSEPORT lets the kernel spread
    connections over the workers that each own one. Port 0 picks one free port for all."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                # Only for our own workers: with one socket, leaving SO_REUSEPORT off means
                # a second instance started by mistake fails instead of sharing the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
            port = sock.getsockname()[1]
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class ProxyWorker:
    """Everything one worker process serves, started and stopped in order."""

    def __init__(
        self,
        config: Config,
        metrics: ProxyMetrics,
        tls_paths: CertificatePaths | None,
        sock: socket.socket,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._tls_paths = tls_paths
        self._sock = sock
        self.ssl_context: ssl.SSLContext | None = None
        self.reloader: CertificateReloader | None = None
        self.access_log: AccessLog | None = None
        self.forwarder: Forwarder | None = None
        self._runner: web.ServerRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        proxy = self.config.proxy
        if proxy.tls.enabled:
            assert self._tls_paths is not None
            try:
                self.ssl_context = server_context(proxy.tls, self._tls_paths)
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(
                    f"cannot load the TLS certificate {self._tls_paths.cert_file}: {exc}"
                ) from None
            self.reloader = CertificateReloader(self.ssl_context, proxy.tls, self._tls_paths)
        if self.config.log.access_log is not None:
            self.access_log = AccessLog(
                self.config.log.access_log,
                self.config.log.access_log_buffer,
                self.metrics.access_log_dropped.inc,
            )
        self.forwarder = Forwarder(
            proxy, self.metrics, self.access_log, scheme="https" if proxy.tls.enabled else "http"
        )
        self.forwarder.start()
        limits = proxy.limits
        server = ProxyServer(
            self.forwarder,
            self.metrics,
            max_line_size=limits.max_request_line_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            access_log=None,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=proxy.timeouts.shutdown
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock, ssl_context=self.ssl_context)
        await site.start()
        assert self.forwarder.pool is not None
        self._spawn(self.forwarder.pool.run_sweeper(), "upstream-pool-sweeper")
        if self.reloader is not None:
            self._spawn(self._watch_certificates(self.reloader), "tls-reloader")
        if self.access_log is not None:
            self._spawn(self.access_log.run(), "access-log-writer")
        # Everything built so far lives as long as the process: move it out of the cyclic
        # collector's reach so full collections (the proxy's p99 spikes) scan less.
        gc.collect()
        gc.freeze()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def _watch_certificates(self, reloader: CertificateReloader) -> None:
        interval = self.config.proxy.tls.reload_interval
        while True:
            await asyncio.sleep(interval)
            failures = reloader.failures
            if reloader.check():
                self.metrics.tls_reloads.labels("ok").inc()
            elif reloader.failures != failures:
                self.metrics.tls_reloads.labels("error").inc()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the rest in order."""
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.access_log is not None:
            await self.access_log.flush()
            self.access_log.close()
        if self.forwarder is not None and self.forwarder.pool is not None:
            self.forwarder.pool.close()
