"""The sidecar's own identity provider, served by the proxy under its issuer path: log in
with a password, call the data service with the token, refresh, log out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml

from lineage_sidecar.ports import free_port
from proxy.audit import verify
from tests.integration.proxy.conftest import RunningProxy, run_proxy
from tests.integration.proxy.rawhttp import Reply, exchange
from tests.integration.proxy.test_gate import MODEL, POLICY, ROUTES

PASSWORD = "correct horse battery staple"


@dataclass
class LoginProxy:
    proxy: RunningProxy
    issuer: str
    audit: Path

    def post(self, path: str, document: dict[str, str], headers: str = "") -> Reply:
        body = json.dumps(document).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
        )
        return exchange(self.proxy.port, head.encode() + body, method="POST")

    def request(self, method: str, path: str, document: dict[str, str], headers: str) -> Reply:
        body = json.dumps(document).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
        )
        return exchange(self.proxy.port, head.encode() + body, method=method)

    def get(self, path: str, token: str | None = None) -> Reply:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
        return exchange(self.proxy.port, head.encode())

    def login(self, username: str, password: str = PASSWORD) -> Reply:
        return self.post("/_sidecar/auth/login", {"username": username, "password": password})


@pytest.fixture(scope="module")
def own_login(echo_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoginProxy]:
    directory = tmp_path_factory.mktemp("own-login")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    users = directory / "users.yaml"
    users.write_text(
        yaml.safe_dump(
            {
                "users": [
                    {"name": "alice", "password_hash": hashed, "roles": ["analyst"]},
                    {"name": "bob", "password_hash": hashed, "roles": ["engineer"]},
                    {"name": "carol", "password_hash": hashed, "roles": ["admin"]},
                ]
            }
        )
    )
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    (policy_dir / "model.conf").write_text(MODEL)
    (policy_dir / "policy.csv").write_text(POLICY)
    (policy_dir / "routes.yaml").write_text(ROUTES)
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/_sidecar"
    audit = directory / "audit.jsonl"
    extra = {
        "auth": {
            "idp": {
                "issuer": issuer,
                "audience": "sales-api",
                "users_file": str(users),
                "key_file": str(directory / "signing.pem"),
            }
        },
        "policy": {
            "model": str(policy_dir / "model.conf"),
            "policies": [str(policy_dir / "policy.csv")],
            "routes": str(policy_dir / "routes.yaml"),
            "audit_log": str(audit),
            "admin_path": "/_sidecar/policy",
        },
    }
    with run_proxy(directory, echo_upstream, extra=extra, port=port) as proxy:
        yield LoginProxy(proxy, issuer, audit)


def test_login_then_read_through_the_proxy(own_login: LoginProxy) -> None:
    login = own_login.login("alice")
    assert login.status == 200, login.body
    tokens = login.json()
    reply = own_login.get("/sales/orders.json", tokens["access_token"])
    assert reply.status == 200
    headers = {k.lower(): v for k, v in reply.json()["headers"]}
    assert headers["x-auth-request-user"] == "alice"
    assert headers["x-auth-request-roles"] == "analyst"
    assert own_login.get("/sales/orders/-/insert", tokens["access_token"]).status == 403


def test_wrong_password_is_401_and_audited(own_login: LoginProxy) -> None:
    assert own_login.login("alice", "not the password").status == 401
    assert own_login.login("nobody", "whatever").status == 401
    deadline = time.monotonic() + 5
    failed: list[dict[str, str]] = []
    while time.monotonic() < deadline and len(failed) < 2:
        lines = own_login.audit.read_text().splitlines() if own_login.audit.exists() else []
        entries = [json.loads(line)["entry"] for line in lines]
        failed = [e for e in entries if e["decision"] == "login_failed"]
        time.sleep(0.1)
    assert {(e["principal"], e["reason"]) for e in failed} >= {
        ("alice", "bad_password"),
        ("nobody", "unknown_user"),
    }


def test_discovery_and_jwks_are_public_and_name_the_configured_issuer(
    own_login: LoginProxy,
) -> None:
    discovery = own_login.get("/_sidecar/.well-known/openid-configuration")
    assert discovery.status == 200
    assert discovery.json()["issuer"] == own_login.issuer
    jwks = own_login.get("/_sidecar/.well-known/jwks.json").json()
    assert jwks["keys"]
    assert all("d" not in key for key in jwks["keys"])


def test_refresh_rotates_and_logout_ends_the_token(own_login: LoginProxy) -> None:
    first = own_login.login("bob").json()
    refreshed = own_login.post("/_sidecar/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert refreshed.status == 200
    second = refreshed.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert own_login.get("/sales/orders.json", second["access_token"]).status == 200
    # Reusing the consumed refresh token revokes the whole session, new tokens included.
    reuse = own_login.post("/_sidecar/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert reuse.status == 400
    assert own_login.get("/sales/orders.json", second["access_token"]).status == 401
    third = own_login.login("bob").json()
    out = own_login.post(
        "/_sidecar/auth/logout", {}, headers=f"Authorization: Bearer {third['access_token']}\r\n"
    )
    assert out.status == 200
    assert own_login.get("/sales/orders.json", third["access_token"]).status == 401


def test_sidecar_paths_cannot_be_used_to_reach_the_data_service(own_login: LoginProxy) -> None:
    # Normalized before the prefix is chosen: this is /sales/orders.json, which needs a token.
    assert own_login.get("/_sidecar/../sales/orders.json").status == 401


def test_audit_chain_holds(own_login: LoginProxy) -> None:
    own_login.login("alice")
    assert verify([own_login.audit]).ok


def test_policy_admin_api_is_guarded_by_policy_admin(own_login: LoginProxy) -> None:
    alice = own_login.login("alice").json()["access_token"]
    carol = own_login.login("carol").json()["access_token"]
    as_alice = f"Authorization: Bearer {alice}\r\n"
    as_carol = f"Authorization: Bearer {carol}\r\n"
    # dave is an analyst through a g line of the policy file.
    check = {"subject": "dave", "object": "dataset:sales.orders", "action": "read"}
    assert own_login.post("/_sidecar/policy/check", check, headers=as_alice).status == 403
    assert own_login.post("/_sidecar/policy/check", check).status == 401
    reply = own_login.post("/_sidecar/policy/check", check, headers=as_carol)
    assert reply.status == 200, reply.body
    assert reply.json()["allowed"] is True
    added = own_login.post(
        "/_sidecar/policy/roles", {"subject": "alice-bot", "role": "analyst"}, headers=as_carol
    )
    assert added.status == 201, added.body
    removed = own_login.request(
        "DELETE", "/_sidecar/policy/roles", {"subject": "alice-bot", "role": "analyst"}, as_carol
    )
    assert removed.status == 200, removed.body
