"""A raw HTTP/1.1 client for tests: exact bytes out, a parsed response back."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def connect(
    port: int, *, context: ssl.SSLContext | None = None, timeout: float = 10
) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if context is not None:
        return context.wrap_socket(sock, server_hostname="localhost")
    return sock


def read_reply(sock: socket.socket, method: str = "GET") -> Reply:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return Reply(response.status, list(response.getheaders()), body)


def exchange(
    port: int,
    data: bytes,
    *,
    method: str = "GET",
    context: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> Reply:
    """Send `data` on a fresh connection and read one response."""
    with connect(port, context=context, timeout=timeout) as sock:
        sock.sendall(data)
        return read_reply(sock, method)


def get(
    port: int, target: str, *, headers: str = "", context: ssl.SSLContext | None = None
) -> Reply:
    head = f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    return exchange(port, head.encode("latin-1"), context=context)
