"""Interoperability with a real Keycloak: its tokens, its discovery document, its key rotation.

Opt-in (LS_KEYCLOAK=1): Keycloak comes from Maven Central through `scripts/keycloak`
(about 180 MB on first use) and takes 30-90 s to start on a busy 2-core machine, too much
for every run of the suite. When enabled, a failure to fetch or start Keycloak fails the
tests; it never skips them.

The module starts one Keycloak in dev mode on ephemeral loopback ports with a realm written
here (`interop`: realm roles, a user, confidential clients with audience mappers, a
service account allowed to manage the realm's keys) and a second realm (`elsewhere`) whose
tokens the proxy does not trust. In front of the echo upstream, the proxy runs through its
CLI with one `jwt_issuers` entry found by OIDC discovery, the roles taken from
`realm_access.roles` and a Casbin policy on those roles. Tokens come from Keycloak's own
token endpoint (password and client-credentials grants), so what is checked is what an
operator who points the sidecar at Keycloak would see.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lineage_sidecar.ports import free_port
from tests.integration.proxy.conftest import REPO, RunningProxy, run_proxy, running_echo_upstream
from tests.integration.proxy.rawhttp import Reply, get

pytestmark = [
    pytest.mark.keycloak,
    pytest.mark.skipif(
        os.environ.get("LS_KEYCLOAK") != "1",
        reason="opt-in: LS_KEYCLOAK=1 runs it against a real Keycloak from Maven Central "
        "(scripts/keycloak fetch: about 180 MB; startup 30-90 s)",
    ),
]

KEYCLOAK_SCRIPT = REPO / "scripts" / "keycloak"
# Fetching (first use) plus a slow start; the script bounds the start itself
# (LS_KEYCLOAK_TIMEOUT), this only guards against a hung Maven.
SCRIPT_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 15.0

REALM = "interop"
OTHER_REALM = "elsewhere"
AUDIENCE = "sales-api"
USER_ID = "7d2b3c1e-0000-4000-8000-00000000a11c"
USER = ("alice", "alice-password-0123456789")
EMAIL = "alice@example.com"
# Confidential clients: (client id, secret, the audience its tokens carry).
SALES_CLIENT = ("sales-cli", "sales-cli-secret-0123456789abcdef", AUDIENCE)
REPORTS_CLIENT = ("reports-cli", "reports-cli-secret-0123456789abcdef", "reports-api")
ADMIN_CLIENT = ("interop-admin", "interop-admin-secret-0123456789abcd", "interop-admin")
OTHER_CLIENT = ("sales-cli", "elsewhere-secret-0123456789abcdef", AUDIENCE)

TARGET = "/sales/orders.json"

MODEL = """\
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act, eft

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub) && globMatch(r.obj, p.obj) && r.act == p.act
"""

POLICY = "p, analyst, dataset:sales.*, read, allow\n"

ROUTES = """\
version: 1
routes:
  - name: table
    methods: [GET]
    path: /{db}/{table}.json
    resource: dataset:{db}.{table}
    action: read
