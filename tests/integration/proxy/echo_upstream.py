"""A small HTTP/1.1 upstream for proxy tests that reports exactly what it received.

Run as `python -m tests.integration.proxy.echo_upstream PORT_FILE`: it listens on an
ephemeral loopback port and writes the port to PORT_FILE. Every request is parsed with
httptools (a parser independent of aiohttp's) and answered with JSON describing it: the
request line, raw header list, body length and checksum, and the connection it came on.
Special paths:
  /__log            every request seen so far (method, path, connection id, complete)
  /__reset          forget the log
  /__close_mid_body answer headers with Content-Length 1000, send 10 bytes, close
  /__close_early    close the connection without answering
  /__slow?ms=N      wait N ms before answering
  /__big?bytes=N    stream N bytes of body (Content-Length set)
  /__chunked?n=N    answer with N chunks of 1 KiB each, chunked
  /__head_len       answer HEAD/GET with Content-Length 12345 (body only for GET)
  /__until_close?version=V&bytes=N
                    answer HTTP/V (1.0 or 1.1, with Connection: close) with N bytes of body
                    and no length: the body ends where the connection does
  /__many_headers?n=N&size=S
                    answer with N header fields of S bytes each (written with back-pressure,
                    stopping when the proxy closes the connection), then a 2-byte body
  /__switch         answer 101 Switching Protocols to websocket, unasked, then a frame
  /__status?code=C  answer with the status line `HTTP/1.1 C Odd` (C as given) and a 2-byte body
  /__no_read        stop reading the connection once the headers are in; never answer
                    (logged at that point with "stalled": true)
  /__answer_then_read
                    once the headers are in, send a chunked 200 head and a first chunk
                    ("started\n"), read the whole body, then end the answer with a chunk of
                    JSON {"body_length": N} (an upstream streaming while it reads)
  /__two_answers    answer with two whole responses in one write: a 200 "ok", then a 302
                    to evil.test with a cookie and a 4-byte body (a desynchronised upstream)
  /__answer_early?code=C
                    once the headers are in, answer with status C and a JSON body, and stop
                    reading the connection (a server refusing a body it will not take)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

LOG: list[dict[str, Any]] = []
_connection_ids = itertools.count(1)


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.connection_id = next(_connection_ids)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: dict[str, Any] | None = None
        self.checksum = 1
        self.tasks: set[asyncio.Task[None]] = set()
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self.answer_in_order())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            LOG.append({"parse_error": str(exc), "connection": self.connection_id})
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            # A request whose body never completed: the proxy cut the connection.
            self.current["complete"] = False
            LOG.append(self.current)
            self.current = None
        if self.worker is not None:
            self.worker.cancel()

    def on_message_begin(self) -> None:
        self.current = {
            "connection": self.connection_id,
            "headers": [],
            "body_length": 0,
            "complete": False,
        }
        self.checksum = 1
        self.sha = hashlib.sha256()

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current["target"] = self.current.get("target", "") + url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current["headers"].append([name.decode("latin-1"), value.decode("latin-1")])

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current["method"] = self.parser.get_method().decode("latin-1")
        self.current["version"] = self.parser.get_http_version()
        parts = urlsplit(self.current["target"])
        if parts.path == "/__no_read":
            assert self.transport is not None
            self.transport.pause_reading()
            LOG.append({**self.current, "stalled": True})
        elif parts.path == "/__answer_then_read":
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nstarted\n\r\n"
            )
        elif parts.path == "/__answer_early":
            assert self.transport is not None
            self.transport.pause_reading()
            LOG.append({**self.current, "answered_early": True})
            code = int(parse_qs(parts.query)["code"][0])
            self.send(code, json.dumps({"early": code}).encode())

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current["body_length"] += len(body)
        self.checksum = zlib.adler32(body, self.checksum)
        if self.current["body_length"] <= 1 << 20:
            self.sha.update(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        request = self.current
        self.current = None
        request["complete"] = True
        request["adler32"] = self.checksum
        request["sha256_first_mib"] = self.sha.hexdigest()
        request["keep_alive"] = self.parser.should_keep_alive()
        path = urlsplit(request["target"]).path
        if not path.startswith("/__log") and not path.startswith("/__reset"):
            LOG.append(request)
        self.queue.put_nowait(request)

    async def answer_in_order(self) -> None:
        while True:
            request = await self.queue.get()
            await self.answer(request)

    async def answer(self, request: dict[str, Any]) -> None:
        assert self.transport is not None
        parts = urlsplit(request["target"])
        query = parse_qs(parts.query)
        path = parts.path
        write = self.transport.write
        if path == "/__log":
            self.send(200, json.dumps(LOG).encode())
        elif path == "/__reset":
            LOG.clear()
            self.send(200, b"[]")
        elif path == "/__close_mid_body":
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            self.transport.close()
        elif path == "/__close_early":
            self.transport.close()
        elif path == "/__slow":
            await asyncio.sleep(int(query.get("ms", ["1000"])[0]) / 1000)
            self.send(200, b'{"slow":true}')
        elif path == "/__big":
            size = int(query["bytes"][0])
            write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"x" * 65536
            sent = 0
            while sent < size:
                piece = block[: min(len(block), size - sent)]
                write(piece)
                sent += len(piece)
                if self.transport.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0.001)
                    while self.transport.get_write_buffer_size() > 1 << 19:
                        if self.transport.is_closing():
                            return
                        await asyncio.sleep(0.001)
        elif path == "/__chunked":
            write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(int(query.get("n", ["4"])[0])):
                write(b"400\r\n" + b"c" * 1024 + b"\r\n")
                await asyncio.sleep(0)
            write(b"0\r\n\r\n")
        elif path == "/__head_len":
            body = b"h" * 12345 if request["method"] != "HEAD" else b""
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n" + body)
        elif path == "/__until_close":
            version = query.get("version", ["1.0"])[0].encode()
            close = b"Connection: close\r\n" if version == b"1.1" else b""
            write(b"HTTP/%b 200 OK\r\nContent-Type: text/plain\r\n%b\r\n" % (version, close))
            write(close_delimited_body(int(query["bytes"][0])))
            self.transport.close()
        elif path == "/__many_headers":
            count, size = int(query["n"][0]), int(query["size"][0])
            write(b"HTTP/1.1 200 OK\r\n")
            field = b"X-Filler: " + b"f" * size + b"\r\n"
            closing = self.transport.is_closing
            for _ in range(count):
                if closing():
                    return
                write(field)
                if self.transport.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0.001)  # let the proxy read (or close)
            write(b"Content-Length: 2\r\n\r\nok")
        elif path == "/__switch":
            write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n\x81\x05hello"
            )
        elif path == "/__answer_then_read":
            end = json.dumps({"body_length": request["body_length"]}).encode()
            write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(end), end))
        elif path == "/__two_answers":
            write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 302 Found\r\nLocation: http://evil.test/\r\n"
                b"Set-Cookie: session=evil\r\nContent-Length: 4\r\n\r\nevil"
            )
        elif path == "/__status":
            code = query["code"][0].encode()
            write(b"HTTP/1.1 %b Odd\r\nContent-Length: 2\r\n\r\nok" % code)
        else:
            self.send(200, json.dumps(request).encode(), request["method"] == "HEAD")

    def send(self, status: int, body: bytes, head: bool = False) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-Upstream: echo\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Connection: keep-alive, X-Drop-Me\r\nX-Drop-Me: secret\r\nKeep-Alive: timeout=30\r\n"
            b"\r\n%b" % (status, len(body), b"" if head else body)
        )


def close_delimited_body(size: int) -> bytes:
    """The body /__until_close sends: numbered lines, so a lost or repeated piece shows."""
    lines = b"".join(b"%08d\n" % n for n in range(size // 9 + 1))
    return lines[:size]


async def main(port_file: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.rename(port_file)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
