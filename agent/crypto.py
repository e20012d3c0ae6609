"""Envelope encryption of lineage batches: nothing leaves the sidecar as plaintext.

`seal_batch` draws a fresh 256-bit data key per batch, encrypts the batch with AES-256-GCM
under a random 96-bit nonce, and has a `KeyProvider` wrap the data key with its
key-encryption key. `open_batch` reverses it. What it promises:

- The associated data is the whole header plus the topic, so the topic, batch id, schema
  version, key id, nonce and wrapped key are all authenticated: a batch replayed under
  another topic, or with any header byte edited, does not open.
- Every failure to open is a `DecryptError` with a machine-readable `reason`
  (`malformed`, `unknown_version`, `truncated`, `too_large`, `wrong_topic`, `unknown_key`,
  `tampered`), never a generic exception, so the ingester can dead-letter the message
  with that reason. A `KeyProviderError` (Vault down, keyring unreadable) is not a
  `DecryptError`: the message is fine and must be retried, not dead-lettered.

Blob layout, version 1 (integers big-endian):

    magic "LSEB" | u8 format version | u8 len + key id (UTF-8) | u8 len + batch id (UTF-8)
    | u32 schema version | 8-byte topic tag | 12-byte nonce | u16 len + wrapped data key
    | AES-GCM ciphertext with its 16-byte tag

The topic tag (first 8 bytes of SHA-256 of the topic) only lets a wrong topic be reported
as such; the topic itself is bound through the associated data.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from typing import Literal, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.keys import DATA_KEY_BYTES, KeyProvider, KeyUnwrapError, WrappedKey

BATCH_MAGIC = b"LSEB"
BATCH_FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
TOPIC_TAG_BYTES = 8
# Above any batch the agent makes; a bigger blob is refused before any work.
DEFAULT_MAX_BLOB_BYTES = 64 << 20

_PREFIX = struct.Struct(">4sB")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

DecryptFailure = Literal[
    "malformed",
    "unknown_version",
    "truncated",
    "too_large",
    "wrong_topic",
    "unknown_key",
    "tampered",
]


class DecryptError(Exception):
    """A sealed batch that cannot be opened; `reason` says why. Never retriable."""

    retriable = False

    def __init__(self, reason: DecryptFailure, message: str) -> None:
        super().__init__(f"cannot open batch ({reason}): {message}")
        self.reason: DecryptFailure = reason


class OpenedBatch(NamedTuple):
    batch_id: str
    schema_version: int
    plaintext: bytes


class _Header(NamedTuple):
    key_id: str
    batch_id: str
    schema_version: int
    topic_tag: bytes
    nonce: bytes
    wrapped_key: bytes
    # Bytes of the blob the header occupies (the start of the ciphertext).
    length: int


def topic_tag(topic: str) -> bytes:
    return hashlib.sha256(topic.encode()).digest()[:TOPIC_TAG_BYTES]


def _associated_data(header: bytes, topic: str) -> bytes:
    # The header is self-delimiting, so appending the topic is unambiguous.
    return header + topic.encode()


def _short_text(value: str, field: str) -> bytes:
    encoded = value.encode()
    if not encoded or len(encoded) > 255:
        raise ValueError(f"{field} must be 1 to 255 bytes of UTF-8")
    return _U8.pack(len(encoded)) + encoded


def encode_header(
    *,
    key_id: str,
    batch_id: str,
    schema_version: int,
    topic: str,
    nonce: bytes,
    wrapped_key: bytes,
) -> bytes:
    if not 0 <= schema_version < 1 << 32:
        raise ValueError("schema_version must fit in 32 bits")
    if len(wrapped_key) >= 1 << 16:
        raise ValueError("wrapped data key too long")
    return b"".join(
        (
            _PREFIX.pack(BATCH_MAGIC, BATCH_FORMAT_VERSION),
            _short_text(key_id, "key id"),
            _short_text(batch_id, "batch_id"),
            _U32.pack(schema_version),
            topic_tag(topic),
            nonce,
            _U16.pack(len(wrapped_key)),
            wrapped_key,
        )
    )


class _Cursor:
    """Reads fields off a blob; running past its end is `truncated`."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.blob):
            raise DecryptError("truncated", f"blob ends inside its header at byte {len(self.blob)}")
        chunk = self.blob[self.offset : end]
        self.offset = end
        return chunk

    def text(self, field: str) -> str:
        (size,) = _U8.unpack(self.take(1))
        raw = self.take(size)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise DecryptError("malformed", f"{field} is not UTF-8") from None


