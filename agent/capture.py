"""The capture contract between proxy and agent: one record per proxied request.

The proxy builds a `CaptureRecord` on its hot path and hands it to the spool; the agent
reads records back and derives lineage from them. The record is versioned: a reader meets
a record whose `version` it does not know and rejects it with a clear error rather than
guessing (see `agent.spool`). Adding an optional field with a default keeps the version;
renaming, removing or retyping a field bumps it.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

CAPTURE_VERSION = 1

Decision = Literal["allow", "deny", "unauthenticated", "error", "none"]
S = TypeVar("S", bound=msgspec.Struct)


class CaptureRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the proxy saw of one request, after authentication and authorization.

    The fields every record has come first, so the tap can build a record from positional
    arguments: with 20-odd keywords Python packs them into a dict and msgspec matches
    names, which costs the request path five times the record itself. Elsewhere, pass
    fields by name. Records are msgpack maps, so the order of fields is not part of the
    format: reordering them keeps `version`.
    """

    request_id: str
    # Wall-clock time the request arrived, nanoseconds since the Unix epoch.
    time_ns: int
    # Namespace of the data service behind this proxy, e.g. "https://sales-db.internal:8001".
    service: str
    method: str
    # The normalized path, exactly as the policy saw it and the upstream received it.
    path: str
    status: int
    version: int = CAPTURE_VERSION
    principal: str | None = None
    roles: tuple[str, ...] = ()
    query: str = ""
    route: str | None = None
    resource: str | None = None
    action: str | None = None
    decision: Decision = "none"
    rule: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration_us: int = 0
    traceparent: str | None = None
    tracestate: str | None = None
    # Configured correlation headers (job or run ids), lower-cased names.
    correlation: dict[str, str] = {}
    # SQL text, for routes whose rule says where the SQL is (query parameter or body).
    sql: str | None = None
    sql_dialect: str | None = None
    # Bounded excerpt of the request body, for routes that ask for it.
    body_excerpt: str | None = None


def escaped_text(text: str) -> str:
    """`text` with every lone surrogate written as a `\\udcXX` escape, the rest as it is."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escaped_text(value)
    if isinstance(value, tuple):
        return tuple(_escaped(item) for item in value)
    if isinstance(value, dict):
        return {_escaped(key): _escaped(item) for key, item in value.items()}
    return value


def with_text_escaped(record: S) -> S:
    """`record` (a capture record, an audit entry, an access-log line) with every lone
    surrogate in its text written as a `\\udcXX` escape.

    aiohttp hands header and target bytes that are not UTF-8 over as lone surrogates, and
    a JSON claim can carry one; neither msgpack nor JSON encoders take them. Call it when
    the first encode raised UnicodeEncodeError: the record is kept with the escapes
    spelled out rather than lost (or the request failed).
    """
    changes = {name: _escaped(getattr(record, name)) for name in record.__struct_fields__}
    return msgspec.structs.replace(record, **changes)
