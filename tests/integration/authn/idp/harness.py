"""A real identity provider on a loopback port, backed by the real test Redis (or none).

Each harness uses its own Redis key prefix (engineers and tests run in parallel against
one Redis) and deletes its keys afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import msgspec
from aiohttp.test_utils import TestClient, TestServer, unused_port
from redis.asyncio import Redis

from proxy.authn.idp.app import IdentityProvider
from proxy.authn.idp.config import IdpConfig
from proxy.authn.idp.events import AuthEvent
from proxy.authn.idp.keys import SigningKeyRing
from proxy.authn.idp.users import PasswordVerifier, User, hash_password

AUDIENCE = "data-api"
PASSWORD = "correct horse battery"
# Cost 4 keeps the suite fast; the code path is the same as at cost 12.
HASH = hash_password(PASSWORD, rounds=4)


class ListSink:
    """Collects events, as the audit log would receive them."""

    def __init__(self) -> None:
        self.events: list[AuthEvent] = []

    def emit(self, event: AuthEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(event.kind, event.reason) for event in self.events]


class MutableUsers:
    """A UserStore whose accounts a test can change between requests."""

    def __init__(self, users: list[User]) -> None:
        self.users = {user.name: user for user in users}

    async def get(self, name: str) -> User | None:
        return self.users.get(name)


class RecordingCheck:
    """The real bcrypt.checkpw, remembering which hashes it was asked about."""

    def __init__(self) -> None:
        self.hashes: list[bytes] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.hashes.append(hashed)
        return bcrypt.checkpw(password, hashed)


class Clock:
    """Real time plus an offset the test moves forward (Redis expiries stay real)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Harness:
    client: TestClient[Any, Any]
    idp: IdentityProvider
    config: IdpConfig
    sink: ListSink
    users: MutableUsers
    checks: RecordingCheck
    clock: Clock
    redis: Redis
    base_url: str
    extra: dict[str, Any] = field(default_factory=dict)

    async def login(self, username: str = "alice", password: str = PASSWORD) -> dict[str, Any]:
        response = await self.client.post(
            "/auth/login", json={"username": username, "password": password}
        )
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def refresh(self, token: str) -> tuple[int, dict[str, Any]]:
        response = await self.client.post("/auth/refresh", json={"refresh_token": token})
        body: dict[str, Any] = await response.json()
        return response.status, body


def default_users() -> list[User]:
    return [
        User(name="alice", password_hash=HASH, roles=("analyst",)),
        User(name="carol", password_hash=HASH, roles=("admin", "analyst")),
        User(name="bob", password_hash=HASH, disabled=True),
    ]


@asynccontextmanager
async def running_idp(
    redis_url: str,
    tmp_path: Path,
    *,
    redis: Redis | None = None,
    backend: str = "redis",
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """An IdP on a loopback port; `backend="memory"` runs it without Redis."""
    port = unused_port()
    base_url = f"http://127.0.0.1:{port}"
    prefix = f"test:idp:{uuid.uuid4().hex}:"
    fields: dict[str, Any] = {
        "issuer": base_url,
        "audience": AUDIENCE,
        "users_file": str(tmp_path / "unused-users.yaml"),
        "key_file": str(tmp_path / "keys.pem"),
        "key_prefix": prefix,
    }
    fields.update(overrides)
    config = msgspec.convert(fields, IdpConfig)
    client_redis = redis if redis is not None else Redis.from_url(redis_url)
    checks = RecordingCheck()
    sink = ListSink()
    users = MutableUsers(default_users())
    clock = Clock()
    idp = IdentityProvider(
        config,
        users=users,
        keys=SigningKeyRing.load(config.key_file, create_algorithm=config.algorithm),
        redis=client_redis if backend == "redis" else None,
        events=sink,
        verifier=PasswordVerifier(cost=4, checkpw=checks),
        clock=clock,
    )
    server = TestServer(idp.app(), host="127.0.0.1", port=port)
    client: TestClient[Any, Any] = TestClient(server)
    await client.start_server()
    try:
        yield Harness(client, idp, config, sink, users, checks, clock, client_redis, base_url)
    finally:
        await client.close()
        if redis is None:
            keys = [key async for key in client_redis.scan_iter(match=f"{prefix}*", count=500)]
            if keys:
                await client_redis.delete(*keys)
        await client_redis.aclose()
