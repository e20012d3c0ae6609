"""The lineage API over a real PostgreSQL, through a real aiohttp server."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from agent.api import SERVER_SETTINGS, AuthorizationUnavailable, Caller, lineage_api
from agent.events import AccessEvent
from agent.openapi import MAX_NAME_CHARS
from agent.store.queries import LineageQueries
from agent.store.writer import StoreWriter
from tests.integration.api.conftest import Api
from tests.integration.api.factories import (
    NS,
    column_lineage,
    dataset,
    node_id,
    run_event,
    shape,
)

WRITER = "etl-bot"
READER = "analyst-1"
# Distinctive, so that finding it anywhere in a response body means it leaked.
SECRET = "payroll.secret_salaries_7f3a"
SECRET_COLUMN = "salary_band_c9e1"


def grant_all(api: Api, principal: str, *names: str) -> None:
    for action in ("read", "write"):
        api.grants.grant(principal, action, *(f"dataset:{n}" for n in names))


async def track(api: Api, body: Any, principal: str = WRITER) -> dict[str, Any]:
    response = await api.client.post("/lineage/track", json=body, headers=api.as_user(principal))
    assert response.status == 202, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def get(api: Api, path: str, principal: str = READER, **params: str) -> tuple[int, bytes]:
    response = await api.client.get(path, params=params, headers=api.as_user(principal))
    assert response.content_type == "application/json"
    return response.status, await response.read()


async def graph(api: Api, principal: str = READER, **params: str) -> dict[str, Any]:
    status, body = await get(api, "/lineage/graph", principal, **params)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


PIPELINE = [("raw", "clean"), ("clean", "report"), ("report", "dashboard"), ("lookup", "report")]


async def test_track_then_graph_gives_exact_nodes_and_edges(api: Api) -> None:
    grant_all(api, WRITER, "raw", "clean", "report", "dashboard", "lookup")
    grant_all(api, READER, "raw", "clean", "report", "dashboard", "lookup")
    events = [run_event(f"{s}->{t}", [s], [t]) for s, t in PIPELINE]
    result = await track(api, events)
    assert result["inserted"] == 4
    assert result["duplicates"] == 0
    assert len(set(result["event_ids"])) == 4

    down = await graph(api, node=f"{NS}:clean", direction="down", depth="1")
    assert down["root"] == node_id("clean")
    assert shape(down) == ({"clean": 0, "report": 1}, {("clean", "report")})
    edge = down["edges"][0]
    assert edge["run_count"] == 1
    assert edge["last_run_id"] == str(uuid.uuid5(uuid.NAMESPACE_OID, "clean->report"))

    up = await graph(api, node=node_id("report"), direction="up", depth="5")
    assert shape(up) == (
        {"report": 0, "clean": 1, "lookup": 1, "raw": 2},
        {("raw", "clean"), ("clean", "report"), ("lookup", "report")},
    )
    both = await graph(api, node="report", namespace=NS, direction="both", depth="1")
    assert shape(both)[0] == {"report": 0, "clean": 1, "lookup": 1, "dashboard": 1}
    default = await graph(api, node=f"{NS}:raw")
    assert default["direction"] == "both"
    assert default["depth"] == 3
    assert shape(default)[0] == {"raw": 0, "clean": 1, "report": 2, "dashboard": 3}


async def test_tracking_the_same_events_again_changes_nothing(api: Api) -> None:
    grant_all(api, WRITER, "a", "b")
    grant_all(api, READER, "a", "b")
    event = run_event("run-1", ["a"], ["b"])
    first = await track(api, event)
    again = await track(api, [event, event])
    assert again["event_ids"] == first["event_ids"] * 2
    assert again["inserted"] == 0
    assert again["duplicates"] == 2
    # The same instant written with another offset is the same event.
    shifted = {**event, "eventTime": "2026-11-20T10:30:00+01:00"}
    assert (await track(api, shifted))["event_ids"] == first["event_ids"]
    assert (await graph(api, node=f"{NS}:a"))["edges"][0]["run_count"] == 1


async def test_an_event_read_back_and_tracked_again_is_the_same_event(api: Api) -> None:
    # JSON object keys carry no order: columns listed in another order, as PostgreSQL's
    # jsonb gives them back, are the same event, not a second one.
    grant_all(api, WRITER, "a", "b")
    grant_all(api, READER, "a", "b")
    columns = column_lineage({"id": [("a", "id")], "amount": [("a", "amt")]})
    first = await track(api, run_event("run-1", ["a"], [dataset("b", columnLineage=columns)]))
    status, body = await get(api, f"/lineage/{first['event_ids'][0]}")
    assert status == 200
    read = json.loads(body)["event"]
    assert list(read["outputs"][0]["facets"]["columnLineage"]["fields"]) == ["amount", "id"]
    again = await track(api, read)
    assert again["event_ids"] == first["event_ids"]
    assert (again["inserted"], again["duplicates"]) == (0, 1)


async def _secret_chain(api: Api) -> dict[str, Any]:
    """A -> SECRET -> C, with column lineage through SECRET's column."""
    grant_all(api, WRITER, "a", SECRET, "c")
    grant_all(api, READER, "a", "c")
    secret_out = dataset(SECRET, columnLineage=column_lineage({SECRET_COLUMN: [("a", "amount")]}))
    c_out = dataset("c", columnLineage=column_lineage({"total": [(SECRET, SECRET_COLUMN)]}))
    return await track(
        api, [run_event("a->s", ["a"], [secret_out]), run_event("s->c", [SECRET], [c_out])]
    )


