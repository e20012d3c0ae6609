"""The lineage API's pure decisions: identity from headers, node parameters, redaction."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from agent.api import (
    HIDDEN_NAMESPACE,
    ApiError,
    Caller,
    caller_from_headers,
    dataset_id,
    parse_dataset,
    redact_graph,
    redact_run_event,
)
from agent.derive.routes import DatasetRef
from agent.events import (
    ColumnLineageFacet,
    ColumnLineageField,
    DatasetFacets,
    InputDataset,
    InputField,
    Job,
    OutputDataset,
    Run,
    RunEvent,
)
from agent.openapi import HiddenNode, LineageGraphView
from agent.store.queries import Graph, GraphEdge, GraphNode
from proxy.gate import header_value

T0 = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
RUN = uuid.UUID(int=7)
USER, ROLES = "X-Auth-Request-User", "X-Auth-Request-Roles"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


# --- identity ---------------------------------------------------------------------------


def test_caller_comes_from_the_two_headers_with_roles_percent_decoded() -> None:
    caller = caller_from_headers(
        headers((USER, "alice"), (ROLES, "analyst, data%2Cops ,,caf%C3%A9")), USER, ROLES
    )
    assert caller == Caller(id="alice", roles=("analyst", "data,ops", "café"))
    assert caller_from_headers(headers((USER, "bob")), USER, ROLES).roles == ()


@pytest.mark.parametrize(
    ("pairs", "status"),
    [
        ((), 401),
        (((USER, "  "),), 401),
        (((ROLES, "admin"),), 401),
        (((USER, "a"), (USER, "b")), 400),
        (((USER, "a"), (ROLES, "x"), (ROLES, "admin")), 400),
        (((USER, "a\x01b"),), 400),
        (((USER, "a\udcffb"),), 400),
        (((USER, "x" * 1025),), 400),
        (((USER, "a"), (ROLES, "%FF")), 400),
        (((USER, "a"), (ROLES, "ok,%0Aadmin")), 400),
        (((USER, "a"), (ROLES, ",".join(["r"] * 257))), 400),
    ],
)
def test_missing_or_ambiguous_identity_is_refused(
    pairs: tuple[tuple[str, str], ...], status: int
) -> None:
    with pytest.raises(ApiError) as refused:
        caller_from_headers(headers(*pairs), USER, ROLES)
    assert refused.value.status == status


identity_texts = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Cf", "Zl", "Zp", "Co", "Cn"]),
    min_size=1,
    max_size=30,
).filter(str.isprintable)


@settings(max_examples=300)
@given(principal=identity_texts, roles=st.lists(identity_texts, max_size=5))
def test_the_api_reads_back_exactly_the_identity_the_proxy_sent(
    principal: str, roles: list[str]
) -> None:
    # As the gate writes the headers, and as HTTP delivers them: outer blanks dropped.
    sent = headers(
        (USER, header_value(principal).decode("ascii").strip(" \t")),
        (ROLES, b",".join(header_value(r) for r in roles).decode("ascii").strip(" \t")),
    )
    assert caller_from_headers(sent, USER, ROLES) == Caller(id=principal, roles=tuple(roles))


# --- node parameters --------------------------------------------------------------------

names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    min_size=1,
    max_size=60,
)


@given(namespace=names, name=names)
def test_a_dataset_id_names_its_dataset(namespace: str, name: str) -> None:
    assert parse_dataset(dataset_id(namespace, name)) == DatasetRef(namespace, name)
    assert parse_dataset(name, namespace) == DatasetRef(namespace, name)


def test_namespace_and_name_split_at_the_last_colon() -> None:
    assert parse_dataset("https://db.internal:8001:sales.orders") == DatasetRef(
        "https://db.internal:8001", "sales.orders"
    )
    with pytest.raises(ApiError):
        parse_dataset("sales.orders")


@given(st.text(max_size=40))
def test_any_node_text_parses_or_is_a_400(node: str) -> None:
    try:
        parse_dataset(node)
        status = 200
    except ApiError as refused:
        status = refused.status
    assert status in (200, 400)


# --- graph redaction --------------------------------------------------------------------


def node_name(i: int) -> str:
    return f"secret-table-{i:03d}-zz"


@st.composite
def graphs(draw: st.DrawFn) -> tuple[Graph, dict[int, bool]]:
    count = draw(st.integers(1, 12))
    node_ids = st.integers(1, count)
    pairs = draw(st.sets(st.tuples(node_ids, node_ids), max_size=30))
    nodes = tuple(
        GraphNode(
            id=i, namespace=f"ns-{i:03d}-zz", name=node_name(i), depth=draw(st.integers(0, 5))
        )
        for i in range(1, count + 1)
    )
    edges = tuple(
        GraphEdge(source=s, target=t, run_count=1, first_seen=T0, last_seen=T0, last_run_id=RUN)
        for s, t in sorted(pairs)
    )
    readable = {i: draw(st.booleans()) for i in range(1, count + 1)}
    return Graph(root=1, nodes=nodes, edges=edges, truncated=False), readable


@settings(max_examples=300)
@given(case=graphs(), key=st.binary(min_size=32, max_size=32))
def test_graph_never_names_a_hidden_dataset(
    case: tuple[Graph, dict[int, bool]], key: bytes
) -> None:
    graph, readable = case
    view = redact_graph(graph, readable, key, "both", 3)
    body = msgspec.json.encode(view)
    for node in graph.nodes:
        if not readable[node.id]:
            assert node.name.encode() not in body
            assert node.namespace.encode() not in body
            assert dataset_id(node.namespace, node.name).encode() not in body
    shown = {n.name for n in view.nodes if not isinstance(n, HiddenNode)}
    assert shown == {n.name for n in graph.nodes if readable[n.id]}
    hidden = {n.id for n in view.nodes if isinstance(n, HiddenNode)}
    for edge in view.edges:
        assert not (edge.source in hidden and edge.target in hidden)
        if edge.source in hidden or edge.target in hidden:
            assert edge.run_count is None
            assert edge.last_run_id is None
    # Stable within a response: the same key gives the same ids.
    assert msgspec.json.encode(redact_graph(graph, readable, key, "both", 3)) == body


def test_connected_hidden_datasets_become_one_placeholder_per_group() -> None:
    # 1 -> 2 -> 3 -> 4 and 1 -> 5, with 2, 3 and 5 hidden: {2, 3} and {5} are two groups.
    graph, readable = (
        Graph(
            root=1,
            nodes=tuple(
                GraphNode(id=i, namespace="ns", name=node_name(i), depth=d)
                for i, d in ((1, 0), (2, 1), (3, 2), (4, 3), (5, 1))
            ),
            edges=tuple(
                GraphEdge(
                    source=s, target=t, run_count=2, first_seen=T0, last_seen=T0, last_run_id=RUN
                )
                for s, t in ((1, 2), (2, 3), (3, 4), (1, 5))
            ),
            truncated=False,
        ),
        {1: True, 2: False, 3: False, 4: True, 5: False},
    )
    view = redact_graph(graph, readable, b"k" * 32, "down", 3)
    hidden = [n for n in view.nodes if isinstance(n, HiddenNode)]
    assert [n.depth for n in hidden] == [1, 1]
    one, four = dataset_id("ns", node_name(1)), dataset_id("ns", node_name(4))
    edges = {(e.source, e.target) for e in view.edges}
    group = next(h.id for h in hidden if (h.id, four) in edges)
    single = next(h.id for h in hidden if h.id != group)
    assert edges == {(one, group), (group, four), (one, single)}
    assert view.root == one
    other_key = redact_graph(graph, readable, b"j" * 32, "down", 3)
    assert {n.id for n in other_key.nodes} & {n.id for n in hidden} == set()


def walked(pairs: Iterable[tuple[int, int]]) -> Graph:
    """The graph the store's downward walk from node 1 returns for these edges: every
    node it reaches, at its distance, and every edge among them."""
    depths = _bfs(pairs)
    return Graph(
        root=1,
        nodes=tuple(
            GraphNode(id=i, namespace="ns", name=node_name(i), depth=d)
            for i, d in sorted(depths.items())
        ),
        edges=tuple(
            GraphEdge(source=s, target=t, run_count=1, first_seen=T0, last_seen=T0, last_run_id=RUN)
            for s, t in sorted(pairs)
            if s in depths and t in depths
        ),
        truncated=False,
    )


def _bfs(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    depths = {1: 0}
    frontier = [1]
    while frontier:
        following = []
        for node in frontier:
            for source, target in sorted(pairs):
                if source == node and target not in depths:
                    depths[target] = depths[node] + 1
                    following.append(target)
        frontier = following
    return depths


def seen(view: LineageGraphView) -> tuple[dict[str, int], list[int], int]:
    """What the caller can tell apart: visible names at their depths, placeholder depths,
    and the number of edges."""
    names = {n.name: n.depth for n in view.nodes if not isinstance(n, HiddenNode)}
    hidden = sorted(n.depth for n in view.nodes if isinstance(n, HiddenNode))
    return names, hidden, len(view.edges)


@pytest.mark.parametrize("hidden", [1, 3, 6])
def test_a_hidden_chain_is_one_hop_whatever_its_length(hidden: int) -> None:
    # root -> h_1 -> ... -> h_n -> end, with the h hidden.
    chain = list(range(1, hidden + 3))
    graph = walked(list(itertools.pairwise(chain)))
    readable = {i: i in (chain[0], chain[-1]) for i in chain}
    view = redact_graph(graph, readable, b"k" * 32, "down", 10)
    assert seen(view) == ({node_name(1): 0, node_name(chain[-1]): 2}, [1], 2)


@settings(max_examples=300)
@given(
    pairs=st.sets(st.tuples(st.integers(1, 8), st.integers(1, 8)), max_size=20),
    hidden=st.sets(st.integers(2, 8), min_size=1),
    extra=st.integers(1, 4),
)
def test_depths_do_not_show_how_long_a_hidden_group_is(
    pairs: set[tuple[int, int]], hidden: set[int], extra: int
) -> None:
    # Stretch a hidden dataset the root feeds into a hidden chain: grown -> 101 -> ... ->
    # its old targets. The caller must see the same graph either way.
    grown = min(hidden)
    pairs = {*pairs, (1, grown)}
    readable = {i: i < 100 and i not in hidden for i in range(1, 200)}
    chain = [grown, *range(101, 101 + extra)]
    stretched = {(chain[-1] if s == grown else s, t) for s, t in pairs}
    stretched.update(itertools.pairwise(chain))
    key = b"k" * 32
    before = redact_graph(walked(pairs), readable, key, "down", 10)
    after = redact_graph(walked(stretched), readable, key, "down", 10)
    assert seen(after) == seen(before)


# --- event redaction --------------------------------------------------------------------


@st.composite
def events(draw: st.DrawFn) -> tuple[RunEvent, dict[DatasetRef, bool]]:
    count = draw(st.integers(1, 8))
    refs = [DatasetRef(f"ns-{i:03d}-qq", f"hidden-name-{i:03d}-qq") for i in range(count)]
    readable = {ref: draw(st.booleans()) for ref in refs}
    pick = st.sampled_from(refs)

    def facets() -> DatasetFacets:
        sources = draw(st.lists(pick, max_size=3))
        if not sources:
            return DatasetFacets()
        fields = {
            f"col-{i}": ColumnLineageField(
                input_fields=(InputField(s.namespace, s.name, f"column-of-{s.name}"),)
            )
            for i, s in enumerate(sources)
        }
        return DatasetFacets(column_lineage=ColumnLineageFacet(fields=fields))

    inputs = tuple(
        InputDataset(namespace=r.namespace, name=r.name, facets=facets())
        for r in draw(st.lists(pick, max_size=4, unique=True))
    )
    outputs = tuple(
        OutputDataset(namespace=r.namespace, name=r.name, facets=facets())
        for r in draw(st.lists(pick, max_size=4, unique=True))
    )
    event = RunEvent(
        event_type="COMPLETE",
        event_time=T0,
        run=Run(run_id=RUN),
        job=Job(namespace="etl", name="job"),
        inputs=inputs,
        outputs=outputs,
    )
    return event, readable


@settings(max_examples=300)
@given(case=events(), key=st.binary(min_size=32, max_size=32))
def test_event_never_names_a_hidden_dataset_or_its_columns(
    case: tuple[RunEvent, dict[DatasetRef, bool]], key: bytes
) -> None:
    event, readable = case
    redacted, hidden_count = redact_run_event(event, readable, key)
    body = msgspec.json.encode(redacted)
    hidden = [ref for ref, ok in readable.items() if not ok]
    for ref in hidden:
        assert ref.name.encode() not in body
        assert ref.namespace.encode() not in body
    assert len(redacted.inputs) == len(event.inputs)
    assert len(redacted.outputs) == len(event.outputs)
    for before, after in zip(event.inputs, redacted.inputs, strict=True):
        if readable[DatasetRef(before.namespace, before.name)]:
            assert (after.namespace, after.name) == (before.namespace, before.name)
        else:
            assert after.namespace == HIDDEN_NAMESPACE
            assert after.facets == DatasetFacets()
    assert hidden_count <= len(hidden)
