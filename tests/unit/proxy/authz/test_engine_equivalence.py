"""The compiled engine decides exactly as pycasbin does.

Hypothesis generates models of every shape the compiled path claims (RBAC with and without
domains, each object and action matching function, each allow/deny effect), policies with
role graphs (cycles included), patterns, allow and deny rules, and requests; every request
must get pycasbin's decision and the rule pycasbin's `enforce_ex` explains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import casbin
import pytest
from casbin.persist.adapter import Adapter, load_policy_line
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.authz.engine import PolicyEngine, PolicyError

EFFECTS = {
    "allow-override": "some(where (p.eft == allow))",
    "deny-override": "!some(where (p.eft == deny))",
    "allow-and-deny": "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
}
SUBJECTS = ["alice", "bob", "carol"]
ROLES = ["admin", "reader", "writer", "auditor", "ops"]
DOMAINS = ["d1", "d2"]
ACTIONS = ["read", "write", "delete"]


class _TextAdapter(Adapter):  # type: ignore[misc]  # casbin is untyped
    """pycasbin's file adapter, reading from a string instead of a file."""

    def __init__(self, text: str) -> None:
        self._text = text

    def load_policy(self, model: Any) -> None:
        for line in self._text.split("\n"):
            load_policy_line(line.strip(), model)


def reference_enforcer(model_text: str, policy_text: str) -> Any:
    """A pycasbin 2.8 enforcer for the model and CSV policy texts: the reference."""
    return casbin.Enforcer(casbin.Enforcer.new_model(text=model_text), _TextAdapter(policy_text))


def reference_decision(
    enforcer: Any, request: tuple[str, ...]
) -> tuple[bool, tuple[str, ...] | None]:
    """pycasbin's `enforce_ex`: allowed, and the rule it explains (None when none)."""
    allowed, explained = enforcer.enforce_ex(*request)
    return bool(allowed), (tuple(explained) if explained else None)


@dataclass(frozen=True)
class ModelSpec:
    domains: bool
    roles: bool
    object_function: str
    action_function: str
    effect: str
    with_eft: bool
    # With domains, `g(r.sub, p.sub)` (no domain argument) reads only links in domain "".
    role_domain_argument: bool = True

    def text(self) -> str:
        request = "sub, dom, obj, act" if self.domains else "sub, obj, act"
        policy = request + (", eft" if self.with_eft else "")
        terms = []
        if self.roles:
            with_domain = self.domains and self.role_domain_argument
            terms.append("g(r.sub, p.sub, r.dom)" if with_domain else "g(r.sub, p.sub)")
        else:
            terms.append("r.sub == p.sub")
        if self.domains:
            terms.append("r.dom == p.dom")
        terms.append(_term(self.object_function, "obj"))
        terms.append(_term(self.action_function, "act"))
        roles = (
            f"[role_definition]\ng = {'_, _, _' if self.domains else '_, _'}\n"
            if self.roles
            else ""
        )
        return (
            f"[request_definition]\nr = {request}\n"
            f"[policy_definition]\np = {policy}\n"
            f"{roles}"
            f"[policy_effect]\ne = {EFFECTS[self.effect]}\n"
            f"[matchers]\nm = {' && '.join(terms)}\n"
        )


def _term(function: str, field: str) -> str:
    if function == "==":
        return f"r.{field} == p.{field}"
    if function == "==|*":
        return f'(r.{field} == p.{field} || p.{field} == "*")'
    return f"{function}(r.{field}, p.{field})"


@st.composite
def model_specs(draw: st.DrawFn) -> ModelSpec:
    effect = draw(st.sampled_from(sorted(EFFECTS)))
    return ModelSpec(
        domains=draw(st.booleans()),
        roles=draw(st.booleans()),
        object_function=draw(
            st.sampled_from(["==", "keyMatch", "keyMatch2", "globMatch", "regexMatch"])
        ),
        action_function=draw(st.sampled_from(["==", "==|*", "regexMatch", "keyMatch"])),
        effect=effect,
        with_eft=effect != "allow-override" or draw(st.booleans()),
        role_domain_argument=draw(st.booleans()),
    )