async def test_a_restricted_dataset_in_a_chain_is_only_a_placeholder(api: Api) -> None:
    tracked = await _secret_chain(api)
    for params in (
        {"node": f"{NS}:a", "direction": "down", "depth": "2"},
        {"node": f"{NS}:c", "direction": "up", "depth": "2"},
        {"node": f"{NS}:c", "direction": "both", "depth": "10"},
    ):
        status, body = await get(api, "/lineage/graph", **params)
        assert status == 200
        assert SECRET.encode() not in body
        assert b"secret" not in body.lower()
        assert b"payroll" not in body
        depths, edges = shape(json.loads(body))
        hidden = next(label for label in depths if label.startswith("?"))
        assert set(depths) == {"a", "c", hidden}
        assert edges == {("a", hidden), (hidden, "c")}
        placeholder = next(n for n in json.loads(body)["nodes"] if n["kind"] == "hidden")
        assert set(placeholder) == {"kind", "id", "depth"}

    # The event that wrote the secret dataset: shown, the secret as a placeholder.
    status, body = await get(api, f"/lineage/{tracked['event_ids'][1]}")
    assert status == 200
    assert SECRET.encode() not in body
    assert SECRET_COLUMN.encode() not in body
    view = json.loads(body)
    assert view["hidden_datasets"] == 1
    assert view["event"]["inputs"][0]["namespace"] == "urn:lineage-sidecar:hidden"
    sources = view["event"]["outputs"][0]["facets"]["columnLineage"]["fields"]["total"]
    assert sources["inputFields"][0]["name"] == view["event"]["inputs"][0]["name"]
    assert sources["inputFields"][0]["field"] == ""

    # Someone allowed to read it sees it all.
    grant_all(api, "auditor", "a", SECRET, "c")
    full = await graph(api, "auditor", node=f"{NS}:a", direction="down", depth="2")
    assert shape(full) == ({"a": 0, SECRET: 1, "c": 2}, {("a", SECRET), (SECRET, "c")})
    status, body = await get(api, f"/lineage/{tracked['event_ids'][1]}", "auditor")
    assert SECRET_COLUMN.encode() in body


async def test_hidden_neighbours_collapse_into_one_placeholder(api: Api) -> None:
    # a -> s1 -> s2 -> c and s1 -> s3: three hidden datasets, one connected group.
    grant_all(api, WRITER, "a", "s1", "s2", "s3", "c")
    grant_all(api, READER, "a", "c")
    edges = [("a", "s1"), ("s1", "s2"), ("s2", "c"), ("s1", "s3")]
    await track(api, [run_event(f"{s}->{t}", [s], [t]) for s, t in edges])
    first = await graph(api, node=f"{NS}:a", direction="down", depth="5")
    depths, shown = shape(first)
    hidden = [label for label in depths if label.startswith("?")]
    assert len(hidden) == 1
    assert depths[hidden[0]] == 1
    assert shown == {("a", hidden[0]), (hidden[0], "c")}
    # Placeholder ids are drawn per response: nothing to correlate across responses.
    second = await graph(api, node=f"{NS}:a", direction="down", depth="5")
    assert [n["id"] for n in second["nodes"] if n["kind"] == "hidden"] != hidden


