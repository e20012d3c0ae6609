"""Secrets never leave the sidecar: examples, then properties over generated secrets."""

from __future__ import annotations

import string

import pytest
import sqlglot
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect

from agent.derive.redact import (
    _SECRET_FRAGMENTS,
    _SECRET_WORDS,
    MASK,
    RedactionRules,
    _sql_syntax,
    is_secret_name,
    redact_headers,
    redact_query,
    redact_record,
    redact_sql,
    redact_text,
    redact_url,
)
from agent.derive.sql import tables_and_columns
from tests.unit.agent.factories import make_record


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CREATE USER bob PASSWORD 'hunter2'", "CREATE USER bob PASSWORD '***'"),
        (
            "ALTER ROLE bob WITH ENCRYPTED PASSWORD 'md5abc'",
            "ALTER ROLE bob WITH ENCRYPTED PASSWORD '***'",
        ),
        ("ALTER USER bob IDENTIFIED BY 'hunter2'", "ALTER USER bob IDENTIFIED BY '***'"),
        ("ALTER USER bob IDENTIFIED BY hunter2;", "ALTER USER bob IDENTIFIED BY ***;"),
        ("ALTER ROLE r PASSWORD $pw$hunter2$pw$", "ALTER ROLE r PASSWORD $pw$***$pw$"),
        (
            "CREATE SECRET s (TYPE s3, KEY_ID 'AKIA1', SECRET 'wJalr')",
            "CREATE SECRET s (TYPE s3, KEY_ID '***', SECRET '***')",
        ),
        (
            "SELECT dblink_connect('host=db user=u password=hunter2 dbname=x')",
            "SELECT dblink_connect('host=db user=u password=*** dbname=x')",
        ),
        (
            "ATTACH 'postgresql://etl:hunter2@db:5432/sales' AS s",
            "ATTACH 'postgresql://etl:***@db:5432/sales' AS s",
        ),
        ("Server=db;User Id=u;Password=hunter2;", "Server=db;User Id=u;Password=***;"),
        ('{"api_key": "abc123", "n": 1}', '{"api_key": "***", "n": 1}'),
        ("Authorization: Bearer eyJhbGciOi.x.y", "Authorization: *** ***"),
        # Not secrets: left exactly as they were.
        ("SELECT name FROM users WHERE id = 'u1'", "SELECT name FROM users WHERE id = 'u1'"),
        ("CREATE USER bob PASSWORD NULL", "CREATE USER bob PASSWORD NULL"),
        ("https://db.example/x?y=1", "https://db.example/x?y=1"),
    ],
)
def test_redact_text_examples(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("sql", "dialect", "expected"),
    [
        # Names are lineage: none of these has a secret, none changes.
        ("SELECT token FROM sales.sessions", None, None),
        ("SELECT basic, negotiate, bearer FROM sales.plans", "postgres", None),
        ("SELECT id FROM users WHERE password_hash = crypt($1, password_hash)", None, None),
        ("UPDATE sales.t SET secret_id = s.id FROM sales.s WHERE t.key = s.key", None, None),
        ("SELECT k.key FROM sales.keys k ORDER BY k.token", None, None),
        # Literals compared to a secret-like name, in every literal form.
        ("SELECT id FROM users WHERE token = 'abc'", None,
         "SELECT id FROM users WHERE token = '***'"),
        ("SELECT 1 FROM t WHERE api_key <> 'a''b'", None, "SELECT 1 FROM t WHERE api_key <> '***'"),
        ("ALTER USER bob WITH PASSWORD E'hun\\'ter2'", "postgres",
         "ALTER USER bob WITH PASSWORD E'***'"),
        ("ALTER ROLE bob PASSWORD U&'hunter2'", "postgres", "ALTER ROLE bob PASSWORD U&'***'"),
        ("CREATE LOGIN bob WITH PASSWORD = N'hunter2', CHECK_POLICY = OFF", "tsql",
         "CREATE LOGIN bob WITH PASSWORD = N'***', CHECK_POLICY = OFF"),
        ("SET PASSWORD FOR bob = PASSWORD('hunter2')", "mysql",
         "SET PASSWORD FOR bob = PASSWORD('***')"),
        ('SET PASSWORD = "hun\\"ter2"', "mysql", 'SET PASSWORD = "***"'),
        ("CREATE USER bob PASSWORD/*c*/'hunter2'", None, "CREATE USER bob PASSWORD/*c*/'***'"),
        ("CREATE USER bob PASSWORD -- c\n 'hunter2'", None,
         "CREATE USER bob PASSWORD -- c\n '***'"),
        ("UPDATE users SET [password] = 'hunter2'", "tsql", "UPDATE users SET [password] = '***'"),
        ("UPDATE users SET \"password\" = 'hunter2'", None,
         "UPDATE users SET \"password\" = '***'"),
        ("ALTER USER bob IDENTIFIED BY VALUES 'hunter2'", "oracle",
         "ALTER USER bob IDENTIFIED BY VALUES '***'"),
        ('CREATE USER bob IDENTIFIED BY "hunter2"',
         "oracle", 'CREATE USER bob IDENTIFIED BY "***"'),
        ("CREATE USER 'bob'@'%' IDENTIFIED WITH mysql_native_password BY 'hunter2'", "mysql",
         "CREATE USER 'bob'@'%' IDENTIFIED WITH mysql_native_password BY '***'"),
        ("ALTER ROLE r PASSWORD $pw$hunter2$pw$", None, "ALTER ROLE r PASSWORD $pw$***$pw$"),
        ("SELECT 1 FROM t WHERE key = X'DEADBEEF'", "postgres", "SELECT 1 FROM t WHERE key = X''"),
        # Other literals and comments are free text, escaped as they were.
        ("SELECT dblink_connect('host=h password=''hun ter2''')", "postgres",
         "SELECT dblink_connect('host=h password=''***''')"),
        ("SELECT 1 FROM t WHERE c = 'it\\'s password=hunter2'", "mysql",
         "SELECT 1 FROM t WHERE c = 'it\\'s password=***'"),
        ("SELECT 1 /* password=hunter2 */ -- token: hunter2", None,
         "SELECT 1 /* password=*** */ -- token: ***"),
    ],
)  # fmt: skip
def test_redact_sql_examples(sql: str, dialect: str | None, expected: str | None) -> None:
    assert redact_sql(sql, dialect) == (sql if expected is None else expected)


