"""The lineage API: an aiohttp application over the lineage store, filtered per caller.

It sits behind the proxy, which authenticates the caller, checks the route-level
permission (`lineage:read`, `lineage:write`) and forwards the request over a socket only it
can reach, naming the verified caller in two headers. This application trusts nothing
else: no identity header, no answer (401).

Promises:

* A dataset the caller may not `read` is never disclosed by name, namespace, facet or
  column. In a graph, each connected group of such datasets becomes ONE anonymous
  placeholder whose id is an HMAC under a key drawn for that response alone, so it is
  stable within the response and says nothing across responses. The edges between the
  caller's datasets and a placeholder are kept (they show that something is there); edges
  inside the group are dropped, and depths are hops in the graph as shown (a placeholder
  is one hop), so neither the group's size nor its shape shows. A path through a
  placeholder is therefore possible, not certain.
* Asking about a dataset the caller may not read answers exactly as asking about one that
  does not exist (404), and is answered before the store is asked.
* Tracking events needs `write` on every output dataset and `read` on every input and
  column-lineage source: an event may only claim reads its sender could have made.
* Bad input of any kind is a 4xx with a JSON body `{"error": code, "message": text}`.

Datasets map to policy resources by `dataset_resource`: `dataset:<name>`, the name the
proxy's route table gives the same dataset (`dataset:sales.orders`), so one policy line
governs both the data and its lineage. The namespace is not part of the resource: the same
name in two namespaces shares its permissions.

The decisions (identity from headers, parameter parsing, redaction) are plain functions
without IO; the handlers at the bottom do the IO around them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol, TypedDict, cast
from urllib.parse import unquote

import asyncpg
import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy, MultiMapping

from agent.derive.routes import DatasetRef
from agent.events import (
    MAX_EDGES_PER_EVENT,
    AccessEvent,
    ColumnLineageFacet,
    ColumnLineageField,
    DatasetFacets,
    InputDataset,
    InputField,
    Job,
    OutputDataset,
    Run,
    RunEvent,
    event_time_problem,
)
from agent.openapi import (
    MAX_ACCESS_LIMIT,
    MAX_EDGES_PER_TRACK,
    MAX_NAME_CHARS,
    AccessEventView,
    AccessPage,
    DatasetNode,
    ErrorBody,
    HiddenNode,
    LineageEdge,
    LineageGraphView,
    RunEventView,
    TrackedDataset,
    TrackedEvent,
    TrackRequest,
    TrackResult,
    UtcTime,
    openapi_document,
)
from agent.store.plan import screen
from agent.store.queries import MAX_DEPTH, MAX_NODES, Direction, Graph, LineageQueries
from agent.store.writer import StoreError, StoreWriter

__all__ = [
    "HIDDEN_NAMESPACE",
    "SERVER_SETTINGS",
    "ApiError",
    "AuthorizationUnavailable",
    "Authorizer",
    "Caller",
    "ServerSettings",
    "access_cursor",
    "caller_from_headers",
    "dataset_id",
    "dataset_resource",
    "lineage_api",
    "parse_dataset",
    "redact_graph",
    "redact_run_event",
    "to_run_event",
]

log = logging.getLogger(__name__)

READ = "read"
WRITE = "write"
HIDDEN_NAMESPACE = "urn:lineage-sidecar:hidden"
DATASET_ID_PREFIX = "ds_"
HIDDEN_ID_PREFIX = "hidden_"
DEFAULT_DEPTH = 3
DEFAULT_ACCESS_LIMIT = 100
MAX_PRINCIPAL_CHARS = 1024
MAX_ROLES = 256
# The longest dataset id of any names track accepts: base64 (unpadded) of the JSON pair of
# names, where msgspec writes at most 6 bytes a character (a control character as \u00XX).
_MAX_JSON_BYTES_PER_CHAR = 6
_MAX_PAIR_JSON_BYTES = 2 * _MAX_JSON_BYTES_PER_CHAR * MAX_NAME_CHARS + len('["",""]')
MAX_NODE_CHARS = len(DATASET_ID_PREFIX) + -(-4 * _MAX_PAIR_JSON_BYTES // 3)
# The longest request line a caller needs: a namespace and a name given as plain text,
# percent-encoded (up to 4 UTF-8 bytes a character, 3 characters a byte), or a dataset id,
# plus room for the method, the path and the other parameters.
_MAX_PERCENT_ENCODED_CHARS = 12
MAX_REQUEST_LINE_BYTES = (
    max(MAX_NODE_CHARS, 2 * _MAX_PERCENT_ENCODED_CHARS * MAX_NAME_CHARS + len("%3A")) + 4096
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SMALL_INT = re.compile(r"[0-9]{1,6}")
_JSON = "application/json"


# Pass to `web.AppRunner(app, **SERVER_SETTINGS)`: aiohttp refuses request lines over 8190
# bytes before the application sees them, with a plain-text 400; these limits let any
# dataset name or id within the track limits reach the handlers, which answer in JSON.
class ServerSettings(TypedDict):
    max_line_size: int
    max_field_size: int


SERVER_SETTINGS = ServerSettings(max_line_size=MAX_REQUEST_LINE_BYTES, max_field_size=16_384)


class Caller(msgspec.Struct, frozen=True):
    """The verified identity the proxy forwarded: principal id and roles."""

    id: str
    roles: tuple[str, ...]


class Authorizer(Protocol):
    """The policy decision for the caller; may raise `AuthorizationUnavailable`."""

    def allowed(self, caller: Caller, resource: str, action: str) -> bool: ...

    def allowed_many(self, caller: Caller, resources: Sequence[str], action: str) -> list[bool]: ...


class AuthorizationUnavailable(Exception):
    """The authorizer cannot decide now (policy not loaded): answered 503, fail closed."""


class ApiError(Exception):
    """A request the API refuses: HTTP status, stable error code, message for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def dataset_resource(namespace: str, name: str) -> str:
    """The policy resource of an OpenLineage dataset: `dataset:<name>` (see module doc)."""
    return f"dataset:{name}"


