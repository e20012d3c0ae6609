"""Run correlation scenarios: which requests form a run, and what its events say."""

from __future__ import annotations

from typing import Any

from agent.capture import CaptureRecord
from agent.derive.routes import request_lineage
from agent.derive.runs import RunConfig, RunCorrelator, run_id_for, trace_id
from agent.events import MAX_EDGES_PER_EVENT, RunEvent
from tests.unit.agent.factories import SECOND, SERVICE, T0, make_record, traceparent

IDLE = 30 * SECOND


def read(request_id: str, dataset: str, at: int = T0, **fields: Any) -> CaptureRecord:
    return make_record(
        request_id, time_ns=at, resource=f"dataset:{dataset}", action="read", **fields
    )


def write(request_id: str, dataset: str, at: int = T0, **fields: Any) -> CaptureRecord:
    return make_record(
        request_id,
        time_ns=at,
        method="POST",
        resource=f"dataset:{dataset}",
        action="write",
        **fields,
    )


def feed(correlator: RunCorrelator, *records: CaptureRecord) -> list[RunEvent]:
    events: list[RunEvent] = []
    for record in records:
        events.extend(correlator.feed(record, request_lineage(record)))
    return events


def io(event: RunEvent) -> tuple[list[str], list[str]]:
    return [d.name for d in event.inputs], [d.name for d in event.outputs]


def sidecar(event: RunEvent) -> Any:
    facet = event.run.facets.lineage_sidecar
    assert facet is not None
    return facet


def test_read_then_write_in_one_trace_is_an_edge() -> None:
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE))
    trace = traceparent(0xA1)
    started = feed(
        runs,
        read("r1", "sales.orders", T0, traceparent=trace),
        write("r2", "mart.daily", T0 + SECOND, traceparent=traceparent(0xA1, span=2)),
    )
    assert [e.event_type for e in started] == ["START"]
    assert io(started[0]) == (["sales.orders"], [])
    assert runs.tick(T0 + 2 * SECOND) == []  # not idle yet

    (complete,) = runs.tick(T0 + SECOND + IDLE + 1_000_000)
    assert complete.event_type == "COMPLETE"
    assert io(complete) == (["sales.orders"], ["mart.daily"])
    assert complete.run.run_id == started[0].run.run_id == run_id_for(f"trace:{0xA1:032x}")
    assert {d.namespace for d in complete.inputs} == {d.namespace for d in complete.outputs}
    assert complete.inputs[0].namespace == SERVICE
    assert sidecar(complete).requests == 2
    assert sidecar(complete).completion == "idle"
    assert runs.open_runs == 0


def test_interleaved_traces_do_not_mix() -> None:
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE))
    events = feed(
        runs,
        read("r1", "a", T0, traceparent=traceparent(1)),
        read("r2", "c", T0 + 1, traceparent=traceparent(2)),
        write("r3", "b", T0 + 2, traceparent=traceparent(1)),
        write("r4", "d", T0 + 3, traceparent=traceparent(2)),
    )
    assert [e.event_type for e in events] == ["START", "START"]
    completes = runs.tick(T0 + IDLE + SECOND)
    assert sorted(io(e) for e in completes) == [(["a"], ["b"]), (["c"], ["d"])]


def test_backlog_replay_measures_idleness_on_the_records_clock() -> None:
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE))
    events = feed(
        runs,
        read("r1", "a", T0, traceparent=traceparent(1)),
        write("r2", "b", T0 + IDLE + SECOND, traceparent=traceparent(2)),
    )
    # Trace 1 went quiet for longer than the timeout before trace 2's request arrived.
    assert [(e.event_type, io(e)) for e in events] == [
        ("START", (["a"], [])),
        ("COMPLETE", (["a"], [])),
        ("START", ([], ["b"])),
    ]


def test_a_record_stamped_by_a_clock_that_jumped_ahead_does_not_end_later_runs() -> None:
    # The host's clock jumped 285 years ahead for one request, then came back.
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE), wall_clock=lambda: T0 + 10 * SECOND)
    feed(runs, read("before", "w", T0))
    events = feed(runs, read("bogus", "x", T0 + 9 * 10**18))
    assert [e.event_type for e in events] == ["START", "COMPLETE"]  # a run of its own
    # Placed at the time of the records around it, not in the future.
    assert events[0].event_time.timestamp() * SECOND == T0
    trace = [read(f"t{i}", "a", T0 + i * SECOND, traceparent=traceparent(7)) for i in range(3)]
    assert [e.event_type for e in feed(runs, *trace)] == ["START"]
    (complete,) = runs.flush()
    assert sidecar(complete).requests == 3


