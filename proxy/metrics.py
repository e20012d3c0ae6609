"""Prometheus metrics of the proxy, with the label children bound once at start.

With several worker processes, prometheus_client's multiprocess mode is used: the
supervisor sets PROMETHEUS_MULTIPROC_DIR before the workers start, each worker writes its
values to memory-mapped files there, and the admin listener adds them up.
"""

from __future__ import annotations

import os

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
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "protocol", "closed")


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
        # Bound children: the hot path indexes a tuple instead of calling labels().
        self.by_status_class = tuple(self.requests.labels(c) for c in STATUS_CLASSES)
        self.upstream_error = {k: self.upstream_errors.labels(k) for k in UPSTREAM_ERROR_KINDS}
        self.observe_latency = self.latency.observe

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
