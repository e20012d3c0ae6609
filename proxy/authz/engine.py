"""Policy decisions: (subject, object, action[, domain]) → allow or deny, and why.

A `PolicyEngine` is built once per policy version from a Casbin model text and the policy
lines (`p` and `g` lines as pycasbin reads them from CSV), validated completely at build
time, and then only read: a reload builds a new engine and swaps it in. Decisions have
pycasbin's semantics exactly. Models of the common shapes (see `shape.py`) are decided by
the compiled index in `compiled.py` (`mode == "compiled"`); any other model by a pycasbin
enforcer (`mode == "casbin"`, `fallback_reason` says why).

Promises: deny by default; a decision names the rule that decided it and its file:line;
a malformed model, a policy line that does not fit the model, an unknown function or an
invalid regular expression raise `PolicyError` naming the file and line at build time
(globs, slow to compile, are checked by `warm()`); a request that cannot be evaluated is
denied (fail closed), never raises. Stricter than pycasbin where pycasbin would only fail
later or silently: policy lines of an undefined type, with too many fields, or with an
effect other than exactly `allow` or `deny` (pycasbin would ignore the rule) are errors.
Sizes are bounded so a reload's work is (MAX_FIELD_CHARS, MAX_POLICY_LINES).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, Final, Literal, NamedTuple

import casbin
import msgspec
from casbin.persist.adapter import Adapter

from proxy.authz.compiled import CompiledPolicy
from proxy.authz.matching import PatternError
from proxy.authz.shape import PolicyError, Shape, parse_model

__all__ = [
    "MAX_FIELD_CHARS",
    "MAX_POLICY_LINES",
    "AccessRequest",
    "Decision",
    "PolicyEngine",
    "PolicyError",
    "PolicyLine",
    "parse_policy_text",
]

MATCHED_ALLOW: Final = "matched allow rule"
MATCHED_DENY: Final = "matched deny rule"
DEFAULT_DENY: Final = "no rule matched: deny by default"
# Only a `!some(where (p.eft == deny))` model allows without a matching rule.
DEFAULT_ALLOW: Final = "no deny rule matched: allow by default"
# pycasbin evaluates the matcher against an all-empty rule when a policy has no rules.
EMPTY_POLICY_ALLOW: Final = "policy has no rules: the matcher holds for an empty rule"
DOMAIN_MISSING: Final = "request has no domain but the model needs one: deny"
DOMAIN_UNEXPECTED: Final = "request has a domain but the model has none: deny"

Mode = Literal["compiled", "casbin"]

# The only effects pycasbin acts on. It reads any other value (`Deny`, `denied`, a typo) as
# "indeterminate" and ignores the rule, so a misspelled deny would silently stop denying:
# such a line is refused. Case is not folded: `Deny` is refused rather than read as
# `deny`, so the file means the same to this engine, to pycasbin and to a reviewer.
EFFECT_VALUES: Final = frozenset({"allow", "deny"})

# Bounds on what policy files may hold, far above real policies (10,000 rules and their
# role lines are about 26,000 lines of 40 characters). Every pattern is compiled at load,
# and wcmatch's glob translation grows faster than linearly with a pattern's length (one
# 1.2 MB field took 20 s, 20 MB over 5 minutes, while a reload holds the build lock), so
# an oversized field or file must be refused before anything is compiled. The admin API
# takes at most 512 characters per field; files may hold longer hand-written patterns.
MAX_FIELD_CHARS: Final = 4096
MAX_POLICY_LINES: Final = 100_000

_NESTING: Final = re.compile(r"[,\[\]\(\)]")
_REQUEST_FIELDS: Final = ("sub", "obj", "act", "dom")


class Decision(msgspec.Struct, frozen=True):
    """The answer for one request, and which rule gave it.

    `rule` holds the deciding `p` line's fields after the type, as pycasbin's `enforce_ex`
    explains it (e.g. `("alice", "/data/*", "read")`); `source` is its `file:line`.
    Both are None when no rule decided (a default).
    """

    allowed: bool
    reason: str
    rule: tuple[str, ...] | None = None
    source: str | None = None


class PolicyLine(msgspec.Struct, frozen=True):
    """One policy line: its type (`p`, `g`, `g2`, ...), fields, and where it was read."""

    ptype: str
    fields: tuple[str, ...]
    source: str | None = None


class AccessRequest(NamedTuple):
    """Arguments of one `PolicyEngine.decide` call, for `decide_many`."""

    subject: str
    obj: str
    action: str
    domain: str | None = None


def parse_policy_text(
    text: str, source: str, *, max_lines: int = MAX_POLICY_LINES
) -> list[PolicyLine]:
    """Split a Casbin CSV policy into lines the way pycasbin's file adapter does.

    Fields are separated by commas outside brackets and parentheses and stripped; there is
    no quoting. Blank lines and lines starting with `#` are skipped. `source` (a file name)
    and the 1-based line number become each line's `source`. A field longer than
    MAX_FIELD_CHARS, or more than `max_lines` policy lines (what is left of
    MAX_POLICY_LINES after earlier files), raise `PolicyError` naming the line.
    """
    lines: list[PolicyLine] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        if len(lines) >= max_lines:
            raise PolicyError(
                f"{where}: the policy files hold more than {MAX_POLICY_LINES:,} rule and "
                "role lines in all"
            )
        if "\x00" in line:
            # A field holding NUL can never equal a request value (paths refuse NUL).
            raise PolicyError(f"{where}: a NUL character in a policy line")
        tokens = _split_fields(line, where)
        if len(tokens) < 2 or not tokens[0]:
            raise PolicyError(f"{where}: expected `type, field, ...`, got {line!r}")
        if len(line) > MAX_FIELD_CHARS:
            _check_field_lengths(tokens, where)
        lines.append(PolicyLine(tokens[0], tuple(tokens[1:]), where))
    return lines


def _check_field_lengths(tokens: Sequence[str], where: str) -> None:
    for position, token in enumerate(tokens):
        if len(token) > MAX_FIELD_CHARS:
            what = "the type" if position == 0 else f"field {position}"
            raise PolicyError(
                f"{where}: {what} is {len(token):,} characters long, more than the "
                f"{MAX_FIELD_CHARS:,} allowed"
            )


def _split_fields(line: str, where: str) -> list[str]:
    if "(" not in line and "[" not in line and ")" not in line and "]" not in line:
        return [token.strip() for token in line.split(",")]
    depth = 0
    start = 0
    tokens: list[str] = []
    for found in _NESTING.finditer(line):
        char = found.group()
        if char in "[(":
            depth += 1
        elif char in "])":
            if depth == 0:
                raise PolicyError(f"{where}: unbalanced {char!r} in {line!r}")
            depth -= 1
        elif depth == 0:
            tokens.append(line[start : found.start()].strip())
            start = found.end()
    tokens.append(line[start:].strip())
    return tokens


class _LinesAdapter(Adapter):  # type: ignore[misc]  # casbin is untyped
    """Hands already parsed and checked lines to a pycasbin model."""

    def __init__(self, lines: Sequence[PolicyLine]) -> None:
        self._lines = lines

    def load_policy(self, model: Any) -> None:
        for line in self._lines:
            model.model[line.ptype[0]][line.ptype].policy.append(list(line.fields))


class PolicyEngine:
    """Decides requests against one version of the model and policy; immutable once built."""

    def __init__(
        self,
        model_text: str,
        lines: Iterable[PolicyLine],
        *,
        model_source: str = "<model>",
    ) -> None:
        """Parse, check and compile; raise `PolicyError` naming file and line on any fault."""
        shape = parse_model(model_text, model_source)
        self._shape = shape
        self._lines = list(lines)
        if len(self._lines) > MAX_POLICY_LINES:
            raise PolicyError(
                f"{self._lines[MAX_POLICY_LINES].source or '<policy>'}: more than "
                f"{MAX_POLICY_LINES:,} rule and role lines"
            )
        self._check_lines(shape)
        self._requires_domain, order = _request_layout(shape, model_source)
        self._request_fields = itemgetter(*order)
        self._rules = [line for line in self._lines if line.ptype == "p"]
        self._decisions: dict[tuple[bool, int], Decision] = {}
        self._compiled: CompiledPolicy | None = None
        self._enforcer: Any = None
        self.fallback_reason: str | None = shape.unsupported
        if shape.unsupported is None:
            groupings: dict[str, list[Sequence[str]]] = {}
            for line in self._lines:
                if line.ptype in shape.role_types:
                    groupings.setdefault(line.ptype, []).append(line.fields)
            self._compiled = self._compile(shape, groupings)
        else:
            self._enforcer = _build_enforcer(shape, self._lines, model_source)
        self._sources: dict[tuple[str, ...], str | None] = {}
        for rule in reversed(self._rules):
            self._sources[rule.fields] = rule.source

    @classmethod
    def from_text(
        cls,
        model_text: str,
        policy_text: str,
        *,
        model_source: str = "<model>",
        policy_source: str = "<policy>",
    ) -> PolicyEngine:
        """Build from the contents of a model file and a CSV policy file."""
        return cls(
            model_text, parse_policy_text(policy_text, policy_source), model_source=model_source
        )

    @property
    def mode(self) -> Mode:
        """`compiled` when the fast path decides, `casbin` when a pycasbin enforcer does."""
        return "compiled" if self._compiled is not None else "casbin"

    @property
    def requires_domain(self) -> bool:
        """True when the model's request has a domain field: `decide` then needs `domain`."""
        return self._requires_domain

    @property
    def rule_count(self) -> int:
        """Number of `p` lines."""
        return len(self._rules)

    def decide(self, subject: str, obj: str, action: str, domain: str | None = None) -> Decision:
        """Allow or deny `subject` doing `action` on `obj` (in `domain`), and why."""
        if (domain is None) == self._requires_domain:
            return Decision(False, DOMAIN_MISSING if domain is None else DOMAIN_UNEXPECTED)
        request = self._request_fields((subject, obj, action, domain or ""))
        if self._compiled is None:
            return self._enforce(request)
        try:
            match = self._compiled.match(request)
        # A pattern compiled on first use (a glob) may still fail; deny rather than raise,
        # and never treat a failed deny rule as "not matched".
        except Exception as exc:  # noqa: BLE001
            return Decision(False, f"policy evaluation failed, deny: {type(exc).__name__}: {exc}")
        return self._decision(match.allowed, match.rule_index)

    def warm(self) -> None:
        """Compile every pattern left for first use, so no request pays for it.

        For a reloader to call off the hot path, before swapping the new engine in. Raises
        `PolicyError` naming the line of a glob that cannot be compiled at all.
        """
        if self._compiled is None:
            return
        try:
            self._compiled.warm()
        except PatternError as exc:
            raise PolicyError(f"{self._rule_source(exc.rule_index)}: {exc}") from exc

    def _rule_source(self, rule_index: int | None) -> str:
        if rule_index is None:
            return "<policy>"
        return self._rules[rule_index].source or "<policy>"

    def decide_many(
        self,
        requests: Iterable[AccessRequest | tuple[str, str, str] | tuple[str, str, str, str | None]],
    ) -> list[Decision]:
        """`decide` for each request, in order (role closures are shared between them)."""
        return [self.decide(*request) for request in requests]

    def _decision(self, allowed: bool, rule_index: int | None) -> Decision:
        if rule_index is None:
            return Decision(allowed, DEFAULT_ALLOW if allowed else DEFAULT_DENY)
        if rule_index == -1:
            return Decision(True, EMPTY_POLICY_ALLOW)
        key = (allowed, rule_index)
        decision = self._decisions.get(key)
        if decision is None:
            line = self._rules[rule_index]
            reason = MATCHED_ALLOW if allowed else MATCHED_DENY
            decision = self._decisions[key] = Decision(allowed, reason, line.fields, line.source)
        return decision

    def _enforce(self, request: tuple[str, ...]) -> Decision:
        try:
            allowed, explained = self._enforcer.enforce_ex(*request)
        # pycasbin raises whatever its matcher functions raise (re.error, TypeError, ...);
        # the promise is to deny, not to fail the request.
        except Exception as exc:  # noqa: BLE001
            return Decision(False, f"policy evaluation failed, deny: {type(exc).__name__}: {exc}")
        rule = tuple(str(field) for field in explained) if explained else None
        if allowed:
            if rule is None:
                reason = EMPTY_POLICY_ALLOW if not self._rules else DEFAULT_ALLOW
                return Decision(True, reason)
            return Decision(True, MATCHED_ALLOW, rule, self._sources.get(rule))
        effect_index = self._shape.effect_index
        if (
            rule is not None
            and effect_index is not None
            and self._shape.effect != "allow-override"
            and rule[effect_index] == "deny"
        ):
            return Decision(False, MATCHED_DENY, rule, self._sources.get(rule))
        return Decision(False, DEFAULT_DENY)

    def _check_lines(self, shape: Shape) -> None:
        model = shape.model
        expected: dict[str, tuple[int, str]] = {}  # type -> (field count, field names)
        effect_columns: dict[str, int] = {}  # policy type -> index of its eft field
        for policy_type, assertion in model["p"].items():
            names = [token.split("_", 1)[1] for token in assertion.tokens]
            expected[policy_type] = (len(assertion.tokens), ", ".join(names))
            if "eft" in names:
                effect_columns[policy_type] = names.index("eft")
        for role_type, count in shape.role_types.items():
            expected[role_type] = (count, model["g"][role_type].value)
        for line in self._lines:
            known = expected.get(line.ptype)
            if known is None:
                raise PolicyError(
                    f"{line.source or '<policy>'}: policy type {line.ptype!r} "
                    "is not defined in the model"
                )
            if len(line.fields) != known[0]:
                raise PolicyError(
                    f"{line.source or '<policy>'}: {line.ptype} line has {len(line.fields)} "
                    f"fields, the model defines {known[0]} ({known[1]})"
                )
            effect_index = effect_columns.get(line.ptype)
            if effect_index is not None and line.fields[effect_index] not in EFFECT_VALUES:
                raise PolicyError(_effect_message(line, line.fields[effect_index]))

    def _compile(self, shape: Shape, groupings: dict[str, list[Sequence[str]]]) -> CompiledPolicy:
        try:
            return CompiledPolicy(shape, [rule.fields for rule in self._rules], groupings)
        except PatternError as exc:
            raise PolicyError(f"{self._rule_source(exc.rule_index)}: {exc}") from exc


