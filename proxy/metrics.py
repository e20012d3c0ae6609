"""Prometheus metrics of the proxy, with the label children bound once at start.

With several worker processes, prometheus_client's multiprocess mode is used: the
supervisor sets PROMETHEUS_MULTIPROC_DIR before the workers start, each worker writes its
values to memory-mapped files there, and the admin listener adds them up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

# The *_created series double the exposition and nobody here graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "protocol", "closed", "pool_exhausted")


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What a worker's policy store, spool and audit log have counted so far."""

    policy_reloads_ok: int = 0
    policy_reloads_failed: int = 0
    policy_failing: bool = False
    appended: int = 0
    dropped_full: int = 0
    dropped_oversize: int = 0
    blocked: int = 0
    spool_bytes: int = 0
    spool_full: bool = False
    spool_write_errors: int = 0
    audit_written: int = 0
    audit_pending: int = 0


class ProxyMetrics:
    """The proxy's metrics; `registry` is None in multiprocess mode (values go to files)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.requests = Counter(
            "lineage_sidecar_requests_total",
            "Requests answered by the proxy, by status class.",
            ["status_class"],
            registry=reg,
        )
        self.latency = Histogram(
            "lineage_sidecar_request_duration_seconds",
            "Time from request headers received to response complete.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_errors = Counter(
            "lineage_sidecar_upstream_errors_total",
            "Failures talking to the upstream, by kind.",
            ["kind"],
            registry=reg,
        )
        self.active_connections = Gauge(
            "lineage_sidecar_active_connections",
            "Client connections open now.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.rejected = Counter(
            "lineage_sidecar_rejected_requests_total",
            "Requests refused before forwarding (limits, malformed), by status.",
            ["status"],
            registry=reg,
        )
        self.tls_reloads = Counter(
            "lineage_sidecar_tls_reloads_total",
            "Certificate reloads from disk, by result.",
            ["result"],
            registry=reg,
        )
        self.access_log_dropped = Counter(
            "lineage_sidecar_access_log_dropped_total",
            "Access log entries dropped because the buffer was full.",
            registry=reg,
        )
        self.policy_reloads = Counter(
            "lineage_sidecar_policy_reloads_total",
            "Policy reloads from the files, by result (a broken state is counted once).",
            ["result"],
            registry=reg,
        )
        self.policy_failing = Gauge(
            "lineage_sidecar_policy_reload_failing",
            "1 while the policy files fail to load and the last good policy is served.",
            multiprocess_mode="max",
            registry=reg,
        )
        self.capture_records = Counter(
            "lineage_sidecar_capture_records_total",
            "Capture records by fate: appended to the spool, or dropped (full, oversize).",
            ["result"],
            registry=reg,
        )
        self.capture_blocked = Counter(
            "lineage_sidecar_capture_blocked_total",
            "Requests that waited for room in a full spool (when_full: block).",
            registry=reg,
        )
        self.spool_bytes = Gauge(
            "lineage_sidecar_spool_bytes",
            "Bytes of the capture spool: segment files on disk plus the write buffer.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.spool_full = Gauge(
            "lineage_sidecar_spool_full",
            "1 while a capture spool has no room for another record.",
            multiprocess_mode="max",
            registry=reg,
        )
        self.spool_write_errors = Counter(
            "lineage_sidecar_spool_write_errors_total",
            "Failed writes of the capture spool (retried; see /readyz and the log).",
            registry=reg,
        )
        self.audit_lines = Counter(
            "lineage_sidecar_audit_lines_total",
            "Decisions written to the audit log.",
            registry=reg,
        )
        self.audit_pending = Gauge(
            "lineage_sidecar_audit_pending",
            "Decisions waiting to be written to the audit log.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self._published = WorkerState()
        # Bound children: the hot path indexes a tuple instead of calling labels().
        self.by_status_class = tuple(self.requests.labels(c) for c in STATUS_CLASSES)
        self.upstream_error = {k: self.upstream_errors.labels(k) for k in UPSTREAM_ERROR_KINDS}
        self.observe_latency = self.latency.observe

    def publish(self, state: WorkerState) -> None:
        """Bring the metrics up to `state`. The parts keep plain counters that cost the
        request path nothing; this runs every half second and once more at shutdown,
        adding to each Prometheus counter what its part counted since the last call."""
        last, self._published = self._published, state
        for counter, now, before in (
            (self.policy_reloads.labels("ok"), state.policy_reloads_ok, last.policy_reloads_ok),
            (
                self.policy_reloads.labels("failed"),
                state.policy_reloads_failed,
                last.policy_reloads_failed,
            ),
            (self.capture_records.labels("appended"), state.appended, last.appended),
            (self.capture_records.labels("dropped_full"), state.dropped_full, last.dropped_full),
            (
                self.capture_records.labels("dropped_oversize"),
                state.dropped_oversize,
                last.dropped_oversize,
            ),
            (self.capture_blocked, state.blocked, last.blocked),
            (self.spool_write_errors, state.spool_write_errors, last.spool_write_errors),
            (self.audit_lines, state.audit_written, last.audit_written),
        ):
            if now > before:
                counter.inc(now - before)
        self.policy_failing.set(1 if state.policy_failing else 0)
        self.spool_bytes.set(state.spool_bytes)
        self.spool_full.set(1 if state.spool_full else 0)
        self.audit_pending.set(state.audit_pending)

    def count_response(self, status: int, seconds: float) -> None:
        index = status // 100 - 1
        if 0 <= index < 5:
            self.by_status_class[index].inc()
        self.observe_latency(seconds)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def render(registry: CollectorRegistry | None) -> bytes:
    """The text exposition for /metrics, summing worker files in multiprocess mode."""
    if registry is None:
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
