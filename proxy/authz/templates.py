"""Path and resource templates: parsing, matching, rendering, and how two templates relate.

Path template syntax: a template starts with "/", segments are split on "/"; a segment is
a literal, or at most one ``{name}`` with an optional literal prefix and suffix
(``{table}.json``); the last segment may be the catch-all ``{name:path}``. A placeholder
matches one or more characters of one segment; the catch-all matches everything after its
slash, slashes included and possibly nothing. Case-insensitive templates compare their
(ASCII) literals with the Unicode case folding of the request segment.

Resource templates (``dataset:{db}.{table}``) render placeholder values with "%" and the
first character of the separator that follows each placeholder percent-encoded, so two
different value tuples never render the same resource.

`overlap`, `contains` and `intersection` answer the questions the route table asks when it
orders routes most specific first (see `proxy.authz.routes`): can two templates match the
same path, does one match every path the other does, and which paths do both match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from proxy.authz.paths import fold_case, folds_ambiguously

__all__ = [
    "MAX_TEMPLATE_LENGTH",
    "LiteralSegment",
    "PathTemplate",
    "PlaceholderSegment",
    "ResourceTemplate",
    "Segment",
    "contains",
    "intersection",
    "overlap",
]

MAX_TEMPLATE_LENGTH: Final = 1024

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SEGMENT_PLACEHOLDER = re.compile(
    rf"(?P<prefix>[^{{}}]*)\{{(?P<name>{_NAME})(?::(?P<kind>[^{{}}]*))?\}}(?P<suffix>[^{{}}]*)"
)
_RESOURCE_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_IDENTIFIER = re.compile(_NAME)
# Characters a template literal may not hold: they never survive path normalization.
_FORBIDDEN_LITERAL_CHARS = frozenset("%\\#?{}")


# -- path templates -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiteralSegment:
    text: str


@dataclass(frozen=True, slots=True)
class PlaceholderSegment:
    name: str
    prefix: str
    suffix: str


Segment: TypeAlias = LiteralSegment | PlaceholderSegment


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled path template; `match` takes the segments of a `NormalizedPath`."""

    text: str
    segments: tuple[Segment, ...]
    catch_all: str | None
    case_insensitive: bool
    names: tuple[str, ...]
    # Precomputed for `match`: literal checks first (cheap, most selective), then captures.
    _literals: tuple[tuple[int, str], ...] = field(repr=False, compare=False)
    _captures: tuple[tuple[int, str, str, str], ...] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str, *, case_insensitive: bool = False) -> PathTemplate:
        """Compile a template, or raise ValueError saying what is wrong with it."""
        if not text.startswith("/"):
            raise ValueError(f"path template {text!r} must start with '/'")
        if len(text) > MAX_TEMPLATE_LENGTH:
            raise ValueError(f"path template longer than {MAX_TEMPLATE_LENGTH} characters")
        parts = text[1:].split("/")
        segments: list[Segment] = []
        catch_all: str | None = None
        names: list[str] = []
        for index, part in enumerate(parts):
            is_last = index == len(parts) - 1
            if part == "" and not is_last:
                raise ValueError(f"path template {text!r} has an empty segment ('//')")
            if "{" not in part and "}" not in part:
                _check_literal(part, text, case_insensitive=case_insensitive)
                segments.append(LiteralSegment(part))
                continue
            found = _SEGMENT_PLACEHOLDER.fullmatch(part)
            if found is None:
                raise ValueError(
                    f"segment {part!r} of {text!r}: use one {{name}} per segment, "
                    "with name made of letters, digits and '_'"
                )
            name, kind = found["name"], found["kind"]
            if name in names:
                raise ValueError(f"placeholder {{{name}}} appears twice in {text!r}")
            names.append(name)
            if kind is None:
                prefix, suffix = found["prefix"], found["suffix"]
                _check_literal(prefix, text, case_insensitive=case_insensitive, part=True)
                _check_literal(suffix, text, case_insensitive=case_insensitive, part=True)
                segments.append(PlaceholderSegment(name, prefix, suffix))
            elif kind != "path":
                raise ValueError(f"unknown placeholder type {kind!r} in {text!r} (only 'path')")
            elif not is_last or found["prefix"] or found["suffix"]:
                raise ValueError(
                    f"catch-all {{{name}:path}} must be the whole last segment of {text!r}"
                )
            else:
                catch_all = name
        literals = tuple(
            (i, fold_case(s.text) if case_insensitive else s.text)
            for i, s in enumerate(segments)
            if isinstance(s, LiteralSegment)
        )
        captures = tuple(
            (i, s.name, fold_case(s.prefix), fold_case(s.suffix))
            if case_insensitive
            else (i, s.name, s.prefix, s.suffix)
            for i, s in enumerate(segments)
            if isinstance(s, PlaceholderSegment)
        )
        return cls(
            text=text,
            segments=tuple(segments),
            catch_all=catch_all,
            case_insensitive=case_insensitive,
            names=tuple(names),
            _literals=literals,
            _captures=captures,
        )

    def match(self, path_segments: Sequence[str]) -> dict[str, str] | None:
        """The placeholder values if the segments match this template, else None."""
        fixed = len(self.segments)
        if self.catch_all is None:
            if len(path_segments) != fixed:
                return None
        elif len(path_segments) <= fixed:
            return None
        folding = self.case_insensitive
        for index, text in self._literals:
            segment = path_segments[index]
            if (fold_case(segment) if folding else segment) != text:
                return None
        params: dict[str, str] = {}
        for index, name, prefix, suffix in self._captures:
            segment = path_segments[index]
            if not prefix and not suffix:
                if not segment:
                    return None
                params[name] = segment
                continue
            end = len(segment) - len(suffix)
            # Values are never empty, so the prefix and suffix may not overlap either.
            if end <= len(prefix):
                return None
            if folding:
                # Compare equally long pieces: a fold that changes length never matches.
                head, tail = segment[: len(prefix)], segment[end:]
                if fold_case(head) != prefix or fold_case(tail) != suffix:
                    return None
            elif not (segment.startswith(prefix) and segment.endswith(suffix)):
                return None
            params[name] = segment[len(prefix) : end]
        if self.catch_all is not None:
            params[self.catch_all] = "/".join(path_segments[fixed:])
        return params


