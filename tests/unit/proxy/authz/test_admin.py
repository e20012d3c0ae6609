"""The policy file edits behind the administration API, without a server.

The security property: whatever the caller sends as fields, an edit either is refused or
adds exactly one policy line with exactly those fields, leaving every other line as it was.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
