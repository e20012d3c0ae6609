"""One YAML file, parsed once at start into frozen, validated structs.

`load()` reads the file, applies environment overrides, validates every field against the
declarations below and returns a frozen `Config`. Any problem ends in a `ConfigError` whose
message is one line naming the file and the field, so `lineage-sidecar ... --config FILE`
can print it and exit non-zero. Each field is documented once, here, through
`msgspec.Meta(description=...)`; `docs/configuration.md` is generated from these
declarations (`python -m lineage_sidecar.configdoc`).

Environment overrides: `LINEAGE_SIDECAR_<SECTION>__<FIELD>[__<FIELD>...]=value`, e.g.
`LINEAGE_SIDECAR_PROXY__WORKERS=4` or `LINEAGE_SIDECAR_PROXY__TLS__ENABLED=false`. The value
is read as a YAML scalar or flow collection, so numbers, booleans and `[a, b]` lists work.
In the file and in overrides, a key given twice in one mapping is refused, not overwritten.

Secrets (`Secret` fields) are given as `file:/path/to/secret` or `env:VARIABLE`, resolved at
load; an inline value is accepted for development but logged as a warning. A secret file,
like the configuration file, must be a regular file (symlinks are followed, as in a
Kubernetes secret mount) of bounded size: a FIFO would block the start, a device or an
endless file would be read until memory runs out.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from agent.config import (
    CONFIG_MAX_BYTES,
    SECRET_MAX_BYTES,
    AgentConfig,
    AgentProcessConfig,
    DuplicateKeyError,
    FileRefused,
    FileTooLarge,
    IngestConfig,
    IngestProcessConfig,
    KafkaConfig,
    KeysConfig,
    Listen,
    StoreConfig,
    UniqueKeyLoader,
    read_regular_file,
)
from agent.config import parse_listen as parse_listen  # shared with the agent's admin_listen
from agent.derive import DeriveConfig
from proxy.authn.idp.config import IdpConfig
from proxy.authn.introspection import IntrospectionConfig
from proxy.authn.jwt import IssuerConfig
from proxy.authn.oidc import OidcClientConfig
from proxy.authn.saml.config import SamlSpConfig
from proxy.authn.sessions import SessionConfig

log = logging.getLogger(__name__)

ENV_PREFIX = "LINEAGE_SIDECAR_"


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming the field."""


class Secret:
    """A secret value resolved from `file:` or `env:`; never printed."""

    __slots__ = ("source", "value")

    def __init__(self, value: str, source: str) -> None:
        self.value = value
        self.source = source

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class TLSConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """TLS termination on the proxy listener."""

    enabled: Annotated[bool, _doc("Terminate TLS on the proxy listener.")] = True
    cert_file: Annotated[
        str | None,
        _doc(
            "PEM certificate chain. When both cert_file and key_file are null, a development "
            "CA and certificate are generated under self_signed_dir on first start (a warning "
            "is logged)."
        ),
    ] = None
    key_file: Annotated[str | None, _doc("PEM private key for cert_file.")] = None
    key_password: Annotated[
        Secret | None, _doc("Password of an encrypted key_file (file: or env: reference).")
    ] = None
    min_version: Annotated[
        Literal["1.2", "1.3"],
        _doc("Lowest TLS version accepted. 1.2 only when clients need it."),
    ] = "1.3"
    self_signed_dir: Annotated[str, _doc("Where the development CA and certificate are kept.")] = (
        "var/tls"
    )
    reload_interval: Annotated[
        Seconds,
        _doc("How often the certificate and key files are checked for changes (seconds)."),
    ] = 2.0


class TimeoutsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Timeouts; exceeding an upstream one answers 504 (read, connect) or 503 (a full pool)."""

    connect: Annotated[
        Seconds,
        _doc(
            "Opening a connection to the upstream, and waiting for a free one when all "
            "pool.max_connections are in use (then 503 upstream_pool_exhausted) (seconds)."
        ),
    ] = 5.0
    read: Annotated[
        Seconds,
        _doc(
            "Waiting for the upstream's response headers, between body chunks, and for the "
            "upstream to accept more of the request body (seconds)."
        ),
    ] = 60.0
    client_body: Annotated[
        Seconds, _doc("Waiting for the next piece of the client's request body (seconds).")
    ] = 60.0
    request_header: Annotated[
        Seconds,
        _doc(
            "A client connection that has not delivered a complete request head within this "
            "long of opening, or of the first byte of a later request on a kept-alive "
            "connection, is answered 408 and closed (slowloris; seconds). With TLS, the "
            "handshake must also finish within this long, or the connection is closed. A "
            "kept-alive connection idle between requests is closed after 75 s."
        ),
    ] = 20.0
    client_write: Annotated[
        Seconds,
        _doc(
            "A client that accepts no response bytes for this long has its connection "
            "closed, and the upstream connection with it (seconds; nginx's send_timeout)."
        ),
    ] = 60.0
    shutdown: Annotated[
        Seconds, _doc("How long in-flight requests may run on after a stop signal (seconds).")
    ] = 15.0


class LimitsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Request limits. Oversized headers answer 431, oversized bodies 413."""

    max_header_bytes: Annotated[
        int, msgspec.Meta(ge=256, le=1048576), _doc("Largest single header line (bytes).")
    ] = 8190
    max_headers: Annotated[
        int, msgspec.Meta(ge=8, le=1000), _doc("Most header fields in one request.")
    ] = 100
    max_request_line_bytes: Annotated[
        int, msgspec.Meta(ge=256, le=1048576), _doc("Longest request line (bytes).")
    ] = 8190
    max_body_bytes: Annotated[
        Annotated[int, msgspec.Meta(ge=0)] | None,
        _doc("Largest request body (bytes); null means no limit. Bodies are streamed."),
    ] = None


class UpstreamPoolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keep-alive connections to the upstream."""

    max_connections: Annotated[
        int, msgspec.Meta(ge=1, le=10000), _doc("Connections open to the upstream at most.")
    ] = 256
    max_idle: Annotated[
        int, msgspec.Meta(ge=0, le=10000), _doc("Idle keep-alive connections kept at most.")
    ] = 64
    idle_timeout: Annotated[
        Seconds,
        _doc("Idle connections are closed after this long; keep it below the upstream's own."),
    ] = 15.0


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The proxy listener and the data service behind it."""

    upstream: Annotated[
        str | None,
        _doc(
            "Base URL of the data service, http://host:port (a path prefix is allowed). "
            "Required, except for `lineage-sidecar api`, whose backend is the lineage API."
        ),
    ] = None
    listen: Annotated[Listen, _doc("Address the proxy listens on, host:port.")] = "127.0.0.1:8443"
    workers: Annotated[
        int,
        msgspec.Meta(ge=1, le=64),
        _doc("Worker processes sharing the port through SO_REUSEPORT."),
    ] = 1
    preserve_host: Annotated[
        bool,
        _doc("Send the client's Host header upstream (true) or the upstream's host (false)."),
    ] = True
    trusted_proxies: Annotated[
        list[str],
        _doc(
            "CIDRs of proxies in front of this one whose X-Forwarded-* and Forwarded headers "
            "are trusted. From anyone else they are replaced."
        ),
    ] = []
    tls: TLSConfig = TLSConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    pool: UpstreamPoolConfig = UpstreamPoolConfig()


class AdminConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The admin listener: /healthz, /readyz, /metrics."""

    listen: Annotated[
        Listen, _doc("Address of the admin listener; keep it on loopback or a private network.")
    ] = "127.0.0.1:9901"


class LogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Process log and access log."""

    level: Annotated[Literal["debug", "info", "warning", "error"], _doc("Process log level.")] = (
        "info"
    )
    access_log: Annotated[
        str | None,
        _doc(
            "Structured JSON access log: a file path, '-' for standard output, or null for "
            "none. Written in batches off the request path."
        ),
    ] = "-"
    access_log_buffer: Annotated[
        int,
        msgspec.Meta(ge=100, le=10_000_000),
        _doc("Access log entries held before new ones are dropped (and counted)."),
    ] = 100_000


class IdentityHeadersConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Headers that carry the verified identity to the upstream. Client copies of them, in
    any spelling (`X-Auth-User`, `x_auth_user`), are always removed first."""

    user: Annotated[str, _doc("Principal id.")] = "X-Auth-Request-User"
    email: Annotated[str, _doc("Verified email, when the issuer vouches for one.")] = (
        "X-Auth-Request-Email"
    )
    roles: Annotated[str, _doc("Roles, comma-separated.")] = "X-Auth-Request-Roles"
    groups: Annotated[str, _doc("Groups, comma-separated.")] = "X-Auth-Request-Groups"
    issuer: Annotated[str, _doc("Who vouched for the identity.")] = "X-Auth-Request-Issuer"
    strip: Annotated[
        list[str],
        _doc(
            "More identity-like headers the upstream might trust, removed from every request "
            "(compared ignoring case and with '_' read as '-')."
        ),
    ] = msgspec.field(
        default_factory=lambda: [
            "X-User", "X-Remote-User", "X-Forwarded-User", "X-Forwarded-Email", "Remote-User",
        ]
    )  # fmt: skip


class SessionsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Server-side browser sessions (in Redis when a redis section is set)."""

    signing_keys: Annotated[
        list[Secret],
        msgspec.Meta(min_length=1),
        _doc(
            "Keys (at least 32 bytes each, file: or env: references) that sign the session "
            "cookie; the first signs, all verify, so keys rotate by prepending."
        ),
    ]
    cookie: SessionConfig = SessionConfig()


class AuthConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Authentication. Present: every request needs a verified identity unless its route is
    public. Absent: requests are forwarded without one (a warning is logged)."""

    jwt_issuers: Annotated[
        list[IssuerConfig],
        _doc(
            "Trusted token issuers for `Authorization: Bearer <JWT>`; see the `IssuerConfig` "
            "fields below. `shared_secret` takes a file: or env: reference."
        ),
    ] = []
    token_cache_entries: Annotated[
        int,
        msgspec.Meta(ge=0, le=10_000_000),
        _doc("Verified tokens kept (until their expiry) so repeats skip the signature check."),
    ] = 10_000
    identity_headers: IdentityHeadersConfig = IdentityHeadersConfig()
    forward_authorization: Annotated[
        bool,
        _doc(
            "Pass the `Authorization` header upstream after the proxy verified the bearer "
            "token in it. Off by default (as Envoy's jwt_authn): a data service that does not "
            "check tokens has no use for one, and one it logs or leaks can be replayed "
            "against every service that trusts the same issuer. Requests on public routes "
            "and requests signed in with a session cookie keep their header either way."
        ),
    ] = False
    introspection: Annotated[
        list[IntrospectionConfig],
        _doc(
            "RFC 7662 introspection for opaque (non-JWT) bearer tokens, one entry per "
            "authorization server, asked in order. `client_secret` takes file:/env:."
        ),
    ] = []
    sessions: Annotated[
        SessionsConfig | None,
        _doc("Browser sessions, needed by oidc: a login ends in a session cookie."),
    ] = None
    oidc: Annotated[
        OidcClientConfig | None,
        _doc(
            "Browser login at an OIDC provider (authorization code + PKCE). Its endpoints are "
            "served under the callback URL's path (`.../callback`, `.../start`, "
            "`.../sign_out`). `client_secret` takes a file: or env: reference."
        ),
    ] = None
    saml: Annotated[
        SamlSpConfig | None,
        _doc(
            "SAML 2.0 service provider (SP-initiated login, signed assertions required); its "
            "endpoints are served under the ACS URL's path (`.../login`, `.../acs`, "
            "`.../metadata`). A login ends in a session, so it needs auth.sessions."
        ),
    ] = None
    browser_login: Annotated[
        Literal["oidc", "saml"] | None,
        _doc(
            "Send browsers (Accept: text/html) without credentials to this login instead of "
            "answering 401."
        ),
    ] = None
    idp: Annotated[
        IdpConfig | None,
        _doc(
            "The sidecar's own identity provider (login with a password, refresh tokens), for "
            "teams without one. Its endpoints are served under the issuer URL's path."
        ),
    ] = None


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Authorization by Casbin policy files, reloaded when they change. Needs `auth`."""

    model: Annotated[str, _doc("Casbin model file.")] = "policies/model.conf"
    policies: Annotated[list[str], _doc("Casbin policy CSV files (p and g lines).")] = (
        msgspec.field(default_factory=lambda: ["policies/policy.csv"])
    )
    routes: Annotated[
        str, _doc("Route file mapping methods and paths to resources and actions.")
    ] = "policies/routes.yaml"
    poll_interval: Annotated[
        Annotated[float, msgspec.Meta(gt=0, le=60)],
        _doc("How often the files are checked for changes (seconds)."),
    ] = 0.25
    audit_log: Annotated[
        str, _doc("Hash-chained JSON lines audit of every decision (created 0600).")
    ] = "var/audit/audit.jsonl"
    admin_path: Annotated[
        str | None,
        _doc(
            "Serve the policy administration API under this path (e.g. /_sidecar/policy): "
            "GET needs policy:admin read, changes policy:admin write. Changes are written "
            "to the first policy file. Null: not served."
        ),
    ] = None


class CaptureConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The capture tap: one record per request into the spool, for the lineage agent."""

    spool_dir: Annotated[str, _doc("Directory of the spool's segment files.")] = "var/spool"
    service: Annotated[
        str | None,
        _doc("Namespace of the data service in lineage; defaults to the upstream URL."),
    ] = None
    max_bytes: Annotated[
        int,
        msgspec.Meta(ge=4 << 20),
        _doc("Spool size limit (bytes, all segments and the write buffer; at least 4 MiB)."),
    ] = 1 << 30
    when_full: Annotated[
        Literal["fail_open", "block"],
        _doc(
            "When the spool is full: drop new records and count them (fail_open), or make "
            "requests wait for space (block)."
        ),
    ] = "fail_open"
    correlation_headers: Annotated[
        list[str], _doc("Request headers copied into the record (job or run ids).")
    ] = []
    body_excerpt_bytes: Annotated[
        int,
        msgspec.Meta(ge=0, le=128 << 10),
        _doc(
            "For routes whose SQL is in the body: how much of the body is kept (bytes, at "
            "most 128 KiB: a record holds it twice, as SQL and as the excerpt, decoded text "
            "can take three times the bytes, and a record over 1 MiB is dropped)."
        ),
    ] = 64 * 1024
    flush_interval_s: Annotated[
        float,
        msgspec.Meta(gt=0, le=10),
        _doc(
            "How often buffered records are written and fdatasync'd (seconds): the most a "
            "crash of the proxy can lose. Each sync costs kernel time; see docs/performance.md."
        ),
    ] = 0.1


class RedisConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Shared state between workers and replicas (sessions, refresh tokens, revocations).
    Absent: state is kept in each process (one worker only; a warning is logged)."""

    url: Annotated[str, _doc("redis://host:port/db (or rediss://).")]
    password: Annotated[Secret | None, _doc("Password (file: or env: reference).")] = None


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The lineage API as this proxy's backend (`lineage-sidecar api`). Needs auth and
    policy: the API trusts the identity the proxy verified and asks the same policy."""

    store_dsn: Annotated[
        Secret, _doc("PostgreSQL DSN of the lineage store (file: or env: reference).")
    ]
    max_graph_nodes: Annotated[
        int, msgspec.Meta(ge=1, le=5000), _doc("Most datasets in one graph answer.")
    ] = 1000


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration file."""

    proxy: ProxyConfig
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    auth: AuthConfig | None = None
    policy: PolicyConfig | None = None
    capture: CaptureConfig | None = None
    redis: RedisConfig | None = None
    api: ApiConfig | None = None
    # The lineage agent's and ingester's sections (agent/config.py documents them); they
    # may share this file with the proxy's, and `lineage-sidecar agent|ingest` read them.
    agent: AgentConfig | None = None
    derive: DeriveConfig | None = None
    kafka: KafkaConfig | None = None
    keys: KeysConfig | None = None
    store: StoreConfig | None = None
    ingest: IngestConfig | None = None