def _check_literal(text: str, template: str, *, case_insensitive: bool, part: bool = False) -> None:
    if not part and text in (".", ".."):
        raise ValueError(f"path template {template!r} has a dot-segment")
    bad = sorted(c for c in set(text) if c in _FORBIDDEN_LITERAL_CHARS or not c.isprintable())
    if bad:
        raise ValueError(
            f"path template {template!r} contains {''.join(bad)!r}; "
            "write templates decoded, without '%', '\\', '#', '?' or control characters"
        )
    if case_insensitive and not text.isascii():
        raise ValueError(f"case-insensitive template {template!r} must have ASCII literals")
    if not text.isascii() and folds_ambiguously(text, whole_segment=not part):
        # normalize_path refuses every request path holding it: the route could never match.
        raise ValueError(
            f"path template {template!r} has {text!r}, which folds (NFKC) to dots, '/', '\\', "
            "'?', '#' or '%'; request paths holding it are refused"
        )


# -- resource templates ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResourceTemplate:
    """A compiled resource template such as ``dataset:{db}.{table}``."""

    text: str
    # Alternating literal text and placeholder names: parts[0], parts[2]... are literals.
    parts: tuple[str, ...]
    # Per placeholder: "%" and the first character of the separator that follows it.
    _escapes: tuple[_Escapes, ...] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str, names: Iterable[str]) -> ResourceTemplate:
        """Compile against the placeholder names the path template defines."""
        known = set(names)
        if not text:
            raise ValueError("resource template is empty")
        pieces = _RESOURCE_PLACEHOLDER.split(text)
        literals, placeholders = pieces[0::2], pieces[1::2]
        for literal in literals:
            if "{" in literal or "}" in literal:
                raise ValueError(f"unbalanced '{{' or '}}' in resource template {text!r}")
            if any(not c.isprintable() for c in literal):
                raise ValueError(f"control character in resource template {text!r}")
        for name in placeholders:
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"invalid placeholder {{{name}}} in resource template {text!r}")
            if name not in known:
                raise ValueError(
                    f"resource template {text!r} uses {{{name}}}, "
                    "which the path template does not define"
                )
        if any(literal == "" for literal in literals[1:-1]):
            # "{a}{b}" could split one rendered resource in more than one way.
            raise ValueError(f"placeholders must be separated by text in {text!r}")
        # Only the separator after a value can end it early, and "%" must be escaped for
        # the escaping itself to be reversible; the fixed prefix and suffix are stripped by
        # position, so the last value needs nothing else.
        escapes = tuple(
            _escape_table("%" + literals[i + 1][:1] if i + 1 < len(placeholders) else "%")
            for i in range(len(placeholders))
        )
        return cls(text=text, parts=tuple(pieces), _escapes=escapes)

    def render(self, params: Mapping[str, str]) -> str:
        """The resource for these placeholder values (escaped so rendering stays injective)."""
        parts = self.parts
        out = [parts[0]]
        for i, escapes in enumerate(self._escapes):
            value = params[parts[2 * i + 1]]
            if any(c in value for c in escapes.chars):
                value = value.translate(escapes.table)
            out.append(value)
            out.append(parts[2 * i + 2])
        return "".join(out)


