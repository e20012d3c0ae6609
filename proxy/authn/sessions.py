"""Browser sessions: an opaque, signed cookie naming a server-side record in Redis.

Promises:
- the cookie carries only a 256-bit random session id and an HMAC-SHA256 over it
  (`<id>.<mac>`, both base64url); nothing about the user is in it. A cookie with a bad
  signature, an unknown id, or any other shape is simply "no session" (no store lookup
  is made for a bad signature, so forged cookies cost nothing);
- the store is keyed by SHA-256 of the id, so whoever can read Redis cannot replay ids;
- every login creates a NEW id (no fixation), and replaces the one the browser had;
- idle and absolute timeouts, and an earlier end the IdP set (SAML SessionNotOnOrAfter),
  are enforced on every read; an expired record is deleted and treated as absent. Redis
  expiry mirrors them, so abandoned records disappear too;
- logout deletes the session; "logout everywhere" deletes every session of the principal
  (the store keeps a set of session keys per principal);
- when the store cannot answer (Redis down), reads raise `AuthError` 503: fail closed,
  never a session that was not checked.
Cookie attributes: `Path=/; Secure; HttpOnly; SameSite=Lax`, and no `Domain`, so the
default `__Host-` name is honoured by browsers.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Protocol, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.authn.principal import AuthError, Principal

log = logging.getLogger(__name__)

SESSION_ID_BYTES = 32
MIN_SIGNING_KEY_BYTES = 32
_MAC_CONTEXT = b"lineage-session-v1\x00"
# 43 base64url characters encode 32 bytes; the whole cookie value has one fixed shape.
_COOKIE_VALUE = re.compile(r"([A-Za-z0-9_-]{43})\.([A-Za-z0-9_-]{43})")
# RFC 6265 cookie-name: an HTTP token.
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Trimmed around a cookie's name and value: ASCII whitespace, exactly what `bytes.strip()`
# removes (RFC 6265 trims only spaces and tabs). `cookie_from_header()` and
# `without_cookie()` read names by this one rule, so no spelling of the session cookie is
# taken for it by the authenticator and yet passed on to the upstream.
COOKIE_SPACE = " \t\n\r\x0b\x0c"
MAX_COOKIE_HEADER_CHARS = 16 * 1024


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class SessionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Browser sessions (OIDC and SAML logins end in one)."""

    cookie_name: Annotated[
        str,
        _doc(
            "Name of the session cookie. The `__Host-` prefix makes browsers refuse it "
            "unless it is Secure, Path=/ and host-only, so a sibling subdomain cannot plant one."
        ),
    ] = "__Host-lineage_session"
    idle_timeout: Annotated[
        float,
        msgspec.Meta(ge=60, le=7 * 86400),
        _doc("A session unused for this long ends (seconds)."),
    ] = 1800.0
    absolute_timeout: Annotated[
        float,
        msgspec.Meta(ge=60, le=30 * 86400),
        _doc("A session ends this long after login, however active it is (seconds)."),
    ] = 12 * 3600.0
    touch_interval: Annotated[
        float,
        msgspec.Meta(ge=0, le=3600),
        _doc(
            "`last_seen` is written back at most this often per session (seconds), so "
            "reads do not cost a Redis write each; idle timeout is precise to this value."
        ),
    ] = 60.0
    key_prefix: Annotated[
        str, msgspec.Meta(min_length=1, max_length=100), _doc("Prefix of the Redis keys.")
    ] = "lineage:session:"

    def __post_init__(self) -> None:
        if not _COOKIE_NAME.fullmatch(self.cookie_name):
            raise ValueError(f"cookie_name {self.cookie_name!r} is not a valid cookie name")
        if self.idle_timeout > self.absolute_timeout:
            raise ValueError("idle_timeout must not exceed absolute_timeout")
        if self.touch_interval >= self.idle_timeout:
            raise ValueError("touch_interval must be shorter than idle_timeout")


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the store holds for one session."""

    principal: Principal
    # Seconds since the epoch (wall clock, shared by all workers and replicas).
    created_at: float
    last_seen: float


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(SessionRecord)


class SessionStore(Protocol):
    """Server-side state of browser sign-in. Keys are opaque strings chosen by the caller;
    implementations raise `AuthError` 503 when they cannot answer."""

    async def save(
        self, session_key: str, record: bytes, owner: str, ttl: float, owner_ttl: float
    ) -> None:
        """Store a new session and add it to the owner's set (kept `owner_ttl` seconds)."""

    async def load(self, session_key: str) -> bytes | None: ...

    async def update(self, session_key: str, record: bytes, ttl: float) -> None:
        """Replace an EXISTING session's record; a deleted session stays deleted."""

    async def delete(self, session_key: str, owner: str) -> None: ...

    async def delete_owner(self, owner: str) -> int:
        """Delete every session of `owner`; the number deleted."""

    async def stash(self, key: str, value: bytes, ttl: float) -> None:
        """Keep a short-lived value (pending sign-in state) for at most `ttl` seconds."""

    async def claim(self, key: str) -> bytes | None:
        """Return and delete a stashed value in one step: a second claim gets None."""


