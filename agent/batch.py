"""Batches: how events travel from the agent to the store, and their sealed wire format.

The agent collects derived events in a `BatchBuilder` and hands the resulting `EventBatch`
to a sink. A batch is split into parts by message key, and each part travels as one
Kafka message: the msgpack encoding of a `BatchBody` (run events and access events, the
same field names as their JSON), sealed with `agent.crypto.seal_batch` under schema
version `BATCH_SCHEMA_VERSION`, which the sealed header carries and authenticates.

Message keys. Kafka keeps order per partition and picks the partition from the key, so
every event that must stay in order has to share a key. An access event is keyed by its
dataset; a run event by its run, because it names many datasets and what a consumer
relies on is one run's START arriving before its COMPLETE. The key is not the name: it is
one of `key_buckets` buckets of a SHA-256 of it, so Kafka (whose keys are not encrypted)
learns a few bits per message instead of which datasets exist. A dataset always maps to
the same bucket, so its events stay in one partition, in order.

Decoding promises: a plaintext that is not a batch of this schema version raises
`BatchFormatError` with a reason (the ingester dead-letters it), never another exception.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import msgspec

from agent.crypto import DEFAULT_MAX_BLOB_BYTES, open_batch, seal_batch
from agent.events import AccessEvent, LineageEvent, RunEvent
from agent.keys import KeyProvider

BATCH_SCHEMA_VERSION = 1
# A bound on what sealing (header, wrapped key, tag) and the body's msgpack framing add to
# a part's encoded events: a part of at most `limit - SEAL_OVERHEAD_BYTES` event bytes
# seals into at most `limit` bytes.
SEAL_OVERHEAD_BYTES = 4096

BatchFailure = Literal["unknown_schema", "undecodable"]


class BatchFormatError(Exception):
    """An opened batch whose content this code cannot read; `reason` says why. Not retriable."""

    retriable = False

    def __init__(self, reason: BatchFailure, message: str) -> None:
        super().__init__(f"unreadable batch ({reason}): {message}")
        self.reason: BatchFailure = reason


class BatchBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The plaintext of one sealed message."""

    run_events: list[RunEvent]
    access_events: list[AccessEvent]


class _EncodedBody(msgspec.Struct, frozen=True):
    # Same shape as BatchBody with each event already encoded: events are encoded once,
    # when added, which is also how the builder knows the batch's size.
    run_events: list[msgspec.Raw]
    access_events: list[msgspec.Raw]


_event_encoder = msgspec.msgpack.Encoder()
_body_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(BatchBody)


def message_key(event: LineageEvent, key_buckets: int) -> bytes:
    """The opaque Kafka key of an event: its dataset's (or run's) bucket. Pure."""
    if isinstance(event, AccessEvent):
        material = f"dataset\x00{event.dataset_namespace}\x00{event.dataset_name}"
    else:
        material = f"run\x00{event.run.run_id}"
    return _bucket_key(material, key_buckets)


# Few datasets are hot: their keys are remembered rather than hashed for every event.
@functools.lru_cache(maxsize=65_536)
def _bucket_key(material: str, key_buckets: int) -> bytes:
    digest = hashlib.sha256(material.encode("utf-8", "surrogatepass")).digest()
    bucket = int.from_bytes(digest[:8], "big") % key_buckets
    return f"lb{bucket:05d}".encode()


@dataclass(frozen=True, slots=True)
class BatchPart:
    """The events of one batch that share a message key, already encoded."""

    key: bytes
    run_events: tuple[bytes, ...]
    access_events: tuple[bytes, ...]

    def plaintext(self) -> bytes:
        body = _EncodedBody(
            run_events=[msgspec.Raw(e) for e in self.run_events],
            access_events=[msgspec.Raw(e) for e in self.access_events],
        )
        return _body_encoder.encode(body)


@dataclass(frozen=True, slots=True)
class EventBatch:
    """What the agent hands a sink: the events, and the same events split and encoded."""

    batch_id: str
    events: tuple[LineageEvent, ...]
    parts: tuple[BatchPart, ...]
    encoded_bytes: int


class EventTooLargeError(ValueError):
    """One event whose encoding alone exceeds the largest part a message may carry."""

    def __init__(self, event: LineageEvent, size: int, limit: int) -> None:
        super().__init__(f"event {event.event_id} encodes to {size} bytes, a part holds {limit}")
        self.event = event
        self.size = size


