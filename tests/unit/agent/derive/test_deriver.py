"""The whole derivation: records in, access and run events out, secrets never in them."""

from __future__ import annotations

import string

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.capture import CaptureRecord
from agent.derive import DeriveConfig, Deriver
from agent.derive.redact import RedactionRules, redact_record
from agent.derive.runs import RunConfig
from agent.events import AccessEvent, LineageEvent, RunEvent, encode
from tests.unit.agent.factories import SECOND, T0, make_record, traceparent


def etl_records(secret: str) -> list[CaptureRecord]:
    trace = traceparent(0xE7)
    return [
        make_record(
            "r1",
            time_ns=T0,
            principal="etl",
            resource="dataset:sales",
            action="read",
            sql="SELECT id, price FROM orders",
            traceparent=trace,
            query=f"access_token={secret}",
            correlation={"x-vault-token": secret},
        ),
        make_record(
            "r2",
            time_ns=T0 + SECOND,
            principal="etl",
            resource="dataset:sales",
            action="write",
            sql=f"ALTER USER etl PASSWORD '{secret}'; "
            "INSERT INTO daily (total) SELECT SUM(price) FROM orders",
            traceparent=trace,
            body_excerpt=f'{{"password": "{secret}"}}',
        ),
        make_record(
            "r3",
            time_ns=T0 + 2 * SECOND,
            principal="mallory",
            resource="dataset:sales.salaries",
            action="read",
            decision="deny",
            status=403,
            sql=f"CREATE USER m IDENTIFIED BY '{secret}'",
        ),
    ]


def derive_all(records: list[CaptureRecord]) -> list[LineageEvent]:
    deriver = Deriver(
        DeriveConfig(
            runs=RunConfig(idle_timeout_ns=30 * SECOND),
            redaction=RedactionRules(header_names=frozenset({"x-vault-token"})),
        )
    )
    events: list[LineageEvent] = []
    for record in records:
        events.extend(deriver.feed(record))
    events.extend(deriver.tick(T0 + 60 * SECOND))
    assert deriver.open_runs == 0
    return events


def test_small_etl_gives_access_events_and_one_run_with_the_edge() -> None:
    events = derive_all(etl_records("Zq9hunter2"))
    runs = [e for e in events if isinstance(e, RunEvent)]
    accesses = [e for e in events if isinstance(e, AccessEvent)]
    assert [e.event_type for e in runs] == ["START", "COMPLETE"]
    complete = runs[-1]
    assert [d.name for d in complete.inputs] == ["sales.orders"]
    assert [d.name for d in complete.outputs] == ["sales.daily"]
    facet = complete.run.facets.lineage_sidecar
    assert facet is not None
    # The ALTER USER statement is noted as skipped; the INSERT beside it still counts.
    assert [p.request_id for p in facet.unparsed_sql] == ["r2"]
    assert {(a.principal, a.dataset_name, a.action, a.decision) for a in accesses} == {
        ("etl", "sales", "read", "allow"),
        ("etl", "sales.orders", "read", "allow"),
        ("etl", "sales", "write", "allow"),
        ("etl", "sales.daily", "write", "allow"),
        ("mallory", "sales.salaries", "read", "deny"),
    }


def test_derivation_is_deterministic_for_idempotent_ingestion() -> None:
    first = derive_all(etl_records("Zq9hunter2"))
    second = derive_all(etl_records("Zq9hunter2"))
    assert [encode(e) for e in first] == [encode(e) for e in second]
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert len({e.event_id for e in first}) == len(first)


SECRET = st.text(string.ascii_letters + string.digits + "!%^_+~.-", max_size=24).map(
    lambda s: "Zq9" + s
)


@settings(max_examples=40, deadline=None)
@given(SECRET)
def test_no_secret_reaches_any_event(secret: str) -> None:
    for event in derive_all(etl_records(secret)):
        assert secret.encode() not in encode(event)


