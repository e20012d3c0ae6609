"""A deliberately naive aiohttp reverse proxy: the reference point, not the product.

It reads the same YAML keys as `lineage-sidecar proxy` (proxy.listen, proxy.upstream,
proxy.tls, admin.listen) and answers `/readyz` on the admin port, so the harness starts
it exactly like the real proxy. It does what a first attempt does: one aiohttp client
session, the whole upstream body read into memory, headers copied through a dict. The
issue's "a naive aiohttp proxy does about 9% of nginx" refers to this kind of proxy.

Run: python -m benchmarks._naive_proxy --config FILE
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def _server_tls(tls: dict[str, Any]) -> ssl.SSLContext | None:
    if not tls.get("enabled"):
        return None
    if "cert_file" not in tls or "key_file" not in tls:
        raise SystemExit("naive proxy: proxy.tls needs cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(tls["cert_file"], tls["key_file"])
    return context


async def serve(config: dict[str, Any]) -> None:
    proxy_section: dict[str, Any] = config["proxy"]
    if int(proxy_section.get("workers", 1)) != 1:
        raise SystemExit("naive proxy: only workers: 1 is supported")
    upstream = str(proxy_section["upstream"]).rstrip("/")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100), auto_decompress=False
    )

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Proto"] = request.scheme
        async with session.request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=answer.status, headers=kept, body=body)

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    proxy_app = web.Application()
    proxy_app.router.add_route("*", "/{tail:.*}", forward)
    admin_app = web.Application()
    admin_app.router.add_get("/readyz", readyz)
    admin_app.router.add_get("/healthz", readyz)

    runners = [web.AppRunner(proxy_app, access_log=None), web.AppRunner(admin_app)]
    for runner in runners:
        await runner.setup()
    host, port = _split_listen(proxy_section["listen"])
    tls_context = _server_tls(proxy_section.get("tls") or {})
    await web.TCPSite(runners[0], host, port, ssl_context=tls_context).start()
    admin_host, admin_port = _split_listen(config["admin"]["listen"])
    await web.TCPSite(runners[1], admin_host, admin_port).start()

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    try:
        await stopped.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
