"""Refuse regular expressions that Python's backtracking matcher can take forever on.

A policy author's regexMatch (or keyMatch2) pattern is matched against request values the
client chooses, on the event loop. `re` backtracks: `dataset:sales\\.(a+)+$` takes seconds
on a 26-character path and doubles with each character more. `backtracking_risk` reads a
pattern with Python's own parser (`re._parser`, what `re.compile` uses, so the tree is the
one that will run) and names the first construct of three known shapes:

1. Nested repetition: a repeat that may run more than once (`*`, `+`, `{2,}`, `{3}`) whose
   body contains an unbounded repeat: `(a+)+`, `(a*)*`, `(\\d+\\.){3}`. Exponential, or
   polynomial of high degree for a bounded outer count.
2. Ambiguous alternation in a repeat: branches of one alternation inside such a repeat that
   can begin with the same character (or match the empty string): `(a|a)*`, `(a|ab)+`.
3. Three or more unbounded repeats in one sequence that can all match the same text, only
   characters each of them accepts in between: `.*a.*a.*b` (cubic and worse; two, like
   `/.*/.*`, are allowed: quadratic at most).

The check is conservative where it cannot see (character classes with categories or more
than 256 characters, backreferences and case folding are read as "any character"), so it
may refuse a pattern that is in fact safe; it is not a proof of linear time. Ambiguity that
only arises across alternatives spread over several groups, or lookarounds, are not
analysed.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["backtracking_risk"]

# Untyped in typeshed; both are what `re.compile` itself uses in Python 3.11.
_parser: Any = importlib.import_module("re._parser")
_constants: Any = importlib.import_module("re._constants")

_MAXREPEAT: Final = _constants.MAXREPEAT
_REPEATS: Final = frozenset(
    {_constants.MAX_REPEAT, _constants.MIN_REPEAT, _constants.POSSESSIVE_REPEAT}
)
_ZERO_WIDTH: Final = frozenset({_constants.AT, _constants.ASSERT, _constants.ASSERT_NOT})
_SMALL_SET: Final = 256
_CHAIN_LIMIT: Final = 3
_CATEGORIES: Final[dict[Any, Callable[[str], object]]] = {
    _constants.CATEGORY_DIGIT: re.compile(r"\d").match,
    _constants.CATEGORY_NOT_DIGIT: re.compile(r"\D").match,
    _constants.CATEGORY_SPACE: re.compile(r"\s").match,
    _constants.CATEGORY_NOT_SPACE: re.compile(r"\S").match,
    _constants.CATEGORY_WORD: re.compile(r"\w").match,
    _constants.CATEGORY_NOT_WORD: re.compile(r"\W").match,
}


@dataclass(frozen=True)
class _Chars:
    """The characters a node accepts: a membership test, and the code points themselves
    when there are few enough to list (None: too many to list)."""

    test: Callable[[str], bool]
    points: frozenset[int] | None = None
    everything: bool = False


def _anything(_char: str) -> bool:
    return True


_ANY: Final = _Chars(_anything, None, everything=True)


# A reload re-checks every regex of the policy; most are unchanged since the last one.
@functools.lru_cache(maxsize=65_536)
def backtracking_risk(expression: str) -> str | None:
    """Why `expression` may backtrack catastrophically, or None when no known shape is found.

    An expression `re` cannot parse gives None: compiling it reports the real error.
    """
    # Every shape above needs two repeats, or a repeat and an alternation: a pattern with
    # at most one quantifier character and no `|` has none of them, and most policy
    # patterns (`^dataset:sales\\.[a-z_]+$`) are of that kind. Escaped or `(?` uses only
    # over-count, which sends a pattern to the full check.
    if "|" not in expression and sum(map(expression.count, "*+?{")) <= 1:
        return None
    try:
        parsed = _parser.parse(expression)
    except (_constants.error, RecursionError, OverflowError, ValueError):
        return None
    # A scoped `(?i:...)` is the only other way to fold case; walk for it only then.
    fold = bool(parsed.state.flags & _constants.SRE_FLAG_IGNORECASE) or (
        "(?" in expression
        and any(
            op is _constants.SUBPATTERN and av[1] & _constants.SRE_FLAG_IGNORECASE
            for op, av in _walk(parsed)
        )
    )
    try:
        return _Checker(fold).sequence(parsed)
    except RecursionError:
        return "the expression is nested too deeply to check"


def _children(op: Any, av: Any) -> Iterator[Any]:
    """The sub-patterns directly below one node of the parsed tree."""
    if op in _REPEATS:
        yield av[2]
    elif op is _constants.SUBPATTERN:
        yield av[3]
    elif op is _constants.BRANCH:
        yield from av[1]
    elif op is _constants.ATOMIC_GROUP:
        yield av
    elif op in (_constants.ASSERT, _constants.ASSERT_NOT):
        yield av[1]
    elif op is _constants.GROUPREF_EXISTS:
        yield from (branch for branch in av[1:] if branch is not None)


def _walk(pattern: Any) -> Iterator[tuple[Any, Any]]:
    for op, av in pattern.data:
        yield op, av
        for child in _children(op, av):
            yield from _walk(child)


def _has_unbounded_repeat(pattern: Any) -> bool:
    return any(op in _REPEATS and av[1] == _MAXREPEAT for op, av in _walk(pattern))


def _overlap(a: _Chars, b: _Chars) -> bool:
    """Whether some character is in both (True when that cannot be told cheaply)."""
    if a.points is not None:
        return any(b.test(chr(point)) for point in a.points)
    if b.points is not None:
        return any(a.test(chr(point)) for point in b.points)
    return True


def _within(inner: _Chars, outer: _Chars) -> bool:
    """Whether every character of `inner` is in `outer` (False when that cannot be told)."""
    if outer.everything:
        return True
    return inner.points is not None and all(outer.test(chr(point)) for point in inner.points)


def _intersect(a: _Chars, b: _Chars) -> _Chars:
    if a.everything:
        return b
    if b.everything:
        return a
    if a.points is not None:
        return _Chars(b.test, frozenset(p for p in a.points if b.test(chr(p))))
    if b.points is not None:
        return _Chars(a.test, frozenset(p for p in b.points if a.test(chr(p))))
    return _Chars(lambda char: a.test(char) and b.test(char))


def _union(sets: Sequence[_Chars]) -> _Chars:
    if any(chars.everything for chars in sets):
        return _ANY
    if any(chars.points is None for chars in sets):
        tests = [chars.test for chars in sets]
        return _Chars(lambda char: any(test(char) for test in tests))
    listed: set[int] = set()
    for chars in sets:
        listed |= chars.points or frozenset()
    points = frozenset(listed)
    return _Chars(lambda char: ord(char) in points, points)


class _Checker:
    def __init__(self, fold: bool) -> None:
        self.fold = fold

    def sequence(self, pattern: Any) -> str | None:
        """Check one sequence of nodes and everything below it."""
        chain = 0  # unbounded repeats of one character so far that can match the same text
        shared = _ANY  # characters every repeat of the chain accepts
        for op, av in pattern.data:
            if op in _REPEATS and av[1] > 1:
                found = self._repeated_body(av[2], av[1])
                if found is not None:
                    return found
            for child in _children(op, av):
                found = self.sequence(child)
                if found is not None:
                    return found
            if op in _ZERO_WIDTH:
                continue
            if op in _REPEATS and av[1] == _MAXREPEAT:
                single, chars = self._single(av[2])
                if not single:
                    chain = 0
                elif chain and _overlap(chars, shared):
                    shared = _intersect(shared, chars)
                    chain += 1
                else:
                    shared, chain = chars, 1
                if chain >= _CHAIN_LIMIT:
                    return (
                        f"{_CHAIN_LIMIT} or more unbounded repeats in a row can match "
                        "the same text (polynomial backtracking)"
                    )
                continue
            # Between repeats of a chain, characters every one of them accepts keep it going:
            # in `.*a.*` each `.*` can take the `a` too.
            if chain:
                single, chars = self._node(op, av)
                if not (single and _within(chars, shared)):
                    chain = 0
        return None

    def _repeated_body(self, body: Any, high: int) -> str | None:
        shown = "unbounded" if high == _MAXREPEAT else f"up to {high} times"
        if _has_unbounded_repeat(body):
            return f"nested repetition: a repeat ({shown}) of a body with an unbounded repeat"
        if self._first(body)[1]:
            # `(a?){28}` tries every way of leaving iterations empty: 2^28 paths.
            return f"a repeat ({shown}) of a body that can match the empty string"
        for op, av in _walk(body):
            if op is not _constants.BRANCH:
                continue
            starts = [self._first(branch) for branch in av[1]]
            for index, (first, empty) in enumerate(starts):
                for other, other_empty in starts[index + 1 :]:
                    if empty or other_empty or _overlap(first, other):
                        return f"alternatives that can start alike inside a repeat ({shown})"
        return None

    def _single(self, body: Any) -> tuple[bool, _Chars]:
        """Whether a repeat body matches exactly one character, and which ones."""
        items = body.data
        if len(items) != 1:
            return False, _ANY
        op, av = items[0]
        if op is _constants.SUBPATTERN:
            return self._single(av[3])
        return self._node(op, av)

    def _node(self, op: Any, av: Any) -> tuple[bool, _Chars]:
        """Whether a node matches exactly one character, and which ones."""
        if op is _constants.LITERAL:
            return True, self._listed({av})
        if op is _constants.ANY:
            return True, _ANY
        if op is _constants.NOT_LITERAL:  # `[^/]`
            excluded = self._listed({av}).points or frozenset()
            return True, _Chars(lambda char: ord(char) not in excluded)
        if op is not _constants.IN:
            return False, _ANY
        points: set[int] = set()
        tests: list[Callable[[str], object]] = []
        negate = False
        for item_op, item_av in av:
            if item_op is _constants.LITERAL:
                points.add(item_av)
            elif item_op is _constants.RANGE and item_av[1] - item_av[0] < _SMALL_SET:
                points.update(range(item_av[0], item_av[1] + 1))
            elif item_op is _constants.RANGE:
                tests.append(_in_range(item_av[0], item_av[1]))
            elif item_op is _constants.CATEGORY and item_av in _CATEGORIES:
                tests.append(_CATEGORIES[item_av])
            elif item_op is _constants.NEGATE:
                negate = True
            else:
                return True, _ANY
        if not tests and not negate:
            return True, self._listed(points)
        listed = frozenset(points)
        fold = self.fold

        def member(char: str) -> bool:
            variants = (char, char.lower(), char.upper()) if fold else (char,)
            found = any(
                ord(c) in listed or any(test(c) for test in tests) for c in variants if len(c) == 1
            )
            return found != negate

        return True, _Chars(member)

    def _listed(self, points: set[int]) -> _Chars:
        if self.fold:
            for point in list(points):
                char = chr(point)
                points.update(ord(c) for c in (char.lower(), char.upper()) if len(c) == 1)
        listed = frozenset(points)
        return _Chars(lambda char: ord(char) in listed, listed)

    def _first(self, pattern: Any) -> tuple[_Chars, bool]:
        """Characters a match of `pattern` can begin with, and whether it can be empty."""
        starts: list[_Chars] = []
        for op, av in pattern.data:
            if op in _ZERO_WIDTH:
                continue
            if op in _REPEATS:
                first, empty = self._first(av[2])
                starts.append(first)
                if av[0] == 0 or empty:
                    continue
                return _union(starts), False
            if op is _constants.SUBPATTERN:
                first, empty = self._first(av[3])
            elif op is _constants.ATOMIC_GROUP:
                first, empty = self._first(av)
            elif op is _constants.BRANCH:
                firsts = [self._first(branch) for branch in av[1]]
                first = _union([f for f, _ in firsts])
                empty = any(e for _, e in firsts)
            else:
                # Anything but a single character (a backreference, say) may start with any,
                # and a backreference may be empty.
                first = self._node(op, av)[1]
                empty = op is _constants.GROUPREF or op is _constants.GROUPREF_EXISTS
            starts.append(first)
            if not empty:
                return _union(starts), False
        return _union(starts), True


def _in_range(low: int, high: int) -> Callable[[str], bool]:
    return lambda char: low <= ord(char) <= high
