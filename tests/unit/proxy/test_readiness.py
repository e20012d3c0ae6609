"""Readiness reasons: which take traffic away, and how a worker's reach the supervisor."""

from __future__ import annotations

import multiprocessing
from typing import cast

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.admin import DEGRADED, serving
from proxy.supervisor import STATUS_BYTES, SharedBytes, publish_status, read_status


def test_only_degradations_leave_the_proxy_ready() -> None:
    assert serving([])
    assert serving([DEGRADED + "policy files do not load", DEGRADED + "spool full"])
    assert not serving([DEGRADED + "spool full", "upstream 127.0.0.1:8001 unreachable"])
    assert not serving(["worker 1: redis unreachable"])


def status() -> SharedBytes:
    return cast(SharedBytes, multiprocessing.get_context("spawn").Array("c", STATUS_BYTES))


REASON = st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=60)


@settings(max_examples=500)
@given(st.lists(REASON, max_size=5))
@example(["\ud800"])  # a lone surrogate: published as '?'
def test_a_workers_reasons_reach_the_supervisor_one_by_one(reasons: list[str]) -> None:
    shared = status()
    publish_status(shared, reasons)
    read = read_status(shared)
    # As published: lone surrogates replaced, and only what fits is read back whole.
    if len("\x1e".join(reasons).encode("utf-8", "replace")) < STATUS_BYTES - 1:
        assert len(read) == len(reasons)
        # A reason keeps its kind: what was degraded is still degraded, and the reverse.
        for sent, got in zip(reasons, read, strict=True):
            assert got.startswith(DEGRADED) == sent.replace("\x1e", " ").startswith(DEGRADED)
    publish_status(shared, [])
    assert read_status(shared) == []