def test_a_checkpoint_taken_after_a_clock_jump_is_brought_back_on_restore() -> None:
    ahead = T0 + 9 * 10**18
    jumped = RunCorrelator(RunConfig(idle_timeout_ns=IDLE), wall_clock=lambda: ahead)
    feed(jumped, read("r1", "a", ahead, traceparent=traceparent(7)))
    now = T0 + 10 * SECOND
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE), wall_clock=lambda: now)
    runs.restore(jumped.snapshot())
    feed(runs, read("r2", "b", T0 + SECOND, traceparent=traceparent(7)))
    # The run goes idle like any other, instead of waiting 285 years.
    (complete,) = runs.tick(now + 5 * SECOND + IDLE)
    assert sidecar(complete).requests == 2
    assert complete.event_time.timestamp() * SECOND <= now + 5 * SECOND


def test_request_without_correlation_is_a_run_of_its_own() -> None:
    runs = RunCorrelator(RunConfig())
    events = feed(runs, read("r1", "a"), read("r2", "b"))
    assert [e.event_type for e in events] == ["START", "COMPLETE", "START", "COMPLETE"]
    assert events[0].run.run_id == events[1].run.run_id != events[2].run.run_id
    assert events[0].run.run_id == run_id_for(f"request:{SERVICE}/r1")
    assert runs.open_runs == 0


def test_malformed_traceparent_is_no_trace() -> None:
    for bad in [
        "garbage",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # all-zero trace id
        "ff-" + "a" * 32 + "-" + "1" * 16 + "-01",  # forbidden version
        "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # upper-case hex
        "00-" + "a" * 32 + "-" + "1" * 16 + "-01-extra",  # version 00 has no extra fields
    ]:
        assert trace_id(bad) is None, bad
    assert trace_id("01-" + "a" * 32 + "-" + "1" * 16 + "-01-future") == "a" * 32


def test_run_header_wins_over_the_trace() -> None:
    runs = RunCorrelator(RunConfig(run_header="x-run-id", idle_timeout_ns=IDLE))
    feed(
        runs,
        read("r1", "a", traceparent=traceparent(1), correlation={"x-run-id": "nightly-7"}),
        write("r2", "b", traceparent=traceparent(2), correlation={"x-run-id": "nightly-7"}),
    )
    (complete,) = runs.flush()
    assert io(complete) == (["a"], ["b"])
    assert complete.run.run_id == run_id_for("header:x-run-id=nightly-7")


def test_job_name_from_header_or_principal() -> None:
    runs = RunCorrelator(RunConfig(job_header="x-job", job_namespace="etl"))
    (start, _) = feed(runs, read("r1", "a", correlation={"x-job": "orders_daily"}))
    assert (start.job.namespace, start.job.name) == ("etl", "orders_daily")
    (start, _) = feed(runs, read("r2", "a", principal="bob"))
    assert start.job.name == "bob"


def test_server_error_fails_the_run() -> None:
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE))
    feed(
        runs,
        read("r1", "a", traceparent=traceparent(1)),
        write("r2", "b", traceparent=traceparent(1), status=500),
    )
    (ended,) = runs.tick(T0 + 2 * IDLE)
    assert ended.event_type == "FAIL"
    assert sidecar(ended).failed_requests == 1


def test_explicit_end_header_completes_or_fails_at_once() -> None:
    config = RunConfig(end_header="x-run-state", idle_timeout_ns=IDLE)
    runs = RunCorrelator(config)
    events = feed(
        runs,
        read("r1", "a", traceparent=traceparent(1)),
        write("r2", "b", traceparent=traceparent(1), correlation={"x-run-state": "complete"}),
    )
    assert [e.event_type for e in events] == ["START", "COMPLETE"]
    assert sidecar(events[1]).completion == "explicit"
    events = feed(
        runs,
        read("r3", "a", traceparent=traceparent(2)),
        make_record("r4", traceparent=traceparent(2), correlation={"x-run-state": "fail"}),
    )
    assert [e.event_type for e in events] == ["START", "FAIL"]


