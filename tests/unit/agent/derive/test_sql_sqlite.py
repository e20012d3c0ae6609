"""The tables SQL reads, checked against SQLite itself: every table SQLite reads while
running a statement (its authorizer reports each one) must be among the inputs that
`tables_and_columns` finds, since the proxy authorizes SQL by those inputs alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.derive.sql import SqlLineage, tables_and_columns

TABLES = ("orders", "secret", "customers")


@pytest.fixture(scope="module")
def database() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(":memory:")
    for table in TABLES:
        connection.execute(f"CREATE TABLE {table} (x)")
        connection.execute(f"INSERT INTO {table} VALUES (1)")
    yield connection
    connection.close()


def tables_sqlite_reads(connection: sqlite3.Connection, sql: str) -> set[str] | None:
    """The tables SQLite reads running `sql`, or None if SQLite refuses it."""
    reads: set[str] = set()

    def authorizer(code: int, first: str | None, column: str | None, *_: str | None) -> int:
        # A read of no column ('') is reported for CTEs too, so only column reads count:
        # the statements below read a column of every table they name.
        if code == sqlite3.SQLITE_READ and first is not None and column:
            reads.add(first.lower())
        return sqlite3.SQLITE_OK

    connection.set_authorizer(authorizer)
    try:
        connection.execute(sql).fetchall()
    except sqlite3.Error:
        return None
    finally:
        connection.set_authorizer(None)
    return reads


def spelled(name: str) -> st.SearchStrategy[str]:
    """Every way SQLite takes as a name for the table `name`."""
    return st.sampled_from(
        [name, name.upper(), f'"{name}"', f"[{name.title()}]", f"`{name}`", f"main.{name}"]
    )


TABLE = st.sampled_from(TABLES).flatmap(spelled)
# SQLite also takes a string where only a table name can stand (FROM 'secret', IN 'secret').
TABLE_OR_STRING = st.one_of(TABLE, st.sampled_from(TABLES).map(lambda t: f"'{t}'"))


def queries() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        value = st.one_of(
            st.just("1"),
            TABLE_OR_STRING.map(lambda t: f"(1 IN {t})"),
            inner.map(lambda q: f"(1 IN ({q}))"),
            inner.map(lambda q: f"EXISTS ({q})"),
            inner.map(lambda q: f"(SELECT count(*) FROM ({q}))"),
        )
        source = st.one_of(
            TABLE_OR_STRING,
            inner.map(lambda q: f"({q})"),
            st.tuples(TABLE, TABLE).map(
                lambda p: f"(SELECT a.x FROM {p[0]} AS a JOIN {p[1]} AS b ON a.x = b.x)"
            ),
        )
        select = st.one_of(
            value.map(lambda v: f"SELECT {v} AS x"),
            st.tuples(source, value).map(lambda p: f"SELECT x FROM {p[0]} WHERE {p[1]}"),
        )
        # A CTE may shadow a real table's name, and the statement may still read the table.
        cte = st.tuples(st.sampled_from((*TABLES, "c")), inner, select).map(
            lambda p: f"WITH {p[0]}(x) AS ({p[1]}) {p[2]}"
        )
        return st.one_of(select, cte)

    return st.recursive(st.just("SELECT 1 AS x"), extend, max_leaves=6)


@settings(max_examples=400, deadline=None)
@given(queries())
def test_every_table_sqlite_reads_is_an_input(database: sqlite3.Connection, sql: str) -> None:
    reads = tables_sqlite_reads(database, sql)
    assume(reads is not None)
    result = tables_and_columns(sql, "sqlite")
    # SQL that cannot be read is refused by the proxy: nothing to compare.
    assume(isinstance(result, SqlLineage) and not result.skipped)
    assert isinstance(result, SqlLineage)
    assert reads is not None
    inputs = {table.parts[-1] for table in result.inputs}
    assert reads <= inputs, (sql, reads, result.inputs)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 IN secret",
        "SELECT 1 IN main.secret",
        "SELECT 1 IN 'secret'",
        'SELECT 1 NOT IN "SECRET"',
        "SELECT 1 IN [secret]",
        "SELECT x FROM orders WHERE x IN secret",
    ],
)
def test_in_a_table_reads_that_table(database: sqlite3.Connection, sql: str) -> None:
    assert tables_sqlite_reads(database, sql) == {"secret"} | (
        {"orders"} if "orders" in sql else set()
    )
    result = tables_and_columns(sql, "sqlite")
    assert isinstance(result, SqlLineage)
    assert "secret" in {table.parts[-1] for table in result.inputs}


def test_in_a_cte_is_the_cte_not_the_table(database: sqlite3.Connection) -> None:
    sql = "WITH secret(x) AS (SELECT 7) SELECT 7 IN secret"
    assert tables_sqlite_reads(database, sql) == set()
    assert tables_and_columns(sql, "sqlite") == SqlLineage(inputs=(), outputs=())
