"""Secret redaction, applied to every capture record before anything derived from it leaves
the sidecar.

What it promises, for the places a secret travels in traffic:
* SQL text: the literal after a secret-like keyword (`PASSWORD 'p'`, `IDENTIFIED BY 'p'`,
  `SECRET 'p'`, `KEY_ID 'p'`, `password => 'p'`, ...), `name=value` pairs whose name looks
  secret (libpq and ADO connection strings, query strings inside literals), and URLs with
  userinfo (`postgresql://u:p@h`);
* URLs: the password of the userinfo (all of it when there is no password part: a bare
  token is a common way to authenticate), and query parameters named like
  token/password/secret/key/signature;
* headers: the configured header names, plus those that always carry credentials.

Redaction is idempotent (redacting twice changes nothing more) and leaves SQL parseable:
a literal keeps its quotes, only its content becomes `***`. It errs on the side of hiding
too much: a column literally named `token` compared to a string loses that string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote_plus, unquote_plus

import msgspec

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
_SECRET_FRAGMENTS = ("passw", "secret", "token", "apikey", "credential", "signature")

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


class RedactionRules(msgspec.Struct, frozen=True, kw_only=True):
    """Configured redaction: header names (any case) whose values never leave the sidecar."""

    header_names: frozenset[str] = frozenset()

    def secret_headers(self) -> frozenset[str]:
        return CREDENTIAL_HEADERS | {name.lower() for name in self.header_names}


def is_secret_name(name: str) -> bool:
    """Whether a parameter, option or header name looks like it holds a credential."""
    lowered = name.lower()
    if any(fragment in lowered for fragment in _SECRET_FRAGMENTS):
        return True
    words = (w.lower() for w in _WORD_SPLIT.split(name) if w)
    return any(word in _SECRET_WORDS for word in words)


# Quoted values are looked for up to this length: it keeps every pattern linear in the
# text. A secret-named value that opens a quote and does not close it within this many
# characters masks everything after it (we cannot tell where the secret ends).
MAX_VALUE_CHARS = 8192

# Candidate names: a word starting where no other word character precedes it.
_NAME = re.compile(r"(?<![\w\-.$])[A-Za-z_][\w\-.]*+")
# A quoted value: SQL string (with '' or backslash escapes; when the backslash reading finds
# no closing quote, the plain one is tried), double-quoted, or dollar-quoted.
_LIMIT = f"{{0,{MAX_VALUE_CHARS}}}"
_QUOTED = (
    r"'(?:[^'\\]|\\.|'')" + _LIMIT + "'"
    r"|'[^']" + _LIMIT + "'"
    r'|"(?:[^"\\]|\\.)' + _LIMIT + '"'
    r"|\$(?P<tag>\w{0,64})\$." + _LIMIT + r"?\$(?P=tag)\$"
)
_EXPLICIT_SEP = r"[ \t]*(?:=>|=|:)[ \t]*|\s+BY\s+"
# After a secret-like name: `<sep> 'quoted'` with any separator, including a plain space
# (`PASSWORD 'p'`), or `=bare` with an explicit one (`password=p`, `IDENTIFIED BY p`); a
# bare word after a space is syntax (`PASSWORD NULL`).
_VALUE = re.compile(
    r"(?P<closing>[\"'`]?)"
    r"(?:(?P<sep>" + _EXPLICIT_SEP + r"|\s{1,64})(?P<quoted>" + _QUOTED + r")"
    r"|(?P<bare_sep>" + _EXPLICIT_SEP + r")(?P<bare>[^\s'\"`;,&)(]+)"
    r"|(?P<open_sep>" + _EXPLICIT_SEP + r"|\s{1,64})(?P<unclosed>['\"]|\$\w{0,64}\$))",
    re.IGNORECASE | re.DOTALL,
)
# Userinfo is looked for only right after a "://": scanning for a scheme from every word
# start would rescan the rest of a long word (`a-a-a-...`) at each of its letters. Neither
# part can hold a "/", so each attempt ends before the next "://" begins.
_URL_USERINFO = re.compile(
    r"(?P<scheme>://)(?P<user>[^\s/?#@:'\"]*+)(?::(?P<password>[^\s/?#'\"]*))?@"
)
_BEARER = re.compile(r"\b(?P<kind>Bearer|Basic|Token|Negotiate)\s++[A-Za-z0-9\-._~+/=]++", re.I)


def _mask_value(value: re.Match[str]) -> str:
    closing = value["closing"]
    if value["bare"] is not None:
        return f"{closing}{value['bare_sep']}{MASK}"
    if value["unclosed"] is not None:
        return f"{closing}{value['open_sep']}{value['unclosed']}{MASK}"
    quoted = value["quoted"]
    opening = f"${value['tag'] or ''}$" if quoted.startswith("$") else quoted[0]
    return f"{closing}{value['sep']}{opening}{MASK}{opening}"


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
        masked = _mask_value(value)
        pieces.append(masked)
        position = value.end() if value["unclosed"] is None else len(text)
    pieces.append(text[position:])
    return "".join(pieces)


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, user, password = match["scheme"], match["user"], match["password"]
    if password is not None:
        return f"{scheme}{user}:{MASK}@"
    if not user:
        return match.group(0)
    return f"{scheme}{MASK}@"


def redact_text(text: str) -> str:
    """Mask secrets in free text: SQL, a body excerpt, a connection string, a URL."""
    text = _BEARER.sub(lambda m: f"{m['kind']} {MASK}", text)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    return _mask_assignments(text)


def redact_sql(sql: str) -> str:
    """Mask secrets in SQL text, keeping it parseable."""
    return redact_text(sql)


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
    base = _URL_USERINFO.sub(_mask_userinfo, base)
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
        sql=None if record.sql is None else redact_sql(record.sql),
        body_excerpt=None if record.body_excerpt is None else redact_text(record.body_excerpt),
        correlation=redact_headers(record.correlation, rules),
        tracestate=None if record.tracestate is None else redact_text(record.tracestate),
    )