async def test_a_start_node_the_caller_may_not_read_is_not_found(api: Api) -> None:
    await _secret_chain(api)
    batches = api.grants.batches
    status, forbidden = await get(api, "/lineage/graph", node=f"{NS}:{SECRET}")
    assert status == 404
    status, missing = await get(api, "/lineage/graph", node=f"{NS}:no.such.table")
    assert status == 404
    assert forbidden == missing
    assert SECRET.encode() not in forbidden
    # Refused on the single check of the root, without asking about a graph.
    assert api.grants.batches == batches
    await graph(api, node=f"{NS}:c")
    assert api.grants.batches == batches + 1


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"node": f"{NS}:a", "depth": "0"}, "invalid_depth"),
        ({"node": f"{NS}:a", "depth": "11"}, "invalid_depth"),
        ({"node": f"{NS}:a", "depth": "abc"}, "invalid_depth"),
        ({"node": f"{NS}:a", "depth": "-1"}, "invalid_depth"),
        ({"node": f"{NS}:a", "depth": "2.5"}, "invalid_depth"),
        ({"node": f"{NS}:a", "depth": "\u0663"}, "invalid_depth"),
        ({"node": f"{NS}:a", "depth": "9" * 40}, "invalid_depth"),
        ({"node": f"{NS}:a", "direction": "sideways"}, "invalid_direction"),
        ({"node": f"{NS}:a\x00b"}, "invalid_node"),
        ({"node": f"{NS}:" + "x" * 10_240}, "invalid_node"),
        ({"node": "y" * 10_240}, "invalid_node"),
        ({"node": "no-colon-here"}, "invalid_node"),
        ({"node": "ds_!!notbase64"}, "invalid_node"),
        ({"node": "ds_AAAA"}, "invalid_node"),
        ({"node": ":a"}, "invalid_node"),
        ({"node": f"{NS}:"}, "invalid_node"),
        ({}, "invalid_node"),
    ],
)
async def test_bad_graph_parameters_are_400(api: Api, params: dict[str, str], error: str) -> None:
    grant_all(api, READER, "a")
    status, body = await get(api, "/lineage/graph", **params)
    assert status == 400
    assert json.loads(body)["error"] == error


async def test_depth_bounds_are_honoured(api: Api) -> None:
    chain = [f"n{i}" for i in range(13)]
    grant_all(api, WRITER, *chain)
    grant_all(api, READER, *chain)
    await track(api, [run_event(f"{s}->{t}", [s], [t]) for s, t in itertools.pairwise(chain)])
    one = await graph(api, node=f"{NS}:n0", direction="down", depth="1")
    assert shape(one)[0] == {"n0": 0, "n1": 1}
    ten = await graph(api, node=f"{NS}:n0", direction="down", depth="10")
    assert shape(ten)[0] == {f"n{i}": i for i in range(11)}
    assert not ten["truncated"]
    nothing_up = await graph(api, node=f"{NS}:n0", direction="up", depth="10")
    assert shape(nothing_up) == ({"n0": 0}, set())


@pytest.mark.parametrize(
    ("namespace", "name"),
    [
        ("\x01" * MAX_NAME_CHARS, "\x01" * MAX_NAME_CHARS),  # 6 JSON bytes a character
        ("\U0001f600" * MAX_NAME_CHARS, "\u4e00" * MAX_NAME_CHARS),  # 4 and 3 UTF-8 bytes
        ('"' * MAX_NAME_CHARS, "\\" * MAX_NAME_CHARS),
    ],
    ids=["control", "emoji-cjk", "quotes"],
)
async def test_any_dataset_track_accepts_can_be_asked_about_by_id_and_by_name(
    api: Api, namespace: str, name: str
) -> None:
    grant_all(api, WRITER, "src", name)
    grant_all(api, READER, "src", name)
    await track(api, run_event("long", ["src"], [dataset(name, namespace)]))
    await _access_at(api, namespace, name)
    down = await graph(api, node=f"{NS}:src", direction="down", depth="1")
    long_id = next(n["id"] for n in down["nodes"] if n["name"] == name)
    for path, params in (
        ("/lineage/graph", {"node": long_id}),
        ("/lineage/graph", {"node": name, "namespace": namespace}),
        ("/lineage/graph", {"node": f"{namespace}:{name}"}),
        (f"/datasets/{long_id}/access", {}),
        (f"/datasets/{quote(name, safe='')}/access", {"namespace": namespace}),
    ):
        url = URL(path, encoded=True).with_query(params)
        response = await api.client.get(url, headers=api.as_user(READER))
        assert response.status == 200, (path, response.status, await response.text())
        body = await response.json()
        if path.startswith("/datasets/"):
            assert [e["request_id"] for e in body["events"]] == ["long-req"]
        else:
            assert body["root"] == long_id


