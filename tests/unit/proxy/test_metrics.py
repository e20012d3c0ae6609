"""What the parts counted reaches Prometheus: counters add what is new, gauges follow."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxy.metrics import ProxyMetrics, WorkerState


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_counters_add_what_was_counted_since_the_last_publish() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.publish(WorkerState(appended=5, dropped_full=2, audit_written=7, policy_reloads_ok=1))
    metrics.publish(WorkerState(appended=9, dropped_full=2, audit_written=8, policy_reloads_ok=1))
    assert _value(registry, "lineage_sidecar_capture_records_total", result="appended") == 9
    assert _value(registry, "lineage_sidecar_capture_records_total", result="dropped_full") == 2
    assert _value(registry, "lineage_sidecar_audit_lines_total") == 8
    assert _value(registry, "lineage_sidecar_policy_reloads_total", result="ok") == 1
    assert _value(registry, "lineage_sidecar_policy_reloads_total", result="failed") == 0


def test_gauges_follow_the_state_both_ways() -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.publish(
        WorkerState(policy_failing=True, spool_full=True, spool_bytes=4096, audit_pending=3)
    )
    assert _value(registry, "lineage_sidecar_policy_reload_failing") == 1
    assert _value(registry, "lineage_sidecar_spool_full") == 1
    assert _value(registry, "lineage_sidecar_spool_bytes") == 4096
    assert _value(registry, "lineage_sidecar_audit_pending") == 3
    metrics.publish(WorkerState())
    assert _value(registry, "lineage_sidecar_policy_reload_failing") == 0
    assert _value(registry, "lineage_sidecar_spool_full") == 0
    assert _value(registry, "lineage_sidecar_spool_bytes") == 0


def test_a_counter_never_goes_back() -> None:
    # A part's counter does not shrink; if a smaller figure ever came, the Prometheus
    # counter must keep what it had rather than raise or go negative.
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.publish(WorkerState(blocked=4, spool_write_errors=2))
    metrics.publish(WorkerState(blocked=1, spool_write_errors=0))
    assert _value(registry, "lineage_sidecar_capture_blocked_total") == 4
    assert _value(registry, "lineage_sidecar_spool_write_errors_total") == 2
