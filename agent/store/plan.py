"""What a batch of events means for the store's tables. Pure: no IO, no clock.

The writer (`agent.store.writer`) asks two questions of a batch and does the IO around
them:

* `screen(events)`: which events can be stored at all. PostgreSQL refuses NUL characters
  in `text` and `jsonb`, and UTF-8 cannot carry lone surrogates; an event that carries one
  anywhere, a number out of the column's range, or a time outside
  `agent.events.EARLIEST_EVENT_TIME..LATEST_EVENT_TIME` (near the calendar's ends, which
  the driver sends as infinity) is set aside with a reason for the dead letter table
  instead of failing the whole batch.
* `plan_runs(new_run_events)`: the rows the run events that were new to the store add or
  update: jobs, datasets, the run's state, its inputs and outputs, dataset and column edges.

Everything is deduplicated and sorted here, so that one statement never touches a row twice
and concurrent writers take row locks in the same order.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime

import msgspec

from agent.events import AccessEvent, LineageEvent, RunEvent, event_time_problem, run_event_id

__all__ = [
    "STATE_RANK",
    "AccessPlan",
    "Rejected",
    "RunPlan",
    "RunState",
    "Screened",
    "Sighting",
    "identity_key",
    "merge_run_state",
    "plan_access",
    "plan_runs",
    "run_state",
    "screen",
    "utc",
]

# Which event decides a run's state: a terminal one beats a running one beats a start, and
# OTHER never overrides anything. Within a rank the later event wins, then the larger id,
# so the final state is the same in whatever order the events arrive.
STATE_RANK = {"OTHER": 0, "START": 1, "RUNNING": 2, "COMPLETE": 3, "FAIL": 3, "ABORT": 3}
TERMINAL_RANK = 3
_INT4_MIN, _INT4_MAX = -(2**31), 2**31 - 1


def identity_key(*parts: str) -> bytes:
    """SHA-256 of the parts, each length-prefixed so that no two tuples share an encoding."""
    digest = hashlib.sha256()
    for part in parts:
        # surrogatepass: a lookup by a name that is not valid Unicode (never stored, see
        # `screen`) must find nothing, not raise.
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.digest()


def utc(moment: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC, as OpenLineage times are."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# --- screening -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """An event the store cannot hold, why, and its bytes for the dead letter table."""

    event_id: uuid.UUID | None
    reason: str
    payload: bytes


@dataclass(frozen=True)
class Screened:
    run_events: list[tuple[RunEvent, uuid.UUID, str]]  # event, id, JSON payload
    access_events: list[AccessEvent]
    rejected: list[Rejected]
    # Events that appeared more than once in this batch, counted once more each time.
    repeats: int


def _string_problem(value: str, where: str) -> str | None:
    if "\x00" in value:
        return f"NUL character in {where} (PostgreSQL text cannot hold it)"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where} is not valid Unicode (lone surrogate)"
    return None


def _walk_strings(value: object, where: str) -> str | None:
    """The first problem among all strings (keys included) of a builtins tree."""
    if isinstance(value, str):
        return _string_problem(value, where)
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _walk_strings(key, f"{where} key") or _walk_strings(item, f"{where}.{key}")
            if problem:
                return problem
    elif isinstance(value, list | tuple):
        for item in value:
            problem = _walk_strings(item, where)
            if problem:
                return problem
    return None


def access_problem(event: AccessEvent) -> str | None:
    """Why this access event cannot be stored, or None."""
    fields: list[tuple[str, str | None]] = [
        ("principal", event.principal),
        ("dataset namespace", event.dataset_namespace),
        ("dataset name", event.dataset_name),
        ("action", event.action),
        ("decision", event.decision),
        ("rule", event.rule),
        ("request id", event.request_id),
    ]
    fields.extend(("role", role) for role in event.roles)
    for where, value in fields:
        if value is not None:
            problem = _string_problem(value, where)
            if problem:
                return problem
    if not _INT4_MIN <= event.status <= _INT4_MAX:
        return f"status {event.status} is out of range"
    return event_time_problem(event.time, "time")


def _fallback_payload(event: LineageEvent) -> bytes:
    # Only reached for an event msgspec cannot encode (lone surrogates): keep what we can.
    return repr(event).encode("utf-8", "backslashreplace")


def screen(events: Sequence[LineageEvent]) -> Screened:
    """Split a batch into storable run and access events (first occurrence of each id)
    and rejected ones."""
    run_events: list[tuple[RunEvent, uuid.UUID, str]] = []
    access_events: list[AccessEvent] = []
    rejected: list[Rejected] = []
    seen: set[uuid.UUID] = set()
    repeats = 0
    for event in events:
        if isinstance(event, AccessEvent):
            if event.event_id in seen:
                repeats += 1
                continue
            seen.add(event.event_id)
            problem = access_problem(event)
            if problem is None:
                access_events.append(event)
            else:
                rejected.append(Rejected(event.event_id, problem, _safe_encode(event)))
            continue
        try:
            payload = msgspec.json.encode(event)
        except UnicodeEncodeError:
            rejected.append(
                Rejected(None, "run event is not valid Unicode", _fallback_payload(event))
            )
            continue
        event_id = run_event_id(payload)
        if event_id in seen:
            repeats += 1
            continue
        seen.add(event_id)
        # The encoding succeeded, so every string is valid Unicode, and a NUL in any of
        # them reads `\u0000` in the JSON: only then is the walk worth its cost.
        problem = event_time_problem(event.event_time, "eventTime") or (
            _walk_strings(msgspec.to_builtins(event), "run event")
            if b"\\u0000" in payload
            else None
        )
        if problem is None:
            run_events.append((event, event_id, payload.decode("utf-8")))
        else:
            rejected.append(Rejected(event_id, problem, payload))
    return Screened(run_events, access_events, rejected, repeats)


def _safe_encode(event: LineageEvent) -> bytes:
    try:
        return msgspec.json.encode(event)
    except UnicodeEncodeError:
        return _fallback_payload(event)


# --- rows ----------------------------------------------------------------------------


@dataclass
class Sighting:
    """A dataset or job named in the batch, with the earliest and latest time it was seen."""

    namespace: str
    name: str
    first_seen: datetime
    last_seen: datetime

    def see(self, moment: datetime) -> None:
        self.first_seen = min(self.first_seen, moment)
        self.last_seen = max(self.last_seen, moment)


class Sightings:
    """Datasets (or jobs) by identity key, each with the span of times it was seen."""

    def __init__(self) -> None:
        self.by_key: dict[bytes, Sighting] = {}
        # Hashing is the costly part for large batches that name few datasets.
        self._keys: dict[tuple[str, str], bytes] = {}

    def see(self, namespace: str, name: str, at: datetime) -> bytes:
        key = self._keys.get((namespace, name))
        if key is None:
            key = self._keys[(namespace, name)] = identity_key(namespace, name)
            self.by_key[key] = Sighting(namespace, name, at, at)
        else:
            self.by_key[key].see(at)
        return key


@dataclass(frozen=True)
class AccessPlan:
    datasets: dict[bytes, Sighting]
    # (event, dataset key), in batch order.
    rows: list[tuple[AccessEvent, bytes]]
    days: list[date]  # distinct UTC days, sorted


def plan_access(events: Iterable[AccessEvent]) -> AccessPlan:
    datasets = Sightings()
    rows: list[tuple[AccessEvent, bytes]] = []
    days: set[date] = set()
    for event in events:
        at = utc(event.time)
        rows.append((event, datasets.see(event.dataset_namespace, event.dataset_name, at)))
        days.add(at.date())
    return AccessPlan(datasets.by_key, rows, sorted(days))


@dataclass(frozen=True)
class RunState:
    """The state of one run after some of its events (see STATE_RANK)."""

    run_id: uuid.UUID
    job_key: bytes
    state: str
    rank: int
    state_time: datetime
    state_event_id: uuid.UUID
    facets_json: str
    started_at: datetime | None
    ended_at: datetime | None

    def precedence(self) -> tuple[int, datetime, bytes]:
        # uuid bytes compare as PostgreSQL compares uuids (memcmp).
        return (self.rank, self.state_time, self.state_event_id.bytes)


def run_state(event: RunEvent, event_id: uuid.UUID, job_key: bytes) -> RunState:
    at = utc(event.event_time)
    rank = STATE_RANK.get(event.event_type, 0)
    return RunState(
        run_id=event.run.run_id,
        job_key=job_key,
        state=event.event_type,
        rank=rank,
        state_time=at,
        state_event_id=event_id,
        facets_json=msgspec.json.encode(event.run.facets).decode("utf-8"),
        started_at=at if event.event_type == "START" else None,
        ended_at=at if rank == TERMINAL_RANK else None,
    )


def merge_run_state(current: RunState, incoming: RunState) -> RunState:
    """The state after both, whichever came first: commutative and associative, which is
    what makes out-of-order arrival end in the same row (the SQL upsert does the same)."""
    winner = incoming if incoming.precedence() > current.precedence() else current
    starts = [s for s in (current.started_at, incoming.started_at) if s is not None]
    return replace(winner, started_at=min(starts) if starts else None)


@dataclass(frozen=True)
class EdgeSighting:
    """One (source, target, run) triple and when this batch saw it."""

    source_key: bytes
    target_key: bytes
    run_id: uuid.UUID
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class ColumnEdgeSighting:
    key: bytes
    target_key: bytes
    target_column: str
    source_key: bytes
    source_column: str
    first_seen: datetime
    last_seen: datetime
    last_run_id: uuid.UUID


@dataclass(frozen=True)
class RunPlan:
    jobs: dict[bytes, Sighting]
    datasets: dict[bytes, Sighting]
    runs: list[RunState]  # sorted by run id
    # (run id, direction, dataset key), sorted.
    run_datasets: list[tuple[uuid.UUID, str, bytes]]
    edges: list[EdgeSighting]  # sorted by (source, target, run)
    column_edges: list[ColumnEdgeSighting]  # sorted by key


def _later(a: tuple[datetime, uuid.UUID], b: tuple[datetime, uuid.UUID]) -> bool:
    return (a[0], a[1].bytes) > (b[0], b[1].bytes)


def plan_runs(events: Sequence[tuple[RunEvent, uuid.UUID]]) -> RunPlan:
    """Rows for run events known to be new to the store.

    Every run event contributes its datasets and edges, not only COMPLETE: a START that
    already names an input and an output states a fact about the run. Edges are kept per
    run, so the store counts runs, not events.
    """
    jobs = Sightings()
    datasets = Sightings()
    runs: dict[uuid.UUID, RunState] = {}
    run_datasets: set[tuple[uuid.UUID, str, bytes]] = set()
    edges: dict[tuple[bytes, bytes, uuid.UUID], EdgeSighting] = {}
    column_edges: dict[bytes, ColumnEdgeSighting] = {}
    for event, event_id in events:
        at = utc(event.event_time)
        run_id = event.run.run_id
        job_key = jobs.see(event.job.namespace, event.job.name, at)
        state = run_state(event, event_id, job_key)
        runs[run_id] = merge_run_state(runs[run_id], state) if run_id in runs else state

        inputs = [datasets.see(d.namespace, d.name, at) for d in event.inputs]
        outputs = [datasets.see(d.namespace, d.name, at) for d in event.outputs]
        run_datasets.update((run_id, "input", key) for key in inputs)
        run_datasets.update((run_id, "output", key) for key in outputs)
        for source in inputs:
            for target in outputs:
                triple = (source, target, run_id)
                known = edges.get(triple)
                if known is not None:
                    first, last = min(known.first_seen, at), max(known.last_seen, at)
                else:
                    first = last = at
                edges[triple] = EdgeSighting(source, target, run_id, first, last)

        for output, target_key in zip(event.outputs, outputs, strict=True):
            lineage = output.facets.column_lineage
            if lineage is None:
                continue
            for column, sources in lineage.fields.items():
                for field in sources.input_fields:
                    key = identity_key(
                        output.namespace,
                        output.name,
                        column,
                        field.namespace,
                        field.name,
                        field.field,
                    )
                    sighting = ColumnEdgeSighting(
                        key=key,
                        target_key=target_key,
                        target_column=column,
                        source_key=datasets.see(field.namespace, field.name, at),
                        source_column=field.field,
                        first_seen=at,
                        last_seen=at,
                        last_run_id=run_id,
                    )
                    known_column = column_edges.get(key)
                    if known_column is not None:
                        newest = (
                            sighting
                            if _later(
                                (at, run_id), (known_column.last_seen, known_column.last_run_id)
                            )
                            else known_column
                        )
                        sighting = replace(newest, first_seen=min(known_column.first_seen, at))
                    column_edges[key] = sighting
    return RunPlan(
        jobs=jobs.by_key,
        datasets=datasets.by_key,
        runs=[runs[r] for r in sorted(runs)],
        run_datasets=sorted(run_datasets),
        edges=[edges[t] for t in sorted(edges)],
        column_edges=[column_edges[k] for k in sorted(column_edges)],
    )
