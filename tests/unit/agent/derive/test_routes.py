"""One request -> dataset reads and writes, column links, and access events."""

from __future__ import annotations

import pytest

from agent.capture import Decision
from agent.derive.routes import (
    ColumnLink,
    DatasetAccess,
    DatasetRef,
    access_events,
    request_lineage,
)
from tests.unit.agent.factories import SERVICE, make_record


def ds(name: str) -> DatasetRef:
    return DatasetRef(namespace=SERVICE, name=name)


def test_route_read_names_the_dataset_in_the_service_namespace() -> None:
    lineage = request_lineage(make_record(resource="dataset:sales.orders", action="read"))
    assert lineage.reads == (ds("sales.orders"),)
    assert lineage.writes == ()
    assert lineage.accesses == (DatasetAccess(dataset=ds("sales.orders"), action="read"),)


def test_route_write() -> None:
    lineage = request_lineage(
        make_record(resource="dataset:mart.daily", action="write", method="POST")
    )
    assert lineage.writes == (ds("mart.daily"),)
    assert lineage.reads == ()


def test_resource_that_is_not_a_dataset_gives_nothing() -> None:
    lineage = request_lineage(make_record(resource="admin:policies", action="read"))
    assert not lineage.has_lineage
    assert lineage.accesses == ()
    assert access_events(make_record(resource="admin:policies"), lineage) == []


def test_action_that_is_neither_read_nor_write_is_access_only() -> None:
    lineage = request_lineage(make_record(resource="dataset:sales.orders", action="describe"))
    assert not lineage.has_lineage
    assert [a.action for a in lineage.accesses] == ["describe"]


def test_unqualified_sql_tables_take_the_route_dataset_as_database() -> None:
    record = make_record(
        resource="dataset:sales",
        action="write",
        sql="INSERT INTO daily (total) SELECT SUM(price) FROM orders; SELECT * FROM hr.staff",
    )
    lineage = request_lineage(record)
    assert lineage.reads == (ds("hr.staff"), ds("sales.orders"))
    assert lineage.writes == (ds("sales.daily"),)
    assert lineage.columns == (
        ColumnLink(
            output=ds("sales.daily"),
            output_column="total",
            input=ds("sales.orders"),
            input_column="price",
        ),
    )
    # The route's own dataset is the container, audited but not a lineage node.
    assert {(a.dataset.name, a.action) for a in lineage.accesses} == {
        ("sales", "write"),
        ("sales.daily", "write"),
        ("sales.orders", "read"),
        ("hr.staff", "read"),
    }


def test_sql_dialect_of_the_route_is_used() -> None:
    record = make_record(
        resource="dataset:proj", action="read", sql="SELECT a FROM `ds.tbl`", sql_dialect="bigquery"
    )
    assert request_lineage(record).reads == (ds("ds.tbl"),)


def test_unparseable_sql_is_recorded_and_falls_back_to_the_route() -> None:
    for sql, reason in [
        ("SELECT * FROM orders WHERE (", "syntax error"),
        ("SELEC * FORM orders", "unsupported statement"),
    ]:
        record = make_record(resource="dataset:sales", action="read", sql=sql)
        lineage = request_lineage(record)
        assert lineage.reads == (ds("sales"),)
        assert len(lineage.sql_problems) == 1
        assert reason in lineage.sql_problems[0]
        assert lineage.has_lineage


def test_oversized_sql_is_recorded_with_the_configured_limit() -> None:
    record = make_record(resource="dataset:sales", action="read", sql="SELECT a FROM t" * 10)
    lineage = request_lineage(record, max_sql_bytes=64)
    assert "byte limit" in lineage.sql_problems[0]


def test_denied_request_has_no_lineage_but_is_audited() -> None:
    record = make_record(
        request_id="req-9",
        principal="mallory",
        resource="dataset:sales.orders",
        action="read",
        decision="deny",
        rule=None,
        status=403,
        sql="SELECT * FROM orders",
    )
    lineage = request_lineage(record)
    assert not lineage.has_lineage
    events = access_events(record, lineage)
    assert {(e.dataset_name, e.action, e.decision) for e in events} == {
        ("sales.orders", "read", "deny"),
        ("sales.orders.orders", "read", "deny"),
    }
    assert all(e.principal == "mallory" and e.status == 403 for e in events)


@pytest.mark.parametrize("decision", ["unauthenticated", "error"])
def test_sql_of_a_request_refused_before_anyone_was_identified_is_not_analysed(
    decision: Decision,
) -> None:
    record = make_record(
        principal=None,
        resource="dataset:sales.orders",
        action="read",
        decision=decision,
        status=401,
        sql="SELECT * FROM orders JOIN customers USING (id)",
    )
    lineage = request_lineage(record)
    assert not lineage.has_lineage
    # Only the route's own dataset: no table named by the SQL.
    assert [(a.dataset.name, a.action) for a in lineage.accesses] == [("sales.orders", "read")]


def test_upstream_client_error_is_not_lineage() -> None:
    record = make_record(resource="dataset:sales.orders", action="read", status=404)
    assert not request_lineage(record).has_lineage


def test_upstream_server_error_still_counts_what_was_attempted() -> None:
    record = make_record(resource="dataset:mart.daily", action="write", status=503)
    assert request_lineage(record).writes == (ds("mart.daily"),)


def test_access_events_carry_the_request_and_have_stable_ids() -> None:
    record = make_record(
        request_id="req-42", resource="dataset:sales.orders", action="read", roles=("a", "b")
    )
    first = access_events(record, request_lineage(record))
    again = access_events(record, request_lineage(record))
    assert first == again
    (event,) = first
    assert event.request_id == "req-42"
    assert event.roles == ("a", "b")
    assert event.dataset_namespace == SERVICE
    assert event.rule == "p, analyst, dataset:sales.*, read"
    other = make_record(request_id="req-43", resource="dataset:sales.orders", action="read")
    assert access_events(other, request_lineage(other))[0].event_id != event.event_id


def test_database_resource_qualifies_unqualified_sql_tables() -> None:
    record = make_record(resource="database:sales", action="read", sql="select * from orders")
    lineage = request_lineage(record)
    assert [d.name for d in lineage.reads] == ["sales.orders"]
    assert all(access.dataset.name != "sales" for access in lineage.accesses)


@pytest.mark.parametrize("table", ["main.orders", "MAIN.orders", '"main"."orders"', "orders"])
def test_sqlite_main_schema_is_the_routes_database(table: str) -> None:
    # In SQLite `main` is the database the statement runs in: Datasette's /sales?sql=
    # reads sales.orders whichever way the query spells it.
    record = make_record(
        resource="database:sales", action="read", sql=f"select * from {table}", sql_dialect="sqlite"
    )
    lineage = request_lineage(record)
    assert lineage.reads == (ds("sales.orders"),)
    assert [a.dataset.name for a in lineage.accesses] == ["sales.orders"]