# --- identity ---------------------------------------------------------------------------


def _printable(value: str) -> bool:
    # Control characters (NUL, CR, LF, ...) and undecodable bytes (surrogate escapes) have
    # no place in an identity; refusing them keeps logs and policy lookups unambiguous.
    return value.isprintable() and _utf8(value)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def caller_from_headers(
    headers: CIMultiDictProxy[str], principal_header: str, roles_header: str
) -> Caller:
    """The caller the proxy vouched for, from its two headers and nothing else."""
    principals = headers.getall(principal_header, [])
    if not principals or not principals[0].strip():
        raise ApiError(401, "unauthenticated", "no verified identity reached the lineage API")
    if len(principals) > 1 or len(headers.getall(roles_header, [])) > 1:
        raise ApiError(400, "bad_identity", "identity headers appear more than once")
    # Percent-encoded by the proxy like the roles (`proxy.gate.header_value`): decoded,
    # it is the very principal the proxy decided on.
    try:
        principal = unquote(principals[0].strip(), errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_identity", "the principal is not percent-encoded UTF-8") from None
    if len(principal) > MAX_PRINCIPAL_CHARS or not _printable(principal):
        raise ApiError(400, "bad_identity", "the principal header is not a valid identity")
    roles: list[str] = []
    for raw in headers.get(roles_header, "").split(","):
        if not raw.strip():
            continue
        try:
            role = unquote(raw.strip(), errors="strict")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_identity", "a role is not percent-encoded UTF-8") from None
        if not _printable(role) or not _utf8(raw):
            raise ApiError(400, "bad_identity", "a role holds control characters")
        roles.append(role)
    if len(roles) > MAX_ROLES:
        raise ApiError(400, "bad_identity", f"more than {MAX_ROLES} roles")
    return Caller(id=principal, roles=tuple(roles))


# --- parameters -------------------------------------------------------------------------


def dataset_id(namespace: str, name: str) -> str:
    """The API's id of a dataset: its names, encoded so that no character needs quoting."""
    encoded = base64.urlsafe_b64encode(msgspec.json.encode((namespace, name)))
    return DATASET_ID_PREFIX + encoded.rstrip(b"=").decode("ascii")


def _check_name(value: str, what: str) -> str:
    if not value:
        raise ApiError(400, "invalid_node", f"the dataset {what} is empty")
    if len(value) > MAX_NAME_CHARS:
        raise ApiError(400, "invalid_node", f"the dataset {what} is over {MAX_NAME_CHARS} chars")
    if "\x00" in value or not _utf8(value):
        raise ApiError(400, "invalid_node", f"the dataset {what} holds NUL or invalid Unicode")
    return value


def parse_dataset(node: str, namespace: str | None = None) -> DatasetRef:
    """A dataset from a `node` parameter: a dataset id (`ds_...`), `<namespace>:<name>`
    split at the last colon, or a plain name when `namespace` is given."""
    if len(node) > MAX_NODE_CHARS:
        raise ApiError(400, "invalid_node", "the node parameter is too long")
    if namespace is not None:
        return DatasetRef(_check_name(namespace, "namespace"), _check_name(node, "name"))
    if node.startswith(DATASET_ID_PREFIX) and ":" not in node:
        encoded = node[len(DATASET_ID_PREFIX) :]
        try:
            raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), b"-_", validate=True)
            pair = msgspec.json.decode(raw, type=tuple[str, str])
        except (binascii.Error, ValueError, msgspec.DecodeError):
            raise ApiError(400, "invalid_node", "the node is not a valid dataset id") from None
        return DatasetRef(_check_name(pair[0], "namespace"), _check_name(pair[1], "name"))
    space, colon, name = node.rpartition(":")
    if not colon:
        raise ApiError(400, "invalid_node", "node must be a dataset id or <namespace>:<name>")
    return DatasetRef(_check_name(space, "namespace"), _check_name(name, "name"))


