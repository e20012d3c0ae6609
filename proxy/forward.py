"""Forwarding: one client request to the upstream and its answer back, streamed.

What the upstream sees is built here, and only here: the method as parsed, the request
target exactly as the client sent it (origin-form only; normalization is the authz stage's
job), `HTTP/1.1` always, the client's end-to-end headers, and the proxy's own
`X-Forwarded-For/-Proto/-Host`, `Forwarded` and `X-Request-Id`. Hop-by-hop headers, the
headers a `Connection` header names, and client-supplied forwarding headers (unless the
peer is a trusted proxy) never pass. Bodies are streamed both ways; a small complete
response is sent in one write.

Errors answer with a short JSON body: 400/413/431 for the client's faults, 502 when the
upstream cannot be reached or breaks the exchange, 504 when it is too slow.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
from aiohttp import web
from aiohttp.http import StreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from lineage_sidecar.config import ProxyConfig, parse_upstream
from proxy.accesslog import AccessLog
from proxy.authn.sessions import without_cookie
from proxy.gate import Admission, Gate, Refusal
from proxy.internal import InternalBackend, longest_prefix_first
from proxy.metrics import ProxyMetrics
from proxy.tap import Tap
from proxy.upstream import UpstreamConnection, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Request headers the proxy sets itself: the client's copies are dropped.
PROXY_SET = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
        b"forwarded",
        b"x-request-id",
        # Rewrite and override headers: some frameworks route by these instead of the
        # request line, which would let a client reach a path or method the policy never
        # saw. The policy decides on the request line only, so they never pass.
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-forwarded-uri",
        b"x-forwarded-path",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
# Response headers whose framing the proxy decides itself.
RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}

# Set on requests whose request line named an HTTP version other than 1.0 or 1.1.
UNSUPPORTED_VERSION = "lineage_sidecar.unsupported_version"
# The answer to any request target other than a path (absolute-form, authority-form, "*").
ORIGIN_FORM_ONLY = "only origin-form request targets (/path) are accepted"

# Status recorded for a request whose client left before its answer (nginx's 499).
CLIENT_CLOSED = 499

# Responses up to this size that have fully arrived are answered in one write.
SMALL_BODY = 64 * 1024

# Methods a proxy may send again on its own (RFC 9110 section 9.2.2): repeating them has
# the same effect on the upstream as sending them once.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_HOST_RE = re.compile(r"^(?:[A-Za-z0-9\-._~]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9\-_.:]{1,128}$")


class ErrorBody(msgspec.Struct):
    error: str
    message: str
    request_id: str


encode_error = msgspec.json.Encoder().encode


def error_response(status: int, error: str, message: str, request_id: str) -> web.Response:
    body = encode_error(ErrorBody(error=error, message=message, request_id=request_id))
    return web.Response(
        status=status,
        body=body,
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )


class ClientError(Exception):
    """A request the proxy refuses to forward; answered with `status`."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        # Length first: a cheap filter before lower-casing every header name.
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def _quote_forwarded(node: str) -> str:
    """RFC 7239 node: IPv6 addresses are bracketed and quoted."""
    return f'"[{node}]"' if ":" in node else node


# Request ids are 96 random bits from this process's own generator, seeded by the OS (and
# again in a forked child): unique across workers and replicas, but not secret, which
# nothing needs them to be. A getrandom system call per request cost three times as much.
_request_ids = random.Random()  # noqa: S311 (not a secret, see above)
os.register_at_fork(after_in_child=_request_ids.seed)
_random_bytes = _request_ids.randbytes


@dataclass(slots=True)
class Exchange:
    """What one request's handling learned, for the tap."""

    admission: Admission | None = None
    bytes_in: int = 0
    # Body bytes sent to the client (framing and headers not counted).
    bytes_out: int = 0
    # The client went away mid-response, noticed on a write rather than by cancellation.
    client_closed: bool = False
    excerpt: bytearray | None = None


