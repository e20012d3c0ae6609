"""Lineage and access events, the agent's output.

Two kinds of event leave the agent:

* `RunEvent`, in the OpenLineage RunEvent shape (spec 2-0-2), so the same JSON can be handed
  to Marquez or DataHub unchanged. Field names are spelled exactly as the spec spells them
  (`eventType`, `eventTime`, `runId`, `schemaURL`, `inputFields`, ...).
* `AccessEvent`: who asked for which dataset, what was decided and under which rule. One per
  captured request that names a dataset, denied requests included.

Every event has a deterministic `event_id`: deriving the same capture records again gives
the same ids, which is what lets the store ingest at-least-once deliveries exactly once.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Literal

import msgspec

from agent.capture import Decision

RUN_EVENT_SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
COLUMN_LINEAGE_SCHEMA_URL = (
    "https://openlineage.io/spec/facets/1-2-0/ColumnLineageDatasetFacet.json"
    "#/$defs/ColumnLineageDatasetFacet"
)
# The producer URI names the code that emitted an event; OpenLineage only asks that it be a
# URI that identifies the producer and its version.
PRODUCER = "urn:lineage-sidecar:agent:0.1.0"
SIDECAR_RUN_FACET_SCHEMA_URL = "urn:lineage-sidecar:facets:SidecarRunFacet:1"

# Namespaces for the name-based (version 5) UUIDs. Fixed forever: changing one changes
# every id and breaks idempotent ingestion of records delivered twice across an upgrade.
EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lineage-sidecar:event")
RUN_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lineage-sidecar:run")

EventType = Literal["START", "RUNNING", "COMPLETE", "FAIL", "ABORT", "OTHER"]


class InputField(msgspec.Struct, frozen=True, order=True):
    """One source column of an output column: dataset namespace, dataset name, field."""

    namespace: str
    name: str
    field: str


class ColumnLineageField(msgspec.Struct, frozen=True):
    input_fields: tuple[InputField, ...] = msgspec.field(name="inputFields")


class ColumnLineageFacet(msgspec.Struct, frozen=True):
    """The `columnLineage` dataset facet: output column -> the input columns it is made of."""

    fields: dict[str, ColumnLineageField]
    producer: str = msgspec.field(default=PRODUCER, name="_producer")
    schema_url: str = msgspec.field(default=COLUMN_LINEAGE_SCHEMA_URL, name="_schemaURL")


class DatasetFacets(msgspec.Struct, frozen=True, omit_defaults=True):
    column_lineage: ColumnLineageFacet | None = msgspec.field(default=None, name="columnLineage")


class InputFacets(msgspec.Struct, frozen=True, omit_defaults=True):
    """Input-dataset facets; none are emitted yet, the key is there because the spec has it."""


class OutputFacets(msgspec.Struct, frozen=True, omit_defaults=True):
    """Output-dataset facets; none are emitted yet."""


class InputDataset(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    facets: DatasetFacets = DatasetFacets()
    input_facets: InputFacets = msgspec.field(default=InputFacets(), name="inputFacets")


class OutputDataset(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    facets: DatasetFacets = DatasetFacets()
    output_facets: OutputFacets = msgspec.field(default=OutputFacets(), name="outputFacets")


class UnparsedSql(msgspec.Struct, frozen=True):
    """A request whose SQL could not be turned into lineage, and why."""

    request_id: str = msgspec.field(name="requestId")
    reason: str


class SidecarRunFacet(msgspec.Struct, frozen=True):
    """What the sidecar knows about how this run was assembled from traffic.

    A custom run facet (OpenLineage allows producers their own facets, each with its own
    `_producer` and `_schemaURL`).
    """

    # How requests were grouped: "trace:<trace-id>", "header:<name>=<value>" or
    # "request:<request-id>" for a request that carried no correlation at all.
    correlation: str
    requests: int
    failed_requests: int = msgspec.field(default=0, name="failedRequests")
    # Why the run ended: "idle", "explicit", "evicted" (too many open runs, see the agent's
    # `max_open_runs`) or "" on START.
    completion: str = ""
    # True when the run touched more datasets than the agent keeps per run; the lists are
    # then incomplete.
    truncated: bool = False
    unparsed_sql: tuple[UnparsedSql, ...] = msgspec.field(default=(), name="unparsedSql")
    producer: str = msgspec.field(default=PRODUCER, name="_producer")
    schema_url: str = msgspec.field(default=SIDECAR_RUN_FACET_SCHEMA_URL, name="_schemaURL")


class RunFacets(msgspec.Struct, frozen=True, omit_defaults=True):
    lineage_sidecar: SidecarRunFacet | None = msgspec.field(default=None, name="lineageSidecar")


class JobFacets(msgspec.Struct, frozen=True, omit_defaults=True):
    """Job facets; none are emitted yet."""


class Run(msgspec.Struct, frozen=True):
    run_id: uuid.UUID = msgspec.field(name="runId")
    facets: RunFacets = RunFacets()


class Job(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    facets: JobFacets = JobFacets()


class RunEvent(msgspec.Struct, frozen=True):
    """An OpenLineage RunEvent (spec 2-0-2)."""

    event_type: EventType = msgspec.field(name="eventType")
    event_time: datetime = msgspec.field(name="eventTime")
    run: Run
    job: Job
    inputs: tuple[InputDataset, ...] = ()
    outputs: tuple[OutputDataset, ...] = ()
    producer: str = PRODUCER
    schema_url: str = msgspec.field(default=RUN_EVENT_SCHEMA_URL, name="schemaURL")

    @property
    def event_id(self) -> uuid.UUID:
        """A UUID that is a function of the event's content alone.

        OpenLineage has no event id of its own. The encoding of a Struct is deterministic
        (fixed field order; the deriving code sorts datasets and columns), so the same
        capture records always yield the same id, and any difference in content yields a
        different one.
        """
        return run_event_id(msgspec.json.encode(self))


class AccessEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One principal's request for one dataset and what the sidecar decided."""

    event_id: uuid.UUID
    time: datetime
    principal: str | None
    roles: tuple[str, ...]
    dataset_namespace: str
    dataset_name: str
    action: str
    decision: Decision
    rule: str | None
    request_id: str
    status: int


