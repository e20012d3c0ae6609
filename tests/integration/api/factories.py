"""OpenLineage RunEvents as a client would POST them, and helpers to read responses."""

from __future__ import annotations

import uuid
from typing import Any

from agent.api import dataset_id

NS = "https://sales-db.internal:8001"
T0 = "2026-11-20T09:30:00Z"


def dataset(name: str, namespace: str = NS, **facets: Any) -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "facets": facets}


def column_lineage(
    columns: dict[str, list[tuple[str, str]]], namespace: str = NS
) -> dict[str, Any]:
    """output column -> [(input dataset, input column)] as the columnLineage facet."""
    return {
        "fields": {
            column: {
                "inputFields": [
                    {"namespace": namespace, "name": source, "field": field}
                    for source, field in sources
                ]
            }
            for column, sources in columns.items()
        }
    }


def run_event(
    run: str,
    inputs: list[dict[str, Any]] | list[str],
    outputs: list[dict[str, Any]] | list[str],
    *,
    event_type: str = "COMPLETE",
    event_time: str = T0,
) -> dict[str, Any]:
    return {
        "eventType": event_type,
        "eventTime": event_time,
        "run": {"runId": str(uuid.uuid5(uuid.NAMESPACE_OID, run))},
        "job": {"namespace": "etl", "name": f"job-{run}"},
        "inputs": [dataset(d) if isinstance(d, str) else d for d in inputs],
        "outputs": [dataset(d) if isinstance(d, str) else d for d in outputs],
        "producer": "https://example.com/etl/1.0",
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
    }


def node_id(name: str, namespace: str = NS) -> str:
    return dataset_id(namespace, name)


def shape(graph: dict[str, Any]) -> tuple[dict[str, int], set[tuple[str, str]]]:
    """(node label -> depth, edges by label); a visible node's label is its name, a
    hidden one's is "?" followed by its id."""
    labels = {
        n["id"]: n["name"] if n["kind"] == "dataset" else "?" + n["id"] for n in graph["nodes"]
    }
    depths = {labels[n["id"]]: n["depth"] for n in graph["nodes"]}
    edges = {(labels[e["source"]], labels[e["target"]]) for e in graph["edges"]}
    return depths, edges