@dataclass(frozen=True, slots=True)
class _Escapes:
    chars: str
    table: dict[int, str]


def _escape_table(chars: str) -> _Escapes:
    return _Escapes(chars, {ord(c): "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in chars})


# -- how two templates relate ---------------------------------------------------------------


def intersection(a: PathTemplate, b: PathTemplate) -> PathTemplate | None:
    """The paths both templates match, as a template; None when no template says it exactly."""
    if a.case_insensitive or b.case_insensitive:
        return None
    if a.catch_all is not None and (b.catch_all is None or len(b.segments) > len(a.segments)):
        a, b = b, a
    segments: list[Segment] = []
    for x, y in zip(a.segments, b.segments, strict=False):
        if _segment_contains(x, False, y, False):
            segments.append(y)
        elif _segment_contains(y, False, x, False):
            segments.append(x)
        else:
            # Disjoint, or two placeholders whose overlap ("a{x}" and "{y}b") no template
            # spells exactly.
            return None
    segments.extend(a.segments[len(segments) :])
    return PathTemplate(
        text="",
        segments=tuple(segments),
        catch_all=a.catch_all,
        case_insensitive=False,
        names=(),
        _literals=(),
        _captures=(),
    )


def _same(x: str, y: str, folding: bool) -> bool:
    return fold_case(x) == fold_case(y) if folding else x == y


def _starts(text: str, prefix: str, folding: bool) -> bool:
    return fold_case(text).startswith(fold_case(prefix)) if folding else text.startswith(prefix)


def _ends(text: str, suffix: str, folding: bool) -> bool:
    return fold_case(text).endswith(fold_case(suffix)) if folding else text.endswith(suffix)


def _segment_overlap(a: Segment, b: Segment, folding: bool) -> str | None:
    """A segment both match, or None when no segment matches both."""
    if isinstance(a, LiteralSegment) and isinstance(b, LiteralSegment):
        return a.text if _same(a.text, b.text, folding) else None
    if isinstance(a, PlaceholderSegment) and isinstance(b, PlaceholderSegment):
        prefixes = sorted((a.prefix, b.prefix), key=len)
        suffixes = sorted((a.suffix, b.suffix), key=len)
        if _starts(prefixes[1], prefixes[0], folding) and _ends(suffixes[1], suffixes[0], folding):
            return f"{prefixes[1]}x{suffixes[1]}"
        return None
    if isinstance(a, LiteralSegment) and isinstance(b, PlaceholderSegment):
        return a.text if _literal_fits(a.text, b, folding) else None
    if isinstance(a, PlaceholderSegment) and isinstance(b, LiteralSegment):
        return b.text if _literal_fits(b.text, a, folding) else None
    return None


def _literal_fits(text: str, pattern: PlaceholderSegment, folding: bool) -> bool:
    end = len(text) - len(pattern.suffix)
    return (
        end > len(pattern.prefix)
        and _same(text[: len(pattern.prefix)], pattern.prefix, folding)
        and _same(text[end:], pattern.suffix, folding)
    )


def _covers(outer: str, outer_folds: bool, inner: str, inner_folds: bool) -> bool:
    """Every string the literal `inner` accepts is accepted by the literal `outer`."""
    if outer_folds:
        return fold_case(inner) == fold_case(outer)
    if inner_folds:
        # A folding literal accepts every casing; an exact one accepts only itself.
        return inner == outer and not any(c.isalpha() for c in inner)
    return inner == outer


def _segment_contains(outer: Segment, outer_folds: bool, inner: Segment, inner_folds: bool) -> bool:
    """Every segment `inner` matches, `outer` matches too."""
    if isinstance(outer, LiteralSegment):
        return isinstance(inner, LiteralSegment) and _covers(
            outer.text, outer_folds, inner.text, inner_folds
        )
    if isinstance(inner, LiteralSegment):
        end = len(inner.text) - len(outer.suffix)
        return (
            end > len(outer.prefix)
            and _covers(outer.prefix, outer_folds, inner.text[: len(outer.prefix)], inner_folds)
            and _covers(outer.suffix, outer_folds, inner.text[end:], inner_folds)
        )
    # Placeholder in placeholder: the outer's fixed text must sit inside the inner's.
    head = inner.prefix[: len(outer.prefix)]
    tail = inner.suffix[len(inner.suffix) - len(outer.suffix) :] if outer.suffix else ""
    return (
        len(inner.prefix) >= len(outer.prefix)
        and len(inner.suffix) >= len(outer.suffix)
        and _covers(outer.prefix, outer_folds, head, inner_folds)
        and _covers(outer.suffix, outer_folds, tail, inner_folds)
    )


def overlap(a: PathTemplate, b: PathTemplate) -> str | None:
    """A path both templates match (for error messages), or None if there is none."""
    if a.catch_all is not None and (b.catch_all is None or len(b.segments) > len(a.segments)):
        a, b = b, a
    # Now a is the fixed-length one, or both are catch-alls and a has more fixed segments.
    folding = a.case_insensitive or b.case_insensitive
    if a.catch_all is None and b.catch_all is None and len(a.segments) != len(b.segments):
        return None
    if b.catch_all is not None and len(a.segments) + (a.catch_all is not None) <= len(b.segments):
        return None
    witness: list[str] = []
    for x, y in zip(a.segments, b.segments, strict=False):
        shared = _segment_overlap(x, y, folding)
        if shared is None:
            return None
        witness.append(shared)
    for x in a.segments[len(b.segments) :]:
        witness.append(x.text if isinstance(x, LiteralSegment) else f"{x.prefix}x{x.suffix}")
    if a.catch_all is not None:
        witness.append("x")
    return "/" + "/".join(witness)


def contains(outer: PathTemplate, inner: PathTemplate) -> bool:
    """Every path `inner` matches, `outer` matches too."""
    fixed = len(outer.segments)
    if outer.catch_all is None:
        if inner.catch_all is not None or len(inner.segments) != fixed:
            return False
    else:
        inner_length = len(inner.segments) + (inner.catch_all is not None)
        if inner_length <= fixed:
            return False
    return all(
        _segment_contains(o, outer.case_insensitive, i, inner.case_insensitive)
        for o, i in zip(outer.segments, inner.segments, strict=False)
    )