def _single_values(query: MultiMapping[str]) -> dict[str, str]:
    """The query parameters, each of which may be given once: `depth=1&depth=abc` or
    `node=a&node=c` is ambiguous, and answering for the first would hide that."""
    values: dict[str, str] = {}
    for name, value in query.items():
        if name in values:
            raise ApiError(400, f"invalid_{name}", f"the {name} parameter is given more than once")
        values[name] = value
    return values


def _small_int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not _SMALL_INT.fullmatch(value) or not low <= int(value) <= high:
        raise ApiError(400, f"invalid_{name}", f"{name} must be an integer from {low} to {high}")
    return int(value)


def _direction(value: str | None) -> Direction:
    if value is None:
        return "both"
    if value not in ("up", "down", "both"):
        raise ApiError(400, "invalid_direction", "direction must be up, down or both")
    return cast(Direction, value)


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        # In UTC: a time near the ends of the calendar with an offset has no UTC form,
        # and is refused here rather than by the database driver.
        return msgspec.convert(value, UtcTime).astimezone(UTC)
    except (msgspec.ValidationError, OverflowError):
        raise ApiError(
            400, f"invalid_{name}", f"{name} must be an RFC 3339 time with a zone"
        ) from None


def access_cursor(time: datetime, event_id: uuid.UUID) -> str:
    """The `next` token of an access page: the position of its last event, (time, id)."""
    encoded = base64.urlsafe_b64encode(msgspec.json.encode((time, event_id)))
    return encoded.rstrip(b"=").decode("ascii")


def _after(value: str | None) -> tuple[datetime, uuid.UUID] | None:
    if value is None:
        return None
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), b"-_", validate=True)
        time, event_id = msgspec.json.decode(raw, type=tuple[UtcTime, uuid.UUID])
        return time.astimezone(UTC), event_id
    except (binascii.Error, ValueError, OverflowError, msgspec.DecodeError):
        raise ApiError(
            400, "invalid_after", "after must be the next token of a previous page"
        ) from None


# --- tracking ---------------------------------------------------------------------------


def _column_facets(dataset: TrackedDataset) -> DatasetFacets:
    lineage = dataset.facets.column_lineage
    if lineage is None:
        return DatasetFacets()
    return DatasetFacets(
        column_lineage=ColumnLineageFacet(
            fields={
                column: ColumnLineageField(
                    input_fields=tuple(
                        InputField(namespace=f.namespace, name=f.name, field=f.field)
                        for f in field.input_fields
                    )
                )
                # In name order, as the agent derives them: the same columns listed in
                # another order are the same event, with the same id.
                for column, field in sorted(lineage.fields.items())
            }
        )
    )


