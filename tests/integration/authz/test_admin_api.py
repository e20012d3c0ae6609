"""The policy administration API on a real socket, changing real policy files.

Authentication is the mounting proxy's job; here a test header stands in for the verified
principal (`X-Test-Principal`, roles in `X-Test-Roles`), so these tests exercise the API's
own `policy:admin` check, its validation and its file writes.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.audit import AuditLine, AuditLog
from proxy.authz.admin import MAX_BODY_BYTES, admin_api
from proxy.authz.engine import parse_policy_text
from proxy.authz.store import PolicyStore, build_snapshot
from tests.integration.authz.test_reload import eventually, make_store, subscribers

REPO = Path(__file__).resolve().parents[3]


def principal_of(request: web.Request) -> str | None:
    return request.headers.get("X-Test-Principal")


def roles_of(request: web.Request) -> Sequence[str]:
    header = request.headers.get("X-Test-Roles", "")
    return [role for role in header.split(" ") if role]


@dataclass
class Api:
    """A running admin API and what it changes."""

    session: aiohttp.ClientSession
    base: str
    store: PolicyStore
    policy: Path
    audit: AuditLog

    async def call(
        self, method: str, path: str, body: object = None, *, who: str | None = "carol", **kw: Any
    ) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["X-Test-Principal"] = who
        if body is not None and "data" not in kw:
            kw["data"] = msgspec.json.encode(body)
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base + path, headers=headers, **kw
        ) as response:
            payload = await response.read()
            return response.status, msgspec.json.decode(payload) if payload else None

    def allowed(self, subject: str, obj: str, act: str) -> bool:
        return self.store.current.engine.decide(subject, obj, act).allowed

    async def audit_lines(self) -> list[AuditLine]:
        await self.audit.flush()
        if not self.audit.path.exists():
            return []
        return [
            msgspec.json.decode(raw, type=AuditLine)
            for raw in self.audit.path.read_bytes().splitlines()
        ]


async def start_api(
    folder: Path, *, copy: bool = True, **options: Any
) -> tuple[TestServer, PolicyStore, AuditLog]:
    if copy:
        for name in ("model.conf", "policy.csv", "routes.yaml"):
            shutil.copy(REPO / "policies" / name, folder / name)
    store = make_store(folder)
    audit = AuditLog(folder / "audit" / "admin.jsonl")
    app = admin_api(
        store,
        policy_file=folder / "policy.csv",
        audit=audit,
        principal_of=principal_of,
        roles_of=roles_of,
        **options,
    )
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server, store, audit


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    server, store, audit = await start_api(tmp_path)
    async with aiohttp.ClientSession() as session:
        yield Api(session, str(server.make_url("")), store, tmp_path / "policy.csv", audit)
    await server.close()


# -- reading --------------------------------------------------------------------------------


async def test_check_returns_the_decision_and_its_rule(api: Api) -> None:
    status, body = await api.call(
        "POST", "/check", {"subject": "alice", "object": "dataset:sales.orders", "action": "read"}
    )
    assert status == 200
    assert body["allowed"] is True
    assert body["rule"] == ["analyst", "dataset:sales.*", "read", "allow"]
    assert body["source"].startswith(f"{api.policy}:")
    status, body = await api.call(
        "POST",
        "/check",
        {
            "subject": "dave",
            "roles": ["analyst"],
            "object": "dataset:sales.secret",
            "action": "read",
        },
    )
    assert (status, body["allowed"], body["reason"]) == (200, False, "matched deny rule")


async def test_permissions_list_rules_reachable_through_roles(api: Api) -> None:
    status, body = await api.call("GET", "/subjects/bob/permissions")
    assert status == 200
    assert body["roles"] == ["analyst", "engineer"]
    rules = {tuple(item["rule"]) for item in body["permissions"]}
    assert ("engineer", "dataset:sales.*", "write", "allow") in rules
    assert ("analyst", "dataset:sales.secret", "*", "deny") in rules
    assert not any(rule[0] == "admin" for rule in rules)
    status, body = await api.call("GET", "/subjects/dave/permissions?role=admin")
    assert {tuple(item["rule"]) for item in body["permissions"]} == {("admin", "*", "*", "allow")}


# -- who may call ---------------------------------------------------------------------------


async def test_unauthenticated_caller_gets_401(api: Api) -> None:
    status, body = await api.call("GET", "/subjects/bob/permissions", who=None)
    assert (status, body["error"]) == (401, "unauthenticated")


async def test_callers_without_policy_admin_are_refused_and_audited(api: Api) -> None:
    before = api.policy.read_bytes()
    status, body = await api.call("POST", "/roles", {"subject": "bob", "role": "admin"}, who="bob")
    assert (status, body["error"]) == (403, "forbidden")
    status, _ = await api.call("GET", "/subjects/bob/permissions", who="alice")
    assert status == 403
    assert api.policy.read_bytes() == before
    [line] = await api.audit_lines()
    assert (line.entry.principal, line.entry.decision) == ("bob", "deny")


async def test_a_token_role_admin_may_administer(api: Api) -> None:
    status, _ = await api.call(
        "GET", "/subjects/bob/permissions", who="erin", headers={"X-Test-Roles": "admin"}
    )
    assert status == 200


# -- changing -------------------------------------------------------------------------------


async def test_assign_and_remove_a_role(api: Api) -> None:
    original = api.policy.read_bytes()
    assert not api.allowed("dave", "dataset:sales.orders", "read")

    status, body = await api.call("POST", "/roles", {"subject": "dave", "role": "analyst"})
    assert (status, body["changed"], body["line"]) == (201, True, "g, dave, analyst")
    # In force at once: the API reloads before it answers.
    assert api.allowed("dave", "dataset:sales.orders", "read")
    assert api.store.current.version == body["version"]
    assert api.policy.read_bytes() == original + b"g, dave, analyst\n"

    status, body = await api.call("POST", "/roles", {"subject": "dave", "role": "analyst"})
    assert (status, body["changed"]) == (200, False)

    status, body = await api.call("DELETE", "/roles", {"subject": "dave", "role": "analyst"})
    assert (status, body["changed"]) == (200, True)
    assert not api.allowed("dave", "dataset:sales.orders", "read")
    assert api.policy.read_bytes() == original
    status, body = await api.call("DELETE", "/roles", {"subject": "dave", "role": "analyst"})
    assert (status, body["error"]) == (404, "not_found")

    entries = [line.entry for line in await api.audit_lines()]
    assert [(e.action, e.rule, e.principal) for e in entries] == [
        ("role:add", "g, dave, analyst", "carol"),
        ("role:remove", "g, dave, analyst", "carol"),
    ]


async def test_create_and_delete_a_policy(api: Api) -> None:
    rule = {"fields": ["analyst", "dataset:hr.*", "read", "allow"]}
    status, _ = await api.call("POST", "/policies", rule)
    assert status == 201
    assert api.allowed("alice", "dataset:hr.salaries", "read")
    status, _ = await api.call("DELETE", "/policies", rule)
    assert status == 200
    assert not api.allowed("alice", "dataset:hr.salaries", "read")
    assert [line.entry.action for line in await api.audit_lines()] == [
        "policy:add",
        "policy:remove",
    ]


async def test_a_change_that_breaks_the_policy_is_refused(api: Api) -> None:
    before = api.policy.read_bytes()
    version = api.store.current.version
    status, body = await api.call("POST", "/policies", {"fields": ["analyst", "dataset:x", "read"]})
    assert (status, body["error"]) == (400, "invalid_policy")
    assert "p line has 3 fields" in body["message"]
    assert f"{api.policy}:" in body["message"]
    assert api.policy.read_bytes() == before
    assert api.store.current.version == version
    assert await api.audit_lines() == []


@pytest.mark.parametrize("effect", ["Deny", "DENY", "maybe", "denied", "allows"])
async def test_a_rule_with_a_misspelled_effect_is_refused(api: Api, effect: str) -> None:
    # pycasbin ignores a rule whose effect is not exactly allow or deny: accepting
    # `Deny` would store a deny that never denies.
    before = api.policy.read_bytes()
    rule = {"fields": ["analyst", "dataset:sales.orders", "*", effect]}
    status, body = await api.call("POST", "/policies", rule)
    assert (status, body["error"]) == (400, "invalid_policy")
    assert f"effect {effect!r} is neither 'allow' nor 'deny'" in body["message"]
    assert f"{api.policy}:" in body["message"]
    assert api.policy.read_bytes() == before
    assert api.allowed("alice", "dataset:sales.orders", "read")


@pytest.mark.parametrize(
    "body",
    [
        {"subject": "x\n p, attacker, *, *, allow", "role": "admin"},
        {"subject": "x\np, attacker, *, *, allow", "role": "admin"},
        {"subject": "attacker, admin", "role": "admin"},
        {"subject": "attacker", "role": "admin\r\ng, attacker, admin"},
        {"subject": '"attacker"', "role": "admin"},
        {"subject": "attacker", "role": "admin", "domain": "d\n"},
    ],
)
async def test_csv_injection_never_adds_a_rule(api: Api, body: dict[str, str]) -> None:
    before = api.policy.read_bytes()
    status, answer = await api.call("POST", "/roles", body)
    assert (status, answer["error"]) == (400, "bad_request")
    assert api.policy.read_bytes() == before
    assert not api.allowed("attacker", "dataset:sales.orders", "read")


async def test_injection_through_policy_fields(api: Api) -> None:
    before = api.policy.read_bytes()
    fields = ["analyst", "dataset:x", "read", "allow\n p, attacker, *, *, allow"]
    status, _ = await api.call("POST", "/policies", {"fields": fields})
    assert status == 400
    status, _ = await api.call("POST", "/policies", {"ptype": "g", "fields": ["a", "b"]})
    assert status == 400
    assert api.policy.read_bytes() == before


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (b"{", 400),
        (b"[]", 400),
        (b"\xff\xfe", 400),
        (b'{"subject": 5, "role": "admin"}', 400),
        (b'{"subject": "dave"}', 400),
        (b'{"subject": "dave", "role": "analyst", "extra": 1}', 400),
        (b'{"subject": null, "role": "analyst"}', 400),
        (b'{"subject": "' + b"a" * 600 + b'", "role": "analyst"}', 400),
        (b"x" * (1024 * 1024), 413),
        (b"[" * 100_000, 413),
    ],
)
async def test_malformed_bodies_get_a_clean_4xx(api: Api, data: bytes, status: int) -> None:
    before = api.policy.read_bytes()
    got, body = await api.call("POST", "/roles", data=data)
    assert got == status
    assert body["error"] in ("bad_request", "too_large")
    assert api.policy.read_bytes() == before


async def test_oversized_chunked_body_is_refused(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(32):
            yield b" " * 32 * 1024

    status, body = await api.call("POST", "/check", data=chunks())
    assert (status, body["error"]) == (413, "too_large")
    assert MAX_BODY_BYTES < 32 * 32 * 1024


async def test_file_is_never_seen_half_written(api: Api) -> None:
    """A reader polling the file during many writes only ever sees complete, valid files."""
    model = (api.policy.parent / "model.conf").read_bytes()
    routes = (api.policy.parent / "routes.yaml").read_bytes()
    original_rules = len(parse_policy_text(api.policy.read_text(encoding="utf-8"), "p"))
    problems: list[str] = []
    reads = 0
    stop = threading.Event()

    def read_all_along() -> None:
        nonlocal reads
        while not stop.is_set():
            data = api.policy.read_bytes()
            reads += 1
            try:
                build_snapshot(
                    ("model.conf", model), [("policy.csv", data)], ("routes.yaml", routes)
                )
            except Exception as exc:
                problems.append(f"invalid file seen: {exc}")
            lines = parse_policy_text(data.decode(), "p")
            if len(lines) < original_rules or not data.endswith(b"\n"):
                problems.append(f"incomplete file seen ({len(data)} bytes)")

    reader = threading.Thread(target=read_all_along, name="policy-reader")
    reader.start()
    try:
        for number in range(25):
            status, _ = await api.call(
                "POST", "/roles", {"subject": f"user{number}", "role": "analyst"}
            )
            assert status == 201
    finally:
        stop.set()
        await asyncio.get_running_loop().run_in_executor(None, reader.join)
    assert problems == []
    assert reads > 25
    assert api.allowed("user24", "dataset:sales.t", "read")
    # No temporary files are left behind (the lock file every writer takes stays).
    assert sorted(p.name for p in api.policy.parent.iterdir() if p.is_file()) == [
        ".policy.csv.lock",
        "model.conf",
        "policy.csv",
        "routes.yaml",
    ]


async def test_concurrent_changes_all_land(api: Api) -> None:
    results = await asyncio.gather(
        *(api.call("POST", "/roles", {"subject": f"user{n}", "role": "analyst"}) for n in range(10))
    )
    assert [status for status, _ in results] == [201] * 10
    assert all(api.allowed(f"user{n}", "dataset:sales.t", "read") for n in range(10))


async def test_policy_file_must_be_one_of_the_stores(tmp_path: Path) -> None:
    server, store, audit = await start_api(tmp_path)
    await server.close()
    with pytest.raises(ValueError, match="not one of the store's policy files"):
        admin_api(store, policy_file=tmp_path / "other.csv", audit=audit, principal_of=principal_of)


@pytest.mark.services
async def test_a_change_is_announced_to_other_workers(redis_url: str, tmp_path: Path) -> None:
    channel = f"test-policy-admin-{uuid.uuid4().hex}"
    server, store, audit = await start_api(tmp_path, redis_url=redis_url, channel=channel)
    follower = make_store(tmp_path, poll_interval=3600)
    listening = asyncio.create_task(follower.listen(redis_url, channel), name="policy-listen")
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while await subscribers(redis_url, channel) < 1:
            assert asyncio.get_running_loop().time() < deadline, "never subscribed"
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as session:
            api = Api(session, str(server.make_url("")), store, tmp_path / "policy.csv", audit)
            status, body = await api.call("POST", "/roles", {"subject": "dave", "role": "admin"})
        assert status == 201
        await eventually(lambda: follower.current.version == body["version"], "follower reloaded")
        assert follower.current.engine.decide("dave", "policy:admin", "write").allowed
    finally:
        listening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listening
        await server.close()


async def test_a_regex_rule_that_may_backtrack_catastrophically_is_refused(
    tmp_path: Path,
) -> None:
    server, store, audit = await start_api(tmp_path)
    await server.close()
    model = (tmp_path / "model.conf").read_text(encoding="utf-8")
    (tmp_path / "model.conf").write_text(
        model.replace("globMatch(r.obj, p.obj)", "regexMatch(r.obj, p.obj)"), encoding="utf-8"
    )
    (tmp_path / "policy.csv").write_text(
        "p, admin, policy:admin, *, allow\ng, carol, admin\n", encoding="utf-8"
    )
    server, store, audit = await start_api(tmp_path, copy=False)
    policy = tmp_path / "policy.csv"
    before = policy.read_bytes()
    async with aiohttp.ClientSession() as session:
        api = Api(session, str(server.make_url("")), store, policy, audit)
        rule = {"fields": ["analyst", "dataset:sales\\.(a+)+$", "read", "allow"]}
        status, body = await api.call("POST", "/policies", rule)
        assert (status, body["error"]) == (400, "invalid_policy")
        assert "may backtrack catastrophically: nested repetition" in body["message"]
        assert policy.read_bytes() == before
        status, _ = await api.call(
            "POST",
            "/policies",
            {"fields": ["analyst", "dataset:sales\\..*", "read", "allow"]},
        )
        assert status == 201
    await server.close()
