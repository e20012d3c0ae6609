"""Secret redaction, applied to every capture record before anything derived from it leaves
the sidecar.

What it promises, for the places a secret travels in traffic:
* SQL text (`redact_sql`) is read as SQL: table and column names are lineage, not secrets,
  so no name is ever changed and the text stays parseable. Its secrets are literals: the
  one after a secret-like name (`PASSWORD 'p'`, `IDENTIFIED BY 'p'`, `SECRET 'p'`,
  `KEY_ID 'p'`, `password => 'p'`, `WHERE api_token = 'p'`, `PASSWORD('p')`, comments
  allowed in between), in any form (`E'p'`, `N'p'`, `U&'p'`, `$tag$p$tag$`, `"p"` where
  the dialect quotes strings so), keeps its quotes and gets `***` as content; so does the
  unquoted password of `IDENTIFIED BY p`. In every other literal and comment, the
  secrets of free text are masked: connection strings, query strings, URLs.
* Free text (`redact_text`: body excerpts, tracestate, query values): `name=value`,
  `name: value`, `"name": "value"` and `name 'value'` pairs whose name looks secret (libpq
  and ADO connection strings, JSON, YAML), URLs with userinfo (`postgresql://u:p@h`), and
  `Bearer`/`Basic`/`Token`/`Negotiate` credentials.
* URLs: the password of the userinfo (all of it when there is no password part: a bare
  token is a common way to authenticate), and query parameters named like
  token/password/secret/key/signature;
* headers: the configured header names, plus those that always carry credentials.

Every pattern runs in time linear in the text (hostile request bodies reach it), and
redaction is idempotent (redacting twice changes nothing more). It errs on the side of
hiding too much: a column literally named `token` compared to a string loses that string,
and a quote that never closes after a secret-like name hides the rest of the text. It does
not pair the columns of `INSERT ... (password) VALUES (...)` with their values: such a
literal is redacted as free text only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated
from urllib.parse import quote_plus, unquote_plus

import msgspec
from sqlglot.dialects.dialect import Dialect

from agent.capture import CaptureRecord

MASK = "***"

# Always treated as secret, whatever the configuration says.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)

# A name is secret when one of its words is one of these...
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pass",
        "passphrase",
        "secret",
        "token",
        "key",
        "apikey",
        "signature",
        "sig",
        "credential",
        "credentials",
        "authorization",
        "auth",
        "identified",
    }
)
# ...or when it contains one of these anywhere (`dbpassword`, `refreshtoken`).
_SECRET_FRAGMENTS = (
    "passw", "secret", "token", "apikey", "credential", "signature", "privatekey", "accesskey"
)  # fmt: skip

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


class RedactionRules(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configured redaction: header names (any case) whose values never leave the sidecar."""

    header_names: Annotated[
        frozenset[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]],
        msgspec.Meta(
            description="Captured header names (any case) whose values are masked, besides "
            "Authorization, Proxy-Authorization, Cookie, Set-Cookie and X-Api-Key, which "
            "always are."
        ),
    ] = frozenset()

    def secret_headers(self) -> frozenset[str]:
        return CREDENTIAL_HEADERS | {name.lower() for name in self.header_names}


def is_secret_name(name: str) -> bool:
    """Whether a parameter, option or header name looks like it holds a credential."""
    lowered = name.lower()
    if any(fragment in lowered for fragment in _SECRET_FRAGMENTS):
        return True
    words = (w.lower() for w in _WORD_SPLIT.split(name) if w)
    return any(word in _SECRET_WORDS for word in words)


# Every secret word and fragment above contains one of these: the regex engine skips the
# names that hold none of them, so `is_secret_name` runs only on a few candidates.
_CANDIDATE_PIECES = r"(?i:pass|pwd|secret|token|key|sig|cred|auth|identified)"

# --- free text ---------------------------------------------------------------------------
#
# Every scan that can fail starts at an anchor (a candidate name, a "://", a scheme word)
# and its repetitions are possessive, so no character is tried two ways; a quote that does
# not close after a secret name masks the rest of the text and ends the scan. That keeps
# each pattern linear in the text.

