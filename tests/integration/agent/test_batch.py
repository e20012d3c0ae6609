"""The batch format (pure, no servers): round trip, keys, and hostile plaintext."""

from __future__ import annotations

import contextlib
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.agent import CommitMark, records_to_skip
from agent.batch import (
    BATCH_SCHEMA_VERSION,
    SEAL_OVERHEAD_BYTES,
    BatchBuilder,
    BatchFormatError,
    EventTooLargeError,
    decode_events,
    encode_events,
    message_key,
    open_message,
    seal_part,
)
from agent.crypto import DecryptError
from agent.events import AccessEvent, LineageEvent
from agent.keys import LocalKeyring
from agent.spool import SpoolPosition
from tests.integration.agent.harness import etl_records, reference_events, sql_records

names = st.text(min_size=1, max_size=40)


@st.composite
def access_events(draw: st.DrawFn) -> AccessEvent:
    return AccessEvent(
        event_id=uuid.UUID(int=draw(st.integers(0, 2**128 - 1))),
        time=datetime.fromtimestamp(draw(st.integers(0, 4_000_000_000)), UTC),
        principal=draw(st.none() | names),
        roles=tuple(draw(st.lists(names, max_size=3))),
        dataset_namespace=draw(names),
        dataset_name=draw(names),
        action=draw(st.sampled_from(["read", "write", "query"])),
        decision=draw(st.sampled_from(["allow", "deny", "none"])),
        rule=draw(st.none() | names),
        request_id=draw(names),
        status=draw(st.integers(100, 599)),
    )


_RUN_EVENTS = reference_events(etl_records("fmt", runs=2, per_run=4) + sql_records("fmt"))


def run_events() -> list[LineageEvent]:
    """Run and access events as the deriver makes them (column lineage included)."""
    return list(_RUN_EVENTS)


@settings(max_examples=60, deadline=None)
@given(st.lists(access_events(), max_size=20), st.integers(1, 300))
def test_every_event_comes_back_equal_from_its_part(
    accesses: list[AccessEvent], buckets: int
) -> None:
    builder = BatchBuilder(key_buckets=buckets)
    events = [*accesses, *run_events()]
    for event in events:
        builder.add(event)
    batch = builder.build()
    assert len(builder) == 0
    decoded: list[LineageEvent] = []
    for part in batch.parts:
        part_events = decode_events(part.plaintext(), BATCH_SCHEMA_VERSION)
        assert {message_key(e, buckets) for e in part_events} == {part.key}
        decoded.extend(part_events)
    assert sorted(msgspec.json.encode(e) for e in decoded) == sorted(
        msgspec.json.encode(e) for e in events
    )
    assert {e.event_id for e in decoded} == {e.event_id for e in events}


@settings(max_examples=60, deadline=None)
@given(access_events(), st.integers(1, 1000))
def test_a_dataset_always_has_the_same_opaque_key(event: AccessEvent, buckets: int) -> None:
    key = message_key(event, buckets)
    again = msgspec.structs.replace(event, event_id=uuid.uuid4(), principal="someone else")
    assert message_key(again, buckets) == key
    # Only a bucket number: nothing of the name is in the key.
    assert re.fullmatch(rb"lb\d{5}", key)
    assert int(key[2:]) < buckets


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_plaintext_is_a_format_error_never_a_crash(plaintext: bytes) -> None:
    # Random bytes are practically never a valid batch; whatever they are, the only
    # acceptable failure is BatchFormatError (which the ingester dead-letters).
    with contextlib.suppress(BatchFormatError):
        decode_events(plaintext, BATCH_SCHEMA_VERSION)


def test_a_well_formed_body_with_wrong_types_is_rejected() -> None:
    hostile = msgspec.msgpack.encode({"run_events": [{"eventType": 1}], "access_events": []})
    with pytest.raises(BatchFormatError, match="undecodable"):
        decode_events(hostile, BATCH_SCHEMA_VERSION)
    extra = msgspec.msgpack.encode({"run_events": [], "access_events": [], "more": 1})
    with pytest.raises(BatchFormatError, match="undecodable"):
        decode_events(extra, BATCH_SCHEMA_VERSION)


def test_an_unknown_schema_version_is_refused_not_guessed() -> None:
    body = encode_events(run_events())
    with pytest.raises(BatchFormatError) as caught:
        decode_events(body, BATCH_SCHEMA_VERSION + 1)
    assert caught.value.reason == "unknown_schema"


async def test_a_sealed_part_opens_only_on_its_topic(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keyring.json")
    builder = BatchBuilder(key_buckets=1)
    for event in run_events():
        builder.add(event)
    (part,) = builder.build().parts
    sealed = await seal_part(part, batch_id="b", topic="lineage", provider=keyring)
    opened = await open_message(sealed, topic="lineage", provider=keyring)
    assert sorted(str(e.event_id) for e in opened) == sorted(str(e.event_id) for e in run_events())
    with pytest.raises(DecryptError) as caught:
        await open_message(sealed, topic="other", provider=keyring)
    assert caught.value.reason == "wrong_topic"


def test_a_restarted_reader_skips_only_what_its_checkpoint_already_covers() -> None:
    before, after = SpoolPosition(1, 100), SpoolPosition(2, 40)
    mark = CommitMark(before, after)
    # Died between checkpoint and commit: the records up to `after` are in the checkpoint.
    assert records_to_skip(mark, before) == after
    # Committed too: nothing to skip.
    assert records_to_skip(mark, after) is None
    # First commit ever, died before it.
    assert records_to_skip(CommitMark(None, after), None) == after
    # The spool was replaced (its position is neither): skipping would lose records.
    assert records_to_skip(mark, None) is None
    assert records_to_skip(mark, SpoolPosition(1, 50)) is None
    assert records_to_skip(None, before) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(access_events(), min_size=1, max_size=60), st.integers(1024, 4096))
def test_parts_stay_under_their_limit_and_keep_each_keys_order(
    accesses: list[AccessEvent], limit: int
) -> None:
    builder = BatchBuilder(key_buckets=2, max_part_bytes=limit)
    added = accesses  # each one is far below the limit; together they are not
    for event in accesses:
        builder.add(event)
    batch = builder.build()
    assert list(batch.events) == added
    for part in batch.parts:
        assert sum(map(len, part.access_events)) <= limit
        assert len(part.plaintext()) <= limit + SEAL_OVERHEAD_BYTES
    for key in {part.key for part in batch.parts}:
        decoded = [
            event
            for part in batch.parts
            if part.key == key
            for event in decode_events(part.plaintext(), BATCH_SCHEMA_VERSION)
        ]
        assert decoded == [e for e in added if message_key(e, 2) == key]


def test_an_event_no_part_can_hold_is_refused_whole() -> None:
    builder = BatchBuilder(max_part_bytes=1024)
    small, huge = (
        _RUN_EVENTS[0],
        msgspec.structs.replace(
            next(e for e in _RUN_EVENTS if isinstance(e, AccessEvent)), dataset_name="x" * 5000
        ),
    )
    builder.add(small)
    with pytest.raises(EventTooLargeError) as caught:
        builder.add(huge)
    assert caught.value.event is huge
    assert caught.value.size > 5000
    assert builder.build().events == (small,)