async def _access_at(api: Api, namespace: str, name: str) -> None:
    await api.writer.write(
        [
            AccessEvent(
                event_id=uuid.uuid4(),
                time=datetime(2026, 11, 20, 9, 0, tzinfo=UTC),
                principal="user",
                roles=(),
                dataset_namespace=namespace,
                dataset_name=name,
                action="read",
                decision="allow",
                rule=None,
                request_id="long-req",
                status=200,
            )
        ]
    )


async def _access(api: Api, name: str, count: int) -> list[AccessEvent]:
    start = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    events = [
        AccessEvent(
            event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"access-{name}-{i}"),
            time=start + timedelta(minutes=i),
            principal=f"user-{i}",
            roles=("analyst",),
            dataset_namespace=NS,
            dataset_name=name,
            action="read",
            decision="allow",
            rule="p, analyst, dataset:sales.*, read",
            request_id=f"req-{i}",
            status=200,
        )
        for i in range(count)
    ]
    await api.writer.write(events)
    return events


async def test_access_events_for_a_dataset(api: Api) -> None:
    events = await _access(api, "sales.orders", 5)
    await _access(api, SECRET, 2)
    grant_all(api, READER, "sales.orders")

    status, body = await get(api, f"/datasets/{node_id('sales.orders')}/access")
    assert status == 200
    page = json.loads(body)
    assert [e["principal"] for e in page["events"]] == [f"user-{i}" for i in range(5)]
    assert page["dataset"]["name"] == "sales.orders"
    assert page["next"] is None

    since = events[3].time.isoformat()
    status, body = await get(
        api, "/datasets/sales.orders/access", namespace=NS, since=since, limit="1"
    )
    page = json.loads(body)
    assert [e["request_id"] for e in page["events"]] == ["req-3"]
    assert page["next"] is not None
    status, body = await get(
        api, "/datasets/sales.orders/access", namespace=NS, until=since.replace("+00:00", "Z")
    )
    assert [e["request_id"] for e in json.loads(body)["events"]] == ["req-0", "req-1", "req-2"]

    # Forbidden and unknown datasets look the same.
    assert (await get(api, "/datasets/x/access", namespace=NS))[0] == 404
    status, body = await get(api, "/datasets/x/access", namespace=NS, since="garbage")
    assert (status, json.loads(body)["error"]) == (400, "invalid_since")
    status, body = await get(api, f"/datasets/{node_id(SECRET)}/access")
    assert status == 404
    assert SECRET.encode() not in body
    grant_all(api, READER, "never.seen")
    assert (await get(api, "/datasets/never.seen/access", namespace=NS))[0] == 404


async def test_access_pages_list_events_at_one_instant_exactly_once(api: Api) -> None:
    moment = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    events = [
        AccessEvent(
            event_id=uuid.uuid4(),
            time=moment,
            principal="user",
            roles=(),
            dataset_namespace=NS,
            dataset_name="sales.orders",
            action="read",
            decision="allow",
            rule=None,
            request_id=f"req-{i}",
            status=200,
        )
        for i in range(5)
    ]
    await api.writer.write(events)
    grant_all(api, READER, "sales.orders")
    pages: list[list[str]] = []
    params = {"namespace": NS, "limit": "2", "since": moment.isoformat()}
    while True:
        status, body = await get(api, "/datasets/sales.orders/access", **params)
        assert status == 200
        page = json.loads(body)
        pages.append([e["request_id"] for e in page["events"]])
        if page["next"] is None:
            break
        assert len(pages) < 4, pages
        params["after"] = page["next"]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(r for p in pages for r in p) == sorted(e.request_id for e in events)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"since": "2026-11-20T09:00:00"}, "invalid_since"),
        ({"since": "yesterday"}, "invalid_since"),
        ({"until": "2026-13-01T00:00:00Z"}, "invalid_until"),
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "1001"}, "invalid_limit"),
        ({"limit": "ten"}, "invalid_limit"),
        ({"after": "not a token"}, "invalid_after"),
        ({"after": "WyJub3ciLCIxIl0"}, "invalid_after"),
    ],
)
async def test_bad_access_parameters_are_400(api: Api, params: dict[str, str], error: str) -> None:
    grant_all(api, READER, "sales.orders")
    status, body = await get(api, "/datasets/sales.orders/access", namespace=NS, **params)
    assert (status, json.loads(body)["error"]) == (400, error)


