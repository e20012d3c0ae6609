"""SQL authorized table by table in front of a real data service (Datasette on SQLite):
what the service would actually read is what the policy must see."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from authlib.jose import JsonWebKey

from agent.capture import CaptureRecord
from agent.derive import Deriver
from agent.events import RunEvent
from agent.spool import SpoolReader
from tests.integration.proxy.conftest import RunningProxy, run_proxy
from tests.integration.proxy.rawhttp import Reply, get
from tests.integration.proxy.test_gate import AUDIENCE, ISSUER, MODEL, POLICY, ROUTES, Issuer


@dataclass
class DatasetteGate:
    proxy: RunningProxy
    issuer: Issuer
    spool: Path

    def get(self, target: str) -> Reply:
        token = self.issuer.token("alice", ["analyst"])
        return get(self.proxy.port, target, headers=f"Authorization: Bearer {token}\r\n")

    def sql(self, sql: str) -> Reply:
        token = self.issuer.token("alice", ["analyst"])
        return get(
            self.proxy.port,
            f"/sales.json?sql={quote(sql)}&_shape=array",
            headers=f"Authorization: Bearer {token}\r\n",
        )


@pytest.fixture(scope="module")
def datasette_gate(
    datasette_upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DatasetteGate]:
    directory = tmp_path_factory.mktemp("datasette-gate")
    key = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "k1"})
    keyset = directory / "jwks.json"
    keyset.write_text(json.dumps({"keys": [key.as_dict(is_private=False)]}))
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    (policy_dir / "model.conf").write_text(MODEL)
    (policy_dir / "policy.csv").write_text(POLICY)
    # Datasette undoes its tilde encoding in path segments: so must the routes in front of it.
    routes = ROUTES.replace("routes:", "tilde_decode: true\nroutes:", 1)
    (policy_dir / "routes.yaml").write_text(routes)
    extra = {
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
            "model": str(policy_dir / "model.conf"),
            "policies": [str(policy_dir / "policy.csv")],
            "routes": str(policy_dir / "routes.yaml"),
        },
        "capture": {"spool_dir": str(directory / "spool"), "service": "http://datasette"},
    }
    with run_proxy(directory, datasette_upstream, extra=extra) as proxy:
        yield DatasetteGate(proxy, Issuer(key), directory / "spool")


def test_an_allowed_table_is_served(datasette_gate: DatasetteGate) -> None:
    reply = datasette_gate.sql("select count(*) as n from orders")
    assert reply.status == 200, reply.body
    assert reply.json() == [{"n": 4}]


@pytest.mark.parametrize(
    "sql",
    [
        "select * from secret",
        # SQLite reads `x IN table` as `x IN (SELECT * FROM table)`: a membership oracle
        # on every row of the denied table, in each spelling SQLite takes for a table name.
        "select (1, 1, 50000.0) in secret as hit",
        "select (1, 1, 50000.0) in main.secret as hit",
        "select (1, 1, 50000.0) in 'secret' as hit",
        'select (1, 1, 50000.0) not in "SECRET" as hit',
        "select (1, 1, 50000.0) in [secret] as hit",
        "select id from customers where (id, id, 50000.0) in secret",
    ],
)
def test_a_denied_table_is_never_read_through_sql(datasette_gate: DatasetteGate, sql: str) -> None:
    reply = datasette_gate.sql(sql)
    assert reply.status == 403, (sql, reply.status, reply.body)
    assert "dataset:sales.secret" in reply.json()["message"]


@pytest.mark.parametrize(
    "target",
    [
        "/sales/~73ecret.json",
        "/sales/secre~74.json",
        "/~73ales/secret.json",
        "/sales/~73ecret.json?_shape=array",
        f"/~73ales.json?sql={quote('select * from secret')}",
    ],
)
def test_tilde_encoded_names_are_decided_as_the_names_datasette_reads(
    datasette_gate: DatasetteGate, target: str
) -> None:
    # Datasette reads /sales/~73ecret.json as the table `secret`: decided as anything else,
    # dataset:sales.* would allow it past the deny.
    reply = datasette_gate.get(target)
    assert reply.status == 403, (target, reply.status, reply.body)


def test_a_tilde_encoded_allowed_table_is_served(datasette_gate: DatasetteGate) -> None:
    reply = datasette_gate.get("/sales/~6Frders.json?_shape=array")
    assert reply.status == 200, reply.body
    assert len(reply.json()) == 4


def test_tilde_encoding_of_bytes_that_are_not_utf8_is_refused(
    datasette_gate: DatasetteGate,
) -> None:
    reply = datasette_gate.get("/sales/~FFx.json")
    assert reply.status == 400
    assert reply.json()["error"] == "bad_path"
    assert "not UTF-8" in reply.json()["message"]


def _captured(spool: Path, sql: str) -> CaptureRecord:
    reader = SpoolReader(spool / "w0")
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            for _, record in reader.read_batch(10_000):
                if record.sql == sql:
                    return record
            time.sleep(0.1)
    finally:
        reader.close()
    raise AssertionError(f"no capture record for {sql!r}")


def test_sql_on_the_main_schema_is_lineage_of_the_served_database(
    datasette_gate: DatasetteGate,
) -> None:
    # SQLite's `main` is the database Datasette runs the query in: /sales reads sales.orders.
    sql = f"select count(*) as n from main.orders where {time.time_ns()} > 0"
    reply = datasette_gate.sql(sql)
    assert reply.status == 200, reply.body
    assert reply.json() == [{"n": 4}]
    events = Deriver().feed(_captured(datasette_gate.spool, sql))
    (start, *_) = [e for e in events if isinstance(e, RunEvent)]
    assert [(d.namespace, d.name) for d in start.inputs] == [("http://datasette", "sales.orders")]