class Forwarder:
    """The request handler: validates framing, forwards, streams the answer back."""

    def __init__(
        self,
        config: ProxyConfig,
        metrics: ProxyMetrics,
        access_log: AccessLog | None,
        *,
        scheme: str,
        gate: Gate | None = None,
        tap: Tap | None = None,
        body_excerpt_bytes: int = 0,
        internal: Sequence[InternalBackend] = (),
    ) -> None:
        # Without an upstream URL the backend is given to start() (the lineage API's socket).
        upstream = parse_upstream(config.upstream or "http://localhost")
        self._config = config
        self._metrics = metrics
        self._access_log = access_log
        self._gate = gate
        self._tap = tap
        self._strip = gate.strip if gate is not None else frozenset()
        # The same plus the verified bearer credential, for requests that carried one.
        self._strip_authorization = self._strip | {b"authorization"}
        cookie = gate.session_cookie if gate is not None else None
        self._session_cookie = cookie.encode("ascii") if cookie else None
        self._excerpt_limit = body_excerpt_bytes if tap is not None else 0
        # Most specific prefix first (the admin API under the identity provider's path).
        self._internal = longest_prefix_first(internal)
        self._scheme = scheme
        self._base_path = upstream.base_path.encode("ascii")
        self._upstream_host = upstream.authority.encode("ascii")
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies)
        self._trusted_cache: dict[str, bool] = {}
        self._read_timeout = config.timeouts.read
        self._body_timeout = config.timeouts.client_body
        self._client_write_timeout = config.timeouts.client_write
        self._max_body = config.limits.max_body_bytes
        self._upstream_addr = (upstream.host, upstream.port)
        self.pool: UpstreamPool | None = None

    def start(self, backend: UpstreamPool | None = None) -> None:
        if backend is not None:
            self.pool = backend
            return
        pool = self._config.pool
        self.pool = UpstreamPool(
            self._upstream_addr[0],
            self._upstream_addr[1],
            max_connections=pool.max_connections,
            max_idle=pool.max_idle,
            idle_timeout=pool.idle_timeout,
            connect_timeout=self._config.timeouts.connect,
        )

    def _is_trusted(self, peer: str | None) -> bool:
        if peer is None or not self._trusted:
            return False
        known = self._trusted_cache.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                known = False
            else:
                known = any(address in net for net in self._trusted)
            if len(self._trusted_cache) < 10_000:
                self._trusted_cache[peer] = known
        return known

    # --- request head -------------------------------------------------------------------
    def _request_head(
        self,
        request: web.BaseRequest,
        request_id: str,
        framing: bytes,
        target: str | None = None,
        identity: bytes = b"",
        base_path: bytes | None = None,
        drop_authorization: bool = False,
        keep_session_cookie: bool = False,
    ) -> bytes:
        if target is None:
            target = request.raw_path
        if not target.startswith("/"):
            raise ClientError(400, "bad_request_target", ORIGIN_FORM_ONLY)
        if not target.isascii():
            raise ClientError(400, "bad_request_target", "the request target must be ASCII")
        raw_headers = request.raw_headers
        host = request.headers.get("Host")
        if host is None:
            if request.version >= (1, 1):
                raise ClientError(400, "missing_host", "HTTP/1.1 requests need a Host header")
            host = self._upstream_host.decode("ascii")
        elif not _HOST_RE.match(host):
            raise ClientError(400, "bad_host", "the Host header is not a valid host[:port]")

        peer = request.remote
        trusted = self._is_trusted(peer)
        dropped = (
            _connection_tokens(raw_headers) if "Connection" in request.headers else frozenset()
        )
        lines: list[bytes] = [
            request.method.encode("ascii"), b" ",
            self._base_path if base_path is None else base_path, target.encode("ascii"),
            b" HTTP/1.1\r\nHost: ",
            host.encode("ascii") if self._config.preserve_host else self._upstream_host,
            b"\r\n",
        ]  # fmt: skip
        strip = self._strip_authorization if drop_authorization else self._strip
        session_cookie = None if keep_session_cookie else self._session_cookie
        prior_for = b""
        prior_proto = b""
        prior_host = b""
        for name, value in raw_headers:
            lname = name.lower()
            if (
                lname in HOP_BY_HOP
                or lname in PROXY_SET
                or lname in dropped
                or (strip and lname.replace(b"_", b"-") in strip)
            ):
                if trusted:
                    if lname == b"x-forwarded-for":
                        prior_for = value
                    elif lname == b"x-forwarded-proto":
                        prior_proto = value
                    elif lname == b"x-forwarded-host":
                        prior_host = value
                continue
            if lname == b"cookie" and session_cookie is not None:
                value = without_cookie(value, session_cookie)
                if not value:
                    continue
            lines += (name, b": ", value, b"\r\n")
        peer_text = peer or "unknown"
        forwarded_for = (
            prior_for + b", " + peer_text.encode("ascii")
            if prior_for
            else peer_text.encode("ascii")
        )
        proto = prior_proto or self._scheme.encode("ascii")
        fwd_host = prior_host or host.encode("ascii")
        lines += (
            b"X-Forwarded-For: ", forwarded_for, b"\r\n",
            b"X-Forwarded-Proto: ", proto, b"\r\n",
            b"X-Forwarded-Host: ", fwd_host, b"\r\n",
            b"Forwarded: for=", _quote_forwarded(peer_text).encode("ascii"),
            b";proto=", proto, b";host=\"", fwd_host, b"\"\r\n",
            b"X-Request-Id: ", request_id.encode("ascii"), b"\r\n",
            identity, framing, b"\r\n",
        )  # fmt: skip
        return b"".join(lines)

    def _framing(self, request: web.BaseRequest) -> tuple[bytes, int | None, bool]:
        """Check the body's framing; returns (header lines, length, chunked)."""
        headers = request.headers
        te_values = headers.getall("Transfer-Encoding", [])
        cl_values = headers.getall("Content-Length", [])
        if te_values:
            if request.version < (1, 1):
                raise ClientError(
                    400, "bad_framing", "Transfer-Encoding is not allowed in HTTP/1.0 requests"
                )
            if cl_values:
                raise ClientError(
                    400, "bad_framing", "both Content-Length and Transfer-Encoding were sent"
                )
            if len(te_values) != 1 or te_values[0].strip().lower() != "chunked":
                raise ClientError(
                    400, "bad_framing", "only 'Transfer-Encoding: chunked' is accepted"
                )
            return b"Transfer-Encoding: chunked\r\n", None, True
        if cl_values:
            if len(cl_values) != 1 or not cl_values[0].isdigit():
                raise ClientError(400, "bad_framing", "invalid Content-Length")
            length = int(cl_values[0])
            if self._max_body is not None and length > self._max_body:
                raise ClientError(
                    413, "body_too_large", f"the request body is larger than {self._max_body} bytes"
                )
            if length:
                return b"Content-Length: " + cl_values[0].encode("ascii") + b"\r\n", length, False
            if request.method in ("POST", "PUT", "PATCH"):
                return b"Content-Length: 0\r\n", 0, False
        return b"", 0, False

    # --- handler ------------------------------------------------------------------------
    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = _random_bytes(12).hex()
        status = 500
        exchange = Exchange()
        try:
            response = await self._forward(request, request_id, exchange)
            status = CLIENT_CLOSED if exchange.client_closed else response.status
            return response
        except Refusal as exc:
            status = exc.status
            exchange.admission = exc.admission
            refused = self._error(request, exchange, status, exc.error, exc.message, request_id)
            refused.headers.update(exc.headers)
            return refused
        except ClientError as exc:
            status = exc.status
            self._metrics.rejected.labels(str(status)).inc()
            return self._error(request, exchange, status, exc.error, exc.message, request_id)
        except UpstreamError as exc:
            status = exc.status
            self._metrics.upstream_error[exc.kind].inc()
            error = "upstream_" + exc.kind
            return self._error(request, exchange, status, error, exc.message, request_id)
        except asyncio.CancelledError:
            # The client went away (the server cancels its handler); nginx logs this as 499.
            status = CLIENT_CLOSED
            raise
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.count_response(status, elapsed)
            waiting = None
            if self._tap is not None:
                waiting = self._tap.record(
                    request,
                    request_id=request_id,
                    time_ns=time.time_ns() - int(elapsed * 1e9),
                    status=status,
                    bytes_in=exchange.bytes_in,
                    bytes_out=exchange.bytes_out,
                    duration_s=elapsed,
                    admission=exchange.admission,
                    body_excerpt=bytes(exchange.excerpt) if exchange.excerpt else None,
                )
            if self._access_log is not None:
                self._access_log.record(
                    (
                        request_id, time.time(), request.remote, request.method, request.raw_path,
                        status, exchange.bytes_out, elapsed, request.headers.get("User-Agent"),
                    )
                )  # fmt: skip
            if waiting is not None:
                # Last: a client that hangs up while its record waits for room in the spool
                # cancels this await, and nothing after it would run.
                assert self._tap is not None
                await self._tap.append_wait(waiting)

    @staticmethod
    def _error(
        request: web.BaseRequest,
        exchange: Exchange,
        status: int,
        error: str,
        message: str,
        request_id: str,
    ) -> web.Response:
        """An error answer, its body counted as sent (aiohttp sends none to a HEAD)."""
        response = error_response(status, error, message, request_id)
        if request.method != "HEAD":
            exchange.bytes_out = response.content_length or 0
        return response

    async def _forward(
        self, request: web.BaseRequest, request_id: str, exchange: Exchange
    ) -> web.StreamResponse:
        if UNSUPPORTED_VERSION in request:
            raise ClientError(505, "http_version", "only HTTP/1.0 and HTTP/1.1 are supported")
        framing, length, chunked = self._framing(request)
        pool = self.pool
        if self._gate is not None:
            admitted = self._gate.admit(request, request_id)
            admission = exchange.admission = (
                admitted if isinstance(admitted, Admission) else await admitted
            )
            base_path = None
            keep_session_cookie = False
            for backend in self._internal:
                if backend.matches(admission.target):
                    pool, base_path = backend.pool, b""
                    keep_session_cookie = backend.reads_session
                    break
            head = self._request_head(
                request,
                request_id,
                framing,
                admission.target,
                admission.identity,
                base_path,
                drop_authorization=admission.drop_authorization,
                keep_session_cookie=keep_session_cookie,
            )
            sql = admission.match.route.sql if admission.match is not None else None
            if sql is not None and sql.location == "body" and self._excerpt_limit:
                exchange.excerpt = bytearray()
        else:
            head = self._request_head(request, request_id, framing)
        has_body = chunked or bool(length)
        if has_body and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert pool is not None
        head_request = request.method == "HEAD"
        conn = await pool.acquire()
        try:
            conn.start_exchange(head, head_request=head_request)
            if has_body:
                await self._send_body(request, conn, chunked, exchange)
            try:
                await conn.wait_headers(self._read_timeout)
            except UpstreamError as exc:
                # A kept-alive connection the upstream closed just as we reused it: try once
                # more on a fresh one when nothing came back, no body was sent and the method
                # is idempotent. The upstream may have acted on a POST before closing, so a
                # second copy could repeat its effect: the client gets the 502 instead.
                if not (
                    conn.reused
                    and exc.before_response
                    and not has_body
                    and request.method in IDEMPOTENT
                ):
                    raise
                pool.release(conn, reusable=False)
                conn = await pool.acquire()
                conn.start_exchange(head, head_request=head_request)
                await conn.wait_headers(self._read_timeout)
            return await self._respond(request, conn, request_id, pool, exchange)
        except BaseException:
            pool.release(conn, reusable=False)
            raise

    async def _send_body(
        self,
        request: web.BaseRequest,
        conn: UpstreamConnection,
        chunked: bool,
        exchange: Exchange,
    ) -> None:
        content = request.content
        total = 0
        limit = self._max_body
        while True:
            try:
                async with asyncio.timeout(self._body_timeout):
                    data = await content.readany()
            except TimeoutError:
                raise ClientError(408, "body_timeout", "the request body stalled") from None
            except (HttpProcessingError, ConnectionError) as exc:
                # The client went away or broke the framing mid-body: the upstream has a
                # half request, so that connection is closed by the caller, never pooled.
                raise ClientError(400, "bad_body", f"the request body was cut off: {exc}") from None
            if not data:
                break
            total += len(data)
            exchange.bytes_in = total
            excerpt = exchange.excerpt
            if excerpt is not None and len(excerpt) < self._excerpt_limit:
                excerpt += data[: self._excerpt_limit - len(excerpt)]
            if limit is not None and total > limit:
                raise ClientError(
                    413, "body_too_large", f"the request body is larger than {limit} bytes"
                )
            piece = b"%x\r\n%b\r\n" % (len(data), data) if chunked else data
            if not await conn.write_body(piece, self._read_timeout):
                # The upstream answered early: the rest of the body is not read, and the
                # server discards it after the answer (aiohttp's lingering close).
                return
        if chunked:
            await conn.write_body(b"0\r\n\r\n", self._read_timeout)

    def _response_headers(self, conn: UpstreamConnection) -> tuple[CIMultiDict[str], int | None]:
        raw = conn.headers
        dropped = _connection_tokens(raw)
        length: int | None = None
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in raw:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise UpstreamError(
                        "protocol", 502, "upstream sent an invalid Content-Length",
                        before_response=False,
                    ) from None  # fmt: skip
                continue
            if lname in RESPONSE_DROP or lname in dropped:
                continue
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        return headers, length

    async def _respond(
        self,
        request: web.BaseRequest,
        conn: UpstreamConnection,
        request_id: str,
        pool: UpstreamPool,
        exchange: Exchange,
    ) -> web.StreamResponse:
        headers, length = self._response_headers(conn)
        status = conn.status
        if not conn.message_done and length is not None and length <= SMALL_BODY:
            await conn.wait_message(self._read_timeout)
        if conn.message_done:
            body = conn.take_buffered()
            if request.method == "HEAD" or status in (204, 304):
                if length is not None and request.method == "HEAD":
                    headers["Content-Length"] = str(length)
                whole = web.Response(status=status, headers=headers)
            else:
                whole = web.Response(status=status, body=body, headers=headers)
                exchange.bytes_out = len(body)
            self._finished(conn, pool, request_id)
            return whole

        response = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            response.content_length = length
        # The server's writer is always aiohttp's StreamWriter, whose write() can skip the drain.
        writer = cast(StreamWriter, await response.prepare(request))
        protocol = request.protocol
        sent = 0
        try:
            while True:
                chunk = await conn.next_chunk(self._read_timeout)
                if chunk is None:
                    break
                # Drained here rather than in write(), so that only a write the client is
                # not taking arms a timer.
                await writer.write(chunk, drain=False)
                sent += len(chunk)
                if protocol.writing_paused:
                    async with asyncio.timeout(self._client_write_timeout):
                        await writer.drain()
        except TimeoutError:
            # The client stopped reading: cut it off and free the upstream connection.
            log.info("client stopped reading the response (request %s)", request_id)
            if request.transport is not None:
                request.transport.abort()
            pool.release(conn, reusable=False)
            return response
        except UpstreamError as exc:
            # The status line is already on its way: the only honest signal left is to cut
            # the client connection, so it sees a truncated body rather than a short one.
            self._metrics.upstream_error[exc.kind].inc()
            log.warning("upstream failed mid-response (request %s): %s", request_id, exc.message)
            if request.transport is not None:
                request.transport.abort()
            pool.release(conn, reusable=False)
            return response
        except ConnectionError:
            # The client reset the connection and a write found it closing before the
            # server cancelled this handler: the same hang-up, not a server error.
            exchange.client_closed = True
            pool.release(conn, reusable=False)
            return response
        finally:
            # Also when the client went away mid-body: what it was sent so far.
            exchange.bytes_out = sent
        try:
            await response.write_eof()
        except ConnectionError:
            exchange.client_closed = True
        self._finished(conn, pool, request_id)
        return response

    def _finished(self, conn: UpstreamConnection, pool: UpstreamPool, request_id: str) -> None:
        """Give back the connection of a whole response. The upstream may still have broken
        the exchange after it (a second response): counted and logged, and the connection,
        closed by then, is not pooled."""
        error = conn.error
        if error is not None:
            self._metrics.upstream_error[error.kind].inc()
            log.warning(
                "upstream misbehaved after answering (request %s): %s", request_id, error.message
            )
        pool.release(conn, reusable=True)