# Candidate names: a word starting where no other word character precedes it.
_NAME = re.compile(r"(?<![\w\-.$])(?=[\w\-.]*?" + _CANDIDATE_PIECES + r")[A-Za-z_][\w\-.]*+")
_EXPLICIT_SEP = r"\s*+(?:=>|:=|=|:)\s*+"
_BY = r"\s++BY\s++(?:VALUES\s++)?"
# An opening for a quoted value: SQL prefixes (`E'p'`, `N'p'`, `U&'p'`), the call in
# `PASSWORD('p')`, a quote; or a dollar quote.
_OPENING = r"(?:\(\s*+)?(?:(?:[EN]|U&)?['\"]|\$\w{0,64}\$)"
_QUOTED = (
    r"(?:\(\s*+)?(?:[EN]|U&)?'(?:[^'\\]++|\\.|'')*+'"
    r'|(?:\(\s*+)?"(?:[^"\\]++|\\.)*+"'
    r"|(?:\(\s*+)?\$(?P<tag>\w{0,64})\$.*?\$(?P=tag)\$"
)
# After a secret-like name: a quoted value after any separator, a plain space included
# (`PASSWORD 'p'`); a bare value after an explicit one (`password=p`, `IDENTIFIED BY p`) on
# the same line, unless it is a call (`= PASSWORD('p')`); or a quote that never closes. A
# bare word after a plain space is syntax: `PASSWORD NULL`.
_VALUE = re.compile(
    r"(?P<closing>[\"'`\]]?)"
    r"(?:(?P<sep>" + _EXPLICIT_SEP + "|" + _BY + r"|\s*+)(?P<quoted>" + _QUOTED + ")"
    r"|(?P<bare_sep>[ \t]*+(?:=>|:=|=|:)[ \t]*+|" + _BY + r")(?P<bare>[^\s'\"`;,&)(]++)(?!\()"
    r"|(?P<open_sep>" + _EXPLICIT_SEP + "|" + _BY + r"|\s*+)(?P<unclosed>" + _OPENING + "))",
    re.IGNORECASE | re.DOTALL,
)
# Userinfo is looked for only right after a "://" (scanning for a scheme from every word
# start rescans the rest of a long word at each of its letters). The user part holds no
# "/", so it ends before the next "://". The password may hold "/" and "@" (people paste
# them unencoded): it runs to the last "@" before the URL ends.
_URL_MARK = re.compile("://")
_URL_USER_END = re.compile(r"[\s/?#@:'\"]")
_URL_END = re.compile(r"[\s?#'\"]")
_BEARER = re.compile(
    r"\b(?P<kind>Bearer|Basic|Token|Negotiate)[ \t]++[A-Za-z0-9\-._~+/]++=*+", re.IGNORECASE
)


def _mask_value(value: re.Match[str]) -> str:
    closing = value["closing"]
    if value["bare"] is not None:
        return f"{closing}{value['bare_sep']}{MASK}"
    if value["unclosed"] is not None:
        return f"{closing}{value['open_sep']}{value['unclosed']}{MASK}"
    quoted = value["quoted"]
    tag = value["tag"]
    if tag is not None:
        opening = quoted[: quoted.index("$") + len(tag) + 2]
        return f"{closing}{value['sep']}{opening}{MASK}${tag}$"
    quote = quoted[-1]
    return f"{closing}{value['sep']}{quoted[: quoted.index(quote) + 1]}{MASK}{quote}"


def _mask_assignments(text: str) -> str:
    # A scan rather than one big pattern: only names that look secret may consume what
    # follows them, so `https://h/x?token=t` is not swallowed whole as the value of `https`.
    pieces: list[str] = []
    position = 0
    for name in _NAME.finditer(text):
        if name.start() < position or not is_secret_name(name.group(0)):
            continue
        value = _VALUE.match(text, name.end())
        if value is None:
            continue
        pieces.append(text[position : name.end()])
        pieces.append(_mask_value(value))
        position = value.end() if value["unclosed"] is None else len(text)
    pieces.append(text[position:])
    return "".join(pieces)


