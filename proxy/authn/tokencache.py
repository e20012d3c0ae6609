"""Verified-token cache: skip signature checks for a token already verified, and no longer.

Promises:
- an entry is found only with the same token AND the same verifier scope (pass
  `TrustedIssuers.fingerprint`, which covers issuers, audiences, algorithms, claim mapping
  and every other setting): a token verified for one issuer or audience never satisfies
  another, and a configuration change simply misses;
- an entry is never served at or after the token's `exp` (leeway is not extended to the
  cache), nor after `max_ttl` seconds, so a key removed from the issuer stops being
  honoured within that bound; a principal without `exp` is not cached;
- memory is bounded (least recently used entries are evicted).
Entries are found by the token's last 32 characters (the end of its signature: for two
verified tokens, as good as random) and answer only when the whole token is equal, one
memcmp. Envoy's jwt_authn cache also keys by the token; hashing all of a 1 KiB token,
let alone a SHA-256 of it, costs a cache hit more than everything else it does. Two
tokens that end alike simply take turns in one slot: a miss, never a wrong answer. The
process holds the tokens it verified until they expire or are evicted, as it holds every
token in flight; anything shared beyond the process (`cache_key`: in-flight
introspection calls, a Redis cache) is a SHA-256, never the token.
In-process only; `TokenCache` is the Protocol a shared (Redis) cache will implement.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.authn.principal import Principal

# How much of a token's end finds its entry; the whole token is compared.
_TAIL = 32


class TokenCache(Protocol):
    """Where verified principals are remembered between requests."""

    def get(self, token: str, scope: str) -> Principal | None: ...

    def put(self, token: str, scope: str, principal: Principal) -> None: ...


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    size: int


def scope_prefix(scope: str) -> bytes:
    """The scope as it starts every key: length-framed, so that no (scope, token) pair
    can be re-split into another."""
    scope_bytes = scope.encode()
    return len(scope_bytes).to_bytes(4, "big") + scope_bytes


def cache_key(token: str, scope: str) -> bytes:
    """SHA-256 over the framed scope and the token."""
    return hashlib.sha256(scope_prefix(scope) + token.encode()).digest()


class VerifiedTokenCache:
    """A bounded LRU of verified principals, for one worker process."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_ttl <= 0:
            raise ValueError("max_ttl must be positive")
        self._max_entries = max_entries
        self._max_ttl = max_ttl
        # Wall clock, because `exp` is wall-clock time.
        self._clock = clock
        # (scope, end of token) -> (token, principal, valid until): a cache shared by
        # verifiers keeps their entries apart.
        self._entries: OrderedDict[tuple[str, str], tuple[str, Principal, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, token: str, scope: str) -> Principal | None:
        key = (scope, token[-_TAIL:])
        entry = self._entries.get(key)
        if entry is not None:
            verified, principal, valid_until = entry
            if verified == token:
                if self._clock() < valid_until:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return principal
                del self._entries[key]
        self.misses += 1
        return None

    def put(self, token: str, scope: str, principal: Principal) -> None:
        if principal.expires_at is None:
            return
        now = self._clock()
        valid_until = min(principal.expires_at, now + self._max_ttl)
        if valid_until <= now:
            return
        key = (scope, token[-_TAIL:])
        self._entries[key] = (token, principal, valid_until)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, len(self._entries))