class _PartBuffer:
    __slots__ = ("access_events", "bytes", "run_events")

    def __init__(self) -> None:
        self.run_events: list[bytes] = []
        self.access_events: list[bytes] = []
        self.bytes = 0


class BatchBuilder:
    """Collects events until the agent decides the batch is due (count, bytes or age).

    A key's events are cut into several parts when they exceed `max_part_bytes`, so no
    message outgrows what the broker accepts; the parts of one key keep their order.
    """

    def __init__(self, *, key_buckets: int = 64, max_part_bytes: int | None = None) -> None:
        if key_buckets < 1:
            raise ValueError("key_buckets must be at least 1")
        if max_part_bytes is not None and max_part_bytes < 1024:
            raise ValueError("max_part_bytes must be at least 1024")
        self._key_buckets = key_buckets
        self._max_part_bytes = max_part_bytes
        self._reset()

    def _reset(self) -> None:
        self._events: list[LineageEvent] = []
        self._parts: dict[bytes, list[_PartBuffer]] = {}
        self.encoded_bytes = 0
        # Monotonic time the first event of the current batch was added.
        self.started_at: float | None = None

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: LineageEvent) -> None:
        """Add an event; EventTooLargeError (and nothing added) if it cannot fit a part."""
        encoded = _event_encoder.encode(event)
        limit = self._max_part_bytes
        if limit is not None and len(encoded) > limit:
            raise EventTooLargeError(event, len(encoded), limit)
        key = message_key(event, self._key_buckets)
        buffers = self._parts.setdefault(key, [])
        if not buffers or (limit is not None and buffers[-1].bytes + len(encoded) > limit):
            buffers.append(_PartBuffer())
        buffer = buffers[-1]
        (buffer.access_events if isinstance(event, AccessEvent) else buffer.run_events).append(
            encoded
        )
        buffer.bytes += len(encoded)
        self._events.append(event)
        self.encoded_bytes += len(encoded)
        if self.started_at is None:
            self.started_at = time.monotonic()

    def build(self) -> EventBatch:
        """The batch so far; the builder starts empty again."""
        batch = EventBatch(
            batch_id=uuid.uuid4().hex,
            events=tuple(self._events),
            parts=tuple(
                BatchPart(
                    key=key,
                    run_events=tuple(buffer.run_events),
                    access_events=tuple(buffer.access_events),
                )
                for key, buffers in sorted(self._parts.items())
                for buffer in buffers
            ),
            encoded_bytes=self.encoded_bytes,
        )
        self._reset()
        return batch


def encode_events(events: list[LineageEvent]) -> bytes:
    """The plaintext body of the given events (in one part, whatever their keys)."""
    body = BatchBody(
        run_events=[e for e in events if isinstance(e, RunEvent)],
        access_events=[e for e in events if isinstance(e, AccessEvent)],
    )
    return _body_encoder.encode(body)


def decode_events(plaintext: bytes, schema_version: int) -> list[LineageEvent]:
    """The events of an opened batch; BatchFormatError when it is not one this code reads."""
    if schema_version != BATCH_SCHEMA_VERSION:
        raise BatchFormatError(
            "unknown_schema",
            f"schema version {schema_version}, this version reads {BATCH_SCHEMA_VERSION}",
        )
    try:
        body = _body_decoder.decode(plaintext)
    except (msgspec.DecodeError, ValueError) as exc:
        # ValueError: msgspec raises UnicodeDecodeError for a map key that is not UTF-8.
        raise BatchFormatError("undecodable", f"{type(exc).__name__}: {exc}") from None
    events: list[LineageEvent] = list(body.run_events)
    events.extend(body.access_events)
    return events


async def seal_part(part: BatchPart, *, batch_id: str, topic: str, provider: KeyProvider) -> bytes:
    """One part of a batch, encrypted for `topic` (see `agent.crypto`)."""
    return await seal_batch(
        part.plaintext(),
        topic=topic,
        batch_id=batch_id,
        schema_version=BATCH_SCHEMA_VERSION,
        provider=provider,
    )


async def open_message(
    blob: bytes,
    *,
    topic: str,
    provider: KeyProvider,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
) -> list[LineageEvent]:
    """The events of one sealed message.

    Raises DecryptError or BatchFormatError (a bad message: dead-letter it) or
    KeyProviderError (the keys could not be had: try again later).
    """
    opened = await open_batch(blob, topic=topic, provider=provider, max_blob_bytes=max_blob_bytes)
    return decode_events(opened.plaintext, opened.schema_version)
