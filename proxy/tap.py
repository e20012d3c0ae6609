"""The capture tap: one `CaptureRecord` per request, handed to the spool.

Runs after the response (or the refusal) is known and costs the request path one struct
and one in-memory append (`SpoolWriter.append`), with nothing awaited unless the spool is
full under the `block` policy; the spool's own thread writes and fsyncs. Denied and
unauthenticated requests are recorded too: who tried to read what is exactly what an
access review wants. SQL is taken from the route's declared place (a query parameter, or
the body excerpt the forwarder kept) and left raw here: redaction is the agent's first
step, before anything leaves the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

from aiohttp import web

from agent.capture import CAPTURE_VERSION, CaptureRecord, Decision
from agent.spool import SpoolClosedError, SpoolFullError, SpoolWriter
from proxy.gate import Admission, sql_from_query

log = logging.getLogger(__name__)

# Shared by every record when no correlation headers are configured: records are frozen
# and only ever encoded, so nothing writes to it.
_NO_CORRELATION: dict[str, str] = {}

_OUTCOMES: dict[str, Decision] = {
    "allow": "allow",
    "deny": "deny",
    "unauthenticated": "unauthenticated",
    "rejected": "error",
}


def sql_from_body(excerpt: bytes, content_type: str, param: str) -> str | None:
    """SQL from a form, a JSON object or a plain-text body, as far as the excerpt holds it."""
    text = excerpt.decode("utf-8", "replace")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        return sql_from_query(text, param)
    if kind == "application/json":
        try:
            document = json.loads(text)
        except ValueError:
            return None
        value = document.get(param) if isinstance(document, dict) else None
        return value if isinstance(value, str) else None
    return text or None


class Tap:
    """Builds the record; the spool writer owns durability and back-pressure."""

    def __init__(
        self,
        spool: SpoolWriter,
        *,
        service: str,
        correlation_headers: Sequence[str],
    ) -> None:
        # The spool's `when_full` option decides between dropping and waiting.
        self.spool = spool
        self._service = service
        self._correlation = tuple((h, h.lower()) for h in correlation_headers)
        self.dropped = 0
        # Waits for room that outlive their request (the client hung up): kept referenced.
        self._waits: set[asyncio.Task[None]] = set()

    def record(
        self,
        request: web.BaseRequest,
        *,
        request_id: str,
        time_ns: int,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration_s: float,
        admission: Admission | None,
        body_excerpt: bytes | None,
    ) -> CaptureRecord | None:
        """Build the record and append it without waiting. Under `block`, a record that
        does not fit now is returned: the caller awaits `append_wait` with it."""
        headers = request.headers
        if admission is not None:
            principal = admission.principal
            match = admission.match
            decision = admission.decision
            outcome = _OUTCOMES.get(admission.outcome, "none")
            path, _, query = admission.target.partition("?")
        else:
            principal = match = decision = None
            outcome = "none"
            path, _, query = request.raw_path.partition("?")
        sql = None
        dialect = None
        excerpt_text = None
        if match is not None and match.route.sql is not None:
            source = match.route.sql
            dialect = source.dialect
            if source.location == "query":
                sql = sql_from_query(query, source.param)
            elif body_excerpt:
                sql = sql_from_body(body_excerpt, headers.get("Content-Type", ""), source.param)
                excerpt_text = body_excerpt.decode("utf-8", "replace")
        correlation = (
            {
                lower: value
                for name, lower in self._correlation
                if (value := headers.get(name)) is not None
            }
            if self._correlation
            else _NO_CORRELATION
        )
        # Positional, in CaptureRecord's field order (see there why); a unit test holds
        # every field of a tapped record to what it must be.
        record = CaptureRecord(
            request_id,
            time_ns,
            self._service,
            request.method,
            path,
            status,
            CAPTURE_VERSION,
            principal.id if principal is not None else None,
            principal.roles if principal is not None else (),
            query,
            match.route.name if match is not None else None,
            match.resource if match is not None else None,
            match.action if match is not None else None,
            outcome,
            ", ".join(decision.rule) if decision is not None and decision.rule else None,
            bytes_in,
            bytes_out,
            int(duration_s * 1_000_000),
            headers.get("traceparent"),
            headers.get("tracestate"),
            correlation,
            sql,
            dialect,
            excerpt_text,
        )
        # fail_open: never wait, a full spool drops and counts. block: the handler waits
        # for space before its response goes out, so a stuck agent slows clients down
        # instead of losing their records.
        try:
            appended = self.spool.append(record)
        except SpoolFullError:
            return record
        if not appended:
            self.dropped += 1
        return None

    async def append_wait(self, record: CaptureRecord) -> None:
        """Wait (in order) for room in the spool; only the `block` policy gets here.

        The wait is shielded: a client that hangs up cancels its request, and with it this
        await, but the record is still appended once there is room, not lost."""
        wait = asyncio.ensure_future(self._append_when_room(record))
        self._waits.add(wait)
        wait.add_done_callback(self._waits.discard)
        await asyncio.shield(wait)

    async def _append_when_room(self, record: CaptureRecord) -> None:
        try:
            appended = await self.spool.append_wait(record)
        except SpoolClosedError:
            appended = False  # shutting down with the spool still full: counted, as ever
        if not appended:
            self.dropped += 1
