"""SQL -> tables and column edges, for every statement shape the agent promises."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.derive.sql import (
    MAX_SYNTAX_NODES,
    SqlLineage,
    SqlUnparsed,
    TableName,
    tables_and_columns,
)


def names(tables: tuple[TableName, ...]) -> set[str]:
    return {t.qualified for t in tables}


def edges(result: SqlLineage) -> set[str]:
    return {
        f"{e.output_table.qualified}.{e.output_column}<-{e.input_table.qualified}.{e.input_column}"
        for e in result.columns
    }


def lineage_of(sql: str, dialect: str | None = None) -> SqlLineage:
    result = tables_and_columns(sql, dialect)
    assert isinstance(result, SqlLineage), result
    return result


# (sql, dialect, inputs, outputs, column edges)
SHAPES: list[tuple[str, str | None, set[str], set[str], set[str]]] = [
    ("SELECT a, b FROM s", None, {"s"}, set(), set()),
    ("SELECT x AS a, y + z AS b FROM s", None, {"s"}, set(), set()),
    (
        "SELECT o.id FROM sales.orders AS o JOIN sales.items i ON o.id = i.order_id",
        None,
        {"sales.orders", "sales.items"},
        set(),
        set(),
    ),
    (
        "SELECT * FROM orders WHERE id IN (SELECT order_id FROM items)",
        None,
        {"orders", "items"},
        set(),
        set(),
    ),
    ("SELECT n FROM (SELECT n FROM inner_t) AS sub", None, {"inner_t"}, set(), set()),
    (
        "WITH recent AS (SELECT * FROM orders WHERE day > 1) SELECT * FROM recent",
        None,
        {"orders"},
        set(),
        set(),
    ),
    (
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
        "SELECT * FROM r JOIN dim ON TRUE",
        "postgres",
        {"dim"},
        set(),
        set(),
    ),
    ("SELECT a FROM t1 UNION ALL SELECT a FROM t2", None, {"t1", "t2"}, set(), set()),
    (
        "INSERT INTO t (a, b) SELECT x, y + z FROM s",
        None,
        {"s"},
        {"t"},
        {"t.a<-s.x", "t.b<-s.y", "t.b<-s.z"},
    ),
    # Without a column list the target's column order is only known to the database.
    ("INSERT INTO t SELECT x, y FROM s", None, {"s"}, {"t"}, set()),
    ("INSERT INTO t (a) VALUES (1), (2)", None, set(), {"t"}, set()),
    (
        "WITH c AS (SELECT x FROM src) INSERT INTO dst (a) SELECT x FROM c",
        None,
        {"src"},
        {"dst"},
        {"dst.a<-src.x"},
    ),
    (
        "INSERT INTO mart.daily (day, total) "
        "SELECT o.day, SUM(i.price) FROM sales.orders o JOIN sales.items i ON o.id = i.oid "
        "GROUP BY o.day",
        None,
        {"sales.orders", "sales.items"},
        {"mart.daily"},
        {"mart.daily.day<-sales.orders.day", "mart.daily.total<-sales.items.price"},
    ),
    (
        "CREATE TABLE mart.t AS SELECT a, b AS bb FROM s",
        None,
        {"s"},
        {"mart.t"},
        {"mart.t.a<-s.a", "mart.t.bb<-s.b"},
    ),
    ("CREATE VIEW v AS SELECT a FROM s", None, {"s"}, {"v"}, {"v.a<-s.a"}),
    ("CREATE TABLE t (id INT, name TEXT)", None, set(), {"t"}, set()),
    ("SELECT a INTO new_t FROM s", "postgres", {"s"}, {"new_t"}, {"new_t.a<-s.a"}),
    (
        "MERGE INTO t USING s ON t.id = s.id "
        "WHEN MATCHED THEN UPDATE SET a = s.a "
        "WHEN NOT MATCHED THEN INSERT (id, a) VALUES (s.id, s.a)",
        None,
        {"s"},
        {"t"},
        {"t.a<-s.a", "t.id<-s.id"},
    ),
    (
        "MERGE INTO dw.t AS tgt USING (SELECT id, v FROM staging.s) AS src ON tgt.id = src.id "
        "WHEN MATCHED THEN UPDATE SET v = src.v",
        None,
        {"staging.s"},
        {"dw.t"},
        set(),
    ),
    (
        "UPDATE t SET a = s.x FROM s WHERE t.id = s.id",
        "postgres",
        {"s"},
        {"t"},
        {"t.a<-s.x"},
    ),
    ("UPDATE t SET a = a + 1 WHERE id = 3", None, set(), {"t"}, set()),
    ("DELETE FROM t USING s WHERE t.id = s.id", "postgres", {"s"}, {"t"}, set()),
    ("DELETE FROM t WHERE id IN (SELECT id FROM gone)", None, {"gone"}, {"t"}, set()),
    ("TRUNCATE TABLE a.t", None, set(), {"a.t"}, set()),
    ("COPY t FROM '/tmp/x.csv'", "postgres", set(), {"t"}, set()),
    # Quoted identifiers keep their case; unquoted ones are normalized as the dialect does.
    ('SELECT "T"."Col" FROM "Sch"."T"', None, {"Sch.T"}, set(), set()),
    ("SELECT a FROM Sales.Orders", None, {"sales.orders"}, set(), set()),
    ("SELECT a FROM Sales.Orders", "snowflake", {"SALES.ORDERS"}, set(), set()),
    ("SELECT a FROM `proj.ds.tbl`", "bigquery", {"proj.ds.tbl"}, set(), set()),
    ("SELECT a FROM cat.db.tbl", "trino", {"cat.db.tbl"}, set(), set()),
    # Several statements, and USE qualifying the ones after it.
    (
        "BEGIN; INSERT INTO t (a) SELECT x FROM s; COMMIT;",
        None,
        {"s"},
        {"t"},
        {"t.a<-s.x"},
    ),
    (
        "USE shop; SELECT a FROM orders; SELECT b FROM x.y",
        "mysql",
        {"shop.orders", "x.y"},
        set(),
        set(),
    ),
    # Statements that move no rows contribute nothing and are not "unsupported" either.
    (
        "VACUUM; GRANT SELECT ON t TO bob; CREATE INDEX i ON t (a); DROP FUNCTION f; DROP TABLE x",
        "postgres",
        set(),
        {"x"},
        set(),
    ),
    ("COPY t TO '/tmp/x.csv'", "postgres", {"t"}, set(), set()),
    ("UPDATE t JOIN s ON t.id = s.id SET t.a = s.b", "mysql", {"s"}, {"t"}, {"t.a<-s.b"}),
    # A table function is not a dataset.
    ("SELECT * FROM generate_series(1, 3)", "postgres", set(), set(), set()),
]


@pytest.mark.parametrize(("sql", "dialect", "inputs", "outputs", "columns"), SHAPES)
def test_statement_shapes(
    sql: str, dialect: str | None, inputs: set[str], outputs: set[str], columns: set[str]
) -> None:
    result = lineage_of(sql, dialect)
    assert names(result.inputs) == inputs
    assert names(result.outputs) == outputs
    assert edges(result) == columns
    assert result.skipped == ()


def test_cte_named_like_a_table_elsewhere_is_only_hidden_inside_its_scope() -> None:
    sql = (
        "SELECT * FROM (WITH orders AS (SELECT 1 AS a) SELECT * FROM orders) q JOIN orders o ON 1=1"
    )
    result = lineage_of(sql)
    assert names(result.inputs) == {"orders"}


def test_ambiguous_unqualified_column_gives_no_edge_rather_than_a_guess() -> None:
    result = lineage_of("INSERT INTO t (a) SELECT x FROM s, r")
    assert names(result.inputs) == {"s", "r"}
    assert edges(result) == set()


def test_unsupported_statement_among_supported_ones_is_noted_not_dropped() -> None:
    result = lineage_of("CREATE USER bob PASSWORD 'x'; INSERT INTO t SELECT * FROM s")
    assert names(result.outputs) == {"t"}
    assert len(result.skipped) == 1
    assert "statement 1" in result.skipped[0]
    # The note names the statement kind, never the rest of its text.
    assert "bob" not in result.skipped[0]


@pytest.mark.parametrize(
    ("sql", "dialect", "reason_part"),
    [
        ("SELECT FROM WHERE", None, "syntax error"),
        ("", None, "no statement"),
        (";;;", None, "no statement"),
        ("SELECT 'unterminated", None, "tokenized"),
        ("CREATE USER bob PASSWORD 'hunter2'", None, "unsupported CREATE"),
        # EXPLAIN ANALYZE runs the statement: not knowing what it touches is worth a note.
        ("EXPLAIN ANALYZE INSERT INTO t SELECT * FROM s", "postgres", "unsupported EXPLAIN"),
        ("SELECT 1", "no-such-dialect", "unknown SQL dialect"),
    ],
)
def test_unreadable_sql_is_reported_with_a_reason(
    sql: str, dialect: str | None, reason_part: str
) -> None:
    result = tables_and_columns(sql, dialect)
    assert isinstance(result, SqlUnparsed)
    assert reason_part in result.reason


def test_syntax_error_reason_does_not_quote_the_sql() -> None:
    result = tables_and_columns("SELECT 'hunter2' FROM WHERE")
    assert isinstance(result, SqlUnparsed)
    assert "hunter2" not in result.reason


# --- hostile input: bounded work, a clean reason, never an exception ------------------


def test_one_megabyte_is_refused_by_size_before_parsing() -> None:
    sql = "SELECT a FROM t WHERE " + " OR ".join(f"a = {i}" for i in range(100_000))
    assert len(sql) > 1_000_000
    result = tables_and_columns(sql)
    assert isinstance(result, SqlUnparsed)
    assert "byte limit" in result.reason


def test_size_limit_is_configurable() -> None:
    assert isinstance(tables_and_columns("SELECT a FROM t", max_bytes=10), SqlUnparsed)
    assert isinstance(tables_and_columns("SELECT a FROM t", max_bytes=100), SqlLineage)


def test_deeply_nested_parentheses_do_not_blow_the_stack() -> None:
    sql = "SELECT " + "(" * 5_000 + "1" + ")" * 5_000 + " FROM t"
    result = tables_and_columns(sql)
    assert isinstance(result, SqlUnparsed)
    assert "nested too deeply" in result.reason


def test_deeply_nested_subqueries_are_read_or_refused_cleanly() -> None:
    sql = "SELECT a FROM " + "(SELECT a FROM " * 400 + "t" + ") q" * 400
    result = tables_and_columns(sql)
    assert isinstance(result, SqlUnparsed | SqlLineage)
    if isinstance(result, SqlLineage):
        assert names(result.inputs) == {"t"}


def test_thousands_of_unions_still_give_every_table() -> None:
    sql = "INSERT INTO z (a) " + " UNION ".join(f"SELECT a FROM t{i}" for i in range(3_000))
    result = lineage_of(sql)
    assert len(result.inputs) == 3_000
    assert names(result.outputs) == {"z"}


def test_syntax_tree_larger_than_the_limit_is_refused() -> None:
    values = ",".join("1" for _ in range(MAX_SYNTAX_NODES + 1))
    result = tables_and_columns(f"SELECT a FROM t WHERE a IN ({values})")
    assert isinstance(result, SqlUnparsed)
    assert "too complex" in result.reason


def test_control_characters_and_lone_surrogates_are_refused_cleanly() -> None:
    result = tables_and_columns("\x00\ud800'\"`;;((]]")
    assert isinstance(result, SqlUnparsed)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text_yields_a_result_never_an_exception(text: str) -> None:
    assert isinstance(tables_and_columns(text), SqlLineage | SqlUnparsed)


SQL_PIECES = st.sampled_from(
    ["SELECT", "FROM", "t", "(", ")", ",", "a", "JOIN", "ON", "=", "WITH", "x", "AS", "UNION",
     "INSERT", "INTO", "MERGE", "USING", "WHEN", "MATCHED", "THEN", "UPDATE", "SET", ";", "'",
     "DELETE", "WHERE", "*", "1", "s.b", "VALUES", "CREATE", "TABLE"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(SQL_PIECES, max_size=40))
def test_sql_shaped_noise_yields_a_result_never_an_exception(pieces: list[str]) -> None:
    assert isinstance(tables_and_columns(" ".join(pieces)), SqlLineage | SqlUnparsed)


def test_many_unsupported_statements_give_a_bounded_reason() -> None:
    result = tables_and_columns("CREATE USER u PASSWORD 'p';" * 2_000)
    assert isinstance(result, SqlUnparsed)
    assert result.reason.endswith("and 1990 more")
    assert len(result.reason) < 1_000


@pytest.mark.parametrize(
    ("sql", "dialect", "expected"),
    [
        ('CREATE TABLE t AS SELECT "x" FROM s', "sqlite", {"t.x<-s.x"}),
        ('CREATE TABLE t AS SELECT o."Amount" AS amt FROM s AS o', "postgres", {"t.amt<-s.Amount"}),
        ('INSERT INTO t (a) SELECT "a.b" FROM s', "postgres", {"t.a<-s.a.b"}),
        ("CREATE TABLE t AS SELECT [x y] AS z FROM s", "tsql", {"t.z<-s.x y"}),
    ],
)
def test_quoted_source_column_is_named_without_its_quotes(
    sql: str, dialect: str, expected: set[str]
) -> None:
    # The column is the one the database reads: `"Amount"` names the column Amount.
    assert edges(lineage_of(sql, dialect)) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("CREATE TABLE t AS SELECT c.x FROM (SELECT * FROM s) AS c", {"t.x<-s.x"}),
        ("CREATE TABLE t AS WITH c AS (SELECT * FROM s) SELECT x AS y FROM c", {"t.y<-s.x"}),
        ("INSERT INTO t (a) SELECT c.x FROM (SELECT * FROM s WHERE z > 1) c", {"t.a<-s.x"}),
        # Which of the two tables holds x only their schemas say: no edge rather than two.
        ("CREATE TABLE t AS SELECT c.x FROM (SELECT * FROM s JOIN r ON s.id = r.id) AS c", set()),
    ],
)
def test_column_through_a_star_is_the_column_of_that_name(sql: str, expected: set[str]) -> None:
    # A star passes each column on under its own name; it is never a column called "*".
    assert edges(lineage_of(sql)) == expected


def test_star_over_a_table_and_a_subquery_gives_no_edge() -> None:
    sql = "CREATE TABLE t AS SELECT c.x FROM (SELECT * FROM s, (SELECT 1 AS x) d) AS c"
    assert edges(lineage_of(sql)) == set()


@pytest.mark.parametrize(
    ("sql", "inputs", "outputs"),
    [
        ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u", set(), {"t"}),
        (
            "WITH d AS (DELETE FROM t RETURNING *) INSERT INTO arch SELECT * FROM d",
            set(),
            {"t", "arch"},
        ),
        ("WITH n AS (INSERT INTO t (a) SELECT x FROM s RETURNING a) SELECT * FROM n", {"s"}, {"t"}),
        ("WITH u AS (UPDATE t SET a = s.x FROM s RETURNING t.a) SELECT a FROM u", {"s"}, {"t"}),
    ],
)
def test_data_modifying_cte_writes_its_target(
    sql: str, inputs: set[str], outputs: set[str]
) -> None:
    # PostgreSQL runs the UPDATE/DELETE/INSERT of a WITH clause whatever the outer
    # statement is: its table is written, not merely read.
    result = lineage_of(sql, "postgres")
    assert names(result.inputs) == inputs
    assert names(result.outputs) == outputs


def test_unqualified_column_of_update_from_may_be_the_targets_own() -> None:
    # SQLite runs this, and b is t's own column: s has none. Without the tables' schemas
    # an unqualified column of UPDATE ... FROM may be either table's, so no edge is claimed.
    sql = "UPDATE t SET a = b FROM s WHERE t.id = s.id"
    database = sqlite3.connect(":memory:")
    database.executescript(
        "CREATE TABLE t (id, a, b); CREATE TABLE s (id, x);"
        "INSERT INTO t VALUES (1, 0, 42); INSERT INTO s VALUES (1, 7);"
    )
    database.execute(sql)
    assert database.execute("SELECT a FROM t").fetchall() == [(42,)]
    database.close()
    result = lineage_of(sql, "sqlite")
    assert names(result.inputs) == {"s"}
    assert edges(result) == set()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # A column inside a subquery is that subquery's table's (when it has one).
        ("UPDATE t SET a = (SELECT max(x) FROM s)", {"t.a<-s.x"}),
        # MERGE's INSERT sees only the source row.
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED THEN INSERT (a) VALUES (x)",
            {"t.a<-s.x"},
        ),
        # Its UPDATE sees both rows.
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = x", set()),
    ],
)
def test_unqualified_assignment_sources(sql: str, expected: set[str]) -> None:
    assert edges(lineage_of(sql, "postgres")) == expected