def _mask_userinfo(text: str) -> str:
    pieces: list[str] = []
    position = 0
    # The end of the URL the last password was looked for in, and its last "@": a later
    # password starting before that end shares both, so no stretch is scanned twice.
    url_end, last_at = -1, -1
    for mark in _URL_MARK.finditer(text):
        user_start = mark.end()
        if user_start < position:
            continue
        found = _URL_USER_END.search(text, user_start)
        user_end = len(text) if found is None else found.start()
        following = text[user_end : user_end + 1]
        if following == "@" and user_end > user_start:
            pieces.append(text[position:user_start] + MASK)
            position = user_end
        elif following == ":":
            if user_end >= url_end:
                end = _URL_END.search(text, user_end)
                url_end = len(text) if end is None else end.start()
                last_at = text.rfind("@", user_end, url_end)
            if last_at > user_end:
                pieces.append(text[position : user_end + 1] + MASK)
                position = last_at
    pieces.append(text[position:])
    return "".join(pieces)


def redact_text(text: str) -> str:
    """Mask secrets in free text: a body excerpt, a connection string, a URL, a header."""
    text = _BEARER.sub(lambda m: f"{m['kind']} {MASK}", text)
    text = _mask_userinfo(text)
    return _mask_assignments(text)


# --- SQL ---------------------------------------------------------------------------------
#
# SQL is read as tokens: comments, literals, quoted identifiers and candidate names, each
# as the dialect's sqlglot tokenizer reads it; what lies between them is copied as it is.
# Names are never changed. A literal right after a secret-like name (and a separator, `BY`,
# a call's parenthesis or comments) has its content masked; any other literal or comment
# has its content redacted as free text.

_SQL_WORD = r"[^\W\d][\w$]*+"


def _sql_value_start(gap: str) -> re.Pattern[str]:
    """From the end of a secret-like name to where its value starts, `gap` (whitespace and
    the dialect's comments) allowed between the parts: `]` (of `[password]`), then
    `<comparison>`, optionally a function's name (`= crypt('p')`), or `BY` (optionally
    `VALUES`), then optionally `(` (`PASSWORD('p')`)."""
    return re.compile(
        r"\]?"
        + gap
        + r"(?:(?P<sep>=>|:=|==|!=|<>|<=|>=|=|<|>|:|(?:NOT\s++)?I?LIKE(?![\w$]))"
        + gap
        + "(?:"
        + _SQL_WORD
        + gap
        + r"(?=\())?"
        r"|(?P<by>BY)(?![\w$])" + gap + r"(?:VALUES(?![\w$])" + gap + ")?)?"
        r"(?:\(" + gap + ")?",
        re.IGNORECASE,
    )


# The unquoted password of `IDENTIFIED BY p`.
_SQL_BARE_PASSWORD = re.compile(r"[^\s;,()'\"`]++")
# Hex and bit strings hold no text: their content is removed, since `***` is no hex.
_BINARY_PREFIXES = frozenset("XxBb")
_UNESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "b": "\b"}
_ESCAPES = {char: f"\\{code}" for code, char in _UNESCAPES.items()} | {"\\": "\\\\"}


