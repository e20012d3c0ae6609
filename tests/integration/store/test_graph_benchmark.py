"""The graph benchmark's methods must answer alike, or its comparison means nothing.

Runs the benchmark's own loader and measurement on a small graph (no timing asserted):
the recursive query with and without indexes and the naive per-hop BFS must find the same
number of nodes from every root.
"""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from benchmarks.graph_query import GraphShape, build_edges, load_graph, main, measure_queries


async def test_all_methods_find_the_same_nodes(store_dsn: str, db: asyncpg.Connection) -> None:
    shape = GraphShape(layers=6, width=40, fan_out=2, seed=3)
    edges = build_edges(shape, 400)
    await load_graph(store_dsn, shape, edges)
    assert await db.fetchval("SELECT count(*) FROM lineage_edges") == len(edges)
    series = {s.name: s for s in await measure_queries(store_dsn, shape, 25, 25, depth=3)}
    assert series["cte"].sizes == series["naive-bfs"].sizes
    assert series["cte"].sizes == series["cte-noindex"].sizes
    assert len(series["cte"].sizes) == 25
    assert max(series["cte"].sizes) > 1


def test_quick_run_writes_a_report(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quick", "--dsn", pg_dsn, "--results-dir", str(tmp_path)]) == 0
    [result] = tmp_path.glob("graph_query-*.json")
    report = json.loads(result.read_text())
    assert [s["name"] for s in report["graph_queries"]["series"]] == [
        "cte",
        "cte-noindex",
        "naive-bfs",
    ]
    assert report["writer"]["access"]["inserted"] == report["writer"]["access"]["events"]
    assert report["writer"]["access"]["redelivered_duplicates"] == 500
    assert "| cte |" in capsys.readouterr().out
