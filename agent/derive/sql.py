"""Tables and columns read and written by a SQL text, as far as sqlglot can tell.

`tables_and_columns` is a pure function that never raises: SQL it cannot read (bad syntax,
an unknown dialect, text too large or too deeply nested, statements sqlglot only knows as
opaque commands) comes back as `SqlUnparsed` with the reason, or, for one statement among
several, as a note in `SqlLineage.skipped`. The caller records both; nothing is dropped
silently.

What it promises:
* inputs and outputs for SELECT, SELECT INTO, INSERT ... SELECT, CREATE TABLE/VIEW ... AS,
  MERGE, UPDATE ... FROM, DELETE ... USING, TRUNCATE, DROP and COPY, through CTEs (never
  reported as tables), subqueries, aliases, schema-qualified and quoted names, and across
  every statement of a multi-statement text (`USE db` qualifies the statements after it);
* column edges (output column <- input columns) where the statement has a target and
  sqlglot can resolve each source column to one table: INSERT with a column list, CTAS,
  SELECT INTO, UPDATE ... SET and MERGE's UPDATE SET / INSERT VALUES. A plain SELECT has
  inputs only: the columns of its result are not a dataset.

Unquoted identifiers are normalized the way the dialect does (lower case for most, upper
case for Snowflake), so `Orders` and `orders` name the same table.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator

import msgspec
import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, SqlglotError, TokenError
from sqlglot.lineage import Node as LineageNode
from sqlglot.lineage import lineage
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

# sqlglot logs the full text of any statement it falls back to parsing as a Command; such
# statements are exactly the ones that carry passwords (CREATE USER ... PASSWORD '...').
logging.getLogger("sqlglot").setLevel(logging.ERROR)

DEFAULT_MAX_SQL_BYTES = 256 * 1024
# Beyond these, parsing already took its time and the lineage walk would take much more;
# what a legitimate client sends is far below them.
MAX_SYNTAX_NODES = 100_000
MAX_COLUMN_LINEAGE_NODES = 10_000
MAX_PROJECTIONS = 1_000
MAX_SET_OPERATIONS = 64
MAX_SKIPPED_NOTES = 10


class TableName(msgspec.Struct, frozen=True, order=True):
    """A table as the SQL names it: (catalog, db, table), whichever parts are present."""

    parts: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return ".".join(self.parts)


class ColumnEdge(msgspec.Struct, frozen=True, order=True):
    """`output_table.output_column` is computed from `input_table.input_column`."""

    output_table: TableName
    output_column: str
    input_table: TableName
    input_column: str


class SqlLineage(msgspec.Struct, frozen=True):
    inputs: tuple[TableName, ...]
    outputs: tuple[TableName, ...]
    columns: tuple[ColumnEdge, ...] = ()
    # One reason per statement that was parsed but yields no lineage we could trust.
    skipped: tuple[str, ...] = ()


class SqlUnparsed(msgspec.Struct, frozen=True):
    reason: str


# Statements that by their nature move no data between datasets.
_NO_LINEAGE = (
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Set,
    exp.Pragma,
    exp.Show,
    exp.Describe,
    exp.Alter,
    exp.Analyze,
    exp.Grant,
    exp.Revoke,
    exp.Comment,
)
# Statements sqlglot keeps as opaque commands that move no data either. EXPLAIN is not
# among them: EXPLAIN ANALYZE runs the statement it explains.
_NO_LINEAGE_COMMANDS = frozenset(
    {"VACUUM", "CHECKPOINT", "REINDEX", "GRANT", "REVOKE", "LISTEN", "NOTIFY", "UNLISTEN",
     "DISCARD", "RESET", "DEALLOCATE", "LOCK"}
)  # fmt: skip


_Namer = Callable[[exp.Table], "TableName"]


class _Facts:
    """Accumulates what the statements of one SQL text read and write."""

    def __init__(self) -> None:
        self.inputs: set[TableName] = set()
        self.outputs: set[TableName] = set()
        self.columns: set[ColumnEdge] = set()
        self.skipped: list[str] = []
        self.more_skipped = 0

    def skip(self, note: str) -> None:
        # Thousands of unsupported statements must not become thousands of notes.
        if len(self.skipped) < MAX_SKIPPED_NOTES:
            self.skipped.append(note)
        else:
            self.more_skipped += 1

    def skipped_notes(self) -> tuple[str, ...]:
        more = (f"and {self.more_skipped} more",) if self.more_skipped else ()
        return (*self.skipped, *more)

    def result(self) -> SqlLineage:
        return SqlLineage(
            inputs=tuple(sorted(self.inputs)),
            outputs=tuple(sorted(self.outputs)),
            columns=tuple(sorted(self.columns)),
            skipped=self.skipped_notes(),
        )


def tables_and_columns(
    sql: str, dialect: str | None = None, *, max_bytes: int = DEFAULT_MAX_SQL_BYTES
) -> SqlLineage | SqlUnparsed:
    """The tables and column edges of every statement in `sql`; never raises."""
    size = sql_bytes(sql)
    if size > max_bytes:
        return SqlUnparsed(reason=f"SQL text is {size} bytes, over the {max_bytes} byte limit")
    try:
        Dialect.get_or_raise(dialect)
    except ValueError:
        return SqlUnparsed(reason=f"unknown SQL dialect {dialect!r}")
    if len(sql) <= CACHED_SQL_CHARS:
        return _cached_analysis(sql, dialect)
    return _analyse(sql, dialect)


def sql_bytes(sql: str) -> int:
    """The size `max_bytes` limits: UTF-8 bytes, a lone surrogate counting as three."""
    return len(sql.encode("utf-8", "surrogatepass"))


# Dashboards and jobs send the same statements again and again; the result is a pure,
# immutable function of (text, dialect). Only short texts are kept, which bounds the
# cache's memory to a few megabytes.
CACHED_SQL_CHARS = 4096


@functools.lru_cache(maxsize=2048)
def _cached_analysis(sql: str, dialect: str | None) -> SqlLineage | SqlUnparsed:
    return _analyse(sql, dialect)


def _analyse(sql: str, dialect: str | None) -> SqlLineage | SqlUnparsed:
    try:
        return _derive(sql, dialect)
    except RecursionError:
        return SqlUnparsed(reason="SQL is nested too deeply to parse")
    except ParseError as error:
        return SqlUnparsed(reason=_parse_error_reason(error))
    except TokenError:
        return SqlUnparsed(reason="SQL could not be tokenized")
    except SqlglotError as error:
        return SqlUnparsed(reason=f"sqlglot: {type(error).__name__}")
    except Exception as error:  # noqa: BLE001
        # The contract is "never raises" on any text a client can send; a parser bug on
        # hostile input must become a recorded reason, not a dead agent.
        return SqlUnparsed(reason=f"SQL analysis failed: {type(error).__name__}")


def _parse_error_reason(error: ParseError) -> str:
    # The message sqlglot builds quotes the SQL around the error, and SQL may hold secrets;
    # keep the description and position only.
    if error.errors:
        first = error.errors[0]
        # The description may end in the offending token's text: cut it off.
        description = str(first.get("description") or "").split(" but got", 1)[0]
        return (
            f"SQL syntax error at line {first.get('line')}, column {first.get('col')}: "
            f"{description.split('<Token', 1)[0].strip()[:120]}"
        )
    return "SQL syntax error"


def _derive(sql: str, dialect: str | None) -> SqlLineage | SqlUnparsed:
    statements = [s for s in sqlglot.parse(sql, dialect=dialect) if s is not None]
    if not statements:
        return SqlUnparsed(reason="SQL text holds no statement")
    nodes = sum(_count_nodes(s) for s in statements)
    if nodes > MAX_SYNTAX_NODES:
        return SqlUnparsed(reason=f"SQL too complex: {nodes} syntax nodes")
    facts = _Facts()
    default_db: str | None = None
    understood = 0
    for number, raw in enumerate(statements, start=1):
        statement = normalize_identifiers(_in_tables_as_queries(raw), dialect=dialect)
        if isinstance(statement, exp.Use):
            default_db = _use_target(statement)
            understood += 1
        elif (
            isinstance(statement, _NO_LINEAGE)
            or _is_ddl_without_data(statement)
            or (
                isinstance(statement, exp.Command)
                and statement.name.upper() in _NO_LINEAGE_COMMANDS
            )
        ):
            understood += 1
        elif isinstance(statement, exp.Command):
            # Only the leading keyword: the rest is unparsed text and may hold secrets.
            keyword = statement.name.upper() if statement.name.isalpha() else "unknown"
            facts.skip(f"statement {number}: unsupported {keyword[:24]} statement")
        elif _statement_facts(statement, dialect, default_db, facts):
            understood += 1
        else:
            kind = type(statement).__name__
            facts.skip(f"statement {number}: unsupported statement type {kind}")
    if understood == 0:
        return SqlUnparsed(reason="; ".join(facts.skipped_notes()))
    return facts.result()


def _in_tables_as_queries(statement: exp.Expr) -> exp.Expr:
    """`x IN name` written as the query SQLite (and ClickHouse) read it as:
    `x IN (SELECT * FROM name)`.

    sqlglot keeps the right operand of an unparenthesized IN as a column (or, for `IN
    'name'`, a string), but SQLite looks it up as a table (or a CTE) and reads every row
    of it: a membership test on a table no FROM names. Read here as a table in every
    dialect; where a dialect takes no table there, the statement fails in the database.
    """
    for node in list(statement.find_all(exp.In)):
        field = node.args.get("field")
        if isinstance(field, exp.Column):
            parts = [part.copy() for part in field.parts]
        elif isinstance(field, exp.Literal) and field.is_string:
            parts = [exp.to_identifier(field.this, quoted=True)]
        else:
            continue
        # Deeper than catalog.db.table: the extra qualifiers are kept in the catalog part,
        # so the name still reads as another database's (and is refused as one).
        qualifiers = [part.name for part in parts[:-2]]
        table = exp.Table(
            this=parts[-1],
            db=parts[-2] if len(parts) > 1 else None,
            catalog=exp.to_identifier(".".join(qualifiers), quoted=True) if qualifiers else None,
        )
        node.set("field", None)
        node.set("query", exp.Subquery(this=exp.select("*").from_(table)))
    return statement


def _count_nodes(statement: exp.Expr) -> int:
    # `walk` is iterative, so this is safe on trees too deep for recursive visitors.
    return sum(1 for _ in statement.walk())


def _use_target(statement: exp.Use) -> str | None:
    target = statement.this
    if isinstance(target, exp.Table):
        return ".".join(part.name for part in target.parts)
    return None


def _is_ddl_without_data(statement: exp.Expr) -> bool:
    # Indexes, functions, schemas, sequences...: created or dropped, no rows move.
    if isinstance(statement, exp.Create | exp.Drop):
        return str(statement.args.get("kind") or "").upper() not in {"TABLE", "VIEW"}
    return False


def _statement_facts(
    statement: exp.Expr, dialect: str | None, default_db: str | None, facts: _Facts
) -> bool:
    """Add one statement's facts; False when the statement type is not one we read."""
    ctes = _cte_names(statement)
    tables = [t for t in statement.find_all(exp.Table) if _is_dataset(t, ctes)]

    def name(table: exp.Table) -> TableName:
        return _table_name(table, default_db)

    # An INSERT, UPDATE, DELETE or MERGE inside a WITH clause (PostgreSQL) runs whatever
    # the outer statement is: its table is written, never merely read.
    nested = {id(t) for t in _nested_write_targets(statement)}
    if nested:
        facts.outputs.update(name(t) for t in tables if id(t) in nested)
        tables = [t for t in tables if id(t) not in nested]

    if isinstance(statement, exp.Query):
        into = statement.args.get("into") if isinstance(statement, exp.Select) else None
        target = into.this if isinstance(into, exp.Into) else None
        _add_tables(facts, tables, name, target)
        if isinstance(target, exp.Table) and isinstance(statement, exp.Select):
            query = statement.copy()
            query.set("into", None)
            facts.columns.update(_query_edges(query, name(target), None, dialect, default_db))
        return True
    if isinstance(statement, exp.Insert | exp.Create):
        target_node = statement.this
        target = target_node.this if isinstance(target_node, exp.Schema) else target_node
        _add_tables(facts, tables, name, target)
        query = statement.expression
        if isinstance(target, exp.Table) and isinstance(query, exp.Query):
            columns = (
                [c.name for c in target_node.expressions]
                if isinstance(target_node, exp.Schema) and target_node.expressions
                else None
            )
            if columns is None and isinstance(statement, exp.Insert):
                # INSERT without a column list fills the table's columns in table order,
                # which only the database knows.
                return True
            cte = statement.args.get("with_")
            if isinstance(cte, exp.With) and not query.args.get("with_"):
                query = query.copy()
                query.set("with_", cte.copy())
            facts.columns.update(_query_edges(query, name(target), columns, dialect, default_db))
        return True
    if isinstance(statement, exp.Update | exp.Delete | exp.Merge):
        target = statement.this
        _add_tables(facts, tables, name, target)
        if isinstance(target, exp.Table):
            facts.columns.update(_assignment_edges(statement, target, tables, name))
        return True
    if isinstance(statement, exp.TruncateTable | exp.Drop):
        targets = statement.expressions if isinstance(statement, exp.TruncateTable) else tables
        facts.outputs.update(name(t) for t in targets if isinstance(t, exp.Table))
        return True
    if isinstance(statement, exp.Copy):
        loads_table = bool(statement.args.get("kind"))
        for table in tables:
            (facts.outputs if loads_table and table is statement.this else facts.inputs).add(
                name(table)
            )
        return True
    return False