RECORDS = st.builds(
    make_record,
    request_id=st.text(max_size=20),
    time_ns=st.integers(min_value=-(2**63), max_value=2**63),
    duration_us=st.integers(min_value=-(2**31), max_value=2**31),
    status=st.integers(min_value=0, max_value=999),
    decision=st.sampled_from(["allow", "deny", "unauthenticated", "error", "none"]),
    resource=st.one_of(
        st.none(), st.text(max_size=30), st.text(max_size=20).map("dataset:".__add__)
    ),
    action=st.one_of(st.none(), st.sampled_from(["read", "write", "delete", ""])),
    traceparent=st.one_of(st.none(), st.text(max_size=60), st.integers(0, 3).map(traceparent)),
    sql=st.one_of(st.none(), st.text(max_size=80), st.just("INSERT INTO t (a) SELECT b FROM s")),
    sql_dialect=st.sampled_from([None, "postgres", "sqlite", "nonsense"]),
    correlation=st.dictionaries(st.sampled_from(["x-run-id", "x-end"]), st.text(max_size=10)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(RECORDS, max_size=8))
def test_any_records_derive_without_raising(records: list[CaptureRecord]) -> None:
    deriver = Deriver(
        DeriveConfig(runs=RunConfig(run_header="x-run-id", end_header="x-end", max_open_runs=3))
    )
    for record in records:
        for event in deriver.feed(record):
            encode(event)
    deriver.tick(2**70)
    assert deriver.flush() == []
    assert deriver.open_runs == 0


def column_edges(event: RunEvent) -> set[tuple[str, str, str, str]]:
    """(output dataset, output column, input dataset, input column) of a run event."""
    return {
        (output.name, column, source.name, source.field)
        for output in event.outputs
        if output.facets.column_lineage is not None
        for column, field in output.facets.column_lineage.fields.items()
        for source in field.input_fields
    }


@pytest.mark.parametrize(
    ("sql", "reads", "writes", "edges"),
    [
        ("SELECT token FROM sales.sessions", ["sales.sessions"], [], set()),
        ("SELECT basic, negotiate, bearer FROM sales.plans", ["sales.plans"], [], set()),
        ("SELECT id FROM sales.users WHERE token = 'Zq9abc'", ["sales.users"], [], set()),
        (
            "SELECT u.id FROM sales.users u JOIN sales.sessions s ON s.token = u.token",
            ["sales.sessions", "sales.users"], [], set(),
        ),
        (
            "SELECT * FROM sales.users WHERE password_hash = crypt('Zq9abc', password_hash)",
            ["sales.users"], [], set(),
        ),
        (
            "UPDATE sales.t SET secret_id = s.id FROM sales.s WHERE t.key = s.key",
            ["sales.s"], ["sales.t"], {("sales.t", "secret_id", "sales.s", "id")},
        ),
        (
            "INSERT INTO sales.report (k, v) SELECT a.key, b.v FROM sales.a a "
            "JOIN sales.b b ON a.key = b.key WHERE b.token = 'Zq9abc'",
            ["sales.a", "sales.b"], ["sales.report"],
            {("sales.report", "k", "sales.a", "key"), ("sales.report", "v", "sales.b", "v")},
        ),
    ],
)  # fmt: skip
def test_secret_like_names_keep_their_lineage_and_lose_their_literals(
    sql: str, reads: list[str], writes: list[str], edges: set[tuple[str, str, str, str]]
) -> None:
    record = make_record(sql=sql, sql_dialect="postgres", resource="database:sales", action="query")
    deriver = Deriver()
    events = [*deriver.feed(record), *deriver.flush()]
    complete = [e for e in events if isinstance(e, RunEvent)][-1]
    assert [d.name for d in complete.inputs] == reads
    assert [d.name for d in complete.outputs] == writes
    assert column_edges(complete) == edges
    facet = complete.run.facets.lineage_sidecar
    assert facet is not None
    assert facet.unparsed_sql == ()
    assert "Zq9abc" not in str(redact_record(record, RedactionRules()).sql)


def test_long_body_is_redacted_in_time_and_its_secret_never_reaches_an_event() -> None:
    # Half a MiB of "a-a-a-...": the redaction that scanned from every word start would
    # take minutes on this excerpt.
    word = "a-" * 262_144
    record = make_record(
        resource="dataset:sales.orders",
        action="read",
        body_excerpt=f"{word} https://etl:Zq9hunter2@db.internal/x {word}",
    )
    events = Deriver().feed(record)
    assert [e.dataset_name for e in events if isinstance(e, AccessEvent)] == ["sales.orders"]
    assert all(b"Zq9hunter2" not in encode(e) for e in events)


def test_oversized_sql_is_noted_by_its_captured_size_and_the_record_still_counts() -> None:
    sql = "ALTER USER etl PASSWORD 'Zq9hunter2'; SELECT id FROM orders WHERE n = 1;" * 20
    deriver = Deriver(DeriveConfig(max_sql_bytes=len(sql) - 1))
    events = deriver.feed(
        make_record(resource="dataset:sales.orders", action="read", sql=sql, traceparent=None)
    )
    events.extend(deriver.flush())
    assert [e.dataset_name for e in events if isinstance(e, AccessEvent)] == ["sales.orders"]
    complete = [e for e in events if isinstance(e, RunEvent)][-1]
    # The route's own read is what is known; the SQL is noted with its size as captured.
    assert [d.name for d in complete.inputs] == ["sales.orders"]
    facet = complete.run.facets.lineage_sidecar
    assert facet is not None
    assert [p.reason for p in facet.unparsed_sql] == [
        f"SQL text is {len(sql)} bytes, over the {len(sql) - 1} byte limit"
    ]
    assert all(b"Zq9hunter2" not in encode(e) for e in events)


def test_snapshot_restores_open_runs_exactly() -> None:
    traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    records = [
        make_record(
            f"r{i}",
            traceparent=traced,
            resource=resource,
            action=action,
            sql="insert into report select * from orders" if i == 2 else None,
        )
        for i, (resource, action) in enumerate(
            [
                ("dataset:sales.orders", "read"),
                ("dataset:sales.customers", "read"),
                ("database:sales", "write"),
            ]
        )
    ]
    original = Deriver()
    for record in records:
        original.feed(record)
    assert original.open_runs == 1
    copy = Deriver()
    copy.restore(original.snapshot())
    assert copy.open_runs == 1
    assert copy.snapshot() == original.snapshot()
    assert copy.flush() == original.flush()


def test_garbage_snapshot_is_refused() -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        Deriver().restore(b"\x93garbage")
