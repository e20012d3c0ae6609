"""Derivation: capture records in, lineage and access events out. Pure: no IO, no clock.

For each record, in arrival order: redact its secrets (`redact`), read the datasets it
names and the tables and columns of its SQL (`routes`, `sql`; SQL over the size limit is
only noted as such, before redaction, and never analysed), emit an access event per
dataset it names, and feed the run correlator (`runs`), which emits OpenLineage START and
COMPLETE/FAIL events. The same records always give the same events with the same ids.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from agent.capture import CaptureRecord
from agent.derive.redact import RedactionRules, redact_record
from agent.derive.routes import access_events, request_lineage
from agent.derive.runs import RunConfig, RunCorrelator
from agent.derive.sql import DEFAULT_MAX_SQL_BYTES, sql_bytes
from agent.events import LineageEvent, RunEvent

__all__ = ["DeriveConfig", "Deriver"]


class DeriveConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lineage derivation: run correlation, redaction, SQL limits."""

    runs: RunConfig = RunConfig()
    redaction: RedactionRules = RedactionRules()
    max_sql_bytes: Annotated[
        int,
        # At most what a capture record can hold (1 MiB): a larger limit would never apply.
        msgspec.Meta(ge=0, le=1 << 20),
        msgspec.Meta(
            description="SQL texts longer than this (UTF-8 bytes) are recorded as unparsed, "
            "with their size, and never analysed; parsing time grows with the text. 0: no "
            "SQL is analysed."
        ),
    ] = DEFAULT_MAX_SQL_BYTES


class Deriver:
    """Stateful only through the open runs; everything else is a function of the record."""

    def __init__(self, config: DeriveConfig | None = None) -> None:
        self._config = config or DeriveConfig()
        self._runs = RunCorrelator(self._config.runs)

    @property
    def open_runs(self) -> int:
        return self._runs.open_runs

    def snapshot(self) -> bytes:
        """The deriver's only state, its open runs, as bytes (see `RunCorrelator.snapshot`)."""
        return self._runs.snapshot()

    def restore(self, data: bytes) -> None:
        self._runs.restore(data)

    def feed(self, record: CaptureRecord) -> list[LineageEvent]:
        """Access events for this record, then the run events it made due."""
        rules, max_sql_bytes = self._config.redaction, self._config.max_sql_bytes
        if record.sql is not None and sql_bytes(record.sql) > max_sql_bytes:
            # SQL over the limit is never analysed: the lineage notes its size, measured on
            # the text as captured, and nothing else. Redacting it first would spend time
            # on text nobody reads; the record goes on without it.
            lineage = request_lineage(record, max_sql_bytes=max_sql_bytes)
            record = redact_record(msgspec.structs.replace(record, sql=None), rules)
        else:
            record = redact_record(record, rules)
            lineage = request_lineage(record, max_sql_bytes=max_sql_bytes)
        events: list[LineageEvent] = list(access_events(record, lineage))
        events.extend(self._runs.feed(record, lineage))
        return events

    def tick(self, now_ns: int) -> list[RunEvent]:
        """Runs idle at wall-clock `now_ns`; call when the spool is drained."""
        return self._runs.tick(now_ns)

    def flush(self) -> list[RunEvent]:
        """Complete every open run, e.g. on shutdown."""
        return self._runs.flush()