def _check_edges(tracked: Sequence[TrackedEvent]) -> None:
    """Refuse events whose inputs x outputs (the edge rows they imply) pass the limits."""
    total = 0
    for index, event in enumerate(tracked):
        edges = len(event.inputs) * len(event.outputs)
        if edges > MAX_EDGES_PER_EVENT:
            raise ApiError(
                422,
                "invalid_event",
                f"event {index}: {len(event.inputs)} inputs x {len(event.outputs)} outputs "
                f"make {edges} lineage edges, over the limit of {MAX_EDGES_PER_EVENT} per event",
            )
        total += edges
    if total > MAX_EDGES_PER_TRACK:
        raise ApiError(
            422,
            "invalid_event",
            f"the events make {total} lineage edges (inputs x outputs), over the limit of "
            f"{MAX_EDGES_PER_TRACK} per request",
        )


def to_run_event(tracked: TrackedEvent) -> RunEvent:
    """The stored form of a tracked event: what the agent models, other facets dropped,
    its time in UTC (so the same instant written with two offsets is one event)."""
    try:
        event_time = tracked.event_time.astimezone(UTC)
    except OverflowError:
        raise ApiError(422, "invalid_event", "eventTime has no UTC equivalent") from None
    problem = event_time_problem(event_time, "eventTime")
    if problem is not None:
        raise ApiError(422, "invalid_event", problem)
    return RunEvent(
        event_type=tracked.event_type,
        event_time=event_time,
        run=Run(run_id=tracked.run.run_id),
        job=Job(namespace=tracked.job.namespace, name=tracked.job.name),
        inputs=tuple(
            InputDataset(namespace=d.namespace, name=d.name, facets=_column_facets(d))
            for d in tracked.inputs
        ),
        outputs=tuple(
            OutputDataset(namespace=d.namespace, name=d.name, facets=_column_facets(d))
            for d in tracked.outputs
        ),
        producer=tracked.producer,
        schema_url=tracked.schema_url,
    )


def _named(event: RunEvent) -> list[DatasetRef]:
    """The event's inputs and outputs."""
    datasets: tuple[InputDataset | OutputDataset, ...] = (*event.inputs, *event.outputs)
    return [DatasetRef(d.namespace, d.name) for d in datasets]


def _sources(event: RunEvent) -> Iterable[DatasetRef]:
    """Every dataset an event says was read: inputs and column-lineage sources."""
    datasets: tuple[InputDataset | OutputDataset, ...] = (*event.inputs, *event.outputs)
    for dataset in datasets:
        yield from (
            DatasetRef(f.namespace, f.name)
            for column in _column_fields(dataset.facets)
            for f in column.input_fields
        )
    yield from (DatasetRef(d.namespace, d.name) for d in event.inputs)


def _column_fields(facets: DatasetFacets) -> Iterable[ColumnLineageField]:
    return () if facets.column_lineage is None else facets.column_lineage.fields.values()


# --- redaction ---------------------------------------------------------------------------


def _hidden_id(key: bytes, identity: bytes) -> str:
    return HIDDEN_ID_PREFIX + hmac.new(key, identity, hashlib.sha256).hexdigest()[:32]