def _nested_write_targets(statement: exp.Expr) -> Iterator[exp.Table]:
    for node in statement.find_all(exp.Insert, exp.Update, exp.Delete, exp.Merge):
        if node is statement:
            continue
        target = node.this
        target = target.this if isinstance(target, exp.Schema) else target
        # MERGE's own WHEN ... THEN UPDATE/INSERT name no table: the MERGE's is the target.
        if isinstance(target, exp.Table):
            yield target


def _add_tables(
    facts: _Facts,
    tables: Iterable[exp.Table],
    name: _Namer,
    target: exp.Expr | None,
) -> None:
    for table in tables:
        if table is target:
            facts.outputs.add(name(table))
        else:
            facts.inputs.add(name(table))


def _cte_names(statement: exp.Expr) -> set[str]:
    return {cte.alias_or_name for cte in statement.find_all(exp.CTE)}


def _is_dataset(table: exp.Table, ctes: set[str]) -> bool:
    """A real table, not a CTE reference, table function or bare name used elsewhere."""
    if not isinstance(table.this, exp.Identifier):
        return False
    is_cte = table.args.get("db") is None and table.name in ctes and _cte_in_scope(table)
    return not is_cte


def _cte_in_scope(table: exp.Table) -> bool:
    # A CTE is visible inside the statement or query whose WITH defines it, so walk up
    # until an enclosing WITH names it.
    node: exp.Expr | None = table.parent
    while node is not None:
        with_clause = node.args.get("with_")
        if isinstance(with_clause, exp.With) and any(
            cte.alias_or_name == table.name for cte in with_clause.expressions
        ):
            return True
        node = node.parent
    return False