T = TypeVar("T")


class RedisSessionStore:
    """`SessionStore` in Redis, shared by all workers and replicas."""

    def __init__(self, redis: Redis, *, key_prefix: str = "lineage:session:") -> None:
        self._redis = redis
        self._sessions = key_prefix + "s:"
        self._owners = key_prefix + "p:"
        self._pending = key_prefix + "once:"

    async def _call(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except (RedisError, OSError) as exc:
            raise AuthError(
                "session_store_unavailable", 503, detail=f"{type(exc).__name__}: {exc}"[:300]
            ) from exc

    async def save(
        self, session_key: str, record: bytes, owner: str, ttl: float, owner_ttl: float
    ) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._sessions + session_key, record, px=_millis(ttl))
            pipe.sadd(self._owners + owner, session_key)
            pipe.pexpire(self._owners + owner, _millis(owner_ttl))
            await self._call(pipe.execute())

    async def load(self, session_key: str) -> bytes | None:
        value = await self._call(self._redis.get(self._sessions + session_key))
        return value if isinstance(value, bytes) else None

    async def update(self, session_key: str, record: bytes, ttl: float) -> None:
        # XX: only if it still exists, so a read racing a logout cannot revive the session.
        await self._call(
            self._redis.set(self._sessions + session_key, record, px=_millis(ttl), xx=True)
        )

    async def delete(self, session_key: str, owner: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._sessions + session_key)
            pipe.srem(self._owners + owner, session_key)
            await self._call(pipe.execute())

    async def delete_owner(self, owner: str) -> int:
        members = await self._call(self._redis.smembers(self._owners + owner))
        keys = [member.decode() if isinstance(member, bytes) else str(member) for member in members]
        if not keys:
            return 0
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*(self._sessions + key for key in keys))
            # SREM rather than DEL: a login finishing meanwhile keeps its membership.
            pipe.srem(self._owners + owner, *keys)
            deleted, _ = await self._call(pipe.execute())
        return int(deleted)

    async def stash(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(self._redis.set(self._pending + key, value, px=_millis(ttl)))

    async def claim(self, key: str) -> bytes | None:
        value = await self._call(self._redis.getdel(self._pending + key))
        return value if isinstance(value, bytes) else None


# Sign-ins begun and not yet finished that one process keeps without Redis.
MAX_PENDING_SIGN_INS = 10_000


class InProcessSessionStore:
    """`SessionStore` in this process's memory: for a single worker without Redis.
    Sessions are lost on restart and not shared with other workers."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        log.warning(
            "sessions are kept in this process only: not shared between workers, "
            "lost on restart (configure redis for more than one worker)"
        )
        self._clock = clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._owners: dict[str, set[str]] = {}
        self._writes = 0
        # Pending sign-ins in the order they began. Anyone may start one, so they are
        # bounded: past MAX_PENDING_SIGN_INS the oldest is forgotten (its sign-in fails
        # at the callback), and memory stays bounded under a flood of /start requests.
        self._pending: collections.OrderedDict[str, None] = collections.OrderedDict()

    def _get(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._values[key]
            return None
        return entry[0]

    def _put(self, key: str, value: bytes, ttl: float) -> None:
        self._values[key] = (value, self._clock() + ttl)
        self._writes += 1
        if self._writes % 1024 == 0:
            # Abandoned sessions would otherwise stay in memory until the process ends.
            now = self._clock()
            for stale in [k for k, (_, until) in self._values.items() if now >= until]:
                del self._values[stale]
                if stale.startswith("once:"):
                    self._pending.pop(stale[5:], None)
            for owner in list(self._owners):
                self._owners[owner] = {k for k in self._owners[owner] if "s:" + k in self._values}
                if not self._owners[owner]:
                    del self._owners[owner]

    async def save(
        self, session_key: str, record: bytes, owner: str, ttl: float, owner_ttl: float
    ) -> None:
        self._put("s:" + session_key, record, ttl)
        self._owners.setdefault(owner, set()).add(session_key)

    async def load(self, session_key: str) -> bytes | None:
        return self._get("s:" + session_key)

    async def update(self, session_key: str, record: bytes, ttl: float) -> None:
        if self._get("s:" + session_key) is not None:
            self._put("s:" + session_key, record, ttl)

    async def delete(self, session_key: str, owner: str) -> None:
        self._values.pop("s:" + session_key, None)
        self._owners.get(owner, set()).discard(session_key)

    async def delete_owner(self, owner: str) -> int:
        keys = self._owners.pop(owner, set())
        return sum(self._values.pop("s:" + key, None) is not None for key in keys)

    async def stash(self, key: str, value: bytes, ttl: float) -> None:
        pending = self._pending
        pending[key] = None
        pending.move_to_end(key)
        while len(pending) > MAX_PENDING_SIGN_INS:
            oldest, _ = pending.popitem(last=False)
            self._values.pop("once:" + oldest, None)
        self._put("once:" + key, value, ttl)

    async def claim(self, key: str) -> bytes | None:
        value = self._get("once:" + key)
        self._values.pop("once:" + key, None)
        self._pending.pop(key, None)
        return value


def _millis(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _mac(key: bytes, session_id: str) -> bytes:
    return hmac.new(key, _MAC_CONTEXT + session_id.encode("ascii"), hashlib.sha256).digest()


def sign_session_id(key: bytes, session_id: str) -> str:
    """The cookie value for `session_id`."""
    return f"{session_id}.{_b64(_mac(key, session_id))}"


def verify_cookie_value(keys: Sequence[bytes], value: str) -> str | None:
    """The session id inside a cookie value whose MAC one of `keys` made, else None.
    Several keys allow rotation: sign with the first, accept any."""
    match = _COOKIE_VALUE.fullmatch(value)
    if match is None:
        return None
    session_id, mac = match.groups()
    for key in keys:
        if hmac.compare_digest(_b64(_mac(key, session_id)), mac):
            return session_id
    return None


def cookie_from_header(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie` header; None when absent, oversized, or
    present more than once (two values mean one was planted; neither is trusted)."""
    if not cookie_header or len(cookie_header) > MAX_COOKIE_HEADER_CHARS:
        return None
    found: str | None = None
    for pair in cookie_header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip(COOKIE_SPACE) == name:
            if found is not None:
                return None
            found = value.strip(COOKIE_SPACE)
    return found


def without_cookie(cookie_header: bytes, name: bytes) -> bytes:
    """A raw `Cookie` header without any cookie named `name`, parsed as
    `cookie_from_header()` parses it (aiohttp decodes header bytes as UTF-8 with surrogate
    escapes, so `;`, `=` and ASCII whitespace are the same characters in both, and
    `bytes.strip()` removes exactly `COOKIE_SPACE`). Empty when nothing else is left."""
    if name not in cookie_header:
        return cookie_header  # the common case: nothing to drop, nothing to copy
    kept = []
    for pair in cookie_header.split(b";"):
        if pair.partition(b"=")[0].strip() != name and (pair := pair.strip()):
            kept.append(pair)
    return b"; ".join(kept)


def session_key(session_id: str) -> str:
    """Where a session lives in the store: a hash, so store contents are not cookies."""
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def owner_key(principal: Principal) -> str:
    """The per-principal set name; issuer and id are length-framed so no pair collides."""
    issuer = principal.issuer.encode()
    digest = hashlib.sha256(len(issuer).to_bytes(4, "big") + issuer + principal.id.encode())
    return digest.hexdigest()


class SessionManager:
    """Creates, reads and ends sessions; builds the cookie headers."""

    def __init__(
        self,
        config: SessionConfig,
        signing_keys: Sequence[bytes],
        store: SessionStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not signing_keys:
            raise ValueError("sessions need at least one signing key")
        for key in signing_keys:
            if len(key) < MIN_SIGNING_KEY_BYTES:
                raise ValueError(
                    f"session signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes"
                )
        self.config = config
        self.store = store
        self._keys = tuple(signing_keys)
        self._clock = clock
        # Constant parts of the headers, built once.
        self._cookie_attributes = (
            f"Path=/; Max-Age={int(config.absolute_timeout)}; Secure; HttpOnly; SameSite=Lax"
        )
        self.clear_cookie_header = (
            f"{config.cookie_name}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"
        )

    def set_cookie_header(self, cookie_value: str) -> str:
        """The `Set-Cookie` header value that hands the browser its session."""
        return f"{self.config.cookie_name}={cookie_value}; {self._cookie_attributes}"

    def session_id_from(self, cookie_header: str | None) -> str | None:
        """The verified session id in a `Cookie` header, or None. No IO."""
        value = cookie_from_header(cookie_header, self.config.cookie_name)
        return verify_cookie_value(self._keys, value) if value is not None else None

    async def create(
        self,
        principal: Principal,
        *,
        previous_cookie_header: str | None = None,
        ends_at: float | None = None,
    ) -> str:
        """Start a session for `principal` with a fresh id; end the browser's previous
        session, if any. `ends_at` (seconds since the epoch) ends it before the absolute
        timeout: a SAML IdP's SessionNotOnOrAfter. Returns the cookie value."""
        previous = self.session_id_from(previous_cookie_header)
        if previous is not None:
            await self.end(previous)
        now = self._clock()
        # The session outlives the ID token (as with any OIDC client); it is bounded by
        # the absolute timeout instead, or earlier when the IdP says so, and that is what
        # the principal says.
        end = now + self.config.absolute_timeout
        if ends_at is not None:
            end = min(end, ends_at)
        stored = msgspec.structs.replace(principal, expires_at=end)
        record = SessionRecord(principal=stored, created_at=now, last_seen=now)
        session_id = _b64(secrets.token_bytes(SESSION_ID_BYTES))
        await self.store.save(
            session_key(session_id),
            _record_encoder.encode(record),
            owner_key(principal),
            ttl=min(self.config.idle_timeout, end - now),
            owner_ttl=self.config.absolute_timeout,
        )
        return sign_session_id(self._keys[0], session_id)

    async def load(self, session_id: str) -> SessionRecord | None:
        """The live record of a verified session id; expired records are deleted."""
        key = session_key(session_id)
        raw = await self.store.load(key)
        if raw is None:
            return None
        try:
            record = _record_decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("session record %s… is unreadable; deleting it", key[:12])
            await self.store.delete(key, "")
            return None
        now = self._clock()
        age = now - record.created_at
        idle = now - record.last_seen
        # The principal's expiry is the absolute timeout, or the IdP's earlier end.
        ends_at = record.principal.expires_at
        left = ends_at - now if ends_at is not None else self.config.absolute_timeout - age
        if age >= self.config.absolute_timeout or idle >= self.config.idle_timeout or left <= 0:
            await self.store.delete(key, owner_key(record.principal))
            return None
        if idle >= self.config.touch_interval:
            record = msgspec.structs.replace(record, last_seen=now)
            remaining = min(self.config.idle_timeout, self.config.absolute_timeout - age, left)
            await self.store.update(key, _record_encoder.encode(record), remaining)
        return record

    async def end(self, session_id: str) -> Principal | None:
        """Delete one session; the principal it belonged to, if it was live."""
        key = session_key(session_id)
        raw = await self.store.load(key)
        principal: Principal | None = None
        if raw is not None:
            try:
                principal = _record_decoder.decode(raw).principal
            except msgspec.DecodeError:
                principal = None
        await self.store.delete(key, owner_key(principal) if principal is not None else "")
        return principal

    async def end_everywhere(self, principal: Principal) -> int:
        """Delete every session of `principal` (all browsers, all devices)."""
        return await self.store.delete_owner(owner_key(principal))


class SessionAuthenticator:
    """Authenticates a request by its session cookie."""

    def __init__(self, sessions: SessionManager) -> None:
        self._sessions = sessions

    async def authenticate(self, cookie_header: str | None) -> Principal | None:
        """The session's principal; None for no, forged, unknown or expired cookies.
        Raises `AuthError` 503 only when the store cannot answer (fail closed)."""
        session_id = self._sessions.session_id_from(cookie_header)
        if session_id is None:
            return None
        record = await self._sessions.load(session_id)
        return record.principal if record is not None else None
