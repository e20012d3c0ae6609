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
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import asyncpg
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, InvalidURLError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.api import SERVER_SETTINGS
from agent.spool import SpoolBusyError, SpoolOptions, SpoolWriter, SpoolWriterMetrics
from agent.store.migrate import MigrationError
from lineage_sidecar.config import (
    ApiConfig,
    Config,
    RedisConfig,
    SessionsConfig,
    parse_listen,
)
from proxy.accesslog import AccessLog
from proxy.admin import DEGRADED, RedisProbe
from proxy.audit import AuditEntry, AuditLog
from proxy.authn.chain import AuthChain, Authenticator, BearerJWT, CookieSession, OpaqueBearer
from proxy.authn.idp.app import IdentityProvider
from proxy.authn.idp.config import IdpConfig
from proxy.authn.idp.events import AuthEvent, LoggingEventSink
from proxy.authn.introspection import TokenIntrospector
from proxy.authn.oidc import create_oidc_app
from proxy.authn.principal import Principal
from proxy.authn.saml.config import SamlConfigError, SamlSpConfig
from proxy.authn.saml.state import InProcessSamlStore, RedisSamlStore, SamlStateStore
from proxy.authn.sessions import (
    InProcessSessionStore,
    RedisSessionStore,
    SessionAuthenticator,
    SessionManager,
    SessionStore,
)
from proxy.authz.admin import DEFAULT_CHANNEL as POLICY_CHANNEL
from proxy.authz.admin import admin_api
from proxy.authz.store import PolicyLoadError, PolicyStore
from proxy.forward import (
    ORIGIN_FORM_ONLY,
    UNSUPPORTED_VERSION,
    ErrorBody,
    Forwarder,
    encode_error,
)
from proxy.gate import Gate
from proxy.internal import InternalBackend
from proxy.lineageapi import api_application
from proxy.metrics import ProxyMetrics, WorkerState
from proxy.tap import Tap
from proxy.tls import CertificatePaths, CertificateReloader, server_context
from proxy.upstream import UpstreamPool

log = logging.getLogger(__name__)
# How often the counters of the policy store, spool and audit log reach /metrics.
METRICS_INTERVAL_S = 0.5
# How often a worker PINGs Redis for /readyz, and how long it waits for the answer.
REDIS_PROBE_INTERVAL_S = 1.0
REDIS_PROBE_TIMEOUT_S = 0.5
# An idle kept-alive client connection is closed after this long (nginx's default; the
# aiohttp default is an hour).
KEEPALIVE_TIMEOUT_S = 75.0


def redis_client(config: RedisConfig) -> Redis:
    """One client per worker, with short retries: a Redis outage must turn into a quick
    503 (fail closed), not requests hanging through redis-py's default backoff."""
    return Redis.from_url(
        config.url,
        password=config.password.value if config.password is not None else None,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        retry=Retry(NoBackoff(), 1),
    )


def forwarded_client(request: web.Request) -> str:
    """The client address of a request to an internal backend: only the proxy reaches its
    socket, and the proxy sets X-Forwarded-For from the verified peer (last entry)."""
    chain = request.headers.get("X-Forwarded-For", "")
    return chain.rsplit(",", 1)[-1].strip() or "unknown"


class AuditEventSink:
    """Identity provider events (logins, refresh reuse, logouts) into the audit chain."""

    def __init__(self, audit: Callable[[], AuditLog | None]) -> None:
        self._audit = audit

    def emit(self, event: AuthEvent) -> None:
        audit = self._audit()
        if audit is None:
            LoggingEventSink().emit(event)
            return
        audit.record(
            AuditEntry(
                time_ns=int(event.time * 1e9),
                request_id="",
                principal=event.username,
                method="AUTH",
                path=event.client_address or "",
                resource=f"session:{event.family}" if event.family else None,
                action=event.kind,
                decision=event.kind,
                reason=event.reason or event.kind,
            )
        )