def _table_name(table: exp.Table, default_db: str | None) -> TableName:
    parts = tuple(part.name for part in table.parts)
    if len(parts) == 1 and default_db:
        return TableName(parts=(*default_db.split("."), *parts))
    return TableName(parts=parts)


def _query_edges(
    query: exp.Query,
    target: TableName,
    target_columns: list[str] | None,
    dialect: str | None,
    default_db: str | None,
) -> set[ColumnEdge]:
    """Column edges from a query's projections into `target`, positionally when named."""
    projections = query.selects
    if (
        len(projections) > MAX_PROJECTIONS
        or _count_nodes(query) > MAX_COLUMN_LINEAGE_NODES
        or sum(1 for _ in query.find_all(exp.SetOperation)) > MAX_SET_OPERATIONS
    ):
        # sqlglot's lineage walk grows much faster than the text: skip it, keep the tables.
        return set()
    if any(isinstance(p, exp.Star) or p.find(exp.Star) for p in projections):
        # Without the tables' schemas a star cannot be expanded into columns.
        return set()
    names = target_columns or [p.alias_or_name for p in projections]
    try:
        # trim_selects=False: trimming copies the query once per column, which makes the
        # walk quadratic in the number of projections.
        by_projection = lineage(None, query, schema={}, dialect=dialect, trim_selects=False)
    except (SqlglotError, RecursionError):
        # Column lineage is best effort; the statement's tables are already recorded.
        return set()
    if len(by_projection) != len(names):
        # Duplicate projection names: positions cannot be matched safely.
        return set()
    edges: set[ColumnEdge] = set()
    for output_column, node in zip(names, by_projection.values(), strict=True):
        if not output_column:
            # An unnamed expression in CTAS: the database invents the column's name.
            continue
        for table, column in _leaf_columns(node):
            edges.add(
                ColumnEdge(
                    output_table=target,
                    output_column=output_column,
                    input_table=_table_name(table, default_db),
                    input_column=column,
                )
            )
    return edges


