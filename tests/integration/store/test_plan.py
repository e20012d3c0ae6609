"""Properties of the pure batch planning (`agent.store.plan`) and, against the real
PostgreSQL, the end-to-end promise they support: any arrival order, any batching, any
redelivery gives the same store."""

from __future__ import annotations

import itertools
import uuid
from datetime import timedelta

import asyncpg
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.events import EventType, RunEvent
from agent.store.plan import identity_key, merge_run_state, run_state, screen
from agent.store.writer import StoreWriter
from tests.integration.store.conftest import empty_store
from tests.integration.store.factories import T0, access_event, run_event, snapshot_by_name

PROPERTY = settings(max_examples=60, deadline=None)
DB_PROPERTY = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

event_types: st.SearchStrategy[EventType] = st.sampled_from(
    ["START", "RUNNING", "COMPLETE", "FAIL", "ABORT", "OTHER"]
)


@st.composite
def run_histories(draw: st.DrawFn) -> list[RunEvent]:
    """Events of up to two runs, with colliding times, over a handful of datasets."""
    runs = [uuid.UUID(int=1), uuid.UUID(int=2)]
    datasets = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=3, unique=True)
    count = draw(st.integers(1, 6))
    events = []
    for _ in range(count):
        event_type: EventType = draw(event_types)
        events.append(
            run_event(
                event_type,
                draw(st.sampled_from(runs)),
                inputs=draw(datasets),
                outputs=draw(datasets),
                at=T0 + timedelta(seconds=draw(st.integers(0, 3))),
                job=draw(st.sampled_from(["j1", "j2"])),
            )
        )
    return events


@PROPERTY
@given(run_histories(), st.randoms())
def test_run_state_does_not_depend_on_arrival_order(events: list[RunEvent], random: object) -> None:
    same_run = [e for e in events if e.run.run_id == events[0].run.run_id]
    states = [run_state(e, e.event_id, identity_key(e.job.name)) for e in same_run]
    results = set()
    for order in itertools.islice(itertools.permutations(states), 24):
        merged = order[0]
        for state in order[1:]:
            merged = merge_run_state(merged, state)
        results.add(merged)
    assert len(results) == 1


@PROPERTY
@given(
    st.lists(st.text(max_size=6), min_size=1, max_size=4),
    st.lists(st.text(max_size=6), min_size=1, max_size=4),
)
def test_identity_keys_differ_whenever_the_parts_differ(a: list[str], b: list[str]) -> None:
    # A collision would merge two datasets: one's lineage shown under the other's name.
    assert (identity_key(*a) == identity_key(*b)) == (a == b)


text_with_nul = st.builds(
    lambda head, tail: head + "\x00" + tail, st.text(max_size=5), st.text(max_size=5)
)


@PROPERTY
@given(
    st.sampled_from(
        ["principal", "dataset_name", "dataset_namespace", "action", "rule", "request_id", "role"]
    ),
    text_with_nul,
)
def test_a_nul_anywhere_in_an_access_event_rejects_just_that_event(field: str, value: str) -> None:
    event = access_event(1)
    if field == "role":
        bad = msgspec.structs.replace(event, roles=("ok", value))
    else:
        bad = msgspec.structs.replace(event, **{field: value})
    screened = screen([access_event(2), bad, access_event(3)])
    assert [r.event_id for r in screened.rejected] == [bad.event_id]
    assert len(screened.access_events) == 2


@PROPERTY
@given(st.text(max_size=20).filter(lambda s: "\x00" not in s))
def test_nul_free_valid_text_is_accepted(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return
    event = run_event("START", uuid.uuid4(), inputs=[value], outputs=[value + "x"], job=value)
    access = msgspec.structs.replace(access_event(1), principal=value)
    screened = screen([event, access])
    assert screened.rejected == []


@PROPERTY
@given(st.sampled_from(["input", "output", "job"]), text_with_nul)
def test_a_nul_anywhere_in_a_run_event_rejects_just_that_event(where: str, value: str) -> None:
    bad = run_event(
        "START",
        uuid.uuid4(),
        inputs=[value if where == "input" else "a"],
        outputs=[value if where == "output" else "b"],
        job=value if where == "job" else "j",
    )
    good = run_event("START", uuid.uuid4(), inputs=["a"], outputs=["b"], job="j")
    screened = screen([good, bad])
    assert [r.event_id for r in screened.rejected] == [bad.event_id]
    assert [event for event, _, _ in screened.run_events] == [good]


def test_the_text_backslash_u0000_is_not_a_nul() -> None:
    # It reads like the JSON escape of a NUL; the screen must not take one for the other.
    event = run_event("START", uuid.uuid4(), inputs=["a\\u0000b"], outputs=["c"], job="j")
    screened = screen([event])
    assert screened.rejected == []
    assert [eid for _, eid, _ in screened.run_events] == [event.event_id]


@DB_PROPERTY
@given(run_histories(), st.randoms(), st.integers(1, 3))
async def test_any_order_batching_and_redelivery_give_the_same_store(
    writer: StoreWriter,
    db: asyncpg.Connection,
    events: list[RunEvent],
    random: object,
    batch_size: int,
) -> None:
    await empty_store(db)
    await writer.write(events)
    expected = await snapshot_by_name(db)

    await empty_store(db)
    shuffled = list(events)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    for start in range(0, len(shuffled), batch_size):
        await writer.write(shuffled[start : start + batch_size])
    await writer.write(shuffled[: batch_size + 1])  # a redelivery
    assert await snapshot_by_name(db) == expected
