"""Refresh rotation, reuse detection, logout and revocation over real HTTP and real Redis."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from proxy.authn.idp.refresh import RedisRefreshStore, Refuse, Rotated
from proxy.authn.idp.tokens import family_of_jti
from proxy.authn.idp.users import User
from proxy.authn.jwt import validate
from proxy.authn.principal import Principal
from tests.integration.authn.idp.harness import HASH, Harness, running_idp

INVALID_GRANT = {"error": "invalid_grant", "error_description": "refresh token is not valid"}


def principal_of(harness: Harness, access_token: str) -> Principal:
    return validate(access_token, harness.idp._trusted, harness.idp.key_store)


def family_of(harness: Harness, access_token: str) -> str:
    family = family_of_jti(principal_of(harness, access_token).token_id)
    assert family is not None
    return family


async def test_refresh_rotates_within_the_family(idp: Harness) -> None:
    first = await idp.login()
    status, second = await idp.refresh(first["refresh_token"])
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert family_of(idp, second["access_token"]) == family_of(idp, first["access_token"])
    assert principal_of(idp, second["access_token"]).roles == ("analyst",)
    status, _ = await idp.refresh(second["refresh_token"])
    assert status == 200
    assert idp.sink.kinds() == [
        ("login_succeeded", None),
        ("refresh_succeeded", None),
        ("refresh_succeeded", None),
    ]


async def test_reusing_a_refresh_token_revokes_the_whole_family(idp: Harness) -> None:
    first = await idp.login()
    status, second = await idp.refresh(first["refresh_token"])
    assert status == 200
    other_session = await idp.login()

    status, body = await idp.refresh(first["refresh_token"])
    assert (status, body) == (400, INVALID_GRANT)
    assert idp.sink.kinds()[-1] == ("refresh_reuse_detected", "refresh_token_reused")
    assert idp.sink.events[-1].family == family_of(idp, first["access_token"])
    # The legitimate-looking successor dies with the family...
    assert await idp.refresh(second["refresh_token"]) == (400, INVALID_GRANT)
    # ...and so do the family's access tokens, before they expire.
    for access_token in (first["access_token"], second["access_token"]):
        assert await idp.idp.is_revoked(principal_of(idp, access_token))
    # Another session of the same user is untouched.
    assert not await idp.idp.is_revoked(principal_of(idp, other_session["access_token"]))
    assert (await idp.refresh(other_session["refresh_token"]))[0] == 200


async def test_concurrent_refreshes_with_one_token_let_exactly_one_win(idp: Harness) -> None:
    tokens = await idp.login()
    results = await asyncio.gather(*(idp.refresh(tokens["refresh_token"]) for _ in range(6)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 400, 400, 400, 400, 400]
    # Concurrent use of one token is reuse: the winner's new token is revoked as well.
    winner = next(body for status, body in results if status == 200)
    assert (await idp.refresh(winner["refresh_token"]))[0] == 400
    assert ("refresh_reuse_detected", "refresh_token_reused") in idp.sink.kinds()


async def test_one_familys_token_never_moves_another_family(idp: Harness) -> None:
    alice = await idp.login("alice")
    carol = await idp.login("carol")
    status, rotated = await idp.refresh(alice["refresh_token"])
    assert status == 200
    assert principal_of(idp, rotated["access_token"]).id == "alice"
    assert family_of(idp, rotated["access_token"]) == family_of(idp, alice["access_token"])
    status, carol_next = await idp.refresh(carol["refresh_token"])
    assert status == 200
    assert family_of(idp, carol_next["access_token"]) == family_of(idp, carol["access_token"])


async def test_an_idle_refresh_token_expires(idp: Harness) -> None:
    tokens = await idp.login()
    idp.clock.offset = idp.config.refresh_idle_ttl + 1
    assert await idp.refresh(tokens["refresh_token"]) == (400, INVALID_GRANT)
    assert idp.sink.kinds()[-1] == ("refresh_failed", "expired")


async def test_a_session_ends_at_its_absolute_lifetime(redis_url: str, tmp_path: Path) -> None:
    async with running_idp(
        redis_url, tmp_path, refresh_idle_ttl=1000, refresh_absolute_ttl=1500
    ) as harness:
        tokens = await harness.login()
        harness.clock.offset = 900
        status, tokens = await harness.refresh(tokens["refresh_token"])
        assert status == 200
        harness.clock.offset = 1600
        assert (await harness.refresh(tokens["refresh_token"]))[0] == 400


async def test_a_disabled_user_cannot_refresh_and_the_session_ends(idp: Harness) -> None:
    tokens = await idp.login()
    idp.users.users["alice"] = User(name="alice", password_hash=HASH, disabled=True)
    assert await idp.refresh(tokens["refresh_token"]) == (400, INVALID_GRANT)
    assert idp.sink.kinds()[-1] == ("refresh_failed", "user_disabled")
    assert await idp.idp.is_revoked(principal_of(idp, tokens["access_token"]))


async def test_role_changes_apply_at_the_next_refresh(idp: Harness) -> None:
    tokens = await idp.login()
    idp.users.users["alice"] = User(name="alice", password_hash=HASH, roles=("auditor",))
    status, body = await idp.refresh(tokens["refresh_token"])
    assert status == 200
    assert principal_of(idp, body["access_token"]).roles == ("auditor",)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({}, 400, "invalid_request"),
        ({"refresh_token": 7}, 400, "invalid_request"),
        ({"refresh_token": None}, 400, "invalid_request"),
        ({"refresh_token": "garbage"}, 400, "invalid_grant"),
        ({"refresh_token": "lsrt_" + "A" * 42 + "\u0000"}, 400, "invalid_grant"),
        ({"refresh_token": "lsrt_" + "A" * 43}, 400, "invalid_grant"),
        ({"refresh_token": "x" * 7000}, 400, "invalid_grant"),
        ({"refresh_token": "x" * 9000}, 413, "invalid_request"),
    ],
)
async def test_bad_refresh_input_gets_a_clean_client_error(
    idp: Harness, body: dict[str, Any], status: int, error: str
) -> None:
    response = await idp.client.post("/auth/refresh", json=body)
    assert response.status == status
    assert (await response.json())["error"] == error


async def test_logout_with_the_refresh_token_ends_the_session(idp: Harness) -> None:
    tokens = await idp.login()
    response = await idp.client.post(
        "/auth/logout", json={"refresh_token": tokens["refresh_token"]}
    )
    assert response.status == 200
    assert await response.json() == {"revoked": True}
    assert await idp.idp.is_revoked(principal_of(idp, tokens["access_token"]))
    assert await idp.refresh(tokens["refresh_token"]) == (400, INVALID_GRANT)
    assert ("logout", None) in idp.sink.kinds()


async def test_logout_with_the_access_token_ends_the_session(idp: Harness) -> None:
    tokens = await idp.login()
    response = await idp.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert response.status == 200
    assert await idp.idp.is_revoked(principal_of(idp, tokens["access_token"]))
    assert await idp.refresh(tokens["refresh_token"]) == (400, INVALID_GRANT)


async def test_logout_with_a_consumed_refresh_token_is_reported_as_reuse(idp: Harness) -> None:
    first = await idp.login()
    status, second = await idp.refresh(first["refresh_token"])
    assert status == 200
    response = await idp.client.post("/auth/logout", json={"refresh_token": first["refresh_token"]})
    assert response.status == 200
    assert ("refresh_reuse_detected", "consumed_token_at_logout") in idp.sink.kinds()
    assert await idp.refresh(second["refresh_token"]) == (400, INVALID_GRANT)


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Authorization": "Bearer garbage"}, None, 401),
        ({"Authorization": "Bearer "}, None, 401),
        ({"Authorization": "Basic YWxpY2U6eA=="}, None, 401),
        ({"Authorization": "Bearer a.b.c"}, None, 401),
        ({}, {"refresh_token": "garbage"}, 400),
        ({}, {"refresh_token": ["lsrt_"]}, 400),
        ({}, {}, 400),
        ({}, None, 415),
    ],
)
async def test_logout_with_garbage_is_refused_cleanly(
    idp: Harness, headers: dict[str, str], body: dict[str, Any] | None, status: int
) -> None:
    sent: dict[str, Any] = {"json": body} if body is not None else {"data": b"x"}
    response = await idp.client.post("/auth/logout", headers=headers, **sent)
    assert response.status == status
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


async def test_logout_with_an_unknown_refresh_token_changes_nothing(idp: Harness) -> None:
    tokens = await idp.login()
    response = await idp.client.post("/auth/logout", json={"refresh_token": "lsrt_" + "A" * 43})
    assert response.status == 200
    assert await response.json() == {"revoked": False}
    assert (await idp.refresh(tokens["refresh_token"]))[0] == 200


async def test_a_token_of_another_issuer_is_not_ours_to_revoke(idp: Harness) -> None:
    foreign = Principal(id="x", issuer="https://other.example", auth_method="jwt")
    assert not await idp.idp.is_revoked(foreign)
    # A principal claiming our issuer without a session in its jti is refused.
    forged = Principal(id="x", issuer=idp.base_url, auth_method="jwt", token_id="plain")
    assert await idp.idp.is_revoked(forged)


def _tamper(token: str, position: int, replacement: str) -> str:
    return token[:position] + replacement + token[position + 1 :]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    position=st.integers(min_value=0, max_value=47),
    replacement=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
)
def test_a_tampered_refresh_token_never_refreshes_nor_harms_the_session(
    redis_url: str, position: int, replacement: str
) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        prefix = f"test:idp:{uuid.uuid4().hex}:"
        store = RedisRefreshStore(
            redis, prefix=prefix, idle_ttl=600, absolute_ttl=900, access_ttl=60
        )
        try:
            family, token = await store.start_family("alice")
            tampered = _tamper(token, position, replacement)
            if tampered != token:
                assert await store.rotate(tampered) == Refuse(reason="unknown_token")
            # The forged attempt did not revoke or consume the real session.
            assert not await store.is_family_revoked(family)
            outcome = await store.rotate(token)
            assert isinstance(outcome, Rotated)
            assert outcome.family == family
        finally:
            keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()

    asyncio.run(scenario())