def _leaf_columns(root: LineageNode) -> Iterator[tuple[exp.Table, str]]:
    """The table columns a projection's lineage ends in.

    A leaf under a star (`FROM (SELECT * FROM s) AS c`) is named `*`: the star hands the
    column on under its own name, the one its parent node asked for (`c.x`), so the source
    is `s.x`, when the star reads one table; over several, only their schemas could tell.
    """
    for node in root.walk():
        if isinstance(node.expression, exp.Table):
            column = _leaf_column(node.name)
            if column and column != "*":
                yield node.expression, column
        # One star leaf per source the star reads, tables and subqueries alike.
        stars = [leaf for leaf in node.downstream if leaf.name == "*"]
        # The parent is named `<alias>.<column>`; with a dot more, the split is a guess.
        if (
            len(stars) == 1
            and isinstance(stars[0].expression, exp.Table)
            and node.name.count(".") == 1
        ):
            column = node.name.split(".", 1)[1]
            if column and column != "*":
                yield stars[0].expression, column


def _leaf_column(name: str) -> str:
    """The column a lineage leaf names: sqlglot names it by the column's SQL in its default
    dialect (`s."Amount"`), qualifier and quotes included; the column itself is `Amount`."""
    try:
        return exp.to_column(name).name
    except SqlglotError:
        return ""