def test_url_userinfo_and_secret_parameters() -> None:
    assert redact_url("https://u:hunter2@h/p?sig=abc&page=2#top") == (
        "https://u:***@h/p?sig=***&page=2#top"
    )
    # A bare userinfo is usually a token.
    assert redact_url("https://ghp_abc@github.com/x") == "https://***@github.com/x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgres://etl:hun/ter2@db/sales", "postgres://etl:***@db/sales"),
        ("https://etl:p@ss@db.example/x", "https://etl:***@db.example/x"),
        ("redis://:hunter2@cache:6379", "redis://:***@cache:6379"),
        ('{"password":\n  "hunter2"}', '{"password":\n  "***"}'),
        ("UPDATE users SET [password]='hunter2'", "UPDATE users SET [password]='***'"),
        ("privatekey=hunter2&accessKey=hunter3", "privatekey=***&accessKey=***"),
        ("SET PASSWORD = PASSWORD('hunter2')", "SET PASSWORD = PASSWORD('***')"),
        ("ALTER USER bob WITH PASSWORD E'hun\\'ter2'", "ALTER USER bob WITH PASSWORD E'***'"),
        ("password: ok\nnext: 1", "password: ***\nnext: 1"),
        # Not secrets: a URL with a port and no userinfo stays as it is.
        ("https://db.example:8443/x/y?z=1", "https://db.example:8443/x/y?z=1"),
    ],
)
def test_redact_text_misses_found_by_the_hunt(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert redact_text(expected) == expected


def test_query_value_holding_encoded_sql_is_redacted_inside_the_encoding() -> None:
    redacted = redact_query("sql=CREATE+USER+u+PASSWORD+%27hunter2%27&_shape=array")
    assert "hunter2" not in redacted
    assert redacted.endswith("&_shape=array")


def test_configured_and_credential_headers_are_masked() -> None:
    rules = RedactionRules(header_names=frozenset({"X-Vault-Token", "x-job-secret"}))
    headers = {"x-vault-token": "s.abc", "X-Job-Secret": "j", "authorization": "t", "x-run": "7"}
    assert redact_headers(headers, rules) == {
        "x-vault-token": MASK,
        "X-Job-Secret": MASK,
        "authorization": MASK,
        "x-run": "7",
    }


@pytest.mark.parametrize(
    "name",
    ["password", "DB_PASSWORD", "access_token", "apiKey", "X-Amz-Signature", "sig", "key",
     "client_secret", "refreshToken", "X-Amz-Credential", "KEY_ID"],
)  # fmt: skip
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", sorted(_SECRET_WORDS | set(_SECRET_FRAGMENTS)))
def test_every_secret_word_is_found_by_the_name_scans(name: str) -> None:
    # The scans skip names without one of a few pieces before calling is_secret_name.
    assert redact_text(f"x {name}=Zq9 y") == f"x {name}=*** y"
    assert redact_sql(f"SELECT 1 FROM t WHERE {name} = 'Zq9'") == (
        f"SELECT 1 FROM t WHERE {name} = '***'"
    )


@pytest.mark.parametrize("name", ["page", "id", "monkey", "keyboard", "author_name", "sql"])
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


def test_record_redaction_covers_sql_query_body_and_correlation_headers() -> None:
    record = make_record(
        sql="CREATE USER u PASSWORD 'hunter2'",
        query="token=hunter3&page=1",
        body_excerpt='{"password": "hunter4"}',
        correlation={"x-secret-run": "hunter5", "x-run-id": "r1"},
    )
    redacted = redact_record(record, RedactionRules(header_names=frozenset({"x-secret-run"})))
    encoded = repr(redacted)
    for secret in ("hunter2", "hunter3", "hunter4", "hunter5"):
        assert secret not in encoded
    assert redacted.correlation["x-run-id"] == "r1"
    assert record.sql == "CREATE USER u PASSWORD 'hunter2'"  # the input is untouched


# --- properties ----------------------------------------------------------------------

# Bare secrets end at whitespace and punctuation, so they are drawn without them; quoted
# ones may hold anything but their own quote. Neither may contain the mask character. The
# "Zq9" prefix keeps a generated secret from coinciding with the text around it.
BARE_SECRET = st.text(string.ascii_letters + string.digits + "!%^_+~.-", max_size=32).map(
    lambda s: "Zq9" + s
)
QUOTED_SECRET = st.text(
    string.ascii_letters + string.digits + " !#%^_+~.-,;()=&@:/?[]{}<>|'", max_size=32
).map(lambda s: "Zq9" + s)
USER = st.sampled_from(["bob", "etl_user", "svc"])

SQL_PLACES = [
    "CREATE USER {user} PASSWORD '{q}'",
    "ALTER ROLE {user} WITH ENCRYPTED PASSWORD '{q}' VALID UNTIL 'infinity'",
    "ALTER USER {user} IDENTIFIED BY '{q}'",
    "ALTER USER {user} IDENTIFIED BY {b}",
    "CREATE SECRET s3 (TYPE s3, KEY_ID '{q}', SECRET '{q}', REGION 'eu')",
    "SELECT * FROM dblink('host=db user={user} password={b} dbname=x', 'select 1') AS t(a int)",
    "ATTACH 'postgresql://{user}:{b}@db:5432/sales' AS s; SELECT 1",
    "COPY t FROM 's3://bucket/k' CREDENTIALS 'aws_access_key_id=AK;aws_secret_access_key={b}'",
    "CREATE SERVER s FOREIGN DATA WRAPPER pg OPTIONS (host 'h', password '{q}')",
    "SELECT 1 FROM t WHERE api_token = '{q}'",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SQL_PLACES), USER, BARE_SECRET, QUOTED_SECRET)
