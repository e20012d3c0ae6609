"""Casbin's matching functions, compiled once per policy value.

pycasbin rebuilds and recompiles a pattern (keyMatch2's regex, a glob) for every rule on
every request. Here each policy value is turned once, when the policy is loaded, into
either a literal (the function reduces to string equality, so the rule can be found in a
dict) or a predicate over the request value; a pattern that could be invalid is compiled
right away so a bad policy fails at load, one that surely compiles (and every glob, which
wcmatch is slow to compile) on first use or `warm()`. The results are exactly those of
`casbin.util.builtin_operators` in pycasbin 2.8, including its quirks: keyMatch2 and
regexMatch patterns are regular expressions, so `.` in a keyMatch2 path matches any
character and `$` also matches before a final newline; regexMatch is anchored at the start
only (`re.match`), never at the end. A regular expression that may backtrack
catastrophically (see `backtracking.py`) is refused like an invalid one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import wcmatch.glob as wcglob

from proxy.authz.backtracking import backtracking_risk

Predicate = Callable[[str], bool]

# Same expression pycasbin uses to turn `:name` segments into `[^/]+`.
_KEY_MATCH2_PARAM: Final = re.compile(r"(.*?):[^\/]+(.*?)")
# Characters with a meaning in a Python regular expression: a keyMatch2 pattern without
# any of them (and without `:` or `*`) is a plain string comparison.
_REGEX_SPECIAL: Final = frozenset(".^$*+?{}[]\\|()")
_GLOB_FLAGS: Final = wcglob.GLOBSTAR | wcglob.BRACE


class PatternError(ValueError):
    """A policy value is not a valid pattern for the matching function that reads it."""

    rule_index: int | None = None  # set by the compiler: which rule holds the value


@dataclass(frozen=True, slots=True)
class Literal:
    """The function reduces to equality with `value` for this policy value."""

    value: str


@dataclass(frozen=True, slots=True)
class Pattern:
    """The function needs `test(request_value)` for this policy value.

    Every request value the test accepts starts with `anchor` (a prefix ending in `/`, or
    ""), so a rule can be filed under its anchor and skipped for other values.
    """

    test: Predicate
    anchor: str = ""


Compiled = Literal | Pattern


def _always(_value: str) -> bool:
    return True


def compile_equal(policy_value: str) -> Compiled:
    """`r.x == p.x`."""
    return Literal(policy_value)


def compile_equal_or_constant(policy_value: str, constant: str) -> Compiled:
    """`r.x == p.x || p.x == "<constant>"`: the constant is a wildcard."""
    if policy_value == constant:
        return Pattern(_always)
    return Literal(policy_value)


def compile_key_match(policy_value: str) -> Compiled:
    """keyMatch: everything up to the first `*` is a prefix, the rest is ignored."""
    star = policy_value.find("*")
    if star == -1:
        return Literal(policy_value)
    prefix = policy_value[:star]
    # pycasbin compares key1[:i] with key2[:i] when key1 is longer and key1 with key2[:i]
    # otherwise; both together say exactly "key1 starts with the prefix".
    return Pattern(lambda key: key.startswith(prefix), _cut_after_slash(prefix))


def key_match2_regex(policy_value: str) -> str:
    """The regular expression pycasbin's keyMatch2 builds from a policy value."""
    expression = policy_value.replace("/*", "/.*")
    expression = _KEY_MATCH2_PARAM.sub(r"\g<1>[^\/]+\g<2>", expression, 0)
    if expression == "*":
        expression = "(.*)"
    return "^" + expression + "$"


def is_key_match2_literal(policy_value: str) -> bool:
    """True when keyMatch2 with this value matches only the value itself (see `literal_keys`)."""
    return ":" not in policy_value and not _REGEX_SPECIAL.intersection(policy_value)


def compile_key_match2(policy_value: str) -> Compiled:
    """keyMatch2: `:name` matches one segment, `/*` anything, the rest is a regex."""
    if is_key_match2_literal(policy_value):
        return Literal(policy_value)
    expression = key_match2_regex(policy_value)
    anchor = regex_anchor(expression)
    if _key_match2_always_compiles(policy_value):
        return Pattern(LazyRegex(expression), anchor)
    return Pattern(_regex_predicate(expression, policy_value), anchor)


def compile_regex_match(policy_value: str) -> Compiled:
    """regexMatch: `re.match`, so anchored at the start of the request value only."""
    anchor = regex_anchor(policy_value)
    if not _QUANTIFIERS_AND_GROUPS.intersection(policy_value):
        return Pattern(LazyRegex(policy_value), anchor)
    return Pattern(_regex_predicate(policy_value, policy_value), anchor)


def regex_anchor(expression: str) -> str:
    """A prefix of every string `re.match(expression, ...)` accepts, cut after a `/`.

    The expression's leading characters up to the first special one match only
    themselves; a quantifier after them makes the last one optional, and any `|` may
    offer an alternative without that prefix, so those cases give less or nothing.
    """
    if "|" in expression:
        return ""
    body = expression[1:] if expression.startswith("^") else expression
    end = 0
    while end < len(body) and body[end] not in _REGEX_SPECIAL:
        end += 1
    literal = body[:end]
    if end < len(body) and body[end] in "*+?{":
        literal = literal[:-1]
    return _cut_after_slash(literal)


def _cut_after_slash(prefix: str) -> str:
    return prefix[: prefix.rfind("/") + 1]


# Without these characters a pattern is a valid regex whatever else it holds (`.`, `^`,
# `$` and `|` are valid anywhere), so its compilation can wait until first use.
_QUANTIFIERS_AND_GROUPS: Final = frozenset("()[]{}\\*+?")


