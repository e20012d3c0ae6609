"""What the upstream receives is built by one function: its header rules, exhaustively."""

from __future__ import annotations

import os

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from lineage_sidecar.config import Config, IdentityHeadersConfig, from_mapping
from proxy import forward
from proxy.authn.chain import AuthChain
from proxy.forward import HOP_BY_HOP, PROXY_SET, ClientError, Forwarder
from proxy.gate import Gate
from proxy.metrics import ProxyMetrics

CONFIG = from_mapping({"proxy": {"upstream": "http://127.0.0.1:9000"}})
TRUSTED = from_mapping(
    {"proxy": {"upstream": "http://127.0.0.1:9000", "trusted_proxies": ["10.0.0.0/8"]}}
)


def forwarder(config: Config = CONFIG) -> Forwarder:
    return Forwarder(config.proxy, ProxyMetrics(CollectorRegistry()), None, scheme="https")


def request(
    headers: list[tuple[str, str]], target: str = "/t?q=1", remote: str = "192.0.2.1"
) -> web.BaseRequest:
    req = make_mocked_request("GET", target, headers=CIMultiDict(headers))
    return req.clone(remote=remote)


def upstream_headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].endswith(" HTTP/1.1")
    assert head.endswith(b"\r\n\r\n")
    pairs = []
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(": ")
        pairs.append((name, value))
    return pairs


OTHER_NAMES = ["X-Custom", "Accept", "X-User", "Cookie", "X-Secret", "Authorization"]
NAMES = st.sampled_from(
    [*sorted(n.decode() for n in HOP_BY_HOP | PROXY_SET - {b"host"}), *OTHER_NAMES]
)
CASED = NAMES.flatmap(
    lambda n: st.lists(st.booleans(), min_size=len(n), max_size=len(n)).map(
        lambda flips: "".join(c.upper() if f else c.lower() for c, f in zip(n, flips, strict=True))
    )
)
VALUES = st.text(alphabet="abcXYZ019 ,;=-_.", max_size=20).map(str.strip).filter(bool)


@given(
    headers=st.lists(st.tuples(CASED, VALUES), max_size=12),
    named=st.lists(st.sampled_from(["X-Custom", "x-secret", "Cookie", "X-Nope"]), max_size=3),
)
@settings(max_examples=300, deadline=None)
def test_no_hop_by_hop_connection_named_or_forged_forwarding_header_passes(
    headers: list[tuple[str, str]], named: list[str]
) -> None:
    all_headers = [("Host", "shop.test"), *headers]
    if named:
        all_headers.append(("Connection", ", ".join(named)))
    head = forwarder()._request_head(request(all_headers), "rid-1", b"")
    sent = upstream_headers(head)
    sent_names = [n.lower() for n, _ in sent]
    dropped = {n.lower() for n in named}
    for name in sent_names:
        assert name.encode() not in HOP_BY_HOP
        assert name not in dropped
    # The proxy's own forwarding headers appear exactly once, with the proxy's values.
    for own in (
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-request-id",
    ):
        assert sent_names.count(own) == 1, own
    values = dict((n.lower(), v) for n, v in sent)
    assert values["x-forwarded-for"] == "192.0.2.1"
    assert values["x-forwarded-proto"] == "https"
    assert values["x-request-id"] == "rid-1"
    assert "x-real-ip" not in values
    # End-to-end headers the client sent survive, in order.
    kept = [
        (n, v)
        for n, v in headers
        if n.lower().encode() not in HOP_BY_HOP | PROXY_SET and n.lower() not in dropped
    ]
    assert [(n, v) for n, v in sent if (n, v) in kept] == kept


@given(st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_host_header_is_valid_or_refused(host: str) -> None:
    if (
        any(c in host for c in "\r\n\x00")
        or not host.isascii()
        or host != host.strip()
        or not host.isprintable()
    ):
        return  # the HTTP parser refuses these before the handler sees them
    try:
        head = forwarder()._request_head(request([("Host", host)]), "r", b"")
    except ClientError as exc:
        refused = exc.status
    else:
        refused = 0
    if refused:
        assert refused == 400
        return
    for forbidden in "@/ \\":
        assert forbidden not in host
    assert f"\r\nHost: {host}\r\n".encode() in head


@pytest.mark.parametrize(
    "spelling",
    [
        "__Host-lineage_session=v",
        "__Host-lineage_session =v",
        "__Host-lineage_session\t= v",
        "  __Host-lineage_session  =v",
    ],
)
def test_the_session_cookie_never_reaches_the_upstream(spelling: str) -> None:
    gate = Gate(
        auth=AuthChain([]),
        policy=None,
        audit=None,
        identity=IdentityHeadersConfig(),
        session_cookie="__Host-lineage_session",
    )
    proxy = Forwarder(
        CONFIG.proxy, ProxyMetrics(CollectorRegistry()), None, scheme="https", gate=gate
    )
    req = request([("Host", "a"), ("Cookie", f"theme=dark;{spelling}; lang=en")])
    sent = upstream_headers(proxy._request_head(req, "r", b""))
    assert [v for n, v in sent if n == "Cookie"] == ["theme=dark; lang=en"]
    alone = request([("Host", "a"), ("Cookie", spelling)])
    assert "Cookie" not in dict(upstream_headers(proxy._request_head(alone, "r", b"")))


def test_trusted_peer_extends_forwarding_chain() -> None:
    req = request(
        [("Host", "a"), ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "http")],
        remote="10.1.2.3",
    )
    values = dict(
        (n.lower(), v) for n, v in upstream_headers(forwarder(TRUSTED)._request_head(req, "r", b""))
    )
    assert values["x-forwarded-for"] == "203.0.113.9, 10.1.2.3"
    assert values["x-forwarded-proto"] == "http"


def test_untrusted_peer_cannot_extend_chain() -> None:
    req = request([("Host", "a"), ("X-Forwarded-For", "203.0.113.9")], remote="192.0.2.5")
    values = dict(
        (n.lower(), v) for n, v in upstream_headers(forwarder(TRUSTED)._request_head(req, "r", b""))
    )
    assert values["x-forwarded-for"] == "192.0.2.5"


def test_ipv6_peer_is_quoted_in_forwarded() -> None:
    req = request([("Host", "a")], remote="2001:db8::1")
    values = dict(
        (n.lower(), v) for n, v in upstream_headers(forwarder()._request_head(req, "r", b""))
    )
    assert values["forwarded"].startswith('for="[2001:db8::1]";')


def test_a_forked_worker_does_not_repeat_its_parents_request_ids() -> None:
    # The proxy's workers are spawned, and seed their own generator; a process that
    # forks instead must not repeat its parent's ids either, or two processes would
    # hand the same X-Request-Id to the upstream and the audit log.
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child only reports and exits)
        try:
            os.write(write_end, forward._random_bytes(12))
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        from_child = pipe.read()
    assert len(from_child) == 12
    assert from_child != forward._random_bytes(12)