def _assignment_edges(
    statement: exp.Expr,
    target: exp.Table,
    tables: list[exp.Table],
    name: _Namer,
) -> Iterator[ColumnEdge]:
    """Edges of UPDATE SET col = expr and MERGE's UPDATE SET / INSERT (cols) VALUES (...).

    A source column counts only when it resolves to exactly one source table: by its
    qualifier (table name or alias), or, unqualified, when there is a single source and
    the target's own row is not in scope: an UPDATE SET value outside a subquery may name
    the target's column (`UPDATE t SET a = b FROM s`: b may be t's), a MERGE INSERT's
    values may not.
    """
    sources = [t for t in tables if t is not target]
    by_alias = {t.alias_or_name: t for t in sources}
    target_aliases = {target.alias_or_name, target.name}
    target_name = name(target)
    for column, value, target_in_scope in _assignments(statement):
        for referenced in value.find_all(exp.Column):
            qualifier = referenced.table
            if qualifier in target_aliases and qualifier not in by_alias:
                continue
            source = by_alias.get(qualifier) if qualifier else None
            if (
                source is None
                and not qualifier
                and len(sources) == 1
                and not (target_in_scope and referenced.find_ancestor(exp.Select) is None)
            ):
                source = sources[0]
            if source is not None:
                yield ColumnEdge(
                    output_table=target_name,
                    output_column=column,
                    input_table=name(source),
                    input_column=referenced.name,
                )


def _assignments(statement: exp.Expr) -> Iterator[tuple[str, exp.Expr, bool]]:
    """(column, value, whether the target's own row is in the value's scope)."""
    updates: list[exp.Expr] = []
    inserts: list[exp.Insert] = []
    if isinstance(statement, exp.Update):
        updates.append(statement)
    elif isinstance(statement, exp.Merge):
        whens = statement.args.get("whens")
        for when in whens.expressions if isinstance(whens, exp.Whens) else []:
            then = when.args.get("then")
            if isinstance(then, exp.Update):
                updates.append(then)
            elif isinstance(then, exp.Insert):
                inserts.append(then)
    for update in updates:
        for assignment in update.expressions:
            if isinstance(assignment, exp.EQ) and isinstance(assignment.this, exp.Column):
                yield assignment.this.name, assignment.expression, True
    for insert in inserts:
        columns, values = insert.this, insert.expression
        if (
            isinstance(columns, exp.Tuple)
            and isinstance(values, exp.Tuple)
            and len(columns.expressions) == len(values.expressions)
        ):
            for column, value in zip(columns.expressions, values.expressions, strict=True):
                if isinstance(column, exp.Column):
                    yield column.name, value, False
