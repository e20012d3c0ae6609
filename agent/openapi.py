"""The lineage API's contract: the JSON it accepts and returns, and its OpenAPI 3.1 document.

Every request and response body is a msgspec Struct declared here; `openapi_document()`
builds the document from those declarations (`msgspec.json.schema_components`), so the
document cannot drift from what the handlers in `agent.api` decode and encode.

Naming: the API's own objects use snake_case; OpenLineage objects (tracked and returned
run events) keep the spelling of the OpenLineage spec (`eventType`, `runId`, ...).
"""

from __future__ import annotations

import inspect
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from agent.events import MAX_EDGES_PER_EVENT, AccessEvent, EventType, RunEvent
from agent.store.queries import MAX_DEPTH, AccessRecord

__all__ = [
    "API_VERSION",
    "MAX_ACCESS_LIMIT",
    "MAX_DATASETS_PER_EVENT",
    "MAX_EDGES_PER_TRACK",
    "MAX_EVENTS_PER_TRACK",
    "MAX_NAME_CHARS",
    "AccessEventView",
    "AccessPage",
    "DatasetNode",
    "ErrorBody",
    "HiddenNode",
    "LineageEdge",
    "LineageGraphView",
    "RunEventView",
    "TrackResult",
    "TrackedEvent",
    "UtcTime",
    "openapi_document",
]

# 2.0.0: access pages carry an opaque `next` cursor (passed back as `after`) in place of
# `next_since`, which could not page past more events than `limit` at one instant.
API_VERSION = "2.0.0"
MAX_NAME_CHARS = 4096
MAX_EVENTS_PER_TRACK = 1000
MAX_DATASETS_PER_EVENT = 1000
MAX_ACCESS_LIMIT = 1000
# Lineage edges (inputs x outputs) per POST /lineage/track; per event, MAX_EDGES_PER_EVENT.
MAX_EDGES_PER_TRACK = 50_000

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
ColumnName = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
# OpenLineage lets producers attach any facet; the store keeps only the ones the agent
# models (columnLineage), so others are accepted and not stored.
OtherFacets = Annotated[
    dict[str, Any],
    msgspec.Meta(description="Facets by name. Accepted as OpenLineage allows; not stored."),
]

Uri = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]

# --- POST /lineage/track ---------------------------------------------------------------
# Strict where the store relies on the shape (forbid_unknown_fields on events, runs, jobs
# and datasets); open only inside `facets`, which is where OpenLineage puts extensions.


class TrackedInputField(msgspec.Struct, frozen=True):
    """A source column. Extra keys (e.g. `transformations`) are accepted and not stored."""

    namespace: Name
    name: Name
    field: ColumnName


class TrackedColumnLineageField(msgspec.Struct, frozen=True):
    input_fields: Annotated[
        tuple[TrackedInputField, ...], msgspec.Meta(max_length=MAX_DATASETS_PER_EVENT)
    ] = msgspec.field(name="inputFields")


class TrackedColumnLineage(msgspec.Struct, frozen=True):
    """The OpenLineage `columnLineage` dataset facet (stored)."""

    fields: Annotated[dict[ColumnName, TrackedColumnLineageField], msgspec.Meta(max_length=10_000)]


class TrackedDatasetFacets(msgspec.Struct, frozen=True):
    """Dataset facets: `columnLineage` is validated and stored; any other facet is accepted
    (OpenLineage lets producers add their own) and not stored."""

    column_lineage: TrackedColumnLineage | None = msgspec.field(default=None, name="columnLineage")