def test_requests_without_datasets_join_runs_but_never_open_one() -> None:
    runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE))
    assert feed(runs, make_record("r0", traceparent=traceparent(1), resource=None)) == []
    assert runs.open_runs == 0
    feed(
        runs,
        read("r1", "a", traceparent=traceparent(1)),
        make_record("r2", traceparent=traceparent(1), resource=None, status=502),
    )
    (ended,) = runs.flush()
    assert sidecar(ended).requests == 2
    assert ended.event_type == "FAIL"


def test_too_many_open_runs_completes_the_least_recently_active() -> None:
    runs = RunCorrelator(RunConfig(max_open_runs=2, idle_timeout_ns=IDLE))
    events = feed(
        runs,
        read("r1", "a", T0, traceparent=traceparent(1)),
        read("r2", "b", T0 + 1, traceparent=traceparent(2)),
        read("r3", "a2", T0 + 2, traceparent=traceparent(1)),  # trace 1 is active again
        read("r4", "c", T0 + 3, traceparent=traceparent(3)),
    )
    evicted = [e for e in events if e.event_type == "COMPLETE"]
    assert len(evicted) == 1
    assert io(evicted[0]) == (["b"], [])
    assert sidecar(evicted[0]).completion == "evicted"
    assert runs.open_runs == 2


def test_datasets_beyond_the_per_run_limit_are_cut_and_flagged() -> None:
    runs = RunCorrelator(RunConfig(max_datasets_per_run=2))
    feed(runs, *(read(f"r{i}", f"t{i}", traceparent=traceparent(1)) for i in range(5)))
    (ended,) = runs.flush()
    assert len(ended.inputs) == 2
    assert sidecar(ended).truncated


def test_a_run_is_cut_before_its_edges_pass_the_per_event_limit_and_still_emitted() -> None:
    runs = RunCorrelator(RunConfig(max_datasets_per_run=1_000))
    reads = [read(f"r{i}", f"in{i}", traceparent=traceparent(1)) for i in range(150)]
    writes = [write(f"w{i}", f"out{i}", traceparent=traceparent(1)) for i in range(150)]
    feed(runs, *reads, *writes)
    (ended,) = runs.flush()
    assert ended.event_type == "COMPLETE"
    assert len(ended.inputs) == 150
    assert len(ended.outputs) == MAX_EDGES_PER_EVENT // 150
    assert len(ended.inputs) * len(ended.outputs) <= MAX_EDGES_PER_EVENT
    assert sidecar(ended).truncated


def test_column_lineage_lands_on_the_complete_event_outputs() -> None:
    runs = RunCorrelator(RunConfig())
    record = write("r1", "sales", sql="INSERT INTO daily (total) SELECT SUM(price) FROM orders")
    _start, complete = feed(runs, record)
    (output,) = complete.outputs
    assert output.name == "sales.daily"
    facet = output.facets.column_lineage
    assert facet is not None
    (source,) = facet.fields["total"].input_fields
    assert (source.namespace, source.name, source.field) == (SERVICE, "sales.orders", "price")


def test_unparsed_sql_is_recorded_in_the_run() -> None:
    runs = RunCorrelator(RunConfig())
    _start, complete = feed(runs, read("r1", "sales", sql="SELECT * FROM ("))
    (problem,) = sidecar(complete).unparsed_sql
    assert problem.request_id == "r1"
    assert "syntax error" in problem.reason


def test_same_records_give_the_same_events_and_ids() -> None:
    records = [
        read("r1", "a", T0, traceparent=traceparent(1)),
        write(
            "r2", "b", T0 + 5, traceparent=traceparent(1), sql="INSERT INTO b (x) SELECT y FROM a"
        ),
        read("r3", "c", T0 + 6),
    ]

    def run_all() -> list[RunEvent]:
        runs = RunCorrelator(RunConfig(idle_timeout_ns=IDLE))
        return feed(runs, *records) + runs.tick(T0 + 2 * IDLE)

    first, second = run_all(), run_all()
    assert first == second
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert len({e.event_id for e in first}) == len(first)
