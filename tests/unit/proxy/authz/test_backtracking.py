"""Regular expressions that could stall the event loop are refused; ordinary ones are not."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authz.backtracking import backtracking_risk
from proxy.authz.engine import PolicyEngine, PolicyError

REGEX_MODEL = """\
[request_definition]
r = sub, obj, act
[policy_definition]
p = sub, obj, act, eft
[role_definition]
g = _, _
[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))
[matchers]
m = g(r.sub, p.sub) && regexMatch(r.obj, p.obj) && (r.act == p.act || p.act == "*")
"""


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"dataset:sales\.(a+)+$", "nested repetition"),
        (r"(a*)*", "nested repetition"),
        (r"(x+x+)+y", "nested repetition"),
        (r"(\w+\s?)+$", "nested repetition"),
        (r"(\d+\.){3}", "nested repetition: a repeat (up to 3 times)"),
        (r"(.*?,){11}P", "nested repetition"),
        (r"(a|a)*", "start alike"),
        (r"(a|ab)+c", "start alike"),
        (r"(?i)(a|Ab)+c", "start alike"),
        (r"(a?){30}a{30}", "can match the empty string"),
        (r"(?:a|b|)+", "can match the empty string"),
        (r".*a.*a.*b", "3 or more unbounded repeats"),
        (r"a*a*a*$", "3 or more unbounded repeats"),
        (r"\w+\d+\w+", "3 or more unbounded repeats"),
    ],
)
def test_known_slow_patterns_are_refused(pattern: str, why: str) -> None:
    risk = backtracking_risk(pattern)
    assert risk is not None
    assert why in risk


@pytest.mark.parametrize(
    "pattern",
    [
        "^/a/.*",
        "/a/[a-z]+$",
        ".*",
        "/b|/a",
        "/(a|b)/x",
        r"\d+\.\d+\.\d+",
        "/.*/.*",
        "(read|write)*",
        "[a-z]+/[0-9]+/.*",
        r"dataset:sales\..*",
        r"(\d|x)*",
        "[^/]+/[^/]+/.*",
        "[a-z]*[0-9]*[a-z]*",
        "^/a/[^/]+/[^/]+$",
        "/a/?b",
        "/a/b{0}",
        "(ab){2,}",
    ],
)
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    assert backtracking_risk(pattern) is None


def test_an_unparsable_pattern_is_left_to_the_compiler() -> None:
    assert backtracking_risk("(") is None


def test_a_slow_regex_rule_is_refused_naming_its_line() -> None:
    policy = (
        "p, analyst, dataset:sales\\..*, read, allow\n"
        "p, analyst, dataset:sales\\.(a+)+$, read, allow"
    )

    with pytest.raises(PolicyError) as error:
        PolicyEngine.from_text(REGEX_MODEL, policy, policy_source="policy.csv")

    assert str(error.value).startswith(
        "policy.csv:2: 'dataset:sales\\\\.(a+)+$' may backtrack catastrophically: nested"
    )


# -- property: what the checker accepts has no nested unbounded repeat ------------------------


@dataclass(frozen=True)
class Node:
    """A generated regular expression, kept as a tree so nesting is known independently."""

    text: str
    unbounded: bool  # holds an unbounded repeat somewhere
    nested: bool  # holds a repeat that may run twice or more around an unbounded repeat


ATOMS = st.sampled_from(["a", "b", "/", ".", "[ab]", "[^/]", r"\d"]).map(
    lambda text: Node(text, False, False)
)
# (suffix, may run more than once, unbounded)
REPEATS = [("*", True, True), ("+", True, True), ("?", False, False), ("{2}", True, False)]
REPEATS += [
    ("{1,3}", True, False),
    ("{2,}", True, True),
    ("*?", True, True),
    ("{0,1}", False, False),
]


def _extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    def repeat(node: Node, suffix: str, many: bool, unbounded: bool) -> Node:
        return Node(
            f"(?:{node.text}){suffix}",
            node.unbounded or unbounded,
            node.nested or (many and node.unbounded),
        )

    def sequence(nodes: list[Node]) -> Node:
        return Node(
            "".join(n.text for n in nodes),
            any(n.unbounded for n in nodes),
            any(n.nested for n in nodes),
        )

    def branch(left: Node, right: Node) -> Node:
        return Node(
            f"(?:{left.text}|{right.text})",
            left.unbounded or right.unbounded,
            left.nested or right.nested,
        )

    return st.one_of(
        st.builds(lambda n, r: repeat(n, *r), children, st.sampled_from(REPEATS)),
        st.lists(children, min_size=2, max_size=3).map(sequence),
        st.builds(branch, children, children),
    )


patterns = st.recursive(ATOMS, _extend, max_leaves=8)


@settings(max_examples=1000, deadline=None)
@given(patterns)
def test_accepted_patterns_never_nest_unbounded_repeats(pattern: Node) -> None:
    if backtracking_risk(pattern.text) is None:
        assert not pattern.nested, pattern.text
