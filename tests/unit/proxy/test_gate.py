"""The gate in process: a remembered admission decides, audits and fails closed exactly as
a fresh one does."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import jwt as pyjwt
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from lineage_sidecar.config import IdentityHeadersConfig
from proxy.audit import AuditLog, verify
from proxy.authn.chain import AuthChain, BearerJWT
from proxy.authn.jwt import IssuerConfig
from proxy.authz.store import PolicyStore
from proxy.gate import Admission, Gate, Refusal

POLICIES = Path(__file__).resolve().parents[3] / "policies"
SECRET = "s" * 48
ISSUER = IssuerConfig(
    issuer="https://idp.example",
    audiences=("api",),
    shared_secret=SECRET,
    algorithms=("HS256",),
    roles_claim="roles",
)
POLICY = "p, analyst, dataset:sales.*, read, allow\np, analyst, dataset:sales.secret, read, deny\n"


def token(subject: str, roles: list[str]) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER.issuer, "aud": "api", "sub": subject, "iat": now, "exp": now + 600}
    return pyjwt.encode({**claims, "roles": roles}, SECRET, algorithm="HS256")


def make_gate(
    directory: Path, *, max_pending: int, audit_name: str = "audit.jsonl"
) -> tuple[Gate, AuditLog, PolicyStore]:
    """A gate over `directory/policy.csv` (written with POLICY if absent)."""
    policy = directory / "policy.csv"
    if not policy.exists():
        policy.write_text(POLICY)
    store = PolicyStore(POLICIES / "model.conf", [policy], POLICIES / "routes.yaml")
    store.load()
    audit = AuditLog(directory / audit_name, max_pending=max_pending)
    gate = Gate(
        auth=AuthChain([BearerJWT([ISSUER], cache_entries=100)]),
        policy=store,
        audit=audit,
        identity=IdentityHeadersConfig(),
    )
    return gate, audit, store


async def admit(gate: Gate, path: str, bearer: str, request_id: str) -> Admission | Refusal:
    headers = CIMultiDict({"Host": "sales.test", "Authorization": "Bearer " + bearer})
    request = make_mocked_request("GET", path, headers=headers)
    try:
        answer = gate.admit(request, request_id)
        return answer if isinstance(answer, Admission) else await answer
    except Refusal as refusal:
        return refusal


def test_a_remembered_allow_is_audited_each_time_and_fails_closed_when_the_log_is_stuck(
    tmp_path: Path,
) -> None:
    gate, audit, _ = make_gate(tmp_path, max_pending=3)
    alice = token("alice", ["analyst"])

    async def run() -> list[Admission | Refusal]:
        return [await admit(gate, "/sales/orders.json", alice, f"r{i}") for i in range(5)]

    answers = asyncio.run(run())
    # The first verifies the token; the next two are the remembered admission, the very
    # same object. Then the log holds three decisions nobody wrote: refuse, never serve
    # a request unaudited.
    first, second, third = answers[:3]
    assert isinstance(first, Admission)
    assert first.outcome == "allow"
    assert second is first
    assert third is first
    for stuck in answers[3:]:
        assert isinstance(stuck, Refusal)
        assert (stuck.status, stuck.error) == (503, "audit_unavailable")
    assert audit.pending == 3


def test_a_remembered_denial_is_refused_and_audited_each_time(tmp_path: Path) -> None:
    gate, audit, _ = make_gate(tmp_path, max_pending=1000)
    bob = token("bob", ["analyst"])

    async def run() -> list[Admission | Refusal]:
        answers = [await admit(gate, "/sales/secret.json", bob, f"deny-{i}") for i in range(3)]
        await audit.flush()
        return answers

    answers = asyncio.run(run())
    for answer in answers:
        assert isinstance(answer, Refusal)
        assert answer.status == 403
        assert "deny" in answer.message
    entries = [
        json.loads(line)["entry"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()
    ]
    assert [e["request_id"] for e in entries] == ["deny-0", "deny-1", "deny-2"]
    assert {(e["principal"], e["resource"], e["decision"]) for e in entries} == {
        ("bob", "dataset:sales.secret", "deny")
    }
    assert all(e["rule"].startswith("analyst, dataset:sales.secret, read, deny") for e in entries)
    assert verify([tmp_path / "audit.jsonl"]).ok


SUBJECTS = {"alice": ["analyst"], "bob": [], "carol": ["engineer", "analyst"]}
TARGETS = [
    "/sales/orders.json",
    "/sales/secret.json",
    "/sales/orders.json?_shape=array",
    "/sales.json?sql=select+*+from+orders",
    "/sales.json?sql=select+*+from+secret",
    "/sales/./orders.json",
    "/nowhere/a/b/c",
    "/-/versions.json",
    "/",
]
SECOND_POLICY = "p, engineer, dataset:sales.*, read, allow\ng, bob, analyst\n"


def outcome(answer: Admission | Refusal) -> tuple[object, ...]:
    if isinstance(answer, Refusal):
        admission = answer.admission
        return ("refused", answer.status, answer.error, answer.message, admission.target)
    decision = answer.decision
    return (
        "admitted",
        answer.target,
        answer.outcome,
        decision.reason if decision is not None else None,
        answer.identity,
        answer.drop_authorization,
    )


@given(
    calls=st.lists(
        st.tuples(st.sampled_from(sorted(SUBJECTS)), st.sampled_from(TARGETS)), max_size=30
    ),
    edit_at=st.integers(min_value=0, max_value=30),
)
@settings(max_examples=60, deadline=None)
def test_remembered_admissions_answer_as_a_fresh_gate_would(
    calls: list[tuple[str, str]], edit_at: int
) -> None:
    # Each call goes to a gate that has seen everything before it (so repeats are answered
    # from what it remembers) and to a new gate that has seen nothing; the policy file is
    # edited and reloaded part way through. Their answers must not differ, and the long
    # lived gate must audit every call.
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        gate, audit, store = make_gate(directory, max_pending=10_000)
        tokens = {name: token(name, roles) for name, roles in SUBJECTS.items()}

        async def run() -> None:
            for index, (subject, target) in enumerate(calls):
                if index == edit_at:
                    (directory / "policy.csv").write_text(SECOND_POLICY)
                    await store.reload_now()
                fresh, _, _ = make_gate(directory, max_pending=10_000, audit_name="fresh.jsonl")
                remembered = await admit(gate, target, tokens[subject], f"r{index}")
                expected = await admit(fresh, target, tokens[subject], f"r{index}")
                assert outcome(remembered) == outcome(expected), (subject, target)
            assert audit.pending == len(calls)

        asyncio.run(run())