SEGMENTS = ["a", "b", "c.d", "cxd", "A"]
segments = st.sampled_from(SEGMENTS)
literal_paths = st.lists(segments, min_size=0, max_size=3).map(lambda parts: "/" + "/".join(parts))
# A concrete value for each pattern piece, so requests often hit the generated rules.
INSTANCES = {":id": "a", ":name": "c.d", "**": "a/b", "*": "b", "?": "x", "[ab]": "a", "c*": "cxd"}


# Values that regexMatch patterns accept, including those without the literal prefix.
REGEX_EXAMPLES = {
    "/a/?b": ["/ab", "/a/b"],
    "/a/*b": ["/ab", "/a//b"],
    "/a/+b": ["/a//b", "/a/b"],
    "/a/b{0}": ["/a/", "/a/x"],
    "/b/a|/a/b": ["/a/b", "/b/a"],
    "/(a|b)/x": ["/b/x"],
    "/a/b/\\w": ["/a/b/_", "/a/b/c.d"],
}


def instantiate(pattern: str) -> list[str]:
    if pattern in REGEX_EXAMPLES:
        return REGEX_EXAMPLES[pattern]
    return ["/".join(INSTANCES.get(part, part) for part in pattern.split("/"))]


OBJECT_PATTERNS = {
    "==": literal_paths,
    "keyMatch": st.one_of(literal_paths, literal_paths.map(lambda p: p + "*"), st.just("*")),
    "keyMatch2": st.one_of(
        literal_paths,
        st.lists(st.sampled_from([*SEGMENTS, ":id", ":name", "*"]), min_size=1, max_size=3).map(
            lambda parts: "/" + "/".join(parts)
        ),
        st.just("*"),
    ),
    "globMatch": st.one_of(
        literal_paths,
        st.lists(
            st.sampled_from([*SEGMENTS, "*", "**", "?", "[ab]", "c*"]), min_size=1, max_size=3
        ).map(lambda parts: "/" + "/".join(parts)),
        st.just("*/a"),
    ),
    "regexMatch": st.one_of(
        literal_paths,
        st.sampled_from(
            [
                *["^/a/.*", "/a", "/a/[a-z]+$", ".*", "/b|/a", "", "^/x$", "/c.d", "/(a|b)/x"],
                # A quantifier after the literal prefix makes its last character optional.
                *["/a/?b", "/a/*b", "/a/+b", "/a/b{0}", "^/a/b", "/a/b/\\w", "/b/a|/a/b"],
            ]
        ),
    ),
}
ACTION_PATTERNS = {
    "==": st.sampled_from(ACTIONS),
    "==|*": st.sampled_from([*ACTIONS, "*"]),
    "regexMatch": st.sampled_from([*ACTIONS, "read|write", "(read)|(write)", "re.*", "^d", ".*"]),
    "keyMatch": st.sampled_from([*ACTIONS, "*", "re*", "w*"]),
}
request_paths = st.one_of(
    literal_paths,
    literal_paths.map(lambda p: p + "/"),
    literal_paths.map(lambda p: p + "\n"),
    st.sampled_from(["", "/", "//a", "/a//b", "a", "/a/b/c", "/ab", "/a//b", "/a/b/_"]),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ModelSpec, str, list[tuple[str, ...]]]:
    """A model, a CSV policy for it, and requests in request-definition order."""
    spec = draw(model_specs())
    principals = st.sampled_from(SUBJECTS + ROLES)
    domains = st.sampled_from(DOMAINS)
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        fields = [draw(principals)]
        if spec.domains:
            fields.append(draw(domains))
        fields.append(draw(OBJECT_PATTERNS[spec.object_function]))
        fields.append(draw(ACTION_PATTERNS[spec.action_function]))
        if spec.with_eft:
            fields.append(draw(st.sampled_from(["allow", "allow", "deny"])))
        lines.append("p, " + ", ".join(fields))
    if spec.roles:
        for _ in range(draw(st.integers(0, 10))):
            # Any principal may be a member of any role, so cycles and diamonds occur.
            link = [draw(principals), draw(st.sampled_from(ROLES))]
            if spec.domains:
                link.append(draw(st.sampled_from([*DOMAINS, ""])))
            lines.append("g, " + ", ".join(link))
    rules: list[list[str]] = [line.split(", ")[1:] for line in lines if line.startswith("p")]
    links: list[list[str]] = [line.split(", ")[1:] for line in lines if line.startswith("g")]
    requests: list[tuple[str, ...]] = []
    for _ in range(draw(st.integers(1, 8))):
        subject = draw(st.sampled_from([*SUBJECTS, *ROLES, "nobody", ""]))
        domain = draw(st.sampled_from([*DOMAINS, "d3"]))
        path = draw(request_paths)
        action = draw(st.sampled_from([*ACTIONS, "*", "reader", ""]))
        aim: bool = draw(st.booleans())
        if rules and aim:
            # Aim at a rule: its subject or a member of it, its domain, object and action.
            rule = draw(st.sampled_from(rules))
            members = [link[0] for link in links if link[1] == rule[0]]
            subject = draw(st.sampled_from([rule[0], *members]))
            if spec.domains:
                domain = rule[1]
            path = draw(st.sampled_from(instantiate(rule[-3 if spec.with_eft else -2])))
            path += draw(st.sampled_from(["", "", "", "\n", "/"]))
            act = rule[-2 if spec.with_eft else -1]
            action = act if act in ACTIONS else action
        requests.append(
            (subject, domain, path, action) if spec.domains else (subject, path, action)
        )
    return spec, "\n".join(lines), requests