class _SqlSyntax:
    """How one dialect quotes and comments, as its sqlglot tokenizer reads it: whether
    strings take backslash escapes, what `"` quotes, which comments there are (`#` in
    MySQL, `//` in Snowflake, `{# #}` everywhere), whether block comments nest, where a
    line comment ends. Read otherwise, a quote inside a comment would open a literal that
    swallows the real SQL after it, and a real secret literal would be taken for SQL."""

    def __init__(
        self,
        backslash_escapes: bool,
        double_quoted_strings: bool,
        *,
        bracketed_names: bool = False,
        comments: Mapping[str, str | None],
        nested_comments: bool,
        dash_comment_needs_boundary: bool,
        line_comments_end_at_newline_only: bool,
    ) -> None:
        self.backslash_escapes = backslash_escapes
        self.double_quoted_strings = double_quoted_strings
        self.nested_comments = nested_comments
        self.block_closers = {start: end for start, end in comments.items() if end is not None}
        line_starts = [start for start, end in comments.items() if end is None]
        # Longest first: `#!` before `#`, `/*+` before `/*`, as a tokenizer's trie takes them.
        lines = "|".join(
            re.escape(start)
            + (r"(?=[\s\x00-\x1f\x7f]|\Z)" if start == "--" and dash_comment_needs_boundary else "")
            for start in sorted(line_starts, key=len, reverse=True)
        )
        line_body = r"[^\n]*+" if line_comments_end_at_newline_only else r"[^\n\r]*+"
        block_starts = sorted(self.block_closers, key=len, reverse=True)
        blocks = "|".join(re.escape(start) for start in block_starts)
        # A block comment's end is found by `comment_end` (nesting is no regular language).
        comment = f"(?P<line>{lines}){line_body}|(?P<block>{blocks})"
        # Between a secret-like name and its value: here a nested comment is read as if it
        # did not nest (its value is then redacted as free text, not masked as a secret).
        gap_comments = [f"(?:{lines}){line_body}"] + [
            f"{re.escape(start)}(?:(?!{re.escape(end)})(?s:.))*+(?:{re.escape(end)})?"
            for start, end in self.block_closers.items()
        ]
        self.value_start = _sql_value_start(r"(?:\s++|" + "|".join(gap_comments) + ")*+")
        double = _sql_quoted('"', "d_close", backslash_escapes and double_quoted_strings)
        self.tokens = re.compile(
            "(?P<comment>" + comment + ")"
            r"|(?P<e_string>(?<![\w$])[Ee]" + _sql_quoted("'", "e_close", True) + ")"
            r"|(?P<string>(?:(?<![\w$])(?:[NnXxBb]|[Uu]&))?"
            + _sql_quoted("'", "s_close", backslash_escapes)
            + ")"
            "|(?P<double>" + double + ")"
            "|(?P<backquoted>"
            + _sql_quoted("`", "b_close", False)
            + ")"
            # T-SQL's and SQLite's [name] (a `]` inside is doubled); elsewhere `[` is a
            # subscript or an array, never a quote.
            + (r"|(?P<bracketed>\[(?:[^\]]++|\]\])*+(?P<k_close>\])?)" if bracketed_names else "")
            + r"|(?P<dollar>(?<![\w$])\$(?:[^\W\d]\w*+)?\$)"
            r"|(?P<name>(?<![\w$])(?=[\w$]*?" + _CANDIDATE_PIECES + ")" + _SQL_WORD + ")",
        )

    def comment_end(self, sql: str, start: int, opener: str) -> tuple[int, bool]:
        """Where the block comment whose `opener` ends at `start` ends, and whether it is
        closed (else it runs to the end of the text). Follows sqlglot's scan step by step:
        a closer is looked for at every place, an opener (when comments nest) only one
        character after a place looked at, so never right after an opener."""
        closer = self.block_closers[opener]
        # sqlglot compares as many characters as the closer has with the opener: a longer
        # opener (the hint's `/*+`) never nests.
        if not self.nested_comments or len(opener) != len(closer):
            at = sql.find(closer, start)
            return (len(sql), False) if at < 0 else (at + len(closer), True)
        # The next closer and opener where each may count; found again only once passed,
        # so each stretch of text is searched once (`/*` * n + `*/` * n stays linear).
        close_at, open_at, depth = sql.find(closer, start), sql.find(opener, start + 1), 1
        while close_at >= 0 or open_at >= 0:
            if close_at >= 0 and (open_at < 0 or close_at < open_at):
                depth -= 1
                if depth == 0:
                    return close_at + len(closer), True
                # An opener may start on the closer's last character (`*/*`).
                close_at = sql.find(closer, close_at + 1)
            else:
                depth += 1
                position = open_at + len(opener)
                if 0 <= close_at < position:
                    close_at = sql.find(closer, position)
                open_at = sql.find(opener, position + 1)
        return len(sql), False


def _sql_quoted(quote: str, close_group: str, backslash_escapes: bool) -> str:
    q = re.escape(quote)
    # A backslash escapes any character, a lone one at the very end included.
    escaped = r"|\\(?s:.)?" if backslash_escapes else ""
    body = rf"(?:[^{q}\\]++{escaped}|{q}{q})*+" if backslash_escapes else rf"(?:[^{q}]++|{q}{q})*+"
    return f"{q}{body}(?P<{close_group}>{q})?"


