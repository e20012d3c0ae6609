"""Is a Kafka broker ready to serve clients? Answers with one Metadata request.

Used by scripts/services before the project's virtualenv exists, so it needs only the
standard library. A broker counts as ready when it answers Metadata (v4, the oldest version
Kafka 4.x still accepts) and lists at least one live broker: a KRaft broker only reports
itself once the controller has unfenced it, which is the point where produce and
auto-created topics start to work.

Exit status 0 and a one-line summary on stdout when ready; 1 and the reason on stderr when not.
"""

from __future__ import annotations

import socket
import struct
import sys

METADATA_API_KEY = 3
METADATA_VERSION = 4
CORRELATION_ID = 0x5EED
CLIENT_ID = b"lineage-sidecar-probe"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class ProbeError(Exception):
    """The broker is unreachable or did not answer a usable Metadata response."""


class _Reader:
    """Reads big-endian Kafka primitive types from one response buffer."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._offset = 0

    def _take(self, size: int) -> bytes:
        end = self._offset + size
        if size < 0 or end > len(self._payload):
            raise ProbeError("truncated Metadata response")
        chunk = self._payload[self._offset : end]
        self._offset = end
        return chunk

    def int16(self) -> int:
        value: int = struct.unpack(">h", self._take(2))[0]
        return value

    def int32(self) -> int:
        value: int = struct.unpack(">i", self._take(4))[0]
        return value

    def nullable_string(self) -> str | None:
        length = self.int16()
        if length == -1:
            return None
        return self._take(length).decode("utf-8", "replace")


def _metadata_request() -> bytes:
    header = struct.pack(
        ">hhih", METADATA_API_KEY, METADATA_VERSION, CORRELATION_ID, len(CLIENT_ID)
    )
    # topics = null (all topics), allow_auto_topic_creation = false
    body = struct.pack(">ib", -1, 0)
    message = header + CLIENT_ID + body
    return struct.pack(">i", len(message)) + message


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            raise ProbeError("connection closed before the response was complete")
        chunks.extend(chunk)
    return bytes(chunks)


def probe(host: str, port: int, timeout: float) -> str:
    """Send one Metadata request; return a summary, or raise ProbeError saying why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(_metadata_request())
            (size,) = struct.unpack(">i", _read_exactly(conn, 4))
            if not 0 < size <= MAX_RESPONSE_BYTES:
                raise ProbeError(f"implausible response size {size}")
            payload = _read_exactly(conn, size)
    except OSError as exc:
        raise ProbeError(f"{host}:{port}: {exc}") from exc

    reader = _Reader(payload)
    if reader.int32() != CORRELATION_ID:
        raise ProbeError("response correlation id does not match the request")
    reader.int32()  # throttle_time_ms
    brokers: list[str] = []
    for _ in range(reader.int32()):
        node_id = reader.int32()
        broker_host = reader.nullable_string()
        broker_port = reader.int32()
        reader.nullable_string()  # rack
        brokers.append(f"{node_id}@{broker_host}:{broker_port}")
    cluster_id = reader.nullable_string()
    controller_id = reader.int32()
    if not brokers:
        raise ProbeError("broker answers but lists no live broker yet (still starting)")
    return f"cluster_id={cluster_id} controller={controller_id} brokers={','.join(brokers)}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[1]:
        print("usage: probe.py HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    try:
        print(probe(host, int(port), timeout=3.0))
    except ProbeError as exc:
        print(f"kafka not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