def _expected_rule(
    spec: ModelSpec, allowed: bool, explained: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    # Under allow-override a denial is by default: pycasbin may still explain a matched
    # deny rule, but no rule decided it.
    if spec.effect == "allow-override" and not allowed:
        return None
    return explained


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_compiled_engine_decides_as_pycasbin(
    scenario: tuple[ModelSpec, str, list[tuple[str, ...]]],
) -> None:
    spec, policy_text, requests = scenario
    model_text = spec.text()
    engine = PolicyEngine.from_text(model_text, policy_text)
    assert engine.mode == "compiled", engine.fallback_reason
    reference = reference_enforcer(model_text, policy_text)
    for request in requests:
        if spec.domains:
            subject, domain, obj, action = request
            decision = engine.decide(subject, obj, action, domain)
        else:
            subject, obj, action = request
            decision = engine.decide(subject, obj, action)
        allowed, explained = reference_decision(reference, request)
        assert decision.allowed == allowed, (request, decision)
        assert decision.rule == _expected_rule(spec, allowed, explained), (request, decision)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_decide_many_equals_one_by_one(
    scenario: tuple[ModelSpec, str, list[tuple[str, ...]]],
) -> None:
    spec, policy_text, requests = scenario
    engine = PolicyEngine.from_text(spec.text(), policy_text)
    calls = [
        (r[0], r[2], r[3], r[1]) if spec.domains else (r[0], r[1], r[2], None) for r in requests
    ]
    assert engine.decide_many(calls) == [engine.decide(*call) for call in calls]


# Effects pycasbin reads as "indeterminate": it skips such a rule, so each would silently
# drop a deny (or an allow). The engine must refuse them instead of agreeing.
MISSPELLED_EFFECTS = ["Deny", "DENY", "Allow", "denied", "maybe", "", "deny.", "allow!"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_a_misspelled_effect_is_refused_naming_its_line(
    scenario: tuple[ModelSpec, str, list[tuple[str, ...]]], data: st.DataObject
) -> None:
    spec, policy_text, _ = scenario
    lines = policy_text.split("\n")
    rule_numbers = [n for n, line in enumerate(lines, start=1) if line.startswith("p, ")]
    assume(spec.with_eft and rule_numbers)
    number = data.draw(st.sampled_from(rule_numbers))
    effect = data.draw(st.sampled_from(MISSPELLED_EFFECTS))
    fields = lines[number - 1].split(", ")
    lines[number - 1] = ", ".join([*fields[:-1], effect])
    where = re.escape(f"policy.csv:{number}: effect {effect!r} ")
    with pytest.raises(PolicyError, match=f"^{where}"):
        PolicyEngine.from_text(spec.text(), "\n".join(lines), policy_source="policy.csv")
