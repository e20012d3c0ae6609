"""Refresh-token rotation with reuse detection, and session revocation, kept in Redis.

The state machine (`decide_refresh`) is a pure function; `RefreshStore` only reads the
state and applies the decision inside a Redis WATCH/MULTI transaction, so two concurrent
refreshes with the same token can never both rotate: the loser's transaction fails, it
reads the token again, finds it used, and that is reuse.

Promises (OAuth 2.0 Security BCP, refresh token rotation):
- a login starts a family (login session) with one live refresh token;
- a refresh consumes the live token and issues the next one in the same family; the new
  token expires after `idle_ttl` unused, and never after the family's absolute end;
- presenting a consumed token (reuse, including the second of two concurrent refreshes)
  ends the family: its live token and the family record are deleted, so no token of the
  family refreshes again, and the family is marked revoked for as long as its access
  tokens can live, so `is_family_revoked` rejects them before they expire;
- a consumed token is remembered until it would have expired anyway; presented later it is
  simply unknown;
- only SHA-256 digests of refresh tokens are stored.

`MemoryRefreshStore` keeps the same state in the process, for a single worker without Redis.

Redis keys (all under `prefix`): `rt:<digest>` (hash: family, subject, used, expires_at),
`fam:<family>` (hash: subject, current, created_at, expires_at), `revoked:<family>`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from proxy.authn.idp.tokens import new_family_id, new_refresh_token, refresh_token_digest

# Access tokens of a revoked family are rejected for their lifetime plus this margin,
# which covers the validator's clock leeway.
REVOCATION_MARGIN_S = 60
# A transaction retried this often under contention gives up (503, retriable).
MAX_TRANSACTION_ATTEMPTS = 8


class RefreshRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What is stored about one refresh token (under its digest)."""

    family: str
    subject: str
    used: bool
    expires_at: float


class FamilyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One login session: whose it is, its one live token, and its absolute end."""

    subject: str
    current: str
    created_at: float
    expires_at: float


class Rotate(msgspec.Struct, frozen=True, kw_only=True):
    family: str
    subject: str
    new_expires_at: float


class Reuse(msgspec.Struct, frozen=True, kw_only=True):
    family: str
    subject: str


RefuseReason = Literal["unknown_token", "expired", "family_ended"]


class Refuse(msgspec.Struct, frozen=True, kw_only=True):
    reason: RefuseReason


RefreshDecision = Rotate | Reuse | Refuse


def decide_refresh(
    digest: str,
    record: RefreshRecord | None,
    family: FamilyRecord | None,
    *,
    now: float,
    idle_ttl: float,
) -> RefreshDecision:
    """What presenting the token with `digest` does, given the stored state."""
    if record is None:
        return Refuse(reason="unknown_token")
    if record.used:
        return Reuse(family=record.family, subject=record.subject)
    if family is None or family.current != digest:
        # The family was revoked (logout, reuse) or reached its absolute end.
        return Refuse(reason="family_ended")
    if record.expires_at <= now or family.expires_at <= now:
        return Refuse(reason="expired")
    new_expires_at = min(now + idle_ttl, family.expires_at)
    return Rotate(family=record.family, subject=record.subject, new_expires_at=new_expires_at)


class Rotated(msgspec.Struct, frozen=True, kw_only=True):
    """A successful refresh: the next token of the family."""

    family: str
    subject: str
    refresh_token: str


RotationOutcome = Rotated | Reuse | Refuse


class TransactionContention(Exception):
    """Redis kept changing under a transaction; the client may retry (503)."""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _fields(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {_text(key): _text(value) for key, value in raw.items()}


def _record(raw: Mapping[bytes | str, bytes | str]) -> RefreshRecord | None:
    fields = _fields(raw)
    try:
        return RefreshRecord(
            family=fields["family"],
            subject=fields["subject"],
            used=fields["used"] == "1",
            expires_at=float(fields["expires_at"]),
        )
    except (KeyError, ValueError):
        return None  # absent, or expired between fields: either way not a usable token


def _family(raw: Mapping[bytes | str, bytes | str]) -> FamilyRecord | None:
    fields = _fields(raw)
    try:
        return FamilyRecord(
            subject=fields["subject"],
            current=fields["current"],
            created_at=float(fields["created_at"]),
            expires_at=float(fields["expires_at"]),
        )
    except (KeyError, ValueError):
        return None


class RefreshStore(Protocol):
    """Where refresh-token families and revocation marks live."""

    async def start_family(self, subject: str) -> tuple[str, str]:
        """A new login session for `subject`: (family id, first refresh token)."""
        ...

    async def rotate(self, token: str) -> RotationOutcome:
        """Consume `token` and issue the next one, or say why not (reuse revokes)."""
        ...

    async def lookup(self, token: str) -> RefreshRecord | None:
        """The stored record of `token` (live or consumed), or None."""
        ...

    async def revoke_family(self, family: str) -> None:
        """End the session: no token of it refreshes, its access tokens are revoked."""
        ...

    async def is_family_revoked(self, family: str) -> bool: ...


class RedisRefreshStore:
    """Refresh-token families and revocation marks in Redis, shared by all workers."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        idle_ttl: float,
        absolute_ttl: float,
        access_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._idle_ttl = idle_ttl
        self._absolute_ttl = absolute_ttl
        self._revocation_ttl = int(access_ttl) + REVOCATION_MARGIN_S
        self._clock = clock

    def _token_key(self, digest: str) -> str:
        return f"{self._prefix}rt:{digest}"

    def _family_key(self, family: str) -> str:
        return f"{self._prefix}fam:{family}"

    def _revoked_key(self, family: str) -> str:
        return f"{self._prefix}revoked:{family}"

    async def start_family(self, subject: str) -> tuple[str, str]:
        """A new login session for `subject`: (family id, first refresh token)."""
        now = self._clock()
        family = new_family_id()
        token = new_refresh_token()
        digest = refresh_token_digest(token)
        family_end = now + self._absolute_ttl
        token_end = min(now + self._idle_ttl, family_end)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._token_key(digest),
                mapping={
                    "family": family,
                    "subject": subject,
                    "used": "0",
                    "expires_at": token_end,
                },
            )
            pipe.pexpireat(self._token_key(digest), int(token_end * 1000))
            pipe.hset(
                self._family_key(family),
                mapping={
                    "subject": subject,
                    "current": digest,
                    "created_at": now,
                    "expires_at": family_end,
                },
            )
            pipe.pexpireat(self._family_key(family), int(family_end * 1000))
            await pipe.execute()
        return family, token

    async def rotate(self, token: str) -> RotationOutcome:
        """Consume `token` and issue the next one, or say why not (reuse revokes)."""
        digest = refresh_token_digest(token)
        token_key = self._token_key(digest)
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(token_key)
                    record = _record(await pipe.hgetall(token_key))
                    family: FamilyRecord | None = None
                    if record is not None:
                        await pipe.watch(self._family_key(record.family))
                        family = _family(await pipe.hgetall(self._family_key(record.family)))
                    now = self._clock()
                    decision = decide_refresh(
                        digest, record, family, now=now, idle_ttl=self._idle_ttl
                    )
                    if isinstance(decision, Refuse):
                        return decision
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if isinstance(decision, Reuse):
                        self._queue_revocation(pipe, decision.family, family)
                        await pipe.execute()
                        return decision
                    next_token = new_refresh_token()
                    self._queue_rotation(pipe, digest, next_token, decision)
                    await pipe.execute()
                    return Rotated(
                        family=decision.family,
                        subject=decision.subject,
                        refresh_token=next_token,
                    )
                except WatchError:
                    continue
        raise TransactionContention("refresh token state kept changing")

    def _queue_rotation(
        self, pipe: Pipeline, digest: str, next_token: str, decision: Rotate
    ) -> None:
        next_digest = refresh_token_digest(next_token)
        # HSET keeps the key's expiry: the consumed record stays, for reuse detection, until
        # it would have expired anyway.
        pipe.hset(self._token_key(digest), "used", "1")
        pipe.hset(
            self._token_key(next_digest),
            mapping={
                "family": decision.family,
                "subject": decision.subject,
                "used": "0",
                "expires_at": decision.new_expires_at,
            },
        )
        pipe.pexpireat(self._token_key(next_digest), int(decision.new_expires_at * 1000))
        pipe.hset(self._family_key(decision.family), "current", next_digest)

    def _queue_revocation(self, pipe: Pipeline, family: str, record: FamilyRecord | None) -> None:
        if record is not None:
            pipe.delete(self._token_key(record.current))
        pipe.delete(self._family_key(family))
        pipe.set(self._revoked_key(family), "1", ex=self._revocation_ttl)

    async def lookup(self, token: str) -> RefreshRecord | None:
        """The stored record of `token` (live or consumed), or None."""
        return _record(await self._redis.hgetall(self._token_key(refresh_token_digest(token))))

    async def revoke_family(self, family: str) -> None:
        """End the session: no token of the family refreshes, its access tokens are revoked."""
        async with self._redis.pipeline(transaction=True) as pipe:
            record = _family(await self._redis.hgetall(self._family_key(family)))
            # A rotation racing with this still fails: the family record is gone.
            self._queue_revocation(pipe, family, record)
            await pipe.execute()

    async def is_family_revoked(self, family: str) -> bool:
        """One Redis EXISTS: cheap enough for every request (callers may cache briefly)."""
        return bool(await self._redis.exists(self._revoked_key(family)))