@functools.lru_cache(maxsize=64)
def _sql_syntax(dialect: str | None) -> _SqlSyntax:
    try:
        tokenizer = Dialect.get_or_raise(dialect).tokenizer_class
    except ValueError:
        # An unknown dialect gives no lineage either; read its quotes the common way.
        tokenizer = Dialect.get_or_raise(None).tokenizer_class
    return _SqlSyntax(
        backslash_escapes="\\" in tokenizer.STRING_ESCAPES,
        double_quoted_strings='"' in tokenizer.QUOTES and '"' not in tokenizer.IDENTIFIERS,
        bracketed_names=tokenizer._IDENTIFIERS.get("[") == "]",
        # Every comment the tokenizer reads (its COMMENTS, the hint opener, Jinja's `{#`).
        comments=tokenizer._COMMENTS,
        nested_comments=tokenizer.NESTED_COMMENTS,
        dash_comment_needs_boundary=tokenizer.DASH_COMMENT_REQUIRES_BOUNDARY,
        line_comments_end_at_newline_only=tokenizer.COMMENTS_TERMINATE_AT_NEWLINE_ONLY,
    )


def _unescape(content: str, quote: str, backslash_escapes: bool) -> str:
    doubled = quote + quote
    if not backslash_escapes:
        return content.replace(doubled, quote)
    return re.sub(
        r"\\(.)|" + re.escape(doubled),
        lambda m: quote if m[1] is None else _UNESCAPES.get(m[1], m[1]),
        content,
        flags=re.DOTALL,
    )


def _escape(content: str, quote: str, backslash_escapes: bool) -> str:
    if not backslash_escapes:
        return content.replace(quote, quote + quote)
    # Escapes other than these come back as the character they stand for: the content of
    # a literal that held a secret may be spelled differently, never read differently.
    return re.sub(
        r"[\\\n\t\r\0\b" + re.escape(quote) + "]",
        lambda m: _ESCAPES.get(m[0], "\\" + m[0]),
        content,
    )


def _redact_content(content: str, quote: str, backslash_escapes: bool) -> str:
    """A literal's or comment's content with secrets masked, escaped as it was."""
    if not quote:
        return redact_text(content)
    text = _unescape(content, quote, backslash_escapes)
    redacted = redact_text(text)
    return content if redacted == text else _escape(redacted, quote, backslash_escapes)


def redact_sql(sql: str, dialect: str | None = None) -> str:
    """Mask secrets in SQL text, keeping every name and keeping it parseable."""
    syntax = _sql_syntax(dialect)
    pieces: list[str] = []
    position = 0
    # Where the value of the last secret-like name starts, and whether it came after `BY`.
    value_at, after_by = -1, False
    while (token := syntax.tokens.search(sql, position)) is not None:
        kind, start, end = token.lastgroup, token.start(), token.end()
        pieces.append(sql[position:start])
        name: str | None = None
        if kind == "comment":
            opener = token["block"]
            if opener is None:
                line = token["line"]
                pieces.append(line + redact_text(token.group(0)[len(line) :]))
            else:
                end, closed = syntax.comment_end(sql, end, opener)
                closer = syntax.block_closers[opener] if closed else ""
                body = sql[token.end() : end - len(closer)]
                comment = opener + redact_text(body) + closer
                if syntax.comment_end(comment, len(opener), opener) != (len(comment), closed):
                    # A mask made or ran over a delimiter (`https://***@h` holds `/*`): the
                    # comment would end elsewhere, taking real SQL in or giving text out.
                    comment = f"{opener} {MASK} {closer}"
                pieces.append(comment)
        elif kind == "name":
            name = token.group(0)
            pieces.append(name)
        else:
            literal = _read_literal(sql, token, syntax)
            if literal.is_name and literal.closing and start != value_at:
                name = literal.content
                pieces.append(token.group(0))
            else:
                pieces.append(literal.redacted(secret=start == value_at, after_by=after_by))
                end = literal.end
        if name is not None and is_secret_name(name):
            value = syntax.value_start.match(sql, end)
            assert value is not None  # every part of the pattern is optional
            value_at, after_by = value.end(), value["by"] is not None
            following = syntax.tokens.match(sql, value_at)
            bare = _SQL_BARE_PASSWORD.match(sql, value_at) if after_by else None
            if bare is not None and (following is None or following.lastgroup == "name"):
                pieces.append(redact_text(sql[end:value_at]) + MASK)
                end = bare.end()
        position = end
    pieces.append(sql[position:])
    return "".join(pieces)


