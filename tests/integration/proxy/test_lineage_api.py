"""`lineage-sidecar api`: the lineage API behind the proxy, asked the proxy's own policy.

A token-holding analyst tracks and reads lineage; the shipped demo policy's deny rule on
`dataset:sales.secret` hides that dataset from her graph, by name, everywhere."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from authlib.jose import JsonWebKey

from tests.integration.proxy.conftest import RunningProxy, run_proxy
from tests.integration.proxy.rawhttp import Reply, exchange
from tests.integration.proxy.test_gate import AUDIENCE, ISSUER, Issuer

REPO = Path(__file__).resolve().parents[3]
NS = "http://sales.test"


async def _admin(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@dataclass
class ApiProxy:
    proxy: RunningProxy
    issuer: Issuer

    def call(
        self, method: str, target: str, user: str, roles: list[str], body: Any = None
    ) -> Reply:
        token = self.issuer.token(user, roles)
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: lineage.test\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return exchange(self.proxy.port, head.encode() + data, method=method)


@pytest.fixture(scope="module")
def lineage_api(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProxy]:
    directory = tmp_path_factory.mktemp("lineage-api")
    name = f"lineage_proxy_api_{secrets.token_hex(6)}"
    asyncio.run(_admin(pg_dsn, f'CREATE DATABASE "{name}"'))
    dsn = urlunsplit(urlsplit(pg_dsn)._replace(path="/" + name))
    key = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "k1"})
    keyset = directory / "jwks.json"
    keyset.write_text(json.dumps({"keys": [key.as_dict(is_private=False)]}))
    (directory / "store-dsn").write_text(dsn)
    # viewer: lineage, and of the datasets sales.orders alone (no deny rule in the way).
    viewer = directory / "viewer.csv"
    viewer.write_text(
        "p, viewer, lineage:*, read, allow\np, viewer, dataset:sales.orders, read, allow\n"
    )
    config = {
        "auth": {
            "jwt_issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "key_file": str(keyset),
                    "roles_claim": "roles",
                }
            ]
        },
        "policy": {
            "model": str(REPO / "policies" / "model.conf"),
            "policies": [str(REPO / "policies" / "policy.csv"), str(viewer)],
            "routes": str(REPO / "policies" / "api-routes.yaml"),
            "audit_log": str(directory / "audit.jsonl"),
        },
        "api": {"store_dsn": f"file:{directory / 'store-dsn'}"},
    }
    try:
        with run_proxy(directory, None, extra=config) as proxy:
            yield ApiProxy(proxy, Issuer(key))
    finally:
        asyncio.run(_admin(pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run_event(run: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    return {
        "eventType": "COMPLETE",
        "eventTime": "2026-11-26T10:00:00Z",
        "run": {"runId": str(uuid.uuid5(uuid.NAMESPACE_OID, run))},
        "job": {"namespace": "etl", "name": f"job-{run}"},
        "inputs": [{"namespace": NS, "name": n} for n in inputs],
        "outputs": [{"namespace": NS, "name": n} for n in outputs],
        "producer": "https://example.com/etl",
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
    }


def test_track_then_graph_hides_the_denied_dataset_by_name(lineage_api: ApiProxy) -> None:
    events = [
        run_event("one", ["sales.orders"], ["sales.secret"]),
        run_event("two", ["sales.secret"], ["sales.report"]),
    ]
    # bob (engineer) may write sales datasets, but inherits the deny on sales.secret.
    refused = lineage_api.call("POST", "/lineage/track", "bob", ["engineer"], events)
    assert refused.status == 403
    # carol (admin) may write everything.
    tracked = lineage_api.call("POST", "/lineage/track", "carol", ["admin"], events)
    assert tracked.status == 202, tracked.body
    node = quote(f"{NS}:sales.orders", safe="")
    graph = lineage_api.call(
        "GET", f"/lineage/graph?node={node}&direction=down&depth=3", "alice", ["analyst"]
    )
    assert graph.status == 200, graph.body
    assert b"secret" not in graph.body
    names = {n.get("name") for n in graph.json()["nodes"]}
    assert {"sales.orders", "sales.report"} <= names
    full = lineage_api.call(
        "GET", f"/lineage/graph?node={node}&direction=down&depth=3", "carol", ["admin"]
    )
    assert b"sales.secret" in full.body


def test_route_permission_is_checked_by_the_proxy(lineage_api: ApiProxy) -> None:
    # No lineage permission at all: the proxy refuses before the API is reached.
    reply = lineage_api.call("GET", "/lineage/graph?node=x:y", "mallory", ["nobody"])
    assert reply.status == 403
    assert reply.json()["error"] == "forbidden"


def test_openapi_is_public_and_identity_cannot_be_forged(lineage_api: ApiProxy) -> None:
    head = b"GET /openapi.json HTTP/1.1\r\nHost: lineage.test\r\nConnection: close\r\n\r\n"
    document = exchange(lineage_api.proxy.port, head)
    assert document.status == 200
    assert "/lineage/graph" in document.json()["paths"]
    node = quote(f"{NS}:sales.orders", safe="")
    forged = (
        f"GET /lineage/graph?node={node} HTTP/1.1\r\nHost: lineage.test\r\n"
        "X-Auth-Request-User: carol\r\nX-Auth-Request-Roles: admin\r\nConnection: close\r\n\r\n"
    )
    assert exchange(lineage_api.proxy.port, forged.encode()).status == 401


@pytest.mark.parametrize(
    ("user", "roles"),
    [
        ("carol ", ["viewer"]),  # the demo policy makes carol an admin; "carol " is not
        (" carol", ["viewer"]),
        ("mallory", ["viewer", " admin"]),
        ("mallory", ["admin ", "viewer"]),
        ("mallory", ["viewer", "admin "]),
    ],
)
def test_the_api_decides_on_the_identity_the_proxy_decided_on(
    lineage_api: ApiProxy, user: str, roles: list[str]
) -> None:
    # A subject or role with blanks at its ends is another identity to the policy; the
    # headers that name it to the API must not lose them (HTTP drops a value's outer
    # blanks, and the API trimmed each role).
    events = [run_event("one", ["sales.orders"], ["sales.secret"])]
    assert lineage_api.call("POST", "/lineage/track", "carol", ["admin"], events).status == 202
    node = quote(f"{NS}:sales.orders", safe="")
    graph = lineage_api.call(
        "GET", f"/lineage/graph?node={node}&direction=down&depth=3", user, roles
    )
    assert graph.status == 200, graph.body
    assert b"sales.secret" not in graph.body
