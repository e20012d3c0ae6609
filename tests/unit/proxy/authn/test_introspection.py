"""The pure introspection decision and the cache separation between configurations."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.introspection import IntrospectionConfig, principal_from_introspection
from proxy.authn.principal import AuthError, Principal
from proxy.authn.tokencache import VerifiedTokenCache

NOW = 1_700_000_000.0
CONFIG = IntrospectionConfig(
    issuer="https://as.example",
    endpoint="https://as.example/introspect",
    client_id="sidecar",
    client_secret="s3cret",
    audiences=("data-api",),
    allowed_client_ids=("web",),
    required_scopes=("read",),
    roles_claim="ext.roles",
)


def active(**overrides: Any) -> dict[str, Any]:
    response: dict[str, Any] = {
        "active": True,
        "sub": "alice",
        "iss": "https://as.example",
        "aud": ["data-api", "other"],
        "client_id": "web",
        "scope": "openid read write",
        "exp": NOW + 600,
        "jti": "t-1",
        "ext": {"roles": ["analyst"]},
    }
    response.update(overrides)
    return {key: value for key, value in response.items() if value is not None}


def test_active_token_maps_to_a_principal() -> None:
    principal = principal_from_introspection(active(), CONFIG, NOW)
    assert principal == Principal(
        id="alice",
        issuer="https://as.example",
        auth_method="introspection",
        roles=("analyst",),
        scopes=("openid", "read", "write"),
        token_id="t-1",
        expires_at=NOW + 600,
    )


@pytest.mark.parametrize(
    ("overrides", "reason", "status"),
    [
        ({"active": False}, "token_inactive", 401),
        ({"active": "true"}, "token_inactive", 401),
        ({"active": 1}, "token_inactive", 401),
        ({"exp": NOW}, "token_expired", 401),
        ({"exp": NOW - 1}, "token_expired", 401),
        ({"nbf": NOW + 60}, "token_not_yet_valid", 401),
        ({"iss": "https://other.example"}, "wrong_issuer", 401),
        ({"iss": ["https://as.example"]}, "wrong_issuer", 401),
        ({"aud": "someone-else"}, "wrong_audience", 401),
        ({"aud": None}, "wrong_audience", 401),
        ({"client_id": "mallory"}, "wrong_client", 401),
        ({"scope": "openid write"}, "insufficient_scope", 403),
        ({"scope": "reader"}, "insufficient_scope", 403),
        ({"sub": None}, "missing_claim", 401),
        ({"sub": ""}, "missing_claim", 401),
        ({"sub": 42}, "missing_claim", 401),
        ({"exp": "tomorrow"}, "malformed_introspection", 503),
        ({"exp": True}, "malformed_introspection", 503),
        ({"exp": 10**400}, "malformed_introspection", 503),
        ({"aud": [1, 2]}, "malformed_introspection", 503),
        # Lone surrogates (JSON can spell "\\udcff") are not valid Unicode.
        ({"sub": "al\udcffice"}, "malformed_claim", 401),
        ({"ext": {"roles": ["analyst", "r\ud800"]}}, "malformed_claim", 401),
        ({"jti": "t-\udc80"}, "malformed_claim", 401),
    ],
)
def test_refusals(overrides: dict[str, Any], reason: str, status: int) -> None:
    with pytest.raises(AuthError) as raised:
        principal_from_introspection(active(**overrides), CONFIG, NOW)
    assert (raised.value.reason, raised.value.status) == (reason, status)


def test_missing_exp_is_refused_unless_configured() -> None:
    response = active()
    del response["exp"]
    with pytest.raises(AuthError, match="exp"):
        principal_from_introspection(response, CONFIG, NOW)
    lenient = msgspec.structs.replace(CONFIG, require_exp=False)
    assert principal_from_introspection(response, lenient, NOW).expires_at is None


def test_missing_iss_is_refused_only_when_required() -> None:
    response = active()
    del response["iss"]
    assert principal_from_introspection(response, CONFIG, NOW).issuer == "https://as.example"
    strict = msgspec.structs.replace(CONFIG, require_iss=True)
    with pytest.raises(AuthError, match="wrong_issuer"):
        principal_from_introspection(response, strict, NOW)


def test_endpoint_must_be_https() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        msgspec.structs.replace(CONFIG, endpoint="http://as.example/introspect")


def test_repr_does_not_show_the_secret() -> None:
    assert "s3cret" not in repr(CONFIG)


_VARIANTS = st.fixed_dictionaries(
    {
        "issuer": st.sampled_from(["https://as.example", "https://as2.example"]),
        "audiences": st.sampled_from([(), ("data-api",), ("other",), ("data-api", "other")]),
        "allowed_client_ids": st.sampled_from([(), ("web",), ("cli",)]),
        "required_scopes": st.sampled_from([(), ("read",), ("write",), ("read", "write")]),
        "endpoint": st.sampled_from(["https://as.example/introspect", "https://as.example/i2"]),
    }
)


@settings(max_examples=200, deadline=None)
@given(_VARIANTS, _VARIANTS, st.text(min_size=1, max_size=20))
def test_a_cached_result_never_serves_another_configuration(
    first: dict[str, Any], second: dict[str, Any], token: str
) -> None:
    one = msgspec.structs.replace(CONFIG, **first)
    two = msgspec.structs.replace(CONFIG, **second)
    cache = VerifiedTokenCache(clock=lambda: NOW)
    principal = Principal(
        id="alice", issuer=one.issuer, auth_method="introspection", expires_at=NOW + 60
    )
    cache.put(token, one.fingerprint, principal)
    assert cache.get(token, one.fingerprint) == principal
    if first != second:
        assert one.fingerprint != two.fingerprint
        assert cache.get(token, two.fingerprint) is None


def test_fingerprint_ignores_only_the_secret() -> None:
    assert (
        msgspec.structs.replace(CONFIG, client_secret="rotated").fingerprint == CONFIG.fingerprint
    )
    assert msgspec.structs.replace(CONFIG, roles_claim=None).fingerprint != CONFIG.fingerprint
