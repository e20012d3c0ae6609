"""Login rate limiting: sliding windows per username and per client address, in Redis.

Promises:
- an attempt is admitted only when every one of its windows (the username's and the
  address's) has room; an admitted attempt is counted in all of them, a refused one in
  none, so a client that keeps hammering gets exactly `limit` attempts per window;
- the check and the count are one Lua script, atomic across workers and replicas, timed by
  the Redis server's clock so workers with skewed clocks share one window;
- a refusal says how long until the oldest counted attempt leaves the window
  (`Retry-After`, whole seconds, at least 1);
- `MemoryLoginRateLimiter` keeps the same windows in the process, for one worker without
  Redis;
- usernames are hashed into the key, so hostile names cannot make keys huge.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis

from proxy.authn.idp.config import LoginRateLimitConfig

# KEYS: the windows. ARGV: window (ms), a unique member, then each window's limit.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local member = ARGV[2]
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local limit = tonumber(ARGV[2 + i])
  local count = redis.call('ZCARD', key)
  if count >= limit then
    -- Room appears when the (count - limit + 1)th oldest attempt leaves the window.
    local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local key_wait = tonumber(entry[2]) + window - now
    if key_wait > wait then wait = key_wait end
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window)
end
return 0
"""


class LoginRateLimiter(Protocol):
    """Admits or refuses login attempts."""

    async def hit(self, username: str, address: str) -> int:
        """Count one attempt if allowed (0), else the whole seconds until one would be."""
        ...


class RedisLoginRateLimiter:
    """Sliding windows in Redis, shared by all workers and replicas."""

    def __init__(self, redis: Redis, config: LoginRateLimitConfig, *, prefix: str) -> None:
        self._config = config
        self._prefix = prefix
        self._script = redis.register_script(_SLIDING_WINDOW)

    def _keys(self, username: str, address: str) -> list[str]:
        user = hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()
        place = hashlib.sha256(address.encode("utf-8", "surrogatepass")).hexdigest()
        return [f"{self._prefix}rl:user:{user}", f"{self._prefix}rl:addr:{place}"]

    async def hit(self, username: str, address: str) -> int:
        """Count one attempt if allowed (0), else the whole seconds until one would be."""
        config = self._config
        wait_ms = await self._script(
            keys=self._keys(username, address),
            args=[config.window * 1000, secrets.token_hex(8), config.per_user, config.per_address],
        )
        return max(1, math.ceil(int(wait_ms) / 1000)) if int(wait_ms) > 0 else 0


class MemoryLoginRateLimiter:
    """The same sliding windows in process memory (one worker, no Redis)."""

    # Windows are swept after this many attempts, so idle keys do not accumulate.
    SWEEP_EVERY = 1024

    def __init__(
        self, config: LoginRateLimitConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._windows: dict[str, deque[float]] = {}
        self._attempts = 0

    async def hit(self, username: str, address: str) -> int:
        config = self._config
        now = self._clock()
        keys = (("user", username, config.per_user), ("addr", address, config.per_address))
        wait = 0.0
        windows: list[deque[float]] = []
        for kind, name, limit in keys:
            window = self._windows.setdefault(f"{kind}:{name}", deque())
            while window and window[0] <= now - config.window:
                window.popleft()
            if len(window) >= limit:
                wait = max(wait, window[len(window) - limit] + config.window - now)
            windows.append(window)
        if wait > 0:
            return max(1, math.ceil(wait))
        for window in windows:
            window.append(now)
        self._attempts += 1
        if self._attempts % self.SWEEP_EVERY == 0:
            horizon = now - config.window
            self._windows = {k: w for k, w in self._windows.items() if w and w[-1] > horizon}
        return 0
