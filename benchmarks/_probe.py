"""Is a server up, and does it answer exactly what it should?

Used before any measurement: a target that answers fast but wrongly (502, an error page,
a truncated body, TLS 1.2) would produce impressive and meaningless figures.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import msgspec


class TargetFailed(RuntimeError):
    """A server could not be started or does not answer as expected (message says why)."""


class Verification(msgspec.Struct, frozen=True, kw_only=True):
    """What the pre-measurement check saw: two requests on one connection."""

    status: int
    body_bytes: int
    keeps_alive: bool
    tls_version: str | None
    tls_cipher: str | None
    server_header: str | None


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url: str) -> tuple[int, bytes] | str:
    """Status and body of a plain-HTTP GET, or what went wrong as text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=2)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def check_answer(
    url: str,
    *,
    expected_body: bytes,
    headers: Sequence[str] = (),
    ca_file: Path | None = None,
    require_tls13: bool = False,
) -> Verification:
    """Two GETs on one connection must both answer 200 with exactly `expected_body`.

    `headers` are in wrk's "Name: value" form, so a mode that needs a token sends the same
    one here and under load. HTTPS is verified against `ca_file`.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        conn = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=5)
    request_headers = {
        name.strip(): value.strip() for name, value in (h.split(":", 1) for h in headers)
    }
    try:
        for attempt in (1, 2):
            conn.request("GET", parts.path or "/", headers=request_headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or body != expected_body:
                raise TargetFailed(
                    f"request {attempt} to {url} answered {response.status} with body "
                    f"{body[:300]!r}; expected 200 with {expected_body!r}"
                )
            # Checked after each answer: http.client silently reconnects after a close.
            keeps_alive = not response.will_close
            sock = conn.sock
            tls_version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
            cipher = sock.cipher() if isinstance(sock, ssl.SSLSocket) else None
        if require_tls13 and tls_version != "TLSv1.3":
            raise TargetFailed(f"{url} negotiated {tls_version}, expected TLSv1.3")
        return Verification(
            status=response.status,
            body_bytes=len(body),
            keeps_alive=keeps_alive,
            tls_version=tls_version,
            tls_cipher=None if cipher is None else cipher[0],
            server_header=response.getheader("Server"),
        )
    except (OSError, http.client.HTTPException) as exc:
        raise TargetFailed(f"GET {url} failed: {exc}") from exc
    finally:
        conn.close()