def redact_graph(
    graph: Graph,
    readable: Mapping[int, bool],
    key: bytes,
    direction: Direction,
    depth: int,
) -> LineageGraphView:
    """The graph as the caller may see it (see the module doc for the rules).

    `readable` maps store node ids to the caller's read permission; a node missing from it
    is hidden. `key` makes the placeholder ids; draw a fresh one per response.
    """
    visible = {n.id: n for n in graph.nodes if readable.get(n.id, False)}
    # Union-find over hidden nodes joined by an edge: each group is one placeholder.
    group: dict[int, int] = {n.id: n.id for n in graph.nodes if n.id not in visible}

    def find(node: int) -> int:
        while group[node] != node:
            group[node] = group[group[node]]
            node = group[node]
        return node

    for edge in graph.edges:
        if edge.source in group and edge.target in group:
            first, second = find(edge.source), find(edge.target)
            if first != second:
                group[max(first, second)] = min(first, second)
    hidden_depth: dict[int, int] = {}
    for node in graph.nodes:
        if node.id in group:
            root = find(node.id)
            hidden_depth[root] = min(node.depth, hidden_depth.get(root, node.depth))
    hidden_ids = {root: _hidden_id(key, b"%d" % root) for root in hidden_depth}

    def public(node: int) -> str:
        if node in visible:
            return dataset_id(visible[node].namespace, visible[node].name)
        return hidden_ids[find(node)]

    edges: dict[tuple[str, str], LineageEdge] = {}
    for edge in graph.edges:
        if edge.source in visible and edge.target in visible:
            pair = (public(edge.source), public(edge.target))
            edges[pair] = LineageEdge(
                source=pair[0],
                target=pair[1],
                run_count=edge.run_count,
                first_seen=edge.first_seen,
                last_seen=edge.last_seen,
                last_run_id=edge.last_run_id,
            )
        elif edge.source in visible or edge.target in visible:
            pair = (public(edge.source), public(edge.target))
            edges[pair] = LineageEdge(source=pair[0], target=pair[1])
    root_id = public(graph.root) if graph.root in group or graph.root in visible else ""
    # Depths are hops in the graph as shown, a placeholder one hop however many datasets
    # it stands for: the store's depths would tell how long a hidden chain is.
    shown = _depths(root_id, edges, direction)

    nodes: list[DatasetNode | HiddenNode] = [
        DatasetNode(
            id=public(n.id),
            namespace=n.namespace,
            name=n.name,
            depth=shown.get(public(n.id), n.depth),
        )
        for n in visible.values()
    ]
    nodes.extend(
        HiddenNode(id=hidden_ids[r], depth=shown.get(hidden_ids[r], d))
        for r, d in hidden_depth.items()
    )
    nodes.sort(key=lambda n: (n.depth, isinstance(n, HiddenNode), n.id))
    return LineageGraphView(
        root=root_id if graph.root in visible else "",
        direction=direction,
        depth=depth,
        truncated=graph.truncated,
        nodes=nodes,
        edges=[edges[pair] for pair in sorted(edges)],
    )


def _depths(root: str, edges: Iterable[tuple[str, str]], direction: Direction) -> dict[str, int]:
    """Hops from `root` along `edges` (source -> target): downwards, upwards, or the
    shorter of the two for `both`, as the store's walk counts them."""
    down: dict[str, list[str]] = {}
    up: dict[str, list[str]] = {}
    for source, target in edges:
        down.setdefault(source, []).append(target)
        up.setdefault(target, []).append(source)
    walks = [down] if direction == "down" else [up] if direction == "up" else [down, up]
    depths: dict[str, int] = {}
    for adjacent in walks:
        reached = {root: 0}
        frontier = [root]
        while frontier:
            following: list[str] = []
            for node in frontier:
                for neighbour in adjacent.get(node, ()):
                    if neighbour not in reached:
                        reached[neighbour] = reached[node] + 1
                        following.append(neighbour)
            frontier = following
        for node, hops in reached.items():
            depths[node] = min(hops, depths.get(node, hops))
    return depths