def _resolve_secret(raw: str, field_path: str | None) -> Secret:
    """The secret `raw` refers to; an inline value is taken as it is, with a warning naming
    `field_path` (None: the caller warns once it knows the field, see `_warn_inline`)."""
    if raw.startswith("file:"):
        path = raw[len("file:") :]
        try:
            data = read_regular_file(path, SECRET_MAX_BYTES)
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path!r}: {exc.strerror}") from None
        except FileRefused as exc:
            raise ValueError(f"secret file {path!r}: {exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"secret file {path!r} is not UTF-8 text") from None
        return Secret(text.rstrip("\r\n"), source=raw)
    if raw.startswith("env:"):
        name = raw[len("env:") :]
        value = os.environ.get(name)
        if value is None:
            raise ValueError(f"environment variable {name!r} is not set")
        return Secret(value, source=raw)
    if field_path is not None:
        _warn_inline(field_path)
    return Secret(raw, source="inline")


def _warn_inline(field_path: str) -> None:
    log.warning("config field %s holds an inline secret; prefer file: or env:", field_path)


def _dec_hook(kind: type, value: Any) -> Any:
    # msgspec does not tell a hook where the value is: from_mapping warns about inline
    # secrets after the conversion, when their field paths are known.
    if kind is Secret:
        if not isinstance(value, str):
            raise ValueError("a secret must be a string: file:PATH, env:NAME or the value")
        return _resolve_secret(value, None)
    raise NotImplementedError(f"cannot decode {kind!r}")


def _inline_secrets(value: object, path: str) -> Iterator[str]:
    """The field paths (`redis.password`) of the inline secrets in a decoded config."""
    if isinstance(value, Secret):
        if value.source == "inline":
            yield path
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from _inline_secrets(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _inline_secrets(item, f"{path}[{index}]")


def _parse_yaml(text: str) -> Any:
    """Parse configuration text (a file or an override) with `UniqueKeyLoader`."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  # a SafeLoader subclass


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty section or field name")
        try:
            value = _parse_yaml(text) if text.strip() else ""
        except DuplicateKeyError as exc:
            raise ConfigError(f"{name}: {exc.problem}") from None
        except yaml.YAMLError:
            # Not YAML (`a: b: c`, an unclosed quote): the override is that text.
            value = text
        except RecursionError:
            raise ConfigError(f"{name}: nested too deeply") from None
        node: dict[str, Any] = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {part} is not a section")
            node = child
        node[path[-1]] = value


_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _field_path(message: str) -> tuple[str, str]:
    """Turn msgspec's "... - at `$.proxy.workers`" into ("proxy.workers", "...")."""
    match = _MSGSPEC_PATH.search(message)
    if match is None:
        return "", message
    path = match["path"].lstrip(".")
    return path, message[: match.start()]


def _check(config: Config) -> None:
    """Checks that span fields or need more than a type: each raises ConfigError."""
    for field, value in (
        ("proxy.listen", config.proxy.listen),
        ("admin.listen", config.admin.listen),
    ):
        try:
            parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{field}: {exc}") from None
    if config.api is not None:
        if config.proxy.upstream is not None:
            raise ConfigError("proxy.upstream: the lineage API is this proxy's backend; omit it")
        if config.policy is None:
            raise ConfigError("api: needs auth and policy sections")
    elif config.proxy.upstream is None:
        raise ConfigError("proxy.upstream: required (the data service behind the proxy)")
    else:
        try:
            parse_upstream(config.proxy.upstream)
        except ValueError as exc:
            raise ConfigError(f"proxy.upstream: {exc}") from None
    tls = config.proxy.tls
    if tls.enabled and (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("proxy.tls: give both cert_file and key_file, or neither for a dev cert")
    if config.policy is not None and config.auth is None:
        raise ConfigError("policy: needs an auth section (policies decide on verified identities)")
    auth = config.auth
    if auth is not None and auth.oidc is not None and auth.sessions is None:
        raise ConfigError("auth.oidc: needs auth.sessions (a login ends in a session)")
    if auth is not None and auth.saml is not None and auth.sessions is None:
        raise ConfigError("auth.saml: needs auth.sessions (a login ends in a session)")
    login = auth.browser_login if auth is not None else None
    if auth is not None and login is not None and getattr(auth, login) is None:
        raise ConfigError(f"auth.browser_login: {login} is not configured")
    if auth is not None and auth.oidc is not None:
        path = urlsplit(auth.oidc.callback_url).path
        if not path.endswith("/callback") or path == "/callback":
            raise ConfigError("auth.oidc.callback_url: its path must be <prefix>/callback")
    idp = config.auth.idp if config.auth is not None else None
    if idp is not None and config.proxy.workers > 1 and config.redis is None:
        raise ConfigError(
            "auth.idp: with several workers, sessions and revocations need a redis section"
        )
    if config.auth is not None:
        issuers = [i.issuer for i in config.auth.jwt_issuers]
        if len(set(issuers)) != len(issuers):
            raise ConfigError("auth.jwt_issuers: each issuer may appear once")
    for index, cidr in enumerate(config.proxy.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"proxy.trusted_proxies[{index}]: {cidr!r} is not an IP network"
            ) from None
    # The agent-side sections may share this file: their own checks run here too, so
    # `proxy --check` catches what `agent --check` or `ingest --check` would.
    for section in ("agent", "derive", "kafka", "keys", "store", "ingest"):
        check = getattr(getattr(config, section, None), "check", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def files_read_at_start(config: Config) -> Iterator[tuple[str, str]]:
    """(field, path) of every file the proxy reads when it starts (not those it creates,
    such as the audit log, the spool or a development certificate)."""
    tls = config.proxy.tls
    if tls.enabled and tls.cert_file is not None and tls.key_file is not None:
        yield "proxy.tls.cert_file", tls.cert_file
        yield "proxy.tls.key_file", tls.key_file
    auth = config.auth
    if auth is not None:
        for index, issuer in enumerate(auth.jwt_issuers):
            if issuer.key_file is not None:
                yield f"auth.jwt_issuers[{index}].key_file", issuer.key_file
        if auth.saml is not None:
            for name in ("idp_metadata_file", "idp_metadata_cert_file", "sp_key_file"):
                path = getattr(auth.saml, name)
                if path is not None:
                    yield f"auth.saml.{name}", path
            yield "auth.saml.sp_cert_file", auth.saml.sp_cert_file
        if auth.idp is not None:
            yield "auth.idp.users_file", auth.idp.users_file
    if config.policy is not None:
        yield "policy.model", config.policy.model
        for index, path in enumerate(config.policy.policies):
            yield f"policy.policies[{index}]", path
        yield "policy.routes", config.policy.routes


def check_files(config: Config, source: str = "<config>") -> None:
    """Each file the configuration names for the start is a readable regular file;
    ConfigError naming the field otherwise. Opens and closes each, reads nothing."""
    for field, path in files_read_at_start(config):
        problem = _unreadable(path)
        if problem is not None:
            raise ConfigError(f"{source}: {field}: {path!r}: {problem}")


def _unreadable(path: str) -> str | None:
    # Non-blocking, so a FIFO named by mistake cannot hang the check.
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    try:
        mode = os.fstat(descriptor).st_mode
    finally:
        os.close(descriptor)
    return None if stat.S_ISREG(mode) else "not a regular file"


class UpstreamAddress(msgspec.Struct, frozen=True):
    """The parsed upstream URL."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


_UPSTREAM_RE = re.compile(
    r"^(?P<scheme>https?)://(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+))"
    r"(?::(?P<port>\d{1,5}))?(?P<path>/[^?#]*)?$"
)


def parse_upstream(url: str) -> UpstreamAddress:
    """Parse `http://host:port[/prefix]`; https upstreams are not supported yet."""
    match = _UPSTREAM_RE.match(url)
    if match is None:
        raise ValueError(f"expected http://host:port[/path], got {url!r}")
    if match["scheme"] != "http":
        raise ValueError("only http:// upstreams are supported (the sidecar runs beside it)")
    port = int(match["port"] or 80)
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    base_path = (match["path"] or "").rstrip("/")
    return UpstreamAddress(
        scheme=match["scheme"], host=match["v6"] or match["host"], port=port, base_path=base_path
    )


AGENT_SECTIONS = ("agent", "derive", "kafka", "keys", "store")
INGEST_SECTIONS = ("ingest", "kafka", "keys", "store")


def load_process(
    path: str | os.PathLike[str],
    kind: type[AgentProcessConfig] | type[IngestProcessConfig],
    sections: tuple[str, ...],
    environ: Mapping[str, str] | None = None,
) -> AgentProcessConfig | IngestProcessConfig:
    """The agent's or the ingester's sections of a configuration file (others ignored)."""
    source = str(path)
    raw = read_mapping(path)
    _apply_env(raw, os.environ if environ is None else environ)
    picked = {key: value for key, value in raw.items() if key in sections}
    try:
        config = msgspec.convert(picked, kind, strict=True)
    except msgspec.ValidationError as exc:
        field, problem = _field_path(str(exc))
        where = f" {field}:" if field else ""
        raise ConfigError(f"{source}:{where} {problem}") from None
    for section in sections:
        check = getattr(getattr(config, section, None), "check", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    return config


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed YAML mapping of a configuration file, before overrides and validation."""
    source = str(path)
    try:
        text = read_regular_file(path, CONFIG_MAX_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except FileTooLarge:
        raise ConfigError(f"{source}: larger than 1 MB; this is not a configuration file") from None
    except FileRefused as exc:
        raise ConfigError(f"{source}: {exc}; --config must name a YAML file") from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return raw


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, validate. Raises ConfigError (one line)."""
    source = str(path)
    raw = read_mapping(path)
    return from_mapping(raw, source=source, environ=os.environ if environ is None else environ)


def from_mapping(
    raw: dict[str, Any], *, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate an already-parsed mapping (after environment overrides)."""
    _apply_env(raw, environ or {})
    try:
        _resolve_issuer_secrets(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        config = msgspec.convert(raw, Config, dec_hook=_dec_hook, strict=True)
    except msgspec.ValidationError as exc:
        field, problem = _field_path(str(exc))
        where = f" {field}:" if field else ""
        raise ConfigError(f"{source}:{where} {problem}") from None
    for field_path in _inline_secrets(config, ""):
        _warn_inline(field_path)
    try:
        _check(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _resolve_issuer_secrets(raw: dict[str, Any]) -> None:
    """`shared_secret: file:/path` or `env:NAME` becomes the secret itself, before the
    issuer's own checks (such as its minimum length) see it."""
    auth = raw.get("auth")
    oidc = auth.get("oidc") if isinstance(auth, dict) else None
    secret = oidc.get("client_secret") if isinstance(oidc, dict) else None
    if isinstance(secret, str) and isinstance(oidc, dict):
        try:
            oidc["client_secret"] = _resolve_secret(secret, "auth.oidc.client_secret").value
        except ValueError as exc:
            raise ConfigError(f"auth.oidc.client_secret: {exc}") from None
    servers = auth.get("introspection") if isinstance(auth, dict) else None
    for index, server in enumerate(servers if isinstance(servers, list) else []):
        secret = server.get("client_secret") if isinstance(server, dict) else None
        if isinstance(secret, str) and isinstance(server, dict):
            field = f"auth.introspection[{index}].client_secret"
            try:
                server["client_secret"] = _resolve_secret(secret, field).value
            except ValueError as exc:
                raise ConfigError(f"{field}: {exc}") from None
    issuers = auth.get("jwt_issuers") if isinstance(auth, dict) else None
    if not isinstance(issuers, list):
        return
    for index, issuer in enumerate(issuers):
        secret = issuer.get("shared_secret") if isinstance(issuer, dict) else None
        if isinstance(secret, str):
            field = f"auth.jwt_issuers[{index}].shared_secret"
            try:
                issuer["shared_secret"] = _resolve_secret(secret, field).value
            except ValueError as exc:
                raise ConfigError(f"{field}: {exc}") from None
