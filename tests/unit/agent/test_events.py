"""Events encode to the JSON OpenLineage consumers expect, with ids that do not drift."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from agent.events import (
    COLUMN_LINEAGE_SCHEMA_URL,
    EARLIEST_EVENT_TIME,
    LATEST_EVENT_TIME,
    PRODUCER,
    RUN_EVENT_SCHEMA_URL,
    AccessEvent,
    ColumnLineageFacet,
    ColumnLineageField,
    DatasetFacets,
    EventType,
    InputDataset,
    InputField,
    Job,
    OutputDataset,
    Run,
    RunEvent,
    RunFacets,
    SidecarRunFacet,
    access_event_id,
    encode,
    event_time_problem,
    name_uuid,
    time_from_ns,
)

RUN_ID = uuid.UUID("0b9c5a8e-7f35-5d0e-9a64-3c1e2f8b7d11")
NS = "https://sales-db.internal:8001"


def sample_event(event_type: EventType = "COMPLETE") -> RunEvent:
    return RunEvent(
        event_type=event_type,
        event_time=datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC),
        run=Run(
            run_id=RUN_ID,
            facets=RunFacets(lineage_sidecar=SidecarRunFacet(correlation="trace:ab", requests=2)),
        ),
        job=Job(namespace="lineage-sidecar", name="etl-bot"),
        inputs=(InputDataset(namespace=NS, name="sales.orders"),),
        outputs=(
            OutputDataset(
                namespace=NS,
                name="mart.daily",
                facets=DatasetFacets(
                    column_lineage=ColumnLineageFacet(
                        fields={
                            "total": ColumnLineageField(
                                input_fields=(
                                    InputField(namespace=NS, name="sales.orders", field="price"),
                                )
                            )
                        }
                    )
                ),
            ),
        ),
    )


def test_run_event_json_has_the_openlineage_required_keys_and_spelling() -> None:
    document: dict[str, Any] = json.loads(encode(sample_event()))
    # RunEvent 2-0-2: BaseEvent requires eventTime, producer, schemaURL; RunEvent adds run
    # and job; Run requires runId; Job and datasets require namespace and name.
    assert {
        "eventType",
        "eventTime",
        "run",
        "job",
        "inputs",
        "outputs",
        "producer",
        "schemaURL",
    } <= set(document)
    assert document["schemaURL"] == RUN_EVENT_SCHEMA_URL
    assert document["producer"] == PRODUCER
    assert document["eventType"] == "COMPLETE"
    assert document["eventTime"] == "2026-11-26T12:00:00.123456Z"
    assert document["run"]["runId"] == str(RUN_ID)
    assert document["job"] == {"namespace": "lineage-sidecar", "name": "etl-bot", "facets": {}}
    assert document["inputs"] == [
        {"namespace": NS, "name": "sales.orders", "facets": {}, "inputFacets": {}}
    ]
    output = document["outputs"][0]
    assert set(output) == {"namespace", "name", "facets", "outputFacets"}
    column_lineage = output["facets"]["columnLineage"]
    assert column_lineage["_producer"] == PRODUCER
    assert column_lineage["_schemaURL"] == COLUMN_LINEAGE_SCHEMA_URL
    assert column_lineage["fields"] == {
        "total": {"inputFields": [{"namespace": NS, "name": "sales.orders", "field": "price"}]}
    }
    sidecar = document["run"]["facets"]["lineageSidecar"]
    assert {"_producer", "_schemaURL", "correlation", "requests"} <= set(sidecar)


def test_no_snake_case_key_leaks_into_the_openlineage_json() -> None:
    def keys(value: object) -> list[str]:
        if isinstance(value, dict):
            return [k for k in value] + [k2 for v in value.values() for k2 in keys(v)]
        if isinstance(value, list):
            return [k for item in value for k in keys(item)]
        return []

    document = json.loads(encode(sample_event()))
    # Dataset field names inside columnLineage are data, not keys of the spec.
    offending = [k for k in keys(document) if "_" in k.lstrip("_") and k != "total"]
    assert offending == []


def test_run_event_round_trips_through_msgspec() -> None:
    event = sample_event()
    assert msgspec.json.decode(encode(event), type=RunEvent) == event


def test_run_event_id_is_stable_and_follows_content() -> None:
    assert sample_event().event_id == sample_event().event_id
    assert sample_event("COMPLETE").event_id != sample_event("FAIL").event_id
    decoded = msgspec.json.decode(encode(sample_event()), type=RunEvent)
    assert decoded.event_id == sample_event().event_id


def test_access_event_id_is_stable_per_request_dataset_and_action() -> None:
    first = access_event_id(NS, "req-1", NS, "sales.orders", "read")
    assert first == access_event_id(NS, "req-1", NS, "sales.orders", "read")
    assert first != access_event_id(NS, "req-2", NS, "sales.orders", "read")
    assert first != access_event_id(NS, "req-1", NS, "sales.orders", "write")
    assert first != access_event_id("https://other:1", "req-1", NS, "sales.orders", "read")


def test_access_event_encodes_with_its_own_field_names() -> None:
    event = AccessEvent(
        event_id=access_event_id(NS, "req-1", NS, "sales.orders", "read"),
        time=time_from_ns(1_764_000_000_123_456_789),
        principal="mallory",
        roles=("guest",),
        dataset_namespace=NS,
        dataset_name="sales.orders",
        action="read",
        decision="deny",
        rule=None,
        request_id="req-1",
        status=403,
    )
    document = json.loads(encode(event))
    assert document["decision"] == "deny"
    assert document["time"] == "2025-11-24T16:00:00.123456Z"
    assert uuid.UUID(document["event_id"]) == event.event_id
    assert msgspec.json.decode(encode(event), type=AccessEvent) == event


def test_times_from_a_broken_clock_are_clamped_into_the_event_time_range() -> None:
    assert time_from_ns(-5) == EARLIEST_EVENT_TIME == datetime(1970, 1, 1, tzinfo=UTC)
    assert time_from_ns(2**80) == LATEST_EVENT_TIME
    assert event_time_problem(time_from_ns(2**80), "time") is None
    # The calendar's last day is what the database driver sends as infinity.
    problem = event_time_problem(datetime(9999, 12, 31, tzinfo=UTC), "eventTime")
    assert problem is not None
    assert problem.startswith("eventTime 9999-12-31")


@given(st.uuids(), st.text())
def test_name_uuid_is_uuid5_bit_for_bit(namespace: uuid.UUID, name: str) -> None:
    # Event and run ids are stored; a different id for the same content would break the
    # store's idempotency across an upgrade.
    assert name_uuid(namespace, name) == uuid.uuid5(namespace, name)
    assert name_uuid(namespace, name).version == 5
