"""The pure parts of OIDC sign-in: configuration, discovery checks, ID-token binding."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.oidc import OidcClientConfig, check_id_token_binding, parse_discovery
from proxy.authn.principal import AuthError

ISSUER = "https://idp.example"
CONFIG = OidcClientConfig(
    issuer=ISSUER,
    client_id="web",
    client_secret="secret",
    callback_url="https://app.example.com/oauth2/callback",
    allowed_redirect_hosts=("app.example.com",),
)
DISCOVERY: dict[str, Any] = {
    "issuer": ISSUER,
    "authorization_endpoint": ISSUER + "/authorize",
    "token_endpoint": ISSUER + "/token",
    "jwks_uri": ISSUER + "/jwks",
    "code_challenge_methods_supported": ["plain", "S256"],
}


def config(**fields: Any) -> OidcClientConfig:
    return msgspec.structs.replace(CONFIG, **fields)


def test_defaults_derive_discovery_and_validation_rules() -> None:
    assert CONFIG.effective_discovery_url == ISSUER + "/.well-known/openid-configuration"
    assert CONFIG.auth_method == "client_secret_basic"
    rules = CONFIG.issuer_config()
    assert rules.audiences == ("web",)
    assert "nonce" in rules.required_claims
    assert config(client_secret=None).auth_method == "none"
    assert "secret" not in repr(CONFIG)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"callback_url": "http://app.example.com/oauth2/callback"}, "callback_url"),
        ({"callback_url": "/oauth2/callback"}, "callback_url"),
        ({"issuer": "http://idp.example"}, "discovery_url"),
        ({"discovery_url": "ftp://idp.example/d"}, "discovery_url"),
        ({"scopes": ("email",)}, "openid"),
        ({"allowed_redirect_hosts": ("*.example.com",)}, "allowed redirect host"),
        ({"default_return_path": "//evil.example"}, "default_return_path"),
        ({"client_secret": None, "token_endpoint_auth_method": "client_secret_post"}, "secret"),
        ({"algorithms": ("none",)}, "algorithms"),
        ({"algorithms": ("HS256",)}, "algorithms"),
    ],
)
def test_bad_configuration_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        config(**fields)


def test_insecure_http_only_when_allowed() -> None:
    allowed = config(
        issuer="http://127.0.0.1:1",
        callback_url="http://127.0.0.1:2/oauth2/callback",
        allow_insecure_http=True,
    )
    assert allowed.issuer_config().allow_insecure_http


def test_discovery_document_is_checked() -> None:
    metadata = parse_discovery(DISCOVERY, CONFIG)
    assert metadata.token_endpoint == ISSUER + "/token"
    without_pkce_list = {
        k: v for k, v in DISCOVERY.items() if k != "code_challenge_methods_supported"
    }
    assert (
        parse_discovery(without_pkce_list, CONFIG).authorization_endpoint == ISSUER + "/authorize"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"issuer": "https://evil.example"}, "different issuer"),
        ({"issuer": None}, "different issuer"),
        ({"token_endpoint": None}, "token_endpoint"),
        ({"authorization_endpoint": 7}, "authorization_endpoint"),
        ({"authorization_endpoint": "http://idp.example/authorize"}, "authorization_endpoint"),
        ({"token_endpoint": "javascript:x"}, "token_endpoint"),
        ({"code_challenge_methods_supported": ["plain"]}, "S256"),
    ],
)
def test_unusable_discovery_documents_are_refused(change: dict[str, Any], message: str) -> None:
    document = {k: v for k, v in (DISCOVERY | change).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        parse_discovery(document, CONFIG)


def test_id_token_must_carry_this_sign_ins_nonce() -> None:
    check_id_token_binding({"nonce": "n-1", "aud": "web"}, "n-1", "web")
    for claims in ({"nonce": "n-2"}, {}, {"nonce": ["n-1"]}, {"nonce": "n-1 "}):
        with pytest.raises(AuthError, match="nonce_mismatch"):
            check_id_token_binding(claims, "n-1", "web")


def test_authorized_party_must_be_this_client() -> None:
    check_id_token_binding({"nonce": "n", "aud": ["web", "api"], "azp": "web"}, "n", "web")
    for claims in (
        {"nonce": "n", "aud": ["web", "api"]},
        {"nonce": "n", "aud": ["web", "api"], "azp": "api"},
        {"nonce": "n", "aud": "web", "azp": "someone"},
    ):
        with pytest.raises(AuthError, match="wrong_authorized_party"):
            check_id_token_binding(claims, "n", "web")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.text(min_size=1, max_size=60))
def test_only_the_exact_nonce_passes(token_nonce: str, expected: str) -> None:
    try:
        check_id_token_binding({"nonce": token_nonce}, expected, "web")
    except AuthError:
        assert token_nonce != expected
    else:
        assert token_nonce == expected