class TrackedDataset(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    namespace: Name
    name: Name
    facets: TrackedDatasetFacets = TrackedDatasetFacets()
    input_facets: OtherFacets = msgspec.field(default_factory=dict, name="inputFacets")
    output_facets: OtherFacets = msgspec.field(default_factory=dict, name="outputFacets")


Datasets = Annotated[tuple[TrackedDataset, ...], msgspec.Meta(max_length=MAX_DATASETS_PER_EVENT)]


class TrackedRun(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    run_id: uuid.UUID = msgspec.field(name="runId")
    facets: OtherFacets = msgspec.field(default_factory=dict)


class TrackedJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    namespace: Name
    name: Name
    facets: OtherFacets = msgspec.field(default_factory=dict)


class TrackedEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An OpenLineage RunEvent (spec 2-0-2) as a client sends it to `POST /lineage/track`.

    Unknown fields are refused everywhere except inside `facets`; `eventTime` must carry a
    time zone and lie from 1970-01-01T00:00:00Z to 9000-01-01T00:00:00Z (422 otherwise);
    `runId` must be a UUID. Each input feeds each output: inputs x outputs is at most
    10,000 per event and 50,000 over one request (422 otherwise).
    """

    event_type: EventType = msgspec.field(name="eventType")
    event_time: UtcTime = msgspec.field(name="eventTime")
    run: TrackedRun
    job: TrackedJob
    producer: Uri
    schema_url: Uri = msgspec.field(name="schemaURL")
    inputs: Datasets = ()
    outputs: Datasets = ()


TrackRequest = (
    TrackedEvent
    | Annotated[list[TrackedEvent], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_TRACK)]
)


class TrackResult(msgspec.Struct, frozen=True):
    """`event_ids` in request order; an event the store already held counts as duplicate
    (tracking the same event again is harmless)."""

    event_ids: list[uuid.UUID]
    inserted: int
    duplicates: int


# --- GET /lineage/graph ----------------------------------------------------------------


class DatasetNode(msgspec.Struct, frozen=True, tag_field="kind", tag="dataset"):
    """A dataset the caller may read. `id` can be passed back as `node`."""

    id: str
    namespace: str
    name: str
    depth: int


class HiddenNode(msgspec.Struct, frozen=True, tag_field="kind", tag="hidden"):
    """One or more connected datasets the caller may not read. The id is random per
    response: it tells nothing about which datasets these are, nor whether two responses
    show the same ones."""

    id: str
    depth: int


class LineageEdge(msgspec.Struct, frozen=True, omit_defaults=True):
    """`source` feeds `target`. Edges that touch a hidden node carry no run details."""

    source: str
    target: str
    run_count: int | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    last_run_id: uuid.UUID | None = None


class LineageGraphView(msgspec.Struct, frozen=True):
    """The lineage around `root`, filtered by the caller's read permission.

    `truncated` is true when more datasets were within reach than the server's node limit;
    the nearest are kept.
    """

    root: str
    direction: Literal["up", "down", "both"]
    depth: int
    truncated: bool
    nodes: list[DatasetNode | HiddenNode]
    edges: list[LineageEdge]


# --- GET /lineage/{id} -----------------------------------------------------------------


class RunEventView(msgspec.Struct, frozen=True, tag_field="kind", tag="run"):
    """A stored run event. Datasets the caller may not read are replaced by placeholders:
    namespace `urn:lineage-sidecar:hidden`, an opaque name, no facets, and column lineage
    from them keeps only that placeholder (no column name). `hidden_datasets` counts them."""

    event_id: uuid.UUID
    hidden_datasets: int
    event: RunEvent


class AccessEventView(msgspec.Struct, frozen=True, tag_field="kind", tag="access"):
    event_id: uuid.UUID
    event: AccessEvent


# --- GET /datasets/{name}/access -------------------------------------------------------


class AccessPage(msgspec.Struct, frozen=True):
    """Access events oldest first (by time, then event id). When the page is full, `next`
    is an opaque token: pass it as `after` (with the same other parameters) for the events
    right after this page's last one; each event stored before the first page was asked
    for is listed exactly once (one stored later with an earlier time falls before the
    cursor: ask again from `since`). Null on the last page."""

    dataset: DatasetNode
    events: list[AccessRecord]
    next: str | None


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error: a stable machine-readable `error` code and a message for people."""

    error: str
    message: str


# --- the document ----------------------------------------------------------------------

_REF = "#/components/schemas/{name}"

_ERRORS: dict[str, str] = {
    "400": "Malformed request: bad JSON, bad parameter, unknown id format.",
    "401": "No verified identity reached the API.",
    "403": "The caller may not do this to a dataset the request names.",
    "404": "Not found, or not readable by the caller (the two are not told apart).",
    "405": "Method not allowed.",
    "413": "Request body over the size limit.",
    "415": "Request body is not JSON.",
    "422": "Well-formed JSON that is not a valid request.",
    "503": "The lineage store or the authorization check is unavailable; retry later.",
}


def _json(ref: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _errors(*codes: str) -> dict[str, Any]:
    common = ("400", "401", "503")
    return {
        code: _json({"$ref": _REF.format(name="ErrorBody")}, _ERRORS[code])
        for code in sorted({*common, *codes})
    }


def _query(
    name: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the lineage API."""
    (track_request, track_result, graph, event_view, access_page), components = (
        msgspec.json.schema_components(
            [
                TrackRequest,
                TrackResult,
                LineageGraphView,
                RunEventView | AccessEventView,
                AccessPage,
            ],
            ref_template=_REF,
        )
    )
    _, error_components = msgspec.json.schema_components([ErrorBody], ref_template=_REF)
    components.update(error_components)
    for schema in components.values():
        # msgspec copies docstrings verbatim; the document wants them without indentation.
        if "description" in schema:
            schema["description"] = inspect.cleandoc(schema["description"])
    node_text = (
        "A dataset id from a graph response (`ds_...`), or `<namespace>:<name>` (split at the "
        "LAST colon, so namespaces may hold colons and names may not; use the `namespace` "
        "parameter for such names)."
    )
    namespace_param = _query(
        "namespace",
        {"type": "string", "maxLength": MAX_NAME_CHARS},
        "Dataset namespace; when given, the dataset is given by its plain name.",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Lineage Sidecar lineage API",
            "version": API_VERSION,
            "description": (
                "Lineage and access events captured by the sidecar, behind the proxy's "
                "authentication. Datasets map to policy resources `dataset:<name>` (the "
                "OpenLineage dataset name, without its namespace), with actions `read` and "
                "`write`. A dataset the caller may not read is never shown by name."
            ),
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": {
            "/lineage/track": {
                "post": {
                    "operationId": "trackEvents",
                    "summary": "Record explicit OpenLineage RunEvents (one or a list).",
                    "description": (
                        "Needs `write` on every output dataset and `read` on every input "
                        "dataset and column-lineage source. Idempotent: the event id is a "
                        "function of the event's content. Every input feeds every output: "
                        f"inputs x outputs is at most {MAX_EDGES_PER_EVENT:,} lineage edges "
                        f"per event and {MAX_EDGES_PER_TRACK:,} per request (422 otherwise)."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": track_request}},
                    },
                    "responses": {
                        "202": _json(track_result, "Stored (or already held)."),
                        **_errors("403", "413", "415", "422"),
                    },
                }
            },
            "/lineage/graph": {
                "get": {
                    "operationId": "lineageGraph",
                    "summary": "The lineage graph around a dataset, filtered for the caller.",
                    "parameters": [
                        _query("node", {"type": "string"}, node_text, required=True),
                        namespace_param,
                        _query(
                            "direction",
                            {"enum": ["up", "down", "both"], "default": "both"},
                            "up: what feeds the node; down: what it feeds.",
                        ),
                        _query(
                            "depth",
                            {"type": "integer", "minimum": 1, "maximum": MAX_DEPTH, "default": 3},
                            "Hops from the node.",
                        ),
                    ],
                    "responses": {"200": _json(graph, "The graph."), **_errors("404")},
                }
            },
            "/lineage/{id}": {
                "get": {
                    "operationId": "getEvent",
                    "summary": "One stored event (run or access) by event id.",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "format": "uuid"},
                        }
                    ],
                    "responses": {"200": _json(event_view, "The event."), **_errors("404")},
                }
            },
            "/datasets/{name}/access": {
                "get": {
                    "operationId": "datasetAccess",
                    "summary": "Who read or wrote a dataset, when, under which decision.",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": node_text,
                        },
                        namespace_param,
                        _query(
                            "since",
                            {"type": "string", "format": "date-time"},
                            "RFC 3339 time with zone (default: the oldest retained).",
                        ),
                        _query(
                            "after",
                            {"type": "string"},
                            "The `next` token of the previous page: continue after its last event.",
                        ),
                        _query(
                            "until",
                            {"type": "string", "format": "date-time"},
                            "RFC 3339 time with zone, exclusive.",
                        ),
                        _query(
                            "limit",
                            {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_ACCESS_LIMIT,
                                "default": 100,
                            },
                            "Page size.",
                        ),
                    ],
                    "responses": {"200": _json(access_page, "Access events."), **_errors("404")},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": components},
    }
