"""The compiled policy: pycasbin's decisions without scanning every rule.

pycasbin evaluates the matcher against each rule in turn. For the shapes `shape.py`
recognises, the matcher is a conjunction of per-field tests, so the rules that can match a
request are found through an index instead:

1. The role term `g(r.sub, p.sub[, r.dom])` becomes the set of names the subject reaches
   through grouping lines (itself included) within pycasbin's hierarchy limit, computed
   once per (subject, domain) and cached for the life of this policy. With the equality
   terms (`r.act == p.act`, `r.dom == p.dom`) it keys the first dict: one lookup per role.
2. Every other term except globMatch is a dict level below that. A rule whose policy
   value is a literal for the term's function (keyMatch without `*`, keyMatch2 without
   `:`/`*`/regex characters) sits under that value; a rule whose value is a pattern sits
   under the pattern's anchor, the literal prefix up to a `/` that every accepted value
   starts with (`/datasets/d7/tables/` for `/datasets/d7/tables/:table`), so a request
   only reaches the patterns anchored at prefixes of its own value.
3. Only the rules reached through the index are tested, with their patterns compiled once.

Each rule is reached through exactly one path, so a decision touches the rules of the
subject's roles that could match, never the whole policy. The effect (allow-override,
deny-override, allow-and-deny) is then applied to the matched rules the way pycasbin's
effectors do, and the deciding rule is the one pycasbin's `enforce_ex` explains for
allow-override and for a deny; for an allow under a deny effect, where pycasbin reports the
last rule it matched, this reports the last matching allow rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from proxy.authz.matching import (
    PATTERN_FUNCTIONS,
    Compiled,
    LazyGlob,
    LazyRegex,
    Literal,
    PatternError,
    Predicate,
    compile_equal,
    compile_equal_or_constant,
    literal_keys,
)
from proxy.authz.shape import EffectKind, FieldTerm, RoleTerm, Shape

# pycasbin's role managers are built with max_hierarchy_level=10: the subject itself is
# level one, so a role is inherited through at most 9 grouping links.
MAX_HIERARCHY_LEVEL: Final = 10
# Bound on cached role closures: subjects come from verified identities, but a flood of
# distinct ones must not grow memory without limit.
CLOSURE_CACHE_SIZE: Final = 65_536

ALLOW: Final = 1
DENY: Final = 2

Check = tuple[int, Predicate]  # (request field index, test of the request value)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One `p` line, ready to test: its position, effect and remaining pattern checks."""

    index: int
    effect: int
    checks: tuple[Check, ...]


class _Node:
    """One index level: literal policy values, and pattern anchors, to the next level.

    `children` holds the rules whose value at this level is a literal, under that value;
    `anchored` holds those whose value is a pattern, under the prefix every value the
    pattern accepts starts with ("" when there is none), and they keep the pattern check.
    """

    __slots__ = ("anchored", "children", "rules")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.anchored: dict[str, _Node] = {}
        self.rules: list[CompiledRule] = []


@dataclass(frozen=True, slots=True)
class Match:
    """Outcome of the effect: allowed, and the index of the deciding rule (-1: blank rule)."""

    allowed: bool
    rule_index: int | None


@dataclass(frozen=True, slots=True)
class _Level:
    request_index: int
    function: str  # a FieldTerm function


class RoleGraph:
    """Grouping lines of one role type: who inherits whom, per domain when it has one."""

    def __init__(self, with_domains: bool) -> None:
        self.with_domains = with_domains
        self._edges: dict[str, dict[str, list[str]]] = {}

    def add(self, fields: Sequence[str]) -> None:
        domain = fields[2] if self.with_domains else ""
        self._edges.setdefault(domain, {}).setdefault(fields[0], []).append(fields[1])

    def closure(self, name: str, domain: str) -> frozenset[str]:
        """Names `name` reaches within the hierarchy limit, `name` included.

        pycasbin's `_has_link` walks the graph level by level for at most 10 levels and
        tolerates cycles; a breadth-first search bounded to 9 links gives the same set.
        """
        edges = self._edges.get(domain if self.with_domains else "", {})
        reached = {name}
        frontier = [name]
        for _ in range(MAX_HIERARCHY_LEVEL - 1):
            following: list[str] = []
            for member in frontier:
                for role in edges.get(member, ()):
                    if role not in reached:
                        reached.add(role)
                        following.append(role)
            if not following:
                break
            frontier = following
        return frozenset(reached)


