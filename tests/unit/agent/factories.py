"""Capture records for derivation tests, with defaults a real proxy would fill in."""

from __future__ import annotations

from typing import Any

from agent.capture import CaptureRecord

SERVICE = "https://sales-db.internal:8001"
T0 = 1_764_000_000_000_000_000  # 2025-11-24T16:00:00Z, in nanoseconds
SECOND = 1_000_000_000


def make_record(request_id: str = "req-1", **fields: Any) -> CaptureRecord:
    values: dict[str, Any] = {
        "request_id": request_id,
        "time_ns": T0,
        "service": SERVICE,
        "principal": "alice",
        "roles": ("analyst",),
        "method": "GET",
        "path": "/sales/orders",
        "route": "datasets",
        "decision": "allow",
        "rule": "p, analyst, dataset:sales.*, read",
        "status": 200,
        "duration_us": 1_000,
    }
    values.update(fields)
    return CaptureRecord(**values)


def traceparent(trace: int, span: int = 1) -> str:
    return f"00-{trace:032x}-{span:016x}-01"
