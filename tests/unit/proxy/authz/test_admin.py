"""The policy file edits behind the administration API, without a server.

The security property: whatever the caller sends as fields, an edit either is refused or
adds exactly one policy line with exactly those fields, leaving every other line as it was.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.authz.admin as admin_module
from proxy.authz.admin import _edit, _reachable, _Refused, _render
from proxy.authz.engine import PolicyLine, parse_policy_text

ORIGINAL = "# comment, with commas\r\np, reader, dataset:*, read, allow\r\n\ng, alice, reader\n"


def lines_of(text: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(line.ptype, line.fields) for line in parse_policy_text(text, "policy.csv")]


def test_add_appends_one_line_and_keeps_the_rest_byte_for_byte() -> None:
    edited = _edit(ORIGINAL.encode(), PolicyLine("g", ("bob", "reader")), add=True)
    assert edited == (ORIGINAL + "g, bob, reader\n").encode()


def test_add_after_a_file_without_final_newline() -> None:
    edited = _edit(b"g, alice, reader", PolicyLine("g", ("bob", "reader")), add=True)
    assert edited == b"g, alice, reader\ng, bob, reader\n"


def test_adding_an_existing_line_changes_nothing() -> None:
    assert _edit(ORIGINAL.encode(), PolicyLine("g", ("alice", "reader")), add=True) is None


def test_remove_takes_out_every_copy_and_only_it() -> None:
    original = ORIGINAL + "g,alice,reader\n"
    edited = _edit(original.encode(), PolicyLine("g", ("alice", "reader")), add=False)
    assert edited == b"# comment, with commas\r\np, reader, dataset:*, read, allow\r\n\n"


def test_removing_a_missing_line_changes_nothing() -> None:
    assert _edit(ORIGINAL.encode(), PolicyLine("g", ("bob", "reader")), add=False) is None


def test_a_commented_out_rule_is_not_removed() -> None:
    original = b"# g, alice, reader\ng, alice, reader\n"
    edited = _edit(original, PolicyLine("g", ("alice", "reader")), add=False)
    assert edited == b"# g, alice, reader\n"


@pytest.mark.parametrize(
    "field",
    [
        "x\n p, attacker, *, *, allow",
        "x\r\np, attacker, *, *, allow",
        "x, *",
        'x"',
        "x'",
        " padded",
        "padded ",
        "",
        "tab\there",
        "nul\x00",
        "line\u2028separator",
        "a" * 513,
    ],
)
def test_hostile_fields_are_refused(field: str) -> None:
    with pytest.raises(_Refused) as caught:
        _render("p", [field, "dataset:x", "read", "allow"])
    assert caught.value.status == 400


def test_unbalanced_bracket_is_refused() -> None:
    with pytest.raises(_Refused):
        _render("p", ["x)", "dataset:x", "read", "allow"])


def test_too_many_fields_are_refused() -> None:
    with pytest.raises(_Refused):
        _render("p", ["x"] * 17)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from(list("ap*:/ ,\n\r\"'#()[]{}\t\x00\u2028.é")), max_size=12),
        min_size=1,
        max_size=5,
    )
)
def test_an_edit_adds_exactly_the_fields_given_or_is_refused(fields: list[str]) -> None:
    refused: _Refused | None = None
    try:
        line = _render("p", fields)
    except _Refused as exc:
        refused = exc
    if refused is not None:
        assert refused.status == 400
        return
    edited = _edit(ORIGINAL.encode(), line, add=True)
    assert edited is not None
    assert lines_of(edited.decode()) == [*lines_of(ORIGINAL), ("p", tuple(fields))]
    assert edited.startswith(ORIGINAL.encode())
    # And removing it gives the original back.
    assert _edit(edited, line, add=False) == ORIGINAL.encode()


def test_reachable_roles_follow_inheritance_and_token_roles() -> None:
    lines = [
        PolicyLine("g", ("alice", "analyst")),
        PolicyLine("g", ("engineer", "analyst")),
        PolicyLine("g", ("analyst", "reader")),
        PolicyLine("g", ("reader", "analyst")),  # a cycle ends
    ]
    assert _reachable(lines, "alice", [], None) == {"alice", "analyst", "reader"}
    assert _reachable(lines, "dave", ["engineer"], None) == {
        "dave",
        "engineer",
        "analyst",
        "reader",
    }


def test_reachable_roles_in_a_domain() -> None:
    lines = [PolicyLine("g", ("alice", "admin", "d1")), PolicyLine("g", ("alice", "viewer", "d2"))]
    assert _reachable(lines, "alice", [], "d2") == {"alice", "viewer"}


def test_two_writers_never_both_replace_a_file_they_found_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two workers each read the policy, then replace it if unchanged. Writer A is held
    # between its check and its rename; writer B, had it got past the check then, would
    # rename too and A's rename would undo B's change. Under the file lock B waits, finds
    # the file changed, and gets the 409 instead.
    policy = tmp_path / "policy.csv"
    policy.write_bytes(b"p, alice, dataset:a, read, allow\n")
    info = os.stat(policy)
    state = admin_module._FileState(info.st_mtime_ns, info.st_size, info.st_ino)
    writer = cast(admin_module._PolicyAdmin, SimpleNamespace(policy_file=policy))
    a_inside, b_done = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        if threading.current_thread().name == "A":
            a_inside.set()
            b_done.wait(2)  # B gets in here only without the lock
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    outcome: dict[str, BaseException | None] = {}

    def write(name: str, data: bytes) -> None:
        try:
            admin_module._PolicyAdmin._replace(writer, data, state)
        except BaseException as exc:
            outcome[name] = exc
        else:
            outcome[name] = None
        if name == "B":
            b_done.set()

    a = threading.Thread(target=write, args=("A", b"p, a, x, read, allow\n"), name="A")
    a.start()
    assert a_inside.wait(30)
    b = threading.Thread(target=write, args=("B", b"p, b, y, read, allow\n"), name="B")
    b.start()
    a.join(30)
    b.join(30)
    assert outcome["A"] is None
    refused = outcome["B"]
    assert isinstance(refused, _Refused)
    assert refused.status == 409
    assert policy.read_bytes() == b"p, a, x, read, allow\n"