async def test_track_needs_write_on_every_output_and_read_on_every_input(api: Api) -> None:
    api.grants.grant(WRITER, "write", "dataset:mine")
    api.grants.grant(WRITER, "read", "dataset:src")
    grant_all(api, READER, "mine", "theirs", "src", "hidden.src")

    response = await api.client.post(
        "/lineage/track",
        json=run_event("r1", ["src"], ["mine", "theirs"]),
        headers=api.as_user(WRITER),
    )
    assert response.status == 403
    assert await response.json() == {
        "error": "forbidden",
        "message": "you may not write dataset:theirs",
    }
    response = await api.client.post(
        "/lineage/track",
        json=[
            run_event("r2", ["src"], ["mine"]),
            run_event(
                "r3",
                [],
                [dataset("mine", columnLineage=column_lineage({"c": [("hidden.src", "x")]}))],
            ),
        ],
        headers=api.as_user(WRITER),
    )
    assert response.status == 403
    assert "read dataset:hidden.src" in (await response.json())["message"]
    # Nothing of a refused request was stored.
    assert (await get(api, "/lineage/graph", node=f"{NS}:mine"))[0] == 404
    assert await api.connection.fetchval("SELECT count(*) FROM events_raw") == 0

    await track(api, run_event("r2", ["src"], ["mine"]))
    assert (await get(api, "/lineage/graph", node=f"{NS}:mine"))[0] == 200


def _valid() -> dict[str, Any]:
    return run_event("v", ["src"], ["out"])


def _with(**changes: Any) -> dict[str, Any]:
    event = _valid()
    event.update(changes)
    return event


def _deep_facet(levels: int) -> bytes:
    """A valid event whose run facet nests arrays `levels` deep."""
    event = json.dumps(_with(run={"runId": str(uuid.uuid4()), "facets": {"deep": "HERE"}}))
    return event.encode().replace(b'"HERE"', b"[" * levels + b"]" * levels)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "malformed_json"),
        (b"", 400, "malformed_json"),
        (b'{"eventType": "START"', 400, "malformed_json"),
        (b"[" * 50_000 + b"]" * 50_000, 422, "invalid_event"),
        (_deep_facet(50_000), 400, "malformed_json"),
        (b'{"eventType": "\xff\xfe"}', 400, "malformed_json"),
        (json.dumps(_with(eventType="FINISHED")).encode(), 422, "invalid_event"),
        (json.dumps(_with(eventType=3)).encode(), 422, "invalid_event"),
        (json.dumps(_with(eventTime="2026-11-20T09:30:00")).encode(), 422, "invalid_event"),
        (json.dumps(_with(eventTime="soon")).encode(), 422, "invalid_event"),
        (json.dumps(_with(run={"runId": "run-1"})).encode(), 422, "invalid_event"),
        (json.dumps(_with(run={})).encode(), 422, "invalid_event"),
        (json.dumps(_with(job={"name": "j"})).encode(), 422, "invalid_event"),
        (json.dumps(_with(inputs={"a": 1})).encode(), 422, "invalid_event"),
        (json.dumps(_with(outputs=[{"namespace": NS}])).encode(), 422, "invalid_event"),
        (json.dumps(_with(outputs=[{"namespace": NS, "name": ""}])).encode(), 422, "invalid_event"),
        (
            json.dumps(_with(outputs=[{"namespace": NS, "name": "a\x00b"}])).encode(),
            422,
            "invalid_event",
        ),
        (json.dumps(_with(surprise=True)).encode(), 422, "invalid_event"),
        (json.dumps([]).encode(), 422, "invalid_event"),
        (json.dumps([_valid()] * 1001).encode(), 422, "invalid_event"),
        (json.dumps("event").encode(), 422, "invalid_event"),
    ],
)
async def test_bad_events_are_refused_cleanly(
    api: Api, body: bytes, status: int, error: str
) -> None:
    grant_all(api, WRITER, "src", "out")
    response = await api.client.post(
        "/lineage/track",
        data=body,
        headers={**api.as_user(WRITER), "Content-Type": "application/json"},
    )
    assert response.status == status, await response.text()
    assert (await response.json())["error"] == error
    assert await api.connection.fetchval("SELECT count(*) FROM events_raw") == 0


