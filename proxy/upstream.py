"""HTTP/1.1 client side of the proxy: a keep-alive pool of raw connections to one upstream.

Built on asyncio protocols and httptools (llhttp) instead of aiohttp's client: the proxy
already holds a parsed request and only needs to write bytes and parse one response, and
the general-purpose client's per-request machinery (URL objects, cookie jar, tracing,
redirect handling) cost a third of the proxy's time in profiles.

Promises: a connection returns to the pool only after a complete exchange on a connection
both sides want to keep alive; any error, timeout, unread body or half-sent request
closes it instead. Response bodies are delivered in order with back-pressure (reading
from the upstream pauses while the client is slow).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import cast

import httptools

log = logging.getLogger(__name__)

# Pause reading from the upstream while this much body is waiting for a slow client.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A response's head (status line, header fields, interim responses) is held whole before
# any of it is forwarded: past these limits it is refused with a 502 and the connection
# closed. Generous next to the request side's limits: services send large cookies and
# policies, but not megabytes.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


class UpstreamError(Exception):
    """The upstream could not be used; `kind` names the metric label, `status` the answer."""

    def __init__(self, kind: str, status: int, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message
        # True when nothing of a response arrived: a request without a body may be retried.
        self.before_response = before_response


def _head_too_large() -> UpstreamError:
    return UpstreamError(
        "protocol",
        502,
        f"upstream sent more than {MAX_HEADERS} response header fields "
        f"or {MAX_HEAD_BYTES} bytes of them",
        before_response=False,
    )


class UpstreamConnection(asyncio.Protocol):
    """One connection, one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.in_exchange = False
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.headers_done = False
        self.message_done = False
        self.received_any = False
        self._head_bytes = 0
        self._header_bytes = 0
        self._body: collections.deque[bytes] = collections.deque()
        self._body_size = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self.head_request = False

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_exchange:
            # Bytes on an idle connection answer nothing we asked: never let them be
            # read as the response to the next request.
            self.close()
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(
                UpstreamError("protocol", 502, "upstream switched protocols", before_response=False)
            )
        except httptools.HttpParserError as exc:
            # A callback's own refusal reaches us wrapped by httptools.
            refusal = exc.__context__
            self._fail(
                refusal
                if isinstance(refusal, UpstreamError)
                else UpstreamError(
                    "protocol",
                    502,
                    f"upstream sent a malformed response: {exc}",
                    before_response=not self.headers_done,
                )
            )
        else:
            if not self.headers_done:
                # httptools buffers a header until its end: count what arrives meanwhile.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._fail(_head_too_large())

    def connection_lost(self, exc: Exception | None) -> None:
        closed_by_upstream = not self.closed
        self.closed = True
        self._pool.forget(self)
        if (
            not self.message_done
            and self.headers_done
            and closed_by_upstream
            and exc is None
            and self._body_runs_to_close()
        ):
            # The response named no length (an HTTP/1.0 server, or `Connection: close`):
            # its body ends where the connection does (RFC 9112 section 6.3), so a clean
            # close completes it. llhttp cannot be told of the end of input through
            # httptools, hence the decision here. Such a connection is never reused.
            self.keep_alive = False
            self.message_done = True
            self._wake()
        if not self.message_done:
            self._fail(
                UpstreamError(
                    "closed",
                    502,
                    "upstream closed the connection before the response was complete",
                    before_response=not self.received_any,
                )
            )
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("upstream connection closed"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body_runs_to_close(self) -> bool:
        """Whether the response's headers leave its body delimited by the connection's
        close: no Content-Length and no chunked coding. Only asked when it closes."""
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                return False
            if lname == b"transfer-encoding":
                final_coding = value.rpartition(b",")[2].strip().lower()
                if final_coding == b"chunked":
                    return False
        return True

    # --- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.message_done:
            # A second response to one request (an upstream out of step, or one trying
            # to answer a request nobody sent): parsing stops before it can overwrite the
            # first's status, headers or body, and the connection is closed, never reused.
            raise UpstreamError(
                "protocol", 502, "upstream sent more than one response to one request",
                before_response=False,
            )  # fmt: skip

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            raise _head_too_large()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 200 <= status <= 599:
            if status == 101:
                # Upgrade is hop-by-hop and never forwarded, so no switch was asked for:
                # what follows is not HTTP, and the client must not be told it switched.
                raise UpstreamError(
                    "protocol", 502, "upstream switched protocols unasked (101)",
                    before_response=False,
                )  # fmt: skip
            if not 100 <= status <= 199:
                # llhttp reads any three digits (099, 600, 999): not an HTTP status.
                raise UpstreamError(
                    "protocol", 502, f"upstream answered with status {status:03d}",
                    before_response=False,
                )  # fmt: skip
            # Interim responses (100 Continue, 103 Early Hints) are not forwarded.
            self.headers = []
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        if self.head_request:
            # llhttp cannot be told the request was HEAD, so it would wait for a body
            # the upstream never sends: finish here and never reuse this connection.
            self.keep_alive = False
            self.message_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.head_request:
            return
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # end of an interim response
        self.message_done = True
        self._wake()
        # A whole answer before the whole request body was taken (a 413, a 401) ends the
        # body: a body write waiting for room returns, and the sender sees `message_done`.
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- exchange -----------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def start_exchange(self, head: bytes, *, head_request: bool) -> None:
        self._reset_exchange()
        self.in_exchange = True
        self.head_request = head_request
        assert self.transport is not None
        self.transport.write(head)

    async def write_body(self, data: bytes, timeout: float) -> bool:
        """Write a piece of the request body, waiting while the upstream's socket is full.

        Returns False, having written nothing more, once the upstream's whole answer is
        in: an early answer (a 413, say) means it wants no more of the body, and its answer
        is what the client gets (as Envoy does). The request then went out cut short, so
        the connection is not reused. A response still coming (an upstream streaming its
        answer while it reads the body) does not end the body. An upstream that accepts no
        body bytes for `timeout` seconds is a slow upstream: the connection is aborted and
        the exchange ends with a 504.
        """
        if self.message_done:
            self.keep_alive = False
            return False
        if self.closed or self.transport is None:
            raise self._error or UpstreamError(
                "closed", 502, "upstream closed the connection", before_response=True
            )
        self.transport.write(data)
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drain_waiter
            except ConnectionResetError:
                if self.message_done:
                    return False  # it answered, then closed: the answer stands
                raise self._error or UpstreamError(
                    "closed", 502, "upstream closed the connection", before_response=True
                ) from None
            except TimeoutError:
                self.abort()
                raise UpstreamError(
                    "timeout", 504, "upstream stopped reading the request body",
                    before_response=False,
                ) from None  # fmt: skip
            finally:
                self._drain_waiter = None
            if self.message_done:
                self.keep_alive = False
                return False
        return True

    async def _wait(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            self.abort()
            raise UpstreamError(
                "timeout", 504, "upstream did not answer in time", before_response=False
            ) from None
        finally:
            self._waiter = None

    async def wait_headers(self, timeout: float) -> None:
        while not self.headers_done:
            await self._wait(timeout)

    async def wait_message(self, timeout: float) -> None:
        while not self.message_done:
            await self._wait(timeout)

    @property
    def error(self) -> UpstreamError | None:
        """What ended this connection's exchange early, if anything did; set also when the
        response itself was whole (e.g. a second response after it)."""
        return self._error

    def take_buffered(self) -> bytes:
        """All body bytes received so far, as one piece (for small responses)."""
        data = b"".join(self._body)
        self._body.clear()
        self._body_size = 0
        return data

    async def next_chunk(self, timeout: float) -> bytes | None:
        """The next piece of the response body, or None at its end."""
        while not self._body:
            if self.message_done:
                return None
            await self._wait(timeout)
        chunk = self._body.popleft()
        self._body_size -= len(chunk)
        if self._reading_paused and self._body_size < LOW_WATER and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk


class UpstreamPool:
    """Keep-alive connections to one `host:port`, bounded in total and in idle count."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int,
        max_idle: int,
        idle_timeout: float,
        connect_timeout: float,
        unix_path: str | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        # The sidecar's own endpoints are served on a private unix socket (see proxy.internal).
        self.unix_path = unix_path
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._open: set[UpstreamConnection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def acquire(self) -> UpstreamConnection:
        while self._idle:
            conn = self._idle.pop()  # most recently used first: least likely closed
            if not conn.closed:
                conn.reused = True
                return conn
        if len(self._open) >= self._max_connections:
            # Queued for a slot no longer than a connection may take to open (HAProxy's
            # `timeout queue` defaults to `timeout connect` the same way).
            try:
                async with asyncio.timeout(self._connect_timeout):
                    idle = await self._wait_for_slot()
            except TimeoutError:
                raise UpstreamError(
                    "pool_exhausted",
                    503,
                    f"all {self._max_connections} upstream connections are in use",
                    before_response=True,
                ) from None
            if idle is not None:
                return idle
        return await self._connect()

    async def _wait_for_slot(self) -> UpstreamConnection | None:
        """An idle connection, or None once a new one may be opened."""
        while len(self._open) >= self._max_connections:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                # Woken for a free slot but leaving (cancelled, timed out): pass it on.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    conn.reused = True
                    return conn
        return None

    async def _connect(self) -> UpstreamConnection:
        conn = UpstreamConnection(self)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self.unix_path is not None:
                    await self.loop.create_unix_connection(lambda: conn, self.unix_path)
                else:
                    await self.loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError:
            self.forget(conn)
            raise UpstreamError(
                "connect", 504, "timed out connecting to the upstream", before_response=True
            ) from None
        except OSError as exc:
            self.forget(conn)
            raise UpstreamError(
                "connect",
                502,
                f"cannot connect to the upstream: {exc.strerror or exc}",
                before_response=True,
            ) from None
        except BaseException:
            # Cancelled while connecting: the slot must not stay counted as open.
            conn.close()
            self.forget(conn)
            raise
        return conn

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """Give a connection back after an exchange; closes it unless it is clean."""
        conn.in_exchange = False
        if (
            reusable
            and not conn.closed
            and conn.keep_alive
            and conn.message_done
            and len(self._idle) < self._max_idle
        ):
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
            self.forget(conn)
        self._wake_one()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def sweep(self) -> None:
        """Close connections idle for longer than the idle timeout."""
        deadline = time.monotonic() - self._idle_timeout
        while self._idle and self._idle[0].idle_since < deadline:
            self._idle.popleft().close()

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(min(self._idle_timeout / 2, 5.0))
            self.sweep()

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