def test_secret_in_sql_never_survives(place: str, user: str, bare: str, quoted: str) -> None:
    escaped = quoted.replace("'", "''")
    sql = place.format(user=user, b=bare, q=escaped)
    redacted = redact_sql(sql)
    secret = bare if "{b}" in place else quoted
    assert secret not in redacted
    assert escaped not in redacted
    assert redact_sql(redacted) == redacted


URL_PLACES = [
    "https://{user}:{b}@db.example/path",
    "postgresql://{user}:{b}@db:5432/sales?sslmode=require",
    "https://{b}@github.com/org/repo.git",
    "https://api.example/v1/x?{param}={b}&page=2",
    "https://api.example/v1/x?page=2&{param}={b}#frag",
]
SECRET_PARAMS = st.sampled_from(
    ["token", "access_token", "password", "client_secret", "api_key", "apiKey",
     "X-Amz-Signature", "X-Amz-Credential", "sig", "key", "refresh_token"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(URL_PLACES), USER, BARE_SECRET, SECRET_PARAMS)
def test_secret_in_url_never_survives(place: str, user: str, bare: str, param: str) -> None:
    url = place.format(user=user, b=bare, param=param)
    for redacted in (redact_url(url), redact_text(url)):
        assert bare not in redacted
    assert redact_url(redact_url(url)) == redact_url(url)


@settings(max_examples=100, deadline=None)
@given(
    st.text(string.ascii_letters + "-", min_size=1, max_size=20).filter(lambda n: n.strip("-")),
    BARE_SECRET,
)
def test_configured_header_never_survives(name: str, secret: str) -> None:
    rules = RedactionRules(header_names=frozenset({name.lower()}))
    redacted = redact_headers({name.upper(): secret, "x-other": "v"}, rules)
    assert secret not in redacted.values()
    assert redacted["x-other"] == "v"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_redaction_is_idempotent_on_any_text(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once


IDENT = st.sampled_from(["orders", "items", "customers", "daily", "region", "amount", "day"])
LITERAL = st.text(string.ascii_letters + string.digits + " _-", max_size=12)
HOSTILE_TEXTS = [
    "password '" * 25_000,
    "token=" + "a" * 250_000,
    "key" * 80_000,
    "a://x:" + "y" * 250_000,
    "$$" * 100_000,
    "password $$" + "x" * 250_000,
    "a://x:" * 50_000,
    "://u:p@" * 40_000,
    "://" + "x:/" * 90_000,
]


@st.composite
def ordinary_sql(draw: st.DrawFn) -> str:
    """SQL without secrets: joins, filters on string literals, inserts, CTAS."""
    source, other, target = draw(IDENT), draw(IDENT), draw(IDENT)
    column, value = draw(IDENT), draw(LITERAL)
    shapes = [
        f"SELECT a.{column} FROM sales.{source} a JOIN {other} b ON a.id = b.id "
        f"WHERE b.x = '{value}'",
        f"INSERT INTO mart.{target} ({column}) SELECT {column} FROM {source} WHERE n = '{value}'",
        f"CREATE TABLE {target}_copy AS SELECT {column} FROM {source}; SELECT '{value}'",
        f"WITH c AS (SELECT {column} FROM {source}) SELECT * FROM c, {other} "
        f"WHERE k LIKE '%{value}%'",
    ]
    return shapes[draw(st.integers(0, len(shapes) - 1))]


@settings(max_examples=150, deadline=None)
@given(ordinary_sql())
def test_ordinary_sql_keeps_its_meaning(sql: str) -> None:
    redacted = redact_sql(sql)
    assert redacted == sql
    assert tables_and_columns(redacted) == tables_and_columns(sql)


@settings(max_examples=150, deadline=None)
@given(ordinary_sql(), BARE_SECRET)
def test_sql_with_a_secret_keeps_its_tables(sql: str, secret: str) -> None:
    # The same statements after a secret-bearing one: the secret goes, the tables stay.
    text = f"ALTER USER etl PASSWORD '{secret}'; {sql}"
    redacted = redact_sql(text)
    assert secret not in redacted
    assert tables_and_columns(redacted) == tables_and_columns(text)


@pytest.mark.parametrize("text", HOSTILE_TEXTS, ids=lambda t: repr(t[:12]))
def test_hostile_text_is_redacted_without_pathological_work(text: str) -> None:
    # Quadratic patterns would make this test take minutes; it must stay well under a second.
    redacted = redact_text(text)
    assert redact_text(redacted) == redacted


# Nested comments as deep as the text allows, and comment openers that never close: a scan
# that searched the rest of the text again for each one would take minutes here.
HOSTILE_SQL = [
    ("postgres", "/*" * 100_000 + "*/" * 100_000 + " SELECT 1"),
    ("postgres", "/* " + "/*/" * 100_000),
    ("mysql", "SELECT 1 " + "# x\n" * 100_000),
    (None, "{#" * 100_000),
]


@pytest.mark.parametrize(("dialect", "sql"), HOSTILE_SQL, ids=lambda v: repr(v)[:16])
def test_hostile_sql_comments_are_redacted_without_pathological_work(
    dialect: str | None, sql: str
) -> None:
    assert redact_sql(sql, dialect) == sql


# Half a MiB of one long word whose pieces all may start a URL scheme. The userinfo pattern
# that looked for a scheme from every word start took 9 s on 128 KiB of this; on this much
# it would take minutes, which is what this test would show as a hang.
LONG_WORDS = [piece * 262_144 for piece in ("a-", "a.", "a+")]


@pytest.mark.parametrize("word", LONG_WORDS, ids=lambda w: repr(w[:2]))
def test_long_word_around_a_url_is_scanned_once(word: str) -> None:
    text = f"{word} postgresql://etl:Zq9hunter2@db/sales?sslmode=require {word}://x"
    assert redact_text(text) == f"{word} postgresql://etl:***@db/sales?sslmode=require {word}://x"


# Filler drawn from the characters the patterns treat specially, so that generated text
# opens quotes, comments and URLs near the secrets and around them.
FILLER = st.text(string.ascii_letters[:6] + " -.+:/@'\"=$\n", max_size=40)
TEXT_PLACES = [
    "https://{user}:{b}@db.example/path",
    "password={b}",
    '{{"client_secret": "{b}"}}',
    "Authorization: Bearer {b}",
    "ALTER USER {user} PASSWORD '{b}'",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(FILLER, st.sampled_from(TEXT_PLACES)), min_size=1, max_size=6),
       USER, BARE_SECRET)  # fmt: skip
def test_secrets_in_text_never_survive_and_redaction_is_idempotent(
    pieces: list[tuple[str, str]], user: str, secret: str
) -> None:
    text = " ".join(f"{filler} {place.format(user=user, b=secret)}" for filler, place in pieces)
    redacted = redact_text(text)
    assert secret not in redacted
    assert redact_text(redacted) == redacted


# Column names that look like secrets, or like the credential schemes of HTTP headers.
NAMES = st.sampled_from(
    ["token", "basic", "bearer", "negotiate", "password", "secret", "key", "api_key",
     "password_hash", "secret_id", "auth", "orders", "id", "amount"]
)  # fmt: skip
TABLES = st.sampled_from(["sessions", "users", "plans", "daily"])
SQL_LITERAL = st.text(string.ascii_letters + string.digits + " _-=:/@'\\", max_size=16).map(
    lambda s: "Zq9" + s
)


@st.composite
def sql_over_secret_like_names(draw: st.DrawFn) -> tuple[str, str, str]:
    """SQL over secret-like names, a literal in it, and the name the literal is compared to."""
    a, b, c, d = (draw(NAMES) for _ in range(4))
    if draw(st.booleans()):
        a, b = f'"{a}"', f'"{b}"'
    table, other = draw(TABLES), draw(TABLES)
    literal = draw(SQL_LITERAL)
    lit = literal.replace("'", "''")
    shapes = [
        (f"SELECT {a}, {b} FROM sales.{table} WHERE {c} = '{lit}' AND {d} IS NOT NULL", c),
        (f"SELECT t.{a} FROM sales.{table} AS t JOIN sales.{other} AS o ON o.{b} = t.{c} "
         f"WHERE o.{d} = '{lit}'", d),
        (f"INSERT INTO sales.{table} ({a}, {b}) SELECT {c}, {d} FROM sales.{other} "
         f"WHERE {c} = '{lit}'", c),
        (f"UPDATE sales.{table} SET {a} = o.{b} FROM sales.{other} AS o "
         f"WHERE o.{d} = '{lit}'", d),
        (f"SELECT {a} FROM sales.{table} WHERE {b} = crypt('{lit}', {c}) ORDER BY {d}", b),
    ]  # fmt: skip
    sql, compared = shapes[draw(st.integers(0, len(shapes) - 1))]
    return sql, literal, compared.strip('"')


def identifiers(sql: str) -> set[str]:
    return {
        identifier.name
        for statement in sqlglot.parse(sql, dialect="postgres")
        if statement is not None
        for identifier in statement.find_all(exp.Identifier)
    }


@settings(max_examples=300, deadline=None)
@given(sql_over_secret_like_names())
def test_redacted_sql_keeps_every_name_and_parses(case: tuple[str, str, str]) -> None:
    sql, literal, compared = case
    try:
        names = identifiers(sql)
    except sqlglot.errors.ParseError:
        assume(False)  # sqlglot reserves some of these names; such SQL tells nothing here
    redacted = redact_sql(sql, "postgres")
    assert identifiers(redacted) == names
    assert tables_and_columns(redacted, "postgres") == tables_and_columns(sql, "postgres")
    if is_secret_name(compared):
        assert literal not in redacted
        assert literal.replace("'", "''") not in redacted
    assert redact_sql(redacted, "postgres") == redacted


def test_unclosed_quote_after_a_secret_name_masks_the_rest() -> None:
    assert redact_text("x PASSWORD 'hunter2 and more") == "x PASSWORD '***"


# Comments as the dialect's own tokenizer reads them, each holding a quote: read as
# anything else, the quote would open a literal that swallows the real SQL after it, and
# the real secret literal would be taken for SQL and kept.
DIALECT_COMMENTS = [
    ("mysql", "# it's the login check\n"),
    ("bigquery", "# it's the login check\n"),
    ("clickhouse", "#! it's the login check\n"),
    ("snowflake", "// it's the login check\n"),
    ("postgres", "/* outer /* nested */ it's still a comment */"),
    (None, "/* outer /* nested */ it's still a comment */"),
    (None, "{# it's a template comment #}"),
]


@pytest.mark.parametrize(("dialect", "comment"), DIALECT_COMMENTS)
def test_a_quote_in_a_comment_of_the_dialect_hides_no_secret(
    dialect: str | None, comment: str
) -> None:
    sql = f"SELECT id FROM users {comment} WHERE password = 'hunter2' AND name = 'bob'"
    assert redact_sql(sql, dialect) == sql.replace("hunter2", MASK)


@pytest.mark.parametrize(
    ("dialect", "sql"),
    [
        # Not comments in these dialects: the names after them are SQL, and stay as they are.
        ("mysql", "UPDATE t SET n = a--b, password = s.pw FROM s WHERE s.id = t.id"),
        (None, "UPDATE t SET n = 1 -- ends at the carriage return\r, password = s.pw FROM s"),
    ],
)
def test_what_the_dialect_does_not_read_as_a_comment_keeps_its_names(
    dialect: str | None, sql: str
) -> None:
    redacted = redact_sql(sql, dialect)
    assert "s.pw" in redacted
    assert tables_and_columns(redacted, dialect) == tables_and_columns(sql, dialect)


COMMENT_TEXT = st.text("ab '\"`$=;", max_size=12)
COMMENT_DIALECTS = st.sampled_from(
    ["mysql", "bigquery", "clickhouse", "snowflake", "postgres", None]
)


@settings(max_examples=300, deadline=None)
@given(COMMENT_DIALECTS, st.data(), COMMENT_TEXT, COMMENT_TEXT, BARE_SECRET)
def test_no_comment_of_the_dialect_hides_a_secret_after_it(
    dialect: str | None, data: st.DataObject, outer: str, inner: str, secret: str
) -> None:
    syntax = _sql_syntax(dialect)
    forms = [f"-- {outer}\n", f"/* {outer} */", f"{{# {outer} #}}"]
    line_starts = Dialect.get_or_raise(dialect).tokenizer_class.COMMENTS
    forms += [f"{start}{outer}\n" for start in ("#", "#!", "//") if start in line_starts]
    if syntax.nested_comments:
        forms.append(f"/* {outer} /* {inner} */ {outer} */")
    comment = data.draw(st.sampled_from(forms), label="comment")
    sql = f"SELECT id FROM sales.users {comment} WHERE password = '{secret}' AND name = 'x'"
    redacted = redact_sql(sql, dialect)
    assert secret not in redacted
    assert tables_and_columns(redacted, dialect) == tables_and_columns(sql, dialect)


@settings(max_examples=500, deadline=None)
@given(
    st.text("/*a {#}+", max_size=16),
    st.text("a *#}+", max_size=4),
    st.sampled_from(["postgres", "mysql", None]),
    st.sampled_from(["/*", "{#", "/*+"]),
)
def test_block_comments_end_where_sqlglot_ends_them(
    text: str, after: str, dialect: str | None, opener: str
) -> None:
    syntax = _sql_syntax(dialect)
    assume(opener in syntax.block_closers)
    # The tokenizer takes the longest opener: `/*+` where the dialect has hints.
    assume(not (opener == "/*" and text.startswith("+") and "/*+" in syntax.block_closers))
    closer = syntax.block_closers[opener]
    sql = f"{opener}{text}{closer}{after}"
    end, closed = syntax.comment_end(sql, len(opener), opener)
    tokenizer = Dialect.get_or_raise(dialect)
    if not closed:
        with pytest.raises(sqlglot.errors.TokenError):  # sqlglot refuses an unclosed comment
            tokenizer.tokenize(sql)
        return
    # Read up to where the comment was found to end, sqlglot ends it there too: earlier,
    # and text would follow it; later, and the comment would be unclosed.
    tokens = tokenizer.tokenize(sql[:end] + "\nz")
    assert [token.text for token in tokens] == ["z"]
    assert tokens[0].comments == [sql[len(opener) : end - len(closer)]]


@pytest.mark.parametrize(
    "comment",
    [
        "/* see https://ghp_tok3n@github.com/x */",  # masked to //***: a nested opener
        "/* a /* password 'hunter2 */ b */",  # the mask ran over the nested closer
    ],
)
def test_masking_inside_a_comment_keeps_where_the_comment_ends(comment: str) -> None:
    sql = f"SELECT o.id FROM sales.orders o {comment} JOIN sales.customers c ON c.id = o.cid"
    redacted = redact_sql(sql, "postgres")
    assert "tok3n" not in redacted
    assert "hunter2" not in redacted
    assert tables_and_columns(redacted, "postgres") == tables_and_columns(sql, "postgres")


# A bare token in a URL is masked to `//***@`, which holds `/*`.
COMMENT_PLACES = [*TEXT_PLACES, "https://{b}@github.com/x"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(FILLER, st.sampled_from(COMMENT_PLACES)), min_size=1, max_size=3),
       USER, BARE_SECRET, st.sampled_from(["postgres", "mysql", None]))  # fmt: skip