def _key_match2_always_compiles(policy_value: str) -> bool:
    """keyMatch2's regex for this value surely compiles: `:name` becomes `[^/]+`, and every
    `*` is a `/*` (which becomes `/.*`) not followed by another `*`."""
    if _QUANTIFIERS_AND_GROUPS.difference("*").intersection(policy_value):
        return False
    star = policy_value.find("*")
    while star != -1:
        if star == 0 or policy_value[star - 1] != "/" or policy_value[star + 1 : star + 2] == "*":
            return False
        star = policy_value.find("*", star + 1)
    return True


class LazyRegex:
    """`re.match(expression, key)`, compiling the expression on first use (or `warm`).

    Compiling costs about 30 µs, so compiling 10,000 rules up front would take most of the
    reload budget; only expressions known to compile are deferred (see callers).
    """

    __slots__ = ("_expression", "_match")

    def __init__(self, expression: str) -> None:
        self._expression = expression
        self._match: Callable[[str], re.Match[str] | None] | None = None

    def warm(self) -> None:
        if self._match is None:
            self._match = re.compile(self._expression).match

    def __call__(self, key: str) -> bool:
        if self._match is None:
            self.warm()
            assert self._match is not None
        return self._match(key) is not None


def _regex_predicate(expression: str, policy_value: str) -> Predicate:
    try:
        compiled = re.compile(expression)
    except (re.error, RecursionError, OverflowError) as exc:
        raise PatternError(f"{policy_value!r} is not a valid regular expression: {exc}") from exc
    # Matched against client-chosen values on the event loop: a pattern that can take
    # exponential (`(a+)+$`) or high polynomial time is refused like an invalid one.
    risk = backtracking_risk(expression)
    if risk is not None:
        raise PatternError(f"{policy_value!r} may backtrack catastrophically: {risk}")
    match = compiled.match
    return lambda key: match(key) is not None


def glob_pattern(policy_value: str) -> str:
    """The pattern pycasbin's globMatch hands to wcmatch for this policy value."""
    pattern = policy_value[1:] if policy_value.startswith("*/") else policy_value
    parts = []
    for part in pattern.split("/"):
        parts.append(part if part == "**" else re.sub(r"\*{2,}", "*", part))
    pattern = "/".join(parts)
    if pattern.endswith("/**"):
        pattern = "{" + pattern[:-3] + "," + pattern + "}"
    return pattern


def compile_glob_match(policy_value: str) -> Compiled:
    """globMatch: wcmatch with GLOBSTAR and BRACE, as pycasbin calls it.

    wcmatch compiles a glob in about 150 µs, too slow to do for every rule of a large policy
    at reload, so each pattern is compiled on first use (or `warm`) and kept.
    """
    return Pattern(LazyGlob(glob_pattern(policy_value)))


# Compiled globs outlive a policy version: a reload recompiles only the patterns that are
# new, so editing one line of a 10,000-rule policy does not pay 10,000 compilations again.
# Bounded; entries are plain functions of the pattern text, so sharing them is safe.
_GLOB_CACHE: dict[str, Callable[[str], bool]] = {}
_GLOB_CACHE_MAX: Final = 200_000


def _glob_regex_match(pattern: str) -> Callable[[str], bool]:
    """wcmatch's own translation of the glob, matched with `re` directly.

    For a string (not a real file system path) wcmatch's `match` is exactly "some include
    regex fullmatches and no exclude regex does"; calling the regexes ourselves skips its
    per-call object construction (about 2 us a match, ten times the regex itself).
    """
    include, exclude = wcglob.translate(pattern, flags=_GLOB_FLAGS)
    if exclude:
        return wcglob.compile(pattern, flags=_GLOB_FLAGS).match
    regexes = tuple(re.compile(expression).fullmatch for expression in include)
    if len(regexes) == 1:
        (only,) = regexes
        return lambda key: only(key) is not None
    return lambda key: any(regex(key) is not None for regex in regexes)


def _compiled_glob(pattern: str) -> Callable[[str], bool]:
    match = _GLOB_CACHE.get(pattern)
    if match is None:
        match = _glob_regex_match(pattern)
        if len(_GLOB_CACHE) >= _GLOB_CACHE_MAX:
            _GLOB_CACHE.clear()
        _GLOB_CACHE[pattern] = match
    return match


class LazyGlob:
    """wcmatch's `globmatch(key, pattern)`, compiling the pattern on first use (or `warm`)."""

    __slots__ = ("_match", "_pattern")

    def __init__(self, pattern: str) -> None:
        self._pattern = pattern
        self._match: Callable[[str], bool] | None = None

    def warm(self) -> None:
        if self._match is None:
            self._match = _compiled_glob(self._pattern)

    def __call__(self, key: str) -> bool:
        if self._match is None:
            self.warm()
            assert self._match is not None
        return bool(self._match(key))


def literal_keys(function: str, request_value: str) -> tuple[str, ...]:
    """The literal policy values that `function` would accept for `request_value`.

    For keyMatch2 a literal pattern is the regex `^value$`, and `$` also matches just before
    a trailing newline, so `"/a\\n"` is accepted by the literal `"/a"`: pycasbin does so too.
    """
    if function == "keyMatch2" and request_value.endswith("\n"):
        return (request_value, request_value[:-1])
    return (request_value,)


PATTERN_FUNCTIONS: Final[dict[str, Callable[[str], Compiled]]] = {
    "keyMatch": compile_key_match,
    "keyMatch2": compile_key_match2,
    "regexMatch": compile_regex_match,
    "globMatch": compile_glob_match,
}
