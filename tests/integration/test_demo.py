"""`lineage-sidecar demo` as a new user meets it: start, read endpoints.json, log in, query."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

CLI = str(Path(sys.executable).with_name("lineage-sidecar"))


def call(url: str, ca: str, *, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=ca)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_demo_serves_the_contract_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                CLI,
                "demo",
                "--state-dir",
                str(state),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        endpoints = state / "endpoints.json"
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        facts = json.loads(endpoints.read_text())
        for key in (
            "proxy_url",
            "admin_url",
            "api_url",
            "upstream_url",
            "ca_cert",
            "policy_dir",
            "users",
        ):
            assert key in facts
        assert facts["proxy_url"].startswith("https://127.0.0.1:")
        users = {u["name"]: u for u in facts["users"]}
        assert set(users) == {"alice", "bob", "carol"}
        proxy, ca = facts["proxy_url"], facts["ca_cert"]

        status, _ = call(f"{proxy}/sales/orders.json", ca)
        assert status == 401
        status, tokens = call(
            f"{proxy}/_sidecar/auth/login",
            ca,
            body={"username": "alice", "password": users["alice"]["password"]},
        )
        assert status == 200
        token = tokens["access_token"]
        status, table = call(f"{proxy}/sales/orders.json", ca, token=token)
        assert status == 200
        assert len(table["rows"]) == 4
        status, _ = call(f"{proxy}/sales/secret.json", ca, token=token)
        assert status == 403
        status, _ = call(f"{proxy}/sales.json?sql=select+*+from+orders", ca, token=token)
        assert status == 200
        api = facts["api_url"]
        status, graph = call(
            f"{api}/lineage/graph?node=demo-sales:sales.dashboard&direction=up&depth=3",
            ca,
            token=token,
        )
        assert status == 200
        names = {node.get("name") for node in graph["nodes"]}
        assert {"sales.daily_revenue", "sales.orders"} <= names
        assert "secret" not in json.dumps(graph)
        assert any(node["kind"] == "hidden" for node in graph["nodes"])
        # The query above went spool -> agent -> store: alice's read shows up.
        deadline = time.monotonic() + 20
        readers: list[str] = []
        while time.monotonic() < deadline and "alice" not in readers:
            status, access = call(
                f"{api}/datasets/sales.orders/access?namespace=demo-sales", ca, token=token
            )
            assert status == 200
            readers = [event["principal"] for event in access["events"]]
            time.sleep(0.3)
        assert "alice" in readers
        with urllib.request.urlopen(f"{facts['admin_url']}/readyz", timeout=5) as ready:
            assert json.loads(ready.read())["ready"] is True
        # The agent that delivered alice's read has its own admin listener.
        agent_admin = facts["agent_admin_url"]
        with urllib.request.urlopen(f"{agent_admin}/readyz", timeout=5) as ready:
            assert json.loads(ready.read())["ready"] is True
        with urllib.request.urlopen(f"{agent_admin}/metrics", timeout=5) as scrape:
            derived = {
                sample.name: sample.value
                for family in text_string_to_metric_families(scrape.read().decode())
                for sample in family.samples
            }
        assert derived["lineage_agent_events_derived_total"] > 0
        assert derived["lineage_agent_events_sent_total"] > 0
        assert "Lineage Sidecar demo is running" in log.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0, log.read_text()
    assert not (state / "endpoints.json").exists()