class MemoryRefreshStore:
    """The same state machine in process memory: one worker, no Redis (state is lost on
    restart). Each operation runs without awaiting, so it is atomic on the event loop."""

    # Expired entries are swept after this many writes, bounding memory without a task.
    SWEEP_EVERY = 1024

    def __init__(
        self,
        *,
        idle_ttl: float,
        absolute_ttl: float,
        access_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._idle_ttl = idle_ttl
        self._absolute_ttl = absolute_ttl
        self._revocation_ttl = int(access_ttl) + REVOCATION_MARGIN_S
        self._clock = clock
        self._records: dict[str, RefreshRecord] = {}
        self._families: dict[str, FamilyRecord] = {}
        self._revoked_until: dict[str, float] = {}
        self._writes = 0

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % self.SWEEP_EVERY == 0:
            self._records = {d: r for d, r in self._records.items() if r.expires_at > now}
            self._families = {n: f for n, f in self._families.items() if f.expires_at > now}
            self._revoked_until = {n: t for n, t in self._revoked_until.items() if t > now}

    def _record(self, digest: str, now: float) -> RefreshRecord | None:
        record = self._records.get(digest)
        return record if record is not None and record.expires_at > now else None

    async def start_family(self, subject: str) -> tuple[str, str]:
        now = self._clock()
        family = new_family_id()
        token = new_refresh_token()
        digest = refresh_token_digest(token)
        family_end = now + self._absolute_ttl
        self._records[digest] = RefreshRecord(
            family=family,
            subject=subject,
            used=False,
            expires_at=min(now + self._idle_ttl, family_end),
        )
        self._families[family] = FamilyRecord(
            subject=subject, current=digest, created_at=now, expires_at=family_end
        )
        self._wrote(now)
        return family, token

    async def rotate(self, token: str) -> RotationOutcome:
        now = self._clock()
        digest = refresh_token_digest(token)
        # Unfiltered by expiry: decide_refresh judges it, and says "expired" when it is.
        record = self._records.get(digest)
        family = self._families.get(record.family) if record is not None else None
        decision = decide_refresh(digest, record, family, now=now, idle_ttl=self._idle_ttl)
        if isinstance(decision, Refuse):
            return decision
        if isinstance(decision, Reuse):
            self._revoke(decision.family, now)
            return decision
        # A Rotate is only decided with both records present.
        assert record is not None
        assert family is not None
        next_token = new_refresh_token()
        next_digest = refresh_token_digest(next_token)
        self._records[digest] = msgspec.structs.replace(record, used=True)
        self._records[next_digest] = RefreshRecord(
            family=decision.family,
            subject=decision.subject,
            used=False,
            expires_at=decision.new_expires_at,
        )
        self._families[decision.family] = msgspec.structs.replace(family, current=next_digest)
        self._wrote(now)
        return Rotated(family=decision.family, subject=decision.subject, refresh_token=next_token)

    def _revoke(self, family: str, now: float) -> None:
        record = self._families.pop(family, None)
        if record is not None:
            self._records.pop(record.current, None)
        self._revoked_until[family] = now + self._revocation_ttl
        self._wrote(now)

    async def lookup(self, token: str) -> RefreshRecord | None:
        return self._record(refresh_token_digest(token), self._clock())

    async def revoke_family(self, family: str) -> None:
        self._revoke(family, self._clock())

    async def is_family_revoked(self, family: str) -> bool:
        return self._revoked_until.get(family, 0.0) > self._clock()