def redact_run_event(
    event: RunEvent, readable: Mapping[DatasetRef, bool], key: bytes
) -> tuple[RunEvent, int]:
    """The event with every dataset the caller may not read replaced by a placeholder
    (namespace `HIDDEN_NAMESPACE`, an opaque name, no facets, no column names); returns it
    with the number of distinct datasets hidden."""
    hidden: set[DatasetRef] = set()

    def placeholder(ref: DatasetRef) -> str:
        hidden.add(ref)
        return _hidden_id(key, msgspec.json.encode((ref.namespace, ref.name)))

    def facets(dataset_facets: DatasetFacets) -> DatasetFacets:
        if dataset_facets.column_lineage is None:
            return dataset_facets
        fields: dict[str, ColumnLineageField] = {}
        for column, field in dataset_facets.column_lineage.fields.items():
            sources: dict[InputField, None] = {}
            for source in field.input_fields:
                ref = DatasetRef(source.namespace, source.name)
                if readable.get(ref, False):
                    sources[source] = None
                else:
                    sources[InputField(HIDDEN_NAMESPACE, placeholder(ref), "")] = None
            fields[column] = ColumnLineageField(input_fields=tuple(sources))
        return DatasetFacets(
            column_lineage=msgspec.structs.replace(dataset_facets.column_lineage, fields=fields)
        )

    inputs = tuple(
        InputDataset(namespace=d.namespace, name=d.name, facets=facets(d.facets))
        if readable.get(DatasetRef(d.namespace, d.name), False)
        else InputDataset(
            namespace=HIDDEN_NAMESPACE, name=placeholder(DatasetRef(d.namespace, d.name))
        )
        for d in event.inputs
    )
    outputs = tuple(
        OutputDataset(namespace=d.namespace, name=d.name, facets=facets(d.facets))
        if readable.get(DatasetRef(d.namespace, d.name), False)
        else OutputDataset(
            namespace=HIDDEN_NAMESPACE, name=placeholder(DatasetRef(d.namespace, d.name))
        )
        for d in event.outputs
    )
    return msgspec.structs.replace(event, inputs=inputs, outputs=outputs), len(hidden)


def _event_datasets(event: RunEvent) -> list[DatasetRef]:
    named = dict.fromkeys(_named(event))
    named.update((ref, None) for ref in _sources(event))
    return list(named)


# --- HTTP ----------------------------------------------------------------------------------


def _json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type=_JSON)


