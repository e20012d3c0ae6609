"""SAML state shared by all proxy workers: issued request ids and seen assertion ids.

`SamlStateStore` is the small Protocol the ACS needs:
- `remember_request` / `take_request`: an AuthnRequest id we issued, with an opaque
  record of the login in progress (where to return, which browser), valid for a limited
  time and consumable exactly once (atomically, so two concurrent posts of one response
  cannot both succeed);
- `first_use`: records an assertion id until its validity ends; only the first caller
  for an id gets True, every later one is a replay.
`RedisSamlStore` serves many workers and replicas (GETDEL and SET NX are atomic in Redis);
`InProcessSamlStore` serves a single worker, bounded in size, and refuses new entries
(fail closed, 503) rather than forgetting live ones when full.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.authn.principal import AuthError

DEFAULT_MAX_ENTRIES = 100_000


class SamlStateStore(Protocol):
    """Outstanding AuthnRequest ids and the assertion replay cache."""

    async def remember_request(self, request_id: str, record: str, ttl_seconds: int) -> None:
        """Record an issued AuthnRequest id for `ttl_seconds`."""
        ...

    async def peek_request(self, request_id: str) -> str | None:
        """The record of an outstanding request, without consuming it."""
        ...

    async def take_request(self, request_id: str) -> str | None:
        """Consume an outstanding request id; None when unknown, expired or already used."""
        ...

    async def first_use(self, assertion_id: str, until: float) -> bool:
        """True exactly once per assertion id while it is remembered (until `until`)."""
        ...


class InProcessSamlStore:
    """One worker's SAML state in dictionaries, each entry with its expiry."""

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._requests: dict[str, tuple[str, float]] = {}
        self._assertions: dict[str, float] = {}
        self._max_entries = max_entries
        self._clock = clock

    def _make_room(self) -> None:
        """Drop expired entries when full; refuse (fail closed) if that frees nothing."""
        if len(self._requests) + len(self._assertions) < self._max_entries:
            return
        now = self._clock()
        self._requests = {k: v for k, v in self._requests.items() if v[1] > now}
        self._assertions = {k: v for k, v in self._assertions.items() if v > now}
        if len(self._requests) + len(self._assertions) >= self._max_entries:
            raise AuthError("saml_state_full", 503, detail="in-process SAML state is full")

    async def remember_request(self, request_id: str, record: str, ttl_seconds: int) -> None:
        self._make_room()
        self._requests[request_id] = (record, self._clock() + ttl_seconds)

    async def peek_request(self, request_id: str) -> str | None:
        entry = self._requests.get(request_id)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def take_request(self, request_id: str) -> str | None:
        entry = self._requests.pop(request_id, None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def first_use(self, assertion_id: str, until: float) -> bool:
        expiry = self._assertions.get(assertion_id)
        if expiry is not None and expiry > self._clock():
            return False
        self._make_room()
        self._assertions[assertion_id] = until
        return True


class RedisSamlStore:
    """SAML state in Redis under `key_prefix`, expiring with Redis TTLs."""

    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str = "ls:saml:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._clock = clock

    def _request_key(self, request_id: str) -> str:
        return f"{self._prefix}req:{request_id}"

    async def remember_request(self, request_id: str, record: str, ttl_seconds: int) -> None:
        try:
            await self._redis.set(self._request_key(request_id), record, ex=ttl_seconds)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def peek_request(self, request_id: str) -> str | None:
        try:
            return _text(await self._redis.get(self._request_key(request_id)))
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def take_request(self, request_id: str) -> str | None:
        try:
            return _text(await self._redis.getdel(self._request_key(request_id)))
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def first_use(self, assertion_id: str, until: float) -> bool:
        # At least one second: Redis refuses a zero TTL, and a replay inside the skew window
        # must still be caught.
        ttl = max(1, math.ceil(until - self._clock()))
        key = f"{self._prefix}assertion:{assertion_id}"
        try:
            return bool(await self._redis.set(key, "1", nx=True, ex=ttl))
        except RedisError as exc:
            raise _unavailable(exc) from exc


def _unavailable(exc: RedisError) -> AuthError:
    # Without the replay cache no login can be decided safely: fail closed.
    return AuthError("saml_state_unavailable", 503, detail=f"redis: {exc}")


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else value
