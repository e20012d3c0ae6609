"""What the gate remembers per policy version gives the same answers as deciding afresh."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.principal import Principal
from proxy.authz.store import PolicySnapshot, build_snapshot, decide_principal
from proxy.gate import SnapshotMemo

MODEL = (Path(__file__).resolve().parents[3] / "policies" / "model.conf").read_bytes()
ROUTES = (Path(__file__).resolve().parents[3] / "policies" / "routes.yaml").read_bytes()


def snapshot(policy: str) -> PolicySnapshot:
    return build_snapshot(
        ("model.conf", MODEL), [("policy.csv", policy.encode())], ("routes.yaml", ROUTES)
    )


FIRST = snapshot(
    "p, analyst, dataset:sales.*, read, allow\np, analyst, dataset:sales.secret, read, deny\n"
)
SECOND = snapshot("p, analyst, dataset:sales.*, read, allow\n")

SUBJECTS = st.sampled_from(["alice", "bob", "analyst"])
ROLES = st.lists(st.sampled_from(["analyst", "engineer", "admin"]), max_size=2).map(tuple)
RESOURCES = st.sampled_from(["dataset:sales.orders", "dataset:sales.secret", "database:sales", "x"])
ACTIONS = st.sampled_from(["read", "write"])


@given(st.lists(st.tuples(SUBJECTS, ROLES, RESOURCES, ACTIONS), max_size=30))
@settings(max_examples=100, deadline=None)
def test_memo_decides_like_the_engine(calls: list[tuple[str, tuple[str, ...], str, str]]) -> None:
    memo = SnapshotMemo(FIRST)
    for subject, roles, resource, action in calls * 2:
        principal = Principal(id=subject, issuer="i", auth_method="jwt", roles=roles)
        expected = decide_principal(FIRST.engine, subject, roles, resource, action)
        assert memo.decide(principal, resource, action) == expected


def test_a_new_version_is_a_new_memo() -> None:
    alice = Principal(id="alice", issuer="i", auth_method="jwt", roles=("analyst",))
    first = SnapshotMemo(FIRST)
    assert not first.decide(alice, "dataset:sales.secret", "read").allowed
    second = SnapshotMemo(SECOND)
    assert second.decide(alice, "dataset:sales.secret", "read").allowed


@given(st.text(alphabet="/.%2ef", max_size=12))
@settings(max_examples=100, deadline=None)
def test_memo_resolves_like_the_route_table(path: str) -> None:
    memo = SnapshotMemo(FIRST)
    target = "/" + path
    try:
        expected = FIRST.routes.resolve("GET", target)
    except ValueError:
        return
    assert memo.resolve("GET", target) == expected
    assert memo.resolve("GET", target) == expected
