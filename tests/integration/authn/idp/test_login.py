"""Login, key publication and rate limiting over real HTTP, with real Redis.

The access token a login returns is verified by the proxy's own JWT validator with keys
that `JwksCache` fetched over HTTP through the provider's discovery document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.authn.idp.app import IdentityProvider
from proxy.authn.idp.config import IdpConfig
from proxy.authn.idp.keys import SigningKeyRing
from proxy.authn.idp.tokens import family_of_jti, parse_refresh_token
from proxy.authn.idp.users import PasswordVerifier, hash_password
from proxy.authn.jwks import JwksCache
from proxy.authn.jwt import IssuerConfig, TrustedIssuers
from proxy.authn.principal import AuthError, Principal
from tests.integration.authn.idp.harness import (
    AUDIENCE,
    PASSWORD,
    Harness,
    ListSink,
    MutableUsers,
    default_users,
    running_idp,
)
from tests.services import REDIS, host_port


async def verify_like_the_proxy(issuer: str, access_token: str) -> Principal:
    """Validate with keys fetched over HTTP via the published discovery document."""
    trusted = IssuerConfig(
        issuer=issuer,
        audiences=(AUDIENCE,),
        discovery_url=f"{issuer}/.well-known/openid-configuration",
        algorithms=("EdDSA", "ES256"),
        roles_claim="roles",
        allow_insecure_http=True,
    )
    cache = JwksCache([trusted])
    await cache.start()
    try:
        assert cache.status()[0].last_error is None
        return await cache.validate(access_token, TrustedIssuers([trusted]))
    finally:
        await cache.close()


async def test_login_returns_tokens_the_proxy_validator_accepts(idp: Harness) -> None:
    response = await idp.client.post(
        "/auth/login", json={"username": "carol", "password": PASSWORD}
    )
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert parse_refresh_token(body["refresh_token"]) == body["refresh_token"]
    principal = await verify_like_the_proxy(idp.base_url, body["access_token"])
    assert principal.id == "carol"
    assert principal.roles == ("admin", "analyst")
    assert principal.issuer == idp.base_url
    assert principal.expires_at is not None
    family = family_of_jti(principal.token_id)
    assert family is not None
    assert idp.sink.kinds() == [("login_succeeded", None)]
    assert idp.sink.events[0].family == family
    assert idp.sink.events[0].client_address == "127.0.0.1"
    assert not await idp.idp.is_revoked(principal)


async def test_es256_keys_work_the_same(redis_url: str, tmp_path: Path) -> None:
    async with running_idp(redis_url, tmp_path, algorithm="ES256") as harness:
        body = await harness.login()
        principal = await verify_like_the_proxy(harness.base_url, body["access_token"])
        assert principal.id == "alice"


async def test_a_form_login_works_too(idp: Harness) -> None:
    response = await idp.client.post(
        "/auth/login", data={"username": "alice", "password": PASSWORD}
    )
    assert response.status == 200
    assert "access_token" in await response.json()


async def test_published_urls_come_from_configuration_not_the_host_header(idp: Harness) -> None:
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    response = await idp.client.get("/.well-known/openid-configuration", headers=headers)
    assert response.status == 200
    document = await response.json()
    assert document["issuer"] == idp.base_url
    assert document["jwks_uri"] == f"{idp.base_url}/.well-known/jwks.json"
    assert document["token_endpoint"] == f"{idp.base_url}/auth/login"
    assert document["id_token_signing_alg_values_supported"] == ["EdDSA"]
    assert "evil" not in json.dumps(document)
    jwks = await (await idp.client.get("/.well-known/jwks.json", headers=headers)).json()
    assert [key["kid"] for key in jwks["keys"]] == [idp.idp.keys.active.kid]
    assert "d" not in jwks["keys"][0]


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [
        ("alice", "wrong password", "bad_password"),
        ("mallory", PASSWORD, "unknown_user"),
        ("bob", PASSWORD, "user_disabled"),
        ("alice", PASSWORD + "x" * 80, "bad_password"),
    ],
)
async def test_every_login_failure_looks_the_same_and_is_audited(
    idp: Harness, username: str, password: str, reason: str
) -> None:
    response = await idp.client.post(
        "/auth/login", json={"username": username, "password": password}
    )
    assert response.status == 401
    assert await response.json() == {
        "error": "invalid_credentials",
        "error_description": "wrong username or password",
    }
    assert idp.sink.kinds() == [("login_failed", reason)]
    assert idp.sink.events[0].username == username


async def test_an_unknown_user_is_checked_against_the_dummy_hash(idp: Harness) -> None:
    await idp.client.post("/auth/login", json={"username": "mallory", "password": "guess"})
    await idp.client.post("/auth/login", json={"username": "alice", "password": "guess"})
    dummy = idp.idp._verifier.dummy_hash
    assert idp.checks.hashes == [dummy, hash_for("alice", idp)]


def hash_for(name: str, harness: Harness) -> bytes:
    return harness.users.users[name].password_hash.encode()


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_login_is_limited_per_username(redis_url: str, tmp_path: Path, backend: str) -> None:
    limits = {"per_user": 3, "per_address": 100, "window": 600}
    async with running_idp(redis_url, tmp_path, rate_limit=limits, backend=backend) as harness:
        for _ in range(3):
            bad = {"username": "alice", "password": "guess"}
            assert (await harness.client.post("/auth/login", json=bad)).status == 401
        # Even the right password waits now: the limit counts attempts, not failures.
        good = {"username": "alice", "password": PASSWORD}
        limited = await harness.client.post("/auth/login", json=good)
        assert limited.status == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 600
        assert (await limited.json())["error"] == "too_many_requests"
        assert harness.sink.kinds()[-1] == ("login_rate_limited", "too_many_attempts")
        # Refused attempts spend no bcrypt work.
        assert len(harness.checks.hashes) == 3
        # Another user is not affected.
        other = {"username": "carol", "password": PASSWORD}
        assert (await harness.client.post("/auth/login", json=other)).status == 200


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_login_is_limited_per_client_address(
    redis_url: str, tmp_path: Path, backend: str
) -> None:
    limits = {"per_user": 100, "per_address": 2, "window": 600}
    async with running_idp(redis_url, tmp_path, rate_limit=limits, backend=backend) as harness:
        for name in ("u1", "u2"):
            attempt = {"username": name, "password": "guess"}
            assert (await harness.client.post("/auth/login", json=attempt)).status == 401
        attempt = {"username": "alice", "password": PASSWORD}
        assert (await harness.client.post("/auth/login", json=attempt)).status == 429


MEGABYTE = b"x" * (1024 * 1024)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{}", "application/json", 400),
        (b'{"username": "alice"}', "application/json", 400),
        (b'{"password": "x"}', "application/json", 400),
        (b'{"username": 5, "password": "x"}', "application/json", 400),
        (b'{"username": "alice", "password": null}', "application/json", 400),
        (b'{"username": ["alice"], "password": "x"}', "application/json", 400),
        (b'{"username": "alice", "password": {"$ne": 1}}', "application/json", 400),
        (b'["alice", "x"]', "application/json", 400),
        (b'{"username": "alice", "username": "bob", "password": "x"}', "application/json", 400),
        (b"{not json", "application/json", 400),
        (b'{"username": "\xff\xfe", "password": "x"}', "application/json", 400),
        (b'{"username": "alice", "password": "\\ud800"}', "application/json", 400),
        (b'{"username": "al\\u0000ice", "password": "x"}', "application/json", 400),
        (b'{"username": "' + b"a" * 10_000 + b'", "password": "x"}', "application/json", 413),
        (b'{"username": "' + b"a" * 5_000 + b'", "password": "x"}', "application/json", 400),
        (b'{"username": "alice", "password": ""}', "application/json", 400),
        (b'{"username": "alice", "password": "' + b"p" * 2_000 + b'"}', "application/json", 400),
        (b'{"username": "alice", "password": "' + b"p" * 100_000 + b'"}', "application/json", 413),
        (MEGABYTE, "application/json", 413),
        (b"username=alice&password=%FF", "application/x-www-form-urlencoded", 400),
        (b"username=\xffalice&password=x", "application/x-www-form-urlencoded", 400),
        (b"username=a&username=b&password=x", "application/x-www-form-urlencoded", 400),
        (b"username=al%00ice&password=x", "application/x-www-form-urlencoded", 400),
        (b"&".join([b"f%d=1" % i for i in range(50)]), "application/x-www-form-urlencoded", 400),
        (b"username=alice&password=x", "text/plain", 415),
        (b"", "application/json", 400),
    ],
)
async def test_bad_login_input_gets_a_clean_client_error(
    idp: Harness, body: bytes, content_type: str, status: int
) -> None:
    response = await idp.client.post(
        "/auth/login", data=body, headers={"Content-Type": content_type}
    )
    assert response.status == status
    problem = await response.json()
    assert problem["error"] == ("invalid_request" if status != 401 else "invalid_credentials")
    # Malformed requests never reach bcrypt.
    assert idp.checks.hashes == []


async def test_a_chunked_body_without_length_is_capped_too(idp: Harness) -> None:
    async def chunks() -> Any:
        for _ in range(64):
            yield b"x" * 16_384

    response = await idp.client.post(
        "/auth/login", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 413


async def test_without_redis_login_fails_closed_with_503(redis_url: str, tmp_path: Path) -> None:
    host, _ = host_port(REDIS.address())
    # No retries: redis-py's default backoff would only make the test slower.
    dead = Redis(
        host=host, port=unused_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    async with running_idp(redis_url, tmp_path, redis=dead) as harness:
        response = await harness.client.post(
            "/auth/login", json={"username": "alice", "password": PASSWORD}
        )
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"] == "temporarily_unavailable"
        principal = Principal(
            id="alice",
            issuer=harness.base_url,
            auth_method="jwt",
            token_id="A" * 22 + "." + "B" * 22,
        )
        with pytest.raises(AuthError) as refused:
            await harness.idp.is_revoked(principal)
        assert refused.value.status == 503


async def test_from_config_loads_the_users_file_and_creates_the_key_file(
    redis_url: str, tmp_path: Path
) -> None:
    users_file = tmp_path / "users.yaml"
    users_file.write_text(
        "users:\n"
        f"  - {{name: dana, password_hash: '{hash_password('dana pass', rounds=4)}', "
        "roles: [reader]}\n"
    )
    config = msgspec.convert(
        {
            "issuer": "http://127.0.0.1:1",
            "audience": AUDIENCE,
            "users_file": str(users_file),
            "key_file": str(tmp_path / "var" / "keys.pem"),
        },
        IdpConfig,
    )
    redis = Redis.from_url(redis_url)
    try:
        idp = IdentityProvider.from_config(config, redis=redis, events=ListSink())
        assert (tmp_path / "var" / "keys.pem").exists()
        assert idp.keys.active.algorithm == "EdDSA"
        assert idp.issuer_config.issuer == "http://127.0.0.1:1"
        assert await idp._users.get("dana") is not None
        idp._verifier.close()
    finally:
        await redis.aclose()


async def test_a_wrong_method_or_path_is_a_client_error(idp: Harness) -> None:
    assert (await idp.client.get("/auth/login")).status == 405
    assert (await idp.client.post("/auth/../.well-known/jwks.json")).status in (404, 405)


async def test_mounted_under_the_issuer_path_everything_lives_below_it(tmp_path: Path) -> None:
    port = unused_port()
    issuer = f"http://127.0.0.1:{port}/idp"
    config = msgspec.convert(
        {
            "issuer": issuer,
            "audience": AUDIENCE,
            "users_file": str(tmp_path / "unused.yaml"),
            "key_file": str(tmp_path / "keys.pem"),
        },
        IdpConfig,
    )
    provider = IdentityProvider(
        config,
        users=MutableUsers(default_users()),
        keys=SigningKeyRing.load(config.key_file),
        redis=None,
        events=ListSink(),
        verifier=PasswordVerifier(cost=4),
    )
    root = web.Application()
    root.add_subapp(config.mount_path, provider.app())
    client: TestClient[Any, Any] = TestClient(TestServer(root, host="127.0.0.1", port=port))
    await client.start_server()
    try:
        document = await (await client.get("/idp/.well-known/openid-configuration")).json()
        assert document["jwks_uri"] == f"{issuer}/.well-known/jwks.json"
        response = await client.post(
            "/idp/auth/login", json={"username": "alice", "password": PASSWORD}
        )
        assert response.status == 200
        token = (await response.json())["access_token"]
        principal = await verify_like_the_proxy(issuer, token)
        assert principal.id == "alice"
        assert principal.issuer == issuer
    finally:
        await client.close()
