"""Run correlation: group requests into OpenLineage runs, so "read A, then wrote B" is A -> B.

A pure state machine. It is fed capture records in arrival order, each with the lineage
facts of its request, and answers with the RunEvents that became due:

* Requests that carry the configured correlation header share that header's run; failing
  that, requests whose W3C `traceparent` carries the same trace id share a run; a request
  with neither is a run of its own, started and completed at once.
* A run's id is a name-based UUID of its correlation key, so the same traffic always gives
  the same run id (a trace that crosses two sidecars is one run in the store).
* START is emitted with the first request that touches a dataset; requests without any
  lineage facts join a run that is open but never open one.
* The run ends with COMPLETE, or FAIL when any of its requests got a 5xx: when a request
  carries the configured end header, when it has been idle for `idle_timeout_ns`, or when
  more than `max_open_runs` are open, the least recently active first (its facet says
  `evicted`).

Idleness is measured on the records' own clock while records flow, so replaying a backlog
groups requests exactly as live traffic would; `tick(now_ns)` applies the wall clock and is
meant for when the spool is drained. Proxy and agent share the host's clock, so a record
stamped more than `MAX_CLOCK_LEAD_NS` after the agent's wall clock was stamped by a clock
that jumped: it is placed at the correlator's current time instead. Taken as it is, it
would move the correlator's clock into the future for good, and every later run would end
after its first request.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

from agent.capture import CaptureRecord
from agent.derive.routes import ColumnLink, DatasetRef, RequestLineage
from agent.events import (
    MAX_EDGES_PER_EVENT,
    RUN_ID_NAMESPACE,
    ColumnLineageFacet,
    ColumnLineageField,
    DatasetFacets,
    EventType,
    InputDataset,
    InputField,
    Job,
    OutputDataset,
    Run,
    RunEvent,
    RunFacets,
    SidecarRunFacet,
    UnparsedSql,
    name_uuid,
    time_from_ns,
)

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?$")
_END_VALUES = frozenset({"end", "complete", "completed", "done", "true", "1"})
_FAIL_VALUES = frozenset({"fail", "failed", "error"})
MAX_SQL_PROBLEMS_PER_RUN = 100
# How far ahead of the agent's wall clock a record's time may be and still be taken as it is.
MAX_CLOCK_LEAD_NS = 5_000_000_000


# A header name as the capture records it: lower case (the tap lower-cases the names).
_HEADER_NAME = msgspec.Meta(min_length=1, max_length=256, pattern=r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_SECOND_NS = 1_000_000_000


class RunConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How requests are grouped into runs."""

    job_namespace: Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=1024),
        msgspec.Meta(description="OpenLineage job namespace of every run this agent emits."),
    ] = "lineage-sidecar"
    run_header: Annotated[
        Annotated[str, _HEADER_NAME] | None,
        msgspec.Meta(
            description="Header (lower case, one of the proxy's capture.correlation_headers) "
            "whose value names a run; it wins over the trace id. null: runs follow the W3C "
            "traceparent."
        ),
    ] = None
    job_header: Annotated[
        Annotated[str, _HEADER_NAME] | None,
        msgspec.Meta(
            description="Header (lower case, captured) whose value names the job; without it "
            "the job is named after the principal."
        ),
    ] = None
    end_header: Annotated[
        Annotated[str, _HEADER_NAME] | None,
        msgspec.Meta(
            description="Header (lower case, captured) that ends a run: "
            '"end"/"complete"/"done"/"true"/"1", or "fail" to fail it.'
        ),
    ] = None
    idle_timeout_ns: Annotated[
        int,
        msgspec.Meta(ge=_SECOND_NS // 1000, le=7 * 86400 * _SECOND_NS),
        msgspec.Meta(
            description="A run with no request for this long is complete (nanoseconds, "
            "1 ms to 7 days)."
        ),
    ] = 30 * _SECOND_NS
    max_open_runs: Annotated[
        int,
        msgspec.Meta(ge=1, le=10_000_000),
        msgspec.Meta(
            description="Open runs kept in memory; beyond this the least recently active "
            "is completed."
        ),
    ] = 10_000
    # The lists are also cut where inputs x outputs would pass
    # `agent.events.MAX_EDGES_PER_EVENT`: the event is still emitted.
    max_datasets_per_run: Annotated[
        int,
        msgspec.Meta(ge=1, le=1_000_000),
        msgspec.Meta(
            description="Datasets (inputs plus outputs) kept per run; beyond this the run's "
            "lists are cut and its facet says `truncated`."
        ),
    ] = 1_000
    max_column_links_per_run: Annotated[
        int,
        msgspec.Meta(ge=0, le=10_000_000),
        msgspec.Meta(
            description="Column lineage edges kept per run; beyond this they are cut and the "
            "run's facet says `truncated`. 0: no column lineage."
        ),
    ] = 10_000


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent header, None when absent or malformed."""
    if traceparent is None:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None:
        return None
    version, trace, parent, _flags = match.groups()
    # Version ff is forbidden and all-zero ids are invalid (W3C Trace Context, 3.2.2).
    if version == "ff" or trace == "0" * 32 or parent == "0" * 16:
        return None
    if version == "00" and len(traceparent.strip()) != 55:
        return None
    return trace


def correlation_key(record: CaptureRecord, config: RunConfig) -> tuple[str, bool]:
    """The key that groups this request with others, and whether others can share it."""
    if config.run_header is not None:
        value = record.correlation.get(config.run_header)
        if value:
            return f"header:{config.run_header}={value}", True
    trace = trace_id(record.traceparent)
    if trace is not None:
        return f"trace:{trace}", True
    return f"request:{record.service}/{record.request_id}", False


def run_id_for(key: str) -> uuid.UUID:
    return name_uuid(RUN_ID_NAMESPACE, key)


@dataclass
class _OpenRun:
    key: str
    run_id: uuid.UUID
    job_name: str
    started_ns: int
    last_activity_ns: int
    requests: int = 0
    failed_requests: int = 0
    truncated: bool = False
    # Dicts as ordered sets: deterministic, and cheap to test for membership.
    inputs: dict[DatasetRef, None] = field(default_factory=dict)
    outputs: dict[DatasetRef, None] = field(default_factory=dict)
    columns: dict[ColumnLink, None] = field(default_factory=dict)
    sql_problems: list[UnparsedSql] = field(default_factory=list)


class _RunState(msgspec.Struct, frozen=True, array_like=True):
    """One open run as a checkpoint stores it (plain data: decoding runs no code)."""

    key: str
    run_id: uuid.UUID
    job_name: str
    started_ns: int
    last_activity_ns: int
    requests: int
    failed_requests: int
    truncated: bool
    inputs: list[DatasetRef]
    outputs: list[DatasetRef]
    columns: list[ColumnLink]
    sql_problems: list[UnparsedSql]


class _CorrelatorState(msgspec.Struct, frozen=True):
    clock_ns: int
    # Least recently active first, as the correlator keeps them.
    runs: list[_RunState]


class RunCorrelator:
    """Feed it records in arrival order; it returns the run events that are due."""

    def __init__(self, config: RunConfig, wall_clock: Callable[[], int] = time.time_ns) -> None:
        self._config = config
        self._wall_clock = wall_clock
        # Ordered by last activity, least recent first: idle runs and eviction candidates
        # are always at the front.
        self._open: OrderedDict[str, _OpenRun] = OrderedDict()
        self._clock_ns = 0

    @property
    def open_runs(self) -> int:
        return len(self._open)

    def snapshot(self) -> bytes:
        """The open runs as bytes (msgpack), for a checkpoint; `restore` reads them back."""
        runs = [
            _RunState(
                key=run.key,
                run_id=run.run_id,
                job_name=run.job_name,
                started_ns=run.started_ns,
                last_activity_ns=run.last_activity_ns,
                requests=run.requests,
                failed_requests=run.failed_requests,
                truncated=run.truncated,
                inputs=list(run.inputs),
                outputs=list(run.outputs),
                columns=list(run.columns),
                sql_problems=list(run.sql_problems),
            )
            for run in self._open.values()
        ]
        return msgspec.msgpack.encode(_CorrelatorState(clock_ns=self._clock_ns, runs=runs))

    def restore(self, data: bytes) -> None:
        """Replace the open runs with a snapshot's; raises msgspec errors on bad data."""
        state = msgspec.msgpack.decode(data, type=_CorrelatorState)
        self._open = OrderedDict(
            (
                run.key,
                _OpenRun(
                    key=run.key,
                    run_id=run.run_id,
                    job_name=run.job_name,
                    started_ns=run.started_ns,
                    last_activity_ns=run.last_activity_ns,
                    requests=run.requests,
                    failed_requests=run.failed_requests,
                    truncated=run.truncated,
                    inputs=dict.fromkeys(run.inputs),
                    outputs=dict.fromkeys(run.outputs),
                    columns=dict.fromkeys(run.columns),
                    sql_problems=list(run.sql_problems),
                ),
            )
            for run in state.runs
        )
        # A checkpoint written after a clock jump carries the jump: bring it back too.
        ceiling = self._ceiling()
        for run in self._open.values():
            run.started_ns = min(run.started_ns, ceiling)
            run.last_activity_ns = min(run.last_activity_ns, ceiling)
        self._clock_ns = min(state.clock_ns, ceiling)

    def _ceiling(self) -> int:
        return self._wall_clock() + MAX_CLOCK_LEAD_NS

    def feed(self, record: CaptureRecord, lineage: RequestLineage) -> list[RunEvent]:
        events: list[RunEvent] = []
        at_ns = record.time_ns
        if at_ns > self._ceiling():
            at_ns = self._clock_ns or self._wall_clock()
        end_ns = at_ns + record.duration_us * 1_000
        self._clock_ns = max(self._clock_ns, at_ns)
        events.extend(self._complete_idle(self._clock_ns))

        key, shared = correlation_key(record, self._config)
        run = self._open.get(key)
        if run is None:
            if not lineage.has_lineage:
                return events
            run = self._start(key, record, at_ns)
            self._open[key] = run
            self._add(run, record, lineage, end_ns)
            events.append(self._event(run, "START", run.started_ns))
        else:
            self._open.move_to_end(key)
            self._add(run, record, lineage, end_ns)

        ending = self._explicit_end(record)
        if not shared or ending is not None:
            completion = "single-request" if not shared else "explicit"
            events.append(self._finish(key, completion, fail=ending == "fail"))
        while len(self._open) > self._config.max_open_runs:
            oldest = next(iter(self._open))
            events.append(self._finish(oldest, "evicted"))
        return events

    def tick(self, now_ns: int) -> list[RunEvent]:
        """Complete the runs idle at wall-clock time `now_ns`."""
        self._clock_ns = max(self._clock_ns, now_ns)
        return self._complete_idle(self._clock_ns)

    def flush(self) -> list[RunEvent]:
        """Complete every open run (shutdown)."""
        return [self._finish(key, "shutdown") for key in list(self._open)]

    def _start(self, key: str, record: CaptureRecord, at_ns: int) -> _OpenRun:
        job_name = None
        if self._config.job_header is not None:
            job_name = record.correlation.get(self._config.job_header)
        return _OpenRun(
            key=key,
            run_id=run_id_for(key),
            job_name=job_name or record.principal or "anonymous",
            started_ns=at_ns,
            last_activity_ns=at_ns,
        )

    def _add(
        self, run: _OpenRun, record: CaptureRecord, lineage: RequestLineage, end_ns: int
    ) -> None:
        run.requests += 1
        if record.status >= 500:
            run.failed_requests += 1
        run.last_activity_ns = max(run.last_activity_ns, end_ns)
        limit = self._config.max_datasets_per_run
        for target, datasets in ((run.inputs, lineage.reads), (run.outputs, lineage.writes)):
            for dataset in datasets:
                if dataset in target:
                    continue
                inputs, outputs = len(run.inputs), len(run.outputs)
                edges = (inputs + 1) * outputs if target is run.inputs else inputs * (outputs + 1)
                if inputs + outputs >= limit or edges > MAX_EDGES_PER_EVENT:
                    run.truncated = True
                    break
                target[dataset] = None
        for link in lineage.columns:
            if len(run.columns) >= self._config.max_column_links_per_run:
                run.truncated = True
                break
            run.columns[link] = None
        for problem in lineage.sql_problems:
            if len(run.sql_problems) >= MAX_SQL_PROBLEMS_PER_RUN:
                run.truncated = True
                break
            run.sql_problems.append(UnparsedSql(request_id=record.request_id, reason=problem))

    def _explicit_end(self, record: CaptureRecord) -> str | None:
        if self._config.end_header is None:
            return None
        value = record.correlation.get(self._config.end_header, "").strip().lower()
        if value in _FAIL_VALUES:
            return "fail"
        if value in _END_VALUES:
            return "end"
        return None

    def _complete_idle(self, now_ns: int) -> list[RunEvent]:
        events: list[RunEvent] = []
        while self._open:
            key, run = next(iter(self._open.items()))
            if now_ns - run.last_activity_ns < self._config.idle_timeout_ns:
                break
            events.append(self._finish(key, "idle"))
        return events

    def _finish(self, key: str, completion: str, *, fail: bool = False) -> RunEvent:
        run = self._open.pop(key)
        event_type: EventType = "FAIL" if fail or run.failed_requests else "COMPLETE"
        return self._event(run, event_type, run.last_activity_ns, completion)

    def _event(
        self, run: _OpenRun, event_type: EventType, time_ns: int, completion: str = ""
    ) -> RunEvent:
        facet = SidecarRunFacet(
            correlation=run.key,
            requests=run.requests,
            failed_requests=run.failed_requests,
            completion=completion,
            truncated=run.truncated,
            unparsed_sql=tuple(run.sql_problems),
        )
        return RunEvent(
            event_type=event_type,
            event_time=time_from_ns(time_ns),
            run=Run(run_id=run.run_id, facets=RunFacets(lineage_sidecar=facet)),
            job=Job(namespace=self._config.job_namespace, name=run.job_name),
            inputs=tuple(
                InputDataset(namespace=d.namespace, name=d.name) for d in sorted(run.inputs)
            ),
            outputs=tuple(_outputs(run)),
        )


def _outputs(run: _OpenRun) -> list[OutputDataset]:
    by_output: dict[DatasetRef, dict[str, set[InputField]]] = {}
    for link in run.columns:
        fields = by_output.setdefault(link.output, {})
        fields.setdefault(link.output_column, set()).add(
            InputField(
                namespace=link.input.namespace, name=link.input.name, field=link.input_column
            )
        )
    outputs: list[OutputDataset] = []
    for dataset in sorted(run.outputs):
        columns = by_output.get(dataset)
        facets = DatasetFacets()
        if columns:
            facets = DatasetFacets(
                column_lineage=ColumnLineageFacet(
                    fields={
                        column: ColumnLineageField(input_fields=tuple(sorted(sources)))
                        for column, sources in sorted(columns.items())
                    }
                )
            )
        outputs.append(OutputDataset(namespace=dataset.namespace, name=dataset.name, facets=facets))
    return outputs