async def test_track_refuses_oversized_and_non_json_bodies(api: Api) -> None:
    grant_all(api, WRITER, "src", "out")
    headers = {**api.as_user(WRITER), "Content-Type": "application/json"}
    big = b'{"pad": "' + b"x" * (1 << 20) + b'"}'
    response = await api.client.post("/lineage/track", data=big, headers=headers)
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"

    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 65_536

    response = await api.client.post("/lineage/track", data=chunks(), headers=headers)
    assert response.status == 413

    for content_type in ("text/plain", "application/json; charset=latin-1"):
        response = await api.client.post(
            "/lineage/track",
            data=json.dumps(_valid()),
            headers={**api.as_user(WRITER), "Content-Type": content_type},
        )
        assert response.status == 415
        assert (await response.json())["error"] == "unsupported_media_type"


async def test_events_implying_too_many_lineage_edges_are_refused(api: Api) -> None:
    inputs = [f"in{i}" for i in range(101)]
    outputs = [f"out{i}" for i in range(100)]
    grant_all(api, WRITER, *inputs, *outputs)
    response = await api.client.post(
        "/lineage/track",
        json=run_event("wide", inputs, outputs),
        headers=api.as_user(WRITER),
    )
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "invalid_event"
    assert "101 inputs x 100 outputs" in body["message"]
    assert "limit of 10000 per event" in body["message"]
    # Six events within the per-event limit pass the per-request one.
    events = [run_event(f"wide-{k}", inputs[:100], outputs) for k in range(6)]
    response = await api.client.post("/lineage/track", json=events, headers=api.as_user(WRITER))
    assert response.status == 422
    assert "limit of 50000 per request" in (await response.json())["message"]
    assert await api.connection.fetchval("SELECT count(*) FROM lineage_edges") == 0
    # At the limit, every edge is stored.
    await track(api, run_event("square", inputs[:100], outputs))
    assert await api.connection.fetchval("SELECT count(*) FROM lineage_edges") == 10_000


