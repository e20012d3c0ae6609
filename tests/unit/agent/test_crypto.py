"""Envelope encryption: round trips, tampering, topic binding, rotation, hostile blobs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent.crypto import (
    BATCH_FORMAT_VERSION,
    DecryptError,
    OpenedBatch,
    decode_header,
    open_batch,
    seal_batch,
    topic_tag,
)
from agent.keys import KeyProviderError, LocalKeyring

TOPIC = "lineage.events"
MARKER = b"PLAINTEXT-MARKER-7f3c9a1e"
BATCH = b'{"eventType": "COMPLETE", "job": "nightly-etl", "note": "' + MARKER + b'"}' * 20


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring(tmp_path / "keyring.json")


@pytest.fixture(scope="module")
def shared_keyring(tmp_path_factory: pytest.TempPathFactory) -> LocalKeyring:
    return LocalKeyring(tmp_path_factory.mktemp("keys") / "keyring.json")


async def seal(keyring: LocalKeyring, plaintext: bytes = BATCH, topic: str = TOPIC) -> bytes:
    return await seal_batch(
        plaintext, topic=topic, batch_id="batch-0001", schema_version=3, provider=keyring
    )


async def reason_for(blob: bytes, keyring: LocalKeyring, topic: str = TOPIC) -> str:
    with pytest.raises(DecryptError) as failure:
        await open_batch(blob, topic=topic, provider=keyring)
    return failure.value.reason


async def test_round_trip_returns_batch_id_schema_version_and_plaintext(
    keyring: LocalKeyring,
) -> None:
    blob = await seal(keyring)
    assert await open_batch(blob, topic=TOPIC, provider=keyring) == ("batch-0001", 3, BATCH)


async def test_every_batch_gets_a_fresh_data_key_and_nonce(keyring: LocalKeyring) -> None:
    first, second = decode_header(await seal(keyring)), decode_header(await seal(keyring))
    assert first.nonce != second.nonce
    assert first.wrapped_key != second.wrapped_key


async def test_sealed_blob_never_contains_the_plaintext(keyring: LocalKeyring) -> None:
    blob = await seal(keyring)
    assert MARKER not in blob
    assert b"nightly-etl" not in blob


async def test_flipping_any_single_bit_of_the_blob_fails(keyring: LocalKeyring) -> None:
    blob = await seal(keyring, b"short batch")
    for index in range(len(blob)):
        altered = bytearray(blob)
        altered[index] ^= 0x01
        await reason_for(bytes(altered), keyring)


async def test_batch_replayed_under_another_topic_fails(keyring: LocalKeyring) -> None:
    blob = await seal(keyring)
    assert await reason_for(blob, keyring, topic="lineage.other") == "wrong_topic"
    # Rewriting the header's topic tag to match does not help: the topic is authenticated.
    header = decode_header(blob)
    start = blob.index(header.topic_tag)
    forged = blob[:start] + topic_tag("lineage.other") + blob[start + len(header.topic_tag) :]
    assert await reason_for(forged, keyring, topic="lineage.other") == "tampered"


async def test_edited_batch_id_or_schema_version_fails(keyring: LocalKeyring) -> None:
    blob = await seal(keyring)
    renamed = blob.replace(b"batch-0001", b"batch-0002", 1)
    assert await reason_for(renamed, keyring) == "tampered"
    header = decode_header(blob)
    schema_at = blob.index(header.topic_tag) - 4
    bumped = blob[:schema_at] + (4).to_bytes(4, "big") + blob[schema_at + 4 :]
    assert await reason_for(bumped, keyring) == "tampered"


async def test_batch_sealed_under_an_old_key_opens_after_rotation(keyring: LocalKeyring) -> None:
    old_blob = await seal(keyring)
    old_id = keyring.active_key_id
    new_id = keyring.rotate()
    new_blob = await seal(keyring)
    assert decode_header(old_blob).key_id == old_id
    assert decode_header(new_blob).key_id == new_id
    assert (await open_batch(old_blob, topic=TOPIC, provider=keyring)).plaintext == BATCH
    assert (await open_batch(new_blob, topic=TOPIC, provider=keyring)).plaintext == BATCH


async def test_batch_from_a_keyring_we_do_not_hold_is_unknown_key(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    stranger = LocalKeyring(tmp_path / "other" / "keyring.json")
    blob = await seal(stranger)
    assert await reason_for(blob, keyring) == "unknown_key"


async def test_unknown_format_version_is_named(keyring: LocalKeyring) -> None:
    blob = bytearray(await seal(keyring))
    blob[4] = BATCH_FORMAT_VERSION + 1
    assert await reason_for(bytes(blob), keyring) == "unknown_version"


async def test_every_truncation_fails(keyring: LocalKeyring) -> None:
    blob = await seal(keyring, b"x" * 40)
    for length in range(len(blob)):
        assert await reason_for(blob[:length], keyring) in ("truncated", "tampered")


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "truncated"),
        (b"LSEB", "truncated"),
        (b"GIF89a" + bytes(200), "malformed"),
        (b"LSEB\x01\x02\xff\xfe" + bytes(100), "malformed"),
        (os.urandom(300), "malformed"),
    ],
)
async def test_garbage_is_a_clean_decrypt_error(
    keyring: LocalKeyring, blob: bytes, reason: str
) -> None:
    assert await reason_for(blob, keyring) == reason


async def test_huge_blob_is_refused_before_any_work(keyring: LocalKeyring) -> None:
    with pytest.raises(DecryptError) as limited:
        await open_batch(b"LSEB" + bytes(2048), topic=TOPIC, provider=keyring, max_blob_bytes=1024)
    assert limited.value.reason == "too_large"
    with pytest.raises(DecryptError) as default:
        await open_batch(bytes((64 << 20) + 1), topic=TOPIC, provider=keyring)
    assert default.value.reason == "too_large"


async def test_key_provider_failure_is_not_reported_as_a_bad_batch(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    stranger = LocalKeyring(tmp_path / "other" / "keyring.json")
    blob = await seal(stranger)
    keyring.path.unlink()  # the keyring vanished: retry later, do not dead-letter
    with pytest.raises(KeyProviderError):
        await open_batch(blob, topic=TOPIC, provider=keyring)


@pytest.mark.parametrize(
    ("topic", "batch_id", "schema_version"),
    [("", "b", 1), (TOPIC, "", 1), (TOPIC, "b" * 256, 1), (TOPIC, "b", -1), (TOPIC, "b", 1 << 32)],
)
async def test_seal_refuses_header_values_it_cannot_encode(
    keyring: LocalKeyring, topic: str, batch_id: str, schema_version: int
) -> None:
    with pytest.raises(ValueError, match="must"):
        await seal_batch(
            b"x", topic=topic, batch_id=batch_id, schema_version=schema_version, provider=keyring
        )


@settings(max_examples=60, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    batch_id=st.text(min_size=1, max_size=40),
    schema_version=st.integers(0, (1 << 32) - 1),
)
def test_random_batches_round_trip(
    shared_keyring: LocalKeyring, plaintext: bytes, batch_id: str, schema_version: int
) -> None:
    async def round_trip() -> OpenedBatch:
        blob = await seal_batch(
            plaintext,
            topic=TOPIC,
            batch_id=batch_id,
            schema_version=schema_version,
            provider=shared_keyring,
        )
        return await open_batch(blob, topic=TOPIC, provider=shared_keyring)

    assume(len(batch_id.encode()) <= 255)
    assert asyncio.run(round_trip()) == (batch_id, schema_version, plaintext)


@settings(max_examples=150, deadline=None)
@given(
    plaintext=st.binary(min_size=1, max_size=512),
    where=st.floats(0, 1, exclude_max=True),
    flip=st.integers(1, 255),
)
def test_any_single_byte_change_fails(
    shared_keyring: LocalKeyring, plaintext: bytes, where: float, flip: int
) -> None:
    async def tamper() -> None:
        blob = bytearray(
            await seal_batch(
                plaintext, topic=TOPIC, batch_id="b-1", schema_version=1, provider=shared_keyring
            )
        )
        blob[int(where * len(blob))] ^= flip
        with pytest.raises(DecryptError):
            await open_batch(bytes(blob), topic=TOPIC, provider=shared_keyring)

    asyncio.run(tamper())


@settings(max_examples=60, deadline=None)
@given(prefix=st.binary(max_size=200), suffix=st.binary(max_size=200))
def test_ciphertext_never_contains_a_plaintext_marker(
    shared_keyring: LocalKeyring, prefix: bytes, suffix: bytes
) -> None:
    blob = asyncio.run(
        seal_batch(
            prefix + MARKER + suffix,
            topic=TOPIC,
            batch_id="b-1",
            schema_version=1,
            provider=shared_keyring,
        )
    )
    assert MARKER not in blob