_CLOSE_GROUPS = {"e_string": "e_close", "string": "s_close", "double": "d_close",
                 "backquoted": "b_close", "bracketed": "k_close"}  # fmt: skip


class _Literal(msgspec.Struct, frozen=True):
    """A quoted token of SQL: a string, or a quoted name standing where a value may be."""

    kind: str
    opening: str
    content: str
    closing: str  # empty when the quote never closes: then the literal runs to the end
    end: int
    quote: str  # the quote doubled inside it; empty for dollar quotes
    backslash_escapes: bool
    is_name: bool

    def redacted(self, *, secret: bool, after_by: bool) -> str:
        if not secret:
            content = _redact_content(self.content, self.quote, self.backslash_escapes)
        elif self.is_name and not after_by:
            content = self.content  # `password = "other_column"`; only `BY "p"` is secret
        elif self.kind == "string" and self.opening[0] in _BINARY_PREFIXES:
            content = ""
        else:
            content = MASK
        return f"{self.opening}{content}{self.closing}"


def _read_literal(sql: str, token: re.Match[str], syntax: _SqlSyntax) -> _Literal:
    kind, text, end = token.lastgroup or "", token.group(0), token.end()
    if kind == "dollar":
        closing_at = sql.find(text, end)
        content_end = len(sql) if closing_at < 0 else closing_at
        closing = "" if closing_at < 0 else text
        return _Literal(kind, text, sql[end:content_end], closing, content_end + len(closing),
                        quote="", backslash_escapes=False, is_name=False)  # fmt: skip
    if kind == "bracketed":
        closing = "]" if token["k_close"] is not None else ""
        return _Literal(kind, "[", text[1 : len(text) - len(closing)], closing,
                        end if closing else len(sql), quote="]", backslash_escapes=False,
                        is_name=True)  # fmt: skip
    quote = text[-1] if kind in ("double", "backquoted") else "'"
    opening = text[: text.index(quote) + 1]
    closing = quote if token[_CLOSE_GROUPS[kind]] is not None else ""
    backslash_escapes = kind == "e_string" or (
        syntax.backslash_escapes and kind in ("string", "double")
    )
    return _Literal(
        kind,
        opening,
        text[len(opening) : len(text) - len(closing)],
        closing,
        end if closing else len(sql),
        quote=quote,
        backslash_escapes=backslash_escapes,
        is_name=kind == "backquoted" or (kind == "double" and not syntax.double_quoted_strings),
    )


def redact_query(query: str) -> str:
    """Mask secret-named parameters of a query string, and secrets inside other values."""
    if not query:
        return query
    parts: list[str] = []
    for pair in query.split("&"):
        name, eq, raw_value = pair.partition("=")
        if not eq:
            parts.append(pair)
        elif is_secret_name(unquote_plus(name)):
            parts.append(f"{name}={MASK}")
        else:
            # A value such as ?sql=CREATE+USER+u+PASSWORD+%27p%27 hides its secret behind
            # the URL encoding: redact the decoded text, re-encode only when it changed.
            value = unquote_plus(raw_value)
            redacted = redact_text(value)
            parts.append(pair if redacted == value else f"{name}={quote_plus(redacted)}")
    return "&".join(parts)


def redact_url(url: str) -> str:
    """Mask the userinfo password (or bare token) and secret query parameters of a URL."""
    base, question, rest = url.partition("?")
    base = _mask_userinfo(base)
    if not question:
        return base
    query, hash_mark, fragment = rest.partition("#")
    return f"{base}?{redact_query(query)}{hash_mark}{fragment}"


def redact_headers(headers: Mapping[str, str], rules: RedactionRules) -> dict[str, str]:
    secret = rules.secret_headers()
    return {name: (MASK if name.lower() in secret else value) for name, value in headers.items()}


def redact_record(record: CaptureRecord, rules: RedactionRules) -> CaptureRecord:
    """The record with every secret it may carry masked; the input is not changed."""
    return msgspec.structs.replace(
        record,
        query=redact_query(record.query),
        sql=None if record.sql is None else redact_sql(record.sql, record.sql_dialect),
        body_excerpt=None if record.body_excerpt is None else redact_text(record.body_excerpt),
        correlation=redact_headers(record.correlation, rules),
        tracestate=None if record.tracestate is None else redact_text(record.tracestate),
    )
