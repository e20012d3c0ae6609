"""Route table: maps a method and a normalized path to the (resource, action) policies speak of.

A route file lists routes such as ``GET /{db}/{table}.json -> dataset:{db}.{table}, read``.
`load_route_file` / `parse_route_file` compile it once into a `RouteTable`; `RouteTable.match`
then costs a dictionary lookup and a few segment comparisons per candidate, no regex and
nothing compiled per request. An unmatched request gets ``None``: the caller denies it.

Templates (syntax, matching, resource rendering) are `proxy.authz.templates`. In a route,
a placeholder never matches a "/" unless the route sets `allow_encoded_slash`, the catch-all
``/admin/{rest:path}`` matches ``/admin/`` and ``/admin/a/b`` but not ``/admin``, and a
trailing "/" in a template is significant, like in a normalized path.

Which route wins: route A is *more specific* than route B when every path A matches is also
matched by B, and not the other way round (the rule of Go's ServeMux). So a literal segment
beats a placeholder there (``/db/-/query`` beats ``/{db}/{table}``), ``{table}.json`` beats
``{table}``, a placeholder beats the catch-all. Two routes for a common method that can both
match some path while neither is more specific are rejected when the file is loaded, with an
example path, unless a third route that is more specific than both matches all of their
overlap (``/a/b`` settles ``/a/{x}`` versus ``/{y}/b``). So the table never has to guess,
and a broad public route can never silently swallow a write endpoint
(``/public/{rest:path}`` versus ``/{db}/-/insert``).

Case-insensitive routes own every casing of their literals (``/admin`` also owns
``/ADMIN``, and a Kelvin sign folds onto "k"); placeholder values keep the request's case.
Resources render so that two different value tuples never give the same resource
(``dataset:{db}.{table}`` with db ``a.b`` and table ``c`` is ``dataset:a%2Eb.c``).
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal, TypeAlias, cast
from urllib.parse import unquote_plus

import msgspec
import yaml

from proxy.authz.paths import (
    STRICT,
    NormalizedPath,
    PathOptions,
    PathRejected,
    fold_case,
    normalize_path,
)
from proxy.authz.templates import (
    LiteralSegment,
    PathTemplate,
    ResourceTemplate,
    contains,
    intersection,
    overlap,
)

__all__ = [
    "MAX_ROUTES",
    "MAX_ROUTE_FILE_BYTES",
    "PathTemplate",
    "RawPathPolicy",
    "ResourceTemplate",
    "Route",
    "RouteError",
    "RouteMatch",
    "RouteTable",
    "SourceLocation",
    "SqlSource",
    "load_route_file",
    "parse_route_file",
]

MAX_ROUTE_FILE_BYTES: Final = 1024 * 1024
MAX_ROUTES: Final = 1000
ROUTE_FILE_VERSION: Final = 1

RawPathPolicy: TypeAlias = Literal["keyMatch", "keyMatch2", "globMatch"]
_RAW_PATH_POLICIES: Final = ("keyMatch", "keyMatch2", "globMatch")

_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIALECT = re.compile(r"[a-z][a-z0-9_]*")


class RouteError(ValueError):
    """A route file or route set is invalid; the message is one line ``file:line: reason``."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = " ".join(reason.split())
        super().__init__(f"{source}:{line}: {self.reason}")


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """Where a route was declared."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class SqlSource:
    """Where a route's request carries SQL (for lineage derivation later in the pipeline).

    With `tables`, the SQL is also authorized table by table before forwarding: each table
    it reads needs `read`, each it writes `write`, on the resource `tables` renders (the
    route's placeholders plus `{table}`). Only SQL in the query can be checked that way.
    """

    location: Literal["query", "body"]
    param: str
    dialect: str = "sqlite"
    tables: ResourceTemplate | None = None


# -- routes and the table -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route. `methods` None means any method."""

    name: str
    methods: frozenset[str] | None
    template: PathTemplate
    action: str
    location: SourceLocation
    # None only when `raw_path_policy` is set: policies then match the normalized path.
    resource: ResourceTemplate | None = None
    raw_path_policy: RawPathPolicy | None = None
    # Reachable without authentication (the authn layer reads this).
    public: bool = False
    sql: SqlSource | None = None
    allow_encoded_slash: bool = False
    allow_path_params: bool = False
    # The upstream undoes Datasette's tilde encoding in path segments (`~73` is `s`, `+` a
    # space): placeholders are decoded the same way, so the resource names what it serves.
    tilde_decode: bool = False

    @property
    def case_insensitive(self) -> bool:
        return self.template.case_insensitive

    def describe(self) -> str:
        """How error messages and audit lines name the route."""
        return f"{self.name!r} ({self.location})"


class RouteMatch(msgspec.Struct, frozen=True):
    """What a request maps to. For raw-path routes `resource` is the normalized path."""

    route: Route
    resource: str
    action: str
    params: Mapping[str, str]
    path: NormalizedPath


@dataclass(frozen=True, slots=True)
class _Bucket:
    """The routes that can match paths of one segment count, most specific first.

    Indexed by the literal at the one segment position that splits them best, so a table
    of many routes under one prefix (``/api/v1/...``) still tries only a few per request.
    """

    position: int
    by_literal: dict[str, tuple[Route, ...]]
    # Routes with no exact literal at `position`; also the answer for unknown literals.
    others: tuple[Route, ...]

    def candidates(self, segments: tuple[str, ...]) -> tuple[Route, ...]:
        if self.position < 0:
            return self.others
        return self.by_literal.get(segments[self.position], self.others)


@dataclass(frozen=True, slots=True)
class _MethodIndex:
    by_length: dict[int, _Bucket]
    # For paths longer than any key of by_length: catch-all routes only.
    longer: _Bucket

    def candidates(self, segments: tuple[str, ...]) -> tuple[Route, ...]:
        return self.by_length.get(len(segments), self.longer).candidates(segments)


class RouteTable:
    """An immutable, validated set of routes, indexed by method and segment count."""

    __slots__ = ("_any_method", "_by_method", "path_options", "routes")

    def __init__(self, routes: Iterable[Route], *, path_options: PathOptions = STRICT) -> None:
        """Validate and index; raise `RouteError` on duplicate or ambiguous routes."""
        self.routes: tuple[Route, ...] = tuple(routes)
        ordered = _most_specific_first(self.routes)
        # Normalization has to let through what any route opts in to; `match` then refuses
        # it for every route that did not.
        self.path_options: PathOptions = replace(
            path_options,
            allow_encoded_slash=path_options.allow_encoded_slash
            or any(r.allow_encoded_slash for r in self.routes),
            allow_path_params=path_options.allow_path_params
            or any(r.allow_path_params for r in self.routes),
        )
        methods = {m for r in self.routes if r.methods is not None for m in r.methods}
        self._by_method: dict[str, _MethodIndex] = {
            method: _index(r for r in ordered if r.methods is None or method in r.methods)
            for method in methods
        }
        self._any_method = _index(r for r in ordered if r.methods is None)

    def match(self, method: str, path: NormalizedPath) -> RouteMatch | None:
        """The most specific route for this request, or None (deny by default).

        Raises `PathRejected` when the path holds an encoded slash or ``;`` and the route it
        matches did not opt in to them. Methods compare case-sensitively (RFC 9110).
        """
        if path.is_asterisk:
            return None
        index = self._by_method.get(method, self._any_method)
        segments = path.segments
        for route in index.candidates(segments):
            params = route.template.match(segments)
            if params is None:
                continue
            if path.has_encoded_slash and not route.allow_encoded_slash:
                raise PathRejected(
                    f"encoded '/' or '\\' is not allowed on route {route.name!r}",
                    code="encoded_slash",
                )
            if path.has_path_params and not route.allow_path_params:
                raise PathRejected(
                    f"';' path parameters are not allowed on route {route.name!r}",
                    code="path_params",
                )
            names: Mapping[str, str] = (
                _tilde_decoded(params, route) if route.tilde_decode else params
            )
            resource = path.path if route.resource is None else route.resource.render(names)
            return RouteMatch(route, resource, route.action, names, path)
        return None

    def resolve(
        self, method: str, raw_target: bytes | str
    ) -> tuple[NormalizedPath, RouteMatch | None]:
        """Normalize the raw target with this table's options, then match it.

        Raises `PathRejected` (400) for targets that are refused.
        """
        path = normalize_path(raw_target, self.path_options)
        return path, self.match(method, path)


def tilde_decode(value: str) -> str:
    """A path segment as Datasette reads it: its `tilde_decode`, which turns `~` into `%`
    and then unquotes with `+` as a space, a literal `%` kept. So `~73ecret` is `secret`,
    `a+b` is `a b`, and a `~` without two hex digits after it reads as `%`.

    Raises ValueError when the decoded bytes are not UTF-8 (Datasette would put U+FFFD in
    the name; refusing is the safe reading of a name nobody can be allowed by)."""
    if "~" not in value and "+" not in value:
        return value
    # A literal "%" is never part of an escape: the pieces between them decode on their own
    # (Datasette protects them with a random token, to the same effect).
    try:
        pieces = [
            unquote_plus(piece.replace("~", "%"), errors="strict") for piece in value.split("%")
        ]
    except UnicodeDecodeError:
        raise ValueError("tilde-encoded bytes that are not UTF-8") from None
    return "%".join(pieces)


def _tilde_decoded(params: Mapping[str, str], route: Route) -> Mapping[str, str]:
    if not any("~" in value or "+" in value for value in params.values()):
        return params  # the common case, on every request: nothing to decode
    try:
        return {name: tilde_decode(value) for name, value in params.items()}
    except ValueError as exc:
        reason = f"{exc} in a path on route {route.name!r}"
        raise PathRejected(reason, code="tilde_encoding") from None


def _index(routes: Iterable[Route]) -> _MethodIndex:
    ordered = list(routes)
    lengths = {len(r.template.segments) + (r.template.catch_all is not None) for r in ordered}
    longest = max(lengths, default=0)
    by_length = {
        n: _bucket([r for r in ordered if _accepts_length(r.template, n)], n)
        for n in range(1, longest + 1)
    }
    longer = _bucket([r for r in ordered if r.template.catch_all is not None], longest + 1)
    return _MethodIndex(by_length, longer)


def _bucket(ordered: list[Route], length: int) -> _Bucket:
    best = _Bucket(-1, {}, tuple(ordered))
    best_cost = len(ordered)
    for position in range(length):
        keys = [_exact_literal_at(r.template, position) for r in ordered]
        others = tuple(r for r, key in zip(ordered, keys, strict=True) if key is None)
        # Filtering the ordered list keeps most-specific-first within every entry.
        by_literal = {
            literal: tuple(
                r for r, key in zip(ordered, keys, strict=True) if key in (None, literal)
            )
            for literal in {key for key in keys if key is not None}
        }
        cost = max([len(others), *(len(entry) for entry in by_literal.values())])
        if cost < best_cost:
            best, best_cost = _Bucket(position, by_literal, others), cost
    return best


def _exact_literal_at(template: PathTemplate, position: int) -> str | None:
    if template.case_insensitive or position >= len(template.segments):
        return None
    segment = template.segments[position]
    return segment.text if isinstance(segment, LiteralSegment) else None


def _accepts_length(template: PathTemplate, length: int) -> bool:
    fixed = len(template.segments)
    return length > fixed if template.catch_all is not None else length == fixed


# -- specificity: which template's paths contain which ---------------------------------------


def _most_specific_first(routes: Sequence[Route]) -> list[Route]:
    """Check every pair of routes that share a method; order more specific ones first.

    Raises `RouteError` for two routes that match the same paths, or that overlap with
    neither being more specific and no third route covering exactly their overlap.
    """
    before: dict[int, set[int]] = {i: set() for i in range(len(routes))}
    blockers = [0] * len(routes)
    unresolved: list[tuple[Route, Route, str]] = []
    for i, j in _candidate_pairs(routes):
        a, b = routes[i], routes[j]
        if not _share_method(a, b):
            continue
        witness = overlap(a.template, b.template)
        if witness is None:
            continue
        a_in_b = contains(b.template, a.template)
        b_in_a = contains(a.template, b.template)
        later, earlier = (a, b) if a.location.line >= b.location.line else (b, a)
        if a_in_b and b_in_a:
            raise RouteError(
                later.location.file,
                later.location.line,
                f"route {later.name!r} matches exactly the same requests as route "
                f"{earlier.describe()}",
            )
        if not a_in_b and not b_in_a:
            unresolved.append((later, earlier, witness))
            continue
        specific, general = (i, j) if a_in_b else (j, i)
        before[specific].add(general)
        blockers[general] += 1
    for later, earlier, witness in unresolved:
        if not any(_settles(c, later, earlier) for c in routes):
            raise RouteError(
                later.location.file,
                later.location.line,
                f"route {later.name!r} overlaps route {earlier.describe()}: both match "
                f"{witness} and neither is more specific; add a route for exactly the "
                "overlap or make the templates disjoint",
            )
    # Kahn's algorithm; ties keep file order so the result is stable.
    ready = [i for i, count in enumerate(blockers) if count == 0]
    heapq.heapify(ready)
    ordered: list[Route] = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(routes[i])
        for j in before[i]:
            blockers[j] -= 1
            if blockers[j] == 0:
                heapq.heappush(ready, j)
    return ordered


def _settles(judge: Route, a: Route, b: Route) -> bool:
    """`judge` is more specific than both `a` and `b` and matches all they share.

    Then it is ordered before both and takes every request they would both claim.
    """
    if judge is a or judge is b:
        return False
    shared = _shared_methods(a, b)
    if judge.methods is not None and (shared is None or not shared <= judge.methods):
        return False
    overlap = intersection(a.template, b.template)
    return (
        overlap is not None
        and contains(a.template, judge.template)
        and contains(b.template, judge.template)
        and contains(judge.template, overlap)
    )


def _shared_methods(a: Route, b: Route) -> frozenset[str] | None:
    if a.methods is None:
        return b.methods
    if b.methods is None:
        return a.methods
    return a.methods & b.methods


def _candidate_pairs(routes: Sequence[Route]) -> Iterable[tuple[int, int]]:
    """Every pair of routes that might overlap (a superset; `overlap` decides)."""
    # Fixed-length templates only overlap templates of their own length or catch-alls.
    by_length: dict[int, list[int]] = {}
    catch_alls: list[int] = []
    for i, route in enumerate(routes):
        if route.template.catch_all is None:
            by_length.setdefault(len(route.template.segments), []).append(i)
        else:
            catch_alls.append(i)
    for length, group in by_length.items():
        yield from _pairs_within(routes, group, length)
    fixed = [i for group in by_length.values() for i in group]
    for x, i in enumerate(catch_alls):
        for j in fixed + catch_alls[x + 1 :]:
            yield i, j


def _pairs_within(
    routes: Sequence[Route], group: list[int], length: int
) -> Iterable[tuple[int, int]]:
    # Two different literals at one position never overlap, so split the group on the
    # position with the most distinct literals (folded: case-insensitive ones may meet).
    def literal_at(i: int, position: int) -> str | None:
        segment = routes[i].template.segments[position]
        return fold_case(segment.text) if isinstance(segment, LiteralSegment) else None

    position = max(range(length), key=lambda p: len({literal_at(i, p) for i in group}))
    split: dict[str | None, list[int]] = {}
    for i in group:
        split.setdefault(literal_at(i, position), []).append(i)
    wildcards = split.pop(None, [])
    for part in [*split.values(), wildcards]:
        for x, i in enumerate(part):
            for j in part[x + 1 :]:
                yield i, j
    for part in split.values():
        for i in part:
            for j in wildcards:
                yield i, j


def _share_method(a: Route, b: Route) -> bool:
    return a.methods is None or b.methods is None or not a.methods.isdisjoint(b.methods)


# -- loading route files --------------------------------------------------------------------

_TOP_KEYS: Final = frozenset({"version", "routes", "tilde_decode"})
_ROUTE_KEYS: Final = frozenset(
    {
        "name",
        "methods",
        "path",
        "resource",
        "action",
        "public",
        "sql",
        "case_insensitive",
        "allow_encoded_slash",
        "allow_path_params",
        "raw_path_policy",
        "tilde_decode",
    }
)
_SQL_KEYS: Final = frozenset({"from", "param", "dialect", "tables"})
_STR_TAG: Final = "tag:yaml.org,2002:str"
_MAP_TAG: Final = "tag:yaml.org,2002:map"
_SEQ_TAG: Final = "tag:yaml.org,2002:seq"
_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_INT_TAG: Final = "tag:yaml.org,2002:int"


def load_route_file(
    path: str | os.PathLike[str],
    *,
    path_options: PathOptions = STRICT,
    max_bytes: int = MAX_ROUTE_FILE_BYTES,
) -> RouteTable:
    """Read and compile a route file; every problem is a one-line `RouteError`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise RouteError(source, 1, f"cannot read route file: {exc.strerror or exc}") from None
    return parse_route_file(data, source, path_options=path_options, max_bytes=max_bytes)


def parse_route_file(
    text: str | bytes,
    source: str = "<routes>",
    *,
    path_options: PathOptions = STRICT,
    max_bytes: int = MAX_ROUTE_FILE_BYTES,
) -> RouteTable:
    """Compile route-file text (pure: no IO). `source` names it in error messages."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise RouteError(source, 1, f"route file is larger than {max_bytes} bytes")
    if isinstance(text, bytes):
        try:
            document = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise RouteError(source, line, "route file is not valid UTF-8") from None
    else:
        document = text
    try:
        root = yaml.compose(document, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise RouteError(source, line, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RouteError(source, 1, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise RouteError(source, 1, "invalid YAML: nesting is too deep") from None
    if root is None:
        raise RouteError(source, 1, "route file is empty")
    return _RouteFileReader(source).table(root, path_options)


class _RouteFileReader:
    """Turns composed YAML nodes into routes, keeping line numbers for every error."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen: set[int] = set()
        # The file's default for routes that do not say (its top-level `tilde_decode`).
        self.tilde_decode = False

    def error(self, node: yaml.Node, reason: str) -> RouteError:
        return RouteError(self.source, node.start_mark.line + 1, reason)

    def visit(self, node: yaml.Node) -> yaml.Node:
        # An alias shows up as the same node twice; refusing it also rules out
        # exponential "billion laughs" documents.
        if id(node) in self.seen:
            raise self.error(node, "YAML anchors and aliases are not allowed in route files")
        self.seen.add(id(node))
        return node

    def mapping(self, node: yaml.Node, what: str, allowed: frozenset[str]) -> dict[str, yaml.Node]:
        if not isinstance(self.visit(node), yaml.MappingNode) or node.tag != _MAP_TAG:
            raise self.error(node, f"{what} must be a mapping")
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in cast(list[tuple[yaml.Node, yaml.Node]], node.value):
            key = self.string(key_node, f"a key in {what}")
            if key not in allowed:
                raise self.error(
                    key_node,
                    f"unknown key {key!r} in {what} (allowed: {', '.join(sorted(allowed))})",
                )
            if key in fields:
                raise self.error(key_node, f"duplicate key {key!r} in {what}")
            fields[key] = value_node
        return fields

    def scalar(self, node: yaml.Node, tag: str, what: str, kind: str) -> str:
        if not isinstance(self.visit(node), yaml.ScalarNode) or node.tag != tag:
            raise self.error(node, f"{what} must be {kind}")
        return cast(str, node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, _STR_TAG, what, "a string")
        if not value:
            raise self.error(node, f"{what} must not be empty")
        return value

    def boolean(self, node: yaml.Node, what: str) -> bool:
        return self.scalar(node, _BOOL_TAG, what, "true or false").lower() in ("true", "yes", "on")

    def table(self, root: yaml.Node, path_options: PathOptions) -> RouteTable:
        fields = self.mapping(root, "the route file", _TOP_KEYS)
        if "version" in fields:
            version_node = fields["version"]
            version = self.scalar(version_node, _INT_TAG, "version", "an integer")
            if version != str(ROUTE_FILE_VERSION):
                raise self.error(
                    version_node, f"unsupported route file version {version} (expected 1)"
                )
        if "tilde_decode" in fields:
            self.tilde_decode = self.boolean(fields["tilde_decode"], "tilde_decode")
        if "routes" not in fields:
            raise self.error(root, "the route file needs a 'routes' list")
        routes_node = self.visit(fields["routes"])
        if not isinstance(routes_node, yaml.SequenceNode) or routes_node.tag != _SEQ_TAG:
            raise self.error(routes_node, "'routes' must be a list")
        items = cast(list[yaml.Node], routes_node.value)
        if not items:
            raise self.error(routes_node, "'routes' is empty: every request would be denied")
        if len(items) > MAX_ROUTES:
            raise self.error(routes_node, f"more than {MAX_ROUTES} routes")
        routes = [self.route(item) for item in items]
        names: dict[str, Route] = {}
        for route in routes:
            if route.name in names:
                raise RouteError(
                    self.source,
                    route.location.line,
                    f"route name {route.name!r} is already used by route "
                    f"at {names[route.name].location}",
                )
            names[route.name] = route
        return RouteTable(routes, path_options=path_options)

    def route(self, node: yaml.Node) -> Route:
        fields = self.mapping(node, "a route", _ROUTE_KEYS)
        for required in ("methods", "path", "action"):
            if required not in fields:
                raise self.error(node, f"route is missing {required!r}")
        flags = {
            key: self.boolean(fields[key], key)
            for key in (
                "public",
                "case_insensitive",
                "allow_encoded_slash",
                "allow_path_params",
                "tilde_decode",
            )
            if key in fields
        }
        path_node = fields["path"]
        path_text = self.string(path_node, "path")
        if ";" in path_text and not flags.get("allow_path_params", False):
            raise self.error(path_node, "';' in a path template needs allow_path_params: true")
        try:
            template = PathTemplate.parse(
                path_text, case_insensitive=flags.get("case_insensitive", False)
            )
        except ValueError as exc:
            raise self.error(path_node, str(exc)) from None
        methods = self.methods(fields["methods"])
        resource: ResourceTemplate | None = None
        raw_path_policy: RawPathPolicy | None = None
        if "raw_path_policy" in fields:
            policy_node = fields["raw_path_policy"]
            policy = self.string(policy_node, "raw_path_policy")
            if policy not in _RAW_PATH_POLICIES:
                raise self.error(
                    policy_node, f"raw_path_policy must be one of {', '.join(_RAW_PATH_POLICIES)}"
                )
            raw_path_policy = cast(RawPathPolicy, policy)
            if "resource" in fields:
                raise self.error(
                    fields["resource"],
                    "a route has either 'resource' or 'raw_path_policy', not both",
                )
        elif "resource" not in fields:
            raise self.error(node, "route is missing 'resource' (or 'raw_path_policy')")
        else:
            resource_node = fields["resource"]
            try:
                resource = ResourceTemplate.parse(
                    self.string(resource_node, "resource"), template.names
                )
            except ValueError as exc:
                raise self.error(resource_node, str(exc)) from None
        action_node = fields["action"]
        action = self.string(action_node, "action")
        if any(c.isspace() or not c.isprintable() for c in action):
            raise self.error(action_node, "action must not contain spaces or control characters")
        location = SourceLocation(self.source, node.start_mark.line + 1)
        if "name" in fields:
            name = self.string(fields["name"], "name")
        else:
            name = f"{'*' if methods is None else ','.join(sorted(methods))} {path_text}"
        return Route(
            name=name,
            methods=methods,
            template=template,
            action=action,
            location=location,
            resource=resource,
            raw_path_policy=raw_path_policy,
            public=flags.get("public", False),
            sql=self.sql(fields["sql"], template.names) if "sql" in fields else None,
            allow_encoded_slash=flags.get("allow_encoded_slash", False),
            allow_path_params=flags.get("allow_path_params", False),
            tilde_decode=flags.get("tilde_decode", self.tilde_decode),
        )

    def methods(self, node: yaml.Node) -> frozenset[str] | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG and node.value == "*":
            self.visit(node)
            return None
        if (
            not isinstance(self.visit(node), yaml.SequenceNode)
            or node.tag != _SEQ_TAG
            or not node.value
        ):
            raise self.error(node, "methods must be a non-empty list of HTTP methods, or '*'")
        methods: set[str] = set()
        for item in cast(list[yaml.Node], node.value):
            method = self.string(item, "a method")
            if method == "*":
                raise self.error(item, "write methods: '*' (not inside a list) for any method")
            if not _METHOD.fullmatch(method):
                raise self.error(item, f"{method!r} is not an HTTP method")
            methods.add(method.upper())
        return frozenset(methods)

    def sql(self, node: yaml.Node, names: tuple[str, ...]) -> SqlSource:
        fields = self.mapping(node, "sql", _SQL_KEYS)
        for required in ("from", "param"):
            if required not in fields:
                raise self.error(node, f"sql is missing {required!r}")
        location = self.string(fields["from"], "sql.from")
        if location not in ("query", "body"):
            raise self.error(fields["from"], "sql.from must be 'query' or 'body'")
        dialect = "sqlite"
        if "dialect" in fields:
            dialect = self.string(fields["dialect"], "sql.dialect")
            if not _DIALECT.fullmatch(dialect):
                raise self.error(fields["dialect"], f"{dialect!r} is not a SQL dialect name")
        tables = None
        if "tables" in fields:
            if location != "query":
                raise self.error(
                    fields["tables"], "sql.tables needs sql.from: query (a body is read later)"
                )
            if "table" in names:
                raise self.error(fields["tables"], "sql.tables: the path already has {table}")
            try:
                tables = ResourceTemplate.parse(
                    self.string(fields["tables"], "sql.tables"), (*names, "table")
                )
            except ValueError as exc:
                raise self.error(fields["tables"], f"sql.tables: {exc}") from None
            if "{table}" not in tables.text:
                raise self.error(fields["tables"], "sql.tables must use {table}")
        return SqlSource(
            location=cast(Literal["query", "body"], location),
            param=self.string(fields["param"], "sql.param"),
            dialect=dialect,
            tables=tables,
        )
