"""Property: whatever the graph and the caller's permissions, no dataset the caller may not
read is ever named in a lineage API response, and the graph shown is exactly the readable
part of the reachable graph plus one placeholder per connected hidden group."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable
from datetime import datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import dataset_id
from agent.events import InputDataset, Job, OutputDataset, Run, RunEvent
from tests.integration.api.conftest import Api
from tests.integration.api.factories import T0

PRINCIPAL = "prop-reader"
T0_TIME = datetime.fromisoformat(T0)
_examples = itertools.count()


def _reach(edges: Iterable[tuple[int, int]], root: int, depth: int) -> set[int]:
    seen, frontier = {root}, {root}
    for _ in range(depth):
        frontier = {t for s, t in edges if s in frontier} - seen
        seen |= frontier
    return seen


def _components(nodes: set[int], edges: Iterable[tuple[int, int]]) -> int:
    parent = {n: n for n in nodes}

    def find(n: int) -> int:
        while parent[n] != n:
            n = parent[n]
        return n

    for s, t in edges:
        if s in nodes and t in nodes:
            parent[find(s)] = find(t)
    return len({find(n) for n in nodes})


Case = tuple[int, list[tuple[int, int]], set[int], int, str, int]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A graph of 2..7 datasets, the caller's readable set, a root among the datasets the
    store knows (readable nine times in ten, so most cases reach the filter), a direction
    and a depth."""
    count = draw(st.integers(min_value=2, max_value=7))
    node = st.integers(0, count - 1)
    edges = draw(st.lists(st.tuples(node, node), min_size=1, max_size=12))
    readable = draw(st.sets(node))
    root = draw(st.sampled_from(sorted({s for s, _ in edges} | {t for _, t in edges})))
    if draw(st.integers(0, 9)) > 0:
        readable.add(root)
    return (
        count,
        edges,
        readable,
        root,
        draw(st.sampled_from(["up", "down", "both"])),
        draw(st.integers(1, 4)),
    )


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=cases())
async def test_no_forbidden_dataset_is_ever_named(api: Api, case: Case) -> None:
    count, edges, readable, root, direction, depth = case
    # Fresh names per example: the store is shared by all examples of this test.
    token = f"{next(_examples):04d}{uuid.uuid4().hex[:8]}"
    namespace = f"https://svc-{token}.internal:8001"
    names = [f"tbl{token}n{i}x" for i in range(count)]
    events = [
        RunEvent(
            event_type="COMPLETE",
            event_time=T0_TIME,
            run=Run(run_id=uuid.uuid4()),
            job=Job(namespace="etl", name=f"job-{token}"),
            inputs=(InputDataset(namespace=namespace, name=names[s]),),
            outputs=(OutputDataset(namespace=namespace, name=names[t]),),
        )
        for s, t in edges
    ]
    await api.writer.write(events)
    api.grants.grant(PRINCIPAL, "read", *(f"dataset:{names[i]}" for i in readable))
    forbidden = [
        needle
        for i in range(count)
        if i not in readable
        for needle in (names[i].encode(), dataset_id(namespace, names[i]).encode())
    ]

    response = await api.client.get(
        "/lineage/graph",
        params={"node": f"{namespace}:{names[root]}", "direction": direction, "depth": str(depth)},
        headers=api.as_user(PRINCIPAL),
    )
    body = await response.read()
    for needle in forbidden:
        assert needle not in body

    if root not in readable:
        assert response.status == 404
    else:
        assert response.status == 200
        reach: set[int] = set()
        if direction in ("down", "both"):
            reach |= _reach(edges, root, depth)
        if direction in ("up", "both"):
            reach |= _reach([(t, s) for s, t in edges], root, depth)
        graph = json.loads(body)
        shown = {n["name"] for n in graph["nodes"] if n["kind"] == "dataset"}
        assert shown == {names[i] for i in reach & readable}
        placeholders = [n for n in graph["nodes"] if n["kind"] == "hidden"]
        assert len(placeholders) == _components(reach - readable, edges)
        ids = {n["id"] for n in graph["nodes"]}
        assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])

    # The events that built the graph, one by one: the same promise.
    for event in events[:3]:
        response = await api.client.get(
            f"/lineage/{event.event_id}", headers=api.as_user(PRINCIPAL)
        )
        assert response.status in (200, 404)
        body = await response.read()
        for needle in forbidden:
            assert needle not in body