LineageEvent = RunEvent | AccessEvent


def _sorted_facets(facets: DatasetFacets) -> DatasetFacets:
    lineage = facets.column_lineage
    if lineage is None or list(lineage.fields) == sorted(lineage.fields):
        return facets
    return msgspec.structs.replace(
        facets,
        column_lineage=msgspec.structs.replace(
            lineage, fields=dict(sorted(lineage.fields.items()))
        ),
    )


def with_sorted_columns(event: RunEvent) -> RunEvent:
    """The event with each columnLineage facet's columns in name order.

    The order of a JSON object's keys carries no meaning, yet the event id is a hash of
    the encoding: the agent derives columns in name order, the lineage API puts tracked
    events in it, and events read back from PostgreSQL (whose jsonb keeps keys in an order
    of its own) are put back in it, so one event has one id.
    """
    inputs = tuple(
        msgspec.structs.replace(d, facets=_sorted_facets(d.facets)) for d in event.inputs
    )
    outputs = tuple(
        msgspec.structs.replace(d, facets=_sorted_facets(d.facets)) for d in event.outputs
    )
    return msgspec.structs.replace(event, inputs=inputs, outputs=outputs)


# The version (5) and variant (RFC 4122) bits of a name-based SHA-1 UUID.
_UUID5_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID5_SET = (5 << 76) | (0x8000 << 48)


def name_uuid(namespace: uuid.UUID, name: str) -> uuid.UUID:
    """`uuid.uuid5(namespace, name)`, bit for bit, at a third of the cost: ids are made
    for every event, and the standard function spends most of its time on checks."""
    digest = hashlib.sha1(namespace.bytes + name.encode("utf-8"), usedforsecurity=False)
    value = int.from_bytes(digest.digest()[:16], "big")
    return uuid.UUID(int=(value & _UUID5_CLEAR) | _UUID5_SET)


def run_event_id(encoded: bytes) -> uuid.UUID:
    """`RunEvent.event_id` from the event's JSON encoding, for callers that have it."""
    digest = hashlib.sha256(encoded).hexdigest()
    return name_uuid(EVENT_ID_NAMESPACE, "run-event:" + digest)


def access_event_id(
    service: str, request_id: str, namespace: str, name: str, action: str
) -> uuid.UUID:
    """The id of the access event for one dataset named by one request.

    The service is part of it because request ids are only unique per proxy.
    """
    key = "\x00".join(("access", service, request_id, namespace, name, action))
    return name_uuid(EVENT_ID_NAMESPACE, key)


# Lineage edges one run event may imply: every input feeds every output, so N inputs and
# M outputs are N x M edge rows. The lineage API refuses an event over this; derivation
# cuts a run's dataset lists to stay within it (and marks the run `truncated`).
MAX_EDGES_PER_EVENT = 10_000


# The times an event may carry, the same for the whole pipeline: derivation clamps to this
# range, the lineage API refuses times outside it, and the store's writer sets an event
# outside it aside. PostgreSQL and asyncpg read the calendar's ends (date 9999-12-31,
# 0001-01-01) as +/-infinity, which has no partition and no RFC 3339 form; the bounds
# stay well clear of them.
EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(9000, 1, 1, tzinfo=UTC)
_LATEST_NS = int(LATEST_EVENT_TIME.timestamp()) * 1_000_000_000


def event_time_problem(moment: datetime, field: str) -> str | None:
    """Why `moment` cannot be an event's time (naming `field`), or None when it can."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if EARLIEST_EVENT_TIME <= moment <= LATEST_EVENT_TIME:
        return None
    return (
        f"{field} {moment.isoformat()} is out of range: event times lie from "
        f"{EARLIEST_EVENT_TIME.isoformat()} to {LATEST_EVENT_TIME.isoformat()}"
    )


def time_from_ns(time_ns: int) -> datetime:
    """UTC datetime from nanoseconds since the epoch (microsecond precision, as RFC 3339),
    clamped to EARLIEST_EVENT_TIME..LATEST_EVENT_TIME.

    Clamped rather than refused: the record is still a true account of who asked for what
    (only its clock was wrong), and refusing it would either lose it or, held back, stop
    the agent at that record for ever.
    """
    seconds, rest_ns = divmod(min(max(time_ns, 0), _LATEST_NS), 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest_ns // 1000)


def encode(event: LineageEvent) -> bytes:
    """JSON bytes of an event, field names as OpenLineage spells them."""
    return msgspec.json.encode(event)