def _error(status: int, code: str, message: str) -> web.Response:
    return _json_response(ErrorBody(error=code, message=message), status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Conditions in which the store cannot answer now but may soon.
_STORE_DOWN = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal, whoever raises it (handlers, the router, aiohttp), as JSON."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        response = _error(exc.status, code, exc.reason or "request refused")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except AuthorizationUnavailable as exc:
        log.warning("lineage API: authorization unavailable: %s", exc)
        return _error(503, "authorization_unavailable", "authorization cannot be decided now")
    except StoreError as exc:
        log.warning("lineage API: store write failed: %s", exc)
        if exc.retriable:
            return _error(503, "store_unavailable", "the lineage store is unavailable")
        return _error(500, "store_error", "the lineage store refused the events")
    except _STORE_DOWN as exc:
        log.warning("lineage API: store unavailable: %s: %s", type(exc).__name__, exc)
        return _error(503, "store_unavailable", "the lineage store is unavailable")
    except Exception:
        log.exception("lineage API: unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal_error", "internal error")


class _LineageApi:
    """The request handlers; one instance per application."""

    def __init__(
        self,
        queries: LineageQueries,
        writer: StoreWriter,
        authorizer: Authorizer,
        *,
        principal_header: str,
        roles_header: str,
        max_body_bytes: int,
        max_graph_nodes: int,
        resource_of: Callable[[str, str], str],
    ) -> None:
        self._queries = queries
        self._writer = writer
        self._authorizer = authorizer
        self._principal_header = principal_header
        self._roles_header = roles_header
        self._max_body_bytes = max_body_bytes
        self._max_graph_nodes = max_graph_nodes
        self._resource_of = resource_of
        self._openapi = msgspec.json.encode(openapi_document())

    def _caller(self, request: web.Request) -> Caller:
        return caller_from_headers(request.headers, self._principal_header, self._roles_header)

    def _allowed_many(self, caller: Caller, refs: Sequence[DatasetRef], action: str) -> list[bool]:
        resources = sorted({self._resource_of(r.namespace, r.name) for r in refs})
        if not resources:
            return []
        answers = self._authorizer.allowed_many(caller, resources, action)
        if len(answers) != len(resources):
            raise AuthorizationUnavailable(
                f"authorizer gave {len(answers)} answers for {len(resources)} resources"
            )
        by_resource = dict(zip(resources, answers, strict=True))
        return [by_resource[self._resource_of(r.namespace, r.name)] is True for r in refs]

    def _may_read(self, caller: Caller, ref: DatasetRef) -> bool:
        resource = self._resource_of(ref.namespace, ref.name)
        return self._authorizer.allowed(caller, resource, READ) is True

    async def _body(self, request: web.Request) -> bytes:
        if request.content_type != _JSON or request.charset not in (None, "utf-8", "UTF-8"):
            raise ApiError(415, "unsupported_media_type", "send application/json (UTF-8)")
        # Every Content-Encoding header and list item counts: aiohttp decodes the body by
        # one of them, so checking only the first would let a second one decide.
        codings = [
            coding.strip().lower()
            for header in request.headers.getall("Content-Encoding", [])
            for coding in header.split(",")
        ]
        if codings and codings != ["identity"]:
            raise ApiError(
                415,
                "unsupported_media_type",
                "compressed bodies are not accepted: send one Content-Encoding: identity, or none",
            )
        too_large = ApiError(
            413, "body_too_large", f"the body is over {self._max_body_bytes} bytes"
        )
        if request.content_length is not None and request.content_length > self._max_body_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > self._max_body_bytes:
                    raise too_large
                chunks.append(chunk)
        except ConnectionResetError:
            # The client went away mid-body: nothing of the store's doing (its failures are
            # OSErrors too), and no one is left to answer.
            log.info("lineage API: the client disconnected while sending the body")
            raise ApiError(400, "incomplete_body", "the connection closed mid-body") from None
        except RequestPayloadError as exc:
            raise ApiError(400, "malformed_body", f"the body cannot be read: {exc}") from None
        return b"".join(chunks)

    async def track(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        body = await self._body(request)
        try:
            body.decode("utf-8")
            decoded = msgspec.json.decode(body, type=TrackRequest)
        except UnicodeDecodeError:
            raise ApiError(400, "malformed_json", "the body is not UTF-8") from None
        except msgspec.ValidationError as exc:
            raise ApiError(422, "invalid_event", str(exc)) from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None
        tracked = [decoded] if isinstance(decoded, TrackedEvent) else decoded
        _check_edges(tracked)
        events = [to_run_event(t) for t in tracked]
        # What PostgreSQL cannot hold (NUL, lone surrogates) is refused here, before any
        # of it reaches the authorizer, rather than set aside into the dead letter table.
        rejected = screen(events).rejected
        if rejected:
            raise ApiError(422, "invalid_event", rejected[0].reason)

        outputs = [DatasetRef(d.namespace, d.name) for e in events for d in e.outputs]
        sources = [ref for e in events for ref in _sources(e)]
        for refs, action in ((outputs, WRITE), (sources, READ)):
            denied = sorted(
                {
                    self._resource_of(ref.namespace, ref.name)
                    for ref, ok in zip(refs, self._allowed_many(caller, refs, action), strict=True)
                    if not ok
                }
            )
            if denied:
                listed = ", ".join(denied[:5]) + (" ..." if len(denied) > 5 else "")
                raise ApiError(403, "forbidden", f"you may not {action} {listed}")

        result = await self._writer.write(events, source="api")
        return _json_response(
            TrackResult(
                event_ids=[e.event_id for e in events],
                inserted=result.inserted,
                duplicates=result.duplicates,
            ),
            status=202,
        )

    async def graph(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        query = _single_values(request.query)
        node = query.get("node")
        if node is None:
            raise ApiError(400, "invalid_node", "the node parameter is required")
        ref = parse_dataset(node, query.get("namespace"))
        direction = _direction(query.get("direction"))
        depth = _small_int(query.get("depth"), "depth", DEFAULT_DEPTH, 1, MAX_DEPTH)
        not_found = ApiError(404, "not_found", "no such dataset, or not one you may read")
        # Decided before the store is asked, so that a forbidden dataset and a missing one
        # cannot be told apart, not even by how long the answer takes.
        if not self._may_read(caller, ref):
            raise not_found
        graph = await self._queries.lineage_graph(
            ref, direction, depth, max_nodes=self._max_graph_nodes
        )
        if graph is None:
            raise not_found
        refs = [DatasetRef(n.namespace, n.name) for n in graph.nodes]
        answers = self._allowed_many(caller, refs, READ)
        readable = {n.id: ok for n, ok in zip(graph.nodes, answers, strict=True)}
        if not readable.get(graph.root, False):
            raise not_found
        view = redact_graph(graph, readable, secrets.token_bytes(32), direction, depth)
        return _json_response(view)

    async def event(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        try:
            event_id = uuid.UUID(request.match_info["id"])
        except ValueError:
            raise ApiError(400, "invalid_id", "an event id is a UUID") from None
        not_found = ApiError(404, "not_found", "no such event, or not one you may read")
        event = await self._queries.get_event(event_id)
        if event is None:
            raise not_found
        if isinstance(event, AccessEvent):
            if not self._may_read(caller, DatasetRef(event.dataset_namespace, event.dataset_name)):
                raise not_found
            return _json_response(AccessEventView(event_id=event_id, event=event))
        refs = _event_datasets(event)
        readable = dict(zip(refs, self._allowed_many(caller, refs, READ), strict=True))
        named = _named(event)
        # An event is the caller's to see through at least one of its datasets.
        if named and not any(readable[ref] for ref in named):
            raise not_found
        redacted, hidden = redact_run_event(event, readable, secrets.token_bytes(32))
        return _json_response(
            RunEventView(event_id=event_id, hidden_datasets=hidden, event=redacted)
        )

    async def access(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        query = _single_values(request.query)
        ref = parse_dataset(request.match_info["name"], query.get("namespace"))
        since = _time(query.get("since"), "since") or _EPOCH
        until = _time(query.get("until"), "until")
        limit = _small_int(query.get("limit"), "limit", DEFAULT_ACCESS_LIMIT, 1, MAX_ACCESS_LIMIT)
        after = _after(query.get("after"))
        not_found = ApiError(404, "not_found", "no such dataset, or not one you may read")
        if not self._may_read(caller, ref):
            raise not_found
        if await self._queries.dataset_id(ref) is None:
            raise not_found
        records = await self._queries.dataset_access(ref, since, limit, until, after)
        return _json_response(
            AccessPage(
                dataset=DatasetNode(
                    id=dataset_id(ref.namespace, ref.name),
                    namespace=ref.namespace,
                    name=ref.name,
                    depth=0,
                ),
                events=records,
                next=(
                    access_cursor(records[-1].time, records[-1].event_id)
                    if len(records) == limit
                    else None
                ),
            )
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=_JSON)


def _method_not_allowed(*allowed: str) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return refuse


def lineage_api(
    queries: LineageQueries,
    writer: StoreWriter,
    authorizer: Authorizer,
    *,
    principal_header: str = "X-Auth-Request-User",
    roles_header: str = "X-Auth-Request-Roles",
    max_body_bytes: int = 1 << 20,
    max_graph_nodes: int = 1_000,
    resource_of: Callable[[str, str], str] = dataset_resource,
) -> web.Application:
    """The lineage API application. Serve it only where the proxy alone can reach it, with
    `web.AppRunner(app, **SERVER_SETTINGS)`; it trusts the identity headers it is given.

    `resource_of(namespace, name)` maps a dataset to its policy resource.
    """
    if not 1 <= max_graph_nodes <= MAX_NODES:
        raise ValueError(f"max_graph_nodes must be from 1 to {MAX_NODES}, not {max_graph_nodes}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, not {max_body_bytes}")
    api = _LineageApi(
        queries,
        writer,
        authorizer,
        principal_header=principal_header,
        roles_header=roles_header,
        max_body_bytes=max_body_bytes,
        max_graph_nodes=max_graph_nodes,
        resource_of=resource_of,
    )
    app = web.Application(middlewares=[_errors_as_json], client_max_size=max_body_bytes)
    # Fixed paths before /lineage/{id}, which would otherwise take "graph" and "track",
    # with every method: the wrong one is a 405 here, not an invalid event id there.
    app.router.add_post("/lineage/track", api.track)
    app.router.add_route("*", "/lineage/track", _method_not_allowed("POST"))
    app.router.add_get("/lineage/graph", api.graph)
    app.router.add_route("*", "/lineage/graph", _method_not_allowed("GET", "HEAD"))
    app.router.add_get("/lineage/{id}", api.event)
    app.router.add_get("/datasets/{name}/access", api.access)
    app.router.add_get("/openapi.json", api.openapi)
    return app