def decode_header(blob: bytes) -> _Header:
    """Parse the header of a sealed batch. Pure; raises DecryptError."""
    cursor = _Cursor(blob)
    magic, version = _PREFIX.unpack(cursor.take(_PREFIX.size))
    if magic != BATCH_MAGIC:
        raise DecryptError("malformed", "not a sealed lineage batch (bad magic)")
    if version != BATCH_FORMAT_VERSION:
        raise DecryptError(
            "unknown_version",
            f"batch format version {version}, this version reads {BATCH_FORMAT_VERSION}",
        )
    key_id = cursor.text("key id")
    batch_id = cursor.text("batch id")
    (schema_version,) = _U32.unpack(cursor.take(4))
    tag = cursor.take(TOPIC_TAG_BYTES)
    nonce = cursor.take(NONCE_BYTES)
    (wrapped_size,) = _U16.unpack(cursor.take(2))
    wrapped_key = cursor.take(wrapped_size)
    if len(blob) - cursor.offset < TAG_BYTES:
        raise DecryptError("truncated", "blob ends before the authentication tag")
    return _Header(key_id, batch_id, schema_version, tag, nonce, wrapped_key, cursor.offset)


async def seal_batch(
    plaintext: bytes, *, topic: str, batch_id: str, schema_version: int, provider: KeyProvider
) -> bytes:
    """Encrypt one batch for `topic` under a fresh data key wrapped by `provider`."""
    if not topic:
        raise ValueError("topic must not be empty")
    data_key = secrets.token_bytes(DATA_KEY_BYTES)
    wrapped = await provider.wrap(data_key)
    nonce = secrets.token_bytes(NONCE_BYTES)
    header = encode_header(
        key_id=wrapped.key_id,
        batch_id=batch_id,
        schema_version=schema_version,
        topic=topic,
        nonce=nonce,
        wrapped_key=wrapped.ciphertext,
    )
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _associated_data(header, topic))
    return header + ciphertext


async def open_batch(
    blob: bytes,
    *,
    topic: str,
    provider: KeyProvider,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
) -> OpenedBatch:
    """Decrypt and authenticate a sealed batch received on `topic`.

    Raises DecryptError (the blob is bad: dead-letter it) or KeyProviderError (the key
    provider could not be asked: retry later).
    """
    if len(blob) > max_blob_bytes:
        raise DecryptError("too_large", f"{len(blob)} bytes, the limit is {max_blob_bytes}")
    header = decode_header(blob)
    if header.topic_tag != topic_tag(topic):
        raise DecryptError("wrong_topic", f"batch {header.batch_id!r} was not sealed for {topic!r}")
    try:
        data_key = await provider.unwrap(WrappedKey(header.key_id, header.wrapped_key))
    except KeyUnwrapError as exc:
        raise DecryptError(exc.reason, str(exc)) from None
    if len(data_key) != DATA_KEY_BYTES:
        raise DecryptError("tampered", "data key of the wrong length")
    associated = _associated_data(blob[: header.length], topic)
    try:
        plaintext = AESGCM(data_key).decrypt(header.nonce, blob[header.length :], associated)
    except InvalidTag:
        raise DecryptError(
            "tampered", f"batch {header.batch_id!r} failed authentication (altered or replayed)"
        ) from None
    return OpenedBatch(header.batch_id, header.schema_version, plaintext)