class CompiledPolicy:
    """An immutable index of one policy; `match` is pure apart from its closure cache."""

    def __init__(
        self,
        shape: Shape,
        rules: Sequence[Sequence[str]],
        groupings: dict[str, list[Sequence[str]]],
    ) -> None:
        """Compile `rules` (the `p` lines' fields); raises `PatternError` on a bad pattern.

        With no rules at all, pycasbin evaluates the matcher once against a rule whose
        fields are all empty and allows when it holds; that blank rule is compiled here as
        rule index -1 so the same lookup reproduces it.
        """
        self.effect: EffectKind = shape.effect
        self._role_term: RoleTerm | None = None
        self._graph: RoleGraph | None = None
        self._closures: dict[tuple[str, str], frozenset[str]] = {}
        field_terms: list[FieldTerm] = []
        for term in shape.terms:
            if isinstance(term, RoleTerm):
                self._role_term = term
                self._graph = RoleGraph(with_domains=shape.role_types[term.role_type] >= 3)
                for fields in groupings.get(term.role_type, ()):
                    self._graph.add(fields)
            else:
                field_terms.append(term)
        # Index levels after the role: cheap exact terms first, then the pattern terms a
        # prefix can narrow; globs are only ever checks. A conjunction's order does not
        # change its value, so this order is free to choose.
        field_terms.sort(key=lambda term: _LEVEL_ORDER.get(term.function, len(_LEVEL_ORDER)))
        # The role and the equality terms together make the first level's key: one dict
        # lookup per role the subject holds, whatever the number of equality terms.
        exact_terms = [term for term in field_terms if term.function == "=="]
        field_terms = [term for term in field_terms if term.function != "=="]
        self._exact_policy = tuple(term.policy_index for term in exact_terms)
        self._exact_request = tuple(term.request_index for term in exact_terms)
        self._entries: dict[tuple[str, ...], _Node] = {}
        self._field_terms = tuple(field_terms)
        self._compilers = tuple(_compiler(term) for term in field_terms)
        self._indexed = tuple(term.function in _LEVEL_ORDER for term in field_terms)
        self._levels = tuple(
            _Level(term.request_index, term.function)
            for term, indexed in zip(field_terms, self._indexed, strict=True)
            if indexed
        )
        self._anchor_lengths: list[set[int]] = [set() for _ in self._levels]

        effect_index = shape.effect_index
        self.rule_count = len(rules)
        if rules:
            for index, fields in enumerate(rules):
                effect = _effect_of(fields, effect_index)
                if effect is None or (effect == DENY and self.effect == "allow-override"):
                    continue  # pycasbin's effector ignores it for this effect
                self._insert(index, effect, fields)
        else:
            self._insert(-1, ALLOW, [""] * len(shape.policy_fields))
        self._level_anchors = tuple(tuple(sorted(lengths)) for lengths in self._anchor_lengths)

    def _insert(self, index: int, effect: int, fields: Sequence[str]) -> None:
        key = tuple(fields[i] for i in self._exact_policy)
        if self._role_term is not None:
            key = (fields[self._role_term.policy_index], *key)
        node = _child(self._entries, key)
        checks: list[Check] = []
        level = 0
        for term, compile_value, indexed in zip(
            self._field_terms, self._compilers, self._indexed, strict=True
        ):
            try:
                compiled = compile_value(fields[term.policy_index])
            except PatternError as exc:
                exc.rule_index = index if index >= 0 else None
                raise
            if isinstance(compiled, Literal):
                # Only index-level terms produce literals (see `_LEVEL_ORDER`).
                node = _child(node.children, compiled.value)
            else:
                if indexed:
                    node = _child(node.anchored, compiled.anchor)
                    if compiled.anchor:
                        self._anchor_lengths[level].add(len(compiled.anchor))
                checks.append((term.request_index, compiled.test))
            level += indexed
        node.rules.append(CompiledRule(index, effect, tuple(checks)))

    def warm(self) -> None:
        """Compile the patterns left for first use (see `matching.LazyRegex`).

        Raises `PatternError` (with `rule_index`) for a glob wcmatch refuses, such as one
        whose braces expand past wcmatch's limit; a request reaching it would be denied.
        """
        pending = list(self._entries.values())
        while pending:
            node = pending.pop()
            pending.extend(node.children.values())
            pending.extend(node.anchored.values())
            for rule in node.rules:
                for _, test in rule.checks:
                    if not isinstance(test, LazyRegex | LazyGlob):
                        continue
                    # wcmatch's errors share no base class below Exception.
                    try:
                        test.warm()
                    except Exception as exc:
                        error = PatternError(f"pattern cannot be compiled: {exc}")
                        error.rule_index = rule.index if rule.index >= 0 else None
                        raise error from exc

    def role_closure(self, name: str, domain: str) -> frozenset[str]:
        """The names `name` holds (cached); only meaningful when the matcher has a role term."""
        key = (name, domain)
        closure = self._closures.get(key)
        if closure is None:
            assert self._graph is not None
            closure = self._graph.closure(name, domain)
            if len(self._closures) >= CLOSURE_CACHE_SIZE:
                self._closures.clear()
            self._closures[key] = closure
        return closure

    def match(self, request: Sequence[str]) -> Match:
        """Apply the policy to one request, its fields in request-definition order."""
        exact = tuple([request[i] for i in self._exact_request])
        entries = self._entries
        term = self._role_term
        nodes: list[_Node]
        if term is None:
            entry = entries.get(exact)
            nodes = [] if entry is None else [entry]
        else:
            domain = request[term.domain_index] if term.domain_index is not None else ""
            closure = self.role_closure(request[term.request_index], domain)
            nodes = []
            for role in closure:
                entry = entries.get((role, *exact))
                if entry is not None:
                    nodes.append(entry)
        if not nodes:
            return self._apply(None, None, None)
        for level, anchor_lengths in zip(self._levels, self._level_anchors, strict=True):
            value = request[level.request_index]
            literals = literal_keys(level.function, value)
            # The prefixes of the value that some pattern at this level is anchored to.
            anchors = [""]
            anchors.extend(
                value[:length]
                for length in anchor_lengths
                if length <= len(value) and value[length - 1] == "/"
            )
            following = []
            for node in nodes:
                children = node.children
                for key in literals:
                    child = children.get(key)
                    if child is not None:
                        following.append(child)
                if node.anchored:
                    anchored = node.anchored
                    for key in anchors:
                        child = anchored.get(key)
                        if child is not None:
                            following.append(child)
            nodes = following

        first_allow: int | None = None
        last_allow: int | None = None
        first_deny: int | None = None
        for node in nodes:
            for rule in node.rules:
                for field, test in rule.checks:
                    if not test(request[field]):
                        break
                else:
                    index = rule.index
                    if rule.effect == ALLOW:
                        if first_allow is None or index < first_allow:
                            first_allow = index
                        if last_allow is None or index > last_allow:
                            last_allow = index
                    elif first_deny is None or index < first_deny:
                        first_deny = index
        return self._apply(first_allow, last_allow, first_deny)

    def _apply(
        self, first_allow: int | None, last_allow: int | None, first_deny: int | None
    ) -> Match:
        """pycasbin's effectors over the matched rules; None means "none matched"."""
        if self.effect == "allow-override":
            return Match(first_allow is not None, first_allow)
        if first_deny is not None:
            return Match(False, first_deny)
        if self.effect == "deny-override":
            return Match(True, last_allow)
        return Match(last_allow is not None, last_allow)


_Key = TypeVar("_Key", str, tuple[str, ...])

# Terms that index levels are made of, in the order levels are built.
_LEVEL_ORDER: Final = {"==": 0, "==|const": 1, "keyMatch": 2, "keyMatch2": 3, "regexMatch": 4}


def _child(children: dict[_Key, _Node], key: _Key) -> _Node:
    child = children.get(key)
    if child is None:
        child = children[key] = _Node()
    return child


def _effect_of(fields: Sequence[str], effect_index: int | None) -> int | None:
    """A rule's effect as pycasbin reads it: no eft column means allow; other values count
    as matched but decide nothing, so they are left out of the index (the engine refuses
    such lines at load, so this only keeps pycasbin's reading for direct callers)."""
    if effect_index is None:
        return ALLOW
    return {"allow": ALLOW, "deny": DENY}.get(fields[effect_index])


def _compiler(term: FieldTerm) -> Callable[[str], Compiled]:
    if term.function == "==":
        return compile_equal
    if term.function == "==|const":
        constant = term.constant
        return lambda value: compile_equal_or_constant(value, constant)
    return PATTERN_FUNCTIONS[term.function]