class StartupError(Exception):
    """The proxy cannot start (address in use, bad certificate); one line for operators."""


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler with the proxy's error answers, connection gauge, and
    a deadline for each request head (aiohttp has none: a client sending one header byte
    now and then would hold the connection for ever)."""

    metrics: ProxyMetrics | None = None
    header_timeout: float | None = None
    # Armed when the connection opens, and when a later request's first bytes arrive on a
    # kept-alive connection; cancelled when that request's head is handed over.
    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.metrics is not None:
            self.metrics.active_connections.inc()
        if self.header_timeout is not None:
            loop = self._loop
            self.head_timer = loop.call_at(
                loop.time() + self.header_timeout, self._header_timed_out
            )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Waiting for the next request and these bytes did not complete its head: a later
        # request on a kept-alive connection has begun, and gets the same deadline as the
        # first (nginx's client_header_timeout). Idle time before its first byte is the
        # keep-alive timeout's to bound, not this one's.
        waiter = self._waiter
        if (
            self.head_timer is None
            and self.header_timeout is not None
            and waiter is not None
            and not waiter.done()
            and not self._force_close
        ):
            loop = self._loop
            self.head_timer = loop.call_at(
                loop.time() + self.header_timeout, self._header_timed_out
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.metrics is not None:
            self.metrics.active_connections.dec()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self.head_timer = None
        if self.transport is None:
            return
        # No request is being handled on this connection, so the 408 cannot interleave
        # with an answer.
        body = encode_error(
            ErrorBody(
                error="request_header_timeout",
                message="the request head was not received in time",
                request_id="",
            )
        )
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        if self.metrics is not None:
            self.metrics.rejected.labels("408").inc()
        self.force_close()

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
        elif isinstance(exc, InvalidURLError):
            # aiohttp's message is the target itself ("*" for `GET *`): say what is wrong.
            status, error = 400, "bad_request_target"
            text = ORIGIN_FORM_ONLY
        elif isinstance(exc, BadHttpMessage):
            status, error = 400, "bad_request"
            text = parser_complaint(exc.message)
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


def parser_complaint(message: object) -> str:
    """aiohttp's parser error as one line: llhttp's messages go on with a copy of the
    offending bytes and a caret under them, which stop at the first blank line."""
    if not isinstance(message, str) or not message.strip():
        return "malformed request"
    complaint = " ".join(message.split("\n\n", 1)[0].split()).rstrip(": ")
    return complaint or "malformed request"


class ProxyServer(web.Server):
    """`web.Server` that builds `ProxyRequestHandler`s."""

    def __init__(
        self, handler: Any, metrics: ProxyMetrics, *, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = metrics
        self._header_timeout = header_timeout

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # A request head arrived: its deadline is met.
        handler = cast(ProxyRequestHandler, protocol)
        if handler.head_timer is not None:
            handler.head_timer.cancel()
            handler.head_timer = None
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
        handler.header_timeout = self._header_timeout
        return handler


class HandshakeBoundSite(web.SockSite):
    """aiohttp's SockSite with a bound on the TLS handshake. A client that opens a
    connection and never finishes its handshake would otherwise hold it for asyncio's
    default 60 s before `timeouts.request_header` even starts: slowloris one layer down."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # The same call as SockSite.start, plus the handshake bound (only with TLS).
        self._server = await loop.create_server(
            server,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )


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
        *,
        index: int = 0,
        workers: int = 1,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._tls_paths = tls_paths
        self._sock = sock
        self._index = index
        self._workers = workers
        self.bearer: BearerJWT | None = None
        self.policy: PolicyStore | None = None
        self.audit: AuditLog | None = None
        self.spool: SpoolWriter | None = None
        self.gate: Gate | None = None
        self.tap: Tap | None = None
        self.idp: IdentityProvider | None = None
        self.redis: Redis | None = None
        self.redis_probe: RedisProbe | None = None
        self._redis_problem: str | None = None
        self.internal: list[InternalBackend] = []
        self.introspectors: list[TokenIntrospector] = []
        self.internal_default: InternalBackend | None = None
        self.api_pool: asyncpg.Pool | None = None
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
        await self._start_gate()
        self._start_tap()
        capture = self.config.capture
        self.forwarder = Forwarder(
            proxy,
            self.metrics,
            self.access_log,
            scheme="https" if proxy.tls.enabled else "http",
            gate=self.gate,
            tap=self.tap,
            body_excerpt_bytes=capture.body_excerpt_bytes if capture is not None else 0,
            internal=self.internal,
        )
        api_pool = None
        if self.config.api is not None:
            api_pool = await self._start_api(self.config.api)
        self.forwarder.start(api_pool)
        limits = proxy.limits
        server = ProxyServer(
            self.forwarder,
            self.metrics,
            max_line_size=limits.max_request_line_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            header_timeout=proxy.timeouts.request_header,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            access_log=None,
            # A client that hangs up ends its exchange at once, as nginx and Envoy do:
            # aiohttp would otherwise let the handler run on, holding an upstream
            # connection until a timeout. The handler releases it on the way out.
            handler_cancellation=True,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=proxy.timeouts.shutdown
        )
        await self._runner.setup()
        site = HandshakeBoundSite(
            self._runner,
            self._sock,
            ssl_context=self.ssl_context,
            handshake_timeout=proxy.timeouts.request_header,
        )
        await site.start()
        assert self.forwarder.pool is not None
        self._spawn(self.forwarder.pool.run_sweeper(), "upstream-pool-sweeper")
        if self.reloader is not None:
            self._spawn(self._watch_certificates(self.reloader), "tls-reloader")
        if self.access_log is not None:
            self._spawn(self.access_log.run(), "access-log-writer")
        self._spawn(self._publish_metrics(), "metrics-publisher")
        if self.policy is not None:
            self._spawn(self.policy.run(), "policy-reloader")
            if self.config.redis is not None:
                # Changes made through the admin API elsewhere are announced here.
                self._spawn(
                    self.policy.listen(self.config.redis.url, POLICY_CHANNEL), "policy-listener"
                )
        if self.audit is not None:
            self._spawn(self.audit.run(), "audit-writer")
        if self.config.redis is not None:
            # Requests that need Redis fail closed (503) while it is down: /readyz says so.
            # Probed in the background, so neither requests nor /readyz wait on Redis.
            redis = self.config.redis
            password = redis.password.value if redis.password is not None else None
            self.redis_probe = RedisProbe(redis.url, password, timeout=REDIS_PROBE_TIMEOUT_S)
            self._redis_problem = await self.redis_probe()
            self._spawn(self._watch_redis(self.redis_probe), "redis-probe")
        # Everything built so far lives as long as the process: move it out of the cyclic
        # collector's reach so full collections (the proxy's p99 spikes) scan less.
        gc.collect()
        gc.freeze()

    def _per_worker(self, path: str) -> Path:
        """With several workers each writes its own file: `audit.jsonl` -> `audit.w1.jsonl`."""
        target = Path(path)
        if self._workers == 1:
            return target
        return target.with_name(f"{target.stem}.w{self._index}{target.suffix}")

    async def _start_gate(self) -> None:
        auth = self.config.auth
        if auth is None:
            log.warning(
                "no auth section: every well-formed request is forwarded without a verified "
                "identity; configure auth and policy before exposing this proxy"
            )
            return
        if self.config.redis is not None:
            self.redis = redis_client(self.config.redis)
        if auth.idp is not None:
            await self._start_idp(auth.idp)
        local = [self.idp] if self.idp is not None else []
        self.bearer = BearerJWT(
            auth.jwt_issuers,
            cache_entries=auth.token_cache_entries,
            local=local,
            opaque_elsewhere=bool(auth.introspection),
        )
        try:
            await self.bearer.start()
        except (OSError, ValueError) as exc:
            raise StartupError(f"auth.jwt_issuers: {exc}") from None
        authenticators: list[Authenticator] = [self.bearer]
        if auth.introspection:
            self.introspectors = [TokenIntrospector(server) for server in auth.introspection]
            for introspector in self.introspectors:
                await introspector.start()
            authenticators.append(OpaqueBearer(self.introspectors))
        login_url = None
        if auth.sessions is not None:
            sessions = self._start_sessions(auth.sessions)
            authenticators.append(CookieSession(SessionAuthenticator(sessions)))
            if auth.oidc is not None:
                prefix = urlsplit(auth.oidc.callback_url).path.removesuffix("/callback")
                root = web.Application()
                root.add_subapp(prefix, create_oidc_app(auth.oidc, sessions))
                backend = InternalBackend(
                    "oidc-login", prefix, root, public=True, reads_session=True
                )
                await backend.start(self.config.proxy)
                self.internal.append(backend)
                if auth.browser_login == "oidc":
                    login_url = f"{prefix}/start?rd="
            if auth.saml is not None:
                prefix = await self._start_saml(auth.saml, sessions)
                if auth.browser_login == "saml":
                    login_url = f"{prefix}/login?return_to="
        chain = AuthChain(authenticators)
        policy = self.config.policy
        if policy is not None:
            self.policy = PolicyStore(
                Path(policy.model),
                [Path(p) for p in policy.policies],
                Path(policy.routes),
                poll_interval=policy.poll_interval,
            )
            try:
                self.policy.load()
            except PolicyLoadError as exc:
                raise StartupError(f"policy: {exc}") from None
            self.audit = AuditLog(self._per_worker(policy.audit_log))
            if policy.admin_path is not None:
                await self._start_policy_admin(policy.admin_path, Path(policy.policies[0]))
        self.gate = Gate(
            auth=chain,
            policy=self.policy,
            audit=self.audit,
            identity=auth.identity_headers,
            public_backends=self.internal,
            login_url=login_url,
            session_cookie=auth.sessions.cookie.cookie_name if auth.sessions else None,
            forward_authorization=auth.forward_authorization,
        )

    async def _start_saml(self, config: SamlSpConfig, sessions: SessionManager) -> str:
        # pysaml2 is imported only by proxies that use it (half a second of start-up).
        from proxy.authn.saml.app import saml_app
        from proxy.authn.saml.provider import ServiceProvider

        try:
            provider = await asyncio.get_running_loop().run_in_executor(
                None, ServiceProvider.load, config
            )
        except SamlConfigError as exc:
            raise StartupError(f"auth.saml: {exc}") from None
        store: SamlStateStore = (
            RedisSamlStore(self.redis) if self.redis is not None else InProcessSamlStore()
        )

        async def on_login(principal: Principal, return_to: str) -> web.StreamResponse:
            # The IdP's SessionNotOnOrAfter, when it set one, ends the session early.
            cookie = await sessions.create(principal, ends_at=principal.expires_at)
            return web.Response(
                status=302,
                headers={"Location": return_to, "Set-Cookie": sessions.set_cookie_header(cookie)},
            )

        root = web.Application()
        root.add_subapp(provider.mount_prefix, saml_app(provider, store, on_login))
        backend = InternalBackend("saml-login", provider.mount_prefix, root, public=True)
        await backend.start(self.config.proxy)
        self.internal.append(backend)
        return provider.mount_prefix

    def _start_sessions(self, config: SessionsConfig) -> SessionManager:
        store: SessionStore
        if self.redis is not None:
            store = RedisSessionStore(self.redis, key_prefix=config.cookie.key_prefix)
        else:
            store = InProcessSessionStore()
        keys = [key.value.encode() for key in config.signing_keys]
        try:
            return SessionManager(config.cookie, keys, store)
        except ValueError as exc:
            raise StartupError(f"auth.sessions: {exc}") from None

    async def _start_policy_admin(self, path: str, policy_file: Path) -> None:
        assert self.policy is not None
        names = self.config.auth.identity_headers if self.config.auth else None
        user_header = names.user if names else "X-Auth-Request-User"
        roles_header = names.roles if names else "X-Auth-Request-Roles"

        def principal_of(request: web.Request) -> str | None:
            # Percent-encoded by the gate (`header_value`), as the roles are.
            value = request.headers.get(user_header)
            return unquote(value) if value is not None else None

        def roles_of(request: web.Request) -> list[str]:
            value = request.headers.get(roles_header, "")
            return [unquote(role) for role in value.split(",") if role]

        redis_url = self.config.redis.url if self.config.redis is not None else None
        root = web.Application()
        root.add_subapp(
            path,
            admin_api(
                self.policy,
                policy_file=policy_file,
                audit=self.audit,
                principal_of=principal_of,
                roles_of=roles_of,
                redis_url=redis_url,
            ),
        )
        backend = InternalBackend("policy-admin", path, root, public=False, resource="policy:admin")
        await backend.start(self.config.proxy)
        self.internal.append(backend)

    async def _start_idp(self, config: IdpConfig) -> None:
        if self.redis is None:
            log.warning(
                "no redis section: the identity provider keeps sessions, refresh tokens and "
                "revocations in this process (one worker; lost on restart)"
            )
        try:
            self.idp = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: IdentityProvider.from_config(
                    config,
                    redis=self.redis,
                    events=AuditEventSink(lambda: self.audit),
                    client_address=forwarded_client,
                ),
            )
        except (OSError, ValueError) as exc:
            raise StartupError(f"auth.idp: {exc}") from None
        if not config.mount_path:
            raise StartupError("auth.idp.issuer: needs a path (e.g. https://host/_sidecar)")
        root = web.Application()
        root.add_subapp(config.mount_path, self.idp.app())
        backend = InternalBackend("identity-provider", config.mount_path, root, public=True)
        await backend.start(self.config.proxy)
        self.internal.append(backend)

    async def _start_api(self, config: ApiConfig) -> UpstreamPool:
        assert self.policy is not None  # the config check makes api need a policy
        try:
            app, self.api_pool = await api_application(config, self.policy)
        except (OSError, asyncpg.PostgresError, MigrationError) as exc:
            raise StartupError(f"api.store_dsn: cannot open the lineage store: {exc}") from None
        backend = InternalBackend(
            "lineage-api",
            "/",
            app,
            public=False,
            max_line_size=SERVER_SETTINGS["max_line_size"],
            max_field_size=SERVER_SETTINGS["max_field_size"],
        )
        await backend.start(self.config.proxy)
        self.internal_default = backend
        assert backend.pool is not None
        return backend.pool

    def _start_tap(self) -> None:
        capture = self.config.capture
        if capture is None:
            return
        directory = Path(capture.spool_dir) / f"w{self._index}"
        options = SpoolOptions(
            max_bytes=capture.max_bytes,
            # The reader keeps the newest segment, so the budget must hold two of them.
            segment_bytes=min(SpoolOptions().segment_bytes, capture.max_bytes // 2),
            when_full=capture.when_full,
            flush_interval_s=capture.flush_interval_s,
        )
        try:
            options.check()
            self.spool = SpoolWriter(directory, options)
        except (ValueError, OSError, SpoolBusyError) as exc:
            raise StartupError(f"capture.spool_dir {directory}: {exc}") from None
        service = capture.service or self.config.proxy.upstream or "lineage-api"
        self.tap = Tap(
            self.spool,
            service=service,
            correlation_headers=capture.correlation_headers,
        )

    def readiness(self) -> list[str]:
        """Reasons this worker is not fully serving (for /readyz), empty when it is. Those
        it serves through are marked `degraded: ` (see proxy.admin)."""
        reasons = []
        if self.policy is not None and (problem := self.policy.status()) is not None:
            # The last good policy decides meanwhile: requests are served.
            reasons.append(DEGRADED + problem)
        if self.spool is not None:
            if self.spool.is_full:
                if self.config.capture is not None and self.config.capture.when_full == "block":
                    reasons.append("capture spool is full: requests wait for room")
                else:
                    reasons.append(DEGRADED + "capture spool is full: new records are dropped")
            if self.spool.last_write_error:
                reasons.append(
                    f"{DEGRADED}capture spool cannot write: {self.spool.last_write_error}"
                )
        if self.audit is not None and self.audit.pending > 100_000:
            reasons.append(f"audit log is behind by {self.audit.pending} decisions")
        if self._redis_problem is not None:
            reasons.append(self._redis_problem)
        return reasons

    async def _watch_redis(self, probe: RedisProbe) -> None:
        while True:
            await asyncio.sleep(REDIS_PROBE_INTERVAL_S)
            problem = await probe()
            if problem != self._redis_problem:
                if problem is None:
                    log.info("redis reachable again")
                else:
                    log.warning("%s", problem)
            self._redis_problem = problem

    def state(self) -> WorkerState:
        """The counters of this worker's parts, for `ProxyMetrics.publish`."""
        policy, spool, audit = self.policy, self.spool, self.audit
        # Without capture, every spool counter reads zero.
        counted = spool.metrics if spool is not None else SpoolWriterMetrics()
        return WorkerState(
            policy_reloads_ok=policy.reloads_ok if policy is not None else 0,
            policy_reloads_failed=policy.reloads_failed if policy is not None else 0,
            policy_failing=policy is not None and policy.last_error is not None,
            appended=counted.appended,
            dropped_full=counted.dropped_full,
            dropped_oversize=counted.dropped_oversize,
            blocked=counted.blocked,
            spool_bytes=counted.disk_bytes + counted.buffered_bytes,
            spool_full=spool is not None and spool.is_full,
            spool_write_errors=counted.write_errors,
            audit_written=audit.written if audit is not None else 0,
            audit_pending=audit.pending if audit is not None else 0,
        )

    async def _publish_metrics(self) -> None:
        while True:
            self.metrics.publish(self.state())
            await asyncio.sleep(METRICS_INTERVAL_S)

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
        if self.audit is not None:
            await self.audit.flush()
        if self.spool is not None:
            await self.spool.aclose()
        if self.bearer is not None:
            await self.bearer.close()
        for introspector in self.introspectors:
            await introspector.close()
        for backend in self.internal:
            await backend.stop()
        if self.internal_default is not None:
            await self.internal_default.stop()
        if self.api_pool is not None:
            await self.api_pool.close()
        # After the audit and spool flushes above: the last lines and records count too.
        self.metrics.publish(self.state())
        if self.redis is not None:
            await self.redis.aclose()
        if self.redis_probe is not None:
            await self.redis_probe.aclose()
        if self.forwarder is not None and self.forwarder.pool is not None:
            self.forwarder.pool.close()