"""


def confidential_client(
    client: tuple[str, str, str], *, users: bool = False, service_account: bool = False
) -> dict[str, Any]:
    client_id, secret, audience = client
    return {
        "clientId": client_id,
        "enabled": True,
        "publicClient": False,
        "secret": secret,
        "standardFlowEnabled": False,
        "directAccessGrantsEnabled": users,
        "serviceAccountsEnabled": service_account,
        "protocolMappers": [
            {
                "name": f"{audience} audience",
                "protocol": "openid-connect",
                "protocolMapper": "oidc-audience-mapper",
                "config": {
                    "included.custom.audience": audience,
                    "access.token.claim": "true",
                    "id.token.claim": "false",
                },
            }
        ],
    }


def interop_realm() -> dict[str, Any]:
    admin_id = ADMIN_CLIENT[0]
    return {
        # The realm's id is the parent of its key providers in the admin API.
        "id": REALM,
        "realm": REALM,
        "enabled": True,
        "roles": {"realm": [{"name": "analyst"}, {"name": "engineer"}]},
        "clients": [
            confidential_client(SALES_CLIENT, users=True, service_account=True),
            confidential_client(REPORTS_CLIENT, service_account=True),
            confidential_client(ADMIN_CLIENT, service_account=True),
        ],
        "users": [
            {
                "id": USER_ID,
                "username": USER[0],
                "enabled": True,
                "email": EMAIL,
                "emailVerified": True,
                "firstName": "Alice",
                "lastName": "Analyst",
                "credentials": [{"type": "password", "value": USER[1], "temporary": False}],
                "realmRoles": ["analyst"],
            },
            {
                # The admin client's service account may manage this realm, keys included:
                # the test rotates keys through the admin REST API as an operator would.
                "username": f"service-account-{admin_id}",
                "enabled": True,
                "serviceAccountClientId": admin_id,
                "clientRoles": {"realm-management": ["manage-realm", "view-realm"]},
            },
        ],
    }


def other_realm() -> dict[str, Any]:
    return {
        "realm": OTHER_REALM,
        "enabled": True,
        "roles": {"realm": [{"name": "analyst"}]},
        "clients": [confidential_client(OTHER_CLIENT, service_account=True)],
        "users": [
            {
                "username": f"service-account-{OTHER_CLIENT[0]}",
                "enabled": True,
                "serviceAccountClientId": OTHER_CLIENT[0],
                "realmRoles": ["analyst"],
            }
        ],
    }


def http_json(
    url: str,
    *,
    form: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    """One request to Keycloak; (status, parsed JSON body or None)."""
    headers = {"Accept": "application/json"}
    data: bytes | None = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, json.loads(raw) if raw else None


def segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


@dataclass
class Keycloak:
    base_url: str
    directory: Path

    def realm_url(self, realm: str = REALM) -> str:
        return f"{self.base_url}/realms/{realm}"

    def discovery(self, realm: str = REALM) -> dict[str, Any]:
        status, document = http_json(f"{self.realm_url(realm)}/.well-known/openid-configuration")
        assert status == 200, document
        assert isinstance(document, dict)
        return document

    def token(self, grant: dict[str, str], client: tuple[str, str, str], realm: str) -> str:
        token_endpoint = self.discovery(realm)["token_endpoint"]
        form = {"client_id": client[0], "client_secret": client[1], **grant}
        status, answer = http_json(token_endpoint, form=form)
        assert status == 200, answer
        access_token: str = answer["access_token"]
        return access_token

    def user_token(self) -> str:
        grant = {"grant_type": "password", "username": USER[0], "password": USER[1]}
        return self.token(grant, SALES_CLIENT, REALM)

    def client_token(self, client: tuple[str, str, str], realm: str = REALM) -> str:
        return self.token({"grant_type": "client_credentials"}, client, realm)

    def add_signing_key(self, name: str, priority: int) -> None:
        """Add an RS256 key that outranks the realm's current one, via the admin REST API."""
        component = {
            "name": name,
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": REALM,
            "config": {
                "priority": [str(priority)],
                "enabled": ["true"],
                "active": ["true"],
                "algorithm": ["RS256"],
                "keySize": ["2048"],
            },
        }
        admin_token = self.client_token(ADMIN_CLIENT)
        url = f"{self.base_url}/admin/realms/{REALM}/components"
        status, answer = http_json(url, body=component, token=admin_token)
        assert status == 201, (status, answer)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KEYCLOAK_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keycloak]:
    directory = tmp_path_factory.mktemp("keycloak")
    realm_files = []
    for realm in (interop_realm(), other_realm()):
        path = directory / f"{realm['realm']}-realm.json"
        path.write_text(json.dumps(realm, indent=2))
        realm_files.append(str(path))
    server = directory / "server"
    try:
        for attempt in range(3):
            port, management_port = free_port(), free_port()
            while management_port == port:
                management_port = free_port()
            started = run_script(
                "start", str(server), str(port), str(management_port), *realm_files
            )
            if started.returncode == 0:
                break
            # Another process may have taken a port between free_port() and Keycloak's bind.
            if "already" in started.stderr and "bound" in started.stderr and attempt < 2:
                run_script("stop", str(server))
                continue
            pytest.fail(f"scripts/keycloak start failed:\n{started.stdout}{started.stderr}")
        yield Keycloak(f"http://127.0.0.1:{port}", server)
    finally:
        stopped = run_script("stop", str(server))
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def echo_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The proxy tests' echo upstream: it answers with the headers it received."""
    with running_echo_upstream(tmp_path_factory.mktemp("keycloak-echo")) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(
    keycloak: Keycloak, echo_upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    directory = tmp_path_factory.mktemp("keycloak-proxy")
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    (policy_dir / "model.conf").write_text(MODEL)
    (policy_dir / "policy.csv").write_text(POLICY)
    (policy_dir / "routes.yaml").write_text(ROUTES)
    issuer = keycloak.realm_url()
    extra = {
        "auth": {
            "jwt_issuers": [
                {
                    "issuer": issuer,
                    "audiences": [AUDIENCE],
                    "discovery_url": f"{issuer}/.well-known/openid-configuration",
                    "allow_insecure_http": True,
                    "roles_claim": "realm_access.roles",
                    # The rotation test must not wait out the default 30 s between
                    # unknown-kid refetches.
                    "jwks_min_refresh_interval": 1,
                }
            ]
        },
        "policy": {
            "model": str(policy_dir / "model.conf"),
            "policies": [str(policy_dir / "policy.csv")],
            "routes": str(policy_dir / "routes.yaml"),
            "audit_log": str(directory / "audit.jsonl"),
        },
        "capture": {"spool_dir": str(directory / "spool")},
    }
    with run_proxy(directory, echo_upstream, extra=extra) as running:
        yield running


def call(proxy: RunningProxy, token: str | None) -> Reply:
    headers = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return get(proxy.port, TARGET, headers=headers)


def upstream_headers(reply: Reply) -> dict[str, str]:
    return {name.lower(): value for name, value in reply.json()["headers"]}


def refused_because(reply: Reply, reason: str) -> bool:
    challenge = reply.header("WWW-Authenticate") or ""
    return reply.status == 401 and f'error_description="{reason}"' in challenge


def test_keycloak_user_token_reaches_upstream_with_identity_and_realm_roles(
    keycloak: Keycloak, proxy: RunningProxy
) -> None:
    reply = call(proxy, keycloak.user_token())
    assert reply.status == 200, reply.body
    seen = upstream_headers(reply)
    assert seen["x-auth-request-user"] == USER_ID
    assert "analyst" in seen["x-auth-request-roles"].split(",")
    assert seen["x-auth-request-email"] == EMAIL
    assert seen["x-auth-request-issuer"] == keycloak.realm_url()


def test_keycloak_service_account_is_authenticated_but_its_roles_do_not_grant_read(
    keycloak: Keycloak, proxy: RunningProxy
) -> None:
    reply = call(proxy, keycloak.client_token(SALES_CLIENT))
    assert reply.status == 403, reply.body


def test_no_token_is_401_with_bearer_challenge(proxy: RunningProxy) -> None:
    reply = call(proxy, None)
    assert reply.status == 401
    assert (reply.header("WWW-Authenticate") or "").startswith("Bearer ")


def test_token_for_an_audience_not_configured_is_401(
    keycloak: Keycloak, proxy: RunningProxy
) -> None:
    token = keycloak.client_token(REPORTS_CLIENT)
    # Keycloak adds `account` for the service account's default roles: still not ours.
    audiences = segment(token, 1)["aud"]
    assert "reports-api" in audiences
    assert AUDIENCE not in audiences
    assert refused_because(call(proxy, token), "wrong_audience")


def test_token_of_another_keycloak_realm_is_401(keycloak: Keycloak, proxy: RunningProxy) -> None:
    token = keycloak.client_token(OTHER_CLIENT, realm=OTHER_REALM)
    assert refused_because(call(proxy, token), "untrusted_issuer")


def test_token_with_a_tampered_signature_is_401(keycloak: Keycloak, proxy: RunningProxy) -> None:
    header, payload, signature = keycloak.user_token().split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    tampered = f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    assert refused_because(call(proxy, tampered), "bad_signature")


def test_token_with_roles_added_to_its_payload_is_401(
    keycloak: Keycloak, proxy: RunningProxy
) -> None:
    header, payload, signature = keycloak.user_token().split(".")
    claims = segment(f"{header}.{payload}.{signature}", 1)
    claims["realm_access"] = {"roles": ["analyst", "admin"]}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refused_because(call(proxy, f"{header}.{forged}.{signature}"), "bad_signature")


def test_token_signed_by_a_key_added_after_start_passes(
    keycloak: Keycloak, proxy: RunningProxy
) -> None:
    before = keycloak.user_token()
    keycloak.add_signing_key("rotated-rsa", priority=1000)
    after = keycloak.user_token()
    old_kid, new_kid = segment(before, 0)["kid"], segment(after, 0)["kid"]
    assert new_kid != old_kid, "Keycloak did not sign with the new key"
    # The proxy fetched the key set at start, so the new kid is unknown to it until it
    # fetches again; one refetch per jwks_min_refresh_interval (1 s here).
    time.sleep(1.1)
    reply = call(proxy, after)
    assert reply.status == 200, reply.body
    assert upstream_headers(reply)["x-auth-request-user"] == USER_ID
    # The previous key is still published, so tokens it signed keep working.
    assert call(proxy, before).status == 200