async def _raw_track(api: Api, encodings: Sequence[str], body: bytes) -> bytes:
    """POST /lineage/track over a raw socket, with one Content-Encoding header per item."""
    assert api.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", api.client.port)
    head = b"".join(b"Content-Encoding: %s\r\n" % e.encode() for e in encodings)
    writer.write(
        b"POST /lineage/track HTTP/1.1\r\nHost: x\r\nX-Auth-Request-User: "
        + WRITER.encode()
        + b"\r\nContent-Type: application/json\r\n"
        + head
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain-body", "gzip-body"])
@pytest.mark.parametrize(
    "encodings", [["identity", "gzip"], ["identity, gzip"], ["gzip", "identity"]]
)
async def test_every_content_encoding_header_counts(
    api: Api, encodings: list[str], gzipped: bool
) -> None:
    grant_all(api, WRITER, "src", "out")
    body = json.dumps(_valid()).encode()
    answer = await _raw_track(api, encodings, gzip.compress(body) if gzipped else body)
    assert answer.startswith(b"HTTP/1.1 415"), answer
    assert b'"error":"unsupported_media_type"' in answer
    assert await api.connection.fetchval("SELECT count(*) FROM events_raw") == 0
    # One identity header is what a plain body may carry.
    assert (await _raw_track(api, ["identity"], body)).startswith(b"HTTP/1.1 202")


async def test_unknown_facets_are_accepted_and_not_stored(api: Api) -> None:
    grant_all(api, WRITER, "src", "out")
    grant_all(api, READER, "src", "out")
    event = _valid()
    event["run"]["facets"] = {"nominalTime": {"nominalStartTime": T0_TEXT}}
    event["outputs"][0]["facets"] = {"schema": {"fields": [{"name": "id"}]}}
    event["outputs"][0]["outputFacets"] = {"outputStatistics": {"rowCount": 3}}
    result = await track(api, event)
    status, body = await get(api, f"/lineage/{result['event_ids'][0]}")
    assert status == 200
    stored = json.loads(body)["event"]
    assert stored["outputs"][0]["name"] == "out"
    assert b"nominalTime" not in body
    assert b"rowCount" not in body


T0_TEXT = "2026-11-20T09:00:00Z"


async def test_every_request_needs_the_identity_header(api: Api) -> None:
    for method, path in (
        ("GET", "/lineage/graph?node=a:b"),
        ("GET", f"/lineage/{uuid.uuid4()}"),
        ("GET", "/datasets/a:b/access"),
        ("POST", "/lineage/track"),
    ):
        for headers in ({}, {"X-Auth-Request-User": ""}, {"X-User": "admin"}):
            response = await api.client.request(method, path, headers=headers)
            assert response.status == 401
            assert (await response.json())["error"] == "unauthenticated"


async def test_event_by_id(api: Api) -> None:
    tracked = await _secret_chain(api)
    status, body = await get(api, "/lineage/not-a-uuid")
    assert (status, json.loads(body)["error"]) == (400, "invalid_id")
    assert (await get(api, f"/lineage/{uuid.uuid4()}"))[0] == 404
    # An event all of whose datasets are forbidden is not found.
    grant_all(api, "outsider", "unrelated")
    status, body = await get(api, f"/lineage/{tracked['event_ids'][0]}", "outsider")
    assert status == 404
    assert SECRET.encode() not in body
    [access] = await _access(api, SECRET, 1)
    assert (await get(api, f"/lineage/{access.event_id}"))[0] == 404
    status, body = await get(api, f"/lineage/{access.event_id}", WRITER)
    assert status == 200
    assert json.loads(body)["kind"] == "access"


async def test_openapi_document_describes_every_endpoint(api: Api) -> None:
    response = await api.client.get("/openapi.json", headers=api.as_user(READER))
    assert response.status == 200
    document = json.loads(await response.read())
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/lineage/track",
        "/lineage/graph",
        "/lineage/{id}",
        "/datasets/{name}/access",
        "/openapi.json",
    }
    refs: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("$ref"), str):
                refs.append(value["$ref"])
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(document)
    schemas = document["components"]["schemas"]
    assert {"TrackedEvent", "LineageGraphView", "ErrorBody", "AccessPage"} <= set(schemas)
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas
    track_responses = document["paths"]["/lineage/track"]["post"]["responses"]
    assert {"202", "400", "401", "403", "413", "415", "422"} <= set(track_responses)


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    response = await api.client.get("/nowhere", headers=api.as_user(READER))
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    response = await api.client.delete("/lineage/graph", headers=api.as_user(READER))
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET,HEAD"
    # Not taken for an event id by /lineage/{id}.
    for method, path, allow in (
        ("GET", "/lineage/track", "POST"),
        ("POST", "/lineage/graph", "GET,HEAD"),
    ):
        response = await api.client.request(method, path, headers=api.as_user(READER))
        assert response.status == 405
        assert (await response.json())["error"] == "method_not_allowed"
        assert response.headers["Allow"] == allow


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("node=ns:a&depth=1&depth=abc", "invalid_depth"),
        ("node=ns:a&node=ns:c", "invalid_node"),
        ("node=a&namespace=ns&namespace=other", "invalid_namespace"),
        ("node=ns:a&direction=up&direction=down", "invalid_direction"),
    ],
)
async def test_a_graph_parameter_given_twice_is_refused(api: Api, query: str, error: str) -> None:
    grant_all(api, READER, "a", "c")
    response = await api.client.get(
        URL(f"/lineage/graph?{query}", encoded=True), headers=api.as_user(READER)
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"] == error
    assert "more than once" in body["message"]


async def test_an_access_parameter_given_twice_is_refused(api: Api) -> None:
    grant_all(api, READER, "sales.orders")
    await _access(api, "sales.orders", 1)
    response = await api.client.get(
        URL("/datasets/sales.orders/access?namespace=x&limit=1&limit=5", encoded=True).update_query(
            namespace=NS
        ),
        headers=api.as_user(READER),
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_limit"


async def test_a_client_gone_mid_body_is_not_reported_as_the_store_down(
    api: Api, api_store_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Served as in production (the test server would cancel the handler on disconnect).
    caplog.set_level(logging.INFO, logger="agent.api")
    pool = await asyncpg.create_pool(api_store_dsn, min_size=1, max_size=1)
    runner = web.AppRunner(
        lineage_api(LineageQueries(pool), StoreWriter(pool), api.grants), **SERVER_SETTINGS
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /lineage/track HTTP/1.1\r\nHost: x\r\nX-Auth-Request-User: "
            + WRITER.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # Wait (bounded) for the server to notice that the connection is gone.
        for _ in range(500):
            if any(r.name == "agent.api" for r in caplog.records):
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
        await pool.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "agent.api"]
    assert any("client disconnected" in m for m in messages), messages
    assert not any("store unavailable" in m for m in messages), messages


@pytest.mark.parametrize(
    "path",
    [
        "/lineage/graph?node=%FF%FE:%C0%AF",
        "/lineage/graph?node=ds_%FF",
        "/lineage/graph?node=a:b&namespace=%ED%A0%80",
        "/datasets/%FF%FE/access?namespace=x",
        "/datasets/a:b/access?since=%FF",
        "/lineage/%FF%FE",
    ],
)
async def test_non_utf8_parameters_are_refused_or_not_found(api: Api, path: str) -> None:
    response = await api.client.get(URL(path, encoded=True), headers=api.as_user(READER))
    body = await response.json()
    assert response.status in (400, 404), body
    assert set(body) == {"error", "message"}


async def test_identity_headers_that_are_not_plain_text_are_refused(api: Api) -> None:
    for headers in (
        {"X-Auth-Request-User": "alice", "X-Auth-Request-Roles": "a%FFb"},
        {"X-Auth-Request-User": "alice", "X-Auth-Request-Roles": "ok,bad%00role"},
    ):
        response = await api.client.get("/lineage/graph?node=a:b", headers=headers)
        assert response.status == 400
        assert (await response.json())["error"] == "bad_identity"


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
async def test_times_without_a_utc_form_are_refused(api: Api, moment: str) -> None:
    grant_all(api, WRITER, "src", "out")
    grant_all(api, READER, "src", "out")
    status, body = await get(api, "/datasets/out/access", namespace=NS, since=moment)
    assert (status, json.loads(body)["error"]) == (400, "invalid_since")
    response = await api.client.post(
        "/lineage/track",
        json=_with(eventTime=moment),
        headers=api.as_user(WRITER),
    )
    assert response.status == 422, await response.text()


@pytest.mark.parametrize(
    "moment", ["9999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00Z", "9000-01-01T00:00:01Z"]
)
async def test_event_times_outside_the_supported_range_are_refused(api: Api, moment: str) -> None:
    # The calendar's ends would be stored as +/-infinity and read back without a zone.
    grant_all(api, WRITER, "src", "out")
    response = await api.client.post(
        "/lineage/track", json=_with(eventTime=moment), headers=api.as_user(WRITER)
    )
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "invalid_event"
    assert body["message"].startswith("eventTime ")
    assert "1970-01-01" in body["message"]
    assert await api.connection.fetchval("SELECT count(*) FROM events_raw") == 0


async def test_an_identity_header_that_is_not_utf8_is_refused(api: Api) -> None:
    assert api.client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", api.client.port)
    writer.write(
        b"GET /lineage/graph?node=a:b HTTP/1.1\r\nHost: x\r\n"
        b"X-Auth-Request-User: al\xffice\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(
        b'"error":"bad_identity","message":"the principal header is not a valid identity"}'
    )


class Unavailable:
    """An authorizer whose policy is not loaded."""

    def allowed(self, caller: Caller, resource: str, action: str) -> bool:
        raise AuthorizationUnavailable("policy not loaded")

    def allowed_many(self, caller: Caller, resources: Sequence[str], action: str) -> list[bool]:
        raise AuthorizationUnavailable("policy not loaded")


async def test_store_or_authorizer_unavailable_is_503_not_200(api: Api, api_store_dsn: str) -> None:
    closed = await asyncpg.create_pool(api_store_dsn, min_size=1, max_size=1)
    await closed.close()
    for app in (
        lineage_api(LineageQueries(closed), StoreWriter(closed), api.grants),
        lineage_api(LineageQueries(closed), StoreWriter(closed), Unavailable()),
    ):
        grant_all(api, READER, "a")
        grant_all(api, WRITER, "src", "out")
        async with TestClient(TestServer(app)) as client:
            response = await client.get(
                "/lineage/graph", params={"node": f"{NS}:a"}, headers=api.as_user(READER)
            )
            assert response.status == 503
            assert (await response.json())["error"] in (
                "store_unavailable",
                "authorization_unavailable",
            )
            response = await client.post(
                "/lineage/track", json=_valid(), headers=api.as_user(WRITER)
            )
            assert response.status == 503