def _effect_message(line: PolicyLine, effect: str) -> str:
    hint = ""
    if effect.strip().lower() in EFFECT_VALUES:
        hint = f" (write {effect.strip().lower()!r}: effects are lowercase)"
    return (
        f"{line.source or '<policy>'}: effect {effect!r} is neither 'allow' nor 'deny'{hint}; "
        "pycasbin would ignore this rule"
    )


def _request_layout(shape: Shape, source: str) -> tuple[bool, tuple[int, ...]]:
    """Whether requests need a domain, and where each request field comes from in
    `(subject, obj, action, domain)`: by name, or by position for other names."""
    fields = shape.request_fields
    if set(fields) <= set(_REQUEST_FIELDS) and {"sub", "obj", "act"} <= set(fields):
        return "dom" in fields, tuple(_REQUEST_FIELDS.index(name) for name in fields)
    if len(fields) == 3:
        return False, (0, 1, 2)
    if len(fields) == 4:
        return True, (0, 3, 1, 2)
    raise PolicyError(
        f"{source}: [request_definition] must be `sub, obj, act` or `sub, dom, obj, act`, "
        f"got {', '.join(fields)}"
    )


def _build_enforcer(shape: Shape, lines: Sequence[PolicyLine], source: str) -> Any:
    try:
        return casbin.Enforcer(shape.model, _LinesAdapter(lines))
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise PolicyError(f"{source}: pycasbin rejects the model or policy: {exc}") from exc