def test_secrets_in_a_comment_go_and_the_comment_ends_where_it_did(
    pieces: list[tuple[str, str]], user: str, secret: str, dialect: str | None
) -> None:
    body = " ".join(f"{filler} {place.format(user=user, b=secret)}" for filler, place in pieces)
    sql = f"SELECT t.a FROM sales.t /* {body} */ JOIN sales.u ON u.id = t.id"
    redacted = redact_sql(sql, dialect)
    assert secret not in redacted
    assert tables_and_columns(redacted, dialect) == tables_and_columns(sql, dialect)


@pytest.mark.parametrize(
    ("sql", "dialect", "redacted"),
    [
        # A quote inside [name] opened a "literal" that ate FROM and kept the real secret.
        ("SELECT [a'b].x, token FROM [t] WHERE password = 'hunter2'", "tsql",
         "SELECT [a'b].x, token FROM [t] WHERE password = '***'"),
        ("UPDATE [it's] SET password = src.p FROM src", "tsql",
         "UPDATE [it's] SET password = src.p FROM src"),
        ("SELECT [a]]b] FROM [s].[t] WHERE [password] = 'x'", "tsql",
         "SELECT [a]]b] FROM [s].[t] WHERE [password] = '***'"),
        ("SELECT [x'y] FROM t WHERE password = 'p'", "sqlite",
         "SELECT [x'y] FROM t WHERE password = '***'"),
        # Where `[` is a subscript it stays one.
        ("SELECT a[1], b['k'] FROM t WHERE password = 'p'", "postgres",
         "SELECT a[1], b['k'] FROM t WHERE password = '***'"),
    ],
)  # fmt: skip
def test_bracketed_names_are_names_where_the_dialect_has_them(
    sql: str, dialect: str, redacted: str
) -> None:
    assert redact_sql(sql, dialect) == redacted
    assert tables_and_columns(redacted, dialect) == tables_and_columns(sql, dialect)


BRACKET_NAME = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12
).map(lambda name: name.replace("]", "]]"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["tsql", "sqlite"]), BRACKET_NAME, BRACKET_NAME, BARE_SECRET)
def test_no_bracketed_name_hides_a_secret_or_changes_lineage(
    dialect: str, column: str, table: str, secret: str
) -> None:
    sql = f"SELECT [{column}], token FROM [{table}] WHERE password = '{secret}'"
    redacted = redact_sql(sql, dialect)
    assert f"'{secret}'" not in redacted
    assert redacted.startswith(f"SELECT [{column}], token FROM [{table}] WHERE ")
    assert tables_and_columns(redacted, dialect) == tables_and_columns(sql, dialect)
