"""TLS termination in front of a real data service (Datasette)."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

from proxy.tls import generate_dev_pair
from tests.integration.proxy.conftest import TLSProxy, run_proxy
from tests.integration.proxy.rawhttp import get


def served_certificate_serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_datasette_table_through_tls(tls_proxy: TLSProxy) -> None:
    reply = get(tls_proxy.proxy.port, "/sales/orders.json", context=tls_proxy.client_context())
    assert reply.status == 200
    data = reply.json()
    assert data["columns"] == ["id", "customer_id", "amount", "placed_at"]
    assert [row[0] for row in data["rows"]] == [1, 2, 3, 4]


def test_datasette_sql_query_through_tls(tls_proxy: TLSProxy) -> None:
    target = (
        "/sales.json?sql=select+name%2C+sum(amount)+as+total+from+orders+join+customers+"
        "on+customers.id%3Dcustomer_id+group+by+name+order+by+name&_shape=array"
    )
    reply = get(tls_proxy.proxy.port, target, context=tls_proxy.client_context())
    assert reply.status == 200, reply.body
    assert reply.json() == [
        {"name": "Acme Corp", "total": 1299.9},
        {"name": "Globex", "total": 830.5},
        {"name": "Initech", "total": 4100.0},
    ]


def test_datasette_error_status_passes_through(tls_proxy: TLSProxy) -> None:
    reply = get(
        tls_proxy.proxy.port, "/sales/no_such_table.json", context=tls_proxy.client_context()
    )
    assert reply.status == 404


def test_tls13_is_negotiated(tls_proxy: TLSProxy) -> None:
    context = tls_proxy.client_context()
    with (
        socket.create_connection(("127.0.0.1", tls_proxy.proxy.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        assert sock.version() == "TLSv1.3"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_1])
def test_older_tls_is_refused_by_default(tls_proxy: TLSProxy, version: ssl.TLSVersion) -> None:
    context = tls_proxy.client_context()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = version
    # Let the client offer old versions at all: OpenSSL's default security level would
    # refuse TLS 1.1 before the server is even asked.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", tls_proxy.proxy.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")
    # The refusal did not hurt the listener.
    assert (
        get(tls_proxy.proxy.port, "/-/versions.json", context=tls_proxy.client_context()).status
        == 200
    )


def test_tls12_allowed_when_configured_with_forward_secret_aead(
    datasette_upstream: str, tmp_path: Path
) -> None:
    paths = generate_dev_pair(tmp_path / "certs")
    tls = {"cert_file": str(paths.cert_file), "key_file": str(paths.key_file), "min_version": "1.2"}
    with run_proxy(tmp_path, datasette_upstream, tls=tls) as proxy:
        context = ssl.create_default_context(cafile=str(paths.ca_file))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            assert sock.version() == "TLSv1.2"
            cipher = sock.cipher()
            assert cipher is not None
            assert cipher[0].startswith("ECDHE-")
            assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


def test_certificate_reload_is_observed_without_restart(
    datasette_upstream: str, tmp_path: Path
) -> None:
    first = generate_dev_pair(tmp_path / "certs")
    tls = {
        "cert_file": str(first.cert_file),
        "key_file": str(first.key_file),
        "reload_interval": 0.2,
    }
    fresh = generate_dev_pair(tmp_path / "new")
    # Both development CAs share a subject name, so read serials without verification.
    trust_both = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trust_both.check_hostname = False
    trust_both.verify_mode = ssl.CERT_NONE
    with run_proxy(tmp_path, datasette_upstream, tls=tls) as proxy:
        before = served_certificate_serial(proxy.port, trust_both)
        # Rotate the way cert-manager or an operator would: new files renamed into place.
        for name, source in (("key.pem", fresh.key_file), ("cert.pem", fresh.cert_file)):
            shutil.copyfile(source, first.cert_file.parent / f"{name}.tmp")
            (first.cert_file.parent / f"{name}.tmp").rename(first.cert_file.parent / name)
        expected = x509.load_pem_x509_certificates(fresh.cert_file.read_bytes())[0].serial_number
        deadline = time.monotonic() + 10
        after = before
        while time.monotonic() < deadline and after != expected:
            time.sleep(0.1)
            after = served_certificate_serial(proxy.port, trust_both)
        assert before != expected
        assert after == expected
        metrics = get(proxy.admin_port, "/metrics").body.decode()
        assert 'lineage_sidecar_tls_reloads_total{result="ok"} 1.0' in metrics
        # A broken pair is refused and the current certificate stays in service.
        (first.cert_file.parent / "cert.pem").write_text("not a certificate")
        time.sleep(1.0)
        assert served_certificate_serial(proxy.port, trust_both) == expected
        metrics = get(proxy.admin_port, "/metrics").body.decode()
        assert 'lineage_sidecar_tls_reloads_total{result="error"} 1.0' in metrics


def test_dev_certificate_is_generated_when_none_configured(
    datasette_upstream: str, tmp_path: Path
) -> None:
    with run_proxy(tmp_path, datasette_upstream, tls={"enabled": True}) as proxy:
        ca = tmp_path / "var" / "tls" / "ca.pem"
        assert ca.exists()
        assert oct((tmp_path / "var" / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"
        context = ssl.create_default_context(cafile=str(ca))
        assert get(proxy.port, "/-/versions.json", context=context).status == 200
        assert "generated a development CA" in proxy.log.read_text()


def test_admin_endpoints(tls_proxy: TLSProxy) -> None:
    admin = tls_proxy.proxy.admin_port
    assert get(admin, "/healthz").status == 200
    ready = get(admin, "/readyz")
    assert ready.status == 200
    assert json.loads(ready.body) == {"ready": True, "reasons": []}
    get(tls_proxy.proxy.port, "/-/versions.json", context=tls_proxy.client_context())
    metrics = get(admin, "/metrics").body.decode()
    for name in (
        'lineage_sidecar_requests_total{status_class="2xx"}',
        "lineage_sidecar_request_duration_seconds_bucket",
        "lineage_sidecar_upstream_errors_total",
        "lineage_sidecar_active_connections",
    ):
        assert name in metrics
