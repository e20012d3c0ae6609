"""`lineage-sidecar policy check | test | explain`: the policy files, seen from a shell or CI.

`check` lints the model, policy and route files exactly as the proxy loads them.
`test CASES.yaml` runs a table of requests through the same normalization, route table and
engine as the proxy and compares each decision with the expected one. `explain` shows how
one request is decided: the normalized path, the route, the resource and action, and the
rule that decided (or why nothing allowed it). A route that authorizes its SQL table by
table (`sql: {..., tables: ...}`) is decided by the proxy gate's own functions, so a query
string's `?sql=select * from secret` is denied here as it is there.

Exit status: 0 when everything holds; 1 when the policy is invalid, a case fails or an
explained request is denied; 2 when a test-case file cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import yaml

from agent.config import UniqueKeyLoader
from proxy.authn.principal import Principal
from proxy.authz.paths import PathRejected
from proxy.authz.store import PolicyLoadError, PolicySnapshot, decide_principal, load_snapshot
from proxy.gate import authorize_sql_tables

__all__ = [
    "Explanation",
    "TestCase",
    "add_policy_commands",
    "cmd_check",
    "cmd_explain",
    "cmd_test",
    "explain_request",
    "read_cases",
]

DEFAULT_MODEL: Final = "policies/model.conf"
DEFAULT_POLICY: Final = "policies/policy.csv"
DEFAULT_ROUTES: Final = "policies/routes.yaml"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
MAX_CASES_BYTES: Final = 4 * 1024 * 1024

_CASE_KEYS: Final = frozenset({"name", "as", "roles", "domain", "method", "path", "expect"})


@dataclass(frozen=True)
class Explanation:
    """How one request is decided, step by step; `allowed` is the outcome."""

    method: str
    target: str
    allowed: bool
    reason: str
    path: str | None = None
    route: str | None = None
    resource: str | None = None
    action: str | None = None
    rule: tuple[str, ...] | None = None
    rule_source: str | None = None
    subjects: tuple[str, ...] = ()
    # The SQL the route authorizes table by table, and the route's own (allowing) rule,
    # when the outcome is the decision on those tables.
    sql: str | None = None
    route_rule: tuple[str, ...] | None = None
    route_rule_source: str | None = None


@dataclass(frozen=True)
class TestCase:
    """One line of a policy test table."""

    __test__ = False  # not a pytest class, despite the name

    name: str
    subject: str
    roles: tuple[str, ...]
    method: str
    path: str
    allow: bool
    where: str
    domain: str | None = None


def explain_request(
    snapshot: PolicySnapshot,
    subject: str,
    roles: Sequence[str],
    method: str,
    target: str,
    domain: str | None = None,
) -> Explanation:
    """Decide one request as the proxy would, keeping every intermediate step (pure)."""
    subjects = (subject, *roles)
    try:
        path, match = snapshot.routes.resolve(method, target)
    except PathRejected as exc:
        return Explanation(
            method, target, False, f"path rejected ({exc.code}): {exc.reason}", subjects=subjects
        )
    if match is None:
        return Explanation(
            method,
            target,
            False,
            "no route matches this method and path: deny by default",
            path=path.path,
            subjects=subjects,
        )
    decision = decide_principal(
        snapshot.engine, subject, roles, match.resource, match.action, domain
    )
    principal = Principal(
        id=subject, issuer="policy explain", auth_method="anonymous", roles=tuple(roles)
    )
    route_decision = decision
    decision, sql = authorize_sql_tables(snapshot.engine, principal, match, route_decision)
    return Explanation(
        method,
        target,
        decision.allowed,
        decision.reason,
        path=path.path,
        route=match.route.describe(),
        resource=match.resource,
        action=match.action,
        rule=decision.rule,
        rule_source=decision.source,
        subjects=subjects,
        sql=sql,
        route_rule=route_decision.rule if sql is not None else None,
        route_rule_source=route_decision.source if sql is not None else None,
    )


# -- check ----------------------------------------------------------------------------------


def _load(args: argparse.Namespace, err: TextIO) -> PolicySnapshot | None:
    policies = args.policy or [DEFAULT_POLICY]
    try:
        return load_snapshot(Path(args.model), [Path(p) for p in policies], Path(args.routes))
    except PolicyLoadError as exc:
        print(exc, file=err)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    """Lint the files: "ok: N rules, M routes, engine mode X", or `file:line: reason`."""
    snapshot = _load(args, sys.stderr)
    if snapshot is None:
        return EXIT_FAILED
    engine = snapshot.engine
    print(
        f"ok: {engine.rule_count} rules, {len(snapshot.routes.routes)} routes, "
        f"engine mode {engine.mode}"
        + (f" ({engine.fallback_reason})" if engine.fallback_reason else "")
    )
    return EXIT_OK


# -- test -----------------------------------------------------------------------------------


class _LineLoader(UniqueKeyLoader):
    """Records where each mapping starts, so a failing case can be named by file:line;
    like a configuration file, a key given twice is refused rather than the last one kept
    (`expect: allow` then `expect: deny` would test only the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping


class CasesError(ValueError):
    """The test-case file cannot be used; the message is `file[:line]: reason`."""


def read_cases(path: Path) -> list[TestCase]:
    """Parse a test-case file: `cases:` (or the top level) is a list of mappings with
    `as`, `method`, `path`, `expect` (allow|deny) and optionally `name`, `roles`, `domain`."""
    source = str(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CASES_BYTES + 1)
    except OSError as exc:
        raise CasesError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CASES_BYTES:
        raise CasesError(f"{source}: larger than {MAX_CASES_BYTES} bytes")
    try:
        document = yaml.load(data, Loader=_LineLoader)  # noqa: S506  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CasesError(f"{source}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise CasesError(f"{source}: invalid YAML: {exc}") from None
    items = document.get("cases") if isinstance(document, dict) else document
    if not isinstance(items, list) or not items:
        raise CasesError(f"{source}: expected a non-empty list of cases under 'cases:'")
    return [_case(item, source, number) for number, item in enumerate(items, start=1)]


def _case(item: object, source: str, number: int) -> TestCase:
    if not isinstance(item, dict):
        raise CasesError(f"{source}: case {number} must be a mapping")
    where = f"{source}:{item.get('__line__', '?')}"
    fields = {key: value for key, value in item.items() if key != "__line__"}
    unknown = sorted(str(key) for key in fields if key not in _CASE_KEYS)
    if unknown:
        raise CasesError(f"{where}: unknown key(s) {', '.join(unknown)} in case {number}")

    def text(key: str, *, required: bool = True) -> str | None:
        value = fields.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise CasesError(f"{where}: case {number}: {key!r} must be a non-empty string")
        return value

    subject, method, path, expect = (text(key) or "" for key in ("as", "method", "path", "expect"))
    if expect not in ("allow", "deny"):
        raise CasesError(f"{where}: case {number}: expect must be 'allow' or 'deny'")
    roles = fields.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise CasesError(f"{where}: case {number}: roles must be a list of strings")
    name = text("name", required=False) or f"{method} {path} as {subject}"
    return TestCase(
        name=name,
        subject=subject,
        roles=tuple(roles),
        method=method,
        path=path,
        allow=expect == "allow",
        where=where,
        domain=text("domain", required=False),
    )


def cmd_test(args: argparse.Namespace) -> int:
    """Run every case; print a table and a summary; exit 1 on any mismatch."""
    try:
        cases = read_cases(Path(args.cases))
    except CasesError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    snapshot = _load(args, sys.stderr)
    if snapshot is None:
        return EXIT_FAILED
    failed = 0
    for case in cases:
        outcome = explain_request(
            snapshot, case.subject, case.roles, case.method, case.path, case.domain
        )
        ok = outcome.allowed == case.allow
        failed += not ok
        got = "allow" if outcome.allowed else "deny"
        expected = "allow" if case.allow else "deny"
        who = case.subject + (f" [{', '.join(case.roles)}]" if case.roles else "")
        print(
            f"{'PASS' if ok else 'FAIL'}  {case.name}: {case.method} {case.path} as {who} "
            f"-> {got} (expected {expected})"
        )
        if not ok:
            print(f"      at {case.where}; {_because(outcome)}")
    print(f"{len(cases) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed else EXIT_OK


def _because(outcome: Explanation) -> str:
    parts = []
    if outcome.resource is not None:
        parts.append(f"resource {outcome.resource}, action {outcome.action}")
    parts.append(outcome.reason)
    if outcome.rule is not None:
        parts.append(f"rule {', '.join(outcome.rule)} ({outcome.rule_source})")
    return "; ".join(parts)


# -- explain --------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    """Print how one request is decided; exit 0 when allowed, 1 when denied."""
    snapshot = _load(args, sys.stderr)
    if snapshot is None:
        return EXIT_FAILED
    outcome = explain_request(
        snapshot, args.subject, args.role or [], args.method.upper(), args.target, args.domain
    )
    print(f"request:    {outcome.method} {outcome.target}")
    print(f"subjects:   {', '.join(outcome.subjects)}")
    print(f"path:       {outcome.path if outcome.path is not None else '(rejected)'}")
    print(f"route:      {outcome.route or '(none)'}")
    if outcome.resource is not None:
        print(f"resource:   {outcome.resource}")
        print(f"action:     {outcome.action}")
    if outcome.sql is not None:
        if outcome.route_rule is not None:
            print(f"route rule: {', '.join(outcome.route_rule)}  ({outcome.route_rule_source})")
        print(f"sql:        {outcome.sql}")
    print(f"decision:   {'allow' if outcome.allowed else 'deny'}")
    print(f"reason:     {outcome.reason}")
    if outcome.rule is not None:
        print(f"rule:       {', '.join(outcome.rule)}  ({outcome.rule_source})")
    return EXIT_OK if outcome.allowed else EXIT_FAILED


# -- argparse wiring ------------------------------------------------------------------------


def _files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Casbin model file")
    parser.add_argument(
        "--policy",
        action="append",
        help=f"policy CSV file; repeat for several, read in order (default {DEFAULT_POLICY})",
    )
    parser.add_argument("--routes", default=DEFAULT_ROUTES, help="route file")


def add_policy_commands(subparsers: Any) -> None:
    """Register `check`, `test` and `explain` on the `policy` command's subparsers."""
    check = subparsers.add_parser(
        "check",
        help="lint the model, policy and route files",
        description="Exit 0 with a summary, or 1 with `file:line: reason`.",
    )
    _files(check)
    check.set_defaults(func=cmd_check)

    test = subparsers.add_parser(
        "test",
        help="run a table of requests and expected decisions",
        description="Exit 0 when every case holds, 1 naming the failing cases.",
    )
    test.add_argument("cases", help="YAML file of cases (as, roles, method, path, expect)")
    _files(test)
    test.set_defaults(func=cmd_test)

    explain = subparsers.add_parser(
        "explain",
        help="show how one request is decided",
        description="Exit 0 when the request is allowed, 1 when it is denied.",
    )
    explain.add_argument("--as", dest="subject", required=True, help="principal id")
    explain.add_argument(
        "--role", action="append", help="a role from the principal's token (repeatable)"
    )
    explain.add_argument("--domain", help="domain, for models with domains")
    explain.add_argument("method", help="HTTP method, e.g. GET")
    explain.add_argument(
        "target",
        help="request target as sent, query included: /sales/orders?_size=5, or "
        "'/sales.json?sql=select+*+from+orders' (its SQL is authorized table by table)",
    )
    _files(explain)
    explain.set_defaults(func=cmd_explain)
