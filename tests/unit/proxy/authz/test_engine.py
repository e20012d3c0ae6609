"""Policy engine: the decisions and errors a policy author sees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authz.engine import (
    DEFAULT_ALLOW,
    DEFAULT_DENY,
    DOMAIN_MISSING,
    DOMAIN_UNEXPECTED,
    EMPTY_POLICY_ALLOW,
    MATCHED_ALLOW,
    MATCHED_DENY,
    AccessRequest,
    Decision,
    PolicyEngine,
    PolicyError,
    parse_policy_text,
)
from tests.unit.proxy.authz.test_engine_equivalence import reference_decision, reference_enforcer

RBAC_DENY = """
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act, eft

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub) && keyMatch2(r.obj, p.obj) && r.act == p.act
"""

RBAC_DOMAINS = """
[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, dom, obj, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub, r.dom) && r.dom == p.dom && keyMatch2(r.obj, p.obj) && r.act == p.act
"""


def _model(matcher: str, *, effect: str = "some(where (p.eft == allow))", eft: bool = False) -> str:
    return (
        "[request_definition]\nr = sub, obj, act\n"
        f"[policy_definition]\np = sub, obj, act{', eft' if eft else ''}\n"
        "[role_definition]\ng = _, _\n"
        f"[policy_effect]\ne = {effect}\n"
        f"[matchers]\nm = {matcher}\n"
    )


def test_deny_rule_overrides_allow_and_names_its_line() -> None:
    policy = (
        "p, reader, /tables/:table, read, allow\n"
        "p, alice, /tables/secret, read, deny\n"
        "g, alice, reader\n"
    )
    engine = PolicyEngine.from_text(RBAC_DENY, policy, policy_source="policies/policy.csv")

    assert engine.mode == "compiled"
    assert engine.decide("alice", "/tables/sales", "read") == Decision(
        True, MATCHED_ALLOW, ("reader", "/tables/:table", "read", "allow"), "policies/policy.csv:1"
    )
    assert engine.decide("alice", "/tables/secret", "read") == Decision(
        False, MATCHED_DENY, ("alice", "/tables/secret", "read", "deny"), "policies/policy.csv:2"
    )


def test_no_matching_rule_denies_by_default() -> None:
    engine = PolicyEngine.from_text(
        RBAC_DENY, "p, reader, /tables/:table, read, allow\ng, bob, reader"
    )

    for request in [
        ("mallory", "/tables/sales", "read"),  # no role
        ("bob", "/tables/sales", "write"),  # other action
        ("bob", "/views/sales", "read"),  # other object
    ]:
        assert engine.decide(*request) == Decision(False, DEFAULT_DENY)


def test_deny_override_model_allows_unless_a_deny_rule_matches() -> None:
    model = _model(
        "g(r.sub, p.sub) && keyMatch(r.obj, p.obj) && r.act == p.act",
        effect="!some(where (p.eft == deny))",
        eft=True,
    )
    engine = PolicyEngine.from_text(model, "p, intern, /admin/*, read, deny\ng, tom, intern")

    assert engine.decide("tom", "/admin/users", "read").allowed is False
    assert engine.decide("tom", "/home", "read") == Decision(True, DEFAULT_ALLOW)


@pytest.mark.parametrize(("depth", "allowed"), [(1, True), (9, True), (10, False), (12, False)])
def test_roles_are_inherited_up_to_pycasbins_hierarchy_limit(depth: int, allowed: bool) -> None:
    # alice -> role1 -> role2 -> ...: pycasbin follows at most 9 links.
    links = ["g, alice, role1"] + [f"g, role{i}, role{i + 1}" for i in range(1, 12)]
    policy = "\n".join([f"p, role{depth}, /data, read, allow", *links])
    engine = PolicyEngine.from_text(RBAC_DENY, policy)
    reference = reference_enforcer(RBAC_DENY, policy)

    decision = engine.decide("alice", "/data", "read")

    assert decision.allowed is allowed
    assert reference_decision(reference, ("alice", "/data", "read"))[0] is allowed


def test_role_cycles_are_tolerated() -> None:
    policy = "p, b, /data, read, allow\ng, a, b\ng, b, a\ng, c, c"
    engine = PolicyEngine.from_text(RBAC_DENY, policy)

    assert engine.decide("a", "/data", "read").allowed is True
    assert engine.decide("c", "/data", "read").allowed is False


def test_a_role_in_one_domain_grants_nothing_in_another() -> None:
    policy = (
        "p, admin, tenant1, /tables/*, write\n"
        "p, admin, tenant2, /tables/*, write\n"
        "g, alice, admin, tenant1\n"
    )
    engine = PolicyEngine.from_text(RBAC_DOMAINS, policy)

    assert engine.requires_domain is True
    assert engine.decide("alice", "/tables/t", "write", "tenant1").allowed is True
    assert engine.decide("alice", "/tables/t", "write", "tenant2").allowed is False
    assert engine.decide("alice", "/tables/t", "write", "").allowed is False


def test_domain_argument_must_fit_the_model() -> None:
    with_domains = PolicyEngine.from_text(RBAC_DOMAINS, "p, alice, t1, /a, read")
    without = PolicyEngine.from_text(RBAC_DENY, "p, alice, /a, read, allow")

    assert with_domains.decide("alice", "/a", "read") == Decision(False, DOMAIN_MISSING)
    assert without.decide("alice", "/a", "read", "t1") == Decision(False, DOMAIN_UNEXPECTED)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/tables/sales", True),
        ("/tables/a/b", False),  # `:id` is one segment
        ("/tables/", False),
        ("/tables", False),
        ("/tables/sales\n", True),  # pycasbin's regex `$` accepts a final newline
    ],
)
def test_keymatch2_parameter_matches_exactly_one_segment(path: str, allowed: bool) -> None:
    policy = "p, alice, /tables/:id, read, allow"
    engine = PolicyEngine.from_text(RBAC_DENY, policy)
    reference = reference_enforcer(RBAC_DENY, policy)

    assert engine.decide("alice", path, "read").allowed is allowed
    assert reference_decision(reference, ("alice", path, "read"))[0] is allowed


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/public", True),
        ("/public/x", True),  # regexMatch is anchored at the start only
        ("/publicity", True),
        ("/x/public", False),
        ("/Public", False),
    ],
)
def test_regexmatch_is_anchored_at_the_start_only_like_pycasbin(path: str, allowed: bool) -> None:
    model = _model("g(r.sub, p.sub) && regexMatch(r.obj, p.obj) && r.act == p.act")
    policy = "p, alice, /public, read"
    engine = PolicyEngine.from_text(model, policy)
    reference = reference_enforcer(model, policy)

    assert engine.decide("alice", path, "read").allowed is allowed
    assert reference_decision(reference, ("alice", path, "read"))[0] is allowed


def test_allow_override_explains_the_first_matching_rule_like_enforce_ex() -> None:
    model = _model("g(r.sub, p.sub) && keyMatch(r.obj, p.obj) && r.act == p.act")
    policy = (
        "p, reader, /data/*, read\np, alice, /data/x, read\np, alice, /data/*, read\n"
        "g, alice, reader"
    )
    engine = PolicyEngine.from_text(model, policy, policy_source="p.csv")

    decision = engine.decide("alice", "/data/x", "read")

    assert decision.rule == ("reader", "/data/*", "read")
    assert decision.source == "p.csv:1"
    assert (
        decision.rule
        == reference_decision(reference_enforcer(model, policy), ("alice", "/data/x", "read"))[1]
    )


def test_action_wildcard_and_glob_objects() -> None:
    model = _model('g(r.sub, p.sub) && globMatch(r.obj, p.obj) && (r.act == p.act || p.act == "*")')
    engine = PolicyEngine.from_text(model, "p, ops, /logs/**, *\ng, olga, ops")

    assert engine.mode == "compiled"
    assert engine.decide("olga", "/logs/2024/01/app.log", "delete").allowed is True
    assert engine.decide("olga", "/logsx", "read").allowed is False


def test_empty_policy_follows_pycasbins_blank_rule_evaluation() -> None:
    engine = PolicyEngine.from_text(RBAC_DENY, "")
    reference = reference_enforcer(RBAC_DENY, "")

    # pycasbin matches an all-empty rule when there are no rules at all.
    for request in [("", "", ""), ("alice", "/a", "read")]:
        allowed, _ = reference_decision(reference, request)
        assert engine.decide(*request).allowed is allowed
    assert engine.decide("", "", "") == Decision(True, EMPTY_POLICY_ALLOW)
    assert engine.decide("alice", "/a", "read") == Decision(False, DEFAULT_DENY)


UNSUPPORTED_MATCHERS = [
    "g(r.sub, p.sub) && keyMatch3(r.obj, p.obj) && r.act == p.act",
    'g(r.sub, p.sub) && keyMatch2(r.obj, p.obj) && r.act == p.act || r.sub == "root"',
    "g(r.sub, p.sub) && r.obj == p.obj && r.act != p.act",
    "g(p.sub, r.sub) && r.obj == p.obj && r.act == p.act",
]


@pytest.mark.parametrize("matcher", UNSUPPORTED_MATCHERS)
def test_unrecognised_model_falls_back_to_pycasbin_with_the_same_decisions(matcher: str) -> None:
    model = _model(matcher)
    policy = "p, reader, /data/{id}, read\np, root, /x, write\ng, alice, reader\ng, reader, alice"
    engine = PolicyEngine.from_text(model, policy, policy_source="p.csv")
    reference = reference_enforcer(model, policy)

    assert engine.mode == "casbin"
    assert engine.fallback_reason
    for request in [
        ("alice", "/data/1", "read"),
        ("alice", "/data/1", "write"),
        ("root", "/anything", "read"),
        ("bob", "/data/1", "read"),
    ]:
        decision = engine.decide(*request)
        allowed, explained = reference_decision(reference, request)
        assert decision.allowed == allowed
        if allowed:
            assert decision.rule == explained
            assert decision.source is not None


def test_fallback_denies_when_pycasbin_cannot_evaluate_the_request() -> None:
    model = _model("ipMatch(r.sub, p.sub) && r.obj == p.obj && r.act == p.act")
    engine = PolicyEngine.from_text(model, "p, 10.0.0.0/8, /a, read")

    assert engine.mode == "casbin"
    assert engine.decide("10.1.2.3", "/a", "read").allowed is True
    decision = engine.decide("not an address", "/a", "read")
    assert decision.allowed is False
    assert "policy evaluation failed" in decision.reason


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (RBAC_DENY.replace("[matchers]\nm = ", "[matchers]\n# m = "), "missing [matchers]"),
        (
            RBAC_DENY.replace("[request_definition]\nr = sub, obj, act", ""),
            "missing [request_definition]",
        ),
        (RBAC_DENY.replace("keyMatch2(", "keyMatch9("), "unknown function keyMatch9()"),
        (RBAC_DENY.replace("r.act == p.act", "r.act == p.verb"), "uses p.verb"),
        (RBAC_DENY.replace("&& r.act", "&& (r.act"), "not a valid expression"),
        (RBAC_DENY.replace("e = some", "e = most"), "unsupported [policy_effect]"),
        ("[matchers]\nthis line has no equals sign\n", "model.conf"),
        # pycasbin keeps a misspelt section and never reads what is under it.
        (RBAC_DENY + "\n[matcher]\nm = true\n", "unknown section [matcher]"),
        ("[foo]\n" + RBAC_DENY, "model.conf:1: unknown section [foo]"),
    ],
)
def test_broken_model_is_rejected_with_a_message_naming_the_problem(
    model: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=r"model\.conf") as error:
        PolicyEngine.from_text(model, "p, a, /b, read, allow", model_source="model.conf")

    assert message in str(error.value)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("p, alice, /a, read", "policy.csv:1: p line has 3 fields, the model defines 4"),
        (
            "p, alice, /a, read, allow\n\np, bob, /a, read, allow, extra",
            "policy.csv:3: p line has 5",
        ),
        ("p, alice, /a, read, allow\ng, alice", "policy.csv:2: g line has 1 fields"),
        ("g, alice, admin, tenant1", "policy.csv:1: g line has 3 fields"),
        ("p2, alice, /a, read", "policy.csv:1: policy type 'p2' is not defined"),
        ("x, alice", "policy.csv:1: policy type 'x'"),
        ("p, alice), /a, read, allow", "policy.csv:1: unbalanced ')'"),
        ("justoneword", "policy.csv:1: expected `type, field, ...`"),
    ],
)
def test_policy_lines_that_do_not_fit_the_model_name_file_and_line(
    policy: str, message: str
) -> None:
    with pytest.raises(PolicyError) as error:
        PolicyEngine.from_text(RBAC_DENY, policy, policy_source="policy.csv")

    assert message in str(error.value)


@pytest.mark.parametrize(
    ("effect", "hint"),
    [
        ("Deny", "(write 'deny': effects are lowercase)"),
        ("ALLOW", "(write 'allow': effects are lowercase)"),
        ("maybe", ""),
        ("denied", ""),
        ("", ""),
    ],
)
def test_an_effect_other_than_allow_or_deny_is_refused_naming_the_line(
    effect: str, hint: str
) -> None:
    # pycasbin reads any other effect as "indeterminate" and skips the rule, so a
    # misspelled deny would silently stop denying.
    policy = f"p, analyst, /sales/*, read, allow\np, analyst, /sales/secret, read, {effect}"

    with pytest.raises(PolicyError) as error:
        PolicyEngine.from_text(RBAC_DENY, policy, policy_source="policy.csv")

    assert str(error.value).startswith(
        f"policy.csv:2: effect {effect!r} is neither 'allow' nor 'deny'{' ' + hint if hint else ''}"
    )


def test_effects_are_checked_for_every_model_with_an_eft_column() -> None:
    deny_override = _model(
        "r.sub == p.sub && r.obj == p.obj && r.act == p.act",
        effect="!some(where (p.eft == deny))",
        eft=True,
    )
    with pytest.raises(PolicyError, match=r"policy\.csv:1: effect 'no'"):
        PolicyEngine.from_text(deny_override, "p, a, /x, read, no", policy_source="policy.csv")
    # Without an eft column the fourth value is an ordinary field.
    without = _model("r.sub == p.sub && r.obj == p.obj && r.act == p.act")
    engine = PolicyEngine.from_text(without, "p, a, /x, Deny")
    assert engine.decide("a", "/x", "Deny").allowed is True


@pytest.mark.parametrize("pattern", ["+x", "/data/[z-a]", "/a/**"])
def test_invalid_regex_in_a_rule_is_rejected_at_load(pattern: str) -> None:
    model = _model("g(r.sub, p.sub) && regexMatch(r.obj, p.obj) && r.act == p.act")
    policy = f"p, alice, /ok, read\np, alice, {pattern}, read"

    with pytest.raises(PolicyError, match=r"policy.csv:2: .* is not a valid regular expression"):
        PolicyEngine.from_text(model, policy, policy_source="policy.csv")


def test_keymatch2_rule_that_makes_a_broken_regex_is_rejected_at_load() -> None:
    # keyMatch2 turns `/*` into `/.*`, so `/**` becomes the invalid regex `/.**`.
    with pytest.raises(PolicyError, match=r"policy\.csv:1: '/a/\*\*' is not a valid regular"):
        PolicyEngine.from_text(
            RBAC_DENY, "p, alice, /a/**, read, allow", policy_source="policy.csv"
        )


def test_policy_text_is_split_like_pycasbins_file_adapter() -> None:
    text = "# comment\n\n  p, alice, keyMatch(/a, /b), read  \r\ng,bob,admin\n"

    lines = parse_policy_text(text, "policy.csv")

    assert [(line.ptype, line.fields, line.source) for line in lines] == [
        ("p", ("alice", "keyMatch(/a, /b)", "read"), "policy.csv:3"),
        ("g", ("bob", "admin"), "policy.csv:4"),
    ]


def test_decide_many_answers_in_request_order() -> None:
    engine = PolicyEngine.from_text(RBAC_DOMAINS, "p, admin, t1, /a, read\ng, alice, admin, t1")

    decisions = engine.decide_many(
        [AccessRequest("alice", "/a", "read", "t1"), AccessRequest("alice", "/a", "read", "t2")]
    )

    assert [decision.allowed for decision in decisions] == [True, False]


hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(subject=hostile_text, obj=hostile_text, action=hostile_text)
def test_any_request_text_gets_pycasbins_answer_and_never_raises(
    subject: str, obj: str, action: str
) -> None:
    policy = (
        "p, reader, /tables/:id, read, allow\n"
        "p, admin, /*, write, allow\n"
        "p, admin, /admin/*, write, deny\n"
        "g, alice, reader\ng, root, admin\n"
    )
    engine = PolicyEngine.from_text(RBAC_DENY, policy)
    reference = reference_enforcer(RBAC_DENY, policy)
    for request in [(subject, obj, action), ("alice", obj, "read"), ("root", obj, "write")]:
        assert engine.decide(*request).allowed == reference_decision(reference, request)[0]


@pytest.mark.parametrize(
    ("pattern", "path"),
    [
        ("/b/a|/a/b", "/a/b"),  # an alternative without the first branch's prefix
        ("/a/?b", "/ab"),  # `?` makes the `/` before it optional
        ("/a/*b", "/ab"),
        ("/a/b{0}", "/a/"),
        ("^/a/b", "/a/b/c"),
        ("(?i)/admin/", "/ADMIN/x"),  # inline flags: no literal prefix at all
    ],
)
def test_regex_rules_are_found_however_their_prefix_is_written(pattern: str, path: str) -> None:
    model = _model("g(r.sub, p.sub) && regexMatch(r.obj, p.obj) && r.act == p.act")
    policy = f"p, alice, /unrelated/x, read\np, alice, {pattern}, read"
    reference = reference_enforcer(model, policy)

    decision = PolicyEngine.from_text(model, policy).decide("alice", path, "read")

    assert reference_decision(reference, ("alice", path, "read"))[0] is True
    assert decision.allowed is True
    assert decision.rule == ("alice", pattern, "read")


def test_keymatch2_literal_rule_accepts_a_trailing_newline_like_pycasbin() -> None:
    policy = "p, alice, /tables/sales, read, allow"
    reference = reference_enforcer(RBAC_DENY, policy)

    decision = PolicyEngine.from_text(RBAC_DENY, policy).decide("alice", "/tables/sales\n", "read")

    assert reference_decision(reference, ("alice", "/tables/sales\n", "read"))[0] is True
    assert decision.allowed is True


def test_glob_that_cannot_compile_denies_and_warm_names_its_line() -> None:
    model = _model(
        "g(r.sub, p.sub) && globMatch(r.obj, p.obj) && r.act == p.act",
        effect="!some(where (p.eft == deny))",
        eft=True,
    )
    # Eleven brace pairs expand to 2,048 patterns, past wcmatch's limit of 1,000; pycasbin
    # raises on every request that reaches the rule. A deny rule that cannot be evaluated
    # must deny, not be skipped.
    policy = "p, alice, /ok, read, allow\np, alice, (" + "{a,b}" * 11 + "), read, deny"
    engine = PolicyEngine.from_text(model, policy, policy_source="policy.csv")

    decision = engine.decide("alice", "/x", "read")

    assert decision.allowed is False
    assert "policy evaluation failed" in decision.reason
    with pytest.raises(PolicyError, match=r"policy\.csv:2: pattern cannot be compiled"):
        engine.warm()


def test_warm_compiles_deferred_patterns_without_changing_decisions() -> None:
    model = _model("g(r.sub, p.sub) && globMatch(r.obj, p.obj) && r.act == p.act")
    policy = "p, ops, /logs/**, read\np, alice, /tables/:id, read\ng, olga, ops"
    engine = PolicyEngine.from_text(model, policy)
    keymatch2 = PolicyEngine.from_text(RBAC_DENY, "p, alice, /tables/:id, read, allow")

    engine.warm()
    keymatch2.warm()

    assert engine.decide("olga", "/logs/a/b", "read").allowed is True
    assert engine.decide("olga", "/other", "read").allowed is False
    assert keymatch2.decide("alice", "/tables/x", "read").allowed is True
    assert keymatch2.decide("alice", "/tables/x/y", "read").allowed is False


def test_request_fields_with_other_names_are_passed_by_position_to_pycasbin() -> None:
    model = (
        "[request_definition]\nr = user, resource, verb\n"
        "[policy_definition]\np = user, resource, verb\n"
        "[policy_effect]\ne = some(where (p.eft == allow))\n"
        "[matchers]\nm = r.user == p.user && r.resource == p.resource && r.verb == p.verb\n"
    )
    engine = PolicyEngine.from_text(model, "p, alice, /a, read")

    assert engine.mode == "casbin"
    assert engine.decide("alice", "/a", "read").allowed is True
    assert engine.decide("alice", "/a", "write").allowed is False


@st.composite
def damaged_models(draw: st.DrawFn) -> str:
    """A valid model with some lines kept, cut short, dropped or followed by noise."""
    lines = []
    for line in draw(st.sampled_from([RBAC_DENY, RBAC_DOMAINS])).strip().splitlines():
        damage = draw(st.sampled_from(["keep"] * 16 + ["cut", "drop", "noise"]))
        if damage == "keep":
            lines.append(line)
        elif damage == "cut":
            lines.append(line[: draw(st.integers(0, len(line)))])
        elif damage == "noise":
            lines.extend([line, draw(st.text(max_size=20))])
    return "\n".join(lines)


policy_fields = st.sampled_from(["alice", "admin", "/a/:id", "/a/(", "read", "allow", "deny", ""])
policy_texts = st.one_of(
    st.sampled_from(
        [
            "p, alice, /a/:id, read, allow\ng, bob, alice",
            "p, alice, d1, /a/:id, read\ng, bob, alice, d1",
            "p, alice, /a/:id, read\ng, bob, alice",
            "",
        ]
    ),
    st.lists(
        st.tuples(
            st.sampled_from(["p", "g", "p2", "g2", "(", ""]), st.lists(policy_fields, max_size=5)
        ).map(lambda line: ", ".join([line[0], *line[1]])),
        max_size=6,
    ).map("\n".join),
)


@settings(max_examples=300, deadline=None)
@given(model=damaged_models(), policy=policy_texts)
def test_malformed_model_or_policy_is_rejected_cleanly_or_decides(model: str, policy: str) -> None:
    # Either a clean PolicyError, or an engine whose decisions never raise.
    try:
        engine = PolicyEngine.from_text(model, policy)
    except PolicyError:
        return
    decision = engine.decide("alice", "/a/1", "read", "d1" if engine.requires_domain else None)
    assert isinstance(decision.allowed, bool)


OTHER_COMPILED_MODELS = [
    # Resource groups: the role function on the object instead of the subject.
    (
        _model('r.sub == p.sub && g(r.obj, p.obj) && ("*" == p.act || p.act == r.act)'),
        "p, alice, tables, read\np, bob, tables, *\ng, /t/sales, tables\ng, /t/hr, secret\n"
        "g, secret, tables",
        [("alice", "/t/sales", "read"), ("alice", "/t/hr", "read"), ("bob", "/t/x", "write")],
    ),
    # A domain argument to a role definition without domains is ignored, as pycasbin does.
    (
        "[request_definition]\nr = sub, dom, obj, act\n"
        "[policy_definition]\np = sub, dom, obj, act\n"
        "[role_definition]\ng = _, _\n[policy_effect]\ne = some(where (p.eft == allow))\n"
        "[matchers]\nm = g(r.sub, p.sub, r.dom) && r.dom == p.dom && r.obj == p.obj "
        "&& r.act == p.act\n",
        "p, admin, d1, /a, read\np, admin, d2, /a, read\ng, alice, admin",
        [("alice", "/a", "read"), ("bob", "/a", "read")],
    ),
]


@pytest.mark.parametrize(("model", "policy", "requests"), OTHER_COMPILED_MODELS)
def test_other_compiled_shapes_decide_as_pycasbin(
    model: str, policy: str, requests: list[tuple[str, str, str]]
) -> None:
    engine = PolicyEngine.from_text(model, policy)
    reference = reference_enforcer(model, policy)

    assert engine.mode == "compiled", engine.fallback_reason
    for subject, obj, action in requests:
        domains = ["d1", "d2", "d3"] if engine.requires_domain else [None]
        for domain in domains:
            call = (subject, obj, action) if domain is None else (subject, domain, obj, action)
            decision = engine.decide(subject, obj, action, domain)
            assert (decision.allowed, decision.rule) == reference_decision(reference, call), call
